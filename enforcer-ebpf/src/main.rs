//! Kernel programs of the enforcer. Each entry point is thin: it reads the
//! destination from the context and hands it to `net::judge`; the decision
//! itself is `enforcer_common::decide`, shared with user space.
#![no_std]
#![no_main]

mod maps;
mod net;
mod session;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use enforcer_common::{OP_CONNECT, OP_SENDMSG};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    net::judge_v4(&ctx, OP_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    net::judge_v4(&ctx, OP_SENDMSG)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    net::judge_v6(&ctx, OP_CONNECT)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    net::judge_v6(&ctx, OP_SENDMSG)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
