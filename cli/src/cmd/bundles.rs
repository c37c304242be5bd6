//! `edgefleet bundles`: upload and list bundles through the fleet API; also
//! the small blocking API client the `devices` and `rollouts` commands share.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// The fleet server URL when neither `--server` nor `EDGEFLEET_SERVER` gives one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Where the fleet API is and how to authenticate.
#[derive(clap::Args, Clone)]
pub struct Conn {
    /// Fleet server URL.
    #[arg(
        long,
        env = "EDGEFLEET_SERVER",
        default_value = DEFAULT_SERVER,
        value_name = "URL"
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
    /// POST JSON; `None` for a `204 No Content` answer.
    pub fn post_json_opt(&self, path: &str, body: &Value) -> anyhow::Result<Option<Value>> {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.conn.token)
            .json(body)
            .send()
            .with_context(|| format!("POST {}", self.url(path)))?;
        if r.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        self.check(r, &format!("POST {path}")).map(Some)
    }
    /// PUT JSON.
    pub fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .put(self.url(path))
            .bearer_auth(&self.conn.token)
            .json(body)
            .send()
            .with_context(|| format!("PUT {}", self.url(path)))?;
        self.check(r, &format!("PUT {path}"))
    }
    /// GET raw bytes (an error answer is JSON and becomes the error).
    pub fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.conn.token)
            .send()
            .with_context(|| format!("GET {}", self.url(path)))?;
        if !r.status().is_success() {
            self.check(r, &format!("GET {path}"))?;
            bail!("GET {path}: unexpected answer");
        }
        Ok(r.bytes().with_context(|| format!("GET {path}"))?.to_vec())
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
    #[command(after_help = "Examples:
  edgefleet bundles upload bundles/silero_vad-1.0.0-rpi4.efb
  EDGEFLEET_SERVER=http://fleet:8080 EDGEFLEET_TOKEN=secret edgefleet bundles upload vad-2.efb")]
    Upload {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Bundle file (.efb).
        file: PathBuf,
    },
    /// List stored bundles: a table (hash prefix, model, version, release, targets,
    /// size, uploaded), or the API's JSON with --json.
    #[command(after_help = "Examples:
  edgefleet bundles list
  edgefleet bundles list --json | jq -r '.bundles[].sha256'

Commands that take a bundle (`rollouts create --bundle`) accept the full SHA-256,
a unique prefix of at least 8 hex digits, or the .efb file itself.")]
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
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
            // A refusal (409 naming the stored bundle) is an error above: non-zero exit.
            let done = if v["created"] == false {
                "already stored:"
            } else {
                "uploaded"
            };
            println!(
                "{done} {} {} release {} ({})",
                b["model"].as_str().unwrap_or("?"),
                b["version"].as_str().unwrap_or("?"),
                b["release"],
                b["sha256"].as_str().unwrap_or("?")
            );
        }
        Command::List { conn, json } => {
            let v = Client::new(conn).get("/v1/bundles", &[])?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list_table(&v, super::table::now_ms()));
            }
        }
    }
    Ok(())
}

/// Hex digits of the bundle hash shown by `bundles list` (the full hash is in `--json`).
pub const SHOWN_HASH_DIGITS: usize = 12;

/// Shortest hash prefix [`resolve_bundle`] accepts.
pub const MIN_PREFIX: usize = 8;

