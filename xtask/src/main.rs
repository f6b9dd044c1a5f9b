//! `cargo xtask`: bootstrap the toolchain, build, test and run the enforcer.
//!
//! Every command first makes sure the machine has what building needs
//! (nightly rust-src, LLVM 22, bpf-linker), installing what is missing and
//! saying so, so the README's commands work on a fresh machine.

mod bench;
mod bootstrap;
mod vm;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Bootstrap,
    /// Build target/release/enforcer (kernel programs embedded).
    Build,
    /// Run every test: unit tests, the kernel integration tests as root on
    /// the host kernel, then the BPF-LSM ones (`files`, `egress`) in a QEMU VM
    /// booting Debian's 6.1 cloud kernel.
    Test,
    /// Only the VM step of `test`: build, then run the `files` and `egress`
    /// integration tests inside the QEMU VM, e.g.
    /// `cargo xtask vm-test files -- exact_file --nocapture`.
    VmTest {
        /// Test targets to run (default: all of them).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(VM_TEST_TARGETS))]
        targets: Vec<String>,
        /// Wall-clock limit for the VM run, in minutes.
        #[arg(long, default_value_t = VM_TIMEOUT_MINS)]
        timeout_mins: u64,
        /// Arguments for every test binary, after `--test-threads=1`: a test
        /// name filter, `--nocapture`, `--exact`, ...
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Measure the enforcer's overhead and scale next to no enforcer,
    /// nftables and Landlock (as root; a few minutes, part of it in the QEMU
    /// VM); writes target/bench/results.md and results.json.
    Bench {
        /// A short run (seconds) that checks the benchmark works; its figures
        /// mean nothing. `cargo xtask test` runs this.
        #[arg(long)]
        quick: bool,
    },
    /// Build, then run target/release/enforcer with the given arguments,
    /// e.g. `cargo xtask run -- run -- curl https://backboard.railway.app`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap => bootstrap::ensure_build_tools(),
        Cmd::Build => build().map(drop),
        Cmd::Test => test(),
        Cmd::VmTest {
            targets,
            timeout_mins,
            test_args,
        } => {
            let enforcer = build()?;
            let selection = VmSelection {
                targets,
                test_args,
                timeout: Duration::from_mins(timeout_mins),
            };
            vm_tests(&enforcer, &selection)
        }
        Cmd::Bench { quick } => {
            let enforcer = build()?;
            let settings = if quick {
                bench::Settings::quick()
            } else {
                bench::Settings::full()
            };
            bench::run(&enforcer, &build_bench()?, &settings, quick)
        }
        Cmd::Run { args } => {
            let enforcer = build()?;
            let status = Command::new(&enforcer)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", enforcer.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Run a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn build() -> Result<PathBuf> {
    bootstrap::ensure_build_tools()?;
    run(cargo().args(["build", "--release", "-p", "enforcer"]))?;
    Ok(workspace_root().join("target/release/enforcer"))
}

/// Build target/release/enforcer-bench, the benchmark's load generator.
fn build_bench() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "enforcer-bench"]))?;
    Ok(workspace_root().join("target/release/enforcer-bench"))
}

fn test() -> Result<()> {
    let enforcer = build()?;
    println!("xtask: unit tests");
    run(cargo().args([
        "test",
        "-p",
        "enforcer",
        "-p",
        "enforcer-common",
        "-p",
        "xtask",
        "-p",
        "enforcer-bench",
    ]))?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the kernel integration tests load BPF programs and need root: run `sudo -E cargo xtask test`"
        );
    }
    // The DNS tests also run against a standard resolver from Debian.
    bootstrap::ensure_debian_packages(&[("dnsmasq-base", "/usr/sbin/dnsmasq")])?;
    println!(
        "xtask: kernel integration tests on the host kernel (one at a time: they share kernel state)"
    );
    run(cargo()
        .args(["test", "-p", "integration-tests", "--", "--test-threads=1"])
        .env("ENFORCER_BIN", &enforcer))?;
    vm_tests(&enforcer, &VmSelection::default())?;
    println!("xtask: a quick benchmark run, to check the benchmark works (timings not checked)");
    bench::run(&enforcer, &build_bench()?, &bench::Settings::quick(), true)
}

/// Integration test targets that also run inside the VM, in this order:
/// those that need BPF-LSM, which the host kernel refuses (file rules, the
/// escape suite's guards), and those whose
/// kernel side differs enough between 6.1 and 6.18 to check on both (DNS
/// steering, pinned LSM links across restarts). The others (`dns_server`,
/// `service`, and `dns_dnsmasq`, which needs Debian's dnsmasq) run on the
/// host only.
const VM_TEST_TARGETS: [&str; 6] = ["files", "egress", "escape", "dns", "reload", "persist"];

