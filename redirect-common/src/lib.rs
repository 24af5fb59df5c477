//! Types shared by the eBPF programs (`redirect-ebpf`) and the daemon (`redirect-user`).
//!
//! Every type that crosses the kernel boundary is `#[repr(C)]`, spells out its padding as a
//! named field (so no byte of a map key is ever uninitialised) and has its size asserted below.
//!
//! Byte order: addresses and ports are stored exactly as the kernel hands them to a
//! `cgroup/connect*` program in `struct bpf_sock_addr`, i.e. in **network byte order**. The
//! constructors in the `user` part convert from `std::net` types; the eBPF side copies the raw
//! fields without any conversion.
#![no_std]

/// Names of the maps and programs in the eBPF object. The daemon looks them up by these names.
pub mod names {
    /// `Array<TargetSlot4>` of [`crate::TARGET_SLOTS`]: IPv4 destinations to rewrite, and
    /// where to, as an open-addressed table (see [`crate::TargetSlot`]).
    pub const TARGETS4: &str = "TARGETS4";
    /// `Array<TargetSlot6>` of [`crate::TARGET_SLOTS`]: the same for IPv6 destinations.
    pub const TARGETS6: &str = "TARGETS6";
    /// `HashMap<u64, u8>`: socket cookies whose connects are never rewritten (the proxy's own
    /// upstream sockets).
    pub const EXEMPT_SOCKETS: &str = "EXEMPT_SOCKETS";
    /// `Array<u32>` of one: non-zero while any socket is exempt, so that connects look the
    /// exemption map up only while the proxy has an upstream connect in flight.
    pub const EXEMPT_ACTIVE: &str = "EXEMPT_ACTIVE";
    /// `Array<u8>` indexed by port (host byte order): non-zero for ports some target uses, so
    /// that connects to any other port skip the target lookups.
    pub const TARGET_PORTS: &str = "TARGET_PORTS";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `Array<OriginalDest>` of [`crate::ORIGINAL_SLOTS`] slots: what a rewritten socket dialled,
    /// in the slot its socket cookie selects, for getpeername.
    pub const ORIGINAL_DEST: &str = "ORIGINAL_DEST";
    /// `HashMap<SockAddr4, SockAddr4>` and `HashMap<SockAddr6, SockAddr6>`: the proxy
    /// endpoints as a socket of that family sees them (IPv6 sockets see IPv4 proxies in
    /// IPv4-mapped form), each with the address to report for a socket connected to it: the
    /// one target of a dedicated endpoint, or port 0 for a shared one, whose sockets are
    /// looked up in [`ORIGINAL_DEST`]. Lets getpeername pass by every other socket at once.
    pub const PROXIES4: &str = "PROXIES4";
    pub const PROXIES6: &str = "PROXIES6";

    /// `HashMap<u64, u8>` of [`crate::MAX_SERVED_NETNS`]: cookies of the network namespaces
    /// where the daemon listens on the proxy endpoints (its own and those it planted
    /// listeners in), each with [`crate::SERVED`] or [`crate::SERVED_RECORD_PIDS`]. A rewrite
    /// from any other namespace is reported in [`NETNS_EVENTS`].
    pub const SERVED_NETNS: &str = "SERVED_NETNS";
    /// `Array<u32>` of one: non-zero while the daemon plants listeners, so that rewrites look
    /// [`SERVED_NETNS`] up only then (not with `--redirect-to`).
    pub const NETNS_ACTIVE: &str = "NETNS_ACTIVE";
    /// `RingBuf` of [`crate::NETNS_EVENT_BYTES`] carrying [`crate::NetnsEvent`]s.
    pub const NETNS_EVENTS: &str = "NETNS_EVENTS";
    /// `Array<CallerPid>` of [`crate::CALLER_SLOTS`]: which process made each socket rewritten
    /// in a namespace served with [`crate::SERVED_RECORD_PIDS`], in the slot its socket cookie
    /// selects. The daemon learns an accepted connection's peer cookie from sock_diag.
    pub const CALLER_PIDS: &str = "CALLER_PIDS";

