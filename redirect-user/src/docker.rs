//! Docker's view of its containers, through the Engine API (bollard): the namespace of each
//! container as it starts, so that the daemon listens there before the container's first
//! command connects, and who the container is (name, image, labels, compose and Swarm names)
//! for the request log and `redirect status`.
//!
//! A container's namespace is found earliest in Docker's sandbox directory: the engine's
//! prestart hook bind-mounts it there before the container's first command runs. The start
//! event comes after that command has started, too late for an entrypoint that fetches a
//! credential first; it brings the names.
//!
//! Docker is optional: without its socket the namespaces are still found (the scan, the
//! kernel's reports), only later and without names.

use std::{
    collections::BTreeMap,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use bollard::{
    Docker,
    query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder},
};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::DockerApi;

/// How long to wait before trying Docker's socket again (absent, or the engine restarting).
const RETRY: Duration = Duration::from_secs(2);

/// Whether the daemon has followed Docker's events: then containers' requests wait for
/// Docker's description of them (see `Caller::policy`). It stays set while the engine
/// restarts: a container's labels may deny it, so its requests are refused, not served
/// without them, until the daemon is back on the event stream and has described it.
static FOLLOWING: AtomicBool = AtomicBool::new(false);

pub fn following() -> bool {
    FOLLOWING.load(Ordering::Relaxed)
}

#[cfg(test)]
pub fn set_following(following: bool) {
    FOLLOWING.store(following, Ordering::Relaxed);
}

/// Who a container is, as Docker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Container {
    /// A label's value (`com.docker.compose.service`, `redirect.deny`, ...).
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// How the request log names it: compose's project/service, Swarm's task, or the name.
    pub fn display_name(&self) -> String {
        if let (Some(project), Some(service)) = (
            self.label("com.docker.compose.project"),
            self.label("com.docker.compose.service"),
        ) {
            return format!("{project}/{service} ({})", self.name);
        }
        if let Some(task) = self.label("com.docker.swarm.task.name") {
            return task.to_owned();
        }
        self.name.clone()
    }
}

/// A running container's main process, for the planter.
#[derive(Debug, Clone)]
pub struct Started {
    pub pid: u32,
    pub container: Container,
}

/// What Docker tells the planter.
#[derive(Debug)]
pub enum Found {
    /// A container's network namespace, as the engine mounted it (no process named yet);
    /// `None` when the mount cannot be seen from here (the daemon in a container, without
    /// mount propagation): the namespace exists by now and a scan finds it. With when the
    /// engine made it.
    Sandbox(Option<File>, std::time::Instant),
    Started(Started),
}

/// Where Docker (with its default `--exec-root`) mounts each container's namespace.
pub const SANDBOXES: &str = "/var/run/docker/netns";

/// Sends each namespace Docker mounts in `dir`, as soon as it is mounted, until `stop`.
/// Without the directory (no Docker, or not started yet) it looks again every few seconds.
pub async fn watch_sandboxes(dir: PathBuf, found: mpsc::Sender<Found>, stop: CancellationToken) {
    loop {
        if let Err(e) = follow_sandboxes(&dir, &found, &stop).await {
            tracing::debug!("watching {}: {e}", dir.display());
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn follow_sandboxes(
    dir: &Path,
    found: &mpsc::Sender<Found>,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    use inotify::{Inotify, WatchMask};
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::CREATE | WatchMask::DELETE_SELF | WatchMask::MOVE_SELF,
    )?;
    let mut events = inotify.into_event_stream([0u8; 4096])?;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            event = events.next() => match event {
                Some(event) => event?,
                None => return Ok(()),
            },
        };
        let Some(name) = event.name else {
            return Ok(()); // the directory itself went away (the engine restarted)
        };
        let seen = std::time::Instant::now();
        let file = mounted_namespace(&dir.join(name)).await;
        let _ = found.send(Found::Sandbox(file, seen)).await;
    }
}

