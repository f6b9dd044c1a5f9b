//! Guards: BPF-LSM programs that keep a session from switching the enforcer
//! off or acting through something outside its cgroup (see
//! `enforcer_common::guard`). Each hook asks one question about the
//! current task and the object, then `refuse` decides by the session's
//! flags, reports and counts.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str},
    },
    programs::LsmContext,
};
use enforcer_common::{
    Counter, DETAIL_CLONE_INTO_CGROUP, EVENT_GUARD, GUARD_BPF, GUARD_CGROUP, GUARD_ENFORCER_FILES,
    GUARD_LOCAL_SOCKET, GUARD_PINS, GUARD_PTRACE, GUARD_RAW_SOCKET, GUARD_SIGNAL, GUARDS_ALWAYS,
    GuardEvent, InodeKey, KernelOffsets, VERDICT_AUDIT, VERDICT_DENY,
};

use crate::{
    file::{KERNEL_OFFSETS, read},
    maps::{ENFORCER_FILES, EVENTS, PROTECTED_SOCKETS, count, lsm_refusal},
    session::{self, INSTANCE_CGROUP_LEVEL, Lookup},
};

const ALLOW: i32 = 0;

// Filesystem magic numbers (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;

const FMODE_WRITE: u32 = 2;
const PTRACE_MODE_ATTACH: u32 = 2;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_PACKET: u32 = 17;
const SOCK_RAW: u32 = 3;
const SOCK_PACKET: u32 = 10;
const SOCK_TYPE_MASK: u32 = 0xf;

/// Most cgroup levels walked from a task's cgroup up to its session's.
const MAX_CGROUP_WALK: u32 = 32;

/// What a refused attempt concerned, for its event.
#[derive(Default)]
struct Detail {
    target_pid: u32,
    /// `GuardEvent.detail`.
    code: u32,
    dev: u32,
    ino: u64,
    /// A dentry whose name the event carries.
    dentry: *const u8,
}

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: globals are plain integers written before load.
    unsafe { core::ptr::read_volatile(&raw const KERNEL_OFFSETS) }
}

/// `bpf(cmd, attr, size)`: any use of the syscall from a session.
pub fn bpf(ctx: &LsmContext) -> i32 {
    let cmd: u32 = ctx.arg(0);
    refuse(
        GUARD_BPF,
        &Detail {
            code: cmd,
            ..Detail::default()
        },
    )
}

/// `ptrace_access_check(child, mode)`: attaching to (or reading the memory
/// of) a task outside the session. Read-mode checks (`ps`, `/proc/<pid>/
/// stat`) are left alone.
pub fn ptrace(ctx: &LsmContext) -> i32 {
    let child: *const u8 = ctx.arg(0);
    let mode: u32 = ctx.arg(1);
    if mode & PTRACE_MODE_ATTACH == 0 {
        return ALLOW;
    }
    judge_task(GUARD_PTRACE, child, mode)
}

/// `task_kill(target, info, sig, cred)`: a signal to a task outside the
/// session. Signal 0 only probes whether the task exists.
pub fn signal(ctx: &LsmContext) -> i32 {
    let target: *const u8 = ctx.arg(0);
    let sig: u32 = ctx.arg(2);
    if sig == 0 {
        return ALLOW;
    }
    judge_task(GUARD_SIGNAL, target, sig)
}

/// `task_alloc(task, clone_flags)`: `clone3(CLONE_INTO_CGROUP)` would start
/// the child in a cgroup of the caller's choosing.
pub fn clone(ctx: &LsmContext) -> i32 {
    let flags: u64 = ctx.arg(1);
    if flags & CLONE_INTO_CGROUP == 0 {
        return ALLOW;
    }
    refuse(
        GUARD_CGROUP,
        &Detail {
            code: DETAIL_CLONE_INTO_CGROUP,
            ..Detail::default()
        },
    )
}

