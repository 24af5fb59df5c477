//! EC2 instance events simulated for an app's handlers: configured to appear after a delay,
//! or triggered at run time with `redirect simulate`, through the redirect.

use anyhow::{Context as _, Result, ensure};

use super::{Daemon, NetNs, TestCgroup, curl, mock_setup, url};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "redirect_simulate_triggers_spot_and_asg_events",
        redirect_simulate_triggers_spot_and_asg_events,
    ),
    (
        "configured_events_appear_after_their_delay",
        configured_events_appear_after_their_delay,
    ),
];

const SPOT: &str = "/latest/meta-data/spot/instance-action";

fn redirect_simulate_triggers_spot_and_asg_events() -> Result<()> {
    let s = mock_setup(&[])?;
    assert_eq!(
        curl(&s.client, &s.ns, &[], &url(SPOT))?.0,
        404,
        "no notice yet"
    );
    let out = s.daemon.cli(&s.ns, &["simulate", "spot-interruption"])?;
    ensure!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("spot-interruption"), "{said}");
    let (status, body) = curl(&s.client, &s.ns, &[], &url(SPOT))?;
    assert_eq!(status, 200, "{body}");
    let action: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(action["action"], "terminate");
    let listing = curl(&s.client, &s.ns, &[], &url("/latest/meta-data/"))?.1;
    assert!(listing.lines().any(|l| l == "spot/"), "{listing}");
    // Later, not now.
    let out = s
        .daemon
        .cli(&s.ns, &["simulate", "asg-termination", "--after", "1h"])?;
    ensure!(out.status.success(), "{out:?}");
    let asg = url("/latest/meta-data/autoscaling/target-lifecycle-state");
    assert_eq!(
        curl(&s.client, &s.ns, &[], &asg)?,
        (200, "InService".into())
    );
    let out = s.daemon.cli(&s.ns, &["simulate", "asg-termination"])?;
    ensure!(out.status.success(), "{out:?}");
    assert_eq!(
        curl(&s.client, &s.ns, &[], &asg)?,
        (200, "Terminated".into())
    );
    let out = s.daemon.cli(&s.ns, &["simulate", "clear"])?;
    ensure!(out.status.success(), "{out:?}");
    assert_eq!(curl(&s.client, &s.ns, &[], &url(SPOT))?.0, 404);
    // Bad input: named, nothing changed.
    let out = s.daemon.cli(&s.ns, &["simulate", "meteor-strike"])?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spot-interruption"), "names the events: {err}");
    Ok(())
}

fn configured_events_appear_after_their_delay() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    std::fs::write(
        &config,
        format!(
            "mock = \"ec2\"\ncgroups = [{:?}]\n[ec2]\nrebalance_recommendation_after = \"0s\"\nspot_interruption_after = \"1h\"\n",
            client.to_str().unwrap()
        ),
    )?;
    let daemon = Daemon::start(&["--config", config.to_str().unwrap()], &ns, None)?;
    let (status, body) = curl(
        &client,
        &ns,
        &[],
        &url("/latest/meta-data/events/recommendations/rebalance"),
    )?;
    assert_eq!(status, 200, "{body}");
    let notice: serde_json::Value = serde_json::from_str(&body)?;
    notice["noticeTime"].as_str().context("noticeTime")?;
    assert_eq!(curl(&client, &ns, &[], &url(SPOT))?.0, 404, "an hour away");
    assert_eq!(
        curl(
            &client,
            &ns,
            &[],
            &url("/latest/meta-data/instance-life-cycle")
        )?,
        (200, "spot".into())
    );
    // An upstream daemon has nothing to simulate, and says so.
    let upstream = Daemon::start(
        &[
            "--upstream",
            "http://127.0.0.1:9",
            "--cgroup",
            cg.child("other")?.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &ns,
        None,
    )?;
    let out = upstream.cli(&ns, &["simulate", "spot-interruption"])?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serves no mock"), "{err}");
    drop(daemon);
    Ok(())
}
