//! The crate's one error type. It implements [`IntoResponse`], so API handlers
//! return it directly and every failure becomes a JSON error naming what is wrong.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Everything that can go wrong in the fleet server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token (send `Authorization: Bearer <token>`)")]
    Unauthorized,
    /// A resource does not exist.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// Kind of resource (`device`, `bundle`, `rollout`).
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A request field is invalid.
    #[error("invalid `{field}`: {reason}")]
    BadRequest {
        /// The field (or `body`).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The request conflicts with current state (e.g. a device already in an active rollout).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A bundle failed to parse or verify.
    #[error("bundle rejected: {0}")]
    Bundle(#[from] edgefleet_bundle::Error),
    /// A protocol encoding error.
    #[error("protocol: {0}")]
    Protocol(#[from] edgefleet_protocol::Error),
    /// The sled store failed.
    #[error("store: {0}")]
    Store(#[from] sled::Error),
    /// A stored record did not decode.
    #[error("store record `{key}`: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoder's message.
        reason: String,
    },
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// MQTT client or broker failure.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// Invalid configuration.
    #[error("config: {0}")]
    Config(String),
}

/// Crate result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `Io` with the path.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    /// `BadRequest` shorthand.
    pub fn bad(field: &'static str, reason: impl Into<String>) -> Self {
        Error::BadRequest {
            field,
            reason: reason.into(),
        }
    }
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Error::BadRequest { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::Bundle(_) => (StatusCode::UNPROCESSABLE_ENTITY, "bundle_rejected"),
            Error::Protocol(_) => (StatusCode::UNPROCESSABLE_ENTITY, "protocol"),
            Error::Store(_) | Error::Corrupt { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
            Error::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "io"),
            Error::Mqtt(_) => (StatusCode::SERVICE_UNAVAILABLE, "mqtt"),
            Error::Config(_) => (StatusCode::INTERNAL_SERVER_ERROR, "config"),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = serde_json::json!({ "error": { "code": code, "message": self.to_string() } });
        (status, Json(body)).into_response()
    }
}
