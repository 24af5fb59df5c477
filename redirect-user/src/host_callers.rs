//! The host's processes, told apart.
//!
//! A connection accepted on the daemon's own listeners comes from the daemon's own network
//! namespace: the host's processes and host-network containers. The listener cannot name
//! them (they share the namespace), so the kernel is asked per connection: sock_diag names the
//! peer socket's cookie, owner and cgroup (`crate::sock_diag`), and connect4/connect6 recorded
//! under that cookie the process that connected (`crate::ebpf::CallerPids`). Each cgroup is
//! one caller (a systemd unit, a session, a host-network container), with the operator's rules
//! for its cgroup and, for a container, Docker's labels. Nothing comes from a source address.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

use crate::{
    caller::{Caller, Peer},
    docker::Container,
    ebpf::CallerPids,
    netns::Procfs,
    policy::SharedRules,
    sock_diag::{DiagError, SockDiag},
};

/// Host cgroups kept as callers at once. Beyond it, those without a connection are let go
/// (their request counts with them); if every one holds one, new ones are the unnamed caller.
const MAX_CALLERS: usize = 1024;
/// Cgroup ids whose paths (or absence) are remembered (ids are never reused, so entries never
/// go stale; a cgroup exists before its sockets, so one not found stays not found).
const MAX_CGROUP_PATHS: usize = 4096;
/// Host-network containers whose descriptions are kept for callers yet to connect.
const MAX_CONTAINERS: usize = 4096;
/// Cgroup directories looked at in one search for an id: a host has hundreds.
const MAX_WALK: usize = 100_000;

/// How the kernel is asked: the table and the query, each absent where it cannot be had.
pub struct Kernel {
    pub diag: Option<SockDiag>,
    pub pids: Option<CallerPids>,
    /// The cgroup v2 mount, where cgroup ids are directory inodes.
    pub mount: Option<PathBuf>,
    pub proc: Procfs,
}

pub struct HostCallers {
    netns: String,
    rules: Arc<SharedRules>,
    kernel: Kernel,
    state: Mutex<State>,
    /// Peers the kernel does not name: not a socket of this host (a non-loopback `--listen`),
    /// or sock_diag unavailable. One caller, with no rules but the defaults.
    unnamed: Arc<Caller>,
}

#[derive(Default)]
struct State {
    by_cgroup: HashMap<String, Arc<Caller>>,
    /// The same callers by cgroup id, for the connections after the first.
    by_id: HashMap<u64, Arc<Caller>>,
    /// `None`: searched for and not found (not visible to the daemon): not searched again.
    cgroup_paths: HashMap<u64, Option<String>>,
    /// Docker's descriptions of host-network containers, by id.
    containers: HashMap<String, Container>,
}

impl State {
    fn remember_id(&mut self, id: u64, caller: &Arc<Caller>) {
        if self.by_id.len() >= MAX_CGROUP_PATHS {
            self.by_id.clear();
        }
        self.by_id.insert(id, Arc::clone(caller));
    }
}

/// One host cgroup's caller, as `redirect status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostCallerStatus {
    /// As the access log names it.
    pub caller: String,
    pub cgroup: String,
    pub requests: u64,
}

impl HostCallers {
    pub fn new(netns: String, rules: Arc<SharedRules>, kernel: Kernel) -> Self {
        HostCallers {
            unnamed: Arc::new(Caller::new(netns.clone(), true, String::new())),
            netns,
            rules,
            kernel,
            state: Mutex::default(),
        }
    }

    /// Who is on the other end of a connection accepted at `local` from `peer`.
    pub fn identify(&self, local: SocketAddr, peer: SocketAddr) -> Peer {
        let Some(diag) = &self.kernel.diag else {
            return self.unnamed(None);
        };
        let socket = match diag.find(peer, local) {
            Ok(socket) => socket,
            Err(DiagError::NotFound { .. }) => return self.unnamed(None), // not a local socket
            Err(e) => {
                tracing::debug!("{e}");
                return self.unnamed(None);
            }
        };
        let pid = self.kernel.pids.as_ref().and_then(|p| p.pid(socket.cookie));
        let Some(id) = socket.cgroup_id else {
            return self.unnamed(pid);
        };
        if let Some(caller) = self.lock().by_id.get(&id) {
            return Peer {
                caller: Arc::clone(caller),
                pid,
            };
        }
        let Some(cgroup) = self.cgroup_path(id, pid) else {
            return self.unnamed(pid);
        };
        Peer {
            caller: self.caller_for(id, cgroup),
            pid,
        }
    }