/// From `file_open`: opening a cgroup file for writing is how a task moves
/// (`cgroup.procs`, `cgroup.threads`) or changes its limits; writing one of
/// the enforcer's files, or a file in its rules directory, changes the
/// enforcer.
#[inline(always)]
pub fn open_for_write(lookup: Lookup, file: *const u8) -> i32 {
    let o = offsets();
    let Ok(mode) = read::<u32>(file, o.file_f_mode) else {
        return ALLOW;
    };
    if mode & FMODE_WRITE == 0 {
        return ALLOW;
    }
    let inode: *const u8 = read(file, o.file_f_inode).unwrap_or(core::ptr::null());
    let dentry: *const u8 = read(file, o.file_f_path_dentry).unwrap_or(core::ptr::null());
    let magic = magic_of_inode(inode, &o);
    let guard = if magic == CGROUP2_SUPER_MAGIC || magic == CGROUP_SUPER_MAGIC {
        GUARD_CGROUP
    } else {
        let parent: *const u8 = read(dentry, o.dentry_d_parent).unwrap_or(core::ptr::null());
        let parent_inode: *const u8 = read(parent, o.dentry_d_inode).unwrap_or(core::ptr::null());
        if !is_enforcer_file(inode, &o) && !is_enforcer_file(parent_inode, &o) {
            return ALLOW;
        }
        GUARD_ENFORCER_FILES
    };
    refuse_for(
        lookup,
        guard,
        &Detail {
            code: mode & 3,
            dentry,
            ..Detail::default()
        },
    )
}

/// `socket_create(family, type, protocol, kern)`: raw IP and packet
/// sockets send without passing the connect hooks. Netlink's `SOCK_RAW`
/// (used by `ip` and `getaddrinfo`) is not one of them.
pub fn socket_create(ctx: &LsmContext) -> i32 {
    let family: u32 = ctx.arg(0);
    let kind: u32 = ctx.arg::<u32>(1) & SOCK_TYPE_MASK;
    let kern: u32 = ctx.arg(3);
    let raw_ip = (family == AF_INET || family == AF_INET6) && kind == SOCK_RAW;
    if kern != 0 || !(raw_ip || family == AF_PACKET || kind == SOCK_PACKET) {
        return ALLOW;
    }
    refuse(
        GUARD_RAW_SOCKET,
        &Detail {
            code: (family << 16) | kind,
            ..Detail::default()
        },
    )
}

/// `unix_stream_connect(sock, other, newsk)`: `other` is the listening
/// socket (a `struct unix_sock` starts with its `struct sock`).
pub fn unix_stream_connect(ctx: &LsmContext) -> i32 {
    let other: *const u8 = ctx.arg(1);
    judge_unix_peer(other)
}

/// `unix_may_send(sock, other)`: a datagram to a bound socket.
pub fn unix_may_send(ctx: &LsmContext) -> i32 {
    let other: *const u8 = ctx.arg(1);
    let sk: *const u8 = read(other, offsets().socket_sk).unwrap_or(core::ptr::null());
    judge_unix_peer(sk)
}

/// `inode_unlink`, `inode_rmdir`, `inode_create`, `inode_mkdir`,
/// `inode_mknod`, `inode_symlink` (`dir, dentry, ...`): a change to the
/// entry `dentry` in the directory `dir`.
pub fn change_in_dir(ctx: &LsmContext) -> i32 {
    match session::current() {
        Lookup::Outside => ALLOW,
        lookup => refuse_change(
            lookup,
            ctx.arg(0),
            ctx.arg(1),
            core::ptr::null(),
            core::ptr::null(),
        ),
    }
}

/// From `inode_rename`: moving an entry out of one directory and into
/// another (over what was there).
#[inline(always)]
pub fn rename(
    lookup: Lookup,
    old_dir: *const u8,
    old_dentry: *const u8,
    new_dir: *const u8,
    new_dentry: *const u8,
) -> i32 {
    refuse_change(lookup, old_dir, old_dentry, new_dir, new_dentry)
}

/// From `inode_link(old_dentry, dir, new_dentry)`: a new name in `dir`.
#[inline(always)]
pub fn link(lookup: Lookup, dir: *const u8, new_dentry: *const u8) -> i32 {
    refuse_change(
        lookup,
        dir,
        new_dentry,
        core::ptr::null(),
        core::ptr::null(),
    )
}

/// Refuses changing the entry `dentry` of `dir`, or `other_dentry` of
/// `other_dir` (null for none), where `entry_guard` says so. One report
/// site, so the verifier walks it once.
#[inline(always)]
fn refuse_change(
    lookup: Lookup,
    dir: *const u8,
    dentry: *const u8,
    other_dir: *const u8,
    other_dentry: *const u8,
) -> i32 {
    let o = offsets();
    let (guard, dentry) = match entry_guard(dir, dentry, &o) {
        Some(guard) => (guard, dentry),
        None => match entry_guard(other_dir, other_dentry, &o) {
            Some(guard) => (guard, other_dentry),
            None => return ALLOW,
        },
    };
    refuse_for(
        lookup,
        guard,
        &Detail {
            dentry,
            ..Detail::default()
        },
    )
}

