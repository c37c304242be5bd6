//! The embedded rumqttd broker (default for small fleets and tests).
//!
//! Limits (docs/fleet-server.md): rumqttd 0.20 stops accepting when thousands
//! of clients connect at once (listen backlog overflow), grows to ~1 GB at
//! 15k connections and has no shutdown API. Fleets beyond a few thousand
//! devices should use Mosquitto or EMQX (`serve --broker mqtt://HOST:PORT`).
//!
//! Device auth ([`crate::config::DeviceAuth::Required`]): every CONNECT goes
//! through [`device_auth`] (rumqttd's external auth hook). rumqttd 0.20 has no
//! topic ACLs: once connected, a device can publish and subscribe anywhere
//! (docs/fleet-server.md, "Device isolation").

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::credentials::{BrokerAuth, Principal};
use crate::{Error, Result, State};

/// A CONNECT check: (client id, username, password) -> accept.
pub type ConnectCheck = Arc<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

/// The device-auth check of a running server. It holds the state weakly (the
/// broker thread outlives [`crate::Server::shutdown`]; it must not keep the
/// store open): once the server is gone every connect is refused. Refusals
/// are logged (client id, username, reason; never the password) and counted
/// (`broker_auth_refused` in `/v1/stats`).
pub fn device_auth(state: Weak<State>) -> ConnectCheck {
    Arc::new(move |client_id: &str, username: &str, password: &str| {
        let Some(st) = state.upgrade() else {
            return false;
        };
        let Some((su, sp)) = &st.config.mqtt_credentials else {
            return false;
        };
        let auth = BrokerAuth {
            credentials: &st.credentials,
            server: (su.as_str(), sp.as_str()),
        };
        match auth.check(client_id, username, password) {
            Ok(Principal::Server) => {
                tracing::debug!(client_id, "broker: server connected");
                true
            }
            Ok(Principal::Device(_)) => {
                tracing::debug!(client_id, username, "broker: device authenticated");
                true
            }
            Err(r) => {
                st.stats.broker_auth_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client_id,
                    username,
                    reason = r.as_str(),
                    "broker: connection refused"
                );
                false
            }
        }
    })
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

/// [`spawn_embedded`] with a CONNECT check (see [`device_auth`]).
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
