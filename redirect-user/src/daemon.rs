//! `redirect run`: check, bind, load, attach, serve; on SIGHUP reload the mock's values; on
//! SIGINT/SIGTERM detach, drain, exit.
//!
//! Everything that can fail on bad input (privileges, cgroups, the control socket, the listen
//! addresses) is checked before the kernel is touched, and whatever was set up is undone by
//! drop guards when a later step fails.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use redirect_common::MAX_DEDICATED;
use tokio::signal::unix::{Signal as UnixSignal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    cgroup::{self, Cgroup},
    config::{
        Backend as BackendSettings, DockerApi, ProxyAddrs, Settings, Sources, Target, UpstreamUrl,
    },
    control::{ControlSocket, ReplaceStep},
    ebpf::{Redirector, Route, pins::PinDir},
    handover::Inherited,
    host_callers::{self, HostCallers},
    mock::{CloudKind, Mocks, ec2::events::Event, token::TokenKey},
    netns::{Planter, Procfs, Scope, Served},
    paths,
    policy::SharedRules,
    privileges,
    proxy::{
        Backend, Limits, OwnNames, Proxy, ProxyStats, Timeouts,
        forward::{self, Forwarder},
    },
    router::Router,
    sock_diag::SockDiag,
    status::{self, Status},
};

/// How the host's callers are named: sock_diag for the peer socket, the kernel's record of
/// the process that connected it. Without either, the daemon serves on, with less to say.
fn host_kernel(
    redirector: &mut Redirector,
    settings: &Settings,
    mount: &Path,
) -> host_callers::Kernel {
    let diag = SockDiag::open()
        .inspect_err(|e| {
            tracing::warn!("{e}: the host's callers are not told apart (one caller, \"host\")");
        })
        .ok();
    // The first query makes the kernel load its TCP sock_diag modules (inet_diag, tcp_diag):
    // asked now, so that the first caller does not wait for them (over a second seen in a
    // slow VM, past botocore's 1 s metadata timeout).
    if let Some(diag) = &diag {
        let nowhere = SocketAddr::from(([127, 0, 0, 1], 1));
        let _ = diag.find(nowhere, nowhere);
    }
    let pids = redirector
        .caller_pids()
        .inspect_err(|e| tracing::warn!("{e}: the host's callers are named without their pids"))
        .ok();
    host_callers::Kernel {
        diag,
        pids,
        mount: Some(mount.to_owned()),
        proc: Procfs(settings.host_proc.clone()),
    }
}

/// Backlog of the proxy's listening sockets (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: i32 = 4096;

/// How far a `--replace` got with the daemon it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    None,
    /// The old daemon released its pins: this one may have put its programs in them.
    Prepared,
    /// The old daemon was told to stop.
    Finished,
}

pub async fn run(settings: Settings, sources: Sources) -> Result<()> {
    let control_socket = settings.control_socket.clone();
    let mut handover = Handover::None;
    // Everything of this daemon (its pins' lock, its links) is dropped when `serve` returns.
    let result = serve(settings, sources, &mut handover).await;
    if let (Err(e), Handover::Prepared) = (&result, handover) {
        match crate::control::post_replace(&control_socket, ReplaceStep::Abort).await {
            Ok(said) => tracing::warn!(
                "--replace failed ({e:#}); the running daemon serves on as before: {said}"
            ),
            Err(abort) => tracing::error!(
                "--replace failed ({e:#}), and the running daemon did not take its pins back ({abort}): restart it"
            ),
        }
    }
    result
}

