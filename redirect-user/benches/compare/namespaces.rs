//! Served namespaces (`--only namespaces`): 1,000 plain `ip netns` namespaces, each with a
//! process in the covered cgroup, served by one daemon (no Docker): its RSS, the time to plant
//! one namespace's listeners (at start, all at once; later, from a refused connect to the
//! first answer), and what knowing the caller adds to a request (keep-alive GETs from a served
//! namespace against the same from the daemon's own).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;

use crate::support::{ChildGuard, Daemon, NetNs, TestCgroup, child_role, command_in, status_kb};

const NAMESPACES: usize = 1000;
const REQUESTS: usize = 5000;

#[derive(Debug, Clone, Serialize)]
pub struct NamespaceResults {
    pub namespaces: usize,
    pub rss_kb_before: u64,
    pub rss_kb_served: u64,
    /// The start-up scan's planting, per namespace.
    pub plant_us_at_start: f64,
    /// A namespace made later: from its first (refused) connect to its first answer.
    pub first_answer_after_us: u64,
    /// Mean request time over keep-alive, from the daemon's namespace and from a served one.
    pub request_us_host: f64,
    pub request_us_namespace: f64,
}

pub fn run() -> Result<NamespaceResults> {
    let host = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let args = [
        "--mock",
        "--docker",
        "off",
        "--cgroup",
        client.to_str().unwrap(),
    ];
    // The RSS of a daemon serving nothing but its own namespace, for comparison.
    let alone = Daemon::start_logging(&args, &host, None, "info,access=off")?;
    let rss_kb_before = status_kb(alone.pid(), "VmRSS:")?;
    drop(alone);
    eprintln!("bench: making {NAMESPACES} network namespaces, a process in each");
    let mut namespaces = Vec::with_capacity(NAMESPACES);
    let mut residents = Vec::with_capacity(NAMESPACES);
    for _ in 0..NAMESPACES {
        let ns = NetNs::new()?;
        let child = command_in("sleep", Some(&client), Some(&ns))?
            .arg("3600")
            .spawn()?;
        residents.push(ChildGuard(Some(child)));
        namespaces.push(ns);
    }
    let started = Instant::now();
    let daemon = Daemon::start_logging(&args, &host, None, "info,access=off")?;
    let plant_us_at_start = started.elapsed().as_secs_f64() * 1e6 / NAMESPACES as f64;
    let status = daemon.status(&host)?;
    let served = status["namespaces"].as_array().map_or(0, Vec::len);
    ensure!(
        served == NAMESPACES,
        "{served} namespaces served, not {NAMESPACES}"
    );
    let rss_kb_served = status_kb(daemon.pid(), "VmRSS:")?;

    // A namespace made now: refused once, then served.
    let late = NetNs::new()?;
    let _late_resident = ChildGuard(Some(
        command_in("sleep", Some(&client), Some(&late))?
            .arg("3600")
            .spawn()?,
    ));
    let began = Instant::now();
    child_role(&client, &late, "connect", &["169.254.169.254:80"])?;
    let first_answer_after_us = loop {
        let answered = late.run(|| get_once("127.0.0.1:8170").is_ok())?;
        if answered {
            break began.elapsed().as_micros() as u64;
        }
        ensure!(began.elapsed() < Duration::from_secs(10), "never served");
        std::thread::sleep(Duration::from_micros(200));
    };

    let request_us_host = host.run(|| mean_request_us("127.0.0.1:8170"))??;
    let request_us_namespace = namespaces[0].run(|| mean_request_us("127.0.0.1:8170"))??;
    drop(daemon);
    drop(residents);
    Ok(NamespaceResults {
        namespaces: NAMESPACES,
        rss_kb_before,
        rss_kb_served,
        plant_us_at_start,
        first_answer_after_us,
        request_us_host,
        request_us_namespace,
    })
}

const GET: &[u8] = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";

fn get_once(addr: &str) -> Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.write_all(GET)?;
    let mut buf = [0u8; 512];
    ensure!(c.read(&mut buf)? > 0, "closed");
    Ok(())
}

/// Mean time of `REQUESTS` sequential GETs on one keep-alive connection (after 200 untimed).
fn mean_request_us(addr: &str) -> Result<f64> {
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = [0u8; 1024];
    let mut one = |c: &mut TcpStream| -> Result<()> {
        c.write_all(GET)?;
        let n = c.read(&mut buf)?;
        ensure!(
            n > 0 && buf[..n].ends_with(b"i-0123456789abcdef0"),
            "short answer"
        );
        Ok(())
    };
    for _ in 0..200 {
        one(&mut c)?;
    }
    let began = Instant::now();
    for _ in 0..REQUESTS {
        one(&mut c).context("request")?;
    }
    Ok(began.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64)
}
