//! Power-cut trials (issue 18, point 8): a real agent process installs its
//! first release, takes release 3 through download (128 chunks),
//! verification, staging, trial and commit, fails the self-test of release
//! 4, commits release 5 the same way as 3 and refuses release 2 as a
//! downgrade, all on a recording FUSE filesystem. Then, for every cut point
//! of the write log and every assumption about unsynced writes
//! (`Unsynced`), an agent starts on the directory a power cut there leaves.
//! It must serve a verified model (right outputs), never one older than the
//! last release whose commit the server had received.
//!
//! Needs root and `/dev/fuse` (the CI machine has both); where FUSE cannot
//! mount, the test says so and fails rather than passing vacuously.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_firmware_tests::powercut::model::{Image, Unsynced};
use edgefleet_firmware_tests::powercut::recorder::Recorder;
use edgefleet_firmware_tests::powercut::replay::{digest, each_cut, materialise};
use edgefleet_firmware_tests::powercut::Op;
use edgefleet_protocol::messages::EventKind;

const T: Duration = Duration::from_secs(60);
const X: [f32; 4] = [1.0, 2.0, 3.0, 4.0];
/// The good releases of the recording; 2 and 4 are bad offers.
const GOOD: [u64; 3] = [1, 3, 5];
/// Incompressible payload of each update (KiB, 4 KiB chunks): 128 chunks.
const NOISE_KIB: usize = 512;

/// Cut points (operation counts) at which the server heard something the
/// device may never take back, and the agent's update state over time.
#[derive(Debug, Default)]
struct Marks {
    /// The agent answered an inference with release 1.
    first_served: usize,
    /// (cut point, release) for every `committed` the server received.
    committed: Vec<(usize, u64)>,
    /// (cut point, update state) at every change seen by polling.
    states: Vec<(usize, String)>,
}

impl Marks {
    /// The update state the agent was in at cut point `k`.
    fn state_at(&self, k: usize) -> &str {
        self.states
            .iter()
            .rev()
            .find(|(at, _)| *at <= k)
            .map_or("starting", |(_, s)| s.as_str())
    }

    /// The releases a device cut at `k` may serve: a good release (1, 3,
    /// 5) no older than the last one whose commit the server had received
    /// (an acknowledged commit is never taken back); release 2 (refused) and
    /// 4 (failed its self-test) never serve.
    fn allowed(&self, k: usize) -> Vec<u64> {
        let floor = self
            .committed
            .iter()
            .filter(|(at, _)| *at <= k)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(1);
        GOOD.into_iter().filter(|r| *r >= floor).collect()
    }
}

/// [`offer_until_answered`], or a panic with the agent's log.
fn answered(
    server: &Server,
    a: &Agent,
    bundle: &[u8],
    release: u64,
    kinds: &[EventKind],
) -> edgefleet_protocol::messages::UpdateEvent {
    offer_until_answered(server, a, bundle, release, kinds)
        .unwrap_or_else(|| panic!("no answer to the offer of release {release}\n{}", a.log()))
}

/// The recording: the agent's life on the FUSE filesystem, with marks.
fn record(server: &Server, a: &mut Agent) -> (Vec<Op>, Marks) {
    let data = a.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let rec = match Recorder::mount(&data) {
        Ok(r) => r,
        Err(e) => panic!("power-cut trials need FUSE (root and /dev/fuse): {e}"),
    };
    let marks = Mutex::new(Marks::default());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let url = a.url("/v1/model");
        s.spawn(|| poll_states(url, &rec, &marks, &stop));
        drive_updates(server, a, &rec, &marks);
        assert_eq!(a.sigterm().code(), Some(0), "{}", a.log());
        stop.store(true, Ordering::Relaxed);
    });
    (rec.finish().unwrap(), marks.into_inner().unwrap())
}