/// Takes the pin lock back (after a failed replace) once the daemon that gave up exits.
fn relock_when_free(redirector: &Mutex<Redirector>) {
    for _ in 0..6000 {
        let mut r = redirector.lock().unwrap_or_else(PoisonError::into_inner);
        match r.relock_pins() {
            Ok(()) => return,
            Err(crate::ebpf::pins::PinError::Busy(_)) => {}
            Err(e) => {
                tracing::error!("taking the pin lock back: {e}");
                return;
            }
        }
        drop(r);
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::error!("the pin lock stayed taken for 10 minutes after a failed --replace");
}

async fn serve(settings: Settings, sources: Sources, handover: &mut Handover) -> Result<()> {
    // Installed first: from the ready line on, no signal may kill the daemon unannounced.
    let mut signals = Signals::install()?;
    let privileges = privileges::check().map_err(anyhow::Error::msg)?;
    crate::rlimit::raise_nofile();
    let mount = cgroup::cgroup2_mount()?;
    let cgroups = resolve_cgroups(&mount, &settings.cgroups)?;
    // `--replace`: the daemon on this control socket lets go of its pins now, and of its
    // ports and control socket once this one serves.
    let replacing = settings.replace && crate::control::answers(&settings.control_socket).await;
    if settings.replace && !replacing {
        tracing::info!(
            "--replace: no daemon answers on {}; starting",
            settings.control_socket.display()
        );
    }
    let mut inherited = None;
    if replacing {
        let prepared = crate::control::prepare_replace(&settings.control_socket)
            .await
            .context("--replace: the running daemon did not let go of its pins")?;
        *handover = Handover::Prepared;
        match prepared.sockets {
            Some(sockets) => {
                let sorted = Inherited::sort(sockets);
                tracing::info!(
                    "--replace: the running daemon released its pins and handed over its listening sockets: {}",
                    sorted.summary()
                );
                inherited = Some(sorted);
            }
            None => tracing::info!(
                "--replace: {}; its ports are joined (SO_REUSEPORT) as it handed over no sockets",
                prepared.said
            ),
        }
        // For what the old daemon listens on without handing it over (namespaces it finds
        // from now on, or all of an earlier version's): connections queued there when it
        // stops move to this daemon's sockets on the same port.
        enable_request_migration();
    }
    // Ports shared with the old daemon rather than taken from it.
    let joins = replacing && inherited.is_none();
    let control = match replacing {
        true => None,
        false => Some(ControlSocket::bind(&settings.control_socket)?),
    };
    // Only a daemon that serves has listeners, and so ports to dedicate.
    let serves = settings.backend.serves();
    let plan = plan_endpoints(&settings.targets, &settings.proxy, serves)?;
    let (listeners, endpoints) = if serves {
        bind_listeners(
            &plan.addrs,
            settings.workers,
            !joins,
            inherited.as_mut(),
            |i| plan.purpose(i),
        )?
    } else {
        (Vec::new(), plan.addrs.clone())
    };
    let routes = plan.routes(&endpoints);
    // The addresses to name in messages: the listen addresses (or --redirect-to) as bound.
    let proxy_addrs = &endpoints[..plan.listen];

    let mut redirector = Redirector::load(settings.ebpf_object.as_deref(), settings.ebpf_log)?;
    redirector.set_routes(&routes)?;
    match PinDir::open(&settings.pin_dir) {
        Ok(pins) => redirector.use_pins(pins),
        Err(e) if settings.fail_open => {
            tracing::warn!("{e}; with --fail-open the programs are not pinned")
        }
        Err(e) => {
            return Err(e).context(
                "pinning the programs, so that callers are refused while no daemon runs (--fail-open runs without)",
            );
        }
    }
    for cgroup in &cgroups {
        crate::selftest::remove_stale(&cgroup.path);
        redirector.attach(cgroup)?;
    }
    adopt_report(&mut redirector, settings.fail_open)?;
    let exemptions = redirector.exemptions()?;
    if settings.ebpf_log {
        match redirector.take_logger() {
            Some(logger) => {
                tokio::spawn(forward_ebpf_logs(logger));
            }
            None => tracing::warn!("the eBPF object has no log buffer; --ebpf-log has no effect"),
        }
    }

    let serving = match &settings.backend {
        BackendSettings::Mock { default, values } => format!(
            "built-in {default} mock{} on {}",
            match default {
                CloudKind::Ec2 => format!(" (IMDSv2 tokens {})", values.ec2.http_tokens),
                _ => String::new(),
            },
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
    let listen: Vec<String> = if serves {
        proxy_addrs.iter().map(|a| a.to_string()).collect()
    } else {
        Vec::new()
    };
    let stop_proxy = CancellationToken::new();
    let mut mock = None;
    // What each proxy worker serves: the mock is shared; each worker keeps its own upstream
    // connections.
    let backend: Option<Box<dyn Fn() -> Backend>> = match &settings.backend {
        BackendSettings::Mock { default, values } => {
            let key_path = settings.state_dir.join(paths::TOKEN_KEY);
            let key = TokenKey::load_or_create(&key_path).with_context(|| {
                format!(
                    "the IMDSv2 token key {} (give another --state-dir?)",
                    key_path.display()
                )
            })?;
            let mocks = Arc::new(Mocks::with_key(*default, values, &key));
            mock = Some(Arc::clone(&mocks));
            Some(Box::new(move || Backend::Mock(Arc::clone(&mocks))))
        }
        BackendSettings::Upstream(upstream) => {
            let router = (upstream.url == UpstreamUrl::CloudStack).then(|| {
                let router = Arc::new(Router::default());
                let (settings, stop) = (upstream.router.clone(), stop_proxy.clone());
                let follower = Arc::clone(&router);
                tokio::spawn(async move { follower.follow(settings, stop).await });
                router
            });
            let upstream = upstream.clone();
            let shared = Arc::new(forward::Shared {
                router,
                ..Default::default()
            });
            Some(Box::new(move || {
                Backend::Upstream(Box::new(Forwarder::new(
                    upstream.clone(),
                    Some(Arc::clone(&exemptions)),
                    Arc::clone(&shared),
                )))
            }))
        }
        BackendSettings::External => None,
    };
    let max_connections = max_connections(&settings);
    let limits = Limits {
        max_connections,
        per_caller: Limits::per_caller_share(max_connections),
        timeouts: Timeouts {
            idle: (!settings.idle_timeout.is_zero()).then_some(settings.idle_timeout),
            request_read: settings.request_read_timeout,
            send: settings.send_timeout,
        },
    };
    let names = own_names(&settings, &endpoints);
    let rules = Arc::new(SharedRules::new(settings.policy.clone()));
    let host = Arc::new(HostCallers::new(
        crate::netns::own_netns().unwrap_or_default(),
        Arc::clone(&rules),
        host_kernel(&mut redirector, &settings, &mount),
    ));
    let proxy = backend
        .map(|backend| {
            Proxy::spawn(
                listeners,
                &host,
                backend,
                names,
                limits,
                &stop_proxy,
                settings.shutdown_grace,
            )
        })
        .transpose()?;
    let listening = proxy
        .as_ref()
        .map_or_else(Default::default, Proxy::listening);
    // Listeners in the callers' namespaces, wherever a route leads to loopback.
    let endpoints = namespace_endpoints(&routes);
    let stop_planter = CancellationToken::new();
    let mut served = None;
    if !privileges.enter_namespaces && !endpoints.is_empty() {
        tracing::warn!(
            "without CAP_SYS_ADMIN the daemon cannot listen inside other network namespaces: callers in containers get \"connection refused\" (add CAP_SYS_ADMIN)"
        );
    }
    if let (Some(proxy), false, true) = (&proxy, endpoints.is_empty(), privileges.enter_namespaces)
    {
        let scope = Scope {
            proc: Procfs(settings.host_proc.clone()),
            endpoints,
            cgroups: cgroups.iter().map(|c| c.path.clone()).collect(),
            mount: mount.clone(),
            rules: Arc::clone(&rules),
            max: settings.max_namespaces,
        };
        let mut planter = Planter::new(
            scope,
            proxy.sink(),
            stop_proxy.clone(),
            redirector.netns_watch()?,
            Arc::clone(&host),
        )
        .context("watching network namespaces")?;
        if let Some(inherited) = &mut inherited {
            planter.inherit(inherited.take_namespaces());
        }
        planter.serve_existing().await;
        served = Some(planter.status());
        let (found, containers) = tokio::sync::mpsc::channel(256);
        if settings.docker != DockerApi::Off {
            tokio::spawn(crate::docker::watch_sandboxes(
                crate::docker::SANDBOXES.into(),
                found.clone(),
                stop_planter.clone(),
            ));
        }
        tokio::spawn(crate::docker::watch(
            settings.docker.clone(),
            found,
            stop_planter.clone(),
        ));
        tokio::spawn(planter.run(containers, stop_planter.clone()));
    }
    let redirector = Arc::new(Mutex::new(redirector));

    let served_now = served.clone();
    let status_fn = {
        let redirector = Arc::clone(&redirector);
        let host = Arc::clone(&host);
        let stats = proxy.as_ref().map(Proxy::stats);
        let serving = serving.clone();
        let started = Instant::now();
        let max_connections = serves.then_some(limits.max_connections);
        let mount = mount.clone();
        Arc::new(move || {
            let redirector = redirector.lock().unwrap_or_else(PoisonError::into_inner);
            let mut status = build_status(
                &redirector,
                &serving,
                stats.as_deref(),
                max_connections,
                &listen,
                started,
                &mount,
            );
            if let Some(served) = &served {
                status.namespaces = served.statuses();
            }
            status.host_requests = host.requests();
            status.host_callers = host.statuses();
            status
        })
    };
    let simulate = simulator(mock.clone());
    let ready = {
        let redirector = Arc::clone(&redirector);
        let serving = serves;
        let self_test = crate::selftest::SelfTest::new(crate::selftest::Probe::choose(&routes));
        let covered: Vec<PathBuf> = cgroups.iter().map(|c| c.path.clone()).collect();
        Box::new(move || -> Result<String, String> {
            let attached = {
                let redirector = redirector.lock().unwrap_or_else(PoisonError::into_inner);
                redirector.verify().map_err(|missing| missing.join("; "))?
            };
            // Links in place is not enough: a connect from each covered cgroup must be
            // rewritten (the probe runs without the redirector's lock).
            let shown = self_test.check(&covered)?;
            Ok(format!(
                "{attached} program links attached{}; {shown}",
                if serving { ", the proxy serving" } else { "" }
            ))
        })
    };
    let status_fn: Arc<dyn Fn() -> Status + Send + Sync> = status_fn;
    let (replaced_tx, mut replaced) = tokio::sync::mpsc::unbounded_channel::<()>();
    let replace = {
        let redirector = Arc::clone(&redirector);
        Box::new(move |step: ReplaceStep| -> Result<String, String> {
            match step {
                ReplaceStep::Prepare => {
                    let mut r = redirector.lock().unwrap_or_else(PoisonError::into_inner);
                    r.release_pins();
                    tracing::info!("--replace: a new daemon takes over; its pins released to it");
                    Ok("pins released".to_owned())
                }
                ReplaceStep::Finish => {
                    let _ = replaced_tx.send(());
                    Ok("stopping: no more accepts; finishing the requests in flight".to_owned())
                }
                ReplaceStep::Abort => {
                    let mut r = redirector.lock().unwrap_or_else(PoisonError::into_inner);
                    let links = r.reclaim_pins().map_err(|e| e.to_string())?;
                    if r.relock_pins().is_err() {
                        // The failed daemon still holds the lock: it lets go when it exits.
                        let redirector = Arc::clone(&redirector);
                        std::thread::spawn(move || relock_when_free(&redirector));
                    }
                    tracing::warn!(
                        "--replace: the new daemon gave up; {links} pinned links have this daemon's programs again, serving on"
                    );
                    Ok(format!("{links} pinned links taken back; serving on"))
                }
            }
        })
    };
    let handlers = Arc::new(crate::control::Handlers {
        metrics: crate::metrics::registry(Arc::clone(&status_fn)),
        status: status_fn,
        simulate,
        ready,
        replace,
        listening: Arc::clone(&listening),
    });
    if let Some(addr) = settings.metrics_listen {
        let handed = inherited.as_mut().and_then(|i| i.take_metrics(addr));
        let listener = (|| match handed {
            Some(listener) => tokio::net::TcpListener::from_std(listener),
            None => {
                // Shared with a daemon being replaced that hands nothing over, as the proxy's
                // ports are, until it stops.
                if !joins {
                    drop(bind_one(addr, false)?); // nobody else holds it
                }
                tokio::net::TcpListener::from_std(bind_one(addr, true)?)
            }
        })()
        .with_context(|| format!("--metrics-listen {addr}: cannot listen there"))?;
        let listener = Arc::new(listener);
        listening.add(crate::handover::Role::Metrics, &listener);
        tracing::info!("metrics, health and readiness on http://{addr}/metrics, /healthz, /readyz");
        tokio::spawn(crate::control::serve_tcp(
            listener,
            Arc::clone(&handlers),
            stop_proxy.clone(),
        ));
    }
    if let Some(inherited) = inherited {
        inherited.close_rest();
    }
    let stop_control = CancellationToken::new();
    let mut control = match control {
        Some(control) => control,
        None => take_over(&settings.control_socket, handover).await?,
    };
    let control_path = control.path().to_owned();
    let control_task = tokio::spawn({
        let stop = stop_control.clone();
        async move { control.serve(handlers, stop).await }
    });

    tracing::info!(
        "redirect ready: serving {serving}; redirecting {} for cgroup {}; control socket {}",
        join(settings.targets.iter()),
        join(cgroups.iter().map(|c| c.path.display())),
        control_path.display(),
    );
    notify_systemd_ready(&stop_control);

    let signal_name = loop {
        let signal = tokio::select! {
            signal = signals.recv() => signal,
            Some(()) = replaced.recv() => {
                // The new daemon binds the control socket once this one is gone from it.
                stop_control.cancel();
                break "replaced by a new daemon";
            }
        };
        match signal {
            Signal::Stop(name) => {
                if std::env::var_os("NOTIFY_SOCKET").is_some() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                }
                break name;
            }
            Signal::Reload => {
                let live = Live {
                    mock: mock.as_deref(),
                    rules: &rules,
                    host: &host,
                    served: served_now.as_ref(),
                };
                reload(&settings, &sources, &live);
            }
            Signal::Ignored(name) => {
                tracing::info!("{name} received; redirect has no use for it and goes on")
            }
        }
    };
    {
        let mut redirector = redirector.lock().unwrap_or_else(PoisonError::into_inner);
        match redirector.pin_dir().map(Path::to_owned) {
            Some(dir) if !settings.fail_open => {
                let left = redirector.leave_pinned();
                tracing::info!(
                    "{signal_name}: left {left} program links pinned in {} (fail closed: covered callers are refused until a daemon adopts them; `redirect detach` removes them); finishing open requests",
                    dir.display()
                );
            }
            _ => {
                let detached = redirector.detach_all();
                tracing::info!(
                    "{signal_name}: detached {detached} program links; finishing open requests"
                );
            }
        }
    }
    tokio::spawn(async move {
        // A second stop signal skips the drain; the programs are already detached.
        while !matches!(signals.recv().await, Signal::Stop(_)) {}
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    stop_planter.cancel();
    stop_proxy.cancel();
    if let Some(proxy) = proxy {
        proxy.join().await;
    }
    stop_control.cancel();
    control_task.await.context("control task")?;
    tracing::info!("stopped");
    Ok(())
}

/// `--replace`, last step: the old daemon stops accepting and leaves the control socket, which
/// this one then binds (retried while the old one still answers on it).
async fn take_over(path: &Path, handover: &mut Handover) -> Result<ControlSocket> {
    crate::control::post_replace(path, ReplaceStep::Finish)
        .await
        .context("--replace: the running daemon did not hand over")?;
    *handover = Handover::Finished;
    // The old daemon leaves it within milliseconds; 5 s is for a loaded machine.
    let mut tries = 200;
    loop {
        match ControlSocket::bind(path) {
            Ok(control) => {
                tracing::info!(
                    "--replace: took over from the daemon that served {}",
                    path.display()
                );
                return Ok(control);
            }
            Err(e) if tries == 0 => {
                return Err(anyhow::Error::new(e)
                    .context("--replace: the old daemon kept its control socket"));
            }
            Err(_) => tries -= 1,
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Connections queued on a listener that closes go to another listener of its SO_REUSEPORT
/// group instead of being reset (`net.ipv4.tcp_migrate_req`, Linux 5.14): what the daemon
/// being replaced had accepted into its queues is served by this one.
fn enable_request_migration() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
        tracing::warn!(
            "--replace: cannot set net.ipv4.tcp_migrate_req ({e}): connections queued on the old daemon's listeners when it stops are reset"
        );
    }
}

/// Says what attaching did with the pins, drops those of cgroups no longer covered and, with
/// `fail_open`, unpins ours.
fn adopt_report(redirector: &mut Redirector, fail_open: bool) -> Result<()> {
    let stale = redirector.drop_stale_pins()?;
    let report = redirector.pin_report();
    if let Some(dir) = redirector.pin_dir().map(Path::to_owned) {
        if report.adopted > 0 {
            tracing::info!(
                "adopted {} program links pinned in {}: their programs replaced in place, never a moment without one",
                report.adopted,
                dir.display()
            );
        }
        if stale > 0 {
            tracing::info!(
                "removed {stale} pinned program links of cgroups no longer covered, from {}",
                dir.display()
            );
        }
    }
    if fail_open {
        let unpinned = redirector.unpin_all();
        if unpinned > 0 {
            tracing::info!(
                "--fail-open: {unpinned} program links unpinned; the redirect goes when this daemon does"
            );
        }
    }
    Ok(())
}

/// Under systemd (`Type=notify`): READY=1 once serving, and the watchdog's keep-alives at
/// half its interval while the daemon runs. Nothing without `NOTIFY_SOCKET`.
fn notify_systemd_ready(stop: &CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell systemd the daemon is ready: {e}");
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        });
    }
}

/// `redirect simulate`'s handler: the EC2 mock's events, when a mock is served.
fn simulator(mock: Option<Arc<Mocks>>) -> Box<crate::control::Simulate> {
    Box::new(move |event: Option<Event>, after: Duration| {
        let Some(mock) = &mock else {
            let why = "this daemon serves no mock (it forwards upstream): events are simulated by `redirect run --mock`";
            return Err(why.to_owned());
        };
        mock.ec2().simulate(event, after);
        let what = match event {
            Some(e) => format!(
                "{} noticed by the EC2 mock in {}",
                e.name(),
                humantime::format_duration(after)
            ),
            None => "every simulated event cleared".to_owned(),
        };
        tracing::info!("simulate: {what}");
        Ok(what)
    })
}

/// What a reload changes while serving.
struct Live<'a> {
    mock: Option<&'a Mocks>,
    rules: &'a SharedRules,
    host: &'a HostCallers,
    served: Option<&'a Served>,
}

/// SIGHUP: reads the config file again and serves the mock's new values and the new policy
/// rules; what else changed is named and left as it is until a restart. A config that does
/// not load changes nothing.
fn reload(running: &Settings, sources: &Sources, live: &Live<'_>) {
    let Some(path) = &sources.file else {
        tracing::info!("SIGHUP: no --config file to reload; nothing changed");
        return;
    };
    let new = match sources.settings() {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("SIGHUP: not reloaded, still serving the settings as they were: {e:#}");
            return;
        }
    };
    for key in running.restart_only_changes(&new) {
        tracing::warn!(
            "SIGHUP: `{key}` changed in {}; it takes effect on restart, kept as it was",
            path.display()
        );
    }
    let policy_changed = live.rules.replace(new.policy.clone());
    if policy_changed {
        live.host.reapply();
        if let Some(served) = live.served {
            served.reapply();
        }
        tracing::info!(
            "SIGHUP: the [[policy]] rules and container_labels from {} apply to every caller now",
            path.display()
        );
    }
    match (live.mock, &new.backend) {
        (Some(mock), BackendSettings::Mock { values, .. }) => {
            let changed = mock.reload(values);
            if changed.is_empty() {
                tracing::info!(
                    "SIGHUP: the mocks' values in {} are unchanged",
                    path.display()
                );
            }
            for cloud in changed {
                tracing::info!(
                    "SIGHUP: serving the new [{cloud}] values from {}",
                    path.display()
                );
            }
        }
        _ if !policy_changed => tracing::info!(
            "SIGHUP: {} reloaded; nothing to change live",
            path.display()
        ),
        _ => {}
    }
}

