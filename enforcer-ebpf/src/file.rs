//! Judging a file open against the session's file policy (see
//! `enforcer_common::file` for the matching model).

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_kernel_str_bytes,
        generated::bpf_ktime_get_boot_ns,
    },
    maps::lpm_trie::Key,
    programs::LsmContext,
};
use enforcer_common::{
    ACCESS_LINK, ACCESS_RENAME, Counter, EVENT_FILE, EVENT_PART_BYTES, EVENT_PATH_PARTS, FileEvent,
    INODE_ALLOW, INODE_DENY, InodeKey, KernelOffsets, MAX_DEPTH, NAME_BYTES, NO_RULE, NameKey,
    SUBTREE_ALLOW, SUBTREE_DENY, Session, VERDICT_AUDIT, VERDICT_DENY, scope,
};

use crate::{
    guard,
    maps::{
        EVENTS, FILE_INODES, NAME_PREFIX, NAME_SCRATCH, NAME_SUFFIX, count, count_rule_hit,
        lsm_refusal,
    },
    session::{self, Lookup},
};

/// Set by the controller from the running kernel's BTF.
#[unsafe(no_mangle)]
pub(crate) static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    file_f_inode: 0,
    file_f_path_dentry: 0,
    file_f_mode: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    super_block_s_dev: 0,
    dentry_d_parent: 0,
    dentry_d_name_name: 0,
    dentry_d_name_len: 0,
    dentry_d_inode: 0,
    super_block_s_magic: 0,
    task_tgid: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    cgroup_level: 0,
    cgroup_self_parent: 0,
    css_cgroup: 0,
    kernfs_node_id: 0,
    unix_sock_path_dentry: 0,
    socket_sk: 0,
    vfsmount_mnt_sb: 0,
};

const ALLOW: i32 = 0;
const EPERM: i32 = -1;

/// Prefix-trie bits of a scope: the 32 scope bits.
const SCOPE_BITS: u32 = 32;

/// Read a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub(crate) fn read<T>(base: *const u8, offset: u32) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.map_err(|_| ())
}

/// `file_open(file)`: any open, read or write, however it was reached.
/// Writing a cgroup file is a guard's business (leaving the session).
pub fn judge_open(ctx: &LsmContext) -> i32 {
    let file: *const u8 = ctx.arg(0);
    let previous: i32 = ctx.arg(1);
    let Some(lookup) = in_session(previous) else {
        return previous;
    };
    let verdict = guard::open_for_write(lookup, file);
    if verdict != ALLOW {
        return verdict;
    }
    judge(lookup, |o| {
        Ok(Object {
            dentry: read(file, o.file_f_path_dentry)?,
            inode: read(file, o.file_f_inode)?,
            access: read::<u32>(file, o.file_f_mode)? & 3,
        })
    })
}

/// `inode_link(old_dentry, dir, new_dentry)`: a hard link to a protected
/// file would let it be opened outside a protected directory.
pub fn judge_link(ctx: &LsmContext) -> i32 {
    let old: *const u8 = ctx.arg(0);
    let previous: i32 = ctx.arg(3);
    let Some(lookup) = in_session(previous) else {
        return previous;
    };
    let verdict = guard::link(lookup, ctx.arg(1), ctx.arg(2));
    if verdict != ALLOW {
        return verdict;
    }
    judge(lookup, |o| dentry_object(old, ACCESS_LINK, o))
}

/// `inode_rename(old_dir, old_dentry, new_dir, new_dentry)`: moving a
/// protected file out of a protected directory, or replacing one (the target
/// of an overwrite or an exchange).
pub fn judge_rename(ctx: &LsmContext) -> i32 {
    let old: *const u8 = ctx.arg(1);
    let new: *const u8 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    let Some(lookup) = in_session(previous) else {
        return previous;
    };
    let verdict = guard::rename(lookup, ctx.arg(0), old, ctx.arg(2), new);
    if verdict != ALLOW {
        return verdict;
    }
    let verdict = judge(lookup, |o| dentry_object(old, ACCESS_RENAME, o));
    if verdict != ALLOW {
        return verdict;
    }
    judge(lookup, |o| {
        let inode: *const u8 = read(new, o.dentry_d_inode)?;
        // A new name (no inode yet) protects nothing.
        if inode.is_null() {
            return Err(Absent);
        }
        Ok(Object {
            dentry: new,
            inode,
            access: ACCESS_RENAME,
        })
    })
}

