//! The README's keygen / pack / verify walk-through, interop with OpenSSL and
//! GNU tar, and every hostile fixture through the CLI (non-zero exit, own error).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn edgefleet(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgefleet"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run edgefleet")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/bundle/tests/fixtures")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn readme_walkthrough_and_interop() {
    let d = tempfile::tempdir().expect("tmp");
    let cwd = d.path();
    std::fs::write(cwd.join("model.onnx"), vec![42u8; 100_000]).expect("write");
    std::fs::write(cwd.join("notes.txt"), b"hello").expect("write");
    // 1. keygen
    let out = ok(&edgefleet(&["keygen", "--out", "keys/release"], cwd));
    assert!(out.contains("key id"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cwd.join("keys/release.pem"))
        .expect("pem")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "private key mode");
    assert!(
        !edgefleet(&["keygen", "--out", "keys/release"], cwd)
            .status
            .success(),
        "overwrote a key"
    );
    // 2. pack
    ok(&edgefleet(
        &[
            "bundle",
            "pack",
            "--key",
            "keys/release.pem",
            "--model",
            "vad",
            "--version",
            "1.0.0",
            "--release",
            "1",
            "--target",
            "rpi4",
            "--file",
            "model.onnx",
            "--file",
            "notes.txt=README.txt",
            "--out",
            "vad-1.efb",
        ],
        cwd,
    ));
    // 3. verify
    let out = ok(&edgefleet(
        &[
            "bundle",
            "verify",
            "--trust",
            "keys/release.pub.pem",
            "vad-1.efb",
        ],
        cwd,
    ));
    assert!(out.starts_with("OK vad 1.0.0 release 1"), "{out}");
    ok(&edgefleet(
        &[
            "bundle",
            "verify",
            "--trust",
            "keys/release.pub.pem",
            "--target",
            "rpi4",
            "--min-release",
            "0",
            "vad-1.efb",
        ],
        cwd,
    ));
    let o = edgefleet(
        &[
            "bundle",
            "verify",
            "--trust",
            "keys/release.pub.pem",
            "--min-release",
            "1",
            "vad-1.efb",
        ],
        cwd,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("error[downgrade]"));
    // inspect works without a key and says so
    assert!(ok(&edgefleet(&["bundle", "inspect", "vad-1.efb"], cwd)).contains("NOT VERIFIED"));
    // extract
    ok(&edgefleet(
        &[
            "bundle",
            "extract",
            "--trust",
            "keys/release.pub.pem",
            "vad-1.efb",
            "--out",
            "x",
        ],
        cwd,
    ));
    assert_eq!(
        std::fs::read(cwd.join("x/README.txt")).expect("extracted"),
        b"hello"
    );

    // 4. tar lists it
    if have("zstd") {
        let o = Command::new("tar")
            .args(["--zstd", "-tf", "vad-1.efb"])
            .current_dir(cwd)
            .output()
            .expect("tar");
        let list = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "tar failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            list.lines().collect::<Vec<_>>(),
            ["manifest.json", "manifest.sig", "README.txt", "model.onnx"]
        );
        // 5. OpenSSL verifies the detached signature with the PEM public key.
        let o = Command::new("tar")
            .args([
                "--zstd",
                "-xf",
                "vad-1.efb",
                "manifest.json",
                "manifest.sig",
            ])
            .current_dir(cwd)
            .output()
            .expect("tar");
        assert!(o.status.success());
        if have("openssl") {
            let o = Command::new("openssl")
                .args([
                    "pkeyutl",
                    "-verify",
                    "-pubin",
                    "-inkey",
                    "keys/release.pub.pem",
                    "-rawin",
                    "-in",
                    "manifest.json",
                    "-sigfile",
                    "manifest.sig",
                ])
                .current_dir(cwd)
                .output()
                .expect("openssl");
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && text.contains("Signature Verified Successfully"),
                "openssl: {text}"
            );
            // And OpenSSL rejects a tampered manifest.
            let mut m = std::fs::read(cwd.join("manifest.json")).expect("m");
            m[10] ^= 1;
            std::fs::write(cwd.join("manifest.json"), m).expect("w");
            let o = Command::new("openssl")
                .args([
                    "pkeyutl",
                    "-verify",
                    "-pubin",
                    "-inkey",
                    "keys/release.pub.pem",
                    "-rawin",
                    "-in",
                    "manifest.json",
                    "-sigfile",
                    "manifest.sig",
                ])
                .current_dir(cwd)
                .output()
                .expect("openssl");
            assert!(!o.status.success());
            // OpenSSL reads the private key too.
            let o = Command::new("openssl")
                .args(["pkey", "-in", "keys/release.pem", "-noout"])
                .current_dir(cwd)
                .output()
                .expect("openssl");
            assert!(
                o.status.success(),
                "openssl pkey: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        } else {
            eprintln!("SKIP openssl interop: openssl not installed");
        }
    } else {
        eprintln!("SKIP tar interop: zstd not installed");
    }

    // 6. delta
    let mut m2 = vec![42u8; 100_000];
    m2[50_000..50_100].fill(7);
    std::fs::write(cwd.join("model2.onnx"), m2).expect("write");
    ok(&edgefleet(
        &[
            "bundle",
            "pack",
            "--key",
            "keys/release.pem",
            "--model",
            "vad",
            "--version",
            "1.1.0",
            "--release",
            "2",
            "--target",
            "rpi4",
            "--file",
            "model2.onnx=model.onnx",
            "--file",
            "notes.txt=README.txt",
            "--out",
            "vad-2.efb",
        ],
        cwd,
    ));
    let out = ok(&edgefleet(
        &[
            "bundle",
            "delta",
            "--trust",
            "keys/release.pub.pem",
            "--key",
            "keys/release.pem",
            "--base",
            "vad-1.efb",
            "--new",
            "vad-2.efb",
            "--out",
            "d.efb",
        ],
        cwd,
    ));
    assert!(out.contains("ratio"), "{out}");
    let o = edgefleet(
        &[
            "bundle",
            "verify",
            "--trust",
            "keys/release.pub.pem",
            "d.efb",
        ],
        cwd,
    );
    assert!(!o.status.success(), "delta verified without its base");
    ok(&edgefleet(
        &[
            "bundle",
            "verify",
            "--trust",
            "keys/release.pub.pem",
            "--base",
            "vad-1.efb",
            "d.efb",
        ],
        cwd,
    ));
    let o = edgefleet(
        &[
            "bundle",
            "verify",
            "--trust",
            "keys/release.pub.pem",
            "--base",
            "vad-2.efb",
            "d.efb",
        ],
        cwd,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("error[delta_base]"));
}

