//! The controller: owns the loaded programs, installs profiles into the
//! kernel maps, creates and ends sessions, turns kernel events into log
//! records, and keeps host-name rules current as their DNS answers expire.
//! The daemon and the embedded controller of `enforcer run` are both this.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{MapData, RingBuf};
use enforcer_common::{
    ACCESS_LINK, ACCESS_RENAME, Counter, DETAIL_CLONE_INTO_CGROUP, EVENT_FILE, EVENT_GUARD,
    EVENT_NET, FileEvent, GUARD_BPF, GUARD_CGROUP, GUARD_LOCAL_SOCKET, GUARD_PTRACE,
    GUARD_RAW_SOCKET, GUARD_SIGNAL, GUARDS_ALWAYS, GuardEvent, InodeKey, NO_RULE, NameRule,
    NetEvent, OP_CONNECT, PROTO_TCP, PROTO_UDP, RuleList, SESSION_AUDIT, SESSION_DEFAULT_DENY,
    SESSION_GUARD_ALLOW_SHIFT, Session, VERDICT_AUDIT,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::{
    cgroup::{self, Hierarchy},
    dns::{
        learned::Learned,
        names::{self, NameVerdict},
        proxy::{Found, Proxy, SessionRef, Stats, StatsSnapshot},
    },
    kernel::{self, Kernel, Pins, Scope},
    log,
    persist::{Persist, Saved, SavedSession},
    policy::{Action, Mode, Profile, ProfileSet, compile, files, guard, target::Host},
    resolve::{Answer, Resolution, Resolver},
};

pub struct Config {
    pub rules_dir: PathBuf,
    pub log: PathBuf,
    /// Use this DNS server instead of the system's for host-name rules.
    pub resolver: Option<SocketAddr>,
    /// `daemon` or `run`; names the instance cgroup.
    pub kind: &'static str,
    /// Install only these profiles (an embedded controller needs one);
    /// `None` installs every profile.
    pub only_profiles: Option<Vec<String>>,
    /// Pin enforcement so it outlives this process, and adopt what a
    /// previous one left (the daemon); `None`: enforcement ends with it.
    pub persist: Option<Persist>,
    /// Addresses learned from DNS answers stay at least this long, however
    /// short the answer's TTL.
    pub dns_ttl_floor: Duration,
    /// At most this many learned (address, rule) entries over all profiles.
    pub dns_learned_max: usize,
}

/// Where a session lives, handed to whoever starts the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Grant {
    pub name: String,
    pub profile: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub audit: bool,
    /// Why the profile's file rules are not enforced in this session, when
    /// the user allowed a degraded session.
    pub degraded: Option<String>,
}

struct Installed {
    id: u32,
    first_rule_id: u32,
    resolutions: BTreeMap<String, Resolution>,
    /// The kernel entries in force for this profile, each by a digest of
    /// its rule list (a list is 196 bytes; 100 000 of them would be 20 MB).
    entries: HashMap<IpNet, u64>,
    /// The Unix sockets its sessions may not connect to (`PROTECTED_SOCKETS`).
    sockets: Vec<InodeKey>,
}

struct RuleInfo {
    profile: String,
    rule: log::RuleRef,
    host: Option<String>,
}

struct LiveSession {
    grant: Grant,
    /// As asked when the session opened, to judge it again after a reload.
    uid: u32,
    forced_audit: bool,
    allow_degraded: bool,
    /// Serves the session's steered DNS queries; stops when dropped.
    proxy: Proxy,
    /// False once the `enforcer run` that asked for it has gone: the session
    /// ends when its cgroup empties.
    attached: bool,
    started: String,
}

/// One installed file policy and the kernel entries it wrote.
struct FilePolicy {
    id: u32,
    inodes: Vec<InodeKey>,
    names: Vec<(files::Trie, u32, Vec<u8>)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub at: String,
    /// `None`: the new rules are in force; otherwise why the reload failed
    /// (the rules in force before it stay in force).
    pub error: Option<String>,
}

struct State {
    kernel: Kernel,
    profiles: ProfileSet,
    installed: BTreeMap<String, Installed>,
    /// Indexed by rule id.
    rules: Vec<RuleInfo>,
    sessions: BTreeMap<u64, LiveSession>,
    log: log::Writer,
    instance_dir: PathBuf,
    next_session: u64,
    kind: &'static str,
    /// File policy per (profile, home directory): `~` in file rules is
    /// the home of the user the agent runs as.
    file_policies: BTreeMap<(String, PathBuf), FilePolicy>,
    /// Ids for the next installed profile and file policy: a reload installs
    /// the new rules under fresh ids beside the old, then flips sessions.
    next_profile_id: u32,
    next_file_policy: u32,
    rules_dir: PathBuf,
    only_profiles: Option<Vec<String>>,
    last_reload: Option<ReloadStatus>,
    /// Pins and state file of a persisting controller (the daemon).
    pins: Option<Pins>,
    saved_to: Option<PathBuf>,
    learned: Learned,
    dns_ttl_floor: Duration,
    /// Where session proxies forward queries; `None`: nowhere (SERVFAIL).
    dns_upstream: Option<SocketAddr>,
    /// Control sockets no session may connect to, whatever its profile.
    control_sockets: Vec<PathBuf>,
    /// Paths of protected sockets by (device, inode), for the log.
    socket_names: HashMap<(u32, u64), String>,
}

#[derive(Clone)]
pub struct Controller {
    state: Arc<Mutex<State>>,
    /// Locked before `state` whenever both are needed.
    events: Arc<Mutex<RingBuf<MapData>>>,
    resolver: Arc<Resolver>,
    dns_stats: Arc<Stats>,
    /// Reloads run one at a time.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
    /// `enforcer stop` asked the daemon to exit.
    stop: Arc<tokio::sync::Notify>,
}

/// Where this controller's sessions live and what it pins: for a
/// persisting controller that finds its predecessor's pins and state, the
/// same instance cgroup (the programs' globals name it, so the same build
/// keeps the pinned LSM programs).
fn place_instance(config: &Config, root: &Path) -> Result<(Option<Saved>, PathBuf, Option<Pins>)> {
    cgroup::create_dir(root)?;
    let saved = match &config.persist {
        Some(persist) => {
            kernel::ensure_bpffs()
                .context("enforcement that outlives the daemon needs the BPF filesystem")?;
            let pins = Pins::new(&persist.pin_root);
            let saved = Saved::read(&persist.state_file)?;
            if pins.exist() && saved.is_none() {
                bail!(
                    "{} holds a previous daemon's pinned enforcement, but its state file {} is \
                     missing, so its sessions cannot be adopted; remove it with `enforcer stop \
                     --unload --force --pin-dir {}` (this kills the agents it enforces)",
                    pins.dir.display(),
                    persist.state_file.display(),
                    persist.pin_root.display()
                );
            }
            saved.filter(|s| pins.exist() && s.instance_dir.is_dir())
        }
        None => None,
    };
    let instance_dir = saved.as_ref().map_or_else(
        || root.join(format!("{}-{}", config.kind, std::process::id())),
        |s| s.instance_dir.clone(),
    );
    sweep_stale_instances(root, &instance_dir);
    cgroup::create_dir(&instance_dir)?;
    let pins = config.persist.as_ref().map(|p| Pins::new(&p.pin_root));
    Ok((saved, instance_dir, pins))
}

/// Remove what a daemon that is gone left pinned: refused while its
/// sessions still have processes unless `force`, which kills them.
pub fn unload_orphaned(persist: &Persist, force: bool) -> Result<()> {
    let pins = Pins::new(&persist.pin_root);
    let saved = Saved::read(&persist.state_file)?.unwrap_or_default();
    let live: Vec<&SavedSession> = saved
        .sessions
        .iter()
        .filter(|s| cgroup::populated(&s.cgroup).unwrap_or(false))
        .collect();
    if !live.is_empty() {
        let names: Vec<&str> = live.iter().map(|s| s.name.as_str()).collect();
        if !force {
            bail!(
                "{} session(s) still run agents ({}): unloading would leave them unprotected; end \
                 them first, or add --force to kill them",
                live.len(),
                names.join(", ")
            );
        }
        for session in &live {
            cgroup::kill_all(&session.cgroup)?;
        }
    }
    if pins.exist() && live.is_empty() && saved.sessions.is_empty() {
        let pinned = pins.pinned_sessions()?;
        if !pinned.is_empty() && !force {
            bail!(
                "the pins in {} enforce {} session(s) this daemon's state does not know; add \
                 --force to remove them anyway",
                pins.dir.display(),
                pinned.len()
            );
        }
    }
    pins.remove_all()
        .with_context(|| format!("removing the pins in {}", pins.dir.display()))?;
    Saved::remove(&persist.state_file)?;
    if saved.instance_dir.is_dir() {
        let _ = cgroup::remove_tree(&saved.instance_dir);
    }
    Ok(())
}

