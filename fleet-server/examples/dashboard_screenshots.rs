//! Screenshots of every dashboard page at 1280x800 from a running fleet
//! server (the README's pictures come from `edgefleet demo`'s data).
//!
//! ```sh
//! edgefleet demo &        # prints "one-time login: http://ADDR/login/once/CODE"
//! cargo run -p edgefleet-fleet-server --example dashboard_screenshots -- \
//!     http://ADDR/login/once/CODE docs/dashboard [DEVICE] [ROLLOUT]
//! ```
//!
//! With `EDGEFLEET_TOKEN` set, logs in with the operator token instead of
//! the one-time link (which works once). Needs `chromedriver` and
//! `chromium` on PATH. DEVICE (default: the first
//! device with a drift alarm, else the first listed) and ROLLOUT (default:
//! the newest) choose the device and rollout pages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(link), Some(out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: dashboard_screenshots LOGIN_LINK OUT_DIR [DEVICE] [ROLLOUT]");
        std::process::exit(2);
    };
    let base = link
        .split("/login/once/")
        .next()
        .ok_or("the login link has no /login/once/")?
        .trim_end_matches('/')
        .to_string();
    std::fs::create_dir_all(out)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
                        "--hide-scrollbars"]}),
    );
    let c = ClientBuilder::rustls()?
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await?;
    // The window size includes the browser's frame: grow it until the
    // viewport (what a screenshot shows) is 1280x800.
    c.set_window_size(1280, 800).await?;
    let inner = c
        .execute("return [window.innerWidth, window.innerHeight];", vec![])
        .await?;
    let (w, h) = (
        inner[0].as_u64().unwrap_or(1280) as u32,
        inner[1].as_u64().unwrap_or(800) as u32,
    );
    c.set_window_size(1280 + (1280 - w.min(1280)), 800 + (800 - h.min(800)))
        .await?;
    match std::env::var("EDGEFLEET_TOKEN") {
        // A one-time link works once; with the operator token the same run
        // can be repeated against the same server.
        Ok(token) => {
            c.goto(&format!("{base}/login")).await?;
            c.find(Locator::Id("token"))
                .await?
                .send_keys(&token)
                .await?;
            c.find(Locator::Id("login")).await?.click().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(_) => {
            c.goto(link).await?;
            c.find(Locator::Id("login")).await?.click().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let device = match args.get(3) {
        Some(d) => d.clone(),
        None => {
            c.goto(&format!("{base}/drift")).await?;
            let flagged = c.find_all(Locator::Css("tr.flagged")).await?;
            let any = match flagged.first() {
                Some(e) => e.attr("data-device").await?,
                None => None,
            };
            match any {
                Some(d) => d,
                None => {
                    c.goto(&format!("{base}/devices")).await?;
                    c.find(Locator::Css("#devices tbody a"))
                        .await?
                        .text()
                        .await?
                }
            }
        }
    };
    let rollout = match args.get(4) {
        Some(r) => r.clone(),
        None => {
            c.goto(&format!("{base}/rollouts")).await?;
            c.find(Locator::Css("#rollouts tbody a"))
                .await?
                .text()
                .await?
        }
    };
    let pages = [
        ("fleet", "/".to_string()),
        ("devices", "/devices".to_string()),
        ("device", format!("/devices/{device}")),
        ("rollouts", "/rollouts".to_string()),
        ("rollout", format!("/rollouts/{rollout}")),
        ("drift", "/drift".to_string()),
        ("bundles", "/bundles".to_string()),
    ];
    for (name, path) in pages {
        c.goto(&format!("{base}{path}")).await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let png = c.screenshot().await?;
        let file = std::path::Path::new(out).join(format!("{name}.png"));
        std::fs::write(&file, png)?;
        println!("{}", file.display());
    }
    c.close().await?;
    let _ = driver.kill();
    Ok(())
}
