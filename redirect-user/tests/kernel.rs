//! Real-kernel tests: the real eBPF object attached to throwaway cgroups, real connects from
//! processes inside test-made network namespaces (no route out), real HTTP clients (curl,
//! reqwest, boto3).
//!
//! Needs root. Without root the tests are reported as ignored, except under `CI=true`, where
//! they fail: CI must run them. `cargo xtask test` installs the tools they drive.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context as _, Result, ensure};
use libtest_mimic::{Arguments, Trial};
use support::{
    DAEMON, Daemon, IMDS, NetNs, TestCgroup, attached_programs, child, child_role, command_in,
    curl, run_daemon_expecting_failure, sh, veth,
};

const INSTANCE_ID: &str = "i-0123456789abcdef0";
const ENETUNREACH: i64 = libc::ENETUNREACH as i64;
const TOKEN_TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";

type TestFn = fn() -> Result<()>;

const TESTS: &[(&str, TestFn)] = &[
    (
        "mock_end_to_end_with_curl_and_status",
        mock_end_to_end_with_curl_and_status,
    ),
    (
        "mock_end_to_end_with_rust_client",
        mock_end_to_end_with_rust_client,
    ),
    ("imdsv2_token_flow", imdsv2_token_flow),
    (
        "sdk_boto3_gets_credentials_and_region",
        sdk_boto3_gets_credentials_and_region,
    ),
    (
        "other_cgroups_and_destinations_are_untouched",
        other_cgroups_and_destinations_are_untouched,
    ),
    (
        "container_in_its_own_netns_behind_a_veth",
        container_in_its_own_netns_behind_a_veth,
    ),
    ("docker_container_unchanged", docker_container_unchanged),
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
    (
        "config_file_and_flag_overrides",
        config_file_and_flag_overrides,
    ),
    ("ebpf_log_reports_rewrites", ebpf_log_reports_rewrites),
    (
        "accept_failures_are_logged_once_and_recovered_from",
        accept_failures_are_logged_once_and_recovered_from,
    ),
    (
        "idle_connections_are_closed_after_the_idle_timeout",
        idle_connections_are_closed_after_the_idle_timeout,
    ),
    ("sigterm_detaches_and_exits_0", || {
        stop_leaves_nothing_attached(libc::SIGTERM)
    }),
    ("sigint_detaches_and_exits_0", || {
        stop_leaves_nothing_attached(libc::SIGINT)
    }),
    ("sigkill_leaves_nothing_attached", || {
        stop_leaves_nothing_attached(libc::SIGKILL)
    }),
    ("error_not_root", error_not_root),
    ("error_no_cgroup_v2", error_no_cgroup_v2),
    ("error_cgroup_does_not_exist", error_cgroup_does_not_exist),
    ("error_port_in_use", error_port_in_use),
    (
        "error_object_rejected_by_verifier",
        error_object_rejected_by_verifier,
    ),
    (
        "error_bad_config_names_file_line_key",
        error_bad_config_names_file_line_key,
    ),
    (
        "error_second_daemon_on_same_control_socket",
        error_second_daemon_on_same_control_socket,
    ),
];

fn main() {
    if let Ok(role) = std::env::var(child::ROLE_ENV) {
        std::process::exit(child::run(&role));
    }
    let args = Arguments::from_args();
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !root {
        eprintln!(
            "kernel tests need root: {}",
            if ci {
                "CI=true, so they fail"
            } else {
                "reporting them as ignored"
            }
        );
    }
    if root {
        support::sweep_leftovers();
    }
    let trials = TESTS
        .iter()
        .map(|&(name, test)| {
            let trial = Trial::test(name, move || {
                if !root {
                    return Err("needs root (CI=true forbids skipping)".into());
                }
                test().map_err(|e| format!("{e:#}").into())
            });
            trial.with_ignored_flag(!root && !ci)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn url(path: &str) -> String {
    format!("http://{IMDS}{path}")
}

/// The Python with boto3 (and urllib3) that `cargo xtask test` installs.
fn test_python() -> Result<String> {
    std::env::var("REDIRECT_TEST_PYTHON").context(
        "REDIRECT_TEST_PYTHON is not set: run the tests with `cargo xtask test`, which installs boto3",
    )
}

/// Sends a keep-alive GET for the instance id on `stream` and returns what one read brings
/// (the mock's answer goes out in one write).
fn get_instance_id(mut stream: &TcpStream) -> Result<String> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    stream.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut answer = [0; 1024];
    let n = stream.read(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer[..n]).into_owned())
}

/// Field order is drop order: the daemon stops before its cgroup and namespace go away.
struct MockSetup {
    daemon: Daemon,
    client: std::path::PathBuf,
    cg: TestCgroup,
    ns: NetNs,
}

/// A namespace, a test cgroup with a `client` child, and a mock daemon redirecting `client`.
fn mock_setup(extra: &[&str]) -> Result<MockSetup> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let mut args = vec!["--mock", "--cgroup", client.to_str().unwrap()];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&args, &ns, None)?;
    Ok(MockSetup {
        daemon,
        client,
        cg,
        ns,
    })
}

