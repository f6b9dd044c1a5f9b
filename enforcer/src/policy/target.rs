//! One network rule entry, as written in a profile: a host name or address
//! (or CIDR), optionally a port or port range, optionally a protocol.
//!
//! Forms: `host`, `host:443`, `host:1000-2000/udp`, `10.0.0.0/8`,
//! `192.0.2.7:443/tcp`, `2001:db8::/32`, `[2001:db8::1]:443`,
//! `[2001:db8::/32]:443/tcp`.

use std::{fmt, net::IpAddr};

use enforcer_common::{PROTO_ANY, PROTO_TCP, PROTO_UDP};
use ipnet::{IpNet, Ipv4Net};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A literal address or prefix. IPv4-mapped IPv6 forms are stored as
    /// IPv4, because that is how the kernel side judges them.
    Net(IpNet),
    /// A DNS name, lower case, without a trailing dot.
    Name(String),
    /// `*.suffix`: every name below `suffix` (not `suffix` itself), lower
    /// case, without a trailing dot. Learned from DNS answers only.
    Wildcard(String),
}

impl Host {
    /// The key that DNS-derived addresses of this host are filed under:
    /// the name, or `*.suffix`; `None` for literal addresses.
    pub fn name_key(&self) -> Option<String> {
        match self {
            Host::Net(_) => None,
            Host::Name(name) => Some(name.clone()),
            Host::Wildcard(suffix) => Some(format!("*.{suffix}")),
        }
    }

    /// Whether `name` (lower case, no trailing dot) is this host.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Host::Net(_) => false,
            Host::Name(n) => n == name,
            Host::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub lo: u16,
    pub hi: u16,
}

impl Ports {
    pub const ANY: Ports = Ports {
        lo: 0,
        hi: u16::MAX,
    };

    pub fn is_any(self) -> bool {
        self == Self::ANY
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub ports: Ports,
    /// `PROTO_ANY`, `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty entry".into());
        }
        let (rest, proto) = split_proto(text)?;
        let (host, ports) = split_port(rest)?;
        Ok(Target {
            host: parse_host(host)?,
            ports,
            proto,
        })
    }
}

fn split_proto(text: &str) -> Result<(&str, u8), String> {
    if let Some((rest, suffix)) = text.rsplit_once('/')
        && suffix.chars().all(|c| c.is_ascii_alphabetic())
    {
        let proto = match suffix.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "any" => PROTO_ANY,
            other => return Err(format!("unknown protocol `{other}` (use tcp, udp or any)")),
        };
        return Ok((rest, proto));
    }
    Ok((text, PROTO_ANY))
}

fn split_port(text: &str) -> Result<(&str, Ports), String> {
    if let Some(inner) = text.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or("`[` without a closing `]` around an IPv6 address")?;
        return match after {
            "" => Ok((addr, Ports::ANY)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((addr, parse_ports(port)?)),
                None => Err(format!("unexpected `{after}` after `]` (expected `:PORT`)")),
            },
        };
    }
    // A bare IPv6 address or prefix has several colons and no port; a port
    // on IPv6 needs brackets.
    if text.matches(':').count() == 1 {
        let (host, port) = text.split_once(':').unwrap_or((text, ""));
        return Ok((host, parse_ports(port)?));
    }
    Ok((text, Ports::ANY))
}

