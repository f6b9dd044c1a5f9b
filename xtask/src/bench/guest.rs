//! The VM part: `open` + `close` overhead under BPF LSM (Debian's 6.1 cloud
//! kernel in QEMU), against no enforcer and Landlock, and denied-open
//! events. A shell script runs the rounds in the guest and prints one
//! `BENCH <round> <scenario> <json>` line per figure.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{
    Settings,
    host::{Flood, scenario_session},
    report::Table,
    rules,
};
use crate::vm;

/// Where the rules and generated files live in the guest.
const GUEST_RULES: &str = "/bench/rules";
const GUEST_FLOOD_RULES: &str = "/bench/flood-rules";
const GUEST_PATHS: &str = "/bench/paths.txt";
/// Everything the file rules name.
const RULE_ROOT: &str = "/tmp/bench/rules";
/// The benchmark opens this file, covered by no rule.
const DATA_DIR: &str = "/tmp/bench/data";
const TARGET: &str = "/tmp/bench/data/a/b/c/target.txt";
/// The flood opens this one, denied.
const SECRET: &str = "/tmp/bench/data/secret.key";

pub struct GuestResults {
    pub kernel: String,
    pub open: Table,
    pub flood: Flood,
}

pub fn run(
    enforcer: &Path,
    bench: &Path,
    work: &Path,
    settings: &Settings,
) -> Result<GuestResults> {
    vm::ensure_host_packages()?;
    let kernel = vm::ensure_kernel(&crate::workspace_root().join("target/vm"))?;
    let kernel_version = vm::kernel_version(&kernel)?;

    let stage = work.join("guest");
    let rules_dir = stage.join("rules");
    let flood_dir = stage.join("flood-rules");
    fs::create_dir_all(&rules_dir)?;
    fs::create_dir_all(&flood_dir)?;
    // Accounts (`~` in file rules needs the agent's home) and resolver.
    let mut files = crate::stage_guest_files(&stage)?;
    let mut stage_file = |dir: &Path, guest_dir: &str, name: &str, text: &str| -> Result<()> {
        let host = dir.join(name);
        fs::write(&host, text).with_context(|| format!("writing {}", host.display()))?;
        files.push((host, format!("{guest_dir}/{name}")));
        Ok(())
    };
    stage_file(
        &rules_dir,
        GUEST_RULES,
        "default.toml",
        rules::EMPTY_DEFAULT,
    )?;
    let largest = *settings.file_counts.last().expect("rule counts");
    let (entries, paths) = rules::file_rules(largest, RULE_ROOT);
    for &count in &settings.file_counts {
        let name = scenario_session(count);
        let text = rules::file_profile(&name, &entries[..count]);
        stage_file(&rules_dir, GUEST_RULES, &format!("{name}.toml"), &text)?;
    }
    stage_file(
        &flood_dir,
        GUEST_FLOOD_RULES,
        "default.toml",
        rules::EMPTY_DEFAULT,
    )?;
    stage_file(
        &flood_dir,
        GUEST_FLOOD_RULES,
        "flood.toml",
        &format!("name = \"flood\"\n[files]\ndeny = [\"{SECRET}\"]\n"),
    )?;
    let mut list = paths.join("\n");
    let _ = write!(list, "\n{TARGET}\n{SECRET}\n");
    stage_file(&stage, "/bench", "paths.txt", &list)?;

    println!(
        "xtask bench: open() in a QEMU VM (kernel {kernel_version}, TCG: timings are emulated, \
         only ratios count)"
    );
    let outcome = vm::run(
        &kernel,
        &work.join("vm"),
        &vm::VmRun {
            binaries: vec![enforcer.to_owned(), bench.to_owned()],
            files,
            script: script(settings),
            timeout: settings.vm_timeout,
            memory_mb: 2048,
        },
    )?;
    ensure!(
        outcome.exit_code == 0,
        "the benchmark script failed in the VM (exit code {}); see its output above",
        outcome.exit_code
    );
    let (open, flood) = parse(outcome.script_output(), settings)?;
    Ok(GuestResults {
        kernel: kernel_version,
        open,
        flood,
    })
}