    /// `HashMap<u32, u8>` and `HashMap<[u32; 4], u8>` of [`crate::MAX_TARGETS`]: the targets'
    /// addresses (each word in network order, as the packet holds it), which the escape guard
    /// keeps every packet away from but the proxy's own ([`crate::GUARD_MARK`]).
    pub const GUARD_ADDRS4: &str = "GUARD_ADDRS4";
    pub const GUARD_ADDRS6: &str = "GUARD_ADDRS6";
    /// `HashMap<u64, u64>` of [`crate::MAX_ESCAPE_CGROUPS`]: packets the guard dropped, by the
    /// cgroup id of their socket.
    pub const ESCAPES: &str = "ESCAPES";

    pub const PROG_CONNECT4: &str = "redirect_connect4";
    pub const PROG_CONNECT6: &str = "redirect_connect6";
    pub const PROG_GETPEERNAME4: &str = "redirect_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "redirect_getpeername6";
    /// `cgroup_skb/egress`: drops packets to a target that did not go through the redirect.
    pub const PROG_GUARD: &str = "redirect_guard";
}

/// `SO_MARK` of the proxy's upstream sockets: the escape guard lets their packets to the
/// real metadata service pass ("RDIR").
pub const GUARD_MARK: u32 = 0x5244_4952;

/// Cgroups whose escapes are counted one by one; beyond, they are still dropped.
pub const MAX_ESCAPE_CGROUPS: u32 = 4_096;

/// Network namespaces the daemon can serve at once (each with its own listeners).
pub const MAX_SERVED_NETNS: u32 = 65_536;
/// Size of the namespace event ring buffer: about 10,000 events of 16 bytes (plus headers)
/// before the daemon must have read some; when full, events are dropped and counted.
pub const NETNS_EVENT_BYTES: u32 = 256 << 10;

/// [`names::SERVED_NETNS`] value of a namespace served by listeners the daemon planted there:
/// its callers are known by the namespace.
pub const SERVED: u8 = 1;
/// [`names::SERVED_NETNS`] value of the daemon's own namespace: its callers (the host's
/// processes) are told apart one by one, so each rewrite records its process in
/// [`names::CALLER_PIDS`].
pub const SERVED_RECORD_PIDS: u8 = 2;

/// Slots of [`names::CALLER_PIDS`], a power of two: slot = cookie % slots. The daemon reads an
/// entry right after accepting the connection, long before 4,095 more rewrites could reuse its
/// slot. 64 KiB.
pub const CALLER_SLOTS: u32 = 4_096;

/// One entry of [`names::CALLER_PIDS`]. The program stores the cookie 0 first, then the pid,
/// then the cookie; a reader copies the entry twice and takes it only when both copies agree
/// and carry the cookie it looks for, so it never pairs a cookie with another socket's pid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerPid {
    /// `bpf_get_current_pid_tgid()` of the connecting thread (see [`NetnsEvent::pid_tgid`]).
    pub pid_tgid: u64,
    /// The socket's cookie; 0 while the slot is being written.
    pub cookie: u64,
}

/// One event of [`names::NETNS_EVENTS`]: a connect was rewritten in a network namespace
/// without the daemon's listeners. It fails (nothing listens there); the daemon plants
/// listeners for the next ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsEvent {
    /// `bpf_get_current_pid_tgid()`: thread group id (the pid) in the upper 32 bits, thread id
    /// in the lower, both as the initial pid namespace numbers them.
    pub pid_tgid: u64,
    /// The namespace's cookie (what `SO_NETNS_COOKIE` returns).
    pub netns_cookie: u64,
}

/// How many targets of one address family the daemon accepts. A host redirects a handful of
/// metadata endpoints; the cap keeps the target tables at most half full.
pub const MAX_TARGETS: u32 = 16_384;
/// Slots of each target table, a power of two: twice [`MAX_TARGETS`], so that probe
/// sequences stay short (512 KiB for IPv4, 1.25 MiB for IPv6).
pub const TARGET_SLOTS: u32 = 32_768;
/// The longest probe sequence a lookup follows. Placement fails rather than put an entry
/// further from its home slot; at the maximum load, random and sequential addresses alike end
/// up within 30 slots (see the tests).
pub const MAX_PROBES: u32 = 64;
/// Capacity of the exemption map: one entry per upstream connect in flight.
pub const MAX_EXEMPT_SOCKETS: u32 = 4_096;
/// Slots of the original-destination table, a power of two: slot = cookie % slots. A socket's
/// entry survives until another rewritten socket's cookie selects the same slot, i.e. for the
/// next 65,535 rewritten connects at least (cookies are handed out in sequence). 3 MB.
pub const ORIGINAL_SLOTS: u32 = 65_536;
/// Capacity of each proxy-endpoint map: the IPv6 map holds every IPv4 endpoint in its
/// mapped form as well as the IPv6 ones.
pub const MAX_PROXIES: u32 = 256;
/// A listener gives each of its targets a port of its own (a dedicated endpoint, see
/// [`TargetSlot::record`]) when it serves at most this many; beyond that they share its port.
/// Two listeners (IPv4, IPv6) of up to this many endpoints each fit [`MAX_PROXIES`].
pub const MAX_DEDICATED: u32 = 64;

