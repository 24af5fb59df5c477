//! Real-kernel test fixtures: throwaway network namespaces and cgroups, the daemon as a child
//! process, and commands placed into a cgroup and a network namespace before they start.
//!
//! Network safety: every namespace made here has only the links a test adds (loopback, veth
//! pairs between test namespaces) and no default route, so a connect that is not redirected
//! fails with ENETUNREACH and no packet leaves the machine. Every resource is released by a
//! `Drop` guard, also when a test fails.

pub mod child;
pub mod docker;

use std::{
    ffi::OsStr,
    fs::File,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

pub const DAEMON: &str = env!("CARGO_BIN_EXE_redirect");
pub const IMDS: &str = "169.254.169.254";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where tests pin the programs: under bpffs, never the daemon's default (a daemon of the host
/// may use that), each test directory of its own.
pub fn test_pin_dir() -> PathBuf {
    Path::new(BPFFS).join(unique("redirect-test"))
}

const BPFFS: &str = "/sys/fs/bpf";

/// A pin directory a test gave a daemon: its pins (and so the links) are removed on drop.
pub struct PinDirGuard(pub PathBuf);

impl PinDirGuard {
    /// A new directory's name (the daemon makes it), bpffs mounted at /sys/fs/bpf first: the
    /// daemon would mount it too, but one in a container must find the host's there.
    pub fn new() -> Self {
        let mounted = Command::new("mountpoint")
            .args(["-q", BPFFS])
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = Command::new("mount")
                .args(["-t", "bpf", "bpf", BPFFS])
                .status();
        }
        PinDirGuard(test_pin_dir())
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().expect("a UTF-8 path")
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes what an earlier test run that was killed (and so never ran its guards) left behind:
/// namespaces, cgroups, pinned programs and Docker objects whose names carry the pid of a
/// process that is gone.
pub fn sweep_leftovers() {
    let gone = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split(['-', ':']).next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ns in names(Path::new("/run/netns"))
        .iter()
        .filter(|n| gone(n, "rdt-"))
    {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    for mount in cgroup2_mount().into_iter().chain(cgroup1_mounts()) {
        for cg in names(&mount).iter().filter(|n| gone(n, "redirect-test-")) {
            remove_cgroup_tree(&mount.join(cg));
        }
    }
    for pins in names(Path::new(BPFFS))
        .iter()
        .filter(|n| gone(n, "redirect-test-"))
    {
        let _ = std::fs::remove_dir_all(Path::new(BPFFS).join(pins));
    }
    let docker = |args: &[&str]| -> Vec<String> {
        Command::new("docker")
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    for ctr in docker(&["ps", "-a", "--format", "{{.Names}}"])
        .iter()
        .filter(|n| gone(n, "redirect-test-ctr-"))
    {
        let _ = Command::new("docker").args(["rm", "-f", ctr]).output();
    }
    for image in docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .iter()
        .filter(|n| gone(n, "redirect-test-"))
    {
        let _ = Command::new("docker").args(["rmi", "-f", image]).output();
    }
}

/// The cgroup v1 hierarchies' mount points (none on a pure v2 host).
pub fn cgroup1_mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            right.starts_with("cgroup ").then(|| PathBuf::from(point))
        })
        .collect()
}

/// rmdir depth first: cgroupfs directories cannot be emptied, only removed once their children
/// are. A cgroup that still has processes stays.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The full path of a program on this machine (tests copy some into container images).
pub fn host_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not installed"))
}

/// Runs `cmd`, failing with its output unless it exits 0.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ip(args: &[&str]) -> Result<String> {
    sh(Command::new("ip").args(args))
}

/// The cgroup v2 mount point, read the same way the daemon reads it.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            let mount_point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 mount")
}