#[test]
fn every_hostile_fixture_fails_through_the_cli_with_its_own_error() {
    let dir = fixtures();
    let expected = std::fs::read_to_string(dir.join("EXPECTED")).expect("EXPECTED");
    let revoked = std::fs::read_to_string(dir.join("revoked.keyid")).expect("keyid");
    let mut checked = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, code) = line.split_once(' ').expect("line");
        let o = edgefleet(
            &[
                "bundle",
                "verify",
                "--trust",
                "trusted.pub.pem",
                "--trust",
                "revoked.pub.pem",
                "--revoked",
                revoked.trim(),
                "--target",
                "rpi4",
                "--min-release",
                "5",
                "--agent-version",
                "0.1.0",
                name,
            ],
            &dir,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        if code == "ok" {
            assert!(o.status.success(), "{name}: {err}");
        } else {
            assert!(!o.status.success(), "{name} accepted by the CLI");
            assert!(
                err.contains(&format!("error[{code}]")),
                "{name}: expected error[{code}], got {err}"
            );
            assert!(
                err.contains(name),
                "{name}: the error should name the file: {err}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 25);
}

fn err(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "succeeded unexpectedly: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `edgefleet run` (issue #18, point 5): a real model compiled for a target
/// is verified, loaded as the agent loads it, self-tested, run on its golden
/// inputs and on a given .npy, written out and timed; a wrong trust key, a
/// wrong shape and an unknown input are refused naming what is wrong.
#[test]
fn run_verifies_loads_runs_and_times_a_bundle() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path();
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/ch_ppocr_mobile_v2.0_cls_infer.onnx");
    assert!(
        model.exists(),
        "{}: run scripts/fetch-models",
        model.display()
    );
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets/x86-avx2-gateway.toml");
    ok(&edgefleet(&["keygen", "--out", "keys/release"], p));
    ok(&edgefleet(&["keygen", "--out", "keys/other"], p));
    ok(&edgefleet(
        &[
            "compile",
            "--model",
            model.to_str().expect("path"),
            "--target",
            target.to_str().expect("path"),
            "--version",
            "1.0.0",
            "--release",
            "1",
            "--key",
            "keys/release.pem",
            "--out",
            "out",
            "--quiet",
        ],
        p,
    ));
    let bundle = std::fs::read_dir(p.join("out"))
        .expect("out")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|f| f.extension().is_some_and(|x| x == "efb"))
        .expect("a bundle");
    let b = bundle.to_str().expect("path");
    let o = edgefleet(
        &[
            "run",
            "--trust",
            "keys/release.pub.pem",
            b,
            "--bench",
            "5",
            "--out",
            "outs",
        ],
        p,
    );
    let stdout = ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("self-test (golden vectors): pass"),
        "{stderr}"
    );
    assert!(stdout.contains("shape [1, 2]"), "{stdout}");
    assert!(stdout.contains("latency over 5 runs"), "{stdout}");
    let written: Vec<_> = std::fs::read_dir(p.join("outs")).expect("outs").collect();
    assert_eq!(written.len(), 1, "one output written");

    // A given input of the right shape runs; a wrong shape or name is refused.
    let n = 3 * 48 * 192;
    let x: Vec<f32> = (0..n).map(|i| (i % 17) as f32 / 17.0).collect();
    std::fs::write(
        p.join("x.npy"),
        edgefleet_compiler::calib::write_npy(&[1, 3, 48, 192], &x),
    )
    .expect("npy");
    std::fs::write(
        p.join("bad.npy"),
        edgefleet_compiler::calib::write_npy(&[1, 3, 48, 100], &x[..14400]),
    )
    .expect("npy");
    let out = ok(&edgefleet(
        &[
            "run",
            "--trust",
            "keys/release.pub.pem",
            b,
            "--input",
            "x=x.npy",
        ],
        p,
    ));
    assert!(out.contains("shape [1, 2]"), "{out}");
    let e = err(&edgefleet(
        &[
            "run",
            "--trust",
            "keys/release.pub.pem",
            b,
            "--input",
            "x=bad.npy",
        ],
        p,
    ));
    assert!(
        e.contains("shape [1, 3, 48, 100]") && e.contains("[1, 3, 48, 192]"),
        "{e}"
    );
    let e = err(&edgefleet(
        &[
            "run",
            "--trust",
            "keys/release.pub.pem",
            b,
            "--input",
            "y=x.npy",
        ],
        p,
    ));
    assert!(e.contains("no input `y`") && e.contains("x"), "{e}");
    let e = err(&edgefleet(&["run", "--trust", "keys/other.pub.pem", b], p));
    assert!(
        e.to_lowercase().contains("key") || e.contains("trust"),
        "{e}"
    );
}

