//! Test support (feature `testkit`, always on in this crate's tests): tiny
//! tract models written as NNEF and signed test bundles, so the agent's
//! integration tests, firmware-tests and the fleet server's tests can make
//! good, golden-mismatch, NaN-producing and slow bundles without the compiler.
//!
//! Every model takes `x: f32[1,4]` and returns `y: f32[1,4]`.

use edgefleet_bundle::payload::{
    DType, GoldenCase, GoldenVectors, ModelFormat, ModelSpec, Task, Tensor, TensorSpec,
};
use edgefleet_bundle::{BundleBuilder, SigningKey};
use tract_nnef::internal as tp;
use tract_nnef::internal::SpecialOps as _;
use tract_nnef::tract_core::ops;

/// Which test model a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `y = k * x`, golden vectors match.
    Good,
    /// `y = k * x`, golden vectors claim `y = (k + 1) * x`.
    GoldenMismatch,
    /// `y = k * sqrt(x)`: golden (positive) inputs pass; negative live inputs give NaN.
    Nan,
    /// `y = k * x` computed through a deliberately slow graph (tens of ms).
    Slow,
    /// `y = k * x` with a batch dimension of 4 (`x: f32[4,4]`, `batch_axis = 0`).
    Batched,
    /// `y = k * x` through two matrix products (`x @ W1 @ W2`, `W1: [4, 4096]`
    /// repeats `x`, `W2: [4096, 4]` averages it back, exactly in f32): a model
    /// whose cost is matrix products, for [`crate::runtime::Compute`] tests.
    Dense,
    /// `y = k * x` declared a 4-class classifier (`Task::Classifier`, labels
    /// `c0..c3`): for positive `k` the answer is the index of the largest `x`.
    Classifier,
}

/// Input the golden vectors use: all positive.
pub const GOLDEN_INPUT: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

