//! The built-in OpenStack metadata service: nova's metadata API as a guest reaches it at
//! 169.254.169.254, through neutron's metadata proxy.
//!
//! Wire behaviour follows nova's `nova/api/metadata/base.py` and `handler.py` (Debian's
//! 26.2.2 package) and neutron's `agent/metadata/proxy_base.py`:
//! - `/openstack` lists nova's OpenStack versions (2012-08-10 .. 2020-10-14, then `latest`),
//!   `/openstack/<v>/` lists what that version serves; `/` lists the EC2-compatible versions
//!   (1.0 .. 2009-04-04, `latest`), and every other path is looked up in the EC2-compatible
//!   tree, whose `latest` is 2009-04-04.
//! - Paths are normalized as nova does (`posixpath.normpath`: `..`, `.`, repeated and trailing
//!   slashes), after the WSGI server's percent-decoding.
//! - nova ignores the method (a PUT or POST is answered like a GET) except at `password`
//!   (GET reads, POST sets once: 409 after, 400 when too long; any other method 400). So
//!   IMDSv2's `PUT /latest/api/token` gets a 404, on which botocore and cloud-init go on
//!   without a token.
//! - Errors are webob's pages, which neutron's proxy regenerates from the status code with the
//!   guest's `Accept` header: HTML for `*/*` (curl, python-requests), JSON or plain text
//!   otherwise. A path that runs past a leaf (`instance-id/x`) makes nova raise a TypeError:
//!   500, as neutron reports it.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    header::{self, HeaderValue},
};
use serde::Deserialize;

use super::{Answer, Cloud, CloudKind, Resp};

/// The EC2-compatible API versions nova serves; `latest` is the last.
const EC2_VERSIONS: [&str; 9] = [
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
];

/// nova's OpenStack metadata versions (FOLSOM .. VICTORIA); `latest` is the last.
const OS_VERSIONS: [&str; 9] = [
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
];
// Indexes into OS_VERSIONS of the versions that added something.
const GRIZZLY: usize = 1; // random_seed, password
const HAVANA: usize = 2; // vendor_data.json
const LIBERTY: usize = 3; // project_id, network_data.json listed
const NEWTON_ONE: usize = 4; // devices
const NEWTON_TWO: usize = 5; // vendor_data2.json
const VICTORIA: usize = 8; // dedicated_cpus

/// nova's password store: four system-metadata chunks of 255 characters.
const MAX_PASSWORD: usize = 4 * 255;

const TEXT: &str = "text/plain; charset=UTF-8";
const JSON: &str = "application/json";
/// webob's default for a response whose handler set no type (the password endpoint).
const HTML: &str = "text/html; charset=UTF-8";

/// The values the mock serves. Every field has a default; `[openstack]` in the config
/// overrides them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenStackValues {
    pub uuid: String,
    /// The display name (`name`).
    pub name: String,
    /// As served (`hostname`, EC2 `hostname`/`local-hostname`/`public-hostname`): the
    /// instance's hostname with nova's `dhcp_domain`, `novalocal` by default.
    pub hostname: String,
    pub availability_zone: String,
    pub project_id: String,
    pub launch_index: u32,
    /// The key pair the instance was booted with, `[name, public key]`: nova takes at most one.
    /// None: booted without a key (no `public_keys`, `keys`, EC2 `public-keys/`).
    pub key_pair: Option<(String, String)>,
    /// `nova boot --property k=v`; `meta` is left out while empty, as nova does.
    pub meta: BTreeMap<String, String>,
    /// `user_data` (EC2 `user-data`); None: 404 and not listed, as nova.
    pub user_data: Option<String>,
    /// What GET `password` answers (the guest-encrypted password); None: not set, an empty
    /// answer, and a guest may POST one.
    pub password: Option<String>,
    /// The deployer's static vendor data: `vendor_data.json`, and `static` in
    /// `vendor_data2.json`.
    pub vendor_data: serde_json::Map<String, serde_json::Value>,
    /// nova's integer id, shown as `i-%08x` in the EC2 tree.
    pub ec2_id: u32,
    pub ami_id: String,
    pub reservation_id: String,
    /// The flavor's name (EC2 `instance-type`).
    pub instance_type: String,
    pub security_groups: Vec<String>,
    /// The port's fixed IPv4 address.
    pub local_ipv4: Ipv4Addr,
    /// EC2 `public-ipv4`; None: empty, as for an instance without a floating IP.
    pub floating_ip: Option<Ipv4Addr>,
    /// network_data.json: the port (the link is `tap` + its first 11 characters).
    pub mac: String,
    pub port_id: String,
    pub network_id: String,
    /// The network's MTU (null when unset).
    pub mtu: Option<u16>,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub dns_nameservers: Vec<Ipv4Addr>,
    /// Whether the subnet has DHCP enabled: nova then serves an `ipv4_dhcp` network without
    /// address or routes, and a null MTU; off, a static `ipv4` one.
    pub dhcp: bool,
}

impl Default for OpenStackValues {
    fn default() -> Self {
        OpenStackValues {
            uuid: "6f2a2c4e-1b7d-4c55-9a43-3e5d8c1f0b27".into(),
            name: "redirect-mock".into(),
            hostname: "redirect-mock.novalocal".into(),
            availability_zone: "nova".into(),
            project_id: "8d1f5f6b0b9a4c2e9f3d7a6b5c4e3f21".into(),
            launch_index: 0,
            // A key nobody holds the private half of (generated for the mock, then dropped).
            key_pair: Some((
                "redirect-mock".into(),
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdn64tja8pwcDUbaCmvStoVpTGDi5Ee8Qb40/GlwW1i redirect-mock".into(),
            )),
            meta: BTreeMap::new(),
            user_data: None,
            password: None,
            vendor_data: serde_json::Map::new(),
            ec2_id: 42,
            ami_id: "ami-00000001".into(),
            reservation_id: "r-3l0c1sxp".into(),
            instance_type: "m1.small".into(),
            security_groups: vec!["default".into()],
            local_ipv4: Ipv4Addr::new(10, 0, 0, 42),
            floating_ip: None,
            mac: "fa:16:3e:5c:21:9d".into(),
            port_id: "b7c2e3a4-5d6f-4a1b-8c9d-0e1f2a3b4c5d".into(),
            network_id: "1a2b3c4d-5e6f-4789-8abc-def012345678".into(),
            mtu: Some(1450),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns_nameservers: vec![Ipv4Addr::new(10, 0, 0, 2)],
            dhcp: false,
        }
    }
}