/// A network namespace with loopback up and nothing else. Deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Result<Self> {
        let name = unique("rdt");
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let ns = File::open(self.path())?;
        thread::spawn(move || {
            enter_netns(&ns).expect("setns");
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// setns(2) for the calling thread only.
fn enter_netns(ns: &File) -> std::io::Result<()> {
    // SAFETY: valid fd of a network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connects two namespaces with a veth pair: `a` gets `a_addr` (CIDR), `b` gets `b_addr`.
/// Only the connected subnet is routable; there is still no default route.
pub fn veth(a: &NetNs, a_addr: &str, b: &NetNs, b_addr: &str) -> Result<(String, String)> {
    veth_to(a, a_addr, &b.path(), b_addr)
}

/// Like [`veth`], with the far end in the namespace at `b_ns` (e.g. `/proc/PID/ns/net`).
/// The pair goes away with `a` (deleting a namespace deletes its veth ends and their peers).
/// The ends' names, in `a` and in `b`.
pub fn veth_to(a: &NetNs, a_addr: &str, b_ns: &Path, b_addr: &str) -> Result<(String, String)> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (va, vb) = (format!("rdva{id}"), format!("rdvb{id}"));
    let b_ns = b_ns.to_str().context("netns path")?;
    a.ip(&[
        "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", b_ns,
    ])?;
    a.ip(&["addr", "add", a_addr, "dev", &va])?;
    a.ip(&["link", "set", &va, "up"])?;
    let in_b = |args: &[&str]| {
        sh(Command::new("nsenter")
            .arg(format!("--net={b_ns}"))
            .arg("ip")
            .args(args))
    };
    in_b(&["addr", "add", b_addr, "dev", &vb])?;
    in_b(&["link", "set", &vb, "up"])?;
    Ok((va, vb))
}

/// A cgroup made for one test under the cgroup v2 mount, with child cgroups on demand.
/// Removed, children first, on drop; the processes put inside are waited for by their own
/// guards before that.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Result<Self> {
        let path = cgroup2_mount()?.join(unique("redirect-test"));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let path = self.path.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A process that exited a moment ago may still be leaving the cgroup.
        for _ in 0..100 {
            remove_cgroup_tree(&self.path);
            if !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: could not remove test cgroup {}",
            self.path.display()
        );
    }
}

