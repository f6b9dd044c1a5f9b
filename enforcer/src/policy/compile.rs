//! Policy compilation: a profile (with its host names resolved) to the LPM
//! trie entries the kernel looks up. Pure, so it is tested without a kernel.
//!
//! An LPM trie returns only the longest matching prefix, but a destination
//! may be covered by several rules (`deny 10.0.0.0/8` and
//! `allow 10.1.2.3:443`). So every prefix's entry carries its own rules and
//! those of every shorter prefix containing it, ordered most specific first:
//! longer prefix, then narrower port range, then a named protocol, then deny
//! before allow. The first rule whose port and protocol match decides.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use enforcer_common::{ACTION_ALLOW, ACTION_DENY, MAX_PORT_RULES, PROTO_ANY, PortRule, RuleList};
use ipnet::IpNet;

use super::{
    profile::{Action, Profile},
    target::Host,
};

/// The trie entries of one profile.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub entries: Vec<(IpNet, RuleList)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{prefix} is covered by {count} port rules in profile `{profile}` (the limit per address is \
     {MAX_PORT_RULES}): {rules}; merge port ranges or split the prefix"
)]
pub struct CompileError {
    pub profile: String,
    pub prefix: IpNet,
    pub count: usize,
    pub rules: String,
}

#[derive(Clone, Copy)]
struct Atom {
    net: IpNet,
    rule: PortRule,
}

impl Atom {
    fn order(&self) -> (Reverse<u8>, u16, bool, bool, u32) {
        (
            Reverse(self.net.prefix_len()),
            self.rule.port_hi - self.rule.port_lo,
            self.rule.proto == PROTO_ANY,
            self.rule.action != ACTION_DENY,
            self.rule.rule_id,
        )
    }

    /// Whether `self`, placed earlier, decides every packet `later` could.
    fn shadows(&self, later: &PortRule) -> bool {
        let r = &self.rule;
        r.port_lo <= later.port_lo
            && r.port_hi >= later.port_hi
            && (r.proto == PROTO_ANY || r.proto == later.proto)
    }
}

