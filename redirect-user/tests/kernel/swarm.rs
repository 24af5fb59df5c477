//! `examples/swarm/stack.yml` on a single-node Swarm made for the test (left at the end): the
//! daemon as a global service (no `--pid host`: the host's /proc, bind-mounted) serving an app
//! service on an overlay network. The daemon first attaches to an empty test cgroup, then, once
//! the app's task runs, to that task's cgroup only (a Swarm task cannot be given a cgroup
//! parent, and a test never attaches to all of `/docker`). A DROP rule keeps the overlay off
//! the metadata ranges.

use std::{path::Path, process::Command, thread, time::Duration};

use anyhow::{Result, bail, ensure};

use super::{INSTANCE_ID, TestCgroup, support};

/// Every test here drives Docker: kind `[docker]`.
pub const DOCKER: &[(&str, super::TestFn)] = &[(
    "swarm_example_serves_an_app_on_an_overlay_network",
    swarm_example_serves_an_app_on_an_overlay_network,
)];

/// A single-node Swarm: `docker swarm leave --force` on drop, and the bridge it made removed.
struct Swarm {
    had_gwbridge: bool,
}

impl Swarm {
    fn init() -> Result<Self> {
        let state =
            support::sh(Command::new("docker").args(["info", "-f", "{{.Swarm.LocalNodeState}}"]))?;
        ensure!(
            state.trim() == "inactive",
            "this Docker is in a Swarm already ({}); the test makes and leaves its own",
            state.trim()
        );
        let had_gwbridge = Command::new("docker")
            .args(["network", "inspect", "docker_gwbridge"])
            .output()?
            .status
            .success();
        support::sh(Command::new("docker").args([
            "swarm",
            "init",
            "--advertise-addr",
            "127.0.0.1",
        ]))?;
        Ok(Swarm { had_gwbridge })
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["swarm", "leave", "--force"])
            .output();
        if !self.had_gwbridge {
            let _ = Command::new("docker")
                .args(["network", "rm", "docker_gwbridge"])
                .output();
        }
    }
}

/// `docker stack rm` on drop.
struct Stack {
    name: String,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["stack", "rm", &self.name])
            .output();
        // The stack's network goes once its tasks have.
        for _ in 0..50 {
            let left = Command::new("docker")
                .args([
                    "network",
                    "ls",
                    "-q",
                    "--filter",
                    &format!("label=com.docker.stack.namespace={}", self.name),
                ])
                .output();
            if left.is_ok_and(|o| o.stdout.is_empty()) {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

fn swarm_example_serves_an_app_on_an_overlay_network() -> Result<()> {
    use support::docker::{Image, MetadataDrop};
    let daemon_image = Image::import_daemon(&[])?;
    let app_image = Image::import_with(&["curl", "sh", "sleep", "seq"])?;
    let cg = TestCgroup::new()?;
    let nobody = cg.child("nobody")?; // attached first: serves no one
    let _drop = MetadataDrop::insert()?;
    let _swarm = Swarm::init()?;
    let stack = Stack {
        name: support::unique("redirect-test-ctr").replace('-', "_"),
    };
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/swarm/stack.yml");
    // Asks until answered (the daemon attaches to this task's cgroup once it runs).
    let app_command = "sh -c 'for i in $(seq 1 120); do curl -sS -m 2 http://169.254.169.254/latest/meta-data/instance-id && exit 0; sleep 0.5; done; exit 1'";
    let deploy = |flags: String| -> Result<String> {
        support::sh(
            Command::new("docker")
                .args(["stack", "deploy", "--resolve-image", "never", "-c"])
                .arg(&file)
                .arg(&stack.name)
                .env("REDIRECT_IMAGE", &daemon_image.name)
                .env("REDIRECT_FLAGS", flags)
                .env("APP_IMAGE", &app_image.name)
                .env("APP_COMMAND", app_command),
        )
    };
    // Pinned where the test cleans up (the daemon's container sees the host's bpffs).
    let pins = support::PinDirGuard::new();
    deploy(format!(
        "--listen 127.0.0.1:0 --cgroup {} --pin-dir {}",
        nobody.display(),
        pins.arg()
    ))?;
    let (app, cgroup) = task_cgroup(&format!("{}_app", stack.name))?;
    let cgroup = cgroup.as_str();
    ensure!(cgroup.ends_with(&app), "a task's own cgroup: {cgroup}");
    deploy(format!(
        "--listen 127.0.0.1:0 --cgroup {cgroup} --pin-dir {}",
        pins.arg()
    ))?;
    let service = format!("{}_app", stack.name);
    for _ in 0..150 {
        let logs = service_logs(&service)?;
        if logs.contains(INSTANCE_ID) {
            let daemon_log = service_logs(&format!("{}_redirect", stack.name))?;
            ensure!(
                daemon_log.contains(&format!("{service}.1."))
                    && daemon_log.contains("GET /latest/meta-data/instance-id 200"),
                "the access log names the Swarm task:\n{daemon_log}"
            );
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "the app was never answered:\n{}\ndaemon:\n{}",
        service_logs(&service)?,
        service_logs(&format!("{}_redirect", stack.name))?
    )
}

/// The id and cgroup of the running container of `service`'s task, once there is one. A
/// container `docker ps` lists may have stopped by the time it is inspected (Swarm replaces a
/// task that fails, for one on a network not ready yet): the next one is looked for then.
fn task_cgroup(service: &str) -> Result<(String, String)> {
    let mut seen = Vec::new();
    for _ in 0..150 {
        let out = support::sh(Command::new("docker").args([
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.swarm.service.name={service}"),
        ]))?;
        if let Some(id) = out.lines().next().map(str::trim) {
            // Removed already, it is an error here: an empty state, and the next is looked for.
            let state = Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{.State.Pid}} {{.State.Status}} {{.State.ExitCode}}",
                    id,
                ])
                .output()?;
            let state = String::from_utf8_lossy(&state.stdout).into_owned();
            let pid = state.split_whitespace().next().unwrap_or("0");
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .filter(|_| pid != "0")
                .and_then(|c| {
                    c.lines()
                        .find_map(|l| l.strip_prefix("0::"))
                        .map(str::to_owned)
                });
            match cgroup {
                Some(cgroup) => return Ok((id.to_owned(), cgroup)),
                None => seen.push(format!("{id}: {}", state.trim())),
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!("no task of {service} kept running: {seen:?}")
}

fn service_logs(service: &str) -> Result<String> {
    let out = Command::new("docker")
        .args(["service", "logs", "--raw", service])
        .output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
