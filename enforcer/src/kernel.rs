//! Everything that talks to the kernel's BPF side: loading the embedded
//! object, attaching the cgroup programs, writing rule and session entries,
//! and reading counters. Nothing else in the controller calls aya.

use std::{fs::File, net::IpAddr, path::Path};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, Lsm},
};
use enforcer_common::{
    Counter, InodeKey, InodeRule, KernelOffsets, NAME_BYTES, NameKey, NameRule,
    PROFILE_PREFIX_BITS, RuleList, Session, V4Key, V6Key, globals, maps,
};

use crate::policy::files::Trie;
use ipnet::IpNet;

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// The LSM programs that guard protected files, named after their hooks:
/// opening them, and renaming or hard-linking them (which would otherwise
/// move a file out of a protected directory).
pub const FILE_PROGRAMS: [&str; 3] = ["file_open", "inode_rename", "inode_link"];

/// Entries of `FILE_INODES` (files and directories named by file rules,
/// over all live file policies).
const MAX_FILE_INODES: u32 = 1 << 16;

/// The `cgroup_sock_addr` programs, named after the hooks they attach to.
pub const NET_PROGRAMS: [&str; 6] = [
    "connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6",
];

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
    /// Kernel struct offsets for the file program, or why they are unknown.
    pub offsets: std::result::Result<KernelOffsets, String>,
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
    inodes: HashMap<MapData, InodeKey, InodeRule>,
    name_prefix: LpmTrie<MapData, NameKey, NameRule>,
    name_suffix: LpmTrie<MapData, NameKey, NameRule>,
    /// Whether file rules are enforced, or why not.
    pub file_enforcement: std::result::Result<(), String>,
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
        let offsets = scope.offsets.clone().unwrap_or_default();
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::INSTANCE_CGROUP_ID, &scope.instance_cgroup_id, true)
            .override_global(
                globals::INSTANCE_CGROUP_LEVEL,
                &scope.instance_cgroup_level,
                true,
            )
            .override_global(globals::KERNEL_OFFSETS, &offsets, true)
            .map_max_entries(maps::RULE_HITS, rule_hit_capacity(scope.rule_count))
            .map_max_entries(maps::FILE_INODES, MAX_FILE_INODES)
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
        let file_enforcement = match &scope.offsets {
            Ok(_) => attach_file_program(&mut ebpf),
            Err(why) => Err(why.clone()),
        };
        Ok(Kernel {
            file_enforcement,
            inodes: take_map(&mut ebpf, maps::FILE_INODES)?,
            name_prefix: take_map(&mut ebpf, maps::NAME_PREFIX)?,
            name_suffix: take_map(&mut ebpf, maps::NAME_SUFFIX)?,
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

    /// Write the entry of `profile_id` for this prefix.
    pub fn set_rule(&mut self, profile_id: u32, net: IpNet, list: &RuleList) -> Result<()> {
        self.update_rule(profile_id, net, Some(list))
    }

    /// Delete the entry of `profile_id` for this prefix.
    pub fn remove_rule(&mut self, profile_id: u32, net: IpNet) -> Result<()> {
        self.update_rule(profile_id, net, None)
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

    pub fn remove_inode(&mut self, key: &InodeKey) -> Result<()> {
        match self.inodes.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(KernelError::MapUpdate {
                name: maps::FILE_INODES,
                source,
            }),
        }
    }

    pub fn remove_name(&mut self, trie: Trie, scope: u32, bytes: &[u8]) -> Result<()> {
        let key = name_key(scope, bytes);
        let (map, name) = match trie {
            Trie::Prefix => (&mut self.name_prefix, maps::NAME_PREFIX),
            Trie::Suffix => (&mut self.name_suffix, maps::NAME_SUFFIX),
        };
        match map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(KernelError::MapUpdate { name, source }),
        }
    }

    /// How many rule ids the hit counters have room for.
    pub fn rule_hit_capacity(&self) -> u32 {
        self.rule_hits.len()
    }

    /// Zero the hit counters of rule ids `0..count` (a reload renumbers
    /// the rules).
    pub fn reset_rule_hits(&mut self, count: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1));
        for index in 0..count.min(self.rule_hits.len()) {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).map_err(|source| {
                KernelError::MapUpdate {
                    name: maps::RULE_HITS,
                    source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "nr_cpus",
                        io_error: source,
                    }),
                }
            })?;
            self.rule_hits
                .set(index, zeros, 0)
                .map_err(|source| KernelError::MapUpdate {
                    name: maps::RULE_HITS,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn set_inode(&mut self, key: InodeKey, rule: InodeRule) -> Result<()> {
        self.inodes
            .insert(key, rule, 0)
            .map_err(|source| KernelError::MapUpdate {
                name: maps::FILE_INODES,
                source,
            })
    }

    pub fn set_name(&mut self, trie: Trie, scope: u32, bytes: &[u8], rule: NameRule) -> Result<()> {
        let key = name_key(scope, bytes);
        let (map, name) = match trie {
            Trie::Prefix => (&mut self.name_prefix, maps::NAME_PREFIX),
            Trie::Suffix => (&mut self.name_suffix, maps::NAME_SUFFIX),
        };
        map.insert(&key, rule, 0)
            .map_err(|source| KernelError::MapUpdate { name, source })
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

fn name_key(scope: u32, bytes: &[u8]) -> Key<NameKey> {
    let mut name = [0u8; NAME_BYTES];
    let len = bytes.len().min(NAME_BYTES);
    name[..len].copy_from_slice(&bytes[..len]);
    let bits = u32::try_from(len * 8).unwrap_or(0);
    Key::new(32 + bits, NameKey { scope, name })
}

/// Room in the hit counters for the loaded rules, with headroom so a reload
/// may add rules.
fn rule_hit_capacity(rule_count: u32) -> u32 {
    rule_count.saturating_mul(2).max(4096)
}

fn sum_cpus(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map_or(0, |values| values.iter().sum())
}

/// Whether BPF LSM is active: the LSM list from securityfs (mounted if it
/// is not), then the real test, loading and attaching the `file_open`
/// program. Returns why not, with what to do.
fn attach_file_program(ebpf: &mut Ebpf) -> std::result::Result<(), String> {
    let active = active_lsms();
    if let Some(list) = &active
        && !list.split(',').any(|l| l == "bpf")
    {
        return Err(format!(
            "BPF LSM is not active on this kernel (active LSMs: {list}): add `bpf` to the `lsm=` \
             boot parameter, e.g. `lsm={list},bpf`, and reboot"
        ));
    }
    let btf = Btf::from_sys_fs().map_err(|e| {
        format!("reading kernel BTF (/sys/kernel/btf/vmlinux) failed: {e}; the kernel needs CONFIG_DEBUG_INFO_BTF=y")
    })?;
    for name in FILE_PROGRAMS {
        let program: &mut Lsm = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the kernel object has no `{name}` program"))?
            .try_into()
            .map_err(|e| format!("`{name}` is not an LSM program: {e}"))?;
        let refused = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "the kernel refused to {what} the BPF LSM program `{name}` ({e}){}: file rules \
                 need a kernel with CONFIG_BPF_LSM=y booted with `bpf` in `lsm=`",
                match &active {
                    Some(list) => format!("; the LSM list is `{list}`"),
                    None => String::new(),
                }
            )
        };
        program
            .load(name, &btf)
            .map_err(|e| refused("load", &error_chain(&e)))?;
        program
            .attach()
            .map_err(|e| refused("attach", &error_chain(&e)))?;
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The active LSM list, mounting securityfs first if needed.
pub fn active_lsms() -> Option<String> {
    const LSM: &str = "/sys/kernel/security/lsm";
    if !Path::new(LSM).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "securityfs", "securityfs", "/sys/kernel/security"])
            .status();
    }
    std::fs::read_to_string(LSM)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Load the object and attach the file programs for an instance cgroup id
/// no cgroup has (so it judges nothing), then detach: whether file rules can
/// be enforced here. The id must not be 0: the verifier treats read-only
/// globals as constants, and with 0 it would prune the whole program and
/// accept what the real load could refuse.
pub fn probe_file_enforcement() -> std::result::Result<(), String> {
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::INSTANCE_CGROUP_ID, &u64::MAX, true)
        .map_max_entries(maps::FILE_INODES, 1)
        .load(OBJECT)
        .map_err(|e| format!("loading the kernel object failed: {}", error_chain(&e)))?;
    attach_file_program(&mut ebpf)
}
