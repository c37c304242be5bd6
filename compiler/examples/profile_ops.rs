//! Per-op profile of tract against onnxruntime's profiler on the same graph
//! (issue #19 point 2): which ONNX ops, which kernels, where the time goes.
//!
//! For each shipped model, the compiler's specialised fp32 graph
//! (`--quantize none --no-nnef`) is run `--runs` times by tract with every node
//! timed (`Runner::profile`) and by onnxruntime, 1 thread, with its profiler on
//! (`scripts/ort-bench.py profile`). Both runtimes rename and fuse nodes, so each
//! timed node is charged to the ONNX node it came from (tract keeps the ONNX name
//! and appends `.suffix` to what its optimiser creates; onnxruntime keeps the name
//! of the node it fused into) and summed per ONNX op type. Time in nodes neither
//! can trace back (layout reorders onnxruntime inserts, say) is shown under the
//! runtime's own op name in parentheses.
//!
//! ```text
//! scripts/fetch-models
//! python3 -m pip install 'onnxruntime==1.20.1' 'numpy<2.3'
//! cargo run --release -p edgefleet-compiler --example profile_ops -- [--model SUBSTR] [--target ID] [--runs 20] [--top 8]
//! ```

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use common::{golden_inputs, Args, Ort, Res, MODELS};
use edgefleet_compiler::{calib::write_npy_data, runtime::Runner, CompileOptions};
use edgefleet_targets::{Quantize, TargetProfile};

/// Milliseconds per call, by key (ONNX op type or kernel name).
type PerCall = BTreeMap<String, f64>;

/// One runtime's account of one model.
struct Account {
    /// By the ONNX op type of the source node.
    by_onnx_op: PerCall,
    /// By the runtime's own kernel name.
    by_kernel: PerCall,
}

/// The specialised graph on disk, its inputs as `.npy` beside it, and its
/// ONNX node names -> op types (and first outputs -> op types, the name tract
/// gives a node without one).
struct Prepared {
    onnx: std::path::PathBuf,
    dir: std::path::PathBuf,
    runner: Runner,
    inputs: Vec<edgefleet_bundle::payload::TensorData>,
    op_of: HashMap<String, String>,
}

fn prepare(model: &Path, target: &TargetProfile, dir: &Path) -> Res<Prepared> {
    let mut o = CompileOptions::new(model, semver::Version::new(1, 0, 0), 1);
    o.quantize = Some(Quantize::None);
    o.prune = Some(0.0);
    o.try_nnef = false;
    let c = edgefleet_compiler::build(&o, target)?;
    std::fs::create_dir_all(dir)?;
    let onnx = dir.join("specialised.onnx");
    std::fs::write(&onnx, &c.model_bytes)?;
    let inputs = golden_inputs(&c)?;
    for (s, d) in c.spec.inputs.iter().zip(&inputs) {
        std::fs::write(
            dir.join(format!("{}.npy", s.name)),
            write_npy_data(&s.shape, d),
        )?;
    }
    let pb = edgefleet_compiler::onnx::decode(&c.model_bytes, &onnx)?;
    let mut op_of = HashMap::new();
    for n in pb.graph.iter().flat_map(|g| &g.node) {
        if !n.name.is_empty() {
            op_of.insert(n.name.clone(), n.op_type.clone());
        }
        if let Some(out) = n.output.first() {
            op_of
                .entry(out.clone())
                .or_insert_with(|| n.op_type.clone());
        }
    }
    Ok(Prepared {
        runner: Runner::onnx(&c.model_bytes, "specialised fp32")?,
        onnx,
        dir: dir.to_owned(),
        inputs,
        op_of,
    })
}

/// The ONNX op type a runtime's node name traces back to: the name itself, or
/// the longest prefix ending before a `.` or `_` that names an ONNX node.
fn source_op(op_of: &HashMap<String, String>, name: &str) -> Option<String> {
    let mut s = name;
    loop {
        if let Some(op) = op_of.get(s) {
            return Some(op.clone());
        }
        let cut = s.rfind(['.', '_'])?;
        s = &s[..cut];
    }
}

fn add(m: &mut PerCall, k: String, ms: f64) {
    *m.entry(k).or_default() += ms;
}

