//! The built-in CloudStack metadata service: the virtual router's apache on port 80 and its
//! password server (port 8080), as a guest sees them.
//!
//! The router serves the metadata as static files. CloudStack's management server sends a
//! VM's values (`CommandSetupHelper.generateVmDataCommand`) and the router's `configure.py`
//! (`CsVmMetadata`) writes each to `/var/www/html/metadata/<vm ip>/<name>` and lists it in a
//! manifest file there, `meta-data`, one name and a newline per file, in the order they were
//! written; a value that is empty deletes its file instead (and is not listed). User data
//! goes to `userdata/<vm ip>/user-data`, written even when there is none (an empty file).
//! `latest/.htaccess` maps the guest's URLs onto those files by its source address:
//! - `RewriteRule ^meta-data/$ ../metadata/%{REMOTE_ADDR}/meta-data [L,NC,QSA]`: the
//!   manifest; `meta-data` without the slash is no file (404, why cloud-init asks for
//!   `meta-data/`),
//! - `RewriteRule ^meta-data/(.+)$ ../metadata/%{REMOTE_ADDR}/$1 [L,NC,QSA]`,
//! - `RewriteRule ^<name>$ ../<folder>/%{REMOTE_ADDR}/<name> [L,NC,QSA]` for every file:
//!   `/latest/user-data` and the legacy `/latest/instance-id` etc.
//!
//! `NC` makes the patterns case-insensitive (the file names after `meta-data/` are not).
//! apache (Debian's 2.4 with `ServerTokens Prod`, `ServerSignature Off`) sends `Server:
//! Apache`, no `Content-Type` for these extension-less files, its HTML error pages, serves
//! POST like GET on static files, and answers PUT, DELETE and the like 405.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
};
use serde::Deserialize;

use super::{Answer, Cloud, CloudKind, Resp};

/// The header that makes a request one for the password server (hyper lowercases names).
pub const PASSWORD_HEADER: &str = "domu_request";
const DOMU_REQUEST: HeaderName = HeaderName::from_static(PASSWORD_HEADER);

/// What apache's `Allow` lists for a static file.
const ALLOW: &str = "GET,POST,OPTIONS,HEAD";
const APACHE_ERROR_TYPE: &str = "text/html; charset=iso-8859-1";

/// The values the mock serves. Every field has a default; `[cloudstack]` in the config
/// overrides them. An empty string is served as the router does an empty value: no file, not
/// listed, 404.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudStackValues {
    /// `instance-id`: the VM's UUID on current CloudStack (older releases sent its instance
    /// name, like `i-2-34-VM`).
    pub instance_id: String,
    /// `vm-id`: the UUID as well (older releases: the numeric id).
    pub vm_id: String,
    /// `local-hostname`: the VM's host name.
    pub local_hostname: String,
    pub local_ipv4: Ipv4Addr,
    /// `public-ipv4` and `public-hostname`: in an isolated network, the router's source-NAT
    /// address (or the VM's static NAT one); in a shared or basic network the VM's own
    /// address and host name.
    pub public_ipv4: String,
    pub public_hostname: String,
    /// The zone's name.
    pub availability_zone: String,
    /// The service offering's display text.
    pub service_offering: String,
    /// `CloudStack-{<cloud.identifier>}`, the installation's UUID.
    pub cloud_identifier: String,
    /// `hypervisor-host-name`: empty (so absent) unless the operator exposes host names.
    pub hypervisor_host_name: String,
    /// `public-keys`: the VM's SSH keys, one per line; none: listed and empty.
    pub public_keys: Vec<String>,
    /// `/latest/user-data`; None: an empty answer (the router writes an empty file).
    pub user_data: Option<String>,
    /// The password the password server hands out; None: no reset pending.
    pub password: Option<String>,
}

