//! Upstream mode's cache of credentials and tokens, which protects the real metadata service
//! and keeps callers served through its outages (the SDKs' "static stability").
//!
//! What is cached, per identity the request names: EC2 role credentials
//! (`meta-data/iam/security-credentials/<role>`, `identity-credentials/ec2/...`) and IMDSv2
//! session tokens (`PUT /latest/api/token`), Azure managed identity tokens (per resource and
//! `client_id`/`object_id`/`msi_res_id`), GCP service account access and identity tokens
//! (per account and scopes or audience). Nothing else: every other request goes upstream.
//!
//! - Requested once: concurrent requests for the same entry wait for one upstream request
//!   (single flight), so 10,000 callers asking at once cost the service one request; and
//!   upstream credential requests go at most 5 at once and 20 a second, so Azure's identity
//!   endpoint (20 requests/s, 5 at once) never answers us 429.
//! - Refreshed before they expire: once two thirds of an entry's lifetime have passed, the
//!   next request refreshes it while the others are served the cached one.
//! - Served while the upstream fails, until the entry expires.
//! - Served as the upstream would: a relative lifetime (`expires_in`, the token TTL header)
//!   counts down; an EC2 request's session token must be one the upstream issued (so a
//!   cached answer never lets a caller skip IMDSv2), and a tokenless request is served only
//!   an entry the upstream gave a tokenless request; a request the upstream would refuse
//!   (no `Metadata` header, `X-Forwarded-For`) is not answered from the cache.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
};
use tokio::{sync::Semaphore, time::Instant};

const EC2_TOKEN: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token");
const EC2_TOKEN_TTL: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The longest IMDSv2 token: the cache asks for it, whatever TTL the caller asked for, and
/// gives each caller at most what it asked.
const EC2_MAX_TTL: u64 = 21_600;
/// Upstream credential requests in flight at once (Azure's identity endpoint takes 5).
const MAX_FETCHES: usize = 5;
/// Between the starts of two upstream credential requests: at most 20 a second (Azure's).
const FETCH_SPACING: Duration = Duration::from_millis(50);
/// Entries kept at most; beyond, new identities are not cached (served uncached).
const MAX_ENTRIES: usize = 4096;

/// What a request asks for, as the cache tells entries apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Ec2Token,
    /// EC2 role (or instance) credentials, by path.
    Ec2Credentials(String),
    /// Azure token: path and the query's identity and resource.
    Azure(String),
    /// GCP access or identity token: path and the query's scopes or audience.
    Gcp(String),
}

pub struct CredentialCache {
    entries: Mutex<HashMap<Key, Arc<Slot>>>,
    /// IMDSv2 tokens the upstream issued to the cache, with their expiry.
    tokens: Mutex<HashMap<String, Instant>>,
    fetches: Semaphore,
    /// When the next upstream credential request may start.
    next_fetch: tokio::sync::Mutex<Instant>,
}

#[derive(Default)]
struct Slot {
    cached: Mutex<Option<Arc<Cached>>>,
    /// Held by the one request fetching this entry.
    flight: tokio::sync::Mutex<()>,
}

struct Cached {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    refresh_at: Instant,
    expires: Instant,
    /// The upstream gave it to a request without a session token (IMDSv1 allowed).
    tokenless: bool,
}

impl Default for CredentialCache {
    fn default() -> Self {
        CredentialCache {
            entries: Mutex::default(),
            tokens: Mutex::default(),
            fetches: Semaphore::new(MAX_FETCHES),
            next_fetch: tokio::sync::Mutex::new(Instant::now()),
        }
    }
}

/// An answer, and whether the cache had it.
pub struct Served {
    pub resp: Response<Bytes>,
    pub from_cache: bool,
}

impl Served {
    fn fetched(self) -> Self {
        crate::metrics::global().cache("miss");
        Served {
            from_cache: false,
            ..self
        }
    }

    fn hit(self) -> Self {
        crate::metrics::global().cache("hit");
        self
    }
}

