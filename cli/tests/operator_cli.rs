//! The operator's list and rollout commands against a real `edgefleet serve`
//! (issue #20): `devices|bundles|rollouts list` print aligned tables with
//! human times and `--json` the API's JSON; `rollouts create --bundle` takes a
//! hash prefix or the .efb file; `rollouts watch` follows a rollout to its end;
//! `drift show`, `retraining list`, `capture enable|show|request|disable` and
//! `datasets create|list|show|download` (issue #11).
//! Devices are the fleet server's simulated agents (`edgefleet_fleet_server::sim`)
//! on the embedded broker with `--device-auth off`.
//!
//! ```sh
//! cargo test -p edgefleet --test operator_cli
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_agent::testkit::{self, Kind};
use edgefleet_bundle::{SigningKey, TrustStore};
use edgefleet_fleet_server::sim;
use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_edgefleet");
const TOKEN: &str = "operator-cli-test-token";
const TARGET: &str = "x86-avx2-gateway";
const MODEL: &str = "testmodel";

struct Server {
    child: Child,
    api: String,
    mqtt_port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path, trust: &Path) -> Server {
    start_server_with(dir, trust, &[])
}

/// `edgefleet serve` with `extra` arguments.
fn start_server_with(dir: &Path, trust: &Path, extra: &[&str]) -> Server {
    start_server_on(dir, trust, (0, 0), extra)
}