impl Default for CloudStackValues {
    fn default() -> Self {
        CloudStackValues {
            instance_id: "2f8a4b1c-7d3e-4f5a-9b6c-1d2e3f4a5b6c".into(),
            vm_id: "2f8a4b1c-7d3e-4f5a-9b6c-1d2e3f4a5b6c".into(),
            local_hostname: "redirect-mock".into(),
            local_ipv4: Ipv4Addr::new(10, 1, 1, 42),
            public_ipv4: "192.0.2.10".into(),
            public_hostname: "192.0.2.10".into(),
            availability_zone: "zone1".into(),
            service_offering: "Small Instance".into(),
            cloud_identifier: "CloudStack-{7c9e6679-7425-40de-944b-e07fc1f90ae7}".into(),
            hypervisor_host_name: String::new(),
            // A key nobody holds the private half of (generated for the mock, then dropped).
            public_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdn64tja8pwcDUbaCmvStoVpTGDi5Ee8Qb40/GlwW1i redirect-mock".into(),
            ],
            user_data: None,
            password: None,
        }
    }
}

/// The mock, whose values a reload replaces (SIGHUP).
pub struct CloudStackMock {
    current: RwLock<Arc<Router>>,
}

/// One router's view of the VM, and the password server's state.
struct Router {
    values: CloudStackValues,
    /// The metadata files in the order the router writes them (the manifest's order).
    files: Vec<(&'static str, Bytes)>,
    manifest: Bytes,
    /// Whether the guest acknowledged the password (`saved_password`): the real server then
    /// forgets it.
    acknowledged: AtomicBool,
}

impl CloudStackMock {
    pub fn new(values: CloudStackValues) -> Self {
        CloudStackMock {
            current: RwLock::new(Arc::new(Router::new(values, false))),
        }
    }

    /// Serves `values` from now on; false when they are the ones served already. The
    /// password's acknowledgement stays unless the password changes: a new one is pending.
    pub fn reload(&self, values: CloudStackValues) -> bool {
        let current = self.router();
        if current.values == values {
            return false;
        }
        let acknowledged = current.values.password == values.password
            && current.acknowledged.load(Ordering::SeqCst);
        let next = Router::new(values, acknowledged);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        true
    }

    fn router(&self) -> Arc<Router> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Cloud for CloudStackMock {
    fn kind(&self) -> CloudKind {
        CloudKind::CloudStack
    }

    fn handle(&self, req: &Request<Bytes>, _identity: Option<&str>) -> Answer {
        let router = self.router();
        Answer::Now(match req.headers().get(DOMU_REQUEST) {
            Some(request) => router.password_server(req.method(), request.as_bytes()),
            None => router.apache(req),
        })
    }

    /// apache's 403 page.
    fn forbidden(&self) -> Resp {
        apache_error(StatusCode::FORBIDDEN, "")
    }
}

impl Router {
    fn new(values: CloudStackValues, acknowledged: bool) -> Self {
        let v = &values;
        let all = [
            ("service-offering", v.service_offering.clone()),
            ("availability-zone", v.availability_zone.clone()),
            ("local-ipv4", v.local_ipv4.to_string()),
            ("local-hostname", v.local_hostname.clone()),
            ("public-ipv4", v.public_ipv4.clone()),
            ("public-hostname", v.public_hostname.clone()),
            ("instance-id", v.instance_id.clone()),
            ("vm-id", v.vm_id.clone()),
            ("public-keys", v.public_keys.join("\n")),
            ("cloud-identifier", v.cloud_identifier.clone()),
            ("hypervisor-host-name", v.hypervisor_host_name.clone()),
        ];
        let files: Vec<(&'static str, Bytes)> = all
            .into_iter()
            // No key is sent as null, which the router writes as an empty file; any other
            // empty value deletes the file.
            .filter(|(name, value)| !value.is_empty() || *name == "public-keys")
            .map(|(name, value)| (name, Bytes::from(value)))
            .collect();
        let manifest: String = files.iter().map(|(name, _)| format!("{name}\n")).collect();
        Router {
            files,
            manifest: manifest.into(),
            values,
            acknowledged: acknowledged.into(),
        }
    }

    /// The router's `passwd_server_ip.py`. The management server saves a VM's new password
    /// (`resetPasswordForVirtualMachine`, or the template's at deploy) there; the guest's
    /// `cloud-set-guest-password` (or cloud-init) asks with `DomU_Request: send_my_password`
    /// and gets it as the body, every time, until it acknowledges with `DomU_Request:
    /// saved_password`, upon which the server forgets it and answers `saved_password` to any
    /// later request, as it does when none was set. Any other value: `bad_request`. The
    /// server answers each of them 200 (its 400 is sent after the headers, so never), with
    /// `Content-type: text/plain` and two `Server` headers; the path does not matter. It
    /// only has `do_GET` and `do_POST` (from outside the router a POST gets an empty 200);
    /// any other method gets Python's 501 page.
    fn password_server(&self, method: &Method, request: &[u8]) -> Resp {
        let mut resp = Response::new(Bytes::new());
        let h = resp.headers_mut();
        h.insert(
            header::SERVER,
            HeaderValue::from_static("CloudStack Password Server 4.x"),
        );
        match *method {
            Method::GET => {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                h.append(
                    header::SERVER,
                    HeaderValue::from_static("CloudStack Password Server"),
                );
                let body = match request {
                    b"send_my_password" => match &self.values.password {
                        Some(password)
                            if !password.is_empty()
                                && !self.acknowledged.load(Ordering::SeqCst) =>
                        {
                            Bytes::from(password.clone())
                        }
                        _ => Bytes::from_static(b"saved_password"),
                    },
                    b"saved_password" => {
                        self.acknowledged.store(true, Ordering::SeqCst);
                        Bytes::from_static(b"saved_password")
                    }
                    _ => Bytes::from_static(b"bad_request"),
                };
                *resp.body_mut() = body;
                resp
            }
            Method::POST => resp,
            _ => {
                // BaseHTTPRequestHandler.send_error(501, "Unsupported method (%r)").
                let body = if *method == Method::HEAD {
                    String::new()
                } else {
                    format!(
                        "<!DOCTYPE HTML>\n<html lang=\"en\">\n    <head>\n        <meta charset=\"utf-8\">\n        <title>Error response</title>\n    </head>\n    <body>\n        <h1>Error response</h1>\n        <p>Error code: 501</p>\n        <p>Message: Unsupported method ('{}').</p>\n        <p>Error code explanation: 501 - Server does not support this operation.</p>\n    </body>\n</html>\n",
                        html_escape(method.as_str())
                    )
                };
                *resp.status_mut() = StatusCode::NOT_IMPLEMENTED;
                let h = resp.headers_mut();
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html;charset=utf-8"),
                );
                *resp.body_mut() = body.into();
                resp
            }
        }
    }

