//! `enforcer explain`: would a connect to HOST[:PORT] from a session of a
//! profile be allowed, and by which rule? The same decisions the proxy and
//! the kernel make (`names::judge`, `compile`, `decide`), without a kernel.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use enforcer_common::{ACTION_DENY, NO_RULE, PROTO_TCP, PROTO_UDP, decide};

use crate::{
    dns::names::{self, NameVerdict},
    policy::{Action, Profile, compile, target::Host},
};

/// The verdict on one destination, as lines for people.
pub struct Explanation {
    pub allowed: bool,
    pub lines: Vec<String>,
}

/// Explain a connect to `host` on `port`/`proto` under `profile`, where
/// `addresses` is what the name resolves to (empty for a literal address,
/// or a name that did not resolve).
pub fn explain(
    profile: &Profile,
    host: &Host,
    addresses: &[IpAddr],
    port: u16,
    proto: u8,
) -> Result<Explanation, String> {
    let mut lines = Vec::new();
    let (addresses, learned): (Vec<IpAddr>, BTreeMap<String, Vec<IpAddr>>) = match host {
        Host::Net(net) if net.prefix_len() == net.max_prefix_len() => {
            (vec![net.addr()], BTreeMap::new())
        }
        Host::Net(net) => return Err(format!("{net} is a prefix; give one address")),
        Host::Wildcard(_) => return Err("give a host name, not a wildcard".into()),
        Host::Name(name) => {
            let chain = [name.clone()];
            match names::judge(profile, &chain) {
                NameVerdict::Refuse(rule) => {
                    lines.push(format!(
                        "DNS: a query for {name} is answered NXDOMAIN, {}",
                        because(profile, rule)
                    ));
                    return Ok(Explanation {
                        allowed: false,
                        lines,
                    });
                }
                NameVerdict::Answer => lines.push(format!("DNS: a query for {name} is answered")),
            }
            if addresses.is_empty() {
                lines.push(format!(
                    "{name} does not resolve here, so no address of it can be judged"
                ));
                return Ok(Explanation {
                    allowed: false,
                    lines,
                });
            }
            // What the proxy would learn from this answer, plus the name's
            // own resolution for exact-name rules.
            let mut learned = BTreeMap::new();
            for key in names::learned_keys(profile, &chain, false) {
                learned.insert(key, addresses.to_vec());
            }
            (addresses.to_vec(), learned)
        }
    };
    let compiled = compile::compile(profile, 0, &learned).map_err(|e| e.to_string())?;
    let mut allowed = true;
    for addr in addresses {
        let decision = decide(
            compile::lookup(&compiled, addr),
            proto,
            port,
            profile.default == Action::Deny,
        );
        let verdict = if decision.action == ACTION_DENY {
            allowed = false;
            "DENIED"
        } else {
            "allowed"
        };
        let mut line = format!(
            "connect {}/{}: {verdict}, ",
            std::net::SocketAddr::new(addr, port),
            proto_name(proto)
        );
        let rule = (decision.rule_id != NO_RULE).then_some(decision.rule_id as usize);
        let _ = write!(line, "{}", because(profile, rule));
        lines.push(line);
    }
    Ok(Explanation { allowed, lines })
}

fn because(profile: &Profile, rule: Option<usize>) -> String {
    match rule.and_then(|i| profile.rules.get(i)) {
        Some(r) => format!(
            "by {} `{}` ({}:{})",
            r.action.as_str(),
            r.text,
            r.origin.file,
            r.origin.line
        ),
        None => format!(
            "by the profile's default ({}, {}:{})",
            profile.default.as_str(),
            profile.default_origin.file,
            profile.default_origin.line
        ),
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "any",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::target::Target;

    fn profile(toml: &str) -> Profile {
        Profile::parse("p.toml", &format!("name = \"p\"\n{toml}")).unwrap()
    }

    fn run(p: &Profile, target: &str, addrs: &[&str]) -> Explanation {
        let t = Target::parse(target).unwrap();
        let addrs: Vec<IpAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
        let port = if t.ports.is_any() { 443 } else { t.ports.lo };
        explain(p, &t.host, &addrs, port, PROTO_TCP).unwrap()
    }

    #[test]
    fn names_addresses_and_ports_are_explained_with_their_rule() {
        let p = profile(
            "[network]\ndeny = [\"*.railway.app\", \"10.0.0.0/8\", \"api.stripe.test:443\"]\n",
        );
        let e = run(&p, "backboard.railway.app", &["127.0.0.9"]);
        assert!(!e.allowed);
        assert!(e.lines[0].contains("NXDOMAIN"), "{:?}", e.lines);
        assert!(
            e.lines[0].contains("`*.railway.app` (p.toml:3)"),
            "{:?}",
            e.lines
        );
        let e = run(&p, "10.1.2.3:22", &[]);
        assert!(!e.allowed);
        assert!(e.lines[0].contains("`10.0.0.0/8`"), "{:?}", e.lines);
        let e = run(&p, "api.stripe.test:443", &["127.0.0.5"]);
        assert!(!e.allowed, "{:?}", e.lines);
        let e = run(&p, "api.stripe.test:80", &["127.0.0.5"]);
        assert!(e.allowed, "{:?}", e.lines);
        assert!(e.lines[1].contains("default (allow"), "{:?}", e.lines);
    }

    #[test]
    fn allow_lists_explain_both_outcomes() {
        let p = profile("[network]\ndefault = \"deny\"\nallow = [\"*.pypi.test:443\"]\n");
        assert!(run(&p, "files.pypi.test", &["127.0.0.7"]).allowed);
        let e = run(&p, "files.pypi.test:80", &["127.0.0.7"]);
        assert!(!e.allowed);
        let e = run(&p, "example.test", &["127.0.0.8"]);
        assert!(!e.allowed);
        assert!(e.lines[0].contains("NXDOMAIN"));
    }
}
