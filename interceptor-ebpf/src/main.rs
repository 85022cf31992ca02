//! The interceptor BPF program family, one attach point per module, loaded as one object so the
//! programs share their maps (sockops and sk_msg the sockhash, connect and getsockopt the
//! original destinations).
#![no_std]
#![no_main]
// Raw context access, helper calls and map value pointers live behind the accessors of `ctx`
// and `maps`; the programs themselves are safe code.
#![deny(unsafe_code)]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed to BPF helpers as pointers to the stack; `&key` says so"
)]

mod connect;
mod connect4;
mod connect6;
#[allow(unsafe_code, reason = "the raw context accessors and helper calls")]
mod ctx;
mod dns;
mod getsockopt;
#[allow(unsafe_code, reason = "map definitions and typed map reads")]
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

#[allow(
    unsafe_code,
    reason = "the loader finds the license by section and symbol name"
)]
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
