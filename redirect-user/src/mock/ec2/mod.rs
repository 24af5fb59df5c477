//! The built-in EC2 instance metadata service (IMDSv1 and IMDSv2).
//!
//! Wire behaviour follows the real service (`../shared/reference/metadata-protocols.md`):
//! `Server: EC2ws`, plain-text listings one entry per line with directories ending in `/`,
//! XHTML error pages, `PUT /latest/api/token` with TTL 1..=21600 s, 401 for a bad or (in
//! `required` mode) missing token, 403 for token traffic carrying `X-Forwarded-For`.
//! Instance events (spot interruption and the rest) are simulated in `events`.

pub mod events;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
};
use serde::{Deserialize, Deserializer, de};

use super::token::{TokenIssuer, parse_ttl};
use events::{Active, Event, SPOT_WARNING, Schedule, maintenance_date};

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
// As `HeaderName`s: inserting a `&str` name allocates one for every response, and looking
// one up parses it every time (425 instructions per mock request for the three below).
const TOKEN_NAME: HeaderName = HeaderName::from_static(TOKEN_HEADER);
const TOKEN_TTL_NAME: HeaderName = HeaderName::from_static(TOKEN_TTL_HEADER);
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// API versions listed at `/`; each serves the same tree as `latest`.
const VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
    "2024-04-11",
    "latest",
];

/// `HttpTokens` of the instance: whether requests without a session token are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HttpTokens {
    /// IMDSv1 and v2: tokenless requests are served; a token, if sent, must be valid.
    #[default]
    Optional,
    /// IMDSv2 only: every request needs a valid token.
    Required,
}

impl std::fmt::Display for HttpTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HttpTokens::Optional => "optional",
            HttpTokens::Required => "required",
        })
    }
}

/// The values the mock serves. Every field has a default; `[ec2]` in the config overrides them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ec2Values {
    pub instance_id: String,
    pub ami_id: String,
    pub instance_type: String,
    /// `hostname` and `local-hostname`.
    pub hostname: String,
    pub local_ipv4: Ipv4Addr,
    pub mac: String,
    pub region: String,
    pub availability_zone: String,
    /// `placement/availability-zone-id`: the zone's id, the same in every account.
    pub availability_zone_id: String,
    pub account_id: String,
    /// The primary network interface (`network/interfaces/macs/<mac>/`), whose subnet and VPC
    /// cloud-init builds the network configuration from.
    pub interface_id: String,
    pub subnet_id: String,
    pub subnet_ipv4_cidr_block: String,
    pub vpc_id: String,
    pub vpc_ipv4_cidr_block: String,
    pub security_group_id: String,
    /// `public-keys/`: the launch key pair as `[name, openssh key]`; `[]`: none, as for an
    /// instance launched without one (404).
    pub public_keys: Vec<(String, String)>,
    /// The primary interface's IPv6 addresses (`ipv6s`, which cloud-init turns into DHCPv6)
    /// and its subnet's and VPC's IPv6 blocks; none by default, as in a default VPC.
    pub ipv6s: Vec<Ipv6Addr>,
    pub subnet_ipv6_cidr_block: Option<String>,
    pub vpc_ipv6_cidr_block: Option<String>,
    /// The instance's tags, served under `tags/instance/` as with `InstanceMetadataTags`
    /// enabled; none: no `tags/` (the default, as on an instance without it).
    #[serde(deserialize_with = "de_tags")]
    pub tags: BTreeMap<String, String>,
    /// Simulated events (see `events`): each noticed this long after the daemon starts.
    #[serde(deserialize_with = "de_delay")]
    pub spot_interruption_after: Option<Duration>,
    /// What the spot interruption does: terminate, stop or hibernate.
    pub spot_interruption_action: SpotAction,
    #[serde(deserialize_with = "de_delay")]
    pub rebalance_recommendation_after: Option<Duration>,
    #[serde(deserialize_with = "de_delay")]
    pub scheduled_maintenance_after: Option<Duration>,
    /// Also makes the instance one of an Auto Scaling group (`autoscaling/`).
    #[serde(deserialize_with = "de_delay")]
    pub asg_termination_after: Option<Duration>,
    /// The instance profile's role; `iam/security-credentials/` lists it.
    #[serde(deserialize_with = "de_role_name")]
    pub role_name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// How long served credentials stay valid; they are re-dated every half lifetime.
    #[serde(deserialize_with = "de_duration")]
    pub credentials_lifetime: Duration,
    /// Served at `/latest/user-data`; 404 when unset, as on an instance without user data.
    pub user_data: Option<String>,
    pub http_tokens: HttpTokens,
}

impl Default for Ec2Values {
    fn default() -> Self {
        Ec2Values {
            instance_id: "i-0123456789abcdef0".into(),
            ami_id: "ami-0abcdef1234567890".into(),
            instance_type: "t3.micro".into(),
            hostname: "ip-172-31-16-10.ec2.internal".into(),
            local_ipv4: Ipv4Addr::new(172, 31, 16, 10),
            mac: "0e:49:61:0f:c3:11".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            availability_zone_id: "use1-az6".into(),
            account_id: "123456789012".into(),
            interface_id: "eni-0123456789abcdef0".into(),
            subnet_id: "subnet-0123456789abcdef0".into(),
            subnet_ipv4_cidr_block: "172.31.16.0/20".into(),
            vpc_id: "vpc-0123456789abcdef0".into(),
            vpc_ipv4_cidr_block: "172.31.0.0/16".into(),
            security_group_id: "sg-0123456789abcdef0".into(),
            // A key nobody holds the private half of (generated for the mock, then dropped).
            public_keys: vec![(
                "redirect-mock".into(),
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdn64tja8pwcDUbaCmvStoVpTGDi5Ee8Qb40/GlwW1i redirect-mock".into(),
            )],
            role_name: "redirect-mock-role".into(),
            // AWS's documentation example keys: obviously not real, accepted by every SDK.
            access_key_id: "ASIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: "IQoJb3JpZ2luX2VjEXAMPLETOKENredirectmockAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            credentials_lifetime: Duration::from_secs(6 * 3600),
            user_data: None,
            http_tokens: HttpTokens::Optional,
            ipv6s: Vec::new(),
            subnet_ipv6_cidr_block: None,
            vpc_ipv6_cidr_block: None,
            tags: BTreeMap::new(),
            spot_interruption_after: None,
            spot_interruption_action: SpotAction::Terminate,
            rebalance_recommendation_after: None,
            scheduled_maintenance_after: None,
            asg_termination_after: None,
        }
    }
}