/// Events moved into the log per hold of the state lock.
const DRAIN_BATCH: usize = 1024;
/// Batches a synchronous `drain_events` moves at most (the event reader
/// takes the rest).
const DRAIN_BATCHES: usize = 256;

/// The root of every enforcer instance cgroup.
pub fn enforcer_root(hierarchy: &Hierarchy) -> PathBuf {
    hierarchy.mount.join("enforcer")
}

impl Controller {
    /// Load the rules, the kernel programs and the profiles, and start the
    /// background tasks. Fails, changing nothing, if any rule file is bad.
    pub async fn start(config: Config) -> Result<Controller> {
        let profiles = ProfileSet::load(&config.rules_dir)
            .map_err(|e| anyhow!("{e}"))
            .context("the rules are invalid; nothing was loaded")?;
        if let Some(only) = &config.only_profiles {
            for name in only {
                if profiles.get(name).is_none() {
                    bail!("{}", unknown_profile(&profiles, name));
                }
            }
        }
        let resolver = Resolver::new(config.resolver)?;
        let dns_upstream = config.resolver.or_else(crate::resolve::system_upstream);
        if dns_upstream.is_none() {
            tracing::warn!(
                "no upstream DNS server (none in /etc/resolv.conf, no --resolver): DNS queries \
                 from sessions are answered SERVFAIL"
            );
        }

        let hierarchy = Hierarchy::find()?;
        let (saved, instance_dir, pins) = place_instance(&config, &enforcer_root(&hierarchy))?;

        let (rules, first_ids) = rule_table(&profiles)?;
        let offsets = kernel_offsets();
        let kernel = Kernel::load(&Scope {
            attach_cgroup: &hierarchy.mount,
            instance_cgroup_id: cgroup::id(&instance_dir)?,
            instance_cgroup_level: i32::try_from(hierarchy.level(&instance_dir)?)?,
            rule_count: u32::try_from(rules.len())?,
            offsets,
            pins: pins.as_ref(),
        });
        let mut kernel = match kernel {
            Ok(k) => k,
            Err(e) => {
                if saved.is_none() {
                    let _ = cgroup::remove_tree(&instance_dir);
                }
                return Err(e.into());
            }
        };
        let events = kernel.take_events()?;
        let log = log::Writer::open(&config.log)?;

        let mut state = State {
            kernel,
            profiles,
            installed: BTreeMap::new(),
            rules,
            sessions: BTreeMap::new(),
            log,
            instance_dir,
            next_session: saved.as_ref().map_or(1, |s| s.next_session),
            kind: config.kind,
            file_policies: BTreeMap::new(),
            next_profile_id: saved.as_ref().map_or(1, |s| s.next_profile_id),
            next_file_policy: saved.as_ref().map_or(1, |s| s.next_file_policy),
            pins,
            saved_to: config.persist.as_ref().map(|p| p.state_file.clone()),
            rules_dir: config.rules_dir.clone(),
            only_profiles: config.only_profiles.clone(),
            last_reload: None,
            learned: Learned::new(config.dns_learned_max),
            dns_ttl_floor: config.dns_ttl_floor,
            dns_upstream,
            control_sockets: std::iter::once(PathBuf::from(crate::control::DEFAULT_SOCKET))
                .chain(config.persist.as_ref().map(|p| p.socket.clone()))
                .collect(),
            socket_names: HashMap::new(),
        };
        let wanted: Vec<String> = config
            .only_profiles
            .unwrap_or_else(|| state.profiles.profiles.keys().cloned().collect());
        let names: Vec<&str> = wanted
            .iter()
            .flat_map(|n| state.profiles.profiles[n].host_names())
            .collect();
        let answers = resolver.resolve_all(names).await;
        for name in &wanted {
            warn_unresolved(&state.profiles.profiles[name], &answers);
        }
        state.install_all(&wanted, &first_ids, &answers)?;
        state.protect_enforcer_files()?;

        let controller = Controller {
            state: Arc::new(Mutex::new(state)),
            events: Arc::new(Mutex::new(events)),
            resolver: Arc::new(resolver),
            dns_stats: Arc::new(Stats::default()),
            reload_lock: Arc::new(tokio::sync::Mutex::new(())),
            stop: Arc::new(tokio::sync::Notify::new()),
        };
        if let Some(saved) = saved {
            controller.adopt(&saved)?;
        }
        controller.go_live()?;
        controller.spawn_event_reader()?;
        controller.spawn_refresher();
        controller.spawn_sweeper();
        Ok(controller)
    }

    /// Attach the programs, only now that the rules are installed and any
    /// adopted sessions switched, so they never see half a set-up; then
    /// detach a previous daemon's file programs and save the state.
    fn go_live(&self) -> Result<()> {
        let mut state = self.state();
        state.kernel.attach()?;
        if state.kernel.lsm_links_kept() {
            tracing::info!("kept the previous daemon's LSM programs (the same build, pinned)");
        }
        state.save();
        Ok(())
    }

