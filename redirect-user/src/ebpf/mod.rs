//! Loading the kernel programs, filling their maps, attaching them to cgroups and reading
//! their counters.
//!
//! What happens on each kernel:
//! - Attaching uses a BPF link (`BPF_LINK_CREATE`, kernels >= 5.7), pinned in bpffs (`pins`):
//!   the redirect outlives the daemon, however it exits (even SIGKILL), and callers are
//!   refused until a daemon adopts the links (fail closed). With `--fail-open` the pins are
//!   removed once attached: the links then live as long as this process's descriptors, and the
//!   kernel detaches the programs when it exits.
//! - On older kernels aya falls back to `BPF_PROG_ATTACH`; those attachments are detached
//!   explicitly by [`Redirector::detach_all`] and when the [`Redirector`] is dropped.
//! - Links coexist with other programs on the same cgroup. Programs of a child cgroup run before
//!   those of its ancestors; each run only rewrites a destination that is still a target, so
//!   attaching to both a cgroup and its ancestor is harmless.
//! - Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, so the limit is raised first.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError,
        links::FdLink,
    },
};
use redirect_common::{
    Counter, PlaceError, SockAddr4, SockAddr6, TARGET_SLOTS, TableKey, TargetSlot, names,
};

use crate::cgroup::Cgroup;

pub mod exempt;
pub mod netns;
pub mod pids;
pub mod pins;

pub use exempt::Exemptions;
pub use netns::{NetnsEvents, NetnsWatch};
pub use pids::CallerPids;

/// The object built by `cargo xtask build-ebpf`, embedded at compile time (see build.rs).
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("REDIRECT_EBPF_OBJECT"));

/// The socket-address programs.
pub const PROGRAMS: [&str; 4] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
];

/// Every program attached to each cgroup, in the order they are attached: the socket-address
/// hooks, then the escape guard (`cgroup_skb/egress`).
pub const ATTACHED: [&str; 5] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
    names::PROG_GUARD,
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("`{0}` in the eBPF object is not of the program type expected")]
    WrongProgramType(&'static str, #[source] ProgramError),
    #[error("the kernel rejected eBPF program `{program}` ({io_error}); verifier log:\n{log}")]
    Rejected {
        program: &'static str,
        io_error: io::Error,
        log: String,
    },
    #[error("cannot load eBPF program `{program}`")]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach `{program}` to cgroup {}", cgroup.display())]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin or adopt the link of `{program}` at {}", path.display())]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    PinDir(#[from] pins::PinError),
    #[error("eBPF map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("cannot map `{name}` into memory")]
    Mmap {
        name: &'static str,
        source: io::Error,
    },
    #[error("target {dialled}: {reason}")]
    Target {
        dialled: SocketAddr,
        reason: &'static str,
    },
    #[error("proxy endpoint {proxy} is dedicated to one target but {dialled} is sent there too")]
    SharedDedicated {
        proxy: SocketAddr,
        dialled: SocketAddr,
    },
}

/// One program attached to one cgroup.
#[derive(Debug)]
pub struct Attachment {
    pub cgroup: PathBuf,
    pub program: &'static str,
    link: Held,
}

/// How an attachment is held.
#[derive(Debug)]
enum Held {
    /// By our link alone (no pin directory): the kernel detaches it when it closes.
    Fd(FdLink),
    /// Pinned at `path` (while it is there, the link outlives us), and by our descriptor;
    /// `created`: by us (a `Redirector` dropped without [`Redirector::leave_pinned`], as
    /// when `redirect run` fails, removes those), else adopted.
    Pinned {
        path: PathBuf,
        created: bool,
        _fd: OwnedFd,
    },
}

/// What attaching did with the pins.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PinReport {
    /// Links found pinned whose programs were replaced by ours.
    pub adopted: usize,
    /// Links attached and pinned anew.
    pub pinned: usize,
}

/// Where redirected connects to one target go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dialled: SocketAddr,
    pub proxy: SocketAddr,
    /// `proxy` is this route's own endpoint: no other route goes there and nothing dials it
    /// directly (the daemon's listener gives each target a port of its own). getpeername then
    /// restores `dialled` from the peer address alone, and connect4 records nothing per
    /// socket. Otherwise each rewritten socket is recorded under its cookie.
    pub dedicated: bool,
}

