//! `/metrics` (read by a Prometheus text parser), `/healthz` and `/readyz`, on
//! `--metrics-listen` and on the control socket, after known traffic.

use anyhow::{Context as _, Result};

use super::{Daemon, INSTANCE_ID, NetNs, TestCgroup, command_in, curl, sh, support, url};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "metrics_count_known_traffic_and_readiness_follows_the_attachments",
        metrics_count_known_traffic_and_readiness_follows_the_attachments,
    ),
    (
        "readiness_self_test_catches_a_link_detached_behind_the_daemons_back",
        readiness_self_test_catches_a_link_detached_behind_the_daemons_back,
    ),
];

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
    assert!(
        body.contains("a connect to 169.254.169.254:80 from each of 2 cgroup(s) was redirected"),
        "{body}"
    );
    // A covered cgroup goes (its links with it): not ready, and it says which.
    std::fs::remove_dir(&client)?;
    let (status, body) = curl(&other, &ns, &[], &format!("http://{METRICS}/readyz"))?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the cgroup is gone"), "{body}");
    Ok(())
}

/// The links stay held and pinned, but one is detached in the kernel (`bpftool link detach`):
/// only the self-test's connect can tell, and /readyz turns 503 naming the cgroup.
fn readiness_self_test_catches_a_link_detached_behind_the_daemons_back() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let outside = cg.child("outside")?;
    let _daemon = Daemon::start(
        &[
            "--mock",
            "--cgroup",
            client.to_str().unwrap(),
            "--metrics-listen",
            METRICS,
        ],
        &ns,
        None,
    )?;
    let readyz = format!("http://{METRICS}/readyz");
    let (status, body) = curl(&outside, &ns, &[], &readyz)?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("was redirected"), "{body}");
    let left: Vec<_> = std::fs::read_dir(&client)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "the probe's cgroup stays: {left:?}");
    // Detach the connect4 link of this cgroup.
    let links = support::cgroup_links(&client)?;
    let connect4: Vec<u64> = links
        .iter()
        .filter(|l| {
            l["attach_type"]
                .as_str()
                .is_some_and(|t| t.contains("inet4_connect"))
        })
        .filter_map(|l| l["id"].as_u64())
        .collect();
    assert_eq!(connect4.len(), 1, "{links:?}");
    sh(std::process::Command::new("bpftool").args([
        "link",
        "detach",
        "id",
        &connect4[0].to_string(),
    ]))?;
    // A verdict stands a few seconds (a poller cannot make the daemon probe in a loop).
    for _ in 0..40 {
        let (status, body) = curl(&outside, &ns, &[], &readyz)?;
        if status == 503 {
            assert!(
                body.contains(&format!(
                    "a connect to 169.254.169.254:80 from {} was not redirected",
                    client.display()
                )),
                "{body}"
            );
            return Ok(());
        }
        assert!(body.contains("was redirected"), "{body}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    anyhow::bail!("/readyz stayed ready with connect4 detached")
}
