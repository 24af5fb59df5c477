//! The proxy's bounds, attacked the way a process in a covered cgroup could.

use super::*;

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "body_flood_keeps_memory_bounded",
        body_flood_keeps_memory_bounded,
    ),
    (
        "idle_flood_never_locks_a_new_caller_out",
        idle_flood_never_locks_a_new_caller_out,
    ),
    (
        "stalled_readers_are_closed_after_the_send_timeout",
        stalled_readers_are_closed_after_the_send_timeout,
    ),
    (
        "accept_failures_are_logged_once_and_recovered_from",
        accept_failures_are_logged_once_and_recovered_from,
    ),
    (
        "idle_connections_are_closed_after_the_idle_timeout",
        idle_connections_are_closed_after_the_idle_timeout,
    ),
];

/// Clients holding more connections than the daemon may have files open: its accepts fail
/// (EMFILE) and the connections wait in the listener's queue. The daemon says so once, not at
/// every retry, serves the connections it has, and accepts again once descriptors are free.
fn accept_failures_are_logged_once_and_recovered_from() -> Result<()> {
    // Without Docker: its reconnects would take and give back descriptors in the middle.
    let s = mock_setup(&["--docker", "off"])?;
    let pid = s.daemon.pid();
    // Room for a few connections beyond the descriptors the daemon has open now.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as libc::rlim_t;
    let limit = libc::rlimit {
        rlim_cur: open + 4,
        rlim_max: open + 4,
    };
    // SAFETY: prlimit on our own child, with a valid struct and no old-limit pointer.
    let set = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    ensure!(set == 0, "prlimit: {}", std::io::Error::last_os_error());
    let held = s.ns.run(|| {
        (0..16)
            .map(|_| TcpStream::connect("127.0.0.1:8169"))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    s.daemon
        .wait_for_log("cannot accept connections on 127.0.0.1:8169: Too many open files")?;
    // Long enough for five retries (50 + 100 + 200 + 400 + 800 ms of back-off).
    thread::sleep(std::time::Duration::from_millis(1600));
    let log = s.daemon.log();
    assert_eq!(log.matches("Too many open files").count(), 1, "{log}");
    // The first connection was accepted before the descriptors ran out, and is still served.
    let answer = get_instance_id(&held[0])?;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with(INSTANCE_ID),
        "{answer}"
    );

    drop(held);
    for url in [
        url("/latest/meta-data/instance-id"),
        "http://127.0.0.1:8169/latest/meta-data/instance-id".to_owned(),
    ] {
        let (code, body) = curl(&s.client, &s.ns, &[], &url)?;
        assert_eq!((code, body.as_str()), (200, INSTANCE_ID), "{url}");
    }
    s.daemon
        .wait_for_log("accepting connections on 127.0.0.1:8169 again, after")
}

/// A keep-alive connection left idle is closed by the daemon (a FIN: the read sees the end)
/// once `--idle-timeout` has passed, and not before; a real client's connection pool
/// (urllib3, under boto3) notices and opens a new connection for its next request.
fn idle_connections_are_closed_after_the_idle_timeout() -> Result<()> {
    let python = test_python()?;
    let s = mock_setup(&["--idle-timeout", "1s"])?;
    // Closed at the latest 1 s (the sweep's period) and one clock tick after the timeout.
    let script = r#"
import json, time, urllib3
pool = urllib3.HTTPConnectionPool("169.254.169.254", 80, maxsize=1, retries=False)
first = pool.request("GET", "/latest/meta-data/instance-id")
time.sleep(3.5)
second = pool.request("GET", "/latest/meta-data/instance-id")
print(json.dumps({"statuses": [first.status, second.status], "body": second.data.decode()}))
"#;
    let out = sh(command_in(&python, Some(&s.client), Some(&s.ns))?.args(["-c", script]))?;
    let got: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    assert_eq!(got["statuses"], serde_json::json!([200, 200]), "{got}");
    assert_eq!(got["body"], INSTANCE_ID, "{got}");
    // urllib3 reconnects through the same connection object; the daemon counts the accepts.
    let status = s.daemon.status(&s.ns)?;
    assert_eq!(
        status["proxy"]["connections_total"], 2,
        "the idle connection was closed: {status:#}"
    );

    let (status, idle_for) = s.ns.run(|| -> Result<(String, std::time::Duration)> {
        let mut c = TcpStream::connect("127.0.0.1:8169")?;
        let answer = get_instance_id(&c)?;
        let idle_from = std::time::Instant::now();
        let status = answer.lines().next().unwrap_or_default().to_owned();
        // Blocks until the daemon closes the connection (the timeout only guards a hang).
        let end = c.read(&mut [0; 1024])?;
        ensure!(end == 0, "expected the end of the stream, got {end} bytes");
        Ok((status, idle_from.elapsed()))
    })??;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        idle_for >= std::time::Duration::from_secs(1),
        "closed after {idle_for:?}"
    );
    // The connection's task ends right after the shutdown that the client saw.
    for _ in 0..100 {
        let status = s.daemon.status(&s.ns)?;
        if status["proxy"]["connections_open"] == 0 {
            return Ok(());
        }
        thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!("the closed connection is still counted as open")
}

/// A daemon's peak memory may not pass this, whatever its callers send (the issue's bound).
const MAX_PEAK_KB: u64 = 150 * 1024;

/// Runs the `flood` role (`n` connections, each sending a `size`-byte body at once) from
/// `client` against the redirect while an ordinary request is made through it; returns the
/// statuses the flood got and what the ordinary request got.
fn flood_while_serving(
    daemon: &Daemon,
    client: &Path,
    ns: &NetNs,
    n: usize,
    size: usize,
) -> Result<(serde_json::Map<String, serde_json::Value>, (u16, String))> {
    let flood = command_in(std::env::current_exe()?, Some(client), Some(ns))?
        .env(child::ROLE_ENV, "flood")
        .args(["169.254.169.254:80", &n.to_string(), &size.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let flood = support::ChildGuard(Some(flood));
    // Ask once the flood is under way (the limit only guards a flood that never starts).
    for _ in 0..400 {
        if daemon.status(ns)?["proxy"]["connections_total"].as_u64() >= Some(n as u64 / 4) {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(25));
    }
    let answered = curl(client, ns, &[], &url("/latest/meta-data/instance-id"))?;
    let out = flood.wait_with_output()?;
    let got: serde_json::Value = serde_json::from_slice(&out)?;
    let statuses = got["statuses"].as_object().context("statuses")?.clone();
    Ok((statuses, answered))
}

/// 1,000 callers each sending a 1 MB body at once. The mock takes no body: 413 from the
/// declared length, nothing read into memory. A forwarding daemon that takes bodies up to
/// 1 MiB buffers them within its shared budget and answers 503 beyond it. Either way its
/// peak memory stays under 150 MB, and an ordinary request is answered meanwhile.
fn body_flood_keeps_memory_bounded() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let client_arg = client.to_str().unwrap();
    {
        let daemon = Daemon::start(&["--mock", "--cgroup", client_arg], &ns, None)?;
        let (statuses, answered) =
            flood_while_serving(&daemon, &client, &ns, 1000, 1_000_000).context("the mock")?;
        assert_eq!(answered, (200, INSTANCE_ID.to_owned()));
        // Every body refused; a connection whose client was still sending when the
        // lingering close gave up may end without its answer.
        assert!(
            statuses.keys().all(|s| s == "413" || s == "none"),
            "{statuses:?}"
        );
        assert!(statuses.contains_key("413"), "{statuses:?}");
        let peak = daemon.memory_kb("VmHWM:")?;
        assert!(peak < MAX_PEAK_KB, "peak {peak} kB");
    }
    let _upstream = upstream::StandIn::start(&ns, "127.0.0.1:9080".parse()?, false)?;
    let daemon = Daemon::start(
        &[
            "--upstream",
            "http://127.0.0.1:9080",
            "--max-request-body",
            "1MiB",
            // What is measured is memory: a body slower than the read timeout (1,000 of them
            // at once in an emulated guest) would be a 408, which says nothing of it.
            "--request-read-timeout",
            "60s",
            "--cgroup",
            client_arg,
        ],
        &ns,
        None,
    )?;
    let (statuses, answered) =
        flood_while_serving(&daemon, &client, &ns, 1000, 1_000_000).context("forwarding")?;
    assert_eq!(
        answered,
        (200, "upstream:/latest/meta-data/instance-id".to_owned())
    );
    assert!(
        statuses
            .keys()
            .all(|s| ["200", "503", "none"].contains(&s.as_str())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains_key("200"),
        "bodies within the budget go through: {statuses:?}"
    );
    let peak = daemon.memory_kb("VmHWM:")?;
    assert!(peak < MAX_PEAK_KB, "peak {peak} kB");
    Ok(())
}

/// Idle connections far beyond what the daemon's descriptors allow: the daemon derives its
/// connection limit from its RLIMIT_NOFILE, closes the longest-idle connection for each new
/// one, never runs out of descriptors, and a new caller is served.
fn idle_flood_never_locks_a_new_caller_out() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let daemon = Daemon::start_with(
        &["--mock", "--cgroup", client.to_str().unwrap()],
        &ns,
        None,
        "info,redirect=debug",
        |cmd| support::limit_nofile(cmd, 256),
    )?;
    let limit = daemon.status(&ns)?["proxy"]["max_connections"]
        .as_u64()
        .context("max_connections")?;
    assert!((1..256).contains(&limit), "limit {limit}");
    let (flood, line) = support::ChildGuard::first_line(
        command_in(std::env::current_exe()?, Some(&client), Some(&ns))?
            .env(child::ROLE_ENV, "idle-flood")
            .args(["169.254.169.254:80", "600"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?,
    )?;
    assert_eq!(line.trim(), r#"{"opened":600}"#);
    // Connected is not yet accepted: wait until the daemon has taken them all (the limit
    // only turns a daemon that never does into a failure instead of a hung test).
    for _ in 0..400 {
        if daemon.status(&ns)?["proxy"]["connections_total"].as_u64() >= Some(600) {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(25));
    }
    for _ in 0..3 {
        assert_eq!(
            curl(&client, &ns, &[], &url("/latest/meta-data/instance-id"))?,
            (200, INSTANCE_ID.to_owned())
        );
    }
    let status = daemon.status(&ns)?;
    let proxy = &status["proxy"];
    assert!(proxy["connections_open"].as_u64() <= Some(limit), "{proxy}");
    assert!(
        proxy["connections_evicted"].as_u64() >= Some(600 - limit),
        "{proxy}"
    );
    drop(flood);
    let log = daemon.log();
    assert!(!log.contains("Too many open files"), "{log}");
    Ok(())
}

/// A caller that asks for a large answer and then stops reading is disconnected once the
/// daemon's writes have made no progress for `--send-timeout`, and not before.
fn stalled_readers_are_closed_after_the_send_timeout() -> Result<()> {
    const USER_DATA: usize = 8 << 20;
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let config = support::user_data_config(dir.path(), USER_DATA)?;
    let daemon = Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--send-timeout",
            "1s",
            "--cgroup",
            client.to_str().unwrap(),
        ],
        &ns,
        None,
    )?;
    let mut stalled = ns.run(|| TcpStream::connect("127.0.0.1:8169"))??;
    stalled.write_all(b"GET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let asked = std::time::Instant::now();
    let mut open = true;
    for _ in 0..1200 {
        open = daemon.status(&ns)?["proxy"]["connections_open"] != 0;
        if !open {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(!open, "the stalled reader is still connected");
    let closed_after = asked.elapsed();
    assert!(
        closed_after >= std::time::Duration::from_secs(1),
        "{closed_after:?}"
    );
    let mut got = Vec::new();
    let _ = stalled.read_to_end(&mut got);
    assert!(
        got.len() < USER_DATA,
        "the answer was cut off: {} bytes",
        got.len()
    );
    Ok(())
}
