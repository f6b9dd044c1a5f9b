//! The host-kernel part: connect and sendto overhead (no enforcer, agent
//! sessions, nftables, a process outside any session), denied-connect
//! events, and rule loading.

use std::{
    ffi::OsStr,
    fs::{self, File},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use enforcer_bench::{Worker, interleave, median};
use serde_json::Value;

use super::{
    Settings,
    report::Table,
    rules::{self, NetRule},
};

/// The programs under test and a scratch directory.
pub struct Tools<'a> {
    pub enforcer: &'a Path,
    pub bench: &'a Path,
    pub work: &'a Path,
}

impl Tools<'_> {
    fn bench(&self) -> Command {
        Command::new(self.bench)
    }
}

/// The last line of `text` that is a JSON object.
pub fn last_json(text: &str) -> Result<Value> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON line in {text:?}"))?;
    serde_json::from_str(line).with_context(|| format!("bad JSON: {line}"))
}

/// Loopback endpoints the benchmark connects and sends to, served by this
/// process (so their side of the traffic is in no scenario's cgroup).
struct Targets {
    tcp: SocketAddr,
    udp: SocketAddr,
    /// Never read: once its buffer is full the kernel drops what arrives,
    /// the same in every scenario.
    _udp: UdpSocket,
}

impl Targets {
    fn start() -> Result<Targets> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a TCP listener")?;
        // A long accept queue (listen again to raise the backlog), so that a
        // burst of connects never waits for the accepting thread.
        // SAFETY: a listening socket we own.
        if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
            return Err(std::io::Error::last_os_error()).context("raising the listen backlog");
        }
        let tcp = listener.local_addr()?;
        // Accepts and closes for the rest of the run.
        thread::spawn(move || {
            for connection in listener.incoming() {
                drop(connection);
            }
        });
        let udp_socket = UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket")?;
        Ok(Targets {
            tcp,
            udp: udp_socket.local_addr()?,
            _udp: udp_socket,
        })
    }
}

/// Where the benchmark's daemons pin their enforcement (removed with
/// `enforcer stop --unload` when they stop).
pub const PIN_DIR: &str = "/sys/fs/bpf/enforcer-bench";

/// A running `enforcer daemon`, stopped with `enforcer stop --unload
/// --force` (which ends its sessions and removes its pinned enforcement)
/// when dropped.
pub struct Daemon<'a> {
    tools: &'a Tools<'a>,
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

const READY_TIMEOUT: Duration = Duration::from_mins(3);

impl<'a> Daemon<'a> {
    /// Starts a daemon on `rules` in `dir` and waits until it says it is
    /// ready; returns it and how long that took.
    pub fn start(
        tools: &'a Tools<'a>,
        rules: &Path,
        dir: &Path,
        extra: &[&str],
    ) -> Result<(Daemon<'a>, Duration)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("control.sock");
        let log = dir.join("denials.jsonl");
        let stderr_path = dir.join("daemon.stderr");
        let _ = fs::remove_file(&socket);
        let _ = fs::remove_file(&log);
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let started = Instant::now();
        let child = Command::new(tools.enforcer)
            .arg("--socket")
            .arg(&socket)
            .arg("daemon")
            .arg("--rules")
            .arg(rules)
            .arg("--log")
            .arg(&log)
            .args(["--pin-dir", PIN_DIR])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} daemon", tools.enforcer.display()))?;
        let mut daemon = Daemon {
            tools,
            child,
            socket,
            log,
        };
        loop {
            let said = fs::read_to_string(&stderr_path).unwrap_or_default();
            if said.contains("enforcer daemon ready") {
                return Ok((daemon, started.elapsed()));
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("the enforcer daemon exited ({status}) before it was ready:\n{said}");
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("the enforcer daemon was not ready after {READY_TIMEOUT:?}:\n{said}");
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// `enforcer --socket S <args>`.
    pub fn enforcer(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.tools.enforcer);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd
    }

    /// `enforcer run --profile P [extra] -- program args...` through this daemon.
    pub fn session(&self, profile: &str, extra: &[&str], program: &Path) -> Command {
        let mut cmd = self.enforcer(&["run", "--profile", profile]);
        cmd.args(extra).arg("--").arg(program);
        cmd
    }

    pub fn status(&self) -> Result<Value> {
        let out = self
            .enforcer(&["status", "--json"])
            .output()
            .context("running enforcer status")?;
        ensure!(
            out.status.success(),
            "enforcer status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: Value =
            serde_json::from_slice(&out.stdout).context("enforcer status --json")?;
        ensure!(
            status["controller"] == "daemon",
            "enforcer status did not reach the daemon: {status}"
        );
        Ok(status)
    }

    /// Peak and current resident memory (`VmHWM`, `VmRSS`) in KiB.
    pub fn memory_kib(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.child.id());
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// `enforcer stop --unload --force` and wait (a hung daemon is killed
    /// after 20 s, and what it pinned removed).
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        let mut stop = self.enforcer(&["stop", "--unload", "--force", "--pin-dir", PIN_DIR]);
        stop.stdout(Stdio::null());
        let mut unload = move || stop.status();
        if self.child.try_wait()?.is_some() {
            // Gone already: remove what it left pinned.
            unload()?;
            return Ok(());
        }
        let stopped = unload()?;
        ensure!(
            stopped.success(),
            "`enforcer stop --unload --force` failed ({stopped})"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "the enforcer daemon exited with {status}");
                return Ok(());
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        self.child.wait()?;
        unload()?;
        bail!("the enforcer daemon did not stop within 20 s of `enforcer stop`; killed")
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("xtask bench: stopping the daemon: {e:#}");
        }
    }
}

