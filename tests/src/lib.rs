//! Support code for the kernel integration tests: a rules directory, the
//! built `enforcer` binary driven as a user would, and its denial log read
//! back.

pub mod dns;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
};

use serde_json::Value;

/// The `enforcer` binary under test: `$ENFORCER_BIN` (set by
/// `cargo xtask test`), else the workspace's release build.
pub fn enforcer_bin() -> PathBuf {
    let path = std::env::var_os("ENFORCER_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/enforcer"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} does not exist: run the kernel tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// These tests load BPF programs and create cgroups: they need root, and
/// fail (rather than silently pass) without it.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel integration tests must run as root"
    );
}

/// A scratch rules directory, log file and (absent) daemon socket, so each
/// test runs its own embedded controller.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

/// A daemon's pinned enforcement outlives it; remove it with the sandbox
/// (killing what it still enforces).
impl Drop for Sandbox {
    fn drop(&mut self) {
        let pins = self.pin_dir();
        if pins.exists() {
            let _ = self
                .enforcer(&["stop", "--unload", "--force", "--pin-dir", path_str(&pins)])
                .output();
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        require_root();
        let dir = tempfile::tempdir().expect("creating a temp dir");
        std::fs::create_dir(dir.path().join("rules")).expect("creating the rules dir");
        Sandbox { dir }
    }

    /// Where this sandbox's daemons pin their enforcement (in the BPF
    /// filesystem, unique to the sandbox).
    pub fn pin_dir(&self) -> PathBuf {
        let name = self
            .dir
            .path()
            .file_name()
            .expect("temp dir name")
            .to_string_lossy()
            .into_owned();
        // The BPF filesystem refuses names with dots.
        PathBuf::from("/sys/fs/bpf").join(format!("enforcer-test{}", name.replace('.', "-")))
    }

    pub fn rules(&self) -> PathBuf {
        self.dir.path().join("rules")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("denials.jsonl")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Write `rules/<name>.toml`.
    pub fn profile(&self, name: &str, toml: &str) -> &Self {
        std::fs::write(self.rules().join(format!("{name}.toml")), toml).expect("writing a profile");
        self
    }

    /// `enforcer <args>` with this sandbox's socket.
    pub fn enforcer(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(enforcer_bin());
        cmd.arg("--socket").arg(self.socket()).args(args);
        cmd
    }

    /// The command `enforcer run --rules R --log L --profile P [extra] -- agent...`.
    pub fn run_command(&self, profile: &str, extra: &[&str], agent: &[&str]) -> Command {
        let rules = self.rules();
        let log = self.log();
        let mut args = vec![
            "run",
            "--rules",
            path_str(&rules),
            "--log",
            path_str(&log),
            "--profile",
            profile,
        ];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(agent);
        self.enforcer(&args)
    }

    /// Start a session in the background, its stdout piped.
    pub fn spawn(&self, profile: &str, agent: &[&str]) -> Spawned {
        Spawned(
            self.run_command(profile, &[], agent)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("starting enforcer run"),
        )
    }

    /// Run a session to its end.
    pub fn run(&self, profile: &str, extra: &[&str], agent: &[&str]) -> Output {
        let out = self
            .run_command(profile, extra, agent)
            .output()
            .expect("running enforcer");
        eprintln!(
            "enforcer run --profile {profile} {extra:?} -- {agent:?}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Run the probe binary as the agent: `probe <how> <dest>`; returns its
    /// verdict line (`ok`, `eperm`, `error ...`).
    pub fn probe(&self, profile: &str, extra: &[&str], how: &str, dest: &str) -> String {
        let out = self.run(profile, extra, &[probe_bin(), how, dest]);
        assert!(out.status.success(), "enforcer run failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `enforcer daemon` with this sandbox's rules, log and pins, and `extra`.
    /// Unless the test wrote its own, a small `default` profile replaces the
    /// built-in one: a daemon resolves every host name of every profile
    /// when it starts, and the built-in profile's hundred names take tens of
    /// seconds to time out offline under the VM's emulation.
    pub fn daemon_command(&self, extra: &[&str]) -> Command {
        let rules = self.rules();
        let default = rules.join("default.toml");
        if !default.exists() {
            std::fs::write(&default, "name = \"default\"\n").expect("writing a profile");
        }
        let log = self.log();
        let pins = self.pin_dir();
        let mut args = vec![
            "daemon",
            "--rules",
            path_str(&rules),
            "--log",
            path_str(&log),
            "--pin-dir",
            path_str(&pins),
        ];
        args.extend_from_slice(extra);
        self.enforcer(&args)
    }

    /// Start `enforcer daemon` (see `daemon_command`) and wait until it
    /// answers `status`.
    pub fn daemon(&self, extra: &[&str]) -> Spawned {
        let mut daemon = Spawned(
            self.daemon_command(extra)
                .spawn()
                .expect("starting the daemon"),
        );
        // Generous: under the VM's emulation, with agents busy in connect
        // loops, loading and verifying every program took over 30 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_mins(2);
        while !self.socket().exists()
            || self
                .enforcer(&["status"])
                .output()
                .expect("enforcer status")
                .stdout
                .starts_with(b"controller: none")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not come up"
            );
            if let Ok(Some(status)) = daemon.0.try_wait() {
                panic!("the daemon exited at start: {status}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        daemon
    }

    /// `enforcer status --json` of the running daemon.
    pub fn status(&self) -> Value {
        let out = self
            .enforcer(&["status", "--json"])
            .output()
            .expect("enforcer status");
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// An agent running the probe's `steps` in a session of `profile`
    /// through the daemon, in the background, its stdout piped.
    pub fn steps_agent(&self, profile: &str, steps: &[&str]) -> Spawned {
        Spawned(
            self.enforcer(&["run", "--profile", profile, "--", probe_bin(), "steps"])
                .args(steps)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("starting enforcer run"),
        )
    }

    /// How many denial records have `"op":"<op>"`, read line by line: a
    /// connect loop over minutes of daemon restarts logs millions, too many
    /// to hold parsed (the VM's test process ran out of memory).
    pub fn count_records(&self, op: &str) -> u64 {
        use std::io::BufRead;
        let Ok(file) = std::fs::File::open(self.log()) else {
            return 0;
        };
        let needle = format!("\"op\":\"{op}\"");
        let mut count = 0;
        for line in std::io::BufReader::new(file).lines() {
            count += u64::from(line.expect("reading the log").contains(&needle));
        }
        count
    }

    /// Every record in the denial log.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log lines are JSON"))
            .collect()
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// The probe binary: `$PROBE_BIN` (inside the VM), or the one cargo builds next to the test binaries' `deps/`
/// directory.
pub fn probe_bin() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(path) = std::env::var("PROBE_BIN") {
            return path;
        }
        let exe = std::env::current_exe().expect("test binary path");
        let probe = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in target/<profile>/deps")
            .join("probe");
        assert!(
            probe.exists(),
            "{} is missing: build with `cargo test -p integration-tests`",
            probe.display()
        );
        probe.display().to_string()
    })
}

/// A child process killed when the test ends, pass or panic, so a failed
/// test never leaves a daemon or follower running.
pub struct Spawned(pub Child);

impl Spawned {
    /// Its output lines, once it has exited.
    pub fn lines(mut self) -> Vec<String> {
        use std::io::Read;
        let mut text = String::new();
        if let Some(mut out) = self.0.stdout.take() {
            out.read_to_string(&mut text).expect("reading the output");
        }
        let _ = self.0.wait();
        text.lines().map(str::to_owned).collect()
    }
}

/// Poll `done` until it holds; fail after a minute.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP listener, so an allowed connect succeeds instead of being refused.
pub fn listen(addr: &str) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    let local = listener.local_addr().expect("listener address");
    (listener, local)
}

/// Whether this kernel can enforce file rules. Where the VM run sets
/// `ENFORCER_REQUIRE_LSM`, not being able to is a failure, not a skip.
pub fn bpf_lsm() -> bool {
    let out = Command::new(enforcer_bin())
        .args(["--socket", "/nonexistent/enforcer.sock", "status", "--json"])
        .output()
        .expect("running enforcer status");
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let file_rules = status["features"]["file_rules"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let enforced = file_rules == "enforced";
    if !enforced {
        assert!(
            std::env::var_os("ENFORCER_REQUIRE_LSM").is_none(),
            "this kernel must enforce file rules, but: {file_rules}"
        );
        eprintln!(
            "skipped: file rules are not enforceable on this kernel ({file_rules}); the VM run covers them"
        );
    }
    enforced
}

/// Where the cgroup2 hierarchy is mounted (from `/proc/self/mountinfo`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}