/// The connection limit: the configured one, or what the descriptor limit leaves once the
/// descriptors open now and a reserve are set aside (half of it with an upstream: each client
/// connection may hold an upstream connection).
fn max_connections(settings: &Settings) -> usize {
    /// Descriptors kept for everything else: control connections, the config file, the
    /// pool's idle upstream connections.
    const RESERVE: usize = 96;
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count());
    let allowed = crate::rlimit::nofile().saturating_sub(open + RESERVE);
    let derived = match settings.backend {
        BackendSettings::Upstream(_) => allowed / 2,
        _ => allowed,
    }
    .max(1);
    match settings.max_connections {
        Some(n) if n > derived => {
            tracing::warn!(
                "max_connections {n} is more than the descriptor limit leaves room for ({derived}); \
                 new connections may wait for descriptors (raise RLIMIT_NOFILE)"
            );
            n
        }
        Some(n) => n,
        None => derived,
    }
}

/// The loopback endpoints the routes lead to, once each: where a caller in another network
/// namespace is sent within its own namespace. An IPv4-mapped endpoint is its IPv4 address.
fn namespace_endpoints(routes: &[Route]) -> Vec<SocketAddr> {
    let mut endpoints: Vec<SocketAddr> = Vec::new();
    for route in routes {
        let mut addr = route.proxy;
        if let SocketAddr::V6(v6) = addr
            && let Some(v4) = v6.ip().to_ipv4_mapped()
        {
            addr = SocketAddr::from((v4, v6.port()));
        }
        if addr.ip().is_loopback() && !endpoints.contains(&addr) {
            endpoints.push(addr);
        }
    }
    endpoints
}

