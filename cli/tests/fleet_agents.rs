//! Fleet tests with real processes (issue #5): `edgefleet serve` (embedded
//! rumqttd, or the machine's Mosquitto) and `edgefleet agent` daemons, each
//! with its own data dir, driven through the REST API as an operator would.
//! `fleet-server/tests/rollouts.rs` checks the same gates with simulated
//! in-process devices; these check what only real agents do: verify the
//! signed offer, download, install into the A/B slot, trial, commit or roll
//! back, and reconnect by themselves.
//!
//! Bundles come from `edgefleet_agent::testkit` (tiny tract models): every
//! agent boots on release 1 (`y = x`), rollouts offer release 2 (`y = 2x`, or
//! one whose golden vectors do not match). Agents get no live traffic: after
//! the 1 s trial window they probe the candidate with its golden inputs, so a
//! wave takes seconds. With the embedded broker every device first gets its
//! broker credentials from the server, as `edgefleet serve` requires.
//!
//! Every child process is killed (SIGKILL) when its owner is dropped, also
//! when a test panics. Ports: the server and agents listen on port 0 and the
//! test reads the chosen ports back (server stdout, agent log).
//!
//! ```sh
//! cargo test -p edgefleet --test fleet_agents -- --test-threads=1
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_agent::testkit::{self, Kind};
use edgefleet_bundle::payload::{Tensor, TensorData};
use edgefleet_bundle::SigningKey;
use serde_json::{json, Value};

const EXE: &str = env!("CARGO_BIN_EXE_edgefleet");
const TOKEN: &str = "fleet-agents-test-token";
const TARGET: &str = "x86-avx2-gateway";
const MODEL: &str = "testmodel";
/// Log filter for the child processes.
const LOG: &str = "info,rumqttd=off,rumqttc=warn,sled=warn";

