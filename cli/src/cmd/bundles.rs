//! `edgefleet bundles`: upload and list bundles through the fleet API; also
//! the small blocking API client the `devices` and `rollouts` commands share.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// Where the fleet API is and how to authenticate.
#[derive(clap::Args, Clone)]
pub struct Conn {
    /// Fleet server URL.
    #[arg(
        long,
        env = "EDGEFLEET_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Operator bearer token.
    #[arg(long, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    pub token: String,
}

/// Blocking API client.
pub struct Client {
    conn: Conn,
    http: reqwest::blocking::Client,
}

impl Client {
    /// A client.
    pub fn new(conn: Conn) -> Self {
        Client {
            conn,
            http: reqwest::blocking::Client::new(),
        }
    }
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.conn.server.trim_end_matches('/'))
    }
    fn check(&self, r: reqwest::blocking::Response, what: &str) -> anyhow::Result<Value> {
        let status = r.status();
        let v: Value = r
            .json()
            .with_context(|| format!("{what}: response is not JSON"))?;
        if !status.is_success() {
            bail!(
                "{what}: HTTP {}: {}",
                status.as_u16(),
                v["error"]["message"].as_str().unwrap_or("unknown error")
            );
        }
        Ok(v)
    }
    /// GET with query pairs.
    pub fn get(&self, path: &str, q: &[(&str, String)]) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(self.url(path))
            .query(q)
            .bearer_auth(&self.conn.token)
            .send()
            .with_context(|| format!("GET {}", self.url(path)))?;
        self.check(r, &format!("GET {path}"))
    }
    /// GET and pretty-print.
    pub fn print(&self, path: &str) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(&self.get(path, &[])?)?);
        Ok(())
    }
    /// POST JSON.
    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.conn.token)
            .json(body)
            .send()
            .with_context(|| format!("POST {}", self.url(path)))?;
        self.check(r, &format!("POST {path}"))
    }
    /// DELETE.
    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .delete(self.url(path))
            .bearer_auth(&self.conn.token)
            .send()
            .with_context(|| format!("DELETE {}", self.url(path)))?;
        self.check(r, &format!("DELETE {path}"))
    }
    /// POST raw bytes.
    pub fn post_bytes(&self, path: &str, body: Vec<u8>) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.conn.token)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .with_context(|| format!("POST {}", self.url(path)))?;
        self.check(r, &format!("POST {path}"))
    }
}

/// Subcommands of `edgefleet bundles`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Upload a bundle file (the server verifies it).
    Upload {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Bundle file (.efb).
        file: PathBuf,
    },
    /// List stored bundles.
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
    },
}

/// Runs `edgefleet bundles`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Upload { conn, file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let v = Client::new(conn).post_bytes("/v1/bundles", bytes)?;
            let b = &v["bundle"];
            println!(
                "uploaded {} {} release {} ({})",
                b["model"].as_str().unwrap_or("?"),
                b["version"].as_str().unwrap_or("?"),
                b["release"],
                b["sha256"].as_str().unwrap_or("?")
            );
        }
        Command::List { conn } => {
            let v = Client::new(conn).get("/v1/bundles", &[])?;
            println!(
                "{:<64} {:<16} {:<10} {:<8} {:>10} targets",
                "sha256", "model", "version", "release", "bytes"
            );
            for b in v["bundles"].as_array().into_iter().flatten() {
                println!(
                    "{:<64} {:<16} {:<10} {:<8} {:>10} {}",
                    b["sha256"].as_str().unwrap_or(""),
                    b["model"].as_str().unwrap_or(""),
                    b["version"].as_str().unwrap_or(""),
                    b["release"],
                    b["size"],
                    b["targets"]
                );
            }
        }
    }
    Ok(())
}
