//! Who is on the other end of a connection, as the kernel attests it.
//!
//! A connection is accepted on a listener of the network namespace it was made in (see
//! `crate::netns`); only the daemon listens there on the proxy's endpoints, so the listener
//! names the caller's namespace whatever addresses the caller uses, and Docker's description
//! of the container in that namespace names the container. No source address is trusted.

use std::{
    fmt,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::docker::Container;

#[derive(Debug)]
pub struct Caller {
    /// `net:[inode]`, as `readlink /proc/<pid>/ns/net` shows it.
    pub netns: String,
    /// The daemon's own namespace: the host's processes (and host-network containers).
    pub host: bool,
    /// The cgroup of the process the namespace was found by.
    pub cgroup: String,
    container: OnceLock<Container>,
    requests: AtomicU64,
}

impl Caller {
    pub fn new(netns: String, host: bool, cgroup: String) -> Self {
        Caller {
            netns,
            host,
            cgroup,
            container: OnceLock::new(),
            requests: AtomicU64::new(0),
        }
    }

    /// The container this namespace belongs to, once Docker has said (set once).
    pub fn container(&self) -> Option<&Container> {
        self.container.get()
    }

    pub fn set_container(&self, container: Container) {
        let _ = self.container.set(container);
    }

    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl fmt::Display for Caller {
    /// What the request log shows: the container, else the cgroup, else the host.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.container(), self.host) {
            (Some(c), _) => write!(f, "container {}", c.display_name()),
            (None, true) => f.write_str("host"),
            (None, false) => write!(f, "{} (cgroup {})", self.netns, self.cgroup),
        }
    }
}