/// The mock, whose values a reload replaces (SIGHUP).
pub struct OpenStackMock {
    current: RwLock<Arc<Instance>>,
}

struct Instance {
    values: OpenStackValues,
    /// A password a guest POSTed (nova keeps it in the instance's system metadata).
    posted: Mutex<Option<String>>,
}

/// What a path names.
enum Found {
    Body(Bytes, &'static str),
    Password,
    /// nova's lookup failed: 404.
    Missing,
    /// nova raised something else (a TypeError): 500.
    Broken,
}

impl OpenStackMock {
    pub fn new(values: OpenStackValues) -> Self {
        OpenStackMock {
            current: RwLock::new(Arc::new(Instance {
                values,
                posted: Mutex::new(None),
            })),
        }
    }

    /// Serves `values` from now on; false when they are the ones served already. A password a
    /// guest posted stays while the instance (its uuid) does.
    pub fn reload(&self, values: OpenStackValues) -> bool {
        let current = self.instance();
        if current.values == values {
            return false;
        }
        let posted = if current.values.uuid == values.uuid {
            current.posted().clone()
        } else {
            None
        };
        let next = Instance {
            values,
            posted: Mutex::new(posted),
        };
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        true
    }

    fn instance(&self) -> Arc<Instance> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn respond(&self, req: &Request<Bytes>) -> Resp {
        let instance = self.instance();
        let flavor = Flavor::negotiate(req.headers());
        let head = req.method() == Method::HEAD;
        let Some(path) = decode_path(req.uri().path()) else {
            return webob_error(StatusCode::NOT_FOUND, flavor, head);
        };
        match instance.lookup(&path) {
            Found::Body(body, content_type) => ok(body, content_type),
            Found::Password => instance.password(req, flavor),
            Found::Missing => webob_error(StatusCode::NOT_FOUND, flavor, head),
            Found::Broken => webob_error(StatusCode::INTERNAL_SERVER_ERROR, flavor, head),
        }
    }
}

impl Cloud for OpenStackMock {
    fn kind(&self) -> CloudKind {
        CloudKind::OpenStack
    }

    fn handle(&self, req: &Request<Bytes>, _identity: Option<&str>) -> Answer {
        Answer::Now(self.respond(req))
    }

    /// neutron's answer when nova refuses its signature: webob's 403 page.
    fn forbidden(&self) -> Resp {
        webob_error(StatusCode::FORBIDDEN, Flavor::Html, false)
    }
}

impl Instance {
    fn posted(&self) -> MutexGuard<'_, Option<String>> {
        self.posted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// nova's `InstanceMetadata.lookup`, on a decoded path.
    fn lookup(&self, path: &str) -> Found {
        let path = if path.starts_with('/') {
            normpath(path)
        } else {
            normpath(&format!("/{path}"))
        };
        let mut tokens: Vec<&str> = path.split('/').skip(1).collect();
        if tokens.first() != Some(&"ec2") && tokens.first() != Some(&"openstack") {
            // Anything else is the EC2 tree; an empty first token ("/", or "//x", which
            // normpath keeps) is its version list.
            if tokens.first().is_none_or(|t| t.is_empty()) {
                tokens = vec!["ec2"];
            } else {
                tokens.insert(0, "ec2");
            }
        }
        match tokens.as_slice() {
            ["openstack"] => {
                let versions: Vec<&str> = OS_VERSIONS.iter().copied().chain(["latest"]).collect();
                Found::Body(versions.join("\n").into(), TEXT)
            }
            ["ec2"] => {
                let versions: Vec<&str> = EC2_VERSIONS.iter().copied().chain(["latest"]).collect();
                Found::Body(versions.join("\n").into(), TEXT)
            }
            ["openstack", rest @ ..] => self.openstack(rest),
            ["ec2", version, rest @ ..] => self.ec2(version, rest),
            _ => Found::Missing,
        }
    }

    fn openstack(&self, tokens: &[&str]) -> Found {
        // `content/<n>` holds config-drive files; the metadata service has none.
        if tokens[0] == "content" {
            return Found::Missing;
        }
        let version = match tokens[0] {
            "latest" => OS_VERSIONS.len() - 1,
            v => match OS_VERSIONS.iter().position(|known| *known == v) {
                Some(i) => i,
                None => return Found::Missing,
            },
        };
        let item = if tokens.len() == 1 {
            "version".to_owned()
        } else {
            tokens[1..].join("/")
        };
        let v = &self.values;
        match item.as_str() {
            "version" => Found::Body(self.listing(version).into(), TEXT),
            "meta_data.json" => Found::Body(self.meta_data(version).into(), JSON),
            // nova serves it at every version, though it lists it from LIBERTY on, and
            // leaves the type text/plain.
            "network_data.json" => Found::Body(self.network_data().into(), TEXT),
            "user_data" => match &v.user_data {
                Some(data) => Found::Body(Bytes::from(data.clone()), TEXT),
                None => Found::Missing,
            },
            "password" if version >= GRIZZLY => Found::Password,
            "vendor_data.json" if version >= HAVANA => {
                Found::Body(py_json(&Json::from(&v.vendor_data)).into(), JSON)
            }
            "vendor_data2.json" if version >= NEWTON_TWO => {
                // One key per vendordata provider; the default is StaticJSON alone.
                let doc = Json::Obj(vec![("static".into(), Json::from(&v.vendor_data))]);
                Found::Body(py_json(&doc).into(), JSON)
            }
            // nova's route table maps `content` to a handler called with the wrong arguments.
            "content" => Found::Broken,
            _ => Found::Missing,
        }
    }

    fn listing(&self, version: usize) -> String {
        let mut entries = vec!["meta_data.json"];
        if self.values.user_data.is_some() {
            entries.push("user_data");
        }
        if version >= GRIZZLY {
            entries.push("password");
        }
        if version >= HAVANA {
            entries.push("vendor_data.json");
        }
        if version >= LIBERTY {
            entries.push("network_data.json");
        }
        if version >= NEWTON_TWO {
            entries.push("vendor_data2.json");
        }
        entries.join("\n")
    }

