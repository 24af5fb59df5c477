//! Callers in network namespaces of their own, with the default loopback listen address: the
//! daemon listens inside each namespace (see `netns`). Found by the scan at start, by
//! Docker's events, or by the kernel's report of a rewrite from a namespace not served yet.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::fs::MetadataExt as _,
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use super::{
    CURL_ID, Daemon, INSTANCE_ID, MockSetup, NetNs, TestCgroup, child_role, command_in, curl,
    mock_setup, support, url,
};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "a_namespace_that_exists_at_start_is_served_first_try",
        a_namespace_that_exists_at_start_is_served_first_try,
    ),
    (
        "a_namespace_made_later_is_served_from_its_second_connect",
        a_namespace_made_later_is_served_from_its_second_connect,
    ),
    (
        "namespaces_that_empty_close_their_listeners",
        namespaces_that_empty_close_their_listeners,
    ),
    (
        "a_port_taken_inside_a_namespace_is_named_and_left_to_its_owner",
        a_port_taken_inside_a_namespace_is_named_and_left_to_its_owner,
    ),
    (
        "namespaces_beyond_max_namespaces_wait_for_room",
        namespaces_beyond_max_namespaces_wait_for_room,
    ),
    (
        "one_namespace_cannot_take_the_connections_of_the_others",
        one_namespace_cannot_take_the_connections_of_the_others,
    ),
    (
        "a_caller_gone_mid_request_is_a_closed_connection",
        a_caller_gone_mid_request_is_a_closed_connection,
    ),
    (
        "ten_thousand_namespaces_come_and_go_without_a_leak",
        ten_thousand_namespaces_come_and_go_without_a_leak,
    ),
];

/// The tests that drive Docker: kind `[docker]` (`--skip '[docker]'` leaves them out).
pub const DOCKER: &[(&str, super::TestFn)] = &[
    (
        "macvlan_containers_are_served",
        macvlan_containers_are_served,
    ),
    (
        "docker_going_away_and_back_keeps_serving_and_fails_closed",
        docker_going_away_and_back_keeps_serving_and_fails_closed,
    ),
    (
        "docker_containers_are_served_from_their_first_command",
        docker_containers_are_served_from_their_first_command,
    ),
];

/// `net:[inode]` of a namespace file, as the daemon names namespaces.
fn netns_name(path: &Path) -> Result<String> {
    Ok(format!("net:[{}]", std::fs::metadata(path)?.ino()))
}

/// A process that keeps `ns` in use (a namespace without processes is not served).
pub fn resident(cgroup: &Path, ns: &NetNs) -> Result<support::ChildGuard> {
    let child = command_in("sleep", Some(cgroup), Some(ns))?
        .arg("600")
        .spawn()?;
    Ok(support::ChildGuard(Some(child)))
}

/// Descriptors the daemon holds now.
fn open_fds(daemon: &Daemon) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))?.count())
}