/// `edgefleet serve` on API port and MQTT port `ports` (0: any free one).
fn start_server_on(dir: &Path, trust: &Path, ports: (u16, u16), extra: &[&str]) -> Server {
    let stdout = dir.join("server.out");
    let _ = std::fs::remove_file(&stdout);
    let child = Command::new(EXE)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", ports.0)])
        .args(["--mqtt-port", &ports.1.to_string()])
        .args(["--device-auth", "off", "--token", TOKEN])
        .args(extra)
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--trust")
        .arg(trust)
        .env("EDGEFLEET_LOG", "warn,edgefleet_fleet_server=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(dir.join("server.err")).expect("stderr file"))
        .spawn()
        .expect("start edgefleet serve");
    // Owned at once, so a failed start still kills and reaps it (Drop).
    let mut server = Server {
        child,
        api: String::new(),
        mqtt_port: 0,
    };
    let t = Instant::now();
    loop {
        // "edgefleet fleet server: API http://127.0.0.1:PORT, MQTT port N"
        let text = std::fs::read_to_string(&stdout).unwrap_or_default();
        let api = text
            .split("API http://")
            .nth(1)
            .and_then(|r| r.split([',', ' ', '\n']).next());
        let port = text
            .split("MQTT port ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        if let (Some(api), Some(mqtt_port)) = (api, port) {
            server.api = format!("http://{api}");
            server.mqtt_port = mqtt_port;
            return server;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server did not start: {}",
            std::fs::read_to_string(dir.join("server.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `edgefleet ARGS` against the server.
fn cli(server: &Server, args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .env("EDGEFLEET_SERVER", &server.api)
        .env("EDGEFLEET_TOKEN", TOKEN)
        .env("NO_COLOR", "1")
        .output()
        .expect("run edgefleet")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A table's cells: columns are separated by two or more spaces.
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// Each column starts at the same offset in every line (the header's).
fn assert_aligned(table: &str) {
    let lines: Vec<&str> = table.lines().collect();
    let header = lines[0];
    let starts: Vec<usize> = cells(header)
        .iter()
        .map(|h| header.find(h.as_str()).expect("header cell"))
        .collect();
    for line in &lines[1..] {
        for &s in &starts[1..] {
            assert!(
                line.get(s - 2..s) == Some("  "),
                "column at {s} not aligned in\n{table}"
            );
        }
    }
}

fn human_age(s: &str) -> bool {
    s == "just now" || s.ends_with(" ago")
}

#[test]
fn serve_prints_its_addresses_and_logs_its_stop_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = SigningKey::generate();
    let trust = dir.path().join("release.pub.pem");
    key.write_pem_files(&dir.path().join("release.pem"), &trust)
        .expect("keys");
    let mut server = start_server(dir.path(), &trust);
    let out = std::fs::read_to_string(dir.path().join("server.out")).expect("stdout");
    assert_eq!(
        out.lines().next(),
        Some(
            format!(
                "edgefleet fleet server: {}, MQTT port {}",
                server.api.replacen("http://", "API http://", 1),
                server.mqtt_port
            )
            .as_str()
        )
    );
    let st = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let t = Instant::now();
    let status = loop {
        if let Some(st) = server.child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(dir.path().join("server.err")).expect("stderr");
    let tails: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            l.split_once(" INFO edgefleet_fleet_server: ")
                .map(|(_, t)| t)
        })
        .filter(|t| t.starts_with("shutting down") || t.starts_with("fleet server stopped"))
        .collect();
    assert_eq!(
        tails,
        [
            "shutting down signal=\"SIGTERM\"",
            "fleet server stopped event=\"server_stopped\""
        ],
        "{log}"
    );
}

#[test]
fn list_commands_print_tables_and_rollouts_take_prefixes_and_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = SigningKey::generate();
    let trust = dir.path().join("release.pub.pem");
    key.write_pem_files(&dir.path().join("release.pem"), &trust)
        .expect("keys");
    let server = start_server(dir.path(), &trust);

    // Three simulated devices that commit whatever they are offered.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let cfg = sim::SimConfig {
        host: "127.0.0.1".into(),
        port: server.mqtt_port,
        trust: Arc::new(TrustStore::load(&trust).expect("trust")),
        target: TARGET.into(),
        tags: vec!["opcli".into()],
        heartbeat: Duration::from_secs(5),
        keep_payload: false,
        initial: None,
    };
    let _devices: Vec<sim::SimDevice> = ["cam-1", "cam-2", "cam-3"]
        .iter()
        .map(|id| sim::spawn(id, cfg.clone(), sim::always(sim::Behavior::Commit)).expect("sim"))
        .collect();
    let t = Instant::now();
    loop {
        let v: Value = serde_json::from_str(&ok(&cli(&server, &["devices", "list", "--json"])))
            .expect("devices --json is JSON");
        // Registered is not enough: a row exists from the first message,
        // `online` and `target` come with the device's hello and status.
        let ready = v["devices"].as_array().is_some_and(|d| {
            d.len() == 3
                && d.iter()
                    .all(|d| d["online"] == true && d["target"] == TARGET)
        });
        if ready {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "devices did not register: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // devices list: a table, one row per device, human "last seen".
    let table = ok(&cli(&server, &["devices", "list"]));
    assert_aligned(&table);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        cells(lines[0]),
        [
            "id",
            "online",
            "target",
            "active",
            "state",
            "last seen",
            "groups",
            "tags"
        ]
    );
    assert_eq!(lines.len(), 4, "{table}");
    let row = cells(lines[1]);
    assert_eq!(row[..3], ["cam-1", "yes", TARGET], "{table}");
    assert!(human_age(&row[5]), "last seen `{}`", row[5]);
    assert_eq!(row[7], "opcli", "{table}");

    // bundles list: short hashes, sizes and upload ages; --json has the full hashes.
    let b1 = dir.path().join("m-1.efb");
    std::fs::write(
        &b1,
        testkit::bundle(Kind::Good, &key, MODEL, 1, TARGET, 1.0),
    )
    .expect("b1");
    let b2 = dir.path().join("m-2.efb");
    std::fs::write(
        &b2,
        testkit::bundle(Kind::Good, &key, MODEL, 2, TARGET, 2.0),
    )
    .expect("b2");
    for b in [&b1, &b2] {
        ok(&cli(
            &server,
            &["bundles", "upload", b.to_str().expect("utf-8")],
        ));
    }
    let v: Value = serde_json::from_str(&ok(&cli(&server, &["bundles", "list", "--json"])))
        .expect("bundles --json is JSON");
    let sha_of = |release: u64| -> String {
        v["bundles"]
            .as_array()
            .expect("bundles")
            .iter()
            .find(|b| b["release"] == release)
            .and_then(|b| b["sha256"].as_str())
            .expect("uploaded")
            .to_string()
    };
    let (sha1, sha2) = (sha_of(1), sha_of(2));
    assert_eq!(sha2.len(), 64);
    let table = ok(&cli(&server, &["bundles", "list"]));
    assert!(!table.trim_start().starts_with('{'), "{table}");
    assert_aligned(&table);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        cells(lines[0]),
        ["sha256", "model", "version", "release", "targets", "size", "uploaded"]
    );
    let row2 = lines
        .iter()
        .map(|l| cells(l))
        .find(|r| r[0] == sha2[..12])
        .unwrap_or_else(|| panic!("no row for {sha2} in\n{table}"));
    assert_eq!(row2[1..5], [MODEL, "1.0.2", "2", TARGET], "{table}");
    assert!(
        row2[5].ends_with("KiB") || row2[5].ends_with(" B"),
        "{table}"
    );
    assert!(human_age(&row2[6]), "{table}");

    // --bundle: bad arguments are refused naming the problem, before any rollout.
    let e = err(&cli(
        &server,
        &[
            "rollouts",
            "create",
            "--bundle",
            "deadbeefdead",
            "--tag",
            "opcli",
        ],
    ));
    assert!(
        e.contains("bundle `deadbeefdead`: no bundle on the server has a hash starting with it"),
        "{e}"
    );
    let e = err(&cli(
        &server,
        &[
            "rollouts",
            "create",
            "--bundle",
            &sha2[..5],
            "--tag",
            "opcli",
        ],
    ));
    assert!(e.contains("at least 8 hex digits"), "{e}");
    let stray = dir.path().join("stray.efb");
    std::fs::write(
        &stray,
        testkit::bundle(Kind::Good, &key, MODEL, 3, TARGET, 3.0),
    )
    .expect("b3");
    let e = err(&cli(
        &server,
        &[
            "rollouts",
            "create",
            "--bundle",
            stray.to_str().expect("utf-8"),
            "--tag",
            "opcli",
        ],
    ));
    assert!(e.contains("is not on the server: upload it first"), "{e}");

    // A unique 8-digit prefix names release 2; watch follows it to the end.
    assert_ne!(sha1[..8], sha2[..8], "test bundles share a prefix: rerun");
    let out = ok(&cli(
        &server,
        &[
            "rollouts",
            "create",
            "--bundle",
            &sha2[..8],
            "--tag",
            "opcli",
            "--waves",
            "1,100%",
        ],
    ));
    let id = out
        .strip_prefix("rollout ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("create said: {out}"))
        .to_string();
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| l.ends_with("created: 3 devices")),
        "{out}"
    );
    let watched = ok(&cli(
        &server,
        &["rollouts", "watch", &id, "--interval-s", "0.2"],
    ));
    assert!(
        !watched.contains('\u{1b}'),
        "escape codes off a terminal:\n{watched}"
    );
    let last: Vec<&str> = watched.lines().rev().take(4).collect::<Vec<_>>();
    assert!(
        watched.contains(&format!(
            "rollout {id}  {MODEL} 1.0.2 (release 2)  completed  wave 2/2  committed 3, failed 0, in progress 0 of 3"
        )),
        "{watched}"
    );
    // Wave rows: number (`>` marks the current), devices, committed, failed, in progress.
    let row = |l: &str| -> Vec<String> {
        let mut c = cells(l);
        c[0] = c[0].trim_start_matches('>').to_string();
        c
    };
    assert_eq!(row(last[0]), ["2", "2", "2", "0", "0"], "{watched}");
    assert_eq!(row(last[1]), ["1", "1", "1", "0", "0"], "{watched}");

    // rollouts list: the finished rollout in a table; --json is the API's.
    let table = ok(&cli(&server, &["rollouts", "list"]));
    assert_aligned(&table);
    let row = table
        .lines()
        .map(cells)
        .find(|r| r[0] == id)
        .unwrap_or_else(|| panic!("no {id} in\n{table}"));
    assert_eq!(
        row[..8],
        [
            id.as_str(),
            "completed",
            &format!("{MODEL} 1.0.2 (release 2)"),
            "3",
            "2/2",
            "3",
            "0",
            "0"
        ],
        "{table}"
    );
    assert!(human_age(&row[8]) && human_age(&row[9]), "{table}");
    let v: Value = serde_json::from_str(&ok(&cli(&server, &["rollouts", "list", "--json"])))
        .expect("rollouts --json is JSON");
    assert_eq!(v["rollouts"][0]["id"], id.as_str());

    // The uploaded file names its bundle too (all devices already run it).
    let out = ok(&cli(
        &server,
        &[
            "rollouts",
            "create",
            "--bundle",
            b2.to_str().expect("utf-8"),
            "--tag",
            "opcli",
        ],
    ));
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| l.ends_with("created: 3 devices")),
        "{out}"
    );
    let second = out.split_whitespace().nth(1).expect("id").to_string();
    let v: Value = serde_json::from_str(&ok(&cli(&server, &["rollouts", "show", &second])))
        .expect("show is JSON");
    assert_eq!(v["rollout"]["bundle"], sha2.as_str());
}