    /// meta_data.json with nova's key order and fields per version.
    fn meta_data(&self, version: usize) -> String {
        let v = &self.values;
        let s = |s: &str| Json::Str(s.to_owned());
        let mut doc = vec![("uuid".to_owned(), s(&v.uuid))];
        if !v.meta.is_empty() {
            let meta = v.meta.iter().map(|(k, val)| (k.clone(), s(val))).collect();
            doc.push(("meta".into(), Json::Obj(meta)));
        }
        if let Some((name, key)) = &v.key_pair {
            doc.push((
                "public_keys".into(),
                Json::Obj(vec![(name.clone(), s(key))]),
            ));
            doc.push((
                "keys".into(),
                Json::List(vec![Json::Obj(vec![
                    ("name".into(), s(name)),
                    ("type".into(), s("ssh")),
                    ("data".into(), s(key)),
                ])]),
            ));
        }
        doc.push(("hostname".into(), s(&v.hostname)));
        doc.push(("name".into(), s(&v.name)));
        doc.push(("launch_index".into(), Json::Num(v.launch_index.to_string())));
        doc.push(("availability_zone".into(), s(&v.availability_zone)));
        if version >= GRIZZLY {
            // Fresh for every request: nova calls os.urandom(512) each time it renders.
            let mut seed = [0u8; 512];
            getrandom::fill(&mut seed).expect("the kernel's random source is unavailable");
            doc.push(("random_seed".into(), Json::Str(STANDARD.encode(seed))));
        }
        if version >= LIBERTY {
            doc.push(("project_id".into(), s(&v.project_id)));
        }
        if version >= NEWTON_ONE {
            // Only tagged devices are listed; the mock's have no tags.
            doc.push(("devices".into(), Json::List(Vec::new())));
        }
        if version >= VICTORIA {
            doc.push(("dedicated_cpus".into(), Json::List(Vec::new())));
        }
        py_json(&Json::Obj(doc))
    }

    /// network_data.json as nova's `netutils.get_network_metadata` renders one port on an OVS
    /// network.
    fn network_data(&self) -> String {
        let v = &self.values;
        let s = |s: &str| Json::Str(s.to_owned());
        let link_id = format!("tap{}", v.port_id.chars().take(11).collect::<String>());
        let dns: Vec<Json> = v
            .dns_nameservers
            .iter()
            .map(|ip| {
                Json::Obj(vec![
                    ("type".into(), s("dns")),
                    ("address".into(), s(&ip.to_string())),
                ])
            })
            .collect();
        let mtu = match v.mtu {
            Some(mtu) if !v.dhcp => Json::Num(mtu.to_string()),
            _ => Json::Null,
        };
        let link = Json::Obj(vec![
            ("id".into(), s(&link_id)),
            ("vif_id".into(), s(&v.port_id)),
            ("type".into(), s("ovs")),
            ("mtu".into(), mtu),
            ("ethernet_mac_address".into(), s(&v.mac)),
        ]);
        let network = if v.dhcp {
            Json::Obj(vec![
                ("id".into(), s("network0")),
                ("type".into(), s("ipv4_dhcp")),
                ("link".into(), s(&link_id)),
                ("network_id".into(), s(&v.network_id)),
            ])
        } else {
            let routes = v
                .gateway
                .map(|gw| {
                    Json::Obj(vec![
                        ("network".into(), s("0.0.0.0")),
                        ("netmask".into(), s("0.0.0.0")),
                        ("gateway".into(), s(&gw.to_string())),
                    ])
                })
                .into_iter()
                .collect();
            Json::Obj(vec![
                ("id".into(), s("network0")),
                ("type".into(), s("ipv4")),
                ("link".into(), s(&link_id)),
                ("ip_address".into(), s(&v.local_ipv4.to_string())),
                ("netmask".into(), s(&v.netmask.to_string())),
                ("routes".into(), Json::List(routes)),
                ("network_id".into(), s(&v.network_id)),
                ("services".into(), Json::List(dns.clone())),
            ])
        };
        py_json(&Json::Obj(vec![
            ("links".into(), Json::List(vec![link])),
            ("networks".into(), Json::List(vec![network])),
            ("services".into(), Json::List(dns)),
        ]))
    }

    /// nova's `find_path_in_tree` over the EC2-compatible tree of `version`.
    fn ec2(&self, version: &str, tokens: &[&str]) -> Found {
        let version = match version {
            "latest" => EC2_VERSIONS.len() - 1,
            v => match EC2_VERSIONS.iter().position(|known| *known == v) {
                Some(i) => i,
                None => return Found::Missing,
            },
        };
        let tree = self.ec2_tree(version);
        let mut node = &tree;
        for (i, token) in tokens.iter().enumerate() {
            match node {
                Ec2::Dir(children) => match children.get(*token) {
                    Some(child) => node = child,
                    None => return Found::Missing,
                },
                // `token in list` then `list[token]`: a TypeError when it is there.
                Ec2::List(items) if items.iter().any(|item| item == token) => {
                    return Found::Broken;
                }
                Ec2::List(_) => return Found::Missing,
                // Indexing a string (or int) leaf with a string: a TypeError on the last
                // token, a KeyError before it.
                Ec2::Leaf(_) if i + 1 == tokens.len() => return Found::Broken,
                Ec2::Leaf(_) => return Found::Missing,
            }
        }
        Found::Body(node.print(), TEXT)
    }

