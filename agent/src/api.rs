//! The local inference API (axum 0.8). `app(state)` builds the router so
//! tests call it without a socket; `serve` binds 127.0.0.1 TCP and an
//! optional Unix socket.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/infer` | JSON `{"inputs":[Tensor...], "stream":"id"?}` -> `{"release":{..},"outputs":[Tensor...],"request_id":"..."}`; or binary (below) |
//! | `POST /v1/feedback` | `{"request_id":"...","label":N}` -> `{"request_id","release","answer","label","agreed"}`; 404 unknown or expired id, 400 naming the bad field, 409 already labelled |
//! | `GET /v1/model` | active release, its `model.json`, trial and update state |
//! | `GET /healthz` | 200 while a verified, self-tested model answers requests ([`Engine::ready`]: the active model, or the candidate serving a first install), else 503 |
//! | `GET /metrics` | Prometheus text (docs/specs/telemetry.md); names from `edgefleet_protocol::telemetry::names` only |
//!
//! Binary form (`Content-Type: application/octet-stream`): the body is every
//! model input in `model.json` order, each as its raw little-endian elements
//! (f32 or i64, row-major, exactly `product(shape)` elements; no header);
//! an optional `x-edgefleet-stream` header names the stream. The reply is
//! every output in order, raw little-endian f32/i64, with the answering
//! release in the `x-edgefleet-release` header (`model@release`).
//!
//! Every successful inference carries its request id (`crate::feedback`,
//! format `<16 hex boot id>-<n>`) in the `x-edgefleet-request-id` header
//! (both forms) and the JSON field `request_id`; post a ground-truth label
//! for it to `/v1/feedback`.
//!
//! A full queue answers 503 with `Retry-After: 1`; a request not answered
//! within the configured timeout answers 504.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgefleet_bundle::payload::{Tensor, TensorData};
use edgefleet_protocol::messages::ReleaseRef;
use serde::{Deserialize, Serialize};

use crate::capture::Capture;
use crate::engine::{label, Engine, SubmitError};
use crate::feedback::{Answer, Feedback, FeedbackError};

/// Header carrying the request id of an inference.
pub const REQUEST_ID_HEADER: &str = "x-edgefleet-request-id";

/// What the agent reports about itself (shared with the updater and MQTT).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusInfo {
    /// Active release.
    pub active: Option<ReleaseRef>,
    /// Previous release.
    pub previous: Option<ReleaseRef>,
    /// Update state name.
    pub update_state: String,
}

/// Router state.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// Engine.
    pub engine: Arc<Engine>,
    /// Status.
    pub status: Arc<Mutex<StatusInfo>>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Request ids and labels.
    pub feedback: Arc<Feedback>,
    /// Data capture (labels are attached to captured samples), if running.
    pub capture: Option<Arc<Mutex<Capture>>>,
}

impl ApiState {
    /// State with a fresh [`Feedback`] memory and no capture.
    pub fn new(engine: Arc<Engine>, status: Arc<Mutex<StatusInfo>>, timeout: Duration) -> Self {
        ApiState {
            engine,
            status,
            timeout,
            feedback: Arc::new(Feedback::default()),
            capture: None,
        }
    }
}

/// The API error type.
#[derive(Debug)]
pub enum ApiError {
    /// 400.
    BadRequest(String),
    /// 404.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 503 + Retry-After.
    Saturated,
    /// 503, no model.
    NoModel,
    /// 504.
    Timeout,
    /// 500.
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Saturated => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    Json(serde_json::json!({"error": "queue full"})),
                )
                    .into_response()
            }
            ApiError::NoModel => (StatusCode::SERVICE_UNAVAILABLE, "no model loaded".into()),
            ApiError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "inference timed out".into()),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (code, Json(serde_json::json!({"error": msg}))).into_response()
    }
}

/// JSON infer request (unknown fields are refused: a misspelt `stream`
/// would otherwise be dropped silently).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// Inputs.
    pub inputs: Vec<Tensor>,
    /// Optional stream id for stateful models.
    #[serde(default)]
    pub stream: Option<String>,
}

/// JSON infer response.
#[derive(Debug, Deserialize, Serialize)]
pub struct InferResponse {
    /// Release that answered.
    pub release: ReleaseRef,
    /// Outputs.
    pub outputs: Vec<Tensor>,
    /// The request id for `/v1/feedback` (also in `x-edgefleet-request-id`).
    #[serde(default)]
    pub request_id: String,
}

/// `POST /v1/feedback` body: a ground-truth label for a served request.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The inference's request id.
    pub request_id: String,
    /// Class id (classifier) or 0/1 (probability output).
    pub label: u64,
}

/// `POST /v1/feedback` answer.
#[derive(Debug, Deserialize, Serialize)]
pub struct FeedbackResponse {
    /// The request id.
    pub request_id: String,
    /// Release that answered the request.
    pub release: ReleaseRef,
    /// The model's answer in label units.
    pub answer: u64,
    /// The label received.
    pub label: u64,
    /// `answer == label`.
    pub agreed: bool,
}