/// A drift report of `dev` for release 1 of `MODEL`: one PSI test on `input.rms`.
fn drift_report(
    dev: &sim::SimDevice,
    seq: u64,
    drift: bool,
    statistic: f64,
) -> edgefleet_protocol::Up {
    use edgefleet_drift::{Correction, DetectorReport, DriftTest, TestKind, Verdict};
    let verdict = if drift { Verdict::Drift } else { Verdict::Ok };
    edgefleet_protocol::Up::Drift(edgefleet_protocol::messages::DriftMessage {
        device_id: dev.id.clone(),
        release: release(),
        seq,
        alarm: drift,
        ts_ms: 0,
        report: DetectorReport {
            tests: vec![DriftTest {
                name: "input.rms".into(),
                kind: TestKind::Psi,
                observed: 900,
                window_samples: 850.0,
                effective_samples: 80.0,
                rho: 0.8,
                half_life: 2000.0,
                reference_samples: 2000.0,
                overdispersion: 1.0,
                statistic,
                dof: 9,
                level: Some(0.01),
                threshold: Some(0.35),
                p_value: Some(if drift { 1e-8 } else { 0.6 }),
                other_mass: None,
                verdict,
            }],
            alpha: 0.01,
            correction: Correction::Bonferroni,
            tests_with_verdict: 1,
            verdict,
        },
        quality: edgefleet_drift::DataQuality::default(),
    })
}

fn release() -> edgefleet_protocol::messages::ReleaseRef {
    edgefleet_protocol::messages::ReleaseRef {
        model: MODEL.into(),
        release: 1,
        version: "1.0.0".into(),
    }
}