/// The guard that refuses changing the entry `dentry` of the directory
/// `dir`, if any: anything in the BPF filesystem (removing a pin drops the
/// link or map it holds when no process holds it), or the enforcer's files
/// and the entries of its directories.
#[inline(always)]
fn entry_guard(dir: *const u8, dentry: *const u8, o: &KernelOffsets) -> Option<u32> {
    if dir.is_null() {
        return None;
    }
    if magic_of_inode(dir, o) == BPF_FS_MAGIC {
        return Some(GUARD_PINS);
    }
    // A new entry has no inode yet.
    let inode: *const u8 = read(dentry, o.dentry_d_inode).unwrap_or(core::ptr::null());
    (is_enforcer_file(dir, o) || is_enforcer_file(inode, o)).then_some(GUARD_ENFORCER_FILES)
}

/// Whether `inode` (possibly null) is one of the enforcer's files.
#[inline(always)]
fn is_enforcer_file(inode: *const u8, o: &KernelOffsets) -> bool {
    if inode.is_null() {
        return false;
    }
    let sb: *const u8 = read(inode, o.inode_i_sb).unwrap_or(core::ptr::null());
    let key = InodeKey {
        policy: 0,
        dev: read(sb, o.super_block_s_dev).unwrap_or(0),
        ino: read(inode, o.inode_i_ino).unwrap_or(0),
    };
    // SAFETY: only the presence of the key is used.
    unsafe { ENFORCER_FILES.get(key) }.is_some()
}

/// `sb_umount(mnt, flags)`: unmounting the BPF filesystem drops every pin
/// on it; unmounting a cgroup filesystem is never the agent's business.
pub fn umount(ctx: &LsmContext) -> i32 {
    let mnt: *const u8 = ctx.arg(0);
    let o = offsets();
    let sb: *const u8 = read(mnt, o.vfsmount_mnt_sb).unwrap_or(core::ptr::null());
    let magic: u64 = read(sb, o.super_block_s_magic).unwrap_or(0);
    if magic != BPF_FS_MAGIC && magic != CGROUP2_SUPER_MAGIC && magic != CGROUP_SUPER_MAGIC {
        return ALLOW;
    }
    refuse(GUARD_PINS, &Detail::default())
}

#[inline(always)]
fn magic_of_inode(inode: *const u8, o: &KernelOffsets) -> u64 {
    let sb: *const u8 = read(inode, o.inode_i_sb).unwrap_or(core::ptr::null());
    read(sb, o.super_block_s_magic).unwrap_or(0)
}

/// A Unix socket peer is refused when its bound file is one the session's
/// profile protects (by device and inode, so any path to it is covered).
/// Unbound and abstract sockets have no file.
#[inline(always)]
fn judge_unix_peer(sk: *const u8) -> i32 {
    let lookup = session::current();
    let Lookup::Inside(_, session) = lookup else {
        // Outside any session, or in an unknown one, which every other
        // hook of the session already refuses.
        return ALLOW;
    };
    let o = offsets();
    let dentry: *const u8 = read(sk, o.unix_sock_path_dentry).unwrap_or(core::ptr::null());
    if dentry.is_null() {
        return ALLOW;
    }
    let inode: *const u8 = read(dentry, o.dentry_d_inode).unwrap_or(core::ptr::null());
    let sb: *const u8 = read(inode, o.inode_i_sb).unwrap_or(core::ptr::null());
    let key = InodeKey {
        policy: session.profile_id,
        dev: read(sb, o.super_block_s_dev).unwrap_or(0),
        ino: read(inode, o.inode_i_ino).unwrap_or(0),
    };
    // SAFETY: only the presence of the key is used.
    if unsafe { PROTECTED_SOCKETS.get(key) }.is_none() {
        return ALLOW;
    }
    refuse_for(
        lookup,
        GUARD_LOCAL_SOCKET,
        &Detail {
            dev: key.dev,
            ino: key.ino,
            dentry,
            ..Detail::default()
        },
    )
}

