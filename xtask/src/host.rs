//! Host programs the tests and benchmarks drive (bpftool, curl, iproute2, util-linux; wrk,
//! nginx, iptables, Go) and the Python packages they use (boto3 as a real client, matplotlib for the
//! benchmark chart). Installed from Debian's packages and PyPI when missing, so a fresh machine
//! needs nothing done by hand.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::run;

/// A program, and the Debian package that provides it.
pub struct Tool {
    pub bin: &'static str,
    pub package: &'static str,
}

pub const TEST_TOOLS: &[Tool] = &[
    Tool {
        bin: "bpftool",
        package: "bpftool",
    },
    Tool {
        bin: "curl",
        package: "curl",
    },
    // cloud-init's CloudStack datasource asks the password server with wget.
    Tool {
        bin: "wget",
        package: "wget",
    },
    Tool {
        bin: "unshare",
        package: "util-linux",
    },
    // The DHCP server CloudStack's virtual router runs, for `--upstream cloudstack`.
    Tool {
        bin: "dnsmasq",
        package: "dnsmasq-base",
    },
    Tool {
        bin: "ip",
        package: "iproute2",
    },
    Tool {
        bin: "nsenter",
        package: "util-linux",
    },
    // The compose example's test, and its guard against bridge traffic to metadata ranges.
    Tool {
        bin: "docker-compose",
        package: "docker-compose",
    },
    Tool {
        bin: "iptables",
        package: "iptables",
    },
];

pub const BENCH_TOOLS: &[Tool] = &[
    Tool {
        bin: "wrk",
        package: "wrk",
    },
    Tool {
        bin: "nginx",
        package: "nginx-light",
    },
    Tool {
        bin: "iptables-restore",
        package: "iptables",
    },
    Tool {
        bin: "go",
        package: "golang-go",
    },
    Tool {
        bin: "ss",
        package: "iproute2",
    },
    Tool {
        bin: "curl",
        package: "curl",
    },
    Tool {
        bin: "ip",
        package: "iproute2",
    },
];

/// Python packages, pinned so that runs are reproducible: the SDK the tests drive as a real
/// client, and the benchmark's charting library.
pub const PYTHON_TEST_PACKAGES: &[&str] = &[
    "boto3==1.44.5",
    "awscli==1.46.3",
    "azure-identity==1.27.0",
    "msal==1.39.0",
    "google-auth==2.63.0",
    // What cloud-init's datasources import (Debian installs them as python3-* packages).
    "requests==2.32.5",
    "PyYAML==6.0.3",
    "Jinja2==3.1.6",
    "configobj==5.0.9",
    "jsonpatch==1.33",
    "jsonschema==4.25.1",
];

/// cloud-init as Debian ships it (bookworm), unpacked, not installed: the tests run its
/// datasources as the real client of the mocks.
pub const CLOUD_INIT_DEB: &str = "cloud-init=22.4.2-1+deb12u4";
pub const PYTHON_BENCH_PACKAGES: &[&str] = &["matplotlib==3.10.9"];

/// Finds `bin` on PATH or in the sbin directories a non-root PATH may lack.
pub fn which(bin: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs the Debian packages for any of `tools` that is missing.
pub fn ensure_tools(tools: &[Tool]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|t| which(t.bin).is_none())
        .map(|t| t.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "these Debian packages are needed: {} (run as root to install them)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let install = || {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))
    };
    if install().is_err() {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"))?;
        install()?;
    }
    Ok(())
}

/// A virtualenv `target/<name>` with `packages` installed; returns its python.
pub fn ensure_python(workspace: &Path, name: &str, packages: &[&str]) -> Result<PathBuf> {
    let venv = workspace.join("target").join(name);
    let python = venv.join("bin/python");
    let stamp = venv.join(".installed");
    let wanted = packages.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    let system_python = which("python3").context("python3 is needed")?;
    eprintln!(
        "xtask: creating {} with {}",
        venv.display(),
        packages.join(" ")
    );
    run(Command::new(system_python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages))?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// `target/cloud-init/`: [`CLOUD_INIT_DEB`] downloaded and unpacked (`dpkg -x`); returns the
/// directory to put on PYTHONPATH.
pub fn ensure_cloud_init(workspace: &Path) -> Result<PathBuf> {
    let dir = workspace.join("target/cloud-init");
    let packages = dir.join("root/usr/lib/python3/dist-packages");
    let stamp = dir.join(".installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == CLOUD_INIT_DEB) {
        return Ok(packages);
    }
    eprintln!("xtask: unpacking {CLOUD_INIT_DEB} into {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let download = || {
        run(Command::new("apt-get")
            .current_dir(&dir)
            .args(["download", CLOUD_INIT_DEB]))
    };
    if download().is_err() {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"))?;
        download()?;
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")))?;
    std::fs::write(&stamp, CLOUD_INIT_DEB)?;
    Ok(packages)
}