/// Polls `edgefleet ARGS` until `pred` holds on its stdout.
fn until(server: &Server, args: &[&str], pred: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let out = ok(&cli(server, args));
        if pred(&out) {
            return out;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "`edgefleet {}` never matched:\n{out}",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn drift_retraining_capture_and_dataset_commands() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = SigningKey::generate();
    let trust = dir.path().join("release.pub.pem");
    key.write_pem_files(&dir.path().join("release.pem"), &trust)
        .expect("keys");
    let server = start_server_with(
        dir.path(),
        &trust,
        &["--drift-min-devices", "1", "--drift-fraction", "0.1"],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let cfg = sim::SimConfig {
        host: "127.0.0.1".into(),
        port: server.mqtt_port,
        trust: Arc::new(TrustStore::load(&trust).expect("trust")),
        target: TARGET.into(),
        tags: vec!["drcli".into()],
        heartbeat: Duration::from_secs(5),
        keep_payload: false,
        initial: None,
    };
    let devs: Vec<sim::SimDevice> = ["cam-a", "cam-b"]
        .iter()
        .map(|id| sim::spawn(id, cfg.clone(), sim::always(sim::Behavior::Commit)).expect("sim"))
        .collect();
    until(&server, &["devices", "list", "--json"], |o| {
        serde_json::from_str::<Value>(o).expect("JSON")["devices"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });
    for d in ["cam-a", "cam-b"] {
        ok(&cli(&server, &["devices", "group", d, "--add", "line"]));
    }

    // Capture is off until enabled: requests are refused naming the reason.
    let e = err(&cli(
        &server,
        &["capture", "request", "--group", "line", "--samples", "5"],
    ));
    assert!(e.contains("409") && e.contains("capture is off"), "{e}");
    let v: Value = serde_json::from_str(&ok(&cli(
        &server,
        &[
            "capture",
            "enable",
            "--group",
            "line",
            "--max-samples-per-alarm",
            "30",
        ],
    )))
    .expect("JSON");
    assert_eq!(v["sent_to"], serde_json::json!(["cam-a", "cam-b"]), "{v}");
    assert_eq!(v["policy"]["max_samples_per_alarm"], 30);
    let v: Value =
        serde_json::from_str(&ok(&cli(&server, &["capture", "show", "--group", "line"])))
            .expect("JSON");
    assert_eq!(v["policy"]["mode"], "on_alarm");
    let v: Value = serde_json::from_str(&ok(&cli(
        &server,
        &["capture", "request", "--group", "line", "--samples", "5"],
    )))
    .expect("JSON");
    assert_eq!(v["sent_to"], serde_json::json!(["cam-a", "cam-b"]), "{v}");

    // Drift: cam-a drifts, cam-b does not.
    rt.block_on(async {
        devs[0]
            .publish(
                edgefleet_protocol::topics::UpKind::Drift,
                &drift_report(&devs[0], 1, true, 0.9),
            )
            .await
            .expect("publish");
        devs[1]
            .publish(
                edgefleet_protocol::topics::UpKind::Drift,
                &drift_report(&devs[1], 1, false, 0.05),
            )
            .await
            .expect("publish");
    });
    let table = until(&server, &["drift", "show"], |o| o.lines().count() == 3);
    assert_aligned(&table);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        cells(lines[0]),
        [
            "device",
            "release",
            "feature",
            "statistic",
            "threshold",
            "p-value",
            "n_eff",
            "verdict",
            "received"
        ]
    );
    let rows: Vec<Vec<String>> = lines[1..].iter().map(|l| cells(l)).collect();
    assert_eq!(
        rows[0][..8],
        [
            "cam-a",
            "testmodel@1",
            "input.rms",
            "0.9",
            "0.35",
            "1.000e-8",
            "80",
            "drift"
        ],
        "{table}"
    );
    assert_eq!(
        rows[1][..8],
        [
            "cam-b",
            "testmodel@1",
            "input.rms",
            "0.05",
            "0.35",
            "0.6",
            "80",
            "ok"
        ],
        "{table}"
    );
    assert!(human_age(&rows[0][8]), "{table}");
    let one = ok(&cli(
        &server,
        &[
            "drift",
            "show",
            "--device",
            "cam-b",
            "--feature",
            "input.rms",
        ],
    ));
    assert_eq!(one.lines().count(), 2, "{one}");
    let e = err(&cli(&server, &["drift", "show", "--limit", "0"]));
    assert!(e.contains("limit"), "{e}");

    let table = until(&server, &["retraining", "list"], |o| o.lines().count() == 2);
    assert_aligned(&table);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        cells(lines[0]),
        ["id", "group", "model", "state", "drifting", "members", "opened", "closed"]
    );
    let row = cells(lines[1]);
    assert_eq!(
        row[1..6],
        ["line", "testmodel", "open", "cam-a", "cam-a"],
        "{table}"
    );

    // Capture upload from cam-a, then a dataset from it.
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let cid = edgefleet_bundle::sha256(&bytes).to_hex();
    let chunk = edgefleet_protocol::capture::CaptureChunk {
        device_id: devs[0].id.clone(),
        capture_id: cid.clone(),
        index: 0,
        total: 1,
        meta: Some(edgefleet_protocol::capture::CaptureMeta {
            release: release(),
            reason: edgefleet_protocol::capture::CaptureReason::DriftAlarm { drift_seq: 1 },
            samples: 12,
            labelled: 3,
            from_ms: 10,
            to_ms: 20,
            bytes: bytes.len() as u64,
        }),
        data: bytes.clone(),
    };
    rt.block_on(async {
        devs[0]
            .publish(
                edgefleet_protocol::topics::UpKind::Capture,
                &edgefleet_protocol::Up::CaptureChunk(chunk),
            )
            .await
            .expect("publish");
    });
    let t = Instant::now();
    while !devs[0].status().capture_acks.iter().any(|a| a.complete) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            devs[0].status().capture_acks
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v: Value = serde_json::from_str(&ok(&cli(
        &server,
        &["datasets", "create", "--group", "line", "--model", MODEL],
    )))
    .expect("JSON");
    assert_eq!(v["created"], true, "{v}");
    let id = v["dataset"]["id"].as_str().expect("id").to_string();
    let table = ok(&cli(&server, &["datasets", "list"]));
    assert_aligned(&table);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let row = cells(lines[1]);
    assert_eq!(
        row[..9],
        [
            id.as_str(),
            "line",
            MODEL,
            "1",
            "1",
            "12",
            "3",
            "4.9 KiB",
            "cam-a"
        ],
        "{table}"
    );
    let v: Value =
        serde_json::from_str(&ok(&cli(&server, &["datasets", "show", &id]))).expect("JSON");
    assert_eq!(v["dataset"]["batches"][0]["capture_id"], cid.as_str());
    let out = dir.path().join("ds");
    ok(&cli(
        &server,
        &[
            "datasets",
            "download",
            &id,
            "--out",
            out.to_str().expect("utf-8"),
        ],
    ));
    assert_eq!(
        std::fs::read(out.join(format!("{cid}.bin"))).expect("batch"),
        bytes
    );
    let e = err(&cli(&server, &["datasets", "show", "ds-0000000000000000"]));
    assert!(e.contains("404"), "{e}");

    // Disabled again: requests are refused.
    let v: Value = serde_json::from_str(&ok(&cli(
        &server,
        &["capture", "disable", "--group", "line"],
    )))
    .expect("JSON");
    assert_eq!(
        (
            v["policy"]["mode"].clone(),
            v["policy"]["max_samples_per_alarm"].clone()
        ),
        (serde_json::json!("off"), serde_json::json!(30))
    );
    let e = err(&cli(
        &server,
        &["capture", "request", "--group", "line", "--samples", "5"],
    ));
    assert!(e.contains("capture is off"), "{e}");
}

/// Publishes one capture batch of `dev` (model [`MODEL`]) and waits for the
/// server to store it.
fn upload_capture(rt: &tokio::runtime::Runtime, dev: &sim::SimDevice, samples: u32) -> String {
    let bytes: Vec<u8> = (0..4000u32).map(|i| (i % 241) as u8).collect();
    let cid = edgefleet_bundle::sha256(&bytes).to_hex();
    let chunk = edgefleet_protocol::capture::CaptureChunk {
        device_id: dev.id.clone(),
        capture_id: cid.clone(),
        index: 0,
        total: 1,
        meta: Some(edgefleet_protocol::capture::CaptureMeta {
            release: release(),
            reason: edgefleet_protocol::capture::CaptureReason::DriftAlarm { drift_seq: 1 },
            samples,
            labelled: samples,
            from_ms: 10,
            to_ms: 20,
            bytes: bytes.len() as u64,
        }),
        data: bytes,
    };
    rt.block_on(async {
        dev.publish(
            edgefleet_protocol::topics::UpKind::Capture,
            &edgefleet_protocol::Up::CaptureChunk(chunk),
        )
        .await
        .expect("publish");
    });
    let t = Instant::now();
    while !dev.status().capture_acks.iter().any(|a| a.complete) {
        assert!(t.elapsed() < Duration::from_secs(30), "capture not stored");
        std::thread::sleep(Duration::from_millis(100));
    }
    cid
}

/// One simulated device `id` tagged `tag` on the server's broker, committing
/// whatever it is offered.
fn sim_device(server: &Server, trust: &Path, id: &str, tag: &str) -> sim::SimDevice {
    let cfg = sim::SimConfig {
        host: "127.0.0.1".into(),
        port: server.mqtt_port,
        trust: Arc::new(TrustStore::load(trust).expect("trust")),
        target: TARGET.into(),
        tags: vec![tag.into()],
        heartbeat: Duration::from_secs(5),
        keep_payload: false,
        initial: None,
    };
    sim::spawn(id, cfg, sim::always(sim::Behavior::Commit)).expect("sim")
}

/// The real cls model (scripts/fetch-models; scripts/test runs it first).
fn cls_model() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/ch_ppocr_mobile_v2.0_cls_infer.onnx");
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-models",
        p.display()
    );
    p
}