/// Default wall-clock limit for the whole VM run, in minutes: every test
/// runs under TCG emulation, many times slower than the host.
const VM_TIMEOUT_MINS: u64 = 55;

const VM_MEMORY_MB: u32 = 2048;

/// Accounts, host names and resolver the tests expect in the guest:
/// `(guest path, contents)`.
const GUEST_FILES: [(&str, &str); 4] = [
    (
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    ),
    ("/etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
    ("/etc/resolv.conf", "nameserver 127.0.0.1\n"),
];

/// Marks the lines the VM script prints about itself (picked out again for
/// the summary).
const VM_HEADER: &str = "==== vm-tests:";

/// What a VM test run runs (`cargo xtask test` runs the default: all).
struct VmSelection {
    /// Some of [`VM_TEST_TARGETS`]; empty means all.
    targets: Vec<String>,
    /// Extra arguments for every test binary.
    test_args: Vec<String>,
    /// Wall-clock limit for the VM run.
    timeout: Duration,
}

impl Default for VmSelection {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            test_args: Vec::new(),
            timeout: Duration::from_mins(VM_TIMEOUT_MINS),
        }
    }
}

/// The kernel integration tests that need BPF-LSM, inside a QEMU VM booting
/// Debian's 6.1 cloud kernel (see `vm.rs`). The guest console streams to
/// stdout as the tests run.
///
/// A wanted target that does not exist (yet) fails the step, but only after
/// the others ran.
fn vm_tests(enforcer: &Path, selection: &VmSelection) -> Result<()> {
    let wanted: Vec<&str> = if selection.targets.is_empty() {
        VM_TEST_TARGETS.to_vec()
    } else {
        VM_TEST_TARGETS
            .into_iter()
            .filter(|target| selection.targets.iter().any(|t| t == target))
            .collect()
    };
    println!(
        "xtask: building the integration test binaries for the VM ({})",
        wanted.join(", ")
    );
    let mut built = build_integration_tests()?;
    built
        .tests
        .retain(|(name, _)| wanted.contains(&name.as_str()));
    let probe = built.probe.clone().context(
        "`cargo test -p integration-tests --no-run` reported no `probe` binary \
         (tests/src/bin/probe.rs)",
    )?;
    let missing = built.missing_targets(&wanted);
    if built.tests.is_empty() {
        bail!(
            "none of the VM test targets ({}) was built: is tests/tests/<name>.rs there?",
            wanted.join(", ")
        );
    }
    if !missing.is_empty() {
        eprintln!(
            "xtask: WARNING: no integration test target {}; running the others in the VM, \
             then failing",
            quoted_list(&missing)
        );
    }

    vm::ensure_host_packages()?;
    let vm_dir = workspace_root().join("target/vm");
    let kernel = vm::ensure_kernel(&vm_dir)?;
    let kernel_version = vm::kernel_version(&kernel)?;
    // One directory per run, so that concurrent runs (two checkouts' CI jobs,
    // two terminals) do not rebuild each other's initramfs mid-boot.
    remove_stale_work_dirs(&vm_dir);
    let work_dir = vm_dir.join(format!("{WORK_DIR_PREFIX}{}", std::process::id()));
    let result = run_vm_tests(&kernel, &work_dir, enforcer, probe, &built.tests, selection);
    let _ = fs::remove_dir_all(&work_dir);
    let outcome = result?;

    // The console was streamed above as it arrived; repeat only the verdicts.
    println!(
        "\nxtask: VM run finished in {:.0?} (kernel {kernel_version}); summary:",
        outcome.elapsed
    );
    for line in vm_summary(outcome.script_output()) {
        println!("  {line}");
    }
    if outcome.exit_code != 0 {
        bail!(
            "the kernel integration tests failed inside the VM (kernel {kernel_version}, \
             script exit code {}); see the test output above",
            outcome.exit_code
        );
    }
    if !missing.is_empty() {
        bail!(
            "the VM tests that ran passed, but integration test target {} does not exist \
             (tests/tests/<name>.rs), so it was not run",
            quoted_list(&missing)
        );
    }
    println!("xtask: kernel integration tests in the VM passed");
    Ok(())
}

/// A VM run's work directory is `target/vm/run-<pid of xtask>`.
const WORK_DIR_PREFIX: &str = "run-";

