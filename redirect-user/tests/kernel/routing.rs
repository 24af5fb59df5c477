//! What is redirected and what is not: cgroups, targets, address families, getpeername, the target tables.

use super::*;

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "other_cgroups_and_destinations_are_untouched",
        other_cgroups_and_destinations_are_untouched,
    ),
    (
        "connect6_mapped_and_getpeername",
        connect6_mapped_and_getpeername,
    ),
    (
        "dedicated_ports_need_no_record_and_direct_connects_stay_true",
        dedicated_ports_need_no_record_and_direct_connects_stay_true,
    ),
    (
        "thousands_of_targets_each_redirected",
        thousands_of_targets_each_redirected,
    ),
    ("ipv6_listener", ipv6_listener),
    ("ebpf_log_reports_rewrites", ebpf_log_reports_rewrites),
];

fn other_cgroups_and_destinations_are_untouched() -> Result<()> {
    let s = mock_setup(&[])?;
    let other = s.cg.child("other")?;
    // Same network namespace, sibling cgroup: not redirected, so no route.
    let r = child_role(&other, &s.ns, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["errno"], ENETUNREACH, "{r}");
    let r = child_role(&other, &s.ns, "connect", &["[fd00:ec2::254]:80"])?;
    assert_eq!(r["errno"], ENETUNREACH, "{r}");
    // Attached cgroup, but not a target (other port, other address).
    for addr in [
        "169.254.169.254:81",
        "169.254.169.253:80",
        "[fd00:ec2::254]:81",
    ] {
        let r = child_role(&s.client, &s.ns, "connect", &[addr])?;
        assert_eq!(r["errno"], ENETUNREACH, "{addr}: {r}");
    }
    let status = s.daemon.status(&s.ns)?;
    assert_eq!(status["counters"]["connect4_rewritten"], 0, "{status:#}");
    assert_eq!(status["counters"]["connect6_rewritten"], 0, "{status:#}");
    assert!(
        status["counters"]["connect4_seen"].as_u64() >= Some(2),
        "{status:#}"
    );
    // A descendant of the attached cgroup is redirected.
    let grandchild = s.cg.child("client/nested")?;
    let answer = curl(
        &grandchild,
        &s.ns,
        &[],
        &url("/latest/meta-data/instance-id"),
    )?;
    assert_eq!(answer, (200, INSTANCE_ID.to_owned()));
    Ok(())
}

fn connect6_mapped_and_getpeername() -> Result<()> {
    let s = mock_setup(&[])?;
    for addr in [
        "169.254.169.254:80",
        "[fd00:ec2::254]:80",
        "[::ffff:169.254.169.254]:80",
    ] {
        let r = child_role(&s.client, &s.ns, "connect", &[addr])?;
        assert_eq!(r["ok"], true, "{addr}: {r}");
        assert_eq!(r["peer"], addr, "getpeername shows what was dialled");
        assert_eq!(r["body"], INSTANCE_ID, "{addr}");
    }
    let status = s.daemon.status(&s.ns)?;
    assert_eq!(status["counters"]["connect6_rewritten"], 2, "{status:#}");
    assert_eq!(status["counters"]["connect4_rewritten"], 1, "{status:#}");
    assert_eq!(status["counters"]["getpeername_restored"], 3, "{status:#}");
    Ok(())
}

/// The built-in proxy gives each target a port of its own, so getpeername is restored from the
/// address and connect4 records nothing; the listen port itself serves direct requests, which
/// getpeername reports truthfully.
fn dedicated_ports_need_no_record_and_direct_connects_stay_true() -> Result<()> {
    let s = mock_setup(&[])?;
    for addr in [
        "169.254.169.254:80",
        "[::ffff:169.254.169.254]:80",
        "[fd00:ec2::254]:80",
    ] {
        let r = child_role(&s.client, &s.ns, "connect", &[addr])?;
        assert_eq!(
            (&r["peer"], &r["body"]),
            (&addr.into(), &INSTANCE_ID.into()),
            "{r}"
        );
    }
    let r = child_role(&s.client, &s.ns, "connect", &["127.0.0.1:8169"])?;
    assert_eq!(
        (&r["peer"], &r["body"]),
        (&"127.0.0.1:8169".into(), &INSTANCE_ID.into()),
        "the listen port, dialled directly: {r}"
    );
    // Nothing but the rewrite is meant to dial a dedicated port; whoever does is told the
    // target's address (README, "How getpeername is restored").
    let r = child_role(&s.client, &s.ns, "connect", &["127.0.0.1:8170"])?;
    assert_eq!(r["peer"], "169.254.169.254:80", "{r}");
    let status = s.daemon.status(&s.ns)?;
    assert_eq!(status["counters"]["connect4_rewritten"], 1, "{status:#}");
    assert_eq!(status["counters"]["connect6_rewritten"], 2, "{status:#}");
    assert_eq!(status["counters"]["getpeername_restored"], 4, "{status:#}");
    assert_eq!(
        recorded_sockets(&s.daemon, &s.ns)?,
        0,
        "no socket needed a record"
    );
    Ok(())
}

