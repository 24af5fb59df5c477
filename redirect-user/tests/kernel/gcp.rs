//! The built-in GCE metadata server through the redirect: google-auth's detection, token
//! refresh and ID token, cloud-init's GCE datasource, the long poll, and the refusals. As on
//! a real VM, `metadata.google.internal` resolves to 169.254.169.254 through `/etc/hosts`
//! (here a private copy, bind-mounted in the client's own mount namespace).

use anyhow::{Context as _, Result};

use super::{
    MODES, MockSetup, Mode, cloud_setup, command_in, curl, python_with_hosts, sh, support, url,
};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "google_auth_detects_gce_and_gets_access_and_id_tokens",
        google_auth_detects_gce_and_gets_access_and_id_tokens,
    ),
    (
        "cloud_init_gce_reads_instance_and_project_metadata",
        cloud_init_gce_reads_instance_and_project_metadata,
    ),
    (
        "gcp_header_rules_and_long_poll",
        gcp_header_rules_and_long_poll,
    ),
    (
        "a_changed_value_wakes_its_long_poll",
        a_changed_value_wakes_its_long_poll,
    ),
];

const ACCOUNT: &str = "123456789012-compute@developer.gserviceaccount.com";

/// Runs `script` with `metadata.google.internal` in the client's `/etc/hosts`, as on a VM,
/// and no Google settings of the host's.
fn python_json(s: &MockSetup, script: &str, path: Option<&str>) -> Result<serde_json::Value> {
    let hosts = "169.254.169.254 metadata.google.internal metadata\n";
    python_with_hosts(s, hosts, &["GOOGLE_", "GCE_", "CLOUDSDK_"], script, path)
}