fn build_model(kind: Kind, k: f32) -> tp::TractResult<tp::TypedModel> {
    use tp::DatumExt as _;
    let batch = if kind == Kind::Batched { 4 } else { 1 };
    let mut m = tp::TypedModel::default();
    let x = m.add_source("x", f32::fact([batch, 4]))?;
    let kc = m.add_const("k", tp::Tensor::from_shape(&[1, 4], &[k; 4])?)?;
    let y = match kind {
        Kind::Good | Kind::GoldenMismatch | Kind::Batched | Kind::Classifier => {
            m.wire_node("y", ops::math::mul(), &[x, kc])?
        }
        Kind::Dense => {
            const H: usize = 4096;
            let w1: Vec<f32> = (0..4 * H)
                .map(|ij| f32::from(u8::from(ij % H % 4 == ij / H)))
                .collect();
            let w2: Vec<f32> = (0..H * 4)
                .map(|ji| {
                    if ji / 4 % 4 == ji % 4 {
                        4.0 / H as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let w1 = m.add_const("w1", tp::Tensor::from_shape(&[4, H], &w1)?)?;
            let w2 = m.add_const("w2", tp::Tensor::from_shape(&[H, 4], &w2)?)?;
            let axes: tp::AxesMapping = "ik,kj->ij".parse()?;
            let mm = || ops::einsum::EinSum::new(axes.clone(), tp::DatumType::F32);
            let h = m.wire_node("h", mm(), &[x, w1])?;
            let r = m.wire_node("r", mm(), &[h[0], w2])?;
            m.wire_node("y", ops::math::mul(), &[r[0], kc])?
        }
        Kind::Nan => {
            let s = m.wire_node("sqrt", ops::math::sqrt(), &[x])?;
            m.wire_node("y", ops::math::mul(), &[s[0], kc])?
        }
        Kind::Slow => {
            const N: usize = 1 << 19;
            let ones = m.add_const(
                "ones",
                tp::Tensor::from_shape(&[N, 4], &vec![1.0f32 / N as f32; N * 4])?,
            )?;
            let mut cur = m.wire_node("spread", ops::math::mul(), &[x, ones])?;
            for i in 0..24 {
                let a = m.wire_node(format!("abs{i}"), ops::math::abs(), &[cur[0]])?;
                cur = m.wire_node(format!("sqrt{i}"), ops::math::sqrt(), &[a[0]])?;
                cur = m.wire_node(format!("sq{i}"), ops::math::square(), &[cur[0]])?;
            }
            let s = m.wire_node(
                "sum",
                ops::nn::Reduce::new(tp::TVec::from_slice(&[0]), ops::nn::Reducer::Sum),
                &[cur[0]],
            )?;
            m.wire_node("y", ops::math::mul(), &[s[0], kc])?
        }
    };
    m.select_output_outlets(&y)?;
    m.set_outlet_label(y[0], "y".into())?;
    Ok(m)
}

/// The NNEF archive of a test model.
///
/// # Panics
/// If tract cannot build or serialise it (a bug in the testkit).
#[allow(clippy::expect_used)]
pub fn nnef(kind: Kind, k: f32) -> Vec<u8> {
    let m = build_model(kind, k).expect("test model builds");
    tract_nnef::nnef()
        .write_to_tar(&m, Vec::new())
        .expect("test model serialises")
}

/// `model.json` of a test model.
pub fn spec(kind: Kind, name: &str) -> ModelSpec {
    let batch = if kind == Kind::Batched { 4 } else { 1 };
    let t = |n: &str| TensorSpec {
        name: n.into(),
        dtype: DType::F32,
        shape: vec![batch, 4],
    };
    ModelSpec {
        name: name.into(),
        format: ModelFormat::Nnef,
        file: "model.nnef.tar".into(),
        inputs: vec![t("x")],
        outputs: vec![t("y")],
        state: vec![],
        task: if kind == Kind::Classifier {
            Task::Classifier {
                labels: (0..4).map(|i| format!("c{i}")).collect(),
            }
        } else {
            Task::Other
        },
        batch_axis: (kind == Kind::Batched).then_some(0),
    }
}

/// The payload files of a test bundle: model.json, model.nnef.tar, golden.json.
pub fn files(kind: Kind, name: &str, k: f32) -> Vec<(String, Vec<u8>)> {
    let batch = if kind == Kind::Batched { 4 } else { 1 };
    let input: Vec<f32> = GOLDEN_INPUT
        .iter()
        .cycle()
        .take(4 * batch)
        .copied()
        .collect();
    let want_k = if kind == Kind::GoldenMismatch {
        k + 1.0
    } else {
        k
    };
    let out: Vec<f32> = input
        .iter()
        .map(|x| {
            if kind == Kind::Nan {
                want_k * x.sqrt()
            } else {
                want_k * x
            }
        })
        .collect();
    let golden = GoldenVectors {
        max_abs_error: 1e-3,
        rel_error: 1e-3,
        cases: vec![GoldenCase {
            inputs: vec![Tensor::f32("x", vec![batch, 4], input)],
            outputs: vec![Tensor::f32("y", vec![batch, 4], out)],
        }],
    };
    vec![
        (
            "model.json".into(),
            serde_json::to_vec_pretty(&spec(kind, name)).unwrap_or_default(),
        ),
        ("model.nnef.tar".into(), nnef(kind, k)),
        (
            "golden.json".into(),
            serde_json::to_vec_pretty(&golden).unwrap_or_default(),
        ),
    ]
}

/// A signed bundle of a test model for `target`.
///
/// # Panics
/// If packing fails (a bug in the testkit).
#[allow(clippy::expect_used)]
pub fn bundle(
    kind: Kind,
    key: &SigningKey,
    name: &str,
    release: u64,
    target: &str,
    k: f32,
) -> Vec<u8> {
    let mut b = BundleBuilder::new(name, semver::Version::new(1, 0, release), release)
        .target(target)
        .zstd_level(3)
        .chunk_size(16 * 1024);
    for (p, d) in files(kind, name, k) {
        b = b.file(p, d);
    }
    b.build(key).expect("test bundle packs")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Model;
    use edgefleet_protocol::messages::ReleaseRef;

    fn load(kind: Kind, k: f32) -> (tempfile::TempDir, Model) {
        let d = tempfile::tempdir().expect("tmp");
        for (p, b) in files(kind, "m", k) {
            std::fs::write(d.path().join(p), b).expect("write");
        }
        let r = ReleaseRef {
            model: "m".into(),
            release: 1,
            version: "1.0.1".into(),
        };
        let m = Model::load(d.path(), r).expect("loads");
        (d, m)
    }

    #[test]
    fn good_model_runs_and_passes_golden() {
        let (_d, m) = load(Kind::Good, 2.0);
        m.self_test().expect("golden passes");
        let out = m
            .run(
                &[Tensor::f32("x", vec![1, 4], vec![1.0, -1.0, 0.5, 0.0])],
                None,
            )
            .expect("runs");
        assert_eq!(
            out[0].data,
            edgefleet_bundle::payload::TensorData::F32(vec![2.0, -2.0, 1.0, 0.0])
        );
    }

    #[test]
    fn mismatch_and_nan_models_are_caught() {
        let (_d, m) = load(Kind::GoldenMismatch, 2.0);
        assert_eq!(
            m.self_test().expect_err("mismatch").code(),
            "golden_mismatch"
        );
        let (_d, m) = load(Kind::Nan, 2.0);
        m.self_test().expect("golden inputs are positive");
        let out = m
            .run(&[Tensor::f32("x", vec![1, 4], vec![-1.0; 4])], None)
            .expect("runs");
        assert!(crate::runtime::check_finite(&out).is_err());
    }

    #[test]
    fn slow_model_is_slow_but_right() {
        let (_d, m) = load(Kind::Slow, 2.0);
        m.self_test().expect("golden passes");
        let x = vec![Tensor::f32("x", vec![1, 4], GOLDEN_INPUT.to_vec())];
        let t = std::time::Instant::now();
        m.run(&x, None).expect("runs");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!("slow model: {ms:.1} ms");
        assert!(ms > 5.0, "slow model took only {ms} ms");
    }

    #[test]
    fn micro_batch_splits_back_per_request() {
        let (_d, m) = load(Kind::Batched, 3.0);
        m.self_test().expect("golden passes");
        let reqs: Vec<Vec<Tensor>> = (0..3)
            .map(|i| vec![Tensor::f32("x", vec![1, 4], vec![i as f32; 4])])
            .collect();
        let out = m.run_batch(&reqs);
        for (i, o) in out.into_iter().enumerate() {
            let o = o.expect("ok");
            assert_eq!(o[0].shape, vec![1, 4]);
            assert_eq!(
                o[0].data,
                edgefleet_bundle::payload::TensorData::F32(vec![3.0 * i as f32; 4])
            );
        }
    }

    /// A model of matrix products gives the same answer on a pool of 2 and of
    /// 3 threads as on the calling thread (tract splits output tiles across
    /// threads, never a sum), passes its golden vectors on each, and answers
    /// k * x: a pool that lost or repeated a tile would change `y`.
    #[test]
    fn dense_model_answers_the_same_on_a_thread_pool() {
        use crate::runtime::Compute;
        let d = tempfile::tempdir().expect("tmp");
        for (p, b) in files(Kind::Dense, "m", 2.0) {
            std::fs::write(d.path().join(p), b).expect("write");
        }
        let r = ReleaseRef {
            model: "m".into(),
            release: 1,
            version: "1.0.1".into(),
        };
        let x = [Tensor::f32("x", vec![1, 4], vec![1.0, -1.0, 0.5, 3.0])];
        let want = edgefleet_bundle::payload::TensorData::F32(vec![2.0, -2.0, 1.0, 6.0]);
        for threads in [1, 2, 3] {
            let compute = Compute::threads(threads);
            assert_eq!(compute.thread_count(), threads);
            let m = Model::load_on(d.path(), r.clone(), &compute).expect("loads");
            m.self_test().expect("golden passes");
            for _ in 0..3 {
                let out = m.run(&x, None).expect("runs");
                assert_eq!(out[0].data, want, "{threads} threads");
            }
        }
    }
}
