//! The programs' links pinned in bpffs, so that the redirect outlives the daemon (fail
//! closed): a daemon that dies for any reason leaves each covered cgroup's connects going to
//! its endpoints, where nothing listens any more, so callers are refused, never handed the
//! real metadata service. The next daemon adopts the links, replacing their programs with
//! its own in one `BPF_LINK_UPDATE` each (never a moment without a program); `redirect
//! detach` removes them.
//!
//! Layout: `<pin dir>/v1/<cgroup inode>-<program>`, one pin per program and cgroup; `v1` is
//! the layout's version (a daemon that does not know a layout refuses it). The version
//! directory is `flock`ed by the daemon that serves it: two daemons never adopt the same pins.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use super::ATTACHED;

/// The layout version, the directory under the pin dir.
pub const LAYOUT: &str = "v1";

/// bpffs's `f_type` (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `enum bpf_cmd` (linux/bpf.h).
const BPF_OBJ_GET: i64 = 7;
const BPF_LINK_UPDATE: i64 = 29;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or give a --pin-dir on one",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error("cannot mount bpffs at /sys/fs/bpf for the pins")]
    Mount(#[source] io::Error),
    #[error(
        "another redirect daemon serves the pinned programs in {} (stop it first, or give this one another --pin-dir)",
        .0.display()
    )]
    Busy(PathBuf),
    #[error(
        "{} holds {} which is not one of redirect's pinned links: remove it, or give another --pin-dir",
        dir.display(),
        entry
    )]
    Foreign { dir: PathBuf, entry: String },
    #[error("pin directory {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One pinned link: which cgroup (by inode) and program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub cgroup_inode: u64,
    pub program: &'static str,
    pub path: PathBuf,
}

/// The version directory, locked for this process while it lives.
pub struct PinDir {
    dir: PathBuf,
    /// Held while this process serves the pins; `None` once handed to a replacing daemon.
    lock: Option<File>,
}

impl PinDir {
    /// Opens (creating it, and mounting bpffs at /sys/fs/bpf when the pin dir is under it and
    /// nothing is mounted there) and locks `base/v1`; checks that everything in it is ours.
    pub fn open(base: &Path) -> Result<Self, PinError> {
        let dir = base.join(LAYOUT);
        let io = |source| PinError::Io {
            path: dir.clone(),
            source,
        };
        ensure_bpffs(base)?;
        std::fs::create_dir_all(&dir).map_err(io)?;
        let lock = lock(&dir)?;
        let pins = PinDir {
            dir,
            lock: Some(lock),
        };
        pins.pins()?;
        Ok(pins)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Lets go of the lock, for the daemon that replaces this one to take.
    pub fn unlock(&mut self) {
        self.lock = None;
    }

    /// Takes the lock again after [`PinDir::unlock`] (the replacing daemon gave up).
    pub fn relock(&mut self) -> Result<(), PinError> {
        if self.lock.is_none() {
            self.lock = Some(lock(&self.dir)?);
        }
        Ok(())
    }

    /// Where the link of `program` on the cgroup with inode `cgroup_inode` is pinned.
    pub fn path_of(&self, cgroup_inode: u64, program: &str) -> PathBuf {
        self.dir.join(format!("{cgroup_inode}-{program}"))
    }

    /// Every pin in the directory; anything else there is refused.
    pub fn pins(&self) -> Result<Vec<Pin>, PinError> {
        list(&self.dir)
    }
}

/// The pins in `dir` (a version directory); anything else there is refused.
pub fn list(dir: &Path) -> Result<Vec<Pin>, PinError> {
    let io = |source| PinError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut pins = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(pins),
        Err(e) => return Err(io(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let parsed = name.split_once('-').and_then(|(inode, program)| {
            let inode = inode.parse().ok()?;
            let program = ATTACHED.iter().find(|p| **p == program)?;
            Some((inode, *program))
        });
        let Some((cgroup_inode, program)) = parsed else {
            return Err(PinError::Foreign {
                dir: dir.to_owned(),
                entry: name,
            });
        };
        pins.push(Pin {
            cgroup_inode,
            program,
            path: entry.path(),
        });
    }
    pins.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(pins)
}

/// Removes every pin in `base/v1` and the directory: each link (and its program) goes with
/// its last reference. Refused while a daemon holds the directory. How many were removed.
pub fn detach(base: &Path) -> Result<usize, PinError> {
    let dir = base.join(LAYOUT);
    if !dir.exists() {
        return Ok(0);
    }
    let pins = PinDir::open(base)?;
    let all = pins.pins()?;
    for pin in &all {
        std::fs::remove_file(&pin.path).map_err(|source| PinError::Io {
            path: pin.path.clone(),
            source,
        })?;
    }
    let _ = std::fs::remove_dir(&dir);
    drop(pins);
    // The base too, when nothing else is in it (it was made for the pins).
    let _ = std::fs::remove_dir(base);
    Ok(all.len())
}

/// An exclusive flock on `dir`, or [`PinError::Busy`] when another daemon holds it.
fn lock(dir: &Path) -> Result<File, PinError> {
    let io = |source| PinError::Io {
        path: dir.to_owned(),
        source,
    };
    let lock = File::open(dir).map_err(io)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => PinError::Busy(dir.to_owned()),
            _ => io(e),
        });
    }
    Ok(lock)
}

