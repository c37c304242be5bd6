//! Agent benchmark (issue 4): local API overhead against a direct runtime
//! call (p50, p99), requests/s through the local API, RSS idle and loaded,
//! time to swap models. Everything is measured in this process, and every
//! agent number is printed with its ratio to the direct-call baseline.
//!
//! ```text
//! cargo run --release -p edgefleet-agent --example bench_agent [-- SECONDS] [--model DIR]...
//! scripts/bench-agent      # compiles Silero VAD and PP-OCRv4 det, then runs this with --model
//! ```
//!
//! First part: the testkit's `y = k * x` (`x: f32[1,4]`): its compute is
//! close to nothing, so the numbers are the agent's own overhead and an
//! upper bound on requests/s. Second part, once per `--model DIR` (the
//! payload of a compiled bundle, as `edgefleet bundle extract` writes it):
//! load time, RSS added by the loaded model and by its first inference,
//! direct-call latency on the bundle's golden inputs, the same call through
//! the HTTP API (binary form; stateful models use one stream per client,
//! the state kept by the agent), and requests/s with 1-8 clients. The
//! stripped binary size and a real agent process's RSS are measured by
//! `scripts/bench-agent`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_agent::api::{ApiState, StatusInfo};
use edgefleet_agent::engine::Engine;
use edgefleet_agent::runtime::Model;
use edgefleet_agent::telemetry::stats::rss_bytes;
use edgefleet_agent::testkit::{self, Kind};
use edgefleet_bundle::payload::Tensor;
use edgefleet_protocol::messages::ReleaseRef;

fn load(dir: &std::path::Path, k: f32, release: u64) -> Model {
    let d = dir.join(format!("r{release}"));
    std::fs::create_dir_all(&d).unwrap();
    for (p, b) in testkit::files(Kind::Good, "bench", k) {
        std::fs::write(d.join(p), b).unwrap();
    }
    Model::load(
        &d,
        ReleaseRef {
            model: "bench".into(),
            release,
            version: format!("1.0.{release}"),
        },
    )
    .unwrap()
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn summary(name: &str, v: &mut [f64], base: Option<(f64, f64)>) -> (f64, f64) {
    let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
    match base {
        Some((b50, b99)) => println!(
            "{name:<34} p50 {p50:>8.1} us  p99 {p99:>8.1} us   ({:.1}x / {:.1}x the direct call; +{:.1} us at p50)",
            p50 / b50,
            p99 / b99,
            p50 - b50
        ),
        None => println!("{name:<34} p50 {p50:>8.1} us  p99 {p99:>8.1} us   (baseline)"),
    }
    (p50, p99)
}

/// A minimal HTTP/1.1 keep-alive client for the binary infer form.
struct Http {
    w: TcpStream,
    r: BufReader<TcpStream>,
    req: Vec<u8>,
}

impl Http {
    fn new(addr: SocketAddr, body: &[u8]) -> Self {
        Self::with_stream(addr, body, None)
    }
    fn with_stream(addr: SocketAddr, body: &[u8], stream: Option<&str>) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let stream = stream
            .map(|id| format!("x-edgefleet-stream: {id}\r\n"))
            .unwrap_or_default();
        let mut req = format!(
            "POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n{stream}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        Http {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            req,
        }
    }
    /// One request; returns the response body length.
    fn infer(&mut self) -> usize {
        self.w.write_all(&self.req).unwrap();
        let mut line = String::new();
        let mut len = 0usize;
        let mut status = String::new();
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if status.is_empty() {
                status = line.clone();
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
            {
                len = v.parse().unwrap();
            }
        }
        assert!(status.contains(" 200 "), "{status}");
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).unwrap();
        len
    }
}

