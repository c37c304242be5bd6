//! Flaky links (issue 18, point 8): the agent runs in its own network
//! namespace, joined to the broker by a veth pair whose host end is
//! rate-limited (tc tbf) and taken down and up at random for 45 s while a
//! 40-chunk update downloads and telemetry flows. netem (packet loss, delay) is used
//! as well where the kernel has it (`sch_netem`; this machine's does not,
//! and the test says which it used).
//!
//! The device must commit the update (during the storm or within minutes
//! after the link holds again), keep serving, and deliver every telemetry record it produced
//! (store-and-forward: no sequence number missing at the server).
//!
//! Needs root and iproute2 (`ip`, `tc`); CI has both. One device per test
//! binary sends telemetry to this server, so every record counted is its.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use edgefleet_protocol::messages::EventKind;
use rand::Rng;

const X: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

/// Runs `ip`/`tc` with `args`; `Err` carries its stderr.
fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with a veth link to the host, removed on drop.
struct Link {
    ns: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
    /// Impairments applied, in words.
    impairments: Vec<String>,
}

impl Link {
    fn new() -> Result<Link, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = (std::process::id() % 200) * 8 + N.fetch_add(1, Ordering::Relaxed) % 8;
        let (a, b) = (id / 250, id % 250);
        let l = Link {
            ns: format!("efns{id}"),
            host_if: format!("efh{id}"),
            host_ip: format!("10.{}.{b}.1", 200 + a),
            ns_ip: format!("10.{}.{b}.2", 200 + a),
            impairments: Vec::new(),
        };
        let ns_if = format!("efn{id}");
        sh("ip", &["netns", "add", &l.ns])?;
        sh(
            "ip",
            &[
                "link", "add", &l.host_if, "type", "veth", "peer", "name", &ns_if,
            ],
        )?;
        sh("ip", &["link", "set", &ns_if, "netns", &l.ns])?;
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", l.host_ip),
                "dev",
                &l.host_if,
            ],
        )?;
        sh("ip", &["link", "set", &l.host_if, "up"])?;
        let ns = ["netns", "exec", l.ns.as_str(), "ip"];
        let in_ns = |args: &[&str]| sh("ip", &[&ns[..], args].concat());
        in_ns(&["addr", "add", &format!("{}/30", l.ns_ip), "dev", &ns_if])?;
        in_ns(&["link", "set", &ns_if, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(l)
    }

    /// Loss and delay with netem where the kernel has it, else a rate limit
    /// (tbf) whose queue adds delay; both directions leave through the host
    /// end, so the agent's uplink is shaped by the same qdisc on its side.
    fn impair(&mut self) {
        let netem = ["loss", "3%", "delay", "40ms", "20ms"];
        let tbf = ["rate", "256kbit", "burst", "16kb", "latency", "300ms"];
        let root = |dev: &str, kind: &str, args: &[&str]| -> Vec<String> {
            ["qdisc", "add", "dev", dev, "root", kind]
                .iter()
                .chain(args)
                .map(|s| s.to_string())
                .collect()
        };
        let host = root(&self.host_if, "netem", &netem);
        let host: Vec<&str> = host.iter().map(String::as_str).collect();
        if sh("tc", &host).is_ok() {
            self.impairments.push(format!("netem {}", netem.join(" ")));
            return;
        }
        let t = root(&self.host_if, "tbf", &tbf);
        let t: Vec<&str> = t.iter().map(String::as_str).collect();
        sh("tc", &t).unwrap();
        self.impairments.push(format!(
            "tbf {} (no sch_netem in this kernel)",
            tbf.join(" ")
        ));
    }

    fn set_up(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let _ = sh("ip", &["link", "set", &self.host_if, state]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "del", &self.host_if]);
        let _ = sh("ip", &["netns", "del", &self.ns]);
    }
}

/// How long the link flaps: a storm, after which it holds (a link that is
/// down half the time forever is a dead link, not a flaky one).
const STORM: Duration = Duration::from_secs(45);

/// Takes the link down for 0.3-3 s every 1-3 s for [`STORM`] or until
/// `stop`; returns the number of outages.
fn flap(link: &Link, stop: &AtomicBool) -> u32 {
    let mut rng = rand::thread_rng();
    let mut outages = 0;
    let t = Instant::now();
    while !stop.load(Ordering::Relaxed) && t.elapsed() < STORM {
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..3000)));
        link.set_up(false);
        outages += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..3000)));
        link.set_up(true);
    }
    outages
}

