//! Kernel side of redirect: cgroup socket-address hooks that send connects aimed at a
//! metadata address to the daemon's proxy, and make getpeername report the address the
//! application dialled; and an egress guard that drops what reaches a metadata address
//! another way (raw sockets, UDP, sockets connected before the hooks were attached).
//!
//! Every program returns 1 ("proceed"): a program here may rewrite a destination, never refuse a
//! connect. The daemon fills `TARGETS4`/`TARGETS6`; nothing outside those (address, port) pairs is
//! touched.
//!
//! getpeername finds the dialled address one of two ways. A target with a dedicated proxy
//! endpoint (a port nothing else is sent to, which the daemon's own listener gives each target)
//! is restored from the peer address alone: connect4 stores nothing. A target whose endpoint is
//! shared (`--redirect-to`, or more targets than dedicated ports) has each rewritten socket's
//! dialled address stored under its cookie, so that direct connects to the same endpoint are
//! told apart. When several cgroups on a path carry these programs, each runs in turn; a rewritten
//! address is not itself a target, so the later runs leave it alone.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_MMAPABLE, bpf_sock_addr},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext},
};
use aya_log_ebpf::debug;
use redirect_common::{
    CALLER_SLOTS, CallerPid, Counter, GUARD_MARK, MAX_ESCAPE_CGROUPS, MAX_EXEMPT_SOCKETS,
    MAX_PROXIES, MAX_SERVED_NETNS, MAX_TARGETS, NETNS_EVENT_BYTES, NetnsEvent, ORIGINAL_SLOTS,
    OriginalDest, SERVED_RECORD_PIDS, SockAddr4, SockAddr6, TARGET_SLOTS, TargetSlot, TargetSlot4,
    TargetSlot6, V4_MAPPED_PREFIX,
};

/// Return value that lets the (possibly rewritten) syscall proceed. 0 would fail it with EPERM.
const PROCEED: i32 = 1;
const IPPROTO_TCP: u32 = 6;

// Open-addressed tables, not hash maps: array reads are inlined by the verifier, a hash-map
// lookup is a helper call (see `TargetSlot`).
#[map]
static TARGETS4: Array<TargetSlot4> = Array::with_max_entries(TARGET_SLOTS, 0);

#[map]
static TARGETS6: Array<TargetSlot6> = Array::with_max_entries(TARGET_SLOTS, 0);

/// Socket cookies of the proxy's own upstream sockets. The daemon inserts a cookie just before
/// connect() and removes it right after, so its upstream connection to the real metadata service
/// is never sent back to itself, wherever the daemon runs.
#[map]
static EXEMPT_SOCKETS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_EXEMPT_SOCKETS, 0);

#[map]
static EXEMPT_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Ports some target uses (index: port in host byte order). An array lookup is inlined by the
/// verifier, so a connect to any other port costs one memory read.
#[map]
static TARGET_PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// What each rewritten socket dialled, in the slot its cookie selects (a direct-mapped table).
/// Not socket storage, which allocates per socket, nor an LRU hash, which takes two locks per
/// insert: on the benchmark machine those cost about 2 us and 0.5 us per connect, this a plain
/// store into preallocated memory. See BENCHMARKS.md.
#[map]
static ORIGINAL_DEST: Array<OriginalDest> = Array::with_max_entries(ORIGINAL_SLOTS, 0);

/// Proxy endpoints, each with the dialled address to report for a dedicated one (port 0 for a
/// shared one: see the socket's `ORIGINAL_DEST` entry).
#[map]
static PROXIES4: HashMap<SockAddr4, SockAddr4> = HashMap::with_max_entries(MAX_PROXIES, 0);

#[map]
static PROXIES6: HashMap<SockAddr6, SockAddr6> = HashMap::with_max_entries(MAX_PROXIES, 0);

/// Network namespaces with the daemon's listeners, by cookie (see `check_served`).
#[map]
static SERVED_NETNS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_SERVED_NETNS, 0);

