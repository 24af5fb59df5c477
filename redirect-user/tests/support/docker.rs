//! A throwaway Docker image and container for the "change nothing in the container" test.
//!
//! No registry is reachable, so the image is imported from files already on this machine:
//! curl, a shell and the libraries they load. The container runs with `--network none`; the
//! test gives it a veth into a test namespace and nothing else, so it has no route out.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use super::sh;

/// An image imported for one test; removed on drop.
pub struct Image {
    pub name: String,
}

impl Image {
    pub fn import_with(programs: &[&str]) -> Result<Self> {
        Self::import(programs, &[], &[])
    }

    /// The daemon under test as an image, as `cargo xtask image` makes it (`redirect` at
    /// /usr/bin, the entry point), plus `programs` from the host.
    pub fn import_daemon(programs: &[&str]) -> Result<Self> {
        let daemon = (
            PathBuf::from(super::DAEMON),
            PathBuf::from("/usr/bin/redirect"),
        );
        Self::import(
            programs,
            &[daemon],
            &[r#"ENTRYPOINT ["/usr/bin/redirect"]"#],
        )
    }

    /// Files at their host paths, with the libraries they load.
    pub fn import_paths(paths: &[PathBuf]) -> Result<Self> {
        let files: Vec<(PathBuf, PathBuf)> = paths.iter().map(|p| (p.clone(), p.clone())).collect();
        Self::import(&["sh"], &files, &[])
    }

    /// `programs` (found on PATH) at their host paths and `files` (host path, image path),
    /// each with the libraries it loads; `changes` as `docker import --change` takes them.
    fn import(programs: &[&str], files: &[(PathBuf, PathBuf)], changes: &[&str]) -> Result<Self> {
        let root = tempfile::tempdir()?;
        let mut copies: Vec<(PathBuf, PathBuf)> = files.to_vec();
        for program in programs {
            let path = super::host_program(program)?;
            copies.push((path.clone(), path));
        }
        let mut libs = Vec::new();
        for (source, _) in &copies {
            let ldd = sh(Command::new("ldd").arg(source))?;
            // Lines look like `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`.
            libs.extend(
                ldd.split_whitespace()
                    .filter(|w| w.starts_with('/'))
                    .map(|l| (PathBuf::from(l), PathBuf::from(l))),
            );
        }
        copies.extend(libs);
        for (source, at) in &copies {
            let target = root.path().join(at.strip_prefix("/")?);
            std::fs::create_dir_all(target.parent().context("no parent")?)?;
            std::fs::copy(source, &target)
                .with_context(|| format!("copying {}", source.display()))?;
        }
        for dir in ["run/redirect", "tmp"] {
            std::fs::create_dir_all(root.path().join(dir))?;
        }
        let name = format!(
            "redirect-test-{}:{}",
            std::process::id(),
            super::unique("img")
        );
        let tar = Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .args(["-c", "."])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut import = Command::new("docker");
        import.arg("import");
        for change in changes {
            import.args(["--change", change]);
        }
        sh(import
            .args(["-", &name])
            .stdin(tar.stdout.context("tar stdout")?))?;
        Ok(Image { name })
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.name])
            .output();
    }
}

/// A running container; removed (`docker rm -f`) on drop.
pub struct Container {
    pub name: String,
    pub pid: u32,
}

impl Container {
    /// `docker run -d --network none IMAGE ARGS...`
    pub fn run(image: &Image, args: &[&str]) -> Result<Self> {
        Self::run_with(image, &[], args)
    }

    /// `docker run -d --network none DOCKER_ARGS... IMAGE ARGS...`
    pub fn run_with(image: &Image, docker_args: &[&str], args: &[&str]) -> Result<Self> {
        let name = super::unique("redirect-test-ctr");
        sh(Command::new("docker")
            .args(["run", "-d", "--name", &name, "--network", "none"])
            .args(docker_args)
            .arg(&image.name)
            .args(args))?;
        // Constructed first so that a failure below still removes the container.
        let mut container = Container { name, pid: 0 };
        let inspect = ["inspect", "-f", "{{.State.Pid}}", &container.name];
        container.pid = sh(Command::new("docker").args(inspect))?.trim().parse()?;
        Ok(container)
    }