/// Removes the work directories of runs whose xtask is gone (killed before it
/// could clean up), leaving those of runs still going.
fn remove_stale_work_dirs(vm_dir: &Path) {
    let Ok(entries) = fs::read_dir(vm_dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(WORK_DIR_PREFIX))
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if process_gone(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether no process `pid` exists (any more).
fn process_gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    let failed = unsafe { libc::kill(pid, 0) } != 0;
    failed && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Stages the guest files in `work_dir` and boots the VM once to run `tests`
/// (`(target, executable)`).
fn run_vm_tests(
    kernel: &Path,
    work_dir: &Path,
    enforcer: &Path,
    probe: PathBuf,
    tests: &[(String, PathBuf)],
    selection: &VmSelection,
) -> Result<vm::VmOutcome> {
    let files = stage_guest_files(work_dir)?;

    let mut binaries = vec![enforcer.to_owned(), probe];
    let mut guest_tests = Vec::new();
    for (target, executable) in tests {
        let name = executable
            .file_name()
            .and_then(|name| name.to_str())
            .with_context(|| {
                format!("test executable {} has no UTF-8 name", executable.display())
            })?;
        guest_tests.push((target.as_str(), format!("/bin/{name}")));
        binaries.push(executable.clone());
    }

    println!(
        "xtask: kernel integration tests in a QEMU VM (kernel {}, TCG: slow; limit {} min)",
        vm::kernel_version(kernel)?,
        selection.timeout.as_secs() / 60
    );
    vm::run(
        kernel,
        work_dir,
        &vm::VmRun {
            binaries,
            files,
            script: vm_test_script(&guest_tests, &selection.test_args),
            timeout: selection.timeout,
            memory_mb: VM_MEMORY_MB,
        },
    )
}

/// Writes [`GUEST_FILES`] under `work_dir` and returns them as
/// [`vm::VmRun::files`] entries.
fn stage_guest_files(work_dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    let etc = work_dir.join("guest-etc");
    fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
    for (guest, contents) in GUEST_FILES {
        let name = Path::new(guest)
            .file_name()
            .expect("guest files have names");
        let host = etc.join(name);
        fs::write(&host, contents).with_context(|| format!("writing {}", host.display()))?;
        files.push((host, guest.to_owned()));
    }
    Ok(files)
}

/// `` `a` `` or `` `a`, `b` ``.
fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `cargo test -p integration-tests --no-run` built that the VM needs.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestBuild {
    /// `(target name, executable)` of the [`VM_TEST_TARGETS`] that exist, in
    /// that order.
    tests: Vec<(String, PathBuf)>,
    /// The `probe` helper binary.
    probe: Option<PathBuf>,
}

impl TestBuild {
    /// The `wanted` targets that were not built.
    fn missing_targets<'a>(&self, wanted: &[&'a str]) -> Vec<&'a str> {
        wanted
            .iter()
            .copied()
            .filter(|target| !self.tests.iter().any(|(name, _)| name == target))
            .collect()
    }
}

/// Builds the integration test binaries without running them, and finds the
/// executables in cargo's JSON messages. Compiler diagnostics are rendered to
/// stderr as usual (`json-render-diagnostics`), so a build error reads like
/// one.
fn build_integration_tests() -> Result<TestBuild> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "integration-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let output = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed ({})", output.status);
    }
    parse_test_build(&String::from_utf8_lossy(&output.stdout))
}

/// Picks the executables out of cargo's JSON messages (one a line): the
/// `compiler-artifact`s with `profile.test` and an `executable` whose target
/// is one of [`VM_TEST_TARGETS`], and the plain (non-test) `probe` binary.
fn parse_test_build(json: &str) -> Result<TestBuild> {
    let mut tests = Vec::new();
    let mut probe = None;
    for line in json.lines().filter(|line| line.starts_with('{')) {
        let message: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed bad JSON: {line}"))?;
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let target = &message["target"];
        let name = target["name"].as_str().unwrap_or_default();
        let is_test = message["profile"]["test"].as_bool().unwrap_or(false);
        let is_bin = target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"));
        if is_test && VM_TEST_TARGETS.contains(&name) {
            tests.push((name.to_owned(), PathBuf::from(executable)));
        } else if !is_test && is_bin && name == "probe" {
            probe = Some(PathBuf::from(executable));
        }
    }
    tests.sort_by_key(|(name, _)| VM_TEST_TARGETS.iter().position(|target| target == name));
    tests.dedup();
    Ok(TestBuild { tests, probe })
}

