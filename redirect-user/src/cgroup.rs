//! Finding the cgroup v2 hierarchy and the cgroups to attach to.
//!
//! cgroup v2 is mounted at `/sys/fs/cgroup` on pure-v2 hosts and at `/sys/fs/cgroup/unified`
//! on hybrid ones; it is read from mountinfo, never assumed.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use crate::paths;

/// `statfs.f_type` of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {}", paths::MOUNTINFO)]
    Mountinfo { source: io::Error },
    #[error(
        "no cgroup v2 filesystem is mounted (redirect attaches to cgroup v2; mount it with `mount -t cgroup2 none /sys/fs/cgroup`{})",
        if in_container() { ", or, in a container, give it the host's: `-v /sys/fs/cgroup:/sys/fs/cgroup:ro`" } else { "" }
    )]
    NoCgroup2,
    #[error("cgroup {given} does not exist (cgroup v2 is mounted at {})", mount.display(), given = .given.display())]
    NotFound { given: PathBuf, mount: PathBuf },
    #[error("{} is not a cgroup v2 directory (cgroup v2 is mounted at {})", path.display(), mount.display())]
    NotCgroup2 { path: PathBuf, mount: PathBuf },
    #[error("cannot open cgroup {}", path.display())]
    Open { path: PathBuf, source: io::Error },
}

/// Whether this process runs in a container (Docker's, podman's marker files).
fn in_container() -> bool {
    Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists()
}

/// The mount point of the first cgroup2 filesystem in this mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string(paths::MOUNTINFO)
        .map_err(|source| CgroupError::Mountinfo { source })?;
    parse_mountinfo(&text).ok_or(CgroupError::NoCgroup2)
}

/// Finds the cgroup2 mount point in mountinfo text (see proc(5)): the filesystem type follows
/// the ` - ` separator; the mount point is field 5, with octal escapes for spaces and the like.
pub fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = mount.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| {
                u8::try_from(d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'))).ok()
            });
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup v2 directory, open for attaching programs.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    pub dir: File,
}

/// Resolves a `--cgroup` argument: a directory of the cgroup v2 filesystem, given either as a
/// filesystem path (`/sys/fs/cgroup/system.slice`) or as a path inside the hierarchy as
/// `/proc/PID/cgroup` prints it (`/system.slice`).
pub fn resolve(mount: &Path, given: &Path) -> Result<Cgroup, CgroupError> {
    // The filesystem path first, then the same path inside the hierarchy; the first one that
    // is a cgroup v2 directory wins (so `/` means the hierarchy's root, as in /proc/PID/cgroup).
    let inside = mount.join(given.strip_prefix("/").unwrap_or(given));
    let candidates: Vec<&Path> = if given.is_absolute() {
        vec![given, &inside]
    } else {
        vec![&inside]
    };
    let Some(path) = candidates.iter().find(|p| p.is_dir() && is_cgroup2(p)) else {
        return Err(match candidates.iter().find(|p| p.is_dir()) {
            Some(dir) => CgroupError::NotCgroup2 {
                path: dir.to_path_buf(),
                mount: mount.to_path_buf(),
            },
            None => CgroupError::NotFound {
                given: given.to_path_buf(),
                mount: mount.to_path_buf(),
            },
        });
    };
    let dir = File::open(path).map_err(|source| CgroupError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Cgroup {
        path: path.to_path_buf(),
        dir,
    })
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_layouts() {
        assert_eq!(
            parse_mountinfo(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_mountinfo(PURE_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_mountinfo("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
        assert_eq!(parse_mountinfo(""), None);
        assert_eq!(parse_mountinfo("garbage\n - \n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(line),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(unescape_octal("a\\134b\\"), "a\\b\\");
        assert_eq!(unescape_octal("\\777\\12"), "\\777\\12");
    }

    #[test]
    fn cgroup_v1_and_plain_dirs_are_refused() {
        let err = resolve(Path::new("/tmp"), Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
        let err = resolve(
            Path::new("/nonexistent-mount"),
            Path::new("/no/such/cgroup"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cgroup /no/such/cgroup does not exist"),
            "{err}"
        );
    }
}
