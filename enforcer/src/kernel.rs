//! Everything that talks to the kernel's BPF side: loading the embedded
//! object, attaching the cgroup programs, writing rule and session entries,
//! and reading counters. Nothing else in the controller calls aya.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, Lsm, links::FdLink},
};
use enforcer_common::{
    Counter, InodeKey, InodeRule, KernelOffsets, NAME_BYTES, NameKey, NameRule,
    PROFILE_PREFIX_BITS, RuleList, Session, V4Key, V6Key, globals, maps,
};

use crate::policy::files::Trie;
use ipnet::IpNet;

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// The BPF-LSM programs and their hooks, loaded and attached together:
/// those that guard
/// protected files, named after their hooks (opening them, and renaming or
/// hard-linking them, which would otherwise move a file out of a protected
/// directory), then the guards that keep a session from switching the
/// enforcer off (`enforcer-ebpf/src/guard.rs`).
pub const LSM_PROGRAMS: [(&str, &str); 17] = [
    ("file_open", "file_open"),
    ("inode_rename", "inode_rename"),
    ("inode_link", "inode_link"),
    ("guard_bpf", "bpf"),
    ("guard_ptrace", "ptrace_access_check"),
    ("guard_signal", "task_kill"),
    ("guard_clone", "task_alloc"),
    ("guard_socket_create", "socket_create"),
    ("guard_unix_connect", "unix_stream_connect"),
    ("guard_unix_send", "unix_may_send"),
    ("guard_unlink", "inode_unlink"),
    ("guard_rmdir", "inode_rmdir"),
    ("guard_create", "inode_create"),
    ("guard_mkdir", "inode_mkdir"),
    ("guard_mknod", "inode_mknod"),
    ("guard_symlink", "inode_symlink"),
    ("guard_umount", "sb_umount"),
];

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
    #[error("pinning {what} at {path} in the BPF filesystem: {source}")]
    Pin {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
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
    /// Pin maps and links here so enforcement outlives the process (the
    /// daemon); `None`: everything goes with the process (`enforcer run`).
    pub pins: Option<&'a Pins>,
}

/// Bumped whenever a map's layout changes: pins of another version are
/// never reused.
pub const PIN_VERSION: u32 = 1;

/// Every map the programs share, pinned by name so a restarted controller
/// (or a new version with the same layout) keeps the rules, sessions,
/// queued events and counters.
const PINNED_MAPS: [&str; 13] = [
    maps::SESSIONS,
    maps::NET_RULES_V4,
    maps::NET_RULES_V6,
    maps::FILE_INODES,
    maps::NAME_PREFIX,
    maps::NAME_SUFFIX,
    "NAME_SCRATCH",
    maps::DNS_ORIGINAL,
    maps::EVENTS,
    maps::COUNTERS,
    maps::RULE_HITS,
    maps::PROTECTED_SOCKETS,
    maps::ENFORCER_FILES,
];

