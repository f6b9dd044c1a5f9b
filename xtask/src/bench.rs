//! `cargo xtask bench`: the enforcer's overhead and scale, side by side with
//! the alternatives, measured in one run.
//!
//! Every figure is measured in rounds; within a round each scenario runs
//! once, in an order rotated from round to round, so drift hits all of them
//! alike. Results are ratios to a baseline of the same round (median and
//! range over rounds); absolute times are printed but are not the point.
//! Written to `target/bench/results.md` and `results.json`.
//!
//! - Host kernel: TCP connect + close and UDP sendto with no enforcer, in
//!   sessions with 10 / 10 000 / 100 000 network rules, under an equivalent
//!   nftables rule set, and outside any session while sessions are live;
//!   denied connects from several processes (events reaching the log, lost
//!   events, and whether they add up); rule loading.
//! - VM kernel (BPF LSM): open + close with no enforcer, in sessions with
//!   10 / 1 000 / 10 000 file rules, under Landlock, outside any session;
//!   denied opens.

mod guest;
mod host;
mod report;
mod rules;

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde_json::json;

use self::{
    host::{Flood, Loading, Tools, scenario_nft, scenario_session},
    report::{Stats, table_json, table_markdown},
};
use crate::{bootstrap, workspace_root};

/// How much to measure.
pub struct Settings {
    pub rounds: usize,
    /// Rounds in the VM (each costs two daemon starts under emulation).
    pub vm_rounds: usize,
    /// Batches per scenario per round on the host, alternating between the
    /// scenarios of a phase.
    pub batches: usize,
    /// Operations per batch.
    pub tcp_batch: u64,
    pub udp_batch: u64,
    /// Opens per batch in the VM.
    pub open_batch: u64,
    /// Network rules per session profile, ascending.
    pub net_counts: Vec<usize>,
    /// File rules per session profile, ascending.
    pub file_counts: Vec<usize>,
    pub flood_procs: u32,
    pub flood_millis: u64,
    pub load_repeats: usize,
    pub load_file_rules: usize,
    pub vm_timeout: Duration,
    /// Rounds and queries per round of the DNS proxy benchmark.
    pub dns_rounds: usize,
    pub dns_queries: u32,
}

impl Settings {
    /// The full benchmark (a few minutes).
    pub fn full() -> Settings {
        Settings {
            rounds: 12,
            vm_rounds: 6,
            batches: 20,
            tcp_batch: 200,
            udp_batch: 2000,
            open_batch: 500,
            net_counts: vec![10, 10_000, 100_000],
            file_counts: vec![10, 1000, 10_000],
            flood_procs: 4,
            flood_millis: 2000,
            load_repeats: 5,
            load_file_rules: 10_000,
            vm_timeout: Duration::from_mins(20),
            dns_rounds: 6,
            dns_queries: 2000,
        }
    }

    /// A short run that exercises every part (CI): small rule sets, few
    /// iterations, two rounds. Its figures are not meaningful.
    pub fn quick() -> Settings {
        Settings {
            rounds: 2,
            vm_rounds: 2,
            batches: 3,
            tcp_batch: 50,
            udp_batch: 500,
            open_batch: 100,
            net_counts: vec![10, 100, 1000],
            file_counts: vec![10, 100],
            flood_procs: 2,
            flood_millis: 200,
            load_repeats: 1,
            load_file_rules: 100,
            vm_timeout: Duration::from_mins(10),
            dns_rounds: 1,
            dns_queries: 200,
        }
    }
}

