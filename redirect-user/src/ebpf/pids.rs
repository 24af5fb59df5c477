//! Which host process made a rewritten connection: connect4/connect6 record the connecting
//! process under the socket's cookie for sockets of the daemon's own namespace (see
//! `redirect_common::CallerPid`); the daemon reads it back when it accepts the connection and
//! has learnt the peer socket's cookie from sock_diag (`crate::host_callers`).
//!
//! The table is mapped into the daemon's memory (`BPF_F_MMAPABLE`), so reading an entry is
//! two memory loads, not a `bpf()` syscall (about 3 us each on the benchmark VM).

use std::{
    os::fd::AsFd as _,
    ptr::NonNull,
    sync::atomic::{Ordering, fence},
};

use aya::maps::{Map, MapData};
use redirect_common::{CALLER_SLOTS, CallerPid, names};

use super::{EbpfError, Redirector};

/// The kernel's table, mapped read-only.
pub struct CallerPids {
    slots: NonNull<CallerPid>,
    /// Keeps the map alive as long as the mapping.
    _map: MapData,
}

// SAFETY: the mapping is only read, and lives as long as the struct.
unsafe impl Send for CallerPids {}
// SAFETY: as above.
unsafe impl Sync for CallerPids {}

const BYTES: usize = CALLER_SLOTS as usize * size_of::<CallerPid>();

impl Redirector {
    /// Takes the caller-pid table out and maps it.
    pub fn caller_pids(&mut self) -> Result<CallerPids, EbpfError> {
        let name = names::CALLER_PIDS;
        let Some(Map::Array(map)) = self.ebpf.take_map(name) else {
            return Err(EbpfError::MissingMap(name));
        };
        // SAFETY: a fresh shared read-only mapping of the map's descriptor, of the array's
        // size (one page-aligned region: 64 KiB); nothing else is placed at its address.
        let slots = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                BYTES,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .map_err(|e| EbpfError::Mmap {
            name,
            source: e.into(),
        })?;
        Ok(CallerPids {
            slots: NonNull::new(slots.cast()).ok_or(EbpfError::MissingMap(name))?,
            _map: map,
        })
    }
}

impl CallerPids {
    /// The process (thread group id) that connected the socket `cookie`, while its slot still
    /// holds it. Read like a seqlock: the cookie, the pid, the cookie again (the program
    /// writes 0 to the cookie first and the cookie last).
    pub fn pid(&self, cookie: u64) -> Option<u32> {
        if cookie == 0 {
            return None;
        }
        let index = (cookie & u64::from(CALLER_SLOTS - 1)) as usize;
        // SAFETY: `index` is below CALLER_SLOTS, so the slot is inside the mapping; its u64
        // fields are 8-byte aligned (a page-aligned array of 16-byte entries). Volatile: the
        // kernel writes them behind the compiler's back; the fences keep the reads in order.
        unsafe {
            let slot = self.slots.as_ptr().add(index);
            if std::ptr::read_volatile(&raw const (*slot).cookie) != cookie {
                return None; // not recorded (not redirected), or overwritten since
            }
            fence(Ordering::Acquire);
            let pid_tgid = std::ptr::read_volatile(&raw const (*slot).pid_tgid);
            fence(Ordering::Acquire);
            (std::ptr::read_volatile(&raw const (*slot).cookie) == cookie)
                .then_some((pid_tgid >> 32) as u32)
        }
    }
}

impl Drop for CallerPids {
    fn drop(&mut self) {
        // SAFETY: the region mapped in `caller_pids`, unmapped once.
        let _ = unsafe { rustix::mm::munmap(self.slots.as_ptr().cast(), BYTES) };
    }
}