impl CredentialCache {
    /// Answers `req` from the cache, fetching it with `fetch` (the request as the caller
    /// sent it, or a token PUT for the longest TTL) when needed; `None`: not a request the
    /// cache answers (forward it).
    pub async fn respond<F, Fut>(&self, req: &Request<Bytes>, fetch: F) -> Option<Served>
    where
        F: FnOnce(Request<Bytes>) -> Fut,
        Fut: Future<Output = Result<Response<Bytes>, Response<Bytes>>>,
    {
        let key = classify(req)?;
        let tokenless = !req.headers().contains_key(EC2_TOKEN);
        if matches!(key, Key::Ec2Credentials(_)) && !tokenless && !self.known_token(req.headers()) {
            return None; // the upstream decides whether this token is valid
        }
        let slot = self.slot(&key)?;
        let now = Instant::now();
        let usable = |cached: &Arc<Cached>, now: Instant| {
            now < cached.expires && (!tokenless || cached.tokenless || key == Key::Ec2Token)
        };
        let current = slot.current();
        if let Some(cached) = current.as_ref().filter(|c| usable(c, now)) {
            if now < cached.refresh_at {
                return Some(self.serve(&key, req, cached).hit());
            }
            // Due for a refresh: one request refreshes, the others are served meanwhile.
            let Ok(_flight) = slot.flight.try_lock() else {
                return Some(self.serve(&key, req, cached).hit());
            };
            return Some(match self.fetch(&key, &slot, req, tokenless, fetch).await {
                Ok(fresh) => self.serve(&key, req, &fresh).fetched(),
                Err(_) => {
                    tracing::warn!(
                        "upstream failed to refresh cached {}; serving the cached one until it expires",
                        key.what()
                    );
                    crate::metrics::global().cache("stale");
                    self.serve(&key, req, cached)
                }
            });
        }
        let _flight = slot.flight.lock().await;
        // Another request may have fetched it while this one waited.
        if let Some(cached) = slot.current().filter(|c| usable(c, Instant::now())) {
            return Some(self.serve(&key, req, &cached).hit());
        }
        Some(match self.fetch(&key, &slot, req, tokenless, fetch).await {
            Ok(fresh) => self.serve(&key, req, &fresh).fetched(),
            Err(resp) => Served {
                resp,
                from_cache: false,
            },
        })
    }