pub fn run(enforcer: &Path, bench: &Path, settings: &Settings, quick: bool) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark loads BPF programs, creates cgroups and nftables tables: run it as root"
    );
    bootstrap::ensure_debian_packages(&[
        ("nftables", "/usr/sbin/nft"),
        ("dnsmasq-base", "/usr/sbin/dnsmasq"),
    ])?;
    let out_dir = workspace_root().join("target/bench");
    let work = out_dir.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = measure_all(enforcer, bench, &work, settings);
    let _ = fs::remove_dir_all(&work);
    let (host, guest) = result?;

    let machine = Machine::detect(guest.kernel.clone());
    let md = markdown(&machine, &host, &guest, settings, quick);
    let json = json!({
        "quick": quick,
        "machine": machine.json(),
        "host": {
            "connect": table_json(&host.tcp),
            "sendto": table_json(&host.udp),
            "nft_load_ms": millis(host.nft_load),
            "flood": flood_json(&host.flood),
            "loading": loading_json(&host.loading),
        },
        "vm": {
            "open": table_json(&guest.open),
            "flood": flood_json(&guest.flood),
        },
        "dns": {
            "queries_per_round": host.dns.queries,
            "direct": host.dns.direct,
            "proxied": host.dns.proxied,
        },
        "reload": "see loading.reload_ms",
    });
    fs::write(out_dir.join("results.md"), &md).context("writing results.md")?;
    fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )
    .context("writing results.json")?;
    println!("\n{md}");
    println!(
        "xtask bench: written to {} and results.json",
        out_dir.join("results.md").display()
    );
    Ok(())
}

fn measure_all(
    enforcer: &Path,
    bench: &Path,
    work: &Path,
    settings: &Settings,
) -> Result<(host::HostResults, guest::GuestResults)> {
    let tools = Tools {
        enforcer,
        bench,
        work,
    };
    let host = host::run(&tools, settings)?;
    let guest = guest::run(enforcer, bench, work, settings)?;
    Ok((host, guest))
}

/// The machine the figures were taken on.
struct Machine {
    kernel: String,
    cpu: String,
    cpus: usize,
    vm_kernel: String,
    date: String,
}

impl Machine {
    fn detect(vm_kernel: String) -> Machine {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            vm_kernel,
            date,
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"kernel": self.kernel, "cpu": self.cpu, "cpus": self.cpus,
               "vm_kernel": self.vm_kernel, "date": self.date})
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn label(scenario: &str) -> String {
    if scenario == "baseline" {
        return "no enforcer (baseline)".into();
    }
    if scenario == "outside" {
        return "outside any session, sessions live".into();
    }
    if scenario == host::NFT_OUTSIDE {
        return "outside the nftables cgroup, chain in place".into();
    }
    if scenario == "landlock" {
        return "Landlock (reads beneath the data directory only)".into();
    }
    if let Some(n) = scenario.strip_prefix("session-") {
        return format!("agent session, {} rules", thousands(n));
    }
    if let Some(n) = scenario.strip_prefix("nftables-") {
        return format!("nftables, {} rules, same cgroup", thousands(n));
    }
    scenario.to_owned()
}

