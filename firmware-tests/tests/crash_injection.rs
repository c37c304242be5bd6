//! The crash-injection table. The agent runs as `fw-agent`, this package's
//! build of the agent's own `main.rs` (cargo defines `CARGO_BIN_EXE_<name>`
//! only for a package's own binaries).
//!
//! For every update state the agent runs with `EDGEFLEET_FAULT_PAUSE_IN=<state>`,
//! which makes it sleep right after persisting that state and before its side
//! effects; the test SIGKILLs it there (`kill -9`, not a flag), restarts it
//! without the hook, and asserts that it serves a verified model, reaches the
//! expected outcome and ends Idle with no download left behind.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_protocol::messages::EventKind;

const T: Duration = Duration::from_secs(60);

struct Row {
    state: &'static str,
    bundle: Kind,
    outcome: EventKind,
    serving: u64,
}

#[test]
fn sigkill_in_every_update_state() {
    let table = [
        Row {
            state: "downloading",
            bundle: Kind::Good,
            outcome: EventKind::Committed,
            serving: 2,
        },
        Row {
            state: "verifying",
            bundle: Kind::Good,
            outcome: EventKind::Committed,
            serving: 2,
        },
        Row {
            state: "staging",
            bundle: Kind::Good,
            outcome: EventKind::Committed,
            serving: 2,
        },
        Row {
            state: "trial",
            bundle: Kind::Good,
            outcome: EventKind::Committed,
            serving: 2,
        },
        Row {
            state: "committed",
            bundle: Kind::Good,
            outcome: EventKind::Committed,
            serving: 2,
        },
        Row {
            state: "rolled_back",
            bundle: Kind::GoldenMismatch,
            outcome: EventKind::RolledBack,
            serving: 1,
        },
        Row {
            state: "idle",
            bundle: Kind::Good,
            outcome: EventKind::Committed,
            serving: 2,
        },
    ];
    let port = start_rumqttd();
    let server = Server::start(port);
    for row in table {
        let t0 = Instant::now();
        let mut a = Agent::new(&format!("kill-{}", row.state), port, "");
        a.extra_env
            .push(("EDGEFLEET_FAULT_PAUSE_IN".into(), row.state.into()));
        a.spawn();
        a.wait_healthy(T);
        let traffic = Traffic::start(a.http, [1.0, 2.0, 3.0, 4.0]);
        let b = testkit::bundle(row.bundle, &a.key, MODEL, 2, TARGET, 2.0);
        server.offer(&a.id, &b, &a.key, trial(1, 5));
        let t = Instant::now();
        while !a.log().contains(&format!("state=\"{}\"", row.state))
            || !a.log().contains("pausing 60 s")
        {
            assert!(
                t.elapsed() < T,
                "{}: never paused; log:\n{}",
                row.state,
                a.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a.sigkill();
        a.extra_env.clear();
        a.spawn();
        a.wait_healthy(T);
        let e = server.wait_event(
            &a.id,
            2,
            &[
                EventKind::Committed,
                EventKind::RolledBack,
                EventKind::Failed,
            ],
            T,
        );
        assert_eq!(e.kind, row.outcome, "{}: {e:?}\n{}", row.state, a.log());
        drop(traffic);
        // Consistent end state: Idle, the expected verified release serving, no partial download.
        let t = Instant::now();
        while a.update_state() != "idle" {
            assert!(
                t.elapsed() < T,
                "{}: not idle: {}",
                row.state,
                a.update_state()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (rel, y) = a.infer([1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(rel, row.serving, "{}", row.state);
        let k = if rel == 2 { 2.0 } else { 1.0 };
        assert_eq!(y, vec![k, 2.0 * k, 3.0 * k, 4.0 * k], "{}", row.state);
        assert_eq!(
            a.model()["release"]["release"],
            row.serving,
            "{}",
            row.state
        );
        assert!(
            !a.path().join("data/download/body.part").exists(),
            "{}: partial download left",
            row.state
        );
        eprintln!(
            "{:<12} killed, restarted -> {:?}, serving release {rel} ({:.1} s)",
            row.state,
            e.kind,
            t0.elapsed().as_secs_f64()
        );
    }
}

/// A multi-chunk download killed half-way (SIGKILL after the link died)
/// resumes from the persisted chunk bitmap: after the restart the agent asks
/// only for the chunks it lacks, then verifies and commits.
#[test]
fn sigkill_mid_download_resumes_missing_chunks_only() {
    use std::sync::atomic::Ordering;
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("kill-mid-download", port, "");
    a.spawn();
    a.wait_healthy(T);
    // ~160 KiB of incompressible payload in 4 KiB chunks: ~40 chunks.
    let (b, chunks) = chunked_bundle(&a.key, 2, 160);
    assert!(chunks >= 30, "{chunks} chunks");
    let half = chunks / 2;
    server.chunk_budget.store(half, Ordering::SeqCst);
    let _traffic = Traffic::start(a.http, [1.0, 2.0, 3.0, 4.0]);
    server.offer(&a.id, &b, &a.key, trial(1, 5));
    let t = Instant::now();
    while *server.chunks_served.lock().unwrap() < half {
        assert!(t.elapsed() < T, "chunks never requested\n{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the agent write and fsync what arrived, then pull the plug.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(a.update_state(), "downloading");
    a.sigkill();
    server.chunk_budget.store(u64::MAX, Ordering::SeqCst);
    a.spawn();
    a.wait_healthy(T);
    let e = server
        .try_wait_event(
            &a.id,
            2,
            &[
                EventKind::Committed,
                EventKind::RolledBack,
                EventKind::Failed,
            ],
            T,
        )
        .unwrap_or_else(|| {
            panic!(
                "no outcome for release 2 after the restart ({} chunks served)\n{}",
                server.chunks_served.lock().unwrap(),
                a.log()
            )
        });
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    let served = *server.chunks_served.lock().unwrap();
    // Every chunk once, plus at most a request window of re-sends.
    assert!(
        served < chunks + half / 2,
        "{served} chunks served for a {chunks}-chunk bundle: the download restarted from scratch"
    );
    assert_eq!(a.infer([1.0, 2.0, 3.0, 4.0]).unwrap().0, 2);
    eprintln!("{chunks} chunks, {half} before the kill, {served} served in all");
}

#[test]
fn corrupt_store_is_quarantined_and_last_good_model_serves() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("corrupt", port, "");
    a.spawn();
    a.wait_healthy(T);
    let _traffic = Traffic::start(a.http, [1.0; 4]);
    let b = testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 2.0);
    server.offer(&a.id, &b, &a.key, trial(1, 5));
    assert_eq!(
        server
            .wait_event(&a.id, 2, &[EventKind::Committed, EventKind::RolledBack], T)
            .kind,
        EventKind::Committed
    );
    a.sigkill();
    for e in std::fs::read_dir(a.path().join("data/store")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::write(&p, vec![0x5Au8; 8192]).unwrap();
        }
    }
    a.spawn();
    a.wait_healthy(T);
    assert_eq!(a.infer([1.0; 4]).unwrap(), (2, vec![2.0; 4]));
    let quarantined = std::fs::read_dir(a.path().join("data")).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("quarantine-")
    });
    assert!(quarantined, "{}", a.log());
    // The recovered floor still refuses a replay of release 1 (an offer of
    // release 2, active, is answered committed: already active).
    let b1 = testkit::bundle(Kind::Good, &a.key, MODEL, 1, TARGET, 1.0);
    server.offer(&a.id, &b1, &a.key, trial(1, 5));
    let e = server.wait_event(&a.id, 1, &[EventKind::Rejected], T);
    assert_eq!(e.reason.as_deref(), Some("downgrade"));
}