/// Compile `profile`. Rule `i` of the profile gets id `first_rule_id + i`;
/// `addresses` holds the addresses each host name or wildcard currently
/// stands for, by `Host::name_key` (one with no entry contributes nothing
/// until it resolves or is learned from a DNS answer).
pub fn compile(
    profile: &Profile,
    first_rule_id: u32,
    addresses: &BTreeMap<String, Vec<IpAddr>>,
) -> Result<Compiled, CompileError> {
    let mut by_prefix: HashMap<IpNet, Vec<Atom>> = HashMap::new();
    for (index, rule) in profile.rules.iter().enumerate() {
        let port_rule = PortRule {
            port_lo: rule.target.ports.lo,
            port_hi: rule.target.ports.hi,
            proto: rule.target.proto,
            action: match rule.action {
                Action::Allow => ACTION_ALLOW,
                Action::Deny => ACTION_DENY,
            },
            _pad: 0,
            rule_id: first_rule_id + u32::try_from(index).expect("rule count fits in u32"),
        };
        let nets: Vec<IpNet> = match &rule.target.host {
            Host::Net(net) => vec![*net],
            host => host
                .name_key()
                .and_then(|key| addresses.get(&key))
                .into_iter()
                .flatten()
                .map(|addr| IpNet::from(canonical(*addr)))
                .collect(),
        };
        for net in nets {
            by_prefix.entry(net).or_default().push(Atom {
                net,
                rule: port_rule,
            });
        }
    }

    let mut entries = Vec::with_capacity(by_prefix.len());
    for prefix in by_prefix.keys() {
        let mut atoms: Vec<Atom> = (0..=prefix.prefix_len())
            .filter_map(|len| {
                let ancestor = IpNet::new(prefix.addr(), len).ok()?.trunc();
                by_prefix.get(&ancestor)
            })
            .flatten()
            .copied()
            .collect();
        atoms.sort_by_key(Atom::order);
        let mut kept: Vec<Atom> = Vec::with_capacity(atoms.len());
        for atom in atoms {
            if !kept.iter().any(|k| k.shadows(&atom.rule)) {
                kept.push(atom);
            }
        }
        if kept.len() > MAX_PORT_RULES {
            return Err(CompileError {
                profile: profile.name.clone(),
                prefix: *prefix,
                count: kept.len(),
                rules: kept
                    .iter()
                    .map(|a| {
                        let r = &profile.rules[(a.rule.rule_id - first_rule_id) as usize];
                        format!("{}:{} `{}`", r.origin.file, r.origin.line, r.text)
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let mut list = RuleList::default();
        for (slot, atom) in list.rules.iter_mut().zip(&kept) {
            *slot = atom.rule;
        }
        list.len = u32::try_from(kept.len()).expect("bounded by MAX_PORT_RULES");
        entries.push((*prefix, list));
    }
    entries.sort_by_key(|(net, _)| *net);
    Ok(Compiled { entries })
}

/// An IPv4-mapped IPv6 answer is the IPv4 host.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// Longest-prefix lookup over compiled entries, as the kernel does it.
pub fn lookup(compiled: &Compiled, addr: IpAddr) -> Option<&RuleList> {
    let addr = canonical(addr);
    compiled
        .entries
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, list)| list)
}

#[cfg(test)]
mod tests {
    use enforcer_common::{NO_RULE, PROTO_TCP, PROTO_UDP, decide};

    use super::*;

    fn profile(default: &str, deny: &[&str], allow: &[&str]) -> Profile {
        let list = |xs: &[&str]| {
            xs.iter()
                .map(|x| format!("{x:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "name = \"t\"\n[network]\ndefault = \"{default}\"\ndeny = [{}]\nallow = [{}]\n",
            list(deny),
            list(allow)
        );
        Profile::parse("t.toml", &text).unwrap()
    }

    fn verdict(c: &Compiled, default_deny: bool, addr: &str, proto: u8, port: u16) -> (u8, u32) {
        let d = decide(lookup(c, addr.parse().unwrap()), proto, port, default_deny);
        (d.action, d.rule_id)
    }

    #[test]
    fn deny_list_with_port_and_protocol_rules() {
        let p = profile(
            "allow",
            &["10.0.0.0/8", "192.0.2.7:443/tcp", "2001:db8::/32"],
            &[],
        );
        let c = compile(&p, 100, &BTreeMap::new()).unwrap();
        assert_eq!(
            verdict(&c, false, "10.9.9.9", PROTO_UDP, 53),
            (ACTION_DENY, 100)
        );
        assert_eq!(
            verdict(&c, false, "192.0.2.7", PROTO_TCP, 443),
            (ACTION_DENY, 101)
        );
        assert_eq!(
            verdict(&c, false, "192.0.2.7", PROTO_UDP, 443),
            (ACTION_ALLOW, NO_RULE)
        );
        assert_eq!(
            verdict(&c, false, "192.0.2.7", PROTO_TCP, 80),
            (ACTION_ALLOW, NO_RULE)
        );
        assert_eq!(
            verdict(&c, false, "2001:db8::5", PROTO_TCP, 1),
            (ACTION_DENY, 102)
        );
        assert_eq!(
            verdict(&c, false, "2001:db9::5", PROTO_TCP, 1),
            (ACTION_ALLOW, NO_RULE)
        );
    }

    #[test]
    fn ipv4_mapped_destination_uses_ipv4_rules() {
        let p = profile("allow", &["127.0.0.2"], &[]);
        let c = compile(&p, 0, &BTreeMap::new()).unwrap();
        assert_eq!(
            verdict(&c, false, "::ffff:127.0.0.2", PROTO_TCP, 80).0,
            ACTION_DENY
        );
    }

    #[test]
    fn more_specific_allow_carves_out_of_deny() {
        let p = profile("allow", &["10.0.0.0/8"], &["10.1.2.3:443"]);
        let c = compile(&p, 0, &BTreeMap::new()).unwrap();
        assert_eq!(
            verdict(&c, false, "10.1.2.3", PROTO_TCP, 443),
            (ACTION_ALLOW, 1)
        );
        assert_eq!(
            verdict(&c, false, "10.1.2.3", PROTO_TCP, 22),
            (ACTION_DENY, 0)
        );
        assert_eq!(
            verdict(&c, false, "10.1.2.4", PROTO_TCP, 443),
            (ACTION_DENY, 0)
        );
    }

    #[test]
    fn at_equal_specificity_deny_wins() {
        let p = profile("allow", &["10.0.0.1"], &["10.0.0.1"]);
        let c = compile(&p, 0, &BTreeMap::new()).unwrap();
        assert_eq!(
            verdict(&c, false, "10.0.0.1", PROTO_TCP, 1),
            (ACTION_DENY, 0)
        );
    }

    #[test]
    fn allow_list_profile_denies_everything_else() {
        let p = profile("deny", &[], &["127.0.0.1:8080", "::1"]);
        let c = compile(&p, 0, &BTreeMap::new()).unwrap();
        assert_eq!(
            verdict(&c, true, "127.0.0.1", PROTO_TCP, 8080),
            (ACTION_ALLOW, 0)
        );
        assert_eq!(
            verdict(&c, true, "127.0.0.1", PROTO_TCP, 8081),
            (ACTION_DENY, NO_RULE)
        );
        assert_eq!(verdict(&c, true, "::1", PROTO_UDP, 9), (ACTION_ALLOW, 1));
        assert_eq!(
            verdict(&c, true, "8.8.8.8", PROTO_UDP, 53),
            (ACTION_DENY, NO_RULE)
        );
    }

    #[test]
    fn host_names_use_their_resolved_addresses() {
        let p = profile("allow", &["db.internal:5432"], &[]);
        let none = compile(&p, 0, &BTreeMap::new()).unwrap();
        assert!(none.entries.is_empty());
        let addrs = BTreeMap::from([(
            "db.internal".to_owned(),
            vec![
                "127.0.0.9".parse().unwrap(),
                "::ffff:127.0.0.8".parse().unwrap(),
                "::9".parse().unwrap(),
            ],
        )]);
        let c = compile(&p, 0, &addrs).unwrap();
        assert_eq!(c.entries.len(), 3);
        for a in ["127.0.0.9", "127.0.0.8", "::9"] {
            assert_eq!(
                verdict(&c, false, a, PROTO_TCP, 5432),
                (ACTION_DENY, 0),
                "{a}"
            );
            assert_eq!(
                verdict(&c, false, a, PROTO_TCP, 5433).0,
                ACTION_ALLOW,
                "{a}"
            );
        }
    }

    #[test]
    fn shadowed_rules_take_no_slot() {
        let deny: Vec<String> = (0..40)
            .map(|i| format!("10.0.0.0/{}", 8 + (i % 2)))
            .collect();
        let deny: Vec<&str> = deny.iter().map(String::as_str).collect();
        let p = profile("allow", &deny, &[]);
        let c = compile(&p, 0, &BTreeMap::new()).unwrap();
        assert!(c.entries.iter().all(|(_, l)| l.len == 1));
    }

    #[test]
    fn too_many_overlapping_port_rules_is_an_error_naming_them() {
        let deny: Vec<String> = (1..=17).map(|p| format!("10.0.0.1:{p}")).collect();
        let deny: Vec<&str> = deny.iter().map(String::as_str).collect();
        let err = compile(&profile("allow", &deny, &[]), 0, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            (err.count, err.prefix.to_string().as_str()),
            (17, "10.0.0.1/32")
        );
        assert!(err.to_string().contains("t.toml:4 `10.0.0.1:17`"), "{err}");
    }

    #[test]
    fn scales_to_a_hundred_thousand_rules() {
        let deny: Vec<String> = (0..100_000u32)
            .map(|i| format!("10.{}.{}.0/24:{}", (i >> 8) & 0xff, i & 0xff, 1 + i % 1000))
            .collect();
        let deny: Vec<&str> = deny.iter().map(String::as_str).collect();
        let c = compile(
            &profile("allow", &deny, &["10.0.0.0/8"]),
            0,
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(c.entries.len() >= 65_536);
    }
}
