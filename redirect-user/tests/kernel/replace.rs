//! `redirect run --replace` under a steady load: the old daemon hands its listening sockets
//! (its own and those in other namespaces) to the new one, which adopts its pinned programs,
//! and the old one finishes its requests and exits; no request fails, and IMDSv2 tokens
//! issued by the old one stay valid. With no daemon running, `--replace` just starts.

use std::{collections::BTreeSet, path::PathBuf, process::Stdio};

use anyhow::{Context as _, Result};

use super::{
    DAEMON, Daemon, INSTANCE_ID, NetNs, TOKEN_TTL, TestCgroup, command_in, curl,
    namespaces::resident, run_daemon_expecting_failure, support, test_python, url,
};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "replace_under_load_fails_no_request",
        replace_under_load_fails_no_request,
    ),
    (
        "a_replace_that_fails_midway_leaves_the_old_daemon_serving",
        a_replace_that_fails_midway_leaves_the_old_daemon_serving,
    ),
    (
        "a_daemon_that_hands_no_sockets_over_has_its_ports_joined",
        a_daemon_that_hands_no_sockets_over_has_its_ports_joined,
    ),
];

/// What a daemon and the one replacing it share: the namespace and the client's cgroup, the
/// control socket, the pin and state directories. Fields drop in this order.
struct Handover {
    pins: support::PinDirGuard,
    dir: tempfile::TempDir,
    client: PathBuf,
    _cg: TestCgroup,
    ns: NetNs,
}

impl Handover {
    fn new() -> Result<Self> {
        let cg = TestCgroup::new()?;
        Ok(Handover {
            pins: support::PinDirGuard::new(),
            dir: tempfile::tempdir()?,
            client: cg.child("client")?,
            _cg: cg,
            ns: NetNs::new()?,
        })
    }

    /// `redirect run` arguments of a daemon serving the mock here with `--replace`, then `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let dir = self.dir.path();
        let mut args: Vec<String> = [
            "--mock",
            "--cgroup",
            &self.client.display().to_string(),
            "--control-socket",
            &dir.join("control.sock").display().to_string(),
            "--pin-dir",
            self.pins.arg(),
            "--state-dir",
            &dir.join("state").display().to_string(),
            "--replace",
        ]
        .map(str::to_owned)
        .into();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    fn start(&self, extra: &[&str]) -> Result<Daemon> {
        let args = self.args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&args, &self.ns, None)
    }
}

/// The inodes of the TCP sockets listening in the network namespace of `pid`.
fn listening_inodes(pid: u32) -> Result<BTreeSet<u64>> {
    let mut inodes = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `st` 0A is TCP_LISTEN; the inode is the tenth field.
            if fields.get(3) == Some(&"0A") {
                inodes.insert(fields.get(9).context("inode")?.parse()?);
            }
        }
    }
    Ok(inodes)
}

/// The inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> Result<BTreeSet<u64>> {
    let mut inodes = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue; // closed meanwhile
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.parse()?);
        }
    }
    Ok(inodes)
}

