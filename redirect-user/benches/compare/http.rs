//! HTTP path: `GET /latest/meta-data/instance-id` with wrk, in one benchmark namespace.
//!
//! - H0: wrk -> our built-in mock (127.0.0.1:8080), no redirect.
//! - H1: wrk -> 169.254.169.254:80, redirected by our daemon to its proxy (listening on
//!   127.0.0.1:8169; the target's dedicated port is 8170), which forwards to the mock over
//!   pooled connections.
//! - H2: wrk -> 169.254.169.254:80, redirected by our daemon (`--redirect-to`) to nginx
//!   (127.0.0.1:8180), which forwards to the mock with upstream keepalive.
//! - H3: the same to Go's `httputil.ReverseProxy` (127.0.0.1:8190, `goproxy.go`), the core of
//!   kube2iam, kiam and lyft's metadataproxy, with the same upstream keep-alive.
//! - The machine reference: wrk -> nginx answering `return 200` itself (127.0.0.1:8181), in
//!   the rounds of the 32-connection row.
//!
//! Our daemons take the ports after their listen ports for their targets (8081-8082,
//! 8170-8171), so nginx stays clear of those.
//!
//! wrk runs in the cgroup the respective daemon redirects. For each row the three targets run
//! back to back, so drift on a noisy machine hits them alike.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use crate::{
    Mode,
    support::{Daemon, NetNs, TestCgroup, child, command_in, host_program, status_kb},
};

const MOCK: &str = "127.0.0.1:8080";
const OUR_PROXY: &str = "127.0.0.1:8169";
const NGINX: &str = "127.0.0.1:8180";
/// nginx answering by itself: the machine reference (see [`HttpResults::reference`]).
const NGINX_STATIC: &str = "127.0.0.1:8181";
const GO_PROXY: &str = "127.0.0.1:8190";
const DIRECT_URL: &str = "http://127.0.0.1:8080/latest/meta-data/instance-id";
const IMDS_URL: &str = "http://169.254.169.254/latest/meta-data/instance-id";

pub const TARGETS: [(&str, &str); 4] = [
    ("H0", "our mock, direct"),
    ("H1", "redirect + our proxy"),
    ("H2", "redirect + nginx"),
    ("H3", "redirect + Go ReverseProxy"),
];

/// The row whose rounds also measure the machine reference.
const REFERENCE_ROW: &str = "ka32";

/// A row: (key, label, connections, script kind, placement).
const ROWS: [(&str, &str, u32, Script, Placement); 6] = [
    (
        "ka1",
        "keep-alive, 1 connection, one CPU",
        1,
        Script::Plain,
        Placement::OneCpu,
    ),
    (
        "ka32",
        "keep-alive, 32 connections",
        32,
        Script::Plain,
        Placement::Scheduler,
    ),
    (
        "close32",
        "new connection per request, 32",
        32,
        Script::Close,
        Placement::Scheduler,
    ),
    (
        "flow1",
        "IMDSv2 PUT+GET flow, 1 connection, one CPU",
        1,
        Script::TokenFlow,
        Placement::OneCpu,
    ),
    (
        "ka1s",
        "keep-alive, 1 connection, CPUs left to the scheduler",
        1,
        Script::Plain,
        Placement::Scheduler,
    ),
    (
        "flow1s",
        "IMDSv2 flow, 1 connection, CPUs left to the scheduler",
        1,
        Script::TokenFlow,
        Placement::Scheduler,
    ),
];

/// Where the processes of a row run.
///
/// With one connection a request is a chain of wakeups (wrk, proxy, mock, proxy, wrk) with
/// nothing else to run, and on a VM a wakeup on another CPU costs tens of microseconds more
/// than one on the same CPU (the woken vCPU was halted): wrk and the mock alone made 93,000
/// requests/s on one CPU and 11,400 on two. Left to the scheduler, where the four parties land
/// decides such a row, differently on each run, for both proxies alike. On one CPU the row
/// measures what each proxy does per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Every process of the row (wrk, the mock, both proxies) pinned to one CPU: the first
    /// this benchmark may use (see [`one_cpu`]).
    OneCpu,
    /// As the scheduler places them.
    Scheduler,
}

