//! Listening in every network namespace that redirected callers live in.
//!
//! The programs rewrite a connect to a loopback endpoint (`127.0.0.1:8170`), and loopback is
//! per network namespace: a container's connect lands on the container's own loopback. So the
//! daemon listens there too. A socket created after `setns()` into a namespace belongs to that
//! namespace for life, wherever the process that holds it runs: the daemon enters a
//! namespace for a moment, opens its listeners, comes back, and accepts on them like on its
//! own. A connection never leaves the caller's namespace: no route, bridge, firewall rule or
//! exposed port is involved, and it works with `--network none`.
//!
//! Namespaces are found three ways: a scan of `/proc` at start; Docker's events, before a
//! container's first command runs (`crate::docker`); and the kernel's report of a rewrite in
//! a namespace without listeners, for runtimes we do not know (see [`crate::ebpf::netns`]). A
//! namespace is served while some process lives in it, and only if one of its processes is
//! in an attached cgroup. The sweep closes the listeners of namespaces left without
//! processes (the listeners themselves would keep the namespace alive).

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use redirect_common::NetnsEvent;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::{
    caller::Caller,
    docker::{Container, Found, Started},
    ebpf::{NetnsEvents, NetnsWatch},
    handover::{Inherit, Role},
    host_callers::HostCallers,
    paths,
    policy::SharedRules,
    proxy::ListenerSink,
};

/// How often namespaces are checked for processes left in them.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Namespaces served at once, by default (`max_namespaces`). Each takes a listener per
/// endpoint (a descriptor each), and any process that may create network namespaces
/// (`unshare -rn`, unprivileged) can make many: beyond the limit, new ones are refused with a
/// warning, and the daemon keeps the descriptors that its callers' connections need.
pub const MAX_NAMESPACES: usize = 8192;

/// Backlog of a planted listener: a namespace holds one container's callers.
const BACKLOG: i32 = 1024;

/// A network namespace, as `stat` of its `/proc/<pid>/ns/net` file names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetnsId {
    dev: u64,
    ino: u64,
}

impl NetnsId {
    fn of(path: &Path) -> io::Result<Self> {
        Ok(Self::from_meta(&std::fs::metadata(path)?))
    }

    fn from_meta(meta: &std::fs::Metadata) -> Self {
        NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_test(dev: u64, ino: u64) -> Self {
        NetnsId { dev, ino }
    }
}

/// A namespace held open: the descriptor keeps it alive even when the process it was found
/// by exits right after.
struct NetnsFile {
    id: NetnsId,
    file: File,
}

impl NetnsFile {
    fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let id = NetnsId::from_meta(&file.metadata()?);
        Ok(NetnsFile { id, file })
    }
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino) // as `readlink /proc/<pid>/ns/net` shows it
    }
}

/// One served namespace, as `redirect status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamespaceStatus {
    pub netns: String,
    /// Who connects from there, as the access log names it.
    pub caller: String,
    /// A process in it: the one it was found by, or a later one.
    pub pid: u32,
    /// The cgroup of the process it was found by (for a container, its id is in it).
    pub cgroup: String,
    /// Endpoints listened on; fewer than the daemon's when something else holds the port.
    pub listening: Vec<String>,
    pub requests: u64,
    /// The Docker container it belongs to, if Docker says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
}

/// A served namespace, as the planter keeps it.
struct Entry {
    /// A process in it; the sweep looks for another when it exits.
    pid: u32,
    /// 0 until known, on kernels before 5.14 (see [`netns_cookie`]).
    cookie: u64,
    listening: Vec<String>,
    caller: Arc<Caller>,
    /// Stops its listeners.
    stop: CancellationToken,
}

/// What the planter shares with `redirect status`.
#[derive(Clone, Default)]
pub struct Served(Arc<Mutex<BTreeMap<NetnsId, Entry>>>);

impl Served {
    /// Applies the rules in force now to every served namespace's caller (after a reload).
    pub fn reapply(&self) {
        let entries = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in entries.values() {
            entry.caller.reapply();
        }
    }

    pub fn statuses(&self) -> Vec<NamespaceStatus> {
        let entries = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .values()
            .map(|e| NamespaceStatus {
                netns: e.caller.netns.clone(),
                caller: e.caller.to_string(),
                pid: e.pid,
                cgroup: e.caller.cgroup.clone(),
                listening: e.listening.clone(),
                requests: e.caller.requests(),
                container: e.caller.container().cloned(),
            })
            .collect()
    }
}