/// Where the daemon pins what must outlive it, in the BPF filesystem:
/// `<root>/v<PIN_VERSION>/maps/<MAP>`, `.../links/<program>` (cgroup
/// programs) and `.../lsm-<fingerprint>/<program>` (LSM programs, named
/// after what they were loaded from: `lsm_fingerprint`).
///
/// A controller that finds the LSM links of its own fingerprint keeps them:
/// the programs in them are the ones it would load, on the same maps.
/// Otherwise (an upgrade) it attaches its own before it removes the others,
/// so the hooks are never left without a program. Keeping them matters:
/// every attach and detach rewrites the hook's trampoline, and hooks such as
/// `socket_create` and `file_open` are hot.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(root: &Path) -> Pins {
        Pins {
            root: root.to_owned(),
            dir: root.join(format!("v{PIN_VERSION}")),
        }
    }

    fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }

    /// Links of the cgroup programs: kept across controllers, their
    /// programs swapped in place.
    fn cgroup_links(&self) -> PathBuf {
        self.dir.join("links")
    }

    /// Links of the LSM programs loaded from what `fingerprint` names.
    fn lsm_links(&self, fingerprint: u64) -> PathBuf {
        self.dir.join(format!("lsm-{fingerprint:016x}"))
    }

    /// Whether maps are pinned here (a previous controller's).
    pub fn exist(&self) -> bool {
        self.maps().join(maps::SESSIONS).exists()
    }

    /// Remove every LSM link directory but `current`: their programs
    /// detach.
    fn remove_other_lsm_links(&self, current: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_links = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("lsm-"));
            if is_links && path != current {
                std::fs::remove_dir_all(&path)?;
            }
        }
        Ok(())
    }

    /// Remove every pin: the programs detach and the maps go once nothing
    /// holds them.
    pub fn remove_all(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => {
                // The root goes too unless another version's pins are there.
                let _ = std::fs::remove_dir(&self.root);
                Ok(())
            }
        }
    }

    /// The pinned sessions map, read without loading anything: cgroup ids
    /// of the sessions the pins enforce.
    pub fn pinned_sessions(&self) -> Result<Vec<u64>> {
        let path = self.maps().join(maps::SESSIONS);
        let data = MapData::from_pin(&path).map_err(|source| KernelError::MapType {
            name: maps::SESSIONS,
            source,
        })?;
        let map: HashMap<MapData, u64, Session> = HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|source| KernelError::MapType {
                name: maps::SESSIONS,
                source,
            })?;
        Ok(map.keys().filter_map(std::result::Result::ok).collect())
    }
}

/// Mount the BPF filesystem at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> std::io::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf "));
    if mounted {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "`mount -t bpf bpf /sys/fs/bpf` failed: mount the BPF filesystem there",
        ))
    }
}

