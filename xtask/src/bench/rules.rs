//! The generated rule sets: network rules as an enforcer profile and as the
//! equivalent nftables table, and file rules as a profile plus the paths
//! they name (created in the guest before the rules load).

use std::fmt::Write as _;

/// One generated network rule: a prefix, optionally a port range and a
/// protocol.
pub struct NetRule {
    /// `a.b.c.d/len` or `x::/len`.
    pub net: String,
    pub v6: bool,
    /// `None`: every port.
    pub ports: Option<(u16, u16)>,
    /// `None`: TCP and UDP.
    pub proto: Option<&'static str>,
}

/// `count` deny rules, half IPv4 and half IPv6, none overlapping (so no
/// address is covered by more than one, and the nftables interval sets
/// accept them), none covering loopback (the benchmark's target):
/// IPv4 /24 with a port over TCP, /32 with a port, /25 on every port, in
/// `10.0.0.0/8` upwards; IPv6 /64 with a port over UDP, or on every port, in
/// `2001:db8::/32`.
pub fn net_rules(count: usize) -> Vec<NetRule> {
    (0..count)
        .map(|i| {
            let k = i / 2;
            let port = |base: usize, spread: usize| {
                u16::try_from(base + k % spread).expect("ports stay below 9000")
            };
            if i % 2 == 0 {
                let (a, b, c) = (10 + (k >> 16) % 50, (k >> 8) & 255, k & 255);
                match k % 3 {
                    0 => NetRule {
                        net: format!("{a}.{b}.{c}.0/24"),
                        v6: false,
                        ports: Some((port(1000, 5000), port(1000, 5000))),
                        proto: Some("tcp"),
                    },
                    1 => NetRule {
                        net: format!("{a}.{b}.{c}.7/32"),
                        v6: false,
                        ports: Some((port(2000, 3000), port(2000, 3000))),
                        proto: None,
                    },
                    _ => NetRule {
                        net: format!("{a}.{b}.{c}.128/25"),
                        v6: false,
                        ports: None,
                        proto: None,
                    },
                }
            } else {
                let net = format!("2001:db8:{:x}:{:x}::/64", k >> 16, k & 0xffff);
                if k % 2 == 1 {
                    NetRule {
                        net,
                        v6: true,
                        ports: Some((port(3000, 1000), port(3000, 1000))),
                        proto: Some("udp"),
                    }
                } else {
                    NetRule {
                        net,
                        v6: true,
                        ports: None,
                        proto: None,
                    }
                }
            }
        })
        .collect()
}

/// The profile `name` denying `rules` (default allow).
pub fn net_profile(name: &str, rules: &[NetRule]) -> String {
    let mut toml = format!("name = \"{name}\"\n[network]\ndefault = \"allow\"\ndeny = [\n");
    for rule in rules {
        let host = match (rule.ports, rule.v6) {
            (Some(_), true) => format!("[{}]", rule.net),
            _ => rule.net.clone(),
        };
        let ports = match rule.ports {
            Some((lo, hi)) if lo == hi => format!(":{lo}"),
            Some((lo, hi)) => format!(":{lo}-{hi}"),
            None => String::new(),
        };
        let proto = rule.proto.map(|p| format!("/{p}")).unwrap_or_default();
        let _ = writeln!(toml, "  \"{host}{ports}{proto}\",");
    }
    toml.push_str("]\n");
    toml
}

/// An nftables table `name` holding what `rules` deny: one interval set
/// per family keyed by address, protocol and port. Without a chain (see
/// [`nft_chain`]) it does nothing.
pub fn nft_sets(name: &str, rules: &[NetRule]) -> String {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for rule in rules {
        let ports = match rule.ports {
            Some((lo, hi)) if lo == hi => lo.to_string(),
            Some((lo, hi)) => format!("{lo}-{hi}"),
            None => "0-65535".to_owned(),
        };
        let set = if rule.v6 { &mut v6 } else { &mut v4 };
        let protos = match &rule.proto {
            Some(proto) => std::slice::from_ref(proto),
            None => &["tcp", "udp"][..],
        };
        for proto in protos {
            set.push(format!("{} . {proto} . {ports}", rule.net));
        }
    }
    let set = |family: &str, elements: &[String]| {
        let elements = if elements.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", elements.join(", "))
        };
        format!(
            "  set deny{family} {{ type ipv{family}_addr . inet_proto . inet_service; flags interval;{elements} }}\n"
        )
    };
    format!(
        "table inet {name} {{\n{}{}}}\n",
        set("4", &v4),
        set("6", &v6)
    )
}

