//! Checking, before touching the kernel, that this process may load and attach the programs,
//! so that a missing privilege is one clear sentence instead of an EPERM from deep inside.

use crate::paths;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Loading a cgroup/sock_addr program needs CAP_BPF (or CAP_SYS_ADMIN); attaching it to a cgroup
/// needs CAP_NET_ADMIN (or CAP_SYS_ADMIN).
pub fn check() -> Result<(), String> {
    let status = std::fs::read_to_string(paths::PROC_STATUS)
        .map_err(|e| format!("cannot read {}: {e}", paths::PROC_STATUS))?;
    let caps = effective_caps(&status)
        .ok_or_else(|| format!("no CapEff line in {}", paths::PROC_STATUS))?;
    match missing(caps) {
        None => Ok(()),
        Some(missing) => Err(format!(
            "redirect run needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN (this process, uid {}, lacks {missing})",
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() }
        )),
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
    fn which_caps_are_enough() {
        assert_eq!(missing(0x1ff_ffff_ffff), None, "root");
        assert_eq!(missing(1 << CAP_SYS_ADMIN), None);
        assert_eq!(missing(1 << CAP_BPF | 1 << CAP_NET_ADMIN), None);
        assert_eq!(missing(1 << CAP_BPF), Some("CAP_NET_ADMIN"));
        assert_eq!(missing(1 << CAP_NET_ADMIN), Some("CAP_BPF"));
        assert_eq!(missing(0), Some("CAP_BPF and CAP_NET_ADMIN"));
    }
}