/// An IPv4 socket address as `bpf_sock_addr` carries it: both fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr4 {
    /// IPv4 address, network byte order (the in-memory bytes are the dotted quad in order).
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero so that keys compare byte for byte.
    pub _pad: u16,
}

/// An IPv6 socket address as `bpf_sock_addr` carries it: both fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr6 {
    /// IPv6 address as four 32-bit words, each in network byte order (the in-memory bytes are
    /// the address's 16 bytes in order).
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}

/// One slot of a target table: connects to `dialled` go to `proxy`, and `record` says how
/// getpeername will find `dialled` again.
///
/// The tables are open-addressed arrays rather than kernel hash maps because an array lookup
/// is inlined into the program by the verifier, while a hash-map lookup is a helper call: on
/// the VM this was measured on, a helper call costs about 60 ns and a hash lookup about 140,
/// an array read under 10 (BENCHMARKS.md). An entry sits in the first free slot of the
/// probe sequence that starts at its key's [`TableKey::home_slot`]; a lookup walks the same
/// sequence until it finds the key or an unused slot. The daemon fills the tables before it
/// attaches the programs and never changes them afterwards, so a lookup never sees a slot
/// half written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetSlot<A> {
    /// The destination as dialled; port 0 (never dialled) marks an unused slot.
    pub dialled: A,
    /// Where the connect goes instead.
    pub proxy: A,
    /// Non-zero when `proxy` is shared (by several targets, or with connects made to it
    /// directly): connect4 then stores each rewritten socket's dialled address under its
    /// socket cookie, for getpeername. Zero when `proxy` is this target's dedicated endpoint,
    /// reached only by these rewrites: getpeername restores `dialled` from the peer address
    /// alone, and connect4 stores nothing, which spares it the cookie helper call and a store
    /// into a cold cache line (about 100 ns per rewrite, BENCHMARKS.md).
    pub record: u32,
}

pub type TargetSlot4 = TargetSlot<SockAddr4>;
pub type TargetSlot6 = TargetSlot<SockAddr6>;

/// A socket address usable as a target-table key.
pub trait TableKey: Copy + PartialEq {
    /// Where the key's probe sequence starts.
    fn home_slot(&self) -> u32;
    /// Port 0: no connect dials it, so it marks an unused slot.
    fn is_unused(&self) -> bool;
}

/// Fibonacci hashing: the top bits of the product with 2^64 / phi. Cheap in eBPF (one 64-bit
/// multiply) and it spreads sequential addresses evenly.
#[inline(always)]
const fn fibonacci_slot(x: u64) -> u32 {
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TARGET_SLOTS.trailing_zeros())) as u32
}

impl TableKey for SockAddr4 {
    #[inline(always)]
    fn home_slot(&self) -> u32 {
        fibonacci_slot(u64::from(self.addr) | u64::from(self.port) << 32)
    }

    #[inline(always)]
    fn is_unused(&self) -> bool {
        self.port == 0
    }
}

impl TableKey for SockAddr6 {
    #[inline(always)]
    fn home_slot(&self) -> u32 {
        let [a, b, c, d] = self.addr;
        let high = u64::from(a) << 32 | u64::from(b);
        let low = u64::from(c) << 32 | u64::from(d);
        fibonacci_slot(high.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ low ^ u64::from(self.port) << 16)
    }

    #[inline(always)]
    fn is_unused(&self) -> bool {
        self.port == 0
    }
}

