//! ONNX export parity: every exported graph (teacher and student, both tasks) loads in tract
//! and in onnxruntime (python3, skipped with a note when missing) and matches the burn model
//! (eval mode, running BatchNorm statistics) within 1e-4 on random inputs and on samples from
//! the task's generator that no model was trained on. Also checks that students have <= 1/4 of their teacher's parameters.

use burn::backend::NdArray;
use burn::module::Module;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::Tensor;
use edgefleet_trainer::dataset::Task;
use edgefleet_trainer::model::{ConvNet, ConvNetConfig, ModelSize};
use edgefleet_trainer::onnx;
use rand::{Rng, SeedableRng};
use tract_onnx::prelude::*;

type B = NdArray<f32>;

const BATCH: usize = 3;

/// A model whose BatchNorm running stats are non-trivial (not the init 0/1), so the fold is tested.
fn model(task: Task, size: ModelSize) -> (ConvNet<B>, ConvNetConfig) {
    let dev = Default::default();
    B::seed(&dev, 7);
    let cfg = ConvNetConfig::for_task(task, size);
    let mut m: ConvNet<B> = cfg.init(&dev);
    for (i, blk) in m.blocks.iter_mut().enumerate() {
        let c = blk.bn.gamma.val().dims()[0];
        let mean: Vec<f32> = (0..c).map(|k| 0.1 * ((k + i) % 5) as f32 - 0.2).collect();
        let var: Vec<f32> = (0..c)
            .map(|k| 0.5 + 0.1 * ((k * 3 + i) % 7) as f32)
            .collect();
        let gamma: Vec<f32> = (0..c).map(|k| 0.8 + 0.05 * (k % 9) as f32).collect();
        blk.bn.running_mean =
            burn::module::RunningState::new(Tensor::from_floats(mean.as_slice(), &dev));
        blk.bn.running_var =
            burn::module::RunningState::new(Tensor::from_floats(var.as_slice(), &dev));
        blk.bn.gamma =
            burn::module::Param::from_tensor(Tensor::from_floats(gamma.as_slice(), &dev));
    }
    (m, cfg)
}

fn input(task: Task) -> (Vec<f32>, Vec<usize>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12345);
    let shape: Vec<usize> = std::iter::once(BATCH)
        .chain(task.sample_shape().iter().copied())
        .collect();
    let n: usize = shape.iter().product();
    ((0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(), shape)
}

/// The burn model's probabilities in the ONNX output's layout.
fn burn_probs(m: &ConvNet<B>, cfg: &ConvNetConfig, task: Task, x: &[f32]) -> Vec<f32> {
    let dev = Default::default();
    let flat = Tensor::<B, 1>::from_floats(x, &dev).reshape([BATCH, x.len() / BATCH]);
    let p = softmax(m.forward_flat(flat, cfg.image), 1);
    let p = match task {
        Task::TextDirection => p,
        Task::Vad => p.slice([0..BATCH, 1..2]),
    };
    p.into_data().to_vec::<f32>().expect("f32 data")
}

fn tract_probs(bytes: &[u8], x: &[f32], shape: &[usize]) -> Vec<f32> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .expect("tract loads the export")
        .into_optimized()
        .expect("optimises")
        .into_runnable()
        .expect("runnable");
    let t = tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), x.to_vec()).expect("shape");
    let out = model
        .run(tvec!(tract_onnx::prelude::Tensor::from(t).into()))
        .expect("tract runs");
    let t: &tract_onnx::prelude::Tensor = &out[0];
    t.to_plain_array_view::<f32>()
        .expect("f32 output")
        .iter()
        .copied()
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn onnxruntime_probs(bytes: &[u8], x: &[f32], shape: &[usize]) -> Option<Vec<f32>> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("NOTE: python3 onnxruntime missing: onnxruntime check skipped");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mp, xp, op) = (
        dir.path().join("m.onnx"),
        dir.path().join("x.bin"),
        dir.path().join("y.bin"),
    );
    std::fs::write(&mp, bytes).expect("write model");
    std::fs::write(
        &xp,
        x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .expect("write x");
    let shape_s = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "import onnxruntime as ort, numpy as np\n\
         s = ort.InferenceSession('{m}', providers=['CPUExecutionProvider'])\n\
         x = np.fromfile('{x}', dtype='<f4').reshape(({shape_s},))\n\
         y = s.run(None, {{'x': x}})[0]\n\
         y.astype('<f4').tofile('{o}')\n",
        m = mp.display(),
        x = xp.display(),
        o = op.display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "onnxruntime refused the export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = std::fs::read(&op).expect("read y");
    Some(
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// BATCH samples from the task's own generator (rendered lines, espeak-ng speech and noise),
/// from a stream no dataset in the tests uses: inputs shaped like a test split, where random
/// values are not.
fn generated(task: Task) -> (Vec<f32>, Vec<usize>) {
    let ex = match task {
        Task::TextDirection => edgefleet_trainer::synth::text::generate(BATCH, 97, 7),
        Task::Vad => edgefleet_trainer::synth::vad::generate(BATCH, 97, 7).expect("VAD samples"),
    };
    let shape = std::iter::once(BATCH)
        .chain(ex.sample_shape.iter().copied())
        .collect();
    (ex.x, shape)
}

fn check(task: Task, size: ModelSize) {
    let (m, cfg) = model(task, size);
    let bytes = onnx::export(&m, &cfg, task).expect("export");
    for (x, shape) in [input(task), generated(task)] {
        compare(task, size, &m, &cfg, &bytes, &x, &shape);
    }
}

fn compare(
    task: Task,
    size: ModelSize,
    m: &ConvNet<B>,
    cfg: &ConvNetConfig,
    bytes: &[u8],
    x: &[f32],
    shape: &[usize],
) {
    let want = burn_probs(m, cfg, task, x);
    let got = tract_probs(bytes, x, shape);
    let d = max_diff(&want, &got);
    assert!(
        d <= 1e-4,
        "{task:?} {size:?}: tract differs from burn by {d}"
    );
    if let Some(ort) = onnxruntime_probs(bytes, x, shape) {
        let d = max_diff(&want, &ort);
        assert!(
            d <= 1e-4,
            "{task:?} {size:?}: onnxruntime differs from burn by {d}"
        );
    }
}

#[test]
fn text_direction_exports_match_burn() {
    check(Task::TextDirection, ModelSize::Teacher);
    check(Task::TextDirection, ModelSize::Student);
}

#[test]
fn vad_exports_match_burn() {
    check(Task::Vad, ModelSize::Teacher);
    check(Task::Vad, ModelSize::Student);
}

#[test]
fn students_have_at_most_a_quarter_of_the_parameters() {
    let dev = Default::default();
    for task in [Task::TextDirection, Task::Vad] {
        let t: ConvNet<B> = ConvNetConfig::for_task(task, ModelSize::Teacher).init(&dev);
        let s: ConvNet<B> = ConvNetConfig::for_task(task, ModelSize::Student).init(&dev);
        let (tp, sp) = (t.num_params(), s.num_params());
        eprintln!("{task:?}: teacher {tp} parameters, student {sp}");
        assert!(sp * 4 <= tp, "{task:?}: student {sp} > teacher {tp} / 4");
    }
}
