//! What a profile says about a DNS name. Pure: the proxy asks it about every
//! query and answer, and `enforcer explain` about a host.
//!
//! Names are compared lower case without a trailing dot. A wildcard
//! `*.example.com` covers every name below `example.com`, not `example.com`
//! itself. Of the rules naming a host, an exact name is more specific than a
//! wildcard and a longer wildcard more specific than a shorter one; among
//! equals, deny comes first.

use enforcer_common::PROTO_ANY;

use crate::policy::{Action, Profile, profile::NetRule, target::Host};

/// The profile's rules that name `name` (exact or wildcard), most specific
/// first, as indexes into `profile.rules`.
pub fn rules_for(profile: &Profile, name: &str) -> Vec<usize> {
    let mut found: Vec<usize> = profile
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.target.host.matches_name(name))
        .map(|(i, _)| i)
        .collect();
    found.sort_by_key(|i| {
        let rule = &profile.rules[*i];
        let specificity = match &rule.target.host {
            Host::Name(_) => usize::MAX,
            Host::Wildcard(suffix) => suffix.len(),
            Host::Net(_) => 0,
        };
        (
            std::cmp::Reverse(specificity),
            rule.action != Action::Deny,
            *i,
        )
    });
    found
}

/// What the proxy does with a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Answer it, learning the answer's addresses for the rules it names.
    Answer,
    /// Answer NXDOMAIN: this rule denies the name on every port, or (`None`)
    /// the profile is an allow-list and no rule allows the name.
    Refuse(Option<usize>),
}

/// Judge a query for `chain[0]` whose answer went through the CNAMEs
/// `chain[1..]` (before the answer is known, pass the query name alone).
///
/// A name in the chain whose most specific rule denies every port refuses
/// the query, so a CNAME cannot lead around a denied name. An allow-list
/// profile answers only names one of its rules allows: it never even
/// forwards a query for any other name, which also closes DNS tunnelling.
pub fn judge(profile: &Profile, chain: &[String]) -> NameVerdict {
    for name in chain {
        if let Some(&most_specific) = rules_for(profile, name).first()
            && blocks_everything(&profile.rules[most_specific])
        {
            return NameVerdict::Refuse(Some(most_specific));
        }
    }
    if profile.default == Action::Deny {
        let query = chain.first().map_or("", String::as_str);
        let allowed = rules_for(profile, query)
            .iter()
            .any(|i| profile.rules[*i].action == Action::Allow);
        if !allowed {
            return NameVerdict::Refuse(None);
        }
    }
    NameVerdict::Answer
}

/// Name keys (`Host::name_key`) the addresses of an answer along `chain` are
/// learned under: every rule naming any name in the chain (for a refused
/// answer, only the denying ones, so no allow rule carries them). The
/// rules' ports and protocols then apply to those addresses as to literal
/// ones.
pub fn learned_keys(profile: &Profile, chain: &[String], only_denials: bool) -> Vec<String> {
    let mut keys: Vec<String> = chain
        .iter()
        .flat_map(|name| rules_for(profile, name))
        .filter(|i| !only_denials || profile.rules[*i].action == Action::Deny)
        .filter_map(|i| profile.rules[i].target.host.name_key())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn blocks_everything(rule: &NetRule) -> bool {
    rule.action == Action::Deny && rule.target.ports.is_any() && rule.target.proto == PROTO_ANY
}

/// A DNS name as the rules compare it: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(toml: &str) -> Profile {
        Profile::parse("test.toml", &format!("name = \"test\"\n{toml}")).unwrap()
    }

    fn chain(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| normalize(n)).collect()
    }

    #[test]
    fn exact_and_wildcard_denials_refuse_whatever_the_spelling() {
        let p = profile(
            r#"
            [network]
            deny = ["api.railway.app", "*.prod.example"]
            "#,
        );
        for name in [
            "api.railway.app",
            "API.Railway.App.",
            "db.prod.example",
            "a.b.prod.example",
        ] {
            assert!(
                matches!(judge(&p, &chain(&[name])), NameVerdict::Refuse(Some(_))),
                "{name}"
            );
        }
        for name in [
            "railway.app",
            "x.api.railway.app",
            "prod.example",
            "prod.example.org",
        ] {
            assert_eq!(judge(&p, &chain(&[name])), NameVerdict::Answer, "{name}");
        }
    }

    #[test]
    fn a_cname_to_a_denied_name_is_refused() {
        let p = profile("[network]\ndeny = [\"*.railway.app\"]\n");
        assert_eq!(
            judge(&p, &chain(&["innocent.example", "backboard.railway.app"])),
            NameVerdict::Refuse(Some(0))
        );
    }

    #[test]
    fn port_specific_denials_answer_and_leave_ports_to_the_kernel() {
        let p = profile("[network]\ndeny = [\"api.railway.app:443\"]\n");
        assert_eq!(judge(&p, &chain(&["api.railway.app"])), NameVerdict::Answer);
        assert_eq!(
            learned_keys(&p, &chain(&["api.railway.app"]), false),
            vec!["api.railway.app".to_owned()]
        );
    }

    #[test]
    fn allow_lists_answer_only_allowed_names() {
        let p = profile(
            r#"
            [network]
            default = "deny"
            allow = ["api.anthropic.com:443", "*.pypi.org"]
            deny = ["evil.pypi.org"]
            "#,
        );
        assert_eq!(
            judge(&p, &chain(&["api.anthropic.com"])),
            NameVerdict::Answer
        );
        assert_eq!(judge(&p, &chain(&["files.pypi.org."])), NameVerdict::Answer);
        assert_eq!(
            judge(&p, &chain(&["example.com"])),
            NameVerdict::Refuse(None)
        );
        assert_eq!(judge(&p, &chain(&["pypi.org"])), NameVerdict::Refuse(None));
        // The exact deny is more specific than the allowing wildcard (deny
        // entries are numbered before allow entries).
        assert_eq!(
            judge(&p, &chain(&["evil.pypi.org"])),
            NameVerdict::Refuse(Some(0))
        );
        // An allowed name may lead through a CDN's CNAME.
        assert_eq!(
            judge(&p, &chain(&["api.anthropic.com", "edge.cdn.example"])),
            NameVerdict::Answer
        );
    }

    #[test]
    fn more_specific_rules_come_first() {
        let p = profile(
            r#"
            [network]
            allow = ["*.example.com", "api.example.com", "*.eu.example.com"]
            deny = ["*.example.com"]
            "#,
        );
        // Rules are numbered deny entries first: 0 is the deny wildcard.
        assert_eq!(rules_for(&p, "api.example.com"), vec![2, 0, 1]);
        assert_eq!(rules_for(&p, "x.eu.example.com"), vec![3, 0, 1]);
        assert_eq!(
            learned_keys(&p, &chain(&["api.example.com"]), false),
            vec!["*.example.com".to_owned(), "api.example.com".to_owned()]
        );
        let p = profile("[network]\nallow = [\"a.test:443\"]\ndeny = [\"*.b.test\"]\n");
        assert_eq!(
            learned_keys(&p, &chain(&["a.test", "x.b.test"]), true),
            vec!["*.b.test".to_owned()]
        );
    }
}
