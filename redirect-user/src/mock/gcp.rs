//! The built-in Google Compute Engine metadata server.
//!
//! Wire behaviour follows the real service (`../shared/reference/metadata-protocols.md`, and
//! the test suite of Google's own metadata-server emulator): `GET /` answers without the
//! request header (google-auth's detection probe); everything else needs
//! `Metadata-Flavor: Google`; every response carries `Metadata-Flavor: Google` and
//! `Server: Metadata Server for VM`. Plain values and listings (one entry a line, each ending
//! in `\n`, directories with a trailing `/`) are `application/text`; `recursive=true` on a
//! directory answers JSON (`application/json`, built-in keys in camelCase, attribute names as
//! they are). ETags hash the value, so they agree across `alt=text`/`alt=json`; the
//! `wait_for_change` long poll answers when the value's ETag changes (a [`GcpMock::reload`]),
//! or at its `timeout_sec`. Errors are Google's HTML error pages.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
};
use serde::{Deserialize, Deserializer, de};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{Answer, Cloud, CloudKind, Resp};
use crate::proxy::forward::{DEFAULT_LONG_POLL, MAX_LONG_POLL};

const METADATA_FLAVOR: HeaderName = HeaderName::from_static("metadata-flavor");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_XSS_PROTECTION: HeaderName = HeaderName::from_static("x-xss-protection");
const X_FRAME_OPTIONS: HeaderName = HeaderName::from_static("x-frame-options");

/// The content types of the real service (its clients compare them exactly: google-auth
/// decodes JSON only for `application/json`).
const TEXT: &str = "application/text";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=UTF-8";

/// ID tokens last an hour, as Google's do.
const ID_TOKEN_LIFETIME: u64 = 3600;
/// Callers with a service account of their own get their own tree, cached up to this many.
const MAX_CACHED_IDENTITIES: usize = 256;

/// The values the mock serves. Every field has a default; `[gcp]` in the config overrides them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcpValues {
    /// `project/project-id`.
    pub project_id: String,
    /// `project/numeric-project-id`, the project number: it is part of the zone, machine type
    /// and network paths and of the default service account's email.
    pub numeric_project_id: u64,
    /// `instance/id`: decimal digits, a JSON number in recursive answers as on GCE (a string
    /// here because GCE ids exceed TOML's i64).
    #[serde(deserialize_with = "de_numeric_id")]
    pub instance_id: String,
    /// `instance/name`.
    pub instance_name: String,
    /// `instance/hostname`; unset: `<name>.<zone>.c.<project>.internal`, GCE's zonal DNS name.
    pub hostname: Option<String>,
    /// The zone's name: `instance/zone` is `projects/<number>/zones/<zone>`.
    pub zone: String,
    /// `instance/machine-type` is `projects/<number>/machineTypes/<machine_type>`.
    pub machine_type: String,
    pub cpu_platform: String,
    /// `instance/image`: the boot image's resource path.
    pub image: String,
    pub description: String,
    /// `instance/tags` (network tags): a JSON list, as the real service answers it.
    pub tags: Vec<String>,
    /// `network-interfaces/0/ip`.
    pub internal_ip: Ipv4Addr,
    /// `network-interfaces/0/access-configs/0/external-ip`; `""`: none (no access config),
    /// as for a VM without an external address.
    #[serde(deserialize_with = "de_ip_opt")]
    pub external_ip: Option<Ipv4Addr>,
    pub gateway: Ipv4Addr,
    pub subnetmask: Ipv4Addr,
    /// `network-interfaces/0/mac`: GCE's are `42:01:` and the internal address.
    pub mac: String,
    /// The VPC network's name: `network-interfaces/0/network` is
    /// `projects/<number>/networks/<network>`.
    pub network: String,
    /// The VM's service account; unset: the project's default compute account,
    /// `<number>-compute@developer.gserviceaccount.com`.
    #[serde(deserialize_with = "de_email_opt")]
    pub service_account: Option<String>,
    /// The VM's access scopes (`service-accounts/<account>/scopes`).
    pub scopes: Vec<String>,
    /// More accounts listed under `service-accounts/` (by email, without the `default` alias)
    /// to callers whose policy names no account.
    #[serde(deserialize_with = "de_emails")]
    pub additional_service_accounts: Vec<String>,
    /// The access token the VM's service account is given; other accounts get it with a
    /// suffix of their own, so callers can tell them apart.
    pub access_token: String,
    /// How long served tokens stay valid; they are re-dated every half lifetime, so
    /// `expires_in` is always more than half of it. google-auth refreshes a token within
    /// 3m45s of its expiry: a lifetime under 7m30s makes it fetch one for every use.
    #[serde(deserialize_with = "de_duration")]
    pub token_lifetime: Duration,
    /// `instance/attributes/` (custom instance metadata).
    #[serde(deserialize_with = "de_attributes")]
    pub instance_attributes: BTreeMap<String, String>,
    /// `project/attributes/` (project-wide metadata; cloud-init reads `ssh-keys` there).
    #[serde(deserialize_with = "de_attributes")]
    pub project_attributes: BTreeMap<String, String>,
    /// Served as the instance attribute `user-data` (over one in `instance_attributes`), where
    /// cloud-init reads it; unset: none.
    pub user_data: Option<String>,
}

impl Default for GcpValues {
    fn default() -> Self {
        GcpValues {
            project_id: "redirect-mock".into(),
            numeric_project_id: 123_456_789_012,
            instance_id: "4520031799277581759".into(),
            instance_name: "redirect-mock".into(),
            hostname: None,
            zone: "us-central1-a".into(),
            machine_type: "e2-medium".into(),
            cpu_platform: "Intel Broadwell".into(),
            image: "projects/debian-cloud/global/images/debian-12-bookworm-v20240110".into(),
            description: String::new(),
            tags: Vec::new(),
            internal_ip: Ipv4Addr::new(10, 128, 0, 2),
            // TEST-NET-3: looks like an address, routes nowhere.
            external_ip: Some(Ipv4Addr::new(203, 0, 113, 10)),
            gateway: Ipv4Addr::new(10, 128, 0, 1),
            subnetmask: Ipv4Addr::new(255, 255, 240, 0),
            mac: "42:01:0a:80:00:02".into(),
            network: "default".into(),
            service_account: None,
            scopes: vec!["https://www.googleapis.com/auth/cloud-platform".into()],
            additional_service_accounts: Vec::new(),
            access_token: "ya29.redirect-mock-access-token-not-valid-anywhere".into(),
            token_lifetime: Duration::from_secs(3600),
            instance_attributes: BTreeMap::new(),
            // The EC2 mock's key: nobody holds its private half.
            project_attributes: BTreeMap::from([(
                "ssh-keys".to_owned(),
                "redirect:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdn64tja8pwcDUbaCmvStoVpTGDi5Ee8Qb40/GlwW1i redirect-mock".to_owned(),
            )]),
            user_data: None,
        }
    }
}

impl GcpValues {
    /// The VM's service account: the configured one or the project's default compute account.
    pub fn default_account(&self) -> String {
        self.service_account.clone().unwrap_or_else(|| {
            format!(
                "{}-compute@developer.gserviceaccount.com",
                self.numeric_project_id
            )
        })
    }

    fn hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| {
            format!(
                "{}.{}.c.{}.internal",
                self.instance_name, self.zone, self.project_id
            )
        })
    }

    /// The token `email` is given: the configured one for the VM's account.
    fn token_for(&self, email: &str) -> String {
        if email == self.default_account() {
            return self.access_token.clone();
        }
        format!(
            "{}.{}",
            self.access_token,
            &hex(&Sha256::digest(email.as_bytes()))[..16]
        )
    }
}

/// Whether `s` can name a service account in the tree: an email-like path segment other than
/// the `default` alias.
pub fn is_account_email(s: &str) -> bool {
    s.contains('@')
        && s != "default"
        && !s.contains('/')
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Metadata keys as GCE accepts them: 1 to 128 of `[A-Za-z0-9_-]`.
pub fn is_attribute_key(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn de_numeric_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let canonical = s.parse::<u64>().is_ok_and(|n| n.to_string() == s);
    if !canonical {
        return Err(de::Error::custom(format!(
            "invalid instance_id {s:?}: expected a decimal number below 2^64 without leading zeros"
        )));
    }
    Ok(s)
}

fn de_ip_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        de::Error::custom(format!(
            "invalid external_ip {s:?}: expected an IPv4 address or \"\" for none"
        ))
    })
}

fn check_email<E: de::Error>(s: String) -> Result<String, E> {
    if !is_account_email(&s) {
        return Err(E::custom(format!(
            "invalid service account {s:?}: expected an email, without '/' or spaces"
        )));
    }
    Ok(s)
}

fn de_email_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    check_email(String::deserialize(d)?).map(Some)
}

fn de_emails<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(d)?
        .into_iter()
        .map(check_email)
        .collect()
}