/// The `bundles list` table of a `GET /v1/bundles` answer, times relative to `now_ms`.
pub fn list_table(v: &Value, now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = v["bundles"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let sha = b["sha256"].as_str().unwrap_or("");
            vec![
                sha.get(..SHOWN_HASH_DIGITS).unwrap_or(sha).to_string(),
                b["model"].as_str().unwrap_or("-").to_string(),
                b["version"].as_str().unwrap_or("-").to_string(),
                b["release"].to_string(),
                super::table::list(&b["targets"]),
                super::table::bytes(b["size"].as_u64().unwrap_or(0)),
                super::table::ago(now_ms, b["uploaded_ms"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    super::table::render(
        &[
            "sha256", "model", "version", "release", "targets", "size", "uploaded",
        ],
        &rows,
    )
}

/// The full body SHA-256 a bundle argument names, asking the server's list
/// where needed: a path to a `.efb` file (or any existing file) gives the hash
/// in its manifest, 64 hex digits are taken as they are, and a shorter hex
/// prefix (at least [`MIN_PREFIX`] digits) must match exactly one stored bundle.
///
/// # Errors
/// The file does not read as a bundle, the text is neither a hash nor a file,
/// or the prefix matches no stored bundle or several (the error lists them).
pub fn resolve_bundle(client: &Client, arg: &str) -> anyhow::Result<String> {
    match BundleArg::parse(arg)? {
        BundleArg::Hash(h) => Ok(h),
        BundleArg::File(path) => {
            let sha = file_sha256(&path)?;
            let v = client.get("/v1/bundles", &[])?;
            if !bundles_of(&v).iter().any(|b| b["sha256"] == sha.as_str()) {
                bail!(
                    "bundle {} (sha256 {sha}) is not on the server: upload it first with \
                     `edgefleet bundles upload {}`",
                    path.display(),
                    path.display()
                );
            }
            Ok(sha)
        }
        BundleArg::Prefix(p) => match_prefix(&p, bundles_of(&client.get("/v1/bundles", &[])?)),
    }
}

fn bundles_of(v: &Value) -> &[Value] {
    v["bundles"].as_array().map_or(&[], Vec::as_slice)
}

/// What a bundle argument is, before asking the server.
#[derive(Debug, PartialEq, Eq)]
pub enum BundleArg {
    /// A full 64-hex-digit SHA-256 (lower case).
    Hash(String),
    /// A shorter hex prefix (lower case).
    Prefix(String),
    /// A bundle file.
    File(PathBuf),
}

impl BundleArg {
    /// Classifies `arg`: an existing file or a name ending in `.efb` is a file,
    /// hex text is a hash or a prefix.
    ///
    /// # Errors
    /// A `.efb` name that does not exist, a prefix shorter than [`MIN_PREFIX`],
    /// or text that is none of these.
    pub fn parse(arg: &str) -> anyhow::Result<Self> {
        let path = PathBuf::from(arg);
        if path.is_file() {
            return Ok(BundleArg::File(path));
        }
        if arg.ends_with(".efb") {
            bail!("bundle file {arg}: no such file");
        }
        let hex = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_hexdigit());
        match arg.len() {
            64 if hex => Ok(BundleArg::Hash(arg.to_ascii_lowercase())),
            n if hex && (MIN_PREFIX..64).contains(&n) => {
                Ok(BundleArg::Prefix(arg.to_ascii_lowercase()))
            }
            n if hex && n < MIN_PREFIX => bail!(
                "bundle `{arg}`: a hash prefix needs at least {MIN_PREFIX} hex digits \
                 (`edgefleet bundles list` shows {SHOWN_HASH_DIGITS})"
            ),
            _ => bail!(
                "bundle `{arg}`: not a SHA-256, a hash prefix (>= {MIN_PREFIX} hex digits) \
                 or a .efb file"
            ),
        }
    }
}

/// The one stored bundle whose hash starts with `prefix`.
///
/// # Errors
/// None matches, or several do (each named with its model, version and release).
pub fn match_prefix(prefix: &str, bundles: &[Value]) -> anyhow::Result<String> {
    let hits: Vec<&Value> = bundles
        .iter()
        .filter(|b| b["sha256"].as_str().is_some_and(|s| s.starts_with(prefix)))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one["sha256"].as_str().unwrap_or_default().to_string()),
        [] => bail!(
            "bundle `{prefix}`: no bundle on the server has a hash starting with it \
             (see `edgefleet bundles list`)"
        ),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|b| {
                    format!(
                        "{} ({} {} release {})",
                        b["sha256"].as_str().unwrap_or("?"),
                        b["model"].as_str().unwrap_or("?"),
                        b["version"].as_str().unwrap_or("?"),
                        b["release"]
                    )
                })
                .collect();
            bail!(
                "bundle `{prefix}` is ambiguous: {} bundles match: {}; give more digits",
                many.len(),
                names.join(", ")
            )
        }
    }
}

