//! File rules against a kernel with BPF LSM (the VM run of `cargo xtask
//! test`), and the refusal on a kernel without it (this host). Each test
//! asserts both the syscall's result and the log record.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{Sandbox, Spawned, bpf_lsm, enforcer_bin, path_str, probe_bin};
use serde_json::Value;

/// A scratch tree of "secrets", outside the rules sandbox.
struct Tree(tempfile::TempDir);

impl Tree {
    fn new() -> Tree {
        Tree(tempfile::tempdir().expect("temp dir"))
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }
    fn p(&self, rel: &str) -> String {
        path_str(&self.path(rel)).to_owned()
    }
    fn write(&self, rel: &str) -> String {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "secret\n").unwrap();
        self.p(rel)
    }
}

/// Run every probe in one session: `probe <how> <path>` per line; returns
/// one verdict per probe.
fn probes(sb: &Sandbox, profile: &str, extra: &[&str], calls: &[(&str, &str)]) -> Vec<String> {
    let script: Vec<String> = calls
        .iter()
        .map(|(how, path)| format!("{} {how} '{path}'", probe_bin()))
        .collect();
    let script = script.join("\n");
    let out = sb.run(profile, extra, &["sh", "-c", &script]);
    assert!(out.status.success(), "enforcer run failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn profile(name: &str, deny: &[&str], allow: &[&str]) -> String {
    let list = |xs: &[&str]| {
        xs.iter()
            .map(|x| format!("{x:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "name = \"{name}\"\n[files]\ndeny = [{}]\nallow = [{}]\n",
        list(deny),
        list(allow)
    )
}

fn opens(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["op"] == "open").collect()
}

#[test]
fn exact_file_is_denied_by_every_name() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    let secret = t.write("d/secret.txt");
    fs::hard_link(t.path("d/secret.txt"), t.path("d/hardlink")).unwrap();
    symlink(t.path("d/secret.txt"), t.path("sym")).unwrap();
    let sb = Sandbox::new();
    sb.profile("p", &profile("p", &[&secret], &[]));
    let relative = format!("{}/../d/./secret.txt", t.p("d"));
    let doubled = secret.replace("/d/", "//d//");
    let verdicts = probes(
        &sb,
        "p",
        &[],
        &[
            ("open", &secret),
            ("open", &t.p("d/hardlink")),
            ("open", &t.p("sym")),
            ("opath-reopen", &secret),
            ("open-write", &secret),
            ("open", &relative),
            ("open", &doubled),
            ("uring-open", &secret),
        ],
    );
    assert_eq!(verdicts, ["eperm"; 8]);
    let records = sb.records();
    let records = opens(&records);
    assert_eq!(records.len(), 8);
    let first = records[0];
    assert_eq!(first["verdict"], "deny");
    assert_eq!(first["target"], secret);
    assert_eq!(first["mode"], "read");
    assert_eq!(first["proto"], "file");
    assert_eq!(first["comm"], "probe");
    assert_eq!(first["profile"], "p");
    assert_eq!(first["rule"]["text"], secret);
    assert_eq!(first["rule"]["line"], 3);
    // The hard link is reported by the name it was opened with.
    assert_eq!(records[1]["target"], t.p("d/hardlink"));
    assert_eq!(records[4]["mode"], "write");
}

#[test]
fn bind_mounts_renames_and_new_links_keep_the_identity() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    let secret = t.write("d/secret.txt");
    fs::create_dir(t.path("mnt")).unwrap();
    let sb = Sandbox::new();
    sb.profile("p", &profile("p", &[&secret], &[]));
    let probe = probe_bin();
    let (d, mnt) = (t.p("d"), t.p("mnt"));
    let lines = with_pause(
        &sb,
        "p",
        &format!("mount --bind {d} {mnt} && {probe} open {mnt}/secret.txt; umount {mnt}"),
        // Renamed and linked by someone outside any session: the file's
        // identity is what is protected.
        || {
            fs::rename(&secret, t.path("d/renamed")).unwrap();
            fs::hard_link(t.path("d/renamed"), t.path("d/newlink")).unwrap();
        },
        &format!("{probe} open {d}/renamed; {probe} open {d}/newlink"),
    );
    assert_eq!(lines, ["eperm"; 3]);
    assert_eq!(opens(&sb.records()).len(), 3);
}

