//! Types shared by the kernel programs and the controller.
//!
//! Every struct here crosses the user/kernel boundary through a BPF map or the
//! ring buffer, so each is `#[repr(C)]` with explicit padding fields: a Pod
//! type must have no implicit padding, or uninitialised bytes could leak into
//! map keys and break lookups.
#![cfg_attr(not(test), no_std)]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields of repr(C) types shared with the kernel"
)]

pub mod file;
pub mod guard;
pub mod net;

pub use file::*;
pub use guard::*;
pub use net::*;

/// Map names, shared so the controller looks up exactly what the kernel
/// object defines.
pub mod maps {
    pub const SESSIONS: &str = "SESSIONS";
    pub const NET_RULES_V4: &str = "NET_RULES_V4";
    pub const NET_RULES_V6: &str = "NET_RULES_V6";
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const FILE_INODES: &str = "FILE_INODES";
    pub const DNS_ORIGINAL: &str = "DNS_ORIGINAL";
    pub const NAME_PREFIX: &str = "NAME_PREFIX";
    pub const NAME_SUFFIX: &str = "NAME_SUFFIX";
    pub const PROTECTED_SOCKETS: &str = "PROTECTED_SOCKETS";
    pub const ENFORCER_FILES: &str = "ENFORCER_FILES";
}

/// Names of the read-only globals the controller sets at load time.
pub mod globals {
    /// Cgroup id of this controller instance's parent cgroup, under which
    /// every session cgroup it manages lives.
    pub const INSTANCE_CGROUP_ID: &str = "INSTANCE_CGROUP_ID";
    /// Depth of that parent cgroup below the cgroup2 root (root = 0).
    pub const INSTANCE_CGROUP_LEVEL: &str = "INSTANCE_CGROUP_LEVEL";
    /// Kernel struct field offsets for the `file_open` program.
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
}

/// Per-CPU counters of kernel-side failures and lost events, indexed by
/// these values in the `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// An event could not be reserved in the ring buffer (it was full).
    EventsLost = 0,
    /// A process sat in this instance's cgroup tree but its session cgroup
    /// was not registered; the operation was denied (fail closed).
    UnknownSession = 1,
    /// Operations denied in enforce mode.
    Denied = 2,
    /// Operations that audit mode let through but would have denied.
    Audited = 3,
    /// A rule-hit counter index was outside the `RULE_HITS` map.
    RuleHitOutOfRange = 4,
    /// Reading a kernel struct in `file_open` failed; the open was denied
    /// (fail closed).
    FileReadFailed = 5,
    /// DNS queries (port 53) steered to the session's DNS proxy.
    DnsSteered = 6,
    /// DNS queries denied because the session has no proxy for their
    /// address family (fail closed).
    DnsNoProxy = 7,
    /// The original resolver of a steered UDP query could not be recorded,
    /// so its reply comes back from the proxy's address.
    DnsOriginalLost = 8,
}

impl Counter {
    pub const ALL: [Counter; 9] = [
        Counter::EventsLost,
        Counter::UnknownSession,
        Counter::Denied,
        Counter::Audited,
        Counter::RuleHitOutOfRange,
        Counter::FileReadFailed,
        Counter::DnsSteered,
        Counter::DnsNoProxy,
        Counter::DnsOriginalLost,
    ];
    #[expect(clippy::cast_possible_truncation, reason = "a handful of counters")]
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::EventsLost => "events_lost",
            Counter::UnknownSession => "unknown_session_denied",
            Counter::Denied => "denied",
            Counter::Audited => "audited",
            Counter::RuleHitOutOfRange => "rule_hit_out_of_range",
            Counter::FileReadFailed => "file_read_failed_denied",
            Counter::DnsSteered => "dns_steered",
            Counter::DnsNoProxy => "dns_no_proxy_denied",
            Counter::DnsOriginalLost => "dns_original_lost",
        }
    }
}

/// Session flag: log what would be denied, but allow it.
pub const SESSION_AUDIT: u32 = 1;
/// Session flag: the profile is an allow-list (anything unmatched is denied).
pub const SESSION_DEFAULT_DENY: u32 = 2;

/// Value of the `SESSIONS` map, keyed by the session cgroup's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// Which profile's rules apply (the profile part of every rule key).
    pub profile_id: u32,
    /// `SESSION_*` flags.
    pub flags: u32,
    /// File policy for `FILE_INODES` and the name tries; 0: no file rules.
    pub file_policy: u32,
    /// Port of the session's DNS proxy on 127.0.0.1 and on `::1`, where
    /// every query to port 53 is steered; 0: none for that family, and
    /// such queries are denied.
    pub dns_port_v4: u16,
    pub dns_port_v6: u16,
}

impl Session {
    pub const fn audit(&self) -> bool {
        self.flags & SESSION_AUDIT != 0
    }
    pub const fn default_deny(&self) -> bool {
        self.flags & SESSION_DEFAULT_DENY != 0
    }
    /// Whether the profile re-allowed `guard` (a `GUARD_*`).
    pub const fn guard_allowed(&self, guard: u32) -> bool {
        self.flags & (guard << SESSION_GUARD_ALLOW_SHIFT) != 0
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no implicit padding
    // (checked by the size assertions next to their definitions).
    unsafe impl aya::Pod for super::Session {}
    unsafe impl aya::Pod for super::net::RuleList {}
    unsafe impl aya::Pod for super::net::V4Key {}
    unsafe impl aya::Pod for super::net::V6Key {}
    unsafe impl aya::Pod for super::net::OriginalDest {}
    unsafe impl aya::Pod for super::file::InodeKey {}
    unsafe impl aya::Pod for super::file::InodeRule {}
    unsafe impl aya::Pod for super::file::NameKey {}
    unsafe impl aya::Pod for super::file::NameRule {}
    unsafe impl aya::Pod for super::file::KernelOffsets {}
}
