//! Data-directory damage (issue 20, point 1): anti-rollback must not depend on
//! the store being intact, and a verified model keeps serving.
//!
//! A "golden" device runs release 1 (slot a), commits release 3 (slot b; the
//! release floor is 3) and stops. For every file of its data directory and
//! each of four kinds of damage (truncate to half, zero a 4 KiB block, flip
//! bytes, delete), a copy of the device is damaged that way and started; it
//! must serve a verified model (release 3, or release 1 when the damage hit
//! slot b's files or its `slot.json`), refuse an offer of the older signed
//! release 2 as `downgrade`, and never install it.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_protocol::messages::EventKind;

const T: Duration = Duration::from_secs(60);
const X: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

/// The kinds of damage, applied to one file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Cut to half its length (a torn write or a lost tail).
    Truncate,
    /// 4 KiB of zeros at the middle (the whole file if smaller).
    ZeroBlock,
    /// 8 bytes inverted at each of 1/4, 1/2 and 3/4 of the length.
    FlipBytes,
    /// Removed.
    Delete,
}

const DAMAGES: [Damage; 4] = [
    Damage::Truncate,
    Damage::ZeroBlock,
    Damage::FlipBytes,
    Damage::Delete,
];

fn damage(p: &Path, d: Damage) {
    let len = std::fs::metadata(p).unwrap().len() as usize;
    match d {
        Damage::Truncate => {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len((len / 2) as u64).unwrap();
            f.sync_all().unwrap();
        }
        Damage::ZeroBlock => {
            let mut b = std::fs::read(p).unwrap();
            let start = len.saturating_sub(4096) / 2;
            let end = (start + 4096).min(len);
            b[start..end].fill(0);
            std::fs::write(p, b).unwrap();
        }
        Damage::FlipBytes => {
            let mut b = std::fs::read(p).unwrap();
            for q in [len / 4, len / 2, 3 * len / 4] {
                for x in b.iter_mut().skip(q).take(8) {
                    *x ^= 0xFF;
                }
            }
            std::fs::write(p, b).unwrap();
        }
        Damage::Delete => std::fs::remove_file(p).unwrap(),
    }
}

/// Every regular file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &e.path(), out);
            } else if ft.is_file() {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Starts `a`, offers release 3 and waits until it is committed and idle.
fn commit_release_3(server: &Server, a: &mut Agent) {
    let seen = server.hellos_from(&a.id);
    a.spawn();
    a.wait_healthy(T);
    server.wait_hello(&a.id, seen, T);
    let traffic = Traffic::start(a.http, X);
    let b3 = testkit::bundle(Kind::Good, &a.key, MODEL, 3, TARGET, 3.0);
    let e = offer_until_answered(
        server,
        a,
        &b3,
        3,
        &[EventKind::Committed, EventKind::RolledBack],
    )
    .unwrap_or_else(|| panic!("no answer to the offer of release 3\n{}", a.log()));
    assert_eq!(e.kind, EventKind::Committed, "{e:?}\n{}", a.log());
    drop(traffic);
    wait_idle(a, T);
    assert_eq!(a.infer(X).unwrap().0, 3);
}

/// The releases the slots hold (from their `slot.json`, where one parses).
fn slot_releases(a: &Agent) -> Vec<u64> {
    ["a", "b"]
        .iter()
        .filter_map(|s| {
            let b = std::fs::read(a.path().join("data/slots").join(s).join("slot.json")).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
            v["release"]["release"].as_u64()
        })
        .collect()
}

/// Starts `a` (already damaged), checks that a verified model serves and
/// that release 2 is refused as a downgrade. `Err` says what went wrong.
fn check_device(server: &Server, a: &mut Agent, want_serving: u64) -> Result<String, String> {
    let seen = server.hellos_from(&a.id);
    a.spawn();
    a.wait_healthy(T);
    server.wait_hello(&a.id, seen, T);
    wait_idle(a, T);
    let (rel, y) = a.infer(X)?;
    let k = rel as f32;
    if rel != want_serving || y != X.map(|x| k * x) {
        return Err(format!("serves release {rel} ({y:?}), want {want_serving}"));
    }
    let b2 = testkit::bundle(Kind::Good, &a.key, MODEL, 2, TARGET, 2.0);
    let answered = offer_until_answered(
        server,
        a,
        &b2,
        2,
        &[
            EventKind::Rejected,
            EventKind::Committed,
            EventKind::RolledBack,
            EventKind::Failed,
        ],
    );
    let e = answered.ok_or("no answer to the offer of release 2 in 6 tries")?;
    if e.kind != EventKind::Rejected || e.reason.as_deref() != Some("downgrade") {
        return Err(format!("release 2 was not refused as a downgrade: {e:?}"));
    }
    // Give a wrongly accepted download time to show, then check nothing moved.
    std::thread::sleep(Duration::from_millis(500));
    let (after, _) = a.infer(X)?;
    if after != rel || slot_releases(a).contains(&2) || server.kinds(&a.id, 2).len() != 1 {
        return Err(format!(
            "after the offer: serving {after}, slots {:?}, events {:?}",
            slot_releases(a),
            server.kinds(&a.id, 2)
        ));
    }
    let quarantined = std::fs::read_dir(a.path().join("data")).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("quarantine-")
    });
    Ok(format!(
        "serves {rel}, 2 refused{}",
        if quarantined {
            ", store quarantined"
        } else {
            ""
        }
    ))
}

