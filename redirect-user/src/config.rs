//! Settings for `redirect run`: built-in defaults, then the TOML file (`--config`), then flags.
//!
//! Values are validated while they are deserialized, so a bad value in the file is reported
//! with its file, line and key (see [`ConfigError`]); flags parse through the same `FromStr`
//! implementations and so give the same messages.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};

use crate::{
    mock::{
        CloudKind, MockValues, azure::AzureValues, cloudstack::CloudStackValues, ec2::Ec2Values,
        gcp::GcpValues, openstack::OpenStackValues,
    },
    paths,
    router::RouterSettings,
};

/// Default proxy address: loopback (never exposed to the network) on a port that is not 80.
pub const DEFAULT_LISTEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8169);

/// Metadata endpoints redirected by default: AWS IMDS (also Azure, GCP, OpenStack) over IPv4
/// and EC2's IPv6 endpoint on Nitro instances.
pub fn default_targets() -> Vec<Target> {
    vec![
        Target(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(169, 254, 169, 254),
            80,
        ))),
        Target(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
            80,
            0,
            0,
        ))),
    ]
}

/// The config file as written. Every key is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Serve a built-in mock: `"ec2"`, `"azure"`, `"gcp"`, `"openstack"` or `"cloudstack"`,
    /// the cloud of callers whose policy names none.
    pub mock: Option<CloudKind>,
    /// Forward to this metadata service instead.
    pub upstream: Option<UpstreamUrl>,
    /// Where the built-in proxy listens.
    #[serde(default, deserialize_with = "de_listen")]
    pub listen: Option<ProxyAddrs>,
    /// Send redirected connects to this proxy, served by another program.
    #[serde(default, deserialize_with = "de_redirect_to")]
    pub redirect_to: Option<ProxyAddrs>,
    pub cgroups: Option<Vec<PathBuf>>,
    pub targets: Option<Vec<Target>>,
    pub control_socket: Option<PathBuf>,
    /// Where the programs' links are pinned (bpffs), so the redirect outlives the daemon.
    pub pin_dir: Option<PathBuf>,
    /// A loopback address serving `/metrics`, `/healthz` and `/readyz` over TCP.
    #[serde(default, deserialize_with = "de_metrics_listen")]
    pub metrics_listen: Option<SocketAddr>,
    /// The daemon's state (the IMDSv2 token key), kept over restarts.
    pub state_dir: Option<PathBuf>,
    /// Unpin the links: a daemon that dies takes the redirect with it (callers then reach
    /// the real service), as before pinning.
    pub fail_open: Option<bool>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub upstream_connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub upstream_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub shutdown_grace: Option<Duration>,
    /// Close client connections idle this long between requests ("0s": never).
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub idle_timeout: Option<Duration>,
    /// A request head must arrive within this of its first byte, its body within this more.
    #[serde(default, deserialize_with = "de_timeout_opt")]
    pub request_read_timeout: Option<Duration>,
    /// Close a connection whose client has taken nothing of a response for this long.
    #[serde(default, deserialize_with = "de_timeout_opt")]
    pub send_timeout: Option<Duration>,
    /// Client connections held at once (default: what the descriptor limit allows).
    #[serde(default, deserialize_with = "de_max_connections")]
    pub max_connections: Option<usize>,
    /// Largest request body forwarded upstream ("64KiB").
    #[serde(default, deserialize_with = "de_size_opt")]
    pub max_request_body: Option<usize>,
    pub ebpf_log: Option<bool>,
    /// Where the host's processes are: `/proc`, or the host's /proc bind-mounted into the
    /// daemon's container (then `--pid host` is not needed; Swarm services cannot have it).
    pub host_proc: Option<PathBuf>,
    /// Network namespaces served at once (default 8192).
    #[serde(default, deserialize_with = "de_max_namespaces")]
    pub max_namespaces: Option<usize>,
    /// Rules per caller (see `policy`), first match wins.
    pub policy: Vec<crate::policy::Rule>,
    /// Whether containers' `redirect.*` labels count (default true).
    pub container_labels: Option<bool>,
    /// Docker's API socket: "auto" (DOCKER_HOST, else /var/run/docker.sock), "off", or a
    /// socket path (`unix:///run/docker.sock`).
    #[serde(default, deserialize_with = "de_docker_opt")]
    pub docker: Option<DockerApi>,
    /// Proxy worker threads.
    #[serde(default, deserialize_with = "de_workers")]
    pub workers: Option<usize>,
    /// Values served by the EC2 mock.
    pub ec2: Ec2Values,
    /// Values served by the Azure mock.
    pub azure: AzureValues,
    /// Values served by the GCP mock.
    pub gcp: GcpValues,
    /// Values served by the OpenStack mock.
    pub openstack: OpenStackValues,
    /// Values served by the CloudStack mock.
    pub cloudstack: CloudStackValues,
    /// How `upstream = "cloudstack"` finds the virtual router.
    pub cloudstack_router: RouterConfig,
}

/// `[cloudstack_router]`: where to look for the router (see `crate::router`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Directories of DHCP lease files (default: systemd-networkd's, dhclient's,
    /// NetworkManager's and dhcpcd's).
    pub lease_dirs: Option<Vec<PathBuf>>,
    /// The interface on the router's network (default: the default route's).
    pub interface: Option<String>,
    /// How often to look for the router again while it answers (default 30s).
    #[serde(default, deserialize_with = "de_duration_opt")]
    pub recheck: Option<Duration>,
}