    /// Take over the sessions a previous daemon left enforced: serve their
    /// DNS again, switch them to the rules just installed (one map update
    /// each), then remove what the old rules left in the maps.
    fn adopt(&self, saved: &Saved) -> Result<()> {
        let mut state = self.state();
        for s in &saved.sessions {
            let alive = s.cgroup.is_dir() && cgroup::id(&s.cgroup).ok() == Some(s.cgroup_id);
            if !alive {
                continue;
            }
            if !state.installed.contains_key(&s.profile) {
                tracing::error!(
                    "session {} uses profile `{}`, which the rules no longer have: every connect \
                     and open of its processes is denied (fail closed); restore the profile and \
                     restart the daemon, or end the session",
                    s.name,
                    s.profile
                );
                continue;
            }
            let (file_policy, _) = state.file_policy_for(&s.profile, s.uid, s.allow_degraded)?;
            let (profile_id, flags) = state
                .session_rules(&s.profile, s.forced_audit)
                .context("profile just installed")?;
            // The same proxy port if it is still free, so the switch of the
            // session's value below changes nothing for DNS in flight.
            let session_ref = SessionRef {
                name: s.name.clone(),
                profile: s.profile.clone(),
                audit: flags & SESSION_AUDIT != 0,
            };
            let proxy = Proxy::start_on(
                self.clone(),
                session_ref.clone(),
                state.dns_upstream,
                Some(s.dns_port_v4),
            )
            .or_else(|_| Proxy::start_on(self.clone(), session_ref, state.dns_upstream, None))
            .with_context(|| format!("serving DNS for adopted session {}", s.name))?;
            state.kernel.set_session(
                s.cgroup_id,
                Session {
                    profile_id,
                    flags,
                    file_policy,
                    dns_port_v4: proxy.port_v4,
                    dns_port_v6: proxy.port_v6,
                },
            )?;
            tracing::info!("adopted session {} ({})", s.name, s.cgroup.display());
            state.sessions.insert(
                s.cgroup_id,
                LiveSession {
                    grant: Grant {
                        name: s.name.clone(),
                        profile: s.profile.clone(),
                        cgroup: s.cgroup.clone(),
                        cgroup_id: s.cgroup_id,
                        audit: flags & SESSION_AUDIT != 0,
                        degraded: s.degraded.clone(),
                    },
                    uid: s.uid,
                    forced_audit: s.forced_audit,
                    allow_degraded: s.allow_degraded,
                    proxy,
                    // Its `enforcer run` lost its connection with the old
                    // daemon: the session ends when its cgroup empties.
                    attached: false,
                    started: s.started.clone(),
                },
            );
        }
        let sessions: HashSet<u64> = state.sessions.keys().copied().collect();
        let profiles: HashSet<u32> = state.installed.values().map(|i| i.id).collect();
        let policies: HashSet<u32> = state.file_policies.values().map(|p| p.id).collect();
        let removed = state.kernel.retain(&sessions, &profiles, &policies)?;
        tracing::info!(
            "adopted {} session(s) from the previous daemon; removed {removed} stale map entries",
            sessions.len()
        );
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Create a session cgroup bound to `profile`, ready for an agent that
    /// runs as `agent_uid`. A profile with file rules on a kernel that cannot
    /// enforce them is refused unless `allow_degraded`.
    pub fn open_session(
        &self,
        profile: &str,
        force_audit: bool,
        agent_uid: u32,
        allow_degraded: bool,
    ) -> Result<Grant> {
        let mut state = self.state();
        let (file_policy, degraded) = state.file_policy_for(profile, agent_uid, allow_degraded)?;
        let Some((profile_id, flags)) = state.session_rules(profile, force_audit) else {
            bail!("{}", unknown_profile(&state.profiles, profile));
        };
        // Sockets that appeared since the rules loaded (a tmux server, a
        // user's D-Bus session) are refused to the new session too.
        state.protect_sockets(profile)?;
        if agent_uid == 0
            && let Err(why) = &state.kernel.file_enforcement
        {
            tracing::warn!(
                "the session guards are NOT enforced on this kernel ({why}): an agent running as \
                 root can leave its cgroup or detach the programs; run it as a user (`sudo \
                 enforcer run` drops to the invoking user)"
            );
        }
        let name = format!("{profile}.{}", state.next_session);
        state.next_session += 1;
        let path = state.instance_dir.join(&name);
        cgroup::create_dir(&path)?;
        let cgroup_id = cgroup::id(&path)?;
        let proxy = Proxy::start_on(
            self.clone(),
            SessionRef {
                name: name.clone(),
                profile: profile.to_owned(),
                audit: flags & SESSION_AUDIT != 0,
            },
            state.dns_upstream,
            None,
        );
        let proxy = match proxy {
            Ok(p) => p,
            Err(e) => {
                let _ = cgroup::remove_tree(&path);
                bail!("starting the session's DNS proxy on 127.0.0.1 and ::1: {e}");
            }
        };
        if let Err(e) = state.kernel.set_session(
            cgroup_id,
            Session {
                profile_id,
                flags,
                file_policy,
                dns_port_v4: proxy.port_v4,
                dns_port_v6: proxy.port_v6,
            },
        ) {
            let _ = cgroup::remove_tree(&path);
            return Err(e.into());
        }
        let grant = Grant {
            name,
            profile: profile.to_owned(),
            cgroup: path,
            cgroup_id,
            audit: flags & SESSION_AUDIT != 0,
            degraded,
        };
        if let Some(why) = &grant.degraded {
            let record = log::Record::session_degraded(&grant.name, profile, why);
            state.log.write(&record)?;
        }
        state.sessions.insert(
            cgroup_id,
            LiveSession {
                grant: grant.clone(),
                uid: agent_uid,
                forced_audit: force_audit,
                allow_degraded,
                proxy,
                attached: true,
                started: jiff::Timestamp::now().to_string(),
            },
        );
        state.save();
        Ok(grant)
    }

    /// The agent's command has exited. Write out its pending events; with
    /// `kill_rest` kill whatever it left running (an embedded controller is
    /// about to stop enforcing). The session stays enforced for as long as
    /// any process remains in it.
    pub fn close_session(&self, cgroup_id: u64, kill_rest: bool) -> Result<()> {
        self.drain_events();
        let path = {
            let mut state = self.state();
            let Some(session) = state.sessions.get_mut(&cgroup_id) else {
                return Ok(());
            };
            session.attached = false;
            session.grant.cgroup.clone()
        };
        if kill_rest {
            cgroup::kill_all(&path)?;
        }
        self.end_if_empty(cgroup_id)
    }

    fn end_if_empty(&self, cgroup_id: u64) -> Result<()> {
        self.drain_events();
        let mut state = self.state();
        let Some(session) = state.sessions.get(&cgroup_id) else {
            return Ok(());
        };
        let path = session.grant.cgroup.clone();
        if session.attached || cgroup::populated(&path)? {
            return Ok(());
        }
        state.kernel.remove_session(cgroup_id)?;
        state.sessions.remove(&cgroup_id);
        state.save();
        cgroup::remove_tree(&path)
    }

    /// End every session, killing its processes (the controller is stopping
    /// and enforcement goes with it).
    pub fn kill_all_sessions(&self) -> Result<()> {
        let ids: Vec<u64> = self.state().sessions.keys().copied().collect();
        for id in ids {
            self.close_session(id, true)?;
        }
        Ok(())
    }

    pub fn request_stop(&self) {
        self.stop.notify_one();
    }

    pub async fn stop_requested(&self) {
        self.stop.notified().await;
    }

    /// Whether this controller's enforcement outlives it (pinned).
    pub fn persists(&self) -> bool {
        self.state().pins.is_some()
    }

    /// Stop this process but leave enforcement in force: sessions stay
    /// enforced by the pinned programs and maps, and the next daemon adopts
    /// them.
    pub fn leave_enforcing(&self) {
        self.drain_events();
        let state = self.state();
        state.save();
        tracing::info!(
            "stopping; {} session(s) stay enforced by the pinned programs until a daemon adopts them \
             (`enforcer stop --unload` removes enforcement)",
            state.sessions.len()
        );
    }

    /// Remove enforcement for good: refused while sessions have processes
    /// unless `force`, which kills them. Then the pins and the saved state go
    /// (the programs detach when this process exits).
    pub fn unload(&self, force: bool) -> Result<()> {
        let live: Vec<String> = {
            let state = self.state();
            state
                .sessions
                .values()
                // Attached: its `enforcer run` may not have started the agent yet.
                .filter(|s| s.attached || cgroup::populated(&s.grant.cgroup).unwrap_or(true))
                .map(|s| s.grant.name.clone())
                .collect()
        };
        if !live.is_empty() && !force {
            bail!(
                "{} session(s) still run agents ({}): unloading would leave them unprotected; end \
                 them first, or add --force to kill them",
                live.len(),
                live.join(", ")
            );
        }
        self.kill_all_sessions()?;
        let mut state = self.state();
        if let Some(pins) = state.pins.take() {
            pins.remove_all()
                .with_context(|| format!("removing the pins in {}", pins.dir.display()))?;
        }
        if let Some(file) = state.saved_to.take() {
            Saved::remove(&file)?;
        }
        Ok(())
    }

    /// Stop: every session must have ended (`close_session` with
    /// `kill_rest`). Dropping the last handle detaches the programs.
    pub fn shutdown(&self) -> Result<()> {
        self.drain_events();
        let state = self.state();
        if !state.sessions.is_empty() {
            bail!(
                "refusing to stop: {} session(s) still have processes",
                state.sessions.len()
            );
        }
        cgroup::remove_tree(&state.instance_dir)
    }

    /// Move the events the kernel has queued into the log, now: batch by
    /// batch, so other users of the state get their turn between batches
    /// (and, under a flood that never lets the buffer empty, up to a bound).
    pub fn drain_events(&self) {
        for _ in 0..DRAIN_BATCHES {
            if !self.drain_batch() {
                return;
            }
        }
    }

    /// Move up to `DRAIN_BATCH` events into the log; whether more may be
    /// queued.
    fn drain_batch(&self) -> bool {
        let mut ring = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut state = self.state();
        let clock = Clock::now();
        let mounts = Mounts::read();
        for _ in 0..DRAIN_BATCH {
            let Some(item) = ring.next() else {
                return false;
            };
            let record = match event_kind(&item) {
                Some(EVENT_NET) if item.len() >= size_of::<NetEvent>() => {
                    // SAFETY: the kernel wrote a whole NetEvent (length
                    // checked); ring buffer bytes are not aligned for it.
                    let event: NetEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    state.net_record(&event, &clock)
                }
                Some(EVENT_FILE) if item.len() >= size_of::<FileEvent>() => {
                    // SAFETY: as above, for a FileEvent.
                    let event: FileEvent =
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    state.file_record(&event, &clock, &mounts)
                }
                Some(EVENT_GUARD) if item.len() >= size_of::<GuardEvent>() => {
                    // SAFETY: as above, for a GuardEvent.
                    let event: GuardEvent =
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    state.guard_record(&event, &clock)
                }
                kind => {
                    tracing::error!(
                        "unknown event from the kernel (kind {kind:?}, {} bytes); skipped",
                        item.len()
                    );
                    continue;
                }
            };
            // Written before the event is released from the ring buffer: if
            // the controller dies in between, the next one (the buffer is
            // pinned) writes it again rather than never.
            if let Err(e) = state.log.write(&record) {
                tracing::error!("{e:#}");
            }
            drop(item);
        }
        true
    }

    fn spawn_event_reader(&self) -> Result<()> {
        let fd: OwnedFd = {
            let ring = self
                .events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            ring.as_fd().try_clone_to_owned()?
        };
        // SAFETY: the AsyncFd owns `fd`, so it stays open and the same file
        // for the AsyncFd's whole life.
        let readiness =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow!("watching the event ring buffer: {e}"))?;
        let controller = self.clone();
        tokio::spawn(async move {
            loop {
                match readiness.readable().await {
                    Ok(mut guard) => {
                        // Yield between batches: a flood of events must
                        // not starve sessions, reloads or DNS answers of
                        // the state lock.
                        while controller.drain_batch() {
                            tokio::task::yield_now().await;
                        }
                        guard.clear_ready();
                    }
                    Err(e) => {
                        tracing::error!("event ring buffer wait failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(())
    }

    /// Re-resolve host names whose answers expired and update the rules.
    fn spawn_refresher(&self) {
        let controller = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                controller.refresh_expired().await;
                controller.expire_learned();
            }
        });
    }

    async fn refresh_expired(&self) {
        let now = tokio::time::Instant::now();
        let due: Vec<(String, String)> = {
            let state = self.state();
            state
                .installed
                .iter()
                .flat_map(|(profile, i)| {
                    i.resolutions
                        .iter()
                        .filter(|(_, r)| r.refresh_at <= now)
                        .map(|(name, _)| (profile.clone(), name.clone()))
                })
                .collect()
        };
        for (profile, name) in due {
            let fresh = self.resolver.resolve(&name).await;
            let mut state = self.state();
            let Some(installed) = state.installed.get_mut(&profile) else {
                continue;
            };
            let Some(old) = installed.resolutions.get_mut(&name) else {
                continue;
            };
            let changed = match (&old.answer, &fresh.answer) {
                // A failed lookup keeps the last known addresses in force.
                (_, Answer::Failed(why)) => {
                    tracing::warn!(
                        "re-resolving `{name}` (profile {profile}) failed: {why}; keeping the previous addresses"
                    );
                    old.refresh_at = fresh.refresh_at;
                    false
                }
                (a, b) => {
                    let changed = a != b;
                    *old = fresh;
                    changed
                }
            };
            if changed {
                tracing::info!("`{name}` (profile {profile}) changed address; updating rules");
                if let Err(e) = state.apply(&profile) {
                    tracing::error!("updating rules of profile {profile} failed: {e:#}");
                }
            }
        }
    }

    /// Load the rules directory again and put it in force without a gap.
    /// The new rule set is validated and compiled whole first; its entries
    /// are written under fresh profile ids beside the old ones; then each
    /// live session is switched to them with one map update (atomic for the
    /// kernel: a connect or open sees the old rules or the new, never
    /// neither); then the old entries are removed. On any error nothing
    /// changes, and the error is kept for `status`.
    pub async fn reload(&self) -> Result<String> {
        crate::service::notify_reloading();
        let _one_at_a_time = self.reload_lock.lock().await;
        let result = self.try_reload().await;
        let mut state = self.state();
        state.last_reload = Some(ReloadStatus {
            at: format!("{:.6}", jiff::Timestamp::now()),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        });
        match &result {
            Ok(summary) => tracing::info!("reloaded the rules: {summary}"),
            Err(e) => tracing::error!("reload failed; the rules in force stay in force: {e:#}"),
        }
        crate::service::notify(&["READY=1"]);
        result
    }

    async fn try_reload(&self) -> Result<String> {
        let (dir, only, known) = {
            let state = self.state();
            let known: BTreeMap<String, Resolution> = state
                .installed
                .values()
                .flat_map(|i| i.resolutions.clone())
                .collect();
            (state.rules_dir.clone(), state.only_profiles.clone(), known)
        };
        let profiles = ProfileSet::load(&dir)
            .map_err(|e| anyhow!("{e}"))
            .context("the new rules are invalid")?;
        let wanted: Vec<String> =
            only.unwrap_or_else(|| profiles.profiles.keys().cloned().collect());
        for name in &wanted {
            if profiles.get(name).is_none() {
                bail!("{}", unknown_profile(&profiles, name));
            }
        }
        // Names resolved before keep their answers (the refresher keeps
        // them current); new names are resolved now, outside the lock.
        let fresh: Vec<&str> = wanted
            .iter()
            .flat_map(|n| profiles.profiles[n].host_names())
            .filter(|n| !known.contains_key(*n))
            .collect();
        let mut resolved = self.resolver.resolve_all(fresh).await;
        resolved.extend(known);
        let (rules, first_ids) = rule_table(&profiles)?;
        self.state()
            .swap_rules(profiles, rules, &first_ids, &wanted, &resolved)
    }

    /// Reopen the denial log (after logrotate moved it away).
    pub fn reopen_log(&self) -> Result<()> {
        self.drain_events();
        let mut state = self.state();
        state.log.reopen()?;
        state.protect_enforcer_files()
    }

    /// Drop learned addresses whose answers have expired.
    fn expire_learned(&self) {
        let mut state = self.state();
        let changed = state.learned.expire(std::time::Instant::now());
        for profile in changed {
            if let Err(e) = state.apply(&profile) {
                tracing::error!("removing expired DNS addresses of profile {profile}: {e:#}");
            }
        }
    }

    pub fn dns_stats(&self) -> &Stats {
        &self.dns_stats
    }

    /// What the session's profile says about a query along `chain`.
    pub fn judge_name(&self, session: &SessionRef, chain: &[String]) -> NameVerdict {
        let state = self.state();
        match state.profiles.get(&session.profile) {
            Some(profile) => names::judge(profile, chain),
            None => NameVerdict::Refuse(None),
        }
    }

    /// Learn the addresses of an answer for the rules naming its chain, and
    /// install them in the kernel before returning, so the agent's first
    /// connect after the answer is judged by them. On failure nothing new is
    /// left in force.
    pub fn learn(&self, session: &SessionRef, found: &Found, only_denials: bool) -> Result<()> {
        if found.addresses.is_empty() {
            return Ok(());
        }
        let mut state = self.state();
        let Some(profile) = state.profiles.get(&session.profile) else {
            bail!("profile `{}` is no longer loaded", session.profile);
        };
        let keys = names::learned_keys(profile, &found.chain, only_denials);
        let ttl = Duration::from_secs(found.ttl.into()).max(state.dns_ttl_floor);
        let expires = std::time::Instant::now() + ttl;
        let mut added = Vec::new();
        let mut changed = BTreeSet::new();
        for key in &keys {
            for addr in &found.addresses {
                let c = state
                    .learned
                    .learn(&session.profile, key, &found.chain[0], *addr, expires);
                if c.contains(&session.profile) {
                    added.push((key, *addr));
                }
                changed.extend(c);
            }
        }
        for name in changed {
            if let Err(e) = state.apply(&name) {
                if name != session.profile {
                    tracing::error!("updating rules of profile {name} after an eviction: {e:#}");
                    continue;
                }
                for (key, addr) in &added {
                    state.learned.forget(&session.profile, key, *addr);
                }
                let _ = state.apply(&name);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Log a DNS query the session's profile denies.
    pub fn log_dns_refusal(
        &self,
        session: &SessionRef,
        name: &str,
        qtype: &str,
        rule: Option<usize>,
    ) {
        let mut state = self.state();
        let rule = match (rule, state.installed.get(&session.profile)) {
            (Some(index), Some(installed)) => state
                .rules
                .get(installed.first_rule_id as usize + index)
                .map(|r| r.rule.clone()),
            _ => None,
        };
        let rule = rule.unwrap_or_else(|| match state.profiles.get(&session.profile) {
            Some(p) => log::RuleRef::at(&p.default_origin, "default = \"deny\""),
            None => log::RuleRef {
                file: String::new(),
                line: 0,
                text: "profile no longer loaded".into(),
            },
        });
        let record = log::Record {
            ts: format!("{:.6}", jiff::Timestamp::now()),
            profile: Some(session.profile.clone()),
            session: Some(session.name.clone()),
            pid: 0,
            uid: 0,
            comm: String::new(),
            op: "dns".into(),
            verdict: if session.audit { "audit" } else { "deny" }.into(),
            target: name.to_owned(),
            proto: qtype.to_owned(),
            host: Some(name.to_owned()),
            mode: None,
            rule,
        };
        if let Err(e) = state.log.write(&record) {
            tracing::error!("{e:#}");
        }
    }

    /// End sessions whose agents have all exited after `enforcer run` left.
    fn spawn_sweeper(&self) {
        let controller = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let detached: Vec<u64> = controller
                    .state()
                    .sessions
                    .iter()
                    .filter(|(_, s)| !s.attached)
                    .map(|(id, _)| *id)
                    .collect();
                for id in detached {
                    if let Err(e) = controller.end_if_empty(id) {
                        tracing::error!("ending session: {e:#}");
                    }
                }
            }
        });
    }

    pub fn status(&self) -> Status {
        let state = self.state();
        let profiles = state
            .installed
            .iter()
            .map(|(name, installed)| {
                let p = &state.profiles.profiles[name];
                ProfileStatus {
                    name: name.clone(),
                    mode: if p.mode == Mode::Audit {
                        "audit"
                    } else {
                        "enforce"
                    }
                    .into(),
                    default: p.default.as_str().into(),
                    source: p.default_origin.file.clone(),
                    kernel_entries: installed.entries.len(),
                    unresolved: installed
                        .resolutions
                        .iter()
                        .filter_map(|(host, r)| match &r.answer {
                            Answer::Addresses(_) => None,
                            Answer::NoSuchHost => Some(format!("{host}: no such host")),
                            Answer::Failed(why) => Some(format!("{host}: {why}")),
                        })
                        .collect(),
                    rules: p
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            let id = installed.first_rule_id + u32::try_from(i).unwrap_or(u32::MAX);
                            RuleStatus {
                                action: r.action.as_str().into(),
                                text: r.text.clone(),
                                line: r.origin.line,
                                hits: state.kernel.rule_hits(id),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        let lsm_programs: &[(&str, &str)] = if state.kernel.file_enforcement.is_ok() {
            &kernel::LSM_PROGRAMS
        } else {
            &[]
        };
        Status {
            controller: state.kind.into(),
            pid: std::process::id(),
            rules_dir: state.profiles.dir.as_ref().map(|d| d.display().to_string()),
            log: state.log.path().display().to_string(),
            instance_cgroup: state.instance_dir.display().to_string(),
            programs: kernel::NET_PROGRAMS
                .iter()
                .copied()
                .chain(lsm_programs.iter().map(|(program, _)| *program))
                .map(str::to_owned)
                .collect(),
            profiles,
            sessions: state
                .sessions
                .values()
                .map(|s| SessionStatus {
                    name: s.grant.name.clone(),
                    profile: s.grant.profile.clone(),
                    cgroup: s.grant.cgroup.display().to_string(),
                    audit: s.grant.audit,
                    attached: s.attached,
                    started: s.started.clone(),
                })
                .collect(),
            counters: Counter::ALL
                .iter()
                .map(|c| (c.name().to_owned(), state.kernel.counter(*c)))
                .collect(),
            features: crate::features::detect(state.kernel.file_enforcement.clone()),
            reload: state.last_reload.clone(),
            dns: DnsStatus {
                upstream: state.dns_upstream.map(|a| a.to_string()),
                learned: state.learned.len(),
                learned_evicted: state.learned.evicted,
                proxy: self.dns_stats.snapshot(),
            },
        }
    }
}

impl State {
    /// Write what a restarted daemon needs to adopt the sessions (nothing
    /// for an embedded controller). A failure is logged: enforcement goes
    /// on, but a restart would not adopt the newest sessions.
    fn save(&self) {
        let (Some(file), Some(_)) = (&self.saved_to, &self.pins) else {
            return;
        };
        let saved = Saved {
            instance_dir: self.instance_dir.clone(),
            next_profile_id: self.next_profile_id,
            next_file_policy: self.next_file_policy,
            next_session: self.next_session,
            sessions: self
                .sessions
                .iter()
                .map(|(id, s)| SavedSession {
                    cgroup_id: *id,
                    name: s.grant.name.clone(),
                    profile: s.grant.profile.clone(),
                    cgroup: s.grant.cgroup.clone(),
                    uid: s.uid,
                    forced_audit: s.forced_audit,
                    allow_degraded: s.allow_degraded,
                    degraded: s.grant.degraded.clone(),
                    dns_port_v4: s.proxy.port_v4,
                    dns_port_v6: s.proxy.port_v6,
                    started: s.started.clone(),
                })
                .collect(),
        };
        if let Err(e) = saved.write(file) {
            tracing::error!("saving the daemon's state: {e:#}");
        }
    }

    /// Put a new rule set in force (see `Controller::reload`).
    fn swap_rules(
        &mut self,
        profiles: ProfileSet,
        rules: Vec<RuleInfo>,
        first_ids: &BTreeMap<String, u32>,
        wanted: &[String],
        resolved: &BTreeMap<String, Resolution>,
    ) -> Result<String> {
        for session in self.sessions.values() {
            if !wanted.contains(&session.grant.profile) {
                bail!(
                    "profile `{}` is gone from the rules, but session {} still uses it; end the \
                     session first",
                    session.grant.profile,
                    session.grant.name
                );
            }
        }
        let capacity = self.kernel.rule_hit_capacity();
        if rules.len() > capacity as usize {
            bail!(
                "the new rules have {} rules; the loaded programs count hits for at most {capacity}: \
                 restart the controller to load them",
                rules.len()
            );
        }
        let old_profiles = std::mem::replace(&mut self.profiles, profiles);
        let old_rules = std::mem::replace(&mut self.rules, rules);
        let old_installed = std::mem::take(&mut self.installed);
        let old_policies = std::mem::take(&mut self.file_policies);
        let switched = self
            .install_all(wanted, first_ids, resolved)
            .and_then(|()| self.sessions_switched());
        let values = match switched {
            Ok(values) => values,
            Err(e) => {
                let new_installed = std::mem::replace(&mut self.installed, old_installed);
                for installed in new_installed.values() {
                    self.remove_profile_entries(installed);
                }
                let new_policies = std::mem::replace(&mut self.file_policies, old_policies);
                for policy in new_policies.values() {
                    self.remove_file_policy(policy);
                }
                self.profiles = old_profiles;
                self.rules = old_rules;
                return Err(e);
            }
        };
        for (cgroup_id, session) in &values {
            // On failure the old entries stay: a session never loses its rules.
            self.kernel.set_session(*cgroup_id, *session).with_context(|| {
                format!("switching session cgroup {cgroup_id} to the new rules (the old rules stay loaded)")
            })?;
        }
        for installed in old_installed.values() {
            self.remove_profile_entries(installed);
        }
        for policy in old_policies.values() {
            self.remove_file_policy(policy);
        }
        self.kernel
            .reset_rule_hits(u32::try_from(self.rules.len())?)?;
        self.save();
        Ok(format!(
            "{} profile(s), {} rule(s), {} session(s) switched",
            wanted.len(),
            self.rules.len(),
            values.len()
        ))
    }

    /// Install `wanted` profiles under fresh ids (see `apply`).
    fn install_all(
        &mut self,
        wanted: &[String],
        first_ids: &BTreeMap<String, u32>,
        resolved: &BTreeMap<String, Resolution>,
    ) -> Result<()> {
        for name in wanted {
            let resolutions = self.profiles.profiles[name]
                .host_names()
                .filter_map(|n| resolved.get(n).map(|r| (n.to_owned(), r.clone())))
                .collect();
            let id = self.next_profile_id;
            self.next_profile_id += 1;
            self.installed.insert(
                name.clone(),
                Installed {
                    id,
                    first_rule_id: first_ids[name],
                    resolutions,
                    entries: HashMap::new(),
                    sockets: Vec::new(),
                },
            );
            self.apply(name)?;
            self.protect_sockets(name)?;
        }
        Ok(())
    }

    /// The `SESSIONS` value each live session gets under the installed
    /// rules, compiling the file policies they need.
    fn sessions_switched(&mut self) -> Result<Vec<(u64, Session)>> {
        let live: Vec<(u64, String, u32, bool, bool, u16, u16)> = self
            .sessions
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    s.grant.profile.clone(),
                    s.uid,
                    s.forced_audit,
                    s.allow_degraded,
                    s.proxy.port_v4,
                    s.proxy.port_v6,
                )
            })
            .collect();
        let mut values = Vec::with_capacity(live.len());
        for (cgroup_id, profile, uid, forced_audit, allow_degraded, port_v4, port_v6) in live {
            let (file_policy, _) = self.file_policy_for(&profile, uid, allow_degraded)?;
            let (profile_id, flags) = self
                .session_rules(&profile, forced_audit)
                .with_context(|| format!("profile `{profile}` was not installed"))?;
            values.push((
                cgroup_id,
                Session {
                    profile_id,
                    flags,
                    file_policy,
                    dns_port_v4: port_v4,
                    dns_port_v6: port_v6,
                },
            ));
        }
        Ok(values)
    }

    /// Compile a profile with its current addresses and bring the kernel
    /// entries in line, writing only what changed (a learned DNS answer
    /// usually adds one entry): new and changed entries are written before
    /// stale ones are removed, so a destination is never briefly unruled.
    fn apply(&mut self, name: &str) -> Result<()> {
        let profile = &self.profiles.profiles[name];
        let installed = self
            .installed
            .get_mut(name)
            .context("profile not installed")?;
        let mut addresses: BTreeMap<String, Vec<IpAddr>> = installed
            .resolutions
            .iter()
            .filter_map(|(host, r)| match &r.answer {
                Answer::Addresses(a) => Some((host.clone(), a.clone())),
                _ => None,
            })
            .collect();
        for (key, learned) in self.learned.addresses(name) {
            addresses.entry(key).or_default().extend(learned);
        }
        let compiled = compile::compile(profile, installed.first_rule_id, &addresses)?;
        for (net, list) in &compiled.entries {
            let digest = digest(list);
            if installed.entries.get(net) != Some(&digest) {
                self.kernel.set_rule(installed.id, *net, list)?;
                installed.entries.insert(*net, digest);
            }
        }
        let fresh: HashSet<IpNet> = compiled.entries.iter().map(|(n, _)| *n).collect();
        let stale: Vec<IpNet> = installed
            .entries
            .keys()
            .filter(|n| !fresh.contains(n))
            .copied()
            .collect();
        for net in stale {
            self.kernel.remove_rule(installed.id, net)?;
            installed.entries.remove(&net);
        }
        Ok(())
    }

    /// The profile id and session flags for a session of `profile`.
    fn session_rules(&self, profile: &str, force_audit: bool) -> Option<(u32, u32)> {
        let installed = self.installed.get(profile)?;
        let p = self.profiles.get(profile)?;
        let mut flags = 0;
        if force_audit || p.mode == Mode::Audit {
            flags |= SESSION_AUDIT;
        }
        if p.default == Action::Deny {
            flags |= SESSION_DEFAULT_DENY;
        }
        flags |= p.guards.allowed << SESSION_GUARD_ALLOW_SHIFT;
        Some((installed.id, flags))
    }

    /// Put the enforcer's own files out of the sessions' reach: this binary,
    /// the rules directory (and so its entries) and the denial log as it is
    /// now (a reopened log is a new file).
    fn protect_enforcer_files(&mut self) -> Result<()> {
        let binary = std::env::current_exe().context("finding the enforcer's own binary")?;
        let files: Vec<(u32, u64)> = [binary.as_path(), &self.rules_dir, self.log.path()]
            .into_iter()
            .filter_map(stat_identity)
            .collect();
        Ok(self.kernel.set_enforcer_files(&files)?)
    }

    /// Bring the profile's `PROTECTED_SOCKETS` entries in line with the
    /// sockets that exist now, new ones first.
    fn protect_sockets(&mut self, name: &str) -> Result<()> {
        let always: Vec<&Path> = self.control_sockets.iter().map(PathBuf::as_path).collect();
        let found = guard::protected_sockets(&self.profiles.profiles[name].guards, &always, |p| {
            stat_identity(p)
        });
        let installed = self
            .installed
            .get_mut(name)
            .context("profile not installed")?;
        let mut fresh = Vec::with_capacity(found.len());
        for (path, (dev, ino)) in found {
            let key = InodeKey {
                policy: installed.id,
                dev,
                ino,
            };
            if !installed.sockets.contains(&key) {
                self.kernel.set_protected_socket(key, Some(0))?;
            }
            self.socket_names
                .insert((dev, ino), path.display().to_string());
            fresh.push(key);
        }
        for stale in installed.sockets.iter().filter(|k| !fresh.contains(k)) {
            self.kernel.set_protected_socket(*stale, None)?;
        }
        installed.sockets = fresh;
        Ok(())
    }

    fn remove_file_policy(&mut self, policy: &FilePolicy) {
        for inode in &policy.inodes {
            if let Err(e) = self.kernel.remove_inode(inode) {
                tracing::error!("removing a file rule entry: {e}");
            }
        }
        for (trie, scope, bytes) in &policy.names {
            if let Err(e) = self.kernel.remove_name(*trie, *scope, bytes) {
                tracing::error!("removing a file name rule entry: {e}");
            }
        }
    }

    fn remove_profile_entries(&mut self, installed: &Installed) {
        for net in installed.entries.keys() {
            if let Err(e) = self.kernel.remove_rule(installed.id, *net) {
                tracing::error!("removing a network rule entry: {e}");
            }
        }
        for socket in &installed.sockets {
            if let Err(e) = self.kernel.set_protected_socket(*socket, None) {
                tracing::error!("removing a protected socket entry: {e}");
            }
        }
    }

    /// The file policy for a session of `profile` whose agent runs as
    /// `uid`, compiled and installed on first use; 0 when the profile has no
    /// file rules. With file rules the kernel cannot enforce: an error, or
    /// with `allow_degraded` no policy and the reason.
    fn file_policy_for(
        &mut self,
        profile: &str,
        uid: u32,
        allow_degraded: bool,
    ) -> Result<(u32, Option<String>)> {
        let Some(p) = self.profiles.get(profile) else {
            bail!("{}", unknown_profile(&self.profiles, profile));
        };
        if p.file_rules.is_empty() {
            return Ok((0, None));
        }
        if let Err(why) = &self.kernel.file_enforcement {
            if allow_degraded {
                tracing::warn!(
                    "DEGRADED: the file rules of profile `{profile}` are NOT enforced in this session: {why}"
                );
                return Ok((0, Some(why.clone())));
            }
            bail!(
                "profile `{profile}` has file rules, but they cannot be enforced on this kernel: {why}. \
                 Refusing to start the agent unprotected; `--allow-degraded` runs it with the network \
                 rules only"
            );
        }
        let home = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.dir)
            .with_context(|| {
                format!("uid {uid} has no home directory to expand `~` in file rules")
            })?;
        let key = (profile.to_owned(), home.clone());
        if let Some(policy) = self.file_policies.get(&key) {
            return Ok((policy.id, None));
        }
        let id = self.next_file_policy;
        self.next_file_policy += 1;
        let mut policy = FilePolicy {
            id,
            inodes: Vec::new(),
            names: Vec::new(),
        };
        let first = self.installed.get(profile).map_or(0, |i| i.first_rule_id)
            + u32::try_from(p.rules.len())?;
        let targets: Vec<files::FileRuleRef<'_>> = p
            .file_rules
            .iter()
            .enumerate()
            .map(|(i, r)| files::FileRuleRef {
                action: r.action,
                target: &r.target,
                rule_id: first + u32::try_from(i).unwrap_or(0),
            })
            .collect();
        let compiled = files::compile(&targets, &home, &stat_identity);
        for (rule_id, why) in &compiled.missing {
            let rule = &self.rules[*rule_id as usize].rule;
            tracing::warn!(
                "profile {profile}: {}:{} `{}`: {why}; it applies once it exists and a new session starts",
                rule.file,
                rule.line,
                rule.text
            );
        }
        let written = (|| -> Result<()> {
            for ((dev, ino), rule) in &compiled.inodes {
                let inode = InodeKey {
                    policy: id,
                    dev: *dev,
                    ino: *ino,
                };
                self.kernel.set_inode(inode, *rule)?;
                policy.inodes.push(inode);
            }
            for n in &compiled.names {
                let scope = enforcer_common::scope(id, n.index, n.allow);
                self.kernel
                    .set_name(n.trie, scope, &n.bytes, NameRule { rule_id: n.rule_id })?;
                policy.names.push((n.trie, scope, n.bytes.clone()));
            }
            Ok(())
        })();
        if let Err(e) = written {
            self.remove_file_policy(&policy);
            return Err(e);
        }
        self.file_policies.insert(key, policy);
        Ok((id, None))
    }

    /// Who a kernel event is about: its session, and the rule that decided
    /// (none when the profile's default or a fail-closed check did).
    fn attribution(
        &self,
        session_cgroup: u64,
        rule_id: u32,
    ) -> (Option<&LiveSession>, Option<&RuleInfo>) {
        let rule = (rule_id != NO_RULE)
            .then(|| self.rules.get(rule_id as usize))
            .flatten();
        (self.sessions.get(&session_cgroup), rule)
    }

    fn file_record(&self, event: &FileEvent, clock: &Clock, mounts: &Mounts) -> log::Record {
        let (session, rule_info) = self.attribution(event.session_cgroup, event.rule_id);
        log::Record {
            ts: clock.wall_time(event.boot_ns),
            profile: rule_info
                .map(|r| r.profile.clone())
                .or_else(|| session.map(|s| s.grant.profile.clone())),
            session: session.map(|s| s.grant.name.clone()),
            pid: event.tgid,
            uid: event.uid,
            comm: c_string(&event.comm),
            op: match event.mode {
                ACCESS_RENAME => "rename",
                ACCESS_LINK => "link",
                _ => "open",
            }
            .into(),
            verdict: verdict_name(event.verdict),
            target: mounts.path(event),
            proto: "file".into(),
            mode: match event.mode {
                1 => Some("read".into()),
                2 => Some("write".into()),
                3 => Some("read-write".into()),
                _ => None,
            },
            host: None,
            rule: rule_info.map_or_else(
                || log::RuleRef {
                    file: String::new(),
                    line: 0,
                    text: "unverifiable: path too deep or kernel read failed (fail closed)".into(),
                },
                |r| r.rule.clone(),
            ),
        }
    }

    /// The record of a refused attempt to get around the enforcer: `op` is
    /// the guard, `target` what it was aimed at.
    fn guard_record(&self, event: &GuardEvent, clock: &Clock) -> log::Record {
        let (session, _) = self.attribution(event.session_cgroup, NO_RULE);
        let name = c_string(&event.name);
        let guard = guard::guard_name(event.guard);
        let (target, proto) = match event.guard {
            GUARD_SIGNAL | GUARD_PTRACE => {
                let comm = std::fs::read_to_string(format!("/proc/{}/comm", event.target_pid))
                    .map(|c| format!(" ({})", c.trim()))
                    .unwrap_or_default();
                let detail = if event.guard == GUARD_SIGNAL {
                    format!("signal {}", event.detail)
                } else {
                    format!("mode {:#x}", event.detail)
                };
                (format!("pid {}{comm}", event.target_pid), detail)
            }
            GUARD_LOCAL_SOCKET => (
                self.socket_names
                    .get(&(event.dev, event.ino))
                    .cloned()
                    .unwrap_or(name),
                "unix".into(),
            ),
            GUARD_RAW_SOCKET => (
                format!(
                    "family {} type {}",
                    event.detail >> 16,
                    event.detail & 0xffff
                ),
                "socket".into(),
            ),
            GUARD_CGROUP if event.detail == DETAIL_CLONE_INTO_CGROUP => {
                ("clone3(CLONE_INTO_CGROUP)".into(), String::new())
            }
            GUARD_BPF => (format!("bpf() command {}", event.detail), String::new()),
            _ => (name, String::new()),
        };
        let profile = session.map(|s| s.grant.profile.clone());
        let rule_text = if event.guard & GUARDS_ALWAYS != 0 {
            format!("guard `{guard}`: a session can never change the enforcer")
        } else {
            format!("guard `{guard}` (a profile may re-allow it: [guard] allow = [\"{guard}\"])")
        };
        log::Record {
            ts: clock.wall_time(event.boot_ns),
            session: session.map(|s| s.grant.name.clone()),
            pid: event.tgid,
            uid: event.uid,
            comm: c_string(&event.comm),
            op: guard.into(),
            verdict: verdict_name(event.verdict),
            target,
            proto,
            host: None,
            mode: (event.guard == GUARD_CGROUP && event.detail != DETAIL_CLONE_INTO_CGROUP)
                .then(|| "write".into()),
            rule: log::RuleRef {
                file: profile
                    .as_deref()
                    .and_then(|p| self.profiles.profiles.get(p))
                    .map(|p| p.default_origin.file.clone())
                    .unwrap_or_default(),
                line: 0,
                text: if session.is_none() {
                    "process in an unregistered session cgroup (fail closed)".into()
                } else {
                    rule_text
                },
            },
            profile,
        }
    }

    fn net_record(&self, event: &NetEvent, clock: &Clock) -> log::Record {
        let (session, rule_info) = self.attribution(event.session_cgroup, event.rule_id);
        let profile = session.map(|s| s.grant.profile.clone());
        let rule = match (rule_info, &profile) {
            (Some(info), _) => info.rule.clone(),
            (None, Some(p)) => log::RuleRef::at(
                &self.profiles.profiles[p].default_origin,
                "default = \"deny\"",
            ),
            (None, None) => log::RuleRef {
                file: String::new(),
                line: 0,
                text: "process in an unregistered session cgroup (fail closed)".into(),
            },
        };
        let addr = if event.family == 4 {
            IpAddr::from([event.addr[0], event.addr[1], event.addr[2], event.addr[3]])
        } else {
            IpAddr::from(event.addr)
        };
        let host = rule_info.and_then(|r| r.host.clone()).or_else(|| {
            profile
                .as_deref()
                .and_then(|p| self.learned.name_of(p, addr))
                .map(str::to_owned)
        });
        log::Record {
            ts: clock.wall_time(event.boot_ns),
            profile: rule_info.map(|r| r.profile.clone()).or(profile),
            session: session.map(|s| s.grant.name.clone()),
            pid: event.tgid,
            uid: event.uid,
            comm: c_string(&event.comm),
            op: if event.op == OP_CONNECT {
                "connect"
            } else {
                "sendmsg"
            }
            .into(),
            verdict: verdict_name(event.verdict),
            target: SocketAddr::new(addr, event.port).to_string(),
            proto: match event.proto {
                PROTO_TCP => "tcp".into(),
                PROTO_UDP => "udp".into(),
                other => other.to_string(),
            },
            host,
            mode: None,
            rule,
        }
    }
}

/// A 64-bit digest of a rule list, to tell whether a kernel entry changed.
fn digest(list: &RuleList) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    list.len.hash(&mut hasher);
    for rule in &list.rules[..(list.len as usize).min(list.rules.len())] {
        (
            rule.port_lo,
            rule.port_hi,
            rule.proto,
            rule.action,
            rule.rule_id,
        )
            .hash(&mut hasher);
    }
    hasher.finish()
}

fn verdict_name(verdict: u8) -> String {
    if verdict == VERDICT_AUDIT {
        "audit"
    } else {
        "deny"
    }
    .into()
}

fn event_kind(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// Identity of a path as the kernel sees it (following symlinks).
fn stat_identity(path: &Path) -> Option<(u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (files::kernel_dev(m.dev()), m.ino()))
}

/// Mount points by device, to turn the filesystem-relative path a file
/// event carries into the path the opener saw.
struct Mounts(BTreeMap<u32, (String, String)>);

impl Mounts {
    fn read() -> Mounts {
        let mut by_dev = BTreeMap::new();
        for line in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(dev), Some(root), Some(point)) =
                (fields.get(2), fields.get(3), fields.get(4))
            else {
                continue;
            };
            let Some((major, minor)) = dev.split_once(':') else {
                continue;
            };
            let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
                continue;
            };
            by_dev
                .entry((major << 20) | minor)
                .or_insert_with(|| ((*root).to_owned(), (*point).to_owned()));
        }
        Mounts(by_dev)
    }

    fn path(&self, event: &FileEvent) -> String {
        let parts = usize::from(event.parts).min(event.path.len());
        let mut names: Vec<String> = event.path[..parts].iter().map(|p| c_string(p)).collect();
        if event.complete == 1 {
            names.pop(); // the filesystem root, "/"
        }
        names.reverse();
        let relative = format!("/{}", names.join("/"));
        let Some((root, point)) = self.0.get(&event.dev) else {
            return if event.complete == 1 {
                relative
            } else {
                format!("…{relative}")
            };
        };
        let inside = relative.strip_prefix(root.as_str()).unwrap_or(&relative);
        let joined = format!(
            "{}/{}",
            point.trim_end_matches('/'),
            inside.trim_start_matches('/')
        );
        if event.complete == 1 {
            joined
        } else {
            format!("…/{}", inside.trim_start_matches('/'))
        }
    }
}