/// Kernel-side run statistics of one program (`kernel.bpf_stats_enabled=1` fills them).
#[derive(Debug, Clone)]
pub struct ProgramStats {
    pub name: &'static str,
    pub id: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The loaded programs and their maps. Dropping it detaches what it attached, pinned or not,
/// unless [`Redirector::leave_pinned`] or [`Redirector::detach_all`] said otherwise.
pub struct Redirector {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
    /// Where links are pinned; `None`: not pinned (kernels or hosts without bpffs).
    pins: Option<pins::PinDir>,
    report: PinReport,
    /// The target-table slots [`Redirector::set_routes`] filled, IPv4 then IPv6, so that
    /// [`Redirector::routes`] reads back only those.
    filled: (Vec<u32>, Vec<u32>),
}

impl Drop for Redirector {
    fn drop(&mut self) {
        self.remove_created_pins();
    }
}

impl Redirector {
    /// Loads the embedded object, or `object` when given (development builds), and every
    /// program in it. `ebpf_log` turns on the programs' debug logs (aya-log); otherwise the log
    /// statements are compiled out by the verifier.
    pub fn load(object: Option<&Path>, ebpf_log: bool) -> Result<Self, EbpfError> {
        crate::rlimit::raise_memlock();
        let level = if ebpf_log {
            aya_log::Level::Trace as u8
        } else {
            0u8
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, false);
        let mut ebpf = match object {
            Some(path) => loader.load_file(path),
            None => loader.load(EMBEDDED_OBJECT),
        }
        .map_err(EbpfError::Object)?;
        for name in PROGRAMS {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(load_error(name))?;
        }
        guard_mut(&mut ebpf)?
            .load()
            .map_err(load_error(names::PROG_GUARD))?;
        Ok(Redirector {
            ebpf,
            attached: Vec::new(),
            pins: None,
            report: PinReport::default(),
            filled: (Vec::new(), Vec::new()),
        })
    }