/// What a file program judges.
struct Object {
    dentry: *const u8,
    inode: *const u8,
    /// `FileEvent.mode`: open mode bits, or `ACCESS_RENAME` / `ACCESS_LINK`.
    access: u32,
}

/// Why an object could not be read: a kernel read failed (deny, fail
/// closed), or there is nothing to judge (allow).
#[derive(PartialEq, Eq)]
enum Unread {
    Failed,
    Absent,
}
use Unread::Absent;

impl From<()> for Unread {
    fn from((): ()) -> Unread {
        Unread::Failed
    }
}

fn dentry_object(dentry: *const u8, access: u32, o: &KernelOffsets) -> Result<Object, Unread> {
    Ok(Object {
        dentry,
        inode: read(dentry, o.dentry_d_inode)?,
        access,
    })
}

/// The current task's session, unless an earlier LSM program already
/// refused (`previous`) or the task is in none: then the hook returns
/// `previous` at once, for one helper call.
#[inline(always)]
fn in_session(previous: i32) -> Option<Lookup> {
    if previous != 0 {
        return None;
    }
    match session::current() {
        Lookup::Outside => None,
        lookup => Some(lookup),
    }
}

/// The part every file hook shares: does the session have file rules,
/// what do they say about the object, report and count.
#[inline(always)]
fn judge(lookup: Lookup, object: impl FnOnce(&KernelOffsets) -> Result<Object, Unread>) -> i32 {
    let (session_cgroup, session) = match lookup {
        Lookup::Outside => return ALLOW,
        Lookup::Inside(cgroup, session) => (cgroup, session),
        Lookup::Unknown(_) => {
            count(Counter::Denied);
            return EPERM;
        }
    };
    if session.file_policy == 0 {
        return ALLOW;
    }
    // SAFETY: globals are plain integers written before load.
    let offsets = unsafe { core::ptr::read_volatile(&raw const KERNEL_OFFSETS) };
    let object = match object(&offsets) {
        Ok(object) => Ok(object),
        Err(Absent) => return ALLOW,
        Err(Unread::Failed) => Err(()),
    };
    // One place reports, so the verifier walks `report` once.
    let (rule_id, audit, object) = match object
        .and_then(|obj| decide(&obj, session.file_policy, &offsets).map(|d| (d, obj)))
    {
        Ok((None, _)) => return ALLOW,
        Ok((Some(rule_id), obj)) => (rule_id, session.audit(), Some(obj)),
        // A kernel read failed: deny, fail closed.
        Err(()) => {
            count(Counter::FileReadFailed);
            (NO_RULE, false, None)
        }
    };
    if rule_id != NO_RULE {
        count_rule_hit(rule_id);
    }
    report(
        object.as_ref(),
        &offsets,
        &session,
        session_cgroup,
        rule_id,
        audit,
    );
    lsm_refusal(audit)
}

