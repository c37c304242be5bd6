//! Which device trains: CUDA when the driver, NVRTC and the CUDA headers are present, the CPU
//! (burn's ndarray backend) otherwise.
//!
//! Design: the probe looks at files only (no dlopen) and runs BEFORE burn touches CUDA: on a
//! machine without the NVIDIA driver burn 0.21's CUDA device panics in a worker thread on first
//! use ("Unable to dynamically load the cuda shared library"), which cannot be caught cleanly.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::Error;

/// What the user asked for (`--device auto|cuda|cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA when usable, else the CPU.
    #[default]
    Auto,
    /// CUDA or an error.
    Cuda,
    /// The CPU (burn ndarray backend).
    Cpu,
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            "cpu" => Ok(DeviceChoice::Cpu),
            other => Err(Error::Invalid {
                what: "device".into(),
                reason: format!("{other:?}: expected auto, cuda or cpu"),
            }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Cpu => "cpu",
        })
    }
}

/// The backend a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// burn's CUDA backend (cubecl, NVRTC), GPU 0.
    Cuda,
    /// burn's ndarray backend.
    Cpu,
}

/// The decision and why (the run record stores both).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selected {
    /// The backend chosen.
    pub kind: DeviceKind,
    /// What was asked for.
    pub requested: String,
    /// Why, in words (what the probe found or missed).
    pub reason: String,
}

/// What the CUDA probe found; `None` where nothing was found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CudaProbe {
    /// The driver library, `libcuda.so.1` (or `libcuda.so`).
    pub driver: Option<PathBuf>,
    /// The NVRTC library, `libnvrtc.so*`.
    pub nvrtc: Option<PathBuf>,
    /// The CUDA headers (`cuda.h`) NVRTC compiles kernels against.
    pub headers: Option<PathBuf>,
    /// Where the probe looked, for the error message.
    pub searched: Vec<PathBuf>,
}

impl CudaProbe {
    /// True when the driver, NVRTC and the headers are all present.
    pub fn usable(&self) -> bool {
        self.driver.is_some() && self.nvrtc.is_some() && self.headers.is_some()
    }

    /// What is missing, in words, or an empty string.
    pub fn missing(&self) -> String {
        let mut m = Vec::new();
        if self.driver.is_none() {
            m.push(
                "the NVIDIA driver library libcuda.so.1 (not in ld.so.cache nor the library dirs)",
            );
        }
        if self.nvrtc.is_none() {
            m.push("the NVRTC library libnvrtc.so (CUDA toolkit)");
        }
        if self.headers.is_none() {
            m.push("the CUDA headers (cuda.h under /usr/local/cuda/include or $CUDA_PATH/include)");
        }
        let dirs: Vec<String> = self
            .searched
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!("missing {}; searched {}", m.join(", "), dirs.join(":"))
    }
}

/// Library folders where the driver and NVRTC usually live.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/lib/wsl/lib",
];

/// Probes this machine: `$CUDA_PATH`, `$LD_LIBRARY_PATH`, the usual folders and `ldconfig -p`.
pub fn probe_system() -> CudaProbe {
    let cuda_root = std::env::var_os("CUDA_PATH")
        .or_else(|| std::env::var_os("CUDA_HOME"))
        .map(PathBuf::from);
    let mut lib_dirs: Vec<PathBuf> = Vec::new();
    if let Some(root) = &cuda_root {
        lib_dirs.push(root.join("lib64"));
        lib_dirs.push(root.join("lib"));
    }
    if let Some(ld) = std::env::var_os("LD_LIBRARY_PATH") {
        lib_dirs.extend(std::env::split_paths(&ld));
    }
    lib_dirs.extend(LIB_DIRS.iter().map(PathBuf::from));
    let mut include_dirs: Vec<PathBuf> = Vec::new();
    if let Some(root) = &cuda_root {
        include_dirs.push(root.join("include"));
    }
    include_dirs.push("/usr/local/cuda/include".into());
    include_dirs.push("/usr/include".into());
    let ldconfig = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .ok()
        .or_else(|| {
            std::process::Command::new("/sbin/ldconfig")
                .arg("-p")
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    probe(&lib_dirs, ldconfig.as_deref(), &include_dirs)
}

/// The probe's decision from given folders and `ldconfig -p` output (testable on fake trees).
pub fn probe(lib_dirs: &[PathBuf], ldconfig: Option<&str>, include_dirs: &[PathBuf]) -> CudaProbe {
    let driver = find_lib(lib_dirs, ldconfig, &["libcuda.so.1", "libcuda.so"]);
    let nvrtc = find_lib(lib_dirs, ldconfig, &["libnvrtc.so"]);
    let headers = include_dirs
        .iter()
        .map(|d| d.join("cuda.h"))
        .find(|p| p.is_file());
    let mut searched = lib_dirs.to_vec();
    searched.extend(include_dirs.iter().cloned());
    CudaProbe {
        driver,
        nvrtc,
        headers,
        searched,
    }
}

/// `.1`, `.12.4`: a shared-library version suffix (dots and digits only).
fn is_version_suffix(rest: &str) -> bool {
    rest.len() > 1 && rest.starts_with('.') && rest.bytes().all(|b| b == b'.' || b.is_ascii_digit())
}

/// The first library named by `prefixes` (exactly, or followed by a version suffix).
fn find_lib(dirs: &[PathBuf], ldconfig: Option<&str>, names: &[&str]) -> Option<PathBuf> {
    let matches = |file: &str| {
        names
            .iter()
            .any(|n| file == *n || file.strip_prefix(n).is_some_and(is_version_suffix))
    };
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(d) {
            let mut hits: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(matches))
                .map(|e| e.path())
                .filter(|p| p.exists())
                .collect();
            hits.sort();
            if let Some(h) = hits.into_iter().next() {
                return Some(h);
            }
        }
    }
    ldconfig?.lines().find_map(|line| {
        // "	libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1"
        let (lhs, rhs) = line.split_once("=>")?;
        let name = lhs.split_whitespace().next()?;
        let path = Path::new(rhs.trim());
        (matches(name) && path.exists()).then(|| path.to_path_buf())
    })
}