fn main() {
    let mut secs = 3.0f64;
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--model" {
            models.push(std::path::PathBuf::from(
                args.next().expect("--model needs a directory"),
            ));
        } else {
            secs = a.parse().expect("SECONDS must be a number");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = Engine::start(2, 256, 8);
    let rss_idle = rss_bytes();
    let model = Arc::new(load(dir.path(), 1.0, 1));
    model.self_test().unwrap();
    engine.set_active(Some(model.clone()));
    let rss_loaded = rss_bytes();
    println!(
        "model: testkit y = k*x, x f32[1,4] (trivial compute: these are overhead numbers); {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let x = vec![Tensor::f32("x", vec![1, 4], vec![1.0, 2.0, 3.0, 4.0])];
    let n = 20_000;
    // Baseline: a direct tract call through the runtime.
    for _ in 0..1000 {
        model.run(&x, None).unwrap();
    }
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(model.run(&x, None).unwrap());
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let base = summary("direct Model::run", &mut v, None);

    // Engine queue (what an input source does): submit + wait.
    let timeout = Duration::from_secs(2);
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let rx = engine.submit(x.clone(), None, timeout).unwrap();
            rx.blocking_recv().unwrap().unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    summary("engine queue (input sources)", &mut v, Some(base));

    // The local HTTP API, binary form, keep-alive.
    let (sd_tx, sd_rx) = tokio::sync::watch::channel(false);
    let state = ApiState::new(
        engine.clone(),
        Arc::new(Mutex::new(StatusInfo::default())),
        timeout,
    );
    let addr = rt
        .block_on(edgefleet_agent::api::serve(
            state,
            "127.0.0.1:0".parse().unwrap(),
            None,
            sd_rx,
        ))
        .unwrap();
    let body: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let mut c = Http::new(addr, &body);
    for _ in 0..1000 {
        c.infer();
    }
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(c.infer(), 16);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let api = summary("HTTP API, binary, 1 client", &mut v, Some(base));

    // Throughput: concurrent keep-alive clients for `secs`.
    throughput(addr, &body, false, secs, base.0);
    let rss_after = rss_bytes();
    println!(
        "RSS (this process): idle engine {:.1} MiB, model loaded {:.1} MiB, after load test {:.1} MiB",
        rss_idle as f64 / 1048576.0,
        rss_loaded as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );

    // Swapping models: load + self-test (what the updater does before a
    // swap), and the swap itself under traffic.
    let mut loads = Vec::new();
    for r in 2..12 {
        let t = Instant::now();
        let m = load(dir.path(), 2.0, r);
        m.self_test().unwrap();
        loads.push((t.elapsed().as_secs_f64() * 1e3, m));
    }
    let mut ms: Vec<f64> = loads.iter().map(|(d, _)| *d).collect();
    println!(
        "model load + verify golden (testkit): p50 {:.2} ms, max {:.2} ms",
        pct(&mut ms, 0.5),
        pct(&mut ms, 1.0)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(Mutex::new(Vec::<f64>::new()));
    let h = {
        let (stop, worst, body) = (stop.clone(), worst.clone(), body.clone());
        std::thread::spawn(move || {
            let mut c = Http::new(addr, &body);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                c.infer();
                worst.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e6);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut swaps = Vec::new();
    for (_, m) in loads {
        let m = Arc::new(m);
        let t = Instant::now();
        engine.set_active(Some(m));
        swaps.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    let mut w = worst.lock().unwrap().clone();
    println!(
        "swap (Engine::set_active): p50 {:.2} us, max {:.2} us; {} requests during swaps, none failed, p99 {:.1} us ({:.1}x the single-client API p99)",
        pct(&mut swaps, 0.5),
        pct(&mut swaps, 1.0),
        w.len(),
        pct(&mut w, 0.99),
        pct(&mut w, 0.99) / api.1
    );
    for dir in &models {
        real_model(dir, &engine, addr, secs);
    }
    let _ = sd_tx.send(true);
}

/// Requests/s through the HTTP API with 1, 2, 4 and 8 keep-alive clients,
/// `secs` each (stateful models: one stream per client), printed against
/// one thread of direct calls at `base_p50_us`.
fn throughput(addr: SocketAddr, body: &[u8], stateful: bool, secs: f64, base_p50_us: f64) {
    for clients in [1usize, 2, 4, 8] {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..clients)
            .map(|i| {
                let (stop, count, body) = (stop.clone(), count.clone(), body.to_vec());
                std::thread::spawn(move || {
                    let id = format!("bench-{i}");
                    let mut c = Http::with_stream(addr, &body, stateful.then_some(id.as_str()));
                    while !stop.load(Ordering::Relaxed) {
                        c.infer();
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let done = count.load(Ordering::Relaxed);
        let el = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
        let rps = done as f64 / el;
        println!(
            "HTTP API throughput, {clients} clients:   {rps:>9.0} req/s   ({:.2}x of one direct-call thread, {:.0}/s; goal 5000/s)",
            rps / (1e6 / base_p50_us),
            1e6 / base_p50_us
        );
    }
}

/// The second part: one compiled model, served by the same engine and API.
fn real_model(dir: &std::path::Path, engine: &Engine, addr: SocketAddr, secs: f64) {
    let spec = edgefleet_bundle::payload::ModelSpec::from_json(
        &std::fs::read(dir.join("model.json")).unwrap(),
    )
    .unwrap();
    println!(
        "\n== {} ({}; inputs {}) ==",
        spec.name,
        dir.display(),
        spec.inputs
            .iter()
            .map(|i| format!("{} {:?}{:?}", i.name, i.dtype, i.shape))
            .collect::<Vec<_>>()
            .join(", ")
    );
    engine.set_active(None);
    let rss0 = rss_bytes();
    let t = Instant::now();
    let model = Model::load(
        dir,
        ReleaseRef {
            model: spec.name.clone(),
            release: 1,
            version: "1.0.0".into(),
        },
    )
    .unwrap();
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_loaded = rss_bytes();
    let t = Instant::now();
    model.self_test().unwrap();
    let self_test_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_run = rss_bytes();
    println!(
        "load {load_ms:.1} ms, golden self-test {self_test_ms:.1} ms; RSS +{:.1} MiB loaded, +{:.1} MiB after first inference ({:.1} MiB total)",
        (rss_loaded as f64 - rss0 as f64) / 1048576.0,
        (rss_run as f64 - rss0 as f64) / 1048576.0,
        rss_run as f64 / 1048576.0
    );
    let stateful = !model.spec.state.is_empty();
    let inputs: Vec<Tensor> = model
        .golden_inputs()
        .expect("bundle has golden inputs")
        .into_iter()
        .filter(|t| !(stateful && model.spec.state.iter().any(|b| b.input == t.name)))
        .collect();
    let stream = stateful.then_some("bench");
    let model = Arc::new(model);
    // Direct calls for about secs/2 (at least 20, at most 20,000).
    let mut v = Vec::new();
    let t0 = Instant::now();
    while v.len() < 20 || (v.len() < 20_000 && t0.elapsed().as_secs_f64() < secs / 2.0) {
        let t = Instant::now();
        std::hint::black_box(model.run(&inputs, stream).unwrap());
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let base = summary("direct Model::run", &mut v, None);
    engine.set_active(Some(model.clone()));
    let body: Vec<u8> = inputs.iter().flat_map(|t| t.data.to_le_bytes()).collect();
    let mut c = Http::with_stream(addr, &body, stream);
    let mut v = Vec::new();
    let t0 = Instant::now();
    while v.len() < 20 || (v.len() < 20_000 && t0.elapsed().as_secs_f64() < secs / 2.0) {
        let t = Instant::now();
        c.infer();
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    summary("HTTP API, binary, 1 client", &mut v, Some(base));
    throughput(addr, &body, stateful, secs, base.0);
    println!(
        "RSS after the load test: {:.1} MiB",
        rss_bytes() as f64 / 1048576.0
    );
    engine.set_active(None);
}