#[derive(Clone, Copy)]
pub(crate) enum Script {
    Plain,
    Close,
    TokenFlow,
    /// Every request with these headers (a cloud's required ones).
    Headers(&'static [(&'static str, &'static str)]),
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpCell {
    pub target: String,
    pub requests_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub requests: u64,
    /// Socket errors and non-2xx answers; a cell with errors is not a valid measurement.
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRow {
    pub key: String,
    pub label: String,
    pub connections: u32,
    pub placement: Placement,
    pub cells: Vec<HttpCell>,
    /// H1 against H2 (nginx) and H3 (Go), round by round.
    pub h1_vs_h2: Paired,
    pub h1_vs_h3: Paired,
}

/// One proxy against the other, paired by round. A round runs the three targets back to back,
/// so the ratio of its H1 and H2 figures cancels drift that is slower than a round (the other
/// processes of the VM's host, frequency changes), as the connect rows' pairing does; the
/// ratio of the two cells' medians does not.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    /// Median over the rounds of (H1 requests/s / H2 requests/s - 1), in percent.
    pub median_pct: f64,
    /// Rounds in which H1 made more requests/s than H2.
    pub ahead: usize,
    pub rounds: usize,
}

impl Paired {
    fn new(ours: &[HttpCell], nginx: &[HttpCell]) -> Self {
        let pct: Vec<f64> = ours
            .iter()
            .zip(nginx)
            .map(|(a, b)| (a.requests_per_sec / b.requests_per_sec - 1.0) * 100.0)
            .collect();
        Self {
            median_pct: median(pct.clone()),
            ahead: pct.iter().filter(|&&p| p > 0.0).count(),
            rounds: pct.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub held_connections: usize,
    /// Our proxy daemon (H1), right after start.
    pub daemon_idle_kb: u64,
    /// The same daemon holding `held_connections` idle keep-alive client connections, after
    /// they have been idle for [`HELD_SETTLE`].
    pub daemon_held_kb: u64,
    /// Its peak (VmHWM) over the run, which includes the moment all those connections were
    /// being opened.
    pub daemon_peak_kb: u64,
    /// nginx (master and workers) idle and holding the same number of connections.
    pub nginx_idle_kb: u64,
    pub nginx_held_kb: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpResults {
    pub rows: Vec<HttpRow>,
    pub memory: Memory,
    /// nginx answering `return 200` itself (no proxying, one small body), keep-alive at 32
    /// connections, run in the rounds of that row: what this machine allows a small HTTP
    /// answer, for reading the absolute targets (H0's 100,000 requests/s) on it.
    pub reference: HttpCell,
}

impl HttpResults {
    pub fn cell(&self, row: &str, target: &str) -> Option<&HttpCell> {
        self.rows
            .iter()
            .find(|r| r.key == row)?
            .cells
            .iter()
            .find(|c| c.target == target)
    }
}

pub fn run(mode: &Mode) -> Result<HttpResults> {
    let ns = NetNs::new()?;
    ns.ip(&["route", "add", "169.254.169.254/32", "dev", "lo"])?;
    let cg = TestCgroup::new()?;
    let (unused, plain, via_ours, via_nginx, via_go) = (
        cg.child("unused")?,
        cg.child("direct")?,
        cg.child("h1")?,
        cg.child("h2")?,
        cg.child("h3")?,
    );
    // Access logs off, as nginx's are here (`access_log off`).
    let quiet = |args: &[&str]| Daemon::start_logging(args, &ns, None, "info,access=off");
    // The mock is attached to an empty cgroup: it only serves.
    let mock = quiet(&["--mock", "--listen", MOCK, "--cgroup", path(&unused)])?;
    let ours = quiet(&[
        "--upstream",
        &format!("http://{MOCK}"),
        "--listen",
        OUR_PROXY,
        "--cgroup",
        path(&via_ours),
    ])?;
    let daemon_idle_kb = rss_kb(ours.pid())?;
    let nginx = Nginx::start(&ns, NGINX, Some(MOCK))?;
    let go = GoProxy::start(&ns, GO_PROXY, MOCK)?;
    // What serves the rows' requests, for `Placement`.
    let servers: Vec<u32> = [mock.pid(), ours.pid(), go.pid()]
        .into_iter()
        .chain(nginx.pids())
        .collect();
    let _static = Nginx::start(&ns, NGINX_STATIC, None)?;
    let static_url = format!("http://{NGINX_STATIC}/latest/meta-data/instance-id");
    let nginx_idle_kb = nginx.rss_kb()?;
    let _to_nginx = quiet(&["--redirect-to", NGINX, "--cgroup", path(&via_nginx)])?;
    let _to_go = quiet(&["--redirect-to", GO_PROXY, "--cgroup", path(&via_go)])?;

    let dir = tempfile::tempdir()?;
    let targets = [
        (&plain, DIRECT_URL),
        (&via_ours, IMDS_URL),
        (&via_nginx, IMDS_URL),
        (&via_go, IMDS_URL),
    ];
    // Warm caches and connection pools, the machine reference's too; not recorded.
    for (cgroup, url) in targets.into_iter().chain([(&plain, static_url.as_str())]) {
        wrk(
            &ns,
            cgroup,
            url,
            32,
            Duration::from_secs(1),
            Script::Plain,
            None,
            dir.path(),
        )?;
    }
    let mut reference_runs = Vec::new();
    let mut rows = Vec::new();
    for (key, label, connections, script, placement) in ROWS {
        eprintln!("bench: HTTP path, {label}");
        let cpu = match placement {
            Placement::OneCpu => Some(one_cpu()?),
            Placement::Scheduler => None,
        };
        place(&servers, cpu)?;
        let mut runs: Vec<Vec<HttpCell>> = vec![Vec::new(); TARGETS.len()];
        for round in 0..mode.http_rounds {
            // Rotate the order so that no target always runs first (or last).
            for i in (0..TARGETS.len()).map(|i| (i + round) % TARGETS.len()) {
                let (cgroup, url) = targets[i];
                let duration = mode.http_duration;
                runs[i].push(wrk(
                    &ns,
                    cgroup,
                    url,
                    connections,
                    duration,
                    script,
                    cpu,
                    dir.path(),
                )?);
            }
            if key == REFERENCE_ROW {
                reference_runs.push(wrk(
                    &ns,
                    &plain,
                    &static_url,
                    connections,
                    mode.http_duration,
                    script,
                    cpu,
                    dir.path(),
                )?);
            }
        }
        let h1_vs_h2 = Paired::new(&runs[1], &runs[2]);
        let h1_vs_h3 = Paired::new(&runs[1], &runs[3]);
        let cells = runs
            .into_iter()
            .zip(TARGETS)
            .map(|(runs, (target, _))| median_cell(target, runs))
            .collect();
        rows.push(HttpRow {
            key: key.to_owned(),
            label: label.to_owned(),
            connections,
            placement,
            cells,
            h1_vs_h2,
            h1_vs_h3,
        });
    }
    place(&servers, None)?;

    eprintln!("bench: holding {} connections", mode.held_connections);
    let (daemon_held_kb, daemon_peak_kb) = {
        let _held = Holder::open(&ns, &via_ours, mode.held_connections)?;
        // Idle connections give their buffers back within two sweep periods (a second each);
        // measure the steady state after that, and report the peak as well.
        std::thread::sleep(HELD_SETTLE);
        (rss_kb(ours.pid())?, peak_rss_kb(ours.pid())?)
    };
    let nginx_held_kb = {
        let _held = Holder::open(&ns, &via_nginx, mode.held_connections)?;
        std::thread::sleep(HELD_SETTLE);
        nginx.rss_kb()?
    };
    Ok(HttpResults {
        rows,
        memory: Memory {
            held_connections: mode.held_connections,
            daemon_idle_kb,
            daemon_held_kb,
            daemon_peak_kb,
            nginx_idle_kb,
            nginx_held_kb,
        },
        reference: median_cell("nginx return 200", reference_runs),
    })
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

const DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(99)))
end
"#;

const CLOSE: &str = r#"wrk.headers["Connection"] = "close""#;

// Requests are built in request(), after wrk has set its Host header (built at load time they
// would lack Host, which HTTP/1.1 servers such as nginx rightly refuse with 400).
const TOKEN_FLOW: &str = r#"
local token = nil
local turn = 0
local put = nil
request = function()
  turn = turn + 1
  if put == nil then
    put = wrk.format("PUT", "/latest/api/token", {["X-aws-ec2-metadata-token-ttl-seconds"] = "21600"})
  end
  if token == nil or turn % 2 == 1 then return put end
  return wrk.format("GET", "/latest/meta-data/instance-id", {["X-aws-ec2-metadata-token"] = token})
end
response = function(status, headers, body)
  if headers["x-aws-ec2-metadata-token-ttl-seconds"] or headers["X-aws-ec2-metadata-token-ttl-seconds"] then
    token = body
  end
end
"#;

/// One wrk run (one thread; `connections` connections) from inside `cgroup`, on `cpu` if
/// given.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per row and target, all named"
)]
pub(crate) fn wrk(
    ns: &NetNs,
    cgroup: &Path,
    url: &str,
    connections: u32,
    duration: Duration,
    script: Script,
    cpu: Option<usize>,
    dir: &Path,
) -> Result<HttpCell> {
    let headers: String;
    let body = match script {
        Script::Plain => "",
        Script::Close => CLOSE,
        Script::TokenFlow => TOKEN_FLOW,
        Script::Headers(list) => {
            headers = list
                .iter()
                .map(|(k, v)| format!("wrk.headers[\"{k}\"] = \"{v}\"\n"))
                .collect();
            &headers
        }
    };
    let script_path = dir.join("bench.lua");
    std::fs::write(&script_path, format!("{body}\n{DONE}"))?;
    let mut cmd = command_in(host_program("wrk")?, Some(cgroup), Some(ns))?;
    if let Some(cpu) = cpu {
        let set = cpu_set(Some(cpu))?;
        // SAFETY: sched_setaffinity is async-signal-safe; `set` is a plain copied value.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = crate::support::sh(
        cmd.args(["-t1", "-c", &connections.to_string()])
            .args(["-d", &format!("{}s", duration.as_secs().max(1))])
            .args(["--timeout", "5s", "-s", path(&script_path), url]),
    )?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no summary from wrk:\n{out}"))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let requests = v["requests"].as_u64().context("requests")?;
    let duration_us = v["duration_us"].as_u64().context("duration")?.max(1);
    Ok(HttpCell {
        target: String::new(),
        requests_per_sec: requests as f64 / (duration_us as f64 / 1e6),
        p50_us: v["p50_us"].as_u64().context("p50")?,
        p99_us: v["p99_us"].as_u64().context("p99")?,
        requests,
        errors: v["errors"].as_u64().context("errors")?,
    })
}

/// Pins every thread of `pids` to `cpu`, or with `None` gives them back every CPU this
/// benchmark may use.
fn place(pids: &[u32], cpu: Option<usize>) -> Result<()> {
    let set = cpu_set(cpu)?;
    for pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Some(tid) = task?
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: a valid cpu_set_t of the size passed.
            let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
            // A thread that just exited is not an error.
            let err = std::io::Error::last_os_error();
            ensure!(
                rc == 0 || err.raw_os_error() == Some(libc::ESRCH),
                "pinning thread {tid} of {pid}: {err}"
            );
        }
    }
    Ok(())
}