fn mock_end_to_end_with_curl_and_status() -> Result<()> {
    let s = mock_setup(&[])?;
    let (code, body) = curl(&s.client, &s.ns, &[], &url("/latest/meta-data/instance-id"))?;
    assert_eq!((code, body.as_str()), (200, INSTANCE_ID));
    let (code, headers) = curl(
        &s.client,
        &s.ns,
        &["-D", "-", "-o", "/dev/null"],
        &url("/latest/meta-data/"),
    )?;
    assert_eq!(code, 200);
    assert!(
        headers.to_ascii_lowercase().contains("server: ec2ws"),
        "{headers}"
    );

    let status = s.daemon.status(&s.ns)?;
    assert_eq!(status["pid"], s.daemon.pid());
    assert!(
        status["counters"]["connect4_rewritten"].as_u64() >= Some(2),
        "{status:#}"
    );
    assert!(
        status["counters"]["connect4_seen"].as_u64() >= Some(2),
        "{status:#}"
    );
    assert_eq!(status["proxy"]["requests"], 2);
    assert_eq!(status["cgroups"][0]["path"], s.client.to_str().unwrap());
    assert_eq!(
        status["cgroups"][0]["programs"].as_array().map(Vec::len),
        Some(4)
    );
    let redirects = status["redirects"].as_array().context("redirects")?;
    assert!(
        redirects.contains(
            &serde_json::json!({"dialled": "169.254.169.254:80", "to": "127.0.0.1:8170", "dedicated": true})
        ),
        "{redirects:?}"
    );
    assert!(
        redirects.contains(
            &serde_json::json!({"dialled": "[fd00:ec2::254]:80", "to": "[::ffff:127.0.0.1]:8171", "dedicated": true})
        ),
        "{redirects:?}"
    );
    assert_eq!(status["listen"], serde_json::json!(["127.0.0.1:8169"]));
    let text = sh(command_in(DAEMON, None, Some(&s.ns))?
        .args(["status", "--control-socket"])
        .arg(&s.daemon.control_socket))?;
    assert!(
        text.contains("169.254.169.254:80  ->  127.0.0.1:8170           (dedicated)"),
        "{text}"
    );
    assert!(text.contains(s.client.to_str().unwrap()), "{text}");
    Ok(())
}