/// `spot/instance-action`'s `action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpotAction {
    #[default]
    Terminate,
    Stop,
    Hibernate,
}

impl SpotAction {
    fn name(self) -> &'static str {
        match self {
            SpotAction::Terminate => "terminate",
            SpotAction::Stop => "stop",
            SpotAction::Hibernate => "hibernate",
        }
    }
}

impl Ec2Values {
    /// The configured delay of each simulated event.
    fn delays(&self) -> [(Event, Option<Duration>); 4] {
        [
            (Event::SpotInterruption, self.spot_interruption_after),
            (
                Event::RebalanceRecommendation,
                self.rebalance_recommendation_after,
            ),
            (
                Event::ScheduledMaintenance,
                self.scheduled_maintenance_after,
            ),
            (Event::AsgTermination, self.asg_termination_after),
        ]
    }
}

fn de_delay<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    crate::config::parse_duration(&s)
        .map(Some)
        .map_err(de::Error::custom)
}

/// Tag keys as IMDS serves them: path segments, so AWS refuses to enable tags in metadata
/// for keys with `/` (and spaces, and a few more); so does the config.
fn de_tags<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let tags = BTreeMap::<String, String>::deserialize(d)?;
    if let Some(bad) = tags.keys().find(|k| {
        k.is_empty()
            || k.len() > 128
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-=._:@".contains(c))
    }) {
        return Err(de::Error::custom(format!(
            "tag key {bad:?}: instance metadata serves only keys of letters, digits and + - = . _ : @"
        )));
    }
    Ok(tags)
}

/// Whether `s` can name an IAM role in the metadata tree (a path segment): non-empty, without
/// '/' or whitespace.
pub fn is_role_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.chars().any(char::is_whitespace)
}

fn de_role_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if !is_role_name(&s) {
        return Err(de::Error::custom(format!(
            "invalid role name {s:?}: must be non-empty, without '/' or spaces"
        )));
    }
    Ok(s)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let d = crate::config::parse_duration(&s).map_err(de::Error::custom)?;
    if d < Duration::from_secs(2) {
        return Err(de::Error::custom(
            "credentials_lifetime must be at least 2s",
        ));
    }
    Ok(d)
}

/// A node of the metadata tree. Dynamic leaves are rendered per request (timestamps).
enum Node {
    Dir(BTreeMap<String, Node>),
    /// A directory whose listing names its entries otherwise: `public-keys/` lists `0=name`
    /// and serves `public-keys/0/`.
    Listed(BTreeMap<String, Node>, Bytes),
    Text(Bytes),
    IamInfo,
    Credentials,
    /// `identity-credentials/ec2/`: the instance's own credentials, for AWS's internal use.
    InstanceCredentialsInfo,
    InstanceCredentials,
    IdentityDocument,
    /// `pkcs7`, `signature` or `rsa2048` of the identity document.
    IdentitySignature(&'static str),
    UserData(Bytes),
}

/// The mock, whose values a reload replaces (SIGHUP) while its token key, start time and
/// simulated events stay: tokens issued before a reload remain valid.
pub struct Ec2Mock {
    current: RwLock<Arc<Instance>>,
    /// The instance as callers with a role of their own (`redirect.ec2.role`) see it, by role
    /// name: the same values and tokens, another instance profile. Cleared on reload.
    by_role: RwLock<BTreeMap<String, Arc<Instance>>>,
    common: Arc<Common>,
}

/// What every view of the instance shares, over reloads.
struct Common {
    tokens: TokenIssuer,
    started: SystemTime,
    events: Schedule,
}

/// The instance the mock serves now.
struct Instance {
    values: Ec2Values,
    common: Arc<Common>,
    /// The tree under `/latest/` while no simulated event is noticed.
    root: Node,
}

pub use super::Resp;
use super::{Answer, Cloud, CloudKind};

impl Ec2Mock {
    pub fn new(values: Ec2Values) -> Self {
        Self::with_key(values, &super::token::TokenKey::random())
    }

    /// With tokens signed by `key` (kept over restarts).
    pub fn with_key(values: Ec2Values, key: &super::token::TokenKey) -> Self {
        let started = SystemTime::now();
        let common = Arc::new(Common {
            tokens: TokenIssuer::with_key(key),
            started,
            events: Schedule::new(started, &values.delays()),
        });
        let instance = Instance::new(values, Arc::clone(&common));
        Ec2Mock {
            current: RwLock::new(Arc::new(instance)),
            by_role: RwLock::default(),
            common,
        }
    }

    /// Answers one request. Only method, path and headers matter; the body is never read.
    pub fn handle<B>(&self, req: &Request<B>) -> Resp {
        self.handle_as(req, None)
    }

    /// Answers one request of a caller whose instance profile is `role` (default: the
    /// configured one).
    pub fn handle_as<B>(&self, req: &Request<B>, role: Option<&str>) -> Resp {
        let instance = match role {
            Some(role) if role != self.instance().values.role_name => self.with_role(role),
            _ => self.instance(),
        };
        instance.handle_at(req, SystemTime::now())
    }