/// A cgroup of our own, removed when dropped (it is empty by then: the
/// processes that joined it have exited).
struct Cgroup {
    path: PathBuf,
    /// Its path as `nft` takes it (relative to `/sys/fs/cgroup`).
    nft_path: String,
}

impl Cgroup {
    /// Its level in the cgroup2 hierarchy: it sits right under the root.
    const LEVEL: usize = 1;

    fn create(name: &str) -> Result<Cgroup> {
        let mount = cgroup2_mount()?;
        let path = mount.join(name);
        // nft resolves `socket cgroupv2` paths under /sys/fs/cgroup,
        // whatever the mount point.
        let nft_path = path
            .strip_prefix("/sys/fs/cgroup")
            .map(|p| p.display().to_string())
            .with_context(|| {
                format!(
                    "cgroup2 is mounted at {}, outside /sys/fs/cgroup, where nft looks for it",
                    mount.display()
                )
            })?;
        fs::create_dir(&path).with_context(|| format!("creating the cgroup {}", path.display()))?;
        Ok(Cgroup { path, nft_path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!(
                "xtask bench: could not remove the cgroup {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 file system is mounted")
}

/// An nftables table, deleted when dropped.
struct NftTable(String);

impl NftTable {
    /// Runs `nft -f` on `script` (written to `work/<file>`); returns how
    /// long it took.
    fn apply(script: &str, work: &Path, file: &str) -> Result<Duration> {
        let path = work.join(file);
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        let started = Instant::now();
        let out = Command::new("nft")
            .arg("-f")
            .arg(&path)
            .output()
            .context("running nft (from the nftables package)")?;
        let took = started.elapsed();
        ensure!(
            out.status.success(),
            "nft -f {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(took)
    }

    /// Loads `script`, which creates table `name`; returns the table and
    /// how long `nft -f` took.
    fn load(name: &str, script: &str, work: &Path) -> Result<(NftTable, Duration)> {
        let took = Self::apply(script, work, &format!("{name}.nft"))?;
        Ok((NftTable(name.to_owned()), took))
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let deleted = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
        if !deleted.is_ok_and(|s| s.success()) {
            eprintln!(
                "xtask bench: could not delete nft table inet {}; delete it by hand",
                self.0
            );
        }
    }
}

/// The table's output chain (the rules), present while this lives: the
/// sets stay loaded between rounds, so only the chain that consults them
/// comes and goes, and the other phases run with no nftables hook at all.
struct NftChain<'a> {
    table: &'a NftTable,
    work: &'a Path,
}

impl<'a> NftChain<'a> {
    fn add(table: &'a NftTable, rules: &str, work: &'a Path) -> Result<NftChain<'a>> {
        NftTable::apply(rules, work, "chain-add.nft")?;
        Ok(NftChain { table, work })
    }
}

impl Drop for NftChain<'_> {
    fn drop(&mut self) {
        let name = &self.table.0;
        let script = format!("flush chain inet {name} output\ndelete chain inet {name} output\n");
        if let Err(e) = NftTable::apply(&script, self.work, "chain-delete.nft") {
            eprintln!("xtask bench: {e:#}");
        }
    }
}

/// What the host part measured.
pub struct HostResults {
    pub tcp: Table,
    pub udp: Table,
    /// How long `nft -f` of the sets of the largest rule set took.
    pub nft_load: Duration,
    pub flood: Flood,
    pub loading: Loading,
    pub dns: DnsBench,
}

pub fn scenario_session(count: usize) -> String {
    format!("session-{count}")
}

pub fn scenario_nft(count: usize) -> String {
    format!("nftables-{count}")
}

/// Phases of a round, rotated from round to round so that none always
/// runs first.
#[derive(Clone, Copy)]
enum Phase {
    /// Nothing loaded: the baseline.
    Bare,
    /// The nftables chain in place: a process in its cgroup, and one
    /// outside.
    Nft,
    /// The daemon with every session profile: a process in a session of
    /// each, and one outside them all.
    Daemon,
}

/// Prefixes of the cgroup and nftables table of one run, followed by the
/// pid of its xtask.
const CGROUP_PREFIX: &str = "enforcer-bench-";
const TABLE_PREFIX: &str = "enforcer_bench_";

/// Removes the cgroups and nftables tables of runs whose xtask is gone
/// (killed before it could clean up).
fn remove_stale() {
    let gone = |pid: &str| pid.parse().is_ok_and(crate::process_gone);
    if let Ok(entries) = cgroup2_mount().and_then(|m| Ok(fs::read_dir(m)?)) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            if let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(CGROUP_PREFIX))
                && gone(pid)
            {
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
    if let Ok(out) = Command::new("nft").args(["list", "tables"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(pid) = line.strip_prefix(&format!("table inet {TABLE_PREFIX}"))
                && gone(pid)
            {
                drop(NftTable(format!("{TABLE_PREFIX}{pid}")));
            }
        }
    }
}

pub fn run(tools: &Tools<'_>, settings: &Settings) -> Result<HostResults> {
    remove_stale();
    let targets = Targets::start()?;
    let largest = *settings.net_counts.last().expect("rule counts");
    let rules_dir = tools.work.join("net-rules");
    fs::create_dir_all(&rules_dir)?;
    fs::write(rules_dir.join("default.toml"), rules::EMPTY_DEFAULT)?;
    let all_rules = rules::net_rules(largest);
    for &count in &settings.net_counts {
        let name = scenario_session(count);
        fs::write(
            rules_dir.join(format!("{name}.toml")),
            rules::net_profile(&name, &all_rules[..count]),
        )?;
    }
    let cgroup = Cgroup::create(&format!("{CGROUP_PREFIX}{}", std::process::id()))?;
    let table_name = format!("{TABLE_PREFIX}{}", std::process::id());
    let (table, nft_load) = NftTable::load(
        &table_name,
        &rules::nft_sets(&table_name, &all_rules),
        tools.work,
    )?;
    let nft_chain = rules::nft_chain(&table_name, &cgroup.nft_path, Cgroup::LEVEL);

    let mut tables = [
        Table::new("TCP connect + close to 127.0.0.1", "ns/op"),
        Table::new("UDP sendto 127.0.0.1", "ns/op"),
    ];
    let requests = [
        format!("tcp {} {}", targets.tcp, settings.tcp_batch),
        format!("udp {} {}", targets.udp, settings.udp_batch),
    ];
    let phases = [Phase::Bare, Phase::Nft, Phase::Daemon];
    let started = Instant::now();
    for round in 0..settings.rounds {
        println!(
            "xtask bench: host round {} of {} ({:.0?} so far)",
            round + 1,
            settings.rounds,
            started.elapsed()
        );
        for i in 0..phases.len() {
            let setup = PhaseSetup {
                tools,
                settings,
                rules_dir: &rules_dir,
                table: &table,
                nft_chain: &nft_chain,
                cgroup: &cgroup,
            };
            let mut phase = setup.start(phases[(round + i) % phases.len()])?;
            let workers = &mut phase.workers;
            for (table, request) in tables.iter_mut().zip(&requests) {
                let figures = interleave(workers, request, settings.batches)?;
                let median = |scenario: &str| median(&figures[scenario]);
                // In worker order, so the table lists scenarios as started.
                for worker in workers.iter() {
                    if table.get(&worker.scenario).map_or(0, |s| s.samples.len()) == round {
                        table.push(&worker.scenario, median(&worker.scenario));
                    }
                }
                for (scenario, reference) in &phase.pairs {
                    table.push_alongside(scenario, reference, median(scenario) / median(reference));
                }
            }
        }
    }
    drop(table);
    drop(cgroup);
    let flood = flood(tools, settings)?;
    let loading = loading(tools, settings, &all_rules)?;
    let dns = dns(tools, settings)?;
    let [tcp, udp] = tables;
    Ok(HostResults {
        tcp,
        udp,
        nft_load,
        flood,
        loading,
        dns,
    })
}

/// `cmd serve`.
fn serve(mut cmd: Command) -> Command {
    cmd.arg("serve");
    cmd
}

/// What a phase needs to start.
struct PhaseSetup<'a> {
    tools: &'a Tools<'a>,
    settings: &'a Settings,
    rules_dir: &'a Path,
    table: &'a NftTable,
    nft_chain: &'a str,
    cgroup: &'a Cgroup,
}