/// The CPU of [`Placement::OneCpu`]: the lowest-numbered one this process may run on (a
/// cpuset need not include CPU 0).
pub fn one_cpu() -> Result<usize> {
    allowed_cpus()?
        .first()
        .copied()
        .context("this process may run on no CPU")
}

/// The CPUs this process may run on, lowest first.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let allowed = cpu_set(None)?;
    // SAFETY: CPU_ISSET reads inside the set.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .collect())
}

/// `{cpu}`, or with `None` the CPUs this process may run on.
fn cpu_set(cpu: Option<usize>) -> Result<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls write inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        match cpu {
            Some(cpu) => libc::CPU_SET(cpu, &mut set),
            None => ensure!(
                libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) == 0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            ),
        }
        Ok(set)
    }
}

/// How long held connections idle before their memory is measured.
const HELD_SETTLE: Duration = Duration::from_secs(4);

/// Resident memory of a process, in KiB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    status_kb(pid, "VmRSS:")
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kb(pid: u32) -> Result<u64> {
    status_kb(pid, "VmHWM:")
}

/// Each figure's median over a cell's runs; errors are summed (any makes the cell invalid).
fn median_cell(target: &str, runs: Vec<HttpCell>) -> HttpCell {
    HttpCell {
        target: target.to_owned(),
        requests_per_sec: median(runs.iter().map(|c| c.requests_per_sec).collect()),
        p50_us: median(runs.iter().map(|c| c.p50_us).collect()),
        p99_us: median(runs.iter().map(|c| c.p99_us).collect()),
        requests: runs.iter().map(|c| c.requests).sum(),
        errors: runs.iter().map(|c| c.errors).sum(),
    }
}