fn parse_ports(text: &str) -> Result<Ports, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{p}` is not a port (1-65535)")),
            Ok(n) => Ok(n),
        }
    };
    if let Some((lo, hi)) = text.split_once('-') {
        let (lo, hi) = (port(lo)?, port(hi)?);
        if lo > hi {
            return Err(format!("port range {lo}-{hi} is backwards"));
        }
        return Ok(Ports { lo, hi });
    }
    let p = port(text)?;
    Ok(Ports { lo: p, hi: p })
}

fn parse_host(text: &str) -> Result<Host, String> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(Host::Net(normalize(IpNet::from(addr))));
    }
    if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("`{text}` is not an address prefix (like 10.0.0.0/8)"))?;
        if net.trunc() != net {
            return Err(format!(
                "`{text}` has host bits set below the prefix length; did you mean `{}`?",
                net.trunc()
            ));
        }
        return Ok(Host::Net(normalize(net)));
    }
    if let Some(suffix) = text.strip_prefix("*.") {
        return parse_name(suffix).map(Host::Wildcard);
    }
    parse_name(text).map(Host::Name)
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) reaches the IPv4 host, and the kernel
/// judges it by the IPv4 rules, so store it as IPv4.
fn normalize(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

fn parse_name(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.contains('*') {
        return Err(format!(
            "`{text}`: a wildcard must be a whole first label, as in `*.example.com`"
        ));
    }
    if name.is_empty() || name.len() > 253 {
        return Err(format!("`{text}` is not a valid host name"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(format!("`{text}` is not a valid host name or address"));
        }
    }
    if name
        .split('.')
        .all(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("`{text}` is not a valid IPv4 address"));
    }
    Ok(name)
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("any")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Host {
        Host::Net(s.parse().unwrap())
    }

    #[test]
    fn parses_every_documented_form() {
        let cases = [
            (
                "backboard.railway.app",
                Host::Name("backboard.railway.app".into()),
                Ports::ANY,
                PROTO_ANY,
            ),
            (
                "169.254.169.254",
                net("169.254.169.254/32"),
                Ports::ANY,
                PROTO_ANY,
            ),
            ("10.0.0.0/8", net("10.0.0.0/8"), Ports::ANY, PROTO_ANY),
            (
                "db.internal:5432",
                Host::Name("db.internal".into()),
                Ports { lo: 5432, hi: 5432 },
                PROTO_ANY,
            ),
            ("2001:db8::/32", net("2001:db8::/32"), Ports::ANY, PROTO_ANY),
            (
                "192.0.2.7:443/tcp",
                net("192.0.2.7/32"),
                Ports { lo: 443, hi: 443 },
                PROTO_TCP,
            ),
            (
                "[::1]:53/udp",
                net("::1/128"),
                Ports { lo: 53, hi: 53 },
                PROTO_UDP,
            ),
            (
                "[2001:db8::/32]:1000-2000",
                net("2001:db8::/32"),
                Ports { lo: 1000, hi: 2000 },
                PROTO_ANY,
            ),
            (
                "fd00:ec2::254",
                net("fd00:ec2::254/128"),
                Ports::ANY,
                PROTO_ANY,
            ),
            (
                "API.Example.COM.:443",
                Host::Name("api.example.com".into()),
                Ports { lo: 443, hi: 443 },
                PROTO_ANY,
            ),
        ];
        for (text, host, ports, proto) in cases {
            assert_eq!(
                Target::parse(text),
                Ok(Target { host, ports, proto }),
                "{text}"
            );
        }
    }

    #[test]
    fn wildcards_match_names_below_their_suffix_only() {
        let host = Target::parse("*.Railway.App.:443").unwrap().host;
        assert_eq!(host, Host::Wildcard("railway.app".into()));
        assert_eq!(host.name_key().as_deref(), Some("*.railway.app"));
        assert!(host.matches_name("backboard.railway.app"));
        assert!(host.matches_name("a.b.railway.app"));
        assert!(!host.matches_name("railway.app"));
        assert!(!host.matches_name("evilrailway.app"));
        assert!(!host.matches_name("railway.app.evil.com"));
        let exact = Host::Name("api.railway.app".into());
        assert!(exact.matches_name("api.railway.app"));
        assert!(!exact.matches_name("x.api.railway.app"));
    }

    #[test]
    fn ipv4_mapped_ipv6_becomes_ipv4() {
        assert_eq!(
            Target::parse("::ffff:10.1.2.3").unwrap().host,
            net("10.1.2.3/32")
        );
        assert_eq!(
            Target::parse("::ffff:10.0.0.0/104").unwrap().host,
            net("10.0.0.0/8")
        );
    }

    #[test]
    fn rejects_bad_entries_with_a_reason() {
        for (text, needle) in [
            ("", "empty"),
            ("host:0", "not a port"),
            ("host:70000", "not a port"),
            ("host:20-10", "backwards"),
            ("10.0.0.1/8", "host bits"),
            ("1.2.3.4.5", "not a valid IPv4"),
            ("999.1.1.1", "not a valid IPv4"),
            ("api.*.railway.app", "wildcard"),
            ("*railway.app", "wildcard"),
            ("*.*.railway.app", "wildcard"),
            ("host:443/sctp", "unknown protocol"),
            ("bad host", "not a valid host name"),
            ("[::1", "closing"),
            ("[::1]x", "unexpected"),
        ] {
            let err = Target::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