/// Refuses `guard` on `task` unless the task is in the caller's session.
#[inline(always)]
fn judge_task(guard: u32, task: *const u8, detail: u32) -> i32 {
    let lookup = session::current();
    let session_cgroup = match lookup {
        Lookup::Outside => return ALLOW,
        Lookup::Inside(cgroup, _) | Lookup::Unknown(cgroup) => cgroup,
    };
    let o = offsets();
    if session_of_task(task, &o) == Some(session_cgroup) {
        return ALLOW;
    }
    refuse_for(
        lookup,
        guard,
        &Detail {
            target_pid: read(task, o.task_tgid).unwrap_or(0),
            code: detail,
            ..Detail::default()
        },
    )
}

/// The id of `task`'s cgroup2 ancestor at the session level, `None` if it
/// is above that level or cannot be read.
#[inline(always)]
fn session_of_task(task: *const u8, o: &KernelOffsets) -> Option<u64> {
    // SAFETY: globals are plain integers written before load.
    let instance_level = unsafe { core::ptr::read_volatile(&raw const INSTANCE_CGROUP_LEVEL) };
    let session_level = u32::try_from(instance_level + 1).ok()?;
    let css_set: *const u8 = read(task, o.task_cgroups).ok()?;
    let mut cgroup: *const u8 = read(css_set, o.css_set_dfl_cgrp).ok()?;
    let level: u32 = read(cgroup, o.cgroup_level).ok()?;
    if level < session_level {
        return None;
    }
    let mut steps = level - session_level;
    let mut i = 0;
    while i < MAX_CGROUP_WALK {
        if steps == 0 {
            break;
        }
        let parent_css: *const u8 = read(cgroup, o.cgroup_self_parent).ok()?;
        cgroup = read(parent_css, o.css_cgroup).ok()?;
        steps -= 1;
        i += 1;
    }
    if steps != 0 {
        return None;
    }
    let kn: *const u8 = read(cgroup, o.cgroup_kn).ok()?;
    read(kn, o.kernfs_node_id).ok()
}

/// The common end of every guard: tasks outside the enforcer's sessions are
/// not ours to judge; a session whose profile re-allowed `guard` goes on;
/// otherwise the attempt is refused (or, in audit mode, let through),
/// reported and counted. A task in an unregistered session cgroup is
/// refused (fail closed).
#[inline(always)]
fn refuse(guard: u32, detail: &Detail) -> i32 {
    refuse_for(session::current(), guard, detail)
}

/// `refuse` for a caller that already looked the session up.
#[inline(always)]
fn refuse_for(lookup: Lookup, guard: u32, detail: &Detail) -> i32 {
    let (session_cgroup, profile_id, audit) = match lookup {
        Lookup::Outside => return ALLOW,
        Lookup::Inside(cgroup, session) => {
            if guard & GUARDS_ALWAYS == 0 && session.guard_allowed(guard) {
                return ALLOW;
            }
            (cgroup, session.profile_id, session.audit())
        }
        Lookup::Unknown(cgroup) => (cgroup, 0, false),
    };
    report(guard, detail, session_cgroup, profile_id, audit);
    lsm_refusal(audit)
}

#[inline(always)]
fn report(guard: u32, detail: &Detail, session_cgroup: u64, profile_id: u32, audit: bool) {
    let Some(mut entry) = EVENTS.reserve::<GuardEvent>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let event = entry.as_mut_ptr();
    let o = offsets();
    // SAFETY: `event` points at reserved ring buffer memory of the right
    // size; every field is written before submit.
    unsafe {
        (*event).kind = EVENT_GUARD;
        (*event).guard = guard;
        (*event).boot_ns = bpf_ktime_get_boot_ns();
        (*event).session_cgroup = session_cgroup;
        (*event).ino = detail.ino;
        (*event).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        #[expect(clippy::cast_possible_truncation, reason = "the uid is the low half")]
        let uid = bpf_get_current_uid_gid() as u32;
        (*event).uid = uid;
        (*event).profile_id = profile_id;
        (*event).target_pid = detail.target_pid;
        (*event).detail = detail.code;
        (*event).dev = detail.dev;
        (*event).verdict = if audit { VERDICT_AUDIT } else { VERDICT_DENY };
        (*event)._pad = [0; 7];
        (*event).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*event).name = [0; 48];
        if !detail.dentry.is_null() {
            let name: *const u8 =
                read(detail.dentry, o.dentry_d_name_name).unwrap_or(core::ptr::null());
            // The raw helper: its `_bytes` wrapper loops over the result,
            // which multiplies the verifier's work at every report site.
            let _ = bpf_probe_read_kernel_str((&raw mut (*event).name).cast(), 48, name.cast());
        }
    }
    entry.submit(0);
}
