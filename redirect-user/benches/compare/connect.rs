//! Connect path: one client connect + 1-byte exchange + close, thousands of times per row.
//!
//! Method, chosen for a noisy 2-vCPU VM where the rows differ by fractions of a microsecond:
//! - Every configuration exists at once: one network namespace per iptables rule set (rules are
//!   per namespace) and one cgroup per daemon configuration (programs attach per cgroup).
//! - One client process measures all rows in interleaved batches. Between batches, outside the
//!   timed part, it enters the row's namespace (setns) and cgroup (a socket belongs to the
//!   cgroup of the process that creates it). So drift hits every row alike. The order of the
//!   rows is shuffled every round.
//! - The client and the echo servers are pinned to one CPU (`REDIRECT_BENCH_PIN` changes
//!   that), so every connect pays the same wakeups and no row depends on where the scheduler
//!   happened to place a process, the largest source of noise on a VM. With the servers on
//!   the other CPU (`split`, the placement until 2026-11-30) every connect paid two cross-CPU
//!   wakeups, and their variation moved a row's paired median by 1 to 2 us from run to run on
//!   the AMD VM, more than the effects measured; on one CPU, by 0.1 to 0.3.
//! - The "proxy" is a 1-byte echo server on 10.255.0.1:9000 in each namespace, an address on
//!   `lo` that is not loopback, so that iptables can DNAT to it as the seeds do to their proxy.
//!   A route for 169.254.169.254 via `lo` exists everywhere: iptables only sees packets that
//!   could be routed, while our program rewrites before routing.
//! - The client closes with SO_LINGER 0 (RST): no TIME_WAIT piles up.
//! - The table's daemons only redirect (`redirect_to`, a shared address: each rewrite records
//!   the socket for getpeername). The program's run time is also measured for the daemon as
//!   users run it, with its own listener, which gives the target a dedicated port and records
//!   nothing; those connects are closed without an exchange (the proxy speaks HTTP).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::{
    Mode,
    support::{Daemon, NetNs, TestCgroup, child, command_in, loaded_program, sh},
};

const PROXY: &str = "10.255.0.1:9000";
/// The listen address of the daemon with its own proxy (the target then goes to port 9101).
/// Loopback, as users run it: the daemon then also serves other namespaces, and connect4
/// looks the caller's namespace up on each rewrite (in the dedicated-port figure).
const OWN_LISTEN: &str = "127.0.0.1:9100";
const IMDS: &str = "169.254.169.254:80";
/// Connects per batch; rows alternate batch by batch.
const BATCH: usize = 100;

/// One row of the connect table.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectRow {
    pub key: String,
    pub label: String,
    pub samples: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: u64,
    pub connects_per_sec: f64,
    /// What this row adds to the floor (L0) at p50: the median over rounds of (this row's batch
    /// median - L0's batch median in the same round). Pairing batches measured moments apart
    /// cancels the drift that dominates a VM's run-to-run variation.
    pub added_p50_ns: i64,
}

