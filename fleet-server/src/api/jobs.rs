//! `/v1/jobs`: retraining jobs for operators (list, show, create, cancel)
//! and for training workers (claim, heartbeat, complete, fail); see
//! [`crate::jobs`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{parse_body, query};
use crate::jobs::{self, ClaimRequest, Completion, CreateJob, Failure, Heartbeat, JobState};
use crate::{Error, Result, State};

type S = AxState<Arc<State>>;

/// The job routes (mounted behind the bearer check by [`super::app`]).
pub fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/v1/jobs", get(list).post(create))
        .route("/v1/jobs/claim", post(claim))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/heartbeat", post(heartbeat))
        .route("/v1/jobs/{id}/complete", post(complete))
        .route("/v1/jobs/{id}/fail", post(fail))
}

/// Runs a store operation off the async workers (it fsyncs).
async fn blocking<T: Send + 'static>(
    s: &Arc<State>,
    f: impl FnOnce(&State) -> Result<T> + Send + 'static,
) -> Result<T> {
    let st = s.clone();
    tokio::task::spawn_blocking(move || f(&st))
        .await
        .map_err(|e| Error::Conflict(format!("job task failed: {e}")))?
}

#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<JobState>,
    group: Option<String>,
}

async fn list(
    s: S,
    q: std::result::Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>> {
    let q = query(q)?;
    let jobs: Vec<_> = blocking(&s.0, jobs::list)
        .await?
        .into_iter()
        .filter(|j| q.state.is_none_or(|st| j.state == st))
        .filter(|j| q.group.as_ref().is_none_or(|g| &j.spec.group == g))
        .collect();
    Ok(Json(json!({ "jobs": jobs })))
}

async fn create(s: S, body: Bytes) -> Result<Json<Value>> {
    let spec: CreateJob = parse_body(&body)?;
    let (job, created) = blocking(&s.0, move |st| jobs::create(st, spec)).await?;
    Ok(Json(json!({ "job": job, "created": created })))
}

async fn show(s: S, Path(id): Path<String>) -> Result<Json<Value>> {
    let job = blocking(&s.0, move |st| jobs::get(st, &id)).await?;
    Ok(Json(json!({ "job": job })))
}

async fn cancel(s: S, Path(id): Path<String>) -> Result<Json<Value>> {
    let job = blocking(&s.0, move |st| jobs::cancel(st, &id, "operator")).await?;
    Ok(Json(json!({ "job": job })))
}

async fn claim(s: S, body: Bytes) -> Result<Response> {
    let req: ClaimRequest = parse_body(&body)?;
    Ok(
        match blocking(&s.0, move |st| jobs::claim(st, &req)).await? {
            Some(c) => Json(c).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
    )
}

async fn heartbeat(s: S, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let hb: Heartbeat = parse_body(&body)?;
    let job = blocking(&s.0, move |st| jobs::heartbeat(st, &id, &hb)).await?;
    Ok(Json(json!({ "job": job })))
}

async fn complete(s: S, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let c: Completion = parse_body(&body)?;
    let job = blocking(&s.0, move |st| jobs::complete(st, &id, &c)).await?;
    Ok(Json(json!({ "job": job })))
}

async fn fail(s: S, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let f: Failure = parse_body(&body)?;
    let job = blocking(&s.0, move |st| jobs::fail(st, &id, &f)).await?;
    Ok(Json(json!({ "job": job })))
}