/// A run-unique name (device ids, tags, MQTT client ids on a shared broker).
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}{}x{:06x}", std::process::id(), nanos & 0xff_ffff)
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Polls `f` every 200 ms until it returns `Some`, or panics with `what()`.
fn wait_until<T>(
    timeout: Duration,
    what: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < timeout,
            "timed out after {:.0} s: {}",
            timeout.as_secs_f64(),
            what()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes ANSI colour sequences (tracing colours its fields).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {} failed", child.id());
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Keys, the release-1 bundle every agent boots with, and a temp dir for the whole test.
struct Kit {
    dir: tempfile::TempDir,
    key: SigningKey,
    trust: PathBuf,
    initial: PathBuf,
}

impl Kit {
    fn new() -> Self {
        Kit::booting(Kind::Good)
    }

    /// A kit whose release-1 bundle (the one every agent boots with) is a `kind` model.
    fn booting(kind: Kind) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = SigningKey::generate();
        let trust = dir.path().join("release.pub.pem");
        key.write_pem_files(&dir.path().join("release.pem"), &trust)
            .expect("write keys");
        let initial = dir.path().join("initial.efb");
        std::fs::write(&initial, testkit::bundle(kind, &key, MODEL, 1, TARGET, 1.0))
            .expect("write initial bundle");
        Kit {
            dir,
            key,
            trust,
            initial,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A signed test bundle: `y = k * x` (or a bad variant), release `release`.
    fn bundle(&self, kind: Kind, release: u64, k: f32) -> Vec<u8> {
        testkit::bundle(kind, &self.key, MODEL, release, TARGET, k)
    }
}

/// Where the server's broker is.
enum Broker {
    /// The embedded rumqttd on this port (0: the server picks one).
    Embedded(u16),
    /// An external broker URL (`mqtt://host:port`).
    External(String),
}

/// An `edgefleet serve` process.
struct ServerProc {
    child: Option<Child>,
    dir: PathBuf,
    data: PathBuf,
    broker_url: Option<String>,
    client_id: String,
    api: SocketAddr,
    mqtt_port: u16,
    starts: usize,
}

impl ServerProc {
    fn start(kit: &Kit, broker: Broker) -> Self {
        let dir = kit.path().join("server");
        std::fs::create_dir_all(&dir).expect("server dir");
        let (broker_url, port) = match broker {
            Broker::Embedded(p) => (None, p),
            Broker::External(u) => (Some(u), 0),
        };
        let mut s = ServerProc {
            child: None,
            data: dir.join("data"),
            dir,
            broker_url,
            client_id: unique("fa-server-"),
            api: "127.0.0.1:0".parse().expect("addr"),
            mqtt_port: port,
            starts: 0,
        };
        s.spawn(&kit.trust);
        s
    }

    /// Starts the process on `self.api` / `self.mqtt_port` (port 0: any) and
    /// reads the addresses it chose from its stdout.
    fn spawn(&mut self, trust: &Path) {
        self.starts += 1;
        let stdout = self.dir.join(format!("stdout-{}.log", self.starts));
        let mut cmd = Command::new(EXE);
        cmd.arg("serve")
            .arg("--data")
            .arg(&self.data)
            .arg("--listen")
            .arg(self.api.to_string())
            .arg("--trust")
            .arg(trust)
            .arg("--token")
            .arg(TOKEN)
            .arg("--mqtt-client-id")
            .arg(&self.client_id);
        match &self.broker_url {
            Some(u) => cmd.arg("--broker").arg(u),
            None => cmd.arg("--mqtt-port").arg(self.mqtt_port.to_string()),
        };
        let log = self.log();
        let mut child = cmd
            .env("EDGEFLEET_LOG", LOG)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("server stdout"))
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("server log"),
            )
            .spawn()
            .expect("start edgefleet serve");
        // "edgefleet fleet server: API http://127.0.0.1:PORT, MQTT port N"
        let (api, port) = wait_until(
            Duration::from_secs(30),
            || format!("the server to start; log:\n{}", tail(&log, 30)),
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("server exited ({st}); log:\n{}", tail(&log, 30));
                }
                let text = std::fs::read_to_string(&stdout).ok()?;
                let api = text
                    .split("API http://")
                    .nth(1)?
                    .split([',', ' ', '\n'])
                    .next()?;
                let port = text.split("MQTT port ").nth(1)?.split_whitespace().next()?;
                Some((api.parse().ok()?, port.parse().ok()?))
            },
        );
        self.child = Some(child);
        self.api = api;
        self.mqtt_port = port;
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn api(&self) -> Api {
        Api::new(&format!("http://{}", self.api))
    }

    fn broker_url(&self) -> String {
        self.broker_url
            .clone()
            .unwrap_or_else(|| format!("mqtt://127.0.0.1:{}", self.mqtt_port))
    }

    fn sigkill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts again on the same data dir, API address and broker port.
    fn restart(&mut self, trust: &Path) {
        assert!(self.child.is_none(), "restart of a running server");
        self.spawn(trust);
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The fleet REST API, as the operator uses it.
struct Api {
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn new(base: &str) -> Self {
        Api {
            base: base.to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
        }
    }

    fn try_get(&self, path: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = r.status();
        let v: Value = r.json().map_err(|e| format!("GET {path}: {e}"))?;
        if !status.is_success() {
            return Err(format!("GET {path}: {status}: {v}"));
        }
        Ok(v)
    }

    fn get(&self, path: &str) -> Value {
        self.try_get(path).unwrap_or_else(|e| panic!("{e}"))
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = r.status();
        let v: Value = r.json().unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert!(status.is_success(), "POST {path} {body}: {status}: {v}");
        v
    }

    /// Uploads a bundle; returns its body SHA-256.
    fn upload(&self, bundle: Vec<u8>) -> String {
        let r = self
            .http
            .post(format!("{}/v1/bundles", self.base))
            .bearer_auth(TOKEN)
            .body(bundle)
            .send()
            .expect("POST /v1/bundles");
        let status = r.status();
        let v: Value = r.json().expect("upload response");
        assert!(status.is_success(), "upload: {status}: {v}");
        v["bundle"]["sha256"]
            .as_str()
            .expect("upload response has bundle.sha256")
            .to_string()
    }

    fn create_rollout(&self, spec: &Value) -> String {
        let v = self.post("/v1/rollouts", spec);
        v["rollout"]["id"]
            .as_str()
            .expect("rollout response has an id")
            .to_string()
    }

    fn devices(&self, tag: &str) -> Vec<Value> {
        self.get(&format!("/v1/devices?tag={tag}"))["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `fleet`'s agents are all registered, online, on release 1.
    fn wait_registered(&self, fleet: &Fleet, timeout: Duration) {
        let (tag, n) = (&fleet.tag, fleet.agents.len());
        wait_until(
            timeout,
            || {
                let ids: Vec<String> = self
                    .devices(tag)
                    .iter()
                    .map(|d| format!("{} online {} active {}", d["id"], d["online"], d["active"]))
                    .collect();
                format!(
                    "{n} devices tagged {tag} to register; have {ids:#?}\n{}",
                    fleet.logs(&[])
                )
            },
            || {
                let online = self
                    .devices(tag)
                    .iter()
                    .filter(|d| d["online"] == true && d["active"]["release"] == 1)
                    .count();
                (online >= n).then_some(())
            },
        );
    }

    /// Waits until the rollout is neither running nor paused; returns it.
    fn wait_finished(&self, id: &str, timeout: Duration, diag: impl Fn() -> String) -> Value {
        let last = std::cell::RefCell::new(Value::Null);
        wait_until(
            timeout,
            || {
                format!(
                    "rollout {id} to finish; last seen: {}\n{}",
                    summary(&last.borrow()),
                    diag()
                )
            },
            || {
                let r = self.try_get(&format!("/v1/rollouts/{id}")).ok()?["rollout"].clone();
                *last.borrow_mut() = r.clone();
                let st = r["state"]["state"].as_str().unwrap_or("");
                (st != "running" && st != "paused").then_some(r)
            },
        )
    }
}

/// A rollout, short: state, wave counts, history and the devices not committed.
fn summary(r: &Value) -> String {
    let not_committed: Vec<String> = r["devices"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, d)| d["state"] != "committed")
        .map(|(id, d)| format!("{id}: {} {} {}", d["state"], d["reason"], d["detail"]))
        .collect();
    format!(
        "state {}, waves {}, history {:#}, not committed: {not_committed:#?}",
        r["state"], r["waves"], r["history"]
    )
}

/// A rollout spec. Agents see no live traffic, so after the 1 s window they
/// probe the candidate with its golden inputs (`min_requests` of them) and
/// judge it on those (the p99 ratio is loose: the machine is shared).
fn rollout_spec(sha: &str, tag: &str, waves: &[&str], wave_timeout_s: u64) -> Value {
    json!({
        "bundle": sha,
        "selector": {"tag": tag},
        "waves": waves,
        "seed": 7,
        "wave_timeout_s": wave_timeout_s,
        "max_failure_rate": 0.0,
        "rollback_on_halt": true,
        "trial": {"window_s": 1, "min_requests": 5, "max_error_rate": 0.0,
                  "max_p99_ratio": 50.0, "mode": "shadow"},
    })
}

/// One `edgefleet agent` process.
struct AgentProc {
    id: String,
    dir: PathBuf,
    child: Option<Child>,
    api_port: Option<u16>,
}

impl AgentProc {
    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("agent log");
        let child = Command::new(EXE)
            .arg("agent")
            .arg("--config")
            .arg(self.dir.join("agent.toml"))
            .env("EDGEFLEET_LOG", LOG)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("agent log"))
            .stderr(log)
            .spawn()
            .expect("start edgefleet agent");
        self.child = Some(child);
        self.api_port = None;
    }

    /// The local API port, from the agent's "local API listening addr=..." line.
    fn read_api_port(&self) -> Option<u16> {
        let text = strip_ansi(&std::fs::read_to_string(self.log()).ok()?);
        let line = text.lines().rfind(|l| l.contains("local API listening"))?;
        let addr: SocketAddr = line
            .split("addr=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(addr.port())
    }

    fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client")
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.api_port.expect("agent API port read")
        )
    }

    /// GET /v1/model.
    fn model(&self) -> Value {
        self.http()
            .get(self.url("/v1/model"))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("{}: GET /v1/model: {e}", self.id))
    }

    /// POST /v1/infer with `x`; returns (release that answered, y).
    fn infer(&self, x: [f32; 4]) -> (u64, Vec<f32>) {
        let body = json!({"inputs": [Tensor::f32("x", vec![1, 4], x.to_vec())]});
        let r = self
            .http()
            .post(self.url("/v1/infer"))
            .json(&body)
            .send()
            .unwrap_or_else(|e| panic!("{}: POST /v1/infer: {e}", self.id));
        assert!(
            r.status().is_success(),
            "{}: POST /v1/infer: {}",
            self.id,
            r.status()
        );
        let v: edgefleet_agent::api::InferResponse = r.json().expect("infer response");
        match &v.outputs[0].data {
            TensorData::F32(y) => (v.release.release, y.clone()),
            other => panic!("{}: unexpected output {other:?}", self.id),
        }
    }
}

