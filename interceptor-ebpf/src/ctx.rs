//! The only raw context access of the family: tiny accessors, one `unsafe` each, and the
//! helper calls that take the context or raw pointers.
//!
//! The sock_addr, sockopt, sk_msg and sk_lookup contexts are raw pointers in aya-ebpf. Fields
//! are copied one by one (the verifier checks every context access for offset and size), and
//! context writes are volatile: LLVM would otherwise merge two adjacent `u32` stores into one
//! 8-byte store, which the verifier rejects ("invalid bpf_context access off=32 size=8").

use aya_ebpf::{bindings::bpf_sock_ops, programs::SockOpsContext, EbpfContext as _};
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, bpf_sockopt, sk_msg_md},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockoptContext},
};
use interceptor_common::addr::{v4_mapped, Addr};

/// A volatile load of one context field at its constant offset. Plain loads let LLVM merge the
/// IPv4 and IPv6 branches into one load from a computed offset, which the verifier rejects
/// ("dereference of modified ctx ptr").
macro_rules! ld {
    ($ptr:expr, $($field:tt)+) => {
        core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+))
    };
}

/// Picks the 4-tuple's addresses by family from values already loaded. Both families' fields are
/// always loaded (they are readable whatever the family), so no load depends on a branch: a
/// branch-dependent load lets LLVM sink both into one load from a computed context offset.
#[inline(always)]
fn pick(v6: bool, ip4: (u32, u32), ip6: (Addr, Addr)) -> (Addr, Addr) {
    if v6 {
        ip6
    } else {
        (v4_mapped(ip4.0), v4_mapped(ip4.1))
    }
}

/// Four words of an IPv6 field, each its own 4-byte load (the only size the verifier allows).
macro_rules! ld6 {
    ($ptr:expr, $field:ident) => {
        [
            ld!($ptr, $field[0]),
            ld!($ptr, $field[1]),
            ld!($ptr, $field[2]),
            ld!($ptr, $field[3]),
        ]
    };
}

// === sock_addr (connect4 / connect6) ===

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// `SOCK_STREAM` / `SOCK_DGRAM` of the connecting socket.
#[inline(always)]
pub(crate) fn sa_type(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the kernel hands the program a valid context for its whole run.
    unsafe { ld!(sock_addr(ctx), type_) }
}

/// Destination port the program sees, host byte order (`user_port` is network order).
#[inline(always)]
pub(crate) fn sa_user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as above.
    u16::from_be(unsafe { ld!(sock_addr(ctx), user_port) } as u16)
}

/// IPv4 destination, network byte order.
#[inline(always)]
pub(crate) fn sa_user_ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as above.
    unsafe { ld!(sock_addr(ctx), user_ip4) }
}

/// IPv6 destination, network-order words. Read word by word: the verifier only allows 4-byte
/// loads of `user_ip6`.
#[inline(always)]
pub(crate) fn sa_user_ip6(ctx: &SockAddrContext) -> Addr {
    let sa = sock_addr(ctx);
    // SAFETY: as above.
    unsafe { ld6!(sa, user_ip6) }
}

#[inline(always)]
pub(crate) fn sa_set_user_ip4(ctx: &SockAddrContext, ip4_be: u32) {
    // SAFETY: user_ip4 is writable in connect4.
    unsafe { core::ptr::write_volatile(&mut (*sock_addr(ctx)).user_ip4, ip4_be) }
}

#[inline(always)]
pub(crate) fn sa_set_user_ip6(ctx: &SockAddrContext, ip6: &Addr) {
    let sa = sock_addr(ctx);
    // SAFETY: user_ip6 is writable in connect6, one 4-byte word at a time.
    unsafe {
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], ip6[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], ip6[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], ip6[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], ip6[3]);
    }
}

#[inline(always)]
pub(crate) fn sa_set_user_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: user_port is writable in connect4/6; it holds the port in network byte order.
    unsafe { core::ptr::write_volatile(&mut (*sock_addr(ctx)).user_port, port.to_be() as u32) }
}

