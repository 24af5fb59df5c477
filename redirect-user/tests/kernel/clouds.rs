//! One daemon, several clouds: the config's `[[policy]]` rules give each caller its cloud
//! and its identity there, and each caller sees exactly that one cloud.

use anyhow::Result;

use super::{Daemon, INSTANCE_ID, NetNs, TestCgroup, curl, support, url};

pub const TESTS: &[(&str, super::TestFn)] = &[(
    "one_daemon_serves_each_caller_its_cloud",
    one_daemon_serves_each_caller_its_cloud,
)];

fn one_daemon_serves_each_caller_its_cloud() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let attached = cg.child("attached")?;
    let aws = attached.join("aws-app.service");
    let azure = attached.join("azure-app.service");
    std::fs::create_dir(&aws)?;
    std::fs::create_dir(&azure)?;
    let mount = support::cgroup2_mount()?;
    let name = |p: &std::path::Path| format!("/{}", p.strip_prefix(&mount).unwrap().display());
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    std::fs::write(
        &config,
        format!(
            "mock = \"ec2\"\n[[policy]]\ncgroup = \"{}\"\ncloud = \"azure\"\nidentity = \"redirect-mock-identity\"\n",
            name(&azure)
        ),
    )?;
    let _daemon = Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--cgroup",
            attached.to_str().unwrap(),
        ],
        &ns,
        None,
    )?;
    let id = url("/latest/meta-data/instance-id");
    let md = ["-H", "Metadata: true"];
    let instance = url("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text");
    assert_eq!(curl(&aws, &ns, &[], &id)?, (200, INSTANCE_ID.into()));
    assert_eq!(
        curl(&aws, &ns, &md, &instance)?.0,
        404,
        "EC2 has no /metadata"
    );
    assert_eq!(
        curl(&azure, &ns, &md, &instance)?,
        (200, "02aab8a4-74ef-476e-8182-f6d2ba4166a6".into())
    );
    assert_eq!(curl(&azure, &ns, &md, &id)?.0, 404, "Azure has no /latest");
    // Its identity is the one the rule names, and the VM's others are not its to take.
    let token = url(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com",
    );
    let (status, body) = curl(&azure, &ns, &md, &token)?;
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        (status, &body["client_id"]),
        (200, &"5b0c7d1e-8f2a-4c3b-9d4e-6a1f0b2c3d55".into()),
        "{body}"
    );
    let system = format!("{token}&client_id=9a2ab0b7-2d9f-4f4e-a3a6-2f1a8b0e5c11");
    assert_eq!(curl(&azure, &ns, &md, &system)?.0, 400);
    Ok(())
}
