//! Upstream mode's credential cache, against the mock standing in for the real service at
//! 169.254.169.254 in the test's namespace: hundreds of callers asking at once cost it one
//! request, and cached credentials are served while it is down.

use anyhow::{Context as _, Result};

use super::{Mode, TOKEN_TTL, cloud_setup, command_in, curl, sh, test_python, url};

pub const TESTS: &[(&str, super::TestFn)] = &[(
    "concurrent_callers_cost_one_upstream_request_and_survive_its_outage",
    concurrent_callers_cost_one_upstream_request_and_survive_its_outage,
)];

const CREDS: &str = "/latest/meta-data/iam/security-credentials/redirect-mock-role";

fn concurrent_callers_cost_one_upstream_request_and_survive_its_outage() -> Result<()> {
    let python = test_python()?;
    let mut s = cloud_setup("ec2", Mode::Proxy, &["--http-tokens", "required"])?;
    let stand_in = s.stand_in.as_ref().context("proxy mode has a stand-in")?;
    let upstream_requests = |stand_in: &super::Daemon| -> Result<u64> {
        stand_in.status(&s.ns)?["proxy"]["requests"]
            .as_u64()
            .context("requests")
    };
    // 500 callers at once, each with its own token PUT and credentials GET.
    let script = format!(
        r#"
import json, threading, urllib.request
results = []
def ask():
    put = urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
                                 headers={{"{TOKEN_TTL}": "21600"}})
    token = urllib.request.urlopen(put, timeout=30).read().decode()
    get = urllib.request.Request("http://169.254.169.254{CREDS}",
                                 headers={{"X-aws-ec2-metadata-token": token}})
    results.append(json.loads(urllib.request.urlopen(get, timeout=30).read())["AccessKeyId"])
threads = [threading.Thread(target=ask) for _ in range(500)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({{"served": len(results), "keys": sorted(set(results))}}))
"#
    );
    let out = sh(command_in(&python, Some(&s.client), Some(&s.ns))?.args(["-c", &script]))?;
    let got: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    assert_eq!(got["served"], 500, "{got}");
    assert_eq!(got["keys"], serde_json::json!(["ASIAIOSFODNN7EXAMPLE"]));
    assert_eq!(
        upstream_requests(stand_in)?,
        2,
        "one token PUT and one credentials GET reached the real service"
    );
    // A token and the credentials, then the real service goes away.
    let (status, token) = curl(
        &s.client,
        &s.ns,
        &["-X", "PUT", "-H", &format!("{TOKEN_TTL}: 60")],
        &url("/latest/api/token"),
    )?;
    assert_eq!(status, 200);
    drop(s.stand_in.take());
    let auth = format!("X-aws-ec2-metadata-token: {token}");
    let (status, body) = curl(&s.client, &s.ns, &["-H", &auth], &url(CREDS))?;
    assert_eq!(
        status, 200,
        "served from the cache while the service is down: {body}"
    );
    assert!(body.contains("ASIAIOSFODNN7EXAMPLE"), "{body}");
    let (status, _) = curl(
        &s.client,
        &s.ns,
        &["-H", &auth],
        &url("/latest/meta-data/instance-id"),
    )?;
    assert_eq!(status, 502, "what is not cached fails as the service does");
    // A forged token never gets the cached credentials.
    let (status, _) = curl(
        &s.client,
        &s.ns,
        &["-H", "X-aws-ec2-metadata-token: forged"],
        &url(CREDS),
    )?;
    assert_eq!(
        status, 502,
        "forwarded for the service to judge, and it is down"
    );
    Ok(())
}
