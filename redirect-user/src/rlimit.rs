//! Process resource limits the daemon raises for itself at start.

use std::io;

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK.
pub fn raise_memlock() {
    raise(libc::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK", true);
}

/// One descriptor per proxied connection (and per upstream connection): the soft limit is often
/// 1024 while the hard limit allows far more, so take the hard limit, as servers commonly do.
pub fn raise_nofile() {
    raise(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", false);
}

/// The soft descriptor limit (after [`raise_nofile`]: the hard one).
pub fn nofile() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Sets the soft limit to the hard limit; with `unlimited`, first tries both to infinity.
fn raise(resource: libc::__rlimit_resource_t, name: &str, unlimited: bool) {
    if unlimited {
        let infinite = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid struct.
        if unsafe { libc::setrlimit(resource, &infinite) } == 0 {
            return;
        }
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    let ok = unsafe {
        libc::getrlimit(resource, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(resource, &limit) == 0
        }
    };
    if !ok {
        // Only matters under load or on old kernels, where the errors that follow say so.
        tracing::debug!("could not raise {name}: {}", io::Error::last_os_error());
    }
}