/// Every rule of every profile, indexed by rule id: a profile's network
/// rules, then its file rules. Returns the table and each profile's first id.
fn rule_table(profiles: &ProfileSet) -> Result<(Vec<RuleInfo>, BTreeMap<String, u32>)> {
    let mut rules = Vec::new();
    let mut first_ids = BTreeMap::new();
    for profile in profiles.profiles.values() {
        first_ids.insert(profile.name.clone(), u32::try_from(rules.len())?);
        for r in &profile.rules {
            rules.push(RuleInfo {
                profile: profile.name.clone(),
                rule: log::RuleRef::at(&r.origin, &r.text),
                // A wildcard's name comes from what the address was learned
                // for.
                host: match &r.target.host {
                    Host::Name(n) => Some(n.clone()),
                    Host::Wildcard(_) | Host::Net(_) => None,
                },
            });
        }
        // File rules take the ids right after the profile's network rules.
        for r in &profile.file_rules {
            rules.push(RuleInfo {
                profile: profile.name.clone(),
                rule: log::RuleRef::at(&r.origin, &r.text),
                host: None,
            });
        }
    }
    Ok((rules, first_ids))
}

/// Kernel struct offsets for the file program, from the running kernel's BTF.
fn kernel_offsets() -> std::result::Result<enforcer_common::KernelOffsets, String> {
    crate::btf::file_offsets()
        .map_err(|e| format!("kernel struct offsets for file rules are unknown: {e}"))
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn unknown_profile(profiles: &ProfileSet, name: &str) -> String {
    let known: Vec<&str> = profiles.profiles.keys().map(String::as_str).collect();
    format!(
        "no profile named `{name}` (rules directory: {}); available: {}",
        profiles.dir.as_ref().map_or_else(
            || "none, built-in default only".into(),
            |d| d.display().to_string()
        ),
        known.join(", ")
    )
}

fn warn_unresolved(profile: &Profile, resolutions: &BTreeMap<String, Resolution>) {
    let mut missing = Vec::new();
    let mut failed: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for name in profile.host_names() {
        match resolutions.get(name).map(|r| &r.answer) {
            Some(Answer::Addresses(_)) => {}
            Some(Answer::NoSuchHost) => missing.push(name),
            Some(Answer::Failed(why)) => failed.entry(why.clone()).or_default().push(name),
            None => failed.entry("not resolved".into()).or_default().push(name),
        }
    }
    if !missing.is_empty() {
        tracing::warn!(
            "profile {}: {} host name(s) do not exist (no such host); their rules apply if they \
             appear: {} (`enforcer status` lists them all)",
            profile.name,
            missing.len(),
            some_of(&missing)
        );
    }
    for (why, names) in failed {
        tracing::warn!(
            "profile {}: {} host name(s) could not be resolved ({why}); retrying every {} s, their \
             rules apply once they resolve: {} (`enforcer status` lists them all)",
            profile.name,
            names.len(),
            crate::resolve::RETRY_AFTER_FAILURE.as_secs(),
            some_of(&names)
        );
    }
}

/// The first few names, and how many more there are.
fn some_of(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    if names.len() <= SHOWN {
        return names.join(", ");
    }
    format!(
        "{}, and {} more",
        names[..SHOWN].join(", "),
        names.len() - SHOWN
    )
}

/// Instances whose controller died leave cgroups behind. Empty ones are
/// removed; populated ones are reported, because nothing enforces them now.
fn sweep_stale_instances(root: &Path, adopted: &Path) {
    for dir in cgroup::children(root).unwrap_or_default() {
        if dir == adopted {
            continue;
        }
        let pid_alive = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<i32>().ok())
            // SAFETY: signal 0 only checks that the process exists.
            .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if pid_alive {
            continue;
        }
        if let Ok(false) = cgroup::populated(&dir) {
            let _ = cgroup::remove_tree(&dir);
        } else {
            tracing::error!(
                "{} holds processes whose controller is gone: a daemon's pinned programs still \
                 enforce them until a daemon with its --pin-dir adopts them; those of an \
                 `enforcer run` are NOT enforced: kill them or move them into a new session",
                dir.display()
            );
        }
    }
}

