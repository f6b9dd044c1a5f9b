//! Reloading the rules of a running daemon: `enforcer reload`, SIGHUP and
//! changes in the rules directory. The new rules are validated whole before
//! anything changes, live sessions switch to them atomically, and a bad rule
//! set leaves the rules in force alone.

use std::path::Path;

use integration_tests::{Sandbox, Spawned, listen, wait_for};
use serde_json::Value;

fn profile(deny: &[&str]) -> String {
    let list: Vec<String> = deny.iter().map(|d| format!("\"{d}\"")).collect();
    format!("name = \"p\"\n[network]\ndeny = [{}]\n", list.join(", "))
}

fn reload(sb: &Sandbox) -> std::process::Output {
    sb.enforcer(&["reload"]).output().unwrap()
}

fn mark(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn a_live_session_switches_to_the_new_rules() {
    let sb = Sandbox::new();
    sb.profile("p", &profile(&["127.0.0.2"]));
    let (_l, target) = listen("127.0.0.3:0");
    let _daemon = sb.daemon(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (started, reloaded) = (mark(dir.path(), "started"), mark(dir.path(), "reloaded"));
    let agent = sb.steps_agent(
        "p",
        &[
            &format!("tcp {target}"),
            &format!("mark {started}"),
            &format!("wait {reloaded}"),
            &format!("tcp {target}"),
        ],
    );
    wait_for("the agent's first connect", || Path::new(&started).exists());
    sb.profile("p", &profile(&["127.0.0.2", "127.0.0.3"]));
    let out = reload(&sb);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 session(s) switched"));
    std::fs::write(&reloaded, b"").unwrap();
    assert_eq!(agent.lines(), ["ok", "ok", "waited", "eperm"]);
    let status = sb.status();
    assert_eq!(status["reload"]["error"], Value::Null, "{status:#}");
}

#[test]
fn invalid_rules_are_refused_whole_and_the_old_rules_stay() {
    let sb = Sandbox::new();
    sb.profile("p", &profile(&["127.0.0.2"]));
    let _daemon = sb.daemon(&[]);
    // One good change and one bad file: nothing of it may take effect.
    sb.profile("p", &profile(&["127.0.0.2", "127.0.0.4"]));
    sb.profile("q", "name = \"q\"\n[network]\ndeny = [\"not an entry\"]\n");
    let out = reload(&sb);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("q.toml:3"), "{stderr}");
    assert!(stderr.contains("network.deny"), "{stderr}");
    let status = sb.status();
    assert!(
        status["reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("q.toml")),
        "{status:#}"
    );
    let (_l, still_denied) = listen("127.0.0.2:0");
    let (_l2, not_yet) = listen("127.0.0.4:0");
    let out = sb
        .steps_agent(
            "p",
            &[&format!("tcp {still_denied}"), &format!("tcp {not_yet}")],
        )
        .lines();
    assert_eq!(out, ["eperm", "ok"]);
}

#[test]
fn a_change_in_the_rules_directory_reloads_by_itself() {
    let sb = Sandbox::new();
    sb.profile("p", &profile(&["127.0.0.2"]));
    let _daemon = sb.daemon(&[]);
    sb.profile("p", &profile(&["127.0.0.2", "127.0.0.5"]));
    wait_for("the reload after the change", || {
        sb.status()["reload"]["error"] == Value::Null && sb.status()["reload"]["at"].is_string()
    });
    let (_l, target) = listen("127.0.0.5:0");
    assert_eq!(
        sb.steps_agent("p", &[&format!("tcp {target}")]).lines(),
        ["eperm"]
    );
}

#[test]
fn sighup_reloads_and_reopens_a_rotated_log() {
    let sb = Sandbox::new();
    sb.profile("p", &profile(&["127.0.0.2"]));
    let daemon = sb.daemon(&[]);
    let (_l, target) = listen("127.0.0.2:0");
    assert_eq!(
        sb.steps_agent("p", &[&format!("tcp {target}")]).lines(),
        ["eperm"]
    );
    // logrotate: move the log away, then SIGHUP.
    let rotated = sb.log().with_extension("1");
    std::fs::rename(sb.log(), &rotated).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(daemon.0.id()).unwrap(), libc::SIGHUP) };
    wait_for("the log reopened", || sb.log().exists());
    assert_eq!(
        sb.steps_agent("p", &[&format!("tcp {target}")]).lines(),
        ["eperm"]
    );
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(lines(&rotated), 1);
    assert_eq!(lines(&sb.log()), 1);
}

#[test]
fn reloads_under_a_connect_loop_never_let_a_denied_connect_through() {
    let sb = Sandbox::new();
    sb.profile("p", &profile(&["127.0.0.2"]));
    let (_l, target) = listen("127.0.0.2:0");
    let _daemon = sb.daemon(&[]);
    let dir = tempfile::tempdir().unwrap();
    let stop = mark(dir.path(), "stop");
    let loop_step = format!("loop-tcp {target} {stop}");
    let agents: Vec<Spawned> = (0..3).map(|_| sb.steps_agent("p", &[&loop_step])).collect();
    for i in 0..20 {
        // Each reload renames the rules and adds others around the denied one.
        let extra = format!("127.0.{}.0/24", 100 + i);
        sb.profile("p", &profile(&[&extra, "127.0.0.2", "10.0.0.0/8"]));
        let out = reload(&sb);
        assert!(out.status.success(), "{out:?}");
    }
    std::fs::write(&stop, b"").unwrap();
    for agent in agents {
        let out = agent.lines();
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].starts_with("ok=0 eperm="), "{out:?}");
        assert!(!out[0].starts_with("ok=0 eperm=0 "), "{out:?}");
    }
}

#[test]
fn reloads_under_an_open_loop_never_let_a_protected_file_be_read() {
    if !integration_tests::bpf_lsm() {
        return;
    }
    let sb = Sandbox::new();
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("token");
    std::fs::write(&secret, b"secret").unwrap();
    let files = |extra: &str| {
        format!(
            "name = \"p\"\n[network]\ndeny = [\"{extra}\"]\n[files]\ndeny = [\"{}\"]\n",
            secret.display()
        )
    };
    sb.profile("p", &files("10.0.0.0/8"));
    let _daemon = sb.daemon(&[]);
    let dir = tempfile::tempdir().unwrap();
    let stop = mark(dir.path(), "stop");
    let loop_step = format!("loop-open {} {stop}", secret.display());
    let agents: Vec<Spawned> = (0..2).map(|_| sb.steps_agent("p", &[&loop_step])).collect();
    for i in 0..10 {
        sb.profile("p", &files(&format!("10.{i}.0.0/16")));
        let out = reload(&sb);
        assert!(out.status.success(), "{out:?}");
    }
    std::fs::write(&stop, b"").unwrap();
    for agent in agents {
        let out = agent.lines();
        assert!(out[0].starts_with("ok=0 eperm="), "{out:?}");
        assert!(!out[0].starts_with("ok=0 eperm=0 "), "{out:?}");
    }
}