/// The connecting socket's already-bound source address (unspecified when not bound), as a
/// 16-byte address. `family` is the socket's own family.
#[inline(always)]
pub(crate) fn sa_bound_src(ctx: &SockAddrContext, v6: bool) -> Addr {
    // SAFETY: `sk` is always set for sock_addr programs (PTR_TO_SOCKET, never NULL).
    let sk: *const bpf_sock = unsafe { ld!(sock_addr(ctx), __bindgen_anon_1.sk) }.cast_const();
    if v6 {
        // SAFETY: reading src_ip6 of a full socket, word by word.
        unsafe { ld6!(sk, src_ip6) }
    } else {
        // SAFETY: as above.
        v4_mapped(unsafe { ld!(sk, src_ip4) })
    }
}

// === sockopt (getsockopt) ===

#[inline(always)]
fn sockopt(ctx: &SockoptContext) -> *mut bpf_sockopt {
    ctx.sockopt
}

#[inline(always)]
pub(crate) fn so_level(ctx: &SockoptContext) -> i32 {
    // SAFETY: valid context for the program's run.
    unsafe { ld!(sockopt(ctx), level) }
}

#[inline(always)]
pub(crate) fn so_optname(ctx: &SockoptContext) -> i32 {
    // SAFETY: as above.
    unsafe { ld!(sockopt(ctx), optname) }
}

#[inline(always)]
pub(crate) fn so_optlen(ctx: &SockoptContext) -> i32 {
    // SAFETY: as above.
    unsafe { ld!(sockopt(ctx), optlen) }
}

#[inline(always)]
pub(crate) fn so_set_optlen(ctx: &SockoptContext, len: i32) {
    // SAFETY: optlen is writable in getsockopt.
    unsafe { core::ptr::write_volatile(&mut (*sockopt(ctx)).optlen, len) }
}

#[inline(always)]
pub(crate) fn so_set_retval(ctx: &SockoptContext, retval: i32) {
    // SAFETY: retval is writable in getsockopt (only 0 or the kernel's own value).
    unsafe { core::ptr::write_volatile(&mut (*sockopt(ctx)).retval, retval) }
}

/// The socket getsockopt was called on, or None.
#[inline(always)]
pub(crate) fn so_sk(ctx: &SockoptContext) -> Option<*const bpf_sock> {
    // SAFETY: as above; sk may be NULL in principle, checked here.
    let sk = unsafe { ld!(sockopt(ctx), __bindgen_anon_1.sk) };
    if sk.is_null() {
        None
    } else {
        Some(sk)
    }
}

/// `[optval, optval_end)`: the buffer the program may write the answer into.
#[inline(always)]
pub(crate) fn so_optval(ctx: &SockoptContext) -> (*mut u8, *mut u8) {
    let so = sockopt(ctx);
    // SAFETY: as above.
    unsafe {
        (
            ld!(so, __bindgen_anon_2.optval) as *mut u8,
            ld!(so, __bindgen_anon_3.optval_end) as *mut u8,
        )
    }
}

/// A full socket's 4-tuple from its own point of view (for getsockopt's `sk`).
#[inline(always)]
pub(crate) fn sock_tuple(sk: *const bpf_sock) -> (Addr, Addr, u32, u32) {
    // SAFETY: sk is a valid full socket pointer handed out by the kernel.
    unsafe {
        let ip4 = (ld!(sk, src_ip4), ld!(sk, dst_ip4));
        let ip6 = (ld6!(sk, src_ip6), ld6!(sk, dst_ip6));
        let (local, remote) = pick(ld!(sk, family) == crate::connect::AF_INET6, ip4, ip6);
        // src_port is host order; dst_port is a network-order 16-bit field.
        (
            local,
            remote,
            ld!(sk, src_port),
            u16::from_be(ld!(sk, dst_port)) as u32,
        )
    }
}

#[inline(always)]
pub(crate) fn sock_family(sk: *const bpf_sock) -> u32 {
    // SAFETY: as above.
    unsafe { ld!(sk, family) }
}

// === sk_msg ===

#[inline(always)]
fn msg(ctx: &SkMsgContext) -> *mut sk_msg_md {
    ctx.msg
}

