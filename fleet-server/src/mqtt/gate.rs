//! The embedded broker's front door with device auth: an MQTT-aware TCP
//! proxy that enforces who may connect and where each device may publish and
//! subscribe (rumqttd 0.20 has a CONNECT hook but no topic ACLs).
//!
//! rumqttd listens on an internal loopback port and admits only the server's
//! own credentials ([`super::broker::server_only`]). Devices connect to the
//! gate's public port. For each connection the gate:
//! 1. reads the CONNECT ([`read_connect`], at most [`CONNECT_MAX_BYTES`]
//!    within [`CONNECT_TIMEOUT`]);
//! 2. decides it ([`admit`]): [`BrokerAuth::check`] on client id, username
//!    and password, then the last will ([`acl::check_will`]). A refusal is
//!    answered with a CONNACK carrying the MQTT 3.1.1 return code
//!    ([`ConnectRefusal::code`]), so the client learns why, then closed;
//!    it is logged (never the password) and counted (`broker_auth_refused`,
//!    or `broker_acl_denied` for a will outside the device's `up/`);
//! 3. opens the upstream connection and sends the same CONNECT with the
//!    server's credentials in place of the device's ([`open_upstream`]);
//! 4. relays ([`relay`]): broker -> client bytes unchanged; client -> broker
//!    packet by packet through [`acl::check_packet`]. A denied packet is not
//!    forwarded: the gate logs a warning naming device, action and topic,
//!    counts it (`broker_acl_denied`) and closes the connection (as AWS IoT
//!    Core does; MQTT 3.1.1 cannot refuse a publish), so the broker publishes
//!    the device's last will.
//!
//! The rules themselves are pure functions in [`super::acl`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rumqttc::mqttbytes::{self, PacketType, Protocol};
use rumqttc::{Connect, Login, Packet};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::acl::{self, ConnectRefusal, Denial, Verdict};
use crate::credentials::{BrokerAuth, Principal};
use crate::{Error, Result, State};

/// How long a client has to send its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest CONNECT accepted before authentication (a will payload included).
pub const CONNECT_MAX_BYTES: usize = 64 * 1024;
/// Largest packet after it (the broker's own limit).
pub const PACKET_MAX_BYTES: usize = edgefleet_protocol::MQTT_MAX_PACKET_BYTES + 4096;
/// How long the gate lets the broker finish after the client closed its side.
const LINGER: Duration = Duration::from_secs(5);
/// Buffer of each direction.
const BUF_BYTES: usize = 64 * 1024;

/// Where the gate forwards admitted clients.
#[derive(Clone)]
pub struct Upstream {
    /// rumqttd's internal port on 127.0.0.1.
    pub port: u16,
    /// The server's broker username and password, presented for every
    /// admitted client (the only login the internal port accepts).
    pub login: (String, String),
}

struct Ctx {
    state: Weak<State>,
    upstream: Upstream,
}

/// Binds the gate's public port on 127.0.0.1 (0: a free port).
///
/// # Errors
/// [`Error::Io`].
pub async fn bind(port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(addr.to_string(), e))
}

/// Runs the gate on `listener` until `shutdown` turns true; then it stops
/// accepting and closes every connection it relays. It holds the state
/// weakly: once the server is gone every CONNECT is refused.
pub fn spawn(
    listener: TcpListener,
    upstream: Upstream,
    state: Weak<State>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let ctx = Arc::new(Ctx { state, upstream });
    tokio::spawn(async move {
        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                r = listener.accept() => match r {
                    Ok((client, peer)) => {
                        tokio::spawn(serve(client, peer, ctx.clone(), shutdown.clone()));
                    }
                    Err(e) => {
                        // EMFILE and the like: do not spin.
                        tracing::warn!(error = %e, "broker gate: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    })
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Why a connection ended before it was admitted (logged at debug level).
#[derive(Debug)]
enum Early {
    Io(std::io::Error),
    Timeout,
    Closed,
    Malformed(mqttbytes::Error),
    NotConnect,
    Protocol(u8),
}

impl std::fmt::Display for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Early::Io(e) => write!(f, "socket error: {e}"),
            Early::Timeout => write!(f, "no CONNECT within {} s", CONNECT_TIMEOUT.as_secs()),
            Early::Closed => f.write_str("closed before its CONNECT"),
            Early::Malformed(e) => write!(f, "malformed CONNECT: {e}"),
            Early::NotConnect => f.write_str("first packet is not a CONNECT"),
            Early::Protocol(l) => write!(f, "protocol level {l}"),
        }
    }
}

/// One client connection, stage by stage.
async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let (connect, leftover) = match read_connect(&mut client).await {
        Ok(c) => c,
        Err(Early::Protocol(level)) => {
            refuse(
                &mut client,
                &ctx,
                peer,
                None,
                ConnectRefusal::Protocol(level),
            )
            .await;
            return;
        }
        Err(e) => {
            tracing::debug!(%peer, reason = %e, "broker gate: no CONNECT");
            return;
        }
    };
    let principal = match admit(&ctx, &connect) {
        Ok(p) => p,
        Err(r) => {
            refuse(&mut client, &ctx, peer, Some(&connect), r).await;
            return;
        }
    };
    let client_id = connect.client_id.clone();
    let upstream = match open_upstream(&ctx.upstream, connect).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(%peer, client_id, error = %e, "broker gate: the internal broker is unreachable");
            let r = ConnectRefusal::Unavailable;
            let _ = client.write_all(&acl::connack_bytes(r.code())).await;
            return;
        }
    };
    tracing::debug!(%peer, client_id, ?principal, "broker gate: admitted");
    relay(
        client, upstream, leftover, principal, &client_id, &ctx, shutdown,
    )
    .await;
}

