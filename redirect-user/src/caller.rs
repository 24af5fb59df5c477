//! Who is on the other end of a connection, as the kernel attests it.
//!
//! A connection is accepted on a listener of the network namespace it was made in (see
//! `crate::netns`); only the daemon listens there on the proxy's endpoints, so the listener
//! names the caller's namespace whatever addresses the caller uses, and Docker's description
//! of the container in that namespace names the container. In the daemon's own namespace the
//! kernel names each connection's cgroup and process (`crate::host_callers`). No source
//! address is trusted.

use std::{
    fmt,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    docker::Container,
    host_callers::HostCallers,
    policy::{Policy, SharedRules},
};

/// How long a request from a Docker container waits for Docker's description of it (its
/// labels carry its policy) before it is refused.
const IDENTITY_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct Caller {
    /// `net:[inode]`, as `readlink /proc/<pid>/ns/net` shows it.
    pub netns: String,
    /// In the daemon's own namespace: the host's processes (and host-network containers).
    pub host: bool,
    /// For another namespace, the cgroup of the process it was found by; for the host's, the
    /// cgroup the kernel names (empty when it does not).
    pub cgroup: String,
    /// The Docker container id its cgroup names (`/docker/<id>`, `docker-<id>.scope`), if
    /// any: its requests wait for Docker's description of it.
    pub docker_id: Option<String>,
    container: OnceLock<Container>,
    /// The operator's rules and whether labels count.
    rules: Arc<SharedRules>,
    /// The policy in force: the rules for its cgroup until (or without) Docker's
    /// description, then the rules or the labels for its container; again on a reload.
    policy: RwLock<Arc<Policy>>,
    /// Held while the policy is computed and stored, so that a reload never stores the
    /// policy of an undescribed caller over the one its description just gave.
    applying: Mutex<()>,
    described: Notify,
    requests: AtomicU64,
    /// Client connections from this caller now (see `proxy::listener`).
    connections: AtomicUsize,
}

impl Caller {
    pub fn new(netns: String, host: bool, cgroup: String) -> Self {
        Self::with_rules(netns, host, cgroup, Arc::default())
    }

    /// A caller to whom the operator's `rules` apply.
    pub fn with_rules(netns: String, host: bool, cgroup: String, rules: Arc<SharedRules>) -> Self {
        let policy = rules.current().for_caller(None, &cgroup).0;
        Caller {
            netns,
            host,
            docker_id: docker_id(&cgroup),
            cgroup,
            container: OnceLock::new(),
            rules,
            policy: RwLock::new(Arc::new(policy)),
            applying: Mutex::new(()),
            described: Notify::new(),
            requests: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
        }
    }

    /// The container this namespace belongs to, once Docker has said (set once).
    pub fn container(&self) -> Option<&Container> {
        self.container.get()
    }

    /// Docker's description: the names, and the policy the rules or its labels give (in force
    /// before the description is visible, so that no request sees one without the other).
    pub fn set_container(&self, container: Container) {
        let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        if self.container.get().is_some() {
            return;
        }
        self.apply(Some(&container));
        if self.container.set(container).is_ok() {
            self.described.notify_waiters();
        }
    }

    /// Applies the rules in force now (after a reload).
    pub fn reapply(&self) {
        let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        self.apply(self.container());
    }

    fn apply(&self, container: Option<&Container>) {
        let (policy, problems) = self.rules.current().for_caller(container, &self.cgroup);
        if let Some(container) = container {
            for problem in problems {
                tracing::warn!(
                    "container {}: {problem}; its requests are refused until the label is fixed",
                    container.display_name()
                );
            }
        }
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
    }

