//! A small blocking client for an MLflow tracking server's REST API 2.0
//! (<https://mlflow.org/docs/latest/rest-api.html>): experiments, runs, log-batch, the
//! artifact proxy of `mlflow server --serve-artifacts`, and the model registry (registered
//! models, model versions, aliases).
//!
//! Design: only the endpoints edgefleet needs, typed requests and tolerant responses (MLflow
//! adds fields between releases; we read what we use and ignore the rest). Every error names
//! the endpoint and carries MLflow's `error_code` and `message`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A blocking MLflow REST API 2.0 client bound to one tracking server.
#[derive(Debug, Clone)]
pub struct MlflowClient {
    base: String,
    http: reqwest::blocking::Client,
}

/// A run as returned by `runs/create` and `runs/get` (REST API: "Run", "RunInfo").
#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    /// Run metadata.
    pub info: RunInfo,
    /// Logged params, metrics and tags.
    #[serde(default)]
    pub data: RunData,
}

/// REST API "RunInfo".
#[derive(Debug, Clone, Deserialize)]
pub struct RunInfo {
    /// The run's id.
    pub run_id: String,
    /// The experiment it belongs to.
    pub experiment_id: String,
    /// Root artifact URI, e.g. `mlflow-artifacts:/1/<run_id>/artifacts`.
    #[serde(default)]
    pub artifact_uri: String,
    /// RUNNING, FINISHED, FAILED, KILLED, SCHEDULED.
    #[serde(default)]
    pub status: String,
}

/// REST API "RunData": latest metric values, params and tags.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunData {
    /// Latest value of each metric.
    #[serde(default)]
    pub metrics: Vec<Metric>,
    /// Params.
    #[serde(default)]
    pub params: Vec<KeyValue>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<KeyValue>,
}

/// REST API "Metric".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Name.
    pub key: String,
    /// Value.
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    pub timestamp: i64,
    /// Step (edgefleet: the epoch).
    #[serde(default)]
    pub step: i64,
}

/// REST API "Param" / "RunTag".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

/// REST API "ModelVersion" (the fields edgefleet uses).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelVersion {
    /// Registered model name.
    pub name: String,
    /// Version number, as MLflow sends it (a string).
    pub version: String,
    /// Where the model's files are, e.g. `mlflow-artifacts:/1/<run>/artifacts/model`.
    #[serde(default)]
    pub source: String,
    /// The run that produced it.
    #[serde(default)]
    pub run_id: String,
    /// Aliases pointing at this version.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// Terminal run status for `runs/update` (REST API "RunStatus").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// The run completed.
    Finished,
    /// The run failed.
    Failed,
    /// The run was killed.
    Killed,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

/// Which registered version a `models:/` URI names (MLflow "Model Registry" URIs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// `models:/NAME@ALIAS`.
    Alias(String),
    /// `models:/NAME/VERSION`.
    Version(u64),
}

/// A parsed `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelUri {
    /// Registered model name.
    pub name: String,
    /// Alias or version.
    pub reference: ModelRef,
}

impl ModelUri {
    /// Parses `models:/NAME@ALIAS` or `models:/NAME/VERSION`; anything else is refused with
    /// [`Error::ModelUri`].
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::ModelUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let rest = uri
            .strip_prefix("models:/")
            .ok_or_else(|| bad("does not start with models:/"))?;
        let rest = rest.trim_start_matches('/');
        let (name, reference) = if let Some((name, alias)) = rest.split_once('@') {
            if alias.is_empty() || alias.contains(['/', '@']) {
                return Err(bad("empty or malformed alias"));
            }
            (name, ModelRef::Alias(alias.to_string()))
        } else if let Some((name, version)) = rest.split_once('/') {
            let v: u64 = version
                .parse()
                .map_err(|_| bad("version is not a positive integer"))?;
            if v == 0 {
                return Err(bad("versions start at 1"));
            }
            (name, ModelRef::Version(v))
        } else {
            return Err(bad("neither @ALIAS nor /VERSION after the name"));
        };
        if name.is_empty() || name.contains(['/', '@']) {
            return Err(bad("empty or malformed model name"));
        }
        Ok(ModelUri {
            name: name.to_string(),
            reference,
        })
    }
}

impl fmt::Display for ModelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            ModelRef::Alias(a) => write!(f, "models:/{}@{}", self.name, a),
            ModelRef::Version(v) => write!(f, "models:/{}/{}", self.name, v),
        }
    }
}

/// A resolved registered model version and its ONNX bytes.
#[derive(Debug, Clone)]
pub struct PulledModel {
    /// The URI asked for.
    pub uri: ModelUri,
    /// The version it resolved to.
    pub version: ModelVersion,
    /// The ONNX file's bytes.
    pub onnx: Vec<u8>,
}

