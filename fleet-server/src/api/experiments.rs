//! `/v1/experiments`: A/B experiments between releases (see
//! [`crate::experiments`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::parse_body;
use crate::experiments::{self, CreateExperiment};
use crate::{Result, State};

type S = AxState<Arc<State>>;

/// The experiment routes (mounted behind the bearer check by [`super::app`]).
pub fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/v1/experiments", get(list).post(create))
        .route("/v1/experiments/{id}", get(show))
        .route("/v1/experiments/{id}/cancel", post(cancel))
}

async fn list(AxState(s): S) -> Result<Json<Value>> {
    Ok(Json(json!({ "experiments": experiments::list(&s)? })))
}

async fn create(AxState(s): S, body: Bytes) -> Result<Json<Value>> {
    let spec: CreateExperiment = parse_body(&body)?;
    let e = experiments::create(&s, spec).await?;
    Ok(Json(json!({ "experiment": e })))
}

async fn show(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    Ok(Json(json!({ "experiment": experiments::get(&s, &id)? })))
}

async fn cancel(AxState(s): S, Path(id): Path<String>) -> Result<Json<Value>> {
    Ok(Json(
        json!({ "experiment": experiments::cancel(&s, &id).await? }),
    ))
}
