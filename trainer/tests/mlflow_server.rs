//! Against a real local MLflow server (`mlflow server`, SQLite backend, `--serve-artifacts`):
//! log a run, register its ONNX, set an alias, resolve `models:/NAME@champion` and download it.
//! Skips loudly only when `mlflow` is not installed and EDGEFLEET_REQUIRE_MLFLOW is unset.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::time::Duration;

use edgefleet_trainer::mlflow::{Metric, MlflowClient, ModelUri, RunStatus};
use edgefleet_trainer::mlflow_local::{self, LocalMlflow};
use edgefleet_trainer::Error;
use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The server, or `None` (with a loud note) when mlflow is missing and not required.
fn start(dir: &std::path::Path) -> Option<LocalMlflow> {
    if !mlflow_local::installed() {
        assert!(
            std::env::var_os("EDGEFLEET_REQUIRE_MLFLOW").is_none(),
            "EDGEFLEET_REQUIRE_MLFLOW is set but `mlflow` is not installed (pip install mlflow)"
        );
        eprintln!("!!!!! SKIPPED: `mlflow` not installed; pip install mlflow==2.17.2 to run this test !!!!!");
        return None;
    }
    Some(LocalMlflow::start(dir, Duration::from_secs(90)).expect("mlflow server starts"))
}

/// A small real ONNX model: y = Identity(x), x: f32[1,4].
fn tiny_onnx() -> Vec<u8> {
    let vi = |name: &str| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: [1i64, 4]
                        .iter()
                        .map(|d| pb::tensor_shape_proto::Dimension {
                            denotation: String::new(),
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(*d)),
                        })
                        .collect(),
                }),
            })),
        }),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "tiny".into(),
            node: vec![pb::NodeProto {
                op_type: "Identity".into(),
                input: vec!["x".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

#[test]
fn mlflow_log_register_alias_pull() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(server) = start(dir.path()) else {
        return;
    };
    let c = MlflowClient::new(server.url()).expect("client");
    let exp = c
        .get_or_create_experiment("edgefleet-test")
        .expect("experiment");
    assert_eq!(
        c.get_or_create_experiment("edgefleet-test").expect("again"),
        exp
    );
    let tags = BTreeMap::from([
        ("edgefleet.dataset".to_string(), "sha256:abc".to_string()),
        ("edgefleet.device".to_string(), "cpu".to_string()),
    ]);
    let run = c.create_run(&exp, "vad-student", &tags).expect("run");
    let params = BTreeMap::from([
        ("lr".to_string(), "0.001".to_string()),
        ("epochs".to_string(), "2".to_string()),
        ("task".to_string(), "vad".to_string()),
    ]);
    c.log_batch(&run.info.run_id, &params, &[]).expect("params");
    for epoch in 0..2u32 {
        let m = BTreeMap::from([
            ("train_loss".to_string(), 1.0 / f64::from(epoch + 1)),
            ("val_acc".to_string(), 0.5 + 0.25 * f64::from(epoch)),
        ]);
        c.log_epoch(&run.info.run_id, epoch, &m).expect("epoch");
    }
    c.log_batch(
        &run.info.run_id,
        &BTreeMap::new(),
        &[Metric {
            key: "test_acc".into(),
            value: 0.875,
            timestamp: 0,
            step: 0,
        }],
    )
    .expect("test metrics");
    let onnx = tiny_onnx();
    tract_onnx::onnx()
        .model_for_read(&mut onnx.as_slice())
        .expect("tiny model loads in tract");
    let mv = c
        .register_onnx(&run.info, "edgefleet-vad", onnx.clone(), Some("champion"))
        .expect("register");
    assert_eq!(mv.version, "1");
    c.end_run(&run.info.run_id, RunStatus::Finished)
        .expect("end");

    // MLflow's own view of the run: exact params, latest metrics, tags, status.
    let got = c.get_run(&run.info.run_id).expect("get run");
    assert_eq!(got.info.status, "FINISHED");
    let gp: BTreeMap<String, String> = got
        .data
        .params
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect();
    assert_eq!(gp, params);
    let gm: BTreeMap<String, (f64, i64)> = got
        .data
        .metrics
        .iter()
        .map(|m| (m.key.clone(), (m.value, m.step)))
        .collect();
    assert_eq!(
        gm,
        BTreeMap::from([
            ("test_acc".to_string(), (0.875, 0)),
            ("train_loss".to_string(), (0.5, 1)),
            ("val_acc".to_string(), (0.75, 1)),
        ])
    );
    let gt: BTreeSet<(String, String)> = got
        .data
        .tags
        .iter()
        .filter(|t| t.key.starts_with("edgefleet."))
        .map(|t| (t.key.clone(), t.value.clone()))
        .collect();
    assert_eq!(gt, tags.into_iter().collect());

    // The reverse: resolve the alias and pull the bytes.
    let uri = ModelUri::parse("models:/edgefleet-vad@champion").expect("uri");
    let pulled = c.pull_onnx(&uri).expect("pull");
    assert_eq!(pulled.onnx, onnx);
    assert_eq!(pulled.version.version, "1");
    assert_eq!(pulled.version.run_id, run.info.run_id);
    let by_version = c
        .pull_onnx(&ModelUri::parse("models:/edgefleet-vad/1").expect("uri"))
        .expect("pull by version");
    assert_eq!(by_version.onnx, onnx);

    // Errors: an unknown alias is named; a server that is down is named by URL.
    let e = c
        .pull_onnx(&ModelUri::parse("models:/edgefleet-vad@nope").expect("uri"))
        .expect_err("unknown alias");
    assert!(e.to_string().contains("nope"), "{e}");
    let down = format!("http://127.0.0.1:{}", free_port());
    let e = MlflowClient::new(&down)
        .expect("client")
        .get_or_create_experiment("x")
        .expect_err("down");
    assert!(matches!(e, Error::MlflowUnreachable { .. }), "{e}");
    assert!(e.to_string().contains(&down), "{e}");
}
