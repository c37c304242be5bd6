//! The dashboard in a real browser (issue #14): headless Chromium driven
//! through chromedriver (WebDriver, fantoccini) against a fleet server with
//! simulated devices on its embedded broker.
//!
//! The browser logs in (a wrong token first), reads the fleet page's exact
//! counts, pauses a running rollout with its button, sees a device's latency
//! chart drawn (a canvas, data points), finds exactly the drifting device
//! flagged on the drift page, and logs out. Without the cookie a page is
//! redirected to the login and a form post refused; a cross-site page that
//! auto-submits a form to the dashboard gets 403 and changes nothing; a
//! same-site post without the CSRF token, or from another Origin, is refused.
//! A one-time login link is spent by its button's post, not by opening it,
//! and works once.
//!
//! Needs `chromedriver` and `chromium` (Debian: `apt-get install chromium
//! chromium-driver`; `.ci/run` installs them). Without them the test fails,
//! naming what is missing, unless `EDGEFLEET_NO_BROWSER=1` says to skip it.
//! Screenshots: on a failure every page visited so far is saved under
//! `target/dashboard-screenshots/`; with `EDGEFLEET_SCREENSHOTS=DIR` they
//! are always saved there.
//!
//! ```sh
//! cargo test -p edgefleet-fleet-server --test dashboard
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edgefleet_drift::Verdict;
use edgefleet_fleet_server::rollout::RolloutState;
use edgefleet_fleet_server::sim::{Behavior, SimDevice};
use edgefleet_fleet_server::{BrokerConfig, Server};
use edgefleet_protocol::topics::UpKind;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

