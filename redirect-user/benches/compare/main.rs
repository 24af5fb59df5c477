//! `cargo xtask bench`: the redirect and the proxy against the alternatives, measured side by
//! side in one run, inside a network namespace and cgroups this benchmark creates.
//!
//! - Connect path (`connect`): plain connect, our connect4 program, one iptables DNAT rule, and
//!   both with 1,000 and 10,000 other entries/rules.
//! - HTTP path (`http`): our mock directly, the redirect plus our proxy, plus nginx, plus Go's
//!   ReverseProxy, driven by wrk; the daemon's RSS idle and with 10,000 connections; then the
//!   hostile section (`hostile`): body flood, idle flood, stalled reader, ours against nginx.
//! - Clouds (`clouds`): every cloud's mock driven by wrk; a burst of 1,000 callers asking
//!   for credentials at once through our proxy (its credential cache) and through nginx.
//! - Served namespaces (`namespaces`): 1,000 network namespaces served by one daemon: RSS,
//!   time to plant, what the caller's identity adds to a request.
//!
//! Results print as one table and go to `target/bench/results.json`, `table.md` and
//! `chart.png` (`report`). Needs root, wrk, nginx, iptables and a Python with matplotlib;
//! `cargo xtask bench` installs them. `--quick` (default) or `--full`.

#[path = "../../tests/support/mod.rs"]
#[allow(
    dead_code,
    reason = "shared with the kernel tests; the benchmark uses part of it"
)]
mod support;

mod clouds;
mod connect;
mod hostile;
mod http;
mod namespaces;
mod report;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};

/// How much to measure.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Mode {
    pub name: &'static str,
    /// Timed connects per row, after `connect_warmup` untimed ones.
    pub connect_samples: usize,
    pub connect_warmup: usize,
    /// Length of each wrk run, and how many runs per cell (rounds rotate the order of the
    /// three targets; the report takes each cell's median).
    #[serde(with = "secs")]
    pub http_duration: Duration,
    pub http_rounds: usize,
    /// Idle keep-alive connections held open for the RSS measurement.
    pub held_connections: usize,
}

const QUICK: Mode = Mode {
    name: "quick",
    connect_samples: 6_000,
    connect_warmup: 300,
    http_duration: Duration::from_secs(1),
    http_rounds: 3,
    held_connections: 10_000,
};

const FULL: Mode = Mode {
    name: "full",
    connect_samples: 40_000,
    connect_warmup: 1_000,
    // Many short runs rather than a few long ones: each run opens its client connections
    // anew, and which worker (ours or nginx's) and CPU a connection lands on moves a
    // one-connection cell by up to 10 %; fifteen placements give a steadier median than five.
    http_duration: Duration::from_secs(1),
    http_rounds: 15,
    held_connections: 10_000,
};

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(support::child::ROLE_ENV) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let result = match role.as_str() {
            "connect-loop" => connect::connect_loop(&args),
            "hold" => http::hold_connections(&args),
            // The kernel tests' floods (tests/support/child.rs).
            "flood" | "idle-flood" | "connect" => {
                return ExitCode::from(support::child::run(&role) as u8);
            }
            other => Err(anyhow::anyhow!("unknown role {other}")),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench role {role}: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // `cargo bench` passes --bench; the mode flags are ours.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = if args.iter().any(|a| a == "--full") {
        FULL
    } else {
        QUICK
    };
    // `--only connect`, `--only http` or `--only hostile` runs one part (for working on it);
    // the report then covers what ran.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    match run(mode, only.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn out_dir() -> PathBuf {
    std::env::var_os("REDIRECT_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"))
}

fn run(mode: Mode, only: Option<&str>) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark creates network namespaces and cgroups and attaches programs: run it as root"
        );
    }
    for tool in ["wrk", "nginx", "iptables-restore"] {
        support::host_program(tool)
            .with_context(|| format!("{tool} is needed: run `cargo xtask bench`"))?;
    }
    support::sweep_leftovers();
    let started = std::time::Instant::now();
    eprintln!("bench: {} mode", mode.name);
    if let Some(part) = only
        && !matches!(
            part,
            "connect" | "http" | "hostile" | "clouds" | "namespaces"
        )
    {
        bail!("--only takes `connect`, `http`, `hostile`, `clouds` or `namespaces`, not {part:?}");
    }
    let runs = |part: &str| only.is_none_or(|o| o == part);
    let connect = runs("connect")
        .then(|| connect::run(&mode).context("connect path"))
        .transpose()?;
    let http = runs("http")
        .then(|| http::run(&mode).context("HTTP path"))
        .transpose()?;
    let hostile = runs("hostile")
        .then(|| hostile::run().context("hostile callers"))
        .transpose()?;
    let clouds = runs("clouds")
        .then(|| clouds::run(&mode).context("clouds"))
        .transpose()?;
    let namespaces = runs("namespaces")
        .then(|| namespaces::run().context("served namespaces"))
        .transpose()?;
    let results = report::Results::new(
        mode,
        connect,
        http,
        hostile,
        clouds,
        namespaces,
        started.elapsed(),
    );
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    print!("{}", results.table());
    results.write(&dir)?;
    eprintln!(
        "bench: wrote {} (results.json, table.md, chart.png) in {:.0?}",
        dir.display(),
        started.elapsed()
    );
    Ok(())
}