/// The connect path's results.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectResults {
    pub rows: Vec<ConnectRow>,
    /// Run time of connect4 per invocation from the kernel's BPF stats, when it rewrites (a
    /// target) and when it does not (any other destination). The stats include their own
    /// clock reads, so a bystander run is close to what any program costs here.
    ///
    /// Each of these run-time figures is the median over batches of the batch's mean (the
    /// stats are read before and after every batch of 100 connects): the kernel only keeps a
    /// sum, and a single vCPU preemption inside one run adds tens of microseconds to it, which
    /// moved the plain mean of a quick run by over 100 ns from one run to the next. The plain
    /// means are in [`ConnectResults::run_time_means_ns`].
    ///
    /// `connect4_rewrite_ns` is a rewrite to a dedicated port (the daemon's own listener, the
    /// default), `connect4_rewrite_shared_ns` one to a shared address (`redirect_to`, as in
    /// the table's rows), which also records the socket.
    pub connect4_rewrite_ns: f64,
    pub connect4_rewrite_shared_ns: f64,
    pub connect4_bystander_ns: f64,
    /// The escape guard (`cgroup_skb/egress`) per packet, the same way, over the connects of
    /// row L2 (each a connect, a 1-byte exchange and a close: several packets), and how many
    /// packets it saw per connect.
    pub guard_packet_ns: f64,
    pub guard_packets_per_connect: f64,
    /// The same figure for an empty connect4 program (`r0 = 1; exit`) measured alongside: what
    /// the stats themselves (two clock reads and the call) cost on this machine.
    pub empty_program_ns: f64,
    /// For scale, measured alongside too: a program making one helper call
    /// (`bpf_get_socket_cookie`, as connect4 does per rewrite), and one doing one hash-map
    /// lookup. Both include the empty program's cost.
    pub helper_call_ns: f64,
    pub hash_lookup_ns: f64,
    /// The plain mean over all runs of each program above (keys: `connect4_rewrite`,
    /// `connect4_rewrite_shared`, `connect4_bystander`, `empty`, `helper`, `hash`), outliers
    /// included.
    pub run_time_means_ns: BTreeMap<String, f64>,
}

impl ConnectResults {
    pub fn row(&self, key: &str) -> Option<&ConnectRow> {
        self.rows.iter().find(|r| r.key == key)
    }
}

/// Where a row's connects happen: namespace (iptables rules), cgroup (our programs), target.
#[derive(Clone, Copy)]
enum Net {
    Plain,
    Dnat1,
    Dnat1k,
    Dnat10k,
}

#[derive(Clone, Copy)]
enum Attached {
    Nothing,
    Ebpf1,
    Ebpf1k,
    Ebpf10k,
}

/// The rows, in table order: key, label, namespace, cgroup, destination.
const ROWS: &[(&str, &str, Net, Attached, &str)] = &[
    (
        "L0",
        "L0  plain connect to the proxy (floor)",
        Net::Plain,
        Attached::Nothing,
        PROXY,
    ),
    (
        "L1",
        "L1  our programs attached, not a target",
        Net::Plain,
        Attached::Ebpf1,
        PROXY,
    ),
    (
        "L2",
        "L2  169.254.169.254 via our connect4",
        Net::Plain,
        Attached::Ebpf1,
        IMDS,
    ),
    (
        "L3",
        "L3  169.254.169.254 via 1 iptables DNAT rule",
        Net::Dnat1,
        Attached::Nothing,
        IMDS,
    ),
    (
        "L0dnat",
        "L0  floor, with that DNAT rule present",
        Net::Dnat1,
        Attached::Nothing,
        PROXY,
    ),
    (
        "L2_1k",
        "L4  connect4, 1,000 other entries",
        Net::Plain,
        Attached::Ebpf1k,
        IMDS,
    ),
    (
        "L2_10k",
        "L4  connect4, 10,000 other entries",
        Net::Plain,
        Attached::Ebpf10k,
        IMDS,
    ),
    (
        "L3_1k",
        "L4  DNAT, 1,000 other rules before it",
        Net::Dnat1k,
        Attached::Nothing,
        IMDS,
    ),
    (
        "L3_10k",
        "L4  DNAT, 10,000 other rules before it",
        Net::Dnat10k,
        Attached::Nothing,
        IMDS,
    ),
];

/// One namespace with its echo server (and iptables rules, if any).
struct Bed {
    _echo: EchoServer,
    ns: NetNs,
}

impl Bed {
    fn new(dnat_others: Option<usize>) -> Result<Self> {
        let ns = NetNs::new()?;
        ns.ip(&["addr", "add", "10.255.0.1/32", "dev", "lo"])?;
        ns.ip(&["route", "add", "169.254.169.254/32", "dev", "lo"])?;
        if let Some(others) = dnat_others {
            apply_nat_rules(&ns, others)?;
        }
        let echo = EchoServer::start(&ns, PROXY.parse()?)?;
        Ok(Bed { _echo: echo, ns })
    }
}

