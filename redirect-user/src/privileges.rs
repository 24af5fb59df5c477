//! Checking, before touching the kernel, that this process may load and attach the programs,
//! so that a missing privilege is one clear sentence instead of an EPERM from deep inside.

use crate::paths;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// What the daemon may do, as its capabilities say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privileges {
    /// CAP_SYS_ADMIN: entering other network namespaces (`setns`) to listen there.
    pub enter_namespaces: bool,
}

/// Loading a cgroup/sock_addr program needs CAP_BPF (or CAP_SYS_ADMIN); attaching it to a cgroup
/// needs CAP_NET_ADMIN (or CAP_SYS_ADMIN). Listening inside containers' namespaces needs
/// CAP_SYS_ADMIN (`setns`).
pub fn check() -> Result<Privileges, String> {
    let status = std::fs::read_to_string(paths::PROC_STATUS)
        .map_err(|e| format!("cannot read {}: {e}", paths::PROC_STATUS))?;
    let caps = effective_caps(&status)
        .ok_or_else(|| format!("no CapEff line in {}", paths::PROC_STATUS))?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    match missing(caps) {
        None => Ok(Privileges {
            enter_namespaces: caps & (1 << CAP_SYS_ADMIN) != 0,
        }),
        Some(missing) => Err(refusal(uid, missing)),
    }
}

/// The error for missing capabilities. uid 0 is root already (in a container, with the
/// engine's reduced set): it is told which capabilities to add, not to become root.
fn refusal(uid: u32, missing: &str) -> String {
    let fix = "add CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN on engines that do not know CAP_BPF (Docker 20.10: `--cap-add SYS_ADMIN`); CAP_SYS_ADMIN also lets the daemon listen inside containers' network namespaces";
    if uid == 0 {
        format!(
            "redirect run lacks {missing} (uid 0 with a reduced capability set, as in a container): {fix}"
        )
    } else {
        format!("redirect run needs root, or capabilities (uid {uid} lacks {missing}): {fix}")
    }
}

fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn missing(caps: u64) -> Option<&'static str> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    match (has(CAP_BPF) || sys_admin, has(CAP_NET_ADMIN) || sys_admin) {
        (true, true) => None,
        (false, true) => Some("CAP_BPF"),
        (true, false) => Some("CAP_NET_ADMIN"),
        (false, false) => Some("CAP_BPF and CAP_NET_ADMIN"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_caps() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("Name: x\n"), None);
    }

    #[test]
    fn root_in_a_container_is_told_which_capability_to_add() {
        let in_container = refusal(0, "CAP_BPF");
        assert!(!in_container.contains("needs root"), "{in_container}");
        assert!(
            in_container.contains("--cap-add SYS_ADMIN"),
            "{in_container}"
        );
        assert!(refusal(1000, "CAP_BPF").contains("needs root"));
    }

    #[test]
    fn which_caps_are_enough() {
        assert_eq!(missing(0x1ff_ffff_ffff), None, "root");
        assert_eq!(missing(1 << CAP_SYS_ADMIN), None);
        assert_eq!(missing(1 << CAP_BPF | 1 << CAP_NET_ADMIN), None);
        assert_eq!(missing(1 << CAP_BPF), Some("CAP_NET_ADMIN"));
        assert_eq!(missing(1 << CAP_NET_ADMIN), Some("CAP_BPF"));
        assert_eq!(missing(0), Some("CAP_BPF and CAP_NET_ADMIN"));
    }
}