/// Starts chromedriver on a free port; `None` (test skipped) only when
/// `EDGEFLEET_NO_BROWSER=1`.
fn driver() -> Option<Driver> {
    let exe = std::env::var_os("EDGEFLEET_CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| which("chromedriver"));
    let Some(exe) = exe else {
        if std::env::var("EDGEFLEET_NO_BROWSER").as_deref() == Ok("1") {
            eprintln!("SKIP: no chromedriver and EDGEFLEET_NO_BROWSER=1");
            return None;
        }
        panic!(
            "chromedriver not found on PATH (apt-get install chromium chromium-driver, \
             or set EDGEFLEET_NO_BROWSER=1 to skip the browser test)"
        );
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&exe)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", exe.display()));
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "chromedriver never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

async fn browser(d: &Driver) -> Client {
    let mut opts = json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--window-size=1280,800"]});
    if let Some(bin) = which("chromium") {
        opts["binary"] = json!(bin.display().to_string());
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), opts);
    ClientBuilder::rustls()
        .expect("rustls client")
        .capabilities(caps)
        .connect(&d.url)
        .await
        .expect("a chromium session from chromedriver")
}

/// Screenshots of the pages visited, written on failure (or always with
/// `EDGEFLEET_SCREENSHOTS`).
#[derive(Default, Clone)]
struct Shots(std::sync::Arc<std::sync::Mutex<Vec<Shot>>>);

/// A page's name and its PNG.
type Shot = (String, Vec<u8>);

impl Shots {
    async fn take(&self, c: &Client, name: &str) {
        if let Ok(png) = c.screenshot().await {
            self.0.lock().unwrap().push((name.to_string(), png));
        }
    }

    fn save(&self, dir: &std::path::Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (n, png) in self.0.lock().unwrap().iter() {
            std::fs::write(dir.join(format!("{n}.png")), png).unwrap();
        }
        eprintln!("screenshots in {}", dir.display());
    }
}

/// The fleet: 6 devices on release 1 in group `line`; a rollout of release 2
/// whose first wave (one device, whichever the seed picks) commits and whose
/// second waits on silent devices (so it is running); telemetry on `dash-0`;
/// `dash-3` drifting.
struct Fleet {
    server: Server,
    /// Kept alive (connected) for the whole test.
    _devs: Vec<SimDevice>,
    rollout: String,
}

async fn fleet_with_a_running_rollout() -> Fleet {
    let k = keys();
    let dir = tempfile::tempdir().unwrap().keep();
    let mut cfg = config(&dir, &k, BrokerConfig::Embedded { port: 0 });
    cfg.drift_rule.min_devices = 1;
    let server = Server::start(cfg).await.unwrap();
    let api = Api::new(&server);
    let mut sc = sim_config(&k, server.broker_port(), "dash");
    sc.initial = Some(release(1));
    // Whichever device the seeded wave 0 picks commits; the rest stay silent
    // so wave 1 waits (the rollout stays running).
    let first = std::sync::atomic::AtomicBool::new(true);
    let script = std::sync::Arc::new(
        move |_: &str, _: &edgefleet_protocol::messages::ReleaseRef| {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                Behavior::Commit
            } else {
                Behavior::Silent
            }
        },
    );
    let devs = fleet("dash", 6, &sc, script).await;
    api.wait_registered("dash", 6).await;
    for d in &devs {
        let (st, v) = api
            .post(
                &format!("/v1/devices/{}/groups", d.id),
                json!({"add": ["line"]}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let sha = api.upload(bundle(&k, 2, 4096)).await;
    let rollout = api
        .create_rollout(json!({
            "bundle": sha, "selector": {"tag": "dash"}, "waves": ["1", "100%"],
            "seed": 1, "wave_timeout_s": 600, "max_failure_rate": 0.0,
        }))
        .await;
    wait_rollout(&server, &rollout, Duration::from_secs(20), |r| {
        r.current_wave == Some(1)
    })
    .await;
    for i in 0..4 {
        devs[0].send_telemetry(50, 3.0 + i as f64, 0).await.unwrap();
    }
    for (i, d) in devs.iter().enumerate() {
        let (v, stat) = if i == 3 {
            (Verdict::Drift, 0.9)
        } else {
            (Verdict::Ok, 0.05)
        };
        let m = drift_report(&d.id, release(1), 1, v, &[("input:x:rms", stat, v)]);
        d.publish(UpKind::Drift, &m).await.unwrap();
    }
    wait_for(&api, "/v1/drift", Duration::from_secs(20), |v| {
        v["drift"].as_array().is_some_and(|a| a.len() == 6)
    })
    .await;
    wait_for(
        &api,
        "/v1/telemetry?device=dash-0",
        Duration::from_secs(20),
        |v| v["telemetry"]["records"].as_u64().unwrap_or(0) >= 4,
    )
    .await;
    Fleet {
        server,
        _devs: devs,
        rollout,
    }
}

/// The text of the first element matching `css`, waiting up to 10 s for it;
/// an element gone stale (the page navigated between finding and reading
/// it) is looked up again.
async fn text(c: &Client, css: &str) -> String {
    let t0 = Instant::now();
    loop {
        let e = c
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}`: {e}"));
        match e.text().await {
            Ok(t) => return t,
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                eprintln!("`{css}` again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("`{css}`: {e}"),
        }
    }
}

/// Waits up to 10 s for `css` to read `want` (a form post navigates, so the
/// old page may still be showing when the click returns).
async fn wait_text(c: &Client, css: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        let got = text(c, css).await;
        if got == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "`{css}` reads {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn log_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/")).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert_eq!(
        url.path(),
        "/login",
        "a page without a session goes to the login"
    );
    let field = c.find(Locator::Id("token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// The browser part; screenshots go to `shots`.
async fn drive(c: &Client, f: &Fleet, base: &str, shots: &Shots) {
    // A wrong token gets the form again with the error.
    log_in(c, base, "wrong-token").await;
    wait_text(c, "p.error", "wrong token").await;
    shots.take(c, "login").await;
    log_in(c, base, TOKEN).await;
    // Fleet: exact counts.
    wait_text(c, "#count-total", "6").await;
    for (class, n) in [
        ("online", 6),
        ("updating", 0),
        ("in_trial", 0),
        ("rolled_back", 0),
        ("offline", 0),
    ] {
        assert_eq!(
            text(c, &format!("#count-{class}")).await,
            n.to_string(),
            "{class}"
        );
    }
    shots.take(c, "fleet").await;
    // Rollout: pause with the button.
    c.goto(&format!("{base}/rollouts/{}", f.rollout))
        .await
        .unwrap();
    assert_eq!(text(c, "#state").await, "running");
    shots.take(c, "rollout").await;
    c.find(Locator::Id("pause"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(c, "#state", "paused").await;
    let st = f.server.state().rollouts.lock().unwrap()[&f.rollout]
        .state
        .clone();
    assert_eq!(st, RolloutState::Paused);
    // Device: the latency chart is drawn with data points.
    c.goto(&format!("{base}/devices/dash-0")).await.unwrap();
    let chart = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#chart-latency[data-drawn='1'] canvas"))
        .await
        .expect("a drawn latency chart");
    assert!(
        chart.rectangle().await.unwrap().2 > 100.0,
        "canvas has a width"
    );
    let points: usize = c
        .find(Locator::Id("chart-latency"))
        .await
        .unwrap()
        .attr("data-points")
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!(points >= 2, "latency points: {points}");
    shots.take(c, "device").await;
    // Drift: exactly the drifting device is flagged.
    c.goto(&format!("{base}/drift")).await.unwrap();
    text(c, "section.group").await;
    let mut flagged = BTreeSet::new();
    for row in c.find_all(Locator::Css("tr.flagged")).await.unwrap() {
        flagged.insert(row.attr("data-device").await.unwrap().unwrap());
    }
    assert_eq!(flagged, BTreeSet::from(["dash-3".to_string()]));
    shots.take(c, "drift").await;
    c.goto(&format!("{base}/bundles")).await.unwrap();
    assert_eq!(text(c, "#matched").await, "1 bundles match");
    c.goto(&format!("{base}/bundles?model=nope")).await.unwrap();
    assert_eq!(
        text(c, "#matched").await,
        "0 bundles match",
        "the model filter"
    );
    c.goto(&format!("{base}/bundles")).await.unwrap();
    text(c, "#bundles").await;
    shots.take(c, "bundles").await;
    c.goto(&format!("{base}/devices?group=line")).await.unwrap();
    assert_eq!(text(c, "#matched").await, "6 devices match");
    shots.take(c, "devices").await;
}

/// A page on another site (`localhost` vs `127.0.0.1`) whose form posts to
/// the dashboard on load; returns its URL.
async fn attacker_site(target: String) -> String {
    let page = format!(
        "<!doctype html><form id=f method=post action='{target}'>\
         <input type=hidden name=csrf value=guess></form>\
         <script>document.getElementById('f').submit()</script>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let p = page.clone();
            async move { axum::response::Html(p) }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://localhost:{port}/")
}

async fn cross_site_post_is_refused(c: &Client, f: &Fleet, base: &str) {
    log_in(c, base, TOKEN).await;
    wait_text(c, "#count-total", "6").await;
    let evil = attacker_site(format!("{base}/rollouts/{}/resume", f.rollout)).await;
    c.goto(&evil).await.unwrap();
    let t0 = Instant::now();
    while c.current_url().await.unwrap().host_str() == Some("localhost") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the form never submitted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = text(c, "body").await;
    assert!(body.contains("Refused"), "the cross-site post: {body}");
    let st = f.server.state().rollouts.lock().unwrap()[&f.rollout]
        .state
        .clone();
    assert_eq!(
        st,
        RolloutState::Paused,
        "the cross-site post changed nothing"
    );
}

/// A one-time link: opening it (GET, as a link previewer would) spends
/// nothing; its button's post from another origin is refused; the real post
/// logs in once; a second post is refused.
async fn one_time_link_works_once(f: &Fleet, base: &str) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let link = format!(
        "{base}/login/once/{}",
        f.server.state().dashboard.one_time_code()
    );
    for _ in 0..2 {
        let r = http.get(&link).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "GET shows the button");
        assert!(
            r.headers().get("set-cookie").is_none(),
            "GET starts no session"
        );
    }
    let r = http
        .post(&link)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "a cross-origin post of the link");
    let r = http.post(&link).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303, "the link's own post");
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("HttpOnly"));
    let r = http.post(&link).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "used once already");
    let r = http
        .post(format!("{base}/login/once/{}", "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "a made-up code");
}

/// Same-site posts: no cookie, no token, wrong Origin: all refused.
async fn forged_requests_are_refused(f: &Fleet, base: &str) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303, "GET / without a cookie");
    assert_eq!(r.headers()["location"], "/login");
    let resume = format!("{base}/rollouts/{}/resume", f.rollout);
    let r = http
        .post(&resume)
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "POST without a cookie");
    // Log in over HTTP; take the cookie and the page's CSRF token.
    let r = http
        .post(format!("{base}/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let page = http
        .get(format!("{base}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a csrf field")
        .to_string();
    let post = |form: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut b = http.post(&resume).header("cookie", &cookie).form(&form);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.send()
    };
    let r = http
        .get(format!("{base}/devices?state=bogus"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "an unknown state filter");
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("state `bogus` is not one of"));
    let r = post(vec![], None).await.unwrap();
    assert!(
        r.status().is_client_error(),
        "no csrf field: {}",
        r.status()
    );
    let r = post(vec![("csrf", "0".repeat(64))], None).await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "a wrong token");
    let r = post(vec![("csrf", csrf.clone())], Some("http://evil.example"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "another Origin");
    let st = f.server.state().rollouts.lock().unwrap()[&f.rollout]
        .state
        .clone();
    assert_eq!(st, RolloutState::Paused, "nothing forged went through");
    let r = post(vec![("csrf", csrf)], None).await.unwrap();
    assert_eq!(r.status().as_u16(), 303, "the real form");
    let st = f.server.state().rollouts.lock().unwrap()[&f.rollout]
        .state
        .clone();
    assert_eq!(st, RolloutState::Running, "resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_drives_the_dashboard_in_chromium() {
    let Some(driver) = driver() else { return };
    let f = std::sync::Arc::new(fleet_with_a_running_rollout().await);
    let base = format!("http://{}", f.server.api_addr());
    let c = browser(&driver).await;
    let shots = Shots::default();
    // In a task of its own, so a failed assertion still leaves the browser
    // open for the failure screenshot.
    let run = {
        let (c, f, base, shots) = (c.clone(), f.clone(), base.clone(), shots.clone());
        tokio::spawn(async move {
            drive(&c, &f, &base, &shots).await;
            c.find(Locator::Id("logout"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
            let t0 = Instant::now();
            while c.current_url().await.unwrap().path() != "/login" {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "logout never reached /login"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c.goto(&format!("{base}/drift")).await.unwrap();
            assert_eq!(
                c.current_url().await.unwrap().path(),
                "/login",
                "logged out"
            );
            cross_site_post_is_refused(&c, &f, &base).await;
        })
    };
    let outcome = run.await;
    if let Some(dir) = std::env::var_os("EDGEFLEET_SCREENSHOTS") {
        shots.save(std::path::Path::new(&dir));
    }
    if let Err(e) = outcome {
        shots.take(&c, "failure").await;
        shots.save(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../dashboard-screenshots"));
        let _ = c.close().await;
        match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => panic!("browser task: {e}"),
        }
    }
    let _ = c.close().await;
    forged_requests_are_refused(&f, &base).await;
    one_time_link_works_once(&f, &base).await;
}