/// A config file that could not be used, with where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} line {line}{key}: {message}", key = key_suffix(.key))]
    Invalid {
        path: PathBuf,
        line: usize,
        /// Dotted path of the offending key, when the problem belongs to one.
        key: Option<String>,
        message: String,
    },
}

fn key_suffix(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!(", key `{k}`"))
        .unwrap_or_default()
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |err: &toml::de::Error, key: Option<String>| ConfigError::Invalid {
            path: path.to_owned(),
            line: err.span().map_or(1, |s| line_of(text, s.start)),
            key,
            message: err.message().trim().to_owned(),
        };
        let de = toml::Deserializer::parse(text).map_err(|e| invalid(&e, None))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = (key != ".").then_some(key);
            invalid(e.inner(), key)
        })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The upstream metadata service: `http://HOST[:PORT]`, nothing after the authority; or
/// `cloudstack`: CloudStack's virtual router, wherever it is (`crate::router`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamUrl {
    Http(hyper::http::uri::Authority),
    CloudStack,
}

impl UpstreamUrl {
    /// The host requests go to, when it is a fixed one.
    pub fn authority(&self) -> Option<&hyper::http::uri::Authority> {
        match self {
            UpstreamUrl::Http(authority) => Some(authority),
            UpstreamUrl::CloudStack => None,
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "cloudstack" {
            return Ok(UpstreamUrl::CloudStack);
        }
        let uri: hyper::Uri = s
            .parse()
            .map_err(|e| format!("invalid upstream URL {s:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "upstream URL {s:?}: scheme {other:?} is not supported, metadata services speak plain http"
                ));
            }
            None => {
                return Err(format!(
                    "upstream URL {s:?} needs a scheme, e.g. http://169.254.169.254"
                ));
            }
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream URL {s:?} has no host"))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "upstream URL {s:?}: give only scheme and host (requests keep their own path)"
            ));
        }
        if authority.as_str().contains('@') {
            return Err(format!(
                "upstream URL {s:?}: credentials in the URL are not supported"
            ));
        }
        Ok(UpstreamUrl::Http(authority))
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamUrl::Http(authority) => write!(f, "http://{authority}"),
            UpstreamUrl::CloudStack => f.write_str("the CloudStack virtual router"),
        }
    }
}

/// A metadata endpoint whose connects are redirected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target(pub SocketAddr);

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let addr: SocketAddr = s.parse().map_err(|_| {
            format!("invalid target {s:?}: expected ADDRESS:PORT, e.g. 169.254.169.254:80 or [fd00:ec2::254]:80")
        })?;
        if addr.port() == 0 {
            return Err(format!("invalid target {s:?}: port 0 is never dialled"));
        }
        if addr.ip().is_unspecified() {
            return Err(format!(
                "invalid target {s:?}: the unspecified address is never dialled"
            ));
        }
        if let SocketAddr::V6(v6) = addr
            && v6.ip().to_ipv4_mapped().is_some()
        {
            return Err(format!(
                "invalid target {s:?}: give IPv4 targets in IPv4 form; ::ffff:a.b.c.d is redirected with them"
            ));
        }
        Ok(Target(addr))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where the proxy is: at most one IPv4 and one IPv6 address. Redirected IPv4 connects go
/// to the IPv4 one; IPv6 connects go to the IPv6 one, or to the IPv4-mapped form of the IPv4 one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyAddrs {
    pub v4: Option<SocketAddrV4>,
    pub v6: Option<SocketAddrV6>,
}

impl ProxyAddrs {
    /// `what` names the setting in messages ("listen address", "redirect-to address").
    pub fn from_list(
        list: impl IntoIterator<Item = SocketAddr>,
        what: &str,
    ) -> Result<Self, String> {
        let mut out = ProxyAddrs::default();
        for addr in list {
            match addr {
                SocketAddr::V4(a) => {
                    if let Some(first) = out.v4.replace(a) {
                        return Err(format!("more than one IPv4 {what} ({first} and {a})"));
                    }
                }
                SocketAddr::V6(a) => {
                    if let Some(first) = out.v6.replace(a) {
                        return Err(format!("more than one IPv6 {what} ({first} and {a})"));
                    }
                }
            }
        }
        if out.v4.is_none() && out.v6.is_none() {
            return Err(format!("no {what}"));
        }
        Ok(out)
    }

    pub fn iter(&self) -> impl Iterator<Item = SocketAddr> {
        self.v4
            .map(SocketAddr::V4)
            .into_iter()
            .chain(self.v6.map(SocketAddr::V6))
    }
}

/// An address redirected connects are sent to; `what` names the setting in messages.
fn parse_proxy_addr(s: &str, what: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("invalid {what} {s:?}: expected ADDRESS:PORT, e.g. 127.0.0.1:8169"))?;
    if addr.ip().is_unspecified() {
        return Err(format!(
            "invalid {what} {s:?}: redirected connects are sent to this address, so it must be \
             one that callers can reach, e.g. 127.0.0.1:8169 or a bridge address"
        ));
    }
    if addr.ip().is_multicast() {
        return Err(format!("invalid {what} {s:?}: multicast"));
    }
    if let SocketAddr::V6(v6) = addr
        && v6.ip().to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "invalid {what} {s:?}: give IPv4 addresses in IPv4 form"
        ));
    }
    Ok(addr)
}

/// One `--listen` value: where the built-in proxy listens (port 0: any free port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_proxy_addr(s, "listen address").map(ListenAddr)
    }
}

/// One `--redirect-to` value: a proxy served by another program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectToAddr(pub SocketAddr);