    fn slot(&self, key: &Key) -> Option<Arc<Slot>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = entries.get(key) {
            return Some(Arc::clone(slot));
        }
        if entries.len() >= MAX_ENTRIES {
            return None;
        }
        let slot = Arc::new(Slot::default());
        entries.insert(key.clone(), Arc::clone(&slot));
        Some(slot)
    }

    fn known_token(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers.get(EC2_TOKEN).and_then(|t| t.to_str().ok()) else {
            return false;
        };
        let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.get(token).is_some_and(|&exp| Instant::now() < exp)
    }

    /// One upstream request for `key`; a cacheable answer is stored. `Err`: the upstream's
    /// answer (or the proxy's gateway error) when it is not one to cache.
    async fn fetch<F, Fut>(
        &self,
        key: &Key,
        slot: &Slot,
        req: &Request<Bytes>,
        tokenless: bool,
        fetch: F,
    ) -> Result<Arc<Cached>, Response<Bytes>>
    where
        F: FnOnce(Request<Bytes>) -> Fut,
        Fut: Future<Output = Result<Response<Bytes>, Response<Bytes>>>,
    {
        let mut upstream_req = Request::new(req.body().clone());
        *upstream_req.method_mut() = req.method().clone();
        *upstream_req.uri_mut() = req.uri().clone();
        *upstream_req.headers_mut() = req.headers().clone();
        if *key == Key::Ec2Token {
            upstream_req
                .headers_mut()
                .insert(EC2_TOKEN_TTL, HeaderValue::from(EC2_MAX_TTL));
        }
        let _permit = self.fetches.acquire().await;
        {
            let mut next = self.next_fetch.lock().await;
            tokio::time::sleep_until(*next).await;
            *next = Instant::now().max(*next) + FETCH_SPACING;
        }
        let fetched = SystemTime::now();
        let resp = fetch(upstream_req).await?;
        let now = Instant::now();
        let Some(lifetime) = (resp.status() == StatusCode::OK)
            .then(|| lifetime(key, &resp, fetched))
            .flatten()
        else {
            return Err(resp);
        };
        let (head, body) = resp.into_parts();
        let cached = Arc::new(Cached {
            status: head.status,
            headers: head.headers,
            body,
            refresh_at: now + lifetime * 2 / 3,
            expires: now + lifetime,
            tokenless,
        });
        if *key == Key::Ec2Token
            && let Ok(token) = std::str::from_utf8(&cached.body)
        {
            let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            tokens.retain(|_, &mut exp| now < exp);
            tokens.insert(token.trim().to_owned(), cached.expires);
        }
        *slot.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&cached));
        Ok(cached)
    }

    /// The cached answer as the upstream would give it now: relative lifetimes counted down.
    fn serve(&self, key: &Key, req: &Request<Bytes>, cached: &Cached) -> Served {
        let remaining = cached
            .expires
            .saturating_duration_since(Instant::now())
            .as_secs();
        let mut resp = Response::new(cached.body.clone());
        *resp.status_mut() = cached.status;
        *resp.headers_mut() = cached.headers.clone();
        match key {
            Key::Ec2Token => {
                let asked = req
                    .headers()
                    .get(EC2_TOKEN_TTL)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(EC2_MAX_TTL);
                resp.headers_mut()
                    .insert(EC2_TOKEN_TTL, HeaderValue::from(asked.min(remaining)));
            }
            Key::Azure(_) => recount(&mut resp, remaining, true),
            Key::Gcp(_) => recount(&mut resp, remaining, false),
            Key::Ec2Credentials(_) => {}
        }
        Served {
            resp,
            from_cache: true,
        }
    }
}