    fn with_role(&self, role: &str) -> Arc<Instance> {
        if let Some(instance) = self
            .by_role
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(role)
        {
            return Arc::clone(instance);
        }
        let values = Ec2Values {
            role_name: role.to_owned(),
            ..self.instance().values.clone()
        };
        let instance = Arc::new(Instance::new(values, Arc::clone(&self.common)));
        self.by_role
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(role.to_owned(), Arc::clone(&instance));
        instance
    }

    /// Serves `values` from now on; false when they are the ones served already. Changed
    /// event delays count from the daemon's start, as at startup.
    pub fn reload(&self, values: Ec2Values) -> bool {
        let current = self.instance();
        if current.values == values {
            return false;
        }
        if current.values.delays() != values.delays() {
            let common = &self.common;
            common.events.configure(common.started, &values.delays());
        }
        let next = Instance::new(values, Arc::clone(&self.common));
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        self.by_role
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        true
    }

    /// `redirect simulate EVENT`: `event` is noticed `after` from now; `None` clears every
    /// event, configured ones included.
    pub fn simulate(&self, event: Option<Event>, after: Duration) {
        match event {
            Some(event) => self.common.events.trigger(event, SystemTime::now(), after),
            None => self.common.events.clear(),
        }
    }

    fn instance(&self) -> Arc<Instance> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Cloud for Ec2Mock {
    fn kind(&self) -> CloudKind {
        CloudKind::Ec2
    }

    fn handle(&self, req: &Request<Bytes>, identity: Option<&str>) -> Answer {
        Answer::Now(self.handle_as(req, identity))
    }

    fn forbidden(&self) -> Resp {
        error(StatusCode::FORBIDDEN)
    }
}

impl Instance {
    fn new(values: Ec2Values, common: Arc<Common>) -> Self {
        let root = build_tree(&values, &Active::default());
        Instance {
            values,
            common,
            root,
        }
    }