    /// Starts forwarding the programs' aya-log records to the `log` crate. Only meaningful
    /// when loaded with `ebpf_log`.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Fills the target tables: connects to `route.dialled` are sent to `route.proxy`. Called
    /// once, before the programs are attached (lookups in the kernel rely on the tables not
    /// changing under them, see [`TargetSlot`]).
    ///
    /// An IPv6 target may route to an IPv6 proxy address or to an IPv4-mapped one; IPv4
    /// targets route to IPv4 addresses (connect4 cannot change the address family). A
    /// dedicated route's proxy must not appear in any other route.
    pub fn set_routes(&mut self, routes: &[Route]) -> Result<(), EbpfError> {
        let mut v4 = Table::new();
        let mut v6 = Table::new();
        let mut peers = Peers::default();
        for route in routes {
            let record = u32::from(!route.dedicated);
            let placed = match (route.dialled, route.proxy) {
                (SocketAddr::V4(dialled), SocketAddr::V4(proxy)) => {
                    let (dialled, proxy) = (SockAddr4::from(dialled), SockAddr4::from(proxy));
                    add_peer(&mut peers.v4, proxy, dialled, route)?;
                    // Dual-stack sockets dial it as ::ffff:a.b.c.d and reach the proxy's
                    // mapped form (connect6 uses this table for them).
                    add_peer(
                        &mut peers.v6,
                        SockAddr6::v4_mapped(proxy),
                        SockAddr6::v4_mapped(dialled),
                        route,
                    )?;
                    v4.place(TargetSlot {
                        dialled,
                        proxy,
                        record,
                    })
                }
                (SocketAddr::V6(dialled), proxy) => {
                    let proxy = match proxy {
                        SocketAddr::V6(p) => SockAddr6::from(p),
                        SocketAddr::V4(p) => SockAddr6::v4_mapped(SockAddr4::from(p)),
                    };
                    let dialled = SockAddr6::from(dialled);
                    add_peer(&mut peers.v6, proxy, dialled, route)?;
                    v6.place(TargetSlot {
                        dialled,
                        proxy,
                        record,
                    })
                }
                (SocketAddr::V4(_), SocketAddr::V6(_)) => {
                    unreachable!("config validation pairs IPv4 targets with an IPv4 listener")
                }
            };
            placed.map_err(|e| EbpfError::Target {
                dialled: route.dialled,
                reason: match e {
                    PlaceError::PortZero => "port 0 is never dialled",
                    PlaceError::Full => "the target table has no free slot near its home slot",
                },
            })?;
            let mut ports: Array<_, u8> = map_mut(&mut self.ebpf, names::TARGET_PORTS)?;
            ports
                .set(u32::from(route.dialled.port()), 1, 0)
                .map_err(map_err(names::TARGET_PORTS))?;
        }
        self.filled = (
            v4.write(map_mut(&mut self.ebpf, names::TARGETS4)?, names::TARGETS4)?,
            v6.write(map_mut(&mut self.ebpf, names::TARGETS6)?, names::TARGETS6)?,
        );
        let mut map: HashMap<_, SockAddr4, SockAddr4> = map_mut(&mut self.ebpf, names::PROXIES4)?;
        for (proxy, peer) in peers.v4 {
            map.insert(proxy, peer.report(), 0)
                .map_err(map_err(names::PROXIES4))?;
        }
        let mut map: HashMap<_, SockAddr6, SockAddr6> = map_mut(&mut self.ebpf, names::PROXIES6)?;
        for (proxy, peer) in peers.v6 {
            map.insert(proxy, peer.report(), 0)
                .map_err(map_err(names::PROXIES6))?;
        }
        // The escape guard keeps every other packet away from the targets' addresses.
        for route in routes {
            match route.dialled {
                SocketAddr::V4(dialled) => {
                    let mut map: HashMap<_, u32, u8> =
                        map_mut(&mut self.ebpf, names::GUARD_ADDRS4)?;
                    map.insert(SockAddr4::from(dialled).addr, 1, 0)
                        .map_err(map_err(names::GUARD_ADDRS4))?;
                }
                SocketAddr::V6(dialled) => {
                    let mut map: HashMap<_, [u32; 4], u8> =
                        map_mut(&mut self.ebpf, names::GUARD_ADDRS6)?;
                    map.insert(SockAddr6::from(dialled).addr, 1, 0)
                        .map_err(map_err(names::GUARD_ADDRS6))?;
                }
            }
        }
        Ok(())
    }

    /// Packets the escape guard dropped, by the cgroup id of their socket.
    pub fn escapes(&self) -> Result<Vec<(u64, u64)>, EbpfError> {
        let map: HashMap<_, u64, u64> = map_ref(&self.ebpf, names::ESCAPES)?;
        let mut escapes: Vec<(u64, u64)> = map.iter().filter_map(Result::ok).collect();
        escapes.sort_unstable();
        Ok(escapes)
    }

    /// The routes as the kernel sees them, read back from the target tables.
    pub fn routes(&self) -> Result<Vec<Route>, EbpfError> {
        let mut routes = Vec::new();
        let v4: Array<_, TargetSlot<SockAddr4>> = map_ref(&self.ebpf, names::TARGETS4)?;
        for &index in &self.filled.0 {
            let slot = v4.get(&index, 0).map_err(map_err(names::TARGETS4))?;
            routes.push(Route {
                dialled: SocketAddrV4::from(slot.dialled).into(),
                proxy: SocketAddrV4::from(slot.proxy).into(),
                dedicated: slot.record == 0,
            });
        }
        let v6: Array<_, TargetSlot<SockAddr6>> = map_ref(&self.ebpf, names::TARGETS6)?;
        for &index in &self.filled.1 {
            let slot = v6.get(&index, 0).map_err(map_err(names::TARGETS6))?;
            routes.push(Route {
                dialled: SocketAddrV6::from(slot.dialled).into(),
                proxy: SocketAddrV6::from(slot.proxy).into(),
                dedicated: slot.record == 0,
            });
        }
        routes.sort_by_key(|r| (r.dialled.is_ipv6(), r.dialled));
        Ok(routes)
    }

