//! Local OCI images made of this host's files, without a registry or a base image, imported
//! with `docker import`: `cargo xtask image` (the daemon: its release binary and the shared
//! libraries it loads), and the package check's image (dpkg and what it runs).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{output, run};

/// Imports `binary` as `NAME:VERSION` and `NAME:latest`; returns the first tag.
pub fn import(binary: &Path, name: &str, version: &str) -> Result<String> {
    let root = Rootfs::new("image")?;
    root.add_program(binary, Path::new("/usr/bin/redirect"))?;
    // The control socket's directory (bind-mount it to reach the daemon from the host) and a
    // /tmp for anything that wants one.
    root.mkdirs(&["run/redirect", "tmp"])?;
    let tag = format!("{name}:{version}");
    root.import(
        &tag,
        &[
            r#"ENTRYPOINT ["/usr/bin/redirect"]"#,
            r#"CMD ["run", "--mock"]"#,
            &format!("LABEL org.opencontainers.image.version={version}"),
        ],
    )?;
    run(Command::new("docker").args(["tag", &tag, &format!("{name}:latest")]))?;
    Ok(tag)
}

/// A directory that becomes an image's root filesystem; removed on drop.
pub struct Rootfs(PathBuf);

impl Rootfs {
    pub fn new(what: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("redirect-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Rootfs(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// /bin, /sbin, /lib and /lib64 as this host has them: links into /usr on a merged-/usr
    /// host (as Debian is since bookworm), so that paths of either form resolve.
    pub fn like_host_usr(&self) -> Result<()> {
        for dir in ["bin", "sbin", "lib", "lib64"] {
            let host = Path::new("/").join(dir);
            match std::fs::read_link(&host) {
                Ok(target) => {
                    // `usr/lib64`, made so that the link leads somewhere, and linked relative to the
                    // root: an absolute link would lead the copies below out of it.
                    let inside = target.strip_prefix("/").unwrap_or(&target);
                    std::fs::create_dir_all(self.0.join(inside))?;
                    std::os::unix::fs::symlink(inside, self.0.join(dir))?
                }
                Err(_) => std::fs::create_dir_all(self.0.join(dir))?,
            }
        }
        Ok(())
    }

    pub fn mkdirs(&self, dirs: &[&str]) -> Result<()> {
        for dir in dirs {
            std::fs::create_dir_all(self.0.join(dir))?;
        }
        Ok(())
    }

    /// Copies `program` to `at` inside the root, with the shared libraries it loads at their
    /// host paths.
    pub fn add_program(&self, program: &Path, at: &Path) -> Result<()> {
        self.copy(program, at)?;
        self.add_libraries(program)
    }

    /// The shared libraries `program` loads, at their host paths.
    pub fn add_libraries(&self, program: &Path) -> Result<()> {
        for lib in libraries(program)? {
            self.copy(&lib, &lib)?;
        }
        Ok(())
    }

    fn copy(&self, from: &Path, at: &Path) -> Result<()> {
        let target = self.0.join(at.strip_prefix("/").unwrap_or(at));
        std::fs::create_dir_all(target.parent().context("a path has a parent")?)?;
        std::fs::copy(from, &target).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    }

    /// `docker import` of the root as `tag`, with Dockerfile `changes`.
    pub fn import(&self, tag: &str, changes: &[&str]) -> Result<()> {
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&self.0)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start tar")?;
        let mut docker = Command::new("docker");
        docker.arg("import");
        for change in changes {
            docker.args(["--change", change]);
        }
        run(docker
            .args(["-", tag])
            .stdin(tar.stdout.context("tar's stdout")?))
        .context("docker import (is Docker running?)")
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