#[map]
static NETNS_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Which process made each socket rewritten in the daemon's own namespace (see
/// `record_pid`). Direct-mapped like `ORIGINAL_DEST`, and only written for the host's callers:
/// a container's are known by their namespace. Mappable: the daemon reads it from memory.
#[map]
static CALLER_PIDS: Array<CallerPid> = Array::with_max_entries(CALLER_SLOTS, BPF_F_MMAPABLE);

#[map]
static NETNS_EVENTS: RingBuf = RingBuf::with_byte_size(NETNS_EVENT_BYTES, 0);

#[map]
static GUARD_ADDRS4: HashMap<u32, u8> = HashMap::with_max_entries(MAX_TARGETS, 0);

#[map]
static GUARD_ADDRS6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(MAX_TARGETS, 0);

#[map]
static ESCAPES: HashMap<u64, u64> = HashMap::with_max_entries(MAX_ESCAPE_CGROUPS, 0);

/// `__sk_buff.protocol` values (network order in the field, compared after `from_be`).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// cgroup_skb verdicts.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Every egress packet of a covered cgroup: one addressed to a target that is not the
/// proxy's own is dropped (the redirect rewrote every connect it saw; what still goes there
/// went around it).
#[cgroup_skb(egress)]
pub fn redirect_guard(ctx: SkBuffContext) -> i32 {
    match try_guard(&ctx) {
        Some(()) => DROP,
        None => PASS,
    }
}

