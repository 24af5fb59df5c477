//! The built-in Azure IMDS through the redirect: azure-identity's credentials (system- and
//! user-assigned identities, DefaultAzureCredential's probe), cloud-init's Azure datasource
//! reading the instance document, and every refusal with the real service's status and body.

use anyhow::{Context as _, Result};

use super::{MODES, MockSetup, Mode, cloud_setup, curl, python_with_hosts, url};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "azure_identity_gets_tokens_for_system_and_user_assigned_identities",
        azure_identity_gets_tokens_for_system_and_user_assigned_identities,
    ),
    (
        "azure_refusals_are_the_real_services",
        azure_refusals_are_the_real_services,
    ),
    (
        "cloud_init_azure_reads_the_instance_document",
        cloud_init_azure_reads_the_instance_document,
    ),
];

const USER_CLIENT_ID: &str = "5b0c7d1e-8f2a-4c3b-9d4e-6a1f0b2c3d55";
const SYSTEM_CLIENT_ID: &str = "9a2ab0b7-2d9f-4f4e-a3a6-2f1a8b0e5c11";

/// Runs `script` with the test Python in the client cgroup, with no Azure settings of the
/// host's; its last line is JSON.
fn python_json(s: &MockSetup, script: &str, path: Option<&str>) -> Result<serde_json::Value> {
    python_with_hosts(s, "", &["AZURE_", "IDENTITY_", "MSI_"], script, path)
}

fn azure_identity_gets_tokens_for_system_and_user_assigned_identities() -> Result<()> {
    for mode in MODES {
        azure_identity(mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn azure_identity(mode: Mode) -> Result<()> {
    let s = cloud_setup("azure", mode, &[])?;
    let script = format!(
        r#"
import base64, json, time
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
def claims(token):
    part = token.token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
system = ManagedIdentityCredential().get_token("https://management.azure.com/.default")
user = ManagedIdentityCredential(client_id="{USER_CLIENT_ID}").get_token("https://vault.azure.net/.default")
default = DefaultAzureCredential().get_token("https://storage.azure.com/.default")
print(json.dumps({{
    "system": claims(system), "user": claims(user), "default": claims(default),
    "expires_in": system.expires_on - time.time(),
}}))
"#
    );
    let got = python_json(&s, &script, None)?;
    assert_eq!(got["system"]["appid"], SYSTEM_CLIENT_ID, "{got}");
    assert_eq!(
        got["system"]["aud"], "https://management.azure.com",
        "{got}"
    );
    assert_eq!(got["user"]["appid"], USER_CLIENT_ID, "{got}");
    assert_eq!(got["user"]["aud"], "https://vault.azure.net", "{got}");
    assert_eq!(got["default"]["appid"], SYSTEM_CLIENT_ID, "{got}");
    let expires_in = got["expires_in"].as_f64().context("expires_in")?;
    assert!(expires_in > 3600.0, "{got}");
    // A client id the VM does not have: the client gives up at once on the 400.
    let unknown = r#"
import json
from azure.identity import ManagedIdentityCredential
try:
    ManagedIdentityCredential(client_id="00000000-0000-0000-0000-000000000000").get_token("https://management.azure.com/.default")
    print(json.dumps({"error": None}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"#;
    let got = python_json(&s, unknown, None)?;
    assert_eq!(got["error"], "CredentialUnavailableError", "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Identity not found"),
        "{got}"
    );
    Ok(())
}

fn azure_refusals_are_the_real_services() -> Result<()> {
    for mode in MODES {
        azure_refusals(mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn azure_refusals(mode: Mode) -> Result<()> {
    let s = cloud_setup("azure", mode, &[])?;
    let md = ["-H", "Metadata: true"];
    let instance = url("/metadata/instance?api-version=2021-08-01");
    assert_eq!(
        curl(&s.client, &s.ns, &[], &instance)?,
        (
            400,
            r#"{"error":"Bad request. Required metadata header not specified"}"#.into()
        )
    );
    let token = url(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com",
    );
    assert_eq!(
        curl(&s.client, &s.ns, &[], &token)?,
        (
            400,
            r#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"#.into()
        ),
        "DefaultAzureCredential's probe: any non-2xx says IMDS is there"
    );
    let (status, body) = curl(&s.client, &s.ns, &md, &url("/metadata/instance"))?;
    assert_eq!(status, 400);
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Bad request. api-version was not specified"),
        "{body}"
    );
    assert!(body["newest-versions"].is_array(), "{body}");
    let (status, _) = curl(
        &s.client,
        &s.ns,
        &md,
        &url("/metadata/instance?api-version=1999-01-01"),
    )?;
    assert_eq!(status, 400);
    let (status, body) = curl(
        &s.client,
        &s.ns,
        &md,
        &format!("{token}&client_id=00000000-0000-0000-0000-000000000000"),
    )?;
    assert_eq!(
        (status, body.as_str()),
        (
            400,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#
        )
    );
    let xff = ["-H", "Metadata: true", "-H", "X-Forwarded-For: 10.9.9.9"];
    assert_eq!(curl(&s.client, &s.ns, &xff, &token)?.0, 400, "forwarded");
    let post = ["-H", "Metadata: true", "-X", "POST"];
    assert_eq!(curl(&s.client, &s.ns, &post, &instance)?.0, 405);
    let (status, body) = curl(&s.client, &s.ns, &md, &instance)?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// cloud-init's Azure datasource fetches the instance document as on a VM (api-version
/// 2021-08-01, `extended=true`) and takes the admin user, its SSH key and the NIC from it.
fn cloud_init_azure_reads_the_instance_document() -> Result<()> {
    let cloud_init = std::env::var("REDIRECT_TEST_CLOUD_INIT").context(
        "REDIRECT_TEST_CLOUD_INIT is not set: run the tests with `cargo xtask test`, which unpacks cloud-init",
    )?;
    for mode in MODES {
        cloud_init_azure(&cloud_init, mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn cloud_init_azure(cloud_init: &str, mode: Mode) -> Result<()> {
    let s = cloud_setup("azure", mode, &[])?;
    // The datasource's own steps: the IMDS fetch with its version fallback, then what it
    // takes from the document (22.4's module-level helpers).
    let script = r#"
import json
from cloudinit.sources import DataSourceAzure as az
md = az.DataSourceAzure.get_imds_data_with_api_fallback(None, retries=0)
print(json.dumps({
    "username": az._username_from_imds(md),
    "hostname": az._hostname_from_imds(md),
    "disable_password": az._disable_password_from_imds(md),
    "keys": az.DataSourceAzure._get_public_keys_from_imds(None, md),
    "pps": md["extended"]["compute"]["ppsType"],
    "net": az.generate_network_config_from_instance_network_metadata(md["network"]),
}))
"#;
    let got = python_json(&s, script, Some(cloud_init))?;
    assert_eq!(got["username"], "azureuser", "{got}");
    assert_eq!(got["hostname"], "redirect-mock-vm", "{got}");
    assert_eq!(got["disable_password"], true, "{got}");
    assert!(
        got["keys"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("ssh-ed25519 "),
        "{got}"
    );
    assert_eq!(got["pps"], "None", "{got}");
    let eth0 = &got["net"]["ethernets"]["eth0"];
    assert_eq!(eth0["match"]["macaddress"], "00:0d:3a:1b:2c:3d", "{got}");
    assert_eq!(eth0["dhcp4"], true, "{got}");
    Ok(())
}
