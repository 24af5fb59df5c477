//! What `redirect status` reports: the daemon's view of itself, read live from its maps and
//! the kernel's program info. Serialized as JSON on the control socket.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// What answers redirected connects, and where.
    pub serving: String,
    /// Addresses this daemon's proxy listens on (none with `--redirect-to`).
    pub listen: Vec<String>,
    pub cgroups: Vec<AttachedCgroup>,
    /// Read back from the kernel's target maps.
    pub redirects: Vec<Redirect>,
    /// Counter name -> value summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    pub programs: Vec<ProgramStatus>,
    pub proxy: ProxyStatus,
    /// Network namespaces other than the daemon's where it listens (`crate::netns`).
    #[serde(default)]
    pub namespaces: Vec<crate::netns::NamespaceStatus>,
    /// Requests from the daemon's own namespace (host processes, host-network containers).
    #[serde(default)]
    pub host_requests: u64,
    /// The callers in the daemon's own namespace, by cgroup as the kernel names them.
    #[serde(default)]
    pub host_callers: Vec<crate::host_callers::HostCallerStatus>,
    /// Packets the escape guard dropped, by cgroup: what went around the redirect.
    #[serde(default)]
    pub escapes: Vec<Escape>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Escape {
    pub cgroup_id: u64,
    /// As `/proc/<pid>/cgroup` prints it, when the cgroup still exists.
    pub cgroup: Option<String>,
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachedCgroup {
    pub path: String,
    pub programs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Redirect {
    pub dialled: String,
    pub to: String,
    /// `to` is this target's own port: getpeername is restored from the address alone.
    /// Otherwise `to` is shared and each rewritten socket is recorded (see README).
    pub dedicated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    pub id: u32,
    /// Zero unless `kernel.bpf_stats_enabled` is 1.
    pub run_count: u64,
    pub run_time_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub requests: u64,
    /// Answered by the proxy itself (a refused request: 4xx, 503), not by the backend.
    pub refused: u64,
    pub connections_open: u64,
    pub connections_total: u64,
    /// Idle connections closed to admit new ones at the connection limit.
    pub connections_evicted: u64,
    /// The connection limit (0: no proxy served here).
    pub max_connections: u64,
}

impl Status {
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let up = humantime::format_duration(std::time::Duration::from_secs(self.uptime_secs));
        let _ = writeln!(s, "redirect {} (pid {}), up {up}", self.version, self.pid);
        let _ = writeln!(s, "serving:   {}", self.serving);
        let _ = writeln!(s, "redirects:");
        let width = self
            .redirects
            .iter()
            .map(|r| r.dialled.len())
            .max()
            .unwrap_or(0);
        let to_width = self.redirects.iter().map(|r| r.to.len()).max().unwrap_or(0);
        for r in &self.redirects {
            let port = if r.dedicated { "dedicated" } else { "shared" };
            let _ = writeln!(
                s,
                "  {:width$}  ->  {:to_width$}  ({port})",
                r.dialled, r.to
            );
        }
        let _ = writeln!(s, "attached to:");
        for cg in &self.cgroups {
            let _ = writeln!(s, "  {}  ({})", cg.path, cg.programs.join(", "));
        }
        let c = |n| self.counter(n);
        let _ = writeln!(s, "connects:");
        let _ = writeln!(
            s,
            "  ipv4  seen {:>10}  rewritten {:>10}",
            c("connect4_seen"),
            c("connect4_rewritten")
        );
        let _ = writeln!(
            s,
            "  ipv6  seen {:>10}  rewritten {:>10}",
            c("connect6_seen"),
            c("connect6_rewritten")
        );
        let _ = writeln!(
            s,
            "  own upstream connects left alone {}, getpeername restored {}, storage failures {}",
            c("exempted_own_connects"),
            c("getpeername_restored"),
            c("storage_failed")
        );
        let _ = writeln!(
            s,
            "escapes:   {} packets to a metadata address that went around the redirect, dropped",
            c("escapes_dropped")
        );
        for e in &self.escapes {
            let cgroup = e
                .cgroup
                .clone()
                .unwrap_or_else(|| format!("cgroup id {} (gone)", e.cgroup_id));
            let _ = writeln!(s, "  {:>8} from {cgroup}", e.dropped);
        }
        let _ = writeln!(s, "programs:");
        for p in &self.programs {
            let stats = if p.run_count > 0 {
                format!(
                    "runs {}, avg {} ns",
                    p.run_count,
                    p.run_time_ns / p.run_count
                )
            } else {
                "run stats off (sysctl kernel.bpf_stats_enabled=1)".to_owned()
            };
            let _ = writeln!(s, "  {:<22} id {:<6} {stats}", p.name, p.id);
        }
        let _ = writeln!(
            s,
            "callers:   host {} requests; {} other network namespaces served ({} connects came before theirs was)",
            self.host_requests,
            self.namespaces.len(),
            c("netns_unserved")
        );
        for h in &self.host_callers {
            let _ = writeln!(s, "  host  {} requests  {}", h.requests, h.caller);
        }
        for n in &self.namespaces {
            let on = if n.listening.is_empty() {
                "nothing: the port is taken there".to_owned()
            } else {
                n.listening.join(", ")
            };
            let _ = writeln!(
                s,
                "  {}  {} requests  {}  pid {}  on {on}",
                n.netns, n.requests, n.caller, n.pid
            );
        }
        let p = &self.proxy;
        let _ = writeln!(
            s,
            "proxy:     {} requests ({} refused), {} connections open (limit {}), {} total, {} idle ones closed for room",
            p.requests,
            p.refused,
            p.connections_open,
            p.max_connections,
            p.connections_total,
            p.connections_evicted
        );
        s
    }
}