/// The host names absolute-form request targets may carry: the targets, the listen
/// addresses, the upstream, and the names metadata services go by.
fn own_names(settings: &Settings, endpoints: &[SocketAddr]) -> OwnNames {
    let mut names: Vec<String> = settings
        .targets
        .iter()
        .map(|t| t.0.ip().to_string())
        .chain(endpoints.iter().map(|a| a.ip().to_string()))
        .chain(["metadata.google.internal", "metadata"].map(String::from))
        .collect();
    if let BackendSettings::Upstream(upstream) = &settings.backend {
        match upstream.url.authority() {
            Some(authority) => names.push(authority.host().to_owned()),
            None => names.push(crate::router::DATA_SERVER.to_owned()),
        }
    }
    OwnNames::new(names)
}

fn resolve_cgroups(mount: &Path, given: &[PathBuf]) -> Result<Vec<Cgroup>> {
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

/// Binds the proxy's listening sockets, `workers` per address, and returns them per worker
/// with the addresses actually bound, in the order of `addrs`: port 0 becomes the port the
/// kernel chose, which is where the programs must redirect to and where the other workers
/// bind. `purpose(i)` is added to the error for `addrs[i]`.
///
/// The workers' sockets share each port with SO_REUSEPORT, so that the kernel spreads new
/// connections over them. That alone would let a second daemon (or anything of the same
/// user) join the port silently, with the kernel splitting callers between the two: each
/// address is first bound without SO_REUSEPORT, which fails with "Address already in use"
/// while any other socket holds the port.
///
/// `--replace`: the sockets the daemon being replaced handed over (`inherited`) serve their
/// endpoints again, each worker's with a worker. With `exclusive` false, that daemon handed
/// nothing over, holds the ports, and this one joins them (both set SO_REUSEPORT) until it
/// goes.
fn bind_listeners(
    addrs: &[SocketAddr],
    workers: usize,
    exclusive: bool,
    mut inherited: Option<&mut Inherited>,
    purpose: impl Fn(usize) -> String,
) -> Result<(Vec<Vec<std::net::TcpListener>>, Vec<SocketAddr>)> {
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    let mut activated = activated_listeners();
    for (i, &addr) in addrs.iter().enumerate() {
        // Socket activation: systemd bound this address already (the first worker serves it).
        if let Some(at) = activated
            .iter()
            .position(|(local, _)| *local == addr || (addr.port() == 0 && local.ip() == addr.ip()))
        {
            let (local, listener) = activated.remove(at);
            listener.set_nonblocking(true)?;
            bound.push(local);
            per_worker[0].push(listener);
            continue;
        }
        let failed = |addr| format!("cannot listen on {addr}{}", purpose(i));
        if let Some((actual, handed)) = inherited.as_deref_mut().and_then(|h| h.take_proxy(addr)) {
            // A worker more than the old daemon had gets a socket of its own in the port's
            // group; a worker fewer leaves a worker two.
            let count = handed.len();
            for (k, listener) in handed.into_iter().enumerate() {
                per_worker[k % workers].push(listener);
            }
            for sockets in per_worker.iter_mut().skip(count) {
                sockets.push(bind_one(actual, true).with_context(|| failed(actual))?);
            }
            bound.push(actual);
            continue;
        }
        let actual = if exclusive {
            let probe = bind_one(addr, false).with_context(|| failed(addr))?;
            let actual = probe.local_addr()?;
            drop(probe);
            actual
        } else {
            addr
        };
        bound.push(actual);
        for sockets in &mut per_worker {
            sockets.push(bind_one(actual, true).with_context(|| failed(actual))?);
        }
    }
    for (addr, _) in activated {
        tracing::warn!(
            "socket activation: {addr} is none of this daemon's endpoints (the listen address and the next port per target); closed"
        );
    }
    Ok((per_worker, bound))
}

/// The listening TCP sockets systemd passed (`LISTEN_FDS`, socket activation), with their
/// addresses. Anything else passed is said and closed.
fn activated_listeners() -> Vec<(SocketAddr, std::net::TcpListener)> {
    use std::os::fd::FromRawFd as _;
    let Ok(fds) = sd_notify::listen_fds() else {
        return Vec::new();
    };
    let mut listeners = Vec::new();
    for fd in fds {
        // SAFETY: systemd hands these descriptors to this process, which owns them from here.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        let stream = socket2::SockRef::from(&listener)
            .r#type()
            .is_ok_and(|t| t == socket2::Type::STREAM);
        match listener.local_addr() {
            Ok(addr) if stream => listeners.push((addr, listener)),
            _ => tracing::warn!("socket activation: descriptor {fd} is not a TCP listener; closed"),
        }
    }
    if !listeners.is_empty() {
        let addrs: Vec<String> = listeners.iter().map(|(a, _)| a.to_string()).collect();
        tracing::info!(
            "socket activation: listening sockets from systemd on {}",
            addrs.join(", ")
        );
    }
    listeners
}

fn bind_one(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Binding while connections of an earlier run are in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(shared)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if shared {
        socket.listen(LISTEN_BACKLOG)?;
    }
    Ok(socket.into())
}

/// The proxy's endpoints before binding, and which one each target is sent to.
#[derive(Debug, PartialEq)]
struct EndpointPlan {
    /// The listen (or --redirect-to) addresses first, then the dedicated ports.
    addrs: Vec<SocketAddr>,
    /// How many of `addrs` are listen addresses.
    listen: usize,
    /// (dialled, index into `addrs`, dedicated).
    targets: Vec<(SocketAddr, usize, bool)>,
}

impl EndpointPlan {
    /// What `addrs[index]` is for, for error messages: nothing for a listen address.
    fn purpose(&self, index: usize) -> String {
        match self.targets.iter().find(|t| t.1 == index && t.2) {
            Some((dialled, ..)) => format!(
                " (the port of target {dialled}: each target takes a port after the listen port)"
            ),
            None => String::new(),
        }
    }

    /// The routes, given `addrs` as bound (a port 0 replaced by the kernel's choice).
    fn routes(&self, bound: &[SocketAddr]) -> Vec<Route> {
        self.targets
            .iter()
            .map(|&(dialled, index, dedicated)| Route {
                dialled,
                proxy: bound[index],
                dedicated,
            })
            .collect()
    }
}

/// Where each target is sent. IPv4 targets go to the IPv4 address; IPv6 targets to the IPv6
/// address if there is one, else to the IPv4 one in its IPv4-mapped form (reachable from
/// dual-stack sockets).
///
/// With `dedicate` (the daemon serves, so it can open ports), each target of a listen address
/// that serves at most [`MAX_DEDICATED`] targets gets a port of its own on that address: the
/// ports after the listen port, in target order (or ports the kernel picks, when the listen
/// port is 0). Nothing but the rewrite sends connects there, so getpeername can be restored
/// from the address alone, which saves connect4 a per-socket record (see [`Route::dedicated`]).
/// The listen address itself stays for requests made to it directly. Beyond that many targets,
/// they share the listen address.
fn plan_endpoints(targets: &[Target], listen: &ProxyAddrs, dedicate: bool) -> Result<EndpointPlan> {
    let mut addrs: Vec<SocketAddr> = listen.iter().collect();
    let index_of = |addr: Option<SocketAddr>| addr.and_then(|a| addrs.iter().position(|&x| x == a));
    let v4 = index_of(listen.v4.map(SocketAddr::V4));
    let v6 = index_of(listen.v6.map(SocketAddr::V6));
    let mut planned: Vec<(SocketAddr, usize, bool)> = targets
        .iter()
        .filter_map(|&Target(dialled)| {
            let index = match dialled {
                SocketAddr::V4(_) => v4,
                SocketAddr::V6(_) => v6.or(v4),
            }?;
            Some((dialled, index, false))
        })
        .collect();
    if dedicate {
        for index in 0..addrs.len() {
            let listener = addrs[index];
            let count = planned.iter().filter(|t| t.1 == index).count();
            if count > MAX_DEDICATED as usize {
                continue;
            }
            let mut next = 0u32;
            for target in planned.iter_mut().filter(|t| t.1 == index) {
                next += 1;
                let port = if listener.port() == 0 {
                    0
                } else {
                    u16::try_from(u32::from(listener.port()) + next).map_err(|_| {
                        anyhow::anyhow!(
                            "listen address {listener}: no port left after it for target {} (each target gets the next port)",
                            target.0
                        )
                    })?
                };
                let mut own = listener;
                own.set_port(port);
                addrs.push(own);
                *target = (target.0, addrs.len() - 1, true);
            }
        }
    }
    Ok(EndpointPlan {
        listen: listen.iter().count(),
        addrs,
        targets: planned,
    })
}

/// The signals the daemon handles: every one it may be sent in operation, so that none
/// kills it unannounced.
struct Signals {
    interrupt: UnixSignal,
    terminate: UnixSignal,
    hangup: UnixSignal,
    user1: UnixSignal,
    user2: UnixSignal,
}

enum Signal {
    Stop(&'static str),
    Reload,
    Ignored(&'static str),
}

impl Signals {
    fn install() -> Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Signals {
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
            user1: install(SignalKind::user_defined1(), "SIGUSR1")?,
            user2: install(SignalKind::user_defined2(), "SIGUSR2")?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Stop("SIGINT"),
            _ = self.terminate.recv() => Signal::Stop("SIGTERM"),
            _ = self.hangup.recv() => Signal::Reload,
            _ = self.user1.recv() => Signal::Ignored("SIGUSR1"),
            _ = self.user2.recv() => Signal::Ignored("SIGUSR2"),
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
    stats: Option<&ProxyStats>,
    max_connections: Option<usize>,
    listen: &[String],
    started: Instant,
    mount: &Path,
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
            dedicated: r.dedicated,
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
        namespaces: Vec::new(),
        host_requests: 0,
        host_callers: Vec::new(),
        escapes: redirector
            .escapes()
            .unwrap_or_default()
            .into_iter()
            .map(|(cgroup_id, dropped)| status::Escape {
                cgroup_id,
                cgroup: host_callers::find_cgroup(mount, cgroup_id),
                dropped,
            })
            .collect(),
        proxy: {
            let count = |pick: fn(&ProxyStats) -> &AtomicU64| {
                stats.map_or(0, |s| pick(s).load(Ordering::Relaxed))
            };
            status::ProxyStatus {
                requests: count(|s| &s.requests),
                refused: count(|s| &s.refused),
                connections_open: count(|s| &s.connections_open),
                connections_total: count(|s| &s.connections_total),
                connections_evicted: count(|s| &s.evicted),
                max_connections: max_connections.unwrap_or(0) as u64,
            }
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

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The routes as planned, without binding.
    fn planned(targets: &[Target], listen: &ProxyAddrs, dedicate: bool) -> Vec<Route> {
        let plan = plan_endpoints(targets, listen, dedicate).unwrap();
        plan.routes(&plan.addrs)
    }

    #[test]
    fn routes_pick_the_listener_of_the_right_family() {
        let targets = crate::config::default_targets();
        let v4: SocketAddrV4 = "127.0.0.1:8169".parse().unwrap();
        let v6: SocketAddrV6 = "[::1]:8169".parse().unwrap();
        let only_v4 = ProxyAddrs {
            v4: Some(v4),
            v6: None,
        };
        let shared = planned(&targets, &only_v4, false);
        assert_eq!(shared[0].proxy, SocketAddr::V4(v4));
        assert_eq!(
            shared[1].proxy,
            SocketAddr::V4(v4),
            "v6 target via the v4 listener (mapped)"
        );
        assert!(shared.iter().all(|r| !r.dedicated));
        let both = ProxyAddrs {
            v4: Some(v4),
            v6: Some(v6),
        };
        assert_eq!(planned(&targets, &both, false)[1].proxy, SocketAddr::V6(v6));
    }

    #[test]
    fn a_serving_daemon_gives_each_target_the_next_port() {
        let targets = crate::config::default_targets();
        let only_v4 = ProxyAddrs {
            v4: Some("127.0.0.1:8169".parse().unwrap()),
            v6: None,
        };
        let plan = plan_endpoints(&targets, &only_v4, true).unwrap();
        assert_eq!(plan.listen, 1);
        assert_eq!(
            plan.addrs,
            [
                addr("127.0.0.1:8169"),
                addr("127.0.0.1:8170"),
                addr("127.0.0.1:8171")
            ]
        );
        let routes = plan.routes(&plan.addrs);
        assert_eq!(
            routes,
            [
                Route {
                    dialled: addr("169.254.169.254:80"),
                    proxy: addr("127.0.0.1:8170"),
                    dedicated: true
                },
                Route {
                    dialled: addr("[fd00:ec2::254]:80"),
                    proxy: addr("127.0.0.1:8171"),
                    dedicated: true
                },
            ]
        );
        // Bound ports replace the planned ones by position (port 0: the kernel's choice).
        let any = ProxyAddrs {
            v4: Some("127.0.0.1:0".parse().unwrap()),
            v6: Some("[::1]:0".parse().unwrap()),
        };
        let plan = plan_endpoints(&targets, &any, true).unwrap();
        assert_eq!(plan.addrs.len(), 4);
        assert!(plan.addrs.iter().all(|a| a.port() == 0));
        let bound = [
            addr("127.0.0.1:1000"),
            addr("[::1]:1001"),
            addr("127.0.0.1:1002"),
            addr("[::1]:1003"),
        ];
        let routes = plan.routes(&bound);
        assert_eq!(
            (routes[0].proxy, routes[1].proxy),
            (bound[2], bound[3]),
            "each target on its own family's address, not on the listen ports"
        );
    }

    #[test]
    fn many_targets_share_the_listen_port() {
        let many: Vec<Target> = (0..=MAX_DEDICATED)
            .map(|i| Target(SocketAddr::from(([10, 0, 0, i as u8], 80))))
            .chain(crate::config::default_targets().into_iter().skip(1))
            .collect();
        let listen = ProxyAddrs {
            v4: Some("127.0.0.1:8169".parse().unwrap()),
            v6: Some("[::1]:8169".parse().unwrap()),
        };
        let routes = planned(&many, &listen, true);
        let (v4, v6): (Vec<&Route>, Vec<&Route>) = routes.iter().partition(|r| r.dialled.is_ipv4());
        assert!(
            v4.iter()
                .all(|r| !r.dedicated && r.proxy == addr("127.0.0.1:8169")),
            "{v4:?}"
        );
        assert_eq!(
            v6,
            [&Route {
                dialled: addr("[fd00:ec2::254]:80"),
                proxy: addr("[::1]:8170"),
                dedicated: true
            }],
            "the other listener still dedicates"
        );
    }

    /// `--replace`: the sockets handed over serve their endpoints (each worker's with a
    /// worker; a worker more joins the port), a port 0 endpoint takes the old daemon's port,
    /// and an endpoint not handed over is bound exclusively.
    #[test]
    fn handed_over_sockets_serve_their_endpoints() {
        use std::os::fd::OwnedFd;

        use crate::handover::Role;
        let old = bind_one(addr("127.0.0.1:0"), true).unwrap();
        let at = old.local_addr().unwrap();
        let mut inherited = Inherited::sort(vec![(Role::Proxy, OwnedFd::from(old))]);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let (per_worker, bound) = bind_listeners(
            &[addr("127.0.0.1:0"), addr("127.0.0.1:0")],
            2,
            true,
            Some(&mut inherited),
            |_| String::new(),
        )
        .unwrap();
        assert_eq!(bound[0], at, "the old daemon's port");
        assert_ne!(bound[1], at);
        assert_eq!(per_worker.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
        for sockets in &per_worker {
            assert_eq!(sockets[0].local_addr().unwrap(), at);
        }
        // Not handed over, and held by another socket: refused, not joined.
        let e =
            bind_listeners(&[busy], 1, true, Some(&mut inherited), |_| String::new()).unwrap_err();
        assert!(
            e.to_string().contains(&format!("cannot listen on {busy}")),
            "{e:#}"
        );
    }

    #[test]
    fn dedicated_ports_stop_at_65535() {
        let listen = ProxyAddrs {
            v4: Some("127.0.0.1:65535".parse().unwrap()),
            v6: None,
        };
        let e = plan_endpoints(&crate::config::default_targets(), &listen, true).unwrap_err();
        assert!(
            e.to_string()
                .contains("no port left after it for target 169.254.169.254:80"),
            "{e}"
        );
    }
}