/// Converts the kernel's boot-time stamps to wall-clock time.
struct Clock {
    boot_ns: u64,
    wall: jiff::Timestamp,
}

impl Clock {
    fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
        let boot_ns = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(ts.tv_nsec).unwrap_or(0);
        Clock {
            boot_ns,
            wall: jiff::Timestamp::now(),
        }
    }

    fn wall_time(&self, event_boot_ns: u64) -> String {
        let ago = i64::try_from(self.boot_ns.saturating_sub(event_boot_ns)).unwrap_or(0);
        let ts = self
            .wall
            .checked_sub(jiff::SignedDuration::from_nanos(ago))
            .unwrap_or(self.wall);
        format!("{ts:.6}")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub controller: String,
    pub pid: u32,
    pub rules_dir: Option<String>,
    pub log: String,
    pub instance_cgroup: String,
    pub programs: Vec<String>,
    pub profiles: Vec<ProfileStatus>,
    pub sessions: Vec<SessionStatus>,
    pub counters: BTreeMap<String, u64>,
    pub features: crate::features::Features,
    pub dns: DnsStatus,
    /// The last reload, if any.
    pub reload: Option<ReloadStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Where session proxies forward queries.
    pub upstream: Option<String>,
    /// (address, rule) entries learned from answers and in force.
    pub learned: usize,
    /// Learned entries dropped before expiry to stay under the cap.
    pub learned_evicted: u64,
    pub proxy: StatsSnapshot,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProfileStatus {
    pub name: String,
    pub mode: String,
    pub default: String,
    pub source: String,
    pub kernel_entries: usize,
    pub unresolved: Vec<String>,
    pub rules: Vec<RuleStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleStatus {
    pub action: String,
    pub text: String,
    pub line: usize,
    pub hits: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionStatus {
    pub name: String,
    pub profile: String,
    pub cgroup: String,
    pub audit: bool,
    pub attached: bool,
    pub started: String,
}