/// The router.
pub fn app(state: ApiState) -> Router {
    Router::new()
        .route("/v1/infer", post(infer))
        .route("/v1/feedback", post(feedback))
        .route("/v1/model", get(model))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Runs a request under a new request id and remembers the model's answer
/// for feedback; returns the reply and the id.
async fn run(
    st: &ApiState,
    inputs: Vec<Tensor>,
    stream: Option<String>,
) -> Result<(crate::engine::Reply, String), ApiError> {
    let id = st.feedback.new_id();
    let r = run_tagged(st, inputs, stream, &id).await?;
    let answer = spec_of(&st.engine, &r.release).and_then(|spec| Answer::of(&spec, &r.outputs));
    st.feedback.record(&id, r.release.clone(), answer);
    Ok((r, id))
}

/// The spec of the loaded model that is `release` (active or trial).
fn spec_of(engine: &Engine, release: &ReleaseRef) -> Option<edgefleet_bundle::payload::ModelSpec> {
    engine
        .active()
        .filter(|m| &m.release == release)
        .or_else(|| {
            engine
                .trial()
                .map(|t| t.model.clone())
                .filter(|m| &m.release == release)
        })
        .map(|m| m.spec.clone())
}

async fn run_tagged(
    st: &ApiState,
    inputs: Vec<Tensor>,
    stream: Option<String>,
    id: &str,
) -> Result<crate::engine::Reply, ApiError> {
    let rx = st
        .engine
        .submit_with_id(inputs, stream, st.timeout, Some(id.to_string()))
        .map_err(|e| match e {
            SubmitError::Saturated => ApiError::Saturated,
            SubmitError::NoModel => ApiError::NoModel,
        })?;
    match tokio::time::timeout(st.timeout, rx).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(_)) => Err(ApiError::Internal("worker dropped the request".into())),
        Ok(Ok(Err(crate::runtime::RunError::BadInput(m)))) => Err(ApiError::BadRequest(m)),
        Ok(Ok(Err(e))) => Err(ApiError::Internal(e.to_string())),
        Ok(Ok(Ok(r))) => Ok(r),
    }
}

/// Refuses a named input the model does not have, or one given twice
/// (unnamed inputs are positional), naming it and listing the model's inputs.
fn check_input_names(
    spec: &edgefleet_bundle::payload::ModelSpec,
    inputs: &[Tensor],
) -> Result<(), ApiError> {
    let known = || {
        spec.inputs
            .iter()
            .map(|s| format!("`{}`", s.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, t) in inputs.iter().enumerate() {
        if t.name.is_empty() {
            continue;
        }
        if !spec.inputs.iter().any(|s| s.name == t.name) {
            return Err(ApiError::BadRequest(format!(
                "unknown input `{}`; the model's inputs: {}",
                t.name,
                known()
            )));
        }
        if inputs[..i].iter().any(|u| u.name == t.name) {
            return Err(ApiError::BadRequest(format!(
                "input `{}` is given twice; the model's inputs: {}",
                t.name,
                known()
            )));
        }
    }
    Ok(())
}

async fn infer(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    if !binary {
        let req: InferRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("request JSON: {e}")))?;
        let model = st.engine.serving().ok_or(ApiError::NoModel)?;
        check_input_names(&model.spec, &req.inputs)?;
        let (r, id) = run(&st, req.inputs, req.stream).await?;
        return Ok((
            [(
                header::HeaderName::from_static(REQUEST_ID_HEADER),
                id.clone(),
            )],
            Json(InferResponse {
                release: r.release,
                outputs: r.outputs,
                request_id: id,
            }),
        )
            .into_response());
    }
    let model = st.engine.serving().ok_or(ApiError::NoModel)?;
    let stream = headers
        .get("x-edgefleet-stream")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut off = 0usize;
    let mut inputs = Vec::new();
    for spec in &model.spec.inputs {
        if stream.is_some() && model.spec.state.iter().any(|b| b.input == spec.name) {
            continue;
        }
        let n = spec.len();
        let w = spec.dtype.size();
        let bytes = body.get(off..off + n * w).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "body too short for input `{}` ({} bytes)",
                spec.name,
                n * w
            ))
        })?;
        off += n * w;
        let data = TensorData::from_le_bytes(spec.dtype, bytes)
            .map_err(|e| ApiError::BadRequest(format!("input `{}`: {e}", spec.name)))?;
        inputs.push(Tensor {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            data,
        });
    }
    if off != body.len() {
        return Err(ApiError::BadRequest(format!(
            "body has {} bytes, the inputs take {off}",
            body.len()
        )));
    }
    let (r, id) = run(&st, inputs, stream).await?;
    let mut out = Vec::new();
    for t in &r.outputs {
        out.extend(t.data.to_le_bytes());
    }
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-edgefleet-release"),
                label(&r.release),
            ),
            (header::HeaderName::from_static(REQUEST_ID_HEADER), id),
        ],
        out,
    )
        .into_response())
}

