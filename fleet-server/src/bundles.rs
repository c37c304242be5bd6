//! Bundle storage: verified on upload with the server's trust store, stored
//! content-addressed by body SHA-256 under `data/bundles/`, served to devices
//! in chunks; deltas (made with the optional signing key) under `data/deltas/`.
//!
//! A bundle is its signed manifest (model, version, release, targets) and its
//! payload hash: the same payload uploaded under other metadata is refused
//! with a conflict naming the stored bundle, never answered with it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use edgefleet_bundle::{
    Manifest, Policy, SigningKey, TrustStore, UnverifiedBundle, VerifiedBundle,
};
use edgefleet_protocol::messages::ReleaseRef;
use serde::{Deserialize, Serialize};

use crate::store::{self, now_ms, Store};
use crate::{Error, Result};

/// Summary of a stored bundle (the API lists these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleInfo {
    /// Body SHA-256 (hex): the bundle's id.
    pub sha256: String,
    /// Model name.
    pub model: String,
    /// Semantic version.
    pub version: String,
    /// Release counter.
    pub release: u64,
    /// Target profile ids.
    pub targets: Vec<String>,
    /// Signing key id.
    pub key_id: String,
    /// Bundle file size (bytes).
    pub size: u64,
    /// Body size (bytes).
    pub body_size: u64,
    /// Chunks in the body.
    pub chunks: usize,
    /// Chunk size (bytes).
    pub chunk_size: u32,
    /// Minimum agent version.
    pub min_agent_version: String,
    /// Manifest creation time.
    pub created_at: String,
    /// Upload time (server clock, ms).
    pub uploaded_ms: u64,
    /// What the bundle's `compile_report.json` says of the shipped
    /// candidate; `None` for a bundle packed without one (`edgefleet bundle
    /// pack`) or stored before the server read reports.
    #[serde(default)]
    pub compile: Option<CompileSummary>,
}

/// The shipped candidate of a bundle's compile report
/// (`compile_report.json`, written by `edgefleet compile`; schema in
/// docs/specs/bundle.md, "Payload files"): the gate's verdict and metrics
/// and the size ratio, read once at upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompileSummary {
    /// Target profile the report was compiled for.
    pub target: String,
    /// The gate's verdict on the shipped candidate (`pass` or why not).
    pub gate: String,
    /// The candidate's accuracy against the fp32 reference: every numeric
    /// metric the report gives (`max_abs_error`, `mean_cosine`,
    /// `top1_agreement`, `mask_iou`, `box_f1`, `sequence_agreement`), by
    /// name; absent metrics (null in the report) are left out.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Original ONNX size, bytes.
    pub original_bytes: u64,
    /// Shipped ONNX size, bytes.
    pub shipped_bytes: u64,
    /// `shipped_bytes / original_bytes`.
    pub size_ratio: f64,
    /// Median tract latency of the shipped candidate on the compiling
    /// machine, ms (`None` when the report has none).
    pub latency_ms: Option<f64>,
}

impl CompileSummary {
    /// Reads the summary from a report's JSON; `None` when the bytes are not
    /// a compile report (a bundle may carry any free-form report, so a
    /// missing field is not an error).
    pub fn from_report(bytes: &[u8]) -> Option<Self> {
        let r: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let chosen = r.get("chosen")?.as_u64()? as usize;
        let c = r.get("candidates")?.get(chosen)?;
        let original_bytes = r.get("original_bytes")?.as_u64()?;
        let shipped_bytes = c.get("onnx_bytes")?.as_u64()?;
        const METRICS: [&str; 6] = [
            "max_abs_error",
            "mean_cosine",
            "top1_agreement",
            "mask_iou",
            "box_f1",
            "sequence_agreement",
        ];
        let acc = c.get("accuracy")?;
        let metrics = METRICS
            .iter()
            .filter_map(|m| Some(((*m).to_string(), acc.get(*m)?.as_f64()?)))
            .collect();
        Some(CompileSummary {
            target: r.get("target")?.as_str()?.to_string(),
            gate: c.get("gate")?.as_str()?.to_string(),
            metrics,
            original_bytes,
            shipped_bytes,
            size_ratio: shipped_bytes as f64 / original_bytes.max(1) as f64,
            latency_ms: c.get("latency_ms").and_then(serde_json::Value::as_f64),
        })
    }
}

