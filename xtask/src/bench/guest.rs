//! The VM part: `open` + `close` overhead under BPF LSM (Debian's 6.1 cloud
//! kernel in QEMU), against no enforcer and Landlock, and denied-open
//! events. A shell script runs the rounds in the guest and prints one
//! `BENCH <round> <scenario> <json>` line per figure.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
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
    stage_file(&rules_dir, GUEST_RULES, "default.toml", rules::EMPTY_DEFAULT)?;
    let largest = *settings.file_counts.last().expect("rule counts");
    let (entries, paths) = rules::file_rules(largest, RULE_ROOT);
    for &count in &settings.file_counts {
        let name = scenario_session(count);
        let text = rules::file_profile(&name, &entries[..count]);
        stage_file(&rules_dir, GUEST_RULES, &format!("{name}.toml"), &text)?;
    }
    stage_file(&flood_dir, GUEST_FLOOD_RULES, "default.toml", rules::EMPTY_DEFAULT)?;
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

/// The guest script: `rounds` rounds of baseline, Landlock, one session per
/// rule count (through a daemon), and a process outside the sessions while
/// one is live; then the denied-open flood.
fn script(settings: &Settings) -> String {
    let iters = settings.open_iters;
    let mut s = format!(
        "E=/bin/enforcer; B=/bin/enforcer-bench; S=/run/bench.sock\n\
         $B mkpaths {GUEST_PATHS} || exit 1\n\
         measure() {{ r=$1; name=$2; shift 2; out=$(\"$@\") || {{ echo \"BENCH-FAILED $name\"; exit 1; }}; echo \"BENCH $r $name $out\"; }}\n\
         start_daemon() {{\n  rm -f $S; $E --socket $S daemon --rules $1 --log $2 2>/tmp/daemon.err & DAEMON=$!; i=0\n  \
           until grep -q 'daemon ready' /tmp/daemon.err; do i=$((i+1)); if [ $i -gt 1200 ]; then cat /tmp/daemon.err; exit 1; fi; sleep 0.1; done\n}}\n\
         stop_daemon() {{ kill $DAEMON; wait $DAEMON; }}\n\
         wait_session() {{ until $E --socket $S status --json | grep -q '\"attached\"'; do sleep 0.1; done; }}\n"
    );
    let largest = scenario_session(*settings.file_counts.last().expect("rule counts"));
    for round in 0..settings.rounds {
        let _ = writeln!(
            s,
            "echo \"bench: round {} of {}\"\n\
             measure {round} baseline $B open {TARGET} --iters {iters}\n\
             measure {round} landlock $B open {TARGET} --iters {iters} --landlock-allow {DATA_DIR}\n\
             start_daemon {GUEST_RULES} /tmp/denials.jsonl",
            round + 1,
            settings.rounds
        );
        for &count in &settings.file_counts {
            let profile = scenario_session(count);
            let _ = writeln!(
                s,
                "measure {round} {profile} $E --socket $S run --profile {profile} -- $B open {TARGET} --iters {iters}"
            );
        }
        let _ = writeln!(
            s,
            "$E --socket $S run --profile {largest} -- sleep 3600 & LIVE=$!\n\
             wait_session\n\
             measure {round} outside $B open {TARGET} --iters {iters}\n\
             kill $LIVE; stop_daemon"
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

/// Picks the figures out of the script's output.
fn parse(output: &str, settings: &Settings) -> Result<(Table, Flood)> {
    let mut open = Table::new("open + close of an unprotected file (VM)", "ns/op");
    let mut flood = None;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("BENCH ") {
            let mut fields = rest.splitn(3, ' ');
            let (Some(_round), Some(scenario), Some(json)) =
                (fields.next(), fields.next(), fields.next())
            else {
                bail!("a malformed line from the VM: {line}");
            };
            let value: Value =
                serde_json::from_str(json).with_context(|| format!("bad JSON from the VM: {line}"))?;
            open.push(
                scenario,
                value["ns_per_op"].as_f64().context("no ns_per_op")?,
            );
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
                // The guest cannot time the drain: it is counted after the
                // session ended, and this is the attempting time.
                wall: Duration::from_secs_f64(millis / 1e3),
            });
        }
    }
    ensure!(
        open.series.first().is_some_and(|s| s.scenario == "baseline")
            && open
                .series
                .iter()
                .all(|s| s.samples.len() == settings.rounds),
        "the VM did not report every scenario of every round"
    );
    Ok((open, flood.context("the VM reported no flood result")?))
}