/// The engine creates the file, then bind-mounts the namespace on it: waits (briefly) for
/// the mount.
async fn mounted_namespace(path: &Path) -> Option<File> {
    let nsfs = std::fs::metadata(crate::paths::OWN_NETNS).ok()?.dev();
    for _ in 0..20 {
        if let Ok(file) = File::open(path)
            && file.metadata().is_ok_and(|m| m.dev() == nsfs)
        {
            return Some(file);
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    None
}

/// Sends every running container, then each one that starts, until `stop`. Reconnects when
/// the engine goes away; says once, not at every retry, that Docker cannot be reached.
pub async fn watch(api: DockerApi, started: mpsc::Sender<Found>, stop: CancellationToken) {
    if api == DockerApi::Off {
        return;
    }
    let mut warned = false;
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = follow(&api, &started, &mut warned) => result,
        };
        match result {
            Ok(()) => tracing::info!("Docker's event stream ended; reconnecting"),
            Err(e) if warned => tracing::debug!("Docker: {e}"),
            Err(e) if following() => {
                warned = true;
                tracing::warn!(
                    "Docker: {e}; reconnecting every {RETRY:?} (the engine restarting?): containers already described are served as before, new ones' requests are refused until Docker describes them"
                );
            }
            Err(e) => {
                warned = true;
                tracing::warn!(
                    "Docker: {e}; serving goes on, containers are found at their first connect and without their names (to fix: make /var/run/docker.sock readable to redirect, or set DOCKER_HOST)"
                );
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One connection to the engine: subscribes to start events first, then lists what runs
/// already, so that no container falls between the two.
/// `warned` is cleared once connected: the next failure is said again.
async fn follow(
    api: &DockerApi,
    started: &mpsc::Sender<Found>,
    warned: &mut bool,
) -> Result<(), bollard::errors::Error> {
    let docker = match api {
        DockerApi::Socket(path) => {
            Docker::connect_with_unix(&path.to_string_lossy(), 120, bollard::API_DEFAULT_VERSION)?
        }
        _ => Docker::connect_with_local_defaults()?,
    };
    // Engine 20.10 speaks API 1.41 and refuses newer clients: agree on a version first.
    let docker = docker.negotiate_version().await?;
    let filters =
        std::collections::HashMap::from([("type", vec!["container"]), ("event", vec!["start"])]);
    let mut events = docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
    let running = docker
        .list_containers(Some(ListContainersOptionsBuilder::new().build()))
        .await?;
    FOLLOWING.store(true, Ordering::Relaxed);
    *warned = false;
    tracing::info!(
        "Docker: following container starts ({} running)",
        running.len()
    );
    for summary in running {
        if let Some(id) = summary.id {
            send(&docker, &id, started).await;
        }
    }
    while let Some(event) = events.next().await {
        if let Some(id) = event?.actor.and_then(|a| a.id) {
            send(&docker, &id, started).await;
        }
    }
    Ok(())
}

async fn send(docker: &Docker, id: &str, started: &mpsc::Sender<Found>) {
    match inspect(docker, id).await {
        Ok(Some(s)) => {
            let _ = started.send(Found::Started(s)).await;
        }
        Ok(None) => {} // stopped again already
        Err(e) => tracing::debug!("Docker: inspecting {id}: {e}"),
    }
}

async fn inspect(docker: &Docker, id: &str) -> Result<Option<Started>, bollard::errors::Error> {
    let c = docker.inspect_container(id, None).await?;
    let Some(pid) = c
        .state
        .and_then(|s| s.pid)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0)
    else {
        return Ok(None);
    };
    let config = c.config.unwrap_or_default();
    Ok(Some(Started {
        pid,
        container: Container {
            id: c.id.unwrap_or_else(|| id.to_owned()),
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            image: config.image.unwrap_or_default(),
            labels: config.labels.unwrap_or_default().into_iter().collect(),
        },
    }))
}