/// The body SHA-256 in a bundle file's manifest (not verified here: the server
/// verified the bundle at upload and only accepts hashes it stores).
///
/// # Errors
/// The file does not read or is not a bundle.
pub fn file_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    let b = edgefleet_bundle::UnverifiedBundle::read(path)
        .with_context(|| format!("bundle file {}", path.display()))?;
    Ok(b.manifest_unverified().body.sha256.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored() -> Vec<Value> {
        vec![
            json!({"sha256": format!("abcd1234{}", "0".repeat(56)), "model": "vad", "version": "1.0.0", "release": 1}),
            json!({"sha256": format!("abcd1234{}", "f".repeat(56)), "model": "vad", "version": "1.1.0", "release": 2}),
            json!({"sha256": format!("12345678{}", "9".repeat(56)), "model": "det", "version": "2.0.0", "release": 3}),
        ]
    }

    #[test]
    fn a_unique_prefix_names_its_bundle() {
        let s = stored();
        assert_eq!(
            match_prefix("12345678", &s).expect("unique"),
            format!("12345678{}", "9".repeat(56))
        );
        assert_eq!(
            match_prefix("abcd12340", &s).expect("unique"),
            format!("abcd1234{}", "0".repeat(56))
        );
    }

    #[test]
    fn an_ambiguous_prefix_lists_the_candidates() {
        let e = match_prefix("abcd1234", &stored())
            .expect_err("two match")
            .to_string();
        assert_eq!(
            e,
            format!(
                "bundle `abcd1234` is ambiguous: 2 bundles match: abcd1234{} (vad 1.0.0 release 1), \
                 abcd1234{} (vad 1.1.0 release 2); give more digits",
                "0".repeat(56),
                "f".repeat(56)
            )
        );
    }

    #[test]
    fn an_unknown_prefix_says_so() {
        let e = match_prefix("deadbeef", &stored())
            .expect_err("none")
            .to_string();
        assert!(
            e.starts_with("bundle `deadbeef`: no bundle on the server"),
            "{e}"
        );
    }

    #[test]
    fn arguments_are_classified_before_asking_the_server() {
        let full = "AB".repeat(32);
        assert_eq!(
            BundleArg::parse(&full).expect("hash"),
            BundleArg::Hash("ab".repeat(32))
        );
        assert_eq!(
            BundleArg::parse("ABCDEF12").expect("prefix"),
            BundleArg::Prefix("abcdef12".into())
        );
        let e = BundleArg::parse("abc123").expect_err("short").to_string();
        assert!(e.contains("at least 8 hex digits"), "{e}");
        let e = BundleArg::parse("vad-9.efb")
            .expect_err("missing")
            .to_string();
        assert_eq!(e, "bundle file vad-9.efb: no such file");
        let e = BundleArg::parse("not-a-hash")
            .expect_err("junk")
            .to_string();
        assert!(e.contains("not a SHA-256"), "{e}");
    }

    #[test]
    fn a_bundle_file_gives_the_hash_in_its_manifest() {
        let d = tempfile::tempdir().expect("tmp");
        let key = edgefleet_bundle::SigningKey::generate();
        let bytes = edgefleet_agent::testkit::bundle(
            edgefleet_agent::testkit::Kind::Good,
            &key,
            "m",
            1,
            "x86-avx2-gateway",
            2.0,
        );
        let path = d.path().join("m-1.efb");
        std::fs::write(&path, &bytes).expect("write");
        let arg = path.to_str().expect("utf-8");
        assert_eq!(
            BundleArg::parse(arg).expect("file"),
            BundleArg::File(path.clone())
        );
        let ub = edgefleet_bundle::UnverifiedBundle::parse(&bytes).expect("parses");
        assert_eq!(
            file_sha256(&path).expect("reads"),
            ub.manifest_unverified().body.sha256.to_hex()
        );
        std::fs::write(&path, b"junk").expect("write");
        let e = format!("{:#}", file_sha256(&path).expect_err("not a bundle"));
        assert!(
            e.starts_with(&format!("bundle file {}", path.display())),
            "{e}"
        );
    }

    #[test]
    fn the_list_is_a_table_with_short_hashes_and_ages() {
        let now = 1_700_000_000_000u64;
        let v = json!({"bundles": [{
            "sha256": "ab".repeat(32), "model": "silero_vad", "version": "1.0.0", "release": 1,
            "targets": ["rpi4", "x86-avx2-gateway"], "size": 2_500_000, "uploaded_ms": now - 180_000,
        }]});
        assert_eq!(
            list_table(&v, now),
            "sha256        model       version  release  targets                size     uploaded\n\
             abababababab  silero_vad  1.0.0    1        rpi4,x86-avx2-gateway  2.4 MiB  3m ago\n"
        );
    }
}
