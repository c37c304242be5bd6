//! Device isolation against real brokers (docs/fleet-server.md, "Device isolation"):
//! - a private Mosquitto with a password file made by `mosquitto_passwd` from
//!   secrets the server issued, and the ACL and settings of docs/mosquitto.conf:
//!   a device's publish under another device's prefix is dropped by the broker,
//!   its own prefix works, a wrong password is refused, another device's
//!   `down/` is not delivered to it;
//! - the embedded rumqttd with device auth: unknown clients, wrong or revoked
//!   secrets and client ids that do not match the username are refused; a
//!   provisioned device connects and registers; every refusal is a CONNACK
//!   with its MQTT return code; and its gate keeps each device to its own
//!   topics: publishing under another device's `up/` or `down/`, subscribing
//!   to another's `down/` or to `edgefleet/#`, or a last will elsewhere closes
//!   the connection before anything reaches the broker.
//!
//! The payload check (a message claiming another device's id) is tested in
//! `api.rs`.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edgefleet_fleet_server::{mqtt, BrokerConfig, DeviceAuth, Server};
use edgefleet_protocol::messages::{ConfigUpdate, Hello, Status};
use edgefleet_protocol::topics::{self, DownKind, UpKind};
use edgefleet_protocol::{DeviceId, Down, Up};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const SERVER_USER: &str = "edgefleet-server";

// ---------------------------------------------------------------------------
// Devices: plain rumqttc clients speaking the protocol crate's messages.

/// A connected test device; its event loop runs on a task that forwards
/// incoming publishes and subacks.
struct Dev {
    id: DeviceId,
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Packet>,
    task: JoinHandle<()>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

/// Connects with `client_id` and optional (username, password); returns the
/// broker's refusal (or the closed connection) as the error.
async fn connect(
    port: u16,
    id: &str,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> Result<Dev, ConnectionError> {
    let mut o = mqtt::options(client_id, "127.0.0.1", port);
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    connect_with(id, o).await
}

/// [`connect`] with options made by the caller.
async fn connect_with(id: &str, o: rumqttc::MqttOptions) -> Result<Dev, ConnectionError> {
    let (client, mut el) = mqtt::client(o, 100);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .unwrap_or(Err(ConnectionError::NetworkTimeout));
    first?;
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p @ (Packet::Publish(_) | Packet::SubAck(_)))) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Ok(Dev {
        id: id.parse().unwrap(),
        client,
        rx,
        task,
    })
}

fn hello(id: &DeviceId, tag: &str) -> Up {
    Up::Hello(Hello {
        device_id: id.clone(),
        agent_version: "0.1.0".into(),
        target: TARGET.into(),
        active: None,
        previous: None,
        update_state: "idle".into(),
        tags: vec![tag.to_string()],
        boot_id: "boot".into(),
    })
}

impl Dev {
    /// Publishes `msg` (QoS 1) on `topic_device`'s up topic of `kind`.
    async fn send(&self, topic_device: &DeviceId, kind: UpKind, msg: &Up) {
        self.client
            .publish(
                topics::up(topic_device, kind),
                QoS::AtLeastOnce,
                false,
                msg.encode().unwrap(),
            )
            .await
            .unwrap();
    }
    /// Subscribes (QoS 1) and waits for the suback.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let t0 = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.rx.recv()).await {
                Ok(Some(Packet::SubAck(_))) => return,
                Ok(Some(_)) => {}
                _ => panic!("{}: no suback for {filter}", self.id),
            }
            assert!(t0.elapsed() < Duration::from_secs(5));
        }
    }
    /// The next publish within `d`.
    async fn next_publish(&mut self, d: Duration) -> Option<rumqttc::Publish> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Packet::Publish(p))) => return Some(p),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    }
}

