//! `enforcer`: keeps AI coding agents away from production hosts, enforced
//! by eBPF programs on cgroup socket hooks, whatever the agent decides.

mod agent;
mod btf;
mod cgroup;
mod control;
mod controller;
mod dns;
mod explain;
mod features;
mod kernel;
mod log;
mod persist;
mod policy;
mod resolve;
mod service;
mod watch;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::{
    control::{Client, Request, Response},
    controller::{Config, Controller, Status},
    policy::{ProfileSet, compile},
    resolve::{Answer, Resolver},
};

const DEFAULT_RULES: &str = "/etc/enforcer/rules";

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The controller daemon's control socket.
    #[arg(long, global = true, default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command (the agent) inside an enforced session.
    Run(RunArgs),
    /// Run the long-lived controller that serves `run`, `status` and `logs`.
    Daemon(DaemonArgs),
    /// Print the denial log.
    Logs(LogsArgs),
    /// Show what is loaded and attached, sessions, counters and kernel features.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate rule files; exits non-zero on any error.
    Check(CheckArgs),
    /// Say whether a connect to HOST[:PORT][/PROTO] from a session of a
    /// profile would be allowed, and by which rule (exit 0: allowed, 1: denied).
    Explain(ExplainArgs),
    /// Make the daemon load its rules directory again (as SIGHUP does); the
    /// rules in force stay in force if the new ones are invalid.
    Reload,
    /// Stop the daemon; with `--unload`, also remove enforcement (the only
    /// way it goes away).
    Stop(StopArgs),
}

#[derive(Args)]
struct ControllerArgs {
    /// Directory of profile files (`*.toml`). Without it (and with no
    /// /etc/enforcer/rules) only the built-in default profile exists.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Denial log file (JSON Lines) [default: /var/log/enforcer/denials.jsonl]
    #[arg(long)]
    log: Option<PathBuf>,
    /// Upstream DNS server (IP:PORT) for host-name rules and for the DNS
    /// proxy that sessions' queries are steered to [default: the first
    /// nameserver in /etc/resolv.conf].
    #[arg(long)]
    resolver: Option<SocketAddr>,
    /// Addresses learned from DNS answers stay allowed or denied at least
    /// this many seconds, however short the answer's TTL [default: 60].
    #[arg(long, value_name = "SECONDS")]
    dns_ttl_floor: Option<u64>,
    /// Most (address, rule) entries learned from DNS answers kept at once;
    /// past it, those closest to expiry are evicted (and counted)
    /// [default: 65536].
    #[arg(long, value_name = "N")]
    dns_learned_max: Option<usize>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// The profile the session is bound to.
    #[arg(long, default_value = "default")]
    profile: String,
    /// Allow everything, but log what the profile would deny.
    #[arg(long)]
    audit: bool,
    /// Under sudo, keep running the command as root instead of the invoking user.
    #[arg(long)]
    as_root: bool,
    /// If the profile's file rules cannot be enforced on this kernel, start
    /// anyway with the network rules only (logged as a degraded session).
    #[arg(long)]
    allow_degraded: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

#[derive(Args)]
struct DaemonArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    #[command(flatten)]
    pins: PinArgs,
}

#[derive(Args)]
struct PinArgs {
    /// Where the daemon pins its programs, links and maps in the BPF
    /// filesystem, so enforcement outlives it (a restarted daemon adopts
    /// them). The BPF filesystem refuses names with dots.
    #[arg(long, default_value = "/sys/fs/bpf/enforcer")]
    pin_dir: PathBuf,
}

impl PinArgs {
    /// The daemon's state file sits next to its control socket.
    fn persist(&self, socket: &Path) -> persist::Persist {
        persist::Persist {
            pin_root: self.pin_dir.clone(),
            state_file: socket.with_file_name("state.json"),
            socket: socket.to_owned(),
        }
    }
}

