//! The interceptor BPF program family, one attach point per module, loaded as one object so the
//! programs share their maps (sockops and sk_msg the sockhash, connect and getsockopt the
//! original destinations).
#![no_std]
#![no_main]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed to BPF helpers as pointers to the stack; `&key` says so"
)]

mod connect;
mod connect4;
mod connect6;
mod ctx;
mod dns;
mod getsockopt;
mod maps;
mod policy;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod sk_lookup;
mod sk_msg;
mod sockaddr;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never entered.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