#[test]
fn directory_rule_covers_later_files_nested_files_and_a_renamed_parent() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    let old = t.write("vault/a/old");
    let sb = Sandbox::new();
    let rule = format!("{}/", t.p("vault"));
    sb.profile("p", &profile("p", &[&rule], &[]));
    let probe = probe_bin();
    let lines = with_pause(
        &sb,
        "p",
        &format!("{probe} open {old}; {probe} read-dir {}", t.p("vault")),
        // After the rules are loaded, outside the session: a new nested file
        // appears, then the protected directory is renamed.
        || {
            t.write("vault/a/b/new");
            fs::rename(t.path("vault"), t.path("moved")).unwrap();
        },
        &format!(
            "{probe} open {}; {probe} open {}",
            t.p("moved/a/b/new"),
            t.p("moved/a/old")
        ),
    );
    assert_eq!(lines, ["eperm"; 4]);
    let records = sb.records();
    let opens = opens(&records);
    assert_eq!(opens.len(), 4);
    assert!(opens.iter().all(|r| r["rule"]["text"] == rule));
}

/// Run `first` in a session, pause the agent while the test does `outside`
/// (outside any session, after the rules are loaded), then run `then`;
/// returns the agent's output lines.
fn with_pause(
    sb: &Sandbox,
    profile: &str,
    first: &str,
    outside: impl FnOnce(),
    then: &str,
) -> Vec<String> {
    let marks = tempfile::tempdir().unwrap();
    let (paused, resume) = (marks.path().join("paused"), marks.path().join("resume"));
    let script = format!(
        "{first}\ntouch {paused}; while [ ! -e {resume} ]; do sleep 0.1; done\n{then}",
        paused = path_str(&paused),
        resume = path_str(&resume),
    );
    let agent = sb.spawn(profile, &["sh", "-c", &script]);
    let deadline = Instant::now() + Duration::from_mins(1);
    while !paused.exists() {
        assert!(Instant::now() < deadline, "the agent never paused");
        std::thread::sleep(Duration::from_millis(50));
    }
    outside();
    fs::write(&resume, "").unwrap();
    wait_output(agent, Duration::from_mins(1))
}