/// What the LSM programs are loaded from: the object and the globals set
/// at load time. Equal fingerprints mean the same programs on the same maps.
fn lsm_fingerprint(
    object: &[u8],
    instance_cgroup_id: u64,
    level: i32,
    offsets: &KernelOffsets,
) -> u64 {
    // FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
    let globals = format!("{instance_cgroup_id}/{level}/{offsets:?}");
    object
        .iter()
        .chain(globals.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Whether `dir` holds a link for every LSM program.
fn all_lsm_links_pinned(dir: &Path) -> bool {
    LSM_PROGRAMS.iter().all(|(name, _)| dir.join(name).exists())
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
    sockets: HashMap<MapData, InodeKey, u32>,
    enforcer_files: HashMap<MapData, InodeKey, u32>,
    inodes: HashMap<MapData, InodeKey, InodeRule>,
    name_prefix: LpmTrie<MapData, NameKey, NameRule>,
    name_suffix: LpmTrie<MapData, NameKey, NameRule>,
    /// Whether file rules are enforced, or why not.
    pub file_enforcement: std::result::Result<(), String>,
    /// Links of the attached programs when they are not pinned: dropping
    /// them detaches the programs.
    links: Vec<FdLink>,
    pins: Option<Pins>,
    /// Where the LSM links are pinned (with `pins`), and whether a previous
    /// controller's links there are kept (nothing of ours to attach).
    lsm_links: Option<PathBuf>,
    lsm_links_kept: bool,
    attach_cgroup: PathBuf,
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
        let lsm_links = scope.pins.map(|pins| {
            pins.lsm_links(lsm_fingerprint(
                OBJECT,
                scope.instance_cgroup_id,
                scope.instance_cgroup_level,
                &offsets,
            ))
        });
        let lsm_links_kept =
            scope.offsets.is_ok() && lsm_links.as_deref().is_some_and(all_lsm_links_pinned);
        let pin_paths: Vec<(&str, PathBuf)> = match (scope.pins, &lsm_links) {
            (Some(pins), Some(lsm_links)) => {
                if !lsm_links_kept {
                    // Links left by a start that failed half-way; those of
                    // other fingerprints stay until we are up.
                    let _ = std::fs::remove_dir_all(lsm_links);
                }
                for dir in [pins.maps(), pins.cgroup_links()] {
                    std::fs::create_dir_all(&dir).map_err(|source| KernelError::Pin {
                        what: "a directory".into(),
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
                PINNED_MAPS
                    .iter()
                    .map(|name| (*name, pins.maps().join(name)))
                    .collect()
            }
            _ => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
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
        for name in NET_PROGRAMS {
            cgroup_program(&mut ebpf, name)?
                .load()
                .map_err(|source| KernelError::Program {
                    name,
                    what: "load",
                    source,
                })?;
        }
        let file_enforcement = match &scope.offsets {
            Ok(_) if lsm_links_kept => Ok(()),
            Ok(_) => load_file_programs(&mut ebpf),
            Err(why) => Err(why.clone()),
        };
        Ok(Kernel {
            links: Vec::new(),
            pins: scope.pins.cloned(),
            lsm_links,
            lsm_links_kept,
            attach_cgroup: scope.attach_cgroup.to_owned(),
            file_enforcement,
            inodes: take_map(&mut ebpf, maps::FILE_INODES)?,
            name_prefix: take_map(&mut ebpf, maps::NAME_PREFIX)?,
            name_suffix: take_map(&mut ebpf, maps::NAME_SUFFIX)?,
            sessions: take_map(&mut ebpf, maps::SESSIONS)?,
            rules_v4: take_map(&mut ebpf, maps::NET_RULES_V4)?,
            rules_v6: take_map(&mut ebpf, maps::NET_RULES_V6)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            rule_hits: take_map(&mut ebpf, maps::RULE_HITS)?,
            sockets: take_map(&mut ebpf, maps::PROTECTED_SOCKETS)?,
            enforcer_files: take_map(&mut ebpf, maps::ENFORCER_FILES)?,
            ebpf,
        })
    }

    /// Attach the loaded programs. A cgroup program whose link a previous
    /// controller pinned takes that link over: the program inside it is
    /// swapped atomically (`BPF_LINK_UPDATE`), so no connect is judged by
    /// neither program or by both. The LSM programs (LSM links cannot be
    /// updated) keep the links of the same programs or get new ones, and then
    /// the links of any other programs go (see `Pins`).
    pub fn attach(&mut self) -> Result<()> {
        let cgroup = File::open(&self.attach_cgroup).map_err(|source| KernelError::Cgroup {
            path: self.attach_cgroup.display().to_string(),
            source,
        })?;
        for name in NET_PROGRAMS {
            let pins = self.pins.clone();
            let program = cgroup_program(&mut self.ebpf, name)?;
            let program_error = |what, source| KernelError::Program { name, what, source };
            if let Some(pins) = &pins {
                let pinned = pins.cgroup_links().join(name);
                if pinned.exists() {
                    let fd = program
                        .fd()
                        .map_err(|e| program_error("be loaded", e))?
                        .as_fd()
                        .as_raw_fd();
                    update_pinned_link(&pinned, fd).map_err(|source| KernelError::Pin {
                        what: format!("a new `{name}` program into its pinned link"),
                        path: pinned.display().to_string(),
                        source,
                    })?;
                    continue;
                }
            }
            let link = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .and_then(|id| program.take_link(id))
                .map_err(|e| program_error("attach", e))?;
            let link = FdLink::try_from(link).map_err(|e| {
                program_error(
                    "attach with a BPF link (kernel 5.7 or later)",
                    aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_link_create",
                        io_error: std::io::Error::other(e),
                    }),
                )
            })?;
            let pin_at = pins.as_ref().map(|p| p.cgroup_links().join(name));
            self.links.extend(hold_link(pin_at.as_deref(), name, link)?);
        }
        if self.file_enforcement.is_ok() && !self.lsm_links_kept {
            let links =
                attach_file_programs(&mut self.ebpf, self.lsm_links.as_deref()).map_err(|why| {
                    KernelError::Pin {
                        what: "the LSM programs".into(),
                        path: String::new(),
                        source: std::io::Error::other(why),
                    }
                })?;
            self.links.extend(links);
        }
        // Only once ours are in place: a daemon that cannot load the LSM
        // programs leaves a predecessor's attached (they use the same pinned
        // maps) rather than remove file enforcement it cannot replace.
        if let (Some(pins), Some(current), Ok(())) =
            (&self.pins, &self.lsm_links, &self.file_enforcement)
        {
            pins.remove_other_lsm_links(current)
                .map_err(|source| KernelError::Pin {
                    what: "the previous controller's LSM links (removing them)".into(),
                    path: pins.dir.display().to_string(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Whether the LSM programs are a previous controller's, kept.
    pub fn lsm_links_kept(&self) -> bool {
        self.lsm_links_kept
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

    /// Remove what a previous controller left in the pinned maps and
    /// nothing now uses: sessions not in `sessions`, network and protected
    /// socket entries of profile ids not in `profiles`, file entries of
    /// policies not in `policies`. Returns how many entries went.
    pub fn retain(
        &mut self,
        sessions: &std::collections::HashSet<u64>,
        profiles: &std::collections::HashSet<u32>,
        policies: &std::collections::HashSet<u32>,
    ) -> Result<usize> {
        let mut removed = 0;
        let stale: Vec<u64> = self
            .sessions
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|id| !sessions.contains(id))
            .collect();
        for id in stale {
            self.remove_session(id)?;
            removed += 1;
        }
        let stale_v4: Vec<Key<V4Key>> = self
            .rules_v4
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !profiles.contains(&u32::from_be_bytes(k.data().profile)))
            .collect();
        for key in stale_v4 {
            removed += usize::from(self.rules_v4.remove(&key).is_ok());
        }
        let stale_v6: Vec<Key<V6Key>> = self
            .rules_v6
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !profiles.contains(&u32::from_be_bytes(k.data().profile)))
            .collect();
        for key in stale_v6 {
            removed += usize::from(self.rules_v6.remove(&key).is_ok());
        }
        let stale_inodes: Vec<InodeKey> = self
            .inodes
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !policies.contains(&k.policy))
            .collect();
        for key in stale_inodes {
            self.remove_inode(&key)?;
            removed += 1;
        }
        let stale_sockets: Vec<InodeKey> = self
            .sockets
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !profiles.contains(&k.policy))
            .collect();
        for key in stale_sockets {
            self.set_protected_socket(key, None)?;
            removed += 1;
        }
        for trie in [&mut self.name_prefix, &mut self.name_suffix] {
            let stale: Vec<Key<NameKey>> = trie
                .keys()
                .filter_map(std::result::Result::ok)
                .filter(|k| !policies.contains(&(k.data().scope >> 16)))
                .collect();
            for key in stale {
                removed += usize::from(trie.remove(&key).is_ok());
            }
        }
        Ok(removed)
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

    /// Protect (or, with `None`, stop protecting) a Unix socket file for
    /// the sessions of a profile; `key.policy` is the profile id.
    pub fn set_protected_socket(&mut self, key: InodeKey, index: Option<u32>) -> Result<()> {
        let result = match index {
            Some(index) => self.sockets.insert(key, index, 0),
            None => match self.sockets.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        };
        result.map_err(|source| KernelError::MapUpdate {
            name: maps::PROTECTED_SOCKETS,
            source,
        })
    }

    /// Replace the set of the enforcer's own files (device, inode) that no
    /// session may change.
    pub fn set_enforcer_files(&mut self, files: &[(u32, u64)]) -> Result<()> {
        let error = |source| KernelError::MapUpdate {
            name: maps::ENFORCER_FILES,
            source,
        };
        let wanted: Vec<InodeKey> = files
            .iter()
            .map(|&(dev, ino)| InodeKey {
                policy: 0,
                dev,
                ino,
            })
            .collect();
        for key in &wanted {
            self.enforcer_files.insert(key, 0, 0).map_err(error)?;
        }
        let stale: Vec<InodeKey> = self
            .enforcer_files
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            match self.enforcer_files.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(error(e)),
            }
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
fn load_file_programs(ebpf: &mut Ebpf) -> std::result::Result<(), String> {
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
    for (name, hook) in LSM_PROGRAMS {
        lsm_program(ebpf, name)?
            .load(hook, &btf)
            .map_err(|e| lsm_refused(name, "load", &error_chain(&e), active.as_deref()))?;
    }
    Ok(())
}

/// Attach the loaded file programs, pinning their links in `pin_dir` or
/// returning them to be held.
fn attach_file_programs(
    ebpf: &mut Ebpf,
    pin_dir: Option<&Path>,
) -> std::result::Result<Vec<FdLink>, String> {
    if let Some(dir) = pin_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating the directory {}: {e}", dir.display()))?;
    }
    let mut links = Vec::new();
    for (name, _) in LSM_PROGRAMS {
        let program = lsm_program(ebpf, name)?;
        let link = program
            .attach()
            .and_then(|id| program.take_link(id))
            .map_err(|e| lsm_refused(name, "attach", &error_chain(&e), active_lsms().as_deref()))?;
        let pin_at = pin_dir.map(|d| d.join(name));
        links.extend(hold_link(pin_at.as_deref(), name, link.into()).map_err(|e| e.to_string())?);
    }
    Ok(links)
}

fn lsm_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> std::result::Result<&'a mut Lsm, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the kernel object has no `{name}` program"))?
        .try_into()
        .map_err(|e| format!("`{name}` is not an LSM program: {e}"))
}

fn lsm_refused(name: &str, what: &str, error: &str, active: Option<&str>) -> String {
    format!(
        "the kernel refused to {what} the BPF LSM program `{name}` ({error}){}: file rules \
         and the session guards need a kernel with CONFIG_BPF_LSM=y booted with `bpf` in `lsm=`",
        match active {
            Some(list) => format!("; the LSM list is `{list}`"),
            None => String::new(),
        }
    )
}

fn cgroup_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
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
        })
}

/// `bpf()` commands aya 0.14 does not wrap (numbers from the kernel's
/// `enum bpf_cmd`, a stable ABI).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Swap `program` into the link pinned at `path`, atomically.
fn update_pinned_link(path: &Path, program: std::os::fd::RawFd) -> std::io::Result<()> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let get = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a valid attr of the size passed; the path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const get,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let link = unsafe {
        std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).map_err(std::io::Error::other)?)
    };
    let update = LinkUpdate {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(std::io::Error::other)?,
        new_prog_fd: u32::try_from(program).map_err(std::io::Error::other)?,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: as above.
    let done = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const update,
            size_of::<LinkUpdate>(),
        )
    };
    if done < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Keep an attached program's link alive: pinned at `pin_at` when