/// MLflow's error body (REST API "Error codes").
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error_code: String,
    #[serde(default)]
    message: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The artifact path of the exported model inside a run (`<run artifacts>/model/model.onnx`).
pub const MODEL_ARTIFACT_DIR: &str = "model";
/// The ONNX file name inside [`MODEL_ARTIFACT_DIR`].
pub const MODEL_FILE: &str = "model.onnx";

impl MlflowClient {
    /// A client for the tracking server at `base_url` (e.g. `http://127.0.0.1:5000`).
    pub fn new(base_url: &str) -> Result<Self, Error> {
        let base = base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid {
                what: format!("MLflow URL {base_url:?}"),
                reason: "expected http:// or https://".into(),
            });
        }
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| Error::MlflowUnreachable {
                url: base.clone(),
                endpoint: "client setup".into(),
                reason: e.to_string(),
            })?;
        Ok(MlflowClient { base, http })
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn send(
        &self,
        endpoint: &str,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<reqwest::blocking::Response, Error> {
        let resp = req.send().map_err(|e| Error::MlflowUnreachable {
            url: self.base.clone(),
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().unwrap_or_default();
        let (error_code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (b.error_code, b.message),
            Err(_) => (String::new(), text.chars().take(500).collect()),
        };
        Err(Error::Mlflow {
            endpoint: endpoint.to_string(),
            status: status.as_u16(),
            error_code,
            message,
        })
    }

    fn json<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        resp: reqwest::blocking::Response,
    ) -> Result<T, Error> {
        resp.json::<T>().map_err(|e| Error::Mlflow {
            endpoint: endpoint.to_string(),
            status: 200,
            error_code: "BAD_RESPONSE".into(),
            message: e.to_string(),
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, &str)]) -> Result<T, Error> {
        let endpoint = format!("GET {path}");
        let req = self.http.get(format!("{}{}", self.base, path)).query(query);
        let resp = self.send(&endpoint, req)?;
        self.json(&endpoint, resp)
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T, Error> {
        let endpoint = format!("POST {path}");
        let req = self.http.post(format!("{}{}", self.base, path)).json(body);
        let resp = self.send(&endpoint, req)?;
        self.json(&endpoint, resp)
    }

    /// The id of experiment `name`, created if absent (REST API: "Get Experiment By Name",
    /// "Create Experiment").
    pub fn get_or_create_experiment(&self, name: &str) -> Result<String, Error> {
        #[derive(Deserialize)]
        struct Exp {
            experiment_id: String,
        }
        #[derive(Deserialize)]
        struct Got {
            experiment: Exp,
        }
        match self.get::<Got>(
            "/api/2.0/mlflow/experiments/get-by-name",
            &[("experiment_name", name)],
        ) {
            Ok(g) => return Ok(g.experiment.experiment_id),
            Err(Error::Mlflow { error_code, .. }) if error_code == "RESOURCE_DOES_NOT_EXIST" => {}
            Err(e) => return Err(e),
        }
        match self.post::<Exp>(
            "/api/2.0/mlflow/experiments/create",
            &serde_json::json!({ "name": name }),
        ) {
            Ok(e) => Ok(e.experiment_id),
            // Design: a concurrent creator won the race; read theirs.
            Err(Error::Mlflow { error_code, .. }) if error_code == "RESOURCE_ALREADY_EXISTS" => {
                self.get::<Got>(
                    "/api/2.0/mlflow/experiments/get-by-name",
                    &[("experiment_name", name)],
                )
                .map(|g| g.experiment.experiment_id)
            }
            Err(e) => Err(e),
        }
    }

    /// Starts a run in `experiment_id` with `tags` (REST API: "Create Run").
    pub fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Run, Error> {
        #[derive(Deserialize)]
        struct Created {
            run: Run,
        }
        let tags: Vec<KeyValue> = tags
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let body = serde_json::json!({
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": now_ms(),
            "tags": tags,
        });
        self.post::<Created>("/api/2.0/mlflow/runs/create", &body)
            .map(|c| c.run)
    }

    /// Logs params and metrics in one request (REST API: "Log Batch"; at most 100 params and
    /// 1000 metrics per request, so larger sets are split).
    pub fn log_batch(
        &self,
        run_id: &str,
        params: &BTreeMap<String, String>,
        metrics: &[Metric],
    ) -> Result<(), Error> {
        let params: Vec<KeyValue> = params
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let mut p = params.chunks(100);
        let mut m = metrics.chunks(1000);
        loop {
            let (pc, mc) = (p.next(), m.next());
            if pc.is_none() && mc.is_none() {
                return Ok(());
            }
            let body = serde_json::json!({
                "run_id": run_id,
                "params": pc.unwrap_or(&[]),
                "metrics": mc.unwrap_or(&[]),
            });
            self.post::<serde_json::Value>("/api/2.0/mlflow/runs/log-batch", &body)?;
        }
    }

    /// Logs per-epoch metrics with `step = epoch` (REST API: "Log Batch").
    pub fn log_epoch(
        &self,
        run_id: &str,
        epoch: u32,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<(), Error> {
        let ts = now_ms();
        let ms: Vec<Metric> = metrics
            .iter()
            .map(|(k, v)| Metric {
                key: k.clone(),
                value: *v,
                timestamp: ts,
                step: i64::from(epoch),
            })
            .collect();
        self.log_batch(run_id, &BTreeMap::new(), &ms)
    }

    /// Uploads `bytes` as `<run artifacts>/<path>` through the server's artifact proxy
    /// (`mlflow server --serve-artifacts`; REST: `PUT /api/2.0/mlflow-artifacts/artifacts/...`).
    pub fn upload_artifact(&self, run: &RunInfo, path: &str, bytes: Vec<u8>) -> Result<(), Error> {
        let rel = proxy_path(&run.artifact_uri, &run.experiment_id, &run.run_id);
        let url_path = format!(
            "/api/2.0/mlflow-artifacts/artifacts/{rel}/{}",
            path.trim_start_matches('/')
        );
        let endpoint = format!("PUT {url_path}");
        let req = self
            .http
            .put(format!("{}{}", self.base, url_path))
            .body(bytes);
        self.send(&endpoint, req).map(|_| ())
    }

    /// Downloads an artifact by its `mlflow-artifacts:/...` URI through the proxy
    /// (REST: `GET /api/2.0/mlflow-artifacts/artifacts/...`).
    pub fn download_artifact(&self, artifact_uri: &str) -> Result<Vec<u8>, Error> {
        let rel = artifact_uri
            .strip_prefix("mlflow-artifacts:")
            .map(|r| r.trim_start_matches('/'))
            .ok_or_else(|| Error::Mlflow {
                endpoint: "artifact download".into(),
                status: 0,
                error_code: "UNSUPPORTED_ARTIFACT_URI".into(),
                message: format!(
                    "{artifact_uri:?} is not served by the tracking server's artifact proxy \
                     (start it with --serve-artifacts)"
                ),
            })?;
        let url_path = format!("/api/2.0/mlflow-artifacts/artifacts/{rel}");
        let endpoint = format!("GET {url_path}");
        let resp = self.send(
            &endpoint,
            self.http.get(format!("{}{}", self.base, url_path)),
        )?;
        resp.bytes()
            .map(|b| b.to_vec())
            .map_err(|e| Error::MlflowUnreachable {
                url: self.base.clone(),
                endpoint,
                reason: e.to_string(),
            })
    }

    /// Ends a run (REST API: "Update Run" with `status` and `end_time`).
    pub fn end_run(&self, run_id: &str, status: RunStatus) -> Result<(), Error> {
        let body = serde_json::json!({
            "run_id": run_id,
            "status": status.as_str(),
            "end_time": now_ms(),
        });
        self.post::<serde_json::Value>("/api/2.0/mlflow/runs/update", &body)
            .map(|_| ())
    }

    /// Reads a run (REST API: "Get Run").
    pub fn get_run(&self, run_id: &str) -> Result<Run, Error> {
        #[derive(Deserialize)]
        struct Got {
            run: Run,
        }
        self.get::<Got>("/api/2.0/mlflow/runs/get", &[("run_id", run_id)])
            .map(|g| g.run)
    }

    /// Creates registered model `name`; an existing one is fine (REST API: "Create
    /// RegisteredModel", `RESOURCE_ALREADY_EXISTS` tolerated).
    pub fn ensure_registered_model(&self, name: &str) -> Result<(), Error> {
        match self.post::<serde_json::Value>(
            "/api/2.0/mlflow/registered-models/create",
            &serde_json::json!({ "name": name }),
        ) {
            Ok(_) => Ok(()),
            Err(Error::Mlflow { error_code, .. }) if error_code == "RESOURCE_ALREADY_EXISTS" => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Registers `source` (an artifact URI inside run `run_id`) as a new version of `name`
    /// (REST API: "Create ModelVersion").
    pub fn create_model_version(
        &self,
        name: &str,
        source: &str,
        run_id: &str,
    ) -> Result<ModelVersion, Error> {
        #[derive(Deserialize)]
        struct Created {
            model_version: ModelVersion,
        }
        let body = serde_json::json!({ "name": name, "source": source, "run_id": run_id });
        self.post::<Created>("/api/2.0/mlflow/model-versions/create", &body)
            .map(|c| c.model_version)
    }

    /// Points `alias` of `name` at `version` (REST API: "Set Registered Model Alias").
    pub fn set_alias(&self, name: &str, alias: &str, version: &str) -> Result<(), Error> {
        let body = serde_json::json!({ "name": name, "alias": alias, "version": version });
        self.post::<serde_json::Value>("/api/2.0/mlflow/registered-models/alias", &body)
            .map(|_| ())
    }

    /// Resolves a `models:/` URI to its model version (REST API: "Get Model Version by
    /// Alias", "Get ModelVersion").
    pub fn resolve(&self, uri: &ModelUri) -> Result<ModelVersion, Error> {
        #[derive(Deserialize)]
        struct Got {
            model_version: ModelVersion,
        }
        match &uri.reference {
            ModelRef::Alias(alias) => self
                .get::<Got>(
                    "/api/2.0/mlflow/registered-models/alias",
                    &[("name", uri.name.as_str()), ("alias", alias.as_str())],
                )
                .map(|g| g.model_version)
                .map_err(|e| match e {
                    Error::Mlflow {
                        endpoint,
                        status,
                        error_code,
                        message,
                    } => Error::Mlflow {
                        endpoint,
                        status,
                        error_code,
                        message: format!("{uri}: alias {alias:?}: {message}"),
                    },
                    other => other,
                }),
            ModelRef::Version(v) => {
                let v = v.to_string();
                self.get::<Got>(
                    "/api/2.0/mlflow/model-versions/get",
                    &[("name", uri.name.as_str()), ("version", v.as_str())],
                )
                .map(|g| g.model_version)
            }
        }
    }

    /// Resolves `uri` and downloads its `model.onnx` (the version's `source` plus
    /// [`MODEL_FILE`]) through the artifact proxy.
    pub fn pull_onnx(&self, uri: &ModelUri) -> Result<PulledModel, Error> {
        let version = self.resolve(uri)?;
        let mut source = version.source.clone();
        if let Some(rest) = source.strip_prefix("runs:/") {
            // Design: `runs:/<run_id>/<path>` is resolved through the run's artifact root.
            let (run_id, path) = rest.split_once('/').unwrap_or((rest, ""));
            let run = self.get_run(run_id)?;
            source = format!("{}/{}", run.info.artifact_uri.trim_end_matches('/'), path);
        }
        let onnx =
            self.download_artifact(&format!("{}/{}", source.trim_end_matches('/'), MODEL_FILE))?;
        Ok(PulledModel {
            uri: uri.clone(),
            version,
            onnx,
        })
    }

    /// Uploads `onnx` as `<run>/model/model.onnx`, registers it as a new version of `name`
    /// (creating the registered model if needed) and, with `alias`, points the alias at it.
    pub fn register_onnx(
        &self,
        run: &RunInfo,
        name: &str,
        onnx: Vec<u8>,
        alias: Option<&str>,
    ) -> Result<ModelVersion, Error> {
        self.upload_artifact(run, &format!("{MODEL_ARTIFACT_DIR}/{MODEL_FILE}"), onnx)?;
        self.ensure_registered_model(name)?;
        let source = format!(
            "{}/{MODEL_ARTIFACT_DIR}",
            run.artifact_uri.trim_end_matches('/')
        );
        let mv = self.create_model_version(name, &source, &run.run_id)?;
        if let Some(a) = alias {
            self.set_alias(name, a, &mv.version)?;
        }
        Ok(mv)
    }
}

/// The path under the artifact proxy for a run's artifact root: the part of
/// `mlflow-artifacts:/<exp>/<run>/artifacts` after the scheme, or `<exp>/<run>/artifacts` when
/// the server reports another scheme.
fn proxy_path(artifact_uri: &str, experiment_id: &str, run_id: &str) -> String {
    match artifact_uri.strip_prefix("mlflow-artifacts:") {
        Some(r) => r.trim_matches('/').to_string(),
        None => format!("{experiment_id}/{run_id}/artifacts"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_uris_parse() {
        let a = ModelUri::parse("models:/vad@champion").expect("alias");
        assert_eq!(a.name, "vad");
        assert_eq!(a.reference, ModelRef::Alias("champion".into()));
        assert_eq!(a.to_string(), "models:/vad@champion");
        let v = ModelUri::parse("models:/vad/3").expect("version");
        assert_eq!(v.reference, ModelRef::Version(3));
        for bad in [
            "vad@champion",
            "models:/",
            "models:/vad",
            "models:/vad@",
            "models:/@x",
            "models:/vad/0",
            "models:/vad/x",
            "models:/a/b/1",
        ] {
            let e = ModelUri::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
