//! The host's callers told apart: in the daemon's own network namespace every connection is
//! named by the kernel (sock_diag's cgroup of the peer socket, connect4's record of the
//! process), in the access log and in `redirect status`, and the config's `[[policy]]` rules
//! apply to a host cgroup as to a container's.

use anyhow::{Context as _, Result};

use super::{Daemon, INSTANCE_ID, NetNs, TestCgroup, command_in, support, url};

pub const TESTS: &[(&str, super::TestFn)] = &[(
    "host_processes_are_named_by_cgroup_and_pid_and_ruled_by_cgroup",
    host_processes_are_named_by_cgroup_and_pid_and_ruled_by_cgroup,
)];

/// The tests that drive Docker: kind `[docker]` (`--skip '[docker]'` leaves them out).
pub const DOCKER: &[(&str, super::TestFn)] = &[(
    "host_network_containers_are_named_and_ruled_by_their_labels",
    host_network_containers_are_named_and_ruled_by_their_labels,
)];

/// Runs curl in `cgroup` inside `ns`; returns its pid and what it printed: the body, then
/// the status.
fn curl_with_pid(cgroup: &std::path::Path, ns: &NetNs, url: &str) -> Result<(u32, String)> {
    let child = command_in("curl", Some(cgroup), Some(ns))?
        .args(["-sS", "--max-time", "20", "-w", " %{http_code}", url])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    Ok((pid, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn host_processes_are_named_by_cgroup_and_pid_and_ruled_by_cgroup() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let attached = cg.child("attached")?;
    let web = attached.join("web.service");
    let batch = attached.join("batch.service");
    std::fs::create_dir(&web)?;
    std::fs::create_dir(&batch)?;
    let outside = cg.child("outside")?;
    // As /proc/<pid>/cgroup prints them.
    let mount = support::cgroup2_mount()?;
    let name = |p: &std::path::Path| format!("/{}", p.strip_prefix(&mount).unwrap().display());
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    std::fs::write(
        &config,
        format!(
            "mock = \"ec2\"\n[[policy]]\ncgroup = \"{}\"\ndeny = true\n",
            name(&batch)
        ),
    )?;
    let daemon = Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--cgroup",
            attached.to_str().unwrap(),
        ],
        &ns,
        None,
    )?;
    let id = url("/latest/meta-data/instance-id");
    let warm_up = u64::from(
        daemon
            .log()
            .contains("cannot name a network namespace's cookie"),
    );
    if warm_up == 1 {
        // Before 5.14 the daemon learns its own namespace's cookie from the first rewrite
        // there, which it names without a pid: the pids are checked from the next one on.
        assert_eq!(super::curl(&web, &ns, &[], &id)?, (200, INSTANCE_ID.into()));
        daemon.wait_for_log("its callers' pids are recorded from now on")?;
    }
    let (web_pid, answer) = curl_with_pid(&web, &ns, &id)?;
    assert_eq!(answer, format!("{INSTANCE_ID} 200"));
    // IPv6 (the socket is AF_INET6, connected to the proxy's IPv4-mapped address).
    let (web6_pid, answer) = curl_with_pid(
        &web,
        &ns,
        "http://[fd00:ec2::254]/latest/meta-data/instance-id",
    )?;
    assert_eq!(answer, format!("{INSTANCE_ID} 200"));
    let (batch_pid, answer) = curl_with_pid(&batch, &ns, &id)?;
    assert!(
        answer.ends_with(" 403"),
        "the rule for its cgroup: {answer}"
    );
    // Not redirected: dials the proxy itself, from a cgroup without the programs. The kernel
    // still names its cgroup; no process was recorded for it.
    let direct = "http://127.0.0.1:8169/latest/meta-data/instance-id";
    let (_, answer) = curl_with_pid(&outside, &ns, direct)?;
    assert_eq!(answer, format!("{INSTANCE_ID} 200"));

    let web_line = format!(
        "host {} pid {web_pid} GET /latest/meta-data/instance-id 200",
        name(&web)
    );
    let batch_line = format!(
        "host {} pid {batch_pid} GET /latest/meta-data/instance-id 403",
        name(&batch)
    );
    let outside_line = format!(
        "host {} GET /latest/meta-data/instance-id 200",
        name(&outside)
    );
    let web6_line = format!(
        "host {} pid {web6_pid} GET /latest/meta-data/instance-id 200",
        name(&web)
    );
    // Each logged once its answer is out: the last one may still be on its way.
    for line in [&web_line, &web6_line, &batch_line, &outside_line] {
        daemon.wait_for_log(line)?;
    }

    let status = daemon.status(&ns)?;
    let callers = status["host_callers"].as_array().context("host_callers")?;
    let requests = |cgroup: &str| {
        callers
            .iter()
            .find(|c| c["cgroup"] == cgroup)
            .and_then(|c| c["requests"].as_u64())
    };
    assert_eq!(requests(&name(&web)), Some(2 + warm_up), "{callers:?}");
    assert_eq!(requests(&name(&batch)), Some(1), "{callers:?}");
    assert_eq!(requests(&name(&outside)), Some(1), "{callers:?}");
    assert_eq!(status["host_requests"], 4 + warm_up);
    let text = support::sh(
        command_in(super::DAEMON, None, Some(&ns))?
            .args(["status", "--control-socket"])
            .arg(&daemon.control_socket),
    )?;
    assert!(
        text.contains(&format!(
            "host  {} requests  host {}",
            2 + warm_up,
            name(&web)
        )),
        "{text}"
    );
    Ok(())
}

/// A container on the host's network shares the daemon's namespace: the kernel's cgroup of
/// its socket names it, Docker describes it, and its labels apply (it cannot escape its
/// `redirect.deny` by choosing `--network host`). The daemon runs in the host's namespace
/// here, so the containers dial its loopback listener directly, never a metadata address.
fn host_network_containers_are_named_and_ruled_by_their_labels() -> Result<()> {
    use support::docker::{CgroupParent, Image};
    let image = Image::import_with(&["curl"])?;
    let cg = TestCgroup::new()?;
    let parent = cg.child("docker")?;
    let cgroup_parent = CgroupParent::new(&parent)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_on_host(&[
        "--mock",
        "--listen",
        &listen,
        "--cgroup",
        parent.to_str().unwrap(),
    ])?;
    daemon.wait_for_log("Docker: following container starts")?;
    let get = |labels: &[&str]| -> Result<String> {
        let name = support::unique("redirect-test-ctr");
        let mut cmd = std::process::Command::new("docker");
        cmd.args(["run", "--rm", "--name", &name, "--network", "host"])
            .args(["--cgroup-parent", &cgroup_parent.relative]);
        for label in labels {
            cmd.args(["--label", label]);
        }
        let url = format!("http://{listen}/latest/meta-data/instance-id");
        let out = cmd
            .arg(&image.name)
            .args([
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-w",
                " %{http_code}",
                &url,
            ])
            .output()?;
        Ok(format!("{name} {}", String::from_utf8_lossy(&out.stdout)))
    };
    let served = get(&[])?;
    assert!(served.ends_with(&format!("{INSTANCE_ID} 200")), "{served}");
    let denied = get(&["redirect.deny=true"])?;
    assert!(denied.ends_with(" 403"), "{denied}\n{}", daemon.log());
    for answer in [&served, &denied] {
        let (name, _) = answer.split_once(' ').context("name")?;
        daemon.wait_for_log(&format!(
            "container {name} GET /latest/meta-data/instance-id"
        ))?;
    }
    Ok(())
}
