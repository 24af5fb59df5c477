//! The readiness self-test: a connect made from inside each covered cgroup, which proves that
//! the programs fire there, not merely that their links exist (a link can be detached behind
//! the daemon's back, `bpftool link detach`, and still be held and pinned). gke-metadata-server
//! checks its own program the same way.
//!
//! The probe is this binary again (run with [`PROBE_ENV`] set), in a child cgroup of the
//! covered one and in a network namespace of its own that has nothing but loopback, so that no
//! packet can leave whatever happens. There it listens on the proxy's loopback endpoint and
//! dials a metadata target: rewritten, the connect reaches that listener; left alone, it finds
//! no route (ENETUNREACH). The daemon's namespace planter leaves such probes alone.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::ebpf::Route;

/// Set for the probe process: `CGROUP_PROCS TARGET PROXY`, what it joins, dials and listens on.
pub const PROBE_ENV: &str = "REDIRECT_SELFTEST_PROBE";

/// The probe cgroups' names start with this, followed by the daemon's pid.
pub const PROBE_CGROUP_PREFIX: &str = "redirect-probe-";
/// How long a result stands: a readiness poll every second costs one probe per cgroup per
/// this, whoever polls.
const FRESH_FOR: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The probe's exit statuses.
const REWRITTEN: u8 = 0;
const NOT_REWRITTEN: u8 = 3;
/// It could not join the cgroup, make its namespace or listen there.
const CANNOT_SET_UP: u8 = 4;
/// The connect failed otherwise.
const DIAL_FAILED: u8 = 5;

/// Whether `cgroup` (a path below the cgroup mount) is a self-test probe's.
pub fn is_probe_cgroup(cgroup: &str) -> bool {
    cgroup
        .rsplit('/')
        .next()
        .is_some_and(|leaf| leaf.starts_with(PROBE_CGROUP_PREFIX))
}

/// What the self-test dials and where the rewrite must lead it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub target: SocketAddr,
    pub proxy: SocketAddr,
}

impl Probe {
    /// The first route to a loopback endpoint: one the probe can listen on in its own
    /// namespace. `None` when every route leads elsewhere (the self-test cannot tell a rewrite
    /// from a miss there).
    pub fn choose(routes: &[Route]) -> Option<Probe> {
        routes
            .iter()
            .find(|r| r.proxy.ip().is_loopback())
            .map(|r| Probe {
                target: r.dialled,
                proxy: r.proxy,
            })
    }
}

/// Why a cgroup failed the self-test.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error(
        "a connect to {target} from {cgroup} was not redirected: the programs are attached but do not fire (a link detached behind the daemon's back?); restart the daemon"
    )]
    NotRewritten { target: SocketAddr, cgroup: String },
    #[error("the self-test's connect from {cgroup} failed: {reason}")]
    Failed { cgroup: String, reason: String },
    /// The probe could not be set up here (a read-only cgroup mount, a seccomp profile without
    /// unshare): readiness rests on the links alone.
    #[error("no self-test in {cgroup}: {reason}")]
    Unavailable { cgroup: String, reason: String },
}

/// Runs probes, one at a time, and keeps the last verdict for [`FRESH_FOR`].
pub struct SelfTest {
    probe: Option<Probe>,
    last: Mutex<Option<Verdict>>,
}

/// When, of which cgroups, and what was found.
struct Verdict {
    at: Instant,
    cgroups: Vec<PathBuf>,
    found: Result<String, String>,
}

impl SelfTest {
    pub fn new(probe: Option<Probe>) -> Self {
        SelfTest {
            probe,
            last: Mutex::new(None),
        }
    }

