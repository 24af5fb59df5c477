//! The OpenStack and CloudStack mocks through the redirect, crawled by cloud-init's
//! datasources as on a VM: OpenStack's `/openstack/` documents and the EC2-style tree;
//! CloudStack's router, found by the `data-server` name, and its password server on 8080.

use anyhow::{Context as _, Result};

use super::{
    Daemon, MODES, MockSetup, Mode, NetNs, TestCgroup, cloud_setup, curl, python_with_hosts, url,
};

pub const TESTS: &[(&str, super::TestFn)] = &[
    (
        "cloud_init_openstack_reads_metadata_network_data_and_the_ec2_tree",
        cloud_init_openstack_reads_metadata_network_data_and_the_ec2_tree,
    ),
    (
        "cloud_init_cloudstack_finds_the_router_and_its_password",
        cloud_init_cloudstack_finds_the_router_and_its_password,
    ),
];

fn cloud_init() -> Result<String> {
    std::env::var("REDIRECT_TEST_CLOUD_INIT").context(
        "REDIRECT_TEST_CLOUD_INIT is not set: run the tests with `cargo xtask test`, which unpacks cloud-init",
    )
}

fn cloud_init_openstack_reads_metadata_network_data_and_the_ec2_tree() -> Result<()> {
    let cloud_init = cloud_init()?;
    for mode in MODES {
        let s = cloud_setup("openstack", mode, &[])?;
        let script = r#"
import json
from cloudinit.sources import DataSourceOpenStack
from cloudinit.sources.helpers import openstack
md = DataSourceOpenStack.read_metadata_service("http://169.254.169.254", timeout=5, retries=0)
mac = md["networkdata"]["links"][0]["ethernet_mac_address"]
net = openstack.convert_net_json(md["networkdata"], known_macs={mac: "eth0"})
meta = md["metadata"]
print(json.dumps({"uuid": meta.get("uuid"), "hostname": meta.get("hostname"),
                  "keys": meta.get("public_keys"), "seed": bool(meta.get("random_seed")),
                  "ec2_id": md["ec2-metadata"].get("instance-id"),
                  "net": net, "vendor": md.get("vendordata2")}))
"#;
        let got = python_with_hosts(&s, "", &["OS_"], script, Some(&cloud_init))
            .with_context(|| format!("{mode:?} mode"))?;
        assert!(got["uuid"].as_str().is_some_and(|u| u.len() == 36), "{got}");
        assert!(got["hostname"].as_str().is_some(), "{got}");
        assert!(got["seed"].as_bool() == Some(true), "{got}");
        assert!(got["keys"].to_string().contains("ssh-"), "{mode:?}: {got}");
        assert!(
            got["ec2_id"].as_str().is_some_and(|i| i.starts_with("i-")),
            "{got}"
        );
        let nic = &got["net"]["config"][0];
        assert_eq!(nic["type"], "physical", "{got}");
        assert_eq!(nic["name"], "eth0", "{got}");
        assert_eq!(nic["subnets"][0]["address"], "10.0.0.42", "{got}");
        // EC2's token PUT, as nova answers it: not there (botocore then asks tokenless).
        let (status, _) = curl(
            &s.client,
            &s.ns,
            &[
                "-X",
                "PUT",
                "-H",
                "X-aws-ec2-metadata-token-ttl-seconds: 60",
            ],
            &url("/latest/api/token"),
        )?;
        assert_eq!(status, 404, "{mode:?}");
    }
    Ok(())
}

/// cloud-init's whole CloudStack datasource, `data-server` naming 169.254.169.254: in mock
/// mode the mock answers; in proxy mode `--upstream cloudstack` forwards to the router (the
/// mock on 80 and on 8080 of an address in a lease, standing in for apache and the
/// password server).
fn cloud_init_cloudstack_finds_the_router_and_its_password() -> Result<()> {
    let cloud_init = cloud_init()?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mock.toml");
    std::fs::write(
        &config,
        "[cloudstack]\npassword = \"correct-horse\"\nuser_data = \"#cloud-config\\n\"\n",
    )?;
    let mock_config = ["--config", config.to_str().unwrap()];
    let s = cloud_setup("cloudstack", Mode::Mock, &mock_config)?;
    cloudstack_datasource(&s, &cloud_init).context("mock mode")?;

    let ns = NetNs::new()?;
    ns.ip(&["addr", "add", "10.1.1.1/32", "dev", "lo"])?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let router = |port: &str, idle: &str| -> Result<Daemon> {
        let idle = cg.child(idle)?;
        let listen = format!("10.1.1.1:{port}");
        let mut args = vec!["--mock", "cloudstack", "--listen", &listen, "--cgroup"];
        args.push(idle.to_str().unwrap());
        args.extend_from_slice(&mock_config);
        Daemon::start(&args, &ns, None)
    };
    let apache = router("80", "apache")?;
    let password_server = router("8080", "password")?;
    let leases = tempfile::tempdir()?;
    std::fs::write(leases.path().join("2"), "SERVER_ADDRESS=10.1.1.1\n")?;
    let front = dir.path().join("front.toml");
    std::fs::write(
        &front,
        format!(
            "upstream = \"cloudstack\"\ncgroups = [{:?}]\n[cloudstack_router]\nlease_dirs = [{:?}]\n",
            client.to_str().unwrap(),
            leases.path().to_str().unwrap()
        ),
    )?;
    let daemon = Daemon::start(&["--config", front.to_str().unwrap()], &ns, None)?;
    daemon.wait_for_log("CloudStack virtual router: 10.1.1.1")?;
    let s = MockSetup {
        daemon,
        stand_in: Some(apache),
        client,
        cg,
        ns,
    };
    cloudstack_datasource(&s, &cloud_init).context("proxy mode")?;
    drop(password_server);
    Ok(())
}

fn cloudstack_datasource(s: &MockSetup, cloud_init: &str) -> Result<()> {
    let seed = tempfile::tempdir()?;
    // The whole datasource: router by `data-server`, crawl, password (fetched, then
    // acknowledged: asked again, the server says it was saved).
    let script = format!(
        r#"
import json
from cloudinit import helpers
from cloudinit.sources import DataSourceCloudStack as cs
paths = helpers.Paths({{"cloud_dir": "{seed}", "run_dir": "{seed}"}})
ds = cs.DataSourceCloudStack({{}}, None, paths)
ok = ds._get_data()
again = cs.CloudStackPasswordServerClient(ds.vr_addr).get_password()
print(json.dumps({{"ok": ok, "router": ds.vr_addr, "id": ds.get_instance_id(),
                   "zone": ds.availability_zone, "keys": ds.metadata.get("public-keys"),
                   "user_data": ds.userdata_raw.decode() if ds.userdata_raw else None,
                   "password": ds.cfg.get("password"), "again": again}}))
"#,
        seed = seed.path().display()
    );
    let got = python_with_hosts(
        s,
        "169.254.169.254 data-server\n",
        &[],
        &script,
        Some(cloud_init),
    )?;
    assert_eq!(got["ok"], true, "{got}");
    assert_eq!(got["router"], "169.254.169.254", "{got}");
    assert_eq!(got["id"], "2f8a4b1c-7d3e-4f5a-9b6c-1d2e3f4a5b6c", "{got}");
    assert_eq!(got["zone"], "zone1", "{got}");
    assert!(got["keys"].to_string().contains("ssh-ed25519"), "{got}");
    assert_eq!(got["user_data"], "#cloud-config\n", "{got}");
    assert_eq!(got["password"], "correct-horse", "{got}");
    assert_eq!(got["again"], serde_json::Value::Null, "acknowledged: {got}");
    Ok(())
}