/// `Some(())`: drop.
fn try_guard(ctx: &SkBuffContext) -> Option<()> {
    let skb = ctx.skb.skb;
    // SAFETY: the context's own `__sk_buff`, which the verifier lets programs read.
    let protocol = u16::from_be(unsafe { (*skb).protocol } as u16);
    // The data starts at the IP header. Destination words are kept as the packet has them
    // (network order), as the daemon stores them.
    let guarded = match protocol {
        ETH_P_IP => {
            let daddr: u32 = ctx.load(16).ok()?;
            // SAFETY: the value is only tested for presence.
            unsafe { GUARD_ADDRS4.get(daddr) }.is_some()
        }
        ETH_P_IPV6 => {
            let daddr: [u32; 4] = ctx.load(24).ok()?;
            // SAFETY: as above.
            unsafe { GUARD_ADDRS6.get(daddr) }.is_some()
        }
        _ => false,
    };
    // SAFETY: as above.
    if !guarded || unsafe { (*skb).mark } == GUARD_MARK {
        return None;
    }
    count(Counter::EscapesDropped);
    // SAFETY: a helper the cgroup_skb program type may call on its own skb.
    let cgroup = unsafe { bpf_skb_cgroup_id(skb) };
    match ESCAPES.get_ptr_mut(cgroup) {
        // SAFETY: a value of this map, updated in place (a lost increment under a race on
        // two CPUs is acceptable for a counter of refusals).
        Some(dropped) => unsafe { *dropped += 1 },
        None => {
            let _ = ESCAPES.insert(cgroup, 1, 0);
        }
    }
    Some(())
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // One counter update per connect: the rewrite counts itself.
    if try_connect4(&ctx).is_none() {
        count(Counter::Connect4Passed);
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    // One counter update per connect: the rewrite counts itself.
    if try_connect6(&ctx).is_none() {
        count(Counter::Connect6Passed);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername6(&ctx);
    PROCEED
}

/// `None` means "left alone", which is the common case, not an error.
fn try_connect4(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    if read(sa, |s| &raw const s.protocol) != IPPROTO_TCP {
        return None;
    }
    let port = user_port(sa);
    if !is_target_port(port) {
        return None;
    }
    let dialled = SockAddr4 {
        addr: read(sa, |s| &raw const s.user_ip4),
        port,
        _pad: 0,
    };
    let target = target4(&dialled)?;
    let proxy = target.proxy;
    if is_exempt(ctx) {
        count(Counter::Exempted);
        return None;
    }
    if target.record != 0 {
        remember(socket_cookie(ctx), widen(dialled), widen(proxy));
    }
    write(sa, |s| &raw mut s.user_ip4, proxy.addr);
    write(sa, |s| &raw mut s.user_port, u32::from(proxy.port));
    count(Counter::Connect4Rewritten);
    check_served(ctx);
    debug!(
        ctx,
        "connect4 {:i}:{} -> {:i}:{}",
        u32::from_be(dialled.addr),
        u16::from_be(dialled.port),
        u32::from_be(proxy.addr),
        u16::from_be(proxy.port)
    );
    Some(())
}

fn try_connect6(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    if read(sa, |s| &raw const s.protocol) != IPPROTO_TCP {
        return None;
    }
    let port = user_port(sa);
    if !is_target_port(port) {
        return None;
    }
    let dialled = SockAddr6 {
        addr: user_ip6(sa),
        port,
        _pad: 0,
    };
    let (proxy, record) = if dialled.addr[..3] == V4_MAPPED_PREFIX {
        // A dual-stack socket dialling ::ffff:a.b.c.d: an IPv4 connect in disguise, so the IPv4
        // targets apply and the proxy's IPv4 address is dialled in its mapped form.
        let key = SockAddr4 {
            addr: dialled.addr[3],
            port: dialled.port,
            _pad: 0,
        };
        let target = target4(&key)?;
        let proxy = SockAddr6 {
            addr: [
                V4_MAPPED_PREFIX[0],
                V4_MAPPED_PREFIX[1],
                V4_MAPPED_PREFIX[2],
                target.proxy.addr,
            ],
            port: target.proxy.port,
            _pad: 0,
        };
        (proxy, target.record)
    } else {
        let target = TargetSlot::lookup(&dialled, |i| TARGETS6.get(i))?;
        (target.proxy, target.record)
    };
    if is_exempt(ctx) {
        count(Counter::Exempted);
        return None;
    }
    if record != 0 {
        remember(socket_cookie(ctx), dialled, proxy);
    }
    set_user_ip6(sa, proxy.addr);
    write(sa, |s| &raw mut s.user_port, u32::from(proxy.port));
    count(Counter::Connect6Rewritten);
    check_served(ctx);
    debug!(
        ctx,
        "connect6 rewritten to port {}",
        u16::from_be(proxy.port)
    );
    Some(())
}

fn try_getpeername4(ctx: &SockAddrContext) -> Option<()> {
    let peer = SockAddr4 {
        addr: read(ctx.sock_addr, |s| &raw const s.user_ip4),
        port: user_port(ctx.sock_addr),
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the daemon never changes it once attached.
    let dedicated = *unsafe { PROXIES4.get(peer) }?;
    let dialled = if dedicated.port != 0 {
        dedicated
    } else {
        let original = original_dest(ctx)?;
        if widen(peer) != original.rewritten {
            return None;
        }
        SockAddr4 {
            addr: original.dialled.addr[0],
            port: original.dialled.port,
            _pad: 0,
        }
    };
    write(ctx.sock_addr, |s| &raw mut s.user_ip4, dialled.addr);
    write(
        ctx.sock_addr,
        |s| &raw mut s.user_port,
        u32::from(dialled.port),
    );
    count(Counter::PeernameRestored);
    Some(())
}

fn try_getpeername6(ctx: &SockAddrContext) -> Option<()> {
    let peer = SockAddr6 {
        addr: user_ip6(ctx.sock_addr),
        port: user_port(ctx.sock_addr),
        _pad: 0,
    };
    // SAFETY: as in `try_getpeername4`.
    let dedicated = *unsafe { PROXIES6.get(peer) }?;
    let dialled = if dedicated.port != 0 {
        dedicated
    } else {
        let original = original_dest(ctx)?;
        if peer != original.rewritten {
            return None;
        }
        original.dialled
    };
    set_user_ip6(ctx.sock_addr, dialled.addr);
    write(
        ctx.sock_addr,
        |s| &raw mut s.user_port,
        u32::from(dialled.port),
    );
    count(Counter::PeernameRestored);
    Some(())
}

/// The target-table slot of `dialled`, if it is an IPv4 target.
#[inline(always)]
fn target4(dialled: &SockAddr4) -> Option<TargetSlot4> {
    TargetSlot::lookup(dialled, |i| TARGETS4.get(i))
}

/// Stores what the socket dialled and what it now dials, for getpeername.
///
/// The slot is written like a seqlock: cookie 0 first, then the addresses, then the cookie,
/// each a volatile store so that they happen in this order; `original_dest` checks the cookie
/// before and after copying. A reader never takes a half-written entry for its own.
#[inline(always)]
fn remember(cookie: u64, dialled: SockAddr6, rewritten: SockAddr6) {
    let Some(slot) = ORIGINAL_DEST.get_ptr_mut(slot_of(cookie)) else {
        count(Counter::StorageFailed);
        return;
    };
    // SAFETY: `slot` points into the array's preallocated memory for this program's run.
    unsafe {
        core::ptr::write_volatile(&raw mut (*slot).cookie, 0);
        core::ptr::write_volatile(&raw mut (*slot).dialled, dialled);
        core::ptr::write_volatile(&raw mut (*slot).rewritten, rewritten);
        core::ptr::write_volatile(&raw mut (*slot).cookie, cookie);
    }
}

/// The entry of this socket, if its slot still holds it.
#[inline(always)]
fn original_dest(ctx: &SockAddrContext) -> Option<OriginalDest> {
    let cookie = socket_cookie(ctx);
    let slot = ORIGINAL_DEST.get_ptr(slot_of(cookie))?;
    // SAFETY: `slot` points into the array's preallocated memory for this program's run.
    let (before, entry, after) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*slot).cookie),
            core::ptr::read_volatile(slot),
            core::ptr::read_volatile(&raw const (*slot).cookie),
        )
    };
    (before == cookie && after == cookie).then_some(entry)
}