    /// The rules for this caller's requests. While the daemon follows Docker, a container's
    /// wait for Docker's description (a request may come before the start event); without
    /// one in time they are refused, since its labels may deny it. Without Docker there are
    /// no labels: served.
    pub async fn policy(&self) -> Arc<Policy> {
        if self.docker_id.is_some() && self.container.get().is_none() && crate::docker::following()
        {
            let described = self.described.notified();
            let mut described = std::pin::pin!(described);
            described.as_mut().enable();
            if self.container.get().is_none()
                && tokio::time::timeout(IDENTITY_WAIT, described)
                    .await
                    .is_err()
            {
                tracing::warn!("{self}: Docker did not describe the container in time; refused");
                return Arc::new(Policy {
                    deny: true,
                    ..Policy::default()
                });
            }
        }
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts a new connection until the guard drops; the count includes it.
    pub fn connection(self: &Arc<Self>) -> (CallerConnection, usize) {
        let now = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        (CallerConnection(Arc::clone(self)), now)
    }

    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Who a listener's connections come from.
#[derive(Clone)]
pub enum Callers {
    /// A listener planted in another namespace: whoever connects there is its one caller.
    Namespace(Arc<Caller>),
    /// The daemon's own listeners: the host's processes, told apart per connection.
    Host(Arc<HostCallers>),
}

impl Callers {
    /// The caller at the other end of `stream`.
    pub fn identify(&self, stream: &tokio::net::TcpStream) -> Peer {
        match self {
            Callers::Namespace(caller) => Peer {
                caller: Arc::clone(caller),
                pid: None,
            },
            Callers::Host(host) => match (stream.local_addr(), stream.peer_addr()) {
                (Ok(local), Ok(peer)) => host.identify(local, peer),
                _ => host.unnamed(None),
            },
        }
    }
}

/// A connection's caller, and the process that made it when the kernel recorded it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub caller: Arc<Caller>,
    pub pid: Option<u32>,
}

impl fmt::Display for Peer {
    /// What the request log shows: the caller, and its process when known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "{} pid {pid}", self.caller),
            None => self.caller.fmt(f),
        }
    }
}

/// One of a caller's connections, counted while it lives.
pub struct CallerConnection(Arc<Caller>);

impl Drop for CallerConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Display for Caller {
    /// What the request log shows: the container, else the host's cgroup, else the
    /// namespace and the cgroup it was found by.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.container(), self.host) {
            (Some(c), _) => write!(f, "container {}", c.display_name()),
            (None, true) if self.cgroup.is_empty() => f.write_str("host"),
            (None, true) => write!(f, "host {}", self.cgroup),
            (None, false) => write!(f, "{} (cgroup {})", self.netns, self.cgroup),
        }
    }
}

/// The container id in a Docker cgroup path: the last component, `<64 hex>` (cgroupfs
/// driver) or `docker-<64 hex>.scope` (systemd driver).
fn docker_id(cgroup: &str) -> Option<String> {
    let last = cgroup.rsplit('/').next()?;
    let id = last
        .strip_prefix("docker-")
        .and_then(|s| s.strip_suffix(".scope"))
        .unwrap_or(last);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_ids_from_both_cgroup_drivers() {
        let id = "0123456789abcdef".repeat(4);
        assert_eq!(docker_id(&format!("/docker/{id}")), Some(id.clone()));
        assert_eq!(
            docker_id(&format!("/system.slice/docker-{id}.scope")),
            Some(id.clone())
        );
        assert_eq!(docker_id(&format!("/ci/parent/{id}")), Some(id));
        assert_eq!(
            docker_id("/user.slice/user-1000.slice/session-2.scope"),
            None
        );
        assert_eq!(docker_id("/"), None);
    }

    #[tokio::test]
    async fn a_reload_applies_to_callers_found_before() {
        use crate::policy::{Rule, Rules};
        let deny_ci = Rules {
            rules: vec![Rule {
                container: None,
                image: None,
                cgroup: Some("/ci".into()),
                policy: Policy {
                    deny: true,
                    ..Policy::default()
                },
            }],
            labels: true,
        };
        let rules = Arc::new(SharedRules::new(deny_ci));
        let caller =
            Caller::with_rules("net:[1]".into(), true, "/ci/job".into(), Arc::clone(&rules));
        assert!(caller.policy().await.deny);
        assert!(rules.replace(Rules::default()), "the rules changed");
        assert!(caller.policy().await.deny, "in force until applied");
        caller.reapply();
        assert!(!caller.policy().await.deny, "the new rules");
        assert!(!rules.replace(Rules::default()), "the same rules again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_containers_requests_wait_for_its_description_and_fail_closed() {
        crate::docker::set_following(true);
        let id = "ab".repeat(32);
        let caller = Arc::new(Caller::new(
            "net:[1]".into(),
            false,
            format!("/docker/{id}"),
        ));
        let waiting = tokio::spawn({
            let caller = Arc::clone(&caller);
            async move { caller.policy().await }
        });
        tokio::task::yield_now().await;
        let labels = [("redirect.deny".to_owned(), "true".to_owned())].into();
        caller.set_container(Container {
            id,
            labels,
            ..Container::default()
        });
        assert!(
            waiting.await.unwrap().deny,
            "the labels' policy, once described"
        );
        let undescribed = Caller::new(
            "net:[2]".into(),
            false,
            format!("/docker/{}", "cd".repeat(32)),
        );
        assert!(undescribed.policy().await.deny, "refused after the wait");
        let plain = Caller::new("net:[3]".into(), false, "/ci/job".into());
        assert!(
            !plain.policy().await.deny,
            "not a container: nothing to wait for"
        );
    }
}
