//! Keeping the proxy's own upstream connects out of the redirect.
//!
//! Just before an upstream socket connects, its socket cookie goes into `EXEMPT_SOCKETS`; the
//! connect4/connect6 programs leave exempt sockets alone. The entry is removed as soon as the
//! connect has returned (or was abandoned), so the map holds only connects in flight. This holds
//! wherever the daemon runs, including inside a cgroup it redirects, and unlike a socket mark it
//! needs no routing-visible state and cannot be set by other processes.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, PoisonError},
};

use aya::maps::{HashMap, MapData};

pub struct ExemptSockets {
    map: Mutex<HashMap<MapData, u64, u8>>,
}

/// Removes the socket's exemption when dropped.
pub struct ExemptGuard {
    sockets: Arc<ExemptSockets>,
    cookie: u64,
}

impl ExemptSockets {
    pub fn new(map: HashMap<MapData, u64, u8>) -> Arc<Self> {
        Arc::new(ExemptSockets {
            map: Mutex::new(map),
        })
    }

    /// Exempts `socket` until the returned guard is dropped. Call before connect().
    pub fn exempt(self: &Arc<Self>, socket: &impl AsRawFd) -> io::Result<ExemptGuard> {
        let cookie = socket_cookie(socket.as_raw_fd())?;
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cookie, 1, 0)
            .map_err(|e| {
                io::Error::other(format!("exempting upstream socket from the redirect: {e}"))
            })?;
        Ok(ExemptGuard {
            sockets: Arc::clone(self),
            cookie,
        })
    }
}

impl Drop for ExemptGuard {
    fn drop(&mut self) {
        let mut map = self
            .sockets
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = map.remove(&self.cookie) {
            tracing::warn!("removing exemption of socket {}: {e}", self.cookie);
        }
    }
}

/// The kernel's unique id of a socket (`SO_COOKIE`), the same value `bpf_get_socket_cookie`
/// returns inside the programs.
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
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
