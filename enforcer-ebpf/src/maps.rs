//! Every map the kernel programs share with the controller. Sizes here are
//! defaults; the controller resizes the rule and counter maps to the loaded
//! rule set before loading.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use enforcer_common::{
    Counter, InodeKey, InodeRule, NameKey, NameRule, OriginalDest, RuleList, Session, V4Key, V6Key,
};

/// Session cgroup id -> the profile and mode that apply to it.
#[map]
pub static SESSIONS: HashMap<u64, Session> = HashMap::with_max_entries(4096, 0);

/// (profile, IPv4 prefix) -> rules for that prefix. LPM tries must not be
/// preallocated, so a generous cap costs nothing until used.
#[map]
pub static NET_RULES_V4: LpmTrie<V4Key, RuleList> =
    LpmTrie::with_max_entries(1 << 20, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// (profile, IPv6 prefix) -> rules for that prefix.
#[map]
pub static NET_RULES_V6: LpmTrie<V6Key, RuleList> =
    LpmTrie::with_max_entries(1 << 20, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// (file policy, device, inode) -> rules for that file or directory.
#[map]
pub static FILE_INODES: HashMap<InodeKey, InodeRule> = HashMap::with_max_entries(1, 0);

/// (scope, name) -> exact-name (NUL-terminated) and prefix patterns.
#[map]
pub static NAME_PREFIX: LpmTrie<NameKey, NameRule> =
    LpmTrie::with_max_entries(1 << 16, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// (scope, reversed name) -> suffix patterns.
#[map]
pub static NAME_SUFFIX: LpmTrie<NameKey, NameRule> =
    LpmTrie::with_max_entries(1 << 16, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// (profile, device, inode) of a Unix socket file whose service acts
/// outside the session -> an index the controller names it by.
#[map]
pub static PROTECTED_SOCKETS: HashMap<InodeKey, u32> = HashMap::with_max_entries(4096, 0);

/// (0, device, inode) of the enforcer's own files and directories (its
/// binary, the rules directory, the denial log), which no session may
/// change.
#[map]
pub static ENFORCER_FILES: HashMap<InodeKey, u32> = HashMap::with_max_entries(64, 0);

/// Per-CPU room for the opened file's name keys (too big for the stack).
#[map]
pub static NAME_SCRATCH: PerCpuArray<crate::file::NameScratch> =
    PerCpuArray::with_max_entries(1, 0);

/// Socket cookie -> where its last steered UDP DNS query was sent. LRU: an
/// evicted entry only leaves a reply coming from the proxy's address.
#[map]
pub static DNS_ORIGINAL: LruHashMap<u64, OriginalDest> = LruHashMap::with_max_entries(1 << 16, 0);

/// Denial and audit events for the controller.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Kernel-side failures and lost events, see `Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Decisions per rule id (deny and audit hits), per CPU so no atomics are
/// needed; the controller sums the CPUs.
#[map]
pub static RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; nothing else on this CPU runs concurrently
        // with this program.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_rule_hit(rule_id: u32) {
    match RULE_HITS.get_ptr_mut(rule_id) {
        // SAFETY: per-CPU slot, as in `count`.
        Some(slot) => unsafe { *slot += 1 },
        None => count(Counter::RuleHitOutOfRange),
    }
}

/// What an LSM hook returns for an operation it refuses: in audit mode it
/// goes through (counted as audited), otherwise `-EPERM` (counted denied).
#[inline(always)]
pub fn lsm_refusal(audit: bool) -> i32 {
    if audit {
        count(Counter::Audited);
        0
    } else {
        count(Counter::Denied);
        -1
    }
}