impl FromStr for RedirectToAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let addr = parse_proxy_addr(s, "redirect-to address")?;
        if addr.port() == 0 {
            return Err(format!("invalid redirect-to address {s:?}: port 0"));
        }
        Ok(RedirectToAddr(addr))
    }
}

fn de_from_str<'de, D: Deserializer<'de>, T: FromStr<Err = String>>(d: D) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(de::Error::custom)
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_from_str(d)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_from_str(d)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_from_str(d)
    }
}

impl<'de> Deserialize<'de> for RedirectToAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_from_str(d)
    }
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ProxyAddrs>, D::Error> {
    let list = Vec::<ListenAddr>::deserialize(d)?;
    ProxyAddrs::from_list(list.into_iter().map(|a| a.0), "listen address")
        .map(Some)
        .map_err(de::Error::custom)
}

fn de_redirect_to<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ProxyAddrs>, D::Error> {
    let list = Vec::<RedirectToAddr>::deserialize(d)?;
    ProxyAddrs::from_list(list.into_iter().map(|a| a.0), "redirect-to address")
        .map(Some)
        .map_err(de::Error::custom)
}

/// Worker threads when neither flag nor file says.
///
/// A forwarding proxy runs one per CPU, as nginx's `worker_processes auto`: each waits on its
/// upstream for most of a request. The built-in mock answers from memory in a few microseconds
/// and serves processes on the same host, so it runs one: that thread answers well over
/// 100,000 requests/s, while a second worker on a small machine mostly takes CPU time from the
/// clients it serves (BENCHMARKS.md: on 2 CPUs, 148,000 requests/s with two workers against
/// 188,000 with one).
pub fn default_workers(backend: &Backend) -> usize {
    match backend {
        Backend::Mock { .. } => 1,
        Backend::Upstream(_) | Backend::External => {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// A number from 1 to `max`; `what` names it in the error.
fn parse_count(s: &str, what: &str, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid {what} {s:?}: expected a number from 1 to {max}"
        )),
    }
}

/// A config value checked by the same parser as its flag.
fn de_count<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<usize, String>,
) -> Result<Option<usize>, D::Error> {
    let n = u64::deserialize(d)?;
    parse(&n.to_string()).map(Some).map_err(de::Error::custom)
}

/// A worker count: 1 to 1024.
pub fn parse_workers(s: &str) -> Result<usize, String> {
    parse_count(s, "worker count", 1024)
}

fn de_workers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    de_count(d, parse_workers)
}

/// A namespace count, 1 to 65,536 (the kernel's table of served namespaces).
pub fn parse_max_namespaces(s: &str) -> Result<usize, String> {
    parse_count(
        s,
        "namespace count",
        redirect_common::MAX_SERVED_NETNS as usize,
    )
}

fn de_max_namespaces<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    de_count(d, parse_max_namespaces)
}

/// Parses durations such as `1s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}): expected e.g. 500ms, 5s, 1m"))
}

fn de_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map(Some).map_err(de::Error::custom)
}

/// A timeout that cannot be off: more than zero.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("invalid timeout {s:?}: must be more than 0s")),
        d => Ok(d),
    }
}

fn de_timeout_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_timeout(&s).map(Some).map_err(de::Error::custom)
}

/// A byte size: `65536`, `64KiB`, `1MiB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("invalid size {s:?} ({e}): expected e.g. 65536, 64KiB, 1MiB"))?;
    usize::try_from(size.as_u64()).map_err(|_| format!("size {s:?} is too large"))
}

fn de_size_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let s = String::deserialize(d)?;
    parse_size(&s).map(Some).map_err(de::Error::custom)
}

/// `--metrics-listen`: a loopback address (metrics name callers: not for the network).
pub fn parse_metrics_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("invalid metrics address {s:?}: expected ADDRESS:PORT, e.g. 127.0.0.1:9169")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "metrics address {s:?}: only a loopback address (127.0.0.1, ::1): the metrics name every caller"
        ));
    }
    Ok(addr)
}

fn de_metrics_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_metrics_listen(&s)
        .map(Some)
        .map_err(de::Error::custom)
}

/// A connection limit: 1 to 1,000,000.
pub fn parse_max_connections(s: &str) -> Result<usize, String> {
    parse_count(s, "connection limit", 1_000_000)
}

fn de_max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    de_count(d, parse_max_connections)
}

/// Settings for `redirect run` after defaults, file and flags are combined.
#[derive(Debug, Clone)]
pub struct Settings {
    pub backend: Backend,
    /// The addresses the built-in proxy listens on (redirected connects go to the ports after
    /// them, see `daemon::plan_endpoints`), or, with [`Backend::External`], the other
    /// program's proxy, where redirected connects go.
    pub proxy: ProxyAddrs,
    /// As given; resolved against the cgroup v2 mount at start. Empty means the mount's root.
    pub cgroups: Vec<PathBuf>,
    pub targets: Vec<Target>,
    pub control_socket: PathBuf,
    /// Where the links are pinned (the layout's version directory is made under it).
    pub pin_dir: PathBuf,
    /// Links unpinned: the redirect goes when the daemon does.
    pub fail_open: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are also served over TCP (loopback).
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    /// Take over from the daemon on the same control socket (`--replace`).
    pub replace: bool,
    pub shutdown_grace: Duration,
    /// Client connections idle this long between requests are closed; zero: never.
    pub idle_timeout: Duration,
    pub request_read_timeout: Duration,
    pub send_timeout: Duration,
    /// `None`: derived from the descriptor limit at start.
    pub max_connections: Option<usize>,
    pub ebpf_log: bool,
    /// Where Docker's events and container names come from.
    pub docker: DockerApi,
    /// What each caller may ask for.
    pub policy: crate::policy::Rules,
    /// Network namespaces served at once.
    pub max_namespaces: usize,
    /// The host's procfs.
    pub host_proc: PathBuf,
    /// Proxy worker threads, each with its own runtime and listening sockets.
    pub workers: usize,
    /// Load this object instead of the embedded one (development).
    pub ebpf_object: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// The built-in mocks, with these values; `default` serves callers whose policy names no
    /// cloud.
    Mock {
        default: CloudKind,
        values: Box<MockValues>,
    },
    Upstream(UpstreamSettings),
    /// No proxy here: redirected connects go to a proxy another program serves (`--redirect-to`).
    External,
}