fn wait_output(mut agent: Spawned, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            assert!(status.success(), "agent failed: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "agent did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdout = String::new();
    std::io::Read::read_to_string(agent.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    stdout.lines().map(str::to_owned).collect()
}

#[test]
fn name_patterns_match_anywhere_and_allow_carves_out() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    let env = t.write("proj/sub/.env");
    let example = t.write("proj/.env.example");
    let key = t.write("keys/id_ed25519");
    let public = t.write("keys/id_ed25519.pub");
    let long_pem = t.write(&format!("certs/{}.pem", "x".repeat(100)));
    let not_pem = t.write("certs/pem.txt");
    let nested_key = t.write("keys/sub/id_rsa");
    let sb = Sandbox::new();
    sb.profile(
        "p",
        &profile(
            "p",
            &["**/.env", &format!("{}/id_*", t.p("keys")), "**/*.pem"],
            &["**/.env.example", &format!("{}/*.pub", t.p("keys"))],
        ),
    );
    let verdicts = probes(
        &sb,
        "p",
        &[],
        &[
            ("open", &env),
            ("open", &example),
            ("open", &key),
            ("open", &public),
            ("open", &long_pem),
            ("open", &not_pem),
            ("open", &nested_key),
        ],
    );
    // `DIR/id_*` covers files directly inside DIR only.
    assert_eq!(
        verdicts,
        ["eperm", "ok", "eperm", "ok", "eperm", "ok", "ok"]
    );
    let records = sb.records();
    let texts: Vec<&str> = opens(&records)
        .iter()
        .map(|r| r["rule"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "**/.env",
            format!("{}/id_*", t.p("keys")).as_str(),
            "**/*.pem"
        ]
    );
}

#[test]
fn renaming_a_protected_file_to_an_allowed_name_keeps_it_protected() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    t.write("creds/secret");
    let token = t.write("token");
    let sb = Sandbox::new();
    sb.profile(
        "p",
        &profile(
            "p",
            &[&format!("{}/", t.p("creds")), &token],
            &["**/cacert.pem"],
        ),
    );
    let probe = probe_bin();
    let lines = with_pause(
        &sb,
        "p",
        "true",
        // Renamed (outside the session) to a name an allow rule covers
        // elsewhere.
        || {
            fs::rename(t.path("creds/secret"), t.path("creds/cacert.pem")).unwrap();
            fs::rename(&token, t.path("cacert.pem")).unwrap();
        },
        &format!(
            "{probe} open {}; {probe} open {}",
            t.p("creds/cacert.pem"),
            t.p("cacert.pem")
        ),
    );
    assert_eq!(lines, ["eperm", "eperm"]);
}

#[test]
fn the_agent_cannot_move_or_link_a_protected_file_out() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    t.write("aws/credentials");
    let token = t.write("token");
    fs::create_dir(t.path("out")).unwrap();
    let sb = Sandbox::new();
    sb.profile(
        "p",
        &profile("p", &[&format!("{}/", t.p("aws")), &token], &[]),
    );
    // Each step prints `refused` when the kernel says no.
    let script = format!(
        "mv {aws}/credentials {out}/c 2>/dev/null && echo moved || echo refused; \
         ln {aws}/credentials {out}/l 2>/dev/null && echo linked || echo refused; \
         mv {token} {out}/t 2>/dev/null && echo moved || echo refused; \
         echo x > {out}/x && mv {out}/x {token} 2>/dev/null && echo replaced || echo refused; \
         mv {aws} {out}/aws 2>/dev/null && echo moved-dir || echo refused",
        aws = t.p("aws"),
        out = t.p("out"),
        token = token,
    );
    let out = sb.run("p", &[], &["sh", "-c", &script]);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines, ["refused"; 5]);
    assert!(
        t.path("aws/credentials").exists()
            && !t.path("out/c").exists()
            && !t.path("out/l").exists()
    );
    let records = sb.records();
    let ops: Vec<&str> = records.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["rename", "link", "rename", "rename", "rename"]);
    assert!(records.iter().all(|r| r["verdict"] == "deny"));
}

#[test]
fn audit_mode_allows_and_logs() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    let secret = t.write("secret");
    let sb = Sandbox::new();
    sb.profile("p", &profile("p", &[&secret], &[]));
    assert_eq!(probes(&sb, "p", &["--audit"], &[("open", &secret)]), ["ok"]);
    let records = sb.records();
    let records = opens(&records);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["verdict"], "audit");
}

#[test]
fn processes_outside_the_session_read_normally() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    let secret = t.write("secret");
    let sb = Sandbox::new();
    sb.profile("p", &profile("p", &[&secret], &[]));
    let script = format!(
        "while [ ! -e {ready} ]; do sleep 0.1; done; {probe} open {secret}",
        ready = t.p("ready"),
        probe = probe_bin()
    );
    let agent = sb.spawn("p", &["sh", "-c", &script]);
    std::thread::sleep(Duration::from_millis(500));
    // The session is live; we are outside it.
    assert_eq!(fs::read_to_string(&secret).unwrap(), "secret\n");
    t.write("ready");
    assert_eq!(wait_output(agent, Duration::from_mins(1)), ["eperm"]);
}

