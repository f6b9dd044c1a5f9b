//! Network rule entries, their lookup keys, the decision over them, and the
//! event a decision emits.

/// How many port rules one address prefix can carry, its own and those
/// inherited from every shorter prefix that contains it. The policy compiler
/// refuses rule sets that need more, naming the prefix.
pub const MAX_PORT_RULES: usize = 16;

/// Rule id meaning "no rule matched; the profile's default applied".
pub const NO_RULE: u32 = u32::MAX;

pub const ACTION_ALLOW: u8 = 1;
pub const ACTION_DENY: u8 = 2;

/// Protocol numbers as the kernel reports them in `bpf_sock_addr.protocol`.
pub const PROTO_ANY: u8 = 0;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// One rule as it applies to one address prefix: a port range, a protocol
/// and what to do.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRule {
    /// Inclusive port range, host byte order; `0..=65535` means any port.
    pub port_lo: u16,
    pub port_hi: u16,
    /// `PROTO_ANY`, `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `ACTION_ALLOW` or `ACTION_DENY`.
    pub action: u8,
    pub _pad: u16,
    /// Global rule id: index into the controller's rule table and the
    /// `RULE_HITS` counters.
    pub rule_id: u32,
}

impl PortRule {
    #[expect(clippy::inline_always, reason = "called in the kernel's hot path")]
    #[inline(always)]
    pub const fn matches(&self, proto: u8, port: u16) -> bool {
        (self.proto == PROTO_ANY || self.proto == proto)
            && port >= self.port_lo
            && port <= self.port_hi
    }
}

/// Value stored for one prefix in the LPM tries: every rule that applies to
/// addresses under that prefix, most specific first. The first one whose
/// port and protocol match decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleList {
    pub len: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl Default for RuleList {
    fn default() -> Self {
        Self {
            len: 0,
            rules: [PortRule {
                port_lo: 0,
                port_hi: 0,
                proto: 0,
                action: 0,
                _pad: 0,
                rule_id: 0,
            }; MAX_PORT_RULES],
        }
    }
}

/// What a lookup decided: the action and the rule that chose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: u8,
    pub rule_id: u32,
}

/// Decide for one destination. `rules` is the longest-prefix match for the
/// destination address in the profile's trie, if any prefix matched. Kept
/// here, free of kernel types, so the kernel and the controller's `explain`
/// and tests share one definition.
#[expect(clippy::inline_always, reason = "called in the kernel's hot path")]
#[inline(always)]
pub fn decide(rules: Option<&RuleList>, proto: u8, port: u16, default_deny: bool) -> Decision {
    if let Some(list) = rules {
        let len = list.len as usize;
        let mut i = 0;
        // Bounded by MAX_PORT_RULES for the verifier.
        while i < MAX_PORT_RULES {
            if i >= len {
                break;
            }
            let rule = &list.rules[i];
            if rule.matches(proto, port) {
                return Decision {
                    action: rule.action,
                    rule_id: rule.rule_id,
                };
            }
            i += 1;
        }
    }
    Decision {
        action: if default_deny {
            ACTION_DENY
        } else {
            ACTION_ALLOW
        },
        rule_id: NO_RULE,
    }
}

/// LPM trie key data for IPv4: the profile id, then the address, both in
/// network byte order. The prefix length covers the 32 profile bits plus the
/// rule's prefix, so one trie serves every profile.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4Key {
    pub profile: [u8; 4],
    pub addr: [u8; 4],
}

/// LPM trie key data for IPv6; see [`V4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V6Key {
    pub profile: [u8; 4],
    pub addr: [u8; 16],
}

/// Prefix bits taken by the profile id in every key.
pub const PROFILE_PREFIX_BITS: u32 = 32;

/// The DNS port: queries to it from a session are steered to its proxy.
pub const DNS_PORT: u16 = 53;

/// Where a steered UDP DNS query was sent, keyed by the socket's cookie, so
/// the reply's source can be set back to it (resolvers drop replies that
/// come from an address they did not ask).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDest {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6 (an IPv4-mapped destination on an IPv6 socket is 4).
    pub family: u8,
    pub _pad: u8,
}

pub const OP_CONNECT: u8 = 1;
pub const OP_SENDMSG: u8 = 2;

