//! The local API refuses what it would otherwise silently ignore: an unknown
//! JSON field (a misspelt `stream`) and an input name the model does not
//! have, each with 400 naming it.
//!
//! ```sh
//! cargo test -p edgefleet-agent --test api_requests
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_agent::api::{ApiState, StatusInfo};
use edgefleet_agent::engine::Engine;
use edgefleet_agent::runtime::Model;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_bundle::payload::Tensor;
use edgefleet_protocol::messages::ReleaseRef;

/// Serves a testkit model (input `x` f32[1,4]) and returns the API address.
fn serve(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    for (p, b) in testkit::files(Kind::Good, "m", 1.0) {
        std::fs::write(dir.join(p), b).unwrap();
    }
    let model = Model::load(
        dir,
        ReleaseRef {
            model: "m".into(),
            release: 1,
            version: "1.0.0".into(),
        },
    )
    .unwrap();
    model.self_test().unwrap();
    let engine = Engine::start(1, 16, 1);
    engine.set_active(Some(Arc::new(model)));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let state = ApiState::new(
        engine,
        Arc::new(Mutex::new(StatusInfo::default())),
        Duration::from_secs(5),
    );
    let addr = rt
        .block_on(edgefleet_agent::api::serve(
            state,
            "127.0.0.1:0".parse().unwrap(),
            None,
            rx,
        ))
        .unwrap();
    (addr, tx)
}

fn post(addr: std::net::SocketAddr, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{addr}/v1/infer"))
        .json(&body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

#[test]
fn unknown_fields_and_inputs_are_refused_naming_them() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = serve(&rt, dir.path());
    let t = |n: &str| serde_json::to_value(Tensor::f32(n, vec![1, 4], vec![1.0, 2.0, 3.0, 4.0]));
    let (x, z) = (t("x").unwrap(), t("z").unwrap());

    // The request as documented is answered.
    let (code, v) = post(addr, serde_json::json!({"inputs": [x], "stream": "s1"}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["release"]["release"], 1);

    let (code, v) = post(addr, serde_json::json!({"inputs": [x], "strem": "s1"}));
    assert_eq!(code, 400);
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.starts_with("request JSON: unknown field `strem`, expected `inputs` or `stream`"),
        "{msg}"
    );

    let (code, v) = post(addr, serde_json::json!({"inputs": [x, z]}));
    assert_eq!(code, 400);
    assert_eq!(v["error"], "unknown input `z`; the model's inputs: `x`");

    let (code, v) = post(addr, serde_json::json!({"inputs": [x, x]}));
    assert_eq!(code, 400);
    assert_eq!(
        v["error"],
        "input `x` is given twice; the model's inputs: `x`"
    );
}