/// One phase of a round, running. Fields drop in order: the workers end
/// before their daemon or chain goes.
struct RunningPhase<'a> {
    workers: Vec<Worker>,
    /// `(scenario, the scenario measured alongside it that it is compared
    /// with)`.
    pairs: Vec<(String, &'static str)>,
    _daemon: Option<Daemon<'a>>,
    _chain: Option<NftChain<'a>>,
}

impl<'a> PhaseSetup<'a> {
    /// Starts the phase's state and workers. Every phase has as many
    /// workers as the daemon phase (the reference scenario's are pooled),
    /// so that each process waits the same while the others take turns.
    fn start(&self, phase: Phase) -> Result<RunningPhase<'a>> {
        let tools = self.tools;
        let per_phase = self.settings.net_counts.len() + 1;
        let largest = *self.settings.net_counts.last().expect("rule counts");
        Ok(match phase {
            Phase::Bare => RunningPhase {
                workers: (0..per_phase)
                    .map(|_| Worker::spawn("baseline", serve(tools.bench())))
                    .collect::<Result<_>>()?,
                pairs: vec![],
                _daemon: None,
                _chain: None,
            },
            Phase::Nft => {
                let chain = NftChain::add(self.table, self.nft_chain, tools.work)?;
                let mut in_cgroup = tools.bench();
                in_cgroup.arg("--cgroup").arg(&self.cgroup.path);
                let nft = scenario_nft(largest);
                let mut workers = vec![Worker::spawn(&nft, serve(in_cgroup))?];
                for _ in 1..per_phase {
                    workers.push(Worker::spawn(NFT_OUTSIDE, serve(tools.bench()))?);
                }
                RunningPhase {
                    workers,
                    pairs: vec![(nft, NFT_OUTSIDE)],
                    _daemon: None,
                    _chain: Some(chain),
                }
            }
            Phase::Daemon => {
                let (daemon, _) =
                    Daemon::start(tools, self.rules_dir, &tools.work.join("daemon"), &[])?;
                let mut workers = Vec::new();
                let mut pairs = Vec::new();
                for &count in &self.settings.net_counts {
                    let profile = scenario_session(count);
                    workers.push(Worker::spawn(
                        &profile,
                        serve(daemon.session(&profile, &[], tools.bench)),
                    )?);
                    pairs.push((profile, "outside"));
                }
                workers.push(Worker::spawn("outside", serve(tools.bench()))?);
                RunningPhase {
                    workers,
                    pairs,
                    _daemon: Some(daemon),
                    _chain: None,
                }
            }
        })
    }
}