    /// The router's apache on port 80.
    fn apache(&self, req: &Request<Bytes>) -> Resp {
        let method = req.method();
        let path = match apache_path(req.uri().path()) {
            Ok(path) => path,
            Err(status) => return apache_error(status, ""),
        };
        let kind = method_kind(method);
        if kind == MethodKind::Unknown {
            return apache_error(StatusCode::NOT_IMPLEMENTED, method.as_str());
        }
        let last = path.rsplit('/').next().unwrap_or_default();
        let target = self.map(&path);
        // `<FilesMatch "^\.ht"> Require all denied` (Debian's apache2.conf), checked before
        // the handler runs.
        let hidden = last.starts_with(".ht")
            || matches!(&target, Target::File(name) if name.starts_with(".ht"));
        if hidden {
            return apache_error(StatusCode::FORBIDDEN, "");
        }
        match kind {
            MethodKind::Options => {
                let mut resp = Response::new(Bytes::new());
                let h = resp.headers_mut();
                h.insert(header::SERVER, HeaderValue::from_static("Apache"));
                h.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
                return resp;
            }
            MethodKind::NotAllowed => {
                return apache_error(StatusCode::METHOD_NOT_ALLOWED, method.as_str());
            }
            _ => {}
        }
        match target {
            Target::Body(body) => static_file(body),
            Target::File(name) => match self.file(&name) {
                Some(body) => static_file(body),
                None => apache_error(StatusCode::NOT_FOUND, ""),
            },
            Target::Missing => apache_error(StatusCode::NOT_FOUND, ""),
            Target::Index => {
                let mut resp = Response::new(Bytes::from_static(LATEST_INDEX.as_bytes()));
                let h = resp.headers_mut();
                h.insert(header::SERVER, HeaderValue::from_static("Apache"));
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html;charset=UTF-8"),
                );
                resp
            }
            Target::Slash => {
                // mod_dir's DirectorySlash: the URL of a directory gets its slash.
                let location = match req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                {
                    Some(host) if !host.is_empty() => format!("http://{host}/latest/"),
                    _ => "/latest/".to_owned(),
                };
                let mut resp = apache_error(StatusCode::MOVED_PERMANENTLY, &location);
                if let Ok(value) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, value);
                }
                resp
            }
        }
    }

    /// Where `latest/.htaccess` (and the filesystem) take a normalized path.
    fn map(&self, path: &str) -> Target {
        if path == "/latest" {
            return Target::Slash;
        }
        let Some(rest) = path.strip_prefix("/latest/") else {
            return Target::Missing;
        };
        if rest.is_empty() {
            return Target::Index;
        }
        if rest.eq_ignore_ascii_case("user-data") {
            let data = self.values.user_data.clone().unwrap_or_default();
            return Target::Body(Bytes::from(data));
        }
        // The rules name the files, so a file whose value is empty still matches (and 404s).
        if METADATA_NAMES
            .iter()
            .any(|name| rest.eq_ignore_ascii_case(name))
        {
            return Target::File(rest.to_ascii_lowercase());
        }
        match rest.get(..10) {
            Some(prefix) if prefix.eq_ignore_ascii_case("meta-data/") => {
                let file = &rest[10..];
                if file.is_empty() {
                    Target::Body(self.manifest.clone())
                } else {
                    Target::File(file.to_owned())
                }
            }
            // A file under latest/ itself (there is none but .htaccess).
            _ => Target::Missing,
        }
    }

    /// A file of `metadata/<vm ip>/` by its (case-sensitive) name.
    fn file(&self, name: &str) -> Option<Bytes> {
        if name == "meta-data" {
            return Some(self.manifest.clone());
        }
        self.files
            .iter()
            .find(|(file, _)| *file == name)
            .map(|(_, body)| body.clone())
    }
}

