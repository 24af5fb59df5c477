//! What the kernel says about network namespaces, and what the daemon tells it back.
//!
//! A rewrite sends a connect to a loopback endpoint of the caller's own network namespace, so
//! the daemon listens in every namespace its callers live in (`crate::netns`). For a
//! namespace it has not found otherwise (a runtime it does not know), connect4/connect6
//! report a rewrite in a namespace missing from `SERVED_NETNS`: that connect is refused,
//! the next ones are served.
//!
//! (A tracing hook on namespace switches would find such namespaces before their first
//! connect, but tracing programs are refused where the kernel is locked down, as on the
//! machines this is tested on.)

use std::sync::{Mutex, PoisonError};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use redirect_common::{NetnsEvent, SERVED, SERVED_RECORD_PIDS, names};

use super::{EbpfError, Redirector, map_err};

/// The daemon's side of the namespace maps.
pub struct NetnsWatch {
    served: Mutex<HashMap<MapData, u64, u8>>,
    active: Array<MapData, u32>,
}

/// The kernel's reports, as they come: the ring buffer's descriptor becomes readable.
pub struct NetnsEvents(RingBuf<MapData>);

impl Redirector {
    /// Takes the namespace maps out.
    pub fn netns_watch(&mut self) -> Result<(NetnsWatch, NetnsEvents), EbpfError> {
        let mut take = |name| self.ebpf.take_map(name).ok_or(EbpfError::MissingMap(name));
        let events = take(names::NETNS_EVENTS)?;
        let served = take(names::SERVED_NETNS)?;
        let active = take(names::NETNS_ACTIVE)?;
        let watch = NetnsWatch {
            served: Mutex::new(HashMap::try_from(served).map_err(map_err(names::SERVED_NETNS))?),
            active: Array::try_from(active).map_err(map_err(names::NETNS_ACTIVE))?,
        };
        let events = RingBuf::try_from(events).map_err(map_err(names::NETNS_EVENTS))?;
        Ok((watch, NetnsEvents(events)))
    }
}

impl NetnsWatch {
    /// Marks a namespace as served (the daemon listens there now).
    pub fn serve(&self, cookie: u64) -> Result<(), EbpfError> {
        self.mark(cookie, SERVED)
    }

    /// Marks the daemon's own namespace as served, with each rewrite's process recorded.
    pub fn serve_recording_pids(&self, cookie: u64) -> Result<(), EbpfError> {
        self.mark(cookie, SERVED_RECORD_PIDS)
    }

    fn mark(&self, cookie: u64, how: u8) -> Result<(), EbpfError> {
        self.lock()
            .insert(cookie, how, 0)
            .map_err(map_err(names::SERVED_NETNS))
    }

    pub fn unserve(&self, cookie: u64) {
        let _ = self.lock().remove(&cookie);
    }

    /// Turns the reports on; call once the daemon's own namespace is served.
    pub fn activate(&mut self) -> Result<(), EbpfError> {
        self.active
            .set(0, 1, 0)
            .map_err(map_err(names::NETNS_ACTIVE))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, u8>> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl NetnsEvents {
    /// The events waiting in the ring buffer.
    pub fn drain(&mut self) -> Vec<NetnsEvent> {
        let mut out = Vec::new();
        while let Some(record) = self.0.next() {
            if let Some(event) = NetnsEvent::from_bytes(&record) {
                out.push(event);
            }
        }
        out
    }
}

impl std::os::fd::AsRawFd for NetnsEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