/// The inode of a cgroup directory (open), which names its pins (stable while the cgroup
/// lives; the cgroup's id on cgroup v2).
pub fn cgroup_inode(dir: &File) -> io::Result<u64> {
    Ok(dir.metadata()?.ino())
}

/// Replaces the program of the link pinned at `path` with `program` in one step.
///
/// aya 0.14 keeps `BPF_LINK_UPDATE` (and getting a pinned link's descriptor) to itself, so the
/// two syscalls are made here: `BPF_OBJ_GET` for the pinned link, `BPF_LINK_UPDATE` on it.
pub fn update_pinned(path: &Path, program: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let link = obj_get(path).map_err(|e| io::Error::new(e.kind(), format!("BPF_OBJ_GET: {e}")))?;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr)
        .map_err(|e| io::Error::new(e.kind(), format!("BPF_LINK_UPDATE: {e}")))?;
    Ok(())
}

/// `BPF_OBJ_GET`: a descriptor of the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn bpf<T>(cmd: i64, attr: &T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, fully initialised `bpf_attr` prefix of `size_of::<T>()`
    // bytes for `cmd`; the kernel reads no further.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// Makes sure `base` can hold pins: on bpffs already, or under /sys/fs/bpf with nothing
/// mounted there yet (then bpffs is mounted, as systemd does at boot).
fn ensure_bpffs(base: &Path) -> Result<(), PinError> {
    let existing = base
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !base.starts_with(root) || fs_type(root) == Some(BPF_FS_MAGIC) {
        return Err(PinError::NotBpffs(base.to_owned()));
    }
    let (source, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: mount(2) with NUL-terminated strings and no data.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(PinError::Mount(io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf for the pinned programs");
    Ok(())
}

fn fs_type(path: &Path) -> Option<i64> {
    let name = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: statfs writes the struct it is given.
    if unsafe { libc::statfs(name.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statfs succeeded, so the struct is initialised.
    let f_type = unsafe { stat.assume_init() }.f_type;
    // Its width depends on the architecture.
    #[allow(clippy::unnecessary_cast)]
    Some(f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_pins_are_listed_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list(&dir.path().join("missing")).unwrap().is_empty());
        for name in ["42-redirect_connect4", "42-redirect_getpeername6"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let pins = list(dir.path()).unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(
            (pins[0].cgroup_inode, pins[0].program),
            (42, "redirect_connect4")
        );
        std::fs::write(dir.path().join("cilium_policy"), b"").unwrap();
        let e = list(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("cilium_policy") && e.contains("another --pin-dir"),
            "{e}"
        );
    }

    #[test]
    fn nothing_to_detach_is_fine_and_a_plain_directory_is_not_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detach(&dir.path().join("never")).unwrap(), 0);
        let e = PinDir::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("not on a BPF filesystem"), "{e}");
    }
}
