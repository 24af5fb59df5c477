//! Served namespaces (`--only namespaces`): 1,000 plain `ip netns` namespaces, each with a
//! process in the covered cgroup, served by one daemon (no Docker): its RSS, the time to plant
//! one namespace's listeners (at start, all at once; later, from a refused connect to the
//! first answer), and what knowing the caller adds to a request (keep-alive GETs from a served
//! namespace against the same from the daemon's own) and to a new connection from the daemon's
//! own namespace, whose caller is named by sock_diag (`HostCallers::identify` on a live
//! loopback connection, timed alone: end to end, the two namespaces' new-connection times
//! differ by 10 to 15 us on the benchmark VM with naming turned off).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;

use crate::support::{ChildGuard, Daemon, NetNs, TestCgroup, child_role, command_in, status_kb};

const NAMESPACES: usize = 1000;
const REQUESTS: usize = 2000;
const ROUNDS: usize = 5;

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
    /// Mean time of a GET on a new connection each, from the daemon's namespace (each
    /// connection's caller asked of the kernel) and from a served one.
    pub connection_us_host: f64,
    pub connection_us_namespace: f64,
    /// Naming one host connection's caller: sock_diag, the cgroup's cached path and caller.
    pub identify_us: f64,
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

    // Alternated, five rounds each, the median taken: this VM's noise is larger than what is
    // measured.
    let (mut request_host, mut request_namespace) = (Vec::new(), Vec::new());
    let (mut connection_host, mut connection_namespace) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        request_host.push(host.run(|| mean_request_us("127.0.0.1:8170"))??);
        request_namespace.push(namespaces[0].run(|| mean_request_us("127.0.0.1:8170"))??);
        connection_host.push(host.run(|| mean_connection_us("127.0.0.1:8170"))??);
        connection_namespace.push(namespaces[0].run(|| mean_connection_us("127.0.0.1:8170"))??);
    }
    let [
        request_us_host,
        request_us_namespace,
        connection_us_host,
        connection_us_namespace,
    ] = [
        request_host,
        request_namespace,
        connection_host,
        connection_namespace,
    ]
    .map(median);
    drop(daemon);
    drop(residents);
    let identify_us = host.run(mean_identify_us)??;
    Ok(NamespaceResults {
        namespaces: NAMESPACES,
        rss_kb_before,
        rss_kb_served,
        plant_us_at_start,
        first_answer_after_us,
        request_us_host,
        request_us_namespace,
        connection_us_host,
        connection_us_namespace,
        identify_us,
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

/// Mean time of `REQUESTS` GETs, each on a connection of its own (after 200 untimed).
fn mean_connection_us(addr: &str) -> Result<f64> {
    for _ in 0..200 {
        get_once(addr)?;
    }
    let began = Instant::now();
    for _ in 0..REQUESTS {
        get_once(addr).context("request")?;
    }
    Ok(began.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64)
}

/// Mean time of naming the caller of one loopback connection as the daemon does for its own
/// namespace's connections (no pid table: that is two memory reads).
fn mean_identify_us() -> Result<f64> {
    use redirect::{
        host_callers::{HostCallers, Kernel},
        netns::Procfs,
        sock_diag::SockDiag,
    };
    let kernel = Kernel {
        diag: Some(SockDiag::open()?),
        pids: None,
        mount: Some(crate::support::cgroup2_mount()?),
        proc: Procfs("/proc".into()),
    };
    let callers = HostCallers::new("net:[0]".into(), std::sync::Arc::default(), kernel);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let _client = TcpStream::connect(listener.local_addr()?)?;
    let (accepted, peer) = listener.accept()?;
    let local = accepted.local_addr()?;
    ensure!(
        !callers.identify(local, peer).caller.cgroup.is_empty(),
        "the kernel did not name the caller"
    );
    for _ in 0..1000 {
        callers.identify(local, peer);
    }
    let began = Instant::now();
    for _ in 0..REQUESTS {
        callers.identify(local, peer);
    }
    Ok(began.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