/// `100000` → `100 000`.
fn thousands(digits: &str) -> String {
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// `median (min–max)` of a ratio series, or `n/a`.
fn ratio_summary(ratios: Option<&[f64]>) -> String {
    match ratios {
        Some(r) if !r.is_empty() => {
            let s = Stats::of(r);
            format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max)
        }
        _ => "n/a".into(),
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// A ratio target (`ratio <= limit`) judged on the interquartile range of
/// the per-round ratios, so noise cannot pass or fail it: met when even the
/// upper quartile is within the limit, NOT met when even the lower quartile
/// is beyond it, inconclusive otherwise.
fn judge(ratios: Option<&[f64]>, limit: f64) -> String {
    let Some(s) = ratios.filter(|r| !r.is_empty()).map(Stats::of) else {
        return "n/a".into();
    };
    if s.q3 <= limit {
        "met".into()
    } else if s.q1 > limit {
        "NOT met".into()
    } else {
        format!(
            "inconclusive (interquartile range {:.3}–{:.3} straddles {limit})",
            s.q1, s.q3
        )
    }
}

/// The targets of the issue, each with the figure that answers it.
fn targets(host: &host::HostResults, guest: &guest::GuestResults, settings: &Settings) -> String {
    let mut md = String::from("| target | measured | verdict |\n| --- | --- | --- |\n");
    let net_max = *settings.net_counts.last().expect("rule counts");
    let file_max = *settings.file_counts.last().expect("rule counts");
    let session = scenario_session(net_max);
    for table in [&host.tcp, &host.udp] {
        let to_base = table.ratios(&session, "baseline");
        let _ = writeln!(
            md,
            "| {}: session with {} rules within 2% of no enforcer | ratio {} | {} |",
            table.title,
            thousands(&net_max.to_string()),
            ratio_summary(to_base.as_deref()),
            judge(to_base.as_deref(), 1.02)
        );
        let to_nft = table.ratios(&session, &scenario_nft(net_max));
        let _ = writeln!(
            md,
            "| {}: session no slower than nftables with the same rules | ratio session/nftables {} | {} |",
            table.title,
            ratio_summary(to_nft.as_deref()),
            judge(to_nft.as_deref(), 1.0)
        );
        let outside = table.ratios("outside", "baseline");
        let noise = table
            .get("baseline")
            .map_or(f64::NAN, |b| Stats::of(&b.samples).relative_range());
        let quartiles = outside.as_deref().map(Stats::of);
        let _ = writeln!(
            md,
            "| {}: outside any session indistinguishable from no enforcer | ratio {}; the baseline's own spread ±{:.1}% | {} |",
            table.title,
            ratio_summary(outside.as_deref()),
            noise * 50.0,
            match quartiles {
                Some(q) if q.q1 <= 1.0 && 1.0 <= q.q3 =>
                    "indistinguishable (interquartile range contains 1)",
                Some(_) => "distinguishable",
                None => "n/a",
            }
        );
    }
    let open = &guest.open;
    let session = scenario_session(file_max);
    let to_base = open.ratios(&session, "baseline");
    let _ = writeln!(
        md,
        "| open (VM): session with {} file rules within 3% of no enforcer | ratio {} | {} |",
        thousands(&file_max.to_string()),
        ratio_summary(to_base.as_deref()),
        judge(to_base.as_deref(), 1.03)
    );
    let to_landlock = open.ratios(&session, "landlock");
    let _ = writeln!(
        md,
        "| open (VM): session ahead of Landlock | ratio session/Landlock {} | {} |",
        ratio_summary(to_landlock.as_deref()),
        judge(to_landlock.as_deref(), 1.0)
    );
    for flood in [&host.flood, &guest.flood] {
        let _ = writeln!(
            md,
            "| {}: delivered + lost = attempted | {} + {} = {} vs {} attempted | {} |",
            flood.what,
            flood.delivered,
            flood.lost,
            flood.delivered + flood.lost,
            flood.attempted,
            if flood.exact() { "exact" } else { "NOT exact" }
        );
    }
    md += &throughput_and_loading_targets(host);
    md
}

/// Target rows for event throughput, reload time and memory.
fn throughput_and_loading_targets(host: &host::HostResults) -> String {
    let mut md = String::new();
    let rate = host.flood.delivered_per_sec().unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "| at least 500 000 denial events/s reach the log (host) | {rate:.0}/s | {} |",
        verdict(rate >= 500_000.0)
    );
    let loading = &host.loading;
    #[expect(clippy::cast_precision_loss, reason = "KiB counts")]
    let hwm = Stats::of(
        &loading
            .hwm_kib
            .iter()
            .map(|k| *k as f64 / 1024.0)
            .collect::<Vec<_>>(),
    );
    let reload = Stats::of(
        &loading
            .reload
            .iter()
            .map(|d| millis(*d))
            .collect::<Vec<_>>(),
    );
    let _ = writeln!(
        md,
        "| reload of {} network + {} file rules under 200 ms | `enforcer reload` {:.0} ms (median; max {:.0}) | {} |",
        thousands(&loading.net_rules.to_string()),
        thousands(&loading.file_rules.to_string()),
        reload.median,
        reload.max,
        verdict(reload.max < 200.0)
    );
    let _ = writeln!(
        md,
        "| controller resident memory under 40 MiB with those rules | peak {:.1} MiB (VmHWM, median) | {} |",
        hwm.median,
        verdict(hwm.max < 40.0)
    );
    md
}

fn flood_markdown(flood: &Flood) -> String {
    #[expect(clippy::cast_precision_loss, reason = "event counts")]
    let attempts = flood.attempted as f64 / flood.attempt_time.as_secs_f64();
    let rate = match (flood.wall, flood.delivered_per_sec()) {
        (Some(wall), Some(rate)) => format!(
            "{rate:.0} events/s reached the log ({} in {:.2} s, from the session's start until \
             `enforcer run` returned with the log written)",
            flood.delivered,
            wall.as_secs_f64()
        ),
        _ => format!(
            "{} events reached the log (TCG: rates are not comparable with the host)",
            flood.delivered
        ),
    };
    format!(
        "- {what}, {procs} processes: {attempted} attempted ({attempts:.0}/s), {rate}; \
         {lost} lost (kernel counter `events_lost`); kernel `denied` counter {denied}. \
         Delivered + lost = {sum}: {exact}.\n",
        what = flood.what,
        procs = flood.procs,
        attempted = flood.attempted,
        lost = flood.lost,
        denied = flood.denied,
        sum = flood.delivered + flood.lost,
        exact = if flood.exact() {
            "equals attempted, exact"
        } else {
            "does NOT equal attempted"
        },
    )
}

fn loading_markdown(loading: &Loading, nft_load: Duration) -> String {
    let ms = |ds: &[Duration]| Stats::of(&ds.iter().map(|d| millis(*d)).collect::<Vec<_>>());
    #[expect(clippy::cast_precision_loss, reason = "KiB counts")]
    let mib = |ks: &[u64]| Stats::of(&ks.iter().map(|k| *k as f64 / 1024.0).collect::<Vec<_>>());
    let row = |what: &str, s: Stats, unit: &str| {
        format!(
            "| {what} | {:.1} {unit} | {:.1}–{:.1} {unit} |\n",
            s.median, s.min, s.max
        )
    };
    let mut md = format!(
        "{} network rules and {} file rules in one profile, {} repeats (host; file rules are \
         parsed but, without BPF LSM here, not compiled into the kernel).\n\n\
         | what | median | range |\n| --- | ---: | ---: |\n",
        thousands(&loading.net_rules.to_string()),
        thousands(&loading.file_rules.to_string()),
        loading.ready.len()
    );
    md += &row("`enforcer daemon` start to ready", ms(&loading.ready), "ms");
    md += &row(
        "first session of the profile (`enforcer run -- true` through the daemon)",
        ms(&loading.session),
        "ms",
    );
    md += &row(
        "daemon peak resident memory (VmHWM)",
        mib(&loading.hwm_kib),
        "MiB",
    );
    md += &row(
        "daemon resident memory after (VmRSS)",
        mib(&loading.rss_kib),
        "MiB",
    );
    md += &row(
        "`enforcer reload` of the same rules, one session live",
        ms(&loading.reload),
        "ms",
    );
    md += &row("`enforcer check --offline`", ms(&loading.check), "ms");
    let _ = writeln!(
        md,
        "| nftables: `nft -f` of the equivalent sets (the connect benchmark's largest rule set) | {:.1} ms | once |",
        millis(nft_load)
    );

    md
}

fn markdown(
    machine: &Machine,
    host: &host::HostResults,
    guest: &guest::GuestResults,
    settings: &Settings,
    quick: bool,
) -> String {
    let mut md = String::from("# enforcer benchmark\n\n");
    if quick {
        md += "**Quick run (`--quick`): small rule sets and few iterations; the figures only \
               show that the benchmark works.**\n\n";
    }
    let _ = write!(
        md,
        "Taken {} on {} ({} CPUs), host kernel {}; file rules in a QEMU VM (TCG) with kernel {}.\n\n\
         How: {} rounds on the host, {} in the VM. On the host a round has three phases, in an order rotated from round to \
         round: nothing loaded (the baseline); the nftables chain in place; the enforcer daemon \
         with a session per rule count. Within a phase long-lived processes (in their session or \
         cgroup; as many in every phase, the reference scenario taking the spare places) take \
         turns measuring in batches ({} batches each of {} connects or {} sends), and a \
         scenario's figure for the round is the median of its batches. \"Ratio to baseline\" is the median over rounds of the scenario's \
         figure divided by the baseline's of the same round, with the range of those ratios; \
         \"alongside\" ratios divide figures taken in turn within one phase, the tightest \
         comparison. The VM does the same with two phases (without the enforcer: \
         the baseline and Landlock; with it: the sessions and a process outside), {} opens a \
         batch.\n\n",
        machine.date,
        machine.cpu,
        machine.cpus,
        machine.kernel,
        machine.vm_kernel,
        settings.rounds,
        settings.vm_rounds,
        settings.batches,
        settings.tcp_batch,
        settings.udp_batch,
        settings.open_batch,
    );
    md += "## Targets\n\n";
    md += &targets(host, guest, settings);
    let _ = write!(
        md,
        "\n## 1, 2. connect() and sendto() (host kernel)\n\n### {}\n\n{}\n### {}\n\n{}",
        host.tcp.title,
        table_markdown(&host.tcp, &label),
        host.udp.title,
        table_markdown(&host.udp, &label),
    );
    let _ = write!(
        md,
        "\n## 3. open() (VM kernel, BPF LSM)\n\n### {}\n\n{}",
        guest.open.title,
        table_markdown(&guest.open, &label)
    );
    md += "\n## 4. Denial events\n\n";
    md += &flood_markdown(&host.flood);
    md += &flood_markdown(&guest.flood);
    md += "\n## 5. Rule loading\n\n";
    md += &loading_markdown(&host.loading, host.nft_load);
    md += "\n## 6. DNS proxy\n\n";
    md += &dns_markdown(&host.dns);
    md
}

fn flood_json(flood: &Flood) -> serde_json::Value {
    json!({
        "what": flood.what,
        "procs": flood.procs,
        "attempted": flood.attempted,
        "delivered": flood.delivered,
        "lost": flood.lost,
        "denied_counter": flood.denied,
        "exact": flood.exact(),
        "attempt_ms": millis(flood.attempt_time),
        "wall_ms": flood.wall.map(millis),
    })
}

fn dns_markdown(dns: &host::DnsBench) -> String {
    let field = |rounds: &[serde_json::Value], name: &str| {
        Stats::of(
            &rounds
                .iter()
                .filter_map(|r| r[name].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let mut md = format!(
        "{} rounds of {} A queries, one after another, to Debian's dnsmasq on loopback: \
         directly from outside any session, and from a session (sent to a resolver address \
         that does not exist, steered by the kernel to the session's proxy, which judges the \
         name, forwards, and learns the answer into the rules before it replies). Medians of \
         the per-round figures, range in brackets.\n\n\
         | path | median round trip | p99 round trip | queries/s |\n| --- | ---: | ---: | ---: |\n",
        dns.direct.len(),
        dns.queries
    );
    for (what, rounds) in [("direct", &dns.direct), ("through the proxy", &dns.proxied)] {
        let (m, p, q) = (
            field(rounds, "median_us"),
            field(rounds, "p99_us"),
            field(rounds, "qps"),
        );
        let _ = writeln!(
            md,
            "| {what} | {:.0} µs ({:.0}–{:.0}) | {:.0} µs ({:.0}–{:.0}) | {:.0} ({:.0}–{:.0}) |",
            m.median, m.min, m.max, p.median, p.min, p.max, q.median, q.min, q.max
        );
    }
    let (direct, proxied) = (
        field(&dns.direct, "median_us"),
        field(&dns.proxied, "median_us"),
    );
    let _ = writeln!(
        md,
        "\nAdded latency (median): {:.0} µs; throughput ratio proxy/direct: {:.2}.",
        proxied.median - direct.median,
        field(&dns.proxied, "qps").median / field(&dns.direct, "qps").median
    );
    md
}

fn loading_json(loading: &Loading) -> serde_json::Value {
    let ms = |ds: &[Duration]| ds.iter().map(|d| millis(*d)).collect::<Vec<_>>();
    json!({
        "net_rules": loading.net_rules,
        "file_rules": loading.file_rules,
        "ready_ms": ms(&loading.ready),
        "first_session_ms": ms(&loading.session),
        "reload_ms": ms(&loading.reload),
        "check_ms": ms(&loading.check),
        "vm_hwm_kib": loading.hwm_kib,
        "vm_rss_kib": loading.rss_kib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_judged_on_the_interquartile_range() {
        assert_eq!(judge(Some(&[1.0, 1.01, 1.01, 1.02]), 1.02), "met");
        assert_eq!(judge(Some(&[1.05, 1.06, 1.07, 1.2]), 1.02), "NOT met");
        assert!(judge(Some(&[0.9, 1.0, 1.1, 1.2]), 1.02).starts_with("inconclusive"));
        assert_eq!(judge(None, 1.0), "n/a");
    }

    #[test]
    fn labels_read_well() {
        assert_eq!(thousands("100000"), "100 000");
        assert_eq!(thousands("10"), "10");
        assert_eq!(label("session-10000"), "agent session, 10 000 rules");
        assert_eq!(
            label("nftables-100000"),
            "nftables, 100 000 rules, same cgroup"
        );
    }
}
