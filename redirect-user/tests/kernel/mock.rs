//! The built-in EC2 mock through the redirect, with real clients: curl, reqwest, boto3; the config file.

use super::*;

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "cloud_init_ec2_crawls_the_whole_tree_and_builds_network_config",
        cloud_init_ec2_crawls_the_whole_tree_and_builds_network_config,
    ),
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
        "awscli_finds_the_instance_role_credentials",
        awscli_finds_the_instance_role_credentials,
    ),
    (
        "config_file_and_flag_overrides",
        config_file_and_flag_overrides,
    ),
];

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
        Some(5)
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
    for mode in MODES {
        boto3(mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn boto3(mode: Mode) -> Result<()> {
    let python = test_python()?;
    // IMDSv2 only, so the SDK must do the token dance through the redirect.
    let s = cloud_setup("ec2", mode, &["--http-tokens", "required"])?;
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
    let out = sh(aws_isolated(&mut cmd, home.path()).args(["-c", script]))?;
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

/// awscli (v1, from PyPI) resolves its credentials from the instance role, IMDSv2 only; its
/// `configure list` names where they came from (nothing else here may leave the namespace).
fn awscli_finds_the_instance_role_credentials() -> Result<()> {
    let python = test_python()?;
    let aws = Path::new(&python).with_file_name("aws");
    for mode in MODES {
        let s = cloud_setup("ec2", mode, &["--http-tokens", "required"])?;
        let home = tempfile::tempdir()?;
        let mut cmd = command_in(&aws, Some(&s.client), Some(&s.ns))?;
        let out = sh(aws_isolated(&mut cmd, home.path()).args(["configure", "list"]))
            .with_context(|| format!("{mode:?} mode"))?;
        let access = out
            .lines()
            .find(|l| l.trim_start().starts_with("access_key"))
            .with_context(|| out.clone())?;
        assert!(
            access.contains("MPLE") && access.contains("iam-role"),
            "{mode:?}: {out}"
        );
    }
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

/// cloud-init's Ec2 datasource (Debian's package, unpacked by `cargo xtask test`) crawls the
/// mock's whole `meta-data/` tree by its listings, as on an instance (any listed entry that
/// does not answer throws the crawl away), then builds its network configuration from
/// `network/interfaces/macs/<mac>/` and finds the launch key under `public-keys/`.
fn cloud_init_ec2_crawls_the_whole_tree_and_builds_network_config() -> Result<()> {
    let python = test_python()?;
    let cloud_init = std::env::var("REDIRECT_TEST_CLOUD_INIT").context(
        "REDIRECT_TEST_CLOUD_INIT is not set: run the tests with `cargo xtask test`, which unpacks cloud-init",
    )?;
    for mode in MODES {
        cloud_init_ec2(&python, &cloud_init, mode).with_context(|| format!("{mode:?} mode"))?;
    }
    Ok(())
}

fn cloud_init_ec2(python: &str, cloud_init: &str, mode: Mode) -> Result<()> {
    let s = cloud_setup("ec2", mode, &[])?;
    let script = r#"
import json
from cloudinit.sources.helpers import ec2
from cloudinit.sources import DataSourceEc2
md = ec2.get_instance_metadata(api_version="2021-03-23",
                               metadata_address="http://169.254.169.254", retries=0)
mac = md["mac"]
net = DataSourceEc2.convert_ec2_metadata_network_config(md["network"], macs_to_nics={mac: "eth0"})
print(json.dumps({"instance_id": md["instance-id"], "keys": md["public-keys"],
                  "az_id": md["placement"]["availability-zone-id"], "net": net}))
"#;
    let out = sh(command_in(python, Some(&s.client), Some(&s.ns))?
        .env("PYTHONPATH", cloud_init)
        .args(["-c", script]))?;
    let got: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    assert_eq!(got["instance_id"], INSTANCE_ID, "{got}");
    assert_eq!(got["az_id"], "use1-az6", "{got}");
    let keys = got["keys"].to_string();
    assert!(keys.contains("ssh-ed25519 AAAA"), "{got}");
    let eth0 = &got["net"]["ethernets"]["eth0"];
    assert_eq!(eth0["match"]["macaddress"], "0e:49:61:0f:c3:11", "{got}");
    assert_eq!(eth0["dhcp4"], true, "{got}");
    Ok(())
}