/// How many sockets the daemon's programs hold a getpeername record for: the used slots of its
/// `ORIGINAL_DEST` map, found through its connect4 program's maps.
pub fn recorded_sockets(daemon: &Daemon, ns: &NetNs) -> Result<usize> {
    use aya::maps::{Array, Map, MapData};
    for map_id in daemon.connect4(ns)?.map_ids()?.unwrap_or_default() {
        let map = MapData::from_id(map_id)?;
        if map.info()?.name_as_str() == Some(redirect_common::names::ORIGINAL_DEST) {
            let slots: Array<_, redirect_common::OriginalDest> = Array::try_from(Map::Array(map))?;
            return Ok(slots
                .iter()
                .filter(|slot| slot.as_ref().is_ok_and(|s| s.cookie != 0))
                .count());
        }
    }
    anyhow::bail!("connect4 has no ORIGINAL_DEST map")
}

/// The target tables are open-addressed arrays that the daemon fills and the programs probe
/// with the same code: with thousands of targets, many sit away from their home slot, and
/// every one must still be found by the kernel, and nothing else.
fn thousands_of_targets_each_redirected() -> Result<()> {
    const V4: u32 = 3_000;
    const V6: u32 = 500;
    let v4 = |i: u32| format!("10.1.{}.{}:80", i / 256, i % 256);
    let v6 = |i: u32| format!("[fd00:1::{:x}]:80", i + 1);
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    let targets: Vec<String> = (0..V4)
        .map(v4)
        .chain((0..V6).map(v6))
        .map(|t| format!("{t:?}"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "mock = \"ec2\"\ncgroups = [{:?}]\ntargets = [{}]\n",
            client.to_str().unwrap(),
            targets.join(", ")
        ),
    )?;
    let daemon = Daemon::start(&["--config", config.to_str().unwrap()], &ns, None)?;
    let status = daemon.status(&ns)?;
    let redirects = status["redirects"].as_array().context("redirects")?;
    assert_eq!(
        redirects.len(),
        (V4 + V6) as usize,
        "read back from the tables"
    );
    assert!(
        redirects
            .iter()
            .all(|r| r["to"] == "127.0.0.1:8169" || r["to"] == "[::ffff:127.0.0.1]:8169"),
        "more targets than dedicated ports: all share the listen port"
    );

    let sample = |n: u32| (0..n).step_by(61).chain([n - 1]);
    for addr in sample(V4).map(v4).chain(sample(V6).map(v6)) {
        let r = child_role(&client, &ns, "connect", &[&addr])?;
        assert_eq!(r["ok"], true, "{addr}: {r}");
        assert_eq!(r["peer"], addr, "getpeername shows what was dialled");
        assert_eq!(r["body"], INSTANCE_ID, "{addr}");
    }
    // Neighbours of targets are not targets: no route in this namespace.
    for addr in [
        "10.1.0.0:81".to_owned(),
        v4(V4),
        "169.254.169.254:80".to_owned(),
        "[fd00:1::1]:81".to_owned(),
        v6(V6),
    ] {
        let r = child_role(&client, &ns, "connect", &[&addr])?;
        assert_eq!(r["errno"], ENETUNREACH, "{addr}: {r}");
    }
    Ok(())
}

fn ipv6_listener() -> Result<()> {
    let s = mock_setup(&["--listen", "127.0.0.1:8169", "--listen", "[::1]:8170"])?;
    let status = s.daemon.status(&s.ns)?;
    let redirects = status["redirects"].as_array().context("redirects")?;
    assert!(
        redirects.contains(
            &serde_json::json!({"dialled": "[fd00:ec2::254]:80", "to": "[::1]:8171", "dedicated": true})
        ),
        "{redirects:?}"
    );
    let r = child_role(&s.client, &s.ns, "connect", &["[fd00:ec2::254]:80"])?;
    assert_eq!(
        (&r["peer"], &r["body"]),
        (&"[fd00:ec2::254]:80".into(), &INSTANCE_ID.into()),
        "{r}"
    );
    assert_eq!(
        curl(
            &s.client,
            &s.ns,
            &["-g"],
            "http://[fd00:ec2::254]/latest/meta-data/instance-id"
        )?,
        (200, INSTANCE_ID.to_owned())
    );
    Ok(())
}

fn ebpf_log_reports_rewrites() -> Result<()> {
    let s = mock_setup(&["--ebpf-log"])?;
    assert_eq!(
        curl(&s.client, &s.ns, &[], &url("/latest/meta-data/instance-id"))?.0,
        200
    );
    // The log line is written by the kernel program and read from its ring buffer by the
    // daemon, so it may arrive after the response.
    s.daemon
        .wait_for_log("connect4 169.254.169.254:80 -> 127.0.0.1:8170")
}
