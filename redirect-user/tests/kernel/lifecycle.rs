//! The daemon's life: signals (stop, reload, ignored), a second daemon, a panic.

use super::*;

pub const TESTS: &[(&str, TestFn)] = &[
    ("sigterm_leaves_the_redirect_pinned_and_exits_0", || {
        stop_fails_closed(libc::SIGTERM)
    }),
    ("sigint_leaves_the_redirect_pinned_and_exits_0", || {
        stop_fails_closed(libc::SIGINT)
    }),
    ("sigkill_leaves_the_redirect_pinned", || {
        stop_fails_closed(libc::SIGKILL)
    }),
    (
        "sigkill_under_load_never_reaches_the_real_service",
        sigkill_under_load_never_reaches_the_real_service,
    ),
    ("fail_open_sigterm_leaves_nothing_attached", || {
        fail_open_leaves_nothing(libc::SIGTERM)
    }),
    ("fail_open_sigkill_leaves_nothing_attached", || {
        fail_open_leaves_nothing(libc::SIGKILL)
    }),
    (
        "sighup_reloads_the_mock_and_never_kills",
        sighup_reloads_the_mock_and_never_kills,
    ),
    (
        "a_second_daemon_on_the_same_listen_address_fails",
        a_second_daemon_on_the_same_listen_address_fails,
    ),
    (
        "a_panic_stops_the_daemon_with_a_non_zero_exit",
        a_panic_stops_the_daemon_with_a_non_zero_exit,
    ),
];

const ECONNREFUSED: i64 = libc::ECONNREFUSED as i64;

/// Our programs on `cg`, as bpftool lists them.
fn ours(cg: &Path) -> Result<Vec<String>> {
    Ok(attached_programs(cg)?
        .into_iter()
        .filter(|(_, name)| name.starts_with("redirect_"))
        .map(|(kind, name)| format!("{kind} {name}"))
        .collect())
}

/// However the daemon stops, its programs stay attached through their pins: covered callers
/// are refused, never sent on to the real service; `redirect status` says so; the next daemon
/// adopts the pins and serves; `redirect detach` removes them (refused while a daemon
/// serves them, a no-op when nothing is pinned).
fn stop_fails_closed(signal: libc::c_int) -> Result<()> {
    let pins = support::PinDirGuard::new();
    let state = tempfile::tempdir()?;
    let state_arg = state.path().to_str().unwrap();
    let pin_args = ["--pin-dir", pins.arg(), "--state-dir", state_arg];
    let mut s = mock_setup(&pin_args)?;
    assert_eq!(ours(&s.client)?.len(), 5, "four hooks and the escape guard");
    let put = ["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 600")];
    let (code, token) = curl(&s.client, &s.ns, &put, &url("/latest/api/token"))?;
    assert_eq!(code, 200);
    let status = s.daemon.stop(signal)?;
    if signal == libc::SIGKILL {
        assert!(!status.success());
    } else {
        assert_eq!(status.code(), Some(0), "log:\n{}", s.daemon.log());
        s.daemon.assert_logged("left 5 program links pinned in");
    }
    assert_eq!(ours(&s.client)?.len(), 5, "still attached: fail closed");
    let r = child_role(&s.client, &s.ns, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["errno"], ECONNREFUSED, "refused, never sent on: {r}");
    let status = s.daemon.cli(&s.ns, &["status", "--pin-dir", pins.arg()])?;
    let said = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success() && said.contains("no daemon serves the 5 program links pinned"),
        "{said}"
    );
    // The next daemon adopts them, and serves from its first request.
    let args = [
        "--mock",
        "--cgroup",
        s.client.to_str().unwrap(),
        "--pin-dir",
        pins.arg(),
        "--state-dir",
        state_arg,
    ];
    let again = Daemon::start(&args, &s.ns, None)?;
    again.assert_logged("adopted 5 program links pinned in");
    assert_eq!(
        ours(&s.client)?.len(),
        5,
        "adopted in place, not attached twice"
    );
    // With the token issued before the restart: the key is kept in the state directory.
    let auth = format!("X-aws-ec2-metadata-token: {token}");
    let (code, body) = curl(
        &s.client,
        &s.ns,
        &["-H", &auth],
        &url("/latest/meta-data/instance-id"),
    )?;
    assert_eq!(
        (code, body.as_str()),
        (200, INSTANCE_ID),
        "the old token is still valid"
    );
    let detach = || -> Result<std::process::Output> {
        Ok(command_in(DAEMON, None, Some(&s.ns))?
            .args(["detach", "--pin-dir", pins.arg()])
            .output()?)
    };
    let busy = detach()?;
    let said = String::from_utf8_lossy(&busy.stderr);
    assert!(
        !busy.status.success() && said.contains("another redirect daemon serves"),
        "{said}"
    );
    let mut again = again;
    again.stop(libc::SIGTERM)?;
    let detached = detach()?;
    let said = String::from_utf8_lossy(&detached.stdout);
    assert!(
        detached.status.success() && said.contains("detached 5 pinned program links"),
        "{said}"
    );
    assert_eq!(
        ours(&s.client)?,
        Vec::<String>::new(),
        "bpftool still shows our programs"
    );
    let r = child_role(&s.client, &s.ns, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["errno"], ENETUNREACH, "not redirected any more: {r}");
    let nothing = detach()?;
    let said = String::from_utf8_lossy(&nothing.stdout);
    assert!(
        nothing.status.success() && said.contains("nothing pinned"),
        "{said}"
    );
    Ok(())
}