/// `edgefleet worker ARGS` against the server with the contract's test trainer.
fn worker(server: &Server, dir: &Path, name: &str) -> Command {
    let mut c = Command::new(EXE);
    c.args([
        "worker", "--once", "--poll", "200ms", "--device", "cpu", "--name", name,
    ])
    .arg("--command")
    .arg("python3")
    .arg("--arg")
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train_contract.py"))
    .arg("--target")
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../targets/{TARGET}.toml")))
    .args(["--input", "x=1,3,48,192"])
    .arg("--key")
    .arg(dir.join("release.pem"))
    .arg("--work-dir")
    .arg(dir.join(format!("work-{name}")))
    .env("EDGEFLEET_SERVER", &server.api)
    .env("EDGEFLEET_TOKEN", TOKEN)
    .env("NO_COLOR", "1");
    c
}

/// `jobs create` for group `wline` with the gate numbers of `gate`
/// (candidate_new, current_new, candidate_previous, current_previous) and
/// extra `--param`s; returns the job id.
fn create_job(server: &Server, gate: [f64; 4], extra: &[&str]) -> String {
    create_job_leased(server, gate, 5, extra)
}

/// [`create_job`] with a lease of `lease_s` seconds.
fn create_job_leased(server: &Server, gate: [f64; 4], lease_s: u64, extra: &[&str]) -> String {
    let model = cls_model();
    let lease = lease_s.to_string();
    let mut args: Vec<String> = [
        "jobs",
        "create",
        "--group",
        "wline",
        "--model",
        MODEL,
        "--lease-s",
        &lease,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let names = [
        "candidate_new",
        "current_new",
        "candidate_previous",
        "current_previous",
    ];
    for (n, v) in names.iter().zip(gate) {
        args.extend(["--param".into(), format!("{n}={v}")]);
    }
    args.extend([
        "--param".into(),
        format!("source_onnx=\"{}\"", model.display()),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let v: Value = serde_json::from_str(&ok(&cli(server, &argv))).expect("JSON");
    assert_eq!(v["created"], true, "{v}");
    v["job"]["id"].as_str().expect("id").to_string()
}

fn job_json(server: &Server, id: &str) -> Value {
    serde_json::from_str::<Value>(&ok(&cli(server, &["jobs", "show", id]))).expect("JSON")["job"]
        .clone()
}

fn wait_job(server: &Server, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let j = job_json(server, id);
        if pred(&j) {
            return j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "job {id} never matched: {j}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The states a job went through.
fn path(j: &Value) -> Vec<String> {
    j["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["to"].as_str().map(str::to_string))
        .collect()
}

fn bundle_count(server: &Server) -> usize {
    serde_json::from_str::<Value>(&ok(&cli(server, &["bundles", "list", "--json"]))).expect("JSON")
        ["bundles"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Issue #13: `jobs create|list|show|cancel` and `edgefleet worker` running an
/// operator's own training command (a Python script) under the documented
/// contract: a passing candidate is compiled, signed, uploaded with the next
/// release counter and goes to canary; a candidate that regresses on the
/// previous test set is rejected with the numbers and uploads nothing; a
/// worker killed with SIGKILL mid-training loses its lease and a second
/// worker finishes the job (attempt 2).
#[test]
fn jobs_and_worker_training_command_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = SigningKey::generate();
    let trust = dir.path().join("release.pub.pem");
    key.write_pem_files(&dir.path().join("release.pem"), &trust)
        .expect("keys");
    let server = start_server(dir.path(), &trust);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let dev = sim_device(&server, &trust, "cam-w", "jobcli");
    until(&server, &["devices", "list", "--json"], |o| {
        o.contains("cam-w")
    });
    ok(&cli(
        &server,
        &["devices", "group", "cam-w", "--add", "wline"],
    ));
    ok(&cli(&server, &["capture", "enable", "--group", "wline"]));
    let cid = upload_capture(&rt, &dev, 40);

    // A passing candidate: trained by the script, compiled, uploaded, canary.
    let id = create_job(&server, [0.9, 0.7, 0.9, 0.9], &[]);
    let table = until(&server, &["jobs", "list"], |o| o.contains("training"));
    assert_aligned(&table);
    assert_eq!(
        cells(table.lines().next().expect("header")),
        ["id", "group", "model", "state", "attempts", "worker", "dataset", "updated"]
    );
    let before = bundle_count(&server);
    ok(&worker(&server, dir.path(), "w1").output().expect("worker"));
    // After the gate the server starts the canary; no device of the cohort
    // runs this model, so it ends there, saying so.
    let j = wait_job(&server, &id, |j| j["state"] == "rejected");
    assert_eq!(
        path(&j),
        ["collecting", "training", "compiling", "canary", "rejected"],
        "{j}"
    );
    assert!(
        j["error"]
            .as_str()
            .unwrap_or("")
            .contains("no device of the cohort"),
        "{j}"
    );
    assert_eq!(j["gate"]["passed"], true);
    assert_eq!(j["lineage"]["run"]["kind"], "custom");
    assert_eq!(j["lineage"]["run"]["dataset"], j["lineage"]["dataset"]);
    assert_eq!(j["lineage"]["bundles"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        j["lineage"]["compile_reports"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(bundle_count(&server), before + 1);
    let sha = j["lineage"]["bundles"][0].as_str().expect("sha");
    let all: Value =
        serde_json::from_str(&ok(&cli(&server, &["bundles", "list", "--json"]))).expect("JSON");
    let b = all["bundles"]
        .as_array()
        .and_then(|v| v.iter().find(|b| b["sha256"] == sha))
        .expect("the uploaded bundle");
    assert_eq!(b["model"], MODEL, "{b}");
    assert_eq!(b["release"], 1, "the first release of the model: {b}");
    let ds = j["lineage"]["dataset"].as_str().expect("dataset");
    let d: Value =
        serde_json::from_str(&ok(&cli(&server, &["datasets", "show", ds]))).expect("JSON");
    assert_eq!(d["dataset"]["batches"][0]["capture_id"], cid.as_str());
    assert!(
        err(&cli(&server, &["jobs", "cancel", &id])).contains("409"),
        "ended jobs stay ended"
    );

    // A candidate that loses 5 points on the previous test set: rejected with
    // the numbers, nothing uploaded.
    let id2 = create_job(&server, [0.9, 0.7, 0.85, 0.9], &[]);
    wait_job(&server, &id2, |j| j["state"] == "training");
    let before = bundle_count(&server);
    ok(&worker(&server, dir.path(), "w2").output().expect("worker"));
    let j = job_json(&server, &id2);
    assert_eq!(j["state"], "rejected", "{j}");
    let reason = j["gate"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("0.8500") && reason.contains("0.9000"),
        "{reason}"
    );
    assert_eq!(bundle_count(&server), before);

    // SIGKILL the worker mid-training: the lease runs out, a second worker
    // takes attempt 2 and finishes.
    let id3 = create_job(
        &server,
        [0.9, 0.7, 0.9, 0.9],
        &["--param", "sleep_first_attempt_s=30"],
    );
    wait_job(&server, &id3, |j| j["state"] == "training");
    let mut killed = worker(&server, dir.path(), "w-killed")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker");
    wait_job(&server, &id3, |j| j["lease"]["worker"] == "w-killed");
    std::thread::sleep(Duration::from_secs(1));
    killed.kill().expect("SIGKILL");
    let _ = killed.wait();
    wait_job(&server, &id3, |j| {
        j["lease"].is_null() && j["attempts"] == 1
    });
    ok(&worker(&server, dir.path(), "w3").output().expect("worker"));
    let j = wait_job(&server, &id3, |j| j["state"] == "rejected");
    assert!(path(&j).contains(&"canary".to_string()), "{j}");
    assert_eq!(j["attempts"], 2);
    assert!(
        j["history"]
            .to_string()
            .contains("lease of worker w-killed expired"),
        "{j}"
    );
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Issue #13: `kill -9` of the server while a worker trains. The job, its
/// lease and its attempt survive on disk; the worker keeps training while
/// its heartbeats fail, and reports to the restarted server, which accepts
/// the same lease: one attempt, the same end state as without the crash.
#[test]
fn server_killed_during_training_resumes_the_job() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = SigningKey::generate();
    let trust = dir.path().join("release.pub.pem");
    key.write_pem_files(&dir.path().join("release.pem"), &trust)
        .expect("keys");
    let ports = (free_port(), free_port());
    let server = start_server_on(dir.path(), &trust, ports, &[]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let dev = sim_device(&server, &trust, "cam-k", "jobkill");
    until(&server, &["devices", "list", "--json"], |o| {
        o.contains("cam-k")
    });
    ok(&cli(
        &server,
        &["devices", "group", "cam-k", "--add", "wline"],
    ));
    ok(&cli(&server, &["capture", "enable", "--group", "wline"]));
    upload_capture(&rt, &dev, 40);
    let id = create_job_leased(
        &server,
        [0.9, 0.7, 0.9, 0.9],
        30,
        &["--param", "sleep_first_attempt_s=8"],
    );
    wait_job(&server, &id, |j| j["state"] == "training");
    let mut w = worker(&server, dir.path(), "w-survivor")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.err")).expect("log"))
        .spawn()
        .expect("worker");
    let before = wait_job(&server, &id, |j| j["lease"]["worker"] == "w-survivor");
    drop(server); // SIGKILL, mid-training
    std::thread::sleep(Duration::from_secs(1));
    let server = start_server_on(dir.path(), &trust, ports, &[]);
    let after = job_json(&server, &id);
    // A heartbeat may renew the lease between the read and the kill: the
    // same lease (id, worker, device), its expiry never moved backwards.
    for field in ["id", "worker", "device"] {
        assert_eq!(
            after["lease"][field], before["lease"][field],
            "the lease survived the crash: {field}"
        );
    }
    let expiry = |j: &Value| j["lease"]["expires_ms"].as_u64().expect("expires_ms");
    assert!(
        expiry(&after) >= expiry(&before),
        "the lease's expiry went back: {} < {}",
        expiry(&after),
        expiry(&before)
    );
    assert_eq!(after["state"], "training");
    let st = w.wait().expect("worker");
    assert!(
        st.success(),
        "worker: {}",
        std::fs::read_to_string(dir.path().join("worker.err")).unwrap_or_default()
    );
    let j = wait_job(&server, &id, |j| j["state"] == "rejected");
    assert_eq!(j["attempts"], 1, "one attempt, not a retry: {j}");
    assert_eq!(
        path(&j),
        ["collecting", "training", "compiling", "canary", "rejected"],
        "{j}"
    );
    assert_eq!(j["lineage"]["bundles"].as_array().map(Vec::len), Some(1));
}

/// One telemetry record per device, of the release it runs: 100 requests,
/// 20 feedback labels of which `agreed(release, device index)` agree.
fn telemetry_round(
    rt: &tokio::runtime::Runtime,
    devs: &[sim::SimDevice],
    seq: u64,
    agreed: impl Fn(u64, usize) -> u64,
) {
    use edgefleet_protocol::capture::FeedbackSummary;
    use edgefleet_protocol::messages::TelemetryBatch;
    use edgefleet_protocol::telemetry::TelemetryRecord;
    use edgefleet_protocol::topics::UpKind;
    use edgefleet_protocol::Up;
    for (i, d) in devs.iter().enumerate() {
        let Some(active) = d.status().active else {
            continue;
        };
        let rel = active.release;
        let rec = TelemetryRecord {
            seq,
            ts_ms: seq * 1000,
            release: Some(active),
            interval_s: 5.0,
            requests: 100,
            errors: 1,
            rejected: 0,
            latency: Default::default(),
            queue_depth: 0,
            rss_bytes: 0,
            cpu_percent: 10.0,
            uptime_s: seq,
            outbox_dropped: 0,
            feedback: Some(FeedbackSummary {
                labelled: 20,
                agreed: agreed(rel, i),
                unknown_request: 0,
            }),
            shadow: None,
        };
        let b = Up::Telemetry(TelemetryBatch {
            device_id: d.id.clone(),
            records: vec![rec],
        });
        // A round sent while the server is down is lost to the sender
        // (QoS 1 on a dead connection): the rounds below only start once
        // every device is connected again.
        let _ = rt.block_on(d.publish(UpKind::Telemetry, &b));
    }
}

fn experiment_json(server: &Server, id: &str) -> Value {
    serde_json::from_str::<Value>(&ok(&cli(server, &["experiments", "show", id]))).expect("JSON")
        ["experiment"]
        .clone()
}

/// Records counted in both arms of an experiment.
fn experiment_records(e: &Value) -> u64 {
    (0..2)
        .map(|a| e["arms"][a]["records"].as_u64().unwrap_or(0))
        .sum()
}

/// Issue #13: `kill -9` of the server in the middle of an A/B experiment.
/// Its assignment, telemetry cursors, per-arm metrics and sequential test
/// are on disk: the restarted server shows the same numbers, counts no
/// record twice, and the experiment reaches the decision it would have
/// reached without the crash (the candidate agrees with 18 of 20 labels,
/// the control with 16: candidate_won).
#[test]
fn server_killed_during_an_experiment_reaches_the_same_decision() {
    const N: usize = 8;
    let dir = tempfile::tempdir().expect("tmp");
    let key = SigningKey::generate();
    let trust = dir.path().join("release.pub.pem");
    key.write_pem_files(&dir.path().join("release.pem"), &trust)
        .expect("keys");
    let ports = (free_port(), free_port());
    let server = start_server_on(dir.path(), &trust, ports, &[]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let devs: Vec<sim::SimDevice> = (0..N)
        .map(|i| sim_device(&server, &trust, &format!("xk-{i}"), "xkill"))
        .collect();
    until(&server, &["devices", "list", "--json"], |o| {
        (0..N).all(|i| o.contains(&format!("\"xk-{i}\"")))
    });
    for d in &devs {
        ok(&cli(
            &server,
            &["devices", "group", d.id.as_str(), "--add", "xline"],
        ));
    }
    let mut shas = Vec::new();
    for release in [1, 2] {
        let b = dir.path().join(format!("xk-{release}.efb"));
        std::fs::write(
            &b,
            testkit::bundle(Kind::Good, &key, MODEL, release, TARGET, release as f32),
        )
        .expect("bundle");
        ok(&cli(
            &server,
            &["bundles", "upload", b.to_str().expect("utf-8")],
        ));
        let v: Value =
            serde_json::from_str(&ok(&cli(&server, &["bundles", "list", "--json"]))).expect("JSON");
        let sha = v["bundles"]
            .as_array()
            .expect("bundles")
            .iter()
            .find(|b| b["release"] == release)
            .and_then(|b| b["sha256"].as_str())
            .expect("uploaded")
            .to_string();
        shas.push(sha);
    }
    ok(&cli(
        &server,
        &[
            "rollouts", "create", "--bundle", &shas[0], "--group", "xline",
        ],
    ));
    let active = |want: &dyn Fn(usize) -> u64| {
        let t = Instant::now();
        while !devs
            .iter()
            .enumerate()
            .all(|(i, d)| d.status().active.map(|a| a.release) == Some(want(i)))
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "releases not reached"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    active(&|_| 1);
    let v: Value = serde_json::from_str(&ok(&cli(
        &server,
        &[
            "experiments",
            "create",
            "--group",
            "xline",
            "--control",
            &shas[0],
            "--candidate",
            &shas[1],
            "--min-samples",
            "400",
        ],
    )))
    .expect("JSON");
    let id = v["experiment"]["id"].as_str().expect("id").to_string();
    let arm: Vec<u64> = devs
        .iter()
        .map(|d| {
            v["experiment"]["assignment"][d.id.as_str()]
                .as_u64()
                .expect("arm")
        })
        .collect();
    assert!(arm.contains(&0) && arm.contains(&1), "both arms: {arm:?}");
    active(&|i| arm[i] + 1);

    // Deterministic labels: release 2 agrees with 18 of 20, release 1 with
    // 16 (device 0 of each arm one fewer, so the arms are not constant).
    let agreed = |rel: u64, i: usize| if rel == 2 { 18 } else { 16 } - u64::from(i < 2);
    for seq in 1..=2 {
        telemetry_round(&rt, &devs, seq, agreed);
    }
    let t = Instant::now();
    let before = loop {
        let e = experiment_json(&server, &id);
        if experiment_records(&e) == 2 * N as u64 {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not counted: {e}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(before["state"], "running", "{before}");
    drop(server); // SIGKILL, mid-experiment
    std::thread::sleep(Duration::from_secs(1));
    let server = start_server_on(dir.path(), &trust, ports, &[]);
    let after = experiment_json(&server, &id);
    assert_eq!(after["arms"], before["arms"], "metrics survived the crash");
    assert_eq!(after["cursors"], before["cursors"]);
    assert_eq!(after["assignment"], before["assignment"]);
    assert_eq!(
        rt.block_on(sim::wait_connected(&devs, Duration::from_secs(30))),
        N,
        "devices reconnect"
    );
    let mut rounds = 2;
    let e = loop {
        rounds += 1;
        telemetry_round(&rt, &devs, rounds, agreed);
        std::thread::sleep(Duration::from_millis(200));
        let e = experiment_json(&server, &id);
        if e["state"] != "running" || rounds > 150 {
            break e;
        }
    };
    assert_eq!(e["state"], "candidate_won", "{e}");
    let records = experiment_records(&e);
    assert!(records <= N as u64 * rounds, "a record counted twice: {e}");
    assert!(records > 2 * N as u64, "{records}: {e}");
}

/// Publishes `field`'s samples `range` as one labelled capture batch of `dev`
/// (model [`MODEL`]; inputs f32 [1, 3, 48, 192]), in protocol-sized chunks,
/// and waits until the server has stored it.
fn upload_labelled_capture(
    rt: &tokio::runtime::Runtime,
    dev: &sim::SimDevice,
    field: &edgefleet_trainer::dataset::Examples,
    range: std::ops::Range<usize>,
) {
    use edgefleet_agent::capture::{encode_batch, CaptureBatch, CapturedSample, BATCH_FORMAT};
    use edgefleet_bundle::payload::Tensor;
    use edgefleet_protocol::capture::{CaptureChunk, CaptureReason, MAX_CAPTURE_CHUNK_BYTES};
    let y = field.y.as_ref().expect("labels");
    let samples: Vec<CapturedSample> = range
        .clone()
        .map(|i| CapturedSample {
            request_id: Some(format!("rq-{i}")),
            ts_ms: 1000 + i as u64,
            inputs: vec![Tensor::f32(
                "x",
                vec![1, 3, 48, 192],
                field.sample(i).to_vec(),
            )],
            outputs: vec![],
            label: Some(y[i] as u64),
        })
        .collect();
    let batch = CaptureBatch {
        format: BATCH_FORMAT,
        device_id: dev.id.clone(),
        release: release(),
        reason: CaptureReason::DriftAlarm { drift_seq: 1 },
        samples,
    };
    let bytes = encode_batch(&batch).expect("encode");
    let cid = edgefleet_bundle::sha256(&bytes).to_hex();
    let parts: Vec<&[u8]> = bytes.chunks(MAX_CAPTURE_CHUNK_BYTES).collect();
    for (k, part) in parts.iter().enumerate() {
        let chunk = CaptureChunk {
            device_id: dev.id.clone(),
            capture_id: cid.clone(),
            index: k as u32,
            total: parts.len() as u32,
            meta: (k == 0).then(|| batch.meta(bytes.len() as u64)),
            data: part.to_vec(),
        };
        rt.block_on(dev.publish(
            edgefleet_protocol::topics::UpKind::Capture,
            &edgefleet_protocol::Up::CaptureChunk(chunk),
        ))
        .expect("publish");
    }
    let t = Instant::now();
    while !dev
        .status()
        .capture_acks
        .iter()
        .any(|a| a.capture_id == cid && a.complete)
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "capture {range:?} not stored"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue #13: the worker's built-in trainer (`--base-run`). A text-direction
/// student trained by `edgefleet train` is the release; the field sends
/// labelled captures of darker, grainy lines; the worker decodes
/// them, fine-tunes the base with replay, measures the gate itself, and the
/// job carries a `finetune` run record with the base, the field data, the
/// replay and the gate numbers. The server's verdict must agree with the
/// numbers; a pass must reach canary with a bundle, a failure be rejected.
#[test]
fn builtin_worker_finetunes_on_labelled_captures() {
    let dir = tempfile::tempdir().expect("tmp");
    let cwd = dir.path();
    let run = |args: &[&str]| {
        let o = Command::new(EXE)
            .args(args)
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            .output()
            .expect("run");
        ok(&o)
    };
    run(&[
        "datasets",
        "synth",
        "--task",
        "text-direction",
        "--samples",
        "240",
        "--seed",
        "5",
        "--validation",
        "0.2",
        "--test",
        "0.2",
        "--out",
        "data/text",
    ]);
    run(&[
        "train",
        "--data",
        "data/text",
        "--out",
        "runs/base",
        "--size",
        "student",
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--quiet",
        "--batch-size",
        "16",
    ]);
    let key = SigningKey::generate();
    let trust = cwd.join("release.pub.pem");
    key.write_pem_files(&cwd.join("release.pem"), &trust)
        .expect("keys");
    let server = start_server(cwd, &trust);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let dev = sim_device(&server, &trust, "cam-ft", "ftune");
    until(&server, &["devices", "list", "--json"], |o| {
        o.contains("cam-ft")
    });
    ok(&cli(
        &server,
        &["devices", "group", "cam-ft", "--add", "wline"],
    ));
    ok(&cli(&server, &["capture", "enable", "--group", "wline"]));
    // Field data: lines of another seed, darker and grainy (as the demo's
    // shift), labelled.
    let mut field = edgefleet_trainer::synth::text::generate(100, 77, 0);
    let mut h = 0x9e37_79b9_u32;
    field.x.iter_mut().for_each(|v| {
        h ^= h << 13;
        h ^= h >> 17;
        h ^= h << 5;
        *v = 0.5 * *v - 0.4 + (h as f32 / u32::MAX as f32 - 0.5) * 0.6;
    });
    for k in 0..5 {
        upload_labelled_capture(&rt, &dev, &field, k * 20..(k + 1) * 20);
    }
    let v: Value = serde_json::from_str(&ok(&cli(
        &server,
        &[
            "jobs",
            "create",
            "--group",
            "wline",
            "--model",
            MODEL,
            "--lease-s",
            "60",
            "--param",
            "epochs=8",
        ],
    )))
    .expect("JSON");
    let id = v["job"]["id"].as_str().expect("id").to_string();
    wait_job(&server, &id, |j| j["state"] == "training");
    let o = Command::new(EXE)
        .args([
            "worker",
            "--once",
            "--poll",
            "200ms",
            "--device",
            "cpu",
            "--name",
            "w-ft",
            "--base-run",
            "runs/base",
            "--key",
            "release.pem",
            "--work-dir",
            "work",
        ])
        .arg("--target")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../targets/{TARGET}.toml")))
        .current_dir(cwd)
        .env("EDGEFLEET_SERVER", &server.api)
        .env("EDGEFLEET_TOKEN", TOKEN)
        .output()
        .expect("worker");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "worker: {log}");
    assert!(
        log.contains("runs/base on 100 labelled field samples"),
        "{log}"
    );
    let j = wait_job(&server, &id, |j| {
        ["canary", "rejected", "experiment", "failed"].contains(&j["state"].as_str().unwrap_or(""))
    });
    let gate = &j["gate"];
    let n = &gate["numbers"];
    eprintln!("built-in fine-tune gate: {n}");
    assert_eq!(n["metric"], "accuracy");
    assert_eq!(n["new_samples"], 20, "20% of 100 field samples held out");
    let run = &j["lineage"]["run"];
    assert_eq!(run["kind"], "finetune", "{run}");
    assert_eq!(run["finetune"]["new_train"], 60);
    assert_eq!(run["finetune"]["replayed"], 60, "replay 0.5");
    assert_eq!(run["finetune"]["new_dataset"], j["lineage"]["dataset"]);
    let (cn, cu) = (
        n["candidate_new"].as_f64().expect("number"),
        n["current_new"].as_f64().expect("number"),
    );
    let (cp, up) = (
        n["candidate_previous"].as_f64().expect("number"),
        n["current_previous"].as_f64().expect("number"),
    );
    let passes = cn - cu >= 0.0 && up - cp <= 0.01;
    assert_eq!(gate["passed"], passes, "{gate}");
    if passes {
        assert_eq!(j["state"], "canary", "{j}");
        assert_eq!(j["lineage"]["bundles"].as_array().map(Vec::len), Some(1));
    } else {
        assert_eq!(j["state"], "rejected", "{j}");
    }
    // Whether it helps is the trainer's test (trainer/tests/finetune.rs);
    // this small student (0.825 on its 40 test lines) fine-tuned on 60 field
    // lines does not, and the gate rejects it with the numbers.
    assert!(cn.is_finite() && cu.is_finite(), "{n}");
}
