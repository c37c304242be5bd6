//! Shared harness: brokers, a fake fleet server speaking the protocol crate,
//! and the real agent binary as a child process. firmware-tests includes this
//! file too (`#[path]`), where the agent is its `fw-agent` binary.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_agent::testkit::{self, Kind};

/// The agent binary of the package under test: `edgefleet-agent` in the
/// agent's tests, `fw-agent` (the same `agent::run`) in firmware-tests.
fn agent_bin() -> &'static str {
    match (
        option_env!("CARGO_BIN_EXE_edgefleet-agent"),
        option_env!("CARGO_BIN_EXE_fw-agent"),
    ) {
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => unreachable!("built by cargo test with an agent binary"),
    }
}
use edgefleet_bundle::payload::{Tensor, TensorData};
use edgefleet_bundle::{Policy, SigningKey, TrustStore, UnverifiedBundle};
use edgefleet_protocol::chunk::ChunkData;
use edgefleet_protocol::messages::{EventKind, TrialPolicy, UpdateEvent, UpdateOffer};
use edgefleet_protocol::topics::{self, DownKind, Topic};
use edgefleet_protocol::{DeviceId, Down, Up, MQTT_MAX_PACKET_BYTES};

pub const TARGET: &str = "x86-avx2-gateway";
pub const MODEL: &str = "testmodel";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// rumqttd in-process on a free port (it cannot be stopped: the thread lives
/// until the test binary exits).
pub fn start_rumqttd() -> u16 {
    start_rumqttd_at("127.0.0.1")
}