/// Stage 1: the first packet, which must be a CONNECT. Returns it and any
/// bytes the client sent after it.
async fn read_connect(client: &mut TcpStream) -> std::result::Result<(Connect, Vec<u8>), Early> {
    let read = async {
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        loop {
            match mqttbytes::check(buf.iter(), CONNECT_MAX_BYTES) {
                Ok(fh) => {
                    if !matches!(fh.packet_type(), Ok(PacketType::Connect)) {
                        return Err(Early::NotConnect);
                    }
                    let len = fh.frame_length();
                    return match Packet::read(&mut buf[..len].into(), CONNECT_MAX_BYTES) {
                        Ok(Packet::Connect(c)) if c.protocol == Protocol::V5 => {
                            Err(Early::Protocol(5))
                        }
                        Ok(Packet::Connect(c)) => Ok((c, buf[len..].to_vec())),
                        Ok(_) => Err(Early::NotConnect),
                        Err(mqttbytes::Error::InvalidProtocolLevel(l)) => Err(Early::Protocol(l)),
                        Err(mqttbytes::Error::InvalidProtocol) => Err(Early::Protocol(0)),
                        Err(e) => Err(Early::Malformed(e)),
                    };
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => {
                    buf.reserve(1024);
                    match client.read_buf(&mut buf).await {
                        Ok(0) => return Err(Early::Closed),
                        Ok(_) => {}
                        Err(e) => return Err(Early::Io(e)),
                    }
                }
                Err(e) => return Err(Early::Malformed(e)),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read)
        .await
        .unwrap_or(Err(Early::Timeout))
}

/// Stage 2: who is connecting, and whether they may.
fn admit(ctx: &Ctx, c: &Connect) -> std::result::Result<Principal, ConnectRefusal> {
    let Some(st) = ctx.state.upgrade() else {
        return Err(ConnectRefusal::Unavailable);
    };
    let Some((su, sp)) = &st.config.mqtt_credentials else {
        return Err(ConnectRefusal::Unavailable);
    };
    let auth = BrokerAuth {
        credentials: &st.credentials,
        server: (su.as_str(), sp.as_str()),
    };
    let (user, pass) = c
        .login
        .as_ref()
        .map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
    let principal = auth
        .check(&c.client_id, user, pass)
        .map_err(ConnectRefusal::Auth)?;
    match acl::check_will(&principal, c.last_will.as_ref()) {
        Verdict::Allow => Ok(principal),
        Verdict::Deny(d) => Err(ConnectRefusal::Will(d)),
    }
}

/// Logs, counts and answers a refused CONNECT, then closes.
async fn refuse(
    client: &mut TcpStream,
    ctx: &Ctx,
    peer: SocketAddr,
    connect: Option<&Connect>,
    r: ConnectRefusal,
) {
    let client_id = connect.map_or("", |c| c.client_id.as_str());
    let username = connect
        .and_then(|c| c.login.as_ref())
        .map_or("", |l| l.username.as_str());
    if let Some(st) = ctx.state.upgrade() {
        let counter = match r {
            ConnectRefusal::Will(_) => &st.stats.broker_acl_denied,
            _ => &st.stats.broker_auth_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    match &r {
        ConnectRefusal::Will(d) => tracing::warn!(
            %peer,
            client_id,
            username,
            action = d.action.as_str(),
            topic = d.topic,
            "broker: connection refused: last will outside the device's own up/ topics"
        ),
        _ => tracing::warn!(
            %peer,
            client_id,
            username,
            reason = r.as_str(),
            code = ?r.code(),
            "broker: connection refused"
        ),
    }
    let _ = client.write_all(&acl::connack_bytes(r.code())).await;
    let _ = client.shutdown().await;
}

/// Stage 3: connects to rumqttd and sends the CONNECT with the server's login.
async fn open_upstream(up: &Upstream, mut c: Connect) -> std::io::Result<TcpStream> {
    c.login = Some(Login::new(up.login.0.clone(), up.login.1.clone()));
    let mut out = Default::default();
    Packet::Connect(c)
        .write(&mut out, usize::MAX)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let connect = TcpStream::connect(("127.0.0.1", up.port));
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    s.write_all(&out).await?;
    Ok(s)
}

/// How the client -> broker direction ended.
#[derive(Debug)]
enum UpEnd {
    /// The client closed its side (its DISCONNECT, if any, was forwarded).
    Eof,
    /// A packet was denied (and not forwarded).
    Denied(Denial),
    /// The client sent bytes that are not MQTT 3.1.1.
    Malformed(mqttbytes::Error),
    /// A socket error.
    Io(std::io::Error),
}

/// Stage 4: both directions until either ends, a packet is denied or the
/// server shuts down.
async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    leftover: Vec<u8>,
    principal: Principal,
    client_id: &str,
    ctx: &Ctx,
    mut shutdown: watch::Receiver<bool>,
) {
    let (cr, mut cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let down = async move {
        let mut ur = BufReader::with_capacity(BUF_BYTES, ur);
        tokio::io::copy_buf(&mut ur, &mut cw).await
    };
    let up = client_to_broker(cr, uw, leftover, &principal);
    tokio::pin!(down, up);
    tokio::select! {
        end = &mut up => match end {
            UpEnd::Eof => {
                let _ = tokio::time::timeout(LINGER, &mut down).await;
            }
            UpEnd::Denied(d) => denied(ctx, &principal, client_id, &d),
            UpEnd::Malformed(e) => {
                tracing::warn!(client_id, error = %e, "broker gate: malformed packet; connection closed");
            }
            UpEnd::Io(e) => tracing::debug!(client_id, error = %e, "broker gate: client connection error"),
        },
        _ = &mut down => {}
        _ = stopped(&mut shutdown) => {}
    }
}

fn denied(ctx: &Ctx, principal: &Principal, client_id: &str, d: &Denial) {
    if let Some(st) = ctx.state.upgrade() {
        st.stats.broker_acl_denied.fetch_add(1, Ordering::Relaxed);
    }
    let device = match principal {
        Principal::Device(id) => id.as_str(),
        Principal::Server => "(server)",
    };
    tracing::warn!(
        device,
        client_id,
        action = d.action.as_str(),
        topic = d.topic,
        "broker: ACL denied; connection closed"
    );
}

/// Frames the client's packets, forwards the allowed ones in order, stops at
/// the first denied one.
async fn client_to_broker(
    mut cr: OwnedReadHalf,
    mut uw: OwnedWriteHalf,
    mut buf: Vec<u8>,
    principal: &Principal,
) -> UpEnd {
    loop {
        let (pos, verdict) = match check_frames(&buf, principal) {
            Ok(x) => x,
            Err(e) => return UpEnd::Malformed(e),
        };
        if pos > 0 {
            if let Err(e) = uw.write_all(&buf[..pos]).await {
                return UpEnd::Io(e);
            }
            buf.drain(..pos);
        }
        if let Verdict::Deny(d) = verdict {
            return UpEnd::Denied(d);
        }
        buf.reserve(BUF_BYTES);
        match cr.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = uw.shutdown().await;
                return UpEnd::Eof;
            }
            Ok(_) => {}
            Err(e) => return UpEnd::Io(e),
        }
    }
}

/// The length of the allowed complete packets at the start of `buf`, and the
/// verdict on the packet after them (`Allow` when it is incomplete).
fn check_frames(
    buf: &[u8],
    principal: &Principal,
) -> std::result::Result<(usize, Verdict), mqttbytes::Error> {
    let mut pos = 0;
    loop {
        let fh = match mqttbytes::check(buf[pos..].iter(), PACKET_MAX_BYTES) {
            Ok(fh) => fh,
            Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok((pos, Verdict::Allow)),
            Err(e) => return Err(e),
        };
        let len = fh.frame_length();
        let packet = Packet::read(&mut buf[pos..pos + len].into(), PACKET_MAX_BYTES)?;
        match acl::check_packet(principal, &packet) {
            Verdict::Allow => pos += len,
            deny => return Ok((pos, deny)),
        }
    }
}
