//! `cargo xtask vm-test`: the real-kernel tests on Debian's packaged kernels, under qemu.
//!
//! Each kernel boots with a small initramfs (busybox and the modules for virtio and 9p) that
//! mounts this machine's root filesystem read-only over 9p, under a tmpfs overlay so that the
//! guest can write, with its own /proc, /sys, a pure cgroup v2 hierarchy, /tmp and /run, and the
//! guest kernel's own modules at /lib/modules. The test binary, the daemon, Python and the tools
//! are then the very files the host tests use: only the kernel differs. The guest has no network
//! device at all (`-nic none`), so no test inside it can reach anything but its own namespaces.
//!
//! The tests that drive Docker (kind `[docker]`) are left out: the guest runs no Docker engine.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    cmd::{output, run},
    host::{self, Tool},
};

/// A Debian release whose kernel we boot: its suite, and the kernel series it ships.
pub struct Kernel {
    pub suite: &'static str,
    pub series: &'static str,
}

/// The oldest first: bullseye's 5.10 is the README's minimum, bookworm's 6.1 what most hosts
/// run, trixie's 6.12 the current one. (buster's 4.19 has left deb.debian.org, and predates the
/// getpeername hooks of 5.8 anyway.)
pub const KERNELS: &[Kernel] = &[
    Kernel {
        suite: "bullseye",
        series: "5.10",
    },
    Kernel {
        suite: "bookworm",
        series: "6.1",
    },
    Kernel {
        suite: "trixie",
        series: "6.12",
    },
];

pub const VM_TOOLS: &[Tool] = &[
    Tool {
        bin: "qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    Tool {
        bin: "busybox",
        package: "busybox-static",
    },
    Tool {
        bin: "cpio",
        package: "cpio",
    },
    // depmod and modprobe, to find the modules 9p needs and their order.
    Tool {
        bin: "depmod",
        package: "kmod",
    },
    Tool {
        bin: "xz",
        package: "xz-utils",
    },
    Tool {
        bin: "zstd",
        package: "zstd",
    },
];

/// What the guest's /init loads before it can mount the host's root, in dependency order.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9p", "9pnet_virtio", "overlay"];

/// The line the guest prints with the test binary's exit status; its absence means the guest
/// died (a panic, an oops) before the tests finished.
const EXIT_MARKER: &str = "redirect-vm-test: exit=";
/// The first thing /init prints: seen within [`KVM_PROBE`] or KVM is not usable here.
const BOOT_MARKER: &str = "redirect-vm-test: init";
const KVM_PROBE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm works, else qemu's emulator (TCG).
    Auto,
    Kvm,
    Tcg,
}

/// A kernel unpacked from its Debian package.
struct Unpacked {
    /// `uname -r`, e.g. `6.1.0-50-amd64`.
    release: String,
    /// The package and version it came from.
    package: String,
    root: PathBuf,
}

impl Unpacked {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }
    fn modules(&self) -> PathBuf {
        self.root.join(format!("lib/modules/{}", self.release))
    }
}

pub struct Outcome {
    pub kernel: String,
    pub summary: String,
    pub passed: bool,
}

/// Boots each of `kernels` and runs `test_binary` (the `kernel` integration test) in it with
/// `env` and `args`; returns one outcome per kernel.
pub fn run_all(
    workspace: &Path,
    kernels: &[&Kernel],
    accel: Accel,
    test_binary: &Path,
    env: &[(&str, PathBuf)],
    args: &[std::ffi::OsString],
) -> Result<Vec<Outcome>> {
    host::ensure_tools(VM_TOOLS)?;
    // Both go on the kernel command line, which splits at spaces.
    ensure!(
        !workspace.to_string_lossy().contains(char::is_whitespace),
        "vm-test needs a workspace path without spaces, not {}",
        workspace.display()
    );
    let dir = workspace.join("target/vm");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("run-tests.sh");
    write_script(&script, workspace, test_binary, env, args)?;
    let mut accel = accel;
    let mut outcomes = Vec::new();
    for kernel in kernels {
        let unpacked = fetch(&dir, kernel)?;
        ensure!(
            unpacked.release.starts_with(&format!("{}.", kernel.series)),
            "Debian {} now ships {}, not {}: update vm::KERNELS (and the README's kernel list)",
            kernel.suite,
            unpacked.release,
            kernel.series
        );
        let initrd = initramfs(&dir.join(kernel.suite), &unpacked)?;
        let log = dir.join(format!("{}.log", kernel.suite));
        eprintln!(
            "xtask: booting {} ({}, {}); console in {}",
            unpacked.release,
            kernel.suite,
            unpacked.package,
            log.display()
        );
        let boot = |accel| boot(&unpacked, &initrd, (&script, workspace), accel, &log);
        let console = match accel {
            Accel::Auto => match boot(Accel::Kvm)? {
                Some(console) => {
                    accel = Accel::Kvm;
                    console
                }
                None => {
                    eprintln!(
                        "xtask: /dev/kvm does not boot a guest here (no console within {}s); \
                         using qemu's emulator (TCG), which is slower",
                        KVM_PROBE.as_secs()
                    );
                    accel = Accel::Tcg;
                    boot(Accel::Tcg)?.context("qemu printed nothing")?
                }
            },
            accel => boot(accel)?.context("the guest printed nothing")?,
        };
        outcomes.push(judge(&unpacked, kernel, &console, &log));
    }
    Ok(outcomes)
}