/// SIGKILL while callers keep asking, with a stand-in for the real service at
/// 169.254.169.254 in the namespace: from the kill on, every request is refused and none
/// reaches the stand-in, new connections and a keep-alive client's reconnects alike; the
/// restarted daemon adopts the pins and serves them all again.
fn sigkill_under_load_never_reaches_the_real_service() -> Result<()> {
    let python = test_python()?;
    let ns = NetNs::new()?;
    ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
    let real = upstream::StandIn::start(&ns, "169.254.169.254:80".parse()?, false)?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let pins = support::PinDirGuard::new();
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let args = [
        "--mock",
        "--cgroup",
        client.to_str().unwrap(),
        "--pin-dir",
        pins.arg(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let mut daemon = Daemon::start(&args, &ns, None)?;
    let stop = dir.path().join("stop");
    // Two callers: one connection per request, and a keep-alive client reconnecting after
    // any failure. Each answer is tallied by who gave it; the script ends once both callers
    // have been answered 20 times after the restart.
    let script = format!(
        r#"
import http.client, json, os
tally = {{"ours": 0, "real": 0, "refused": 0, "other": []}}
def record(body):
    if body == b"{INSTANCE_ID}": tally["ours"] += 1
    elif body.startswith(b"upstream:"): tally["real"] += 1
    else: tally["other"].append(repr(body))
kept, again = None, {{"fresh": 0, "kept": 0}}
while not (again["fresh"] >= 20 and again["kept"] >= 20):
    restarted = os.path.exists({stop:?})
    for kind in ("fresh", "kept"):
        try:
            if kind == "fresh" or kept is None:
                conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
            else:
                conn = kept
            conn.request("GET", "/latest/meta-data/instance-id")
            record(conn.getresponse().read())
            if restarted: again[kind] += 1
            if kind == "kept": kept = conn
            else: conn.close()
        except ConnectionRefusedError:
            tally["refused"] += 1
            if kind == "kept": kept = None
        except Exception as e:
            if kind == "kept": kept = None
            tally["other"].append(repr(e))
print(json.dumps(tally))
"#,
        stop = stop.display().to_string()
    );
    let load = command_in(&python, Some(&client), Some(&ns))?
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let load = support::ChildGuard(Some(load));
    daemon.stop(libc::SIGKILL)?;
    // Refused from here on (the load sees it too).
    let r = child_role(&client, &ns, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["errno"], ECONNREFUSED, "{r}");
    let _again = Daemon::start(&args, &ns, None)?;
    std::fs::write(&stop, "")?;
    let out = load.wait_with_output()?;
    let tally: serde_json::Value =
        serde_json::from_slice(&out).with_context(|| String::from_utf8_lossy(&out).into_owned())?;
    assert_eq!(tally["real"], 0, "{tally}");
    assert!(
        real.heads().is_empty(),
        "the real service was asked: {:?}",
        real.heads()
    );
    assert!(tally["ours"].as_u64() >= Some(40), "{tally}");
    // A keep-alive request cut by the kill itself may fail once (RemoteDisconnected):
    // nothing else.
    let other = tally["other"].as_array().map_or(0, Vec::len);
    assert!(other <= 2, "{tally}");
    Ok(())
}

/// `--fail-open`: today's behaviour kept for who asks for it: a daemon that stops or dies
/// takes the redirect with it.
fn fail_open_leaves_nothing(signal: libc::c_int) -> Result<()> {
    let mut s = mock_setup(&["--fail-open"])?;
    let before = ours(&s.client)?;
    assert_eq!(before.len(), 5, "{before:?}");
    assert!(before.iter().any(|p| p.contains("connect4")), "{before:?}");
    let status = s.daemon.stop(signal)?;
    if signal == libc::SIGKILL {
        assert!(!status.success());
    } else {
        assert_eq!(status.code(), Some(0), "log:\n{}", s.daemon.log());
        s.daemon.assert_logged("detached 5 program links");
        assert!(!s.daemon.control_socket.exists(), "control socket removed");
    }
    assert_eq!(
        ours(&s.client)?,
        Vec::<String>::new(),
        "bpftool still shows our programs"
    );
    let r = child_role(&s.client, &s.ns, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["errno"], ENETUNREACH, "not redirected any more: {r}");
    Ok(())
}

/// SIGHUP reads the config file again: the mock serves the new values at once, tokens issued
/// before stay valid, what cannot change live is named in the log and left as it was, and a
/// broken file changes nothing. SIGUSR1 and SIGUSR2 are logged and ignored.
fn sighup_reloads_the_mock_and_never_kills() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    let write = |instance_id: &str, listen: &str| {
        std::fs::write(
            &config,
            format!(
                "mock = \"ec2\"\nlisten = [\"{listen}\"]\ncgroups = [{:?}]\n[ec2]\ninstance_id = \"{instance_id}\"\n",
                client.to_str().unwrap()
            ),
        )
    };
    write("i-before", "127.0.0.1:8169")?;
    let daemon = Daemon::start(&["--config", config.to_str().unwrap()], &ns, None)?;
    let id = url("/latest/meta-data/instance-id");
    let (_, token) = curl(
        &client,
        &ns,
        &["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 600")],
        &url("/latest/api/token"),
    )?;
    assert_eq!(curl(&client, &ns, &[], &id)?, (200, "i-before".to_owned()));

    write("i-after", "127.0.0.1:9169")?;
    daemon.signal(libc::SIGHUP)?;
    daemon.wait_for_log("SIGHUP: serving the new [ec2] values")?;
    let auth = format!("X-aws-ec2-metadata-token: {token}");
    assert_eq!(
        curl(&client, &ns, &["-H", &auth], &id)?,
        (200, "i-after".to_owned()),
        "the new value, and the token from before the reload still valid"
    );
    daemon.assert_logged("SIGHUP: `listen` changed");
    assert_eq!(daemon.status(&ns)?["listen"][0], "127.0.0.1:8169", "kept");

    std::fs::write(&config, "mock = \"ec2\"\n[ec2]\ninstance_idd = \"x\"\n")?;
    daemon.signal(libc::SIGHUP)?;
    daemon.wait_for_log("line 3, key `ec2.instance_idd`")?;
    daemon.assert_logged("SIGHUP: not reloaded");
    for (signal, name) in [(libc::SIGUSR1, "SIGUSR1"), (libc::SIGUSR2, "SIGUSR2")] {
        daemon.signal(signal)?;
        daemon.wait_for_log(&format!("{name} received; redirect has no use for it"))?;
    }
    assert_eq!(curl(&client, &ns, &[], &id)?, (200, "i-after".to_owned()));
    assert_eq!(daemon.status(&ns)?["pid"], daemon.pid(), "the same daemon");
    Ok(())
}