/// Parses a feedback body, naming the field at fault.
fn parse_feedback(body: &[u8]) -> Result<FeedbackRequest, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("request JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::BadRequest("request JSON: expected an object".into()))?;
    if let Some(k) = obj.keys().find(|k| *k != "request_id" && *k != "label") {
        return Err(ApiError::BadRequest(format!(
            "unknown field `{k}`, expected `request_id` and `label`"
        )));
    }
    let request_id = match obj.get("request_id") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "field `request_id` must be a non-empty string".into(),
            ))
        }
        None => return Err(ApiError::BadRequest("missing field `request_id`".into())),
    };
    let label = match obj.get("label") {
        Some(l) => l.as_u64().ok_or_else(|| {
            ApiError::BadRequest(format!(
                "field `label` = {l} must be a non-negative integer (class id, or 0/1)"
            ))
        })?,
        None => return Err(ApiError::BadRequest("missing field `label`".into())),
    };
    Ok(FeedbackRequest { request_id, label })
}

async fn feedback(State(st): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let req = parse_feedback(&body)?;
    let accepted = match st.feedback.label(&req.request_id, req.label) {
        Ok(a) => a,
        Err(e @ FeedbackError::Unknown(..)) => {
            if let Ok(mut s) = st.engine.stats.lock() {
                s.record_unknown_feedback();
            }
            return Err(ApiError::NotFound(e.to_string()));
        }
        Err(e @ FeedbackError::BadLabel(_)) => return Err(ApiError::BadRequest(e.to_string())),
        Err(e @ FeedbackError::AlreadyLabelled(_)) => {
            return Err(ApiError::Conflict(e.to_string()))
        }
    };
    if let Ok(mut s) = st.engine.stats.lock() {
        s.record_feedback(&accepted.release, accepted.agreed);
    }
    if let Some(c) = &st.capture {
        let r = c.lock().map(|mut c| c.label(&req.request_id, req.label));
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "label not attached to the captured sample");
        }
    }
    Ok(Json(FeedbackResponse {
        request_id: req.request_id,
        release: accepted.release,
        answer: accepted.answer,
        label: req.label,
        agreed: accepted.agreed,
    })
    .into_response())
}

async fn model(State(st): State<ApiState>) -> Response {
    let status = st.status.lock().map(|s| s.clone()).unwrap_or_default();
    let m = st.engine.active();
    let trial = st.engine.trial().map(|t| {
        serde_json::json!({"release": t.model.release, "mode": t.mode, "elapsed_s": t.started.elapsed().as_secs_f64()})
    });
    Json(serde_json::json!({
        "release": m.as_ref().map(|m| m.release.clone()),
        "spec": m.as_ref().map(|m| m.spec.clone()),
        "previous": status.previous,
        "update_state": status.update_state,
        "trial": trial,
    }))
    .into_response()
}

/// `{"ready", "release", "update_state"}`: readiness is the engine's
/// ([`Engine::ready`]), read at each call; `release` is the one answering.
async fn healthz(State(st): State<ApiState>) -> Response {
    let serving = st.engine.serving();
    let ready = serving.is_some();
    let state = st
        .status
        .lock()
        .map(|s| s.update_state.clone())
        .unwrap_or_default();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let release = serving.map(|m| m.release.clone());
    (
        code,
        Json(serde_json::json!({"ready": ready, "release": release, "update_state": state})),
    )
        .into_response()
}

/// Prometheus text of every metric in `edgefleet_protocol::telemetry::names`
/// (telemetry stats, outbox, rollbacks, drift PSI, `model_ready` from
/// [`Engine::ready`]; see docs/specs/telemetry.md).
pub fn render_metrics(engine: &Engine) -> String {
    engine.render_metrics()
}

async fn metrics(State(st): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&st.engine),
    )
        .into_response()
}

/// Resident set size from /proc/self/statm (0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// Serves the router on TCP (and a Unix socket when given) until `shutdown` resolves.
///
/// # Errors
/// Bind errors naming the address or path.
pub async fn serve(
    state: ApiState,
    listen: std::net::SocketAddr,
    unix: Option<std::path::PathBuf>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context as _;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("api.listen {listen}"))?;
    let addr = tcp.local_addr()?;
    let router = app(state);
    let mut sd = shutdown.clone();
    let r = router.clone();
    tokio::spawn(async move {
        let _ = axum::serve(tcp, r)
            .with_graceful_shutdown(async move {
                let _ = sd.wait_for(|v| *v).await;
            })
            .await;
    });
    if let Some(path) = unix {
        let _ = std::fs::remove_file(&path);
        let ul = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("api.unix_socket {}", path.display()))?;
        let mut sd = shutdown;
        tokio::spawn(async move {
            let _ = axum::serve(ul, router)
                .with_graceful_shutdown(async move {
                    let _ = sd.wait_for(|v| *v).await;
                })
                .await;
        });
    }
    Ok(addr)
}