fn judge(unpacked: &Unpacked, kernel: &Kernel, console: &str, log: &Path) -> Outcome {
    let kernel = format!("{} ({})", unpacked.release, kernel.suite);
    let result = console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("test result: "))
        .map(str::to_owned);
    let exit = console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARKER))
        .map(str::to_owned);
    match (exit.as_deref(), result) {
        (Some("0"), Some(result)) => Outcome {
            kernel,
            summary: result,
            passed: true,
        },
        (Some(code), result) => Outcome {
            kernel,
            summary: format!(
                "the tests exited {code}: {} (see {})",
                result.unwrap_or_else(|| "no summary".into()),
                log.display()
            ),
            passed: false,
        },
        (None, _) => Outcome {
            kernel,
            summary: format!(
                "the guest stopped before the tests finished (a panic or an oops?): see {}",
                log.display()
            ),
            passed: false,
        },
    }
}

/// The script the guest runs (it sees the host's files at the same paths): the tests as the
/// host runs them, minus the Docker ones, then their exit status on the console.
fn write_script(
    script: &Path,
    workspace: &Path,
    test_binary: &Path,
    env: &[(&str, PathBuf)],
    args: &[std::ffi::OsString],
) -> Result<()> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut text = String::from(
        "#!/bin/sh\n# Written by `cargo xtask vm-test`; run inside the guest.\n\
         export CI=true PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    );
    for (name, value) in env {
        text += &format!("export {name}={}\n", quote(&value.to_string_lossy()));
    }
    // The kernel starts init with a hard descriptor limit of 4096; the tests of 10,000
    // callers need what a host gives root (fs.nr_open's default).
    text += "ulimit -n 1048576\n";
    text += &format!(
        "cd {}\nuname -r\n{} --color never --test-threads=2 --skip '[docker]'",
        quote(&workspace.join("redirect-user").to_string_lossy()),
        quote(&test_binary.to_string_lossy())
    );
    for arg in args {
        text += " ";
        text += &quote(&arg.to_string_lossy());
    }
    text += &format!("\necho \"{EXIT_MARKER}$?\"\n");
    std::fs::write(script, text)?;
    Ok(())
}