/// The guest script: runs each `(target, guest path)` test executable one at
/// a time (they share kernel state) with `test_args`, goes on after a
/// failure, and exits non-zero if any failed.
fn vm_test_script(tests: &[(&str, String)], test_args: &[String]) -> String {
    let mut args = String::new();
    for arg in test_args {
        let _ = write!(args, " '{}'", arg.replace('\'', r"'\''"));
    }
    let mut script = String::from(
        "export ENFORCER_BIN=/bin/enforcer PROBE_BIN=/bin/probe ENFORCER_REQUIRE_LSM=1 HOME=/root\n\
         mkdir -p /root\n\
         ip link set lo up 2>/dev/null\n",
    );
    let _ = writeln!(
        script,
        "echo \"{VM_HEADER} kernel $(uname -r), LSMs: $(cat /sys/kernel/security/lsm 2>/dev/null)\"\n\
         failed=''"
    );
    for (target, path) in tests {
        let _ = writeln!(
            script,
            "echo\n\
             echo '{VM_HEADER} {target} ({path}) ===='\n\
             if ! '{path}' --test-threads=1{args}; then failed=\"$failed {target}\"; fi"
        );
    }
    let _ = writeln!(
        script,
        "echo\n\
         if [ -n \"$failed\" ]; then echo \"{VM_HEADER} FAILED:$failed ====\"; exit 1; fi\n\
         echo '{VM_HEADER} all passed ===='"
    );
    script
}

/// The lines of the VM script's output worth repeating after the run: its
/// own header lines, libtest's `test result:` lines and failed tests.
fn vm_summary(output: &str) -> Vec<&str> {
    output
        .lines()
        .map(str::trim_end)
        .filter(|line| {
            line.starts_with(VM_HEADER)
                || line.starts_with("test result:")
                || (line.starts_with("test ") && line.ends_with(" FAILED"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_and_probe_are_found_in_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"integration_tests"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"probe"},"profile":{"test":true},"executable":"/t/debug/deps/probe-1"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"probe"},"profile":{"test":false},"executable":"/t/debug/probe"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"egress"},"profile":{"test":true},"executable":"/t/debug/deps/egress-2"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"dns_server"},"profile":{"test":true},"executable":"/t/debug/deps/dns_server-3"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"files"},"profile":{"test":true},"executable":"/t/debug/deps/files-4"}
{"reason":"build-finished","success":true}
"#;
        let built = parse_test_build(json).unwrap();
        assert_eq!(
            built,
            TestBuild {
                tests: vec![
                    ("files".into(), "/t/debug/deps/files-4".into()),
                    ("egress".into(), "/t/debug/deps/egress-2".into()),
                ],
                probe: Some("/t/debug/probe".into()),
            }
        );
        assert!(built.missing_targets(&["files", "egress"]).is_empty());
        assert_eq!(
            built.missing_targets(&VM_TEST_TARGETS),
            ["escape", "dns", "reload", "persist"]
        );

        let without_files: Vec<&str> = json.lines().filter(|l| !l.contains("files")).collect();
        let built = parse_test_build(&without_files.join("\n")).unwrap();
        assert_eq!(built.tests.len(), 1);
        assert_eq!(built.missing_targets(&["files", "egress"]), ["files"]);
        assert!(built.missing_targets(&["egress"]).is_empty());
    }

    #[test]
    fn vm_script_runs_every_binary_and_remembers_failures() {
        let script = vm_test_script(
            &[
                ("files", "/bin/files-4".into()),
                ("egress", "/bin/egress-2".into()),
            ],
            &[],
        );
        assert!(script.starts_with(
            "export ENFORCER_BIN=/bin/enforcer PROBE_BIN=/bin/probe ENFORCER_REQUIRE_LSM=1 HOME=/root\n"
        ));
        let files = script.find("'/bin/files-4' --test-threads=1").unwrap();
        let egress = script.find("'/bin/egress-2' --test-threads=1").unwrap();
        assert!(files < egress);
        assert!(script.contains("exit 1"));
        assert!(!script.contains("set -e"));

        let filtered = vm_test_script(
            &[("files", "/bin/files-4".into())],
            &["it's".into(), "--nocapture".into()],
        );
        assert!(filtered.contains(r"'/bin/files-4' --test-threads=1 'it'\''s' '--nocapture';"));
    }

    #[test]
    fn vm_summary_keeps_the_verdicts() {
        let output = "==== vm-tests: egress (/bin/egress-2) ====\nrunning 2 tests\n\
            test a ... ok\ntest b ... FAILED\nthread 'b' panicked\n\
            test result: FAILED. 1 passed; 1 failed\n==== vm-tests: FAILED: egress ====\n";
        assert_eq!(
            vm_summary(output),
            [
                "==== vm-tests: egress (/bin/egress-2) ====",
                "test b ... FAILED",
                "test result: FAILED. 1 passed; 1 failed",
                "==== vm-tests: FAILED: egress ====",
            ]
        );
    }
}