    /// Docker's description of a host-network container: its callers get its names, and
    /// the policy its labels or the rules give.
    pub fn describe(&self, container: Container) {
        let mut state = self.lock();
        for caller in state.by_cgroup.values() {
            if caller.docker_id.as_deref() == Some(container.id.as_str()) {
                caller.set_container(container.clone());
            }
        }
        if state.containers.len() >= MAX_CONTAINERS {
            state.containers.clear();
        }
        state.containers.insert(container.id.clone(), container);
    }

    /// Applies the rules in force now to every host caller (after a reload).
    pub fn reapply(&self) {
        let state = self.lock();
        for caller in state.by_cgroup.values() {
            caller.reapply();
        }
        self.unnamed.reapply();
    }

    pub fn statuses(&self) -> Vec<HostCallerStatus> {
        let state = self.lock();
        let mut all: Vec<_> = std::iter::once(&self.unnamed)
            .filter(|c| c.requests() > 0)
            .chain(state.by_cgroup.values())
            .map(|c| HostCallerStatus {
                caller: c.to_string(),
                cgroup: c.cgroup.clone(),
                requests: c.requests(),
            })
            .collect();
        all.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        all
    }

    /// Requests from the host's processes, all callers together.
    pub fn requests(&self) -> u64 {
        let state = self.lock();
        self.unnamed.requests() + state.by_cgroup.values().map(|c| c.requests()).sum::<u64>()
    }

    /// The unnamed caller, with its process if known.
    pub fn unnamed(&self, pid: Option<u32>) -> Peer {
        Peer {
            caller: Arc::clone(&self.unnamed),
            pid,
        }
    }

    /// The caller of the cgroup `id` at `cgroup` (a path outlives its ids: a service
    /// restarted gets a new cgroup of the same name, and stays one caller).
    fn caller_for(&self, id: u64, cgroup: String) -> Arc<Caller> {
        let mut state = self.lock();
        if let Some(caller) = state.by_cgroup.get(&cgroup).cloned() {
            state.remember_id(id, &caller);
            return caller;
        }
        if state.by_cgroup.len() >= MAX_CALLERS {
            // With `by_id` emptied, a caller that only `by_cgroup` holds has no connection.
            state.by_id.clear();
            state.by_cgroup.retain(|_, c| Arc::strong_count(c) > 1);
            if state.by_cgroup.len() >= MAX_CALLERS {
                return Arc::clone(&self.unnamed);
            }
        }
        let caller = Arc::new(Caller::with_rules(
            self.netns.clone(),
            true,
            cgroup.clone(),
            Arc::clone(&self.rules),
        ));
        if let Some(container) = caller
            .docker_id
            .as_ref()
            .and_then(|id| state.containers.get(id))
        {
            caller.set_container(container.clone());
        }
        state.by_cgroup.insert(cgroup, Arc::clone(&caller));
        state.remember_id(id, &caller);
        caller
    }

    /// The path of the cgroup `id`: remembered, else the connecting process's cgroup if it is
    /// that one (the process may have moved, or its pid been reused), else searched for.
    fn cgroup_path(&self, id: u64, pid: Option<u32>) -> Option<String> {
        if let Some(path) = self.lock().cgroup_paths.get(&id) {
            return path.clone();
        }
        let mount = self.kernel.mount.as_deref()?;
        let path = pid
            .and_then(|pid| self.kernel.proc.cgroup_of(pid))
            .filter(|path| inode(&mount.join(path.trim_start_matches('/'))) == Some(id))
            .or_else(|| find_cgroup(mount, id));
        let mut state = self.lock();
        if state.cgroup_paths.len() >= MAX_CGROUP_PATHS {
            state.cgroup_paths.clear();
        }
        state.cgroup_paths.insert(id, path.clone());
        path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The cgroup whose directory has inode `id` under the cgroup v2 `mount`, as
/// `/proc/<pid>/cgroup` prints it (`/` for the root). Directory entries carry their inode, so
/// the search reads directories only.
pub fn find_cgroup(mount: &Path, id: u64) -> Option<String> {
    if inode(mount) == Some(id) {
        return Some("/".to_owned());
    }
    let mut pending = vec![mount.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue; // removed meanwhile
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            seen += 1;
            if seen > MAX_WALK {
                return None;
            }
            let path = entry.path();
            if entry.ino() == id {
                let relative = path.strip_prefix(mount).ok()?;
                return Some(format!("/{}", relative.display()));
            }
            pending.push(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_are_found_by_their_directory_inode() {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/web.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::create_dir_all(root.path().join("user.slice")).unwrap();
        let id = inode(&unit).unwrap();
        assert_eq!(
            find_cgroup(root.path(), id).as_deref(),
            Some("/system.slice/web.service")
        );
        assert_eq!(
            find_cgroup(root.path(), inode(root.path()).unwrap()).as_deref(),
            Some("/")
        );
        assert_eq!(find_cgroup(root.path(), u64::MAX), None);
    }
}
