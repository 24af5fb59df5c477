//! Every cloud's mock, and upstream mode's credential cache (`--only clouds`).
//!
//! - Per cloud: wrk against the mock (32 keep-alive connections, the cloud's required
//!   headers), each cloud's most asked-for value: requests/s and latency.
//! - Credential burst: 1,000 callers ask at once for the EC2 role credentials, on new
//!   connections, through our proxy (its cache cold) and through nginx (no cache), both in
//!   front of the same mock standing in for the real service: each caller's latency (p50,
//!   p99) and how many requests reached the service.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;

use crate::{
    Mode,
    http::{Nginx, Script, path, wrk},
    support::{Daemon, NetNs, TestCgroup},
};

/// Request headers, as (name, value).
type Headers = &'static [(&'static str, &'static str)];

/// (cloud, path, headers) of each cloud's row.
const CLOUDS: [(&str, &str, Headers); 5] = [
    ("ec2", "/latest/meta-data/instance-id", &[]),
    (
        "azure",
        "/metadata/instance?api-version=2021-08-01",
        &[("Metadata", "true")],
    ),
    (
        "gcp",
        "/computeMetadata/v1/instance/id",
        &[("Metadata-Flavor", "Google")],
    ),
    ("openstack", "/openstack/latest/meta_data.json", &[]),
    ("cloudstack", "/latest/meta-data/instance-id", &[]),
];

const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/redirect-mock-role";
const BURST: usize = 1000;
const MOCK: &str = "127.0.0.1:8380";
const OURS: &str = "127.0.0.1:8369";
const NGINX: &str = "127.0.0.1:8390";

#[derive(Debug, Clone, Serialize)]
pub struct CloudRow {
    pub cloud: String,
    pub path: String,
    pub requests_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BurstRow {
    pub proxy: String,
    pub callers: usize,
    pub answered: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Requests that reached the stand-in for the real service.
    pub upstream_requests: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CloudResults {
    pub mocks: Vec<CloudRow>,
    pub burst: Vec<BurstRow>,
}

pub fn run(mode: &Mode) -> Result<CloudResults> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let unused = cg.child("unused")?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let quiet = |args: &[&str]| Daemon::start_logging(args, &ns, None, "info,access=off");
    let mut mocks = Vec::new();
    for (i, (cloud, target, headers)) in CLOUDS.into_iter().enumerate() {
        let listen = format!("127.0.0.1:{}", 8400 + 10 * i);
        let _daemon = quiet(&[
            "--mock",
            cloud,
            "--listen",
            &listen,
            "--cgroup",
            path(&unused),
        ])?;
        let url = format!("http://{listen}{target}");
        let cell = wrk(
            &ns,
            &client,
            &url,
            32,
            mode.http_duration,
            Script::Headers(headers),
            None,
            dir.path(),
        )
        .with_context(|| format!("wrk against the {cloud} mock"))?;
        ensure!(cell.errors == 0, "{cloud}: {} errors", cell.errors);
        eprintln!(
            "bench: {cloud} mock: {:.0} requests/s, p99 {} us",
            cell.requests_per_sec, cell.p99_us
        );
        mocks.push(CloudRow {
            cloud: cloud.to_owned(),
            path: target.to_owned(),
            requests_per_sec: cell.requests_per_sec,
            p50_us: cell.p50_us,
            p99_us: cell.p99_us,
        });
    }
    let mut burst = Vec::new();
    for proxy in ["redirect (credential cache)", "nginx (no cache)"] {
        let mock = quiet(&["--mock", "--listen", MOCK, "--cgroup", path(&unused)])?;
        let (_ours, _nginx, at) = if proxy.starts_with("redirect") {
            let ours = quiet(&[
                "--upstream",
                &format!("http://{MOCK}"),
                "--listen",
                OURS,
                "--cgroup",
                path(&unused),
            ])?;
            (Some(ours), None, OURS)
        } else {
            (None, Some(Nginx::start(&ns, NGINX, Some(MOCK))?), NGINX)
        };
        let before = requests(&mock, &ns)?;
        let (answered, mut latencies) = burst_of(&ns, at, BURST)?;
        let upstream_requests = requests(&mock, &ns)? - before;
        latencies.sort_unstable();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        eprintln!(
            "bench: credential burst through {proxy}: {answered}/{BURST} answered, p99 {} us, {upstream_requests} upstream requests",
            pick(0.99)
        );
        burst.push(BurstRow {
            proxy: proxy.to_owned(),
            callers: BURST,
            answered,
            p50_us: pick(0.5),
            p99_us: pick(0.99),
            upstream_requests,
        });
    }
    Ok(CloudResults { mocks, burst })
}

fn requests(daemon: &Daemon, ns: &NetNs) -> Result<u64> {
    daemon.status(ns)?["proxy"]["requests"]
        .as_u64()
        .context("the stand-in's request count")
}

/// `callers` threads in `ns`, released together, each asking `at` for the credentials on a
/// connection of its own: how many got a 200, and each one's latency in µs.
fn burst_of(ns: &NetNs, at: &'static str, callers: usize) -> Result<(usize, Vec<u64>)> {
    ns.run(move || {
        let start = std::sync::Arc::new(std::sync::Barrier::new(callers));
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let start = std::sync::Arc::clone(&start);
                std::thread::spawn(move || -> Option<u64> {
                    start.wait();
                    let began = Instant::now();
                    let mut stream = TcpStream::connect(at).ok()?;
                    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
                    let request = format!(
                        "GET {CREDENTIALS} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
                    );
                    stream.write_all(request.as_bytes()).ok()?;
                    let mut answer = Vec::new();
                    stream.read_to_end(&mut answer).ok()?;
                    let ok = answer.starts_with(b"HTTP/1.1 200");
                    ok.then(|| began.elapsed().as_micros() as u64)
                })
            })
            .collect();
        let latencies: Vec<u64> = threads
            .into_iter()
            .filter_map(|t| t.join().ok().flatten())
            .collect();
        (latencies.len(), latencies)
    })
}