/// The sending socket's 4-tuple from its own point of view.
#[inline(always)]
pub(crate) fn msg_tuple(ctx: &SkMsgContext) -> (Addr, Addr, u32, u32) {
    let md = msg(ctx);
    // SAFETY: valid context for the program's run.
    unsafe {
        let ip4 = (ld!(md, local_ip4), ld!(md, remote_ip4));
        let ip6 = (ld6!(md, local_ip6), ld6!(md, remote_ip6));
        let (local, remote) = pick(ld!(md, family) == crate::connect::AF_INET6, ip4, ip6);
        // local_port is host order; remote_port is network order in the upper half.
        (
            local,
            remote,
            ld!(md, local_port),
            u32::from_be(ld!(md, remote_port)),
        )
    }
}

// === sk_lookup ===

/// (family, protocol, local address, local port (host order), remote address) of the lookup.
#[inline(always)]
pub(crate) fn lookup_tuple(ctx: &SkLookupContext) -> (u32, u32, Addr, u32, Addr) {
    let l = ctx.lookup;
    // SAFETY: valid context for the program's run.
    unsafe {
        let family = ld!(l, family);
        let ip4 = (ld!(l, local_ip4), ld!(l, remote_ip4));
        let ip6 = (ld6!(l, local_ip6), ld6!(l, remote_ip6));
        let (local, remote) = pick(family == crate::connect::AF_INET6, ip4, ip6);
        (family, ld!(l, protocol), local, ld!(l, local_port), remote)
    }
}

// === sock_ops ===

#[inline(always)]
fn ops(ctx: &SockOpsContext) -> *mut bpf_sock_ops {
    ctx.ops
}

#[inline(always)]
pub(crate) fn ops_op(ctx: &SockOpsContext) -> u32 {
    // SAFETY: valid context for the program's run.
    unsafe { ld!(ops(ctx), op) }
}

#[inline(always)]
pub(crate) fn ops_local_port(ctx: &SockOpsContext) -> u32 {
    // SAFETY: as above.
    unsafe { ld!(ops(ctx), local_port) }
}

/// `args[n]` of the callback (STATE_CB: old and new state).
#[inline(always)]
pub(crate) fn ops_arg1(ctx: &SockOpsContext) -> u32 {
    // SAFETY: as above.
    unsafe { ld!(ops(ctx), __bindgen_anon_1.args[1]) }
}

/// `(snd_nxt, rcv_nxt)` of the socket.
#[inline(always)]
pub(crate) fn ops_seq(ctx: &SockOpsContext) -> (u32, u32) {
    // SAFETY: as above.
    unsafe { (ld!(ops(ctx), snd_nxt), ld!(ops(ctx), rcv_nxt)) }
}

/// Data segments the socket received and sent over TCP (`data_segs_in + data_segs_out`):
/// how much a connection left on TCP carried, read when it closes.
#[inline(always)]
pub(crate) fn ops_data_segs(ctx: &SockOpsContext) -> u32 {
    // SAFETY: as above.
    unsafe { ld!(ops(ctx), data_segs_in).wrapping_add(ld!(ops(ctx), data_segs_out)) }
}

#[inline(always)]
pub(crate) fn ops_cb_flags(ctx: &SockOpsContext) -> u32 {
    // SAFETY: as above.
    unsafe { ld!(ops(ctx), bpf_sock_ops_cb_flags) }
}

/// The socket's 4-tuple from its own point of view, or None for non-IP families.
#[inline(always)]
pub(crate) fn ops_tuple(ctx: &SockOpsContext) -> Option<(Addr, Addr, u32, u32)> {
    let o = ops(ctx);
    // SAFETY: as above.
    unsafe {
        let family = ld!(o, family);
        if family != crate::connect::AF_INET && family != crate::connect::AF_INET6 {
            return None;
        }
        let ip4 = (ld!(o, local_ip4), ld!(o, remote_ip4));
        let ip6 = (ld6!(o, local_ip6), ld6!(o, remote_ip6));
        let (local, remote) = pick(family == crate::connect::AF_INET6, ip4, ip6);
        // Network order in the upper 16 bits: from_be gives the host-order port.
        Some((
            local,
            remote,
            ld!(o, local_port),
            u32::from_be(ld!(o, remote_port)),
        ))
    }
}