/// Waits until the daemon has logged `needle` at least `n` times.
fn wait_for_count(daemon: &Daemon, needle: &str, n: usize) -> Result<()> {
    for _ in 0..200 {
        if daemon.log().matches(needle).count() >= n {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{needle:?} not logged {n} times:\n{}", daemon.log())
}

/// The status entry of the namespace named `name`.
fn namespace(status: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    status["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["netns"] == name)
        .cloned()
}

/// A namespace with a process in an attached cgroup before the daemon starts: its first
/// connect is answered, on the default listen address, and the request is counted and logged
/// under that namespace.
fn a_namespace_that_exists_at_start_is_served_first_try() -> Result<()> {
    let (host, app) = (NetNs::new()?, NetNs::new()?);
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let _resident = resident(&client, &app)?;
    let daemon = Daemon::start(
        &["--mock", "--cgroup", client.to_str().unwrap()],
        &host,
        None,
    )?;
    let answer = curl(&client, &app, &[], &url("/latest/meta-data/instance-id"))?;
    assert_eq!(answer, (200, INSTANCE_ID.to_owned()));
    let status = daemon.status(&host)?;
    let name = netns_name(&app.path())?;
    let entry = namespace(&status, &name).with_context(|| format!("{name} in {status}"))?;
    assert_eq!(entry["requests"], 1, "{entry}");
    assert_eq!(entry["listening"][0], "127.0.0.1:8170", "{entry}");
    // Before 5.14 the daemon cannot ask a namespace's cookie: the kernel reports the first
    // rewrite there (answered all the same), which tells it.
    let learnt = daemon
        .log()
        .contains("cannot name a network namespace's cookie");
    assert_eq!(
        status["counters"]["netns_unserved"],
        u64::from(learnt),
        "{status}"
    );
    // The access log names the caller's namespace (its line may still be on its way).
    daemon.wait_for_log(&format!("{name} (cgroup /"))?;
    daemon.wait_for_log("GET /latest/meta-data/instance-id 200")?;
    Ok(())
}

/// A namespace made after the start by something that is not Docker (`ip netns`): the kernel
/// reports the first rewritten connect from it, which is refused, and the daemon listens there
/// for the next ones.
fn a_namespace_made_later_is_served_from_its_second_connect() -> Result<()> {
    // Bound in this order, dropped in reverse: the daemon stops before its cgroup and namespace.
    let MockSetup {
        ns: host,
        cg: _cg,
        client,
        daemon,
        ..
    } = mock_setup(&[])?;
    let app = NetNs::new()?;
    let _resident = resident(&client, &app)?;
    let first = child_role(&client, &app, "connect", &["169.254.169.254:80"])?;
    assert_eq!(first["errno"], libc::ECONNREFUSED as i64, "{first}");
    let name = netns_name(&app.path())?;
    daemon.wait_for_log(&format!("listening in network namespace {name}"))?;
    let answer = curl(&client, &app, &[], &url("/latest/meta-data/instance-id"))?;
    assert_eq!(answer, (200, INSTANCE_ID.to_owned()));
    let status = daemon.status(&host)?;
    assert!(
        status["counters"]["netns_unserved"].as_u64() >= Some(1),
        "{status}"
    );
    Ok(())
}

/// Namespaces come and go; once a namespace has no processes, its listeners are closed (they
/// would keep it alive), and the daemon holds no more descriptors than before.
fn namespaces_that_empty_close_their_listeners() -> Result<()> {
    const ROUNDS: usize = 20;
    let MockSetup {
        ns: host,
        cg: _cg,
        client,
        daemon,
        ..
    } = mock_setup(&["--docker", "off"])?;
    let fds = || open_fds(&daemon);
    let before = fds()?;
    for round in 1..=ROUNDS {
        let app = NetNs::new()?;
        let resident = resident(&client, &app)?;
        child_role(&client, &app, "connect", &["169.254.169.254:80"])?;
        wait_for_count(&daemon, "listening in network namespace", round)?;
        let answer = curl(&client, &app, &[], &url("/latest/meta-data/instance-id"))?;
        assert_eq!(answer, (200, INSTANCE_ID.to_owned()), "round {round}");
        drop(resident);
    }
    wait_for_count(
        &daemon,
        "has no processes left: closed its listeners",
        ROUNDS,
    )?;
    let status = daemon.status(&host)?;
    assert_eq!(
        status["namespaces"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    // The listeners' accept loops let go of them at the next turn of their worker.
    for _ in 0..100 {
        if fds()? <= before {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("descriptors: {before} before, {} after", fds()?)
}

/// A program inside the namespace already listens on the daemon's endpoint: the daemon says
/// so, and that program gets the namespace's own connects (never anyone else's).
fn a_port_taken_inside_a_namespace_is_named_and_left_to_its_owner() -> Result<()> {
    let MockSetup {
        ns: host,
        cg: _cg,
        client,
        daemon,
        ..
    } = mock_setup(&[])?;
    let app = NetNs::new()?;
    let _resident = resident(&client, &app)?;
    let squatter = app.run(|| TcpListener::bind("127.0.0.1:8170"))??;
    let accepting = squatter.try_clone()?; // the port stays taken after the owner's answer
    let owner = thread::spawn(move || -> std::io::Result<()> {
        for stream in accepting.incoming().take(1) {
            let mut stream = stream?;
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head)?;
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nowner")?;
        }
        Ok(())
    });
    let r = child_role(&client, &app, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["body"], "owner", "{r}");
    owner
        .join()
        .map_err(|_| anyhow::anyhow!("owner thread"))??;
    daemon.wait_for_log("something there already listens on 127.0.0.1:8170")?;
    let status = daemon.status(&host)?;
    let name = netns_name(&app.path())?;
    let entry = namespace(&status, &name).with_context(|| format!("{name} in {status}"))?;
    assert_eq!(
        entry["listening"],
        serde_json::json!(["127.0.0.1:8171"]),
        "{entry}"
    );
    Ok(())
}

/// Anyone allowed to make network namespaces could make the daemon open listeners without
/// end: past `--max-namespaces` a new namespace is refused with one warning, and served once
/// another is gone.
fn namespaces_beyond_max_namespaces_wait_for_room() -> Result<()> {
    let MockSetup {
        ns: _host,
        cg: _cg,
        client,
        daemon,
        ..
    } = mock_setup(&["--docker", "off", "--max-namespaces", "2"])?;
    let spaces = [NetNs::new()?, NetNs::new()?, NetNs::new()?];
    let mut residents: Vec<_> = spaces
        .iter()
        .map(|ns| resident(&client, ns).map(Some))
        .collect::<Result<_>>()?;
    for (i, ns) in spaces.iter().enumerate() {
        child_role(&client, ns, "connect", &["169.254.169.254:80"])?;
        if i < 2 {
            wait_for_count(&daemon, "listening in network namespace", i + 1)?;
        }
    }
    daemon.wait_for_log("2 network namespaces served already (max_namespaces)")?;
    let third = curl_status(&client, &spaces[2])?;
    assert_ne!(third, 200, "the third namespace is not served yet");
    residents[0] = None; // the first one empties: room for the third
    wait_for_count(&daemon, "has no processes left", 1)?;
    child_role(&client, &spaces[2], "connect", &["169.254.169.254:80"])?;
    wait_for_count(&daemon, "listening in network namespace", 3)?;
    let answer = curl(
        &client,
        &spaces[2],
        &[],
        &url("/latest/meta-data/instance-id"),
    )?;
    assert_eq!(answer, (200, INSTANCE_ID.to_owned()));
    Ok(())
}

/// curl's status for the instance id from `ns` (0: no connection).
fn curl_status(cgroup: &Path, ns: &NetNs) -> Result<u16> {
    let out = command_in("curl", Some(cgroup), Some(ns))?
        .args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(url("/latest/meta-data/instance-id"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

/// A caller holding its share of the connections (a quarter of `--max-connections`, at least
/// 16) gets 503 on more, while another namespace is served as before.
fn one_namespace_cannot_take_the_connections_of_the_others() -> Result<()> {
    const SHARE: usize = 16; // of 64
    let MockSetup {
        ns: _host,
        cg: _cg,
        client,
        daemon,
        ..
    } = mock_setup(&["--max-connections", "64"])?;
    let (greedy, other) = (NetNs::new()?, NetNs::new()?);
    let _residents = (resident(&client, &greedy)?, resident(&client, &other)?);
    for ns in [&greedy, &other] {
        child_role(&client, ns, "connect", &["169.254.169.254:80"])?;
    }
    wait_for_count(&daemon, "listening in network namespace", 2)?;
    // Keep-alive connections made straight to the endpoint inside `greedy`: its listener
    // counts them as `greedy`'s, however they were dialled.
    let held = greedy.run(|| {
        (0..SHARE)
            .map(|_| {
                let c = std::net::TcpStream::connect("127.0.0.1:8170")?;
                super::get_instance_id(&c).map(|answer| (c, answer))
            })
            .collect::<Result<Vec<_>>>()
    })??;
    assert!(held.iter().all(|(_, a)| a.starts_with("HTTP/1.1 200")));
    let beyond = greedy.run(|| {
        let c = std::net::TcpStream::connect("127.0.0.1:8170")?;
        super::get_instance_id(&c)
    })??;
    assert!(beyond.starts_with("HTTP/1.1 503"), "{beyond}");
    let answer = curl(&client, &other, &[], &url("/latest/meta-data/instance-id"))?;
    assert_eq!(
        answer,
        (200, INSTANCE_ID.to_owned()),
        "the other namespace is served"
    );
    drop(held);
    let mut again = (0, String::new());
    for _ in 0..50 {
        again = curl(&client, &greedy, &[], &url("/latest/meta-data/instance-id"))?;
        if again.0 == 200 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        again,
        (200, INSTANCE_ID.to_owned()),
        "served again once it lets go"
    );
    Ok(())
}

/// Unchanged Docker containers with `--network none`, the daemon on its default loopback
/// address: one running before the daemon starts, and 20 whose very first command fetches
/// from the metadata address, each answered first try. Callers are named by their container.
fn docker_containers_are_served_from_their_first_command() -> Result<()> {
    use support::docker::{CgroupParent, Container, Image, run_once};
    let image = Image::import_with(&["curl", "sleep"])?;
    let host = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let parent = cg.child("docker")?;
    let cgroup_parent = CgroupParent::new(&parent)?;
    let in_parent = ["--cgroup-parent", cgroup_parent.relative.as_str()];
    let labels = [
        "--label",
        "com.docker.compose.project=demo",
        "--label",
        "com.docker.compose.service=app",
    ];
    let before = Container::run_with(
        &image,
        &[&in_parent[..], &labels[..]].concat(),
        &["sleep", "600"],
    )?;
    let daemon = Daemon::start(
        &["--mock", "--cgroup", parent.to_str().unwrap()],
        &host,
        None,
    )?;
    daemon.wait_for_log("Docker: following container starts")?;
    assert_eq!(before.exec(&CURL_ID)?, (true, INSTANCE_ID.to_owned()));
    let mut answered = 0;
    let mut failures = Vec::new();
    for _ in 0..20 {
        let out = run_once(&image, &in_parent, &CURL_ID)?;
        if out == INSTANCE_ID {
            answered += 1;
        } else {
            failures.push(out);
        }
    }
    assert_eq!(answered, 20, "answered first try: {failures:?}");
    let status = daemon.status(&host)?;
    let name = netns_name(&before.netns_path())?;
    let entry = namespace(&status, &name).with_context(|| format!("{name} in {status}"))?;
    assert_eq!(entry["container"]["name"], before.name.as_str(), "{entry}");
    let caller = format!("container demo/app ({})", before.name);
    assert_eq!(entry["caller"], caller.as_str(), "{entry}");
    assert_eq!(entry["requests"], 1, "{entry}");
    daemon.wait_for_log(&format!("{caller} GET /latest/meta-data/instance-id 200"))?;
    drop(before);
    Ok(())
}

/// The Docker engine going away and coming back (a relay of its socket, cut and restored):
/// containers already described are served throughout; one started meanwhile is refused
/// until Docker describes it (its labels may deny it), never served without them; after the
/// daemon reconnects, new containers get their labels' policy again.
fn docker_going_away_and_back_keeps_serving_and_fails_closed() -> Result<()> {
    use support::docker::{CgroupParent, Container, Image, SocketRelay, run_once};
    let image = Image::import_with(&["curl", "sleep"])?;
    let host = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let parent = cg.child("docker")?;
    let cgroup_parent = CgroupParent::new(&parent)?;
    let in_parent = ["--cgroup-parent", cgroup_parent.relative.as_str()];
    let denied = [&in_parent[..], &["--label", "redirect.deny=true"]].concat();
    let mut relay = SocketRelay::start()?;
    let docker = format!("unix://{}", relay.path.display());
    let daemon = Daemon::start(
        &[
            "--mock",
            "--cgroup",
            parent.to_str().unwrap(),
            "--docker",
            &docker,
        ],
        &host,
        None,
    )?;
    daemon.wait_for_log("Docker: following container starts")?;
    let running = Container::run_with(&image, &in_parent, &["sleep", "600"])?;
    assert_eq!(running.exec(&CURL_ID)?, (true, INSTANCE_ID.to_owned()));
    relay.cut();
    daemon.wait_for_log("reconnecting every")?;
    assert_eq!(
        running.exec(&CURL_ID)?,
        (true, INSTANCE_ID.to_owned()),
        "described before: served while Docker is away"
    );
    let meanwhile = run_once(&image, &in_parent, &CURL_ID)?;
    assert!(meanwhile.contains("403 - Forbidden"), "{meanwhile}");
    relay.restore()?;
    wait_for_count(&daemon, "Docker: following container starts", 2)?;
    assert_eq!(run_once(&image, &in_parent, &CURL_ID)?, INSTANCE_ID);
    let out = run_once(&image, &denied, &CURL_ID)?;
    assert!(out.contains("403 - Forbidden"), "labels apply again: {out}");
    let log = daemon.log();
    ensure!(
        log.contains("Docker did not describe the container in time"),
        "{log}"
    );
    Ok(())
}

/// A container on a macvlan network (its parent a veth into a namespace of the test's: no way
/// out) is served like any other: the redirect never leaves its namespace, whatever its
/// interfaces.
fn macvlan_containers_are_served() -> Result<()> {
    use support::docker::{CgroupParent, Image, MacvlanNetwork};
    let image = Image::import_with(&["curl"])?;
    let host = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let parent = cg.child("docker")?;
    let cgroup_parent = CgroupParent::new(&parent)?;
    let far = NetNs::new()?;
    let network = MacvlanNetwork::new(&far)?;
    let _daemon = Daemon::start(
        &["--mock", "--cgroup", parent.to_str().unwrap()],
        &host,
        None,
    )?;
    let name = support::unique("redirect-test-ctr");
    let out = support::sh(
        std::process::Command::new("docker")
            .args(["run", "--rm", "--name", &name, "--network", &network.name])
            .args(["--cgroup-parent", &cgroup_parent.relative])
            .arg(&image.name)
            .args(CURL_ID),
    )?;
    assert_eq!(out, INSTANCE_ID);
    Ok(())
}

/// 10,000 namespaces, each made by a process that connects until served and exits (as many
/// container starts and stops, without Docker's cost): each is served, its listeners close
/// after it, and the daemon ends with no more descriptors, and no more served namespaces,
/// than it began with.
fn ten_thousand_namespaces_come_and_go_without_a_leak() -> Result<()> {
    const COUNT: usize = 10_000;
    let MockSetup {
        ns: host,
        cg: _cg,
        client,
        daemon,
        ..
    } = mock_setup(&["--docker", "off"])?;
    let fds = || open_fds(&daemon);
    let before = fds()?;
    let churned = child_role(&client, &host, "churn", &[&COUNT.to_string(), "8"])?;
    let warnings: Vec<String> = daemon
        .log()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_owned)
        .collect();
    assert_eq!(churned["served"], COUNT, "{churned}\n{warnings:#?}");
    // Closed as they go: never near `--max-namespaces` (8,192) with 8 alive at a time.
    assert!(
        !warnings.iter().any(|w| w.contains("max_namespaces")),
        "{warnings:#?}"
    );
    for _ in 0..200 {
        let status = daemon.status(&host)?;
        if status["namespaces"].as_array().is_some_and(Vec::is_empty) && fds()? <= before {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    let status = daemon.status(&host)?;
    anyhow::bail!(
        "descriptors: {before} before, {} after; {} namespaces still served",
        fds()?,
        status["namespaces"].as_array().map_or(0, Vec::len)
    )
}

/// A caller killed in the middle of its request, its namespace gone with it: the connection
/// closes, its namespace's listeners close, nothing is logged as an error, and the next
/// namespace is served as before.
fn a_caller_gone_mid_request_is_a_closed_connection() -> Result<()> {
    let MockSetup {
        ns: host,
        cg: _cg,
        client,
        daemon,
        ..
    } = mock_setup(&["--docker", "off"])?;
    let app = NetNs::new()?;
    let app_resident = resident(&client, &app)?;
    child_role(&client, &app, "connect", &["169.254.169.254:80"])?;
    wait_for_count(&daemon, "listening in network namespace", 1)?;
    let (holder, line) = support::ChildGuard::first_line(
        command_in(std::env::current_exe()?, Some(&client), Some(&app))?
            .env(super::child::ROLE_ENV, "hold")
            .arg("169.254.169.254:80")
            .stdout(std::process::Stdio::piped())
            .spawn()?,
    )?;
    assert_eq!(line.trim(), r#"{"sent":true}"#);
    let open = || -> Result<u64> {
        Ok(daemon.status(&host)?["proxy"]["connections_open"]
            .as_u64()
            .unwrap_or(0))
    };
    for _ in 0..200 {
        if open()? == 1 {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(open()?, 1, "the half-sent request's connection");
    drop(holder);
    drop(app_resident);
    drop(app);
    wait_for_count(&daemon, "has no processes left: closed its listeners", 1)?;
    for _ in 0..200 {
        if open()? == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(open()?, 0, "closed with its caller");
    let next = NetNs::new()?;
    let _next_resident = resident(&client, &next)?;
    child_role(&client, &next, "connect", &["169.254.169.254:80"])?;
    wait_for_count(&daemon, "listening in network namespace", 2)?;
    let answer = curl(&client, &next, &[], &url("/latest/meta-data/instance-id"))?;
    assert_eq!(answer, (200, INSTANCE_ID.to_owned()));
    let log = daemon.log();
    ensure!(!log.contains("ERROR") && !log.contains("panicked"), "{log}");
    Ok(())
}