/// The device's registry entry once `pred` holds (sending `hello` with `tag`
/// every 500 ms until then: the server's subscription may not be up yet).
async fn hello_until_registered(api: &Api, dev: &Dev, tag: &str) -> Value {
    let t0 = Instant::now();
    loop {
        dev.send(&dev.id, UpKind::Hello, &hello(&dev.id, tag)).await;
        for _ in 0..5 {
            let (st, v) = api.get(&format!("/v1/devices/{}", dev.id)).await;
            if st == 200
                && v["device"]["tags"]
                    .as_array()
                    .is_some_and(|t| t.contains(&json!(tag)))
            {
                return v["device"].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{} did not register with tag {tag}",
            dev.id
        );
    }
}

async fn issue(api: &Api, id: &str) -> String {
    let (st, v) = api
        .post(&format!("/v1/devices/{id}/credentials"), json!({}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["credentials"]["username"], id);
    v["credentials"]["password"].as_str().unwrap().to_string()
}

fn refused_by_mosquitto(r: Result<Dev, ConnectionError>, what: &str) {
    match r {
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
        )) => {}
        Err(e) => panic!("{what}: expected a CONNACK refusal, got {e:?}"),
        Ok(_) => panic!("{what}: the broker accepted the connection"),
    }
}

// ---------------------------------------------------------------------------
// A private Mosquitto.