/// The suite's current `linux-image-<release>-amd64` package (the one its `linux-image-amd64`
/// points to), fetched with apt from a state of its own (signatures checked against Debian's
/// archive keyring, this machine's sources untouched) and unpacked with `dpkg -x`; kept while
/// the suite's package stays the same.
fn fetch(dir: &Path, kernel: &Kernel) -> Result<Unpacked> {
    let base = dir.join(kernel.suite);
    let apt = base.join("apt");
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(sub))?;
    }
    let sources = apt.join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian {} main\n",
            kernel.suite
        ),
    )?;
    let options = |cmd: &mut Command| {
        cmd.arg(format!("-oDir::Etc::SourceList={}", sources.display()))
            .arg("-oDir::Etc::SourceParts=/nonexistent")
            .arg(format!(
                "-oDir::State::Lists={}",
                apt.join("lists").display()
            ))
            .arg(format!("-oDir::Cache={}", apt.join("cache").display()))
            .arg("-oDir::State::status=/dev/null")
            .arg("-oAPT::Architecture=amd64");
    };
    let stamp = base.join(".unpacked");
    let mut update = Command::new("apt-get");
    options(&mut update);
    if let Err(e) = run(update.arg("-qq").arg("update")) {
        // Offline: what was unpacked before still tells something.
        if let Ok(previous) = std::fs::read_to_string(&stamp) {
            eprintln!(
                "xtask: {e:#}; using the {} kernel unpacked before",
                kernel.suite
            );
            return unpacked(&base, previous.trim());
        }
        return Err(e).context(format!("fetching Debian {}'s package lists", kernel.suite));
    }
    let mut depends = Command::new("apt-cache");
    options(&mut depends);
    let depends = output(depends.args(["depends", "linux-image-amd64"]))?;
    let image = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim().to_owned())
        .filter(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
        .with_context(|| {
            format!(
                "Debian {}'s linux-image-amd64 names no kernel: {depends}",
                kernel.suite
            )
        })?;
    let mut policy = Command::new("apt-cache");
    options(&mut policy);
    let policy = output(policy.args(["policy", &image]))?;
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .context("no candidate version")?
        .to_owned();
    let package = format!("{image}={version}");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == package) {
        return unpacked(&base, &package);
    }
    eprintln!("xtask: fetching {package} from Debian {}", kernel.suite);
    let debs = base.join("debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    let mut download = Command::new("apt-get");
    options(&mut download);
    run(download
        .current_dir(&debs)
        .arg("-qq")
        .arg("-oAPT::Sandbox::User=root")
        .args(["download", &package]))?;
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = base.join("root");
    let _ = std::fs::remove_dir_all(&root);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_dir_all(&debs)?;
    // trixie ships its modules under /usr/lib (merged /usr): where depmod and the guest look.
    if !root.join("lib").exists() && root.join("usr/lib/modules").is_dir() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let release = image
        .strip_prefix("linux-image-")
        .unwrap_or(&image)
        .to_owned();
    // The package leaves module dependencies to its postinst: compute them as it would.
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    std::fs::write(&stamp, &package)?;
    unpacked(&base, &package)
}

fn unpacked(base: &Path, package: &str) -> Result<Unpacked> {
    let image = package.split('=').next().unwrap_or(package);
    let release = image.strip_prefix("linux-image-").unwrap_or(image);
    let unpacked = Unpacked {
        release: release.to_owned(),
        package: package.to_owned(),
        root: base.join("root"),
    };
    ensure!(
        unpacked.vmlinuz().is_file(),
        "{} is missing: remove {} and run again",
        unpacked.vmlinuz().display(),
        base.display()
    );
    Ok(unpacked)
}

/// busybox, the [`BOOT_MODULES`] (decompressed: busybox's insmod takes plain .ko files) and an
/// /init that mounts the host's root and runs the script named on the kernel command line.
fn initramfs(base: &Path, kernel: &Unpacked) -> Result<PathBuf> {
    let tree = base.join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::create_dir_all(tree.join("modules"))?;
    std::fs::copy(
        host::which("busybox").context("busybox")?,
        tree.join("bin/busybox"),
    )?;
    let mut order = Vec::<String>::new();
    for module in BOOT_MODULES {
        let deps = output(Command::new("modprobe").arg("-d").arg(&kernel.root).args([
            "-S",
            &kernel.release,
            "--show-depends",
            module,
        ]))?;
        for line in deps.lines() {
            let Some(path) = line.trim().strip_prefix("insmod ") else {
                continue; // "builtin <name>": nothing to load
            };
            let path = Path::new(path.trim());
            let name = path
                .file_name()
                .context("module path")?
                .to_string_lossy()
                .into_owned();
            let plain = ["xz", "zst", "gz"]
                .iter()
                .find_map(|ext| name.strip_suffix(&format!(".{ext}")).map(|p| (p, *ext)));
            let (plain_name, compression) = match plain {
                Some((plain, ext)) => (plain.to_owned(), Some(ext)),
                None => (name.clone(), None),
            };
            if order.contains(&plain_name) {
                continue;
            }
            let target = tree.join("modules").join(&plain_name);
            match compression {
                None => {
                    std::fs::copy(path, &target)?;
                }
                Some(ext) => {
                    let tool = match ext {
                        "xz" => "xz",
                        "zst" => "zstd",
                        _ => "gzip",
                    };
                    let out = Command::new(tool).arg("-dc").arg(path).output()?;
                    ensure!(out.status.success(), "{tool} -dc {}", path.display());
                    std::fs::write(&target, out.stdout)?;
                }
            }
            order.push(plain_name);
        }
    }
    std::fs::write(tree.join("modules/order"), order.join("\n") + "\n")?;
    let init = tree.join("init");
    std::fs::write(&init, init_script(kernel))?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = base.join("initramfs.cpio.gz");
    let list = output(Command::new("find").arg(".").current_dir(&tree))?;
    let file = std::fs::File::create(&image)?;
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()?;
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&tree)
        .stdin(Stdio::piped())
        .stdout(gzip.stdin.take().context("gzip stdin")?)
        .spawn()?;
    cpio.stdin
        .take()
        .context("cpio stdin")?
        .write_all(list.as_bytes())?;
    ensure!(cpio.wait()?.success(), "cpio failed");
    ensure!(gzip.wait()?.success(), "gzip failed");
    Ok(image)
}