/// A command that starts inside `cgroup` (if given) and network namespace `netns` (if given):
/// the child moves itself into both between fork and exec, so nothing runs outside them.
pub fn command_in(
    program: impl AsRef<OsStr>,
    cgroup: Option<&Path>,
    netns: Option<&NetNs>,
) -> Result<Command> {
    let procs = cgroup
        .map(|cg| File::options().write(true).open(cg.join("cgroup.procs")))
        .transpose()
        .context("opening cgroup.procs")?;
    let ns = netns.map(|n| File::open(n.path())).transpose()?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe syscalls (write, setns) on descriptors opened above.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs
                && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ns) = &ns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A `redirect run` child process. Killed (SIGKILL) on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    /// Reads the daemon's stderr into `lines` until it closes.
    reader: Option<thread::JoinHandle<()>>,
    pub control_socket: PathBuf,
    /// The pins of this daemon's own (removed on drop), unless the test gave one.
    pins: Option<PinDirGuard>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `redirect run ARGS --control-socket <temp>` in `netns` (and `cgroup`, if given)
    /// and waits for its ready line.
    pub fn start(args: &[&str], netns: &NetNs, cgroup: Option<&Path>) -> Result<Self> {
        Self::start_logging(args, netns, cgroup, "info,redirect=debug")
    }

    /// [`Daemon::start`] with the daemon's log filter (benchmarks keep per-request logs off).
    pub fn start_logging(
        args: &[&str],
        netns: &NetNs,
        cgroup: Option<&Path>,
        log_filter: &str,
    ) -> Result<Self> {
        Self::start_with(args, netns, cgroup, log_filter, |_| {})
    }

    /// [`Daemon::start_logging`], with `configure` applied to the command before it starts
    /// (environment, limits).
    pub fn start_with(
        args: &[&str],
        netns: &NetNs,
        cgroup: Option<&Path>,
        log_filter: &str,
        configure: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        Self::spawn(args, Some(netns), cgroup, log_filter, configure)
    }

    /// A daemon in the host's own network namespace, for callers that share it (host-network
    /// containers). Its callers may only dial its loopback listener, never a metadata
    /// address: that would leave the host if the redirect failed.
    pub fn start_on_host(args: &[&str]) -> Result<Self> {
        Self::spawn(args, None, None, "info,redirect=debug", |_| {})
    }

    fn spawn(
        args: &[&str],
        netns: Option<&NetNs>,
        cgroup: Option<&Path>,
        log_filter: &str,
        configure: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // The test's own control socket when it gives one (`--replace` shares it).
        let given = args
            .iter()
            .position(|a| *a == "--control-socket")
            .and_then(|i| args.get(i + 1));
        let control_socket = given.map_or_else(|| dir.path().join("control.sock"), PathBuf::from);
        let mut cmd = command_in(DAEMON, cgroup, netns)?;
        configure(&mut cmd);
        cmd.arg("run").args(args);
        let pins = (!args.contains(&"--pin-dir")).then(PinDirGuard::new);
        if let Some(pins) = &pins {
            cmd.args(["--pin-dir", pins.arg()]);
        }
        if !args.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(dir.path().join("state"));
        }
        if given.is_none() {
            cmd.arg("--control-socket").arg(&control_socket);
        }
        cmd.env("REDIRECT_LOG", log_filter)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting the daemon")?;
        let stderr = child.stderr.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let ready = line.contains("redirect ready");
                    // Kept before the start returns: the ready line is in `log()` then.
                    lines.lock().unwrap().push(line);
                    if ready {
                        let _ = ready_tx.send(());
                    }
                }
            })
        };
        let mut daemon = Daemon {
            child: Some(child),
            lines,
            reader: Some(reader),
            control_socket,
            pins,
            _dir: dir,
        };
        // Returns when the ready line arrives or stderr closes (the daemon exited). The
        // timeout only turns a hung start into a failure instead of a hung test run.
        match ready_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(()) => Ok(daemon),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("daemon not ready after 120 s:\n{}", daemon.log())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = daemon.wait()?;
                bail!(
                    "daemon exited before it was ready ({status}):\n{}",
                    daemon.log()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Asserts that the daemon has logged `needle` already, showing its log if not.
    #[track_caller]
    pub fn assert_logged(&self, needle: &str) {
        let log = self.log();
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }

    /// Waits until the daemon has logged a line containing `needle`. The limit only turns a
    /// line that never comes into a failure instead of a hung test run.
    pub fn wait_for_log(&self, needle: &str) -> Result<()> {
        for _ in 0..200 {
            if self.log().contains(needle) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the daemon never logged {needle:?}; its log:\n{}",
            self.log()
        )
    }

    /// Sends `signal` and waits for the exit.
    pub fn stop(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        self.signal(signal)?;
        self.wait()
    }

    /// Sends `signal`, and returns at once.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let child = self.child.as_ref().context("already stopped")?;
        // SAFETY: signalling our own child, which has not been reaped yet.
        ensure!(
            unsafe { libc::kill(child.id() as libc::pid_t, signal) } == 0,
            "kill: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Waits for the daemon to exit, and for its last log lines.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let status = child.wait()?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join(); // stderr closes with the daemon
        }
        Ok(status)
    }

    /// A `kB` field of the daemon's /proc status (`VmRSS:`, `VmHWM:`).
    pub fn memory_kb(&self, field: &str) -> Result<u64> {
        status_kb(self.pid(), field)
    }

    /// `redirect ARGS --control-socket <this daemon's>` from `netns`: its output, or its
    /// error's.
    pub fn cli(&self, netns: &NetNs, args: &[&str]) -> Result<Output> {
        Ok(command_in(DAEMON, None, Some(netns))?
            .args(args)
            .arg("--control-socket")
            .arg(&self.control_socket)
            .output()?)
    }

    /// `redirect status --json` against this daemon, run from `netns`.
    pub fn status(&self, netns: &NetNs) -> Result<serde_json::Value> {
        let out = sh(command_in(DAEMON, None, Some(netns))?
            .args(["status", "--json", "--control-socket"])
            .arg(&self.control_socket))?;
        Ok(serde_json::from_str(&out)?)
    }

    /// The kernel's info on this daemon's connect4 program (its id from the status).
    pub fn connect4(&self, netns: &NetNs) -> Result<aya::programs::ProgramInfo> {
        self.program(netns, "redirect_connect4")
    }

    /// The kernel's info on this daemon's program `name` (its id from the status).
    pub fn program(&self, netns: &NetNs, name: &str) -> Result<aya::programs::ProgramInfo> {
        let status = self.status(netns)?;
        let id = status["programs"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .and_then(|p| p["id"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("no {name} id in the daemon's status"))?;
        loaded_program(id)
    }
}

/// The kernel's info on the loaded BPF program `id`.
pub fn loaded_program(id: u32) -> Result<aya::programs::ProgramInfo> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .with_context(|| format!("BPF program {id} is not loaded"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Then its pins (fields drop after this).
        drop(self.pins.take());
    }
}

/// A TCP server in `netns` standing in for an upstream: each connection is served on a
/// thread of its own by `serve`, which adds what it saw to the shared log. It stops
/// accepting when dropped.
pub struct TestServer<T> {
    log: Arc<Mutex<Vec<T>>>,
    listener: std::net::TcpListener,
}

impl<T: Send + 'static> TestServer<T> {
    pub fn start(
        netns: &NetNs,
        addr: std::net::SocketAddr,
        serve: impl Fn(std::net::TcpStream, &Mutex<Vec<T>>) + Copy + Send + 'static,
    ) -> Result<Self> {
        let listener = netns.run(move || std::net::TcpListener::bind(addr))??;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (accepting, shared) = (listener.try_clone()?, Arc::clone(&log));
        thread::spawn(move || {
            for stream in accepting.incoming() {
                let Ok(stream) = stream else { return };
                let log = Arc::clone(&shared);
                thread::spawn(move || serve(stream, &log));
            }
        });
        Ok(TestServer { log, listener })
    }

    /// The log, emptied.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl<T: Clone> TestServer<T> {
    pub fn log(&self) -> Vec<T> {
        self.log.lock().unwrap().clone()
    }
}

