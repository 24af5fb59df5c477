//! `redirect run`: check, bind, load, attach, serve; on SIGINT/SIGTERM detach, drain, exit.
//!
//! Everything that can fail on bad input (privileges, cgroups, the control socket, the listen
//! addresses) is checked before the kernel is touched, and whatever was set up is undone by
//! drop guards when a later step fails.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    cgroup::{self, Cgroup},
    config::{Backend as BackendSettings, ProxyAddrs, Settings, Target},
    control::ControlSocket,
    ebpf::{Redirector, Route},
    mock::ec2::Ec2Mock,
    privileges,
    proxy::{Backend, ProxyStats, Workers, exempt::ExemptSockets, forward::Forwarder},
    status::{self, Status},
};

/// Backlog of the proxy's listening sockets (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: i32 = 4096;

pub async fn run(settings: Settings) -> Result<()> {
    // Installed first: from the ready line on, SIGINT/SIGTERM must mean a clean stop.
    let mut signals = Signals::install()?;
    privileges::check().map_err(anyhow::Error::msg)?;
    crate::rlimit::raise_nofile();
    let mount = cgroup::cgroup2_mount()?;
    let cgroups = resolve_cgroups(&mount, &settings.cgroups)?;
    let mut control = ControlSocket::bind(&settings.control_socket)?;
    let (listeners, proxy_addrs) = if settings.backend.serves() {
        bind_listeners(&settings.proxy, settings.workers)?
    } else {
        (Vec::new(), settings.proxy)
    };
    let routes = routes(&settings.targets, &proxy_addrs);

    let mut redirector = Redirector::load(settings.ebpf_object.as_deref(), settings.ebpf_log)?;
    redirector.set_routes(&routes)?;
    for cgroup in &cgroups {
        redirector.attach(cgroup)?;
    }
    let exempt = ExemptSockets::new(redirector.take_exempt_maps()?);
    if settings.ebpf_log {
        match redirector.take_logger() {
            Some(logger) => {
                tokio::spawn(forward_ebpf_logs(logger));
            }
            None => tracing::warn!("the eBPF object has no log buffer; --ebpf-log has no effect"),
        }
    }

    let serving = match &settings.backend {
        BackendSettings::MockEc2(ec2) => format!(
            "built-in EC2 mock (IMDSv2 tokens {}) on {}",
            ec2.http_tokens,
            join(proxy_addrs.iter())
        ),
        BackendSettings::Upstream(upstream) => {
            format!("upstream {} on {}", upstream.url, join(proxy_addrs.iter()))
        }
        BackendSettings::External => format!(
            "nothing; redirected connects go to {}, served by another program",
            join(proxy_addrs.iter())
        ),
    };
    let listen: Vec<String> = listeners
        .first()
        .into_iter()
        .flatten()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    let stop_proxy = CancellationToken::new();
    let grace = settings.shutdown_grace;
    let workers = match settings.backend {
        BackendSettings::MockEc2(ec2) => {
            let mock = Arc::new(Ec2Mock::new(*ec2));
            let backend = move |_| Backend::Ec2(Arc::clone(&mock));
            Some(Workers::spawn(listeners, backend, &stop_proxy, grace)?)
        }
        BackendSettings::Upstream(upstream) => {
            let backend = move |_| {
                Backend::Upstream(Forwarder::new(upstream.clone(), Some(Arc::clone(&exempt))))
            };
            Some(Workers::spawn(listeners, backend, &stop_proxy, grace)?)
        }
        BackendSettings::External => None,
    };
    let redirector = Arc::new(Mutex::new(redirector));

    let status_fn = {
        let redirector = Arc::clone(&redirector);
        let stats = workers.as_ref().map(Workers::stats).unwrap_or_default();
        let serving = serving.clone();
        let started = Instant::now();
        Arc::new(move || {
            let redirector = redirector.lock().unwrap_or_else(PoisonError::into_inner);
            build_status(&redirector, &serving, &stats, &listen, started)
        })
    };
    let stop_control = CancellationToken::new();
    let control_path = control.path().to_owned();
    let control_task = tokio::spawn({
        let stop = stop_control.clone();
        async move { control.serve(status_fn, stop).await }
    });

    tracing::info!(
        "redirect ready: serving {serving}; redirecting {} for cgroup {}; control socket {}",
        join(settings.targets.iter()),
        join(cgroups.iter().map(|c| c.path.display())),
        control_path.display(),
    );

    let signal_name = signals.recv().await;
    let detached = redirector
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .detach_all();
    tracing::info!("{signal_name}: detached {detached} program links; finishing open requests");
    tokio::spawn(async move {
        // A second signal skips the drain; the programs are already detached.
        signals.recv().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    stop_proxy.cancel();
    if let Some(workers) = workers {
        workers.join().await;
    }
    stop_control.cancel();
    control_task.await.context("control task")?;
    tracing::info!("stopped");
    Ok(())
}

fn resolve_cgroups(mount: &std::path::Path, given: &[PathBuf]) -> Result<Vec<Cgroup>> {
    let wanted = if given.is_empty() {
        vec![mount.to_path_buf()]
    } else {
        given.to_vec()
    };
    let mut cgroups: Vec<Cgroup> = Vec::new();
    for path in &wanted {
        let cgroup = cgroup::resolve(mount, path)?;
        if !cgroups.iter().any(|c| c.path == cgroup.path) {
            cgroups.push(cgroup);
        }
    }
    Ok(cgroups)
}

/// Binds the proxy's listening sockets, `workers` per address (SO_REUSEPORT), and returns
/// them per worker with the addresses actually bound: port 0 becomes the port the kernel chose,
/// which is what the programs must redirect to and where the other workers bind.
fn bind_listeners(
    listen: &ProxyAddrs,
    workers: usize,
) -> Result<(Vec<Vec<std::net::TcpListener>>, ProxyAddrs)> {
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut bound = ProxyAddrs::default();
    for addr in listen.iter() {
        let first = bind_one(addr).with_context(|| format!("cannot listen on {addr}"))?;
        let actual = first.local_addr()?;
        match actual {
            SocketAddr::V4(a) => bound.v4 = Some(a),
            SocketAddr::V6(a) => bound.v6 = Some(a),
        }
        per_worker[0].push(first);
        for sockets in &mut per_worker[1..] {
            sockets.push(bind_one(actual).with_context(|| format!("cannot listen on {actual}"))?);
        }
    }
    Ok((per_worker, bound))
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// IPv4 targets go to the IPv4 listener; IPv6 targets to the IPv6 listener if there is one,
/// else to the IPv4 listener in its IPv4-mapped form (reachable from dual-stack sockets).
fn routes(targets: &[Target], listen: &ProxyAddrs) -> Vec<Route> {
    targets
        .iter()
        .filter_map(|&Target(dialled)| {
            let proxy = match dialled {
                SocketAddr::V4(_) => listen.v4.map(SocketAddr::V4),
                SocketAddr::V6(_) => listen
                    .v6
                    .map(SocketAddr::V6)
                    .or(listen.v4.map(SocketAddr::V4)),
            }?;
            Some(Route { dialled, proxy })
        })
        .collect()
}

struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the AsyncFd owns the logger, and with it the ring buffer's file descriptor, for
    // as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot poll the eBPF log buffer: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

fn build_status(
    redirector: &Redirector,
    serving: &str,
    stats: &[Arc<ProxyStats>],
    listen: &[String],
    started: Instant,
) -> Status {
    let mut cgroups: Vec<status::AttachedCgroup> = Vec::new();
    for a in redirector.attachments() {
        let path = a.cgroup.display().to_string();
        match cgroups.iter_mut().find(|c| c.path == path) {
            Some(c) => c.programs.push(a.program.to_owned()),
            None => cgroups.push(status::AttachedCgroup {
                path,
                programs: vec![a.program.to_owned()],
            }),
        }
    }
    let redirects = redirector
        .routes()
        .unwrap_or_else(|e| {
            tracing::warn!("reading the target maps: {e:#}");
            Vec::new()
        })
        .into_iter()
        .map(|r| status::Redirect {
            dialled: r.dialled.to_string(),
            to: r.proxy.to_string(),
        })
        .collect();
    let counters: BTreeMap<String, u64> = redirector
        .counters()
        .unwrap_or_else(|e| {
            tracing::warn!("reading the counters: {e:#}");
            Vec::new()
        })
        .into_iter()
        .map(|(name, v)| (name.to_owned(), v))
        .collect();
    let programs = redirector
        .program_stats()
        .into_iter()
        .map(|p| status::ProgramStatus {
            name: p.name.to_owned(),
            id: p.id,
            run_count: p.run_count,
            run_time_ns: p.run_time_ns,
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_secs: started.elapsed().as_secs(),
        serving: serving.to_owned(),
        listen: listen.to_vec(),
        cgroups,
        redirects,
        counters,
        programs,
        proxy: status::ProxyStatus {
            requests: stats
                .iter()
                .map(|s| s.requests.load(Ordering::Relaxed))
                .sum(),
            connections_open: stats
                .iter()
                .map(|s| s.connections_open.load(Ordering::Relaxed))
                .sum(),
            connections_total: stats
                .iter()
                .map(|s| s.connections_total.load(Ordering::Relaxed))
                .sum(),
        },
    }
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddrV4, SocketAddrV6};

    use super::*;

    #[test]
    fn no_cgroup_means_the_whole_hierarchy() {
        let mount = cgroup::cgroup2_mount().unwrap();
        let cgroups = resolve_cgroups(&mount, &[]).unwrap();
        assert_eq!(cgroups.len(), 1);
        assert_eq!(cgroups[0].path, mount);
        let twice = resolve_cgroups(&mount, &[mount.clone(), PathBuf::from("/")]).unwrap();
        assert_eq!(
            twice.len(),
            1,
            "the same cgroup named twice is attached once"
        );
    }

    #[test]
    fn routes_pick_the_listener_of_the_right_family() {
        let targets = crate::config::default_targets();
        let v4: SocketAddrV4 = "127.0.0.1:8169".parse().unwrap();
        let v6: SocketAddrV6 = "[::1]:8169".parse().unwrap();
        let only_v4 = routes(
            &targets,
            &ProxyAddrs {
                v4: Some(v4),
                v6: None,
            },
        );
        assert_eq!(only_v4[0].proxy, SocketAddr::V4(v4));
        assert_eq!(
            only_v4[1].proxy,
            SocketAddr::V4(v4),
            "v6 target via the v4 listener (mapped)"
        );
        let both = routes(
            &targets,
            &ProxyAddrs {
                v4: Some(v4),
                v6: Some(v6),
            },
        );
        assert_eq!(both[1].proxy, SocketAddr::V6(v6));
    }
}