fn replace_under_load_fails_no_request() -> Result<()> {
    let python = test_python()?;
    let here = Handover::new()?;
    let Handover {
        ns, client, dir, ..
    } = &here;
    // A container-like namespace of the client's, served by listeners planted there.
    let app = NetNs::new()?;
    let resident = resident(client, &app)?;
    let resident_pid = resident.0.as_ref().context("resident")?.id();
    let mut old = here.start(&[])?;
    old.assert_logged("--replace: no daemon answers");
    let id = url("/latest/meta-data/instance-id");
    assert_eq!(curl(client, &app, &[], &id)?, (200, INSTANCE_ID.into()));
    // The old daemon's listening sockets, here and in `app`.
    let held = socket_inodes(old.pid())?;
    let own: BTreeSet<u64> = listening_inodes(old.pid())?
        .intersection(&held)
        .copied()
        .collect();
    let planted: BTreeSet<u64> = listening_inodes(resident_pid)?
        .intersection(&held)
        .copied()
        .collect();
    // 127.0.0.1:8169 and a port per target; in `app`, a port per target.
    assert_eq!((own.len(), planted.len()), (3, 2), "{own:?} {planted:?}");
    let put = ["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 600")];
    let (_, token) = curl(client, ns, &put, &url("/latest/api/token"))?;
    // The load: requests one after another, each on a new connection, until told to stop.
    let stop = dir.path().join("stop");
    let script = format!(
        r#"
import json, os, urllib.request
ok, failed = 0, []
while not os.path.exists({stop:?}) or ok < 50:
    try:
        body = urllib.request.urlopen("http://169.254.169.254/latest/meta-data/instance-id", timeout=10).read()
        assert body == b"{INSTANCE_ID}", body
        ok += 1
    except Exception as e:
        failed.append(repr(e))
print(json.dumps({{"ok": ok, "failed": failed}}))
"#,
        stop = stop.display().to_string()
    );
    let load = command_in(&python, Some(client), Some(ns))?
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()?;
    let load = support::ChildGuard(Some(load));
    // And a client that keeps its connection, as the SDKs do: a new one only when told
    // `Connection: close` (or on a failure, which counts).
    let keep_alive = format!(
        r#"
import http.client, json, os
ok, failed, conns = 0, [], 1
conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
while not os.path.exists({stop:?}) or ok < 50:
    try:
        conn.request("GET", "/latest/meta-data/instance-id")
        resp = conn.getresponse()
        body = resp.read()
        assert body == b"{INSTANCE_ID}", body
        ok += 1
        if resp.will_close:
            conn.close(); conns += 1
            conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
    except Exception as e:
        failed.append(repr(e))
        conn.close(); conns += 1
        conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
print(json.dumps({{"ok": ok, "failed": failed, "connections": conns}}))
"#,
        stop = stop.display().to_string()
    );
    let kept = command_in(&python, Some(client), Some(ns))?
        .args(["-c", &keep_alive])
        .stdout(Stdio::piped())
        .spawn()?;
    let kept = support::ChildGuard(Some(kept));
    let new = here.start(&[])?;
    // The very sockets the old daemon listened on, not new ones on the same ports.
    let held = socket_inodes(new.pid())?;
    for (what, inodes) in [("its own", &own), ("app's", &planted)] {
        assert!(
            inodes.is_subset(&held),
            "{what} listening sockets {inodes:?} not handed over: {held:?}\n{}",
            new.log()
        );
    }
    new.assert_logged("took over from the daemon");
    new.assert_logged("adopted 5 program links");
    new.assert_logged("handed over its listening sockets: 3 of the proxy (on 127.0.0.1:8169, 127.0.0.1:8170, 127.0.0.1:8171), 2 in 1 other network namespace");
    let status = old.wait()?;
    assert_eq!(status.code(), Some(0), "{}", old.log());
    old.assert_logged("replaced by a new daemon");
    assert_eq!(curl(client, &app, &[], &id)?, (200, INSTANCE_ID.into()));
    std::fs::write(&stop, "")?;
    let out = load.wait_with_output()?;
    let got: serde_json::Value =
        serde_json::from_slice(&out).with_context(|| String::from_utf8_lossy(&out).into_owned())?;
    assert_eq!(got["failed"], serde_json::json!([]), "{got}");
    assert!(got["ok"].as_u64() >= Some(50), "{got}");
    let out = kept.wait_with_output()?;
    let got: serde_json::Value =
        serde_json::from_slice(&out).with_context(|| String::from_utf8_lossy(&out).into_owned())?;
    assert_eq!(got["failed"], serde_json::json!([]), "keep-alive: {got}");
    assert!(got["ok"].as_u64() >= Some(50), "keep-alive: {got}");
    // The old daemon's token, served by the new one; and the new one is the daemon here now.
    let auth = format!("X-aws-ec2-metadata-token: {token}");
    assert_eq!(
        curl(
            client,
            ns,
            &["-H", &auth],
            &url("/latest/meta-data/instance-id")
        )?,
        (200, INSTANCE_ID.into())
    );
    let pid = new.status(ns)?["pid"].as_u64();
    assert_eq!(pid, Some(u64::from(new.pid())));
    Ok(())
}