    /// The container's cgroup inside the cgroup v2 hierarchy, as /proc/PID/cgroup shows it.
    pub fn cgroup(&self) -> Result<String> {
        let text = std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid))?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned)
            .context("container has no cgroup v2 membership")
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// `docker exec NAME ARGS...`, returning stdout and stderr, whatever the exit status.
    pub fn exec(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new("docker")
            .arg("exec")
            .arg(&self.name)
            .args(args)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// `docker run --rm --network none DOCKER_ARGS... IMAGE ARGS...` in the foreground: its
/// stdout, whatever the exit status.
pub fn run_once(image: &Image, docker_args: &[&str], args: &[&str]) -> Result<String> {
    let name = super::unique("redirect-test-ctr");
    let out = Command::new("docker")
        .args(["run", "--rm", "--name", &name, "--network", "none"])
        .args(docker_args)
        .arg(&image.name)
        .args(args)
        .output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A cgroup parent for containers inside a test cgroup: `--cgroup-parent` takes it relative
/// to the hierarchy's root. On a v1 hybrid host Docker also makes it in every v1 hierarchy,
/// where the test cgroup's guard does not look: removed on drop.
pub struct CgroupParent {
    pub relative: String,
}

impl CgroupParent {
    pub fn new(cgroup: &std::path::Path) -> Result<Self> {
        let mount = super::cgroup2_mount()?;
        let relative = format!("/{}", cgroup.strip_prefix(&mount)?.display());
        Ok(CgroupParent { relative })
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let top = self
            .relative
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        for mount in super::cgroup1_mounts() {
            super::remove_cgroup_tree(&mount.join(top));
        }
    }
}

/// Drops whatever a Docker bridge, compose or overlay network would send to the metadata
/// ranges (the network safety rule), while a test runs containers on such networks; the
/// rules are removed on drop.
pub struct MetadataDrop {
    rules: Vec<(&'static str, &'static str, &'static str)>,
}

impl MetadataDrop {
    pub fn insert() -> Result<Self> {
        let mut guard = MetadataDrop { rules: Vec::new() };
        let v4 = ("iptables", "DOCKER-USER", "169.254.0.0/16");
        sh(Command::new(v4.0).args(["-I", v4.1, "-d", v4.2, "-j", "DROP"]))?;
        guard.rules.push(v4);
        // ip6tables may lack Docker's chain (IPv6 off in Docker): FORWARD covers the same.
        for chain in ["DOCKER-USER", "FORWARD"] {
            let v6 = ("ip6tables", chain, "fd00:ec2::/32");
            if sh(Command::new(v6.0).args(["-I", v6.1, "-d", v6.2, "-j", "DROP"])).is_ok() {
                guard.rules.push(v6);
                return Ok(guard);
            }
        }
        anyhow::bail!("cannot insert the IPv6 metadata DROP rule")
    }
}

impl Drop for MetadataDrop {
    fn drop(&mut self) {
        for (tool, chain, dest) in &self.rules {
            let _ = Command::new(tool)
                .args(["-D", chain, "-d", dest, "-j", "DROP"])
                .output();
        }
    }
}

/// Docker's socket through a relay the test can cut and restore: the engine going away and
/// coming back, as the daemon sees it, without restarting the engine other tests use.
pub struct SocketRelay {
    pub path: PathBuf,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
    listener: Option<(
        std::os::unix::net::UnixListener,
        std::thread::JoinHandle<()>,
    )>,
    _dir: tempfile::TempDir,
}

impl SocketRelay {
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut relay = SocketRelay {
            path: dir.path().join("docker.sock"),
            live: Default::default(),
            listener: None,
            _dir: dir,
        };
        relay.restore()?;
        Ok(relay)
    }

    /// Listens again, relaying each connection to the engine's socket.
    pub fn restore(&mut self) -> Result<()> {
        use std::os::unix::net::{UnixListener, UnixStream};
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path)?;
        let accepting = listener.try_clone()?;
        let live = std::sync::Arc::clone(&self.live);
        let thread = std::thread::spawn(move || {
            // Ends when `cut` shuts the listener down.
            for client in accepting.incoming() {
                let Ok(client) = client else { return };
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                let pipe = |mut from: UnixStream, mut to: UnixStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                let (Ok(c2), Ok(e2)) = (client.try_clone(), engine.try_clone()) else {
                    continue;
                };
                live.lock()
                    .unwrap()
                    .extend([c2.try_clone().unwrap(), e2.try_clone().unwrap()]);
                pipe(client, e2);
                pipe(engine, c2);
            }
        });
        self.listener = Some((listener, thread));
        Ok(())
    }

    /// Stops listening and closes every relayed connection.
    pub fn cut(&mut self) {
        use std::os::fd::AsRawFd as _;
        if let Some((listener, thread)) = self.listener.take() {
            // SAFETY: shutdown on a descriptor this struct owns; it wakes the blocked accept.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for stream in self.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for SocketRelay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A macvlan Docker network whose parent is a veth link into `far`, a namespace of the
/// test's own with no route out: whatever its containers send ends there.
pub struct MacvlanNetwork {
    pub name: String,
    link: String,
}

impl MacvlanNetwork {
    pub fn new(far: &super::NetNs) -> Result<Self> {
        let name = super::unique("redirect-test-macvlan");
        // IFNAMSIZ: at most 15 characters.
        let link = format!("rdm{}", std::process::id() % 1_000_000_000);
        let far_path = far.path();
        sh(Command::new("ip").args([
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            "rdmfar",
            "netns",
            far_path.to_str().context("netns path")?,
        ]))?;
        let network = MacvlanNetwork { name, link };
        sh(Command::new("ip").args(["link", "set", &network.link, "up"]))?;
        sh(Command::new("docker").args([
            "network",
            "create",
            "-d",
            "macvlan",
            "--subnet",
            "10.213.0.0/24",
            "-o",
            &format!("parent={}", network.link),
            &network.name,
        ]))?;
        Ok(network)
    }
}

impl Drop for MacvlanNetwork {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.name])
            .output();
        // Deletes its peer too.
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
    }
}
