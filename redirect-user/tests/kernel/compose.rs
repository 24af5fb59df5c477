//! `examples/compose/` as documented: the daemon as a compose service (the image `cargo xtask
//! image` makes, here from the binary under test), an app with boto3 on the project network,
//! a worker on an `internal: true` network, and a service with `network_mode: none`; nothing
//! in them knows about redirect. Sandboxed through the file's variables and an override: the
//! daemon attaches to the test's cgroup, the apps sit under it, and a DROP rule keeps the
//! bridge networks off the metadata ranges.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use super::{TestCgroup, support, test_python};

/// Every test here drives Docker: kind `[docker]`.
pub const DOCKER: &[(&str, super::TestFn)] = &[(
    "compose_example_serves_every_service_unchanged",
    compose_example_serves_every_service_unchanged,
)];

/// `docker-compose down` for the project on drop.
struct Project {
    name: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["-p", &self.name]);
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.name)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .compose(&["down", "-v", "--remove-orphans", "-t", "2"])
            .output();
    }
}

fn compose_example_serves_every_service_unchanged() -> Result<()> {
    use support::docker::{CgroupParent, Image, MetadataDrop};
    let python = test_python()?;
    // The SDK's Python, bind-mounted into the apps at its own paths (no image to pull here).
    let venv = Path::new(&python)
        .parent()
        .and_then(Path::parent)
        .context("venv")?;
    let venv = std::fs::canonicalize(venv)?;
    let interpreter = std::fs::canonicalize(&python)?;
    let home = interpreter
        .parent()
        .and_then(Path::parent)
        .context("python home")?
        .to_owned();
    let daemon_image = Image::import_daemon(&[])?;
    // The interpreter and its extension modules, for the system libraries they load.
    let mut binaries = vec![interpreter.clone()];
    for dir in [home.join("lib"), venv.clone()] {
        binaries.extend(shared_objects(&dir));
    }
    let app_image = Image::import_paths(&binaries)?;
    let cg = TestCgroup::new()?;
    let apps = cg.child("apps")?;
    // Pinned where the test cleans up (the daemon's container sees the host's bpffs).
    let pins = support::PinDirGuard::new();
    let parent = CgroupParent::new(&apps)?;
    let run_dir = tempfile::tempdir()?;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/compose");
    let overrides = run_dir.path().join("sandbox.yml");
    let mounts = format!(
        "[\"{v}:{v}:ro\", \"{h}:{h}:ro\"]",
        v = venv.display(),
        h = home.display()
    );
    let service = |name: &str| {
        format!(
            "  {name}:\n    cgroup_parent: {}\n    volumes: {mounts}\n",
            parent.relative
        )
    };
    std::fs::write(
        &overrides,
        format!(
            "version: \"2.4\"\nservices:\n{}{}{}",
            service("app"),
            service("worker"),
            service("offline")
        ),
    )?;
    let py = venv.join("bin/python");
    let whoami = format!("{} /app/whoami.py", py.display());
    let offline = format!(
        "{} -c \"import urllib.request as u; print(u.urlopen('http://169.254.169.254/latest/meta-data/instance-id').read().decode())\"",
        py.display()
    );
    let project = Project {
        name: support::unique("redirect-test-ctr"),
        files: vec![example.join("docker-compose.yml"), overrides],
        env: vec![
            ("REDIRECT_IMAGE".into(), daemon_image.name.clone()),
            (
                "REDIRECT_FLAGS".into(),
                format!(
                    "--cgroup {} --listen 127.0.0.1:0 --pin-dir {}",
                    apps.display(),
                    pins.arg()
                ),
            ),
            (
                "REDIRECT_RUN_DIR".into(),
                run_dir.path().display().to_string(),
            ),
            ("APP_IMAGE".into(), app_image.name.clone()),
            ("APP_COMMAND".into(), whoami.clone()),
            ("WORKER_COMMAND".into(), whoami),
            ("OFFLINE_COMMAND".into(), offline),
        ],
    };
    let _drop = MetadataDrop::insert()?;
    support::sh(&mut project.compose(&["up", "-d", "--no-color"]))?;
    let mut outputs = Vec::new();
    for service in ["app", "worker", "offline"] {
        let name = project.container(service);
        let code = support::sh(Command::new("docker").args(["wait", &name]))?;
        let logs = Command::new("docker").args(["logs", &name]).output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
        ensure!(code.trim() == "0", "{service} exited {code}: {text}");
        outputs.push(text.trim().to_owned());
    }
    let app: serde_json::Value = serde_json::from_str(&outputs[0]).context(outputs[0].clone())?;
    assert_eq!(app["method"], "iam-role", "{app}");
    assert_eq!(app["role"], "app-role", "the label's role: {app}");
    assert_eq!(app["region"], "us-east-1", "{app}");
    let worker: serde_json::Value =
        serde_json::from_str(&outputs[1]).context(outputs[1].clone())?;
    assert_eq!(worker["role"], "redirect-mock-role", "{worker}");
    assert_eq!(outputs[2], super::INSTANCE_ID);
    // `redirect status` from the host, through the bind-mounted control socket.
    let socket = run_dir.path().join("control.sock");
    let status = support::sh(
        Command::new(support::DAEMON)
            .args(["status", "--json", "--control-socket"])
            .arg(&socket),
    )?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(status["proxy"]["requests"].as_u64() >= Some(3), "{status}");
    // Each request in the daemon's access log under its container's compose names.
    let log = Command::new("docker")
        .args(["logs", &project.container("redirect")])
        .output()?;
    let log = String::from_utf8_lossy(&log.stderr).into_owned();
    for service in ["app", "worker", "offline"] {
        let named = format!("/{service} ({}) GET ", project.container(service));
        ensure!(log.contains(&named), "{named:?} in the access log:\n{log}");
    }
    Ok(())
}

/// Every `.so` under `dir`.
fn shared_objects(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => found.extend(shared_objects(&path)),
            Ok(t) if t.is_file() && path.to_string_lossy().contains(".so") => found.push(path),
            _ => {}
        }
    }
    found
}
