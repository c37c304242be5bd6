//! A local MLflow tracking server (`mlflow server`, SQLite backend, artifacts served by the
//! tracking server) as a child process: what the tests use, and what a team without a
//! tracking server can start to try `--mlflow` (`pip install mlflow==2.17.2`).

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// A running `mlflow server`; killed on drop.
pub struct LocalMlflow {
    child: Child,
    log: PathBuf,
    url: String,
}

impl Drop for LocalMlflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when an `mlflow` command is on PATH.
pub fn installed() -> bool {
    Command::new("mlflow")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn err(reason: String) -> Error {
    Error::Invalid {
        what: "local MLflow server".into(),
        reason,
    }
}

impl LocalMlflow {
    /// Starts `mlflow server` on a free 127.0.0.1 port with its database, artifacts and log
    /// under `dir`, and waits (up to `timeout`) for `GET /health`. Errors carry the server log.
    pub fn start(dir: &Path, timeout: Duration) -> Result<Self, Error> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| err(format!("no free port: {e}")))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let log = dir.join("mlflow-server.log");
        let logf = std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?;
        let logf2 = logf.try_clone().map_err(|e| Error::io(&log, e))?;
        let child = Command::new("mlflow")
            .args(["server", "--host", "127.0.0.1", "--workers", "1", "--port"])
            .arg(port.to_string())
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--serve-artifacts")
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .stdout(logf2)
            .stderr(logf)
            .spawn()
            .map_err(|e| err(format!("cannot run `mlflow server`: {e}")))?;
        let mut s = LocalMlflow {
            child,
            log,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = reqwest::blocking::get(format!("{}/health", s.url)) {
                if r.status().is_success() {
                    return Ok(s);
                }
            }
            let exited = s.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let mut text = String::new();
                let _ = std::fs::File::open(&s.log).and_then(|mut f| f.read_to_string(&mut text));
                return Err(err(format!(
                    "{} not healthy within {:?} (exit: {exited:?}); its log:\n{text}",
                    s.url, timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The tracking URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}
