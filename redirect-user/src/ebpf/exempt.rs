//! Keeping the proxy's own upstream connects out of the redirect: a guard per socket, the maps
//! behind it.
//!
//! Just before an upstream socket connects, its socket cookie goes into `EXEMPT_SOCKETS`; the
//! connect4/connect6 programs leave exempt sockets alone. The entry is removed as soon as the
//! connect has returned (or was abandoned), so the map holds only connects in flight, and
//! `EXEMPT_ACTIVE` is non-zero exactly while it holds any: the programs skip the lookup
//! otherwise. This holds
//! wherever the daemon runs, including inside a cgroup it redirects, and unlike a socket mark it
//! needs no routing-visible state and cannot be set by other processes.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, RawFd},
    sync::{Arc, Mutex, PoisonError},
};

use aya::maps::{Array, HashMap, MapData};

/// The daemon's handle on the exemption maps: the only way to exempt a socket. The proxy's
/// upstream connector holds it and asks for a guard per connect; the maps stay in here.
pub struct Exemptions {
    maps: Mutex<Maps>,
}

struct Maps {
    sockets: HashMap<MapData, u64, u8>,
    active: Array<MapData, u32>,
    /// Entries in `sockets`; `active` mirrors whether it is non-zero.
    in_flight: usize,
}

/// Removes the socket's exemption when dropped.
pub struct ExemptGuard {
    exemptions: Arc<Exemptions>,
    cookie: u64,
}

impl Exemptions {
    /// `sockets`: cookies of exempt sockets; `active`: non-zero while `sockets` holds any, so
    /// that the programs look it up only then.
    pub(super) fn new(
        sockets: HashMap<MapData, u64, u8>,
        active: Array<MapData, u32>,
    ) -> Arc<Self> {
        Arc::new(Exemptions {
            maps: Mutex::new(Maps {
                sockets,
                active,
                in_flight: 0,
            }),
        })
    }

    /// Exempts `socket` until the returned guard is dropped. Call before connect().
    pub fn exempt(self: &Arc<Self>, socket: &impl AsFd) -> io::Result<ExemptGuard> {
        let cookie = socket_cookie(socket.as_fd().as_raw_fd())?;
        let failed =
            |e| io::Error::other(format!("exempting upstream socket from the redirect: {e}"));
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        // The flag goes up before the cookie goes in, so the programs never miss an entry.
        if maps.in_flight == 0 {
            maps.active.set(0, 1, 0).map_err(failed)?;
        }
        maps.in_flight += 1;
        if let Err(e) = maps.sockets.insert(cookie, 1, 0) {
            maps.release();
            return Err(failed(e));
        }
        drop(maps);
        Ok(ExemptGuard {
            exemptions: Arc::clone(self),
            cookie,
        })
    }
}

impl Maps {
    /// One exemption fewer; the flag goes down with the last.
    fn release(&mut self) {
        self.in_flight -= 1;
        if self.in_flight == 0
            && let Err(e) = self.active.set(0, 0, 0)
        {
            tracing::warn!("clearing the exemption flag: {e}");
        }
    }
}

impl Drop for ExemptGuard {
    fn drop(&mut self) {
        let mut maps = self
            .exemptions
            .maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = maps.sockets.remove(&self.cookie) {
            tracing::warn!("removing exemption of socket {}: {e}", self.cookie);
        }
        maps.release();
    }
}

/// The kernel's unique id of a socket (`SO_COOKIE`), the same value `bpf_get_socket_cookie`
/// returns inside the programs.
fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