/// The guest script: `rounds` rounds of two phases. Without the enforcer,
/// processes with no restriction (the baseline) and under Landlock take
/// turns; then, with the daemon, a process in a session per rule count and
/// one outside any session (as many processes in both phases). Then the
/// denied-open flood.
fn script(settings: &Settings) -> String {
    let request = format!("open {TARGET} {}", settings.open_batch);
    let turns = format!(
        "$B turns --request '{request}' --batches {}",
        settings.batches
    );
    let mut bare = String::new();
    for _ in 0..settings.file_counts.len() {
        bare.push_str(" --worker 'baseline=/bin/enforcer-bench serve'");
    }
    let _ = write!(
        bare,
        " --worker 'landlock=/bin/enforcer-bench --landlock-allow {DATA_DIR} serve'"
    );
    let mut enforced = String::new();
    for &count in &settings.file_counts {
        let profile = scenario_session(count);
        let _ = write!(
            enforced,
            " --worker '{profile}=/bin/enforcer --socket /run/bench.sock run --profile {profile} -- /bin/enforcer-bench serve'"
        );
    }
    enforced.push_str(" --worker 'outside=/bin/enforcer-bench serve'");
    let mut s = format!(
        "E=/bin/enforcer; B=/bin/enforcer-bench; S=/run/bench.sock\n\
         $B mkpaths {GUEST_PATHS} || exit 1\n\
         start_daemon() {{\n  rm -f $S /tmp/daemon.err; $E --socket $S daemon --rules $1 --log $2 --pin-dir /sys/fs/bpf/enforcer-bench 2>/tmp/daemon.err & DAEMON=$!; i=0\n  \
           until grep -qs 'daemon ready' /tmp/daemon.err; do i=$((i+1)); if [ $i -gt 1200 ]; then cat /tmp/daemon.err; exit 1; fi; sleep 0.1; done\n}}\n\
         stop_daemon() {{ $E --socket $S stop --unload --force --pin-dir /sys/fs/bpf/enforcer-bench >/dev/null; wait $DAEMON; }}\n"
    );
    for round in 0..settings.vm_rounds {
        let _ = writeln!(
            s,
            "echo \"bench: round {} of {}\"\n\
             out=$({turns}{bare}) || exit 1\n\
             echo \"BENCH-TURNS {round} $out\"\n\
             start_daemon {GUEST_RULES} /tmp/denials.jsonl\n\
             out=$({turns}{enforced}) || exit 1\n\
             echo \"BENCH-TURNS {round} $out\"\n\
             stop_daemon",
            round + 1,
            settings.vm_rounds
        );
    }
    let _ = writeln!(
        s,
        "start_daemon {GUEST_FLOOD_RULES} /tmp/flood.jsonl\n\
         out=$($E --socket $S run --profile flood -- $B flood open {SECRET} --procs {procs} --millis {millis}) || exit 1\n\
         lost=$($E --socket $S status --json | grep '\"events_lost\"' | tr -dc 0-9)\n\
         denied=$($E --socket $S status --json | grep '\"denied\"' | tr -dc 0-9)\n\
         delivered=$(grep -c '\"op\":\"open\"' /tmp/flood.jsonl)\n\
         echo \"BENCH-FLOOD $delivered $lost $denied $out\"\n\
         stop_daemon",
        procs = settings.flood_procs,
        millis = settings.flood_millis,
    );
    s
}

/// Adds one round's figures (`{"scenario": ns/op}`) to `open`, with the
/// ratios to what was measured alongside.
fn record_round(open: &mut Table, order: &[(String, Option<&str>)], figures: &Value) -> Result<()> {
    let figure = |scenario: &str| {
        figures[scenario]
            .as_f64()
            .with_context(|| format!("no figure for {scenario}"))
    };
    for (scenario, reference) in order {
        open.push(scenario, figure(scenario)?);
        if let Some(reference) = reference {
            open.push_alongside(scenario, reference, figure(scenario)? / figure(reference)?);
        }
    }
    Ok(())
}

/// Picks the figures out of the script's output.
fn parse(output: &str, settings: &Settings) -> Result<(Table, Flood)> {
    let mut open = Table::new("open + close of an unprotected file (VM)", "ns/op");
    // Table order, and what each is compared with alongside.
    let mut order = vec![
        ("baseline".to_owned(), None),
        ("landlock".to_owned(), Some("baseline")),
    ];
    for &count in &settings.file_counts {
        order.push((scenario_session(count), Some("outside")));
    }
    order.push(("outside".to_owned(), None));
    let mut pending: Option<(usize, Value)> = None;
    let mut flood = None;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("BENCH-TURNS ") {
            let (round, json) = rest
                .split_once(' ')
                .with_context(|| format!("a malformed line from the VM: {line}"))?;
            let round: usize = round
                .parse()
                .with_context(|| format!("bad round: {line}"))?;
            let value: Value = serde_json::from_str(json)
                .with_context(|| format!("bad JSON from the VM: {line}"))?;
            // A round prints two lines, one per phase.
            match pending.take() {
                Some((first_round, mut merged)) if first_round == round => {
                    if let (Some(all), Some(more)) = (merged.as_object_mut(), value.as_object()) {
                        all.extend(more.clone());
                    }
                    record_round(&mut open, &order, &merged)
                        .with_context(|| format!("round {round} from the VM"))?;
                }
                _ => pending = Some((round, value)),
            }
        } else if let Some(rest) = line.strip_prefix("BENCH-FLOOD ") {
            let mut fields = rest.splitn(4, ' ');
            let mut number = || -> Result<u64> {
                fields
                    .next()
                    .and_then(|f| f.parse().ok())
                    .with_context(|| format!("a malformed flood line from the VM: {line}"))
            };
            let (delivered, lost, denied) = (number()?, number()?, number()?);
            let value: Value = serde_json::from_str(fields.next().unwrap_or_default())
                .with_context(|| format!("bad JSON from the VM: {line}"))?;
            let millis = value["millis"].as_f64().context("no millis")?;
            flood = Some(Flood {
                what: format!("denied opens of {SECRET} (VM)"),
                procs: settings.flood_procs,
                attempted: value["attempted"].as_u64().context("no attempted")?,
                delivered,
                lost,
                denied,
                attempt_time: Duration::from_secs_f64(millis / 1e3),
                wall: None,
            });
        }
    }
    ensure!(
        open.series
            .first()
            .is_some_and(|s| s.scenario == "baseline")
            && open
                .series
                .iter()
                .all(|s| s.samples.len() == settings.vm_rounds),
        "the VM did not report every scenario of every round"
    );
    Ok((open, flood.context("the VM reported no flood result")?))
}