/// Without SO_REUSEPORT a port held by any socket, our own daemon's included, is "in use":
/// the second daemon fails, and the kernel never splits callers between the two.
fn a_second_daemon_on_the_same_listen_address_fails() -> Result<()> {
    let s = mock_setup(&[])?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("second.sock");
    let cmd = errors::redirect_run(
        Some(&s.ns),
        &[
            "--mock",
            "--cgroup",
            s.client.to_str().unwrap(),
            "--control-socket",
            socket.to_str().unwrap(),
        ],
    )?;
    let stderr = run_daemon_expecting_failure(cmd)?;
    errors::one_line_error(
        &stderr,
        "cannot listen on 127.0.0.1:8169: Address already in use",
    )?;
    for _ in 0..20 {
        assert_eq!(
            curl(&s.client, &s.ns, &[], &url("/latest/meta-data/instance-id"))?,
            (200, INSTANCE_ID.to_owned())
        );
    }
    assert_eq!(
        s.daemon.status(&s.ns)?["proxy"]["requests"],
        20,
        "every request reached the first daemon"
    );
    Ok(())
}

/// A panic in a request handler (injected) takes the daemon down with a log line and exit
/// status 70, instead of leaving it running with a piece missing.
fn a_panic_stops_the_daemon_with_a_non_zero_exit() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let mut daemon = Daemon::start_with(
        &["--mock", "--cgroup", client.to_str().unwrap()],
        &ns,
        None,
        "info",
        |cmd| {
            cmd.env("REDIRECT_FAULT_PANIC_PATH", "/latest/panic");
        },
    )?;
    assert_eq!(
        curl(&client, &ns, &[], &url("/latest/meta-data/instance-id"))?,
        (200, INSTANCE_ID.to_owned())
    );
    let out = command_in("curl", Some(&client), Some(&ns))?
        .args(["-sS", "--max-time", "20", &url("/latest/panic")])
        .output()?;
    assert!(!out.status.success(), "no answer from a panicking handler");
    let status = daemon.wait()?;
    assert_eq!(status.code(), Some(70), "log:\n{}", daemon.log());
    daemon.assert_logged("panic in thread");
    daemon.assert_logged("fault injection");
    Ok(())
}
