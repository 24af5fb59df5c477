//! CloudStack's virtual router, found and followed (`--upstream cloudstack`, the mdproxy4cs
//! seed): CloudStack serves metadata from the router of the guest's network, not from
//! 169.254.169.254, and the router's address changes when it is recreated.
//!
//! Found as cloud-init finds it: the `data-server` name, then the DHCP server identifier of
//! the newest lease (`leases`), then a DHCPINFORM on the VM's interface (`dhcp`), then the
//! default gateway. Followed: looked for again when a connect to it fails and every
//! [`RouterSettings::recheck`], so a new lease or a moved router is taken up while the
//! redirected address stays the same. The router tells VMs apart by source address, so
//! upstream connections leave from the VM's own address on the router's network.

mod dhcp;
pub mod leases;

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{PoisonError, RwLock},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The name CloudStack's DNS (the router's dnsmasq) gives the router.
pub const DATA_SERVER: &str = "data-server";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSettings {
    /// Where DHCP clients' leases are looked for (default [`leases::LEASE_DIRS`]).
    pub lease_dirs: Vec<PathBuf>,
    /// The interface on the router's network (DHCPINFORM); default: the default route's.
    pub interface: Option<String>,
    /// How often the router is looked for again while it answers.
    pub recheck: Duration,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            lease_dirs: leases::LEASE_DIRS.iter().map(PathBuf::from).collect(),
            interface: None,
            recheck: Duration::from_secs(30),
        }
    }
}

/// The router as last found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub router: Ipv4Addr,
    /// The VM's address toward the router (connections are bound to it).
    pub source: Option<Ipv4Addr>,
    pub how: How,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    DataServer,
    Lease(PathBuf),
    DhcpInform(String),
    DefaultGateway,
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::DataServer => write!(f, "the {DATA_SERVER} name"),
            How::Lease(path) => write!(f, "the DHCP lease {}", path.display()),
            How::DhcpInform(interface) => write!(f, "a DHCPINFORM on {interface}"),
            How::DefaultGateway => f.write_str("the default gateway"),
        }
    }
}

/// The router the upstream connections go to, kept current by [`Router::follow`].
#[derive(Default)]
pub struct Router {
    current: RwLock<Option<Found>>,
    failed: Notify,
}

impl Router {
    pub fn current(&self) -> Option<Found> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A connect to the router failed: look for it again now.
    pub fn failed(&self) {
        self.failed.notify_one();
    }

    /// Finds the router, then keeps following it until `stop`.
    pub async fn follow(&self, settings: RouterSettings, stop: CancellationToken) {
        let mut missing_said = false;
        loop {
            let found = discover(&settings).await;
            let before = self.current();
            match (&found, &before) {
                (Some(now), Some(was)) if now.router == was.router => {}
                (Some(now), _) => {
                    let source = now
                        .source
                        .map(|s| format!(", from {s}"))
                        .unwrap_or_default();
                    tracing::info!(
                        "CloudStack virtual router: {} (found by {}{source})",
                        now.router,
                        now.how
                    );
                    missing_said = false;
                }
                (None, _) if !missing_said => {
                    tracing::warn!(
                        "no CloudStack virtual router found (tried the {DATA_SERVER} name, the DHCP leases in {}, a DHCPINFORM and the default gateway); metadata requests fail until one is; retrying every {:?}",
                        settings
                            .lease_dirs
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        settings.recheck
                    );
                    missing_said = true;
                }
                (None, _) => {}
            }
            // A router that is not found keeps the last one: it may come back.
            if found.is_some() {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = found;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.failed.notified() => {
                    // Several failures at once are one rediscovery; a dead router is not
                    // asked about more than once a second.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                () = tokio::time::sleep(settings.recheck) => {}
            }
        }
    }
}

/// One search, in cloud-init's order.
pub async fn discover(settings: &RouterSettings) -> Option<Found> {
    let found = |router: Ipv4Addr, how: How| Found {
        router,
        source: source_toward(router),
        how,
    };
    let lookup = tokio::net::lookup_host((DATA_SERVER, 80));
    if let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_secs(2), lookup).await
        && let Some(router) = addrs
            .filter_map(|a| match a {
                SocketAddr::V4(v4) => Some(*v4.ip()),
                SocketAddr::V6(_) => None,
            })
            .next()
    {
        return Some(found(router, How::DataServer));
    }
    let dirs = settings.lease_dirs.clone();
    let lease = tokio::task::spawn_blocking(move || leases::newest_server(&dirs))
        .await
        .ok()
        .flatten();
    if let Some((router, path)) = lease {
        return Some(found(router, How::Lease(path)));
    }
    let gateway = default_route();
    let interface = settings
        .interface
        .clone()
        .or_else(|| gateway.as_ref().map(|(interface, _)| interface.clone()));
    if let Some(interface) = interface
        && let Some((address, mac)) = interface_address(&interface)
    {
        match dhcp::server_identifier(&interface, address, mac, Duration::from_secs(2)).await {
            Ok(Some(router)) => return Some(found(router, How::DhcpInform(interface))),
            Ok(None) => {}
            Err(e) => tracing::debug!("DHCPINFORM on {interface}: {e}"),
        }
    }
    gateway.map(|(_, router)| found(router, How::DefaultGateway))
}

/// The default route's interface and gateway, from `/proc/net/route` (this namespace's).
fn default_route() -> Option<(String, Ipv4Addr)> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_route(&table)
}

fn parse_default_route(table: &str) -> Option<(String, Ipv4Addr)> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (interface, destination, gateway) = (fields.first()?, fields.get(1)?, fields.get(2)?);
        if *destination != "00000000" {
            return None;
        }
        // The kernel prints the network-order address as a native-endian number.
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        let gateway = Ipv4Addr::from(raw.to_ne_bytes());
        (!gateway.is_unspecified()).then(|| ((*interface).to_owned(), gateway))
    })
}

/// `interface`'s first IPv4 address and its hardware address.
fn interface_address(interface: &str) -> Option<(Ipv4Addr, [u8; 6])> {
    let mut address = None;
    let mut mac = None;
    for entry in nix::ifaddrs::getifaddrs().ok()? {
        if entry.interface_name != interface {
            continue;
        }
        let Some(addr) = entry.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            address.get_or_insert(v4.ip());
        } else if let Some(link) = addr.as_link_addr() {
            mac = mac.or(link.addr());
        }
    }
    Some((address?, mac?))
}

/// The address the kernel would send from toward `router` (a UDP connect sends nothing).
fn source_toward(router: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(SocketAddrV4::new(router, 80)).ok()?;
    match socket.local_addr().ok()? {
        SocketAddr::V4(v4) if !v4.ip().is_unspecified() => Some(*v4.ip()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_from_proc() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0001010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0101010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_default_route(table),
            Some(("eth0".to_owned(), Ipv4Addr::new(10, 1, 1, 1)))
        );
        assert_eq!(parse_default_route("Iface\tDestination\n"), None);
        assert_eq!(parse_default_route("garbage"), None);
    }
}