    /// Probes each of `cgroups` (or returns the verdict of a probe of the same cgroups less
    /// than [`FRESH_FOR`] ago). `Ok` says what was shown.
    pub fn check(&self, cgroups: &[PathBuf]) -> Result<String, String> {
        let Some(probe) = self.probe else {
            return Ok("no self-test: no route leads to a loopback endpoint".to_owned());
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = last.as_ref()
            && last.at.elapsed() < FRESH_FOR
            && last.cgroups == cgroups
        {
            return last.found.clone();
        }
        let mut unavailable = None;
        let mut verdict = Ok(());
        for cgroup in cgroups {
            match probe_cgroup(cgroup, probe) {
                Ok(()) => {}
                Err(e @ SelfTestError::Unavailable { .. }) => {
                    unavailable.get_or_insert(e.to_string());
                }
                Err(e) => {
                    verdict = Err(e.to_string());
                    break;
                }
            }
        }
        let verdict = verdict.map(|()| match unavailable {
            None => format!(
                "a connect to {} from each of {} cgroup(s) was redirected",
                probe.target,
                cgroups.len()
            ),
            Some(why) => {
                format!("{why} (mount /sys/fs/cgroup read-write for it); links verified only")
            }
        });
        *last = Some(Verdict {
            at: Instant::now(),
            cgroups: cgroups.to_vec(),
            found: verdict.clone(),
        });
        verdict
    }
}

/// Removes probe cgroups a killed daemon left below `cgroup` (empty ones only: rmdir refuses
/// the others).
pub fn remove_stale(cgroup: &Path) {
    let Ok(dir) = std::fs::read_dir(cgroup) else {
        return;
    };
    for entry in dir.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(PROBE_CGROUP_PREFIX)
        {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

fn probe_cgroup(cgroup: &Path, probe: Probe) -> Result<(), SelfTestError> {
    let name = cgroup.display().to_string();
    let unavailable = |reason: String| SelfTestError::Unavailable {
        cgroup: name.clone(),
        reason,
    };
    let child = cgroup.join(format!("{PROBE_CGROUP_PREFIX}{}", std::process::id()));
    match std::fs::create_dir(&child) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(unavailable(format!("cannot make {}: {e}", child.display())));
        }
    }
    // /proc/self/exe: still this program after a package upgrade replaced the file.
    let mut what = std::ffi::OsString::from(child.join("cgroup.procs"));
    what.push(format!(" {} {}", probe.target, probe.proxy));
    let out = Command::new("/proc/self/exe")
        .env(PROBE_ENV, what)
        .stdin(Stdio::null())
        .output();
    // The probe has exited and been reaped, so its cgroup is empty.
    let _ = std::fs::remove_dir(&child);
    let out = out.map_err(|e| unavailable(format!("cannot run the probe: {e}")))?;
    let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    match out.status.code().map(u8::try_from) {
        Some(Ok(REWRITTEN)) => Ok(()),
        Some(Ok(NOT_REWRITTEN)) => Err(SelfTestError::NotRewritten {
            target: probe.target,
            cgroup: name,
        }),
        Some(Ok(CANNOT_SET_UP)) => Err(unavailable(said)),
        _ => Err(SelfTestError::Failed {
            cgroup: name,
            reason: format!("the probe exited {}: {said}", out.status),
        }),
    }
}

/// The probe process itself, given [`PROBE_ENV`]'s value.
pub fn run_probe(what: &std::ffi::OsStr) -> ExitCode {
    let what = what.to_string_lossy();
    let Some((cgroup_procs, target, proxy)) = parse_probe(&what) else {
        eprintln!("{PROBE_ENV}={what:?}: want CGROUP_PROCS TARGET PROXY");
        return ExitCode::from(CANNOT_SET_UP);
    };
    let cgroup_procs = Path::new(cgroup_procs);
    let listener = match set_up(cgroup_procs, proxy) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(CANNOT_SET_UP);
        }
    };
    match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        // Connected: to our own listener, the only one in this namespace.
        Ok(_stream) => {
            let accepted = listener
                .set_nonblocking(true)
                .and_then(|()| listener.accept());
            match accepted {
                Ok(_) => ExitCode::from(REWRITTEN),
                Err(e) => {
                    eprintln!("connected to {target}, but not to the listener on {proxy}: {e}");
                    ExitCode::from(DIAL_FAILED)
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => ExitCode::from(NOT_REWRITTEN),
        Err(e) => {
            eprintln!("dialling {target}: {e}");
            ExitCode::from(DIAL_FAILED)
        }
    }
}

/// `CGROUP_PROCS TARGET PROXY`, split from the right: a cgroup path may hold spaces.
fn parse_probe(what: &str) -> Option<(&str, SocketAddr, SocketAddr)> {
    let mut parts = what.rsplitn(3, ' ');
    let proxy = parts.next()?.parse().ok()?;
    let target = parts.next()?.parse().ok()?;
    Some((parts.next().filter(|p| !p.is_empty())?, target, proxy))
}

/// Joins the probe cgroup, enters a network namespace of its own and listens on `proxy` there.
fn set_up(cgroup_procs: &Path, proxy: SocketAddr) -> io::Result<TcpListener> {
    fn context(what: &'static str) -> impl Fn(io::Error) -> io::Error {
        move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
    }
    // Into the cgroup first: a socket belongs to the cgroup of the process that made it.
    std::fs::write(cgroup_procs, "0").map_err(context("joining the probe cgroup"))?;
    // SAFETY: NEWNET only: no descriptor table is unshared, and this process has one thread.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(|e| context("a network namespace of its own")(e.into()))?;
    loopback_up().map_err(context("bringing loopback up"))?;
    TcpListener::bind(proxy).map_err(context("listening on the endpoint"))
}

/// `ip link set lo up`. Done with the SIOCSIFFLAGS ioctl: two calls, where a netlink crate
/// would bring a whole client.
fn loopback_up() -> io::Result<()> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the socket is open and `request` lives across both calls.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_cgroups_are_known_by_their_leaf() {
        assert!(is_probe_cgroup("/docker/redirect-probe-42"));
        assert!(is_probe_cgroup("redirect-probe-1"));
        assert!(!is_probe_cgroup("/redirect-probe-1/app"));
        assert!(!is_probe_cgroup("/system.slice/redirect.service"));
    }

    #[test]
    fn the_probe_is_told_what_to_do_in_one_variable() {
        assert_eq!(
            parse_probe(
                "/sys/fs/cgroup/a b/redirect-probe-1/cgroup.procs 169.254.169.254:80 127.0.0.1:8169"
            ),
            Some((
                "/sys/fs/cgroup/a b/redirect-probe-1/cgroup.procs",
                "169.254.169.254:80".parse().unwrap(),
                "127.0.0.1:8169".parse().unwrap()
            ))
        );
        assert_eq!(parse_probe("169.254.169.254:80 127.0.0.1:8169"), None);
        assert_eq!(parse_probe("/x 169.254.169.254 127.0.0.1:8169"), None);
        assert_eq!(parse_probe(""), None);
    }

    #[test]
    fn the_probe_takes_a_route_to_loopback() {
        let route = |dialled: &str, proxy: &str| Route {
            dialled: dialled.parse().unwrap(),
            proxy: proxy.parse().unwrap(),
            dedicated: true,
        };
        let routes = [
            route("169.254.169.254:80", "10.0.0.1:80"),
            route("169.254.169.254:8080", "127.0.0.1:9000"),
        ];
        assert_eq!(
            Probe::choose(&routes),
            Some(Probe {
                target: "169.254.169.254:8080".parse().unwrap(),
                proxy: "127.0.0.1:9000".parse().unwrap(),
            })
        );
        assert_eq!(Probe::choose(&routes[..1]), None);
    }
}