    /// `get_ec2_metadata(version)`: the fields each version added, as nova serves them.
    fn ec2_tree(&self, version: usize) -> Ec2 {
        let v = &self.values;
        let t = |s: &str| Ec2::Leaf(Bytes::from(s.to_owned()));
        let mut meta = BTreeMap::from([
            ("ami-id".to_owned(), t(&v.ami_id)),
            ("ami-launch-index".into(), t(&v.launch_index.to_string())),
            ("ami-manifest-path".into(), t("FIXME")),
            ("instance-id".into(), t(&format!("i-{:08x}", v.ec2_id))),
            ("hostname".into(), t(&v.hostname)),
            ("local-ipv4".into(), t(&v.local_ipv4.to_string())),
            ("reservation-id".into(), t(&v.reservation_id)),
            (
                "security-groups".into(),
                Ec2::List(v.security_groups.clone()),
            ),
        ]);
        if let Some((name, key)) = &v.key_pair {
            // `public-keys/` lists `0=name`; `public-keys/0/` is a directory whose `_name`
            // nova keeps in the tree (and so serves).
            let zero = BTreeMap::from([
                ("_name".to_owned(), t(&format!("0={name}"))),
                ("openssh-key".to_owned(), t(key)),
            ]);
            meta.insert(
                "public-keys".into(),
                Ec2::Dir(BTreeMap::from([("0".to_owned(), Ec2::Dir(zero))])),
            );
        }
        let floating = v.floating_ip.map(|ip| ip.to_string()).unwrap_or_default();
        // Indexes into EC2_VERSIONS of the versions that added each field.
        let since = |added: usize| version >= added;
        if since(1) {
            // 2007-01-19
            meta.insert("local-hostname".into(), t(&v.hostname));
            meta.insert("public-hostname".into(), t(&v.hostname));
            meta.insert("public-ipv4".into(), t(&floating));
        }
        if since(3) {
            // 2007-08-29
            meta.insert("instance-type".into(), t(&v.instance_type));
        }
        if since(5) {
            // 2007-12-15
            let mapping = BTreeMap::from([
                ("ami".to_owned(), t("vda")),
                ("root".to_owned(), t("/dev/vda")),
            ]);
            meta.insert("block-device-mapping".into(), Ec2::Dir(mapping));
        }
        if since(6) {
            // 2008-02-01
            let placement =
                BTreeMap::from([("availability-zone".to_owned(), t(&v.availability_zone))]);
            meta.insert("placement".into(), Ec2::Dir(placement));
        }
        if since(7) {
            // 2008-09-01
            meta.insert("instance-action".into(), t("none"));
        }
        let mut root = BTreeMap::from([("meta-data".to_owned(), Ec2::Dir(meta))]);
        if let Some(data) = &v.user_data {
            root.insert("user-data".into(), Ec2::Leaf(Bytes::from(data.clone())));
        }
        Ec2::Dir(root)
    }

    /// nova's `password.handle_password`.
    fn password(&self, req: &Request<Bytes>, flavor: Flavor) -> Resp {
        let head = req.method() == Method::HEAD;
        let current = || {
            self.values
                .password
                .clone()
                .filter(|p| !p.is_empty())
                .or_else(|| self.posted().clone())
        };
        match *req.method() {
            Method::GET => ok(Bytes::from(current().unwrap_or_default()), HTML),
            Method::POST => {
                if current().is_some() {
                    return webob_error(StatusCode::CONFLICT, flavor, false);
                }
                let body = req.body();
                if body.len() > MAX_PASSWORD {
                    return webob_error(StatusCode::BAD_REQUEST, flavor, false);
                }
                let Ok(password) = std::str::from_utf8(body) else {
                    // nova decodes the body as UTF-8 and fails.
                    return webob_error(StatusCode::INTERNAL_SERVER_ERROR, flavor, false);
                };
                if !password.is_empty() {
                    *self.posted() = Some(password.to_owned());
                }
                ok(Bytes::new(), HTML)
            }
            // "GET and POST only are supported." (neutron's regenerated 400 drops the text).
            _ => webob_error(StatusCode::BAD_REQUEST, flavor, head),
        }
    }
}

/// A node of nova's EC2 dict tree.
enum Ec2 {
    Dir(BTreeMap<String, Ec2>),
    List(Vec<String>),
    Leaf(Bytes),
}

impl Ec2 {
    /// nova's `ec2_md_print`: a dict lists its sorted keys (directories with `/`, or their
    /// `_name`), a list its items, one per line.
    fn print(&self) -> Bytes {
        match self {
            Ec2::Leaf(value) => value.clone(),
            Ec2::List(items) => items.join("\n").into(),
            Ec2::Dir(children) => {
                let lines: Vec<String> = children
                    .iter()
                    .filter(|(name, _)| *name != "_name")
                    .map(|(name, node)| match node {
                        Ec2::Dir(grand) => match grand.get("_name") {
                            Some(Ec2::Leaf(named)) => String::from_utf8_lossy(named).into_owned(),
                            _ => format!("{name}/"),
                        },
                        _ => name.clone(),
                    })
                    .collect();
                lines.join("\n").into()
            }
        }
    }
}

/// Percent-decodes a path as the WSGI server does (a malformed escape stays as it is); None
/// when the result is not UTF-8, which webob cannot decode.
fn decode_path(path: &str) -> Option<String> {
    percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()
        .map(|p| p.into_owned())
}

/// Python's `posixpath.normpath`: drops empty and `.` segments, resolves `..` (never above
/// the root), keeps exactly two leading slashes, and strips the trailing one.
fn normpath(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let initial = if path.starts_with("//") && !path.starts_with("///") {
        2
    } else if path.starts_with('/') {
        1
    } else {
        0
    };
    let mut comps: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." {
            continue;
        }
        if comp != ".." || (initial == 0 && comps.is_empty()) || comps.last() == Some(&"..") {
            comps.push(comp);
        } else if !comps.is_empty() {
            comps.pop();
        }
    }
    let joined = "/".repeat(initial) + &comps.join("/");
    if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

fn ok(body: Bytes, content_type: &'static str) -> Resp {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Which of its bodies webob's error page takes, by the request's `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Html,
    Json,
    Plain,
}

impl Flavor {
    /// webob's `acceptable_offers(['text/html', 'application/json'])`: the best q of each
    /// offer's most specific matching range; no header or nothing acceptable: plain text; an
    /// unparsable header accepts everything (HTML).
    fn negotiate(headers: &HeaderMap) -> Flavor {
        let values: Vec<&[u8]> = headers
            .get_all(header::ACCEPT)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if values.is_empty() {
            return Flavor::Plain;
        }
        let Some(joined) = values
            .iter()
            .map(|v| std::str::from_utf8(v).ok())
            .collect::<Option<Vec<&str>>>()
        else {
            return Flavor::Html;
        };
        let Some(ranges) = parse_accept(&joined.join(", ")) else {
            return Flavor::Html;
        };
        let q_of = |offer_type: &str, offer_sub: &str| {
            let mut best: Option<(u8, u16)> = None;
            for r in &ranges {
                if r.has_params {
                    continue;
                }
                let specificity = match (r.kind.as_str(), r.sub.as_str()) {
                    ("*", "*") => 0,
                    (k, "*") if k.eq_ignore_ascii_case(offer_type) => 1,
                    (k, s)
                        if k.eq_ignore_ascii_case(offer_type)
                            && s.eq_ignore_ascii_case(offer_sub) =>
                    {
                        2
                    }
                    _ => continue,
                };
                if best.is_none_or(|(spec, _)| specificity > spec) {
                    best = Some((specificity, r.q));
                }
            }
            best.map_or(0, |(_, q)| q)
        };
        let html = q_of("text", "html");
        let json = q_of("application", "json");
        match (html, json) {
            (0, 0) => Flavor::Plain,
            (h, j) if h >= j => Flavor::Html,
            _ => Flavor::Json,
        }
    }
}