/// The deny rule that applies, or `None` to allow. The most specific tier
/// with any match decides: the file itself, then its parent directories
/// nearest first, then patterns that apply anywhere; within a tier an allow
/// carves an exception out of a deny. So renaming a protected file to a name
/// that is allowed somewhere else does not unprotect it. A path too deep to
/// walk to its root is denied with `NO_RULE` (fail closed).
///
/// Shaped for the verifier: the parents are first collected into per-CPU
/// scratch (their count kept in map memory, so the verifier does not explore
/// the rest once per possible depth), then judged in a second loop.
fn decide(object: &Object, policy: u32, o: &KernelOffsets) -> Result<Option<u32>, ()> {
    let (inode, dentry) = (object.inode, object.dentry);
    let sb: *const u8 = read(inode, o.inode_i_sb)?;
    let dev: u32 = read(sb, o.super_block_s_dev)?;

    let mut key = InodeKey {
        policy,
        dev,
        ino: read(inode, o.inode_i_ino)?,
    };
    // SAFETY: the value is copied before the map can change under it.
    if let Some(rule) = unsafe { FILE_INODES.get(key) } {
        let mut tier = Verdict::default();
        tier.note(
            rule.flags & INODE_ALLOW != 0,
            rule.flags & INODE_DENY != 0,
            rule.rule_id,
        );
        if tier.matched() {
            return Ok(tier.result());
        }
    }

    let names = Names::read(dentry, o)?;
    // SAFETY: `names.0` is this CPU's scratch value (see `Names::read`).
    let scratch = unsafe { &mut *names.0 };
    scratch.parents = 0;
    scratch.reached_root = 0;
    let mut current = dentry;
    let mut i = 0;
    while i < MAX_DEPTH {
        let parent: *const u8 = read(current, o.dentry_d_parent)?;
        if parent == current {
            scratch.reached_root = 1;
            break;
        }
        let parent_inode: *const u8 = read(parent, o.dentry_d_inode)?;
        scratch.ancestors[i] = read(parent_inode, o.inode_i_ino)?;
        #[expect(clippy::cast_possible_truncation, reason = "i < MAX_DEPTH")]
        let parents = i as u32 + 1;
        scratch.parents = parents;
        current = parent;
        i += 1;
    }

    let parents = scratch.parents as usize;
    let mut depth = 0;
    while depth < MAX_DEPTH {
        if depth >= parents {
            break;
        }
        key.ino = scratch.ancestors[depth];
        // SAFETY: as above.
        if let Some(rule) = unsafe { FILE_INODES.get(key) } {
            let rule = *rule;
            let mut tier = Verdict::default();
            tier.note(
                rule.flags & SUBTREE_ALLOW != 0,
                rule.flags & SUBTREE_DENY != 0,
                rule.subtree_rule_id,
            );
            if depth == 0 && rule.child_scope != 0 {
                names.check(&mut tier, policy, rule.child_scope);
            }
            if rule.subtree_scope != 0 {
                names.check(&mut tier, policy, rule.subtree_scope);
            }
            if tier.matched() {
                return Ok(tier.result());
            }
        }
        depth += 1;
    }
    if scratch.reached_root == 0 {
        return Ok(Some(NO_RULE));
    }
    let mut anywhere = Verdict::default();
    names.check(&mut anywhere, policy, 0);
    Ok(anywhere.result())
}

#[derive(Default)]
struct Verdict {
    allow: bool,
    deny: Option<u32>,
}

impl Verdict {
    #[inline(always)]
    fn note(&mut self, allow: bool, deny: bool, rule_id: u32) {
        if allow {
            self.allow = true;
        }
        if deny && self.deny.is_none() {
            self.deny = Some(rule_id);
        }
    }

    #[inline(always)]
    fn matched(&self) -> bool {
        self.allow || self.deny.is_some()
    }

    #[inline(always)]
    fn result(&self) -> Option<u32> {
        if self.allow { None } else { self.deny }
    }
}

/// The opened file's name as the two tries want it: forwards, NUL-terminated
/// (exact names and prefixes), and reversed from its last byte (suffixes).
/// Lives in a per-CPU map: the keys are too big for the BPF stack.
pub struct NameScratch {
    forward: Key<NameKey>,
    reversed: Key<NameKey>,
    tail: [u8; NAME_BYTES],
    /// Inode numbers of the opened file's parents, nearest first.
    ancestors: [u64; MAX_DEPTH],
    parents: u32,
    reached_root: u32,
}

/// Trie lookups compare the scope and every name byte.
#[expect(clippy::cast_possible_truncation, reason = "64 bytes")]
const FULL_KEY_BITS: u32 = SCOPE_BITS + (NAME_BYTES as u32) * 8;

struct Names(*mut NameScratch);