impl<A: TableKey> TargetSlot<A> {
    /// The slot at step `step` of the probe sequence that starts at `home`.
    #[inline(always)]
    pub const fn probe(home: u32, step: u32) -> u32 {
        (home + step) & (TARGET_SLOTS - 1)
    }

    /// The slot of `dialled`, if it is a target. `slot` reads one slot of the table (a map
    /// read in the kernel, a slice index in tests).
    #[inline(always)]
    pub fn lookup<'a>(dialled: &A, slot: impl Fn(u32) -> Option<&'a Self>) -> Option<Self>
    where
        A: 'a,
    {
        let home = dialled.home_slot();
        let mut step = 0;
        while step < MAX_PROBES {
            let s = slot(Self::probe(home, step))?;
            // Unused first: an unused slot is all zeros, which must not match a dialled 0:0.
            if s.dialled.is_unused() {
                return None;
            }
            if s.dialled == *dialled {
                return Some(*s);
            }
            step += 1;
        }
        None
    }

    /// Puts `entry` into `table` (of [`TARGET_SLOTS`] slots) and returns the slot index. A
    /// key already present is replaced.
    pub fn place(table: &mut [Self], entry: Self) -> Result<u32, PlaceError> {
        let dialled = entry.dialled;
        if dialled.is_unused() {
            return Err(PlaceError::PortZero);
        }
        let home = dialled.home_slot();
        for step in 0..MAX_PROBES {
            let index = Self::probe(home, step);
            let s = table.get_mut(index as usize).ok_or(PlaceError::Full)?;
            if s.dialled.is_unused() || s.dialled == dialled {
                *s = entry;
                return Ok(index);
            }
        }
        Err(PlaceError::Full)
    }
}

/// Why a target could not be put into its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceError {
    /// Port 0 marks unused slots; no connect dials it.
    PortZero,
    /// No free slot within [`MAX_PROBES`] of the key's home slot.
    Full,
}

/// Kept for every rewritten socket, in the slot its cookie selects, so that getpeername can
/// report the address the application dialled instead of the proxy's.
///
/// IPv4 sockets use word 0 of the addresses and leave the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDest {
    /// The socket's cookie; 0 while the slot is being written (no socket has cookie 0).
    pub cookie: u64,
    /// What the application passed to connect().
    pub dialled: SockAddr6,
    /// What the program rewrote it to. getpeername only restores `dialled` when the peer is
    /// still this address, so a socket reused for another connect is reported truthfully.
    pub rewritten: SockAddr6,
}

/// Indices into the per-CPU `COUNTERS` array. Each connect counts once, as passed or
/// rewritten, so a rewrite costs one counter update (the daemon adds the two up for "connects
/// seen"); an exempted connect also counts as exempted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() calls on IPv4 sockets that connect4 left alone: not TCP,
    /// not a target, or exempt.
    Connect4Passed = 0,
    /// IPv4 connects rewritten to the proxy.
    Connect4Rewritten = 1,
    /// connect() calls on IPv6 sockets that connect6 left alone.
    Connect6Passed = 2,
    /// IPv6 connects (native or IPv4-mapped) rewritten to the proxy.
    Connect6Rewritten = 3,
    /// Connects to a target left alone because the socket belongs to the proxy itself.
    Exempted = 4,
    /// getpeername() calls that reported the dialled address instead of the proxy.
    PeernameRestored = 5,
    /// Rewrites whose original destination could not be stored (getpeername will show the proxy).
    StorageFailed = 6,
    /// Rewrites in a network namespace without the daemon's listeners (refused, until the
    /// daemon has planted them).
    NetnsUnserved = 7,
    /// Namespace events lost because the ring buffer was full.
    NetnsEventsDropped = 8,
    /// Packets to a target that did not go through the redirect (raw sockets, UDP, sockets
    /// connected before the programs were attached), dropped by the escape guard.
    EscapesDropped = 9,
}