/// The upper median (a round that failed outright, 0 / 0, sorts as equal to anything).
fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// nginx in the benchmark namespace, proxying to the mock with upstream keepalive, with as
/// many workers as CPUs (our daemon's runtime has as many threads). Stopped on drop.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx proxying to `upstream`, or with `None` answering `return 200` with the mock's
    /// instance id itself.
    pub fn start(ns: &NetNs, listen: &str, upstream: Option<&str>) -> Result<Self> {
        Self::start_with(ns, listen, upstream, "worker_connections 32768;", "")
    }

    /// [`Nginx::start`] with its own `events` block contents, and `server_extra` in its
    /// `server` block.
    pub fn start_with(
        ns: &NetNs,
        listen: &str,
        upstream: Option<&str>,
        events: &str,
        server_extra: &str,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().display();
        let (upstream_block, location) = match upstream {
            Some(upstream) => (
                format!("  upstream metadata {{ server {upstream}; keepalive 64; }}\n"),
                "proxy_pass http://metadata;\n      proxy_http_version 1.1;\n      \
                 proxy_set_header Connection \"\";\n      proxy_set_header Host $host;"
                    .to_owned(),
            ),
            None => (
                String::new(),
                "default_type text/plain;\n      return 200 \"i-0123456789abcdef0\";".to_owned(),
            ),
        };
        let conf = format!(
            "worker_processes auto;\nworker_rlimit_nofile 65536;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
             events {{ {events} }}\n\
             http {{\n  access_log off;\n{upstream_block}\
               server {{\n    listen {listen};\n    keepalive_requests 1000000;\n    {server_extra}\n    location / {{\n\
                 {location}\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = command_in(host_program("nginx")?, None, Some(ns))?
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Nginx { child, dir };
        // Up when nginx has written its pid file (after binding) and answers; a port that
        // answers while nginx has exited belongs to someone else.
        let pid_file = nginx.dir.path().join("nginx.pid");
        let addr: SocketAddr = listen.parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = nginx.child.try_wait()? {
                let log =
                    std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}) instead of listening on {listen}:\n{log}");
            }
            if pid_file.exists() && ns.run(move || TcpStream::connect(addr).is_ok())? {
                return Ok(nginx);
            }
            ensure!(
                Instant::now() < deadline,
                "nginx did not start listening on {listen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Master and workers.
    pub fn rss_kb(&self) -> Result<u64> {
        self.pids().into_iter().map(rss_kb).sum()
    }

    /// The master's pid and its workers'.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Field 4, after the parenthesised command name, is the parent pid.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if parent == Some(master)
                && let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok())
            {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A child (role `hold`) in `cgroup` holding `n` idle keep-alive connections to
/// 169.254.169.254:80, each after one request; they close when this is dropped.
struct Holder {
    child: Child,
}

impl Holder {
    fn open(ns: &NetNs, cgroup: &Path, n: usize) -> Result<Self> {
        let mut child = command_in(std::env::current_exe()?, Some(cgroup), Some(ns))?
            .env(child::ROLE_ENV, "hold")
            .args(["169.254.169.254:80", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != format!("open {n}") {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("holder failed ({status}): {line}");
        }
        Ok(Holder { child })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Role `hold ADDR N`: opens N connections, one request each, prints `open N`, then keeps
/// them until stdin closes.
pub fn hold_connections(args: &[String]) -> Result<()> {
    let [addr, n] = args else {
        bail!("usage: hold ADDR N");
    };
    let addr: SocketAddr = addr.parse()?;
    let n: usize = n.parse()?;
    child::raise_nofile();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connection {i}"))?;
        stream.write_all(
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
        )?;
        read_response(&mut stream).with_context(|| format!("response on connection {i}"))?;
        held.push(stream);
    }
    println!("open {n}");
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(stream: &mut TcpStream) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        ensure!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        ensure!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no content-length")?;
        if buf.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

/// Go's ReverseProxy (`goproxy.go`), built by `cargo xtask bench` (`REDIRECT_BENCH_GOPROXY`).
/// Stopped on drop.
struct GoProxy {
    child: Child,
}

impl GoProxy {
    fn start(ns: &NetNs, listen: &str, upstream: &str) -> Result<Self> {
        let binary = std::env::var("REDIRECT_BENCH_GOPROXY").context(
            "REDIRECT_BENCH_GOPROXY is not set: run the benchmark with `cargo xtask bench`",
        )?;
        let child = command_in(binary, None, Some(ns))?
            .args([
                "-listen",
                listen,
                "-upstream",
                &format!("http://{upstream}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the Go proxy")?;
        let mut go = GoProxy { child };
        let addr: SocketAddr = listen.parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.run(move || TcpStream::connect(addr).is_ok())? {
            if let Some(status) = go.child.try_wait()? {
                bail!("the Go proxy exited ({status}) instead of listening on {listen}");
            }
            ensure!(
                Instant::now() < deadline,
                "the Go proxy did not listen on {listen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(go)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for GoProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