/// One HTTP/1.1 request to the agent's API over its unix socket (the TCP
/// listener is loopback-only, inside the namespace): status and body.
fn uds(sock: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {out:?}"))?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

fn infer_body() -> String {
    serde_json::json!({"inputs": [edgefleet_bundle::payload::Tensor::f32("x", vec![1, 4], X.to_vec())]})
        .to_string()
}

/// The release serving and its outputs, through the unix socket.
fn infer(sock: &Path) -> Result<(u64, Vec<f32>), String> {
    let (status, body) = uds(sock, "POST", "/v1/infer", &infer_body())?;
    if status != 200 {
        return Err(format!("status {status}: {body}"));
    }
    let v: edgefleet_agent::api::InferResponse =
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    match &v.outputs[0].data {
        edgefleet_bundle::payload::TensorData::F32(d) => Ok((v.release.release, d.clone())),
        other => Err(format!("{} output", other.dtype())),
    }
}

/// The agent's outbox gauges from `/metrics`: (records waiting, records
/// dropped so far).
fn outbox(sock: &Path) -> (Option<u64>, Option<u64>) {
    use edgefleet_protocol::telemetry::names;
    let text = uds(sock, "GET", "/metrics", "").map_or(String::new(), |r| r.1);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map(|v| v as u64)
    };
    (
        value(names::OUTBOX_RECORDS),
        value(names::OUTBOX_DROPPED_TOTAL),
    )
}

#[test]
fn update_and_telemetry_survive_a_flapping_shaped_link() {
    let mut link = Link::new().unwrap_or_else(|e| {
        panic!("flaky-link trials need root and iproute2 (network namespaces): {e}")
    });
    link.impair();
    let port = start_rumqttd_at("0.0.0.0");
    let server = Server::start(port);
    let mut a = Agent::new("flaky", port, "telemetry_interval_s = 1");
    let text = std::fs::read_to_string(&a.config).unwrap();
    let text = text
        .replace(
            &format!("mqtt://127.0.0.1:{port}"),
            &format!("mqtt://{}:{port}", link.host_ip),
        )
        .replace("telemetry_interval_s = 5\n", "");
    std::fs::write(&a.config, text).unwrap();
    let sock = a.path().join("agent.sock");
    let seen = server.hellos_from(&a.id);
    a.spawn_under(&["ip", "netns", "exec", &link.ns]);
    let t = Instant::now();
    while infer(&sock).map(|r| r.0) != Ok(1) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "release 1 never served\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.wait_hello(&a.id, seen, Duration::from_secs(60));

    let (bundle, chunks) = chunked_bundle(&a.key, 2, 160);
    let stop = AtomicBool::new(false);
    let stop_traffic = AtomicBool::new(false);
    let started = Instant::now();
    let (event, outages) = std::thread::scope(|s| {
        let flapper = s.spawn(|| flap(&link, &stop));
        let traffic = s.spawn(|| {
            while !stop_traffic.load(Ordering::Relaxed) {
                let _ = infer(&sock);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // Offers are lost while the link is down: repeat them (idempotent).
        let event = (0..24).find_map(|_| {
            server.offer(&a.id, &bundle, &a.key, trial(1, 0));
            server.try_wait_event(
                &a.id,
                2,
                &[
                    EventKind::Committed,
                    EventKind::RolledBack,
                    EventKind::Failed,
                ],
                Duration::from_secs(10),
            )
        });
        stop_traffic.store(true, Ordering::Relaxed);
        traffic.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        (event, flapper.join().unwrap())
    });
    link.set_up(true);
    let took = started.elapsed();
    let event = event.unwrap_or_else(|| panic!("no outcome for release 2\n{}", a.log()));
    assert_eq!(event.kind, EventKind::Committed, "{event:?}\n{}", a.log());
    let served = *server.chunks_served.lock().unwrap();
    eprintln!(
        "{}: committed a {chunks}-chunk update in {took:.1?} through {outages} outages; \
         {served} chunks sent",
        link.impairments.join(", ")
    );
    assert!(outages >= 1, "the link never went down");

    // Every record produced reaches the server once the link holds: the
    // outbox drains (every record acknowledged), none was dropped, and the
    // server holds every sequence number from 1.
    let t = Instant::now();
    let gaps = loop {
        let (waiting, dropped) = outbox(&sock);
        let seqs: BTreeSet<u64> = server
            .telemetry
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        let (lo, hi) = (
            seqs.first().copied().unwrap_or(0),
            seqs.last().copied().unwrap_or(0),
        );
        let missing: Vec<u64> = (lo..=hi).filter(|s| !seqs.contains(s)).collect();
        if waiting == Some(0) && lo == 1 && hi >= 5 && missing.is_empty() {
            eprintln!("telemetry: records {lo}..={hi}, none missing, outbox empty");
            assert_eq!(dropped, Some(0), "the outbox dropped records");
            break None;
        }
        if t.elapsed() > Duration::from_secs(60) {
            break Some((seqs.len(), lo, missing, waiting));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(gaps.is_none(), "telemetry lost: {gaps:?}\n{}", a.log());
    let (rel, y) = infer(&sock).unwrap();
    assert_eq!((rel, y), (2, X.map(|x| 2.0 * x).to_vec()));
}