/// The metadata files the router's `.htaccess` has a rule for.
const METADATA_NAMES: [&str; 11] = [
    "service-offering",
    "availability-zone",
    "local-ipv4",
    "local-hostname",
    "public-ipv4",
    "public-hostname",
    "instance-id",
    "vm-id",
    "public-keys",
    "cloud-identifier",
    "hypervisor-host-name",
];

enum Target {
    /// A file's content.
    Body(Bytes),
    /// A file of `metadata/<vm ip>/`, by the name the request gave.
    File(String),
    Missing,
    /// `/latest/`: mod_autoindex lists the directory (it holds only `.htaccess`, hidden).
    Index,
    /// `/latest`: a directory without its slash.
    Slash,
}

/// mod_autoindex's page for `/latest/` (Debian's FancyIndexing, HTMLTable), empty.
const LATEST_INDEX: &str = "<!DOCTYPE HTML PUBLIC \"-//W3C//DTD HTML 3.2 Final//EN\">\n<html>\n <head>\n  <title>Index of /latest</title>\n </head>\n <body>\n<h1>Index of /latest</h1>\n  <table>\n   <tr><th valign=\"top\"><img src=\"/icons/blank.gif\" alt=\"[ICO]\"></th><th><a href=\"?C=N;O=D\">Name</a></th><th><a href=\"?C=M;O=A\">Last modified</a></th><th><a href=\"?C=S;O=A\">Size</a></th><th><a href=\"?C=D;O=A\">Description</a></th></tr>\n   <tr><th colspan=\"5\"><hr></th></tr>\n<tr><td valign=\"top\"><img src=\"/icons/back.gif\" alt=\"[PARENTDIR]\"></td><td><a href=\"/\">Parent Directory</a></td><td>&nbsp;</td><td align=\"right\">  - </td><td>&nbsp;</td></tr>\n   <tr><th colspan=\"5\"><hr></th></tr>\n</table>\n</body></html>\n";

#[derive(Clone, Copy, PartialEq, Eq)]
enum MethodKind {
    /// GET, HEAD, POST: the file.
    Serve,
    Options,
    /// Known to apache but not to a static file.
    NotAllowed,
    Unknown,
}

fn method_kind(method: &Method) -> MethodKind {
    match method.as_str() {
        "GET" | "HEAD" | "POST" => MethodKind::Serve,
        "OPTIONS" => MethodKind::Options,
        // apache's method registry: HTTP's and WebDAV's (TRACE is off: TraceEnable Off).
        "PUT" | "DELETE" | "CONNECT" | "TRACE" | "PATCH" | "PROPFIND" | "PROPPATCH" | "MKCOL"
        | "COPY" | "MOVE" | "LOCK" | "UNLOCK" | "VERSION-CONTROL" | "CHECKOUT" | "UNCHECKOUT"
        | "CHECKIN" | "UPDATE" | "LABEL" | "REPORT" | "MKWORKSPACE" | "MKACTIVITY"
        | "BASELINE-CONTROL" | "MERGE" => MethodKind::NotAllowed,
        _ => MethodKind::Unknown,
    }
}

