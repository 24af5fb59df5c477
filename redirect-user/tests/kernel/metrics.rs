//! `/metrics` (read by a Prometheus text parser), `/healthz` and `/readyz`, on
//! `--metrics-listen` and on the control socket, after known traffic.

use anyhow::{Context as _, Result};

use super::{Daemon, INSTANCE_ID, NetNs, TestCgroup, command_in, curl, sh, url};

pub const TESTS: &[(&str, super::TestFn)] = &[(
    "metrics_count_known_traffic_and_readiness_follows_the_attachments",
    metrics_count_known_traffic_and_readiness_follows_the_attachments,
)];

const METRICS: &str = "127.0.0.1:9169";

fn scrape(ns: &NetNs, cgroup: &std::path::Path) -> Result<prometheus_parse::Scrape> {
    let (status, text) = curl(cgroup, ns, &[], &format!("http://{METRICS}/metrics"))?;
    anyhow::ensure!(status == 200, "{status}: {text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .context("not Prometheus text")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn metrics_count_known_traffic_and_readiness_follows_the_attachments() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let other = cg.child("other")?;
    let daemon = Daemon::start(
        &[
            "--mock",
            "--cgroup",
            client.to_str().unwrap(),
            "--cgroup",
            other.to_str().unwrap(),
            "--metrics-listen",
            METRICS,
        ],
        &ns,
        None,
    )?;
    let id = url("/latest/meta-data/instance-id");
    for _ in 0..3 {
        assert_eq!(curl(&client, &ns, &[], &id)?, (200, INSTANCE_ID.into()));
    }
    assert_eq!(
        curl(&client, &ns, &[], &url("/latest/meta-data/nope"))?.0,
        404
    );
    let put = [
        "-X",
        "PUT",
        "-H",
        "X-aws-ec2-metadata-token-ttl-seconds: 60",
    ];
    assert_eq!(curl(&client, &ns, &put, &url("/latest/api/token"))?.0, 200);
    let scrape = scrape(&ns, &other)?;
    let ok = [
        ("cloud", "ec2"),
        ("endpoint", "metadata"),
        ("status", "200"),
    ];
    assert_eq!(value(&scrape, "redirect_requests_total", &ok), 3.0);
    let missing = [("cloud", "ec2"), ("status", "404")];
    assert_eq!(value(&scrape, "redirect_requests_total", &missing), 1.0);
    let token = [("endpoint", "session-token"), ("status", "200")];
    assert_eq!(value(&scrape, "redirect_requests_total", &token), 1.0);
    let callers: Vec<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "redirect_requests_total")
        .filter_map(|s| s.labels.get("caller"))
        .collect();
    assert!(callers.iter().all(|c| c.contains("/client")), "{callers:?}");
    assert!(value(&scrape, "redirect_rewrites_total", &[]) >= 5.0);
    assert_eq!(value(&scrape, "redirect_escapes_dropped_total", &[]), 0.0);
    // The same on the control socket.
    let text = sh(command_in("curl", None, Some(&ns))?
        .args(["-sS", "--unix-socket"])
        .arg(&daemon.control_socket)
        .arg("http://localhost/metrics"))?;
    assert!(text.contains("redirect_requests_total"), "{text}");
    assert_eq!(
        curl(&other, &ns, &[], &format!("http://{METRICS}/healthz"))?,
        (200, "ok\n".into())
    );
    let (status, body) = curl(&other, &ns, &[], &format!("http://{METRICS}/readyz"))?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("ready: 10 program links attached"),
        "{body}"
    );
    // A covered cgroup goes (its links with it): not ready, and it says which.
    std::fs::remove_dir(&client)?;
    let (status, body) = curl(&other, &ns, &[], &format!("http://{METRICS}/readyz"))?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the cgroup is gone"), "{body}");
    Ok(())
}