struct MediaRange {
    kind: String,
    sub: String,
    /// Parameters before `q`: the range then only matches offers with them (webob's offers
    /// have none).
    has_params: bool,
    /// q × 1000.
    q: u16,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// RFC 7231 `Accept`; None when malformed.
fn parse_accept(header: &str) -> Option<Vec<MediaRange>> {
    let mut ranges = Vec::new();
    for element in header.split(',') {
        let element = element.trim_matches([' ', '\t']);
        if element.is_empty() {
            continue;
        }
        let mut parts = element.split(';');
        let (kind, sub) = parts.next()?.trim_matches([' ', '\t']).split_once('/')?;
        if !is_token(kind) || !is_token(sub) || (kind == "*" && sub != "*") {
            return None;
        }
        let mut has_params = false;
        let mut q = 1000;
        let mut seen_q = false;
        for param in parts {
            let (name, value) = param.trim_matches([' ', '\t']).split_once('=')?;
            if !is_token(name) || value.is_empty() {
                return None;
            }
            if seen_q {
                continue; // accept-ext
            }
            if name.eq_ignore_ascii_case("q") {
                q = parse_q(value)?;
                seen_q = true;
            } else {
                has_params = true;
            }
        }
        ranges.push(MediaRange {
            kind: kind.to_owned(),
            sub: sub.to_owned(),
            has_params,
            q,
        });
    }
    Some(ranges)
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, × 1000.
fn parse_q(s: &str) -> Option<u16> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// webob's error page for `status` (what neutron's proxy answers for nova's error), in the
/// negotiated flavor; an empty body for HEAD.
fn webob_error(status: StatusCode, flavor: Flavor, head: bool) -> Resp {
    let (title, explanation) = match status {
        StatusCode::BAD_REQUEST => (
            "Bad Request",
            "The server could not comply with the request since it is either malformed or otherwise incorrect.",
        ),
        StatusCode::FORBIDDEN => ("Forbidden", "Access was denied to this resource."),
        StatusCode::CONFLICT => (
            "Conflict",
            "There was a conflict when trying to complete your request.",
        ),
        StatusCode::INTERNAL_SERVER_ERROR => (
            "Internal Server Error",
            "Remote metadata server experienced an internal server error.",
        ),
        _ => ("Not Found", "The resource could not be found."),
    };
    let status_line = format!("{} {title}", status.as_u16());
    let (content_type, body) = match (flavor, head) {
        (_, true) => (HTML, String::new()),
        (Flavor::Html, _) => (
            HTML,
            format!(
                "<html>\n <head>\n  <title>{status_line}</title>\n </head>\n <body>\n  <h1>{status_line}</h1>\n  {explanation}<br /><br />\n\n\n\n </body>\n</html>"
            ),
        ),
        (Flavor::Json, _) => (
            JSON,
            py_json(&Json::Obj(vec![
                (
                    "message".into(),
                    Json::Str(format!("{explanation}<br /><br />\n\n\n")),
                ),
                ("code".into(), Json::Str(status_line.clone())),
                ("title".into(), Json::Str(title.into())),
            ])),
        ),
        (Flavor::Plain, _) => (TEXT, format!("{status_line}\n\n{explanation}\n\n   ")),
    };
    let mut resp = ok(body.into(), content_type);
    *resp.status_mut() = status;
    resp
}

/// A JSON document with its keys in the order nova builds them.
#[derive(Clone)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    List(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl From<&serde_json::Value> for Json {
    fn from(value: &serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(*b),
            serde_json::Value::Number(n) => Json::Num(n.to_string()),
            serde_json::Value::String(s) => Json::Str(s.clone()),
            serde_json::Value::Array(items) => Json::List(items.iter().map(Json::from).collect()),
            serde_json::Value::Object(map) => Json::from(map),
        }
    }
}

impl From<&serde_json::Map<String, serde_json::Value>> for Json {
    fn from(map: &serde_json::Map<String, serde_json::Value>) -> Self {
        Json::Obj(
            map.iter()
                .map(|(k, v)| (k.clone(), Json::from(v)))
                .collect(),
        )
    }
}

