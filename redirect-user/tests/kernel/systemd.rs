//! Running under systemd: `Type=notify` (READY=1 once serving, the watchdog's keep-alives,
//! STOPPING=1 on stop) with a test's own `NOTIFY_SOCKET`; `--log-format json`; the man page
//! and completions generated from the command line's definitions.

use std::{os::unix::net::UnixDatagram, time::Duration};

use anyhow::{Context as _, Result};

use super::{DAEMON, Daemon, NetNs, TestCgroup, sh};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "sd_notify_ready_watchdog_and_stopping",
        sd_notify_ready_watchdog_and_stopping,
    ),
    (
        "json_logs_man_page_and_completions",
        json_logs_man_page_and_completions,
    ),
    (
        "socket_activation_serves_the_sockets_systemd_passed",
        socket_activation_serves_the_sockets_systemd_passed,
    ),
];

/// `systemd-socket-activate` binds the listen port and the targets' ports, and starts the
/// daemon at the first connection, which the daemon then answers on the socket it was given.
fn socket_activation_serves_the_sockets_systemd_passed() -> Result<()> {
    use std::io::{Read as _, Write as _};
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let pins = super::support::PinDirGuard::new();
    let control = dir.path().join("control.sock");
    let child = super::command_in("systemd-socket-activate", None, Some(&ns))?
        .args([
            "-l",
            "127.0.0.1:8169",
            "-l",
            "127.0.0.1:8170",
            "-l",
            "127.0.0.1:8171",
        ])
        .arg(DAEMON)
        .args(["run", "--mock", "--cgroup", client.to_str().unwrap()])
        .args([
            "--target",
            "169.254.169.254:80",
            "--target",
            "169.254.170.2:80",
        ])
        .arg("--control-socket")
        .arg(&control)
        .args(["--pin-dir", pins.arg()])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let _daemon = super::support::ChildGuard(Some(child));
    // The first connection starts the daemon; it is answered once the daemon serves.
    let answer = ns.run(|| -> Result<String> {
        let mut stream = None;
        for _ in 0..400 {
            if let Ok(s) = std::net::TcpStream::connect("127.0.0.1:8169") {
                stream = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let mut stream = stream.context("systemd-socket-activate never listened")?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.write_all(
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })??;
    assert!(answer.ends_with(super::INSTANCE_ID), "{answer}");
    // Through the redirect, to a target's port systemd passed too.
    assert_eq!(
        super::curl(
            &client,
            &ns,
            &[],
            &super::url("/latest/meta-data/instance-id")
        )?,
        (200, super::INSTANCE_ID.into())
    );
    let status = sh(super::command_in(DAEMON, None, Some(&ns))?
        .args(["status", "--json", "--control-socket"])
        .arg(&control))?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(status["listen"][0], "127.0.0.1:8169", "{status}");
    Ok(())
}

fn sd_notify_ready_watchdog_and_stopping() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path)?;
    // Only a guard against a hung test: the messages come within milliseconds.
    socket.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut daemon = Daemon::start_with(
        &["--mock", "--cgroup", client.to_str().unwrap()],
        &ns,
        None,
        "info",
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &path)
                .env("WATCHDOG_USEC", "200000");
        },
    )?;
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    while !said.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let n = socket.recv(&mut buf).context("no notification")?;
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(said[0].trim(), "READY=1", "{said:?}");
    daemon.signal(libc::SIGTERM)?;
    loop {
        let n = socket.recv(&mut buf).context("no STOPPING=1")?;
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert_eq!(daemon.wait()?.code(), Some(0));
    Ok(())
}

fn json_logs_man_page_and_completions() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let daemon = Daemon::start(
        &[
            "--mock",
            "--cgroup",
            client.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &ns,
        None,
    )?;
    let log = daemon.log();
    let ready = log
        .lines()
        .find(|l| l.contains("redirect ready"))
        .context("no ready line")?;
    let line: serde_json::Value = serde_json::from_str(ready).with_context(|| ready.to_owned())?;
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(
        line["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("redirect ready"),
        "{line}"
    );
    let man = sh(std::process::Command::new(DAEMON).arg("man"))?;
    assert!(
        man.contains(".TH redirect") && man.contains("detach"),
        "{man}"
    );
    let bash = sh(std::process::Command::new(DAEMON).args(["completions", "bash"]))?;
    assert!(
        bash.contains("complete") && bash.contains("simulate"),
        "{bash}"
    );
    Ok(())
}