#[derive(Args)]
struct StopArgs {
    /// Also remove enforcement: detach the programs and delete the pins.
    /// Without it, the daemon stops and its sessions stay enforced by the
    /// pinned programs until a daemon adopts them.
    #[arg(long)]
    unload: bool,
    /// With `--unload`: kill the agents of live sessions instead of refusing.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    pins: PinArgs,
}

#[derive(Args)]
struct LogsArgs {
    /// Keep printing new entries as they are written.
    #[arg(short, long)]
    follow: bool,
    /// Print the raw JSON lines.
    #[arg(long)]
    json: bool,
    /// Only entries of this profile.
    #[arg(long)]
    profile: Option<String>,
    /// The log file [default: /var/log/enforcer/denials.jsonl]
    #[arg(long, default_value = log::DEFAULT_LOG)]
    log: PathBuf,
}

#[derive(Args)]
struct CheckArgs {
    #[arg(long, default_value = DEFAULT_RULES)]
    rules: PathBuf,
    /// Do not resolve host names (otherwise a name that does not resolve is an error).
    #[arg(long)]
    offline: bool,
    /// DNS server to resolve with instead of the system's (IP:PORT).
    #[arg(long)]
    resolver: Option<SocketAddr>,
}

#[derive(Args)]
struct ExplainArgs {
    #[arg(long, default_value = DEFAULT_RULES)]
    rules: PathBuf,
    #[arg(long, default_value = "default")]
    profile: String,
    /// DNS server to resolve with instead of the system's (IP:PORT).
    #[arg(long)]
    resolver: Option<SocketAddr>,
    /// `host`, `host:port`, `host:port/udp`, an address, `[v6]:port`
    /// [default port: 443/tcp].
    target: String,
}