pub fn run(mode: &Mode) -> Result<ConnectResults> {
    let dir = tempfile::tempdir()?;
    let beds = [
        Bed::new(None)?,
        Bed::new(Some(0))?,
        Bed::new(Some(1_000))?,
        Bed::new(Some(10_000))?,
    ];
    let cg = TestCgroup::new()?;
    let cgroups = [
        cg.child("none")?,
        cg.child("ebpf1")?,
        cg.child("ebpf1k")?,
        cg.child("ebpf10k")?,
    ];
    let own_cgroup = cg.child("own")?;
    let reference_cgroups = Reference::ALL
        .iter()
        .map(|r| cg.child(r.key()))
        .collect::<Result<Vec<_>>>()?;
    // Daemons live in the plain namespace; with --redirect-to they serve nothing themselves.
    let plain = &beds[Net::Plain as usize].ns;
    let daemons = [
        redirect_only(plain, &cgroups[Attached::Ebpf1 as usize], 0, dir.path())?,
        redirect_only(
            plain,
            &cgroups[Attached::Ebpf1k as usize],
            1_000,
            dir.path(),
        )?,
        redirect_only(
            plain,
            &cgroups[Attached::Ebpf10k as usize],
            10_000,
            dir.path(),
        )?,
    ];
    let plan: Vec<PlanRow> = ROWS
        .iter()
        .map(|&(key, _, net, attached, dest)| PlanRow {
            key: key.to_owned(),
            netns: beds[net as usize].ns.path(),
            cgroup: cgroups[attached as usize].clone(),
            dest: dest.parse().expect("constant addresses"),
            program: None,
            exchange: true,
        })
        .collect();
    eprintln!(
        "bench: connect path, {} rows x {} connects",
        ROWS.len(),
        mode.connect_samples
    );
    let mut measured = measure(&plan, mode.connect_samples, mode.connect_warmup)?;
    let floor = measured
        .get("L0")
        .context("L0 not measured")?
        .batch_medians_ns
        .clone();
    let rows = ROWS
        .iter()
        .map(|&(key, label, ..)| {
            let m = measured
                .remove(key)
                .with_context(|| format!("row {key} not measured"))?;
            Ok(summarize(key, label, m, &floor))
        })
        .collect::<Result<Vec<_>>>()?;

    // The run time per invocation, with the kernel's BPF stats on only for this part (they
    // cost two clock reads per run and would skew the rows above).
    let connect4 = daemons[0].connect4(plain)?.id();
    let l1_l2: Vec<PlanRow> = plan
        .iter()
        .filter(|r| r.key == "L1" || r.key == "L2")
        .map(|r| PlanRow {
            program: Some(connect4),
            ..r.clone()
        })
        .collect();
    let own = own_proxy(plain, &own_cgroup)?;
    let own_row = PlanRow {
        key: "L2own".to_owned(),
        cgroup: own_cgroup.clone(),
        program: Some(own.connect4(plain)?.id()),
        exchange: false,
        ..l1_l2[1].clone()
    };
    let references = Reference::ALL
        .iter()
        .zip(&reference_cgroups)
        .map(|(&r, cgroup)| ReferenceProgram::attach(r, cgroup))
        .collect::<Result<Vec<_>>>()?;
    let reference_rows = references
        .iter()
        .zip(Reference::ALL)
        .zip(&reference_cgroups)
        .map(|((program, r), cgroup)| {
            Ok(PlanRow {
                key: r.key().to_owned(),
                cgroup: cgroup.clone(),
                program: Some(program.id()?),
                ..l1_l2[0].clone()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let with_references = |row: &PlanRow| -> Vec<PlanRow> {
        [row.clone()]
            .into_iter()
            .chain(reference_rows.clone())
            .collect()
    };
    let stats = BpfStats::enable()?;
    let per_row = (mode.connect_samples / 2).max(BATCH);
    // The reference programs' connects alternate batch by batch with ours, so that all figures
    // come from the same moments: on a VM the cost of a run drifts by more than the program
    // costs (measured apart, the floor once came out above our bystander path).
    let mut rewrite_rows = with_references(&l1_l2[1]);
    rewrite_rows.push(own_row);
    let mut rewrites = measure(&rewrite_rows, per_row, 0)?;
    let mut bystanders = measure(&with_references(&l1_l2[0]), per_row, 0)?;
    let guard_row = PlanRow {
        key: "guard".to_owned(),
        program: Some(daemons[0].program(plain, "redirect_guard")?.id()),
        ..l1_l2[1].clone()
    };
    let guarded = measure(&with_references(&guard_row), per_row, 0)?;
    drop(stats);
    let guard_packets_per_connect = guarded.get("guard").map_or(0.0, |m| {
        let runs: u64 = m.program_batches.iter().map(|(runs, _)| runs).sum();
        runs as f64 / m.samples_ns.len().max(1) as f64
    });
    // The reference programs ran in both halves.
    for (key, m) in &mut rewrites {
        if let Some(more) = bystanders.get_mut(key) {
            m.program_batches.append(&mut more.program_batches);
        }
    }
    let mut means = BTreeMap::new();
    let mut run_time = |key: &str, m: Option<&Measured>, name: &str| -> Result<f64> {
        let batches = &m
            .with_context(|| format!("{key} not measured"))?
            .program_batches;
        let (median, mean) = run_time_per_invocation(batches)
            .with_context(|| format!("no runs of {name} were counted"))?;
        means.insert(name.to_owned(), mean);
        Ok(median)
    };
    Ok(ConnectResults {
        rows,
        connect4_rewrite_ns: run_time("L2own", rewrites.get("L2own"), "connect4_rewrite")?,
        connect4_rewrite_shared_ns: run_time("L2", rewrites.get("L2"), "connect4_rewrite_shared")?,
        connect4_bystander_ns: run_time("L1", bystanders.get("L1"), "connect4_bystander")?,
        guard_packet_ns: run_time("guard", guarded.get("guard"), "guard_per_packet")?,
        guard_packets_per_connect,
        empty_program_ns: run_time("empty", rewrites.get("empty"), "empty")?,
        helper_call_ns: run_time("helper", rewrites.get("helper"), "helper")?,
        hash_lookup_ns: run_time("hash", rewrites.get("hash"), "hash")?,
        run_time_means_ns: means,
    })
}

/// (median over batches of the batch's mean, mean over all runs) of (runs, ns) per batch;
/// `None` without runs.
fn run_time_per_invocation(batches: &[(u64, u64)]) -> Option<(f64, f64)> {
    let mut per_batch: Vec<f64> = batches
        .iter()
        .filter(|&&(runs, _)| runs > 0)
        .map(|&(runs, ns)| ns as f64 / runs as f64)
        .collect();
    let (runs, ns) = batches
        .iter()
        .fold((0, 0), |(r, t), &(runs, ns)| (r + runs, t + ns));
    if runs == 0 {
        return None;
    }
    per_batch.sort_unstable_by(f64::total_cmp);
    let n = per_batch.len();
    let median = if n % 2 == 1 {
        per_batch[n / 2]
    } else {
        (per_batch[n / 2 - 1] + per_batch[n / 2]) / 2.0
    };
    Some((median, ns as f64 / runs as f64))
}

/// One row as the client needs it.
#[derive(Clone, Serialize, Deserialize)]
struct PlanRow {
    key: String,
    netns: PathBuf,
    cgroup: PathBuf,
    dest: SocketAddr,
    /// A BPF program (by id) whose run-time stats the client reads around each batch.
    program: Option<u32>,
    /// Exchange a byte before closing (with the echo servers); otherwise only connect.
    exchange: bool,
}

#[derive(Default, Deserialize)]
struct Measured {
    samples_ns: Vec<u64>,
    /// Median of each batch, in measurement order (one per round).
    batch_medians_ns: Vec<u64>,
    elapsed_ns: u64,
    /// With [`PlanRow::program`]: (runs, run time in ns) the kernel counted during each batch.
    #[serde(default)]
    program_batches: Vec<(u64, u64)>,
}

/// Runs the client (role `connect-loop`) over `plan`: `per_row` timed connects per row after
/// `warmup` untimed ones.
fn measure(plan: &[PlanRow], per_row: usize, warmup: usize) -> Result<BTreeMap<String, Measured>> {
    let dir = tempfile::tempdir()?;
    let plan_path = dir.path().join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(plan)?)?;
    let out = sh(command_in(std::env::current_exe()?, None, None)?
        .env(child::ROLE_ENV, "connect-loop")
        .arg(&plan_path)
        .arg(per_row.to_string())
        .arg(warmup.to_string()))?;
    Ok(serde_json::from_str(out.trim())?)
}

fn summarize(key: &str, label: &str, mut m: Measured, floor: &[u64]) -> ConnectRow {
    m.samples_ns.sort_unstable();
    let n = m.samples_ns.len();
    let at = |pct: usize| m.samples_ns[(n * pct / 100).min(n - 1)];
    let mut added: Vec<i64> = m
        .batch_medians_ns
        .iter()
        .zip(floor)
        .map(|(&row, &l0)| row as i64 - l0 as i64)
        .collect();
    added.sort_unstable();
    ConnectRow {
        added_p50_ns: added.get(added.len() / 2).copied().unwrap_or(0),
        key: key.to_owned(),
        label: label.to_owned(),
        samples: n,
        p50_ns: at(50),
        p99_ns: at(99),
        mean_ns: m.samples_ns.iter().sum::<u64>() / n as u64,
        connects_per_sec: n as f64 / (m.elapsed_ns as f64 / 1e9),
    }
}

/// Role `connect-loop PLAN N WARMUP`: for each row of the plan (a JSON file), N timed connects
/// in batches that alternate between rows. Prints {key: {samples_ns, elapsed_ns}}.
pub fn connect_loop(args: &[String]) -> Result<()> {
    let [plan, per_row, warmup] = args else {
        bail!("usage: connect-loop PLAN N WARMUP");
    };
    let plan: Vec<PlanRow> = serde_json::from_slice(&std::fs::read(plan)?)?;
    let (per_row, warmup): (usize, usize) = (per_row.parse()?, warmup.parse()?);
    if let Some(cpu) = client_cpu()? {
        pin_to_cpu(cpu)?;
    }
    let places: Vec<(File, File)> = plan
        .iter()
        .map(|row| {
            let ns = File::open(&row.netns)?;
            let procs = File::options()
                .write(true)
                .open(row.cgroup.join("cgroup.procs"))?;
            Ok((ns, procs))
        })
        .collect::<Result<_>>()?;
    let mut results: Vec<Measured> = plan.iter().map(|_| Measured::default()).collect();
    let enter = |(ns, procs): &(File, File)| -> Result<()> {
        // SAFETY: valid descriptors of a network namespace and a cgroup.procs file.
        ensure!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0,
            "setns"
        );
        (&*procs)
            .write_all(b"0")
            .context("moving into the row's cgroup")?;
        Ok(())
    };
    for (row, place) in plan.iter().zip(&places) {
        enter(place)?;
        for _ in 0..warmup {
            exchange(row.dest, row.exchange)?;
        }
    }
    // Rows take their turns in an order shuffled every round, so that no row always follows
    // the same one (a namespace switch, an echo server that sat idle): position effects
    // average out instead of showing as a row's cost.
    let mut order: Vec<usize> = (0..plan.len()).collect();
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut done = 0;
    while done < per_row {
        let batch = BATCH.min(per_row - done);
        shuffle(&mut order, &mut seed);
        for &i in &order {
            let (row, place, result) = (&plan[i], &places[i], &mut results[i]);
            enter(place)?;
            let program_before = row.program.map(program_stats).transpose()?;
            let start = Instant::now();
            let first = result.samples_ns.len();
            for _ in 0..batch {
                let t0 = Instant::now();
                exchange(row.dest, row.exchange)?;
                result.samples_ns.push(t0.elapsed().as_nanos() as u64);
            }
            result.elapsed_ns += start.elapsed().as_nanos() as u64;
            if let (Some(id), Some((runs, ns))) = (row.program, program_before) {
                let (runs_after, ns_after) = program_stats(id)?;
                result
                    .program_batches
                    .push((runs_after - runs, ns_after - ns));
            }
            let mut this_batch = result.samples_ns[first..].to_vec();
            this_batch.sort_unstable();
            result
                .batch_medians_ns
                .push(this_batch[this_batch.len() / 2]);
        }
        done += batch;
    }
    let out: serde_json::Map<String, serde_json::Value> = plan
        .iter()
        .zip(results)
        .map(|(row, m)| {
            (
                row.key.clone(),
                serde_json::json!({
                    "samples_ns": m.samples_ns,
                    "batch_medians_ns": m.batch_medians_ns,
                    "elapsed_ns": m.elapsed_ns,
                    "program_batches": m.program_batches,
                }),
            )
        })
        .collect();
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

/// Fisher-Yates with xorshift64: a fixed, cheap sequence of permutations.
fn shuffle(items: &mut [usize], seed: &mut u64) {
    for i in (1..items.len()).rev() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        items.swap(i, (*seed % (i as u64 + 1)) as usize);
    }
}

/// connect, send one byte and read it back (with `byte`), close with RST.
fn exchange(dest: SocketAddr, byte: bool) -> Result<()> {
    let mut stream = TcpStream::connect(dest).with_context(|| format!("connect {dest}"))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    if !byte {
        return Ok(());
    }
    stream.write_all(&[1])?;
    let mut byte = [0u8];
    stream.read_exact(&mut byte)?;
    Ok(())
}

/// CPU placement: `REDIRECT_BENCH_PIN` = `same` (default: the client and the echo servers on
/// the first CPU the benchmark may use), `split` (the echo servers on the next one) or `none`.
fn placement() -> String {
    std::env::var("REDIRECT_BENCH_PIN").unwrap_or_else(|_| "same".to_owned())
}

fn client_cpu() -> Result<Option<usize>> {
    Ok(match placement().as_str() {
        "none" => None,
        _ => Some(crate::http::one_cpu()?),
    })
}

fn server_cpu() -> Result<Option<usize>> {
    let cpus = crate::http::allowed_cpus()?;
    Ok(match placement().as_str() {
        "none" => None,
        "split" => cpus.get(1).or(cpus.first()).copied(),
        _ => cpus.first().copied(),
    })
}

/// Pins the calling thread (and so a single-threaded process) to `cpu`.
fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        ensure!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Accepts, echoes one byte, closes; one connection at a time, like the client.
struct EchoServer {
    listener: TcpListener,
}

impl EchoServer {
    fn start(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        let accepting = listener.try_clone()?;
        thread::spawn(move || {
            if let Ok(Some(cpu)) = server_cpu() {
                let _ = pin_to_cpu(cpu);
            }
            for stream in accepting.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut byte = [0u8];
                if stream.read_exact(&mut byte).is_ok() {
                    let _ = stream.write_all(&byte);
                }
            }
        });
        Ok(EchoServer { listener })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on our own listening socket wakes and ends the accept loop.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// A daemon that only redirects (to the echo server), with `others` targets besides
/// 169.254.169.254:80 in its maps. `REDIRECT_BENCH_EBPF_OBJECT` swaps in another object
/// (for comparing program variants).
fn redirect_only(ns: &NetNs, cgroup: &Path, others: usize, dir: &Path) -> Result<Daemon> {
    let config = dir.join(format!("targets-{others}.toml"));
    let mut targets = vec![format!("\"{IMDS}\"")];
    targets.extend((0..others).map(|i| format!("\"{}:80\"", other_address(i))));
    std::fs::write(
        &config,
        format!(
            "redirect_to = [\"{PROXY}\"]\ntargets = [{}]\n",
            targets.join(", ")
        ),
    )?;
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--cgroup",
        cgroup.to_str().unwrap(),
    ];
    let object = std::env::var("REDIRECT_BENCH_EBPF_OBJECT").ok();
    if let Some(object) = &object {
        args.extend(["--ebpf-object", object]);
    }
    Daemon::start_logging(&args, ns, None, "info")
}

/// A daemon with its own proxy (the mock, one worker), as users run it: the target goes to
/// a port of its own.
fn own_proxy(ns: &NetNs, cgroup: &Path) -> Result<Daemon> {
    let mut args = vec![
        "--mock",
        "--listen",
        OWN_LISTEN,
        "--target",
        IMDS,
        "--cgroup",
        cgroup.to_str().unwrap(),
    ];
    let object = std::env::var("REDIRECT_BENCH_EBPF_OBJECT").ok();
    if let Some(object) = &object {
        args.extend(["--ebpf-object", object]);
    }
    let daemon = Daemon::start_logging(&args, ns, None, "info")?;
    let status = daemon.status(ns)?;
    ensure!(
        status["redirects"][0]["dedicated"] == true,
        "the own-proxy daemon's target has no dedicated port: {status}"
    );
    Ok(daemon)
}

/// Distinct addresses in 10.0.0.0/8 (outside 10.255.0.0/16, where the proxy lives).
fn other_address(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256)
}

/// Fills the nat OUTPUT chain of `ns` with `others` DNAT rules for other destinations, then
/// the metadata rule. The rules go away with the namespace.
fn apply_nat_rules(ns: &NetNs, others: usize) -> Result<()> {
    let mut rules = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..others {
        rules.push_str(&format!(
            "-A OUTPUT -d {}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {PROXY}\n",
            other_address(i)
        ));
    }
    rules.push_str(&format!(
        "-A OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {PROXY}\nCOMMIT\n"
    ));
    let mut restore = command_in("iptables-restore", None, Some(ns))?
        .stdin(Stdio::piped())
        .spawn()
        .context("iptables-restore")?;
    restore
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    ensure!(restore.wait()?.success(), "iptables-restore failed");
    Ok(())
}

/// Turns on the kernel's BPF run-time statistics while it lives.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS)?;
        std::fs::write(BPF_STATS, "1")?;
        Ok(BpfStats { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.before.trim());
    }
}