/// Python's `json.dumps` output: `", "` and `": "` separators, non-ASCII escaped.
fn py_json(doc: &Json) -> String {
    fn string(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                ' '..='~' => out.push(c),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        }
        out.push('"');
    }
    fn write(out: &mut String, doc: &Json) {
        match doc {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => out.push_str(n),
            Json::Str(s) => string(out, s),
            Json::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write(out, item);
                }
                out.push(']');
            }
            Json::Obj(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    string(out, key);
                    out.push_str(": ");
                    write(out, value);
                }
                out.push('}');
            }
        }
    }
    let mut out = String::new();
    write(&mut out, doc);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock() -> OpenStackMock {
        OpenStackMock::new(OpenStackValues::default())
    }

    fn req(method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Request<Bytes> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Bytes::from(body.to_owned())).unwrap()
    }

    fn send(m: &OpenStackMock, r: &Request<Bytes>) -> (StatusCode, String, String) {
        let Answer::Now(resp) = m.handle(r, None) else {
            panic!("the OpenStack mock answers at once");
        };
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let status = resp.status();
        let body = String::from_utf8(resp.into_body().to_vec()).unwrap();
        (status, content_type, body)
    }

    fn get(m: &OpenStackMock, path: &str) -> (StatusCode, String) {
        let (status, _, body) = send(m, &req(Method::GET, path, &[("accept", "*/*")], ""));
        (status, body)
    }

    fn json(m: &OpenStackMock, path: &str) -> serde_json::Value {
        let (status, content_type, body) =
            send(m, &req(Method::GET, path, &[("accept", "*/*")], ""));
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(content_type, "application/json", "{path}");
        serde_json::from_str(&body).unwrap()
    }

    const OS_LIST: &str = "2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n2017-02-22\n2018-08-27\n2020-10-14\nlatest";
    const EC2_LIST: &str = "1.0\n2007-01-19\n2007-03-01\n2007-08-29\n2007-10-10\n2007-12-15\n2008-02-01\n2008-09-01\n2009-04-04\nlatest";

    #[test]
    fn version_lists() {
        let m = mock();
        for path in [
            "/openstack",
            "/openstack/",
            "/openstack//",
            "/openstack/latest/..",
        ] {
            let (status, content_type, body) = send(&m, &req(Method::GET, path, &[], ""));
            assert_eq!((status, body.as_str()), (StatusCode::OK, OS_LIST), "{path}");
            assert_eq!(content_type, "text/plain; charset=UTF-8");
        }
        for path in ["/", "/ec2", "/ec2/", "//", "/latest/.."] {
            assert_eq!(get(&m, path), (StatusCode::OK, EC2_LIST.into()), "{path}");
        }
    }

    #[test]
    fn openstack_listing_per_version() {
        let m = mock();
        let latest =
            "meta_data.json\npassword\nvendor_data.json\nnetwork_data.json\nvendor_data2.json";
        assert_eq!(
            get(&m, "/openstack/latest"),
            (StatusCode::OK, latest.into())
        );
        assert_eq!(get(&m, "/openstack/latest/").1, latest);
        assert_eq!(get(&m, "/openstack/2018-08-27/").1, latest);
        assert_eq!(
            get(&m, "/openstack/latest/version").1,
            latest,
            "nova routes it"
        );
        assert_eq!(get(&m, "/openstack/2012-08-10/").1, "meta_data.json");
        assert_eq!(
            get(&m, "/openstack/2013-10-17/").1,
            "meta_data.json\npassword\nvendor_data.json"
        );
        let with_data = OpenStackMock::new(OpenStackValues {
            user_data: Some("#cloud-config\n{}\n".into()),
            ..Default::default()
        });
        assert_eq!(
            get(&with_data, "/openstack/latest/").1,
            "meta_data.json\nuser_data\npassword\nvendor_data.json\nnetwork_data.json\nvendor_data2.json"
        );
        let (status, content_type, body) = send(
            &with_data,
            &req(Method::GET, "/openstack/latest/user_data", &[], ""),
        );
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/plain; charset=UTF-8");
        assert_eq!(body, "#cloud-config\n{}\n");
        assert_eq!(
            get(&with_data, "/latest/user-data").1,
            "#cloud-config\n{}\n"
        );
        assert_eq!(get(&with_data, "/latest").1, "meta-data/\nuser-data");
    }

    #[test]
    fn meta_data_fields_per_version() {
        let m = mock();
        let md = json(&m, "/openstack/latest/meta_data.json");
        assert_eq!(md["uuid"], "6f2a2c4e-1b7d-4c55-9a43-3e5d8c1f0b27");
        assert_eq!(md["name"], "redirect-mock");
        assert_eq!(md["hostname"], "redirect-mock.novalocal");
        assert_eq!(md["availability_zone"], "nova");
        assert_eq!(md["launch_index"], 0);
        assert_eq!(md["project_id"], "8d1f5f6b0b9a4c2e9f3d7a6b5c4e3f21");
        let key = md["public_keys"]["redirect-mock"].as_str().unwrap();
        assert!(key.starts_with("ssh-ed25519 "));
        assert_eq!(md["keys"][0]["name"], "redirect-mock");
        assert_eq!(md["keys"][0]["type"], "ssh");
        assert_eq!(md["keys"][0]["data"], key);
        assert_eq!(md["devices"], serde_json::json!([]));
        assert_eq!(md["dedicated_cpus"], serde_json::json!([]));
        assert!(md.get("meta").is_none(), "nova leaves an empty meta out");
        let seed = STANDARD
            .decode(md["random_seed"].as_str().unwrap())
            .unwrap();
        assert_eq!(seed.len(), 512);
        let again = json(&m, "/openstack/latest/meta_data.json");
        assert_ne!(again["random_seed"], md["random_seed"], "fresh per request");

        let rocky = json(&m, "/openstack/2018-08-27/meta_data.json");
        assert_eq!(rocky["devices"], serde_json::json!([]));
        assert!(rocky.get("dedicated_cpus").is_none());
        let folsom = json(&m, "/openstack/2012-08-10/meta_data.json");
        for absent in ["random_seed", "project_id", "devices"] {
            assert!(folsom.get(absent).is_none(), "{absent}");
        }
        assert_eq!(folsom["uuid"], md["uuid"]);
        let liberty = json(&m, "/openstack/2015-10-15/meta_data.json");
        assert!(liberty.get("project_id").is_some() && liberty.get("devices").is_none());

        // nova's key order and Python's separators.
        let (_, _, raw) = send(
            &m,
            &req(Method::GET, "/openstack/latest/meta_data.json", &[], ""),
        );
        assert!(raw.starts_with("{\"uuid\": \"6f2a2c4e-"), "{raw}");
        assert!(
            raw.contains("\"hostname\": \"redirect-mock.novalocal\", \"name\": "),
            "{raw}"
        );
    }

    #[test]
    fn meta_and_no_key() {
        let m = OpenStackMock::new(OpenStackValues {
            key_pair: None,
            meta: BTreeMap::from([("role".into(), "web\"server ü".into())]),
            ..Default::default()
        });
        let md = json(&m, "/openstack/latest/meta_data.json");
        assert!(md.get("public_keys").is_none() && md.get("keys").is_none());
        assert_eq!(md["meta"]["role"], "web\"server ü");
        let (_, _, raw) = send(
            &m,
            &req(Method::GET, "/openstack/latest/meta_data.json", &[], ""),
        );
        assert!(
            raw.contains(r#""meta": {"role": "web\"server \u00fc"}"#),
            "{raw}"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/public-keys").0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn network_data() {
        let m = mock();
        let (status, content_type, body) = send(
            &m,
            &req(Method::GET, "/openstack/latest/network_data.json", &[], ""),
        );
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            content_type, "text/plain; charset=UTF-8",
            "nova sets no JSON type"
        );
        let nd: serde_json::Value = serde_json::from_str(&body).unwrap();
        let link = &nd["links"][0];
        assert_eq!(link["id"], "tapb7c2e3a4-5d");
        assert_eq!(link["vif_id"], "b7c2e3a4-5d6f-4a1b-8c9d-0e1f2a3b4c5d");
        assert_eq!(link["type"], "ovs");
        assert_eq!(link["mtu"], 1450);
        assert_eq!(link["ethernet_mac_address"], "fa:16:3e:5c:21:9d");
        let net = &nd["networks"][0];
        assert_eq!(net["id"], "network0");
        assert_eq!(net["type"], "ipv4");
        assert_eq!(net["link"], "tapb7c2e3a4-5d");
        assert_eq!(net["ip_address"], "10.0.0.42");
        assert_eq!(net["netmask"], "255.255.255.0");
        assert_eq!(
            net["routes"],
            serde_json::json!([{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"}])
        );
        assert_eq!(net["network_id"], "1a2b3c4d-5e6f-4789-8abc-def012345678");
        assert_eq!(
            nd["services"],
            serde_json::json!([{"type": "dns", "address": "10.0.0.2"}])
        );
        assert_eq!(net["services"], nd["services"]);
        // Served (not listed) at every version, as nova.
        assert_eq!(
            get(&m, "/openstack/2012-08-10/network_data.json").0,
            StatusCode::OK
        );

        let dhcp = OpenStackMock::new(OpenStackValues {
            dhcp: true,
            ..Default::default()
        });
        let nd: serde_json::Value =
            serde_json::from_str(&get(&dhcp, "/openstack/latest/network_data.json").1).unwrap();
        assert_eq!(nd["links"][0]["mtu"], serde_json::Value::Null);
        assert_eq!(nd["networks"][0]["type"], "ipv4_dhcp");
        assert!(nd["networks"][0].get("ip_address").is_none());
    }

    #[test]
    fn vendor_data_and_password() {
        let m = mock();
        assert_eq!(
            json(&m, "/openstack/latest/vendor_data.json"),
            serde_json::json!({})
        );
        assert_eq!(
            json(&m, "/openstack/latest/vendor_data2.json"),
            serde_json::json!({"static": {}})
        );
        let mut vendor = serde_json::Map::new();
        vendor.insert("cloud-init".into(), "#cloud-config\n".into());
        let with = OpenStackMock::new(OpenStackValues {
            vendor_data: vendor,
            ..Default::default()
        });
        assert_eq!(
            json(&with, "/openstack/latest/vendor_data2.json")["static"]["cloud-init"],
            "#cloud-config\n"
        );
        for (path, status) in [
            (
                "/openstack/2013-04-04/vendor_data.json",
                StatusCode::NOT_FOUND,
            ),
            (
                "/openstack/2016-06-30/vendor_data2.json",
                StatusCode::NOT_FOUND,
            ),
            ("/openstack/2012-08-10/password", StatusCode::NOT_FOUND),
            ("/openstack/latest/user_data", StatusCode::NOT_FOUND),
        ] {
            assert_eq!(get(&m, path).0, status, "{path}");
        }

        let (status, content_type, body) =
            send(&m, &req(Method::GET, "/openstack/latest/password", &[], ""));
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
        assert_eq!(content_type, "text/html; charset=UTF-8");
        let post = |body: &str| {
            send(
                &m,
                &req(Method::POST, "/openstack/latest/password", &[], body),
            )
            .0
        };
        assert_eq!(post(&"x".repeat(1021)), StatusCode::BAD_REQUEST);
        assert_eq!(post("c2VjcmV0"), StatusCode::OK);
        assert_eq!(get(&m, "/openstack/latest/password").1, "c2VjcmV0");
        assert_eq!(post("other"), StatusCode::CONFLICT, "set once");
        let put = req(Method::PUT, "/openstack/latest/password", &[], "x");
        assert_eq!(send(&m, &put).0, StatusCode::BAD_REQUEST);

        let preset = OpenStackMock::new(OpenStackValues {
            password: Some("ZW5j".into()),
            ..Default::default()
        });
        assert_eq!(get(&preset, "/openstack/2013-04-04/password").1, "ZW5j");
    }

    #[test]
    fn ec2_tree() {
        let m = mock();
        assert_eq!(
            get(&m, "/latest/meta-data/"),
            (
                StatusCode::OK,
                "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\ninstance-action\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nplacement/\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\nsecurity-groups".into()
            )
        );
        assert_eq!(get(&m, "/latest").1, "meta-data/");
        assert_eq!(get(&m, "/latest/meta-data/instance-id").1, "i-0000002a");
        assert_eq!(get(&m, "/2009-04-04/meta-data/instance-id").1, "i-0000002a");
        assert_eq!(get(&m, "/ec2/latest/meta-data/instance-id").1, "i-0000002a");
        assert_eq!(get(&m, "/latest/meta-data/local-ipv4").1, "10.0.0.42");
        assert_eq!(
            get(&m, "/latest/meta-data/public-ipv4"),
            (StatusCode::OK, String::new())
        );
        assert_eq!(
            get(&m, "/latest/meta-data/hostname").1,
            "redirect-mock.novalocal"
        );
        assert_eq!(get(&m, "/latest/meta-data/ami-launch-index").1, "0");
        assert_eq!(
            get(&m, "/latest/meta-data/placement/availability-zone").1,
            "nova"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/block-device-mapping/").1,
            "ami\nroot"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/block-device-mapping/root").1,
            "/dev/vda"
        );
        assert_eq!(get(&m, "/latest/meta-data/security-groups").1, "default");
        assert_eq!(
            get(&m, "/latest/meta-data/public-keys/").1,
            "0=redirect-mock"
        );
        assert_eq!(get(&m, "/latest/meta-data/public-keys/0").1, "openssh-key");
        assert_eq!(
            get(&m, "/latest/meta-data/public-keys/0/_name").1,
            "0=redirect-mock"
        );
        assert!(
            get(&m, "/latest/meta-data/public-keys/0/openssh-key")
                .1
                .starts_with("ssh-ed25519 ")
        );
        let old = get(&m, "/1.0/meta-data/").1;
        assert!(
            !old.contains("local-hostname") && !old.contains("placement/"),
            "{old}"
        );
        assert!(get(&m, "/2008-02-01/meta-data/").1.contains("placement/"));
        assert!(
            !get(&m, "/2008-02-01/meta-data/")
                .1
                .contains("instance-action")
        );
        let with_ip = OpenStackMock::new(OpenStackValues {
            floating_ip: Some(Ipv4Addr::new(203, 0, 113, 7)),
            ..Default::default()
        });
        assert_eq!(
            get(&with_ip, "/latest/meta-data/public-ipv4").1,
            "203.0.113.7"
        );
    }

    #[test]
    fn errors_as_neutron_and_webob_send_them() {
        let m = mock();
        let html = "<html>\n <head>\n  <title>404 Not Found</title>\n </head>\n <body>\n  <h1>404 Not Found</h1>\n  The resource could not be found.<br /><br />\n\n\n\n </body>\n</html>";
        for path in [
            "/latest/meta-data/nope",
            "/latest/user-data",
            "/latest/api/token",
            "/2021-03-23/meta-data/instance-id",
            "/openstack/2099-01-01/meta_data.json",
            "/openstack/latest/nope",
            "/openstack/latest/meta_data.json/x",
            "/openstack/content/0000",
            "/openstack/content",
            "/latest/meta-data/public-keys/1",
            "/latest/meta-data/security-groups/other",
            "/latest/meta-data/instance-id/x/y",
            "/%ff",
            "*",
        ] {
            let (status, content_type, body) =
                send(&m, &req(Method::GET, path, &[("accept", "*/*")], ""));
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(content_type, "text/html; charset=UTF-8", "{path}");
            assert_eq!(body, html, "{path}");
        }
        let (_, content_type, body) = send(&m, &req(Method::GET, "/nope", &[], ""));
        assert_eq!(content_type, "text/plain; charset=UTF-8");
        assert_eq!(
            body,
            "404 Not Found\n\nThe resource could not be found.\n\n   "
        );
        let (_, content_type, body) = send(
            &m,
            &req(Method::GET, "/nope", &[("accept", "application/json")], ""),
        );
        assert_eq!(content_type, "application/json");
        assert_eq!(
            body,
            r#"{"message": "The resource could not be found.<br /><br />\n\n\n", "code": "404 Not Found", "title": "Not Found"}"#
        );
        // nova indexes a leaf with the next token: a TypeError, a 500 through neutron.
        for path in [
            "/latest/meta-data/instance-id/x",
            "/latest/meta-data/security-groups/default",
            "/openstack/latest/content",
        ] {
            let (status, _, body) = send(&m, &req(Method::GET, path, &[("accept", "*/*")], ""));
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert!(
                body.contains("Remote metadata server experienced"),
                "{body}"
            );
        }
        let forbidden = m.forbidden();
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
        assert!(String::from_utf8_lossy(forbidden.body()).contains("<h1>403 Forbidden</h1>"));
    }

    #[test]
    fn methods_are_ignored_as_by_nova() {
        let m = mock();
        // IMDSv2's token request: nova has no such path (404, not 405): clients go tokenless.
        let put = req(
            Method::PUT,
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
            "",
        );
        assert_eq!(send(&m, &put).0, StatusCode::NOT_FOUND);
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let r = req(method.clone(), "/openstack/latest/meta_data.json", &[], "");
            assert_eq!(send(&m, &r).0, StatusCode::OK, "{method}");
        }
        let head = req(Method::HEAD, "/nope", &[], "");
        let (status, content_type, body) = send(&m, &head);
        assert_eq!((status, body.as_str()), (StatusCode::NOT_FOUND, ""));
        assert_eq!(content_type, "text/html; charset=UTF-8");
    }

    #[test]
    fn hostile_paths() {
        let m = mock();
        for (path, status) in [
            ("/openstack/latest/../latest/meta_data.json", StatusCode::OK),
            ("/openstack/./latest//meta_data.json/", StatusCode::OK),
            ("/openstack/latest/meta%5Fdata.json", StatusCode::OK),
            ("/openstack%2Flatest%2Fmeta_data.json", StatusCode::OK),
            ("/../../openstack/latest/meta_data.json", StatusCode::OK),
            ("/latest/meta-data/%", StatusCode::NOT_FOUND),
            ("/latest/meta-data/%zz", StatusCode::NOT_FOUND),
            ("/openstack/latest/%00", StatusCode::NOT_FOUND),
            ("/openstack/../../..", StatusCode::OK),
        ] {
            assert_eq!(get(&m, path).0, status, "{path}");
        }
        // Two leading slashes stay (normpath), and nova then serves its EC2 version list.
        assert_eq!(get(&m, "//openstack/latest/meta_data.json").1, EC2_LIST);
        let long = format!("/openstack/latest/{}", "a/".repeat(20_000));
        assert_eq!(get(&m, &long).0, StatusCode::NOT_FOUND);
        let long = format!("/latest/meta-data/{}", "../".repeat(20_000));
        assert_eq!(get(&m, &long), (StatusCode::OK, EC2_LIST.into()));
    }

    #[test]
    fn accept_negotiation() {
        let flavor = |accept: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
            Flavor::negotiate(&headers)
        };
        assert_eq!(Flavor::negotiate(&HeaderMap::new()), Flavor::Plain);
        for (accept, expected) in [
            ("", Flavor::Plain),
            ("*/*", Flavor::Html),
            ("text/html", Flavor::Html),
            ("TEXT/HTML", Flavor::Html),
            ("text/*", Flavor::Html),
            ("application/json", Flavor::Json),
            ("application/*", Flavor::Json),
            ("application/json, text/html;q=0.5", Flavor::Json),
            ("application/json;q=0.9, text/html;q=0.9", Flavor::Html),
            ("text/html;q=0, */*", Flavor::Json),
            ("*/*;q=0", Flavor::Plain),
            ("text/plain", Flavor::Plain),
            ("image/png", Flavor::Plain),
            ("text/html;level=1", Flavor::Plain),
            (",", Flavor::Plain),
            ("garbage", Flavor::Html),
            ("application/json;q=abc", Flavor::Html),
            ("text/plain, application/json;q=0.2", Flavor::Json),
        ] {
            assert_eq!(flavor(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn normpath_as_python() {
        for (input, expected) in [
            ("/", "/"),
            ("//", "//"),
            ("///", "/"),
            ("/a/./b/../c/", "/a/c"),
            ("/..", "/"),
            ("//a//b", "//a/b"),
            ("", "."),
            ("a/../..", ".."),
        ] {
            assert_eq!(normpath(input), expected, "{input:?}");
        }
    }

    #[test]
    fn reload() {
        let m = mock();
        assert!(!m.reload(OpenStackValues::default()), "unchanged");
        let post = req(Method::POST, "/openstack/latest/password", &[], "secret");
        assert_eq!(send(&m, &post).0, StatusCode::OK);
        assert!(m.reload(OpenStackValues {
            name: "renamed".into(),
            ..Default::default()
        }));
        assert_eq!(
            json(&m, "/openstack/latest/meta_data.json")["name"],
            "renamed"
        );
        assert_eq!(
            get(&m, "/openstack/latest/password").1,
            "secret",
            "same instance"
        );
        assert!(m.reload(OpenStackValues {
            uuid: "another".into(),
            ..Default::default()
        }));
        assert_eq!(
            get(&m, "/openstack/latest/password").1,
            "",
            "another instance"
        );
        assert_eq!(m.kind(), CloudKind::OpenStack);
    }
}