impl Names {
    fn read(dentry: *const u8, o: &KernelOffsets) -> Result<Names, ()> {
        let scratch = NAME_SCRATCH.get_ptr_mut(0).ok_or(())?;
        let name: *const u8 = read(dentry, o.dentry_d_name_name)?;
        let len: u32 = read(dentry, o.dentry_d_name_len)?;
        // SAFETY: `scratch` is this CPU's map value; no other program runs
        // on this CPU until we return.
        let s = unsafe { &mut *scratch };
        s.forward.prefix_len = FULL_KEY_BITS;
        s.reversed.prefix_len = FULL_KEY_BITS;
        s.forward.data.name = [0; NAME_BYTES];
        s.reversed.data.name = [0; NAME_BYTES];
        // SAFETY: reads at most NAME_BYTES - 1 bytes and a NUL.
        unsafe { bpf_probe_read_kernel_str_bytes(name, &mut s.forward.data.name) }
            .map_err(|_| ())?;
        let n = if len as usize >= NAME_BYTES {
            // SAFETY: the last NAME_BYTES bytes of a name of `len` bytes.
            unsafe {
                bpf_probe_read_kernel_buf(name.wrapping_add(len as usize - NAME_BYTES), &mut s.tail)
            }
            .map_err(|_| ())?;
            NAME_BYTES
        } else {
            s.tail = s.forward.data.name;
            len as usize
        };
        // No branch on `n` (each would split the verifier's state for the
        // rest of the program): past the name, the index wraps onto the
        // zeros that follow a name shorter than NAME_BYTES in `tail`.
        let mut i = 0;
        while i < NAME_BYTES {
            s.reversed.data.name[i] = s.tail[n.wrapping_sub(1).wrapping_sub(i) & (NAME_BYTES - 1)];
            i += 1;
        }
        Ok(Names(scratch))
    }

    /// Look the name up in both tries, in the deny and the allow scope.
    #[inline(always)]
    fn check(&self, verdict: &mut Verdict, policy: u32, index: u32) {
        // SAFETY: as in `read`.
        let s = unsafe { &mut *self.0 };
        for allow in [false, true] {
            let id = scope(policy, index, allow);
            s.forward.data.scope = id;
            s.reversed.data.scope = id;
            let hit = NAME_PREFIX
                .get(&s.forward)
                .or_else(|| NAME_SUFFIX.get(&s.reversed));
            if let Some(rule) = hit {
                verdict.note(allow, !allow, rule.rule_id);
            }
        }
    }
}

#[inline(always)]
fn report(
    object: Option<&Object>,
    o: &KernelOffsets,
    session: &Session,
    session_cgroup: u64,
    rule_id: u32,
    audit: bool,
) {
    let Some(mut entry) = EVENTS.reserve::<FileEvent>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring buffer memory of the right
    // size; every field is written before submit.
    unsafe {
        (*event).kind = EVENT_FILE;
        (*event).mode = object.map_or(0, |obj| obj.access);
        (*event).boot_ns = bpf_ktime_get_boot_ns();
        (*event).session_cgroup = session_cgroup;
        let inode = object.map_or(core::ptr::null(), |obj| obj.inode);
        (*event).ino = read(inode, o.inode_i_ino).unwrap_or(0);
        let sb: *const u8 = read(inode, o.inode_i_sb).unwrap_or(core::ptr::null());
        (*event).dev = read(sb, o.super_block_s_dev).unwrap_or(0);
        (*event).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        #[expect(clippy::cast_possible_truncation, reason = "the uid is the low half")]
        let uid = bpf_get_current_uid_gid() as u32;
        (*event).uid = uid;
        (*event).profile_id = session.profile_id;
        (*event).rule_id = rule_id;
        (*event).verdict = if audit { VERDICT_AUDIT } else { VERDICT_DENY };
        (*event)._pad = 0;
        (*event).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        let mut dentry = object.map_or(core::ptr::null(), |obj| obj.dentry);
        // `parts` and `complete` live in the event, not in registers: the
        // verifier does not track ring buffer contents, so the paths through
        // this loop merge instead of multiplying.
        (*event).parts = 0;
        (*event).complete = 0;
        let mut i = 0;
        while i < EVENT_PATH_PARTS {
            let part = &mut (*event).path[i];
            *part = [0; EVENT_PART_BYTES];
            if core::ptr::read_volatile(&raw const (*event).complete) == 0 {
                let name: *const u8 =
                    read(dentry, o.dentry_d_name_name).unwrap_or(core::ptr::null());
                if bpf_probe_read_kernel_str_bytes(name, part).is_ok() {
                    (*event).parts = core::ptr::read_volatile(&raw const (*event).parts) + 1;
                }
                let parent: *const u8 =
                    read(dentry, o.dentry_d_parent).unwrap_or(core::ptr::null());
                if parent == dentry {
                    (*event).complete = 1;
                }
                dentry = parent;
            }
            i += 1;
        }
    }
    entry.submit(0);
}
