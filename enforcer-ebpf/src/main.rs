//! Kernel programs of the enforcer. Each entry point is thin: it reads the
//! destination from the context and hands it to `net::judge`; the decision
//! itself is `enforcer_common::decide`, shared with user space.
// Built for the BPF target by aya-build; on the host (clippy, `cargo check
// --workspace`) it builds as an ordinary binary so the code is still linted.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's entry-point macros hand each program its context by value"
)]
#![expect(
    clippy::inline_always,
    reason = "small helpers on the hook path are inlined on purpose: fewer BPF-to-BPF calls, simpler verification"
)]

mod file;
mod guard;
mod maps;
mod net;
mod session;

use aya_ebpf::{
    macros::{cgroup_sock_addr, lsm},
    programs::{LsmContext, SockAddrContext},
};
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

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    net::restore_dns_source_v4(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    net::restore_dns_source_v6(&ctx)
}

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    file::judge_open(&ctx)
}

#[lsm(hook = "inode_link")]
pub fn inode_link(ctx: LsmContext) -> i32 {
    file::judge_link(&ctx)
}

#[lsm(hook = "inode_rename")]
pub fn inode_rename(ctx: LsmContext) -> i32 {
    file::judge_rename(&ctx)
}

#[lsm(hook = "bpf")]
pub fn guard_bpf(ctx: LsmContext) -> i32 {
    guard::bpf(&ctx)
}

#[lsm(hook = "ptrace_access_check")]
pub fn guard_ptrace(ctx: LsmContext) -> i32 {
    guard::ptrace(&ctx)
}

#[lsm(hook = "task_kill")]
pub fn guard_signal(ctx: LsmContext) -> i32 {
    guard::signal(&ctx)
}

#[lsm(hook = "task_alloc")]
pub fn guard_clone(ctx: LsmContext) -> i32 {
    guard::clone(&ctx)
}

#[lsm(hook = "socket_create")]
pub fn guard_socket_create(ctx: LsmContext) -> i32 {
    guard::socket_create(&ctx)
}

#[lsm(hook = "unix_stream_connect")]
pub fn guard_unix_connect(ctx: LsmContext) -> i32 {
    guard::unix_stream_connect(&ctx)
}

#[lsm(hook = "unix_may_send")]
pub fn guard_unix_send(ctx: LsmContext) -> i32 {
    guard::unix_may_send(&ctx)
}

#[lsm(hook = "inode_unlink")]
pub fn guard_unlink(ctx: LsmContext) -> i32 {
    guard::change_in_dir(&ctx)
}

#[lsm(hook = "inode_rmdir")]
pub fn guard_rmdir(ctx: LsmContext) -> i32 {
    guard::change_in_dir(&ctx)
}

#[lsm(hook = "inode_create")]
pub fn guard_create(ctx: LsmContext) -> i32 {
    guard::change_in_dir(&ctx)
}

#[lsm(hook = "inode_mkdir")]
pub fn guard_mkdir(ctx: LsmContext) -> i32 {
    guard::change_in_dir(&ctx)
}

#[lsm(hook = "inode_mknod")]
pub fn guard_mknod(ctx: LsmContext) -> i32 {
    guard::change_in_dir(&ctx)
}

#[lsm(hook = "inode_symlink")]
pub fn guard_symlink(ctx: LsmContext) -> i32 {
    guard::change_in_dir(&ctx)
}

#[lsm(hook = "sb_umount")]
pub fn guard_umount(ctx: LsmContext) -> i32 {
    guard::umount(&ctx)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
