//! Guards: what a session may not do to get out from under the enforcer
//! (BPF-LSM programs, see `enforcer-ebpf/src/guard.rs`). Each is on by
//! default in every session; a profile may re-allow some of them
//! (`[guard] allow`), which sets the guard's bit shifted by
//! [`SESSION_GUARD_ALLOW_SHIFT`] in the session's flags.

/// `bpf()`: loading or detaching programs, opening pinned maps and links.
pub const GUARD_BPF: u32 = 1;
/// ptrace attach, `/proc/<pid>/mem`, `process_vm_*` on a task outside the
/// session.
pub const GUARD_PTRACE: u32 = 2;
/// Sending a signal to a task outside the session.
pub const GUARD_SIGNAL: u32 = 4;
/// Leaving the session's cgroup: writing any cgroup file (`cgroup.procs`,
/// `cgroup.threads`, ...) or `clone3(CLONE_INTO_CGROUP)`.
pub const GUARD_CGROUP: u32 = 8;
/// Raw IP sockets and packet sockets, which bypass the connect hooks.
pub const GUARD_RAW_SOCKET: u32 = 16;
/// Connecting to a Unix socket of a service that acts outside the session
/// (Docker, containerd, the D-Bus buses, systemd, tmux, the control socket).
pub const GUARD_LOCAL_SOCKET: u32 = 32;
/// Removing or unmounting the enforcer's pins in the BPF filesystem, or
/// unmounting a cgroup filesystem. Never re-allowed.
pub const GUARD_PINS: u32 = 64;
/// Writing, creating, removing, renaming or linking the enforcer's own
/// files: its binary, the rules directory and its files, the denial log.
/// Never re-allowed.
pub const GUARD_ENFORCER_FILES: u32 = 128;

/// Guards no profile can re-allow.
pub const GUARDS_ALWAYS: u32 = GUARD_PINS | GUARD_ENFORCER_FILES;

/// A guard re-allowed by the profile has its bit set, shifted by this, in
/// `Session.flags`.
pub const SESSION_GUARD_ALLOW_SHIFT: u32 = 8;

/// Every guard, with its name in profiles and in the denial log.
pub const GUARDS: [(u32, &str); 8] = [
    (GUARD_BPF, "bpf"),
    (GUARD_PTRACE, "ptrace"),
    (GUARD_SIGNAL, "signal"),
    (GUARD_CGROUP, "cgroup"),
    (GUARD_RAW_SOCKET, "raw-socket"),
    (GUARD_LOCAL_SOCKET, "local-socket"),
    (GUARD_PINS, "pins"),
    (GUARD_ENFORCER_FILES, "enforcer-files"),
];

pub const EVENT_GUARD: u32 = 3;

/// `GuardEvent.detail` of a `GUARD_CGROUP` denial by `clone3`.
pub const DETAIL_CLONE_INTO_CGROUP: u32 = 1 << 31;

/// A refused (or audited) attempt to get around the enforcer, sent through
/// the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuardEvent {
    /// [`EVENT_GUARD`].
    pub kind: u32,
    /// The `GUARD_*` that refused.
    pub guard: u32,
    pub boot_ns: u64,
    pub session_cgroup: u64,
    /// Inode of the file or Unix socket involved, 0 if none.
    pub ino: u64,
    pub tgid: u32,
    pub uid: u32,
    pub profile_id: u32,
    /// The process signalled or traced, 0 if none.
    pub target_pid: u32,
    /// The signal, ptrace mode, `bpf()` command, socket `family << 16 |
    /// type`, or for cgroups the open mode or [`DETAIL_CLONE_INTO_CGROUP`].
    pub detail: u32,
    /// Device (kernel encoding) of `ino`.
    pub dev: u32,
    pub verdict: u8,
    pub _pad: [u8; 7],
    pub comm: [u8; 16],
    /// The name of the file involved (a cgroup file, a pin), NUL-padded.
    pub name: [u8; 48],
}

const _: () = assert!(size_of::<GuardEvent>() == 8 + 24 + 24 + 8 + 16 + 48);
