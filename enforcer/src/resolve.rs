//! Resolving the host names in rules, with their DNS TTLs, so the controller
//! can re-resolve each name when its answer expires.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result};
use hickory_resolver::{
    TokioAsyncResolver,
    config::{NameServerConfigGroup, ResolverConfig, ResolverOpts},
    error::ResolveErrorKind,
};
use tokio::time::Instant;

/// Answers are re-resolved no sooner than this, whatever their TTL says, so
/// a zero TTL cannot make the controller query in a loop.
pub const MIN_REFRESH: Duration = Duration::from_secs(2);
/// A name that failed to resolve is tried again after this long.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Addresses(Vec<IpAddr>),
    /// The name exists nowhere (NXDOMAIN) or has no A/AAAA records.
    NoSuchHost,
    /// The resolver could not answer (timeout, unreachable, SERVFAIL).
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct Resolution {
    pub answer: Answer,
    /// When to ask again.
    pub refresh_at: Instant,
}

/// The first DNS server in the system's configuration (/etc/resolv.conf),
/// where session proxies forward queries unless told otherwise.
pub fn system_upstream() -> Option<SocketAddr> {
    let (config, _) = hickory_resolver::system_conf::read_system_conf().ok()?;
    config.name_servers().first().map(|ns| ns.socket_addr)
}

pub struct Resolver {
    inner: TokioAsyncResolver,
}

impl Resolver {
    /// The system's resolver (`/etc/resolv.conf`, `/etc/hosts`), or a given
    /// upstream server.
    pub fn new(upstream: Option<SocketAddr>) -> Result<Resolver> {
        let (config, mut opts) = match upstream {
            Some(addr) => (
                ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
                ),
                ResolverOpts::default(),
            ),
            None => hickory_resolver::system_conf::read_system_conf()
                .context("reading the system resolver configuration (/etc/resolv.conf)")?,
        };
        // Rule loading waits for answers; keep a dead resolver from holding
        // an agent's start for long.
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        opts.use_hosts_file = true;
        Ok(Resolver {
            inner: TokioAsyncResolver::tokio(config, opts),
        })
    }

    pub async fn resolve(&self, name: &str) -> Resolution {
        // A trailing dot: never apply search domains to rule names.
        let fqdn = format!("{name}.");
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                addrs.sort();
                addrs.dedup();
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                Resolution {
                    answer: if addrs.is_empty() {
                        Answer::NoSuchHost
                    } else {
                        Answer::Addresses(addrs)
                    },
                    refresh_at: Instant::now() + ttl.max(MIN_REFRESH),
                }
            }
            Err(e) => Resolution {
                answer: match e.kind() {
                    ResolveErrorKind::NoRecordsFound { .. } => Answer::NoSuchHost,
                    _ => Answer::Failed(e.to_string()),
                },
                refresh_at: Instant::now() + RETRY_AFTER_FAILURE,
            },
        }
    }

    /// Resolve many names at once.
    pub async fn resolve_all<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> BTreeMap<String, Resolution> {
        let mut tasks = tokio::task::JoinSet::new();
        for name in names {
            let name = name.to_owned();
            let inner = self.inner.clone();
            tasks.spawn(async move {
                let r = Resolver { inner }.resolve(&name).await;
                (name, r)
            });
        }
        let mut out = BTreeMap::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((name, resolution)) = joined {
                out.insert(name, resolution);
            }
        }
        out
    }
}