fn google_auth_detects_gce_and_gets_access_and_id_tokens() -> Result<()> {
    for mode in MODES {
        google_auth(mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn google_auth(mode: Mode) -> Result<()> {
    let s = cloud_setup("gcp", mode, &[])?;
    let script = r#"
import base64, datetime, json
import google.auth
import google.auth.transport.requests
from google.auth import compute_engine
request = google.auth.transport.requests.Request()
creds, project = google.auth.default()
creds.refresh(request)
first = creds.token
creds.refresh(request)
ident = compute_engine.IDTokenCredentials(request, "https://app.example.com",
                                          use_metadata_identity_endpoint=True)
ident.refresh(request)
part = ident.token.split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
left = (creds.expiry - datetime.datetime.utcnow()).total_seconds()
print(json.dumps({"project": project, "token": first, "again": creds.token,
                  "email": creds.service_account_email, "left": left, "claims": claims}))
"#;
    let got = python_json(&s, script, None)?;
    assert_eq!(got["project"], "redirect-mock", "{got}");
    assert_eq!(
        got["token"], "ya29.redirect-mock-access-token-not-valid-anywhere",
        "{got}"
    );
    assert_eq!(got["again"], got["token"], "{got}");
    assert_eq!(got["email"], ACCOUNT, "{got}");
    assert!(got["left"].as_f64().unwrap_or_default() > 1000.0, "{got}");
    assert_eq!(got["claims"]["aud"], "https://app.example.com", "{got}");
    assert!(got["claims"]["exp"].as_u64().is_some(), "{got}");
    Ok(())
}

fn cloud_init_gce_reads_instance_and_project_metadata() -> Result<()> {
    let cloud_init = std::env::var("REDIRECT_TEST_CLOUD_INIT").context(
        "REDIRECT_TEST_CLOUD_INIT is not set: run the tests with `cargo xtask test`, which unpacks cloud-init",
    )?;
    for mode in MODES {
        let s = cloud_setup("gcp", mode, &[])?;
        // platform_check reads DMI, which says GCE only on a GCE VM.
        let script = r#"
import json, types
from cloudinit.sources import DataSourceGCE
params = types.SimpleNamespace(num_retries=0, sec_between_retries=0)
ret = DataSourceGCE.read_md(url_params=params, platform_check=False)
md = ret["meta-data"] or {}
print(json.dumps({"success": ret["success"], "reason": ret["reason"],
                  "instance_id": md.get("instance-id"), "zone": md.get("availability-zone"),
                  "hostname": md.get("local-hostname"), "keys": md.get("public-keys-data")}))
"#;
        let got =
            python_json(&s, script, Some(&cloud_init)).with_context(|| format!("{mode:?}"))?;
        assert_eq!(got["success"], true, "{mode:?}: {got}");
        assert_eq!(got["instance_id"], "4520031799277581759", "{got}");
        assert_eq!(got["zone"], "us-central1-a", "{got}");
        assert_eq!(
            got["hostname"], "redirect-mock.us-central1-a.c.redirect-mock.internal",
            "{got}"
        );
        assert!(
            got["keys"][0]
                .as_str()
                .unwrap_or_default()
                .starts_with("redirect:ssh-ed25519 "),
            "{got}"
        );
    }
    Ok(())
}

fn gcp_header_rules_and_long_poll() -> Result<()> {
    for mode in MODES {
        gcp_rules(mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn gcp_rules(mode: Mode) -> Result<()> {
    let s = cloud_setup("gcp", mode, &[])?;
    let flavor = ["-H", "Metadata-Flavor: Google"];
    let id = url("/computeMetadata/v1/instance/id");
    assert_eq!(
        curl(&s.client, &s.ns, &flavor, &id)?,
        (200, "4520031799277581759".into())
    );
    let (status, body) = curl(&s.client, &s.ns, &[], &id)?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("Missing Metadata-Flavor:Google header"),
        "{body}"
    );
    let xff = [
        "-H",
        "Metadata-Flavor: Google",
        "-H",
        "X-Forwarded-For: 10.0.0.9",
    ];
    assert_eq!(curl(&s.client, &s.ns, &xff, &id)?.0, 403, "forwarded");
    // The root probe answers with the header, whatever the request carries.
    let head = sh(command_in("curl", Some(&s.client), Some(&s.ns))?
        .args(["-sS", "-o", "/dev/null", "-D", "-", "--max-time", "20"])
        .arg(url("/")))?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("metadata-flavor: google"),
        "{head}"
    );
    // recursive=true: JSON.
    let (status, body) = curl(
        &s.client,
        &s.ns,
        &flavor,
        &url("/computeMetadata/v1/instance/service-accounts/default/?recursive=true"),
    )?;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(doc["email"], ACCOUNT, "{doc}");
    // A long poll whose value does not change ends at its timeout with the value.
    let (status, body) = curl(
        &s.client,
        &s.ns,
        &flavor,
        &url("/computeMetadata/v1/instance/id?wait_for_change=true&timeout_sec=1"),
    )?;
    assert_eq!((status, body.as_str()), (200, "4520031799277581759"));
    Ok(())
}

/// `wait_for_change` with `last_etag`: answered when SIGHUP serves a new value from the
/// config, through the proxy's hold of the long poll too.
fn a_changed_value_wakes_its_long_poll() -> Result<()> {
    for mode in MODES {
        long_poll_woken(mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn long_poll_woken(mode: Mode) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    let write = |role: &str| {
        std::fs::write(
            &config,
            format!("[gcp]\ninstance_attributes = {{ role = \"{role}\" }}\n"),
        )
    };
    write("blue")?;
    let s = cloud_setup("gcp", mode, &["--config", config.to_str().unwrap()])?;
    let mock = s.stand_in.as_ref().unwrap_or(&s.daemon);
    let attribute = url("/computeMetadata/v1/instance/attributes/role");
    let head = sh(command_in("curl", Some(&s.client), Some(&s.ns))?
        .args([
            "-sS",
            "-D",
            "-",
            "--max-time",
            "20",
            "-H",
            "Metadata-Flavor: Google",
        ])
        .arg(&attribute))?;
    let etag = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("etag:")
                .map(|v| v.trim().to_owned())
        })
        .with_context(|| format!("no ETag: {head}"))?;
    assert!(head.ends_with("blue"), "{head}");
    let waiting = command_in("curl", Some(&s.client), Some(&s.ns))?
        .args(["-sS", "--max-time", "120", "-H", "Metadata-Flavor: Google"])
        .arg(format!(
            "{attribute}?wait_for_change=true&timeout_sec=100&last_etag={etag}"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let waiting = support::ChildGuard(Some(waiting));
    write("green")?;
    mock.signal(libc::SIGHUP)?;
    mock.wait_for_log("SIGHUP: serving the new [gcp] values")?;
    let out = waiting.wait_with_output()?;
    assert_eq!(String::from_utf8_lossy(&out), "green");
    Ok(())
}
