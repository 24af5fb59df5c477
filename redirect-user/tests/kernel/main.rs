//! Real-kernel tests: the real eBPF object attached to throwaway cgroups, real connects from
//! processes inside test-made network namespaces (no route out), real HTTP clients (curl,
//! reqwest, boto3).
//!
//! Needs root. Without root the tests are reported as ignored, except under `CI=true`, where
//! they fail: CI must run them. `cargo xtask test` installs the tools they drive.

#[path = "../support/mod.rs"]
mod support;

mod azure;
mod bounds;
mod cache;
mod clouds;
mod compose;
mod containers;
mod errors;
mod events;
mod framing;
mod gcp;
mod guard;
mod identity;
mod lifecycle;
mod metrics;
mod mock;
mod namespaces;
mod policy;
mod replace;
mod router;
mod routing;
mod stack;
mod swarm;
mod systemd;
mod upstream;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::Path,
    process::Command,
    sync::Mutex,
    thread,
};

use anyhow::{Context as _, Result, ensure};
use libtest_mimic::{Arguments, Trial};
use support::{
    DAEMON, Daemon, IMDS, NetNs, TestCgroup, attached_programs, child, child_role, command_in,
    curl, run_daemon_expecting_failure, sh, veth,
};

pub const INSTANCE_ID: &str = "i-0123456789abcdef0";

pub const ENETUNREACH: i64 = libc::ENETUNREACH as i64;

/// curl inside a container, fetching the instance id (`docker exec`, `docker run`).
pub const CURL_ID: [&str; 5] = [
    "curl",
    "-sS",
    "--max-time",
    "20",
    "http://169.254.169.254/latest/meta-data/instance-id",
];

pub const TOKEN_TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";

pub type TestFn = fn() -> Result<()>;

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
    /// In [`Mode::Proxy`], the mock standing in for the real service.
    stand_in: Option<Daemon>,
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
        stand_in: None,
        client,
        cg,
        ns,
    })
}

/// How a test's cloud is served: by the mock, or by upstream mode forwarding to the mock
/// standing in for the real service at 169.254.169.254 inside the test's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Mock,
    Proxy,
}

const MODES: [Mode; 2] = [Mode::Mock, Mode::Proxy];

/// [`mock_setup`] for `cloud` (`--mock CLOUD`), or in [`Mode::Proxy`] a daemon forwarding
/// to that mock at the real service's address. `mock_args` go to the mock.
fn cloud_setup(cloud: &str, mode: Mode, mock_args: &[&str]) -> Result<MockSetup> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let mut stand_in = None;
    let mut args = vec!["--cgroup", client.to_str().unwrap()];
    match mode {
        Mode::Mock => {
            args.extend(["--mock", cloud]);
            args.extend_from_slice(mock_args);
        }
        Mode::Proxy => {
            ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])?;
            // It redirects for an empty cgroup: it only serves.
            let idle = cg.child("stand-in")?;
            let mut stand_in_args = vec![
                "--mock",
                cloud,
                "--listen",
                "169.254.169.254:80",
                "--cgroup",
                idle.to_str().unwrap(),
            ];
            stand_in_args.extend_from_slice(mock_args);
            stand_in = Some(Daemon::start(&stand_in_args, &ns, None)?);
            args.extend(["--upstream", "http://169.254.169.254"]);
        }
    }
    let daemon = Daemon::start(&args, &ns, None)?;
    Ok(MockSetup {
        daemon,
        stand_in,
        client,
        cg,
        ns,
    })
}

/// Runs `script` with the test Python in `s.client`, with `hosts` (if any) added to its
/// `/etc/hosts` (a private copy, bind-mounted in a mount namespace of its own) and none of the
/// host's settings of the SDKs (`unset`, see [`isolated`]); its last line is JSON.
fn python_with_hosts(
    s: &MockSetup,
    hosts: &str,
    unset: &[&str],
    script: &str,
    pythonpath: Option<&str>,
) -> Result<serde_json::Value> {
    let python = test_python()?;
    let home = tempfile::tempdir()?;
    let script_file = home.path().join("script.py");
    std::fs::write(&script_file, script)?;
    let mut cmd = if hosts.is_empty() {
        command_in(&python, Some(&s.client), Some(&s.ns))?
    } else {
        let hosts_file = home.path().join("hosts");
        std::fs::write(&hosts_file, format!("127.0.0.1 localhost\n{hosts}"))?;
        let mut cmd = command_in("unshare", Some(&s.client), Some(&s.ns))?;
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && exec "$2" "$3""#)
            .arg("sh")
            .arg(&hosts_file)
            .arg(&python);
        cmd
    };
    isolated(&mut cmd, home.path(), unset);
    if let Some(path) = pythonpath {
        cmd.env("PYTHONPATH", path);
    }
    let out = sh(cmd.arg(&script_file))?;
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| out.clone())
}