fn tract_account(p: &Prepared, runs: usize) -> Res<Account> {
    let mut a = Account {
        by_onnx_op: PerCall::new(),
        by_kernel: PerCall::new(),
    };
    for n in p.runner.profile(&p.inputs, runs)? {
        let ms = n.total.as_secs_f64() * 1e3 / runs as f64;
        let op = source_op(&p.op_of, &n.name).unwrap_or_else(|| format!("({})", n.op));
        add(&mut a.by_onnx_op, op, ms);
        add(&mut a.by_kernel, n.op, ms);
    }
    Ok(a)
}

fn ort_account(ort: &mut Ort, p: &Prepared, runs: usize, consts: &[String]) -> Res<Account> {
    let line = ort.ask(&format!(
        "profile {} {runs} {} {}",
        p.onnx.display(),
        p.dir.display(),
        consts.join(" ")
    ))?;
    let nodes: HashMap<String, (String, f64)> = serde_json::from_str(&line)?;
    let mut a = Account {
        by_onnx_op: PerCall::new(),
        by_kernel: PerCall::new(),
    };
    for (name, (op, total)) in nodes {
        let ms = total / runs as f64;
        let src = source_op(&p.op_of, &name).unwrap_or_else(|| format!("({op})"));
        add(&mut a.by_onnx_op, src, ms);
        add(&mut a.by_kernel, op, ms);
    }
    Ok(a)
}

fn print_by_op(t: &Account, o: &Account) {
    let tt: f64 = t.by_onnx_op.values().sum();
    let ot: f64 = o.by_onnx_op.values().sum();
    let gap = tt - ot;
    let mut keys: Vec<&String> = t.by_onnx_op.keys().chain(o.by_onnx_op.keys()).collect();
    keys.sort();
    keys.dedup();
    let get = |m: &PerCall, k: &str| m.get(k).copied().unwrap_or(0.0);
    keys.sort_by(|a, b| {
        let d = |k: &str| get(&t.by_onnx_op, k) - get(&o.by_onnx_op, k);
        d(b).total_cmp(&d(a))
    });
    println!(
        "  {:<26} {:>9} {:>9} {:>7} {:>12}",
        "ONNX op", "tract ms", "ort ms", "ratio", "share of gap"
    );
    for k in keys {
        let (a, b) = (get(&t.by_onnx_op, k), get(&o.by_onnx_op, k));
        if a < 0.005 && b < 0.005 {
            continue;
        }
        let ratio = if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        };
        println!(
            "  {:<26} {:>9.3} {:>9.3} {:>7} {:>11.0}%",
            k,
            a,
            b,
            ratio,
            100.0 * (a - b) / gap
        );
    }
    println!(
        "  {:<26} {:>9.3} {:>9.3} {:>7.2}",
        "total (in nodes)",
        tt,
        ot,
        tt / ot
    );
}

fn print_top(what: &str, m: &PerCall, top: usize) {
    let total: f64 = m.values().sum();
    let mut v: Vec<(&String, &f64)> = m.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    let parts: Vec<String> = v
        .iter()
        .take(top)
        .map(|(k, ms)| format!("{k} {ms:.2} ms ({:.0}%)", 100.0 * **ms / total))
        .collect();
    println!("  {what} kernels: {}", parts.join(", "));
}

fn main() -> Res<()> {
    let args = Args::from_env();
    let dir = args.models_dir();
    let filter = args.get("--model").unwrap_or_default();
    let runs: usize = args.parse("--runs", 20)?;
    let top: usize = args.parse("--top", 8)?;
    let (target_id, target) = args.target()?;
    let tmp = tempfile::tempdir()?;
    let mut ort = Ort::start()?;
    println!(
        "target {target_id}; specialised fp32 graph, 1 thread, {runs} profiled calls after one warm-up; ms per call"
    );
    for stem in MODELS.iter().filter(|m| m.contains(&filter)) {
        let p = prepare(
            &dir.join(format!("{stem}.onnx")),
            &target,
            &tmp.path().join(stem),
        )?;
        let consts: Vec<String> = target
            .overrides_for(stem)
            .map(|o| o.consts.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default();
        let t = tract_account(&p, runs)?;
        let o = ort_account(&mut ort, &p, runs, &consts)?;
        println!("{stem}");
        print_by_op(&t, &o);
        print_top("tract", &t.by_kernel, top);
        print_top("onnxruntime", &o.by_kernel, top);
    }
    Ok(())
}