/// enforcement must outlive this process (nothing to hold then), otherwise
/// returned for the `Kernel` to hold for its life.
fn hold_link(pin_at: Option<&Path>, name: &str, link: FdLink) -> Result<Option<FdLink>> {
    let Some(path) = pin_at else {
        return Ok(Some(link));
    };
    link.pin(path).map_err(|e| KernelError::Pin {
        what: format!("the link of program `{name}`"),
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(None)
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
    load_file_programs(&mut ebpf)?;
    attach_file_programs(&mut ebpf, None).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lsm_fingerprint_names_the_object_and_every_global() {
        let offsets = KernelOffsets::default();
        let base = lsm_fingerprint(b"object", 7, 2, &offsets);
        assert_eq!(base, lsm_fingerprint(b"object", 7, 2, &offsets));
        let moved = KernelOffsets {
            super_block_s_magic: offsets.super_block_s_magic + 8,
            ..offsets
        };
        for other in [
            lsm_fingerprint(b"objecT", 7, 2, &offsets),
            lsm_fingerprint(b"object", 8, 2, &offsets),
            lsm_fingerprint(b"object", 7, 3, &offsets),
            lsm_fingerprint(b"object", 7, 2, &moved),
        ] {
            assert_ne!(base, other);
        }
    }
}