/// `cmd` without the host's settings of the SDKs: no environment variable starting with one
/// of `unset`, and `home` as HOME (no config files of the host's user).
fn isolated<'a>(cmd: &'a mut Command, home: &Path, unset: &[&str]) -> &'a mut Command {
    for (key, _) in std::env::vars() {
        if unset.iter().any(|prefix| key.starts_with(prefix)) {
            cmd.env_remove(key);
        }
    }
    cmd.env("HOME", home)
}

/// [`isolated`] for the AWS SDKs and CLI: none of `AWS_*`, and config and credentials files
/// that do not exist.
fn aws_isolated<'a>(cmd: &'a mut Command, home: &Path) -> &'a mut Command {
    isolated(cmd, home, &["AWS_"])
        .env("AWS_CONFIG_FILE", home.join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("none"))
}

/// Every test, one module per feature.
/// One test per kernel feature the daemon relies on (connect4/6 and getpeername rewrites, the
/// egress guard, pinned links and their update, namespaces found through the ring buffer,
/// callers named by cgroup and pid, the self-test): kind `kernel`, what
/// `cargo xtask vm-test --quick` runs on each Debian kernel. Named here, not moved, so that
/// each stays in its own file; `main` refuses a name that is no test.
const KERNEL_FEATURES: &[&str] = &[
    "mock_end_to_end_with_curl_and_status",
    "connect6_mapped_and_getpeername",
    "dedicated_ports_need_no_record_and_direct_connects_stay_true",
    "ebpf_log_reports_rewrites",
    "escapes_around_the_redirect_are_dropped_and_counted",
    "sigterm_leaves_the_redirect_pinned_and_exits_0",
    "sigkill_under_load_never_reaches_the_real_service",
    "replace_under_load_fails_no_request",
    "upstream_mode_forwards_without_loop",
    "a_namespace_made_later_is_served_from_its_second_connect",
    "host_processes_are_named_by_cgroup_and_pid_and_ruled_by_cgroup",
    "readiness_self_test_catches_a_link_detached_behind_the_daemons_back",
];

/// Every test, with its kind: `docker` for those that drive the Docker engine (so that
/// `--skip '[docker]'` runs the rest where no engine runs, as `cargo xtask vm-test` does),
/// `kernel` for the [`KERNEL_FEATURES`].
fn tests() -> impl Iterator<Item = (&'static str, TestFn, &'static str)> {
    let plain = [
        mock::TESTS,
        azure::TESTS,
        clouds::TESTS,
        gcp::TESTS,
        stack::TESTS,
        router::TESTS,
        guard::TESTS,
        metrics::TESTS,
        systemd::TESTS,
        replace::TESTS,
        cache::TESTS,
        events::TESTS,
        routing::TESTS,
        containers::TESTS,
        namespaces::TESTS,
        policy::TESTS,
        identity::TESTS,
        upstream::TESTS,
        lifecycle::TESTS,
        bounds::TESTS,
        errors::TESTS,
        framing::TESTS,
    ];
    let docker = [
        containers::DOCKER,
        compose::DOCKER,
        swarm::DOCKER,
        namespaces::DOCKER,
        policy::DOCKER,
        identity::DOCKER,
    ];
    let kind = |tests: &'static [(&'static str, TestFn)], kind| {
        tests.iter().map(move |&(name, test)| (name, test, kind))
    };
    plain
        .into_iter()
        .flat_map(move |t| kind(t, ""))
        .map(|(name, test, kind)| match KERNEL_FEATURES.contains(&name) {
            true => (name, test, "kernel"),
            false => (name, test, kind),
        })
        .chain(docker.into_iter().flat_map(move |t| kind(t, "docker")))
}

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
    for name in KERNEL_FEATURES {
        if !tests().any(|(test, _, _)| test == *name) {
            eprintln!("KERNEL_FEATURES names {name:?}, which is no test (renamed?)");
            std::process::exit(2);
        }
    }
    if root {
        support::sweep_leftovers();
    }
    let trials = tests()
        .map(|(name, test, kind)| {
            let trial = Trial::test(name, move || {
                if !root {
                    return Err("needs root (CI=true forbids skipping)".into());
                }
                test().map_err(|e| format!("{e:#}").into())
            });
            trial.with_kind(kind).with_ignored_flag(!root && !ci)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