#[inline(always)]
fn slot_of(cookie: u64) -> u32 {
    (cookie & u64::from(ORIGINAL_SLOTS - 1)) as u32
}

/// The kernel's id of the socket (what SO_COOKIE returns). The first call on a socket creates
/// it (an atomic exchange), which is why a rewrite to a dedicated endpoint avoids it.
#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the socket behind the context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Whether the proxy exempted this socket. The cookie and the exemption map are only looked up
/// while some exemption exists (the proxy is connecting upstream), which is rare: pooled
/// connections. During such a window a recorded rewrite asks for the cookie twice; the second
/// call only reads it.
#[inline(always)]
fn is_exempt(ctx: &SockAddrContext) -> bool {
    EXEMPT_ACTIVE.get(0).is_some_and(|&active| active != 0)
        // SAFETY: only the presence of the key is used.
        && unsafe { EXEMPT_SOCKETS.get(socket_cookie(ctx)) }.is_some()
}

/// A rewrite sends the connect to a loopback endpoint of the caller's own network namespace:
/// if the daemon has no listener there yet, it hears of it (the connect itself is refused).
/// In the daemon's own namespace, the connecting process is recorded.
#[inline(always)]
fn check_served(ctx: &SockAddrContext) {
    if !netns_active() {
        return;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    match unsafe { SERVED_NETNS.get(cookie) }.copied() {
        Some(SERVED_RECORD_PIDS) => record_pid(ctx),
        Some(_) => {}
        None => {
            count(Counter::NetnsUnserved);
            report(cookie);
        }
    }
}

/// Stores the connecting process under the socket's cookie, for the daemon to name the caller
/// when it accepts the connection. Written like `remember`'s seqlock: cookie 0, then the pid,
/// then the cookie (see `CallerPid`).
#[inline(always)]
fn record_pid(ctx: &SockAddrContext) {
    let cookie = socket_cookie(ctx);
    let slot_index = (cookie & u64::from(CALLER_SLOTS - 1)) as u32;
    let Some(slot) = CALLER_PIDS.get_ptr_mut(slot_index) else {
        count(Counter::StorageFailed);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `slot` points into the array's preallocated memory for this program's run.
    unsafe {
        core::ptr::write_volatile(&raw mut (*slot).cookie, 0);
        core::ptr::write_volatile(&raw mut (*slot).pid_tgid, pid_tgid);
        core::ptr::write_volatile(&raw mut (*slot).cookie, cookie);
    }
}

#[inline(always)]
fn netns_active() -> bool {
    NETNS_ACTIVE.get(0).is_some_and(|&active| active != 0)
}

/// Tells the daemon which task connected from the namespace `netns_cookie`.
#[inline(always)]
fn report(netns_cookie: u64) {
    let event = NetnsEvent {
        pid_tgid: bpf_get_current_pid_tgid(),
        netns_cookie,
    };
    if NETNS_EVENTS.output::<NetnsEvent>(&event, 0).is_err() {
        count(Counter::NetnsEventsDropped);
    }
}

/// `port` in network byte order.
#[inline(always)]
fn is_target_port(port: u16) -> bool {
    TARGET_PORTS
        .get(u32::from(u16::from_be(port)))
        .is_some_and(|&used| used != 0)
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot: no other writer runs on this CPU during this program.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn widen(sa: SockAddr4) -> SockAddr6 {
    SockAddr6 {
        addr: [sa.addr, 0, 0, 0],
        port: sa.port,
        _pad: 0,
    }
}

// Context accesses go through volatile 4-byte loads and stores: the verifier only accepts
// context accesses of the field's own width at constant offsets, and volatile stops LLVM from
// merging neighbouring fields into one wider load.

#[inline(always)]
fn read(sa: *mut bpf_sock_addr, field: impl FnOnce(&bpf_sock_addr) -> *const u32) -> u32 {
    // SAFETY: `sa` is the context pointer the kernel passed in; `field` selects one of its u32s.
    unsafe { core::ptr::read_volatile(field(&*sa)) }
}

#[inline(always)]
fn write(sa: *mut bpf_sock_addr, field: impl FnOnce(&mut bpf_sock_addr) -> *mut u32, value: u32) {
    // SAFETY: as in `read`; these fields are writable in connect and getpeername programs.
    unsafe { core::ptr::write_volatile(field(&mut *sa), value) }
}

/// The port in network byte order. `user_port` is a u32 whose low 16 bits (in memory order:
/// its first two bytes on this little-endian target) hold the port in network byte order.
#[inline(always)]
fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    read(sa, |s| &raw const s.user_port) as u16
}

#[inline(always)]
fn user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    [
        read(sa, |s| &raw const s.user_ip6[0]),
        read(sa, |s| &raw const s.user_ip6[1]),
        read(sa, |s| &raw const s.user_ip6[2]),
        read(sa, |s| &raw const s.user_ip6[3]),
    ]
}

#[inline(always)]
fn set_user_ip6(sa: *mut bpf_sock_addr, addr: [u32; 4]) {
    write(sa, |s| &raw mut s.user_ip6[0], addr[0]);
    write(sa, |s| &raw mut s.user_ip6[1], addr[1]);
    write(sa, |s| &raw mut s.user_ip6[2], addr[2]);
    write(sa, |s| &raw mut s.user_ip6[3], addr[3]);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // eBPF programs cannot unwind or abort; the verifier rejects any path that reaches here.
    loop {}
}

// "Dual MIT/GPL" is GPL-compatible for the kernel, which unlocks the GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
