//! Processes in network namespaces of their own: a veth namespace and an unchanged Docker container.

use super::*;

pub const TESTS: &[(&str, TestFn)] = &[(
    "container_in_its_own_netns_behind_a_veth",
    container_in_its_own_netns_behind_a_veth,
)];

/// The tests that drive Docker: kind `[docker]` (`--skip '[docker]'` leaves them out).
pub const DOCKER: &[(&str, TestFn)] = &[("docker_container_unchanged", docker_container_unchanged)];

fn container_in_its_own_netns_behind_a_veth() -> Result<()> {
    let host = NetNs::new()?;
    let container = NetNs::new()?;
    veth(&host, "10.200.0.1/24", &container, "10.200.0.2/24")?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let other = cg.child("other")?;
    let daemon = Daemon::start(
        &[
            "--mock",
            "--cgroup",
            client.to_str().unwrap(),
            "--listen",
            "10.200.0.1:8169",
        ],
        &host,
        None,
    )?;
    assert_eq!(
        curl(
            &client,
            &container,
            &[],
            &url("/latest/meta-data/instance-id")
        )?,
        (200, INSTANCE_ID.to_owned())
    );
    let r = child_role(&client, &container, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["peer"], "169.254.169.254:80", "{r}");
    let r = child_role(&other, &container, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["errno"], ENETUNREACH, "{r}");
    let status = daemon.status(&host)?;
    assert_eq!(status["listen"][0], "10.200.0.1:8169");
    Ok(())
}

/// The developer's case: an unmodified Docker container, no NET_ADMIN, no iptables. The
/// daemon attaches to the container's own cgroup, given as /proc/PID/cgroup prints it.
fn docker_container_unchanged() -> Result<()> {
    use support::docker::{Container, Image};
    let image = Image::import_with(&["curl", "sleep"])?;
    let container = Container::run(&image, &["sleep", "600"])?;
    let host = NetNs::new()?;
    support::veth_to(
        &host,
        "10.201.0.1/24",
        &container.netns_path(),
        "10.201.0.2/24",
    )?;
    let cgroup = container.cgroup()?;
    let mut daemon = Daemon::start(
        &["--mock", "--cgroup", &cgroup, "--listen", "10.201.0.1:8169"],
        &host,
        None,
    )?;
    assert_eq!(container.exec(&CURL_ID)?, (true, INSTANCE_ID.to_owned()));
    assert_eq!(daemon.stop(libc::SIGTERM)?.code(), Some(0));
    let (ok, out) = container.exec(&CURL_ID)?;
    assert!(!ok && out.contains("Couldn't connect"), "after stop: {out}");
    Ok(())
}