/// Polls the agent's update state every 10 ms and notes each change with
/// the cut point it happened at.
fn poll_states(url: String, rec: &Recorder, marks: &Mutex<Marks>, stop: &AtomicBool) {
    let c = reqwest::blocking::Client::new();
    let mut last = String::new();
    while !stop.load(Ordering::Relaxed) {
        let at = rec.ops();
        let state = c
            .get(&url)
            .send()
            .and_then(|r| r.json::<serde_json::Value>())
            .ok()
            .and_then(|v| v["update_state"].as_str().map(str::to_string));
        if let Some(s) = state.filter(|s| *s != last) {
            marks.lock().unwrap().states.push((at, s.clone()));
            last = s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// First install, update to 3 (committed), 4 (fails its self-test), 5
/// (committed), 2 (refused as a downgrade).
fn drive_updates(server: &Server, a: &mut Agent, rec: &Recorder, marks: &Mutex<Marks>) {
    let seen = server.hellos_from(&a.id);
    a.spawn();
    a.wait_healthy(T);
    let t = Instant::now();
    while a.infer(X).map(|r| r.0) != Ok(1) {
        assert!(t.elapsed() < T, "release 1 never served\n{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    marks.lock().unwrap().first_served = rec.ops();
    server.wait_hello(&a.id, seen, T);
    let traffic = Traffic::start(a.http, X);
    let done = [
        EventKind::Committed,
        EventKind::RolledBack,
        EventKind::Failed,
    ];
    let commit = |release: u64| {
        let (b, _) = chunked_bundle(&a.key, release, NOISE_KIB);
        let e = answered(server, a, &b, release, &done);
        marks.lock().unwrap().committed.push((rec.ops(), release));
        assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
        wait_idle(a, T);
    };
    commit(3);
    let b4 = testkit::bundle(Kind::GoldenMismatch, &a.key, MODEL, 4, TARGET, 4.0);
    let e = answered(server, a, &b4, 4, &done);
    assert_ne!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    wait_idle(a, T);
    commit(5);
    let b2 = testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 2.0);
    let e = answered(server, a, &b2, 2, &[EventKind::Rejected]);
    assert_eq!(e.reason.as_deref(), Some("downgrade"), "{e:?}");
    drop(traffic);
    assert_eq!(a.infer(X).unwrap().0, 5);
}

/// One agent started on `img`: the release it serves once its outputs are
/// right, or why there is none within the time limit.
fn start_on(template: &Agent, img: &Image, name: &str) -> Result<u64, String> {
    let mut a = template.copy_as(name);
    materialise(img, &a.path().join("data")).map_err(|e| e.to_string())?;
    a.spawn();
    let t = Instant::now();
    let last = loop {
        let r = a.infer(X);
        match &r {
            Ok((rel, y)) if *y == X.map(|x| *rel as f32 * x) => break r,
            _ if t.elapsed() > T => break r,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    a.sigkill();
    match last {
        Ok((rel, y)) if y == X.map(|x| rel as f32 * x) => Ok(rel),
        Ok((rel, y)) => Err(format!("release {rel} answers {y:?}: not a verified model")),
        Err(e) => Err(format!(
            "no model serves after {T:?}: {e}\n{}",
            tail(&a.log())
        )),
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// One trial: a cut point under one assumption, and what happened.
#[derive(Debug, serde::Serialize)]
struct Trial {
    cut: usize,
    unsynced: Unsynced,
    state: String,
    image: String,
    served: Option<u64>,
    allowed: Vec<u64>,
    error: Option<String>,
}

impl Trial {
    fn ok(&self) -> bool {
        self.error.is_none() && self.served.is_some_and(|r| self.allowed.contains(&r))
    }
}

#[test]
fn power_cut_at_every_point_of_an_update_leaves_a_verified_model() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("powercut", port, "");
    let (log, marks) = record(&server, &mut a);
    let syncs = log.iter().filter(|o| o.is_sync()).count();
    eprintln!(
        "write log: {} operations ({syncs} syncs); release 1 served at {}, \
         commits acknowledged at {:?}; states {:?}",
        log.len(),
        marks.first_served,
        marks.committed,
        marks.states
    );
    assert!(log.len() + 1 >= 1000, "only {} cut points", log.len() + 1);

    // Every cut point under `Lost` and `NamesOnly`, and the `Kept` images
    // (a process crash: nearly every write makes a new one) at a sample of
    // cut points right after a sync; equal images start one agent.
    let kept_at = kept_sample(&log);
    let mut images: BTreeMap<u64, Image> = BTreeMap::new();
    let mut cuts: Vec<(usize, Unsynced, u64)> = Vec::new();
    each_cut(&log, |k, fs| {
        for u in Unsynced::ALL {
            if u == Unsynced::Kept && !kept_at.contains(&k) {
                continue;
            }
            let img = fs.image(u);
            let d = digest(&img);
            images.entry(d).or_insert(img);
            cuts.push((k, u, d));
        }
    })
    .unwrap();
    eprintln!(
        "{} trials ({} cut points x Lost and NamesOnly, {} x Kept), {} distinct images",
        cuts.len(),
        log.len() + 1,
        kept_at.len(),
        images.len()
    );

    let outcome: Mutex<BTreeMap<u64, Result<u64, String>>> = Mutex::new(BTreeMap::new());
    let work: Vec<(&u64, &Image)> = images.iter().collect();
    std::thread::scope(|s| {
        for (w, chunk) in work.chunks(work.len().div_ceil(2)).enumerate() {
            let (a, outcome) = (&a, &outcome);
            s.spawn(move || {
                for (i, (d, img)) in chunk.iter().enumerate() {
                    let r = start_on(a, img, &format!("pc{w}-{i}"));
                    outcome.lock().unwrap().insert(**d, r);
                }
            });
        }
    });
    let outcome = outcome.into_inner().unwrap();

    let trials: Vec<Trial> = cuts
        .iter()
        .map(|&(k, u, d)| {
            let r = &outcome[&d];
            Trial {
                cut: k,
                unsynced: u,
                state: marks.state_at(k).to_string(),
                image: format!("{d:016x}"),
                served: r.as_ref().ok().copied(),
                allowed: marks.allowed(k),
                error: r.as_ref().err().cloned(),
            }
        })
        .collect();
    let report = write_report(&trials);
    print_summary(&trials, &report);

    let states: std::collections::BTreeSet<&str> =
        trials.iter().map(|t| t.state.as_str()).collect();
    for want in ["downloading", "trial", "idle"] {
        assert!(states.contains(want), "no cut point in {want}: {states:?}");
    }
    // The check has teeth: before each acknowledged commit some cut point
    // brings the older release back, so an agent that acknowledged a commit
    // before it was durable would fail here.
    for &(at, release) in &marks.committed {
        assert!(
            trials
                .iter()
                .any(|t| t.cut < at && t.served.is_some_and(|r| r < release)),
            "no cut point before the commit of {release} serves an older release"
        );
    }
    let failed: Vec<&Trial> = trials.iter().filter(|t| !t.ok()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} trials left the device without an allowed verified model \
         (report: {}); first: {:#?}",
        failed.len(),
        trials.len(),
        report.display(),
        &failed[..failed.len().min(3)]
    );
}

/// Cut points for the `Kept` assumption: right after each sync, thinned
/// evenly to at most `EDGEFLEET_POWERCUT_KEPT` (default 120) of them.
fn kept_sample(log: &[Op]) -> std::collections::BTreeSet<usize> {
    let after_sync: Vec<usize> = (1..=log.len()).filter(|&k| log[k - 1].is_sync()).collect();
    let cap: usize = std::env::var("EDGEFLEET_POWERCUT_KEPT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let step = after_sync.len().div_ceil(cap.max(1)).max(1);
    after_sync.into_iter().step_by(step).collect()
}

/// Every trial as one JSON line, under cargo's per-test scratch directory.
fn write_report(trials: &[Trial]) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("power-cut-trials.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
    for t in trials {
        serde_json::to_writer(&mut f, t).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
    p
}

/// Trials and failures per update state and assumption.
fn print_summary(trials: &[Trial], report: &std::path::Path) {
    /// Trials, failures and trials per release served, of one row.
    #[derive(Default)]
    struct Row {
        trials: usize,
        failed: usize,
        serving: BTreeMap<u64, usize>,
    }
    let mut by: BTreeMap<(&str, Unsynced), Row> = BTreeMap::new();
    for t in trials {
        let row = by.entry((t.state.as_str(), t.unsynced)).or_default();
        row.trials += 1;
        row.failed += usize::from(!t.ok());
        if let Some(r) = t.served {
            *row.serving.entry(r).or_default() += 1;
        }
    }
    eprintln!(
        "{:<12} {:<10} {:>7} {:>7}  serving",
        "state", "unsynced", "trials", "failed"
    );
    for ((s, u), row) in by {
        eprintln!(
            "{s:<12} {:<10} {:>7} {:>7}  {:?}",
            format!("{u:?}"),
            row.trials,
            row.failed,
            row.serving
        );
    }
    eprintln!("report: {}", report.display());
}

/// The harness can fail: real system calls through the kernel's FUSE
/// client reach the recorder, and the crash model loses exactly what was
/// not synced. `a` is written and renamed without an fsync (the classic
/// bug), `b` with fsync of the file and of the directory.
#[test]
fn a_missing_fsync_is_lost_at_a_cut_and_a_synced_write_is_not() {
    use edgefleet_firmware_tests::powercut::model::{Fs, ImageEntry};
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::mount(dir.path())
        .unwrap_or_else(|e| panic!("power-cut trials need FUSE (root and /dev/fuse): {e}"));
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("a.tmp"), b"unsynced").unwrap();
    std::fs::rename(p("a.tmp"), p("a")).unwrap();
    {
        let mut f = std::fs::File::create(p("b.tmp")).unwrap();
        f.write_all(b"synced").unwrap();
        f.sync_all().unwrap();
    }
    std::fs::rename(p("b.tmp"), p("b")).unwrap();
    std::fs::File::open(dir.path()).unwrap().sync_all().unwrap();
    let log = rec.finish().unwrap();
    assert!(
        log.iter().any(|o| matches!(o, Op::FsyncDir { .. })),
        "{log:?}"
    );
    let mut fs = Fs::new();
    for op in &log {
        fs.apply(op).unwrap();
    }
    let file = |u: Unsynced, n: &str| match fs.image(u).get(&PathBuf::from(n)) {
        Some(ImageEntry::File(_, d)) => Some(d.clone()),
        _ => None,
    };
    assert_eq!(file(Unsynced::Lost, "b"), Some(b"synced".to_vec()));
    assert_eq!(file(Unsynced::Kept, "a"), Some(b"unsynced".to_vec()));
    // The directory fsync made the name `a` durable, not its data.
    assert_eq!(file(Unsynced::Lost, "a"), Some(Vec::new()));
    assert_eq!(file(Unsynced::NamesOnly, "a"), Some(Vec::new()));
    assert_eq!(
        fs.image(Unsynced::Lost).keys().collect::<Vec<_>>(),
        [&PathBuf::from("a"), &PathBuf::from("b")]
    );
}