    /// Pins the links attached from now on in `pins`, and adopts those pinned there already.
    pub fn use_pins(&mut self, pins: pins::PinDir) {
        self.pins = Some(pins);
    }

    /// Hands the pin directory's lock on (`redirect run --replace`): the new daemon adopts
    /// the pins while this one still serves.
    pub fn release_pins(&mut self) -> bool {
        match &mut self.pins {
            Some(pins) => {
                pins.unlock();
                true
            }
            None => false,
        }
    }

    /// Puts this daemon's own programs (its maps, its exemptions) back in every pinned link,
    /// after [`Redirector::release_pins`], when the daemon that was to replace this one gave
    /// up after adopting some. How many links were updated; [`Redirector::relock_pins`] takes
    /// the lock back once the other daemon has let go of it.
    pub fn reclaim_pins(&mut self) -> Result<usize, EbpfError> {
        let pinned: Vec<(&'static str, PathBuf)> = self
            .attached
            .iter()
            .filter_map(|a| match &a.link {
                Held::Pinned { path, .. } => Some((a.program, path.clone())),
                Held::Fd(_) => None,
            })
            .collect();
        for (program, path) in &pinned {
            pins::update_pinned(path, self.program_fd(program)?).map_err(|source| {
                EbpfError::Pin {
                    program,
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(pinned.len())
    }

    /// Takes the pin directory's lock again; [`pins::PinError::Busy`] while another daemon
    /// still holds it.
    pub fn relock_pins(&mut self) -> Result<(), pins::PinError> {
        match &mut self.pins {
            Some(pins) => pins.relock(),
            None => Ok(()),
        }
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.path())
    }

    pub fn pin_report(&self) -> PinReport {
        self.report
    }

    /// Attaches every program to `cgroup`: with a pin directory, a link pinned there for this
    /// cgroup and program gets our program in its place (`BPF_LINK_UPDATE`: the cgroup is never
    /// without one), and a new link is pinned. On error, what was attached stays attached until
    /// the `Redirector` is dropped.
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<(), EbpfError> {
        let inode = match &self.pins {
            Some(_) => Some(
                pins::cgroup_inode(&cgroup.dir).map_err(|source| EbpfError::Pin {
                    program: ATTACHED[0],
                    path: cgroup.path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        for name in ATTACHED {
            let link = match (&self.pins, inode) {
                (Some(pins), Some(inode)) => {
                    let path = pins.path_of(inode, name);
                    let pin_err = |source| EbpfError::Pin {
                        program: name,
                        path: path.clone(),
                        source,
                    };
                    let created = !path.exists();
                    if created {
                        self.new_link(name, cgroup)?
                            .pin(&path)
                            .map_err(|e| pin_err(io::Error::other(e)))?;
                        self.report.pinned += 1;
                    } else {
                        pins::update_pinned(&path, self.program_fd(name)?).map_err(pin_err)?;
                        self.report.adopted += 1;
                    }
                    let fd = pins::obj_get(&path).map_err(pin_err)?;
                    Held::Pinned {
                        path,
                        created,
                        _fd: fd,
                    }
                }
                _ => Held::Fd(self.new_link(name, cgroup)?),
            };
            self.attached.push(Attachment {
                cgroup: cgroup.path.clone(),
                program: name,
                link,
            });
        }
        Ok(())
    }

    /// `name` attached to `cgroup` by a new link.
    fn new_link(&mut self, name: &'static str, cgroup: &Cgroup) -> Result<FdLink, EbpfError> {
        let attach_err = |source| EbpfError::Attach {
            program: name,
            cgroup: cgroup.path.clone(),
            source,
        };
        let link = if name == names::PROG_GUARD {
            let guard = guard_mut(&mut self.ebpf)?;
            let id = guard
                .attach(
                    &cgroup.dir,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(attach_err)?;
            FdLink::try_from(guard.take_link(id).map_err(attach_err)?)
        } else {
            let program = program_mut(&mut self.ebpf, name)?;
            let id = program
                .attach(&cgroup.dir, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            FdLink::try_from(program.take_link(id).map_err(attach_err)?)
        };
        // A kernel without BPF links (before 5.7) attached with BPF_PROG_ATTACH instead.
        link.map_err(|e| {
            attach_err(ProgramError::IOError(io::Error::other(format!(
                "{e}: this kernel has no BPF links (5.7 or later needed)"
            ))))
        })
    }

    fn program_fd(&mut self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, EbpfError> {
        let load_err = |source| EbpfError::Load {
            program: name,
            source,
        };
        Ok(if name == names::PROG_GUARD {
            guard_mut(&mut self.ebpf)?.fd().map_err(load_err)?.as_fd()
        } else {
            program_mut(&mut self.ebpf, name)?
                .fd()
                .map_err(load_err)?
                .as_fd()
        })
    }

    /// Removes the pins of cgroups no longer covered (their links go with them); how many.
    pub fn drop_stale_pins(&mut self) -> Result<usize, EbpfError> {
        let Some(pins) = &self.pins else {
            return Ok(0);
        };
        let ours: Vec<&Path> = self
            .attached
            .iter()
            .filter_map(|a| match &a.link {
                Held::Pinned { path, .. } => Some(path.as_path()),
                Held::Fd(_) => None,
            })
            .collect();
        let mut removed = 0;
        for pin in pins.pins()? {
            if !ours.contains(&pin.path.as_path()) {
                std::fs::remove_file(&pin.path).map_err(|source| EbpfError::Pin {
                    program: pin.program,
                    path: pin.path.clone(),
                    source,
                })?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes our pins (fail open): the links then live as long as this process holds them.
    pub fn unpin_all(&mut self) -> usize {
        let mut unpinned = 0;
        for a in &self.attached {
            if let Held::Pinned { path, .. } = &a.link
                && std::fs::remove_file(path).is_ok()
            {
                unpinned += 1;
            }
        }
        unpinned
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attached
    }

    /// Whether every attachment is still in place: its cgroup there (the kernel detaches the
    /// links of a cgroup removed) and its pin, if pinned. What is missing, otherwise.
    pub fn verify(&self) -> Result<usize, Vec<String>> {
        let mut missing = Vec::new();
        for a in &self.attached {
            if !a.cgroup.is_dir() {
                missing.push(format!(
                    "{} on {}: the cgroup is gone",
                    a.program,
                    a.cgroup.display()
                ));
            } else if let Held::Pinned { path, .. } = &a.link
                && !path.exists()
            {
                missing.push(format!(
                    "{} on {}: its pin {} was removed",
                    a.program,
                    a.cgroup.display(),
                    path.display()
                ));
            }
        }
        match (missing.is_empty(), self.attached.is_empty()) {
            (true, false) => Ok(self.attached.len()),
            (true, true) => Err(vec!["nothing attached".to_owned()]),
            (false, _) => Err(missing),
        }
    }

    /// Detaches every program from every cgroup: pins removed, links closed. Returns how many
    /// links were detached.
    pub fn detach_all(&mut self) -> usize {
        let mut detached = 0;
        for Attachment {
            cgroup,
            program,
            link,
        } in std::mem::take(&mut self.attached)
        {
            let result = match link {
                // Closing the link detaches it.
                Held::Fd(link) => {
                    drop(link);
                    Ok(())
                }
                // The link goes with its last reference: the pin and our descriptor.
                Held::Pinned { path, .. } => match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(source) => Err(EbpfError::Pin {
                        program,
                        path,
                        source,
                    }),
                },
            };
            match result {
                Ok(()) => detached += 1,
                // The link's fd is still closed when the Redirector drops.
                Err(e) => tracing::warn!("detaching {program} from {}: {e}", cgroup.display()),
            }
        }
        detached
    }

    /// Lets go of every attachment and leaves the pinned ones in place (fail closed): how
    /// many stay pinned.
    pub fn leave_pinned(&mut self) -> usize {
        let attached = std::mem::take(&mut self.attached);
        attached
            .iter()
            .filter(|a| matches!(a.link, Held::Pinned { .. }))
            .count()
    }

    /// Removes the pins this `Redirector` made (a start that failed leaves nothing behind;
    /// adopted pins stay, still refusing their callers).
    fn remove_created_pins(&mut self) {
        for a in &self.attached {
            if let Held::Pinned {
                path,
                created: true,
                ..
            } = &a.link
            {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Takes the exemption maps out, as the handle the upstream connector exempts its sockets
    /// with (see [`exempt`]).
    pub fn exemptions(&mut self) -> Result<Arc<Exemptions>, EbpfError> {
        let mut take = |name| self.ebpf.take_map(name).ok_or(EbpfError::MissingMap(name));
        let sockets = take(names::EXEMPT_SOCKETS)?;
        let active = take(names::EXEMPT_ACTIVE)?;
        Ok(Exemptions::new(
            HashMap::try_from(sockets).map_err(map_err(names::EXEMPT_SOCKETS))?,
            Array::try_from(active).map_err(map_err(names::EXEMPT_ACTIVE))?,
        ))
    }

    /// Every counter by name, summed over CPUs, and the connects seen by each program
    /// (`connect4_seen`, `connect6_seen`: passed plus rewritten).
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, EbpfError> {
        let array: PerCpuArray<_, u64> = map_ref(&self.ebpf, names::COUNTERS)?;
        let mut counters = Counter::ALL
            .iter()
            .map(|&c| {
                let values = array
                    .get(&(c as u32), 0)
                    .map_err(map_err(names::COUNTERS))?;
                Ok((c.name(), values.iter().sum()))
            })
            .collect::<Result<Vec<_>, EbpfError>>()?;
        let value = |c: Counter| counters[c as usize].1;
        let seen4 = value(Counter::Connect4Passed) + value(Counter::Connect4Rewritten);
        let seen6 = value(Counter::Connect6Passed) + value(Counter::Connect6Rewritten);
        counters.extend([("connect4_seen", seen4), ("connect6_seen", seen6)]);
        Ok(counters)
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        ATTACHED
            .iter()
            .filter_map(|&name| {
                let program = self.ebpf.program(name)?;
                let info = match <&CgroupSockAddr>::try_from(program) {
                    Ok(p) => p.info().ok()?,
                    Err(_) => <&CgroupSkb>::try_from(program).ok()?.info().ok()?,
                };
                Some(ProgramStats {
                    name,
                    id: info.id(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }
}

/// A target table built in memory, then written to its map slot by slot.
struct Table<A> {
    slots: Vec<TargetSlot<A>>,
}

impl<A: TableKey + Default + aya::Pod> Table<A>
where
    TargetSlot<A>: aya::Pod,
{
    fn new() -> Self {
        Table {
            slots: vec![TargetSlot::default(); TARGET_SLOTS as usize],
        }
    }

    fn place(&mut self, entry: TargetSlot<A>) -> Result<u32, PlaceError> {
        TargetSlot::place(&mut self.slots, entry)
    }

    /// Writes the filled slots (the map starts zeroed, i.e. all unused) and returns their
    /// indices.
    fn write(
        self,
        mut map: Array<&mut MapData, TargetSlot<A>>,
        name: &'static str,
    ) -> Result<Vec<u32>, EbpfError> {
        let mut filled = Vec::new();
        for (index, slot) in (0..).zip(&self.slots) {
            if !slot.dialled.is_unused() {
                map.set(index, *slot, 0).map_err(map_err(name))?;
                filled.push(index);
            }
        }
        Ok(filled)
    }
}

/// The proxy endpoints as each socket family sees them, and what getpeername reports for a
/// socket connected to each (`PROXIES4`, `PROXIES6`).
#[derive(Default)]
struct Peers {
    v4: std::collections::HashMap<SockAddr4, Peer<SockAddr4>>,
    v6: std::collections::HashMap<SockAddr6, Peer<SockAddr6>>,
}

#[derive(Clone, Copy)]
enum Peer<A> {
    /// Only `A` is rewritten to this endpoint: report it.
    Dedicated(A),
    /// Look the socket up in `ORIGINAL_DEST`.
    Shared,
}

impl<A: Default> Peer<A> {
    /// The map value: the dialled address, or port 0 (all zeros) for a shared endpoint.
    fn report(self) -> A {
        match self {
            Peer::Dedicated(dialled) => dialled,
            Peer::Shared => A::default(),
        }
    }
}

fn add_peer<A: std::hash::Hash + Eq + Copy>(
    peers: &mut std::collections::HashMap<A, Peer<A>>,
    proxy: A,
    dialled: A,
    route: &Route,
) -> Result<(), EbpfError> {
    let this = if route.dedicated {
        Peer::Dedicated(dialled)
    } else {
        Peer::Shared
    };
    // Shared endpoints may be shared by any number of routes; a dedicated one by none.
    match (peers.insert(proxy, this), route.dedicated) {
        (None, _) | (Some(Peer::Shared), false) => Ok(()),
        _ => Err(EbpfError::SharedDedicated {
            proxy: route.proxy,
            dialled: route.dialled,
        }),
    }
}

/// A program the kernel would not load: the verifier's log when it rejected it.
fn load_error(program: &'static str) -> impl Fn(ProgramError) -> EbpfError {
    move |source| match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => EbpfError::Rejected {
            program,
            io_error,
            log: verifier_log.to_string(),
        },
        source => EbpfError::Load { program, source },
    }
}

fn guard_mut(ebpf: &mut Ebpf) -> Result<&mut CgroupSkb, EbpfError> {
    let name = names::PROG_GUARD;
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|e| EbpfError::WrongProgramType(name, e))
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|e| EbpfError::WrongProgramType(name, e))
}

fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = MapError>>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<T, EbpfError> {
    T::try_from(ebpf.map_mut(name).ok_or(EbpfError::MissingMap(name))?).map_err(map_err(name))
}

fn map_ref<'a, T: TryFrom<&'a aya::maps::Map, Error = MapError>>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<T, EbpfError> {
    T::try_from(ebpf.map(name).ok_or(EbpfError::MissingMap(name))?).map_err(map_err(name))
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dialled: &str, proxy: &str, dedicated: bool) -> Route {
        Route {
            dialled: dialled.parse().unwrap(),
            proxy: proxy.parse().unwrap(),
            dedicated,
        }
    }

    fn add(peers: &mut Peers, r: &Route) -> Result<(), EbpfError> {
        let (SocketAddr::V4(d), SocketAddr::V4(p)) = (r.dialled, r.proxy) else {
            unreachable!("IPv4 routes in these tests")
        };
        add_peer(&mut peers.v4, SockAddr4::from(p), SockAddr4::from(d), r)
    }

    #[test]
    fn a_dedicated_endpoint_reports_its_target_and_a_shared_one_defers() {
        let mut peers = Peers::default();
        let own = route("169.254.169.254:80", "127.0.0.1:8170", true);
        let shared = [
            route("169.254.170.2:80", "127.0.0.1:9000", false),
            route("100.100.100.200:80", "127.0.0.1:9000", false),
        ];
        for r in [&own, &shared[0], &shared[1]] {
            add(&mut peers, r).unwrap();
        }
        let report = |proxy: &str| {
            let p: SocketAddrV4 = proxy.parse().unwrap();
            peers.v4[&SockAddr4::from(p)].report()
        };
        assert_eq!(
            report("127.0.0.1:8170"),
            SockAddr4::from("169.254.169.254:80".parse::<SocketAddrV4>().unwrap())
        );
        assert_eq!(
            report("127.0.0.1:9000").port,
            0,
            "port 0: look the socket up"
        );
    }

    #[test]
    fn a_dedicated_endpoint_takes_no_second_route() {
        for (first, second) in [(true, false), (false, true), (true, true)] {
            let mut peers = Peers::default();
            add(
                &mut peers,
                &route("169.254.169.254:80", "127.0.0.1:8170", first),
            )
            .unwrap();
            let e = add(
                &mut peers,
                &route("169.254.170.2:80", "127.0.0.1:8170", second),
            )
            .unwrap_err();
            assert!(
                e.to_string()
                    .contains("127.0.0.1:8170 is dedicated to one target"),
                "{e}"
            );
        }
    }
}