/// The host's processes, as a procfs mount shows them (`/proc`, or the host's /proc
/// bind-mounted into the daemon's container). Pids are the host's: the kernel reports them so.
#[derive(Debug, Clone)]
pub struct Procfs(pub PathBuf);

impl Procfs {
    fn netns(&self, pid: u32) -> PathBuf {
        self.0.join(format!("{pid}/ns/net"))
    }

    fn task_netns(&self, pid: u32, tid: u32) -> PathBuf {
        self.0.join(format!("{pid}/task/{tid}/ns/net"))
    }

    /// The cgroup of `pid` (cgroup v2, relative to the hierarchy's root, as
    /// `/proc/<pid>/cgroup` prints it); `None` once it has exited.
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.0.join(format!("{pid}/cgroup"))).ok()?;
        Some(text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned())
    }
}

/// Which namespaces to serve, and on what.
pub struct Scope {
    /// Where to find the host's processes.
    pub proc: Procfs,
    /// The loopback endpoints the routes send connects to.
    pub endpoints: Vec<SocketAddr>,
    /// The attached cgroups, as paths under `mount`.
    pub cgroups: Vec<PathBuf>,
    /// The cgroup v2 mount.
    pub mount: PathBuf,
    /// The operator's policy rules, for each caller found.
    pub rules: Arc<SharedRules>,
    /// Namespaces served at most.
    pub max: usize,
}

/// Finds namespaces, opens listeners in them, and closes those of namespaces gone.
pub struct Planter {
    scope: Scope,
    sink: ListenerSink,
    /// The proxy's shutdown: each namespace's listeners stop with a child of it.
    shutdown: CancellationToken,
    watch: NetnsWatch,
    events: Option<NetnsEvents>,
    home: NetnsId,
    /// The home namespace's cookie; 0 until known (see [`netns_cookie`]).
    home_cookie: u64,
    /// The served namespaces, shared with `redirect status`.
    served: Served,
    /// At the scope's `max` (said once until below again).
    full: bool,
    /// The callers in the daemon's own namespace, told of host-network containers.
    host: Arc<HostCallers>,
    /// Listeners the daemon this one replaces handed over, by namespace, until the scan at
    /// start takes them (see `crate::handover`).
    inherited: BTreeMap<NetnsId, Vec<Inherit>>,
}

impl Planter {
    /// Marks the daemon's own namespace as served (its listeners are the proxy's own, and its
    /// callers' processes are recorded) and turns the kernel's reports on.
    pub fn new(
        scope: Scope,
        sink: ListenerSink,
        shutdown: CancellationToken,
        (mut watch, events): (NetnsWatch, NetnsEvents),
        host: Arc<HostCallers>,
    ) -> anyhow::Result<Self> {
        let home = NetnsId::of(Path::new(paths::OWN_NETNS))?;
        let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let home_cookie = netns_cookie(probe.as_fd())?;
        if home_cookie == 0 {
            tracing::info!(
                "this kernel (before 5.14) cannot name a network namespace's cookie: each served namespace is learnt from its first connect's report"
            );
        } else {
            watch.serve_recording_pids(home_cookie)?;
        }
        watch.activate()?;
        Ok(Planter {
            scope,
            sink,
            shutdown,
            watch,
            events: Some(events),
            home,
            home_cookie,
            served: Served::default(),
            full: false,
            host,
            inherited: BTreeMap::new(),
        })
    }

    /// Listeners handed over by the daemon this one replaces: served again in the namespaces
    /// that [`Planter::serve_existing`] finds still to be served.
    pub fn inherit(&mut self, listeners: BTreeMap<NetnsId, Vec<Inherit>>) {
        self.inherited = listeners;
    }

    pub fn status(&self) -> Served {
        self.served.clone()
    }

    /// Serves the namespaces that exist now: call before saying the daemon is ready.
    pub async fn serve_existing(&mut self) {
        self.scan().await;
        // Namespaces gone, or no longer covered, since the old daemon listened there.
        let left = std::mem::take(&mut self.inherited);
        if !left.is_empty() {
            tracing::info!(
                "--replace: the listeners of {} network namespaces no longer served were closed",
                left.len()
            );
        }
    }

