//! `/metrics` in Prometheus text format (prometheus-client), on the control socket and, with
//! `--metrics-listen`, on a loopback TCP address.
//!
//! Recorded as they happen: requests by cloud, endpoint class, status and caller; the
//! upstream's latency; the credential cache's hits and misses. Read at each scrape from the
//! daemon's status (the kernel's counters and the proxy's): rewrites, escapes dropped,
//! connections open, namespaces served.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::status::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The mock's cloud, or `upstream`.
    cloud: &'static str,
    endpoint: &'static str,
    status: u16,
    /// The caller as the access log names it (a container, a host cgroup).
    caller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    /// `hit`, `miss` (fetched), or `stale` (served while the upstream failed).
    result: &'static str,
}

/// The families recorded as requests are served.
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    upstream_seconds: Histogram,
    cache: Family<CacheLabels, Counter>,
}

/// One set for the process: the proxy's workers record into it, both endpoints read it.
static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    requests: Family::default(),
    // 1 ms .. about 4 s: the SDKs give a whole request 1 s.
    upstream_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
    cache: Family::default(),
});

pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// One request answered; `endpoint` is [`endpoint_class`]'s.
    pub fn request(
        &self,
        cloud: &'static str,
        endpoint: &'static str,
        status: u16,
        caller: String,
    ) {
        let labels = RequestLabels {
            cloud,
            endpoint,
            status,
            caller,
        };
        self.requests.get_or_create(&labels).inc();
    }

    pub fn upstream_latency(&self, took: Duration) {
        self.upstream_seconds.observe(took.as_secs_f64());
    }

    pub fn cache(&self, result: &'static str) {
        self.cache.get_or_create(&CacheLabels { result }).inc();
    }
}

/// What a request is for, across clouds: a label of a few values, whatever the path.
pub fn endpoint_class(path: &str) -> &'static str {
    if path == "/latest/api/token" {
        "session-token"
    } else if path.contains("/iam/security-credentials/")
        || path.contains("/identity-credentials/")
        || path.starts_with("/metadata/identity/")
        || (path.contains("/service-accounts/")
            && (path.ends_with("/token") || path.ends_with("/identity")))
    {
        "credentials"
    } else if path.ends_with("/user-data") || path.ends_with("/user_data") {
        "user-data"
    } else {
        "metadata"
    }
}

/// The registry a scrape encodes: the recorded families and what `status` says now.
pub fn registry(status: Arc<dyn Fn() -> Status + Send + Sync>) -> Registry {
    let m = global();
    let mut registry = Registry::with_prefix("redirect");
    registry.register(
        "requests",
        "Requests answered, by cloud, endpoint class, status and caller",
        m.requests.clone(),
    );
    registry.register(
        "upstream_request_duration_seconds",
        "Time the upstream took to answer a request, whole",
        m.upstream_seconds.clone(),
    );
    registry.register(
        "credential_cache",
        "Credential requests in upstream mode by what the cache did: hit, miss (fetched), stale (served while the upstream failed)",
        m.cache.clone(),
    );
    registry.register_collector(Box::new(StatusCollector(status)));
    registry
}

/// Encodes `registry` as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}

/// What the daemon's status holds, read at each scrape.
struct StatusCollector(Arc<dyn Fn() -> Status + Send + Sync>);

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = (self.0)();
        let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64| {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        counter(
            &mut encoder,
            "rewrites",
            "Connects rewritten to the proxy by the kernel (IPv4 and IPv6)",
            status.counter("connect4_rewritten") + status.counter("connect6_rewritten"),
        )?;
        counter(
            &mut encoder,
            "escapes_dropped",
            "Packets to a metadata address that went around the redirect, dropped by the escape guard",
            status.counter("escapes_dropped"),
        )?;
        counter(
            &mut encoder,
            "refused",
            "Requests the proxy answered itself (4xx, 503) before any backend",
            status.proxy.refused,
        )?;
        gauge(
            &mut encoder,
            "connections_open",
            "Client connections open now",
            status.proxy.connections_open as i64,
        )?;
        gauge(
            &mut encoder,
            "namespaces_served",
            "Network namespaces (containers) the daemon listens in",
            status.namespaces.len() as i64,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_classes() {
        for (path, class) in [
            ("/latest/api/token", "session-token"),
            (
                "/latest/meta-data/iam/security-credentials/role",
                "credentials",
            ),
            ("/metadata/identity/oauth2/token", "credentials"),
            (
                "/computeMetadata/v1/instance/service-accounts/default/token",
                "credentials",
            ),
            ("/latest/user-data", "user-data"),
            ("/openstack/latest/user_data", "user-data"),
            ("/latest/meta-data/instance-id", "metadata"),
        ] {
            assert_eq!(endpoint_class(path), class, "{path}");
        }
    }
}