/// apache's request path: percent-decoded (a bad escape: 400; an encoded `/` or NUL: 404),
/// repeated slashes merged, `.` and `..` resolved (above the root: 400).
fn apache_path(raw: &str) -> Result<String, StatusCode> {
    if !raw.starts_with('/') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
            let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                return Err(StatusCode::BAD_REQUEST);
            };
            let byte = (h * 16 + l) as u8;
            if byte == b'/' || byte == 0 {
                return Err(StatusCode::NOT_FOUND);
            }
            decoded.push(byte);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    // No file name here is anything but ASCII: a path that is not UTF-8 names no file.
    let decoded = String::from_utf8(decoded).map_err(|_| StatusCode::NOT_FOUND)?;
    let trailing = decoded.ends_with('/');
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(StatusCode::BAD_REQUEST);
                }
            }
            s => segments.push(s),
        }
    }
    let mut path = format!("/{}", segments.join("/"));
    let last_is_dot = decoded
        .rsplit('/')
        .next()
        .is_some_and(|s| s == "." || s == "..");
    if (trailing || last_is_dot) && !segments.is_empty() {
        path.push('/');
    }
    Ok(path)
}

fn static_file(body: Bytes) -> Resp {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("Apache"));
    resp
}

/// apache's error page for `status` (`ServerSignature Off`: no address line). `detail` is the
/// method of a 405 or 501, the location of a 301.
fn apache_error(status: StatusCode, detail: &str) -> Resp {
    let reason = status.canonical_reason().unwrap_or("Error");
    let message = match status {
        StatusCode::MOVED_PERMANENTLY => format!(
            "<p>The document has moved <a href=\"{}\">here</a>.</p>\n",
            html_escape(detail)
        ),
        StatusCode::BAD_REQUEST => {
            "<p>Your browser sent a request that this server could not understand.<br />\n</p>\n"
                .to_owned()
        }
        StatusCode::FORBIDDEN => {
            "<p>You don't have permission to access this resource.</p>\n".to_owned()
        }
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "<p>The requested method {} is not allowed for this URL.</p>\n",
            html_escape(detail)
        ),
        StatusCode::NOT_IMPLEMENTED => format!(
            "<p>{} not supported for current URL.<br />\n</p>\n",
            html_escape(detail)
        ),
        _ => "<p>The requested URL was not found on this server.</p>\n".to_owned(),
    };
    let body = format!(
        "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\n<html><head>\n<title>{} {reason}</title>\n</head><body>\n<h1>{reason}</h1>\n{message}</body></html>\n",
        status.as_u16()
    );
    let mut resp = Response::new(Bytes::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static("Apache"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(APACHE_ERROR_TYPE),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
    }
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock() -> CloudStackMock {
        CloudStackMock::new(CloudStackValues::default())
    }

    fn req(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Bytes::new()).unwrap()
    }

    fn send(m: &CloudStackMock, r: &Request<Bytes>) -> Resp {
        match m.handle(r, None) {
            Answer::Now(resp) => resp,
            Answer::Later(_) => panic!("the CloudStack mock answers at once"),
        }
    }

    fn body(resp: &Resp) -> String {
        String::from_utf8(resp.body().to_vec()).unwrap()
    }

    fn get(m: &CloudStackMock, path: &str) -> (StatusCode, String) {
        let resp = send(m, &req(Method::GET, path, &[]));
        (resp.status(), body(&resp))
    }

    fn ask(m: &CloudStackMock, request: &str) -> (StatusCode, String) {
        let resp = send(m, &req(Method::GET, "/", &[("DomU_Request", request)]));
        (resp.status(), body(&resp))
    }

    const LISTING: &str = "service-offering\navailability-zone\nlocal-ipv4\nlocal-hostname\npublic-ipv4\npublic-hostname\ninstance-id\nvm-id\npublic-keys\ncloud-identifier\n";

    #[test]
    fn metadata_listing_and_values() {
        let m = mock();
        let resp = send(&m, &req(Method::GET, "/latest/meta-data/", &[]));
        assert_eq!(
            (resp.status(), body(&resp).as_str()),
            (StatusCode::OK, LISTING)
        );
        assert_eq!(resp.headers()["server"], "Apache");
        assert!(
            resp.headers().get("content-type").is_none(),
            "no type for these files"
        );
        for (key, value) in [
            ("service-offering", "Small Instance"),
            ("availability-zone", "zone1"),
            ("local-ipv4", "10.1.1.42"),
            ("local-hostname", "redirect-mock"),
            ("public-ipv4", "192.0.2.10"),
            ("public-hostname", "192.0.2.10"),
            ("instance-id", "2f8a4b1c-7d3e-4f5a-9b6c-1d2e3f4a5b6c"),
            ("vm-id", "2f8a4b1c-7d3e-4f5a-9b6c-1d2e3f4a5b6c"),
            (
                "cloud-identifier",
                "CloudStack-{7c9e6679-7425-40de-944b-e07fc1f90ae7}",
            ),
        ] {
            assert_eq!(
                get(&m, &format!("/latest/meta-data/{key}")),
                (StatusCode::OK, value.into()),
                "{key}"
            );
            // The legacy URLs, and NC: the rules' patterns ignore case.
            assert_eq!(get(&m, &format!("/latest/{key}")).1, value, "{key}");
            assert_eq!(
                get(&m, &format!("/latest/{}", key.to_uppercase())).1,
                value,
                "{key}"
            );
            assert_eq!(
                get(&m, &format!("/latest/META-DATA/{key}")).1,
                value,
                "{key}"
            );
        }
        assert!(
            get(&m, "/latest/meta-data/public-keys")
                .1
                .starts_with("ssh-ed25519 ")
        );
        assert_eq!(get(&m, "/latest/Meta-Data/").1, LISTING);
        assert_eq!(get(&m, "/latest/meta-data/meta-data").1, LISTING);
        // Every listed entry answers 200, as cloud-init's crawl needs.
        for entry in LISTING.lines() {
            assert_eq!(
                get(&m, &format!("/latest/meta-data/{entry}")).0,
                StatusCode::OK
            );
        }
    }

    #[test]
    fn empty_values_and_keys() {
        let m = CloudStackMock::new(CloudStackValues {
            public_ipv4: String::new(),
            public_hostname: String::new(),
            cloud_identifier: String::new(),
            hypervisor_host_name: "kvm-host-3".into(),
            public_keys: Vec::new(),
            ..Default::default()
        });
        let listing = get(&m, "/latest/meta-data/").1;
        assert_eq!(
            listing,
            "service-offering\navailability-zone\nlocal-ipv4\nlocal-hostname\ninstance-id\nvm-id\npublic-keys\nhypervisor-host-name\n"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/public-ipv4").0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(get(&m, "/latest/public-ipv4").0, StatusCode::NOT_FOUND);
        assert_eq!(
            get(&m, "/latest/meta-data/public-keys"),
            (StatusCode::OK, String::new())
        );
        assert_eq!(
            get(&m, "/latest/meta-data/hypervisor-host-name").1,
            "kvm-host-3"
        );
        let two = CloudStackMock::new(CloudStackValues {
            public_keys: vec!["ssh-ed25519 AAAA a".into(), "ssh-rsa BBBB b".into()],
            ..Default::default()
        });
        assert_eq!(
            get(&two, "/latest/meta-data/public-keys").1,
            "ssh-ed25519 AAAA a\nssh-rsa BBBB b"
        );
    }

    #[test]
    fn user_data() {
        let m = mock();
        let resp = send(&m, &req(Method::GET, "/latest/user-data", &[]));
        assert_eq!((resp.status(), body(&resp).as_str()), (StatusCode::OK, ""));
        let with = CloudStackMock::new(CloudStackValues {
            user_data: Some("#cloud-config\npackages: [htop]\n".into()),
            ..Default::default()
        });
        assert_eq!(
            get(&with, "/latest/user-data"),
            (StatusCode::OK, "#cloud-config\npackages: [htop]\n".into())
        );
        assert_eq!(get(&with, "/latest/USER-DATA").0, StatusCode::OK);
        assert_eq!(get(&with, "/latest/user-data/").0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn directories() {
        let m = mock();
        let resp = send(&m, &req(Method::GET, "/latest/", &[]));
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body(&resp).contains("<title>Index of /latest</title>"));
        let resp = send(&m, &req(Method::GET, "/latest", &[("host", "10.1.1.1")]));
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(resp.headers()["location"], "http://10.1.1.1/latest/");
        assert!(body(&resp).contains("<a href=\"http://10.1.1.1/latest/\">here</a>"));
        let resp = send(&m, &req(Method::GET, "/latest", &[]));
        assert_eq!(resp.headers()["location"], "/latest/");
    }

    #[test]
    fn apache_errors() {
        let m = mock();
        let page = "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\n<html><head>\n<title>404 Not Found</title>\n</head><body>\n<h1>Not Found</h1>\n<p>The requested URL was not found on this server.</p>\n</body></html>\n";
        for path in [
            // Without the slash, no file: why cloud-init asks for `meta-data/`.
            "/latest/meta-data",
            "/latest/meta-data/nope",
            "/latest/meta-data/INSTANCE-ID",
            "/latest/meta-data/instance-id/",
            "/latest/meta-data/instance-id/x",
            "/latest/meta-data/public-keys/",
            "/latest/nope",
            "/2009-04-04/meta-data/instance-id",
            "/LATEST/meta-data/",
            "/",
            "/openstack",
            "/latest/meta-data/%2e%2e%2fuser-data",
            "/latest/meta-data/%00",
            "/latest/%ff",
        ] {
            let resp = send(&m, &req(Method::GET, path, &[]));
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(
                resp.headers()["content-type"],
                "text/html; charset=iso-8859-1"
            );
            assert_eq!(resp.headers()["server"], "Apache");
            assert_eq!(body(&resp), page, "{path}");
        }
        for path in [
            "/latest/.htaccess",
            "/latest/meta-data/.htaccess",
            "/.htpasswd",
        ] {
            assert_eq!(get(&m, path).0, StatusCode::FORBIDDEN, "{path}");
        }
        for path in [
            "/latest/meta-data/%",
            "/latest/%zz",
            "/..",
            "/latest/../../x",
        ] {
            let (status, body) = get(&m, path);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
            assert!(body.contains("<h1>Bad Request</h1>"), "{body}");
        }
        let forbidden = m.forbidden();
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
        assert!(body(&forbidden).contains("You don't have permission"));
    }

    #[test]
    fn normalized_paths() {
        let m = mock();
        for path in [
            "/latest//meta-data//instance-id",
            "/latest/./meta-data/instance-id",
            "/latest/x/../meta-data/instance-id",
            "/latest/meta-data/%69nstance-id",
            "/latest/meta-data/%2e/instance-id",
        ] {
            assert_eq!(get(&m, path).0, StatusCode::OK, "{path}");
        }
        assert_eq!(get(&m, "/latest/meta-data/x/..").1, LISTING);
        assert_eq!(get(&m, "/latest/meta-data/../user-data").0, StatusCode::OK);
        let long = format!("/latest/meta-data/{}", "x/".repeat(20_000));
        assert_eq!(get(&m, &long).0, StatusCode::NOT_FOUND);
        let long = format!("/latest/{}", "../".repeat(20_000));
        assert_eq!(get(&m, &long).0, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn apache_methods() {
        let m = mock();
        let post = send(&m, &req(Method::POST, "/latest/meta-data/instance-id", &[]));
        assert_eq!(
            post.status(),
            StatusCode::OK,
            "static files take POST like GET"
        );
        let head = send(&m, &req(Method::HEAD, "/latest/meta-data/instance-id", &[]));
        assert_eq!(head.status(), StatusCode::OK);
        let options = send(&m, &req(Method::OPTIONS, "/latest/meta-data/", &[]));
        assert_eq!(options.status(), StatusCode::OK);
        assert_eq!(options.headers()["allow"], "GET,POST,OPTIONS,HEAD");
        // IMDSv2's token request: 405 (botocore then goes on without a token).
        for (method, path) in [
            (Method::PUT, "/latest/api/token"),
            (Method::DELETE, "/latest/meta-data/instance-id"),
            (Method::PATCH, "/latest/"),
        ] {
            let resp = send(&m, &req(method.clone(), path, &[]));
            assert_eq!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(resp.headers()["allow"], "GET,POST,OPTIONS,HEAD");
            assert!(body(&resp).contains(&format!("The requested method {method} is not allowed")));
        }
        let brew = Method::from_bytes(b"BREW").unwrap();
        let resp = send(&m, &req(brew, "/latest/meta-data/", &[]));
        assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
        assert!(body(&resp).contains("BREW not supported for current URL."));
    }

    #[test]
    fn password_server_protocol() {
        let m = CloudStackMock::new(CloudStackValues {
            password: Some("s3cret-Pw".into()),
            ..Default::default()
        });
        let resp = send(
            &m,
            &req(Method::GET, "/", &[("DomU_Request", "send_my_password")]),
        );
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/plain");
        let servers: Vec<_> = resp.headers().get_all("server").iter().collect();
        assert_eq!(
            servers,
            [
                "CloudStack Password Server 4.x",
                "CloudStack Password Server"
            ]
        );
        assert_eq!(body(&resp), "s3cret-Pw");
        // Again until acknowledged; the path does not matter.
        let again = send(
            &m,
            &req(
                Method::GET,
                "/latest/meta-data/x",
                &[("domu_request", "send_my_password")],
            ),
        );
        assert_eq!(body(&again), "s3cret-Pw");
        assert_eq!(
            ask(&m, "saved_password"),
            (StatusCode::OK, "saved_password".into())
        );
        assert_eq!(
            ask(&m, "send_my_password"),
            (StatusCode::OK, "saved_password".into())
        );
        assert_eq!(ask(&m, "saved_password").1, "saved_password");
        for bad in ["", "SEND_MY_PASSWORD", "send_my_password2", "save_password"] {
            assert_eq!(
                ask(&m, bad),
                (StatusCode::OK, "bad_request".into()),
                "{bad:?}"
            );
        }
        // Acknowledged stays across a reload that keeps the password; a new one is pending.
        assert!(m.reload(CloudStackValues {
            password: Some("s3cret-Pw".into()),
            local_hostname: "renamed".into(),
            ..Default::default()
        }));
        assert_eq!(ask(&m, "send_my_password").1, "saved_password");
        assert!(m.reload(CloudStackValues {
            password: Some("new-Pw".into()),
            local_hostname: "renamed".into(),
            ..Default::default()
        }));
        assert_eq!(ask(&m, "send_my_password").1, "new-Pw");
        assert_eq!(get(&m, "/latest/meta-data/local-hostname").1, "renamed");
    }

    #[test]
    fn password_server_without_password_and_other_methods() {
        let m = mock();
        assert_eq!(
            ask(&m, "send_my_password"),
            (StatusCode::OK, "saved_password".into())
        );
        let post = send(
            &m,
            &req(Method::POST, "/", &[("DomU_Request", "save_password")]),
        );
        assert_eq!((post.status(), body(&post).as_str()), (StatusCode::OK, ""));
        let put = send(
            &m,
            &req(Method::PUT, "/", &[("DomU_Request", "send_my_password")]),
        );
        assert_eq!(put.status(), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(put.headers()["content-type"], "text/html;charset=utf-8");
        assert!(body(&put).contains("<p>Message: Unsupported method ('PUT').</p>"));
        let head = send(
            &m,
            &req(Method::HEAD, "/", &[("DomU_Request", "send_my_password")]),
        );
        assert_eq!(
            (head.status(), body(&head).as_str()),
            (StatusCode::NOT_IMPLEMENTED, "")
        );
        let empty = CloudStackMock::new(CloudStackValues {
            password: Some(String::new()),
            ..Default::default()
        });
        assert_eq!(ask(&empty, "send_my_password").1, "saved_password");
    }

    #[test]
    fn reload() {
        let m = mock();
        assert!(!m.reload(CloudStackValues::default()), "unchanged");
        assert!(m.reload(CloudStackValues {
            instance_id: "i-2-34-VM".into(),
            vm_id: "34".into(),
            ..Default::default()
        }));
        assert_eq!(get(&m, "/latest/meta-data/instance-id").1, "i-2-34-VM");
        assert_eq!(get(&m, "/latest/meta-data/vm-id").1, "34");
        assert_eq!(m.kind(), CloudKind::CloudStack);
    }
}