    /// Serves the namespaces of containers Docker starts and those the kernel reports,
    /// until `stop`.
    pub async fn run(mut self, mut docker: mpsc::Receiver<Found>, stop: CancellationToken) {
        let events = self.events.take().expect("run once");
        // SAFETY: the AsyncFd owns the ring buffer, and with it the descriptor, for as long as
        // it is registered.
        let registered = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) };
        let mut events = match registered {
            Ok(fd) => fd,
            Err(e) => {
                let e = e.into_parts().1;
                tracing::error!(
                    "cannot wait for namespace events: {e}; only the scans find namespaces"
                );
                return self.sweep_until(stop).await;
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                ready = events.readable_mut() => match ready {
                    Ok(mut guard) => {
                        let batch = guard.get_inner_mut().drain();
                        guard.clear_ready();
                        self.on_events(batch).await;
                    }
                    Err(e) => {
                        tracing::error!("namespace events: {e}");
                        return self.sweep_until(stop).await;
                    }
                },
                Some(found) = docker.recv() => match found {
                    Found::Sandbox(file, seen) => {
                        match file {
                            Some(file) => self.on_sandbox(file).await,
                            None => self.scan().await,
                        }
                        tracing::debug!("Docker sandbox handled {:?} after it appeared", seen.elapsed());
                    }
                    Found::Started(started) => self.on_container(started).await,
                },
                _ = sweep.tick() => self.sweep().await,
            }
        }
    }

    /// A namespace Docker mounted for a container about to start: served with the container's
    /// first process, found in it (runc's init, waiting to run the entrypoint).
    async fn on_sandbox(&mut self, file: File) {
        let Ok(meta) = file.metadata() else { return };
        let ns = NetnsFile {
            id: NetnsId::from_meta(&meta),
            file,
        };
        if self.is_known(ns.id) {
            return;
        }
        if let Some(&pid) = self.namespaces().get(&ns.id) {
            self.consider(ns, pid).await;
        }
    }

    /// A container Docker started (or found running): its namespace, now, and its names.
    async fn on_container(&mut self, started: Started) {
        let path = self.scope.proc.netns(started.pid);
        let Ok(ns) = NetnsFile::open(&path) else {
            return; // gone already
        };
        let id = ns.id;
        if id == self.home {
            // The host's network: served by the daemon's own listeners, which name its
            // callers by cgroup.
            self.host.describe(started.container);
            return;
        }
        if !self.is_known(id) {
            self.consider(ns, started.pid).await;
        }
        if let Some(entry) = self.lock_served().get_mut(&id) {
            entry.caller.set_container(started.container);
        }
    }

    async fn sweep_until(mut self, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = sweep.tick() => {
                    self.sweep().await;
                    self.scan().await;
                }
            }
        }
    }

    /// Reported connects: each one's namespace, once, unless served already (a caller retrying
    /// sends one per connect); for those whose thread is gone already, one scan for any new
    /// namespace. A burst of reports costs one pass, so the sweep is never starved of turns.
    async fn on_events(&mut self, batch: Vec<NetnsEvent>) {
        let mut handled: HashSet<u64> = self.lock_served().values().map(|e| e.cookie).collect();
        let mut rescan = false;
        for event in batch {
            if !handled.insert(event.netns_cookie) {
                continue;
            }
            tracing::debug!(
                "pid {} connected from network namespace {:#x} before it was served",
                event.pid(),
                event.netns_cookie
            );
            let path = self.scope.proc.task_netns(event.pid(), event.tid());
            match NetnsFile::open(&path) {
                Ok(ns) => {
                    if !self.learn_cookie(ns.id, event.netns_cookie) && !self.is_known(ns.id) {
                        self.consider(ns, event.pid()).await;
                    }
                }
                // The connecting thread is gone: any namespace still in use is found this way.
                Err(_) => rescan = true,
            }
        }
        if rescan {
            self.scan().await;
        }
    }

    /// On kernels that cannot name a namespace's cookie (before 5.14), the first report from
    /// a namespace served already tells it: marked served from then on. Whether it was one.
    fn learn_cookie(&mut self, id: NetnsId, cookie: u64) -> bool {
        if id == self.home {
            if self.home_cookie == 0 {
                self.home_cookie = cookie;
                match self.watch.serve_recording_pids(cookie) {
                    Ok(()) => tracing::info!(
                        "the daemon's own network namespace has cookie {cookie:#x}: its callers' pids are recorded from now on"
                    ),
                    Err(e) => tracing::warn!("the daemon's own network namespace: {e}"),
                }
            }
            return true;
        }
        let mut served = self.lock_served();
        let Some(entry) = served.get_mut(&id) else {
            return false;
        };
        if entry.cookie == 0 {
            entry.cookie = cookie;
            if let Err(e) = self.watch.serve(cookie) {
                tracing::warn!("network namespace {id}: {e}");
            }
        }
        true
    }

    fn is_known(&self, id: NetnsId) -> bool {
        id == self.home || self.lock_served().contains_key(&id)
    }

    /// Every namespace with a process in it now, with one such process.
    fn namespaces(&self) -> BTreeMap<NetnsId, u32> {
        let mut found = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(&self.scope.proc.0) else {
            return found;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(id) = NetnsId::of(&entry.path().join("ns/net")) {
                found.entry(id).or_insert(pid);
            }
        }
        found
    }

    async fn scan(&mut self) {
        for (id, pid) in self.namespaces() {
            if self.is_known(id) {
                continue;
            }
            if let Ok(ns) = NetnsFile::open(&self.scope.proc.netns(pid))
                && ns.id == id
            {
                self.consider(ns, pid).await;
            }
        }
    }

    /// Plants listeners in `ns` if `pid` (a process found in it) is in an attached cgroup.
    /// When that process has exited already (a short-lived caller), another one in the
    /// namespace decides.
    async fn consider(&mut self, ns: NetnsFile, pid: u32) {
        let id = ns.id;
        let (pid, cgroup) = match self.cgroup_of(pid) {
            Some(cgroup) => (pid, cgroup),
            None => {
                let Some(&other) = self.namespaces().get(&id) else {
                    return; // nobody left in it
                };
                match self.cgroup_of(other) {
                    Some(cgroup) => (other, cgroup),
                    None => return,
                }
            }
        };
        // The readiness self-test's probe dials from a namespace of its own, briefly.
        if !self.is_attached(&cgroup) || crate::selftest::is_probe_cgroup(&cgroup) {
            return;
        }
        if self.lock_served().len() >= self.scope.max {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    "{} network namespaces served already (max_namespaces): not listening in {id} (pid {pid}, cgroup {cgroup}) nor in more until some are gone",
                    self.scope.max
                );
            }
            return;
        }
        self.full = false;
        // The old daemon's listeners on endpoints still ours; the others opened here.
        let mut inherited = self.inherited.remove(&id).unwrap_or_default();
        inherited.retain(|(addr, _)| self.scope.endpoints.contains(addr));
        let endpoints: Vec<SocketAddr> = (self.scope.endpoints.iter())
            .filter(|e| !inherited.iter().any(|(addr, _)| addr == *e))
            .copied()
            .collect();
        let handed = inherited.len();
        let order = self.scope.endpoints.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let mut opened = open_listeners(&ns, &endpoints)?;
            opened.listeners.extend(inherited);
            opened
                .listeners
                .sort_by_key(|(addr, _)| order.iter().position(|e| e == addr));
            Ok::<_, io::Error>(opened)
        })
        .await;
        let opened = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                tracing::warn!("cannot listen in network namespace {id} (pid {pid}): {e}");
                return;
            }
            Err(e) => {
                tracing::error!("listening in network namespace {id}: {e}");
                return;
            }
        };
        let stop = self.shutdown.child_token();
        let caller = Arc::new(Caller::with_rules(
            id.to_string(),
            false,
            cgroup.clone(),
            Arc::clone(&self.scope.rules),
        ));
        let mut listening = Vec::new();
        for (addr, listener) in opened.listeners {
            listening.push(addr.to_string());
            let role = Role::Namespace { netns: id };
            self.sink
                .add(listener, stop.clone(), Arc::clone(&caller), role);
        }
        for (addr, e) in &opened.failed {
            if e.kind() == io::ErrorKind::AddrInUse {
                tracing::warn!(
                    "network namespace {id} (pid {pid}, cgroup {cgroup}): something there already listens on {addr}; its connects redirected to {addr} reach that program, not redirect"
                );
            } else {
                tracing::debug!("network namespace {id}: cannot listen on {addr}: {e}");
            }
        }
        // Marked served even with no listener: a rewrite there is not news any more.
        if opened.cookie != 0
            && let Err(e) = self.watch.serve(opened.cookie)
        {
            tracing::warn!("network namespace {id}: {e}");
        }
        tracing::info!(
            "listening in network namespace {id} (pid {pid}, cgroup {cgroup}{}) on {}{}",
            if caller.docker_id.is_some() {
                ", a Docker container"
            } else {
                ""
            },
            if listening.is_empty() {
                "nothing".to_owned()
            } else {
                listening.join(", ")
            },
            match handed {
                0 => String::new(),
                n => format!(" ({n} handed over by the daemon replaced)"),
            }
        );
        self.lock_served().insert(
            id,
            Entry {
                pid,
                cookie: opened.cookie,
                listening,
                caller,
                stop,
            },
        );
    }

    /// Closes the listeners of namespaces without processes.
    async fn sweep(&mut self) {
        let proc = self.scope.proc.clone();
        let still =
            |id: &NetnsId, pid: u32| NetnsId::of(&proc.netns(pid)).is_ok_and(|now| now == *id);
        let stale: Vec<NetnsId> = self
            .lock_served()
            .iter()
            .filter(|(id, e)| !still(id, e.pid))
            .map(|(id, _)| *id)
            .collect();
        if stale.is_empty() {
            return;
        }
        let living = self.namespaces();
        let mut served = self.lock_served();
        for id in stale {
            if let Some(&pid) = living.get(&id) {
                if let Some(entry) = served.get_mut(&id) {
                    entry.pid = pid;
                }
            } else if let Some(entry) = served.remove(&id) {
                entry.stop.cancel();
                if entry.cookie != 0 {
                    self.watch.unserve(entry.cookie);
                }
                tracing::info!(
                    "network namespace {id} has no processes left: closed its listeners"
                );
            }
        }
    }

    fn cgroup_of(&self, pid: u32) -> Option<String> {
        self.scope.proc.cgroup_of(pid)
    }

    /// Whether `cgroup` is, or is under, an attached cgroup.
    fn is_attached(&self, cgroup: &str) -> bool {
        let full = self.scope.mount.join(cgroup.trim_start_matches('/'));
        self.scope.cgroups.iter().any(|c| full.starts_with(c))
    }

    fn lock_served(&self) -> std::sync::MutexGuard<'_, BTreeMap<NetnsId, Entry>> {
        self.served.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The daemon's own network namespace, as `net:[inode]`.