fn mock_end_to_end_with_rust_client() -> Result<()> {
    let s = mock_setup(&[])?;
    let get = |path: &str| child_role(&s.client, &s.ns, "http", &["GET", &url(path)]);
    let r = get("/latest/meta-data/instance-id")?;
    assert_eq!(r["status"], 200);
    assert_eq!(r["body"], INSTANCE_ID);
    assert_eq!(r["headers"]["server"], "EC2ws");
    assert_eq!(
        get("/latest/meta-data/placement/region")?["body"],
        "us-east-1"
    );
    assert_eq!(
        get("/latest/meta-data/placement/availability-zone")?["body"],
        "us-east-1a"
    );
    assert_eq!(
        get("/latest/meta-data/ami-id")?["body"],
        "ami-0abcdef1234567890"
    );
    assert_eq!(get("/latest/meta-data/local-ipv4")?["body"], "172.31.16.10");
    assert_eq!(
        get("/latest/meta-data/hostname")?["body"],
        "ip-172-31-16-10.ec2.internal"
    );
    let role = get("/latest/meta-data/iam/security-credentials/")?["body"]
        .as_str()
        .context("role")?
        .to_owned();
    assert_eq!(role, "redirect-mock-role");
    let creds = get(&format!(
        "/latest/meta-data/iam/security-credentials/{role}"
    ))?;
    let creds: serde_json::Value = serde_json::from_str(creds["body"].as_str().context("body")?)?;
    assert_eq!(creds["Code"], "Success");
    assert_eq!(creds["AccessKeyId"], "ASIAIOSFODNN7EXAMPLE");
    let info: serde_json::Value = serde_json::from_str(
        get("/latest/meta-data/iam/info")?["body"]
            .as_str()
            .context("body")?,
    )?;
    assert_eq!(info["Code"], "Success");
    let doc: serde_json::Value = serde_json::from_str(
        get("/latest/dynamic/instance-identity/document")?["body"]
            .as_str()
            .context("body")?,
    )?;
    assert_eq!(doc["instanceId"], INSTANCE_ID);
    assert_eq!(doc["region"], "us-east-1");
    assert_eq!(get("/latest/user-data")?["status"], 404);
    let listing = get("/latest/meta-data/")?;
    assert!(
        listing["body"]
            .as_str()
            .unwrap()
            .lines()
            .any(|l| l == "iam/"),
        "{listing}"
    );
    Ok(())
}

fn imdsv2_token_flow() -> Result<()> {
    let s = mock_setup(&["--http-tokens", "required"])?;
    let id = url("/latest/meta-data/instance-id");
    let token_url = url("/latest/api/token");
    assert_eq!(
        curl(&s.client, &s.ns, &[], &id)?.0,
        401,
        "tokenless request in required mode"
    );

    let put = child_role(
        &s.client,
        &s.ns,
        "http",
        &["PUT", &token_url, &format!("{TOKEN_TTL}:60")],
    )?;
    assert_eq!(put["status"], 200);
    assert_eq!(put["headers"]["x-aws-ec2-metadata-token-ttl-seconds"], "60");
    let token = put["body"].as_str().context("token")?.to_owned();
    assert_eq!(token.len(), 56);

    let with = |t: &str| format!("X-aws-ec2-metadata-token: {t}");
    assert_eq!(
        curl(&s.client, &s.ns, &["-H", &with(&token)], &id)?,
        (200, INSTANCE_ID.to_owned())
    );
    assert_eq!(
        curl(&s.client, &s.ns, &["-H", &with("AQAEAbogus")], &id)?.0,
        401
    );
    let ttl = |v: &str| format!("{TOKEN_TTL}: {v}");
    for bad_ttl in ["0", "21601", "soon"] {
        let code = curl(
            &s.client,
            &s.ns,
            &["-X", "PUT", "-H", &ttl(bad_ttl)],
            &token_url,
        )?
        .0;
        assert_eq!(code, 400, "ttl {bad_ttl}");
    }
    assert_eq!(
        curl(&s.client, &s.ns, &["-X", "PUT"], &token_url)?.0,
        400,
        "missing ttl"
    );
    let xff = [
        "-X",
        "PUT",
        "-H",
        &ttl("60"),
        "-H",
        "X-Forwarded-For: 10.0.0.1",
    ];
    assert_eq!(curl(&s.client, &s.ns, &xff, &token_url)?.0, 403);
    assert_eq!(
        curl(&s.client, &s.ns, &[], &token_url)?.0,
        405,
        "GET on the token path"
    );
    Ok(())
}