/// A fleet of agent processes; all are killed on drop.
struct Fleet {
    tag: String,
    agents: Vec<AgentProc>,
}

impl Fleet {
    /// Writes `n` agent configs (device ids `{tag}-NN`, tag `tag`) and starts
    /// the agents. With `issuer`, each device first gets its broker credentials
    /// from the server (`POST /v1/devices/{id}/credentials`), as `edgefleet
    /// serve` requires for its embedded broker by default.
    fn spawn(kit: &Kit, tag: &str, n: usize, broker_url: &str, issuer: Option<&Api>) -> Fleet {
        let profile = repo_file(&format!("targets/{TARGET}.toml"));
        assert!(profile.exists(), "{} missing", profile.display());
        let mut agents = Vec::new();
        for i in 0..n {
            let id = format!("{tag}-{i:02}");
            let dir = kit.path().join("agents").join(&id);
            std::fs::create_dir_all(&dir).expect("agent dir");
            let credentials = issuer.map_or(String::new(), |api| {
                let v = api.post(&format!("/v1/devices/{id}/credentials"), &json!({}));
                let c = &v["credentials"];
                format!(
                    "username = {}\npassword = {}\n",
                    c["username"], c["password"]
                )
            });
            let text = format!(
                r#"# written by cli/tests/fleet_agents.rs
device_id = "{id}"
data_dir = "data"
target = "{TARGET}"
target_profile = "{profile}"
trusted_keys = ["{trust}"]
initial_bundle = "{initial}"
tags = ["{tag}"]

[broker]
url = "{broker_url}"
{credentials}
[api]
listen = "127.0.0.1:0"
workers = 1
"#,
                profile = profile.display(),
                trust = kit.trust.display(),
                initial = kit.initial.display(),
            );
            std::fs::write(dir.join("agent.toml"), text).expect("agent.toml");
            agents.push(AgentProc {
                id,
                dir,
                child: None,
                api_port: None,
            });
        }
        let mut fleet = Fleet {
            tag: tag.to_string(),
            agents,
        };
        for a in &mut fleet.agents {
            a.spawn();
        }
        fleet
    }

    /// Reads every agent's local API port from its log.
    fn read_api_ports(&mut self) {
        for a in &mut self.agents {
            let port = wait_until(
                Duration::from_secs(30),
                || format!("{}'s local API; log:\n{}", a.id, tail(&a.log(), 20)),
                || a.read_api_port(),
            );
            a.api_port = Some(port);
        }
    }