impl Counter {
    /// Number of counters; the length of the `COUNTERS` array.
    pub const COUNT: u32 = 10;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Connect4Passed,
        Counter::Connect4Rewritten,
        Counter::Connect6Passed,
        Counter::Connect6Rewritten,
        Counter::Exempted,
        Counter::PeernameRestored,
        Counter::StorageFailed,
        Counter::NetnsUnserved,
        Counter::NetnsEventsDropped,
        Counter::EscapesDropped,
    ];

    /// Stable name, used in `redirect status` output and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4Passed => "connect4_passed",
            Counter::Connect4Rewritten => "connect4_rewritten",
            Counter::Connect6Passed => "connect6_passed",
            Counter::Connect6Rewritten => "connect6_rewritten",
            Counter::Exempted => "exempted_own_connects",
            Counter::PeernameRestored => "getpeername_restored",
            Counter::StorageFailed => "storage_failed",
            Counter::NetnsUnserved => "netns_unserved",
            Counter::NetnsEventsDropped => "netns_events_dropped",
            Counter::EscapesDropped => "escapes_dropped",
        }
    }
}

/// Words 0..=2 of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as `user_ip6` holds them
/// (each word's bytes in network order); word 3 is the IPv4 address.
pub const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

const _: () = assert!(size_of::<SockAddr4>() == 8);
const _: () = assert!(size_of::<SockAddr6>() == 20);
const _: () = assert!(size_of::<OriginalDest>() == 48);
const _: () = assert!(size_of::<NetnsEvent>() == 16);
const _: () = assert!(size_of::<CallerPid>() == 16);
const _: () = assert!(CALLER_SLOTS.is_power_of_two());
const _: () = assert!(align_of::<OriginalDest>() == 8);
const _: () = assert!(ORIGINAL_SLOTS.is_power_of_two());
const _: () = assert!(size_of::<TargetSlot4>() == 20);
const _: () = assert!(size_of::<TargetSlot6>() == 44);
const _: () = assert!(2 * MAX_DEDICATED + 2 <= MAX_PROXIES);
const _: () = assert!(TARGET_SLOTS.is_power_of_two() && TARGET_SLOTS >= 2 * MAX_TARGETS);

#[cfg(feature = "user")]
mod user {
    use core::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

    use super::{SockAddr4, SockAddr6, V4_MAPPED_PREFIX};

    // SAFETY: plain old data, `#[repr(C)]`, every byte is a named field (no implicit padding).
    unsafe impl aya::Pod for SockAddr4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockAddr6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OriginalDest {}
    // SAFETY: as above: two u64s.
    unsafe impl aya::Pod for super::CallerPid {}
    // SAFETY: as above: two padding-free addresses and a u32.
    unsafe impl aya::Pod for super::TargetSlot4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetSlot6 {}