impl Slot {
    fn current(&self) -> Option<Arc<Cached>> {
        self.cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Key {
    fn what(&self) -> String {
        match self {
            Key::Ec2Token => "IMDSv2 session token".to_owned(),
            Key::Ec2Credentials(path) | Key::Azure(path) | Key::Gcp(path) => path.clone(),
        }
    }
}

/// The cache's key for a request it answers.
fn classify(req: &Request<Bytes>) -> Option<Key> {
    let headers = req.headers();
    if headers.contains_key(X_FORWARDED_FOR) {
        return None; // every cloud refuses it: the upstream must see it
    }
    let path = req.uri().path();
    let query = req.uri().query();
    if path == "/latest/api/token" {
        return (*req.method() == Method::PUT && headers.contains_key(EC2_TOKEN_TTL))
            .then_some(Key::Ec2Token);
    }
    if *req.method() != Method::GET {
        return None;
    }
    if is_ec2_credentials(path) {
        return Some(Key::Ec2Credentials(path.to_owned()));
    }
    if path == "/metadata/identity/oauth2/token" {
        let metadata = headers
            .get("metadata")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let params = [
            "api-version",
            "resource",
            "client_id",
            "object_id",
            "msi_res_id",
            "mi_res_id",
        ];
        return metadata.then(|| Key::Azure(keyed(path, query, &params)));
    }
    if let Some(rest) = path.strip_prefix("/computeMetadata/v1/instance/service-accounts/") {
        let flavor = headers
            .get("metadata-flavor")
            .is_some_and(|v| v.as_bytes() == b"Google");
        let (account, what) = rest.split_once('/')?;
        let params: &[&str] = match what {
            "token" => &["scopes"],
            "identity" => &["audience", "format", "licenses"],
            _ => return None,
        };
        return (flavor && !account.is_empty()).then(|| Key::Gcp(keyed(path, query, params)));
    }
    None
}

/// `/<version>/meta-data/iam/security-credentials/<role>` and the instance's own
/// `identity-credentials/ec2/security-credentials/ec2-instance`.
fn is_ec2_credentials(path: &str) -> bool {
    let Some((version, rest)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    if version.is_empty() {
        return false;
    }
    let role = rest
        .strip_prefix("meta-data/iam/security-credentials/")
        .or_else(|| rest.strip_prefix("meta-data/identity-credentials/ec2/security-credentials/"));
    role.is_some_and(|r| !r.is_empty() && !r.contains('/'))
}

/// `path?k=v&...` with only `params`, in their order: the identity and what it is for.
fn keyed(path: &str, query: Option<&str>, params: &[&str]) -> String {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut key = path.to_owned();
    for param in params {
        if let Some((_, v)) = pairs.iter().find(|(k, _)| k == param) {
            key.push_str(&format!("&{param}={v}"));
        }
    }
    key
}

/// How long an answer stays valid, from what it says; `None`: not one to cache.
fn lifetime(key: &Key, resp: &Response<Bytes>, fetched: SystemTime) -> Option<Duration> {
    let until = |expires: SystemTime| expires.duration_since(fetched).ok();
    let json = || serde_json::from_slice::<serde_json::Value>(resp.body()).ok();
    let lifetime = match key {
        Key::Ec2Token => resp
            .headers()
            .get(EC2_TOKEN_TTL)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_secs),
        Key::Ec2Credentials(_) => {
            let doc = json()?;
            let expiration = doc.get("Expiration")?.as_str()?;
            until(humantime::parse_rfc3339(expiration).ok()?)
        }
        Key::Azure(_) => {
            let doc = json()?;
            match doc.get("expires_on").and_then(number) {
                Some(on) => until(UNIX_EPOCH + Duration::from_secs(on)),
                None => doc
                    .get("expires_in")
                    .and_then(number)
                    .map(Duration::from_secs),
            }
        }
        Key::Gcp(path) if path.contains("/identity") => {
            let payload = std::str::from_utf8(resp.body()).ok()?.split('.').nth(1)?;
            let claims: serde_json::Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
            until(UNIX_EPOCH + Duration::from_secs(claims.get("exp")?.as_u64()?))
        }
        Key::Gcp(_) => json()?
            .get("expires_in")
            .and_then(number)
            .map(Duration::from_secs),
    }?;
    // Something that expires within seconds is not worth keeping.
    (lifetime >= Duration::from_secs(10)).then_some(lifetime)
}

/// A JSON number, or a string of one (Azure sends every token field as a string).
fn number(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// Sets a token answer's `expires_in` to what remains (a string for Azure, a number for
/// GCP, as each service sends it).
fn recount(resp: &mut Response<Bytes>, remaining: u64, as_string: bool) {
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(resp.body()) else {
        return;
    };
    let Some(fields) = doc.as_object_mut() else {
        return;
    };
    if !fields.contains_key("expires_in") {
        return;
    }
    let value = match as_string {
        true => serde_json::Value::String(remaining.to_string()),
        false => serde_json::Value::from(remaining),
    };
    fields.insert("expires_in".to_owned(), value);
    *resp.body_mut() = Bytes::from(doc.to_string());
    resp.headers_mut().remove(header::CONTENT_LENGTH);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn req(method: Method, target: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut b = Request::builder().method(method).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Bytes::new()).unwrap()
    }

    fn ok(body: String, headers: &[(&'static str, String)]) -> Response<Bytes> {
        let mut resp = Response::new(Bytes::from(body));
        for (k, v) in headers {
            resp.headers_mut()
                .insert(*k, HeaderValue::from_str(v).unwrap());
        }
        resp
    }

    fn ec2_creds(expires_in: Duration) -> String {
        let expiration = humantime::format_rfc3339_seconds(SystemTime::now() + expires_in);
        format!("{{\"Code\":\"Success\",\"AccessKeyId\":\"AK\",\"Expiration\":\"{expiration}\"}}")
    }

    const CREDS: &str = "/latest/meta-data/iam/security-credentials/role";

    /// 10,000 requests at once for the same credentials: one upstream request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_cost_one_upstream_request() {
        let cache = Arc::new(CredentialCache::default());
        let upstream = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..10_000)
            .map(|_| {
                let (cache, upstream) = (Arc::clone(&cache), Arc::clone(&upstream));
                tokio::spawn(async move {
                    let r = req(Method::GET, CREDS, &[]);
                    let served = cache
                        .respond(&r, |_| async {
                            upstream.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(ok(ec2_creds(Duration::from_secs(6 * 3600)), &[]))
                        })
                        .await
                        .expect("cacheable");
                    served.resp.status()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(upstream.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshed_before_expiry_and_served_while_the_upstream_fails() {
        let cache = CredentialCache::default();
        let r = req(Method::GET, CREDS, &[]);
        let lifetime = Duration::from_secs(3000);
        let first = cache
            .respond(&r, |_| async { Ok(ok(ec2_creds(lifetime), &[])) })
            .await
            .unwrap();
        assert!(!first.from_cache);
        let never = |_| async { panic!("not due") };
        assert!(cache.respond(&r, never).await.unwrap().from_cache);
        // Past two thirds: refreshed, and the upstream is down: the cached one is served.
        tokio::time::advance(Duration::from_secs(2100)).await;
        let calls = AtomicUsize::new(0);
        let down = |_| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(ok("upstream down".into(), &[]).map(|b| b))
        };
        let served = cache.respond(&r, down).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a refresh was tried");
        assert!(served.from_cache && served.resp.status() == StatusCode::OK);
        // Expired: the upstream's failure is the answer.
        tokio::time::advance(Duration::from_secs(1000)).await;
        let failed = |_| async {
            let mut resp = ok("bad gateway".into(), &[]);
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            Err(resp)
        };
        let served = cache.respond(&r, failed).await.unwrap();
        assert_eq!(served.resp.status(), StatusCode::BAD_GATEWAY);
    }

    #[tokio::test(start_paused = true)]
    async fn imdsv2_tokens_are_cached_and_required_where_the_upstream_required_them() {
        let cache = CredentialCache::default();
        let put = req(
            Method::PUT,
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", "60")],
        );
        let asked = Mutex::new(None);
        let token = cache
            .respond(&put, |upstream| {
                *asked.lock().unwrap() = Some(upstream.headers()[&EC2_TOKEN_TTL].clone());
                async {
                    Ok(ok(
                        "TOKEN".into(),
                        &[("x-aws-ec2-metadata-token-ttl-seconds", "21600".into())],
                    ))
                }
            })
            .await
            .unwrap();
        assert_eq!(asked.lock().unwrap().as_ref().unwrap(), "21600");
        assert_eq!(
            token.resp.headers()[&EC2_TOKEN_TTL],
            "60",
            "what it asked for"
        );
        // Credentials fetched with that token (the upstream requires one).
        let with = req(Method::GET, CREDS, &[("x-aws-ec2-metadata-token", "TOKEN")]);
        let creds = cache
            .respond(&with, |_| async {
                Ok(ok(ec2_creds(Duration::from_secs(3600)), &[]))
            })
            .await
            .unwrap();
        assert_eq!(creds.resp.status(), StatusCode::OK);
        // A token the upstream never issued, or none: not from the cache.
        let bogus = req(
            Method::GET,
            CREDS,
            &[("x-aws-ec2-metadata-token", "FORGED")],
        );
        assert!(
            cache
                .respond(&bogus, |_| async { unreachable!() })
                .await
                .is_none()
        );
        let tokenless = req(Method::GET, CREDS, &[]);
        let upstream_says = cache
            .respond(&tokenless, |_| async {
                let mut resp = ok("401".into(), &[]);
                *resp.status_mut() = StatusCode::UNAUTHORIZED;
                Ok(resp)
            })
            .await
            .unwrap();
        assert_eq!(upstream_says.resp.status(), StatusCode::UNAUTHORIZED);
        assert!(!upstream_says.from_cache);
        // A second PUT: the same token, no upstream request.
        let again = cache
            .respond(&put, |_| async { unreachable!() })
            .await
            .unwrap();
        assert_eq!(again.resp.body().as_ref(), b"TOKEN");
    }

    #[tokio::test(start_paused = true)]
    async fn azure_and_gcp_tokens_count_down() {
        let cache = CredentialCache::default();
        let azure = req(
            Method::GET,
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com",
            &[("metadata", "true")],
        );
        let on = SystemTime::now() + Duration::from_secs(86_400);
        let on = on.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let body =
            format!("{{\"access_token\":\"A\",\"expires_in\":\"86400\",\"expires_on\":\"{on}\"}}");
        cache
            .respond(&azure, |_| async { Ok(ok(body, &[])) })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(400)).await;
        let served = cache
            .respond(&azure, |_| async { unreachable!() })
            .await
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(served.resp.body()).unwrap();
        let left: u64 = doc["expires_in"].as_str().unwrap().parse().unwrap();
        assert!((85_990..=86_000).contains(&left), "{left}");
        // Another identity is another entry; no Metadata header: not from the cache.
        let other = req(
            Method::GET,
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com&client_id=x",
            &[("metadata", "true")],
        );
        let fetched = cache
            .respond(&other, |_| async {
                Ok(ok("{\"expires_in\":\"3600\"}".into(), &[]))
            })
            .await
            .unwrap();
        assert!(!fetched.from_cache);
        let bare = req(
            Method::GET,
            "/metadata/identity/oauth2/token?resource=x",
            &[],
        );
        assert!(
            cache
                .respond(&bare, |_| async { unreachable!() })
                .await
                .is_none()
        );
        let gcp = req(
            Method::GET,
            "/computeMetadata/v1/instance/service-accounts/default/token",
            &[("metadata-flavor", "Google")],
        );
        cache
            .respond(&gcp, |_| async {
                Ok(ok(
                    "{\"access_token\":\"G\",\"expires_in\":3599,\"token_type\":\"Bearer\"}".into(),
                    &[],
                ))
            })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(99)).await;
        let served = cache
            .respond(&gcp, |_| async { unreachable!() })
            .await
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(served.resp.body()).unwrap();
        assert_eq!(doc["expires_in"], 3500);
        let xff = req(
            Method::GET,
            "/computeMetadata/v1/instance/service-accounts/default/token",
            &[
                ("metadata-flavor", "Google"),
                ("x-forwarded-for", "1.2.3.4"),
            ],
        );
        assert!(
            cache
                .respond(&xff, |_| async { unreachable!() })
                .await
                .is_none()
        );
    }

    #[test]
    fn what_is_credentials() {
        for path in [
            "/latest/meta-data/iam/security-credentials/role",
            "/2021-03-23/meta-data/iam/security-credentials/role",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        ] {
            assert!(is_ec2_credentials(path), "{path}");
        }
        for path in [
            "/latest/meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/security-credentials/role/x",
            "/latest/meta-data/instance-id",
            "//meta-data/iam/security-credentials/role",
        ] {
            assert!(!is_ec2_credentials(path), "{path}");
        }
    }

    /// Many identities at once: at most 5 upstream requests in flight and 20 a second.
    #[tokio::test(start_paused = true)]
    async fn upstream_requests_stay_within_azures_limits() {
        let cache = Arc::new(CredentialCache::default());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let began = Instant::now();
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (cache, in_flight, most) = (
                    Arc::clone(&cache),
                    Arc::clone(&in_flight),
                    Arc::clone(&most),
                );
                tokio::spawn(async move {
                    let r = req(
                        Method::GET,
                        &format!("/metadata/identity/oauth2/token?resource=https://r{i}"),
                        &[("metadata", "true")],
                    );
                    cache
                        .respond(&r, |_| async {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok(ok("{\"expires_in\":\"3600\"}".into(), &[]))
                        })
                        .await
                        .unwrap()
                        .resp
                        .status()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), StatusCode::OK);
        }
        assert!(most.load(Ordering::SeqCst) <= MAX_FETCHES);
        assert!(
            began.elapsed() >= FETCH_SPACING * 39,
            "40 starts take at least 1.95 s: {:?}",
            began.elapsed()
        );
    }
}