impl ControllerArgs {
    fn config(&self, kind: &'static str, only_profiles: Option<Vec<String>>) -> Config {
        Config {
            rules_dir: self.rules.clone().unwrap_or_else(|| DEFAULT_RULES.into()),
            log: self.log.clone().unwrap_or_else(|| log::DEFAULT_LOG.into()),
            resolver: self.resolver,
            kind,
            only_profiles,
            persist: None,
            dns_ttl_floor: std::time::Duration::from_secs(self.dns_ttl_floor.unwrap_or(60)),
            dns_learned_max: self.dns_learned_max.unwrap_or(65_536),
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("enforcer: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("enforcer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(args) => run(&cli.socket, args).await,
        Command::Daemon(args) => daemon(&cli.socket, &args).await.map(|()| 0),
        Command::Logs(args) => {
            let filter = log::Filter {
                profile: args.profile,
            };
            tokio::task::spawn_blocking(move || {
                log::print(&args.log, args.json, args.follow, &filter)
            })
            .await??;
            Ok(0)
        }
        Command::Status { json } => status(&cli.socket, json).await,
        Command::Check(args) => check(&args).await,
        Command::Explain(args) => explain(&args).await,
        Command::Reload => reload(&cli.socket).await,
        Command::Stop(args) => stop(&cli.socket, &args).await,
    }
}

async fn explain(args: &ExplainArgs) -> Result<i32> {
    let set = ProfileSet::load(&args.rules).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(profile) = set.get(&args.profile) else {
        bail!(
            "no profile named `{}` in {}",
            args.profile,
            args.rules.display()
        );
    };
    let target = policy::target::Target::parse(&args.target)
        .map_err(|e| anyhow::anyhow!("`{}`: {e}", args.target))?;
    let (port, proto) = match (target.ports.is_any(), target.proto) {
        (true, enforcer_common::PROTO_ANY) => (443, enforcer_common::PROTO_TCP),
        (true, proto) => (443, proto),
        (false, enforcer_common::PROTO_ANY) => (target.ports.lo, enforcer_common::PROTO_TCP),
        (false, proto) => (target.ports.lo, proto),
    };
    let addresses = match &target.host {
        policy::target::Host::Name(name) => {
            match Resolver::new(args.resolver)?.resolve(name).await.answer {
                Answer::Addresses(a) => a,
                Answer::NoSuchHost | Answer::Failed(_) => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    let explanation = explain::explain(profile, &target.host, &addresses, port, proto)
        .map_err(|e| anyhow::anyhow!("`{}`: {e}", args.target))?;
    println!("profile {}:", profile.name);
    for line in &explanation.lines {
        println!("  {line}");
    }
    Ok(i32::from(!explanation.allowed))
}

async fn run(socket: &Path, args: RunArgs) -> Result<i32> {
    let drop_to = if args.as_root {
        None
    } else {
        agent::DropTo::from_sudo()?
    };
    let agent_uid = drop_to.as_ref().map_or_else(
        || nix::unistd::Uid::effective().as_raw(),
        agent::DropTo::uid,
    );
    if let Some(mut client) = Client::connect(socket).await? {
        refuse_conflicting_daemon_options(&mut client, &args.controller).await?;
        let grant = match client
            .request(&Request::OpenSession {
                profile: args.profile.clone(),
                audit: args.audit,
                uid: agent_uid,
                allow_degraded: args.allow_degraded,
            })
            .await?
        {
            Response::Session(grant) => grant,
            Response::Error(e) => bail!("the daemon refused the session: {e}"),
            other => bail!("unexpected reply from the daemon: {other:?}"),
        };
        let status = agent::run(&args.command, &grant.cgroup, drop_to.as_ref()).await;
        let closed = client.request(&Request::CloseSession).await;
        let status = status?;
        if let Response::Error(e) = closed? {
            tracing::error!("closing the session: {e}");
        }
        return Ok(agent::exit_code(status));
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "no enforcer daemon is listening on {} and starting an embedded controller needs \
             root: start `enforcer daemon` or use sudo",
            socket.display()
        );
    }
    let controller = Controller::start(
        args.controller
            .config("run", Some(vec![args.profile.clone()])),
    )
    .await?;
    let grant =
        controller.open_session(&args.profile, args.audit, agent_uid, args.allow_degraded)?;
    let status = agent::run(&args.command, &grant.cgroup, drop_to.as_ref()).await;
    // This controller stops enforcing when we exit, so anything the agent
    // left running is killed rather than left unprotected.
    let closed = controller.close_session(grant.cgroup_id, true);
    let status = status?;
    closed?;
    controller.shutdown()?;
    Ok(agent::exit_code(status))
}

/// With a daemon running, its rules and log are the ones in force.
async fn refuse_conflicting_daemon_options(
    client: &mut Client,
    args: &ControllerArgs,
) -> Result<()> {
    let dns_options =
        args.resolver.is_some() || args.dns_ttl_floor.is_some() || args.dns_learned_max.is_some();
    if args.rules.is_none() && args.log.is_none() && !dns_options {
        return Ok(());
    }
    let Response::Status(status) = client.request(&Request::Status).await? else {
        bail!("the daemon did not report its status");
    };
    let differs = |given: &Option<PathBuf>, used: Option<&str>| {
        given
            .as_ref()
            .is_some_and(|g| Some(g.display().to_string().as_str()) != used)
    };
    if differs(&args.rules, status.rules_dir.as_deref())
        || differs(&args.log, Some(status.log.as_str()))
        || dns_options
    {
        bail!(
            "a daemon (pid {}) is running with rules {} and log {}; `--rules`, `--log`, \
             `--resolver` and `--dns-*` cannot change them per session: drop those options or \
             stop the daemon",
            status.pid,
            status.rules_dir.as_deref().unwrap_or("<built-in>"),
            status.log
        );
    }
    Ok(())
}

async fn daemon(socket: &Path, args: &DaemonArgs) -> Result<()> {
    let listener = control::bind(socket).await?;
    let mut config = args.controller.config("daemon", None);
    config.persist = Some(args.pins.persist(socket));
    let rules_dir = config.rules_dir.clone();
    let controller = Controller::start(config).await?;
    if rules_dir.is_dir() {
        watch::spawn(&rules_dir, controller.clone())?;
    } else {
        tracing::info!(
            "no rules directory {} (built-in default only); create it and send SIGHUP to load it",
            rules_dir.display()
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    service::spawn_watchdog();
    service::notify(&["READY=1", "STATUS=enforcing"]);
    tracing::info!("enforcer daemon ready on {}", socket.display());
    let serving = control::serve(listener, controller.clone());
    tokio::pin!(serving);
    loop {
        tokio::select! {
            () = &mut serving => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            () = controller.stop_requested() => break,
            _ = hangup.recv() => {
                // SIGHUP: logrotate moved the log away, or the rules changed.
                if let Err(e) = controller.reopen_log() {
                    tracing::error!("reopening the denial log: {e:#}");
                }
                let _ = controller.reload().await;
            }
        }
    }
    service::notify(&["STOPPING=1"]);
    let _ = std::fs::remove_file(socket);
    if controller.persists() {
        // The pins keep enforcing; the next daemon adopts the sessions.
        controller.leave_enforcing();
        return Ok(());
    }
    // Unloaded (`enforcer stop --unload`): enforcement ends with this
    // process, so the agents end with it.
    controller.kill_all_sessions()?;
    controller.shutdown()
}

async fn stop(socket: &Path, args: &StopArgs) -> Result<i32> {
    if let Some(mut client) = Client::connect(socket).await? {
        let request = Request::Stop {
            unload: args.unload,
            force: args.force,
        };
        return match client.request(&request).await? {
            Response::Stopped => {
                println!(
                    "{}",
                    if args.unload {
                        "stopped; enforcement removed"
                    } else {
                        "stopped; sessions stay enforced until a daemon adopts them"
                    }
                );
                Ok(0)
            }
            Response::Error(e) => {
                eprintln!("enforcer: {e}");
                Ok(1)
            }
            other => bail!("unexpected reply from the daemon: {other:?}"),
        };
    }
    if !args.unload {
        println!("no daemon on {}; nothing to stop", socket.display());
        return Ok(0);
    }
    // No daemon: remove what a dead one left pinned.
    let persist = args.pins.persist(socket);
    controller::unload_orphaned(&persist, args.force)?;
    println!("enforcement removed ({})", persist.pin_root.display());
    Ok(0)
}

async fn reload(socket: &Path) -> Result<i32> {
    let Some(mut client) = Client::connect(socket).await? else {
        bail!(
            "no daemon on {}: `enforcer reload` reloads a running daemon's rules",
            socket.display()
        );
    };
    match client.request(&Request::Reload).await? {
        Response::Reloaded(summary) => {
            println!("reloaded: {summary}");
            Ok(0)
        }
        Response::Error(e) => {
            eprintln!("enforcer: reload failed; the rules in force stay in force: {e}");
            Ok(1)
        }
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

async fn status(socket: &Path, json: bool) -> Result<i32> {
    let Some(mut client) = Client::connect(socket).await? else {
        let features = features::detect(kernel::probe_file_enforcement());
        if json {
            println!(
                "{}",
                serde_json::json!({ "controller": null, "features": features })
            );
        } else {
            println!("controller: none (no daemon on {})", socket.display());
            print_features(&features);
        }
        return Ok(0);
    };
    match client.request(&Request::Status).await? {
        Response::Status(status) if json => println!("{}", serde_json::to_string_pretty(&status)?),
        Response::Status(status) => print_status(&status),
        Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
    Ok(0)
}

fn print_features(f: &features::Features) {
    println!("kernel: {}", f.kernel);
    println!("cgroup2: {}", f.cgroup2.as_deref().unwrap_or("NOT MOUNTED"));
    println!("btf: {}", if f.btf { "yes" } else { "no" });
    println!(
        "lsm: {}",
        f.lsm
            .as_deref()
            .unwrap_or("unknown (securityfs not mounted)")
    );
    println!("file rules: {}", f.file_rules);
    // The guards are BPF-LSM programs loaded with the file programs.
    println!("session guards: {}", f.file_rules);
}

fn print_status(s: &Status) {
    println!("controller: {} (pid {})", s.controller, s.pid);
    println!(
        "rules: {}",
        s.rules_dir.as_deref().unwrap_or("built-in default only")
    );
    println!("log: {}", s.log);
    println!("cgroup: {}", s.instance_cgroup);
    println!("programs attached: {}", s.programs.join(", "));
    print_features(&s.features);
    println!("counters:");
    for (name, value) in &s.counters {
        println!("  {name}: {value}");
    }
    if let Some(r) = &s.reload {
        match &r.error {
            None => println!("last reload: {} ok", r.at),
            Some(e) => println!(
                "last reload: {} FAILED (previous rules in force): {e}",
                r.at
            ),
        }
    }
    let d = &s.dns;
    println!(
        "dns: upstream {}; {} queries, {} refused, {} servfail, {} dropped; {} learned entries, {} evicted",
        d.upstream
            .as_deref()
            .unwrap_or("NONE (queries answered SERVFAIL)"),
        d.proxy.queries,
        d.proxy.refused,
        d.proxy.servfail,
        d.proxy.dropped,
        d.learned,
        d.learned_evicted
    );
    println!("profiles:");
    for p in &s.profiles {
        println!(
            "  {} ({}, default {}, {} rules, {} kernel entries) from {}",
            p.name,
            p.mode,
            p.default,
            p.rules.len(),
            p.kernel_entries,
            p.source
        );
        for u in &p.unresolved {
            println!("    unresolved: {u}");
        }
        for r in p.rules.iter().filter(|r| r.hits > 0) {
            println!(
                "    {} hits: line {} {} {:?}",
                r.hits, r.line, r.action, r.text
            );
        }
    }
    println!("sessions:");
    for s in &s.sessions {
        println!(
            "  {} profile={} audit={} attached={} since {} cgroup={}",
            s.name, s.profile, s.audit, s.attached, s.started, s.cgroup
        );
    }
}

async fn check(args: &CheckArgs) -> Result<i32> {
    let set = match ProfileSet::load(&args.rules) {
        Ok(set) => set,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            return Ok(1);
        }
    };
    let resolved = if args.offline {
        BTreeMap::new()
    } else {
        let resolver = Resolver::new(args.resolver)?;
        let names: Vec<&str> = set
            .profiles
            .values()
            .flat_map(policy::Profile::host_names)
            .collect();
        resolver.resolve_all(names).await
    };
    let mut failures = 0;
    let mut rule_count = 0;
    for profile in set.profiles.values() {
        rule_count += profile.rules.len();
        if !args.offline {
            for rule in &profile.rules {
                let policy::target::Host::Name(name) = &rule.target.host else {
                    continue;
                };
                let problem = match resolved.get(name).map(|r| &r.answer) {
                    Some(Answer::Addresses(_)) => continue,
                    Some(Answer::NoSuchHost) => "no such host".to_owned(),
                    Some(Answer::Failed(why)) => format!("resolving failed: {why}"),
                    None => "not resolved".to_owned(),
                };
                eprintln!(
                    "error: {}:{}: `{}`: `{}`: {problem} (use --offline to skip resolving)",
                    rule.origin.file, rule.origin.line, rule.origin.key, rule.text
                );
                failures += 1;
            }
        }
        let addresses = resolved
            .iter()
            .filter_map(|(n, r)| match &r.answer {
                Answer::Addresses(a) => Some((n.clone(), a.clone())),
                _ => None,
            })
            .collect();
        if let Err(e) = compile::compile(profile, 0, &addresses) {
            eprintln!("error: {e}");
            failures += 1;
        }
    }
    if failures > 0 {
        return Ok(1);
    }
    println!(
        "ok: {} profile(s), {} rule(s) in {}",
        set.profiles.len(),
        rule_count,
        set.dir.as_ref().map_or_else(
            || "built-in default (no rules directory)".into(),
            |d| d.display().to_string()
        )
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
