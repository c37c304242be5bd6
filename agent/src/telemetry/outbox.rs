//! Store-and-forward outbox for telemetry records, in a sled tree.
//!
//! Semantics (docs/specs/telemetry.md, "Outbox"):
//! - [`Outbox::append`] gives each record the next sequence number (starting
//!   at 1, strictly increasing, persisted: it continues after a restart and
//!   never reuses a number, even after every record was acknowledged);
//! - [`Outbox::peek`] returns the oldest records in `seq` order;
//!   [`Outbox::ack`] deletes every record up to a `seq` once the broker has
//!   acknowledged it;
//! - the outbox holds at most `max_records` records and `max_bytes` bytes of
//!   encoded records (key + JSON value; sled's own log overhead is not
//!   counted, so budget about 2x on disk). When an append would exceed either
//!   bound the **oldest** records are deleted first; each deletion adds one to
//!   the persisted drop counter, which every later record carries as
//!   `outbox_dropped`.
//!
//! Disk ceiling ([`Outbox::with_disk_limit`], the agent's `[storage]
//! max_bytes`): when the store's files exceed five eighths of it at an
//! append, the byte bound is halved for that append (to what is stored now
//! / 2), so the oldest half of the waiting records is dropped and counted
//! like any other drop; sled reuses the freed space a segment at a time,
//! which the remaining three eighths leave room for.
//!
//! Design: an append is one atomic sled batch (record, dropped-oldest
//! removals, `next_seq`, drop counter), so a crash never leaves a record
//! without its sequence number being reserved. Power-cut guarantee: with
//! `flush_on_append` (the default) `append` returns only after `sled::Db::flush`
//! has written and fsynced the log, so an appended record survives a power
//! cut. Telemetry appends happen every few seconds, so the fsync costs
//! nothing noticeable. Without it, records written in the last
//! `sled::Config::flush_every_ms` (sled's default 500 ms) may be lost.
//! Acks are not flushed: after a power cut some acknowledged records may be
//! sent again, which is harmless because receivers de-duplicate by `seq`.

use std::sync::Arc;
use std::sync::Mutex;

use edgefleet_protocol::telemetry::TelemetryRecord;
use tokio::sync::Notify;

use super::Error;

/// Key prefix of records (`b'r'` + seq big-endian, so keys sort by seq).
const RECORD_PREFIX: u8 = b'r';
/// Key of the next sequence number (u64 big-endian).
const KEY_NEXT_SEQ: &[u8] = b"m:next_seq";
/// Key of the drop counter (u64 big-endian).
const KEY_DROPPED: &[u8] = b"m:dropped";
/// Name of the sled tree used by [`Outbox::open`].
pub const TREE_NAME: &str = "telemetry_outbox";

/// Bounds and durability of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Most records kept (>= 1); the oldest are dropped beyond it.
    pub max_records: u64,
    /// Most bytes of encoded records kept (key + value); the oldest are dropped beyond it.
    pub max_bytes: u64,
    /// Flush (fsync) sled after every append; see the module docs.
    pub flush_on_append: bool,
}

impl Default for OutboxConfig {
    /// 50,000 records or 16 MiB: at one record per 10 s that is nearly six days offline.
    fn default() -> Self {
        OutboxConfig {
            max_records: 50_000,
            max_bytes: 16 * 1024 * 1024,
            flush_on_append: true,
        }
    }
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    dropped: u64,
    len: u64,
    bytes: u64,
}

/// The outbox. Cheap to share (`Arc<Outbox>`); all methods take `&self`.
#[derive(Debug)]
pub struct Outbox {
    db: sled::Db,
    tree: sled::Tree,
    cfg: OutboxConfig,
    state: Mutex<State>,
    notify: Arc<Notify>,
    /// Store directory and its ceiling in bytes ([`Outbox::with_disk_limit`]).
    disk: Option<(std::path::PathBuf, u64)>,
}

fn record_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = RECORD_PREFIX;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    (key.len() == 9 && key[0] == RECORD_PREFIX).then(|| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[1..]);
        u64::from_be_bytes(b)
    })
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>, Error> {
    let v = tree.get(key).map_err(|source| Error::Store {
        op: format!("read {}", String::from_utf8_lossy(key)),
        source,
    })?;
    Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes))
}