impl<T> Drop for TestServer<T> {
    fn drop(&mut self) {
        // Wakes the accept loop, which then ends.
        // SAFETY: shutdown(2) on our own listening socket.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// A `kB` field of a process's /proc status (`VmRSS:`, `VmHWM:`).
pub fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} for pid {pid}"))
}

/// A config file in `dir` for the EC2 mock whose user data is `size` bytes (a large answer).
pub fn user_data_config(dir: &Path, size: usize) -> Result<PathBuf> {
    let config = dir.join("mock.toml");
    let text = format!(
        "mock = \"ec2\"\n[ec2]\nuser_data = \"{}\"\n",
        "x".repeat(size)
    );
    std::fs::write(&config, text)?;
    Ok(config)
}

/// Sets RLIMIT_NOFILE (soft and hard) of the process `cmd` starts.
pub fn limit_nofile(cmd: &mut Command, limit: u64) {
    let limit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit is async-signal-safe; `limit` is a plain copied value.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `redirect ARGS` to completion (for the error cases).
pub fn run_daemon_expecting_failure(mut cmd: Command) -> Result<String> {
    let out: Output = cmd
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .output()
        .context("starting redirect")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "expected failure, got {}: {stderr}",
        out.status
    );
    ensure!(
        out.status.code() == Some(1),
        "exit status {} (want 1): {stderr}",
        out.status
    );
    ensure!(!stderr.contains("panicked"), "panic: {stderr}");
    Ok(stderr)
}

