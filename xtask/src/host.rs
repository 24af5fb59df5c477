//! Host programs the tests drive (bpftool, curl, iproute2, util-linux) and the Python SDKs the
//! tests use as real clients. Installed from Debian's packages and PyPI when missing, so a
//! fresh machine needs nothing done by hand.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::run;

/// A program the tests run, and the Debian package that provides it.
struct Tool {
    bin: &'static str,
    package: &'static str,
}

const TEST_TOOLS: &[Tool] = &[
    Tool {
        bin: "bpftool",
        package: "bpftool",
    },
    Tool {
        bin: "curl",
        package: "curl",
    },
    Tool {
        bin: "ip",
        package: "iproute2",
    },
    Tool {
        bin: "nsenter",
        package: "util-linux",
    },
];

/// Python packages for the SDK tests, pinned so a test run is reproducible.
const PYTHON_TEST_PACKAGES: &[&str] = &["boto3==1.44.5"];

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

/// Installs the Debian packages for any missing test tool.
pub fn ensure_test_tools() -> Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|t| which(t.bin).is_none())
        .map(|t| t.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the tests need these Debian packages: {} (run as root to install them)",
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

/// A virtualenv under `target/` with the Python SDKs the tests drive; returns its python.
pub fn ensure_python_sdks(workspace: &Path) -> Result<PathBuf> {
    let venv = workspace.join("target/test-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(".installed");
    let wanted = PYTHON_TEST_PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    let system_python = which("python3").context("python3 is needed for the SDK tests")?;
    eprintln!(
        "xtask: creating {} with {}",
        venv.display(),
        PYTHON_TEST_PACKAGES.join(" ")
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
        .args(PYTHON_TEST_PACKAGES))?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}
