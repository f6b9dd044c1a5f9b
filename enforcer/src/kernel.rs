//! Everything that talks to the kernel's BPF side: loading the embedded
//! object, attaching the cgroup programs, writing rule and session entries,
//! and reading counters. Nothing else in the controller calls aya.

use std::{fs::File, net::IpAddr, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use enforcer_common::{
    Counter, PROFILE_PREFIX_BITS, RuleList, Session, V4Key, V6Key, globals, maps,
};
use ipnet::IpNet;

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// The `cgroup_sock_addr` programs, named after the hooks they attach to.
pub const NET_PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading the kernel programs failed: {0}. The enforcer needs root (CAP_BPF and \
         CAP_NET_ADMIN) and a kernel with cgroup BPF (CONFIG_CGROUP_BPF)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("kernel program `{name}` failed to {what}: {source}")]
    Program {
        name: &'static str,
        what: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("kernel map `{name}` is missing from the object or has the wrong type: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("updating kernel map `{name}` failed: {source}")]
    MapUpdate {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path} to attach programs: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, KernelError>;

/// Where this controller's programs apply, fixed at load time.
pub struct Scope<'a> {
    /// The cgroup2 root the programs attach to, so they also see sockets
    /// created before a process joined its session.
    pub attach_cgroup: &'a Path,
    /// This controller instance's parent cgroup (id and depth); only tasks
    /// below it are judged.
    pub instance_cgroup_id: u64,
    pub instance_cgroup_level: i32,
    /// How many rule ids the loaded profiles use (sizes the hit counters).
    pub rule_count: u32,
}

/// The loaded and attached programs and handles to their maps. Dropping it
/// detaches the programs.
pub struct Kernel {
    ebpf: Ebpf,
    sessions: HashMap<MapData, u64, Session>,
    rules_v4: LpmTrie<MapData, V4Key, RuleList>,
    rules_v6: LpmTrie<MapData, V6Key, RuleList>,
    counters: PerCpuArray<MapData, u64>,
    rule_hits: PerCpuArray<MapData, u64>,
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MapType {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| KernelError::MapType { name, source })
}

impl Kernel {
    pub fn load(scope: &Scope<'_>) -> Result<Kernel> {
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::INSTANCE_CGROUP_ID, &scope.instance_cgroup_id, true)
            .override_global(
                globals::INSTANCE_CGROUP_LEVEL,
                &scope.instance_cgroup_level,
                true,
            )
            .map_max_entries(maps::RULE_HITS, scope.rule_count.max(1))
            .load(OBJECT)
            .map_err(KernelError::Load)?;
        let cgroup = File::open(scope.attach_cgroup).map_err(|source| KernelError::Cgroup {
            path: scope.attach_cgroup.display().to_string(),
            source,
        })?;
        for name in NET_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(KernelError::Program {
                    name,
                    what: "be found in the object",
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(|source| KernelError::Program {
                    name,
                    what: "load",
                    source,
                })?;
            program.load().map_err(|source| KernelError::Program {
                name,
                what: "load",
                source,
            })?;
            program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program {
                    name,
                    what: "attach",
                    source,
                })?;
        }
        Ok(Kernel {
            sessions: take_map(&mut ebpf, maps::SESSIONS)?,
            rules_v4: take_map(&mut ebpf, maps::NET_RULES_V4)?,
            rules_v6: take_map(&mut ebpf, maps::NET_RULES_V6)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            rule_hits: take_map(&mut ebpf, maps::RULE_HITS)?,
            ebpf,
        })
    }

    /// The ring buffer of denial events; taken once by the event reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        take_map(&mut self.ebpf, maps::EVENTS)
    }

    pub fn set_session(&mut self, cgroup_id: u64, session: Session) -> Result<()> {
        self.sessions
            .insert(cgroup_id, session, 0)
            .map_err(|source| KernelError::MapUpdate {
                name: maps::SESSIONS,
                source,
            })
    }

    pub fn remove_session(&mut self, cgroup_id: u64) -> Result<()> {
        match self.sessions.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(KernelError::MapUpdate {
                name: maps::SESSIONS,
                source,
            }),
        }
    }

    /// Write one profile's compiled entries under `profile_id`.
    pub fn insert_rules(&mut self, profile_id: u32, entries: &[(IpNet, RuleList)]) -> Result<()> {
        for (net, list) in entries {
            self.update_rule(profile_id, *net, Some(list))?;
        }
        Ok(())
    }

    /// Delete entries of `profile_id` for these prefixes.
    pub fn remove_rules(
        &mut self,
        profile_id: u32,
        prefixes: impl Iterator<Item = IpNet>,
    ) -> Result<()> {
        for net in prefixes {
            self.update_rule(profile_id, net, None)?;
        }
        Ok(())
    }

    fn update_rule(&mut self, profile_id: u32, net: IpNet, list: Option<&RuleList>) -> Result<()> {
        let profile = profile_id.to_be_bytes();
        let prefix = PROFILE_PREFIX_BITS + u32::from(net.prefix_len());
        let (name, result) = match net.addr() {
            IpAddr::V4(addr) => {
                let key = Key::new(
                    prefix,
                    V4Key {
                        profile,
                        addr: addr.octets(),
                    },
                );
                let r = match list {
                    Some(l) => self.rules_v4.insert(&key, l, 0),
                    None => self.rules_v4.remove(&key),
                };
                (maps::NET_RULES_V4, r)
            }
            IpAddr::V6(addr) => {
                let key = Key::new(
                    prefix,
                    V6Key {
                        profile,
                        addr: addr.octets(),
                    },
                );
                let r = match list {
                    Some(l) => self.rules_v6.insert(&key, l, 0),
                    None => self.rules_v6.remove(&key),
                };
                (maps::NET_RULES_V6, r)
            }
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) if list.is_none() => Ok(()),
            Ok(()) => Ok(()),
            Err(source) => Err(KernelError::MapUpdate { name, source }),
        }
    }

    /// A kernel counter summed over CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        sum_cpus(&self.counters, counter as u32)
    }

    /// Deny/audit decisions made by rule `rule_id`, summed over CPUs.
    pub fn rule_hits(&self, rule_id: u32) -> u64 {
        sum_cpus(&self.rule_hits, rule_id)
    }
}

fn sum_cpus(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map_or(0, |values| values.iter().sum())
}
