//! Upstream mode (`--upstream`) and `--redirect-to`, against a stand-in metadata service in the test's namespace.

use super::*;
use crate::routing::recorded_sockets;
use support::TestServer;

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "upstream_mode_forwards_without_loop",
        upstream_mode_forwards_without_loop,
    ),
    (
        "redirect_to_a_proxy_served_elsewhere",
        redirect_to_a_proxy_served_elsewhere,
    ),
    (
        "upstream_failures_become_gateway_errors",
        upstream_failures_become_gateway_errors,
    ),
];

/// A stand-in for the real metadata service: records each raw request head (exactly as it
/// arrived) and answers `upstream:<request target>`, or never
/// answers when `silent`.
pub struct StandIn(TestServer<String>);

impl StandIn {
    pub fn start(ns: &NetNs, addr: SocketAddr, silent: bool) -> Result<Self> {
        let serve = move |stream, log: &Mutex<Vec<String>>| serve_raw(stream, log, silent);
        TestServer::start(ns, addr, serve).map(StandIn)
    }

    pub fn heads(&self) -> Vec<String> {
        self.0.log()
    }
}

fn serve_raw(mut stream: TcpStream, log: &Mutex<Vec<String>>, silent: bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    let mut more = |stream: &mut TcpStream, buf: &mut Vec<u8>| match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    };
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if !more(&mut stream, &mut buf) {
                return;
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let body_len: usize = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            })
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + body_len {
            if !more(&mut stream, &mut buf) {
                return;
            }
        }
        buf.drain(..end + 4 + body_len);
        log.lock().unwrap().push(head.clone());
        if silent {
            continue;
        }
        let target = head.split_whitespace().nth(1).unwrap_or_default();
        let body = format!("upstream:{target}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nServer: EC2ws\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let close = head
            .lines()
            .any(|l| l.to_ascii_lowercase().replace(' ', "") == "connection:close");
        if stream.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// The header lines of a raw request head as (lower-case name, value), sorted.
fn header_set(head: &str) -> Vec<(String, String)> {
    let mut set: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    set.sort();
    set
}

fn upstream_mode_forwards_without_loop() -> Result<()> {
    let ns = NetNs::new()?;
    // The real service's address, inside this namespace only.
    ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
    let upstream = StandIn::start(&ns, "169.254.169.254:80".parse()?, false)?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let daemon_cg = cg.child("daemon")?;
    // Attached to the parent of both: the daemon's own connects pass through its programs.
    let daemon = Daemon::start(
        &[
            "--upstream",
            "http://169.254.169.254",
            "--cgroup",
            cg.path.to_str().unwrap(),
        ],
        &ns,
        Some(&daemon_cg),
    )?;
    let (code, body) = curl(
        &client,
        &ns,
        &["-H", "X-Custom-Case: Kept", "-H", "Metadata: true"],
        &url("/latest/meta-data/instance-id?x=1&y=%2F"),
    )?;
    assert_eq!(
        (code, body.as_str()),
        (200, "upstream:/latest/meta-data/instance-id?x=1&y=%2F"),
        "daemon log:\n{}",
        daemon.log()
    );
    let (code, body) = curl(
        &client,
        &ns,
        &["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 21600")],
        &url("/latest/api/token"),
    )?;
    assert_eq!((code, body.as_str()), (200, "upstream:/latest/api/token"));

    let heads = upstream.heads();
    assert_eq!(heads.len(), 2, "{heads:#?}");
    let get = &heads[0];
    assert!(
        get.starts_with("GET /latest/meta-data/instance-id?x=1&y=%2F HTTP/1.1\r\n"),
        "{get}"
    );
    // Exactly the headers curl sent, values unchanged (names compare case-insensitively,
    // as HTTP/1.1 defines them): nothing dropped, nothing added.
    let mut sent = header_set(get);
    sent.retain(|(name, _)| name != "user-agent");
    assert_eq!(
        sent,
        [
            ("accept", "*/*"),
            ("host", "169.254.169.254"),
            ("metadata", "true"),
            ("x-custom-case", "Kept"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .to_vec(),
        "{get}"
    );
    for added in ["x-forwarded-for", "forwarded", "via", "x-real-ip"] {
        assert!(
            !heads
                .iter()
                .any(|h| h.to_ascii_lowercase().contains(&format!("\r\n{added}:"))),
            "{added} added: {heads:?}"
        );
    }
    assert!(
        heads[1].starts_with("PUT /latest/api/token HTTP/1.1\r\n"),
        "{}",
        heads[1]
    );
    assert!(
        header_set(&heads[1]).contains(&(TOKEN_TTL.to_ascii_lowercase(), "21600".to_owned())),
        "{}",
        heads[1]
    );

    let status = daemon.status(&ns)?;
    assert!(
        status["counters"]["exempted_own_connects"].as_u64() >= Some(1),
        "{status:#}"
    );
    assert!(
        status["counters"]["connect4_rewritten"].as_u64() >= Some(2),
        "{status:#}"
    );
    assert_eq!(
        status["proxy"]["requests"], 2,
        "no request looped back: {status:#}"
    );
    Ok(())
}

/// `--redirect-to`: the daemon only redirects; another program (here a stand-in) serves.
fn redirect_to_a_proxy_served_elsewhere() -> Result<()> {
    let ns = NetNs::new()?;
    let elsewhere = StandIn::start(&ns, "127.0.0.1:9000".parse()?, false)?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let daemon = Daemon::start(
        &[
            "--redirect-to",
            "127.0.0.1:9000",
            "--cgroup",
            client.to_str().unwrap(),
        ],
        &ns,
        None,
    )?;
    let (code, body) = curl(&client, &ns, &[], &url("/latest/meta-data/instance-id"))?;
    assert_eq!(
        (code, body.as_str()),
        (200, "upstream:/latest/meta-data/instance-id")
    );
    assert_eq!(elsewhere.heads().len(), 1);
    let r = child_role(&client, &ns, "connect", &["[fd00:ec2::254]:80"])?;
    assert_eq!(r["peer"], "[fd00:ec2::254]:80", "{r}");
    let status = daemon.status(&ns)?;
    // The address is shared (anything may dial 127.0.0.1:9000), so each rewrite is recorded.
    assert_eq!(
        recorded_sockets(&daemon, &ns)?,
        2,
        "curl's socket and the connect role's"
    );
    let r = child_role(&client, &ns, "connect", &["127.0.0.1:9000"])?;
    assert_eq!(
        r["peer"], "127.0.0.1:9000",
        "a direct connect is reported as it is: {r}"
    );
    assert_eq!(status["listen"], serde_json::json!([]), "{status:#}");
    assert!(
        status["serving"]
            .as_str()
            .unwrap_or_default()
            .contains("served by another program"),
        "{status:#}"
    );
    let redirects = status["redirects"].as_array().context("redirects")?;
    assert!(
        redirects.contains(
            &serde_json::json!({"dialled": "169.254.169.254:80", "to": "127.0.0.1:9000", "dedicated": false})
        ),
        "{redirects:?}"
    );
    assert_eq!(status["proxy"]["requests"], 0);
    Ok(())
}

fn upstream_failures_become_gateway_errors() -> Result<()> {
    let ns = NetNs::new()?;
    ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
    let _silent = StandIn::start(&ns, "169.254.169.254:80".parse()?, true)?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let id = url("/latest/meta-data/instance-id");
    {
        let _daemon = Daemon::start(
            &[
                "--upstream",
                "http://169.254.169.254",
                "--upstream-timeout",
                "300ms",
                "--cgroup",
                client.to_str().unwrap(),
            ],
            &ns,
            None,
        )?;
        let (code, body) = curl(&client, &ns, &[], &id)?;
        assert_eq!(code, 504, "{body}");
    }
    // Nothing listens on port 82: connection refused, answered at once.
    let daemon = Daemon::start(
        &[
            "--upstream",
            "http://169.254.169.254:82",
            "--cgroup",
            client.to_str().unwrap(),
        ],
        &ns,
        None,
    )?;
    let (code, body) = curl(&client, &ns, &[], &id)?;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("refused"), "{body}");
    // The log names who asked, by the cgroup the kernel gives (the upstream is told nothing).
    let mount = support::cgroup2_mount()?;
    let asker = format!("(asked by host /{}", client.strip_prefix(&mount)?.display());
    daemon.wait_for_log(&asker)?;
    Ok(())
}
