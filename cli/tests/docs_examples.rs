//! docs/agent.md's example `agent.toml` is a config the agent accepts and
//! starts with (issue #20), and its local API example request is answered.
//! The example's absolute paths (`/var/lib/edgefleet`) move to a temporary
//! directory, its API port becomes 0 (any free port); nothing else changes.
//!
//! ```sh
//! cargo test -p edgefleet --test docs_examples
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_agent::config::Config;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_bundle::SigningKey;

const EXE: &str = env!("CARGO_BIN_EXE_edgefleet");

fn agent_md() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/agent.md");
    std::fs::read_to_string(&p).expect("docs/agent.md")
}

/// The first fenced block of `lang` after `heading`.
fn block(doc: &str, heading: &str, lang: &str) -> String {
    let rest = doc.split(heading).nth(1).expect("heading");
    let start = rest.find(&format!("```{lang}\n")).expect("block") + lang.len() + 4;
    let body = &rest[start..];
    body[..body.find("```").expect("end")].to_string()
}

/// The example config with its paths in `dir`; also writes the files it names.
fn example_in(dir: &Path) -> (String, PathBuf) {
    let text = block(&agent_md(), "## Config", "toml")
        .replace("/var/lib/edgefleet", &dir.join("var").display().to_string())
        .replace("127.0.0.1:7070", "127.0.0.1:0");
    let key = SigningKey::generate();
    key.write_pem_files(&dir.join("release.pem"), &dir.join("release.pub.pem"))
        .expect("keys");
    std::fs::write(
        dir.join("factory.efb"),
        testkit::bundle(Kind::Good, &key, "factory", 1, "rpi4", 1.0),
    )
    .expect("bundle");
    std::fs::create_dir_all(dir.join("replay")).expect("replay dir");
    let case: Vec<u8> = [1.0f32, -1.0, 0.5, 0.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    std::fs::write(dir.join("replay/case0.f32"), case).expect("case");
    std::fs::write(dir.join("replay/case0.json"), r#"{"shape": [1, 4]}"#).expect("shape");
    let path = dir.join("agent.toml");
    std::fs::write(&path, &text).expect("config");
    (text, path)
}

#[test]
fn the_docs_example_config_parses_and_names_the_embedded_broker() {
    let dir = tempfile::tempdir().expect("tmp");
    let (text, path) = example_in(dir.path());
    let c = Config::parse(&text, &path).unwrap_or_else(|e| panic!("docs example: {e}"));
    // `edgefleet serve`'s embedded broker: 127.0.0.1, --mqtt-port default 1884.
    assert_eq!(
        c.broker.host_port().expect("url"),
        ("127.0.0.1".into(), 1884)
    );
    assert_eq!(c.broker.username.as_deref(), Some("press-07"));
    assert_eq!(
        c.api.unix_socket,
        Some(dir.path().join("var/agent.sock")),
        "the socket lies in data_dir, which the agent creates"
    );
    assert_eq!(c.data_dir, dir.path().join("var"));
}

#[test]
fn the_agent_starts_with_the_docs_example_and_answers_its_curl_request() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_, path) = example_in(dir.path());
    let log = dir.path().join("agent.log");
    let mut child = Command::new(EXE)
        .arg("agent")
        .arg("--config")
        .arg(&path)
        .env("NO_COLOR", "1")
        .env_remove("EDGEFLEET_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start agent");
    let t = Instant::now();
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the agent exited ({st}) with the docs' example config:\n{text}");
        }
        let addr = text
            .lines()
            .find(|l| l.contains("local API listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .map(str::to_string);
        if let Some(a) = addr.filter(|_| text.contains("initial bundle installed")) {
            break a;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "agent did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(dir.path().join("var/agent.sock").exists(), "no unix socket");
    // The docs' JSON curl example, as written.
    let local = block(&agent_md(), "## Local API", "sh");
    let body = local
        .split("-d '")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .expect("curl -d body in docs");
    let http = reqwest::blocking::Client::new();
    let t = Instant::now();
    let v: serde_json::Value = loop {
        let r = http
            .post(format!("http://{addr}/v1/infer"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("infer");
        if r.status().is_success() {
            break r.json().expect("JSON reply");
        }
        // The initial bundle's self-test may still be running.
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "infer: {}",
            r.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(v["release"]["model"], "factory");
    assert_eq!(v["outputs"][0]["name"], "y");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 4]));
    assert_eq!(v["outputs"][0]["dtype"], "f32");
    // y = 1.0 * x: the same bytes back.
    assert_eq!(v["outputs"][0]["data_b64"], "AACAPwAAgL8AAAA/AAAAAA==");
}