/// (runs, total ns) of a loaded program, from the kernel's program info.
fn program_stats(id: u32) -> Result<(u64, u64)> {
    let info = loaded_program(id)?;
    Ok((info.run_count(), info.run_time().as_nanos() as u64))
}

/// What a reference program does: the scale for connect4's run time on this machine.
#[derive(Clone, Copy)]
enum Reference {
    /// `r0 = 1; exit`: what the stats themselves (two clock reads and the call) cost.
    Empty,
    /// One helper call, `bpf_get_socket_cookie(ctx)`, which connect4 makes once per rewrite.
    HelperCall,
    /// One lookup (a hit) in a hash map of 16,384 entries, the lookup connect4 made before
    /// its target tables became arrays.
    HashLookup,
}

impl Reference {
    const ALL: [Reference; 3] = [
        Reference::Empty,
        Reference::HelperCall,
        Reference::HashLookup,
    ];

    fn key(self) -> &'static str {
        match self {
            Reference::Empty => "empty",
            Reference::HelperCall => "helper",
            Reference::HashLookup => "hash",
        }
    }
}

/// A reference cgroup/connect4 program, loaded and attached with raw bpf(2) calls so that it
/// depends on nothing of ours. Detached and unloaded on drop (closing its descriptors).
struct ReferenceProgram {
    name: String,
    _map: Option<std::os::fd::OwnedFd>,
    _prog: std::os::fd::OwnedFd,
    _link: std::os::fd::OwnedFd,
}

