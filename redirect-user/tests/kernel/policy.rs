//! Policy per container, from its `redirect.*` labels and the config's `[[policy]]` rules, on
//! the identity the namespace attests: denied, limited to some paths, or given a role of its
//! own by the mock. Applied from the container's very first request.

use anyhow::Result;

use super::{Daemon, INSTANCE_ID, NetNs, TestCgroup, support};

pub const TESTS: &[(&str, super::TestFn)] = &[(
    "config_rules_apply_to_every_caller_after_sighup",
    config_rules_apply_to_every_caller_after_sighup,
)];

/// The tests that drive Docker: kind `[docker]` (`--skip '[docker]'` leaves them out).
pub const DOCKER: &[(&str, super::TestFn)] = &[(
    "container_labels_and_config_rules_deny_limit_and_name_roles",
    container_labels_and_config_rules_deny_limit_and_name_roles,
)];

fn container_labels_and_config_rules_deny_limit_and_name_roles() -> Result<()> {
    use support::docker::{CgroupParent, Image, run_once};
    let image = Image::import_with(&["curl"])?;
    // The operator's rule, for containers of another image: it wins over their labels.
    let managed = Image::import_with(&["curl"])?;
    let host = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let parent = cg.child("docker")?;
    let cgroup_parent = CgroupParent::new(&parent)?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    std::fs::write(
        &config,
        format!(
            "mock = \"ec2\"\n[[policy]]\nimage = \"{}\"\nec2_role = \"operator-role\"\n",
            managed.name
        ),
    )?;
    let daemon = Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--cgroup",
            parent.to_str().unwrap(),
        ],
        &host,
        None,
    )?;
    daemon.wait_for_log("Docker: following container starts")?;
    // Prints the status, then the body.
    let get_from = |image: &Image, labels: &[&str], path: &str| -> Result<String> {
        let mut args = vec!["--cgroup-parent", cgroup_parent.relative.as_str()];
        for label in labels {
            args.extend(["--label", label]);
        }
        let url = format!("http://169.254.169.254{path}");
        let curl = [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-w",
            "%{http_code} ",
            "-o",
            "/dev/stdout",
            &url,
        ];
        run_once(image, &args, &curl)
    };
    let get = |labels: &[&str], path: &str| get_from(&image, labels, path);
    let id = "/latest/meta-data/instance-id";
    let roles = "/latest/meta-data/iam/security-credentials/";
    assert_eq!(get(&[], id)?, format!("{INSTANCE_ID}200 "));
    let denied = get(&["redirect.deny=true"], id)?;
    assert!(
        denied.contains("403 - Forbidden") && denied.ends_with("403 "),
        "{denied}"
    );
    let limited = ["redirect.allow=/latest/meta-data/placement/"];
    let outside = get(&limited, id)?;
    assert!(outside.ends_with("403 "), "{outside}\n{}", daemon.log());
    assert!(get(&limited, "/latest/meta-data/placement/region")?.ends_with("200 "));
    assert_eq!(get(&["redirect.ec2.role=app-role"], roles)?, "app-role200 ");
    assert_eq!(get(&[], roles)?, "redirect-mock-role200 ");
    let managed_role = get_from(&managed, &["redirect.ec2.role=label-role"], roles)?;
    assert_eq!(managed_role, "operator-role200 ", "the config's rule wins");
    // A container on another cloud sees that cloud, and is refused as that cloud refuses.
    let openstack = get(
        &["redirect.cloud=openstack"],
        "/openstack/latest/meta_data.json",
    )?;
    assert!(
        openstack.contains("\"uuid\"") && openstack.ends_with("200 "),
        "{openstack}"
    );
    let azure_denied = get(
        &["redirect.cloud=azure", "redirect.deny=true"],
        "/metadata/instance",
    )?;
    assert_eq!(azure_denied, "{\"error\":\"Forbidden\"}403 ");
    let bad = get(&["redirect.deny=yes"], id)?;
    assert!(
        bad.ends_with("403 "),
        "a label that does not parse denies: {bad}"
    );
    daemon.wait_for_log("label redirect.deny=\"yes\": expected true or false")?;
    Ok(())
}

/// The `[[policy]]` rules are read again on SIGHUP and apply at once to the callers already
/// served, in another namespace and in the daemon's own.
fn config_rules_apply_to_every_caller_after_sighup() -> Result<()> {
    let host = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let client = cg.child("client")?;
    let mount = support::cgroup2_mount()?;
    let cgroup = format!("/{}", client.strip_prefix(&mount)?.display());
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("redirect.toml");
    let write = |rule: &str| std::fs::write(&config, format!("mock = \"ec2\"\n{rule}"));
    write(&format!("[[policy]]\ncgroup = \"{cgroup}\"\ndeny = true\n"))?;
    let daemon = Daemon::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--cgroup",
            client.to_str().unwrap(),
            "--docker",
            "off",
        ],
        &host,
        None,
    )?;
    let app = NetNs::new()?;
    let _resident = super::namespaces::resident(&client, &app)?;
    super::child_role(&client, &app, "connect", &["169.254.169.254:80"])?;
    daemon.wait_for_log("listening in network namespace")?;
    let id = super::url("/latest/meta-data/instance-id");
    for ns in [&app, &host] {
        assert_eq!(
            super::curl(&client, ns, &[], &id)?.0,
            403,
            "denied by the rule"
        );
    }
    write("")?;
    daemon.signal(libc::SIGHUP)?;
    daemon.wait_for_log("[[policy]] rules and container_labels")?;
    for ns in [&app, &host] {
        assert_eq!(
            super::curl(&client, ns, &[], &id)?,
            (200, INSTANCE_ID.to_owned()),
            "the rule is gone"
        );
    }
    Ok(())
}