struct Mosquitto {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn passwd(file: &Path, create: bool, user: &str, pass: &str) {
    let mut c = Command::new("mosquitto_passwd");
    c.arg("-b");
    if create {
        c.arg("-c");
    }
    let out = c.arg(file).arg(user).arg(pass).output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_passwd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn passwd_delete(file: &Path, user: &str) {
    let out = Command::new("mosquitto_passwd")
        .arg("-D")
        .arg(file)
        .arg(user)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_passwd -D: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ACL lines between the markers in docs/mosquitto.conf.
fn documented_acl(conf: &str) -> String {
    let begin = conf
        .find("# ---- begin edgefleet.acl ----")
        .expect("ACL begin marker in docs/mosquitto.conf");
    let end = conf
        .find("# ---- end edgefleet.acl ----")
        .expect("ACL end marker in docs/mosquitto.conf");
    let acl: Vec<&str> = conf[begin..end]
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix('#').unwrap_or(l).trim())
        .collect();
    assert!(acl.iter().any(|l| l.starts_with("pattern write")));
    acl.join("\n") + "\n"
}

impl Mosquitto {
    /// Starts `mosquitto -c` with docs/mosquitto.conf's settings, its ACL, a
    /// password file holding the server's user, on a free port. `None` (and a
    /// message) when Mosquitto is not installed.
    fn start(server_pass: &str) -> Option<Mosquitto> {
        if !have("mosquitto") || !have("mosquitto_passwd") {
            eprintln!(
                "SKIPPED: `mosquitto` / `mosquitto_passwd` not found (apt-get install mosquitto); \
                 the Mosquitto isolation test did not run"
            );
            return None;
        }
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/mosquitto.conf");
        let conf = std::fs::read_to_string(&docs).unwrap();
        let mut dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("edgefleet.passwd");
        let acl = dir.path().join("edgefleet.acl");
        passwd(&pw, true, SERVER_USER, server_pass);
        std::fs::write(&acl, documented_acl(&conf)).unwrap();
        for attempt in 0..5 {
            let port = mqtt::broker::free_port().unwrap();
            // The documented settings, with this test's listener, files and no persistence.
            let mut text: String = conf
                .lines()
                .filter(|l| {
                    !["listener", "password_file", "acl_file", "persistence"]
                        .iter()
                        .any(|k| l.starts_with(k))
                })
                .map(|l| format!("{l}\n"))
                .collect();
            text += &format!(
                "listener {port} 127.0.0.1\npassword_file {}\nacl_file {}\npersistence false\n\
                 log_dest stderr\nlog_type all\n\
                 # Only matters when run as root: keep root, or the files in the 0700 temp dir are unreadable.\n\
                 user root\n",
                pw.display(),
                acl.display()
            );
            let cfile = dir.path().join("mosquitto.conf");
            std::fs::write(&cfile, text).unwrap();
            let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
            let child = Command::new("mosquitto")
                .arg("-c")
                .arg(&cfile)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut m = Mosquitto { child, port, dir };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = m.child.try_wait() {
                    break; // exited (port taken?): try another port
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(m);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("mosquitto attempt {attempt} failed:\n{}", m.log());
            let _ = m.child.kill();
            let _ = m.child.wait();
            dir = std::mem::replace(&mut m.dir, tempfile::tempdir().unwrap());
        }
        panic!("mosquitto did not start");
    }
    fn passwd_file(&self) -> PathBuf {
        self.dir.path().join("edgefleet.passwd")
    }
    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("mosquitto.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
    /// Adds a device user and reloads the password file, as the docs say.
    fn add_user(&self, user: &str, pass: &str) {
        passwd(&self.passwd_file(), false, user, pass);
        self.reload();
    }
    /// SIGHUP: Mosquitto reloads its configuration, password file and ACL.
    fn reload(&self) {
        let st = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// Retries the connect while Mosquitto reloads its password file.
async fn connect_after_reload(port: u16, id: &str, pass: &str) -> Dev {
    let t0 = Instant::now();
    loop {
        match connect(port, id, id, Some((id, pass))).await {
            Ok(d) => return d,
            Err(e) => assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{id} still refused after the reload: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_keeps_each_device_under_its_own_prefix() {
    let server_pass = hex::encode(rand::random::<[u8; 16]>());
    let Some(broker) = Mosquitto::start(&server_pass) else {
        return;
    };
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        dir.path(),
        &k,
        BrokerConfig::External {
            host: "127.0.0.1".into(),
            port: broker.port,
        },
    );
    cfg.mqtt_credentials = Some((SERVER_USER.into(), server_pass.clone()));
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);

    // The operator flow: the server issues the secrets, mosquitto_passwd adds them.
    let (attacker, victim) = ("iso-attacker", "iso-victim");
    let a_pass = issue(&api, attacker).await;
    let v_pass = issue(&api, victim).await;
    broker.add_user(attacker, &a_pass);
    broker.add_user(victim, &v_pass);
    let mut a = connect_after_reload(broker.port, attacker, &a_pass).await;
    let mut v = connect_after_reload(broker.port, victim, &v_pass).await;

    // Refused at CONNECT: wrong password, unknown user, no credentials.
    refused_by_mosquitto(
        connect(broker.port, attacker, attacker, Some((attacker, "wrong"))).await,
        "wrong password",
    );
    refused_by_mosquitto(
        connect(
            broker.port,
            "iso-nobody",
            "iso-nobody",
            Some(("iso-nobody", &a_pass)),
        )
        .await,
        "unknown user",
    );
    refused_by_mosquitto(
        connect(broker.port, attacker, "anon", None).await,
        "anonymous",
    );

    // Own prefix works (and the server is subscribed once this returns).
    hello_until_registered(&api, &a, "before").await;

    // The attacker publishes well-formed messages for the victim on the
    // victim's topics (the payload names the victim, so the server's payload
    // check would accept them): the broker must drop them.
    a.send(&v.id, UpKind::Hello, &hello(&v.id, "forged")).await;
    a.send(
        &v.id,
        UpKind::Status,
        &Up::Status(Status {
            device_id: v.id.clone(),
            online: false,
        }),
    )
    .await;
    // Then its own hello on the same connection: once the server has that,
    // it would have had the forged ones (one publisher, in order).
    a.send(&a.id, UpKind::Hello, &hello(&a.id, "after")).await;
    hello_until_registered(&api, &a, "after").await;
    let (st, _) = api.get(&format!("/v1/devices/{victim}")).await;
    assert_eq!(
        st,
        404,
        "the broker dropped the forged messages: the victim is not registered\n{}",
        broker.log()
    );
    let (_, stats) = api.get("/v1/stats").await;
    assert_eq!(
        stats["impersonations"], 0,
        "nothing reached the server's payload check"
    );
    assert!(
        broker.log().contains("Denied PUBLISH"),
        "mosquitto logs the denied publishes\n{}",
        broker.log()
    );

    // The victim under its own prefix works.
    let d = hello_until_registered(&api, &v, "victim").await;
    assert_eq!(d["online"], true);

    // Reading: a device gets its own down/ topics only.
    v.subscribe(&topics::down_filter(&v.id)).await;
    a.subscribe(&topics::down_filter(&v.id)).await;
    a.subscribe(&topics::down_filter(&a.id)).await;
    let cmd = Down::Rollback {
        reason: "isolation test".into(),
    };
    server
        .state()
        .mqtt
        .get()
        .unwrap()
        .publish(
            topics::down(&v.id, DownKind::Command),
            QoS::AtLeastOnce,
            false,
            cmd.encode().unwrap(),
        )
        .await
        .unwrap();
    let got = v.next_publish(Duration::from_secs(10)).await;
    assert!(
        got.is_some_and(|p| p.topic == topics::down(&v.id, DownKind::Command)),
        "the victim gets its command"
    );
    let leaked = a.next_publish(Duration::from_millis(1500)).await;
    assert!(
        leaked.is_none(),
        "the attacker must not read the victim's down topic: {leaked:?}"
    );

    // Revocation: remove the user and reload; Mosquitto drops the live connection.
    passwd_delete(&broker.passwd_file(), attacker);
    broker.reload();
    let t0 = Instant::now();
    while !a.task.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the revoked device stays connected\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused_by_mosquitto(
        connect(broker.port, attacker, attacker, Some((attacker, &a_pass))).await,
        "revoked device",
    );

    drop((a, v));
    server.shutdown().await.unwrap();
    drop(broker);
}

// ---------------------------------------------------------------------------
// The embedded broker with device auth.

fn refused(r: Result<Dev, ConnectionError>, what: &str) {
    if let Ok(d) = r {
        panic!("{what}: the embedded broker accepted {}", d.id);
    }
}

/// The broker answered a CONNACK refusing with exactly `code` (not a reset).
fn refused_with(r: Result<Dev, ConnectionError>, code: ConnectReturnCode, what: &str) {
    match r {
        Err(ConnectionError::ConnectionRefused(c)) => assert_eq!(c, code, "{what}"),
        Err(e) => panic!("{what}: expected a CONNACK refusal {code:?}, got {e:?}"),
        Ok(d) => panic!("{what}: the embedded broker accepted {}", d.id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_with_device_auth_accepts_only_provisioned_devices() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    cfg.device_auth = DeviceAuth::Required;
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    let port = server.broker_port();

    // Issue: the secret comes back once, the store keeps a salted hash.
    let (st, v) = api.post("/v1/devices/emb-1/credentials", json!({})).await;
    assert_eq!(st, 200, "{v}");
    let c = &v["credentials"];
    assert_eq!(c["username"], "emb-1");
    assert_eq!(c["rotated"], false);
    let secret = c["password"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 64);
    let (st, v) = api.get("/v1/devices/emb-1/credentials").await;
    assert_eq!(st, 200);
    assert!(v["credentials"]["issued_ms"].is_u64() && v["credentials"]["password"].is_null());
    for kv in server.state().store.credentials.iter() {
        let (_, val) = kv.unwrap();
        assert!(
            !String::from_utf8_lossy(&val).contains(&secret),
            "the secret is not stored"
        );
    }
    // Ids that cannot have credentials.
    for bad in ["a%2Fb", "%2B", "edgefleet-server", "emb-1-telemetry"] {
        let (st, v) = api
            .post(&format!("/v1/devices/{bad}/credentials"), json!({}))
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
    }

    // Refused at CONNECT with a CONNACK naming the reason (MQTT 3.1.1 return
    // codes), each counted.
    use ConnectReturnCode::{BadClientId, BadUserNamePassword};
    refused_with(
        connect(port, "emb-1", "emb-1", None).await,
        BadUserNamePassword,
        "anonymous",
    );
    let mut refusals = 1;
    for (what, client_id, login, code) in [
        (
            "unknown device",
            "emb-2",
            ("emb-2", secret.as_str()),
            BadUserNamePassword,
        ),
        (
            "wrong secret",
            "emb-1",
            ("emb-1", "0000"),
            BadUserNamePassword,
        ),
        (
            "client id of another device",
            "emb-2",
            ("emb-1", secret.as_str()),
            BadClientId,
        ),
        (
            "client id not <id>-telemetry",
            "emb-1-x",
            ("emb-1", secret.as_str()),
            BadClientId,
        ),
        (
            "server user, wrong password",
            SERVER_USER,
            (SERVER_USER, secret.as_str()),
            BadUserNamePassword,
        ),
        (
            "not a device id",
            "a/b",
            ("a/b", secret.as_str()),
            BadUserNamePassword,
        ),
    ] {
        refused_with(
            connect(port, "emb-1", client_id, Some(login)).await,
            code,
            what,
        );
        refusals += 1;
    }

    // The provisioned device connects (both agent connections) and registers.
    let dev = connect(port, "emb-1", "emb-1", Some(("emb-1", &secret)))
        .await
        .unwrap();
    let telemetry = connect(port, "emb-1", "emb-1-telemetry", Some(("emb-1", &secret)))
        .await
        .unwrap();
    let d = hello_until_registered(&api, &dev, "emb").await;
    assert_eq!(d["target"], TARGET);
    drop(telemetry);

    // Rotation: the old secret stops working at the next connect.
    let (st, v) = api.post("/v1/devices/emb-1/credentials", json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(v["credentials"]["rotated"], true);
    let rotated = v["credentials"]["password"].as_str().unwrap().to_string();
    refused_with(
        connect(port, "emb-1", "emb-1-telemetry", Some(("emb-1", &secret))).await,
        BadUserNamePassword,
        "rotated-out secret",
    );
    refusals += 1;
    drop(
        connect(port, "emb-1", "emb-1-telemetry", Some(("emb-1", &rotated)))
            .await
            .unwrap(),
    );

    // Revocation.
    let url = format!("{}/v1/devices/emb-1/credentials", api.base);
    let r = api
        .http
        .delete(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = api
        .http
        .delete(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(api.get("/v1/devices/emb-1/credentials").await.0, 404);
    refused_with(
        connect(port, "emb-1", "emb-1-telemetry", Some(("emb-1", &rotated))).await,
        BadUserNamePassword,
        "revoked secret",
    );
    refusals += 1;

    let (_, stats) = api.get("/v1/stats").await;
    assert_eq!(stats["broker_auth_refused"], refusals, "{stats}");

    let other = issue(&api, "emb-3").await;
    let intruder = connect(port, "emb-3", "emb-3", Some(("emb-3", &other)))
        .await
        .unwrap();
    hello_until_registered(&api, &intruder, "emb").await;

    drop((dev, intruder));
    server.shutdown().await.unwrap();
    // The broker thread outlives the server (rumqttd has no shutdown); its
    // check holds the state weakly, so from now on every connect is refused.
    refused(
        connect(port, "emb-3", "emb-3", Some(("emb-3", &other))).await,
        "after shutdown",
    );
}

/// Waits until the broker has closed `dev`'s connection (its event loop ended).
async fn closed_by_broker(dev: &Dev, what: &str) {
    let t0 = Instant::now();
    while !dev.task.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: the connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_keeps_each_device_to_its_own_topics() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &k, BrokerConfig::Embedded { port: 0 });
    cfg.device_auth = DeviceAuth::Required;
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    let port = server.broker_port();
    let (attacker, victim) = ("gate-attacker", "gate-victim");
    let a_pass = issue(&api, attacker).await;
    let v_pass = issue(&api, victim).await;
    let mut a = connect(port, attacker, attacker, Some((attacker, &a_pass)))
        .await
        .unwrap();
    let mut v = connect(port, victim, victim, Some((victim, &v_pass)))
        .await
        .unwrap();
    hello_until_registered(&api, &a, "attacker").await;
    hello_until_registered(&api, &v, "victim").await;
    v.subscribe(&topics::down_filter(&v.id)).await;
    a.subscribe(&topics::down_filter(&a.id)).await;
    // The attacker's second connection (its telemetry client id), opened
    // afresh for each attempt: every violation closes it.
    let second = format!("{attacker}-telemetry");
    let open = || connect(port, attacker, &second, Some((attacker, &a_pass)));

    // Publishing as the victim: well-formed messages naming the victim in
    // topic and payload (the server's payload check would accept them), on
    // its up/ topics (shown offline, a forged hello) and down/ topics (a
    // rollback, a telemetry interval of a day).
    let vid = v.id.clone();
    let forged: Vec<(String, Vec<u8>)> = vec![
        (
            topics::up(&vid, UpKind::Status),
            Up::Status(Status {
                device_id: vid.clone(),
                online: false,
            })
            .encode()
            .unwrap(),
        ),
        (
            topics::up(&vid, UpKind::Hello),
            hello(&vid, "forged").encode().unwrap(),
        ),
        (
            topics::down(&vid, DownKind::Command),
            Down::Rollback {
                reason: "forged".into(),
            }
            .encode()
            .unwrap(),
        ),
        (
            topics::down(&vid, DownKind::Command),
            Down::Config(ConfigUpdate {
                telemetry_interval_s: Some(86_400),
                ..ConfigUpdate::default()
            })
            .encode()
            .unwrap(),
        ),
    ];
    for (topic, payload) in &forged {
        let x = open().await.unwrap();
        x.client
            .publish(topic.clone(), QoS::AtLeastOnce, true, payload.clone())
            .await
            .unwrap();
        closed_by_broker(&x, &format!("publish to {topic}")).await;
    }
    // Reading as the victim: its down/ filter, and everything.
    for filter in [topics::down_filter(&vid), "edgefleet/#".to_string()] {
        let x = open().await.unwrap();
        x.client.subscribe(&filter, QoS::AtLeastOnce).await.unwrap();
        closed_by_broker(&x, &format!("subscribe to {filter}")).await;
    }
    // A last will on the victim's status is refused at CONNECT.
    let mut o = mqtt::options(&second, "127.0.0.1", port);
    o.set_credentials(attacker, &a_pass);
    o.set_last_will(rumqttc::LastWill::new(
        topics::up(&vid, UpKind::Status),
        b"{}".to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    refused_with(
        connect_with(attacker, o).await,
        ConnectReturnCode::NotAuthorized,
        "last will on the victim's topic",
    );

    // Nothing reached the victim, the broker or the server.
    let leaked = v.next_publish(Duration::from_millis(1500)).await;
    assert!(
        leaked.is_none(),
        "the victim got a forged message: {leaked:?}"
    );
    a.send(&a.id, UpKind::Hello, &hello(&a.id, "after")).await;
    hello_until_registered(&api, &a, "after").await;
    let (st, d) = api.get(&format!("/v1/devices/{victim}")).await;
    assert_eq!(st, 200);
    assert_eq!(d["device"]["tags"], json!(["victim"]), "{d}");
    assert_eq!(d["device"]["online"], true, "{d}");
    let (_, stats) = api.get("/v1/stats").await;
    assert_eq!(stats["broker_acl_denied"], 7, "{stats}");
    assert_eq!(stats["impersonations"], 0, "{stats}");
    assert_eq!(stats["broker_auth_refused"], 0, "{stats}");
    let srv = server.state().mqtt.get().unwrap();

    // Each device's own topics work end to end: the server's commands reach
    // their device and only it.
    for to_victim in [true, false] {
        let (dev, other) = if to_victim {
            (&mut v, &mut a)
        } else {
            (&mut a, &mut v)
        };
        let cmd = Down::Rollback {
            reason: format!("for {}", dev.id),
        };
        srv.publish(
            topics::down(&dev.id, DownKind::Command),
            QoS::AtLeastOnce,
            false,
            cmd.encode().unwrap(),
        )
        .await
        .unwrap();
        let got = dev.next_publish(Duration::from_secs(10)).await.unwrap();
        assert_eq!(got.topic, topics::down(&dev.id, DownKind::Command));
        assert_eq!(Down::decode(&got.payload).unwrap(), cmd);
        let leaked = other.next_publish(Duration::from_millis(500)).await;
        assert!(leaked.is_none(), "{} read {leaked:?}", other.id);
    }
    assert!(!a.task.is_finished() && !v.task.is_finished());

    drop((a, v));
    server.shutdown().await.unwrap();
}