impl BundleInfo {
    /// The release reference devices use.
    pub fn release_ref(&self) -> ReleaseRef {
        ReleaseRef {
            model: self.model.clone(),
            release: self.release,
            version: self.version.clone(),
        }
    }
}

/// The outcome of an upload.
#[derive(Debug, Clone, PartialEq)]
pub enum Upload {
    /// A new bundle, now stored.
    Stored(BundleInfo),
    /// The same signed bundle was already stored (idempotent).
    AlreadyStored(BundleInfo),
}

impl Upload {
    /// The stored summary either way.
    pub fn into_info(self) -> BundleInfo {
        match self {
            Upload::Stored(b) | Upload::AlreadyStored(b) => b,
        }
    }
}

/// What the server holds in memory to offer and serve one body (full or delta).
#[derive(Debug)]
pub struct Served {
    /// The verified manifest.
    pub manifest: Manifest,
    /// Exact signed manifest bytes.
    pub manifest_bytes: Vec<u8>,
    /// Detached signature.
    pub signature: Vec<u8>,
    /// The body (what chunks are cut from).
    pub body: Vec<u8>,
}

impl Served {
    fn from_verified(b: &VerifiedBundle) -> Self {
        Served {
            manifest: b.manifest().clone(),
            manifest_bytes: b.signed().manifest_bytes().to_vec(),
            signature: b.signed().signature().to_vec(),
            body: b.body().to_vec(),
        }
    }
    /// Body SHA-256 (hex).
    pub fn sha(&self) -> String {
        self.manifest.body.sha256.to_hex()
    }
    /// Chunk `i`.
    pub fn chunk(&self, i: usize) -> Option<&[u8]> {
        self.manifest.chunk_range(i).ok().map(|r| &self.body[r])
    }
}

/// (base sha, new sha) -> delta body sha (`None`: not worth it).
type DeltaIndex = HashMap<(String, String), Option<String>>;

/// The bundle store.
#[derive(Clone)]
pub struct Bundles {
    store: Store,
    dir: PathBuf,
    delta_dir: PathBuf,
    trust: Arc<TrustStore>,
    signing_key: Option<Arc<SigningKey>>,
    /// Body sha -> served body (full bundles and deltas).
    cache: Arc<Mutex<HashMap<String, Arc<Served>>>>,
    /// (base sha, new sha) -> delta body sha, or None when a delta is not worth it.
    deltas: Arc<Mutex<DeltaIndex>>,
}