/// curl inside `cgroup` and `netns`; returns (HTTP status, body). Extra args go before the URL.
pub fn curl(cgroup: &Path, netns: &NetNs, args: &[&str], url: &str) -> Result<(u16, String)> {
    let out = sh(command_in("curl", Some(cgroup), Some(netns))?
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url))?;
    let (body, code) = out.rsplit_once('\n').context("curl printed no status")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Programs attached to `cgroup` according to `bpftool cgroup show`, as (attach type, name).
pub fn attached_programs(cgroup: &Path) -> Result<Vec<(String, String)>> {
    let out = Command::new("bpftool")
        .arg("-j")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup)
        .output()
        .context("starting bpftool")?;
    if !out.status.success() {
        // bpftool 7 queries attach types that kernels before 5.15 do not know, and gives up
        // (exit 255): the links (ours are all links) tell the same.
        return attached_links(cgroup);
    }
    let out = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = if out.trim().is_empty() {
        serde_json::Value::Array(vec![])
    } else {
        serde_json::from_str(&out)?
    };
    Ok(json
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["attach_type"].as_str().unwrap_or_default().to_owned(),
                        p["name"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The BPF links on `cgroup` (its id is its directory's inode), as `bpftool -j link show`
/// gives them (`id`, `prog_id`, `attach_type`, ...).
pub fn cgroup_links(cgroup: &Path) -> Result<Vec<serde_json::Value>> {
    use std::os::unix::fs::MetadataExt as _;
    let id = std::fs::metadata(cgroup)?.ino();
    let links: serde_json::Value =
        serde_json::from_str(&sh(Command::new("bpftool").args(["-j", "link", "show"]))?)?;
    Ok(links
        .as_array()
        .context("bpftool link show")?
        .iter()
        .filter(|l| l["type"] == "cgroup" && l["cgroup_id"].as_u64() == Some(id))
        .cloned()
        .collect())
}

/// The links on `cgroup`, as (attach type, program name).
fn attached_links(cgroup: &Path) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for link in cgroup_links(cgroup)? {
        let prog = link["prog_id"].as_u64().context("prog_id")?.to_string();
        let prog: serde_json::Value = serde_json::from_str(&sh(
            Command::new("bpftool").args(["-j", "prog", "show", "id", &prog])
        )?)?;
        found.push((
            link["attach_type"].as_str().unwrap_or_default().to_owned(),
            prog["name"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    Ok(found)
}

/// Runs a role of this test binary (see `child`) inside `cgroup` and `netns`; returns its
/// stdout parsed as JSON.
pub fn child_role(
    cgroup: &Path,
    netns: &NetNs,
    role: &str,
    args: &[&str],
) -> Result<serde_json::Value> {
    let out = sh(
        command_in(std::env::current_exe()?, Some(cgroup), Some(netns))?
            .env(child::ROLE_ENV, role)
            .args(args),
    )?;
    serde_json::from_str(out.trim()).with_context(|| format!("child {role} printed {out:?}"))
}

/// A child process of a test: killed (after its stdin is closed) and reaped on drop if it
/// is still running.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Guards `child` (spawned with its stdout piped) and reads the first line it prints:
    /// a role saying it is ready. The child is stopped on drop even if the read fails.
    pub fn first_line(child: Child) -> Result<(Self, String)> {
        let mut guard = ChildGuard(Some(child));
        let stdout = guard
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("stdout not piped")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut BufReader::new(stdout), &mut line)?;
        Ok((guard, line))
    }

    /// Waits for the child; its stdout, if it exited 0.
    pub fn wait_with_output(mut self) -> Result<Vec<u8>> {
        let child = self.0.take().context("already waited for")?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(out.stdout)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            drop(child.stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