fn sdk_boto3_gets_credentials_and_region() -> Result<()> {
    let python = test_python()?;
    // IMDSv2 only, so the SDK must do the token dance through the redirect.
    let s = mock_setup(&["--http-tokens", "required"])?;
    let home = tempfile::tempdir()?;
    let script = r#"
import json, boto3, botocore.utils
session = boto3.Session(region_name="eu-west-3")
creds = session.get_credentials()
frozen = creds.get_frozen_credentials()
region = botocore.utils.InstanceMetadataRegionFetcher().retrieve_region()
print(json.dumps({"method": creds.method, "access_key": frozen.access_key,
                  "secret_key": frozen.secret_key, "region": region}))
"#;
    let mut cmd = command_in(&python, Some(&s.client), Some(&s.ns))?;
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    let out = sh(cmd
        .env("HOME", home.path())
        .env("AWS_CONFIG_FILE", home.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.path().join("none"))
        .args(["-c", script]))?;
    let got: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    assert_eq!(got["method"], "iam-role", "{got}");
    assert_eq!(got["access_key"], "ASIAIOSFODNN7EXAMPLE");
    assert_eq!(
        got["secret_key"],
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    );
    assert_eq!(got["region"], "us-east-1");
    Ok(())
}

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
    let curl_id = [
        "curl",
        "-sS",
        "--max-time",
        "20",
        "http://169.254.169.254/latest/meta-data/instance-id",
    ];
    let mut daemon = Daemon::start(
        &["--mock", "--cgroup", &cgroup, "--listen", "10.201.0.1:8169"],
        &host,
        None,
    )?;
    assert_eq!(container.exec(&curl_id)?, (true, INSTANCE_ID.to_owned()));
    assert_eq!(daemon.stop(libc::SIGTERM)?.code(), Some(0));
    let (ok, out) = container.exec(&curl_id)?;
    assert!(!ok && out.contains("Couldn't connect"), "after stop: {out}");
    Ok(())
}

/// A stand-in for the real metadata service: records each raw request head (exactly as it
/// arrived) and answers `upstream:<request target>`, or never
/// answers when `silent`.
struct StandIn {
    heads: Arc<Mutex<Vec<String>>>,
    listener: TcpListener,
}