impl Backend {
    /// Whether this daemon serves the proxy itself.
    pub fn serves(&self) -> bool {
        !matches!(self, Backend::External)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub url: UpstreamUrl,
    /// For `UpstreamUrl::CloudStack`: how the router is found.
    pub router: RouterSettings,
    /// Budget for the TCP connect to the upstream. SDKs give the whole request about 1 s.
    pub connect_timeout: Duration,
    /// Budget from sending the request to the end of the upstream's response.
    pub timeout: Duration,
    /// Largest request body forwarded; larger ones get 413.
    pub max_request_body: usize,
}

pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// nginx's `keepalive_timeout`, which HTTP clients and their connection pools are used to.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// The slowloris cut-off: the whole head within this of its first byte.
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// nginx's `send_timeout`.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Metadata requests carry no bodies (the IMDSv2 token PUT has none); this leaves room for
/// an endpoint that takes a small one.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 64 << 10;

/// What the flags of `redirect run` say; `None`/empty means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub mock: Option<CloudKind>,
    pub upstream: Option<UpstreamUrl>,
    pub redirect_to: Vec<RedirectToAddr>,
    pub listen: Vec<ListenAddr>,
    pub cgroups: Vec<PathBuf>,
    pub targets: Vec<Target>,
    pub control_socket: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub fail_open: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub replace: bool,
    pub upstream_connect_timeout: Option<Duration>,
    pub upstream_timeout: Option<Duration>,
    pub shutdown_grace: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub request_read_timeout: Option<Duration>,
    pub send_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub max_request_body: Option<usize>,
    pub ebpf_log: bool,
    pub ebpf_object: Option<PathBuf>,
    pub docker: Option<DockerApi>,
    pub max_namespaces: Option<usize>,
    pub host_proc: Option<PathBuf>,
    pub http_tokens: Option<crate::mock::ec2::HttpTokens>,
    pub workers: Option<usize>,
}

/// Where the daemon asks Docker about containers (`docker` key, `--docker` flag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerApi {
    /// `DOCKER_HOST` if set, else `/var/run/docker.sock`; absent is fine.
    Auto,
    Off,
    /// A Unix socket.
    Socket(PathBuf),
}

/// `auto`, `off`, or the socket as a path or `unix://` URL.
pub fn parse_docker(s: &str) -> Result<DockerApi, String> {
    match s {
        "auto" => Ok(DockerApi::Auto),
        "off" => Ok(DockerApi::Off),
        _ => {
            let path = s.strip_prefix("unix://").unwrap_or(s);
            if path.starts_with('/') {
                Ok(DockerApi::Socket(PathBuf::from(path)))
            } else {
                Err(format!(
                    "`{s}`: expected auto, off, or the path of Docker's socket (unix:///var/run/docker.sock)"
                ))
            }
        }
    }
}

fn de_docker_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DockerApi>, D::Error> {
    let s = String::deserialize(d)?;
    parse_docker(&s).map(Some).map_err(de::Error::custom)
}