/// A process outside the nftables cgroup while the chain is in place.
pub const NFT_OUTSIDE: &str = "nft-outside";

/// Denied operations from several processes in one session: how many were
/// attempted, how many reached the log, how many the kernel counted lost.
pub struct Flood {
    pub what: String,
    pub procs: u32,
    pub attempted: u64,
    pub delivered: u64,
    pub lost: u64,
    /// The kernel's `denied` counter.
    pub denied: u64,
    /// How long the processes spent attempting.
    pub attempt_time: Duration,
    /// From starting the session until `enforcer run` returned (by then the
    /// controller has written every queued event); not timed in the VM.
    pub wall: Option<Duration>,
}

impl Flood {
    pub fn exact(&self) -> bool {
        self.delivered + self.lost == self.attempted
    }

    #[expect(clippy::cast_precision_loss, reason = "event counts")]
    pub fn delivered_per_sec(&self) -> Option<f64> {
        self.wall
            .map(|wall| self.delivered as f64 / wall.as_secs_f64())
    }
}

/// The address the flood connects to: loopback, denied by the profile.
const FLOOD_TARGET: &str = "127.66.0.1:9";

fn flood(tools: &Tools<'_>, settings: &Settings) -> Result<Flood> {
    let rules_dir = tools.work.join("flood-rules");
    fs::create_dir_all(&rules_dir)?;
    fs::write(rules_dir.join("default.toml"), rules::EMPTY_DEFAULT)?;
    fs::write(
        rules_dir.join("flood.toml"),
        "name = \"flood\"\n[network]\ndeny = [\"127.66.0.1\"]\n",
    )?;
    println!(
        "xtask bench: denied connects from {} processes for {} ms",
        settings.flood_procs, settings.flood_millis
    );
    let (daemon, _) = Daemon::start(tools, &rules_dir, &tools.work.join("flood"), &[])?;
    let started = Instant::now();
    let out = daemon
        .session("flood", &[], tools.bench)
        .args(["flood", "tcp", FLOOD_TARGET, "--procs"])
        .arg(settings.flood_procs.to_string())
        .arg("--millis")
        .arg(settings.flood_millis.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running the flood session")?;
    let wall = started.elapsed();
    ensure!(
        out.status.success(),
        "the flood session failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result = last_json(&String::from_utf8_lossy(&out.stdout))?;
    let counters = &daemon.status()?["counters"];
    let delivered = count_log_records(&daemon.log, "connect", "flood")?;
    let flood = Flood {
        what: format!("denied TCP connects to {FLOOD_TARGET} (host)"),
        procs: settings.flood_procs,
        attempted: result["attempted"].as_u64().context("attempted")?,
        delivered,
        lost: counters["events_lost"].as_u64().context("events_lost")?,
        denied: counters["denied"].as_u64().context("denied")?,
        attempt_time: Duration::from_secs_f64(result["millis"].as_f64().context("millis")? / 1e3),
        wall: Some(wall),
    };
    daemon.stop()?;
    Ok(flood)
}

/// Records in the denial log `log` with this `op` and profile.
fn count_log_records(log: &Path, op: &str, profile: &str) -> Result<u64> {
    let text = fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut count = 0;
    for line in text.lines() {
        let record: Value =
            serde_json::from_str(line).with_context(|| format!("a bad log line: {line}"))?;
        if record["op"] == op && record["profile"] == profile {
            count += 1;
        }
    }
    Ok(count)
}

/// Rule loading, repeated: daemon start to ready with the big rule set,
/// its memory, opening a session, and `enforcer check`.
#[derive(Default)]
pub struct Loading {
    pub net_rules: usize,
    pub file_rules: usize,
    pub ready: Vec<Duration>,
    pub hwm_kib: Vec<u64>,
    pub rss_kib: Vec<u64>,
    pub session: Vec<Duration>,
    /// `enforcer reload` of the same rules, with a session live.
    pub reload: Vec<Duration>,
    pub check: Vec<Duration>,
}

fn loading(tools: &Tools<'_>, settings: &Settings, net: &[NetRule]) -> Result<Loading> {
    let rules_dir = tools.work.join("load-rules");
    fs::create_dir_all(&rules_dir)?;
    fs::write(rules_dir.join("default.toml"), rules::EMPTY_DEFAULT)?;
    let (files, _) = rules::file_rules(settings.load_file_rules, "/nonexistent/enforcer-bench");
    let mut toml = rules::net_profile("load", net);
    // The file section after the network one: the same profile.
    toml.push_str(
        rules::file_profile("load", &files)
            .split_once('\n')
            .map_or("", |(_, rest)| rest),
    );
    fs::write(rules_dir.join("load.toml"), toml)?;
    let mut loading = Loading {
        net_rules: net.len(),
        file_rules: files.len(),
        ..Loading::default()
    };
    for repeat in 0..settings.load_repeats {
        println!(
            "xtask bench: loading {} network and {} file rules ({} of {})",
            net.len(),
            files.len(),
            repeat + 1,
            settings.load_repeats
        );
        let (daemon, ready) = Daemon::start(tools, &rules_dir, &tools.work.join("load"), &[])?;
        loading.ready.push(ready);
        let started = Instant::now();
        let status = daemon
            .session("load", &["--allow-degraded"], Path::new("true"))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("opening a session")?;
        ensure!(
            status.success(),
            "a session of the loaded profile failed ({status})"
        );
        loading.session.push(started.elapsed());
        let started = Instant::now();
        let out = daemon
            .enforcer(&["reload"])
            .output()
            .context("running enforcer reload")?;
        ensure!(
            out.status.success(),
            "enforcer reload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        loading.reload.push(started.elapsed());
        let (hwm, rss) = daemon.memory_kib()?;
        loading.hwm_kib.push(hwm);
        loading.rss_kib.push(rss);
        daemon.stop()?;

        let started = Instant::now();
        let out = Command::new(tools.enforcer)
            .args([
                OsStr::new("check"),
                OsStr::new("--offline"),
                OsStr::new("--rules"),
            ])
            .arg(&rules_dir)
            .output()
            .context("running enforcer check")?;
        ensure!(
            out.status.success(),
            "enforcer check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        loading.check.push(started.elapsed());
    }
    Ok(loading)
}

/// DNS queries through a session's proxy (steered there by the kernel from
/// a resolver address that does not exist), and the same queries to the
/// same upstream (Debian's dnsmasq) asked directly from outside any session,
/// alternating round by round. Each round: `{median_us, p99_us, qps}`.
#[derive(Default)]
pub struct DnsBench {
    pub queries: u32,
    pub direct: Vec<Value>,
    pub proxied: Vec<Value>,
}

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const DNS_NAME: &str = "api.allowed.bench";

fn dns(tools: &Tools<'_>, settings: &Settings) -> Result<DnsBench> {
    let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let upstream = format!("127.0.0.1:{port}");
    let mut dnsmasq = Command::new(DNSMASQ)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file=",
            "--local-ttl=300",
            "--cache-size=1000",
            &format!("--port={port}"),
            "--address=/allowed.bench/127.0.0.77",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {DNSMASQ} (Debian's dnsmasq-base)"))?;
    let result = (|| {
        let started = Instant::now();
        while std::net::TcpStream::connect(&upstream).is_err() {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "dnsmasq did not come up"
            );
            thread::sleep(Duration::from_millis(20));
        }
        let rules_dir = tools.work.join("dns-rules");
        fs::create_dir_all(&rules_dir)?;
        fs::write(rules_dir.join("default.toml"), rules::EMPTY_DEFAULT)?;
        fs::write(
            rules_dir.join("dns.toml"),
            "name = \"dns\"\n[network]\ndeny = [\"*.denied.bench\"]\n",
        )?;
        let (daemon, _) = Daemon::start(
            tools,
            &rules_dir,
            &tools.work.join("dns"),
            &["--resolver", &upstream],
        )?;
        let count = settings.dns_queries.to_string();
        let mut bench = DnsBench {
            queries: settings.dns_queries,
            ..DnsBench::default()
        };
        println!(
            "xtask bench: DNS, {} rounds of {count} queries, direct and through the proxy",
            settings.dns_rounds
        );
        for _ in 0..settings.dns_rounds {
            let direct = Command::new(tools.bench)
                .args(["dns", &upstream, DNS_NAME, &count])
                .output()
                .context("querying dnsmasq directly")?;
            ensure!(
                direct.status.success(),
                "{}",
                String::from_utf8_lossy(&direct.stderr)
            );
            bench
                .direct
                .push(last_json(&String::from_utf8_lossy(&direct.stdout))?);
            let proxied = daemon
                .session("dns", &[], tools.bench)
                .args(["dns", "10.255.0.53:53", DNS_NAME, &count])
                .stdin(Stdio::null())
                .output()
                .context("querying through the session's proxy")?;
            ensure!(
                proxied.status.success(),
                "{}",
                String::from_utf8_lossy(&proxied.stderr)
            );
            bench
                .proxied
                .push(last_json(&String::from_utf8_lossy(&proxied.stdout))?);
        }
        daemon.stop()?;
        Ok(bench)
    })();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    result
}