/// The output chain of table `name` that rejects, for sockets of the cgroup
/// `cgroup` (as nft names it: relative to `/sys/fs/cgroup`) at `level`,
/// what the sets of [`nft_sets`] hold: the cgroup match first, then one
/// set lookup.
pub fn nft_chain(name: &str, cgroup: &str, level: usize) -> String {
    let rule = |family: &str, set: &str| {
        format!(
            "add rule inet {name} output socket cgroupv2 level {level} \"{cgroup}\" \
             {family} daddr . meta l4proto . th dport @{set} reject with icmpx admin-prohibited\n"
        )
    };
    format!(
        "add chain inet {name} output {{ type filter hook output priority 0; policy accept; }}\n{}{}",
        rule("ip", "deny4"),
        rule("ip6", "deny6")
    )
}

/// `count` file rules under `root`, a third each: exact files
/// (`root/exact/fI`), directories (`root/dirs/dI/`) and name patterns
/// (`**/secret-I` and `**/*.sI`, alternately). Returns the profile's
/// `deny` entries and the paths that must exist (directories end in `/`).
pub fn file_rules(count: usize, root: &str) -> (Vec<String>, Vec<String>) {
    let mut entries = Vec::with_capacity(count);
    let mut paths = Vec::new();
    for i in 0..count {
        match i % 3 {
            0 => {
                let path = format!("{root}/exact/f{i}");
                entries.push(path.clone());
                paths.push(path);
            }
            1 => {
                let dir = format!("{root}/dirs/d{i}/");
                entries.push(dir.clone());
                paths.push(dir);
            }
            _ if i % 2 == 0 => entries.push(format!("**/secret-{i}")),
            _ => entries.push(format!("**/*.s{i}")),
        }
    }
    (entries, paths)
}

/// The profile `name` with `[files]` denying `entries` (and no network
/// rules).
pub fn file_profile(name: &str, entries: &[String]) -> String {
    let mut toml = format!("name = \"{name}\"\n[files]\ndeny = [\n");
    for entry in entries {
        let _ = writeln!(toml, "  \"{entry}\",");
    }
    toml.push_str("]\n");
    toml
}

/// A `default` profile that replaces the built-in one in a benchmark rules
/// directory: the built-in one names hosts, and resolving them (with no
/// DNS here) would add seconds to every start.
pub const EMPTY_DEFAULT: &str = "name = \"default\"\n[network]\ndefault = \"allow\"\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_rules_are_mixed_and_render_in_both_formats() {
        let rules = net_rules(8);
        assert_eq!(rules.iter().filter(|r| r.v6).count(), 4);
        let toml = net_profile("n", &rules);
        assert!(toml.contains("\"10.0.0.0/24:1000/tcp\",\n"), "{toml}");
        assert!(toml.contains("\"10.0.1.7/32:2001\",\n"), "{toml}");
        assert!(toml.contains("\"10.0.2.128/25\",\n"), "{toml}");
        assert!(
            toml.contains("\"[2001:db8:0:1::/64]:3001/udp\",\n"),
            "{toml}"
        );
        assert!(toml.contains("\"2001:db8:0:0::/64\",\n"), "{toml}");
        let nft = nft_sets("t", &rules);
        assert!(
            nft.contains("10.0.1.7/32 . tcp . 2001, 10.0.1.7/32 . udp . 2001"),
            "{nft}"
        );
        assert!(nft.contains("2001:db8:0:1::/64 . udp . 3001"), "{nft}");
        assert!(nft_chain("t", "unified/x", 1).contains(
            "socket cgroupv2 level 1 \"unified/x\" ip6 daddr . meta l4proto . th dport @deny6"
        ));
    }

    #[test]
    fn file_rules_mix_files_directories_and_patterns() {
        let (entries, paths) = file_rules(6, "/r");
        assert_eq!(
            entries,
            [
                "/r/exact/f0",
                "/r/dirs/d1/",
                "**/secret-2",
                "/r/exact/f3",
                "/r/dirs/d4/",
                "**/*.s5"
            ]
        );
        assert_eq!(
            paths,
            ["/r/exact/f0", "/r/dirs/d1/", "/r/exact/f3", "/r/dirs/d4/"]
        );
    }
}
