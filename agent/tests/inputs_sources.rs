//! Input sources through the `from_config` factory: replay of a calibration
//! directory (`.npy`, `.f32` + sidecar, multi-input naming), transforms and
//! pacing; `i2c_accel` config errors without the `linux-i2c` feature.
//!
//! Until `agent/src/lib.rs` declares `pub mod inputs;` the module is compiled
//! here through `#[path]` (its unit tests run here too); then replace the
//! include by `use edgefleet_agent::inputs;`.
#![allow(clippy::unwrap_used, missing_docs)]

#[allow(dead_code)]
#[path = "../src/inputs/mod.rs"]
mod inputs;

use edgefleet_bundle::payload::{Tensor, TensorData};
use inputs::{from_config, InputError};

fn npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    edgefleet_bundle::npy::write_npy(shape, data)
}

fn raw(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    match &t.data {
        TensorData::F32(d) => d.clone(),
        other => panic!("{} data", other.dtype()),
    }
}

fn cfg(s: &str) -> toml::Value {
    toml::from_str(s).unwrap()
}

#[test]
fn replay_single_input_loops_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.npy"),
        npy(&[1, 4], &[1.0, 2.0, 3.0, 4.0]),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.f32"), raw(&[5.0, 6.0, 7.0, 8.0])).unwrap();
    std::fs::write(dir.path().join("b.json"), br#"{"shape":[1,4]}"#).unwrap();
    let c = cfg(&format!(
        "kind='replay'\ndir='{}'\ninput='x'",
        dir.path().display()
    ));
    let mut s = from_config(&c).unwrap();
    let seq: Vec<Vec<f32>> = (0..4).map(|_| f32s(&s.next_window().unwrap()[0])).collect();
    assert_eq!(seq[0], vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(seq[1], vec![5.0, 6.0, 7.0, 8.0]);
    assert_eq!(seq[2], seq[0], "loops");
    let w = s.next_window().unwrap();
    assert_eq!((w[0].name.as_str(), w[0].shape.clone()), ("x", vec![1, 4]));
}

#[test]
fn replay_multi_input_and_transforms_and_rate() {
    let dir = tempfile::tempdir().unwrap();
    let img: Vec<f32> = (0..6).map(|i| i as f32).collect();
    for case in ["c0", "c1"] {
        std::fs::write(
            dir.path().join(format!("{case}.image.npy")),
            npy(&[1, 1, 2, 3], &img),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{case}.scale.f32")), raw(&[0.5])).unwrap();
    }
    let c = cfg(&format!(
        "kind='replay'\ndir='{}'\ninputs=['image','scale']\nshape=[1]\nrotate90=1\ngain=2.0\noffset=1\nrate_hz=50",
        dir.path().display()
    ));
    let mut s = from_config(&c).unwrap();
    let t = std::time::Instant::now();
    let mut w = Vec::new();
    for _ in 0..6 {
        w = s.next_window().unwrap();
    }
    let e = t.elapsed().as_secs_f64();
    assert!((0.08..0.5).contains(&e), "6 windows at 50/s took {e} s");
    assert_eq!(
        w.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        vec!["image", "scale"]
    );
    assert_eq!(w[0].shape, vec![1, 1, 3, 2], "rotated");
    // rot90([[0,1,2],[3,4,5]]) = [[2,5],[1,4],[0,3]], then *2 + 1.
    assert_eq!(f32s(&w[0]), vec![5.0, 11.0, 3.0, 9.0, 1.0, 7.0]);
    assert_eq!(
        f32s(&w[1]),
        vec![2.0],
        "rank-1 tensor not rotated, gain and offset applied"
    );
}

#[test]
fn replay_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.f32"), raw(&[1.0, 2.0, 3.0])).unwrap();
    let c = cfg(&format!(
        "kind='replay'\ndir='{}'\nshape=[1,4]",
        dir.path().display()
    ));
    let e = from_config(&c).err().unwrap();
    assert!(
        matches!(&e, InputError::Format { path, reason } if path.ends_with("a.f32") && reason.contains("12 bytes")),
        "{e}"
    );
    let c = cfg(&format!("kind='replay'\ndir='{}'", dir.path().display()));
    let e = from_config(&c).err().unwrap().to_string();
    assert!(e.contains("sidecar"), "{e}");
    std::fs::write(dir.path().join("a.f32"), raw(&[1.0])).unwrap();
    std::fs::write(dir.path().join("a.x.f32"), raw(&[1.0])).unwrap();
    let c = cfg(&format!(
        "kind='replay'\ndir='{}'\ninputs=['x','y']\nshape=[1]",
        dir.path().display()
    ));
    let e = from_config(&c).err().unwrap().to_string();
    assert!(e.contains("a.f32"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let c = cfg(&format!("kind='replay'\ndir='{}'", empty.path().display()));
    assert!(from_config(&c)
        .err()
        .unwrap()
        .to_string()
        .contains("no .npy or .f32 files"));
}

#[test]
fn i2c_accel_config() {
    let c = cfg("kind='i2c_accel'\nbus='/dev/i2c-99'\nwindow=32");
    let e = from_config(&c).err().unwrap().to_string();
    if cfg!(feature = "linux-i2c") {
        assert!(e.contains("/dev/i2c-99"), "{e}");
    } else {
        assert!(e.contains("linux-i2c"), "{e}");
    }
    let c = cfg("kind='i2c_accel'\naddress=200");
    assert!(from_config(&c).err().unwrap().to_string().contains("7-bit"));
}
