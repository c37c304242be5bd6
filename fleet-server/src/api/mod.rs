//! The operator REST API under `/v1` (OpenAPI at `/v1/openapi.json`).
//! Every route but `/v1/health` and `/v1/openapi.json` needs
//! `Authorization: Bearer <token>`; errors are JSON `{"error": {code, message}}`.
//!
//! Request bodies and query strings refuse unknown fields with 400 naming the
//! field ([`parse_body`], [`query`]): a misspelt selector must not select the
//! whole fleet.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as AxState};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest as _;

mod experiments;
mod jobs;

use crate::registry::Selector;
use crate::rollout::RolloutSpec;
use crate::{Error, Result, State};

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");

type S = AxState<Arc<State>>;

/// The router (tests call it without a socket).
pub fn app(state: Arc<State>) -> Router {
    let protected = Router::new()
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/tags", post(edit_tags))
        .route("/v1/devices/{id}/groups", post(edit_groups))
        .route("/v1/devices/{id}/config", post(send_config))
        .route(
            "/v1/devices/{id}/credentials",
            get(show_credentials)
                .post(issue_credentials)
                .delete(revoke_credentials),
        )
        .route("/v1/bundles", get(list_bundles).post(upload_bundle))
        .route("/v1/bundles/{sha}", get(show_bundle))
        .route("/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route("/v1/rollouts/{id}", get(show_rollout))
        .route("/v1/rollouts/{id}/{action}", post(control_rollout))
        .route("/v1/telemetry", get(telemetry))
        .route("/v1/drift", get(drift))
        .route("/v1/retraining", get(retraining))
        .route(
            "/v1/groups/{group}/capture",
            get(show_capture).put(set_capture),
        )
        .route("/v1/groups/{group}/capture/requests", post(request_capture))
        .route("/v1/datasets", get(list_datasets).post(create_dataset))
        .route("/v1/datasets/{id}", get(show_dataset))
        .route("/v1/datasets/{id}/batches/{capture_id}", get(dataset_batch))
        .route("/v1/stats", get(stats))
        .merge(jobs::routes())
        .merge(experiments::routes())
        .layer(DefaultBodyLimit::max(1 << 30))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/v1/health", get(|| async { Json(json!({"ok": true})) }))
        .route(
            "/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(protected)
        .merge(crate::dashboard::router(state.clone()))
        .fallback(|| async {
            Error::NotFound {
                what: "route",
                id: "see /v1/openapi.json".into(),
            }
        })
        .with_state(state)
}

/// Constant-time comparison (of SHA-256 digests, so lengths do not leak either).
pub fn token_eq(a: &str, b: &str) -> bool {
    let (x, y) = (
        sha2::Sha256::digest(a.as_bytes()),
        sha2::Sha256::digest(b.as_bytes()),
    );
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

async fn auth(AxState(state): S, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !state.config.token.is_empty() && token_eq(t.trim(), &state.config.token));
    if !ok {
        return Error::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Parses a JSON request body, refusing unknown fields at any depth with a
/// 400 naming the field. Server types say `deny_unknown_fields`; protocol
/// types a body embeds (`TrialPolicy`, `ConfigUpdate`, `TestConfig`)
/// ignore unknown fields on the air for forward compatibility
/// (docs/specs/mqtt.md), so the body's keys are also checked against what the
/// parsed value keeps: a key it would drop is refused.
///
/// # Errors
/// [`Error::BadRequest`] (`body`) for bad JSON, a schema error, or an unknown field.
pub fn parse_body<T: DeserializeOwned + Serialize>(body: &[u8]) -> Result<T> {
    let raw: Value = serde_json::from_slice(body)
        .map_err(|e| Error::bad("body", format!("not a JSON document: {e}")))?;
    let parsed: T =
        serde_json::from_value(raw.clone()).map_err(|e| Error::bad("body", e.to_string()))?;
    let kept = serde_json::to_value(&parsed).map_err(|e| Error::bad("body", e.to_string()))?;
    match unknown_field(&raw, &kept) {
        Some(path) => Err(Error::bad("body", format!("unknown field `{path}`"))),
        None => Ok(parsed),
    }
}

/// The first key path in `raw` that `kept` (the parsed value, serialised
/// again) does not have, e.g. `trial.windw_s`.
fn unknown_field(raw: &Value, kept: &Value) -> Option<String> {
    match (raw, kept) {
        (Value::Object(r), Value::Object(k)) => r.iter().find_map(|(key, rv)| match k.get(key) {
            None => Some(key.clone()),
            Some(kv) => unknown_field(rv, kv).map(|sub| format!("{key}.{sub}")),
        }),
        (Value::Array(r), Value::Array(k)) => r
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (rv, kv))| unknown_field(rv, kv).map(|sub| format!("{i}.{sub}"))),
        _ => None,
    }
}

/// A query string's filters, or a 400 naming what is wrong (an unknown
/// parameter included).
///
/// # Errors
/// [`Error::BadRequest`] (`query`).
pub fn query<T>(q: std::result::Result<Query<T>, QueryRejection>) -> Result<T> {
    q.map(|Query(t)| t)
        .map_err(|e| Error::bad("query", e.body_text()))
}

async fn list_devices(
    AxState(s): S,
    q: std::result::Result<Query<Selector>, QueryRejection>,
) -> Result<Json<Value>> {
    let sel = query(q)?;
    let devices: Vec<_> = s
        .registry
        .list()?
        .into_iter()
        .filter(|d| sel.matches(d))
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

async fn show_device(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    let d = s.registry.get(&id)?.ok_or_else(|| Error::NotFound {
        what: "device",
        id: id.clone(),
    })?;
    let rollouts: Vec<Value> = s
        .lock_rollouts()
        .values()
        .filter_map(|r| {
            r.devices
                .get(&id)
                .map(|p| json!({"rollout": r.id, "state": r.state, "device": p}))
        })
        .collect();
    Ok(Json(json!({ "device": d, "rollouts": rollouts })))
}

/// `{"add": [..], "remove": [..]}`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Edit {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

fn check_names(field: &'static str, v: &[String]) -> Result<()> {
    for n in v {
        if n.is_empty()
            || n.len() > 64
            || !n
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-:".contains(&c))
        {
            return Err(Error::bad(
                field,
                format!("`{n}` is not 1-64 characters of [A-Za-z0-9._:-]"),
            ));
        }
    }
    Ok(())
}

fn edit(set: &mut BTreeSet<String>, e: &Edit) {
    set.extend(e.add.iter().cloned());
    for r in &e.remove {
        set.remove(r);
    }
}

async fn edit_tags(AxState(s): S, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let e: Edit = parse_body(&body)?;
    edit_device_set(&s, &id, &e, |d| &mut d.operator_tags)
}

async fn edit_groups(AxState(s): S, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let e: Edit = parse_body(&body)?;
    let out = edit_device_set(&s, &id, &e, |d| &mut d.groups)?;
    // Its effective capture policy may have changed with its groups.
    crate::capture::resend(&s, &id).await;
    Ok(out)
}

/// Sends `Down::Config` (QoS 1, docs/specs/mqtt.md) to a registered device:
/// telemetry interval, drift report interval, drift test settings, capture
/// policy. The agent
/// validates, persists and applies it without a restart
/// (`agent/src/settings.rs`). Both sides run `ConfigUpdate::validate`, so an
/// operator gets a 400 naming the field instead of a refusal on the device.
async fn send_config(AxState(s): S, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let c: edgefleet_protocol::messages::ConfigUpdate = parse_body(&body)?;
    c.validate().map_err(crate::capture::field_error)?;
    s.registry.get(&id)?.ok_or_else(|| Error::NotFound {
        what: "device",
        id: id.clone(),
    })?;
    let dev = edgefleet_protocol::DeviceId::new(&id)?;
    let client = s
        .mqtt
        .get()
        .ok_or_else(|| Error::Mqtt("not connected".into()))?;
    let down = edgefleet_protocol::Down::Config(c.clone());
    client
        .publish(
            edgefleet_protocol::topics::down(&dev, edgefleet_protocol::topics::DownKind::Command),
            rumqttc::QoS::AtLeastOnce,
            false,
            down.encode()?,
        )
        .await
        .map_err(|e| Error::Mqtt(e.to_string()))?;
    tracing::info!(device = %id, config = ?c, "config sent");
    Ok(Json(json!({ "device": id, "sent": c })))
}

/// Adds and removes names in one of a device's name sets (tags or groups).
fn edit_device_set(
    s: &crate::State,
    id: &str,
    e: &Edit,
    set: impl FnOnce(&mut crate::registry::Device) -> &mut BTreeSet<String>,
) -> Result<Json<Value>> {
    check_names("add", &e.add)?;
    s.registry.get(id)?.ok_or_else(|| Error::NotFound {
        what: "device",
        id: id.to_string(),
    })?;
    let d = s.registry.update(id, |d| edit(set(d), e))?;
    Ok(Json(json!({ "device": d })))
}

/// Creates or rotates a device's broker secret and returns it (the only time
/// it is shown; the store keeps a salted hash). The device need not be
/// registered yet: it cannot connect before it has credentials.
async fn issue_credentials(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    let c = s.credentials.clone();
    let issued = tokio::task::spawn_blocking(move || c.issue(&id))
        .await
        .map_err(|e| Error::Mqtt(e.to_string()))??;
    tracing::info!(
        device = %issued.device,
        rotated = issued.rotated,
        "device broker credentials issued"
    );
    Ok(Json(json!({ "credentials": issued })))
}

/// When a device's secret was issued (never the secret).
async fn show_credentials(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    let rec = s.credentials.get(&id)?.ok_or_else(|| Error::NotFound {
        what: "credentials of device",
        id: id.clone(),
    })?;
    Ok(Json(json!({
        "credentials": {"device": id, "username": id, "issued_ms": rec.issued_ms, "scheme": rec.scheme}
    })))
}

/// Removes a device's secret: its next connect to the embedded broker is refused.
async fn revoke_credentials(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    let c = s.credentials.clone();
    let i = id.clone();
    let had = tokio::task::spawn_blocking(move || c.revoke(&i))
        .await
        .map_err(|e| Error::Mqtt(e.to_string()))??;
    if !had {
        return Err(Error::NotFound {
            what: "credentials of device",
            id,
        });
    }
    tracing::info!(device = %id, "device broker credentials revoked");
    Ok(Json(json!({ "revoked": id })))
}

async fn upload_bundle(AxState(s): S, body: Bytes) -> Result<Json<Value>> {
    if body.is_empty() {
        return Err(Error::bad(
            "body",
            "empty: send the bundle file as the request body",
        ));
    }
    let b = s.bundles.clone();
    let up = tokio::task::spawn_blocking(move || b.upload_checked(&body))
        .await
        .map_err(|e| Error::Mqtt(e.to_string()))??;
    let created = matches!(up, crate::bundles::Upload::Stored(_));
    Ok(Json(
        json!({ "bundle": up.into_info(), "created": created }),
    ))
}

async fn list_bundles(AxState(s): S) -> Result<Json<Value>> {
    Ok(Json(json!({ "bundles": s.bundles.list()? })))
}

async fn show_bundle(AxState(s): S, Path(sha): Path<String>) -> Result<Json<Value>> {
    let b = s.bundles.get(&sha)?.ok_or_else(|| Error::NotFound {
        what: "bundle",
        id: sha,
    })?;
    Ok(Json(json!({ "bundle": b })))
}

fn rollout_json(r: &crate::rollout::Rollout, with_devices: bool) -> Value {
    let waves: Vec<Value> = (0..r.wave_ends.len())
        .map(|w| json!(r.wave_counts(w)))
        .collect();
    let mut v = json!({
        "id": r.id, "state": r.state, "bundle": r.spec.bundle, "release": r.release,
        "current_wave": r.current_wave, "waves": waves, "spec": r.spec,
        "created_ms": r.created_ms, "updated_ms": r.updated_ms, "history": r.history,
        "devices_total": r.order.len(),
    });
    if with_devices {
        v["devices"] = json!(r.devices);
    }
    v
}

async fn create_rollout(AxState(s): S, body: Bytes) -> Result<Json<Value>> {
    let spec: RolloutSpec = parse_body(&body)?;
    let r = s.create_rollout(spec).await?;
    Ok(Json(json!({ "rollout": rollout_json(&r, true) })))
}

async fn list_rollouts(AxState(s): S) -> Result<Json<Value>> {
    let v: Vec<Value> = s
        .lock_rollouts()
        .values()
        .map(|r| rollout_json(r, false))
        .collect();
    Ok(Json(json!({ "rollouts": v })))
}

async fn show_rollout(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    let map = s.lock_rollouts();
    let r = map.get(&id).ok_or_else(|| Error::NotFound {
        what: "rollout",
        id: id.clone(),
    })?;
    Ok(Json(json!({ "rollout": rollout_json(r, true) })))
}

async fn control_rollout(
    AxState(s): S,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let r = s.control_rollout(&id, &action).await?;
    Ok(Json(json!({ "rollout": rollout_json(&r, false) })))
}

async fn telemetry(
    AxState(s): S,
    q: std::result::Result<Query<crate::telemetry::Query>, QueryRejection>,
) -> Result<Json<Value>> {
    let q = query(q)?;
    Ok(Json(
        json!({ "telemetry": crate::telemetry::query(&s.store, &s.registry, &q)? }),
    ))
}

async fn drift(
    AxState(s): S,
    q: std::result::Result<Query<crate::drift::Query>, QueryRejection>,
) -> Result<Json<Value>> {
    let q = query(q)?;
    let (reports, series) = crate::drift::query(&s, &q)?;
    Ok(Json(json!({ "drift": reports, "series": series })))
}

async fn retraining(
    AxState(s): S,
    q: std::result::Result<Query<crate::drift::RequestQuery>, QueryRejection>,
) -> Result<Json<Value>> {
    let q = query(q)?;
    Ok(Json(
        json!({ "requests": crate::drift::requests_matching(&s, &q)? }),
    ))
}

fn check_group(group: &str) -> Result<()> {
    check_names("group", std::slice::from_ref(&group.to_string()))
}

async fn show_capture(AxState(s): S, Path(group): Path<String>) -> Result<Json<Value>> {
    check_group(&group)?;
    let stored = crate::capture::policy(&s, &group)?;
    Ok(Json(json!({
        "group": group,
        "policy": stored.unwrap_or_default(),
        "stored": stored.is_some(),
    })))
}

async fn set_capture(AxState(s): S, Path(group): Path<String>, body: Bytes) -> Result<Json<Value>> {
    check_group(&group)?;
    let p: edgefleet_protocol::capture::CapturePolicy = parse_body(&body)?;
    let sent = crate::capture::set_policy(&s, &group, p).await?;
    Ok(Json(
        json!({ "group": group, "policy": p, "sent_to": sent }),
    ))
}

/// `POST /v1/groups/{group}/capture/requests` body.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CaptureRequestBody {
    samples: u32,
}

async fn request_capture(
    AxState(s): S,
    Path(group): Path<String>,
    body: Bytes,
) -> Result<Json<Value>> {
    check_group(&group)?;
    let b: CaptureRequestBody = parse_body(&body)?;
    let (id, sent) = crate::capture::request(&s, &group, b.samples).await?;
    Ok(Json(json!({
        "request_id": id, "group": group, "samples": b.samples, "sent_to": sent
    })))
}

async fn create_dataset(AxState(s): S, body: Bytes) -> Result<Json<Value>> {
    let b: crate::datasets::CreateDataset = parse_body(&body)?;
    let (d, created) = crate::datasets::create(&s, &b)?;
    Ok(Json(json!({ "dataset": d, "created": created })))
}

async fn list_datasets(AxState(s): S) -> Result<Json<Value>> {
    Ok(Json(json!({ "datasets": crate::datasets::list(&s)? })))
}

async fn show_dataset(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    let d = crate::datasets::get(&s, &id)?.ok_or_else(|| Error::NotFound {
        what: "dataset",
        id: id.clone(),
    })?;
    Ok(Json(json!({ "dataset": d })))
}

async fn dataset_batch(
    AxState(s): S,
    Path((id, capture_id)): Path<(String, String)>,
) -> Result<Response> {
    let st = s.clone();
    let bytes =
        tokio::task::spawn_blocking(move || crate::datasets::batch_bytes(&st, &id, &capture_id))
            .await
            .map_err(|e| Error::Mqtt(e.to_string()))??;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn stats(AxState(s): S) -> Json<Value> {
    let st = &s.stats;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Json(json!({
        "messages": l(&st.messages), "impersonations": l(&st.impersonations), "undecodable": l(&st.undecodable),
        "telemetry_records": l(&st.telemetry_records), "telemetry_duplicates": l(&st.telemetry_duplicates),
        "chunks_sent": l(&st.chunks_sent), "offers_sent": l(&st.offers_sent),
        "broker_auth_refused": l(&st.broker_auth_refused),
        "broker_acl_denied": l(&st.broker_acl_denied),
    }))
}