/// Issue #18 point 2 through the CLI: a model with an int32 input compiles
/// with `--range`, and `edgefleet run` (loading as the agent does) runs it on
/// its golden inputs and on an int32 .npy; a float32 .npy for that input is
/// refused naming the file, the input and both types.
#[test]
fn an_int32_input_compiles_with_a_range_and_runs() {
    use edgefleet_bundle::payload::TensorData;
    use edgefleet_compiler::onnx::{self, pb};
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path();
    let node = |op: &str, inputs: &[&str], output: &str, attribute| pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        attribute,
        ..Default::default()
    };
    let axis = pb::AttributeProto {
        name: "axis".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    };
    let w: Vec<f32> = (0..50 * 4)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 11.0)
        .collect();
    let m = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "ids".into(),
            // Per-token class scores: Gather rows of E [50, 4] -> [1, 6, 4].
            node: vec![
                node("Gather", &["E", "ids"], "scores", vec![axis.clone()]),
                node("Softmax", &["scores"], "y", vec![]),
            ],
            initializer: vec![onnx::f32_tensor("E", &[50, 4], &w)],
            input: vec![onnx::fixed_value_info("ids", 6, &[1, 6])],
            output: vec![onnx::fixed_value_info("y", 1, &[1, 6, 4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(p.join("ids.onnx"), onnx::encode(&m)).expect("model");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets/x86-avx2-gateway.toml");
    ok(&edgefleet(&["keygen", "--out", "keys/release"], p));
    let out = ok(&edgefleet(
        &[
            "compile",
            "--model",
            "ids.onnx",
            "--target",
            target.to_str().expect("path"),
            "--range",
            "ids=0..49",
            "--version",
            "1.0.0",
            "--release",
            "1",
            "--key",
            "keys/release.pem",
            "--out",
            "out",
            "--quiet",
        ],
        p,
    ));
    assert!(out.contains("ids=Normal i32 in 0..49"), "{out}");
    let b = "out/ids-1.0.0-x86-avx2-gateway.efb";
    assert!(p.join(b).exists(), "{out}");
    let ids = TensorData::I32(vec![0, 7, 49, 3, 3, 12]);
    std::fs::write(
        p.join("ids.npy"),
        edgefleet_compiler::calib::write_npy_data(&[1, 6], &ids),
    )
    .expect("npy");
    let run = ok(&edgefleet(
        &[
            "run",
            "--trust",
            "keys/release.pub.pem",
            b,
            "--input",
            "ids=ids.npy",
        ],
        p,
    ));
    assert!(run.contains("shape [1, 6, 4]"), "{run}");
    std::fs::write(
        p.join("f.npy"),
        edgefleet_compiler::calib::write_npy(&[1, 6], &[1.0; 6]),
    )
    .expect("npy");
    let e = err(&edgefleet(
        &[
            "run",
            "--trust",
            "keys/release.pub.pem",
            b,
            "--input",
            "ids=f.npy",
        ],
        p,
    ));
    assert!(
        e.contains("f.npy holds f32 data, input `ids` is i32"),
        "{e}"
    );
}