/// Point 1 of issue 20: a store that still opens but holds older contents
/// (here: the store directory as it was before release 3 was committed)
/// must not bring back the old floor or the old slot roles.
#[test]
fn store_with_older_contents_keeps_floor_and_serving_release() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut a = Agent::new("stale-store", port, "");
    a.spawn();
    a.wait_healthy(T);
    wait_idle(&a, T);
    assert_eq!(a.sigterm().code(), Some(0), "{}", a.log());
    let old = a.path().join("store-at-release-1");
    copy_dir(&a.path().join("data/store"), &old);
    commit_release_3(&server, &mut a);
    assert_eq!(a.sigterm().code(), Some(0), "{}", a.log());
    std::fs::remove_dir_all(a.path().join("data/store")).unwrap();
    copy_dir(&old, &a.path().join("data/store"));
    let r = check_device(&server, &mut a, 3);
    assert!(r.is_ok(), "{r:?}\n{}", a.log());
    assert!(
        a.log().contains("the store lost writes"),
        "stale store not recognised:\n{}",
        a.log()
    );
}

#[test]
fn every_file_of_the_data_dir_damaged_every_way() {
    let port = start_rumqttd();
    let server = Server::start(port);
    let mut golden = Agent::new("golden", port, "");
    commit_release_3(&server, &mut golden);
    assert_eq!(golden.sigterm().code(), Some(0), "{}", golden.log());
    let data = golden.path().join("data");
    let rows: Vec<(PathBuf, Damage)> = files(&data)
        .into_iter()
        .flat_map(|f| DAMAGES.map(|d| (f.clone(), d)))
        .collect();
    let names: Vec<String> = files(&data)
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    for want in [
        "store/db",
        "store/conf",
        "store.guard/floor.a.json",
        "store.guard/floor.b.json",
        "slots/b/slot.json",
        "slots/b/files/model.nnef.tar",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not in the data dir: {names:?}"
        );
    }
    eprintln!("{} files x {} damages", names.len(), DAMAGES.len());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for chunk in rows.chunks(rows.len().div_ceil(4)) {
            let (server, golden, results) = (&server, &golden, &results);
            s.spawn(move || {
                for (i, (file, d)) in chunk.iter().enumerate() {
                    let mut a = golden.copy_as(&format!("dmg{i}"));
                    damage(&a.path().join("data").join(file), *d);
                    // Slot b holds release 3; when its files or slot.json are
                    // damaged it cannot be verified and slot a (release 1) serves.
                    let f = file.to_string_lossy();
                    let want = if f.starts_with("slots/b/files/") || f == "slots/b/slot.json" {
                        1
                    } else {
                        3
                    };
                    let r =
                        check_device(server, &mut a, want).map_err(|e| format!("{e}\n{}", a.log()));
                    eprintln!(
                        "{f:<40} {d:<10?} {}",
                        r.as_ref().map_or("FAILED", |s| s.as_str())
                    );
                    results.lock().unwrap().push((f.into_owned(), *d, r));
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    assert_eq!(results.len(), rows.len());
    let failed: Vec<_> = results.iter().filter(|r| r.2.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} rows failed: {failed:#?}",
        failed.len(),
        results.len()
    );
}