fn init_script(kernel: &Unpacked) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
echo "{BOOT_MARKER}"
mkdir -p /proc /sys /dev /host /rw /new
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "redirect-vm-test: insmod $m failed"; done
script=$(sed -n 's/.*redirect.script=\([^ ]*\).*/\1/p' /proc/cmdline)
workspace=$(sed -n 's/.*redirect.workspace=\([^ ]*\).*/\1/p' /proc/cmdline)
fail() {{ echo "redirect-vm-test: $1"; poweroff -f; }}
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host || fail "cannot mount the host's root"
mount -t tmpfs -o size=60% rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /new || fail "cannot make the overlay"
# Kept aside: the workspace may be under /tmp or /run, which get tmpfs of their own below.
mkdir -p /workspace
mount --bind /new$workspace /workspace || fail "no workspace at $workspace"
for d in proc sys dev; do mount --move /$d /new/$d; done
mount -t cgroup2 cgroup2 /new/sys/fs/cgroup
mount -t tmpfs tmpfs /new/tmp
mount -t tmpfs tmpfs /new/run
mkdir -p /new$workspace
mount --bind /workspace /new$workspace
mkdir -p /new/dev/pts /new/dev/shm /new/lib/modules/{release}
mount -t devpts devpts /new/dev/pts
mount -t tmpfs shm /new/dev/shm
mount --bind /new{modules} /new/lib/modules/{release}
# The kernel loads modules (veth, sock_diag, ...) with the modprobe of this, the initial root:
# send it to the host's modprobe, which finds the guest's modules at /lib/modules.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /new /sbin/modprobe "$@"\n' > /modprobe
chmod 755 /modprobe
echo /modprobe > /new/proc/sys/kernel/modprobe
chroot /new /bin/sh -c "ip link set lo up; hostname redirect-vm; sh $script"
poweroff -f
"#,
        release = kernel.release,
        modules = kernel.modules().display(),
    )
}

/// Boots the kernel and streams its console to stderr and `log`; returns the console, or
/// `None` when KVM was asked for and the guest printed nothing within [`KVM_PROBE`].
fn boot(
    kernel: &Unpacked,
    initrd: &Path,
    (script, workspace): (&Path, &Path),
    accel: Accel,
    log: &Path,
) -> Result<Option<String>> {
    let mut qemu = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        _ => qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    qemu.args(["-m", "4096", "-smp", "2", "-nic", "none", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 oops=panic redirect.script={} redirect.workspace={}",
            script.display(),
            workspace.display()
        ))
        // The host's root, read-only; multidevs=remap because it spans several filesystems.
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    let mut file = std::fs::File::create(log)?;
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(file, "{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = String::new();
    if accel == Accel::Kvm {
        loop {
            match rx.recv_timeout(KVM_PROBE) {
                Ok(line) => {
                    let booted = line.contains(BOOT_MARKER);
                    echo(&mut console, line);
                    if booted {
                        break;
                    }
                }
                Err(_) => {
                    kill(&mut child);
                    let _ = reader.join();
                    return Ok(None);
                }
            }
        }
    }
    for line in rx {
        echo(&mut console, line);
    }
    let _ = reader.join();
    let status = child.wait()?;
    if !status.success() {
        bail!("qemu exited {status}; console in {}", log.display());
    }
    Ok(Some(console))
}

fn echo(console: &mut String, line: String) {
    eprintln!("  vm| {line}");
    console.push_str(&line);
    console.push('\n');
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