impl Settings {
    /// Flags win over the file, the file over the defaults. A backend given by a flag replaces
    /// the file's backend (so `--mock` overrides a file's `upstream`).
    pub fn resolve(file: FileConfig, flags: Overrides) -> Result<Settings, String> {
        let flag_redirect_to = if flags.redirect_to.is_empty() {
            None
        } else {
            let addrs = flags.redirect_to.iter().map(|a| a.0);
            Some(ProxyAddrs::from_list(addrs, "redirect-to address")?)
        };
        let (mock, upstream, redirect_to) =
            if flags.mock.is_some() || flags.upstream.is_some() || flag_redirect_to.is_some() {
                (flags.mock, flags.upstream, flag_redirect_to)
            } else {
                (file.mock, file.upstream, file.redirect_to)
            };
        let mut ec2 = file.ec2;
        if let Some(t) = flags.http_tokens {
            ec2.http_tokens = t;
        }
        let values = MockValues {
            ec2,
            azure: file.azure,
            gcp: file.gcp,
            openstack: file.openstack,
            cloudstack: file.cloudstack,
        };
        let backend = match (mock, upstream, redirect_to.is_some()) {
            (Some(default), None, false) => Backend::Mock {
                default,
                values: Box::new(values),
            },
            (None, Some(url), false) => Backend::Upstream(UpstreamSettings {
                url,
                router: {
                    let defaults = RouterSettings::default();
                    let raw = file.cloudstack_router;
                    RouterSettings {
                        lease_dirs: raw.lease_dirs.unwrap_or(defaults.lease_dirs),
                        interface: raw.interface,
                        recheck: raw.recheck.unwrap_or(defaults.recheck),
                    }
                },
                connect_timeout: flags
                    .upstream_connect_timeout
                    .or(file.upstream_connect_timeout)
                    .unwrap_or(DEFAULT_UPSTREAM_CONNECT_TIMEOUT),
                timeout: flags
                    .upstream_timeout
                    .or(file.upstream_timeout)
                    .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT),
                max_request_body: flags
                    .max_request_body
                    .or(file.max_request_body)
                    .unwrap_or(DEFAULT_MAX_REQUEST_BODY),
            }),
            (None, None, true) => Backend::External,
            (None, None, false) => {
                return Err(
                    "nothing to serve: pass --mock [ec2|azure|gcp|openstack|cloudstack] (a built-in mock), --upstream URL or --redirect-to \
                     ADDR:PORT, or set `mock`, `upstream` or `redirect_to` in the config file"
                        .to_owned(),
                );
            }
            _ => {
                return Err(
                    "the config sets more than one of `mock`, `upstream` and `redirect_to`; choose one"
                        .to_owned(),
                );
            }
        };
        let listen = if flags.listen.is_empty() {
            file.listen
        } else {
            Some(ProxyAddrs::from_list(
                flags.listen.iter().map(|a| a.0),
                "listen address",
            )?)
        };
        let proxy = match (redirect_to, listen) {
            (Some(_), Some(_)) => {
                return Err(
                    "--redirect-to sends connects to a proxy this daemon does not serve, so a listen \
                     address has no use with it; give one or the other"
                        .to_owned(),
                );
            }
            (Some(external), None) => external,
            (None, listen) => listen.unwrap_or(ProxyAddrs {
                v4: Some(DEFAULT_LISTEN),
                v6: None,
            }),
        };
        let targets = non_empty(flags.targets)
            .or(file.targets)
            .unwrap_or_else(|| match &backend {
                // The router's password server too (`DomU_Request`, port 8080).
                Backend::Mock {
                    default: CloudKind::CloudStack,
                    ..
                }
                | Backend::Upstream(UpstreamSettings {
                    url: UpstreamUrl::CloudStack,
                    ..
                }) => {
                    let mut targets = default_targets();
                    targets.push(Target(SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::new(169, 254, 169, 254),
                        8080,
                    ))));
                    targets
                }
                _ => default_targets(),
            });
        if proxy.v4.is_none() && targets.iter().any(|t| t.0.is_ipv4()) {
            return Err(
                "IPv4 targets need an IPv4 proxy address: an IPv4 connect can only be sent to an IPv4 address"
                    .to_owned(),
            );
        }
        let max = redirect_common::MAX_TARGETS as usize;
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let n = targets.iter().filter(|t| t.0.is_ipv4() == v4).count();
            if n > max {
                return Err(format!("{n} {family} targets: at most {max} are supported"));
            }
        }
        let workers = flags
            .workers
            .or(file.workers)
            .unwrap_or_else(|| default_workers(&backend));
        Ok(Settings {
            backend,
            proxy,
            cgroups: non_empty(flags.cgroups)
                .or(file.cgroups)
                .unwrap_or_default(),
            targets,
            control_socket: flags
                .control_socket
                .or(file.control_socket)
                .unwrap_or_else(paths::default_control_socket),
            pin_dir: flags
                .pin_dir
                .or(file.pin_dir)
                .unwrap_or_else(|| PathBuf::from(paths::PIN_DIR)),
            fail_open: flags.fail_open || file.fail_open.unwrap_or(false),
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            state_dir: flags
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(paths::STATE_DIR)),
            replace: flags.replace,
            shutdown_grace: flags
                .shutdown_grace
                .or(file.shutdown_grace)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            idle_timeout: flags
                .idle_timeout
                .or(file.idle_timeout)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT),
            request_read_timeout: flags
                .request_read_timeout
                .or(file.request_read_timeout)
                .unwrap_or(DEFAULT_REQUEST_READ_TIMEOUT),
            send_timeout: flags
                .send_timeout
                .or(file.send_timeout)
                .unwrap_or(DEFAULT_SEND_TIMEOUT),
            max_connections: flags.max_connections.or(file.max_connections),
            ebpf_log: flags.ebpf_log || file.ebpf_log.unwrap_or(false),
            docker: flags.docker.or(file.docker).unwrap_or(DockerApi::Auto),
            policy: crate::policy::Rules {
                rules: file.policy,
                labels: file.container_labels.unwrap_or(true),
            },
            max_namespaces: flags
                .max_namespaces
                .or(file.max_namespaces)
                .unwrap_or(crate::netns::MAX_NAMESPACES),
            host_proc: flags
                .host_proc
                .or(file.host_proc)
                .unwrap_or_else(|| PathBuf::from(paths::HOST_PROC)),
            workers,
            ebpf_object: flags.ebpf_object,
        })
    }
}

/// Where the settings come from, kept so that SIGHUP can read them again.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub flags: Overrides,
}

impl Sources {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let file = match &self.file {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Settings::resolve(file, self.flags.clone()).map_err(anyhow::Error::msg)
    }
}