impl StandIn {
    fn start(ns: &NetNs, addr: SocketAddr, silent: bool) -> Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (accepting, log) = (listener.try_clone()?, Arc::clone(&heads));
        thread::spawn(move || {
            for stream in accepting.incoming() {
                let Ok(stream) = stream else { return };
                let log = Arc::clone(&log);
                thread::spawn(move || serve_raw(stream, &log, silent));
            }
        });
        Ok(StandIn { heads, listener })
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Wakes the accept loop, which then ends.
        // SAFETY: shutdown(2) on our own listening socket.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn serve_raw(mut stream: TcpStream, log: &Mutex<Vec<String>>, silent: bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
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
        buf.drain(..end + 4 + body_len.min(buf.len() - end - 4));
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
    let _daemon = Daemon::start(
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
fn recorded_sockets(daemon: &Daemon, ns: &NetNs) -> Result<usize> {
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

fn config_file_and_flag_overrides() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    std::fs::write(
        &config,
        format!(
            "mock = \"ec2\"\nlisten = [\"127.0.0.1:9000\"]\ncgroups = [{:?}]\n\n[ec2]\ninstance_id = \"i-fromconfig\"\nhttp_tokens = \"required\"\nuser_data = \"#!/bin/sh\\n\"\n",
            client.to_str().unwrap()
        ),
    )?;
    let id = url("/latest/meta-data/instance-id");
    {
        let daemon = Daemon::start(&["--config", config.to_str().unwrap()], &ns, None)?;
        assert_eq!(
            curl(&client, &ns, &[], &id)?.0,
            401,
            "required mode from the file"
        );
        let (_, token) = curl(
            &client,
            &ns,
            &["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 30")],
            &url("/latest/api/token"),
        )?;
        let auth = format!("X-aws-ec2-metadata-token: {token}");
        assert_eq!(
            curl(&client, &ns, &["-H", &auth], &id)?,
            (200, "i-fromconfig".to_owned())
        );
        assert_eq!(
            curl(&client, &ns, &["-H", &auth], &url("/latest/user-data"))?,
            (200, "#!/bin/sh\n".to_owned())
        );
        assert_eq!(daemon.status(&ns)?["listen"][0], "127.0.0.1:9000");
    }
    // Flags win over the file.
    let daemon = Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--http-tokens",
            "optional",
            "--listen",
            "127.0.0.1:0",
        ],
        &ns,
        None,
    )?;
    assert_eq!(
        curl(&client, &ns, &[], &id)?,
        (200, "i-fromconfig".to_owned())
    );
    let listen = daemon.status(&ns)?["listen"][0]
        .as_str()
        .context("listen")?
        .to_owned();
    assert!(
        listen.starts_with("127.0.0.1:") && listen != "127.0.0.1:0" && listen != "127.0.0.1:9000",
        "{listen}"
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

/// Clients holding more connections than the daemon may have files open: its accepts fail
/// (EMFILE) and the connections wait in the listener's queue. The daemon says so once, not at
/// every retry, serves the connections it has, and accepts again once descriptors are free.
fn accept_failures_are_logged_once_and_recovered_from() -> Result<()> {
    let s = mock_setup(&[])?;
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

fn stop_leaves_nothing_attached(signal: libc::c_int) -> Result<()> {
    let mut s = mock_setup(&[])?;
    let ours = |cg: &Path| -> Result<Vec<String>> {
        Ok(attached_programs(cg)?
            .into_iter()
            .filter(|(_, name)| name.starts_with("redirect_"))
            .map(|(kind, name)| format!("{kind} {name}"))
            .collect())
    };
    let before = ours(&s.client)?;
    assert_eq!(before.len(), 4, "{before:?}");
    assert!(before.iter().any(|p| p.contains("connect4")), "{before:?}");
    let status = s.daemon.stop(signal)?;
    if signal == libc::SIGKILL {
        assert!(!status.success());
    } else {
        assert_eq!(status.code(), Some(0), "log:\n{}", s.daemon.log());
        assert!(
            s.daemon.log().contains("detached 4 program links"),
            "{}",
            s.daemon.log()
        );
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

/// stderr must be exactly one `redirect: error: ...` line.
fn one_line_error(stderr: &str, expected: &str) -> Result<()> {
    let lines: Vec<&str> = stderr.lines().collect();
    ensure!(lines.len() == 1, "want one line, got:\n{stderr}");
    ensure!(lines[0].starts_with("redirect: error: "), "{stderr}");
    ensure!(stderr.contains(expected), "want {expected:?} in: {stderr}");
    Ok(())
}

/// `redirect run ARGS...`, inside `netns` when given.
fn redirect_run(netns: Option<&NetNs>, args: &[&str]) -> Result<Command> {
    let mut cmd = command_in(DAEMON, None, netns)?;
    cmd.arg("run").args(args);
    Ok(cmd)
}

fn error_not_root() -> Result<()> {
    let cg = TestCgroup::new()?;
    let cgroup = cg.path.to_str().unwrap();
    let mut cmd = redirect_run(
        None,
        &[
            "--mock",
            "--cgroup",
            cgroup,
            "--control-socket",
            "/nonexistent/x.sock",
        ],
    )?;
    cmd.uid(65534).gid(65534);
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(
        &stderr,
        "needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN",
    )?;
    assert!(attached_programs(&cg.path)?.is_empty());
    Ok(())
}

fn error_no_cgroup_v2() -> Result<()> {
    let mount = support::cgroup2_mount()?;
    let mount_c = std::ffi::CString::new(mount.to_str().unwrap())?;
    let mut cmd = redirect_run(None, &["--mock", "--control-socket", "/nonexistent/x.sock"])?;
    // SAFETY: only syscalls on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            // A private mount namespace without the cgroup2 mount: the host is unaffected.
            let private = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::umount2(mount_c.as_ptr(), libc::MNT_DETACH) == 0;
            if private {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(&stderr, "no cgroup v2 filesystem is mounted")
}

fn error_cgroup_does_not_exist() -> Result<()> {
    let ns = NetNs::new()?;
    let missing = support::cgroup2_mount()?.join("redirect-test-no-such-cgroup");
    let missing_arg = missing.to_str().unwrap();
    let cmd = redirect_run(
        Some(&ns),
        &[
            "--mock",
            "--control-socket",
            "/nonexistent/x.sock",
            "--cgroup",
            missing_arg,
        ],
    )?;
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(
        &stderr,
        &format!("cgroup {} does not exist", missing.display()),
    )
}

fn error_port_in_use() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("c.sock");
    let cgroup = cg.path.to_str().unwrap();
    let fails_with = |port: u16, expected: &str| -> Result<()> {
        let _taken = ns.run(move || TcpListener::bind(("127.0.0.1", port)))??;
        let cmd = redirect_run(
            Some(&ns),
            &[
                "--mock",
                "--cgroup",
                cgroup,
                "--control-socket",
                socket.to_str().unwrap(),
            ],
        )?;
        one_line_error(&run_daemon_expecting_failure(cmd)?, expected)?;
        assert!(
            attached_programs(&cg.path)?.is_empty(),
            "nothing attached after the failure"
        );
        Ok(())
    };
    fails_with(
        8169,
        "cannot listen on 127.0.0.1:8169: Address already in use",
    )?;
    // A target's port, taken: the message says why that port.
    fails_with(
        8170,
        "cannot listen on 127.0.0.1:8170 (the port of target 169.254.169.254:80: each target takes a port after the listen port): Address already in use",
    )
}

fn error_object_rejected_by_verifier() -> Result<()> {
    use object::{Object as _, ObjectSection as _};
    let original = std::fs::read(env!("REDIRECT_EBPF_OBJECT"))?;
    let elf = object::File::parse(&*original)?;
    let (offset, size) = elf
        .section_by_name("cgroup/connect4")
        .context("no cgroup/connect4 section")?
        .file_range()
        .context("section has no file data")?;
    let section = usize::try_from(offset)?..usize::try_from(offset + size)?;
    // The first `exit` instruction (opcode 0x95) becomes `r10 = 0`: writing the read-only
    // frame pointer on a reachable path, which the verifier must refuse.
    let exit = section
        .step_by(8)
        .find(|&at| original[at] == 0x95)
        .context("cgroup/connect4 has no exit instruction")?;
    let mut patched = original.clone();
    patched[exit..exit + 8].copy_from_slice(&[0xb7, 0x0a, 0, 0, 0, 0, 0, 0]);
    let dir = tempfile::tempdir()?;
    let object_path = dir.path().join("rejected.o");
    std::fs::write(&object_path, patched)?;

    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let socket = dir.path().join("c.sock");
    let cmd = redirect_run(
        Some(&ns),
        &[
            "--mock",
            "--cgroup",
            cg.path.to_str().unwrap(),
            "--control-socket",
            socket.to_str().unwrap(),
            "--ebpf-object",
            object_path.to_str().unwrap(),
        ],
    )?;
    let stderr = run_daemon_expecting_failure(cmd)?;
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("redirect: error: the kernel rejected eBPF program `redirect_connect4`"),
        "{stderr}"
    );
    assert!(first.ends_with("verifier log:"), "{stderr}");
    assert!(
        stderr.lines().count() > 1,
        "the verifier's log follows: {stderr}"
    );
    assert!(attached_programs(&cg.path)?.is_empty());
    Ok(())
}

fn error_bad_config_names_file_line_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "mock = \"ec2\"\n\nlisten = [\"127.0.0.1:8169\", \"not-an-address\"]\n",
    )?;
    let with_config = || redirect_run(None, &["--config", config.to_str().unwrap()]);
    let stderr = run_daemon_expecting_failure(with_config()?)?;
    one_line_error(
        &stderr,
        &format!(
            "config {} line 3, key `listen[1]`: invalid listen address \"not-an-address\"",
            config.display()
        ),
    )?;
    std::fs::write(&config, "mock = \"ec2\"\n[ec2]\nhttp_tokens = \"maybe\"\n")?;
    let stderr = run_daemon_expecting_failure(with_config()?)?;
    one_line_error(
        &stderr,
        "line 3, key `ec2.http_tokens`: unknown variant `maybe`",
    )
}

fn error_second_daemon_on_same_control_socket() -> Result<()> {
    let s = mock_setup(&[])?;
    let ns2 = NetNs::new()?;
    let cmd = redirect_run(
        Some(&ns2),
        &[
            "--mock",
            "--cgroup",
            s.client.to_str().unwrap(),
            "--control-socket",
            s.daemon.control_socket.to_str().unwrap(),
        ],
    )?;
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(&stderr, "another redirect daemon is running")?;
    // The first daemon is unharmed.
    assert_eq!(s.daemon.status(&s.ns)?["pid"], s.daemon.pid());
    Ok(())
}
