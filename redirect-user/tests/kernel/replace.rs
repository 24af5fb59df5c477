//! `redirect run --replace` under a steady load: the new daemon joins the old one's ports,
//! adopts its pinned programs, and the old one finishes its requests and exits; no request
//! fails, and IMDSv2 tokens issued by the old one stay valid. With no daemon running,
//! `--replace` just starts.

use std::process::Stdio;

use anyhow::{Context as _, Result};

use super::{
    Daemon, INSTANCE_ID, NetNs, TOKEN_TTL, TestCgroup, command_in, curl, support, test_python, url,
};

pub const TESTS: &[(&str, super::TestFn)] = &[(
    "replace_under_load_fails_no_request",
    replace_under_load_fails_no_request,
)];

fn replace_under_load_fails_no_request() -> Result<()> {
    let python = test_python()?;
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let dir = tempfile::tempdir()?;
    let pins = support::PinDirGuard::new();
    let control = dir.path().join("control.sock");
    let state = dir.path().join("state");
    let args = [
        "--mock",
        "--cgroup",
        client.to_str().unwrap(),
        "--control-socket",
        control.to_str().unwrap(),
        "--pin-dir",
        pins.arg(),
        "--state-dir",
        state.to_str().unwrap(),
        "--replace",
    ];
    let mut old = Daemon::start(&args, &ns, None)?;
    assert!(
        old.log().contains("--replace: no daemon answers"),
        "{}",
        old.log()
    );
    let put = ["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 600")];
    let (_, token) = curl(&client, &ns, &put, &url("/latest/api/token"))?;
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
    let load = command_in(&python, Some(&client), Some(&ns))?
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()?;
    let load = support::ChildGuard(Some(load));
    let new = Daemon::start(&args, &ns, None)?;
    assert!(
        new.log().contains("took over from the daemon"),
        "{}",
        new.log()
    );
    assert!(
        new.log().contains("adopted 5 program links"),
        "{}",
        new.log()
    );
    let status = old.wait()?;
    assert_eq!(status.code(), Some(0), "{}", old.log());
    assert!(
        old.log().contains("replaced by a new daemon"),
        "{}",
        old.log()
    );
    std::fs::write(&stop, "")?;
    let out = load.wait_with_output()?;
    let got: serde_json::Value =
        serde_json::from_slice(&out).with_context(|| String::from_utf8_lossy(&out).into_owned())?;
    assert_eq!(got["failed"], serde_json::json!([]), "{got}");
    assert!(got["ok"].as_u64() >= Some(50), "{got}");
    // The old daemon's token, served by the new one; and the new one is the daemon here now.
    let auth = format!("X-aws-ec2-metadata-token: {token}");
    assert_eq!(
        curl(
            &client,
            &ns,
            &["-H", &auth],
            &url("/latest/meta-data/instance-id")
        )?,
        (200, INSTANCE_ID.into())
    );
    let pid = new.status(&ns)?["pid"].as_u64();
    assert_eq!(pid, Some(u64::from(new.pid())));
    Ok(())
}