    fn get(&self, id: &str) -> &AgentProc {
        self.agents
            .iter()
            .find(|a| a.id == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }

    /// Log tails of the given agents (all when `ids` is empty, then only 3 lines each).
    fn logs(&self, ids: &[&str]) -> String {
        self.agents
            .iter()
            .filter(|a| ids.is_empty() || ids.contains(&a.id.as_str()))
            .map(|a| {
                let n = if ids.is_empty() { 3 } else { 25 };
                format!("--- agent {} ---\n{}", a.id, tail(&a.log(), n))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn kill_all(&mut self) {
        for a in &mut self.agents {
            if let Some(c) = a.child.as_mut() {
                let _ = c.kill();
            }
        }
        for a in &mut self.agents {
            kill(&mut a.child);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Asserts every device tagged `tag` reports `release` active, in the registry
/// and (when `check_agents`) on its own API, which must also answer with it.
fn assert_all_on(api: &Api, fleet: &Fleet, release: u64, k: f32) {
    let devices = api.devices(&fleet.tag);
    assert_eq!(
        devices.len(),
        fleet.agents.len(),
        "registry has {} devices tagged {}",
        devices.len(),
        fleet.tag
    );
    let wrong: Vec<String> = devices
        .iter()
        .filter(|d| d["active"]["release"] != release)
        .map(|d| format!("{}: {}", d["id"], d["active"]))
        .collect();
    assert!(
        wrong.is_empty(),
        "registry: devices not on release {release}: {wrong:?}"
    );
    for a in &fleet.agents {
        let m = a.model();
        assert_eq!(
            m["release"]["release"], release,
            "{}: GET /v1/model says {m}",
            a.id
        );
        let x = [1.0, 2.0, 3.0, 4.0];
        let (r, y) = a.infer(x);
        assert_eq!(r, release, "{}: inference answered by release {r}", a.id);
        assert_eq!(
            y,
            x.iter().map(|v| v * k).collect::<Vec<f32>>(),
            "{}: release {release} computes y = {k} x",
            a.id
        );
    }
}

// ---------------------------------------------------------------------------

/// 50 real agents, waves 1 / 5% / 25% / 100%: the rollout completes and every
/// device runs (and serves with) the new release.
#[test]
fn rollout_to_50_agents_in_waves_completes() {
    let t0 = Instant::now();
    let kit = Kit::new();
    let server = ServerProc::start(&kit, Broker::Embedded(0));
    let api = server.api();
    let tag = unique("w50-");
    let mut fleet = Fleet::spawn(&kit, &tag, 50, &server.broker_url(), Some(&api));
    api.wait_registered(&fleet, Duration::from_secs(120));
    fleet.read_api_ports();
    eprintln!(
        "50 agents registered after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let sha = api.upload(kit.bundle(Kind::Good, 2, 2.0));
    let t1 = Instant::now();
    let id = api.create_rollout(&rollout_spec(&sha, &tag, &["1", "5%", "25%", "100%"], 90));
    let r = api.wait_finished(&id, Duration::from_secs(180), || {
        format!("{}\nserver:\n{}", fleet.logs(&[]), tail(&server.log(), 20))
    });
    eprintln!("rollout finished after {:.1} s", t1.elapsed().as_secs_f64());
    assert_eq!(r["state"]["state"], "completed", "{}", summary(&r));
    let sizes: Vec<u64> = r["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["size"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(sizes, vec![1, 2, 10, 37], "wave sizes: {}", summary(&r));
    for (w, c) in r["waves"].as_array().expect("waves").iter().enumerate() {
        assert_eq!(
            (c["committed"].as_u64(), c["failed"].as_u64()),
            (c["size"].as_u64(), Some(0)),
            "wave {w}: {c}"
        );
    }
    let history = r["history"].to_string();
    let passed: Vec<usize> = (0..4)
        .filter_map(|w| history.find(&format!("wave {} of 4 passed", w + 1)))
        .collect();
    assert!(
        passed.len() == 4 && passed.windows(2).all(|p| p[0] < p[1]),
        "waves passed in order: {history}"
    );
    let states: Vec<&Value> = r["devices"]
        .as_object()
        .expect("devices")
        .values()
        .map(|d| &d["state"])
        .collect();
    assert!(
        states.len() == 50 && states.iter().all(|s| *s == "committed"),
        "{}",
        summary(&r)
    );
    assert_all_on(&api, &fleet, 2, 2.0);
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
}

/// A release whose golden vectors do not match halts at the canary: the canary
/// rolls back (reason `golden_mismatch` reported) and keeps serving release 1;
/// no other device is offered the bundle.
#[test]
fn bad_release_halts_at_the_canary() {
    let t0 = Instant::now();
    let kit = Kit::new();
    let server = ServerProc::start(&kit, Broker::Embedded(0));
    let api = server.api();
    let tag = unique("bad-");
    let mut fleet = Fleet::spawn(&kit, &tag, 10, &server.broker_url(), Some(&api));
    api.wait_registered(&fleet, Duration::from_secs(60));
    fleet.read_api_ports();

    let sha = api.upload(kit.bundle(Kind::GoldenMismatch, 2, 2.0));
    let id = api.create_rollout(&rollout_spec(&sha, &tag, &["1", "50%", "100%"], 60));
    let r = api.wait_finished(&id, Duration::from_secs(90), || fleet.logs(&[]));
    let canary = r["devices"]
        .as_object()
        .into_iter()
        .flatten()
        .find(|(_, d)| d["wave"] == 0)
        .map(|(id, _)| id.clone())
        .expect("a canary in the first wave (index 0)");
    assert!(
        r["state"]["state"] == "halted"
            && r["state"]["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("wave 1 of ")),
        "expected a halt at wave 1: {}\n{}",
        summary(&r),
        fleet.logs(&[canary.as_str()])
    );
    let d = &r["devices"][canary.as_str()];
    assert_eq!(
        (&d["state"], &d["reason"]),
        (&json!("rolled_back"), &json!("golden_mismatch")),
        "canary {canary}: {d}\n{}",
        fleet.logs(&[canary.as_str()])
    );
    for (dev, p) in r["devices"].as_object().expect("devices") {
        if *dev != canary {
            assert!(
                p["state"] == "cancelled" && p["offered_ms"].is_null(),
                "{dev} should never have been offered: {p}"
            );
        }
    }
    // Late offers would show up here.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        api.get("/v1/stats")["offers_sent"],
        1,
        "only the canary was offered the bundle"
    );
    let canary_dev = api.get(&format!("/v1/devices/{canary}"));
    assert_eq!(
        canary_dev["device"]["active"]["release"], 1,
        "registry: canary {canary}: {canary_dev}"
    );
    let c = fleet.get(&canary);
    wait_until(
        Duration::from_secs(15),
        || format!("canary {canary} idle again: {}", c.model()),
        || (c.model()["update_state"] == "idle").then_some(()),
    );
    for a in &fleet.agents {
        let m = a.model();
        assert_eq!(
            (&m["release"]["release"], &m["update_state"]),
            (&json!(1), &json!("idle")),
            "{}: GET /v1/model: {m}",
            a.id
        );
        // Only the canary ever made room for release 2 (docs/agent.md: disk layout).
        let slot_b = a.dir.join("data/slots/b/slot.json");
        if a.id != canary {
            assert!(
                !slot_b.exists() && !a.dir.join("data/download/body.part").exists(),
                "{} was never offered release 2 but has its files",
                a.id
            );
        }
    }
    assert_all_on(&api, &fleet, 1, 1.0);
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
}

/// A registered agent that goes silent (SIGSTOP) makes its wave fail when
/// `wave_timeout_s` passes, instead of leaving the rollout in progress forever.
#[test]
fn silent_agent_fails_its_wave_at_the_timeout() {
    const TIMEOUT_S: u64 = 15;
    let t0 = Instant::now();
    let kit = Kit::new();
    let server = ServerProc::start(&kit, Broker::Embedded(0));
    let api = server.api();
    let tag = unique("quiet-");
    let mut fleet = Fleet::spawn(&kit, &tag, 5, &server.broker_url(), Some(&api));
    api.wait_registered(&fleet, Duration::from_secs(60));
    fleet.read_api_ports();
    let silent = fleet.agents[2].id.clone();
    signal(fleet.get(&silent).child.as_ref().expect("running"), "STOP");

    let sha = api.upload(kit.bundle(Kind::Good, 2, 2.0));
    let created = Instant::now();
    let id = api.create_rollout(&rollout_spec(&sha, &tag, &["100%"], TIMEOUT_S));
    // The others commit; the wave stays open for the silent one until the timeout.
    let r = wait_until(
        Duration::from_secs(TIMEOUT_S + 30),
        || format!("4 agents to commit\n{}", fleet.logs(&[])),
        || {
            let r = api.get(&format!("/v1/rollouts/{id}"))["rollout"].clone();
            (r["waves"][0]["committed"] == 4 || r["state"]["state"] != "running").then_some(r)
        },
    );
    let at = created.elapsed();
    if r["state"]["state"] == "running" {
        assert!(
            at < Duration::from_secs(TIMEOUT_S),
            "still running {:.1} s after creation: {}",
            at.as_secs_f64(),
            summary(&r)
        );
        assert_eq!(
            (
                &r["waves"][0]["in_progress"],
                &r["devices"][silent.as_str()]["state"]
            ),
            (&json!(1), &json!("offered")),
            "{}",
            summary(&r)
        );
    }
    let r = api.wait_finished(&id, Duration::from_secs(TIMEOUT_S + 30), || fleet.logs(&[]));
    let took = created.elapsed().as_secs_f64();
    assert!(
        r["state"]["state"] == "halted"
            && r["state"]["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("wave 1 of 1: 1 of 5 devices failed")),
        "{}",
        summary(&r)
    );
    assert!(
        took >= TIMEOUT_S as f64 - 0.5 && took <= TIMEOUT_S as f64 + 15.0,
        "halted {took:.1} s after creation, wave_timeout_s = {TIMEOUT_S}"
    );
    let d = &r["devices"][silent.as_str()];
    assert_eq!(d["state"], "timed_out", "{silent}: {d}");
    assert_eq!(
        d["reason"],
        format!("no commit within {TIMEOUT_S} s"),
        "{silent}: {d}"
    );
    let committed = r["devices"]
        .as_object()
        .expect("devices")
        .values()
        .filter(|d| d["state"] == "committed")
        .count();
    assert_eq!(committed, 4, "{}", summary(&r));
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
}

/// The server process is SIGKILLed while wave 1 is in progress and restarted
/// on the same data dir and ports (its embedded broker too): agents reconnect
/// by themselves and the rollout resumes and completes.
#[test]
fn server_killed_mid_rollout_resumes_after_restart() {
    let t0 = Instant::now();
    let kit = Kit::new();
    let mut server = ServerProc::start(&kit, Broker::Embedded(0));
    let api = server.api();
    let tag = unique("rs-");
    let mut fleet = Fleet::spawn(&kit, &tag, 12, &server.broker_url(), Some(&api));
    api.wait_registered(&fleet, Duration::from_secs(60));
    fleet.read_api_ports();

    let sha = api.upload(kit.bundle(Kind::Good, 2, 2.0));
    let mut spec = rollout_spec(&sha, &tag, &["1", "50%", "100%"], 90);
    // A longer trial keeps wave 1 in progress long enough to kill the server in it.
    spec["trial"]["window_s"] = json!(3);
    let id = api.create_rollout(&spec);
    let before = wait_until(
        Duration::from_secs(60),
        || format!("wave 1 to start\n{}", fleet.logs(&[])),
        || {
            let r = api.try_get(&format!("/v1/rollouts/{id}")).ok()?["rollout"].clone();
            (r["current_wave"] == 1).then_some(r)
        },
    );
    server.sigkill();
    assert!(
        before["state"]["state"] == "running"
            && before["waves"][1]["in_progress"].as_u64().unwrap_or(0) > 0,
        "killed mid-rollout, wave 1 outstanding: {}",
        summary(&before)
    );
    std::thread::sleep(Duration::from_secs(1));
    server.restart(&kit.trust);
    let r = api.wait_finished(&id, Duration::from_secs(150), || {
        format!("{}\nserver:\n{}", fleet.logs(&[]), tail(&server.log(), 30))
    });
    assert_eq!(r["state"]["state"], "completed", "{}", summary(&r));
    assert!(
        r["history"].as_array().into_iter().flatten().any(|h| h
            .as_str()
            .is_some_and(|h| h.contains("resumed after server restart"))),
        "history shows the resume: {}",
        r["history"]
    );
    wait_until(
        Duration::from_secs(60),
        || "every agent online again after the restart".to_string(),
        || {
            let d = api.devices(&tag);
            (d.len() == 12 && d.iter().all(|d| d["online"] == true)).then_some(())
        },
    );
    assert_all_on(&api, &fleet, 2, 2.0);
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
}

/// A device that is offline when it is offered the release, and stays offline
/// while the server restarts (its embedded broker, and the offer queued there,
/// go with it), gets the offer when it comes back and says hello.
#[test]
fn offline_agent_gets_its_offer_after_a_server_restart() {
    let t0 = Instant::now();
    let kit = Kit::new();
    let mut server = ServerProc::start(&kit, Broker::Embedded(0));
    let api = server.api();
    let tag = unique("off-");
    let mut fleet = Fleet::spawn(&kit, &tag, 4, &server.broker_url(), Some(&api));
    api.wait_registered(&fleet, Duration::from_secs(60));
    let late = fleet.agents[1].id.clone();
    kill(&mut fleet.agents[1].child);

    let sha = api.upload(kit.bundle(Kind::Good, 2, 2.0));
    let id = api.create_rollout(&rollout_spec(&sha, &tag, &["100%"], 60));
    let r = wait_until(
        Duration::from_secs(40),
        || format!("the 3 online agents to commit\n{}", fleet.logs(&[])),
        || {
            let r = api.get(&format!("/v1/rollouts/{id}"))["rollout"].clone();
            (r["waves"][0]["committed"] == 3).then_some(r)
        },
    );
    assert_eq!(
        r["devices"][late.as_str()]["state"],
        "offered",
        "{}",
        summary(&r)
    );
    server.sigkill();
    server.restart(&kit.trust);
    // Let the resumed rollout re-send its offers before the device is back.
    std::thread::sleep(Duration::from_secs(2));
    fleet.agents[1].spawn();
    let r = api.wait_finished(&id, Duration::from_secs(45), || {
        format!(
            "{}\nserver:\n{}",
            fleet.logs(&[late.as_str()]),
            tail(&server.log(), 30)
        )
    });
    assert_eq!(r["state"]["state"], "completed", "{}", summary(&r));
    fleet.read_api_ports();
    assert_all_on(&api, &fleet, 2, 2.0);
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
}

/// The real server process refuses every API call without a valid token.
#[test]
fn api_without_a_valid_token_is_401() {
    let kit = Kit::new();
    let server = ServerProc::start(&kit, Broker::Embedded(0));
    let base = format!("http://{}", server.api);
    let http = reqwest::blocking::Client::new();
    let bundle = kit.bundle(Kind::Good, 2, 2.0);
    let calls: Vec<(&str, &str)> = vec![
        ("GET", "/v1/devices"),
        ("GET", "/v1/devices/some-device"),
        ("POST", "/v1/devices/some-device/credentials"),
        ("POST", "/v1/devices/some-device/config"),
        ("GET", "/v1/devices/some-device/credentials"),
        ("POST", "/v1/devices/some-device/tags"),
        ("GET", "/v1/bundles"),
        ("POST", "/v1/bundles"),
        ("GET", "/v1/rollouts"),
        ("POST", "/v1/rollouts"),
        ("POST", "/v1/rollouts/r-x/abort"),
        ("GET", "/v1/telemetry"),
        ("GET", "/v1/drift"),
        ("GET", "/v1/retraining"),
        ("GET", "/v1/stats"),
    ];
    let auths: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("a wrong token", Some(format!("Bearer {TOKEN}x"))),
        ("an empty bearer token", Some("Bearer ".to_string())),
        ("the token without Bearer", Some(TOKEN.to_string())),
        ("basic auth", Some(format!("Basic {TOKEN}"))),
    ];
    for (method, path) in &calls {
        for (what, auth) in &auths {
            let mut req = match *method {
                "GET" => http.get(format!("{base}{path}")),
                _ => http.post(format!("{base}{path}")),
            };
            if *path == "/v1/bundles" && *method == "POST" {
                req = req.body(bundle.clone());
            } else if *method == "POST" {
                req = req.json(&json!({"bundle": "x", "selector": {}}));
            }
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            let r = req.send().expect("request");
            let status = r.status().as_u16();
            let body: Value = r.json().unwrap_or(Value::Null);
            assert_eq!(status, 401, "{method} {path} with {what}: {body}");
            assert_eq!(
                body["error"]["code"], "unauthorized",
                "{method} {path} with {what}: {body}"
            );
        }
    }
    // Nothing was stored, and the right token works.
    let api = server.api();
    assert_eq!(api.get("/v1/bundles")["bundles"], json!([]));
    assert_eq!(api.get("/v1/rollouts")["rollouts"], json!([]));
    let health = http
        .get(format!("{base}/v1/health"))
        .send()
        .expect("health");
    assert_eq!(health.status().as_u16(), 200, "/v1/health needs no token");
    // The CLI client fails with a wrong token and works with the right one.
    let cli = |token: &str| {
        Command::new(EXE)
            .args(["devices", "list", "--server", &base, "--token", token])
            .output()
            .expect("edgefleet devices list")
    };
    let out = cli("wrong");
    assert!(
        !out.status.success(),
        "devices list with a wrong token succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "error names the 401: {err}");
    let out = cli(TOKEN);
    assert!(
        out.status.success(),
        "devices list with the token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clears what a test left on a shared broker (best effort, on drop): the
/// retained status of each device and the persistent sessions of its clients.
struct BrokerCleanup {
    port: u16,
    client_ids: Vec<String>,
    retained: Vec<String>,
}

impl BrokerCleanup {
    /// What devices `{tag}-00..{tag}-{n-1}` leave on the machine's Mosquitto:
    /// their sessions (command and telemetry clients) and retained status.
    fn for_devices(tag: &str, n: usize) -> Self {
        let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i:02}")).collect();
        BrokerCleanup {
            port: 1883,
            client_ids: ids
                .iter()
                .flat_map(|id| [id.clone(), format!("{id}-telemetry")])
                .collect(),
            retained: ids
                .iter()
                .map(|id| format!("edgefleet/v1/devices/{id}/up/status"))
                .collect(),
        }
    }
}

/// Whether the machine's Mosquitto listens on 127.0.0.1:1883 (a test that
/// needs it prints SKIP and returns when not; `.ci/run` starts it).
fn mosquitto_up() -> bool {
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("addr"),
        Duration::from_secs(1),
    )
    .is_ok();
    if !up {
        eprintln!("SKIP: no Mosquitto at 127.0.0.1:1883");
    }
    up
}

impl Drop for BrokerCleanup {
    fn drop(&mut self) {
        mqtt_once(self.port, &unique("fa-clean-"), &self.retained);
        for id in &self.client_ids {
            mqtt_once(self.port, id, &[]);
        }
    }
}

/// Connects with a clean session as `id` (dropping any session the broker
/// kept for it), clears the retained messages on `clear`, and disconnects.
fn mqtt_once(port: u16, id: &str, clear: &[String]) {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(true);
    let (client, mut conn) = rumqttc::Client::new(o, clear.len() + 10);
    let t = Instant::now();
    let mut acks = 0;
    for ev in conn.iter() {
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                for topic in clear {
                    let _ = client.try_publish(topic, rumqttc::QoS::AtLeastOnce, true, vec![]);
                }
                if clear.is_empty() {
                    let _ = client.try_disconnect();
                }
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                acks += 1;
                if acks == clear.len() {
                    let _ = client.try_disconnect();
                }
            }
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
            Ok(_) => {}
        }
        if t.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
}

/// Test 1 through the machine's Mosquitto (127.0.0.1:1883): 10 agents and the
/// server on an external broker. Skipped when no broker listens there.
#[test]
fn rollout_through_mosquitto() {
    if !mosquitto_up() {
        return;
    }
    let t0 = Instant::now();
    let kit = Kit::new();
    let tag = unique("mq-");
    // Declared first: dropped last, after the agents and the server are gone.
    let mut cleanup = BrokerCleanup::for_devices(&tag, 10);
    let server = ServerProc::start(&kit, Broker::External("mqtt://127.0.0.1:1883".into()));
    cleanup.client_ids.push(server.client_id.clone());
    let api = server.api();
    let mut fleet = Fleet::spawn(&kit, &tag, 10, "mqtt://127.0.0.1:1883", None);
    api.wait_registered(&fleet, Duration::from_secs(60));
    fleet.read_api_ports();

    let sha = api.upload(kit.bundle(Kind::Good, 2, 2.0));
    let id = api.create_rollout(&rollout_spec(&sha, &tag, &["1", "5%", "25%", "100%"], 60));
    let r = api.wait_finished(&id, Duration::from_secs(120), || {
        format!("{}\nserver:\n{}", fleet.logs(&[]), tail(&server.log(), 20))
    });
    assert_eq!(r["state"]["state"], "completed", "{}", summary(&r));
    let sizes: Vec<u64> = r["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["committed"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(sizes, vec![1, 1, 1, 7], "{}", summary(&r));
    assert_all_on(&api, &fleet, 2, 2.0);
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
}

/// `POST /v1/devices/{id}/config` reaches the real agent as `Down::Config`:
/// it applies the new telemetry interval (records arrive about every second
/// instead of every 5 s); out-of-range values get a 400 naming the field and
/// an unknown device a 404.
#[test]
fn config_command_changes_a_real_agents_telemetry_interval() {
    let kit = Kit::new();
    let server = ServerProc::start(&kit, Broker::Embedded(0));
    let api = server.api();
    let tag = unique("cfg-");
    let fleet = Fleet::spawn(&kit, &tag, 1, &server.broker_url(), Some(&api));
    api.wait_registered(&fleet, Duration::from_secs(60));
    let id = fleet.agents[0].id.clone();
    let http = reqwest::blocking::Client::new();
    let post = |path: &str, body: &Value| {
        let r = http
            .post(format!("http://{}{path}", server.api))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .expect("POST");
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let (st, v) = post(
        &format!("/v1/devices/{id}/config"),
        &json!({"telemetry_interval_s": 0}),
    );
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("telemetry_interval_s"), "{v}");
    let (st, v) = post(
        "/v1/devices/nobody-here/config",
        &json!({"telemetry_interval_s": 1}),
    );
    assert_eq!(st, 404, "{v}");
    api.post(
        &format!("/v1/devices/{id}/config"),
        &json!({"telemetry_interval_s": 1}),
    );
    let log = fleet.agents[0].log();
    wait_until(
        Duration::from_secs(30),
        || format!("agent never applied the config\n{}", tail(&log, 30)),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (text.contains("config command applied") && text.contains("telemetry interval changed"))
                .then_some(())
        },
    );
}

/// Issue #20 (6): the trial flags of `edgefleet rollouts create` reach the
/// device: the real agent runs its trial with exactly that policy (its
/// `trial_started` line) and commits under it.
#[test]
fn rollouts_create_trial_flags_reach_the_agents_policy() {
    use edgefleet_protocol::messages::{TrialEnd, TrialMode, TrialPolicy};
    let kit = Kit::new();
    let server = ServerProc::start(&kit, Broker::Embedded(0));
    let api = server.api();
    let tag = unique("trial-");
    let fleet = Fleet::spawn(&kit, &tag, 1, &server.broker_url(), Some(&api));
    api.wait_registered(&fleet, Duration::from_secs(60));
    let sha = api.upload(kit.bundle(Kind::Good, 2, 2.0));
    let base = format!("http://{}", server.api);
    let out = Command::new(EXE)
        .args(["rollouts", "create", "--server", &base, "--token", TOKEN])
        .args(["--bundle", &sha, "--tag", &tag, "--waves", "100%"])
        .args(["--wave-timeout-s", "60", "--trial-window", "1"])
        .args(["--trial-min-requests", "7", "--trial-max-error-rate", "0.5"])
        .args(["--trial-max-latency-ratio", "40", "--trial-mode", "serve"])
        .env("NO_COLOR", "1")
        .output()
        .expect("edgefleet rollouts create");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "rollouts create: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no rollout id in {stdout}"))
        .to_string();
    assert!(
        stdout.contains(
            "trial: serve mode, window 1 s, at least 7 requests, error rate <= 0.5, latency <= 40.0 x reference"
        ),
        "{stdout}"
    );
    let r = api.wait_finished(&id, Duration::from_secs(90), || fleet.logs(&[]));
    assert_eq!(r["state"]["state"], "completed", "{}", summary(&r));
    let want = TrialPolicy {
        window_s: 1,
        min_requests: 7,
        max_error_rate: 0.5,
        max_p99_ratio: 40.0,
        mode: TrialMode::Serve,
        end: TrialEnd::Commit,
    };
    let agent = &fleet.agents[0];
    let log = strip_ansi(&std::fs::read_to_string(agent.log()).unwrap_or_default());
    let line = log
        .lines()
        .find(|l| l.contains("event=\"trial_started\""))
        .unwrap_or_else(|| panic!("no trial_started line:\n{}", tail(&agent.log(), 40)));
    assert!(
        line.contains(&format!("policy={want} ")) && line.contains("mode=serve"),
        "{line}"
    );
}

/// Issue #11 item 5 end to end, through the machine's Mosquitto: a real agent
/// serving a classifier answers with a request id, takes ground-truth labels
/// for it on `POST /v1/feedback` (404 for an id it never issued, 409 for a
/// second label), and the fleet server's `/v1/telemetry` reports the online
/// accuracy of the release that answered: exactly 2 of 3 labels agreed.
#[test]
fn feedback_labels_reach_the_servers_online_accuracy_through_mosquitto() {
    if !mosquitto_up() {
        return;
    }
    let kit = Kit::booting(Kind::Classifier);
    let tag = unique("fb-");
    let mut cleanup = BrokerCleanup::for_devices(&tag, 1);
    let server = ServerProc::start(&kit, Broker::External("mqtt://127.0.0.1:1883".into()));
    cleanup.client_ids.push(server.client_id.clone());
    let api = server.api();
    let mut fleet = Fleet::spawn(&kit, &tag, 1, "mqtt://127.0.0.1:1883", None);
    api.wait_registered(&fleet, Duration::from_secs(60));
    fleet.read_api_ports();
    let agent = &fleet.agents[0];
    let http = agent.http();
    let infer = |x: [f32; 4]| -> String {
        let body = json!({"inputs": [Tensor::f32("x", vec![1, 4], x.to_vec())]});
        let r = http
            .post(agent.url("/v1/infer"))
            .json(&body)
            .send()
            .expect("POST /v1/infer");
        assert!(r.status().is_success(), "infer: {}", r.status());
        r.headers()[edgefleet_agent::api::REQUEST_ID_HEADER]
            .to_str()
            .expect("ascii request id")
            .to_string()
    };
    let label = |id: &str, label: u64| -> (u16, Value) {
        let r = http
            .post(agent.url("/v1/feedback"))
            .json(&json!({"request_id": id, "label": label}))
            .send()
            .expect("POST /v1/feedback");
        (r.status().as_u16(), r.json().unwrap_or(Value::Null))
    };
    // y = x: the answer is the index of the largest input.
    let a = infer([1.0, 2.0, 3.0, 4.0]); // answer 3
    let b = infer([4.0, 3.0, 2.0, 1.0]); // answer 0
    let c = infer([0.0, 9.0, 1.0, 2.0]); // answer 1
    let (st, v) = label(&a, 3);
    assert_eq!(
        (st, &v["agreed"], &v["answer"]),
        (200, &json!(true), &json!(3)),
        "{v}"
    );
    let (st, v) = label(&b, 2);
    assert_eq!(
        (st, &v["agreed"], &v["release"]["release"]),
        (200, &json!(false), &json!(1)),
        "{v}"
    );
    let (st, v) = label(&c, 1);
    assert_eq!((st, &v["agreed"]), (200, &json!(true)), "{v}");
    let (st, v) = label(&a, 3);
    assert_eq!(st, 409, "a second label for {a}: {v}");
    let (st, v) = label("0000000000000000-1", 1);
    assert_eq!(st, 404, "a label for an id never issued: {v}");
    let (st, v) = label(&c, 4);
    assert!(
        st == 400 || st == 409,
        "label 4 of a 4-class model: {st} {v}"
    );

    // The labels may come in one telemetry interval or two: wait for all 3.
    let id = agent.id.clone();
    let last = std::cell::RefCell::new(Value::Null);
    let fb = wait_until(
        Duration::from_secs(60),
        || {
            format!(
                "3 labels in /v1/telemetry?device={id}; last {}\n{}",
                last.borrow(),
                fleet.logs(&[])
            )
        },
        || {
            let f = api.get(&format!("/v1/telemetry?device={id}"))["telemetry"]["feedback"].clone();
            *last.borrow_mut() = f.clone();
            let n: u64 = f
                .as_array()?
                .iter()
                .filter_map(|r| r["labelled"].as_u64())
                .sum();
            (n >= 3).then_some(f)
        },
    );
    let got: Vec<(u64, u64, u64)> = fb
        .as_array()
        .expect("feedback list")
        .iter()
        .map(|f| {
            (
                f["release"]["release"].as_u64().unwrap_or(0),
                f["labelled"].as_u64().unwrap_or(0),
                f["agreed"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(got, vec![(1, 3, 2)], "{fb}");
    let acc = fb[0]["online_accuracy"].as_f64().expect("online_accuracy");
    assert!((acc - 2.0 / 3.0).abs() < 1e-9, "online accuracy {acc}");
}
