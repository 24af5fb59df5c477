//! The escape guard (`cgroup_skb/egress`): what reaches a metadata address around the
//! redirect is dropped and counted per cgroup: a UDP datagram, and a TCP connection made
//! before the daemon attached (its next packet). The daemon's own upstream sockets pass
//! (upstream mode's tests run the daemon inside a covered cgroup).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::UdpSocket,
    process::Stdio,
    sync::Mutex,
};

use anyhow::{Context as _, Result};

use super::{Daemon, NetNs, TestCgroup, child_role, command_in, support};

pub const TESTS: &[(&str, super::TestFn)] = &[(
    "escapes_around_the_redirect_are_dropped_and_counted",
    escapes_around_the_redirect_are_dropped_and_counted,
)];

fn escapes_around_the_redirect_are_dropped_and_counted() -> Result<()> {
    let ns = NetNs::new()?;
    // The metadata address exists in this namespace only: without the guard, these packets
    // would reach it.
    ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let heads = support::TestServer::start(
        &ns,
        "169.254.169.254:80".parse()?,
        |mut stream: std::net::TcpStream, log: &Mutex<Vec<String>>| {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stream, &mut buf) {
                if n == 0 {
                    return;
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        },
    )?;
    let datagrams = ns.run(|| UdpSocket::bind("169.254.169.254:9999"))??;
    datagrams.set_nonblocking(true)?;
    // Before the daemon: a connection straight to the address (not redirected).
    let mut early = support::ChildGuard(Some(
        command_in(std::env::current_exe()?, Some(&client), Some(&ns))?
            .env(super::child::ROLE_ENV, "early")
            .arg("169.254.169.254:80")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    ));
    let child = early.0.as_mut().context("the early child")?;
    let (mut stdin, stdout) = (
        child.stdin.take().context("stdin")?,
        child.stdout.take().context("stdout")?,
    );
    let mut said = BufReader::new(stdout);
    let mut line = String::new();
    said.read_line(&mut line)?;
    assert_eq!(line.trim(), r#"{"connected":true}"#);
    let daemon = Daemon::start(&["--mock", "--cgroup", client.to_str().unwrap()], &ns, None)?;
    // Its next packet, after the daemon attached: dropped.
    stdin.write_all(b"go\n")?;
    line.clear();
    said.read_line(&mut line)?;
    assert_eq!(line.trim(), r#"{"written":true}"#);
    drop(early);
    let r = child_role(&client, &ns, "udp", &["169.254.169.254:9999"])?;
    assert_eq!(r["errno"], libc::EPERM as i64, "the datagram refused: {r}");
    let mut buf = [0u8; 64];
    assert!(datagrams.recv(&mut buf).is_err(), "no datagram arrived");
    assert!(
        heads.log().is_empty(),
        "the early connection's request arrived: {:?}",
        heads.log()
    );
    let status = daemon.status(&ns)?;
    let dropped = status["counters"]["escapes_dropped"].as_u64().unwrap_or(0);
    assert!(dropped >= 2, "{status:#}");
    let mount = support::cgroup2_mount()?;
    let name = format!("/{}", client.strip_prefix(&mount)?.display());
    let escapes = status["escapes"].as_array().context("escapes")?;
    assert!(
        escapes
            .iter()
            .any(|e| e["cgroup"] == name.as_str() && e["dropped"].as_u64() >= Some(2)),
        "{escapes:?}"
    );
    // A redirected connect is not an escape: the mock answers.
    let r = child_role(&client, &ns, "connect", &["169.254.169.254:80"])?;
    assert_eq!(r["body"], super::INSTANCE_ID, "{r}");
    assert!(heads.log().is_empty());
    Ok(())
}