fn de_attributes<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    if let Some(bad) = map.keys().find(|k| !is_attribute_key(k)) {
        return Err(de::Error::custom(format!(
            "invalid attribute name {bad:?}: expected 1 to 128 of A-Z, a-z, 0-9, '-', '_'"
        )));
    }
    Ok(map)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let d = crate::config::parse_duration(&s).map_err(de::Error::custom)?;
    if !(Duration::from_secs(2)..=Duration::from_secs(24 * 3600)).contains(&d) {
        return Err(de::Error::custom("token_lifetime must be 2s to 24h"));
    }
    Ok(d)
}

/// A node of the `computeMetadata/v1/` tree. Tokens are rendered per request.
enum Node {
    Dir(BTreeMap<String, Node>, Keys),
    /// A directory of numbered entries (`network-interfaces/0/`): a JSON array.
    List(Vec<Node>),
    Str(String),
    /// A JSON number when recursive or `alt=json` (`instance/id`, `numeric-project-id`).
    Num(u64),
    /// A list value (`scopes`, `tags`): one item a line as text, a JSON array.
    Strs(Vec<String>, Shape),
    /// `service-accounts/<account>/token` and `identity`, left out of recursive answers as the
    /// real service leaves them out.
    Token(Account),
    Identity(Account),
}

/// How a directory's entries are named in JSON: built-in ones in camelCase, attribute names
/// and accounts as they are.
#[derive(Clone, Copy)]
enum Keys {
    Camel,
    Verbatim,
}

/// A list value's representation without `alt`: `tags` answers JSON, `scopes` text.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Text,
    Json,
}

struct Account {
    email: String,
    token: String,
}

impl Node {
    fn is_dir(&self) -> bool {
        matches!(self, Node::Dir(..) | Node::List(_))
    }
}

/// The mock. Its values sit behind a watch channel: a reload sends new ones, which wakes the
/// long polls, and each checks whether its own value changed.
pub struct GcpMock {
    inner: Arc<Inner>,
}

struct Inner {
    current: watch::Sender<Arc<Instance>>,
    /// Token validity windows count from here, across reloads.
    started: SystemTime,
}

/// The values served now, and their trees.
struct Instance {
    values: GcpValues,
    default_tree: Arc<Node>,
    /// The tree as callers with an account of their own see it (only `service-accounts/`
    /// differs), by account. Goes with the instance at a reload.
    by_identity: RwLock<BTreeMap<String, Arc<Node>>>,
}

impl GcpMock {
    pub fn new(values: GcpValues) -> Self {
        let (current, _) = watch::channel(Arc::new(Instance::new(values)));
        GcpMock {
            inner: Arc::new(Inner {
                current,
                started: SystemTime::now(),
            }),
        }
    }

    /// Serves `values` from now on; false when unchanged. A change wakes the wait_for_change
    /// waiters of every value that changed (their ETag changes).
    pub fn reload(&self, values: GcpValues) -> bool {
        if self.inner.current.borrow().values == values {
            return false;
        }
        self.inner
            .current
            .send_replace(Arc::new(Instance::new(values)));
        true
    }
}

impl Cloud for GcpMock {
    fn kind(&self) -> CloudKind {
        CloudKind::Gcp
    }

    fn handle(&self, req: &Request<Bytes>, identity: Option<&str>) -> Answer {
        self.inner.route(req, identity, SystemTime::now())
    }

    fn forbidden(&self) -> Resp {
        // The real service never refuses a well-formed request; this is its refusal page.
        google_error(
            StatusCode::FORBIDDEN,
            "Your client does not have permission to get this URL from this server. ",
        )
    }
}

impl Instance {
    fn new(values: GcpValues) -> Self {
        let default_tree = Arc::new(build_tree(&values, None));
        Instance {
            values,
            default_tree,
            by_identity: RwLock::default(),
        }
    }

    fn tree(&self, identity: Option<&str>) -> Arc<Node> {
        let Some(identity) = identity else {
            return Arc::clone(&self.default_tree);
        };
        let cache = self
            .by_identity
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tree) = cache.get(identity) {
            return Arc::clone(tree);
        }
        drop(cache);
        let tree = Arc::new(build_tree(&self.values, Some(identity)));
        let mut cache = self
            .by_identity
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() < MAX_CACHED_IDENTITIES {
            cache.insert(identity.to_owned(), Arc::clone(&tree));
        }
        tree
    }
}

/// What a request asks of a value besides its path.
#[derive(Clone, Copy)]
struct View {
    recursive: bool,
    alt: Alt,
}

#[derive(Clone, Copy, PartialEq)]
enum Alt {
    Default,
    Text,
    Json,
}

impl View {
    fn of(query: &Query) -> Self {
        let alt = match query.get("alt") {
            Some(a) if a.eq_ignore_ascii_case("json") => Alt::Json,
            Some(a) if a.eq_ignore_ascii_case("text") => Alt::Text,
            _ => Alt::Default,
        };
        View {
            recursive: query.flag("recursive"),
            alt,
        }
    }
}

/// A value as it goes out.
struct Rendered {
    content_type: &'static str,
    body: String,
    etag: String,
}

enum Failure {
    NotFound,
    BadRequest,
    NoAudience,
}

/// What rendering needs besides the node.
struct Ctx<'a> {
    values: &'a GcpValues,
    started: SystemTime,
    now: SystemTime,
    query: &'a Query,
}

/// A long poll: the value it watches and the ETag it waits to see change.
struct Waiter {
    identity: Option<String>,
    segments: Vec<String>,
    view: View,
    query: Query,
    path: String,
    baseline: String,
    timeout: Duration,
}

impl Inner {
    fn route(
        self: &Arc<Self>,
        req: &Request<Bytes>,
        identity: Option<&str>,
        now: SystemTime,
    ) -> Answer {
        let path = req.uri().path();
        let headers = req.headers();
        // The real service's order: the proxy and flavor checks come before anything else.
        if headers.contains_key(X_FORWARDED_FOR) {
            return forwarded(path).into();
        }
        // `/` answers without the header: it is how google-auth detects GCE.
        if path != "/" && !flavored(headers) {
            return missing_flavor(path).into();
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return method_not_allowed(req.method(), path).into();
        }
        match path {
            "/" => ok(listed("computeMetadata/\n")).into(),
            "/computeMetadata/" => ok(listed("v1/\n")).into(),
            "/computeMetadata" | "/computeMetadata/v1" => redirect(req).into(),
            _ => match path.strip_prefix("/computeMetadata/v1/") {
                Some(rest) => self.v1(req, rest, identity, now),
                None => not_found(path).into(),
            },
        }
    }

    fn v1(
        self: &Arc<Self>,
        req: &Request<Bytes>,
        rest: &str,
        identity: Option<&str>,
        now: SystemTime,
    ) -> Answer {
        let path = req.uri().path();
        let Some((segments, dir_form)) = parse_segments(rest) else {
            return not_found(path).into();
        };
        // Subscribed before reading: a reload after this point is seen by the long poll.
        let mut rx = self.current.subscribe();
        let instance = Arc::clone(&rx.borrow_and_update());
        let tree = instance.tree(identity);
        let Some(node) = resolve(&tree, &segments) else {
            return not_found(path).into();
        };
        match (node.is_dir(), dir_form) {
            (true, false) => return redirect(req).into(),
            (false, true) => return not_found(path).into(),
            _ => {}
        }
        let query = Query::parse(req.uri().query().unwrap_or_default());
        let view = View::of(&query);
        let ctx = Ctx {
            values: &instance.values,
            started: self.started,
            now,
            query: &query,
        };
        if !query.flag("wait_for_change") {
            return respond(render(node, view, &ctx), path).into();
        }
        // A directory's listing cannot be watched, only its recursive value.
        if node.is_dir() && !view.recursive {
            return bad_request().into();
        }
        let Some(timeout) = parse_timeout(query.get("timeout_sec")) else {
            return bad_request().into();
        };
        let current = match render(node, view, &ctx) {
            Ok(current) => current,
            Err(failure) => return fail(failure, path).into(),
        };
        if query
            .get("last_etag")
            .is_some_and(|last| last != current.etag)
        {
            return ok(current).into();
        }
        let waiter = Waiter {
            identity: identity.map(str::to_owned),
            segments,
            view,
            path: path.to_owned(),
            baseline: current.etag,
            timeout,
            query,
        };
        Answer::Later(Box::pin(waiter.wait(Arc::clone(self), rx)))
    }
}

impl Waiter {
    async fn wait(self, inner: Arc<Inner>, mut rx: watch::Receiver<Arc<Instance>>) -> Resp {
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let instance = Arc::clone(&rx.borrow_and_update());
                    match self.render(&inner, &instance) {
                        Ok(now) if now.etag == self.baseline => {}
                        result => return respond(result, &self.path),
                    }
                }
            }
        }
        let instance = Arc::clone(&rx.borrow());
        respond(self.render(&inner, &instance), &self.path)
    }

    fn render(&self, inner: &Inner, instance: &Instance) -> Result<Rendered, Failure> {
        let tree = instance.tree(self.identity.as_deref());
        let node = resolve(&tree, &self.segments).ok_or(Failure::NotFound)?;
        let ctx = Ctx {
            values: &instance.values,
            started: inner.started,
            now: SystemTime::now(),
            query: &self.query,
        };
        render(node, self.view, &ctx)
    }
}