impl Settings {
    /// The settings (config keys) that differ in `new` and take effect only on a restart:
    /// all but the mocks' values and the policy rules, which a reload applies.
    pub fn restart_only_changes(&self, new: &Settings) -> Vec<&'static str> {
        let same_backend = match (&self.backend, &new.backend) {
            (Backend::Mock { default: a, .. }, Backend::Mock { default: b, .. }) => a == b,
            (a, b) => a == b,
        };
        [
            (
                "mock/upstream/redirect_to (and the upstream's settings)",
                same_backend,
            ),
            ("listen", self.proxy == new.proxy),
            ("cgroups", self.cgroups == new.cgroups),
            ("targets", self.targets == new.targets),
            ("control_socket", self.control_socket == new.control_socket),
            ("pin_dir", self.pin_dir == new.pin_dir),
            ("metrics_listen", self.metrics_listen == new.metrics_listen),
            ("state_dir", self.state_dir == new.state_dir),
            ("fail_open", self.fail_open == new.fail_open),
            ("shutdown_grace", self.shutdown_grace == new.shutdown_grace),
            ("idle_timeout", self.idle_timeout == new.idle_timeout),
            ("docker", self.docker == new.docker),
            ("max_namespaces", self.max_namespaces == new.max_namespaces),
            ("host_proc", self.host_proc == new.host_proc),
            (
                "request_read_timeout",
                self.request_read_timeout == new.request_read_timeout,
            ),
            ("send_timeout", self.send_timeout == new.send_timeout),
            (
                "max_connections",
                self.max_connections == new.max_connections,
            ),
            ("ebpf_log", self.ebpf_log == new.ebpf_log),
            ("workers", self.workers == new.workers),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect()
    }
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::ec2::HttpTokens;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(text, Path::new("/etc/redirect.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let file = parse("").unwrap();
        let s = Settings::resolve(
            file,
            Overrides {
                mock: Some(CloudKind::Ec2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.proxy.v4, Some(DEFAULT_LISTEN));
        assert_eq!(s.proxy.v6, None);
        assert_eq!(s.targets, default_targets());
        assert!(s.cgroups.is_empty());
        assert_eq!(s.control_socket, paths::default_control_socket());
        assert_eq!(s.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(s.request_read_timeout, DEFAULT_REQUEST_READ_TIMEOUT);
        assert_eq!(s.send_timeout, DEFAULT_SEND_TIMEOUT);
        assert_eq!(
            s.max_connections, None,
            "derived from the descriptor limit at start"
        );
        assert!(!s.ebpf_log);
    }

    /// What SIGHUP applies live (the mock's values) and what it names for a restart.
    #[test]
    fn a_reload_names_what_needs_a_restart() {
        let mock = Overrides {
            mock: Some(CloudKind::Ec2),
            ..Default::default()
        };
        let before = Settings::resolve(parse("").unwrap(), mock.clone()).unwrap();
        let same_but_values = parse("[ec2]\ninstance_id = \"i-new\"\n").unwrap();
        let after = Settings::resolve(same_but_values, mock.clone()).unwrap();
        assert!(
            before.restart_only_changes(&after).is_empty(),
            "mock values change live"
        );
        let moved = parse("listen = [\"127.0.0.1:9\"]\nsend_timeout = \"1s\"\n").unwrap();
        let after = Settings::resolve(moved, mock).unwrap();
        assert_eq!(
            before.restart_only_changes(&after),
            ["listen", "send_timeout"]
        );
        let upstream = Overrides {
            upstream: Some("http://127.0.0.1:9".parse().unwrap()),
            ..Default::default()
        };
        let after = Settings::resolve(parse("").unwrap(), upstream).unwrap();
        assert_eq!(
            before.restart_only_changes(&after),
            [
                "mock/upstream/redirect_to (and the upstream's settings)",
                "workers"
            ]
        );
    }

    #[test]
    fn full_file_parses() {
        let file = parse(
            r#"
            upstream = "http://169.254.169.254"
            listen = ["10.1.0.1:9000", "[fd00::1]:9000"]
            cgroups = ["/sys/fs/cgroup/app"]
            targets = ["169.254.169.254:80", "169.254.170.2:80"]
            control_socket = "/tmp/r.sock"
            upstream_connect_timeout = "250ms"
            upstream_timeout = "2s"
            shutdown_grace = "1s"
            idle_timeout = "0s"
            request_read_timeout = "3s"
            send_timeout = "20s"
            max_connections = 500
            max_request_body = "1MiB"
            ebpf_log = true

            [ec2]
            instance_id = "i-0abc"
            http_tokens = "required"
            "#,
        )
        .unwrap();
        assert_eq!(file.ec2.instance_id, "i-0abc");
        assert_eq!(file.ec2.http_tokens, HttpTokens::Required);
        let s = Settings::resolve(file, Overrides::default()).unwrap();
        let Backend::Upstream(up) = &s.backend else {
            panic!("expected upstream")
        };
        assert_eq!(up.url.to_string(), "http://169.254.169.254");
        assert_eq!(up.connect_timeout, Duration::from_millis(250));
        assert_eq!(up.timeout, Duration::from_secs(2));
        assert_eq!(up.max_request_body, 1 << 20);
        assert_eq!(s.request_read_timeout, Duration::from_secs(3));
        assert_eq!(s.send_timeout, Duration::from_secs(20));
        assert_eq!(s.max_connections, Some(500));
        assert_eq!(s.proxy.v4, Some("10.1.0.1:9000".parse().unwrap()));
        assert_eq!(s.proxy.v6, Some("[fd00::1]:9000".parse().unwrap()));
        assert_eq!(s.targets.len(), 2);
        assert_eq!(s.control_socket, PathBuf::from("/tmp/r.sock"));
        assert_eq!(s.shutdown_grace, Duration::from_secs(1));
        assert_eq!(s.idle_timeout, Duration::ZERO, "0s: never");
        assert!(s.ebpf_log);
    }

    #[test]
    fn flags_override_file() {
        let file = parse(
            "upstream = \"http://10.0.0.1\"\nlisten = [\"127.0.0.1:1\"]\ncgroups = [\"/a\"]\nidle_timeout = \"5s\"\n[ec2]\nhttp_tokens = \"optional\"\n",
        )
        .unwrap();
        let s = Settings::resolve(
            file,
            Overrides {
                mock: Some(CloudKind::Ec2),
                listen: vec!["127.0.0.2:2".parse().unwrap()],
                cgroups: vec!["/b".into(), "/c".into()],
                http_tokens: Some(HttpTokens::Required),
                idle_timeout: Some(Duration::from_secs(9)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.idle_timeout, Duration::from_secs(9));
        let Backend::Mock { values, .. } = &s.backend else {
            panic!("--mock must win over the file's upstream")
        };
        assert_eq!(values.ec2.http_tokens, HttpTokens::Required);
        assert_eq!(s.proxy.v4, Some("127.0.0.2:2".parse().unwrap()));
        assert_eq!(s.cgroups, vec![PathBuf::from("/b"), PathBuf::from("/c")]);
    }

    #[test]
    fn worker_defaults_follow_the_backend() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = |text: &str, flag: Option<usize>| {
            let flags = Overrides {
                workers: flag,
                ..Default::default()
            };
            Settings::resolve(parse(text).unwrap(), flags)
                .unwrap()
                .workers
        };
        assert_eq!(workers("mock = \"ec2\"", None), 1);
        assert_eq!(workers("upstream = \"http://10.0.0.1\"", None), cpus);
        assert_eq!(workers("mock = \"ec2\"\nworkers = 3", None), 3);
        assert_eq!(workers("mock = \"ec2\"\nworkers = 3", Some(2)), 2);
        assert_eq!(workers("upstream = \"http://10.0.0.1\"", Some(5)), 5);
    }

    #[test]
    fn policy_rules_parse_and_a_bad_rule_is_named() {
        let file = parse(
            "mock = \"ec2\"\ncontainer_labels = false\n\n[[policy]]\ncontainer = \"demo/app\"\nec2_role = \"app-role\"\n\n[[policy]]\nimage = \"myorg/*\"\nallow = [\"/latest/meta-data/placement/\"]\n",
        )
        .unwrap();
        let s = Settings::resolve(file, Overrides::default()).unwrap();
        assert!(!s.policy.labels);
        assert_eq!(s.policy.rules.len(), 2);
        assert_eq!(
            s.policy.rules[0].policy.identity.as_deref(),
            Some("app-role")
        );
        assert_eq!(s.policy.rules[1].image.as_deref(), Some("myorg/*"));

        let e = err("mock = \"ec2\"\n[[policy]]\ndeny = true\n");
        assert!(e.contains("line 2, key `policy[0]`"), "{e}");
        assert!(e.contains("needs `container`, `image` or `cgroup`"), "{e}");
        let e = err("[[policy]]\ncontainer = \"x\"\nallow = [\"latest\"]\n");
        assert!(e.contains("is not a path"), "{e}");
        let e = err("[[policy]]\ncontainer = \"x\"\nrole = \"y\"\n");
        assert!(e.contains("unknown field `role`"), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err("mock = \"ec2\"\n\nlisten = [\"127.0.0.1:80\", \"nonsense\"]\n");
        assert!(
            e.starts_with("config /etc/redirect.toml line 3, key `listen"),
            "{e}"
        );
        assert!(e.contains("invalid listen address \"nonsense\""), "{e}");

        let e = err("mock = \"ec2\"\n[ec2]\nhttp_tokens = \"sometimes\"\n");
        assert!(e.contains("line 3, key `ec2.http_tokens`"), "{e}");
        assert!(e.contains("unknown variant `sometimes`"), "{e}");

        let e = err("mock = \"ec2\"\nlisten_addr = \"x\"\n");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("unknown field `listen_addr`"), "{e}");

        let e = err("upstream = \"https://169.254.169.254\"\n");
        assert!(e.contains("line 1, key `upstream`"), "{e}");
        assert!(e.contains("not supported"), "{e}");

        let e = err("upstream_timeout = \"soon\"\n");
        assert!(
            e.contains("key `upstream_timeout`: invalid duration"),
            "{e}"
        );

        let e = err("listen = [\"127.0.0.1:1\", \"127.0.0.2:2\"]\n");
        assert!(
            e.contains("line 1, key `listen`: more than one IPv4 listen address"),
            "{e}"
        );

        let e = err("targets = [\"[::ffff:169.254.169.254]:80\"]\n");
        assert!(e.contains("key `targets[0]`"), "{e}");

        let e = err("send_timeout = \"0s\"\n");
        assert!(
            e.contains("key `send_timeout`: invalid timeout \"0s\": must be more than 0s"),
            "{e}"
        );
        let e = err("max_connections = 0\n");
        assert!(
            e.contains("key `max_connections`: invalid connection limit"),
            "{e}"
        );
        let e = err("max_request_body = \"lots\"\n");
        assert!(
            e.contains("key `max_request_body`: invalid size \"lots\""),
            "{e}"
        );

        // Syntax errors have a line but no key.
        let e = err("mock = \"ec2\"\nlisten = [\n");
        assert!(e.starts_with("config /etc/redirect.toml line "), "{e}");
    }

    #[test]
    fn missing_backend_and_conflicts_are_errors() {
        let e = Settings::resolve(FileConfig::default(), Overrides::default()).unwrap_err();
        assert!(e.contains("--mock"), "{e}");
        let file = parse("mock = \"ec2\"\nupstream = \"http://a\"\n").unwrap();
        let e = Settings::resolve(file, Overrides::default()).unwrap_err();
        assert!(e.contains("more than one of"), "{e}");
        let e = Settings::resolve(
            FileConfig::default(),
            Overrides {
                mock: Some(CloudKind::Ec2),
                listen: vec!["[::1]:8169".parse().unwrap()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("IPv4 targets need an IPv4 proxy address"), "{e}");
        let too_many = (0..=redirect_common::MAX_TARGETS)
            .map(|i| format!("\"10.{}.{}.1:80\"", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(", ");
        let file = parse(&format!("mock = \"ec2\"\ntargets = [{too_many}]\n")).unwrap();
        let e = Settings::resolve(file, Overrides::default()).unwrap_err();
        assert_eq!(e, "16385 IPv4 targets: at most 16384 are supported");
    }

    #[test]
    fn redirect_to_an_external_proxy() {
        let file = parse("mock = \"ec2\"\nredirect_to = [\"127.0.0.1:9000\"]\n").unwrap();
        let e = Settings::resolve(file, Overrides::default()).unwrap_err();
        assert!(e.contains("more than one of"), "{e}");

        let file = parse("redirect_to = [\"127.0.0.1:9000\", \"[::1]:9000\"]\n").unwrap();
        let s = Settings::resolve(file, Overrides::default()).unwrap();
        assert!(matches!(s.backend, Backend::External) && !s.backend.serves());
        assert_eq!(s.proxy.v4, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(s.proxy.v6, Some("[::1]:9000".parse().unwrap()));

        // A flag's backend replaces the file's, in both directions.
        let file = parse("mock = \"ec2\"\n").unwrap();
        let flags = Overrides {
            redirect_to: vec!["127.0.0.1:9001".parse().unwrap()],
            ..Default::default()
        };
        let s = Settings::resolve(file, flags).unwrap();
        assert!(matches!(s.backend, Backend::External));
        let file = parse("redirect_to = [\"127.0.0.1:9000\"]\n").unwrap();
        let flags = Overrides {
            mock: Some(CloudKind::Ec2),
            ..Default::default()
        };
        let s = Settings::resolve(file, flags).unwrap();
        assert!(matches!(s.backend, Backend::Mock { .. }));
        assert_eq!(
            s.proxy.v4,
            Some(DEFAULT_LISTEN),
            "the file's redirect_to is not a listen address"
        );

        let file =
            parse("redirect_to = [\"127.0.0.1:9000\"]\nlisten = [\"127.0.0.1:1\"]\n").unwrap();
        let e = Settings::resolve(file, Overrides::default()).unwrap_err();
        assert!(e.contains("a listen address has no use"), "{e}");

        let e = err("redirect_to = [\"127.0.0.1:0\"]\n");
        assert!(
            e.contains("key `redirect_to[0]`: invalid redirect-to address \"127.0.0.1:0\": port 0"),
            "{e}"
        );
        let e = err("redirect_to = [\"[::1]:1\", \"[::1]:2\"]\n");
        assert!(e.contains("more than one IPv6 redirect-to address"), "{e}");
    }

    #[test]
    fn address_validation() {
        assert!("0.0.0.0:8169".parse::<ListenAddr>().is_err());
        assert!("[::]:8169".parse::<ListenAddr>().is_err());
        assert!(
            "127.0.0.1:0".parse::<ListenAddr>().is_ok(),
            "port 0 picks a free port"
        );
        assert!("169.254.169.254:0".parse::<Target>().is_err());
        assert!("169.254.169.254".parse::<Target>().is_err());
        assert!("[fd00:ec2::254]:80".parse::<Target>().is_ok());
        assert!(
            "http://169.254.169.254/latest"
                .parse::<UpstreamUrl>()
                .is_err()
        );
        assert!("169.254.169.254".parse::<UpstreamUrl>().is_err());
        assert_eq!(
            "http://169.254.169.254:8080/"
                .parse::<UpstreamUrl>()
                .unwrap()
                .to_string(),
            "http://169.254.169.254:8080"
        );
    }

    /// The README's config file is one the daemon takes, every table included.
    #[test]
    fn the_readme_config_parses() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("## Config file").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let block = &section[start..start + section[start..].find("```").unwrap()];
        let file =
            FileConfig::parse(block, Path::new("README.md")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(file.mock, Some(CloudKind::Ec2));
        assert_eq!(file.azure.user_assigned.len(), 1);
        assert_eq!(
            file.cloudstack_router.recheck,
            Some(Duration::from_secs(30))
        );
        Settings::resolve(file, Overrides::default()).unwrap();
    }

    /// CloudStack, mocked or upstream, also redirects the router's password server port.
    #[test]
    fn cloudstack_adds_the_password_server_target() {
        let password: Target = "169.254.169.254:8080".parse().unwrap();
        for text in ["mock = \"cloudstack\"", "upstream = \"cloudstack\""] {
            let s = Settings::resolve(parse(text).unwrap(), Overrides::default()).unwrap();
            assert!(s.targets.contains(&password), "{text}");
            assert_eq!(s.targets.len(), 3, "{text}");
        }
        let s =
            Settings::resolve(parse("mock = \"azure\"").unwrap(), Overrides::default()).unwrap();
        assert_eq!(s.targets, default_targets());
        let Backend::Upstream(up) = Settings::resolve(
            parse("upstream = \"cloudstack\"\n[cloudstack_router]\nrecheck = \"5s\"\n").unwrap(),
            Overrides::default(),
        )
        .unwrap()
        .backend
        else {
            panic!("upstream")
        };
        assert_eq!(up.url, UpstreamUrl::CloudStack);
        assert_eq!(up.router.recheck, Duration::from_secs(5));
        let e = parse("upstream = \"cloudstack\"\n[cloudstack_router]\nrecheck = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cloudstack_router.recheck"), "{e}");
    }
}
