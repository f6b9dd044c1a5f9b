//! File rules as the `file_open` program sees them.
//!
//! Files and directories are matched by identity (device and inode), so every
//! name for the same inode (hard links, symlinks, bind mounts, renames,
//! `/proc/<pid>/fd/N`) is covered. Directory rules hold for everything below
//! the directory: the program walks the opened file's dentry parents. Name
//! patterns (`.env`, `id_*`, `*.pem`) match the file's own name, anywhere or
//! inside a given directory, through two LPM tries: one over the name (exact
//! names and prefixes), one over the name reversed (suffixes).
//!
//! Precedence: any matching `allow` rule permits the open (allow carves
//! exceptions out of deny); otherwise any matching `deny` rule denies.

/// Bytes of a file name the tries compare. Longer names are compared by
/// their first (prefix trie) or last (suffix trie) bytes.
pub const NAME_BYTES: usize = 64;
/// Exact names must be shorter than this so their terminating NUL fits.
pub const MAX_EXACT_NAME: usize = NAME_BYTES - 2;
/// Directory levels walked above the opened file.
pub const MAX_DEPTH: usize = 32;
/// Names (from the file upwards) a file event carries for its path.
pub const EVENT_PATH_PARTS: usize = 8;
pub const EVENT_PART_BYTES: usize = 48;

/// `InodeRule.flags`
pub const INODE_DENY: u32 = 1;
pub const INODE_ALLOW: u32 = 2;
pub const SUBTREE_DENY: u32 = 4;
pub const SUBTREE_ALLOW: u32 = 8;

/// Key of the `FILE_INODES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeKey {
    /// The session's file policy.
    pub policy: u32,
    /// Kernel encoding: `major << 20 | minor`.
    pub dev: u32,
    pub ino: u64,
}

/// What applies to one inode: to itself, to everything below it (when it is
/// a directory), and which name-pattern scopes apply to its children.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InodeRule {
    pub flags: u32,
    /// Rule id for `INODE_*`.
    pub rule_id: u32,
    /// Rule id for `SUBTREE_*`.
    pub subtree_rule_id: u32,
    /// Scope index (see [`scope`]) of patterns for files directly inside
    /// this directory; 0 for none.
    pub child_scope: u32,
    /// Scope index of patterns for files anywhere below; 0 for none.
    pub subtree_scope: u32,
}

/// Name-trie scope id: `policy << 16 | index << 1 | allow`. Index 0 is the
/// policy's "anywhere" scope; directories with patterns get 1, 2, ...
#[expect(clippy::inline_always, reason = "called in the kernel's hot path")]
#[inline(always)]
pub const fn scope(policy: u32, index: u32, allow: bool) -> u32 {
    (policy << 16) | (index << 1) | (allow as u32)
}

/// LPM key data of the name tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameKey {
    pub scope: u32,
    pub name: [u8; NAME_BYTES],
}

/// Value of the name tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameRule {
    pub rule_id: u32,
}

/// Byte offsets of the kernel struct fields the program reads, from the
/// running kernel's BTF (set as a read-only global at load time).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    /// `struct file` -> `f_inode` (`struct inode *`).
    pub file_f_inode: u32,
    /// `struct file` -> `f_path` (embedded `struct path`) -> `dentry`.
    pub file_f_path_dentry: u32,
    /// `struct file` -> `f_mode` (`fmode_t`, 4 bytes).
    pub file_f_mode: u32,
    /// `struct inode` -> `i_ino` (`unsigned long`, 8 bytes).
    pub inode_i_ino: u32,
    /// `struct inode` -> `i_sb` (`struct super_block *`).
    pub inode_i_sb: u32,
    /// `struct super_block` -> `s_dev` (`dev_t`, 4 bytes).
    pub super_block_s_dev: u32,
    /// `struct dentry` -> `d_parent` (`struct dentry *`).
    pub dentry_d_parent: u32,
    /// `struct dentry` -> `d_name` (embedded `struct qstr`) -> `name`.
    pub dentry_d_name_name: u32,
    /// `struct dentry` -> `d_name` -> `len` (4 bytes).
    pub dentry_d_name_len: u32,
    /// `struct dentry` -> `d_inode` (`struct inode *`).
    pub dentry_d_inode: u32,
    // The guard programs (see `guard`):
    /// `struct super_block` -> `s_magic` (`unsigned long`).
    pub super_block_s_magic: u32,
    /// `struct task_struct` -> `tgid` (`pid_t`).
    pub task_tgid: u32,
    /// `struct task_struct` -> `cgroups` (`struct css_set *`).
    pub task_cgroups: u32,
    /// `struct css_set` -> `dfl_cgrp` (`struct cgroup *`, its cgroup2 cgroup).
    pub css_set_dfl_cgrp: u32,
    /// `struct cgroup` -> `kn` (`struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct cgroup` -> `level` (`int`; the root is 0).
    pub cgroup_level: u32,
    /// `struct cgroup` -> `self.parent` (the parent's `struct
    /// cgroup_subsys_state *`).
    pub cgroup_self_parent: u32,
    /// `struct cgroup_subsys_state` -> `cgroup` (`struct cgroup *`).
    pub css_cgroup: u32,
    /// `struct kernfs_node` -> `id` (`u64`, the cgroup id).
    pub kernfs_node_id: u32,
    /// `struct unix_sock` -> `path.dentry` (the bound socket file).
    pub unix_sock_path_dentry: u32,
    /// `struct socket` -> `sk` (`struct sock *`).
    pub socket_sk: u32,
    /// `struct vfsmount` -> `mnt_sb` (`struct super_block *`).
    pub vfsmount_mnt_sb: u32,
}

pub const EVENT_FILE: u32 = 2;

/// `FileEvent.mode` for a rename of (or over) a protected file.
pub const ACCESS_RENAME: u32 = 4;
/// `FileEvent.mode` for a hard link to a protected file.
pub const ACCESS_LINK: u32 = 8;

/// A denied (or audited) open, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileEvent {
    /// [`EVENT_FILE`].
    pub kind: u32,
    /// For opens `f_mode & 3` (1 read, 2 write, 3 both); else
    /// [`ACCESS_RENAME`] or [`ACCESS_LINK`].
    pub mode: u32,
    pub boot_ns: u64,
    pub session_cgroup: u64,
    pub ino: u64,
    pub tgid: u32,
    pub uid: u32,
    pub profile_id: u32,
    pub rule_id: u32,
    pub dev: u32,
    pub verdict: u8,
    /// How many of `path` are filled.
    pub parts: u8,
    /// 1 when the walk reached the filesystem root within `path`.
    pub complete: u8,
    pub _pad: u8,
    pub comm: [u8; 16],
    /// The file's name, then its parents' names, upwards.
    pub path: [[u8; EVENT_PART_BYTES]; EVENT_PATH_PARTS],
}

const _: () = assert!(size_of::<InodeKey>() == 16);
const _: () = assert!(size_of::<InodeRule>() == 20);
const _: () = assert!(size_of::<NameKey>() == 4 + NAME_BYTES);
const _: () = assert!(size_of::<KernelOffsets>() == 88);
const _: () =
    assert!(size_of::<FileEvent>() == 8 + 24 + 20 + 4 + 16 + EVENT_PART_BYTES * EVENT_PATH_PARTS);