/// Total size of the regular files under `p` (bytes; 0 if unreadable).
fn dir_bytes(p: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Outbox {
    /// Opens (or creates) the outbox in tree [`TREE_NAME`] of `db`, restoring
    /// the sequence number, drop counter and size from what is stored.
    ///
    /// # Errors
    /// [`Error::Store`] if sled fails.
    pub fn open(db: &sled::Db, cfg: OutboxConfig) -> Result<Self, Error> {
        let tree = db.open_tree(TREE_NAME).map_err(|source| Error::Store {
            op: format!("open tree {TREE_NAME}"),
            source,
        })?;
        let mut len = 0u64;
        let mut bytes = 0u64;
        let mut last = 0u64;
        for kv in tree.scan_prefix([RECORD_PREFIX]) {
            let (k, v) = kv.map_err(|source| Error::Store {
                op: "scan records".into(),
                source,
            })?;
            if let Some(seq) = seq_of(&k) {
                len += 1;
                bytes += (k.len() + v.len()) as u64;
                last = last.max(seq);
            }
        }
        // Design: next_seq is the larger of the stored counter and the last
        // record + 1, so a damaged counter can never make seq go backwards.
        let next_seq = read_u64(&tree, KEY_NEXT_SEQ)?
            .unwrap_or(1)
            .max(last + 1)
            .max(1);
        let dropped = read_u64(&tree, KEY_DROPPED)?.unwrap_or(0);
        let cfg = OutboxConfig {
            max_records: cfg.max_records.max(1),
            ..cfg
        };
        Ok(Outbox {
            db: db.clone(),
            tree,
            cfg,
            state: Mutex::new(State {
                next_seq,
                dropped,
                len,
                bytes,
            }),
            notify: Arc::new(Notify::new()),
            disk: None,
        })
    }

    /// Enforces a ceiling on the files under `dir` (the sled store holding
    /// this outbox): see the module docs. `max_bytes` is in bytes.
    #[must_use]
    pub fn with_disk_limit(mut self, dir: std::path::PathBuf, max_bytes: u64) -> Self {
        self.disk = Some((dir, max_bytes));
        self
    }

    /// The byte bound for the next append: the configured one, or half of
    /// what is stored when the store's files are over the disk ceiling.
    fn byte_budget(&self, stored: u64) -> u64 {
        match &self.disk {
            Some((dir, max)) => {
                let used = dir_bytes(dir);
                // Five eighths: sled frees dropped records' space a segment
                // at a time, so the files go on growing for a while.
                if used > *max / 8 * 5 {
                    tracing::warn!(used, max, stored, "store over its disk ceiling: dropping the oldest half of the telemetry outbox");
                    self.cfg.max_bytes.min(stored / 2)
                } else {
                    self.cfg.max_bytes
                }
            }
            None => self.cfg.max_bytes,
        }
    }

    /// Opens a sled database at `path` just for the outbox (tests, tools).
    ///
    /// # Errors
    /// [`Error::Store`] if sled fails.
    pub fn open_path(path: &std::path::Path, cfg: OutboxConfig) -> Result<Self, Error> {
        let db = sled::open(path).map_err(|source| Error::Store {
            op: format!("open {}", path.display()),
            source,
        })?;
        Self::open(&db, cfg)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent with
        // the store in a way that matters more than losing telemetry: recover.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `record`, overwriting its `seq` with the next sequence number
    /// and its `outbox_dropped` with the drop counter (after any drop this
    /// append causes). Returns the assigned `seq`. Wakes [`Outbox::notified`] waiters.
    ///
    /// # Errors
    /// [`Error::Encode`], [`Error::Store`]; on error nothing is stored and the
    /// sequence number is not consumed.
    pub fn append(&self, mut record: TelemetryRecord) -> Result<u64, Error> {
        let mut st = self.lock();
        let seq = st.next_seq;
        let key = record_key(seq);
        // The size does not depend on outbox_dropped's exact value by more
        // than a few digits; encode twice to be exact.
        record.seq = seq;
        record.outbox_dropped = st.dropped;
        let size =
            |r: &TelemetryRecord| serde_json::to_vec(r).map(|v| (key.len() + v.len()) as u64);
        let new_size = size(&record).map_err(|source| Error::Encode { seq, source })?;
        let mut batch = sled::Batch::default();
        let (mut len, mut bytes, mut dropped) = (st.len, st.bytes, st.dropped);
        let max_bytes = self.byte_budget(bytes);
        if len + 1 > self.cfg.max_records || bytes + new_size > max_bytes {
            for kv in self.tree.scan_prefix([RECORD_PREFIX]) {
                if len < self.cfg.max_records && bytes + new_size <= max_bytes {
                    break;
                }
                let (k, v) = kv.map_err(|source| Error::Store {
                    op: format!("scan oldest for append seq {seq}"),
                    source,
                })?;
                batch.remove(k.clone());
                len -= 1;
                bytes -= (k.len() + v.len()) as u64;
                dropped += 1;
            }
        }
        record.outbox_dropped = dropped;
        let value = serde_json::to_vec(&record).map_err(|source| Error::Encode { seq, source })?;
        let new_size = (key.len() + value.len()) as u64;
        batch.insert(&key[..], value);
        batch.insert(KEY_NEXT_SEQ, &(seq + 1).to_be_bytes()[..]);
        batch.insert(KEY_DROPPED, &dropped.to_be_bytes()[..]);
        self.tree
            .apply_batch(batch)
            .map_err(|source| Error::Store {
                op: format!("append seq {seq}"),
                source,
            })?;
        if self.cfg.flush_on_append {
            self.db.flush().map_err(|source| Error::Store {
                op: format!("flush after append seq {seq}"),
                source,
            })?;
        }
        st.next_seq = seq + 1;
        st.len = len + 1;
        st.bytes = bytes + new_size;
        st.dropped = dropped;
        drop(st);
        self.notify.notify_one();
        Ok(seq)
    }

    /// Up to `max` oldest records, ascending `seq`, without removing them. A
    /// stored record that no longer decodes is deleted and counted as dropped
    /// (it could otherwise block the outbox forever).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub fn peek(&self, max: usize) -> Result<Vec<TelemetryRecord>, Error> {
        let mut out = Vec::with_capacity(max.min(1024));
        let mut corrupt = Vec::new();
        for kv in self.tree.scan_prefix([RECORD_PREFIX]) {
            if out.len() >= max {
                break;
            }
            let (k, v) = kv.map_err(|source| Error::Store {
                op: "peek".into(),
                source,
            })?;
            match serde_json::from_slice::<TelemetryRecord>(&v) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(seq = ?seq_of(&k), error = %e, "telemetry outbox: dropping undecodable record");
                    corrupt.push((k, v.len()));
                }
            }
        }
        if !corrupt.is_empty() {
            let mut st = self.lock();
            let mut batch = sled::Batch::default();
            for (k, vlen) in &corrupt {
                batch.remove(k.clone());
                st.len = st.len.saturating_sub(1);
                st.bytes = st.bytes.saturating_sub((k.len() + vlen) as u64);
                st.dropped += 1;
            }
            batch.insert(KEY_DROPPED, &st.dropped.to_be_bytes()[..]);
            self.tree
                .apply_batch(batch)
                .map_err(|source| Error::Store {
                    op: "drop undecodable records".into(),
                    source,
                })?;
        }
        Ok(out)
    }

    /// Deletes every record with `seq <= up_to` (the broker acknowledged
    /// them). Returns how many were deleted.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub fn ack(&self, up_to: u64) -> Result<u64, Error> {
        let mut st = self.lock();
        let mut batch = sled::Batch::default();
        let (mut n, mut bytes) = (0u64, 0u64);
        for kv in self.tree.range(record_key(0)..=record_key(up_to)) {
            let (k, v) = kv.map_err(|source| Error::Store {
                op: format!("ack up to {up_to}"),
                source,
            })?;
            bytes += (k.len() + v.len()) as u64;
            batch.remove(k);
            n += 1;
        }
        if n > 0 {
            self.tree
                .apply_batch(batch)
                .map_err(|source| Error::Store {
                    op: format!("ack up to {up_to}"),
                    source,
                })?;
            st.len = st.len.saturating_sub(n);
            st.bytes = st.bytes.saturating_sub(bytes);
        }
        Ok(n)
    }

    /// Records waiting.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// True when no record waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of encoded records waiting (key + value).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Records dropped so far (oldest first, because of the bound, or undecodable).
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// The configuration in use.
    pub fn config(&self) -> OutboxConfig {
        self.cfg
    }

    /// Resolves after the next [`Outbox::append`] (or immediately if one
    /// happened since the last wait); used by the publisher to wake up.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Flushes sled to disk (e.g. on shutdown).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(|source| Error::Store {
            op: "flush".into(),
            source,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edgefleet_protocol::telemetry::LatencySummary;

    pub(crate) fn rec(requests: u64) -> TelemetryRecord {
        TelemetryRecord {
            seq: 0,
            ts_ms: 1,
            release: None,
            interval_s: 10.0,
            requests,
            errors: 0,
            rejected: 0,
            latency: LatencySummary::default(),
            queue_depth: 0,
            rss_bytes: 0,
            cpu_percent: 0.0,
            uptime_s: 0,
            outbox_dropped: 0,
            feedback: None,
            shadow: None,
        }
    }

    /// Opens the store again after a simulated restart. sled's flusher thread
    /// can hold the directory lock for a moment after the last handle drops
    /// (a real restart is a new process); retry for up to 5 s.
    fn reopen(path: &std::path::Path, cfg: OutboxConfig) -> Outbox {
        let t0 = std::time::Instant::now();
        loop {
            match Outbox::open_path(path, cfg) {
                Ok(o) => return o,
                Err(e) if t0.elapsed() < std::time::Duration::from_secs(5) => {
                    assert!(e.to_string().contains("open"), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen after 5 s: {e}"),
            }
        }
    }

    #[test]
    fn seq_order_ack_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig::default();
        {
            let o = Outbox::open_path(dir.path(), cfg).unwrap();
            for i in 0..5 {
                assert_eq!(o.append(rec(i)).unwrap(), i + 1);
            }
            let p = o.peek(3).unwrap();
            assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
            assert_eq!(o.ack(2).unwrap(), 2);
            assert_eq!(o.len(), 3);
            o.ack(5).unwrap();
            assert!(o.is_empty());
            o.flush().unwrap();
        }
        let o = reopen(dir.path(), cfg);
        assert_eq!(
            o.next_seq(),
            6,
            "seq continues after restart even when empty"
        );
        assert_eq!(o.append(rec(9)).unwrap(), 6);
    }

    #[test]
    fn bound_drops_oldest_and_counts_persistently() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            max_records: 3,
            ..OutboxConfig::default()
        };
        {
            let o = Outbox::open_path(dir.path(), cfg).unwrap();
            for i in 0..5 {
                o.append(rec(i)).unwrap();
            }
            assert_eq!(o.len(), 3);
            assert_eq!(o.dropped(), 2);
            let p = o.peek(10).unwrap();
            assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
            assert_eq!(
                p.iter().map(|r| r.outbox_dropped).collect::<Vec<_>>(),
                vec![0, 1, 2]
            );
        }
        let o = reopen(dir.path(), cfg);
        assert_eq!((o.len(), o.dropped()), (3, 2));
        o.append(rec(0)).unwrap();
        let p = o.peek(10).unwrap();
        assert_eq!(p.last().map(|r| (r.seq, r.outbox_dropped)), Some((6, 3)));
    }

    #[test]
    fn byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let one = (9 + serde_json::to_vec(&rec(0)).unwrap().len()) as u64;
        let cfg = OutboxConfig {
            max_bytes: one * 4 + one / 2,
            ..OutboxConfig::default()
        };
        let o = Outbox::open_path(dir.path(), cfg).unwrap();
        for i in 0..10 {
            o.append(rec(i)).unwrap();
        }
        assert_eq!(o.len(), 4);
        assert!(o.bytes() <= cfg.max_bytes);
        assert_eq!(o.dropped(), 6);
        assert_eq!(o.peek(1).unwrap()[0].seq, 7);
    }

    /// Over the ceiling (records never acknowledged, a tiny ceiling), the
    /// outbox drops its oldest records, counted, and the store stays near it.
    #[test]
    fn disk_ceiling_drops_oldest_when_the_store_is_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_path_buf();
        let cap = 1024 * 1024;
        // The agent's store uses 64 KiB segments (store::SEGMENT_SIZE).
        let db = sled::Config::new()
            .path(&p)
            .segment_size(64 * 1024)
            .open()
            .unwrap();
        let out = Outbox::open(&db, OutboxConfig::default())
            .unwrap()
            .with_disk_limit(p.clone(), cap);
        let mut most = 0;
        for i in 0..10_000 {
            out.append(rec(i)).unwrap();
            most = most.max(dir_bytes(&p));
        }
        out.flush().unwrap();
        let used = dir_bytes(&p);
        eprintln!("store {used} bytes at the end, {most} at most, ceiling {cap}");
        assert!(out.dropped() > 0, "nothing dropped at {used} bytes");
        assert!(most <= cap, "{most} bytes at most for a {cap}-byte ceiling");
        let p10 = out.peek(10).unwrap();
        assert_eq!(p10[0].seq, out.dropped() + 1, "the oldest were dropped");
    }

    #[test]
    fn undecodable_record_is_dropped_not_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let o = Outbox::open(&db, OutboxConfig::default()).unwrap();
        o.append(rec(1)).unwrap();
        db.open_tree(TREE_NAME)
            .unwrap()
            .insert(record_key(1), &b"garbage"[..])
            .unwrap();
        o.append(rec(2)).unwrap();
        let p = o.peek(10).unwrap();
        assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
        assert_eq!(o.dropped(), 1);
    }
}