// From include/uapi/linux/bpf.h.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_GET_SOCKET_COOKIE: i32 = 46;

/// One eBPF instruction: opcode, dst and src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

impl ReferenceProgram {
    fn attach(kind: Reference, cgroup: &Path) -> Result<Self> {
        const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
        const MOV64_REG: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
        const ADD64_IMM: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
        const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
        const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW, two slots
        const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
        const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
        const PSEUDO_MAP_FD: u8 = 1;
        let ret = [insn(MOV64_IMM, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)];
        let key: u64 = 0x0050_0101_0101;
        let (map, body) = match kind {
            Reference::Empty => (None, Vec::new()),
            Reference::HelperCall => (None, vec![insn(CALL, 0, 0, 0, BPF_FUNC_GET_SOCKET_COOKIE)]),
            Reference::HashLookup => {
                let map = hash_map_with(key)?;
                let fd = map.as_raw_fd();
                let body = vec![
                    // r1 = key (64-bit immediate), *(u64 *)(r10 - 8) = r1, r2 = r10 - 8
                    insn(LD_IMM64, 1, 0, 0, key as u32 as i32),
                    insn(0, 0, 0, 0, (key >> 32) as i32),
                    insn(STX_DW, 10, 1, -8, 0),
                    insn(MOV64_REG, 2, 10, 0, 0),
                    insn(ADD64_IMM, 2, 0, 0, -8),
                    // r1 = the map, call bpf_map_lookup_elem
                    insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, fd),
                    insn(0, 0, 0, 0, 0),
                    insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
                ];
                (Some(map), body)
            }
        };
        let insns: Vec<u64> = body.into_iter().chain(ret).collect();
        let name = format!("rd_bench_{}", kind.key());
        let license = c"GPL";
        // union bpf_attr for BPF_PROG_LOAD: prog_type @0, insn_cnt @4, insns @8, license @16,
        // log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16] @48,
        // prog_ifindex @64, expected_attach_type @68.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
        attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..48 + name.len()].copy_from_slice(name.as_bytes());
        attr[68..72].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &mut attr)
            .with_context(|| format!("loading the reference program {name}"))?;
        let cgroup_dir = File::open(cgroup)?;
        // BPF_LINK_CREATE: prog_fd @0, target_fd @4, attach_type @8, flags @12.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(cgroup_dir.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let link = bpf(BPF_LINK_CREATE, &mut attr)
            .with_context(|| format!("attaching the reference program {name}"))?;
        Ok(ReferenceProgram {
            name,
            _map: map,
            _prog: prog,
            _link: link,
        })
    }

    /// The kernel's id of the program.
    fn id(&self) -> Result<u32> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.name_as_str() == Some(&self.name))
            .with_context(|| format!("the reference program {} is not loaded", self.name))?;
        Ok(info.id())
    }
}

/// A hash map (u64 -> u64) of 16,384 entries holding `key`.
fn hash_map_with(key: u64) -> Result<std::os::fd::OwnedFd> {
    // BPF_MAP_CREATE: map_type @0, key_size @4, value_size @8, max_entries @12.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_MAP_TYPE_HASH.to_ne_bytes());
    attr[4..8].copy_from_slice(&8u32.to_ne_bytes());
    attr[8..12].copy_from_slice(&8u32.to_ne_bytes());
    attr[12..16].copy_from_slice(&16_384u32.to_ne_bytes());
    let map = bpf(BPF_MAP_CREATE, &mut attr).context("creating the reference hash map")?;
    let value = 1u64;
    // BPF_MAP_UPDATE_ELEM: map_fd @0, key @8, value @16, flags @24.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(&raw const key as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(&raw const value as u64).to_ne_bytes());
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("filling the reference hash map")?;
    Ok(map)
}

/// A bpf(2) command that returns a new descriptor.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// bpf(2): its non-negative result, or the error. `attr` is a zero-padded `union bpf_attr`
/// whose pointers must outlive the call.
fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; the pointers in it outlive
    // the call (the callers' contract).
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    ensure!(r >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    Ok(r)
}