    fn handle_at<B>(&self, req: &Request<B>, now: SystemTime) -> Resp {
        let path = req.uri().path();
        let headers = req.headers();
        let forwarded = headers.contains_key(X_FORWARDED_FOR);
        if path == TOKEN_PATH {
            return match *req.method() {
                Method::PUT if forwarded => error(StatusCode::FORBIDDEN),
                Method::PUT => match headers
                    .get(TOKEN_TTL_NAME)
                    .and_then(|v| parse_ttl(v.as_bytes()))
                {
                    Some(ttl) => {
                        let mut resp = text(self.common.tokens.issue(ttl, now).into());
                        resp.headers_mut()
                            .insert(TOKEN_TTL_NAME, HeaderValue::from(ttl.as_secs()));
                        resp
                    }
                    None => error(StatusCode::BAD_REQUEST),
                },
                Method::OPTIONS => allow(StatusCode::OK, "OPTIONS, PUT"),
                _ => allow(StatusCode::METHOD_NOT_ALLOWED, "OPTIONS, PUT"),
            };
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return allow(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD");
        }
        if let Some(status) = self.check_token(headers, forwarded, now) {
            return error(status);
        }
        self.lookup(path, now)
            .unwrap_or_else(|| error(StatusCode::NOT_FOUND))
    }

    /// `Some(status)` when the request must be refused for its token.
    fn check_token(
        &self,
        headers: &HeaderMap,
        forwarded: bool,
        now: SystemTime,
    ) -> Option<StatusCode> {
        match headers.get(TOKEN_NAME) {
            Some(_) if forwarded => Some(StatusCode::FORBIDDEN),
            Some(token) => {
                let valid = token
                    .to_str()
                    .is_ok_and(|t| self.common.tokens.is_valid(t, now));
                (!valid).then_some(StatusCode::UNAUTHORIZED)
            }
            None if self.values.http_tokens == HttpTokens::Required => {
                Some(StatusCode::UNAUTHORIZED)
            }
            None => None,
        }
    }

    fn lookup(&self, path: &str, now: SystemTime) -> Option<Resp> {
        let rest = path.strip_prefix('/')?;
        if rest.is_empty() {
            return Some(text(VERSIONS.join("\n").into()));
        }
        let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if !VERSIONS.contains(&version) {
            return None;
        }
        // While an event is noticed, the tree has its entries (rare: built per request).
        let active = self.common.events.active(now);
        let with_events = active.any().then(|| build_tree(&self.values, &active));
        let mut node = with_events.as_ref().unwrap_or(&self.root);
        let mut segments = rest.split('/').peekable();
        while let Some(segment) = segments.next() {
            // A trailing slash (empty last segment) names the node itself: the real service
            // answers `placement/availability-zone/` (which botocore asks for) like the leaf.
            if segment.is_empty() && segments.peek().is_none() {
                break;
            }
            match node {
                Node::Dir(children) | Node::Listed(children, _) => {
                    node = children.get(segment)?;
                }
                _ => return None,
            }
        }
        Some(match node {
            Node::Dir(children) => text(listing(children).into()),
            Node::Listed(_, listing) => text(listing.clone()),
            Node::Text(value) => text(value.clone()),
            Node::UserData(data) => {
                let mut resp = text(data.clone());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                resp
            }
            Node::IamInfo => text(self.iam_info(now).into()),
            Node::Credentials => text(self.credentials(now).into()),
            Node::InstanceCredentialsInfo => text(self.instance_credentials_info(now).into()),
            Node::InstanceCredentials => text(self.credentials(now).into()),
            Node::IdentityDocument => text(self.identity_document().into()),
            Node::IdentitySignature(kind) => text(self.identity_signature(kind).into()),
        })
    }

    /// Credentials are re-dated every half lifetime, so the served expiration is always at
    /// least half a lifetime away, as with the real service's hourly rotation.
    fn credentials_window(&self, now: SystemTime) -> (SystemTime, SystemTime) {
        let period = (self.values.credentials_lifetime / 2).as_secs().max(1);
        let elapsed = now
            .duration_since(self.common.started)
            .unwrap_or_default()
            .as_secs();
        let issued = self.common.started + Duration::from_secs(elapsed - elapsed % period);
        (issued, issued + self.values.credentials_lifetime)
    }

    fn iam_info(&self, now: SystemTime) -> String {
        let v = &self.values;
        let (issued, _) = self.credentials_window(now);
        format!(
            "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"InstanceProfileArn\" : \"arn:aws:iam::{}:instance-profile/{}\",\n  \"InstanceProfileId\" : \"AIPAREDIRECTMOCK00001\"\n}}",
            rfc3339(issued),
            json_str(&v.account_id),
            json_str(&v.role_name),
        )
    }

    fn credentials(&self, now: SystemTime) -> String {
        let v = &self.values;
        let (issued, expires) = self.credentials_window(now);
        format!(
            "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"{}\",\n  \"SecretAccessKey\" : \"{}\",\n  \"Token\" : \"{}\",\n  \"Expiration\" : \"{}\"\n}}",
            rfc3339(issued),
            json_str(&v.access_key_id),
            json_str(&v.secret_access_key),
            json_str(&v.session_token),
            rfc3339(expires),
        )
    }

    fn instance_credentials_info(&self, now: SystemTime) -> String {
        let (issued, _) = self.credentials_window(now);
        format!(
            "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"AccountId\" : \"{}\"\n}}",
            rfc3339(issued),
            json_str(&self.values.account_id),
        )
    }

    /// The real signatures are made with AWS's private keys, which no mock has: these are
    /// base64 of a digest of the document, shaped as the real ones (`pkcs7` and `rsa2048`
    /// in 64-column lines), so a client that reads them works and one that verifies them
    /// fails, as it should.
    fn identity_signature(&self, kind: &str) -> String {
        use base64::{Engine as _, engine::general_purpose::STANDARD};
        use sha2::{Digest as _, Sha256};
        let digest = Sha256::new()
            .chain_update(kind.as_bytes())
            .chain_update(self.identity_document().as_bytes())
            .finalize();
        let repeat = if kind == "signature" { 4 } else { 8 };
        let encoded = STANDARD.encode(digest.repeat(repeat));
        if kind == "signature" {
            return encoded;
        }
        let lines: Vec<&str> = encoded
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        lines.join("\n")
    }

    fn identity_document(&self) -> String {
        let v = &self.values;
        format!(
            "{{\n  \"accountId\" : \"{}\",\n  \"architecture\" : \"{}\",\n  \"availabilityZone\" : \"{}\",\n  \"billingProducts\" : null,\n  \"devpayProductCodes\" : null,\n  \"marketplaceProductCodes\" : null,\n  \"imageId\" : \"{}\",\n  \"instanceId\" : \"{}\",\n  \"instanceType\" : \"{}\",\n  \"kernelId\" : null,\n  \"pendingTime\" : \"{}\",\n  \"privateIp\" : \"{}\",\n  \"ramdiskId\" : null,\n  \"region\" : \"{}\",\n  \"version\" : \"2017-09-30\"\n}}",
            json_str(&v.account_id),
            std::env::consts::ARCH.replace("aarch64", "arm64"),
            json_str(&v.availability_zone),
            json_str(&v.ami_id),
            json_str(&v.instance_id),
            json_str(&v.instance_type),
            rfc3339(self.common.started),
            v.local_ipv4,
            json_str(&v.region),
        )
    }
}

/// The tree under `/latest/` with the events of `active` in it.
fn build_tree(v: &Ec2Values, active: &Active) -> Node {
    fn dir<const N: usize>(entries: [(&str, Node); N]) -> Node {
        Node::Dir(
            entries
                .into_iter()
                .map(|(k, n)| (k.to_owned(), n))
                .collect(),
        )
    }
    let t = |s: &str| Node::Text(Bytes::from(s.to_owned()));
    let meta_data = dir([
        ("ami-id", t(&v.ami_id)),
        ("ami-launch-index", t("0")),
        ("ami-manifest-path", t("(unknown)")),
        (
            "block-device-mapping",
            dir([("ami", t("/dev/xvda")), ("root", t("/dev/xvda"))]),
        ),
        ("hostname", t(&v.hostname)),
        (
            "iam",
            dir([
                ("info", Node::IamInfo),
                (
                    "security-credentials",
                    Node::Dir(BTreeMap::from([(v.role_name.clone(), Node::Credentials)])),
                ),
            ]),
        ),
        ("events", events_dir(active)),
        (
            "identity-credentials",
            dir([(
                "ec2",
                dir([
                    ("info", Node::InstanceCredentialsInfo),
                    (
                        "security-credentials",
                        dir([("ec2-instance", Node::InstanceCredentials)]),
                    ),
                ]),
            )]),
        ),
        ("instance-action", t("none")),
        ("instance-id", t(&v.instance_id)),
        (
            "instance-life-cycle",
            t(
                if v.spot_interruption_after.is_some() || active.spot.is_some() {
                    "spot"
                } else {
                    "on-demand"
                },
            ),
        ),
        ("instance-type", t(&v.instance_type)),
        ("local-hostname", t(&v.hostname)),
        ("local-ipv4", t(&v.local_ipv4.to_string())),
        ("mac", t(&v.mac)),
        (
            "network",
            dir([(
                "interfaces",
                dir([(
                    "macs",
                    Node::Dir(BTreeMap::from([(v.mac.clone(), interface(v))])),
                )]),
            )]),
        ),
        (
            "placement",
            dir([
                ("availability-zone", t(&v.availability_zone)),
                ("availability-zone-id", t(&v.availability_zone_id)),
                ("region", t(&v.region)),
            ]),
        ),
        ("profile", t("default-hvm")),
        ("reservation-id", t("r-0123456789abcdef0")),
        ("security-groups", t("default")),
        (
            "services",
            dir([("domain", t("amazonaws.com")), ("partition", t("aws"))]),
        ),
    ]);
    let mut meta_data = meta_data;
    if let Node::Dir(entries) = &mut meta_data {
        // Only what answers is listed: cloud-init throws a crawl away on any listed 404.
        if !v.public_keys.is_empty() {
            entries.insert("public-keys".to_owned(), public_keys(&v.public_keys));
        }
        if !v.tags.is_empty() {
            let tags = v
                .tags
                .iter()
                .map(|(k, value)| (k.clone(), t(value)))
                .collect();
            entries.insert(
                "tags".to_owned(),
                Node::Dir(BTreeMap::from([("instance".to_owned(), Node::Dir(tags))])),
            );
        }
        if let Some(notice) = active.spot {
            let time = rfc3339(notice + SPOT_WARNING);
            let action = format!(
                "{{\"action\": \"{}\", \"time\": \"{time}\"}}",
                v.spot_interruption_action.name()
            );
            entries.insert(
                "spot".to_owned(),
                dir([
                    ("instance-action", t(&action)),
                    ("termination-time", t(&time)),
                ]),
            );
        }
        if active.in_asg {
            let state = match active.asg_terminated {
                Some(_) => "Terminated",
                None => "InService",
            };
            entries.insert(
                "autoscaling".to_owned(),
                dir([("target-lifecycle-state", t(state))]),
            );
        }
    }
    let dynamic = dir([(
        "instance-identity",
        dir([
            ("document", Node::IdentityDocument),
            ("pkcs7", Node::IdentitySignature("pkcs7")),
            ("rsa2048", Node::IdentitySignature("rsa2048")),
            ("signature", Node::IdentitySignature("signature")),
        ]),
    )]);
    let mut latest = BTreeMap::from([
        ("dynamic".to_owned(), dynamic),
        ("meta-data".to_owned(), meta_data),
    ]);
    if let Some(data) = &v.user_data {
        latest.insert(
            "user-data".to_owned(),
            Node::UserData(Bytes::from(data.clone())),
        );
    }
    Node::Dir(latest)
}

/// `events/`: maintenance (history and scheduled, `[]` while none is), and
/// `recommendations/rebalance` once recommended.
fn events_dir(active: &Active) -> Node {
    let t = |s: String| Node::Text(Bytes::from(s));
    let scheduled = match active.maintenance {
        None => "[]".to_owned(),
        Some(notice) => {
            let not_before = notice + Duration::from_secs(7 * 24 * 3600);
            format!(
                "[ {{\n  \"NotBefore\" : \"{}\",\n  \"Code\" : \"system-reboot\",\n  \"Description\" : \"scheduled reboot\",\n  \"EventId\" : \"instance-event-0d59937288b749b32\",\n  \"NotAfter\" : \"{}\",\n  \"State\" : \"active\"\n}} ]",
                maintenance_date(not_before),
                maintenance_date(not_before + Duration::from_secs(2 * 3600)),
            )
        }
    };
    let mut events = BTreeMap::from([(
        "maintenance".to_owned(),
        Node::Dir(BTreeMap::from([
            ("history".to_owned(), t("[]".into())),
            ("scheduled".to_owned(), t(scheduled)),
        ])),
    )]);
    if let Some(notice) = active.rebalance {
        let rebalance = format!("{{\"noticeTime\": \"{}\"}}", rfc3339(notice));
        events.insert(
            "recommendations".to_owned(),
            Node::Dir(BTreeMap::from([("rebalance".to_owned(), t(rebalance))])),
        );
    }
    Node::Dir(events)
}

/// `network/interfaces/macs/<mac>/` of the primary interface, as a Nitro instance in a VPC
/// serves it (cloud-init reads device-number, local-ipv4s and the subnet's CIDR blocks).
fn interface(v: &Ec2Values) -> Node {
    let t = |s: &str| Node::Text(Bytes::from(s.to_owned()));
    let entries = [
        ("device-number", t("0")),
        ("interface-id", t(&v.interface_id)),
        ("local-hostname", t(&v.hostname)),
        ("local-ipv4s", t(&v.local_ipv4.to_string())),
        ("mac", t(&v.mac)),
        ("network-card-index", t("0")),
        ("owner-id", t(&v.account_id)),
        ("security-group-ids", t(&v.security_group_id)),
        ("security-groups", t("default")),
        ("subnet-id", t(&v.subnet_id)),
        ("subnet-ipv4-cidr-block", t(&v.subnet_ipv4_cidr_block)),
        ("vpc-id", t(&v.vpc_id)),
        ("vpc-ipv4-cidr-block", t(&v.vpc_ipv4_cidr_block)),
        ("vpc-ipv4-cidr-blocks", t(&v.vpc_ipv4_cidr_block)),
    ];
    let mut entries: BTreeMap<String, Node> = entries
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
    if !v.ipv6s.is_empty() {
        let ipv6s: Vec<String> = v.ipv6s.iter().map(Ipv6Addr::to_string).collect();
        entries.insert("ipv6s".to_owned(), t(&ipv6s.join("\n")));
    }
    if let Some(block) = &v.subnet_ipv6_cidr_block {
        entries.insert("subnet-ipv6-cidr-blocks".to_owned(), t(block));
    }
    if let Some(block) = &v.vpc_ipv6_cidr_block {
        entries.insert("vpc-ipv6-cidr-blocks".to_owned(), t(block));
    }
    Node::Dir(entries)
}

/// `public-keys/`: lists `0=name` (one line per key), and `public-keys/0/` lists
/// `openssh-key`, which is the key.
fn public_keys(keys: &[(String, String)]) -> Node {
    let listing: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, (name, _))| format!("{i}={name}"))
        .collect();
    let children = keys
        .iter()
        .enumerate()
        .map(|(i, (_, key))| {
            let key = Node::Text(Bytes::from(key.clone()));
            (
                i.to_string(),
                Node::Dir(BTreeMap::from([("openssh-key".to_owned(), key)])),
            )
        })
        .collect();
    Node::Listed(
        children,
        Bytes::from(listing.join(
            "
",
        )),
    )
}

fn listing(children: &BTreeMap<String, Node>) -> String {
    let names: Vec<String> = children
        .iter()
        .map(|(name, node)| match node {
            Node::Dir(_) | Node::Listed(..) => format!("{name}/"),
            _ => name.clone(),
        })
        .collect();
    names.join("\n")
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Escapes a configured value for a JSON string literal.
fn json_str(s: &str) -> String {
    let quoted = serde_json::to_string(s).expect("strings always serialize");
    quoted[1..quoted.len() - 1].to_owned()
}

fn base(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    resp
}

fn text(body: Bytes) -> Resp {
    base(StatusCode::OK, "text/plain", body)
}

/// The XHTML error page the real service sends.
/// The real service's error page for `status` (403 for a forbidden request).
pub fn error(status: StatusCode) -> Resp {
    let title = format!(
        "{} - {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    );
    base(status, "text/html", body.into())
}

fn allow(status: StatusCode, methods: &'static str) -> Resp {
    let mut resp = if status.is_success() {
        base(status, "text/plain", Bytes::new())
    } else {
        error(status)
    };
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(methods));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock() -> Ec2Mock {
        Ec2Mock::new(Ec2Values::default())
    }

    fn req(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn body(resp: Resp) -> String {
        String::from_utf8(resp.into_body().to_vec()).unwrap()
    }

    fn get(m: &Ec2Mock, path: &str) -> (StatusCode, String) {
        let resp = m.handle(&req(Method::GET, path, &[]));
        (resp.status(), body(resp))
    }

    #[test]
    fn values_and_listings() {
        let m = mock();
        assert_eq!(
            get(&m, "/latest/meta-data/instance-id"),
            (StatusCode::OK, "i-0123456789abcdef0".into())
        );
        assert_eq!(get(&m, "/latest/meta-data/placement/region").1, "us-east-1");
        assert_eq!(
            get(&m, "/latest/meta-data/placement/availability-zone/").1,
            "us-east-1a"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/placement/availability-zone").1,
            "us-east-1a"
        );
        assert_eq!(get(&m, "/latest/meta-data/local-ipv4").1, "172.31.16.10");
        assert_eq!(
            get(&m, "/latest/meta-data/iam/security-credentials/").1,
            "redirect-mock-role"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/iam/security-credentials").1,
            "redirect-mock-role"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/iam/").1,
            "info\nsecurity-credentials/"
        );
        let listing = get(&m, "/latest/meta-data/").1;
        for entry in [
            "ami-id",
            "hostname",
            "iam/",
            "instance-id",
            "local-ipv4",
            "placement/",
        ] {
            assert!(
                listing.lines().any(|l| l == entry),
                "{entry} missing from {listing:?}"
            );
        }
        assert!(!listing.ends_with('\n'));
        assert_eq!(get(&m, "/latest/").1, "dynamic/\nmeta-data/");
        assert!(get(&m, "/").1.ends_with("\n2024-04-11\nlatest"));
        assert_eq!(
            get(&m, "/2021-07-15/meta-data/instance-id").1,
            "i-0123456789abcdef0"
        );
        let resp = m.handle(&req(Method::GET, "/latest/meta-data/instance-id", &[]));
        assert_eq!(resp.headers()["server"], "EC2ws");
        assert_eq!(resp.headers()["content-type"], "text/plain");
    }

    #[test]
    fn network_interfaces_and_public_keys() {
        let m = mock();
        let mac = "/latest/meta-data/network/interfaces/macs/";
        assert_eq!(get(&m, mac).1, "0e:49:61:0f:c3:11/");
        let interface = format!("{mac}0e:49:61:0f:c3:11/");
        let listing = get(&m, &interface).1;
        for entry in [
            "device-number",
            "local-ipv4s",
            "subnet-ipv4-cidr-block",
            "vpc-id",
        ] {
            assert!(listing.lines().any(|l| l == entry), "{entry}: {listing:?}");
        }
        assert_eq!(get(&m, &format!("{interface}device-number")).1, "0");
        assert_eq!(
            get(&m, &format!("{interface}subnet-ipv4-cidr-block")).1,
            "172.31.16.0/20"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/public-keys/").1,
            "0=redirect-mock"
        );
        assert_eq!(get(&m, "/latest/meta-data/public-keys/0/").1, "openssh-key");
        let key = get(&m, "/latest/meta-data/public-keys/0/openssh-key").1;
        assert!(key.starts_with("ssh-ed25519 "), "{key}");
        assert_eq!(
            get(&m, "/latest/meta-data/public-keys/1/").0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get(&m, "/latest/meta-data/placement/availability-zone-id").1,
            "use1-az6"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/events/maintenance/scheduled").1,
            "[]"
        );
        let without = Ec2Mock::new(Ec2Values {
            public_keys: Vec::new(),
            ..Ec2Values::default()
        });
        assert_eq!(
            get(&without, "/latest/meta-data/public-keys/").0,
            StatusCode::NOT_FOUND,
            "launched without a key pair"
        );
    }

    #[test]
    fn json_documents() {
        let m = mock();
        let (status, creds) = get(
            &m,
            "/latest/meta-data/iam/security-credentials/redirect-mock-role",
        );
        assert_eq!(status, StatusCode::OK);
        let creds: serde_json::Value = serde_json::from_str(&creds).unwrap();
        assert_eq!(creds["Code"], "Success");
        assert_eq!(creds["Type"], "AWS-HMAC");
        assert_eq!(creds["AccessKeyId"], "ASIAIOSFODNN7EXAMPLE");
        let expiration = humantime::parse_rfc3339(creds["Expiration"].as_str().unwrap()).unwrap();
        assert!(expiration > SystemTime::now() + Duration::from_secs(3 * 3600 - 5));
        let info: serde_json::Value =
            serde_json::from_str(&get(&m, "/latest/meta-data/iam/info").1).unwrap();
        assert_eq!(
            info["InstanceProfileArn"],
            "arn:aws:iam::123456789012:instance-profile/redirect-mock-role"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&get(&m, "/latest/dynamic/instance-identity/document").1).unwrap();
        assert_eq!(doc["instanceId"], "i-0123456789abcdef0");
        assert_eq!(doc["region"], "us-east-1");
        assert_eq!(doc["accountId"], "123456789012");
        assert_eq!(doc["privateIp"], "172.31.16.10");
    }

    #[test]
    fn credentials_stay_valid_over_time() {
        let m = Ec2Mock::new(Ec2Values {
            credentials_lifetime: Duration::from_secs(600),
            ..Default::default()
        });
        for elapsed in [0, 299, 300, 301, 599, 600, 7_777] {
            let instance = m.instance();
            let now = instance.common.started + Duration::from_secs(elapsed);
            let (issued, expires) = instance.credentials_window(now);
            assert!(
                issued <= now && expires >= now + Duration::from_secs(300),
                "at +{elapsed}s"
            );
        }
    }

    #[test]
    fn values_with_quotes_stay_valid_json() {
        let m = Ec2Mock::new(Ec2Values {
            session_token: "a\"b\\c".into(),
            ..Default::default()
        });
        let creds = get(
            &m,
            "/latest/meta-data/iam/security-credentials/redirect-mock-role",
        )
        .1;
        let creds: serde_json::Value = serde_json::from_str(&creds).unwrap();
        assert_eq!(creds["Token"], "a\"b\\c");
    }

    #[test]
    fn not_found_cases() {
        let m = mock();
        for path in [
            "/latest/meta-data/nope",
            "/latest/meta-data/instance-id/x",
            "/latest/meta-data/iam/security-credentials/other-role",
            "/latest/user-data",
            "/1999-01-01/meta-data/",
            "/latest/meta-data//instance-id",
            "/latest/meta-data/../meta-data/instance-id",
        ] {
            let (status, body) = get(&m, path);
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert!(
                body.contains("<title>404 - Not Found</title>"),
                "{path}: {body}"
            );
        }
    }

    #[test]
    fn user_data_when_set() {
        let m = Ec2Mock::new(Ec2Values {
            user_data: Some("#!/bin/sh\necho hi\n".into()),
            ..Default::default()
        });
        let resp = m.handle(&req(Method::GET, "/latest/user-data", &[]));
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        assert_eq!(body(resp), "#!/bin/sh\necho hi\n");
        assert_eq!(get(&m, "/latest/").1, "dynamic/\nmeta-data/\nuser-data");
    }

    #[test]
    fn token_flow() {
        let m = Ec2Mock::new(Ec2Values {
            http_tokens: HttpTokens::Required,
            ..Default::default()
        });
        assert_eq!(
            get(&m, "/latest/meta-data/instance-id").0,
            StatusCode::UNAUTHORIZED
        );
        let resp = m.handle(&req(
            Method::PUT,
            TOKEN_PATH,
            &[(TOKEN_TTL_HEADER, "21600")],
        ));
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[TOKEN_TTL_HEADER], "21600");
        let token = body(resp);
        assert_eq!(token.len(), 56);
        let ok = m.handle(&req(
            Method::GET,
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, &token)],
        ));
        assert_eq!(ok.status(), StatusCode::OK);
        let bad = m.handle(&req(
            Method::GET,
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, "bogus")],
        ));
        assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
        assert!(body(bad).contains("401 - Unauthorized"));
        let xff = m.handle(&req(
            Method::GET,
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, &token), ("x-forwarded-for", "10.0.0.1")],
        ));
        assert_eq!(xff.status(), StatusCode::FORBIDDEN);
    }

    /// SIGHUP's reload: new values at once, and the tokens issued before still valid.
    #[test]
    fn a_reload_serves_new_values_and_keeps_tokens() {
        let m = mock();
        let put = req(Method::PUT, TOKEN_PATH, &[(TOKEN_TTL_HEADER, "60")]);
        let token = body(m.handle(&put));
        assert!(!m.reload(Ec2Values::default()), "unchanged");
        assert!(m.reload(Ec2Values {
            instance_id: "i-reloaded".into(),
            ..Default::default()
        }));
        let get = req(
            Method::GET,
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, &token)],
        );
        let resp = m.handle(&get);
        assert_eq!(
            (resp.status(), body(resp)),
            (StatusCode::OK, "i-reloaded".into())
        );
    }

    #[test]
    fn token_expiry() {
        let m = mock();
        let now = SystemTime::now();
        let resp = m.instance().handle_at(
            &req(Method::PUT, TOKEN_PATH, &[(TOKEN_TTL_HEADER, "1")]),
            now,
        );
        let token = body(resp);
        let r = req(
            Method::GET,
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, &token)],
        );
        assert_eq!(m.instance().handle_at(&r, now).status(), StatusCode::OK);
        assert_eq!(
            m.instance()
                .handle_at(&r, now + Duration::from_secs(1))
                .status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn optional_mode_serves_tokenless_but_checks_tokens() {
        let m = mock();
        assert_eq!(get(&m, "/latest/meta-data/instance-id").0, StatusCode::OK);
        let r = req(
            Method::GET,
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, "expired-or-bogus")],
        );
        assert_eq!(m.handle(&r).status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn token_request_errors() {
        let m = mock();
        for ttl in [None, Some("0"), Some("21601"), Some("x")] {
            let headers: Vec<(&str, &str)> =
                ttl.map(|t| (TOKEN_TTL_HEADER, t)).into_iter().collect();
            let resp = m.handle(&req(Method::PUT, TOKEN_PATH, &headers));
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "ttl {ttl:?}");
        }
        let resp = m.handle(&req(
            Method::PUT,
            TOKEN_PATH,
            &[(TOKEN_TTL_HEADER, "60"), ("x-forwarded-for", "1.2.3.4")],
        ));
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let resp = m.handle(&req(Method::GET, TOKEN_PATH, &[]));
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()["allow"], "OPTIONS, PUT");
        let resp = m.handle(&req(Method::OPTIONS, TOKEN_PATH, &[]));
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["allow"], "OPTIONS, PUT");
        let resp = m.handle(&req(Method::POST, "/latest/meta-data/instance-id", &[]));
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn simulated_events_appear_listed_and_clear() {
        let m = Ec2Mock::new(Ec2Values {
            asg_termination_after: Some(Duration::from_secs(3600)),
            ..Default::default()
        });
        let spot = "/latest/meta-data/spot/instance-action";
        let rebalance = "/latest/meta-data/events/recommendations/rebalance";
        let asg = "/latest/meta-data/autoscaling/target-lifecycle-state";
        assert_eq!(get(&m, spot).0, StatusCode::NOT_FOUND);
        assert!(!get(&m, "/latest/meta-data/").1.contains("spot/"));
        assert_eq!(get(&m, asg).1, "InService", "in an Auto Scaling group");
        assert_eq!(get(&m, "/latest/meta-data/events/").1, "maintenance/");
        m.simulate(Some(Event::SpotInterruption), Duration::ZERO);
        m.simulate(Some(Event::RebalanceRecommendation), Duration::ZERO);
        m.simulate(Some(Event::ScheduledMaintenance), Duration::ZERO);
        m.simulate(Some(Event::AsgTermination), Duration::ZERO);
        let (status, action) = get(&m, spot);
        assert_eq!(status, StatusCode::OK);
        let action: serde_json::Value = serde_json::from_str(&action).unwrap();
        assert_eq!(action["action"], "terminate");
        let time = humantime::parse_rfc3339(action["time"].as_str().unwrap()).unwrap();
        assert!(
            time > SystemTime::now() + Duration::from_secs(100),
            "two minutes' warning"
        );
        assert_eq!(
            get(&m, "/latest/meta-data/spot/termination-time").1,
            action["time"].as_str().unwrap()
        );
        assert!(
            get(&m, "/latest/meta-data/")
                .1
                .lines()
                .any(|l| l == "spot/")
        );
        assert_eq!(get(&m, "/latest/meta-data/instance-life-cycle").1, "spot");
        let notice: serde_json::Value = serde_json::from_str(&get(&m, rebalance).1).unwrap();
        assert!(notice["noticeTime"].is_string());
        let scheduled: serde_json::Value =
            serde_json::from_str(&get(&m, "/latest/meta-data/events/maintenance/scheduled").1)
                .unwrap();
        assert_eq!(scheduled[0]["Code"], "system-reboot");
        assert!(
            scheduled[0]["NotBefore"]
                .as_str()
                .unwrap()
                .ends_with(" GMT")
        );
        assert_eq!(get(&m, asg).1, "Terminated");
        // Over a reload, still there.
        assert!(m.reload(Ec2Values {
            instance_id: "i-reloaded".into(),
            asg_termination_after: Some(Duration::from_secs(3600)),
            ..Default::default()
        }));
        assert_eq!(get(&m, spot).0, StatusCode::OK);
        m.simulate(None, Duration::ZERO);
        assert_eq!(get(&m, spot).0, StatusCode::NOT_FOUND);
        assert_eq!(get(&m, asg).0, StatusCode::NOT_FOUND, "cleared");
    }

    #[test]
    fn a_delayed_event_waits_for_its_time() {
        let m = mock();
        m.simulate(Some(Event::SpotInterruption), Duration::from_secs(3600));
        assert_eq!(
            get(&m, "/latest/meta-data/spot/instance-action").0,
            StatusCode::NOT_FOUND
        );
        let later = SystemTime::now() + Duration::from_secs(3601);
        let r = req(Method::GET, "/latest/meta-data/spot/instance-action", &[]);
        assert_eq!(m.instance().handle_at(&r, later).status(), StatusCode::OK);
    }

    #[test]
    fn identity_credentials_signatures_tags_and_ipv6() {
        let m = Ec2Mock::new(Ec2Values {
            tags: BTreeMap::from([("Name".into(), "web-1".into())]),
            ipv6s: vec!["2600:1f18::10".parse().unwrap()],
            subnet_ipv6_cidr_block: Some("2600:1f18::/64".into()),
            ..Default::default()
        });
        let creds: serde_json::Value = serde_json::from_str(
            &get(
                &m,
                "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            )
            .1,
        )
        .unwrap();
        assert_eq!(creds["Code"], "Success");
        let info: serde_json::Value =
            serde_json::from_str(&get(&m, "/latest/meta-data/identity-credentials/ec2/info").1)
                .unwrap();
        assert_eq!(info["AccountId"], "123456789012");
        assert_eq!(
            get(&m, "/latest/dynamic/instance-identity/").1,
            "document\npkcs7\nrsa2048\nsignature"
        );
        for kind in ["pkcs7", "rsa2048", "signature"] {
            let (status, body) = get(&m, &format!("/latest/dynamic/instance-identity/{kind}"));
            assert_eq!(status, StatusCode::OK);
            assert!(
                body.lines().all(|l| l.len() <= 64 || kind == "signature"),
                "{kind}"
            );
        }
        assert_eq!(get(&m, "/latest/meta-data/tags/instance/").1, "Name");
        assert_eq!(get(&m, "/latest/meta-data/tags/instance/Name").1, "web-1");
        let nic = "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/";
        assert_eq!(get(&m, &format!("{nic}ipv6s")).1, "2600:1f18::10");
        assert!(!get(&m, nic).1.contains("vpc-ipv6"), "unset: unlisted");
        assert_eq!(
            get(&mock(), "/latest/meta-data/tags/instance/").0,
            StatusCode::NOT_FOUND
        );
    }
}