impl Bundles {
    /// Opens the bundle directories under `data_dir`.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn open(
        store: Store,
        data_dir: &std::path::Path,
        trust: Arc<TrustStore>,
        signing_key: Option<Arc<SigningKey>>,
    ) -> Result<Self> {
        let dir = data_dir.join("bundles");
        let delta_dir = data_dir.join("deltas");
        for d in [&dir, &delta_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        Ok(Bundles {
            store,
            dir,
            delta_dir,
            trust,
            signing_key,
            cache: Arc::default(),
            deltas: Arc::default(),
        })
    }

    /// Verifies and stores an uploaded bundle; the same signed identity again
    /// is idempotent. Returns the stored summary.
    ///
    /// # Errors
    /// As [`Bundles::upload_checked`].
    pub fn upload(&self, bytes: &[u8]) -> Result<BundleInfo> {
        self.upload_checked(bytes).map(Upload::into_info)
    }

    /// Verifies and stores an uploaded bundle, saying whether it was new.
    ///
    /// A bundle is identified by its signed manifest: model, version,
    /// release, targets and payload (body) hash. The body hash is the store
    /// key, so the same payload under other metadata is refused rather than
    /// answered with the stored bundle.
    ///
    /// # Errors
    /// [`Error::Bundle`] when it does not verify; [`Error::BadRequest`] for a
    /// delta; [`Error::Conflict`] naming the stored bundle when the same
    /// payload is stored under another model, version, release or targets, or
    /// when another bundle holds the same model and release for an
    /// overlapping target; store and I/O errors.
    pub fn upload_checked(&self, bytes: &[u8]) -> Result<Upload> {
        let out =
            self.verify_upload(bytes)
                .and_then(|vb| match self.same_payload(vb.manifest())? {
                    Some(existing) => Ok(Upload::AlreadyStored(existing)),
                    None => {
                        self.check_release_free(vb.manifest())?;
                        self.store_new(bytes, &vb).map(Upload::Stored)
                    }
                });
        match &out {
            Ok(Upload::Stored(b)) => tracing::info!(
                event = "bundle_uploaded", sha = %b.sha256, model = %b.model,
                version = %b.version, release = b.release, targets = ?b.targets,
                "bundle stored"
            ),
            Ok(Upload::AlreadyStored(b)) => tracing::info!(
                event = "bundle_already_stored", sha = %b.sha256, model = %b.model,
                release = b.release, "the same signed bundle is already stored"
            ),
            Err(e) => tracing::info!(event = "bundle_refused", error = %e, "bundle upload refused"),
        }
        out
    }

    /// Stage 1: signature, policy, and not a delta.
    fn verify_upload(&self, bytes: &[u8]) -> Result<VerifiedBundle> {
        let vb = UnverifiedBundle::parse(bytes)?.verify(&self.trust, &Policy::publisher())?;
        if vb.manifest().is_delta() {
            return Err(Error::bad(
                "body",
                "delta bundles are made by the server, upload the full bundle",
            ));
        }
        Ok(vb)
    }

    /// Stage 2: the stored bundle with this payload, when its signed identity
    /// is the same; a conflict naming it when the identity differs.
    fn same_payload(&self, m: &Manifest) -> Result<Option<BundleInfo>> {
        let sha = m.body.sha256.to_hex();
        let Some(existing) = self.get(&sha)? else {
            return Ok(None);
        };
        let sorted = |t: &[String]| {
            let mut v = t.to_vec();
            v.sort();
            v
        };
        let version = m.version.to_string();
        if existing.model == m.model
            && existing.version == version
            && existing.release == m.release
            && sorted(&existing.targets) == sorted(&m.targets)
        {
            return Ok(Some(existing));
        }
        Err(Error::Conflict(format!(
            "this payload (sha256 {sha}) is already stored as bundle {sha}: model `{}` version {} release {} targets {:?}; \
             the upload says model `{}` version {version} release {} targets {:?}. A bundle is its signed manifest and \
             payload: pack one bundle for all its targets, or change the payload for a new release",
            existing.model, existing.version, existing.release, existing.targets,
            m.model, m.release, m.targets
        )))
    }

    /// Stage 3: no other bundle holds this model and release for an
    /// overlapping target.
    fn check_release_free(&self, m: &Manifest) -> Result<()> {
        // Design: a (model, release, target) names one bundle. Devices and
        // rollouts identify what runs by model and release (a device already at
        // the release counts as committed), so a second, different bundle under
        // the same release for an overlapping target would never be installed.
        let overlaps = |a: &[String], b: &[String]| {
            a.is_empty() || b.is_empty() || a.iter().any(|t| b.contains(t))
        };
        match self.list()?.into_iter().find(|b| {
            b.model == m.model && b.release == m.release && overlaps(&b.targets, &m.targets)
        }) {
            Some(other) => Err(Error::Conflict(format!(
                "model `{}` release {} for targets {:?} is already bundle {} (version {}); a different build needs a higher release",
                m.model, m.release, other.targets, other.sha256, other.version
            ))),
            None => Ok(()),
        }
    }

    /// Stage 4: writes the file and the summary, caches the served form.
    fn store_new(&self, bytes: &[u8], vb: &VerifiedBundle) -> Result<BundleInfo> {
        let m = vb.manifest();
        let sha = m.body.sha256.to_hex();
        let path = self.dir.join(format!("{sha}.efb"));
        edgefleet_bundle::write_atomic(&path, bytes)?;
        let info = BundleInfo {
            sha256: sha.clone(),
            model: m.model.clone(),
            version: m.version.to_string(),
            release: m.release,
            targets: m.targets.clone(),
            key_id: m.key_id.to_string(),
            size: bytes.len() as u64,
            body_size: m.body.size,
            chunks: m.body.chunks.len(),
            chunk_size: m.body.chunk_size,
            min_agent_version: m.min_agent_version.to_string(),
            created_at: m.created_at.clone(),
            uploaded_ms: now_ms(),
            compile: vb
                .file(edgefleet_bundle::payload::REPORT_JSON)
                .and_then(CompileSummary::from_report),
        };
        store::put(&self.store.bundles, sha.as_bytes(), &info)?;
        self.lock_cache()
            .insert(sha, Arc::new(Served::from_verified(vb)));
        Ok(info)
    }

    /// One bundle's summary.
    ///
    /// # Errors
    /// Store errors.
    pub fn get(&self, sha: &str) -> Result<Option<BundleInfo>> {
        store::get(&self.store.bundles, sha.as_bytes())
    }

    /// All bundles.
    ///
    /// # Errors
    /// Store errors.
    pub fn list(&self) -> Result<Vec<BundleInfo>> {
        store::scan(&self.store.bundles, b"")
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Served>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load_verified(&self, path: &std::path::Path) -> Result<VerifiedBundle> {
        Ok(UnverifiedBundle::read(path)?.verify(&self.trust, &Policy::publisher())?)
    }

    /// The served form of a body (full bundle or delta) by body sha, loading
    /// it from disk on first use.
    ///
    /// # Errors
    /// [`Error::NotFound`], bundle and I/O errors.
    pub fn served(&self, sha: &str) -> Result<Arc<Served>> {
        if let Some(s) = self.lock_cache().get(sha) {
            return Ok(s.clone());
        }
        if sha.len() != 64 || !sha.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::NotFound {
                what: "bundle",
                id: sha.chars().take(80).collect(),
            });
        }
        let full = self.dir.join(format!("{sha}.efb"));
        let served = if full.exists() {
            Served::from_verified(&self.load_verified(&full)?)
        } else {
            let delta = self.delta_dir.join(format!("{sha}.efb"));
            if !delta.exists() {
                return Err(Error::NotFound {
                    what: "bundle",
                    id: sha.to_string(),
                });
            }
            // Design: a delta only verifies against its base, so serve what was
            // signed without re-checking the body (the server made it itself).
            let ub = UnverifiedBundle::read(&delta)?;
            let vm = ub
                .signed_manifest()
                .clone()
                .verify(&self.trust, &Policy::publisher())?;
            let bytes = std::fs::read(&delta).map_err(|e| Error::io(&delta, e))?;
            let body_len = vm.manifest().body.size as usize;
            let body = bytes[bytes.len().saturating_sub(body_len)..].to_vec();
            Served {
                manifest: vm.manifest().clone(),
                manifest_bytes: vm.manifest_bytes().to_vec(),
                signature: vm.signature().to_vec(),
                body,
            }
        };
        let s = Arc::new(served);
        self.lock_cache().insert(sha.to_string(), s.clone());
        Ok(s)
    }

    /// What to offer a device whose active release is `active`: a delta
    /// against the bundle it holds when the server can sign one and it is
    /// smaller, else the full bundle. Blocking (may run zstd): call from
    /// `spawn_blocking`.
    ///
    /// # Errors
    /// As [`Bundles::served`].
    pub fn offer_for(&self, sha: &str, active: Option<&ReleaseRef>) -> Result<Arc<Served>> {
        let full = self.served(sha)?;
        let (Some(key), Some(active)) = (&self.signing_key, active) else {
            return Ok(full);
        };
        if active.model != full.manifest.model || active.release >= full.manifest.release {
            return Ok(full);
        }
        let Some(base) = self
            .list()?
            .into_iter()
            .find(|b| b.model == active.model && b.release == active.release)
        else {
            return Ok(full);
        };
        let k = (base.sha256.clone(), sha.to_string());
        let known = self
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k)
            .cloned();
        let delta_sha = match known {
            Some(d) => d,
            None => {
                let made = self.make_delta(&base.sha256, sha, key);
                let d = match made {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(base = %base.sha256, new = %sha, error = %e, "delta failed, offering the full bundle");
                        None
                    }
                };
                self.deltas
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(k, d.clone());
                d
            }
        };
        match delta_sha {
            Some(d) => self.served(&d),
            None => Ok(full),
        }
    }

    fn make_delta(
        &self,
        base_sha: &str,
        new_sha: &str,
        key: &SigningKey,
    ) -> Result<Option<String>> {
        let base = self.load_verified(&self.dir.join(format!("{base_sha}.efb")))?;
        let new = self.load_verified(&self.dir.join(format!("{new_sha}.efb")))?;
        let bytes = edgefleet_bundle::delta::make_delta(&base, &new, key, 19)?;
        let ub = UnverifiedBundle::parse(&bytes)?;
        let vm = ub
            .signed_manifest()
            .clone()
            .verify(&self.trust, &Policy::publisher())?;
        let m = vm.manifest();
        if m.body.size >= new.manifest().body.size {
            return Ok(None);
        }
        let dsha = m.body.sha256.to_hex();
        edgefleet_bundle::write_atomic(&self.delta_dir.join(format!("{dsha}.efb")), &bytes)?;
        tracing::info!(base = base_sha, new = new_sha, delta = %dsha, size = m.body.size, "delta made");
        Ok(Some(dsha))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::CompileSummary;

    /// The shape `edgefleet compile` writes (compiler/src/lib.rs `Report`),
    /// trimmed to what the summary reads plus a field it ignores.
    const REPORT: &str = r#"{
        "model": "vad", "target": "rpi4", "original_bytes": 2000, "chosen": 1,
        "candidates": [
            {"gate": "max_abs_error 0.2 > 0.05", "onnx_bytes": 900,
             "accuracy": {"max_abs_error": 0.2, "mean_cosine": 0.9}, "latency_ms": null},
            {"gate": "pass", "onnx_bytes": 500, "quantize": "int8_weights",
             "accuracy": {"max_abs_error": 0.01, "mean_cosine": 0.999,
                          "top1_agreement": 1.0, "mask_iou": null},
             "latency_ms": 1.25}
        ]
    }"#;

    #[test]
    fn the_shipped_candidate_is_summarised() {
        let s = CompileSummary::from_report(REPORT.as_bytes()).unwrap();
        assert_eq!(s.target, "rpi4");
        assert_eq!(s.gate, "pass");
        assert_eq!(
            s.metrics.keys().map(String::as_str).collect::<Vec<_>>(),
            ["max_abs_error", "mean_cosine", "top1_agreement"],
            "null metrics are left out"
        );
        assert_eq!(s.metrics["max_abs_error"], 0.01);
        assert_eq!((s.shipped_bytes, s.original_bytes), (500, 2000));
        assert_eq!(s.size_ratio, 0.25);
        assert_eq!(s.latency_ms, Some(1.25));
    }

    #[test]
    fn anything_else_is_no_summary() {
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"chosen": 5, "candidates": [], "original_bytes": 1, "target": "x"}"#,
        ] {
            assert_eq!(CompileSummary::from_report(bad.as_bytes()), None, "{bad}");
        }
    }
}