    impl super::NetnsEvent {
        /// Reads an event from a ring-buffer record; `None` for a record of another size.
        pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
            if bytes.len() != size_of::<Self>() {
                return None;
            }
            // SAFETY: the length matches and every bit pattern is a valid NetnsEvent (plain
            // integers); read_unaligned because a ring buffer record is only 8-byte aligned
            // by convention.
            Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) })
        }

        pub fn pid(&self) -> u32 {
            (self.pid_tgid >> 32) as u32
        }

        pub fn tid(&self) -> u32 {
            self.pid_tgid as u32
        }
    }

    impl From<SocketAddrV4> for SockAddr4 {
        fn from(sa: SocketAddrV4) -> Self {
            SockAddr4 {
                // The octets in memory order are network byte order.
                addr: u32::from_ne_bytes(sa.ip().octets()),
                port: sa.port().to_be(),
                _pad: 0,
            }
        }
    }

    impl From<SockAddr4> for SocketAddrV4 {
        fn from(sa: SockAddr4) -> Self {
            SocketAddrV4::new(Ipv4Addr::from(sa.addr.to_ne_bytes()), u16::from_be(sa.port))
        }
    }

    impl From<SocketAddrV6> for SockAddr6 {
        fn from(sa: SocketAddrV6) -> Self {
            let o = sa.ip().octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockAddr6 {
                addr: [word(0), word(4), word(8), word(12)],
                port: sa.port().to_be(),
                _pad: 0,
            }
        }
    }

    impl From<SockAddr6> for SocketAddrV6 {
        fn from(sa: SockAddr6) -> Self {
            let mut o = [0u8; 16];
            for (chunk, word) in o.chunks_exact_mut(4).zip(sa.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            SocketAddrV6::new(Ipv6Addr::from(o), u16::from_be(sa.port), 0, 0)
        }
    }

    impl SockAddr6 {
        /// The IPv4-mapped form (`::ffff:a.b.c.d`) of an IPv4 socket address.
        pub fn v4_mapped(sa: SockAddr4) -> Self {
            SockAddr6 {
                addr: [
                    V4_MAPPED_PREFIX[0],
                    V4_MAPPED_PREFIX[1],
                    V4_MAPPED_PREFIX[2],
                    sa.addr,
                ],
                port: sa.port,
                _pad: 0,
            }
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use core::net::{SocketAddrV4, SocketAddrV6};

    use super::*;

    /// The bytes of a key as the kernel compares them.
    fn bytes<T: Copy, const N: usize>(v: &T) -> [u8; N] {
        assert_eq!(size_of::<T>(), N);
        // SAFETY: T is a padding-free #[repr(C)] struct of exactly N bytes.
        unsafe { core::mem::transmute_copy(v) }
    }

    #[test]
    fn ipv4_keys_are_in_network_byte_order() {
        let sa = SockAddr4::from("169.254.169.254:80".parse::<SocketAddrV4>().unwrap());
        // Address octets in order, then the port big-endian, then zero padding: exactly what
        // `user_ip4` and the low 16 bits of `user_port` hold in a connect4 program.
        assert_eq!(bytes::<_, 8>(&sa), [169, 254, 169, 254, 0, 80, 0, 0]);
        let sa = SockAddr4::from("127.0.0.1:8169".parse::<SocketAddrV4>().unwrap());
        assert_eq!(bytes::<_, 8>(&sa), [127, 0, 0, 1, 0x1f, 0xe9, 0, 0]);
        assert_eq!(SocketAddrV4::from(sa), "127.0.0.1:8169".parse().unwrap());
    }

    #[test]
    fn ipv6_keys_are_in_network_byte_order() {
        let v6: SocketAddrV6 = "[fd00:ec2::254]:80".parse().unwrap();
        let sa = SockAddr6::from(v6);
        let b = bytes::<_, 20>(&sa);
        assert_eq!(&b[..16], &v6.ip().octets());
        assert_eq!(&b[16..], &[0, 80, 0, 0]);
        assert_eq!(SocketAddrV6::from(sa), v6);
    }

    #[test]
    fn v4_mapped_form() {
        let v4 = SockAddr4::from("127.0.0.1:8169".parse::<SocketAddrV4>().unwrap());
        let mapped = SockAddr6::v4_mapped(v4);
        assert_eq!(
            SocketAddrV6::from(mapped),
            "[::ffff:127.0.0.1]:8169".parse::<SocketAddrV6>().unwrap()
        );
        let prefix: [u8; 12] = bytes(&V4_MAPPED_PREFIX);
        assert_eq!(prefix, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    }

    extern crate std;
    use std::{vec, vec::Vec};

    fn v4(i: u32, port: u16) -> SockAddr4 {
        SockAddr4 {
            addr: i.to_be(),
            port: port.to_be(),
            _pad: 0,
        }
    }

    fn v6(i: u32, port: u16) -> SockAddr6 {
        SockAddr6 {
            addr: [0xfd00_0000u32.to_be(), 0, (i >> 16).to_be(), i.to_be()],
            port: port.to_be(),
            _pad: 0,
        }
    }

    fn entry<A>(dialled: A, proxy: A) -> TargetSlot<A> {
        TargetSlot {
            dialled,
            proxy,
            record: 0,
        }
    }

    /// Fills a table with `keys`, checks every one is found with its own proxy, and returns
    /// the longest distance from a home slot.
    fn fill_and_find<A: TableKey + Default + core::fmt::Debug>(
        keys: &[A],
        proxy_of: impl Fn(usize) -> A,
    ) -> u32 {
        let mut table = vec![TargetSlot::<A>::default(); TARGET_SLOTS as usize];
        let mut longest = 0;
        for (i, key) in keys.iter().enumerate() {
            let index = TargetSlot::place(&mut table, entry(*key, proxy_of(i))).expect("placed");
            longest = longest.max(index.wrapping_sub(key.home_slot()) & (TARGET_SLOTS - 1));
        }
        for (i, key) in keys.iter().enumerate() {
            let found = TargetSlot::lookup(key, |s| table.get(s as usize));
            assert_eq!(found, Some(entry(*key, proxy_of(i))), "{key:?}");
        }
        longest
    }

    #[test]
    fn target_tables_hold_the_maximum_with_short_probes() {
        // Sequential addresses (as a generated config would have) and scattered ones, on one
        // port and on many, at the largest number of targets the daemon accepts.
        let n = MAX_TARGETS;
        let sequential: Vec<_> = (0..n).map(|i| v4(0x0a01_0000 + i, 80)).collect();
        let scattered: Vec<_> = (0..n)
            .map(|i| v4(i.wrapping_mul(0x9E37_79B1), 1 + (i % 4096) as u16))
            .collect();
        let ports: Vec<_> = (0..n).map(|i| v4(0xa9fe_a9fe, 1 + i as u16)).collect();
        for keys in [&sequential, &scattered, &ports] {
            let longest = fill_and_find(keys, |i| v4(0x7f00_0001, 1 + (i % 60_000) as u16));
            assert!(longest < 30, "longest probe {longest}");
        }
        let sequential6: Vec<_> = (0..n).map(|i| v6(i, 80)).collect();
        let ports6: Vec<_> = (0..n).map(|i| v6(7, 1 + i as u16)).collect();
        for keys in [&sequential6, &ports6] {
            let longest = fill_and_find(keys, |i| v6(1, 1 + (i % 60_000) as u16));
            assert!(longest < 30, "longest probe {longest}");
        }
    }

    #[test]
    fn absent_keys_are_not_found() {
        let mut table = vec![TargetSlot4::default(); TARGET_SLOTS as usize];
        for i in 0..1_000 {
            TargetSlot::place(&mut table, entry(v4(0x0a00_0000 + i, 80), v4(1, 1))).unwrap();
        }
        for i in 1_000..5_000 {
            let key = v4(0x0a00_0000 + i, 80);
            assert_eq!(TargetSlot::lookup(&key, |s| table.get(s as usize)), None);
            // The same address on another port is another key.
            let key = v4(0x0a00_0000 + i - 1_000, 81);
            assert_eq!(TargetSlot::lookup(&key, |s| table.get(s as usize)), None);
        }
    }

    #[test]
    fn an_all_zero_key_matches_no_unused_slot() {
        let table = vec![TargetSlot4::default(); TARGET_SLOTS as usize];
        let zero = SockAddr4::default();
        assert_eq!(TargetSlot::lookup(&zero, |s| table.get(s as usize)), None);
    }

    #[test]
    fn placing_a_key_again_replaces_it() {
        let mut table = vec![TargetSlot4::default(); TARGET_SLOTS as usize];
        let key = v4(0xa9fe_a9fe, 80);
        let first = TargetSlot::place(&mut table, entry(key, v4(1, 1))).unwrap();
        let shared = TargetSlot {
            dialled: key,
            proxy: v4(2, 2),
            record: 1,
        };
        let again = TargetSlot::place(&mut table, shared).unwrap();
        assert_eq!(first, again);
        assert_eq!(
            TargetSlot::lookup(&key, |s| table.get(s as usize)),
            Some(shared)
        );
    }

    #[test]
    fn placement_refuses_port_zero_and_long_probes() {
        let mut table = vec![TargetSlot4::default(); TARGET_SLOTS as usize];
        assert_eq!(
            TargetSlot::place(&mut table, entry(v4(1, 0), v4(1, 1))),
            Err(PlaceError::PortZero)
        );
        // Occupy the whole probe sequence of one key with other keys.
        let key = v4(0xa9fe_a9fe, 80);
        let home = key.home_slot();
        for step in 0..MAX_PROBES {
            table[TargetSlot4::probe(home, step) as usize].dialled = v4(step + 1, 1);
        }
        assert_eq!(
            TargetSlot::place(&mut table, entry(key, v4(1, 1))),
            Err(PlaceError::Full)
        );
        // A lookup gives up after the same number of probes instead of walking on.
        assert_eq!(TargetSlot::lookup(&key, |s| table.get(s as usize)), None);
    }

    #[test]
    fn counter_table_is_complete() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "ALL is in index order");
        }
        let mut names: [&str; Counter::COUNT as usize] = Counter::ALL.map(Counter::name);
        names.sort_unstable();
        assert!(names.windows(2).all(|w| w[0] != w[1]), "names are unique");
    }
}