/// Chooses the device for `choice` on this machine.
pub fn select(choice: DeviceChoice) -> Result<Selected, Error> {
    let probe = match choice {
        DeviceChoice::Cpu => CudaProbe::default(),
        _ => probe_system(),
    };
    decide(choice, &probe)
}

/// The decision for `choice` given a probe's result.
pub fn decide(choice: DeviceChoice, probe: &CudaProbe) -> Result<Selected, Error> {
    let requested = choice.to_string();
    let found = || {
        format!(
            "CUDA driver {}, NVRTC {}, headers {}",
            disp(&probe.driver),
            disp(&probe.nvrtc),
            disp(&probe.headers)
        )
    };
    match choice {
        DeviceChoice::Cpu => Ok(Selected {
            kind: DeviceKind::Cpu,
            requested,
            reason: "the CPU was asked for".into(),
        }),
        DeviceChoice::Cuda if probe.usable() => Ok(Selected {
            kind: DeviceKind::Cuda,
            requested,
            reason: format!("CUDA was asked for: {}", found()),
        }),
        DeviceChoice::Cuda => Err(Error::CudaUnavailable {
            missing: probe.missing(),
        }),
        DeviceChoice::Auto if probe.usable() => Ok(Selected {
            kind: DeviceKind::Cuda,
            requested,
            reason: format!("auto: CUDA found: {}", found()),
        }),
        DeviceChoice::Auto => Ok(Selected {
            kind: DeviceKind::Cpu,
            requested,
            reason: format!(
                "auto: CUDA not usable, training on the CPU: {}",
                probe.missing()
            ),
        }),
    }
}

fn disp(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "absent".to_string(), |p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(p, b"").expect("write");
    }

    #[test]
    fn parses_and_displays() {
        for c in [DeviceChoice::Auto, DeviceChoice::Cuda, DeviceChoice::Cpu] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().ok(), Some(c));
        }
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn empty_tree_means_cpu_for_auto_and_an_error_for_cuda() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = probe(
            &[t.path().join("lib")],
            Some(""),
            &[t.path().join("include")],
        );
        assert!(!p.usable());
        let auto = decide(DeviceChoice::Auto, &p).expect("auto");
        assert_eq!(auto.kind, DeviceKind::Cpu);
        assert!(auto.reason.contains("libcuda.so.1"), "{}", auto.reason);
        let err = decide(DeviceChoice::Cuda, &p).expect_err("cuda absent");
        let msg = err.to_string();
        assert!(
            msg.contains("libcuda.so.1") && msg.contains("cuda.h"),
            "{msg}"
        );
    }

    #[test]
    fn full_tree_means_cuda() {
        let t = tempfile::tempdir().expect("tempdir");
        let lib = t.path().join("lib");
        touch(&lib.join("libcuda.so.1"));
        touch(&lib.join("libnvrtc.so.12"));
        touch(&t.path().join("include/cuda.h"));
        let p = probe(
            std::slice::from_ref(&lib),
            None,
            &[t.path().join("include")],
        );
        assert!(p.usable(), "{p:?}");
        assert_eq!(
            decide(DeviceChoice::Auto, &p).expect("auto").kind,
            DeviceKind::Cuda
        );
        assert_eq!(
            decide(DeviceChoice::Cuda, &p).expect("cuda").kind,
            DeviceKind::Cuda
        );
        assert_eq!(
            decide(DeviceChoice::Cpu, &p).expect("cpu").kind,
            DeviceKind::Cpu
        );
    }

    #[test]
    fn driver_without_headers_is_not_enough_and_ldconfig_counts() {
        let t = tempfile::tempdir().expect("tempdir");
        let elsewhere = t.path().join("elsewhere");
        touch(&elsewhere.join("libcuda.so.1"));
        touch(&elsewhere.join("libnvrtc.so"));
        // A name that only starts like the library must not count.
        touch(&t.path().join("lib/libcuda.so.1-not"));
        let ld = format!(
            "\tlibcuda.so.1 (libc6,x86-64) => {}\n\tlibnvrtc.so (libc6,x86-64) => {}\n",
            elsewhere.join("libcuda.so.1").display(),
            elsewhere.join("libnvrtc.so").display()
        );
        let p = probe(
            &[t.path().join("lib")],
            Some(&ld),
            &[t.path().join("include")],
        );
        assert_eq!(p.driver, Some(elsewhere.join("libcuda.so.1")));
        assert!(p.nvrtc.is_some());
        assert!(p.headers.is_none());
        let err = decide(DeviceChoice::Cuda, &p).expect_err("no headers");
        assert!(err.to_string().contains("cuda.h"));
        assert!(!err.to_string().contains("libcuda.so.1 (not"), "{err}");
    }
}
