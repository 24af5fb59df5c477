//! Every filesystem path the daemon uses at run time, in one place.

use std::path::PathBuf;

/// Runtime state directory (tmpfs on systemd hosts; gone after a reboot, as the links are).
pub const RUN_DIR: &str = "/run/redirect";

/// The daemon's state directory (the IMDSv2 token key): a tmpfs, so state survives a
/// restart of the daemon, not a reboot.
pub const STATE_DIR: &str = RUN_DIR;

/// The token key's file in the state directory (mode 0600).
pub const TOKEN_KEY: &str = "token.key";

/// Where `redirect run` serves its control API and `redirect status` looks for it.
pub fn default_control_socket() -> PathBuf {
    PathBuf::from(RUN_DIR).join("control.sock")
}

/// Where the programs' links are pinned (bpffs; the layout's version directory goes under it).
pub const PIN_DIR: &str = "/sys/fs/bpf/redirect";

/// Where the kernel lists mounts, to find the cgroup v2 hierarchy.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Effective capabilities of this process (`CapEff:` line).
pub const PROC_STATUS: &str = "/proc/self/status";

/// The daemon's own network namespace (the thread's: namespaces are per thread).
pub const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// Where other processes are found by default: this process's /proc. In a container without
/// the host's pid namespace, the host's /proc bind-mounted elsewhere (`host_proc`).
pub const HOST_PROC: &str = "/proc";