#[test]
fn tilde_is_the_agent_users_home() {
    if !bpf_lsm() {
        return;
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let name = format!(".enforcer-test-{}", std::process::id());
    let secret = home.join(&name);
    fs::create_dir_all(&home).unwrap();
    fs::write(&secret, "x").unwrap();
    let sb = Sandbox::new();
    sb.profile("p", &profile("p", &[&format!("~/{name}")], &[]));
    let verdicts = probes(&sb, "p", &[], &[("open", path_str(&secret))]);
    fs::remove_file(&secret).unwrap();
    assert_eq!(verdicts, ["eperm"]);
}

#[test]
fn paths_too_deep_to_verify_are_denied() {
    if !bpf_lsm() {
        return;
    }
    let t = Tree::new();
    let deep: PathBuf = (0..40).fold(t.path("deep"), |p, i| p.join(format!("{i}")));
    fs::create_dir_all(&deep).unwrap();
    let file = deep.join("f");
    fs::write(&file, "x").unwrap();
    let shallow = t.write("shallow");
    let sb = Sandbox::new();
    sb.profile("p", &profile("p", &["**/.env"], &[]));
    assert_eq!(
        probes(
            &sb,
            "p",
            &[],
            &[("open", path_str(&file)), ("open", &shallow)]
        ),
        ["eperm", "ok"]
    );
    let records = sb.records();
    assert!(
        opens(&records)[0]["rule"]["text"]
            .as_str()
            .unwrap()
            .contains("fail closed")
    );
}

#[test]
fn builtin_profile_protects_cloud_credentials_and_env_files() {
    if !bpf_lsm() {
        return;
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let aws = home.join(".aws");
    let created = !aws.exists();
    fs::create_dir_all(&aws).unwrap();
    let creds = aws.join("credentials-enforcer-test");
    fs::write(&creds, "[default]\n").unwrap();
    let t = Tree::new();
    let env = t.write("app/.env");
    let sb = Sandbox::new();
    fs::remove_dir(sb.rules()).unwrap();
    let verdicts = probes(
        &sb,
        "default",
        &[],
        &[
            ("open", path_str(&creds)),
            ("open", &env),
            ("open", &t.write("app/main.rs")),
            // Another process's environment, and a harmless file beside it.
            ("open", "/proc/1/environ"),
            ("open", "/proc/1/status"),
        ],
    );
    fs::remove_file(&creds).unwrap();
    if created {
        let _ = fs::remove_dir(&aws);
    }
    assert_eq!(verdicts, ["eperm", "eperm", "ok", "eperm", "ok"]);
}

#[test]
fn without_bpf_lsm_the_agent_is_refused_unless_degraded_is_allowed() {
    let sb = Sandbox::new();
    let out = Command::new(enforcer_bin())
        .args(["--socket", "/nonexistent/enforcer.sock", "status", "--json"])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    if status["features"]["file_rules"] == "enforced" {
        eprintln!(
            "skipped: this kernel enforces file rules (the refusal path is tested on kernels without BPF LSM)"
        );
        return;
    }
    sb.profile("p", &profile("p", &["/etc/shadow"], &[]));
    let marker = Path::new(path_str(&sb.rules())).join("ran");
    let touch = format!("touch {}", path_str(&marker));
    let refused = sb.run("p", &[], &["sh", "-c", &touch]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(!marker.exists(), "the agent must not start unprotected");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("cannot be enforced on this kernel")
            && err.contains("--allow-degraded")
            && err.contains("lsm="),
        "{err}"
    );

    let degraded = sb.run("p", &["--allow-degraded"], &["sh", "-c", &touch]);
    assert!(degraded.status.success());
    assert!(marker.exists());
    assert!(String::from_utf8_lossy(&degraded.stderr).contains("DEGRADED"));
    let records = sb.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0]["op"].as_str(), records[0]["verdict"].as_str()),
        (Some("session"), Some("degraded"))
    );
}