pub fn own_netns() -> io::Result<String> {
    NetnsId::of(Path::new(paths::OWN_NETNS)).map(|id| id.to_string())
}

/// What [`open_listeners`] opened in a namespace.
struct Opened {
    cookie: u64,
    listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    failed: Vec<(SocketAddr, io::Error)>,
}

/// Enters `ns` on this thread, opens a listener on each endpoint, and comes back. Runs on a
/// blocking-pool thread: no other task may run on a thread while it is in another namespace.
fn open_listeners(ns: &NetnsFile, endpoints: &[SocketAddr]) -> io::Result<Opened> {
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
    let home = File::open(paths::OWN_NETNS)?;
    move_into_link_name_space(ns.file.as_fd(), Some(LinkNameSpaceType::Network))?;
    let back = Back(home);
    let mut opened = Opened {
        cookie: 0,
        listeners: Vec::new(),
        failed: Vec::new(),
    };
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    opened.cookie = netns_cookie(probe.as_fd())?;
    for &addr in endpoints {
        match listen(addr) {
            Ok(listener) => opened.listeners.push((addr, listener)),
            Err(e) => opened.failed.push((addr, e)),
        }
    }
    drop(back);
    Ok(opened)
}

/// Returns the thread to the daemon's namespace, whatever happened in the other one.
struct Back(File);

impl Drop for Back {
    fn drop(&mut self) {
        use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
        if let Err(e) = move_into_link_name_space(self.0.as_fd(), Some(LinkNameSpaceType::Network))
        {
            // A pool thread left in a caller's namespace would open the daemon's next sockets
            // there: stop instead (the panic hook exits the daemon).
            panic!("cannot return to the daemon's network namespace: {e}");
        }
    }
}

/// A listener on a loopback endpoint of the current namespace. IP_FREEBIND: a namespace
/// just made has its loopback down and no 127.0.0.1 yet (the runtime brings it up before
/// the container's first command); the listener is bound already and serves once it is up.
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // A daemon replacing this one (`--replace`) joins the port while this one still serves.
    socket.set_reuse_port(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The cookie of the namespace `socket` belongs to (`SO_NETNS_COOKIE`, Linux 5.14; neither
/// rustix nor socket2 has it), the key the kernel programs see. 0 (no namespace has it) on
/// older kernels, whose programs still report the cookie (`bpf_get_netns_cookie`, 5.7).
fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(0),
            _ => Err(e),
        };
    }
    Ok(cookie)
}