/// The new daemon adopts the pins, then fails (its --metrics-listen port is taken by someone
/// else): it hands them back, and the old daemon serves on with its own programs in them (its
/// counters move again), its pin lock retaken, so that a later replace still works.
fn a_replace_that_fails_midway_leaves_the_old_daemon_serving() -> Result<()> {
    let python = test_python()?;
    let here = Handover::new()?;
    let Handover { ns, client, .. } = &here;
    let mut old = here.start(&["--metrics-listen", "127.0.0.1:9180"])?;
    // Someone else's listener on the port the new daemon wants for its metrics.
    let squatter = command_in(&python, None, Some(ns))?
        .args([
            "-c",
            "import socket, sys\ns = socket.socket()\ns.bind(('127.0.0.1', 9181))\ns.listen()\nprint('listening', flush=True)\nsys.stdin.read()",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let (_squatter, said) = support::ChildGuard::first_line(squatter)?;
    assert_eq!(said.trim(), "listening");
    let id = url("/latest/meta-data/instance-id");
    assert_eq!(curl(client, ns, &[], &id)?, (200, INSTANCE_ID.into()));
    let rewritten = |d: &Daemon| -> Result<u64> {
        d.status(ns)?["counters"]["connect4_rewritten"]
            .as_u64()
            .context("connect4_rewritten")
    };
    let before = rewritten(&old)?;
    let stderr = run_daemon_expecting_failure({
        let mut cmd = command_in(DAEMON, None, Some(ns))?;
        cmd.arg("run")
            .args(here.args(&["--metrics-listen", "127.0.0.1:9181"]));
        cmd
    })?;
    assert!(
        stderr.contains("adopted 5 program links"),
        "it got as far as the pins: {stderr}"
    );
    assert!(
        stderr.contains("--metrics-listen 127.0.0.1:9181: cannot listen there"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the running daemon serves on as before"),
        "{stderr}"
    );
    old.wait_for_log("the new daemon gave up")?;
    // The old daemon, with its own programs: its counters count the rewrites again.
    for _ in 0..3 {
        assert_eq!(curl(client, ns, &[], &id)?, (200, INSTANCE_ID.into()));
    }
    assert!(rewritten(&old)? >= before + 3, "{}", old.log());
    assert_eq!(old.status(ns)?["pid"].as_u64(), Some(u64::from(old.pid())));
    // And a replace that works still can: the lock is the old daemon's again to hand over.
    let new = here.start(&["--metrics-listen", "127.0.0.1:9180"])?;
    new.assert_logged("took over from the daemon");
    assert_eq!(old.wait()?.code(), Some(0), "{}", old.log());
    assert_eq!(curl(client, ns, &[], &id)?, (200, INSTANCE_ID.into()));
    assert!(rewritten(&new)? >= 1, "{}", new.log());
    Ok(())
}

/// A stand-in for a daemon of an earlier version: it holds the proxy's ports (SO_REUSEPORT)
/// and answers the replace steps on the control socket without handing anything over, then,
/// told to finish, closes its ports and socket and exits.
const EARLIER_DAEMON: &str = r#"
import http.server, os, socket, socketserver, sys
ports = []
for port in (8169, 8170, 8171):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    ports.append(s)
class Control(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(b"ok\n")
    def do_POST(self):
        self.answer(b"pins released\n")
        if self.path == "/replace/finish":
            for s in ports:
                s.close()
            self.server.done = True
server = socketserver.UnixStreamServer(sys.argv[1], Control)
server.done = False
print("serving", flush=True)
while not server.done:
    server.handle_request()
server.server_close()
os.unlink(sys.argv[1])
"#;

/// `--replace` of a daemon that answers `/replace/prepare` without handing its sockets over
/// (an earlier version): the new daemon joins its ports with SO_REUSEPORT instead, takes over
/// the control socket, and serves.
fn a_daemon_that_hands_no_sockets_over_has_its_ports_joined() -> Result<()> {
    let python = test_python()?;
    let here = Handover::new()?;
    let Handover {
        ns, client, dir, ..
    } = &here;
    let earlier = command_in(&python, None, Some(ns))?
        .args(["-c", EARLIER_DAEMON])
        .arg(dir.path().join("control.sock"))
        .stdout(Stdio::piped())
        .spawn()?;
    let (mut earlier, said) = support::ChildGuard::first_line(earlier)?;
    assert_eq!(said.trim(), "serving");
    let new = here.start(&[])?;
    new.assert_logged("--replace: pins released; its ports are joined (SO_REUSEPORT) as it handed over no sockets");
    new.assert_logged("took over from the daemon");
    let status = earlier.0.take().context("stand-in")?.wait()?;
    assert!(status.success(), "the stand-in exits once told to finish");
    let id = url("/latest/meta-data/instance-id");
    assert_eq!(curl(client, ns, &[], &id)?, (200, INSTANCE_ID.into()));
    assert_eq!(new.status(ns)?["pid"].as_u64(), Some(u64::from(new.pid())));
    Ok(())
}
