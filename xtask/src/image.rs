//! `cargo xtask image`: the daemon as a local OCI image, without a registry or a base image:
//! the release binary and the shared libraries it loads, imported with `docker import`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{output, run};

/// Imports `binary` as `NAME:VERSION` and `NAME:latest`; returns the first tag.
pub fn import(binary: &Path, name: &str, version: &str) -> Result<String> {
    let root = std::env::temp_dir().join(format!("redirect-image-{}", std::process::id()));
    let _cleanup = RemoveDir(root.clone());
    std::fs::create_dir_all(root.join("usr/bin"))?;
    std::fs::copy(binary, root.join("usr/bin/redirect"))
        .with_context(|| format!("copying {}", binary.display()))?;
    for lib in libraries(binary)? {
        let target = root.join(lib.strip_prefix("/")?);
        std::fs::create_dir_all(target.parent().context("a library path has a parent")?)?;
        std::fs::copy(&lib, &target).with_context(|| format!("copying {}", lib.display()))?;
    }
    // The control socket's directory (bind-mount it to reach the daemon from the host) and a
    // /tmp for anything that wants one.
    for dir in ["run/redirect", "tmp"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let tag = format!("{name}:{version}");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start tar")?;
    run(Command::new("docker")
        .args(["import", "--change", r#"ENTRYPOINT ["/usr/bin/redirect"]"#])
        .args(["--change", r#"CMD ["run", "--mock"]"#])
        .args([
            "--change",
            &format!("LABEL org.opencontainers.image.version={version}"),
        ])
        .args(["-", &tag])
        .stdin(tar.stdout.context("tar's stdout")?))
    .context("docker import (is Docker running?)")?;
    run(Command::new("docker").args(["tag", &tag, &format!("{name}:latest")]))?;
    Ok(tag)
}

/// The shared libraries `binary` loads, as `ldd` resolves them.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let ldd = output(Command::new("ldd").arg(binary))?;
    // Lines: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`.
    let libs: Vec<PathBuf> = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    if libs.is_empty() && !ldd.contains("statically linked") {
        bail!("ldd {} printed no libraries: {ldd}", binary.display());
    }
    Ok(libs)
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