pub const VERDICT_DENY: u8 = 1;
pub const VERDICT_AUDIT: u8 = 2;

pub const EVENT_NET: u32 = 1;

/// A network decision that denied (or, in audit mode, would have denied),
/// sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetEvent {
    /// [`EVENT_NET`]: every event starts with its kind.
    pub kind: u32,
    pub _pad0: u32,
    /// `bpf_ktime_get_boot_ns()` at the decision.
    pub boot_ns: u64,
    /// The session cgroup's id.
    pub session_cgroup: u64,
    /// Thread group id (the process id user space sees).
    pub tgid: u32,
    pub uid: u32,
    pub profile_id: u32,
    /// Rule that denied, or [`NO_RULE`] when the profile's default did.
    pub rule_id: u32,
    /// `OP_CONNECT` or `OP_SENDMSG`.
    pub op: u8,
    /// `VERDICT_DENY` or `VERDICT_AUDIT`.
    pub verdict: u8,
    /// 4 or 6: the family the rules were looked up in (an IPv4-mapped IPv6
    /// destination is reported as IPv4).
    pub family: u8,
    pub proto: u8,
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: u16,
    /// Destination address, network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
}

const _: () = assert!(size_of::<PortRule>() == 12);
const _: () = assert!(size_of::<RuleList>() == 4 + 12 * MAX_PORT_RULES);
const _: () = assert!(size_of::<V4Key>() == 8);
const _: () = assert!(size_of::<V6Key>() == 20);
const _: () = assert!(size_of::<NetEvent>() == 8 + 8 + 8 + 16 + 8 + 16 + 16);
const _: () = assert!(size_of::<super::Session>() == 16);
const _: () = assert!(size_of::<OriginalDest>() == 20);

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[PortRule]) -> RuleList {
        let mut l = RuleList::default();
        for (i, r) in rules.iter().enumerate() {
            l.rules[i] = *r;
        }
        l.len = u32::try_from(rules.len()).unwrap();
        l
    }

    fn rule(lo: u16, hi: u16, proto: u8, action: u8, id: u32) -> PortRule {
        PortRule {
            port_lo: lo,
            port_hi: hi,
            proto,
            action,
            _pad: 0,
            rule_id: id,
        }
    }

    #[test]
    fn no_match_falls_back_to_default() {
        assert_eq!(decide(None, PROTO_TCP, 80, false).action, ACTION_ALLOW);
        assert_eq!(decide(None, PROTO_TCP, 80, true).action, ACTION_DENY);
        assert_eq!(decide(None, PROTO_TCP, 80, true).rule_id, NO_RULE);
    }

    #[test]
    fn first_matching_rule_decides() {
        let l = list(&[
            rule(443, 443, PROTO_TCP, ACTION_ALLOW, 1),
            rule(0, 65535, PROTO_ANY, ACTION_DENY, 2),
        ]);
        assert_eq!(
            decide(Some(&l), PROTO_TCP, 443, false),
            Decision {
                action: ACTION_ALLOW,
                rule_id: 1
            }
        );
        assert_eq!(decide(Some(&l), PROTO_UDP, 443, false).rule_id, 2);
        assert_eq!(decide(Some(&l), PROTO_TCP, 80, false).rule_id, 2);
    }

    #[test]
    fn port_range_bounds_are_inclusive() {
        let l = list(&[rule(1000, 2000, PROTO_UDP, ACTION_DENY, 7)]);
        assert_eq!(decide(Some(&l), PROTO_UDP, 1000, false).rule_id, 7);
        assert_eq!(decide(Some(&l), PROTO_UDP, 2000, false).rule_id, 7);
        assert_eq!(decide(Some(&l), PROTO_UDP, 999, false).rule_id, NO_RULE);
        assert_eq!(decide(Some(&l), PROTO_UDP, 2001, false).rule_id, NO_RULE);
    }

    #[test]
    fn entries_beyond_len_are_ignored() {
        let mut l = list(&[rule(80, 80, PROTO_TCP, ACTION_ALLOW, 1)]);
        l.rules[1] = rule(0, 65535, PROTO_ANY, ACTION_DENY, 9);
        assert_eq!(decide(Some(&l), PROTO_TCP, 22, false).rule_id, NO_RULE);
    }
}