/// rumqttd in-process on a free port of `ip` (`0.0.0.0`: every address, so
/// that an agent in a network namespace reaches it over a veth link).
pub fn start_rumqttd_at(ip: &str) -> u16 {
    let port = free_port();
    let text = format!(
        r#"id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "{ip}:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {MQTT_MAX_PACKET_BYTES}
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let cfg: rumqttd::Config = toml::from_str(&text).unwrap();
    std::thread::spawn(move || {
        let mut b = rumqttd::Broker::new(cfg);
        let _ = b.start();
    });
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "rumqttd did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    port
}

pub fn mosquitto_available() -> bool {
    std::net::TcpStream::connect_timeout(&"127.0.0.1:1883".parse().unwrap(), Duration::from_secs(1))
        .is_ok()
}

/// The fake fleet server: serves chunks of offered bundles, records events.
pub struct Server {
    client: rumqttc::Client,
    pub events: Arc<Mutex<Vec<UpdateEvent>>>,
    /// Hellos received: the device and its update state, in arrival order.
    pub hellos: Arc<Mutex<Vec<(DeviceId, String)>>>,
    /// Telemetry records received, in arrival order.
    pub telemetry: Arc<Mutex<Vec<edgefleet_protocol::telemetry::TelemetryRecord>>>,
    bodies: Bodies,
    pub chunks_served: Arc<Mutex<u64>>,
    /// Chunks the server may still send (`u64::MAX`: no limit); requests
    /// beyond it go unanswered, like a link that died mid-transfer.
    pub chunk_budget: Arc<std::sync::atomic::AtomicU64>,
}

/// Bundle bodies by SHA-256 (hex), with their chunk size (bytes).
type Bodies = Arc<Mutex<HashMap<String, (usize, Vec<u8>)>>>;

impl Server {
    pub fn start(port: u16) -> Self {
        let mut opts = rumqttc::MqttOptions::new(
            format!("srv-{}-{}", std::process::id(), rand::random::<u32>()),
            "127.0.0.1",
            port,
        );
        opts.set_max_packet_size(MQTT_MAX_PACKET_BYTES, MQTT_MAX_PACKET_BYTES);
        opts.set_keep_alive(Duration::from_secs(15));
        let (client, mut conn) = rumqttc::Client::new(opts, 10_000);
        let events = Arc::new(Mutex::new(Vec::new()));
        let hellos = Arc::new(Mutex::new(Vec::new()));
        let telemetry = Arc::new(Mutex::new(Vec::new()));
        let bodies: Bodies = Arc::new(Mutex::new(HashMap::new()));
        let chunks_served = Arc::new(Mutex::new(0u64));
        let chunk_budget = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        {
            let budget = chunk_budget.clone();
            let (client, events, hellos, telemetry, bodies, served) = (
                client.clone(),
                events.clone(),
                hellos.clone(),
                telemetry.clone(),
                bodies.clone(),
                chunks_served.clone(),
            );
            std::thread::spawn(move || {
                for ev in conn.iter() {
                    match ev {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            client
                                .try_subscribe(topics::all_up_filter(), rumqttc::QoS::AtLeastOnce)
                                .unwrap();
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            let Ok(Topic::Up(dev, _)) = topics::parse(&p.topic) else {
                                continue;
                            };
                            let Ok(up) = Up::decode(&p.payload, &dev) else {
                                continue;
                            };
                            match up {
                                Up::Event(e) => events.lock().unwrap().push(e),
                                Up::Hello(h) => hellos.lock().unwrap().push((dev, h.update_state)),
                                Up::Telemetry(b) => telemetry.lock().unwrap().extend(b.records),
                                Up::ChunkRequest(r) => {
                                    let bodies = bodies.lock().unwrap();
                                    // Each body with its own chunk size: tests run
                                    // in parallel threads, so nothing here is global.
                                    let Some((cs, body)) = bodies.get(&r.body_sha256) else {
                                        continue;
                                    };
                                    let cs = *cs;
                                    let mut sha = [0u8; 32];
                                    hex::decode_to_slice(&r.body_sha256, &mut sha).unwrap();
                                    let count = body.len().div_ceil(cs) as u32;
                                    for i in r.first..(r.first + r.count).min(count) {
                                        use std::sync::atomic::Ordering::SeqCst;
                                        if budget
                                            .fetch_update(SeqCst, SeqCst, |b| b.checked_sub(1))
                                            .is_err()
                                        {
                                            break;
                                        }
                                        let s = i as usize * cs;
                                        let data = body[s..(s + cs).min(body.len())].to_vec();
                                        let msg = ChunkData {
                                            body_sha256: sha,
                                            index: i,
                                            count,
                                            data,
                                        }
                                        .encode()
                                        .unwrap();
                                        let _ = client.try_publish(
                                            topics::down(&dev, DownKind::Chunk),
                                            rumqttc::QoS::AtLeastOnce,
                                            false,
                                            msg,
                                        );
                                        *served.lock().unwrap() += 1;
                                    }
                                }
                                _ => {}
                            }
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            });
        }
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server subscribed");
        Server {
            client,
            events,
            hellos,
            telemetry,
            bodies,
            chunks_served,
            chunk_budget,
        }
    }

    pub fn offer(&self, dev: &DeviceId, bundle: &[u8], key: &SigningKey, trial: TrialPolicy) {
        let mut trust = TrustStore::new();
        trust.add(key.public_key());
        // The signed manifest is what the server checks (a delta's body can
        // only be rebuilt on a device holding the base).
        let ub = UnverifiedBundle::parse(bundle).unwrap();
        let body = ub.body_unverified().to_vec();
        let vm = ub
            .signed_manifest()
            .clone()
            .verify(&trust, &Policy::publisher())
            .unwrap();
        self.bodies.lock().unwrap().insert(
            vm.manifest().body.sha256.to_hex(),
            (vm.manifest().body.chunk_size as usize, body),
        );
        let rel = edgefleet_agent::slots::release_ref(vm.manifest());
        let offer = UpdateOffer::new(
            format!("ro-{}", rel.release),
            rel,
            vm.manifest_bytes(),
            vm.signature(),
            trial,
        );
        self.command(dev, &Down::UpdateOffer(offer));
    }

    pub fn command(&self, dev: &DeviceId, d: &Down) {
        self.client
            .publish(
                topics::down(dev, DownKind::Command),
                rumqttc::QoS::AtLeastOnce,
                false,
                d.encode().unwrap(),
            )
            .unwrap();
    }

    /// The first event of `dev` for `release` whose kind is one of `kinds`,
    /// waiting up to `timeout`; `None` when none came.
    pub fn try_wait_event(
        &self,
        dev: &DeviceId,
        release: u64,
        kinds: &[EventKind],
        timeout: Duration,
    ) -> Option<UpdateEvent> {
        let t = Instant::now();
        loop {
            if let Some(e) = self.events.lock().unwrap().iter().find(|e| {
                &e.device_id == dev && e.release.release == release && kinds.contains(&e.kind)
            }) {
                return Some(e.clone());
            }
            if t.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_event(
        &self,
        dev: &DeviceId,
        release: u64,
        kinds: &[EventKind],
        timeout: Duration,
    ) -> UpdateEvent {
        self.try_wait_event(dev, release, kinds, timeout)
            .unwrap_or_else(|| {
                panic!(
                    "no {kinds:?} event for release {release} within {timeout:?}; events: {:#?}",
                    self.events.lock().unwrap()
                )
            })
    }

    /// How many hellos `dev` has sent so far.
    pub fn hellos_from(&self, dev: &DeviceId) -> usize {
        self.hellos
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| d == dev)
            .count()
    }

    /// Waits until `dev` has sent more than `seen` hellos. The agent sends
    /// its hello after it asked for its subscription on the same connection,
    /// so once the hello is here the broker routes offers to it.
    pub fn wait_hello(&self, dev: &DeviceId, seen: usize, timeout: Duration) {
        let t = Instant::now();
        while self.hellos_from(dev) <= seen {
            assert!(
                t.elapsed() < timeout,
                "no hello from {dev} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kinds(&self, dev: &DeviceId, release: u64) -> Vec<EventKind> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| &e.device_id == dev && e.release.release == release)
            .map(|e| e.kind)
            .collect()
    }
}

pub fn trial(window_s: u64, min_requests: u64) -> TrialPolicy {
    TrialPolicy {
        window_s,
        min_requests,
        ..TrialPolicy::default()
    }
}

/// One agent under test: its directory, config, key and process.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub id: DeviceId,
    pub key: SigningKey,
    pub http: u16,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub extra_env: Vec<(String, String)>,
}

impl Agent {
    /// Writes keys, an initial bundle (release 1, k = 1) and agent.toml.
    pub fn new(name: &str, broker_port: u16, extra_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate();
        key.write_pem_files(
            &dir.path().join("release.key.pem"),
            &dir.path().join("release.pub.pem"),
        )
        .unwrap();
        let initial = testkit::bundle(Kind::Good, &key, MODEL, 1, TARGET, 1.0);
        std::fs::write(dir.path().join("initial.efb"), initial).unwrap();
        let id = DeviceId::new(&format!(
            "t{}-{}-{name}",
            std::process::id(),
            rand::random::<u16>()
        ))
        .unwrap();
        let http = free_port();
        let config = dir.path().join("agent.toml");
        let text = format!(
            r#"device_id = "{id}"
data_dir = "data"
target = "{TARGET}"
trusted_keys = ["release.pub.pem"]
initial_bundle = "initial.efb"
telemetry_interval_s = 5
{extra_toml}
[broker]
url = "mqtt://127.0.0.1:{broker_port}"
[api]
listen = "127.0.0.1:{http}"
unix_socket = "agent.sock"
request_timeout_ms = 5000
"#
        );
        std::fs::write(&config, text).unwrap();
        Agent {
            dir,
            id,
            key,
            http,
            config,
            child: None,
            extra_env: vec![],
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new agent on a copy of this one's directory (keys, bundles, data),
    /// with its own device id and API port; the copy is not running.
    pub fn copy_as(&self, name: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(self.path(), dir.path());
        let _ = std::fs::remove_file(dir.path().join("agent.log"));
        let _ = std::fs::remove_file(dir.path().join("agent.sock"));
        let id = DeviceId::new(&format!(
            "t{}-{}-{name}",
            std::process::id(),
            rand::random::<u16>()
        ))
        .unwrap();
        let http = free_port();
        let config = dir.path().join("agent.toml");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace(self.id.as_str(), id.as_str())
            .replace(
                &format!("127.0.0.1:{}", self.http),
                &format!("127.0.0.1:{http}"),
            );
        std::fs::write(&config, text).unwrap();
        Agent {
            dir,
            id,
            key: {
                let p = self.path().join("release.key.pem");
                SigningKey::from_pem(&std::fs::read_to_string(&p).unwrap(), &p).unwrap()
            },
            http,
            config,
            child: None,
            extra_env: vec![],
        }
    }
    pub fn spawn(&mut self) {
        self.spawn_under(&[]);
    }

    /// Starts the agent as the last arguments of `prefix` (for example
    /// `ip netns exec NS`: a program that execs it, so the child's pid is
    /// the agent's).
    pub fn spawn_under(&mut self, prefix: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("agent.log"))
            .unwrap();
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-9")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .unwrap();
        c.wait().unwrap()
    }

    pub fn url(&self, p: &str) -> String {
        format!("http://127.0.0.1:{}{p}", self.http)
    }

    pub fn wait_healthy(&self, timeout: Duration) {
        let c = reqwest::blocking::Client::new();
        let t = Instant::now();
        loop {
            if let Ok(r) = c.get(self.url("/healthz")).send() {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                t.elapsed() < timeout,
                "agent not healthy within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("agent.log")).unwrap_or_default()
    }

    /// POST /v1/infer; returns (release counter, outputs).
    pub fn infer(&self, x: [f32; 4]) -> Result<(u64, Vec<f32>), String> {
        let body = serde_json::json!({"inputs": [Tensor::f32("x", vec![1, 4], x.to_vec())]});
        let r = reqwest::blocking::Client::new()
            .post(self.url("/v1/infer"))
            .json(&body)
            .send()
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("status {}", r.status()));
        }
        let v: edgefleet_agent::api::InferResponse = r.json().map_err(|e| e.to_string())?;
        match &v.outputs[0].data {
            TensorData::F32(d) => Ok((v.release.release, d.clone())),
            other => Err(format!("{} output", other.dtype())),
        }
    }

    pub fn model(&self) -> serde_json::Value {
        reqwest::blocking::get(self.url("/v1/model"))
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn update_state(&self) -> String {
        self.model()["update_state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn write_log_to_stderr(&self) {
        let _ = writeln!(std::io::stderr(), "---- agent log ----\n{}", self.log());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Sends requests in the background until dropped.
pub struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(http: u16, x: [f32; 4]) -> Self {
        let url = format!("http://127.0.0.1:{http}/v1/infer");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let c = reqwest::blocking::Client::new();
            let body = serde_json::json!({"inputs": [Tensor::f32("x", vec![1, 4], x.to_vec())]});
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.post(&url).json(&body).send();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Traffic {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Copies a directory tree (regular files and directories).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_dir(&e.path(), &t);
        } else if ft.is_file() {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

/// A good release (`y = release * x`) carrying `noise_kib` KiB of
/// incompressible payload in 4 KiB chunks (a download of many chunks, each
/// persisted), and its chunk count.
pub fn chunked_bundle(key: &SigningKey, release: u64, noise_kib: usize) -> (Vec<u8>, u64) {
    let noise: Vec<u8> = (0..noise_kib * 1024)
        .map(|_| rand::random::<u8>())
        .collect();
    let mut b =
        edgefleet_bundle::BundleBuilder::new(MODEL, semver::Version::new(1, 0, release), release)
            .target(TARGET)
            .chunk_size(4096);
    for (p, d) in testkit::files(Kind::Good, MODEL, release as f32) {
        b = b.file(p, d);
    }
    let b = b.file("notes.bin", noise).build(key).unwrap();
    let mut trust = TrustStore::new();
    trust.add(key.public_key());
    let chunks = UnverifiedBundle::parse(&b)
        .unwrap()
        .verify(&trust, &Policy::publisher())
        .unwrap()
        .manifest()
        .body
        .chunks
        .len() as u64;
    (b, chunks)
}

/// Waits until `a` reports update state `idle`; panics with its log after `timeout`.
pub fn wait_idle(a: &Agent, timeout: Duration) {
    let t = Instant::now();
    while a.update_state() != "idle" {
        assert!(
            t.elapsed() < timeout,
            "not idle: {}\n{}",
            a.update_state(),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Offers `bundle` (release `release`) to `a` until one of `kinds` comes
/// back: every 10 s, up to 6 tries.
///
/// Design: the test server publishes an offer once; an agent that has
/// connected but whose SUBSCRIBE is not yet through (a loaded CI machine)
/// never sees it, and a fresh-clone CI run lost exactly that offer. The real
/// server re-sends on hello; here the offer is repeated (offers are
/// idempotent: a repeat during the job is ignored, a repeat of the active
/// release is answered `committed`).
pub fn offer_until_answered(
    server: &Server,
    a: &Agent,
    bundle: &[u8],
    release: u64,
    kinds: &[EventKind],
) -> Option<UpdateEvent> {
    (0..6).find_map(|_| {
        server.offer(&a.id, bundle, &a.key, trial(1, 5));
        server.try_wait_event(&a.id, release, kinds, Duration::from_secs(10))
    })
}
