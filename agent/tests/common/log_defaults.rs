//! The log-default assertions both agent entry points share (issue #20),
//! included by agent/tests/log_defaults.rs (the `edgefleet-agent` binary) and
//! cli/tests/log_defaults.rs (`edgefleet agent`). The includer defines `EXE`
//! (the binary) and `PREFIX` (the arguments before the agent's own).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_bundle::SigningKey;

use super::{EXE, PREFIX};

/// An agent config in `dir`: its broker port is closed (the agent keeps
/// retrying), its API on a free loopback port.
fn config(dir: &Path) -> std::path::PathBuf {
    let key = SigningKey::generate();
    key.write_pem_files(&dir.join("release.pem"), &dir.join("release.pub.pem"))
        .expect("keys");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "device_id = \"log-1\"\ndata_dir = \"data\"\ntarget = \"x86-avx2-gateway\"\n\
             trusted_keys = [\"release.pub.pem\"]\n[broker]\nurl = \"mqtt://127.0.0.1:{closed}\"\n\
             [api]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .expect("config");
    cfg
}

/// Runs `cmd` until its stderr has a line containing `until` (or 30 s), kills
/// it, and returns its stderr.
fn run_until(mut cmd: Command, dir: &Path, until: &str) -> String {
    let log = dir.join("stderr.log");
    let mut child = cmd
        .env_remove("EDGEFLEET_LOG")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start");
    let t = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(until) || t.elapsed() > Duration::from_secs(30) {
            break text;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("exited ({st}):\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}

#[test]
fn logs_info_by_default() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path());
    let mut cmd = Command::new(EXE);
    cmd.args(PREFIX).arg("--config").arg(&cfg);
    let text = run_until(cmd, dir.path(), "local API listening");
    let line = text
        .lines()
        .find(|l| l.contains("local API listening"))
        .unwrap_or_else(|| panic!("no info line by default:\n{text}"));
    assert!(line.contains(" INFO edgefleet_agent"), "{line}");
    assert!(!text.contains(" DEBUG "), "debug lines by default:\n{text}");
}

#[test]
fn log_level_flag_wins() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path());
    let mut cmd = Command::new(EXE);
    cmd.args(PREFIX)
        .args(["--log-level", "warn", "--config"])
        .arg(&cfg);
    // The warning that no model is loaded comes after the API line.
    let text = run_until(cmd, dir.path(), "no model loaded");
    assert!(text.contains(" WARN "), "{text}");
    assert!(
        !text.contains(" INFO "),
        "info lines at --log-level warn:\n{text}"
    );
}

#[test]
fn help_documents_the_log_options_and_a_bad_level_is_named() {
    let o = Command::new(EXE)
        .args(PREFIX)
        .args(["--help"])
        .env_remove("EDGEFLEET_LOG")
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("--log-level <LEVEL|DIRECTIVE>")
            && help.contains("[env: EDGEFLEET_LOG=]")
            && help.contains("[default: info]"),
        "{help}"
    );
    let o = Command::new(EXE)
        .args(PREFIX)
        .args(["--config", "x.toml"])
        .env("EDGEFLEET_LOG", "edgefleet=loud")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.starts_with("error: --log-level / EDGEFLEET_LOG: `edgefleet=loud` is not a log level"),
        "{e}"
    );
}

#[test]
fn a_misspelt_level_is_refused_with_exit_2_listing_the_levels() {
    for bad in ["verbose", "debg"] {
        let o = Command::new(EXE)
            .args(PREFIX)
            .args(["--config", "x.toml", "--log-level", bad])
            .env_remove("EDGEFLEET_LOG")
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            e.trim_end(),
            format!(
                "error: --log-level / EDGEFLEET_LOG: `{bad}` is not a log level or an EnvFilter \
                 directive: expected one of the levels error, warn, info, debug, trace, off, \
                 or a directive such as `info,edgefleet_agent::update=debug`"
            )
        );
    }
}
