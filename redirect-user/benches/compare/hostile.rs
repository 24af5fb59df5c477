//! The hostile section: what a process in a covered cgroup can do to the proxy, against our
//! proxy and nginx side by side, each in front of the same mock and given the same limits
//! (1,024 client connections: ours `--max-connections 1024`, nginx `worker_connections 1024`
//! per worker; a 2 s send timeout).
//!
//! - body flood: 1,000 connections each sending a 1 MB PUT body at once; the proxy's peak RSS;
//! - idle flood: 4,096 connections that send nothing, then 20 new callers; how many are
//!   answered (within curl's 2 s);
//! - stalled reader: a caller asks for an 8 MiB answer and reads none of it; how long until
//!   the proxy lets go of the connection (its socket leaves ESTABLISHED).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    http::{Nginx, path, rss_kb},
    support::{ChildGuard, Daemon, NetNs, TestCgroup, child, command_in, sh, user_data_config},
};

const MOCK: &str = "127.0.0.1:8280";
const OURS: &str = "127.0.0.1:8269";
const NGINX: &str = "127.0.0.1:8290";
const USER_DATA: usize = 8 << 20;
const FLOOD: usize = 1000;
const FLOOD_BODY: usize = 1_000_000;
const IDLE_FLOOD: usize = 4096;
const PROBES: usize = 20;

#[derive(Debug, Clone, Serialize)]
pub struct HostileRow {
    pub proxy: String,
    /// Peak RSS during the body flood (nginx: master and workers).
    pub flood_peak_rss_kb: u64,
    /// The statuses the flood's connections got ("none": closed without one).
    pub flood_statuses: serde_json::Value,
    pub probes_answered: usize,
    pub probes: usize,
    /// `None`: still connected after 30 s.
    pub stalled_closed_after_ms: Option<u64>,
}

pub fn run() -> Result<Vec<HostileRow>> {
    let ns = NetNs::new()?;
    ns.ip(&["route", "add", "169.254.169.254/32", "dev", "lo"])?;
    let cg = TestCgroup::new()?;
    let (unused, via_ours, via_nginx) =
        (cg.child("unused")?, cg.child("ours")?, cg.child("nginx")?);
    let dir = tempfile::tempdir()?;
    let config = user_data_config(dir.path(), USER_DATA)?;
    // Access logs off, as nginx's are here (`access_log off`).
    let quiet = |args: &[&str]| Daemon::start_logging(args, &ns, None, "info,access=off");
    let _mock = quiet(&[
        "--config",
        path(&config),
        "--listen",
        MOCK,
        "--cgroup",
        path(&unused),
    ])?;
    let ours = quiet(&[
        "--upstream",
        &format!("http://{MOCK}"),
        "--listen",
        OURS,
        "--max-connections",
        "1024",
        "--send-timeout",
        "2s",
        "--cgroup",
        path(&via_ours),
    ])?;
    let nginx = Nginx::start_with(
        &ns,
        NGINX,
        Some(MOCK),
        "worker_connections 1024;",
        "send_timeout 2s;",
    )?;
    let _to_nginx = quiet(&["--redirect-to", NGINX, "--cgroup", path(&via_nginx)])?;

    let mut rows = Vec::new();
    for (name, cgroup, direct, rss) in [
        (
            "redirect + our proxy",
            &via_ours,
            OURS,
            &(|| rss_kb(ours.pid())) as &dyn Fn() -> Result<u64>,
        ),
        ("redirect + nginx", &via_nginx, NGINX, &|| nginx.rss_kb()),
    ] {
        eprintln!("bench: hostile callers against {name}");
        let (flood_peak_rss_kb, flood_statuses) = body_flood(&ns, cgroup, rss)?;
        let probes_answered = idle_flood(&ns, cgroup)?;
        let stalled_closed_after_ms = stalled_reader(&ns, direct)?;
        rows.push(HostileRow {
            proxy: name.to_owned(),
            flood_peak_rss_kb,
            flood_statuses,
            probes_answered,
            probes: PROBES,
            stalled_closed_after_ms,
        });
    }
    Ok(rows)
}

/// The test support's `flood` role from `cgroup`, with the proxy's RSS sampled every 10 ms.
fn body_flood(
    ns: &NetNs,
    cgroup: &Path,
    rss: &dyn Fn() -> Result<u64>,
) -> Result<(u64, serde_json::Value)> {
    let flood = command_in(std::env::current_exe()?, Some(cgroup), Some(ns))?
        .env(child::ROLE_ENV, "flood")
        .args([
            "169.254.169.254:80",
            &FLOOD.to_string(),
            &FLOOD_BODY.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut flood = ChildGuard(Some(flood));
    let mut peak = rss()?;
    while flood.0.as_mut().context("flood")?.try_wait()?.is_none() {
        peak = peak.max(rss()?);
        std::thread::sleep(Duration::from_millis(10));
    }
    let out: serde_json::Value = serde_json::from_slice(&flood.wait_with_output()?)?;
    Ok((peak, out["statuses"].clone()))
}

/// Holds [`IDLE_FLOOD`] silent connections from `cgroup`, then counts the new callers that
/// are answered.
fn idle_flood(ns: &NetNs, cgroup: &Path) -> Result<usize> {
    let mut flood = command_in(std::env::current_exe()?, Some(cgroup), Some(ns))?
        .env(child::ROLE_ENV, "idle-flood")
        .args(["169.254.169.254:80", &IDLE_FLOOD.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(flood.stdout.take().context("stdout")?).read_line(&mut line)?;
    let _flood = ChildGuard(Some(flood));
    let mut answered = 0;
    for _ in 0..PROBES {
        let out = command_in("curl", Some(cgroup), Some(ns))?
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg("http://169.254.169.254/latest/meta-data/instance-id")
            .output()?;
        if String::from_utf8_lossy(&out.stdout) == "200" {
            answered += 1;
        }
    }
    Ok(answered)
}

/// Asks `proxy` for the 8 MiB user data on a socket that never reads; the time until the
/// proxy's side of it leaves ESTABLISHED (as `ss` shows it).
fn stalled_reader(ns: &NetNs, proxy: &'static str) -> Result<Option<u64>> {
    let stream = ns.run(move || -> std::io::Result<TcpStream> {
        let mut stream = TcpStream::connect(proxy)?;
        stream.write_all(b"GET /latest/user-data HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")?;
        Ok(stream)
    })??;
    let asked = Instant::now();
    let port = stream.local_addr()?.port();
    let peer = format!(":{port}");
    while asked.elapsed() < Duration::from_secs(30) {
        let sockets = sh(std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["ss", "-Htan"]))?;
        // The proxy's side: the one whose peer is our port.
        let state = sockets.lines().find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(4).is_some_and(|p| p.ends_with(&peer))).then(|| fields[0].to_owned())
        });
        if state.as_deref() != Some("ESTAB") {
            return Ok(Some(asked.elapsed().as_millis() as u64));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}