fn flavored(headers: &HeaderMap) -> bool {
    headers
        .get(METADATA_FLAVOR)
        .is_some_and(|v| v.as_bytes() == b"Google")
}

/// The segments under `v1/`, percent-decoded, and whether the path ends in `/` (a directory).
/// `None` for an empty segment (`//`), `.`, `..` or one that decodes to `/` or bad UTF-8: the
/// path is never normalised, so no spelling reaches another value.
fn parse_segments(rest: &str) -> Option<(Vec<String>, bool)> {
    if rest.is_empty() {
        return Some((Vec::new(), true));
    }
    let dir_form = rest.ends_with('/');
    let body = rest.strip_suffix('/').unwrap_or(rest);
    let mut segments = Vec::new();
    for raw in body.split('/') {
        let segment = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .ok()?
            .into_owned();
        if segment.is_empty() || segment == "." || segment == ".." || segment.contains('/') {
            return None;
        }
        segments.push(segment);
    }
    Some((segments, dir_form))
}

fn resolve<'t>(root: &'t Node, segments: &[String]) -> Option<&'t Node> {
    segments.iter().try_fold(root, |node, segment| match node {
        Node::Dir(entries, _) => entries.get(segment),
        // Canonical indices only: `0`, not `00` or `+0`.
        Node::List(items) => {
            let i: usize = segment.parse().ok()?;
            (i.to_string() == *segment).then(|| items.get(i))?
        }
        _ => None,
    })
}

/// `timeout_sec`: whole seconds ("Only an integer value can be used"), at most
/// [`MAX_LONG_POLL`]; absent: [`DEFAULT_LONG_POLL`]. The proxy gives forwarded long polls the
/// same budget. `None`: not an integer.
fn parse_timeout(value: Option<&str>) -> Option<Duration> {
    let Some(value) = value else {
        return Some(DEFAULT_LONG_POLL);
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: only too many of them fail to parse, which is more than the cap anyway.
    let secs = value.parse().unwrap_or(u64::MAX);
    Some(Duration::from_secs(secs).min(MAX_LONG_POLL))
}

fn render(node: &Node, view: View, ctx: &Ctx) -> Result<Rendered, Failure> {
    Ok(match node {
        // A listing has no other representation.
        Node::Dir(..) | Node::List(_) if !view.recursive => {
            if view.alt != Alt::Default {
                return Err(Failure::BadRequest);
            }
            listed(&listing(node))
        }
        Node::Dir(..) | Node::List(_) => {
            let json = to_json(node).unwrap_or(Value::Null).to_string();
            let etag = etag(&json);
            if view.alt == Alt::Text {
                let mut text = String::new();
                to_text("", node, &mut text);
                Rendered::new(TEXT, text, etag)
            } else {
                Rendered::new(JSON, json, etag)
            }
        }
        Node::Str(s) => leaf(Value::from(s.as_str()), s.clone(), view, Shape::Text),
        Node::Num(n) => leaf(Value::from(*n), n.to_string(), view, Shape::Text),
        Node::Strs(items, default) => {
            let text = items.iter().map(|i| format!("{i}\n")).collect();
            leaf(Value::from(items.as_slice()), text, view, *default)
        }
        Node::Token(account) => {
            let expires_in = expires_in(ctx);
            let value = json!({
                "access_token": account.token,
                "expires_in": expires_in,
                "token_type": "Bearer",
            });
            let text = format!(
                "access_token {}\nexpires_in {expires_in}\ntoken_type Bearer\n",
                account.token
            );
            leaf(value, text, view, Shape::Json)
        }
        Node::Identity(account) => {
            let jwt = identity_token(account, ctx)?;
            leaf(Value::from(jwt.as_str()), jwt, view, Shape::Text)
        }
    })
}

fn leaf(value: Value, text: String, view: View, default: Shape) -> Rendered {
    let json = value.to_string();
    let etag = etag(&json);
    let as_json = match view.alt {
        Alt::Json => true,
        Alt::Text => false,
        Alt::Default => default == Shape::Json,
    };
    if as_json {
        Rendered::new(JSON, json, etag)
    } else {
        Rendered::new(TEXT, text, etag)
    }
}

impl Rendered {
    fn new(content_type: &'static str, body: String, etag: String) -> Self {
        Rendered {
            content_type,
            body,
            etag,
        }
    }
}

/// A listing's ETag is its text's: it differs from the recursive value's, as on GCE.
fn listed(text: &str) -> Rendered {
    Rendered::new(TEXT, text.to_owned(), etag(text))
}

fn listing(node: &Node) -> String {
    let mut out = String::new();
    let mut entry = |name: &dyn std::fmt::Display, child: &Node| {
        let slash = if child.is_dir() { "/" } else { "" };
        let _ = writeln!(out, "{name}{slash}");
    };
    match node {
        Node::Dir(entries, _) => entries.iter().for_each(|(name, child)| entry(name, child)),
        Node::List(items) => items.iter().enumerate().for_each(|(i, c)| entry(&i, c)),
        _ => {}
    }
    out
}

/// The recursive JSON value; `None` for tokens, which it leaves out.
fn to_json(node: &Node) -> Option<Value> {
    Some(match node {
        Node::Dir(entries, keys) => Value::Object(
            entries
                .iter()
                .filter_map(|(name, child)| {
                    let key = match keys {
                        Keys::Camel => camel_case(name),
                        Keys::Verbatim => name.clone(),
                    };
                    Some((key, to_json(child)?))
                })
                .collect(),
        ),
        Node::List(items) => Value::Array(items.iter().filter_map(to_json).collect()),
        Node::Str(s) => Value::from(s.as_str()),
        Node::Num(n) => Value::from(*n),
        Node::Strs(items, _) => Value::from(items.as_slice()),
        Node::Token(_) | Node::Identity(_) => return None,
    })
}

/// `recursive=true&alt=text`: a `path value` line for every value under `node` (a list
/// value: a line per item), paths joined by `/` from the tree's own names.
fn to_text(prefix: &str, node: &Node, out: &mut String) {
    let join = |name: &str| {
        if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        }
    };
    let line = |out: &mut String, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{prefix} {value}");
    };
    match node {
        Node::Dir(entries, _) => {
            for (name, child) in entries {
                to_text(&join(name), child, out);
            }
        }
        Node::List(items) => {
            for (i, child) in items.iter().enumerate() {
                to_text(&join(&i.to_string()), child, out);
            }
        }
        Node::Str(s) => line(out, s),
        Node::Num(n) => line(out, n),
        Node::Strs(items, _) => items.iter().for_each(|i| line(out, i)),
        Node::Token(_) | Node::Identity(_) => {}
    }
}

/// `numeric-project-id` to `numericProjectId`, as the real service names built-in keys.
fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, part) in name.split('-').enumerate() {
        let mut chars = part.chars();
        match chars.next() {
            Some(first) if i > 0 => {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
            _ => out.push_str(part),
        }
    }
    out
}

/// Seconds to the token's expiry. Tokens are re-dated every half lifetime, so the answer is
/// always more than half a lifetime, as GCE hands out a fresh token well before expiry.
fn expires_in(ctx: &Ctx) -> u64 {
    let lifetime = ctx.values.token_lifetime;
    let period = (lifetime / 2).as_secs().max(1);
    let elapsed = ctx
        .now
        .duration_since(ctx.started)
        .unwrap_or_default()
        .as_secs();
    let expiry = Duration::from_secs(elapsed - elapsed % period)
        .checked_add(lifetime)
        .and_then(|since| ctx.started.checked_add(since));
    expiry
        .and_then(|e| e.duration_since(ctx.now).ok())
        .map_or(lifetime.as_secs(), |d| d.as_secs())
}