// === helpers taking the program context ===

/// `SOL_TCP` and `TCP_NODELAY` from include/uapi/linux/tcp.h and in.h.
const SOL_TCP: i32 = 6;
const TCP_NODELAY: i32 = 1;

/// `bpf_setsockopt(SOL_TCP, TCP_NODELAY, 1)` on the sock_ops socket (a full socket at the
/// established callbacks). The kernel takes TCP_NODELAY here from Linux 6.1 (EINVAL before;
/// the agent leaves `CONFIG_APP_NODELAY` off there). 0 or a negative errno.
#[inline(always)]
pub(crate) fn ops_set_nodelay(ctx: &SockOpsContext) -> i64 {
    let mut one: i32 = 1;
    // SAFETY: the program's own sock_ops context; `one` lives on the stack for the call and
    // its exact size is passed.
    unsafe {
        aya_ebpf::helpers::bpf_setsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            TCP_NODELAY,
            (&mut one as *mut i32).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    }
}

/// The socket's cookie (`bpf_get_socket_cookie`; sock_addr, sock_ops and sk_msg contexts).
#[inline(always)]
pub(crate) fn socket_cookie<C: aya_ebpf::EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the program's own context, valid for its whole run.
    unsafe { aya_ebpf::helpers::bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Monotonic clock in nanoseconds (`bpf_ktime_get_ns`, every program type).
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: no arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// The socket's network-namespace cookie. Callers make sure the program type has the helper
/// (sock_addr >= 5.7; sock_ops, sk_msg, sockopt >= 5.15).
#[inline(always)]
pub(crate) fn netns_cookie<C: aya_ebpf::EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the program's own context, valid for its whole run.
    unsafe { aya_ebpf::helpers::bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// `bpf_bind` of the connecting socket to `sa` (a `sockaddr_in`/`sockaddr_in6` on the stack).
#[inline(always)]
pub(crate) fn bind<T>(ctx: &SockAddrContext, sa: &mut T) -> i64 {
    // SAFETY: a connect4/6 context and a sockaddr of exactly `size_of::<T>()` bytes.
    unsafe {
        aya_ebpf::helpers::bpf_bind(
            ctx.as_ptr().cast(),
            (sa as *mut T).cast(),
            core::mem::size_of::<T>() as i32,
        ) as i64
    }
}

/// Whether a TCP socket in the caller's namespace listens on `[::1]:port` (v6) or
/// `127.0.0.1:port`.
#[inline(always)]
pub(crate) fn tcp_listener_on_loopback(ctx: &SockAddrContext, v6: bool, port: u16) -> bool {
    use aya_ebpf::bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    };
    // SAFETY: a plain-data union, all zeroes is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v6 {
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: [0; 4],
            daddr: interceptor_common::addr::LOCALHOST_V6,
            sport: 0,
            dport: port.to_be(),
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } else {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: 0,
            daddr: interceptor_common::addr::LOCALHOST_V4,
            sport: 0,
            dport: port.to_be(),
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    };
    // SAFETY: sock_addr programs may look up sockets (>= 5.2); the tuple lives on the stack;
    // u64::MAX is BPF_F_CURRENT_NETNS (the socket's own namespace).
    let sk = unsafe {
        aya_ebpf::helpers::bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size as u32, u64::MAX, 0)
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, released once.
    unsafe { aya_ebpf::helpers::bpf_sk_release(sk.cast()) };
    true
}

/// Writes `value` at the start of getsockopt's option buffer if it fits there.
#[inline(always)]
pub(crate) fn so_write<T>(ctx: &SockoptContext, value: T) -> bool {
    let (start, end) = so_optval(ctx);
    let len = core::mem::size_of::<T>();
    // SAFETY: only compared, never dereferenced, before the bounds check below passes.
    if start.is_null() || unsafe { start.add(len) } > end {
        return false;
    }
    // SAFETY: `[start, start + len)` lies inside `[optval, optval_end)`, checked above; the
    // kernel's option buffer is allocated, so aligned for the sockaddr structs written here.
    unsafe { core::ptr::write(start.cast::<T>(), value) };
    true
}
