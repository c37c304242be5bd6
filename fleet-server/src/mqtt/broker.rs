//! The embedded rumqttd broker (default for small fleets and tests).
//!
//! Limits (docs/fleet-server.md): rumqttd 0.20 stops accepting when thousands
//! of clients connect at once (listen backlog overflow), grows to ~1 GB at
//! 15k connections and has no shutdown API. Fleets beyond a few thousand
//! devices should use Mosquitto or EMQX (`serve --broker mqtt://HOST:PORT`).
//!
//! How it is exposed depends on [`DeviceAuth`] ([`start`]):
//! - [`DeviceAuth::Required`]: rumqttd listens on an internal loopback port
//!   whose CONNECT hook admits only the server's own credentials
//!   ([`server_only`]); the server's client connects there. Devices connect to
//!   the public port, served by [`super::gate`], which authenticates each
//!   CONNECT with the device's issued credentials and enforces the topic ACL
//!   (rumqttd 0.20 has none) before relaying to rumqttd.
//! - [`DeviceAuth::Off`] (lab mode): rumqttd listens on the public port
//!   itself; anyone may connect, as any client id, and publish and subscribe
//!   anywhere (docs/fleet-server.md, "Device isolation").

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::gate;
use crate::{DeviceAuth, Error, Result, State};

/// A CONNECT check: (client id, username, password) -> accept.
pub type ConnectCheck = Arc<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

/// The internal port's CONNECT check: only `username` with `password` (the
/// server's own login, which the gate also presents for every client it
/// admitted). Passwords are compared as SHA-256 digests (constant time).
pub fn server_only(username: String, password: String) -> ConnectCheck {
    let want = Sha256::digest(password.as_bytes());
    Arc::new(move |client_id: &str, user: &str, pass: &str| {
        let ok = user == username && Sha256::digest(pass.as_bytes()) == want;
        if !ok {
            tracing::warn!(
                client_id,
                username = user,
                "internal broker port: refused a login other than the server's"
            );
        }
        ok
    })
}

/// The running embedded broker.
pub struct Embedded {
    /// The port devices connect to (the gate's, or rumqttd's in lab mode).
    pub public_port: u16,
    /// The port the server's own client connects to (rumqttd's).
    pub client_port: u16,
    /// The gate's accept loop (`None` in lab mode).
    pub gate: Option<JoinHandle<()>>,
}

/// Starts the embedded broker for `state` on public port `port` (0: a free
/// one) as [`DeviceAuth`] says (module doc). With [`DeviceAuth::Required`]
/// `state.config.mqtt_credentials` must be set (the server's login).
///
/// # Errors
/// [`Error::Mqtt`] when rumqttd does not start, [`Error::Io`] when the
/// public port cannot be bound.
pub async fn start(
    state: &Arc<State>,
    port: u16,
    auth: DeviceAuth,
    shutdown: watch::Receiver<bool>,
) -> Result<Embedded> {
    let spawn = |port: u16, check: Option<ConnectCheck>| async move {
        tokio::task::spawn_blocking(move || spawn_embedded_with(port, check))
            .await
            .map_err(|e| Error::Mqtt(e.to_string()))?
    };
    match auth {
        DeviceAuth::Off => {
            tracing::warn!(
                "device auth off (lab mode): the embedded broker admits anyone and does not \
                 isolate devices from each other"
            );
            let p = spawn(port, None).await?;
            Ok(Embedded {
                public_port: p,
                client_port: p,
                gate: None,
            })
        }
        DeviceAuth::Required => {
            let login =
                state.config.mqtt_credentials.clone().ok_or_else(|| {
                    Error::Mqtt("device auth needs the server's broker login".into())
                })?;
            let listener = gate::bind(port).await?;
            let public_port = listener
                .local_addr()
                .map_err(|e| Error::io("broker gate", e))?
                .port();
            let internal = spawn(0, Some(server_only(login.0.clone(), login.1.clone()))).await?;
            let upstream = gate::Upstream {
                port: internal,
                login,
            };
            let task = gate::spawn(listener, upstream, Arc::downgrade(state), shutdown);
            Ok(Embedded {
                public_port,
                client_port: internal,
                gate: Some(task),
            })
        }
    }
}

/// rumqttd configuration built in code: max payload >= the protocol's MQTT
/// packet limit; anyone may connect.
pub fn config(port: u16) -> Config {
    config_with(port, None)
}

/// [`config`] with a CONNECT check (`None`: anyone may connect).
pub fn config_with(port: u16, check: Option<ConnectCheck>) -> Config {
    let router = RouterConfig {
        max_connections: 20_000,
        max_outgoing_packet_count: 1000,
        max_segment_size: 100 * 1024 * 1024,
        max_segment_count: 10,
        ..RouterConfig::default()
    };
    let mut conn = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: edgefleet_protocol::MQTT_MAX_PACKET_BYTES + 4096,
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(check) = check {
        conn.set_auth_handler(move |client_id: String, user: String, pass: String| {
            std::future::ready(check(&client_id, &user, &pass))
        });
    }
    let server = ServerSettings {
        name: "edgefleet-v4".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: conn,
    };
    let mut v4 = HashMap::new();
    v4.insert("1".to_string(), server);
    Config {
        id: 0,
        router,
        v4: Some(v4),
        ..Config::default()
    }
}

/// Picks a free TCP port on 127.0.0.1.
///
/// # Errors
/// [`Error::Io`].
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("127.0.0.1:0", e))?;
    Ok(l.local_addr()
        .map_err(|e| Error::io("127.0.0.1:0", e))?
        .port())
}

/// Starts rumqttd on its own thread (`Broker::start` blocks; there is no
/// shutdown: it lives as long as the process) and waits until it accepts.
/// Port 0 picks a free port. Returns the port. Anyone may connect.
///
/// # Errors
/// [`Error::Mqtt`] when it does not accept within 5 s.
pub fn spawn_embedded(port: u16) -> Result<u16> {
    spawn_embedded_with(port, None)
}

/// [`spawn_embedded`] with a CONNECT check (see [`server_only`]).
///
/// # Errors
/// [`Error::Mqtt`] when it does not accept within 5 s.
pub fn spawn_embedded_with(port: u16, check: Option<ConnectCheck>) -> Result<u16> {
    let port = if port == 0 { free_port()? } else { port };
    let cfg = config_with(port, check);
    std::thread::Builder::new()
        .name(format!("rumqttd-{port}"))
        .spawn(move || {
            let mut broker = Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(port, error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| Error::Mqtt(format!("spawning the broker thread: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Mqtt(format!(
        "embedded broker did not accept on 127.0.0.1:{port} within 5 s"
    )))
}