/// `identity?audience=A[&format=full[&licenses=TRUE]]`: a JWT as Google issues it, with
/// `format=full` adding the email and the `google.compute_engine` claims. Nothing can
/// verify it (there is no Google key to sign with), so the signature is a deterministic
/// placeholder of an RS256 signature's length; clients that only decode it (google-auth
/// reads `exp`) work.
fn identity_token(account: &Account, ctx: &Ctx) -> Result<String, Failure> {
    let audience = ctx
        .query
        .get("audience")
        .filter(|a| !a.is_empty())
        .ok_or(Failure::NoAudience)?;
    let full = ctx
        .query
        .get("format")
        .is_some_and(|f| f.eq_ignore_ascii_case("full"));
    let iat = unix_secs(ctx.now);
    let sub = account_number(&account.email);
    let mut payload = json!({
        "aud": audience,
        "azp": sub,
        "exp": iat + ID_TOKEN_LIFETIME,
        "iat": iat,
        "iss": "https://accounts.google.com",
        "sub": sub,
    });
    if full {
        let v = ctx.values;
        let mut compute_engine = json!({
            "instance_creation_timestamp": unix_secs(ctx.started),
            "instance_id": v.instance_id,
            "instance_name": v.instance_name,
            "project_id": v.project_id,
            "project_number": v.numeric_project_id,
            "zone": v.zone,
        });
        if ctx.query.flag("licenses") {
            compute_engine["license_id"] = json!([]);
        }
        payload["email"] = json!(account.email);
        payload["email_verified"] = json!(true);
        payload["google"] = json!({ "compute_engine": compute_engine });
    }
    let kid = &hex(&Sha256::digest(b"redirect mock identity placeholder"))[..40];
    let header = json!({"alg": "RS256", "kid": kid, "typ": "JWT"});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    // 256 bytes, as a 2048-bit RSA signature: chained SHA-256 of the signed part.
    let mut signature = Vec::with_capacity(256);
    let mut block = Sha256::digest(signing_input.as_bytes());
    while signature.len() < 256 {
        signature.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// A service account's numeric id (`sub`), 21 digits like Google's, derived from its email.
fn account_number(email: &str) -> String {
    let digest = Sha256::digest(format!("service-account:{email}").as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default());
    format!("1{n:020}")
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn build_tree(v: &GcpValues, identity: Option<&str>) -> Node {
    let n = v.numeric_project_id;
    let id = v
        .instance_id
        .parse()
        .map_or_else(|_| s(&v.instance_id), Node::Num);
    let mut instance_attributes = v.instance_attributes.clone();
    if let Some(data) = &v.user_data {
        instance_attributes.insert("user-data".to_owned(), data.clone());
    }
    let disk = camel([
        ("device-name", s(&v.instance_name)),
        ("index", Node::Num(0)),
        ("interface", s("SCSI")),
        ("mode", s("READ_WRITE")),
        ("type", s("PERSISTENT")),
    ]);
    let instance = camel([
        ("attributes", attributes(&instance_attributes)),
        ("cpu-platform", s(&v.cpu_platform)),
        ("description", s(&v.description)),
        ("disks", Node::List(vec![disk])),
        ("hostname", s(&v.hostname())),
        ("id", id),
        ("image", s(&v.image)),
        ("licenses", Node::List(Vec::new())),
        (
            "machine-type",
            s(&format!("projects/{n}/machineTypes/{}", v.machine_type)),
        ),
        ("maintenance-event", s("NONE")),
        ("name", s(&v.instance_name)),
        ("network-interfaces", Node::List(vec![interface(v)])),
        ("preempted", s("FALSE")),
        (
            "scheduling",
            camel([
                ("automatic-restart", s("TRUE")),
                ("on-host-maintenance", s("MIGRATE")),
                ("preemptible", s("FALSE")),
            ]),
        ),
        ("service-accounts", service_accounts(v, identity)),
        ("tags", Node::Strs(v.tags.clone(), Shape::Json)),
        ("virtual-clock", camel([("drift-token", s("0"))])),
        ("zone", s(&format!("projects/{n}/zones/{}", v.zone))),
    ]);
    let project = camel([
        ("attributes", attributes(&v.project_attributes)),
        ("numeric-project-id", Node::Num(n)),
        ("project-id", s(&v.project_id)),
    ]);
    // google-auth 2.63 asks it; real VMs answer it.
    let universe = camel([("universe-domain", s("googleapis.com"))]);
    camel([
        ("instance", instance),
        ("project", project),
        ("universe", universe),
    ])
}

fn s(value: &str) -> Node {
    Node::Str(value.to_owned())
}

fn camel<const N: usize>(entries: [(&str, Node); N]) -> Node {
    let entries = entries.into_iter().map(|(k, n)| (k.to_owned(), n));
    Node::Dir(entries.collect(), Keys::Camel)
}

fn attributes(map: &BTreeMap<String, String>) -> Node {
    let entries = map.iter().map(|(k, v)| (k.clone(), s(v)));
    Node::Dir(entries.collect(), Keys::Verbatim)
}

/// `network-interfaces/0/`, the VM's only interface, on the default network's subnet.
fn interface(v: &GcpValues) -> Node {
    let access_configs = v
        .external_ip
        .map(|ip| {
            camel([
                ("external-ip", s(&ip.to_string())),
                ("type", s("ONE_TO_ONE_NAT")),
            ])
        })
        .into_iter()
        .collect();
    camel([
        ("access-configs", Node::List(access_configs)),
        (
            "dns-servers",
            Node::Strs(vec!["169.254.169.254".to_owned()], Shape::Text),
        ),
        ("forwarded-ips", Node::List(Vec::new())),
        ("gateway", s(&v.gateway.to_string())),
        ("ip", s(&v.internal_ip.to_string())),
        ("ip-aliases", Node::List(Vec::new())),
        ("mac", s(&v.mac)),
        ("mtu", Node::Num(1460)),
        (
            "network",
            s(&format!(
                "projects/{}/networks/{}",
                v.numeric_project_id, v.network
            )),
        ),
        ("subnetmask", s(&v.subnetmask.to_string())),
        ("target-instance-ips", Node::List(Vec::new())),
    ])
}

/// `service-accounts/`: `default/` and the account it aliases, by email. A caller whose
/// policy names an account sees that one and only that one; the others see the VM's
/// account and the additional ones.
fn service_accounts(v: &GcpValues, identity: Option<&str>) -> Node {
    let account = |email: &str, default: bool| {
        let account = || Account {
            email: email.to_owned(),
            token: v.token_for(email),
        };
        let aliases = if default {
            vec!["default".to_owned()]
        } else {
            Vec::new()
        };
        camel([
            ("aliases", Node::Strs(aliases, Shape::Text)),
            ("email", s(email)),
            ("identity", Node::Identity(account())),
            ("scopes", Node::Strs(v.scopes.clone(), Shape::Text)),
            ("token", Node::Token(account())),
        ])
    };
    let primary = identity.map_or_else(|| v.default_account(), str::to_owned);
    let mut entries = BTreeMap::from([
        ("default".to_owned(), account(&primary, true)),
        (primary.clone(), account(&primary, true)),
    ]);
    if identity.is_none() {
        for email in &v.additional_service_accounts {
            entries
                .entry(email.clone())
                .or_insert_with(|| account(email, false));
        }
    }
    Node::Dir(entries, Keys::Verbatim)
}

/// A decoded query (`application/x-www-form-urlencoded`); of repeated keys the first
/// counts. Owned: a long poll's future outlives the request.
#[derive(Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Query(
            form_urlencoded::parse(raw.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `recursive=true`, `True` (cloud-init) or `TRUE`; any other value is false, as the real
    /// service ignores values it does not understand.
    fn flag(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// 16 hex digits, like the real service's ETags.
fn etag(content: &str) -> String {
    hex(&Sha256::digest(content.as_bytes())[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn base(status: StatusCode, content_type: &'static str, body: String) -> Resp {
    let mut resp = Response::new(Bytes::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(METADATA_FLAVOR, HeaderValue::from_static("Google"));
    h.insert(
        header::SERVER,
        HeaderValue::from_static("Metadata Server for VM"),
    );
    h.insert(X_XSS_PROTECTION, HeaderValue::from_static("0"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("SAMEORIGIN"));
    resp
}

fn ok(rendered: Rendered) -> Resp {
    let mut resp = base(StatusCode::OK, rendered.content_type, rendered.body);
    if let Ok(etag) = HeaderValue::from_str(&rendered.etag) {
        resp.headers_mut().insert(header::ETAG, etag);
    }
    resp
}

fn respond(result: Result<Rendered, Failure>, path: &str) -> Resp {
    match result {
        Ok(rendered) => ok(rendered),
        Err(failure) => fail(failure, path),
    }
}

fn fail(failure: Failure, path: &str) -> Resp {
    match failure {
        Failure::NotFound => not_found(path),
        Failure::BadRequest => bad_request(),
        Failure::NoAudience => base(
            StatusCode::BAD_REQUEST,
            HTML,
            "non-empty audience parameter required\n".to_owned(),
        ),
    }
}

/// A directory asked without its trailing slash: a redirect to it, the query kept, absolute
/// when the `Host` is a plain host name or address (the real service names its own).
fn redirect(req: &Request<Bytes>) -> Resp {
    let mut target = format!("{}/", req.uri().path());
    if let Some(query) = req.uri().query() {
        target = format!("{target}?{query}");
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    let location = match host {
        Some(host) => format!("http://{host}{target}"),
        None => target.clone(),
    };
    let mut resp = base(
        StatusCode::MOVED_PERMANENTLY,
        "text/html",
        format!("{target}\n"),
    );
    if let Ok(location) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

/// Google's error page. `text` is HTML, ending in the spacing before "That’s all we know.".
fn google_error(status: StatusCode, text: &str) -> Resp {
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("Error");
    let body = format!(
        "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  <title>Error {code} ({reason})!!1</title>\n  <style>\n    {GOOGLE_ERROR_STYLE}\n  </style>\n  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n  <p><b>{code}.</b> <ins>That\u{2019}s an error.</ins>\n  <p>{text}<ins>That\u{2019}s all we know.</ins>\n"
    );
    base(status, HTML, body)
}

const GOOGLE_ERROR_STYLE: &str = "*{margin:0;padding:0}html,code{font:15px/22px arial,sans-serif}html{background:#fff;color:#222;padding:15px}body{margin:7% auto 0;max-width:390px;min-height:180px;padding:30px 0 15px}* > body{background:url(//www.google.com/images/errors/robot.png) 100% 5px no-repeat;padding-right:205px}p{margin:11px 0 22px;overflow:hidden}ins{color:#777;text-decoration:none}a img{border:0}@media screen and (max-width:772px){body{background:none;margin-top:0;max-width:none;padding-right:0}}#logo{background:url(//www.google.com/images/branding/googlelogo/1x/googlelogo_color_150x54dp.png) no-repeat;margin-left:-5px}@media only screen and (min-resolution:192dpi){#logo{background:url(//www.google.com/images/branding/googlelogo/2x/googlelogo_color_150x54dp.png) no-repeat 0% 0%/100% 100%;-moz-border-image:url(//www.google.com/images/branding/googlelogo/2x/googlelogo_color_150x54dp.png) 0}}@media only screen and (-webkit-min-device-pixel-ratio:2){#logo{background:url(//www.google.com/images/branding/googlelogo/2x/googlelogo_color_150x54dp.png) no-repeat;-webkit-background-size:100% 100%}}#logo{display:inline-block;height:54px;width:150px}";

/// The real refusal, byte for byte (1649 bytes for `/computeMetadata/v1/instance/name`).
fn missing_flavor(path: &str) -> Resp {
    let text = format!(
        "Your client does not have permission to get URL <code>{}</code> from this server. Missing Metadata-Flavor:Google header. ",
        html_escape(path)
    );
    google_error(StatusCode::FORBIDDEN, &text)
}

/// A request that came through a proxy (`X-Forwarded-For`), which the real service refuses.
fn forwarded(path: &str) -> Resp {
    let text = format!(
        "Your client does not have permission to get URL <code>{}</code> from this server.  ",
        html_escape(path)
    );
    google_error(StatusCode::FORBIDDEN, &text)
}

fn not_found(path: &str) -> Resp {
    let text = format!(
        "The requested URL <code>{}</code> was not found on this server.  ",
        html_escape(path)
    );
    google_error(StatusCode::NOT_FOUND, &text)
}

fn method_not_allowed(method: &Method, path: &str) -> Resp {
    let text = format!(
        "The request method <code>{}</code> is inappropriate for the URL <code>{}</code>.  ",
        html_escape(method.as_str()),
        html_escape(path)
    );
    google_error(StatusCode::METHOD_NOT_ALLOWED, &text)
}

fn bad_request() -> Resp {
    google_error(
        StatusCode::BAD_REQUEST,
        "Your client has issued a malformed or illegal request.  ",
    )
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "/computeMetadata/v1/";

    fn mock() -> GcpMock {
        GcpMock::new(GcpValues::default())
    }

    fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Bytes::new()).unwrap()
    }

    fn flavored(uri: &str) -> Request<Bytes> {
        req(Method::GET, uri, &[("Metadata-Flavor", "Google")])
    }

    fn now(answer: Answer) -> Resp {
        match answer {
            Answer::Now(resp) => resp,
            Answer::Later(_) => panic!("expected an answer now"),
        }
    }

    fn later(answer: Answer) -> std::pin::Pin<Box<dyn Future<Output = Resp> + Send>> {
        match answer {
            Answer::Later(wait) => wait,
            Answer::Now(resp) => panic!("expected a wait, got {}", resp.status()),
        }
    }

    fn body(resp: &Resp) -> String {
        String::from_utf8(resp.body().to_vec()).unwrap()
    }

    fn ct(resp: &Resp) -> &str {
        resp.headers()["content-type"].to_str().unwrap()
    }

    fn etag_of(resp: &Resp) -> String {
        resp.headers()["etag"].to_str().unwrap().to_owned()
    }

    /// GET under `v1/` with the flavor header, as the default caller.
    fn get(m: &GcpMock, path: &str) -> Resp {
        get_as(m, path, None)
    }

    fn get_as(m: &GcpMock, path: &str, identity: Option<&str>) -> Resp {
        now(m.handle(&flavored(&format!("{V1}{path}")), identity))
    }

    fn text(m: &GcpMock, path: &str) -> String {
        let resp = get(m, path);
        assert_eq!(resp.status(), StatusCode::OK, "{path}: {}", body(&resp));
        body(&resp)
    }

    fn json_of(m: &GcpMock, path: &str) -> Value {
        let resp = get(m, path);
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(ct(&resp), "application/json", "{path}");
        serde_json::from_str(&body(&resp)).unwrap()
    }

    #[test]
    fn root_probe_answers_with_or_without_the_header() {
        let m = mock();
        for headers in [&[][..], &[("Metadata-Flavor", "Google")][..]] {
            let resp = now(m.handle(&req(Method::GET, "/", headers), None));
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(body(&resp), "computeMetadata/\n");
            assert_eq!(resp.headers()["metadata-flavor"], "Google");
            assert_eq!(ct(&resp), "application/text");
        }
        let resp = now(m.handle(&flavored("/computeMetadata/"), None));
        assert_eq!(body(&resp), "v1/\n");
        assert_eq!(text(&m, ""), "instance/\nproject/\nuniverse/\n");
    }

    #[test]
    fn every_response_carries_the_real_headers() {
        let m = mock();
        let requests = [
            flavored("/"),
            flavored(&format!("{V1}instance/id")),
            flavored(&format!("{V1}nope")),
            req(Method::GET, &format!("{V1}instance/id"), &[]),
            req(Method::POST, "/", &[]),
            flavored(&format!("{V1}instance")),
            flavored(&format!("{V1}instance/service-accounts/default/token")),
        ];
        for r in &requests {
            let resp = now(m.handle(r, None));
            let h = resp.headers();
            assert_eq!(h["metadata-flavor"], "Google", "{}", r.uri());
            assert_eq!(h["server"], "Metadata Server for VM");
            assert_eq!(h["x-xss-protection"], "0");
            assert_eq!(h["x-frame-options"], "SAMEORIGIN");
            assert_eq!(
                h.contains_key("etag"),
                resp.status() == StatusCode::OK,
                "{}",
                r.uri()
            );
        }
    }

    #[test]
    fn the_flavor_header_is_required_below_the_root() {
        let m = mock();
        let path = "/computeMetadata/v1/instance/name";
        for headers in [
            &[][..],
            &[("Metadata-Flavor", "Something-Else")][..],
            &[("Metadata-Flavor", "google")][..],
            &[("X-Google-Metadata-Request", "True")][..],
        ] {
            let resp = now(m.handle(&req(Method::GET, path, headers), None));
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{headers:?}");
            assert_eq!(ct(&resp), "text/html; charset=UTF-8");
            let page = body(&resp);
            assert!(page.contains("<title>Error 403 (Forbidden)!!1</title>"));
            assert!(page.contains(
                "Your client does not have permission to get URL <code>/computeMetadata/v1/instance/name</code> from this server. Missing Metadata-Flavor:Google header. <ins>That\u{2019}s all we know.</ins>"
            ));
            // The real response's Content-Length for this path.
            assert_eq!(page.len(), 1649);
        }
        for path in [
            "/computeMetadata/",
            "/computeMetadata",
            "/latest/meta-data/",
        ] {
            let resp = now(m.handle(&req(Method::GET, path, &[]), None));
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        }
    }

    #[test]
    fn forwarded_requests_and_other_methods_are_refused() {
        let m = mock();
        for path in ["/", "/computeMetadata/v1/instance/id"] {
            let r = req(
                Method::GET,
                path,
                &[
                    ("Metadata-Flavor", "Google"),
                    ("X-Forwarded-For", "10.0.0.1"),
                ],
            );
            let resp = now(m.handle(&r, None));
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
            assert!(body(&resp).contains("Error 403 (Forbidden)"));
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let r = req(
                method.clone(),
                "/computeMetadata/v1/instance/id",
                &[("Metadata-Flavor", "Google")],
            );
            let resp = now(m.handle(&r, None));
            assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert!(body(&resp).contains(&format!("<code>{method}</code>")));
        }
        let head = req(
            Method::HEAD,
            "/computeMetadata/v1/instance/id",
            &[("Metadata-Flavor", "Google")],
        );
        assert_eq!(now(m.handle(&head, None)).status(), StatusCode::OK);
        let refused = m.forbidden();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(refused.headers()["metadata-flavor"], "Google");
        assert_eq!(m.kind(), CloudKind::Gcp);
    }

    #[test]
    fn values_and_listings() {
        let m = mock();
        assert_eq!(text(&m, "project/project-id"), "redirect-mock");
        assert_eq!(text(&m, "project/numeric-project-id"), "123456789012");
        assert_eq!(
            text(&m, "project/"),
            "attributes/\nnumeric-project-id\nproject-id\n"
        );
        assert_eq!(text(&m, "instance/id"), "4520031799277581759");
        assert_eq!(text(&m, "instance/name"), "redirect-mock");
        assert_eq!(
            text(&m, "instance/hostname"),
            "redirect-mock.us-central1-a.c.redirect-mock.internal"
        );
        assert_eq!(
            text(&m, "instance/zone"),
            "projects/123456789012/zones/us-central1-a"
        );
        assert_eq!(
            text(&m, "instance/machine-type"),
            "projects/123456789012/machineTypes/e2-medium"
        );
        assert_eq!(text(&m, "instance/maintenance-event"), "NONE");
        assert_eq!(text(&m, "instance/preempted"), "FALSE");
        assert_eq!(text(&m, "instance/virtual-clock/drift-token"), "0");
        assert_eq!(text(&m, "universe/universe-domain"), "googleapis.com");
        let listing = text(&m, "instance/");
        for entry in [
            "attributes/",
            "cpu-platform",
            "hostname",
            "id",
            "machine-type",
            "network-interfaces/",
            "service-accounts/",
            "tags",
            "zone",
        ] {
            assert!(listing.lines().any(|l| l == entry), "{entry}: {listing:?}");
        }
        assert!(listing.ends_with('\n'));
        let nic = "instance/network-interfaces/";
        assert_eq!(text(&m, nic), "0/\n");
        assert_eq!(text(&m, &format!("{nic}0/ip")), "10.128.0.2");
        assert_eq!(text(&m, &format!("{nic}0/mac")), "42:01:0a:80:00:02");
        assert_eq!(
            text(&m, &format!("{nic}0/network")),
            "projects/123456789012/networks/default"
        );
        assert_eq!(text(&m, &format!("{nic}0/gateway")), "10.128.0.1");
        assert_eq!(text(&m, &format!("{nic}0/subnetmask")), "255.255.240.0");
        assert_eq!(
            text(&m, &format!("{nic}0/dns-servers")),
            "169.254.169.254\n"
        );
        assert_eq!(text(&m, &format!("{nic}0/access-configs/")), "0/\n");
        assert_eq!(
            text(&m, &format!("{nic}0/access-configs/0/external-ip")),
            "203.0.113.10"
        );
        assert_eq!(text(&m, &format!("{nic}0/forwarded-ips/")), "");
        let resp = get(&m, "instance/id");
        assert_eq!(ct(&resp), "application/text");
        let tags = get(&m, "instance/tags");
        assert_eq!(
            (ct(&tags), body(&tags).as_str()),
            ("application/json", "[]")
        );
        assert!(text(&m, "project/attributes/ssh-keys").starts_with("redirect:ssh-ed25519 "));
    }

    #[test]
    fn recursive_json_uses_the_real_names() {
        let m = mock();
        let project = json_of(&m, "project/?recursive=true");
        assert_eq!(project["projectId"], "redirect-mock");
        assert_eq!(project["numericProjectId"], 123_456_789_012u64);
        assert!(project["attributes"]["ssh-keys"].is_string());
        // cloud-init's spelling.
        let instance = json_of(&m, "instance/?recursive=True");
        assert_eq!(instance["id"], 4_520_031_799_277_581_759u64);
        assert_eq!(
            instance["machineType"],
            "projects/123456789012/machineTypes/e2-medium"
        );
        assert_eq!(instance["cpuPlatform"], "Intel Broadwell");
        let nic = &instance["networkInterfaces"][0];
        assert_eq!(nic["ip"], "10.128.0.2");
        assert_eq!(nic["mtu"], 1460);
        assert_eq!(nic["accessConfigs"][0]["externalIp"], "203.0.113.10");
        assert_eq!(nic["accessConfigs"][0]["type"], "ONE_TO_ONE_NAT");
        assert_eq!(nic["forwardedIps"], json!([]));
        assert_eq!(instance["scheduling"]["onHostMaintenance"], "MIGRATE");
        assert_eq!(instance["virtualClock"]["driftToken"], "0");
        // Accounts by email, without their tokens.
        let accounts = &instance["serviceAccounts"];
        let email = "123456789012-compute@developer.gserviceaccount.com";
        assert_eq!(accounts["default"]["email"], email);
        assert_eq!(accounts[email]["aliases"], json!(["default"]));
        assert!(accounts["default"].get("token").is_none());
        assert!(accounts["default"].get("identity").is_none());
        // Attribute names as they are.
        let m = GcpMock::new(GcpValues {
            instance_attributes: BTreeMap::from([
                ("block-project-ssh-keys".into(), "false".into()),
                ("startupScript".into(), "x".into()),
            ]),
            user_data: Some("#cloud-config\n".into()),
            ..GcpValues::default()
        });
        let attributes = json_of(&m, "instance/attributes/?recursive=True");
        assert_eq!(
            attributes,
            json!({"block-project-ssh-keys": "false", "startupScript": "x", "user-data": "#cloud-config\n"})
        );
        assert_eq!(
            text(&m, "instance/attributes/"),
            "block-project-ssh-keys\nstartupScript\nuser-data\n"
        );
        assert_eq!(text(&m, "instance/attributes/user-data"), "#cloud-config\n");
    }

    #[test]
    fn alt_and_recursive_representations() {
        let m = mock();
        let resp = get(&m, "instance/hostname?alt=json");
        assert_eq!(ct(&resp), "application/json");
        assert_eq!(
            body(&resp),
            "\"redirect-mock.us-central1-a.c.redirect-mock.internal\""
        );
        assert_eq!(
            body(&get(&m, "instance/id?alt=json")),
            "4520031799277581759"
        );
        assert_eq!(body(&get(&m, "instance/tags?alt=text")), "");
        let scopes = get(&m, "instance/service-accounts/default/scopes");
        assert_eq!(ct(&scopes), "application/text");
        assert_eq!(
            body(&scopes),
            "https://www.googleapis.com/auth/cloud-platform\n"
        );
        // A recursive leaf is the leaf.
        assert_eq!(
            text(&m, "project/numeric-project-id?recursive=true"),
            "123456789012"
        );
        let resp = get(&m, "project/?recursive=true&alt=text");
        assert_eq!(ct(&resp), "application/text");
        assert!(
            body(&resp).contains("numeric-project-id 123456789012\nproject-id redirect-mock\n")
        );
        let nic = body(&get(
            &m,
            "instance/network-interfaces/?recursive=true&alt=text",
        ));
        assert!(
            nic.contains("0/access-configs/0/external-ip 203.0.113.10\n"),
            "{nic}"
        );
        assert!(nic.contains("0/dns-servers 169.254.169.254\n"), "{nic}");
        // Without recursive, a directory has no other form; an unknown value is ignored.
        for bad in ["project/?alt=json", "project/?alt=text"] {
            assert_eq!(get(&m, bad).status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            text(&m, "instance/network-interfaces/?recursive=xyz"),
            "0/\n"
        );
        assert_eq!(
            text(
                &m,
                "instance/scheduling/automatic-restart?last_etag=abc&timeout_sec=x&foo=blah"
            ),
            "TRUE"
        );
    }

    #[test]
    fn etags_hash_the_value() {
        let m = mock();
        let plain = etag_of(&get(&m, "instance/cpu-platform"));
        assert_eq!(plain.len(), 16);
        assert!(plain.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(plain, etag_of(&get(&m, "instance/cpu-platform?alt=json")));
        assert_eq!(plain, etag_of(&get(&m, "instance/cpu-platform?alt=text")));
        let recursive = etag_of(&get(&m, "instance/disks/?recursive=true"));
        assert_eq!(
            recursive,
            etag_of(&get(&m, "instance/disks/?recursive=true&alt=text"))
        );
        assert_ne!(recursive, etag_of(&get(&m, "instance/disks/")));
        assert_ne!(plain, etag_of(&get(&m, "instance/name")));
    }

    #[test]
    fn directories_redirect_and_values_refuse_a_slash() {
        let m = mock();
        let r = req(
            Method::GET,
            "/computeMetadata/v1/instance/attributes?recursive=True",
            &[
                ("Metadata-Flavor", "Google"),
                ("Host", "metadata.google.internal"),
            ],
        );
        let resp = now(m.handle(&r, None));
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            resp.headers()["location"],
            "http://metadata.google.internal/computeMetadata/v1/instance/attributes/?recursive=True"
        );
        for (path, location) in [
            ("/computeMetadata", "/computeMetadata/"),
            ("/computeMetadata/v1", "/computeMetadata/v1/"),
        ] {
            let r = req(
                Method::GET,
                path,
                &[("Metadata-Flavor", "Google"), ("Host", "a b")],
            );
            let resp = now(m.handle(&r, None));
            assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
            assert_eq!(
                resp.headers()["location"],
                location,
                "an odd Host: relative"
            );
        }
        for path in [
            "instance/id/",
            "instance/service-accounts/default/token/",
            "instance/service-accounts/default/scopes/0",
            "instance/id/x",
        ] {
            assert_eq!(get(&m, path).status(), StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn not_found_cases() {
        let m = mock();
        for path in [
            "nope",
            "project/bar",
            "instance/disks/1",
            "instance/disks/x",
            "instance/disks/00",
            "instance/disks/+0",
            "instance/network-interfaces/18446744073709551616/",
            "project//project-id",
            "project/./project-id",
            "instance/../project/project-id",
            "instance/%2E%2E/project/project-id",
            "project%2Fproject-id",
            "instance/attributes/user-data",
            "oslogin/",
            "/",
            "%zz",
            "instance/%",
            "instance/%ff",
            "instance%5C..%5Cid",
        ] {
            let resp = get(&m, path);
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(ct(&resp), "text/html; charset=UTF-8");
            assert!(
                body(&resp).contains("was not found on this server."),
                "{path}"
            );
        }
        for path in [
            "/computeMetadata/v1beta1/",
            "/0.1/meta-data/",
            "/latest/meta-data/",
        ] {
            let resp = now(m.handle(&flavored(path), None));
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        }
        // Echoed paths are escaped.
        let resp = get(&m, "%3Cscript%3E");
        assert!(body(&resp).contains("<code>/computeMetadata/v1/%3Cscript%3E</code>"));
        // (hyper's URI parser already refuses `<`, `>` and `"` in a path.)
        let resp = get(&m, "a'b&c");
        assert!(body(&resp).contains("<code>/computeMetadata/v1/a&#39;b&amp;c</code>"));
    }

    #[test]
    fn percent_encoded_names_are_decoded() {
        let m = mock();
        let email = "123456789012-compute%40developer.gserviceaccount.com";
        assert_eq!(
            text(&m, &format!("instance/service-accounts/{email}/email")),
            "123456789012-compute@developer.gserviceaccount.com"
        );
        assert_eq!(text(&m, "project/project%2did"), "redirect-mock");
    }

    #[test]
    fn service_accounts_follow_the_callers_identity() {
        let m = GcpMock::new(GcpValues {
            additional_service_accounts: vec!["extra@redirect-mock.iam.gserviceaccount.com".into()],
            ..GcpValues::default()
        });
        let default = "123456789012-compute@developer.gserviceaccount.com";
        assert_eq!(
            text(&m, "instance/service-accounts/"),
            format!("{default}/\ndefault/\nextra@redirect-mock.iam.gserviceaccount.com/\n")
        );
        assert_eq!(
            text(&m, "instance/service-accounts/default/"),
            "aliases\nemail\nidentity\nscopes\ntoken\n"
        );
        assert_eq!(text(&m, "instance/service-accounts/default/email"), default);
        assert_eq!(
            text(&m, "instance/service-accounts/default/aliases"),
            "default\n"
        );
        assert_eq!(
            text(
                &m,
                "instance/service-accounts/extra@redirect-mock.iam.gserviceaccount.com/aliases"
            ),
            ""
        );
        let info = json_of(&m, "instance/service-accounts/default/?recursive=true");
        assert_eq!(
            info,
            json!({
                "aliases": ["default"],
                "email": default,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            })
        );

        let own = "app@redirect-mock.iam.gserviceaccount.com";
        let listing = body(&get_as(&m, "instance/service-accounts/", Some(own)));
        assert_eq!(listing, format!("{own}/\ndefault/\n"));
        let email = get_as(&m, "instance/service-accounts/default/email", Some(own));
        assert_eq!(body(&email), own);
        for other in [default, "extra@redirect-mock.iam.gserviceaccount.com"] {
            let path = format!("instance/service-accounts/{other}/token");
            assert_eq!(
                get_as(&m, &path, Some(own)).status(),
                StatusCode::NOT_FOUND,
                "{other}"
            );
        }
        // The caller's own token differs from the VM account's.
        let token = |identity| {
            let resp = get_as(&m, "instance/service-accounts/default/token", identity);
            let token: Value = serde_json::from_str(&body(&resp)).unwrap();
            token["access_token"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            token(None),
            "ya29.redirect-mock-access-token-not-valid-anywhere"
        );
        assert_ne!(token(Some(own)), token(None));
        assert_eq!(token(Some(own)), token(Some(own)));
        let unknown = "instance/service-accounts/nobody@example.com/token";
        assert_eq!(get(&m, unknown).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn tokens() {
        let m = mock();
        for path in [
            "instance/service-accounts/default/token",
            "instance/service-accounts/default/token?scopes=https://www.googleapis.com/auth/cloud-platform,email",
            "instance/service-accounts/123456789012-compute@developer.gserviceaccount.com/token",
            "instance/service-accounts/default/token?recursive=true",
        ] {
            let token = json_of(&m, path);
            assert_eq!(token["token_type"], "Bearer", "{path}");
            assert_eq!(
                token["access_token"],
                "ya29.redirect-mock-access-token-not-valid-anywhere"
            );
            let expires_in = token["expires_in"].as_u64().expect("a JSON number");
            assert!((1800..=3600).contains(&expires_in), "{expires_in}");
        }
        let resp = get(&m, "instance/service-accounts/default/token?alt=text");
        assert_eq!(ct(&resp), "application/text");
        let text = body(&resp);
        assert!(text.starts_with(
            "access_token ya29.redirect-mock-access-token-not-valid-anywhere\nexpires_in "
        ));
        assert!(text.ends_with("\ntoken_type Bearer\n"));
    }

    #[test]
    fn tokens_stay_valid_over_time() {
        let m = GcpMock::new(GcpValues {
            token_lifetime: Duration::from_secs(600),
            ..GcpValues::default()
        });
        let r = flavored("/computeMetadata/v1/instance/service-accounts/default/token");
        for elapsed in [0, 299, 300, 301, 599, 600, 7_777] {
            let at = m.inner.started + Duration::from_secs(elapsed);
            let token: Value =
                serde_json::from_str(&body(&now(m.inner.route(&r, None, at)))).unwrap();
            let expires_in = token["expires_in"].as_u64().unwrap();
            assert!(
                (301..=600).contains(&expires_in),
                "at +{elapsed}s: {expires_in}"
            );
        }
        let before = m.inner.started - Duration::from_secs(5);
        assert!(now(m.inner.route(&r, None, before)).status().is_success());
    }

    fn decode_jwt(jwt: &str) -> (Value, Value, usize) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        let part = |p: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        (part(parts[0]), part(parts[1]), signature.len())
    }

    #[test]
    fn identity_tokens() {
        let m = mock();
        let path = "instance/service-accounts/default/identity";
        let missing = get(&m, path);
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        assert_eq!(body(&missing), "non-empty audience parameter required\n");
        assert_eq!(
            get(&m, &format!("{path}?audience=")).status(),
            StatusCode::BAD_REQUEST
        );
        // A bad escape is taken literally (form_urlencoded's reading), never a panic.
        assert_eq!(
            get(&m, &format!("{path}?audience=%zz")).status(),
            StatusCode::OK
        );

        let before = unix_secs(SystemTime::now());
        let resp = get(
            &m,
            &format!("{path}?audience=https%3A%2F%2Fapi.example.com"),
        );
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(ct(&resp), "application/text");
        let (header, payload, signature) = decode_jwt(&body(&resp));
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"].as_str().unwrap().len(), 40);
        assert_eq!(signature, 256);
        assert_eq!(payload["aud"], "https://api.example.com");
        assert_eq!(payload["iss"], "https://accounts.google.com");
        let iat = payload["iat"].as_u64().unwrap();
        assert!(iat >= before);
        assert_eq!(payload["exp"].as_u64().unwrap(), iat + 3600);
        let sub = payload["sub"].as_str().unwrap();
        assert!(
            sub.len() == 21 && sub.bytes().all(|b| b.is_ascii_digit()),
            "{sub}"
        );
        assert_eq!(payload["azp"], sub);
        assert!(payload.get("email").is_none(), "standard format");
        assert!(payload.get("google").is_none());

        let resp = get(&m, &format!("{path}?audience=a&format=full&licenses=TRUE"));
        let (_, payload, _) = decode_jwt(&body(&resp));
        assert_eq!(
            payload["email"],
            "123456789012-compute@developer.gserviceaccount.com"
        );
        assert_eq!(payload["email_verified"], true);
        let ce = &payload["google"]["compute_engine"];
        assert_eq!(ce["instance_id"], "4520031799277581759");
        assert_eq!(ce["instance_name"], "redirect-mock");
        assert_eq!(ce["project_id"], "redirect-mock");
        assert_eq!(ce["project_number"], 123_456_789_012u64);
        assert_eq!(ce["zone"], "us-central1-a");
        assert_eq!(ce["license_id"], json!([]));
        // Another account, another subject.
        let own = get_as(
            &m,
            &format!("{path}?audience=a&format=full"),
            Some("me@p.iam.gserviceaccount.com"),
        );
        let (_, own, _) = decode_jwt(&body(&own));
        assert_eq!(own["email"], "me@p.iam.gserviceaccount.com");
        assert_ne!(own["sub"], payload["sub"]);
    }

    #[test]
    fn hostile_queries() {
        let m = mock();
        for query in [
            "recursive=%zz",
            "recursive=%",
            "%=true",
            "recursive",
            "&&&=&",
            "recursive%3Dtrue",
            "alt=xml",
            "recursive=true%00",
        ] {
            let resp = get(&m, &format!("instance/disks/?{query}"));
            assert_eq!(resp.status(), StatusCode::OK, "{query}");
            assert_eq!(body(&resp), "0/\n", "{query}: not recursive");
        }
        // Of repeated keys the first counts.
        assert_eq!(
            ct(&get(&m, "instance/disks/?recursive=true&recursive=false")),
            "application/json"
        );
        assert_eq!(
            body(&get(&m, "instance/disks/?recursive=no&recursive=true")),
            "0/\n"
        );
        let jwt = body(&get(
            &m,
            "instance/service-accounts/default/identity?audience=a+b&audience=c",
        ));
        assert_eq!(decode_jwt(&jwt).1["aud"], "a b");
        let long = "a".repeat(10_000);
        assert_eq!(
            get(&m, &format!("instance/id?{long}={long}")).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn long_poll_refusals_answer_at_once() {
        let m = mock();
        let refusals = [
            ("nope?wait_for_change=true", StatusCode::NOT_FOUND),
            ("project/?wait_for_change=true", StatusCode::BAD_REQUEST),
            (
                "instance/id?wait_for_change=true&timeout_sec=x",
                StatusCode::BAD_REQUEST,
            ),
            (
                "instance/id?wait_for_change=true&timeout_sec=-1",
                StatusCode::BAD_REQUEST,
            ),
            (
                "instance/id?wait_for_change=true&timeout_sec=1.5",
                StatusCode::BAD_REQUEST,
            ),
            (
                "instance/id?wait_for_change=true&timeout_sec=",
                StatusCode::BAD_REQUEST,
            ),
            (
                "instance/service-accounts/default/identity?wait_for_change=true",
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (path, status) in refusals {
            assert_eq!(get(&m, path).status(), status, "{path}");
        }
        // Without wait_for_change, its parameters mean nothing.
        assert_eq!(
            get(&m, "instance/id?timeout_sec=x").status(),
            StatusCode::OK
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_mismatched_last_etag_answers_at_once() {
        let m = mock();
        let current = etag_of(&get(&m, "instance/machine-type"));
        let resp = get(
            &m,
            "instance/machine-type?wait_for_change=true&last_etag=0123456789abcdef",
        );
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(etag_of(&resp), current);
        assert_eq!(body(&resp), "projects/123456789012/machineTypes/e2-medium");
        // The current ETag: it waits.
        let path = format!("{V1}instance/machine-type?wait_for_change=true&last_etag={current}");
        let _wait = later(m.handle(&flavored(&path), None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_wakes_the_waiters_whose_value_changed() {
        let m = mock();
        let path =
            format!("{V1}instance/attributes/?recursive=True&wait_for_change=true&timeout_sec=60");
        let before = etag_of(&get(&m, "instance/attributes/?recursive=True"));
        let start = tokio::time::Instant::now();
        let waiter = tokio::spawn(later(m.handle(&flavored(&path), None)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let other = GcpValues {
            machine_type: "e2-small".into(),
            ..GcpValues::default()
        };
        assert!(m.reload(other.clone()));
        assert!(!m.reload(other.clone()), "unchanged");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "its value did not change");
        assert!(m.reload(GcpValues {
            instance_attributes: BTreeMap::from([("role".into(), "web".into())]),
            ..other
        }));
        let resp = waiter.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(ct(&resp), "application/json");
        assert_eq!(body(&resp), r#"{"role":"web"}"#);
        assert_ne!(etag_of(&resp), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_before_the_first_poll_is_not_missed() {
        let m = mock();
        let wait = later(m.handle(
            &flavored(&format!("{V1}instance/tags?wait_for_change=true")),
            None,
        ));
        assert!(m.reload(GcpValues {
            tags: vec!["http-server".into()],
            ..GcpValues::default()
        }));
        let start = tokio::time::Instant::now();
        let resp = wait.await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(body(&resp), r#"["http-server"]"#);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_answered_at_its_timeout() {
        let m = mock();
        for (query, waited) in [
            ("&timeout_sec=30", Duration::from_secs(30)),
            ("&timeout_sec=0", Duration::ZERO),
            ("", DEFAULT_LONG_POLL),
            ("&timeout_sec=99999999999999999999999999", MAX_LONG_POLL),
            ("&timeout_sec=5&timeout_sec=x", Duration::from_secs(5)),
        ] {
            let path =
                format!("{V1}instance/scheduling/automatic-restart?wait_for_change=true{query}");
            let start = tokio::time::Instant::now();
            let resp = later(m.handle(&flavored(&path), None)).await;
            assert_eq!(start.elapsed(), waited, "{query}");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(body(&resp), "TRUE");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_value_goes_away_gets_a_404() {
        let m = GcpMock::new(GcpValues {
            user_data: Some("#cloud-config\n".into()),
            ..GcpValues::default()
        });
        let path = format!("{V1}instance/attributes/user-data?wait_for_change=true");
        let waiter = tokio::spawn(later(m.handle(&flavored(&path), None)));
        tokio::task::yield_now().await;
        assert!(m.reload(GcpValues::default()));
        assert_eq!(waiter.await.unwrap().status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_reload_serves_new_values_and_keeps_the_token_window() {
        let m = mock();
        let started = m.inner.started;
        assert!(!m.reload(GcpValues::default()));
        assert!(m.reload(GcpValues {
            project_id: "other".into(),
            numeric_project_id: 42,
            ..GcpValues::default()
        }));
        assert_eq!(text(&m, "project/project-id"), "other");
        assert_eq!(
            text(&m, "instance/service-accounts/default/email"),
            "42-compute@developer.gserviceaccount.com"
        );
        // The per-identity trees went with the old values.
        let own = get_as(&m, "instance/zone", Some("me@p.iam.gserviceaccount.com"));
        assert_eq!(body(&own), "projects/42/zones/us-central1-a");
        assert_eq!(m.inner.started, started);
    }

    #[test]
    fn config_values() {
        let v: GcpValues = toml::from_str(
            r#"
            project_id = "p"
            instance_id = "13512546227574112017"
            external_ip = ""
            token_lifetime = "30m"
            service_account = "app@p.iam.gserviceaccount.com"
            project_attributes = { "ssh-keys" = "u:ssh-ed25519 AAAA u", enable-oslogin = "FALSE" }
            "#,
        )
        .unwrap();
        assert_eq!(v.token_lifetime, Duration::from_secs(1800));
        assert_eq!(v.external_ip, None);
        assert_eq!(v.default_account(), "app@p.iam.gserviceaccount.com");
        let m = GcpMock::new(v);
        assert_eq!(text(&m, "instance/id"), "13512546227574112017");
        assert_eq!(
            text(&m, "instance/network-interfaces/0/access-configs/"),
            ""
        );
        assert_eq!(text(&m, "project/attributes/enable-oslogin"), "FALSE");
        for bad in [
            "nope = 1",
            r#"instance_id = "12a""#,
            r#"instance_id = "007""#,
            r#"instance_id = "99999999999999999999""#,
            r#"token_lifetime = "1s""#,
            r#"token_lifetime = "2days""#,
            r#"token_lifetime = "soon""#,
            r#"external_ip = "::1""#,
            r#"service_account = "default""#,
            r#"service_account = "a/b@c""#,
            r#"additional_service_accounts = ["not an email"]"#,
            r#"instance_attributes = { "a/b" = "x" }"#,
            r#"project_attributes = { "" = "x" }"#,
        ] {
            assert!(toml::from_str::<GcpValues>(bad).is_err(), "{bad}");
        }
        assert_eq!(
            toml::from_str::<GcpValues>("").unwrap(),
            GcpValues::default()
        );
    }

    #[test]
    fn values_that_bypass_validation_do_not_panic() {
        let m = GcpMock::new(GcpValues {
            instance_id: "not-a-number".into(),
            token_lifetime: Duration::ZERO,
            instance_attributes: BTreeMap::from([("a/b".into(), "x".into())]),
            ..GcpValues::default()
        });
        assert_eq!(
            json_of(&m, "instance/?recursive=true")["id"],
            "not-a-number"
        );
        assert_eq!(
            json_of(&m, "instance/attributes/?recursive=true")["a/b"],
            "x"
        );
        let token = json_of(&m, "instance/service-accounts/default/token");
        assert!(token["expires_in"].is_u64());
    }
}
