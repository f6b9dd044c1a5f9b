//! Egress enforcement against the host kernel: real cgroups, real programs,
//! real sockets on loopback. Each test runs `enforcer run` as a user would
//! and asserts both halves: what the agent's syscall returned, and what the
//! denial log says.

use std::{
    net::{Ipv4Addr, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use integration_tests::{Sandbox, Spawned, dns::TestDnsServer, listen, path_str, probe_bin};
use serde_json::Value;

const DENY_LIST: &str = r#"
name = "denylist"
[network]
default = "allow"
deny = [
  "127.0.0.2",
  "127.0.0.3:8080/tcp",
  "127.0.10.0/24",
  "[::1]:9",
]
allow = ["127.0.10.7"]
"#;

fn only(records: &[Value]) -> &Value {
    assert_eq!(
        records.len(),
        1,
        "expected exactly one log record: {records:#?}"
    );
    &records[0]
}

#[test]
fn denied_tcp_connect_gets_eperm_and_a_complete_log_line() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    assert_eq!(sb.probe("denylist", &[], "tcp", "127.0.0.2:80"), "eperm");
    let r = only(&sb.records()).clone();
    assert_eq!(r["profile"], "denylist");
    assert_eq!(r["op"], "connect");
    assert_eq!(r["verdict"], "deny");
    assert_eq!(r["target"], "127.0.0.2:80");
    assert_eq!(r["proto"], "tcp");
    assert_eq!(r["comm"], "probe");
    assert_eq!(r["host"], Value::Null);
    assert_eq!(r["rule"]["text"], "127.0.0.2");
    assert_eq!(r["rule"]["line"], 6);
    assert!(
        r["rule"]["file"]
            .as_str()
            .unwrap()
            .ends_with("rules/denylist.toml")
    );
    assert!(r["session"].as_str().unwrap().starts_with("denylist."));
    assert!(r["pid"].as_u64().unwrap() > 1);
    assert!(
        r["ts"].as_str().unwrap().starts_with("20"),
        "RFC 3339 timestamp: {}",
        r["ts"]
    );
}

#[test]
fn allowed_destinations_connect_normally() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    let (_l, addr) = listen("127.0.0.4:0");
    assert_eq!(sb.probe("denylist", &[], "tcp", &addr.to_string()), "ok");
    // An allow carved out of a denied /24.
    let (_l, addr) = listen("127.0.10.7:0");
    assert_eq!(sb.probe("denylist", &[], "tcp", &addr.to_string()), "ok");
    assert!(sb.records().is_empty(), "{:#?}", sb.records());
}

#[test]
fn udp_unconnected_and_connected_are_denied() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    assert_eq!(
        sb.probe("denylist", &[], "udp-sendto", "127.0.0.2:5353"),
        "eperm"
    );
    assert_eq!(
        sb.probe("denylist", &[], "udp-connect", "127.0.0.2:5353"),
        "eperm"
    );
    assert_eq!(
        sb.probe("denylist", &[], "udp-sendto", "127.0.10.200:5353"),
        "eperm"
    );
    let records = sb.records();
    let ops: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["op"].as_str().unwrap(), r["proto"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ops,
        [("sendmsg", "udp"), ("connect", "udp"), ("sendmsg", "udp")]
    );
    assert_eq!(
        sb.probe("denylist", &[], "udp-sendto", "127.0.0.4:5353"),
        "ok"
    );
}

#[test]
fn ipv4_mapped_ipv6_is_judged_by_ipv4_rules() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    assert_eq!(
        sb.probe("denylist", &[], "tcp-mapped", "127.0.0.2:80"),
        "eperm"
    );
    assert_eq!(
        sb.probe("denylist", &[], "udp-mapped", "127.0.0.2:5353"),
        "eperm"
    );
    let records = sb.records();
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r["target"].as_str().unwrap().starts_with("127.0.0.2:"))
    );
}

#[test]
fn ipv6_rules_with_ports() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    assert_eq!(sb.probe("denylist", &[], "udp-sendto", "[::1]:9"), "eperm");
    assert_eq!(sb.probe("denylist", &[], "tcp", "[::1]:9"), "eperm");
    assert_eq!(sb.probe("denylist", &[], "udp-sendto", "[::1]:10"), "ok");
    let r = &sb.records()[0];
    assert_eq!(r["target"], "[::1]:9");
    assert_eq!(r["rule"]["text"], "[::1]:9");
}

#[test]
fn port_and_protocol_specific_rules() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    assert_eq!(sb.probe("denylist", &[], "tcp", "127.0.0.3:8080"), "eperm");
    assert_eq!(
        sb.probe("denylist", &[], "udp-sendto", "127.0.0.3:8080"),
        "ok"
    );
    let (_l, addr) = listen("127.0.0.3:0");
    assert_ne!(addr.port(), 8080);
    assert_eq!(sb.probe("denylist", &[], "tcp", &addr.to_string()), "ok");
    assert_eq!(only(&sb.records())["rule"]["text"], "127.0.0.3:8080/tcp");
}

#[test]
fn unspecified_address_is_judged_as_loopback() {
    let sb = Sandbox::new();
    sb.profile(
        "lo",
        "name = \"lo\"\n[network]\ndeny = [\"127.0.0.1:7\", \"[::1]:7\"]\n",
    );
    assert_eq!(sb.probe("lo", &[], "tcp", "0.0.0.0:7"), "eperm");
    assert_eq!(sb.probe("lo", &[], "udp-sendto", "[::]:7"), "eperm");
}

#[test]
fn tcp_fast_open_is_judged_like_connect() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    assert_eq!(
        sb.probe("denylist", &[], "tcp-fastopen", "127.0.0.2:80"),
        "eperm"
    );
    assert_eq!(only(&sb.records())["op"], "connect");
}

#[test]
fn allow_list_profile_reaches_only_what_it_names() {
    let sb = Sandbox::new();
    let (_l, allowed) = listen("127.0.0.5:0");
    let (_l2, other) = listen("127.0.0.6:0");
    sb.profile(
        "allowlist",
        &format!(
            "name = \"allowlist\"\n[network]\ndefault = \"deny\"\nallow = [\"{allowed}/tcp\"]\n"
        ),
    );
    assert_eq!(
        sb.probe("allowlist", &[], "tcp", &allowed.to_string()),
        "ok"
    );
    assert_eq!(
        sb.probe("allowlist", &[], "tcp", &other.to_string()),
        "eperm"
    );
    assert_eq!(
        sb.probe("allowlist", &[], "udp-sendto", &allowed.to_string()),
        "eperm"
    );
    assert_eq!(
        sb.probe("allowlist", &[], "udp-sendto", "[::1]:5353"),
        "eperm"
    );
    let records = sb.records();
    assert_eq!(records.len(), 3);
    assert!(
        records
            .iter()
            .all(|r| r["rule"]["text"] == "default = \"deny\"")
    );
}

#[test]
fn audit_mode_allows_but_logs() {
    let sb = Sandbox::new();
    let (_l, addr) = listen("127.0.0.2:0");
    sb.profile("denylist", DENY_LIST);
    assert_eq!(
        sb.probe("denylist", &["--audit"], "tcp", &addr.to_string()),
        "ok"
    );
    let r = only(&sb.records()).clone();
    assert_eq!(r["verdict"], "audit");
    assert_eq!(r["target"], addr.to_string());

    sb.profile(
        "audited",
        "name = \"audited\"\nmode = \"audit\"\n[network]\ndeny = [\"127.0.0.2\"]\n",
    );
    assert_eq!(sb.probe("audited", &[], "tcp", &addr.to_string()), "ok");
    assert_eq!(sb.records()[1]["verdict"], "audit");
}

#[test]
fn child_cgroups_of_the_session_stay_enforced() {
    let sb = Sandbox::new();
    // Creating and entering a child cgroup writes a cgroup file, which the
    // `cgroup` guard refuses where BPF LSM runs: re-allow it here.
    sb.profile(
        "denylist",
        &format!("{DENY_LIST}\n[guard]\nallow = [\"cgroup\"]\n"),
    );
    assert_eq!(
        sb.probe("denylist", &[], "nested-tcp", "127.0.0.2:80"),
        "eperm"
    );
    assert_eq!(only(&sb.records())["verdict"], "deny");
}

#[test]
fn processes_outside_the_session_are_unaffected() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    let (_l, addr) = listen("127.0.0.2:0");
    let mut agent = sb.spawn("denylist", &["sleep", "3"]);
    // Wait until the session is live (its programs are attached); under
    // the VM's emulation, loading the programs takes a while.
    integration_tests::wait_for("the session", session_is_live);
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect("outside the session, the denied address is reachable");
    assert!(agent.0.wait().unwrap().success());
    assert!(sb.records().is_empty());
}

fn session_is_live() -> bool {
    let Some(mount) = integration_tests::cgroup2_mount() else {
        return false;
    };
    let root = mount.join("enforcer");
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .any(|instance| {
            std::fs::read_dir(instance.path())
                .into_iter()
                .flatten()
                .flatten()
                .any(|s| s.file_name().to_string_lossy().starts_with("denylist."))
        })
}

#[test]
fn exit_code_and_signals_pass_through() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    assert_eq!(
        sb.run("denylist", &[], &["sh", "-c", "exit 42"])
            .status
            .code(),
        Some(42)
    );
    assert_eq!(
        sb.run("denylist", &[], &["sh", "-c", "kill -9 $$"])
            .status
            .code(),
        Some(137)
    );
    assert_eq!(sb.run("denylist", &[], &["true"]).status.code(), Some(0));
}

#[test]
fn missing_command_and_unknown_profile_fail_clearly() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    let out = sb.run("nope", &[], &["true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no profile named `nope`") && err.contains("denylist"),
        "{err}"
    );
}

#[test]
fn host_name_rules_resolve_and_follow_address_changes() {
    let sb = Sandbox::new();
    let dns = TestDnsServer::start(Ipv4Addr::LOCALHOST.into()).unwrap();
    dns.set_a("db.test", &[Ipv4Addr::new(127, 0, 20, 1)], 1);
    sb.profile(
        "named",
        "name = \"named\"\n[network]\ndeny = [\"db.test:5432\"]\n",
    );
    let resolver = dns.addr().to_string();
    let marks = tempfile::tempdir().unwrap();
    let (resolved_mark, changed_mark) =
        (marks.path().join("resolved"), marks.path().join("changed"));
    // Resolved at load: the agent is denied the name's address. After the
    // name moves (TTL 1 s, re-resolved within a few seconds), the old
    // address is reachable and the new one denied. The agent polls rather
    // than sleeping, so a slow machine (or an emulated VM) only waits longer.
    let script = format!(
        "{probe} tcp 127.0.20.1:5432; touch {resolved}; \
         while [ ! -e {changed} ]; do sleep 0.1; done; \
         n=0; while [ $n -lt 300 ]; do r=$({probe} tcp 127.0.20.1:5432); [ \"$r\" = ok ] && break; n=$((n+1)); sleep 0.1; done; \
         echo $r; {probe} tcp 127.0.20.2:5432",
        probe = probe_bin(),
        resolved = path_str(&resolved_mark),
        changed = path_str(&changed_mark),
    );
    let (_l1, _) = listen("127.0.20.1:5432");
    let (_l2, _) = listen("127.0.20.2:5432");
    let dns_mover = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_mins(2);
        while !resolved_mark.exists() {
            assert!(Instant::now() < deadline, "the agent never ran");
            std::thread::sleep(Duration::from_millis(50));
        }
        dns.set_a("db.test", &[Ipv4Addr::new(127, 0, 20, 2)], 1);
        std::fs::write(&changed_mark, "").unwrap();
        dns
    });
    let out = sb.run("named", &["--resolver", &resolver], &["sh", "-c", &script]);
    let dns = dns_mover.join().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines, ["eperm", "ok", "eperm"]);
    let records = sb.records();
    assert!(records.len() >= 2, "{records:#?}");
    assert!(
        records
            .iter()
            .all(|r| r["host"] == "db.test" && r["rule"]["text"] == "db.test:5432")
    );
    assert_eq!(records.last().unwrap()["target"], "127.0.20.2:5432");
    assert!(dns.query_count() >= 2, "the name was re-resolved");
}

#[test]
fn hosts_file_names_resolve() {
    let sb = Sandbox::new();
    sb.profile(
        "named",
        "name = \"named\"\n[network]\ndeny = [\"localhost:7\"]\n",
    );
    assert_eq!(sb.probe("named", &[], "tcp", "127.0.0.1:7"), "eperm");
    assert_eq!(only(&sb.records())["host"], "localhost");
}

#[test]
fn builtin_default_profile_denies_cloud_metadata() {
    let sb = Sandbox::new();
    // No rules directory at all: the built-in default applies. It has file
    // rules too: on a kernel without BPF LSM they need `--allow-degraded`
    // (which changes nothing where they are enforced).
    std::fs::remove_dir(sb.rules()).unwrap();
    let degraded = ["--allow-degraded"];
    assert_eq!(
        sb.probe("default", &degraded, "tcp", "169.254.169.254:80"),
        "eperm"
    );
    assert_eq!(
        sb.probe("default", &degraded, "udp-sendto", "[fd00:ec2::254]:80"),
        "eperm"
    );
    let records = sb.records();
    let denials: Vec<&Value> = records.iter().filter(|r| r["op"] != "session").collect();
    assert_eq!(denials.len(), 2, "{records:#?}");
    assert_eq!(denials[0]["profile"], "default");
    assert_eq!(denials[0]["rule"]["file"], "<built-in>/default.toml");
}

#[test]
fn sudo_user_runs_unprivileged_with_no_new_privs() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    let out = sb
        .run_command("denylist", &[], &[probe_bin(), "id"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("uid=65534 nnp=1 cgroup="),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("/enforcer/run-"), "{stdout}");
}

#[test]
fn unprivileged_agent_cannot_leave_its_cgroup() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    // As the sudo user, try to move into the root cgroup, then connect.
    let script = format!(
        "mount=$(awk '$3==\"cgroup2\"{{print $2}}' /proc/mounts); \
         echo $$ > $mount/cgroup.procs 2>/dev/null && echo escaped; {} tcp 127.0.0.2:80",
        probe_bin()
    );
    let out = sb
        .run_command("denylist", &[], &["sh", "-c", &script])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "eperm");
}

#[test]
fn daemon_serves_sessions_status_and_keeps_the_log() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    let log = sb.log();
    let mut daemon = sb.daemon(&[]);
    // `run` without --rules goes through the daemon.
    let out = sb
        .enforcer(&[
            "run",
            "--profile",
            "denylist",
            "--",
            probe_bin(),
            "tcp",
            "127.0.0.2:80",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "eperm",
        "{out:?}"
    );
    let exit = sb
        .enforcer(&["run", "--profile", "denylist", "--", "sh", "-c", "exit 3"])
        .status()
        .unwrap();
    assert_eq!(exit.code(), Some(3));
    // Options that would differ from the daemon's are refused, not ignored.
    let out = sb
        .enforcer(&["run", "--rules", "/elsewhere", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot change them per session"));

    let status = sb.status();
    assert_eq!(status["controller"], "daemon");
    assert_eq!(status["counters"]["denied"], 1);
    assert_eq!(status["counters"]["events_lost"], 0);
    let profile = status["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "denylist")
        .unwrap();
    let rule = profile["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["text"] == "127.0.0.2")
        .unwrap();
    assert_eq!(rule["hits"], 1);
    assert_programs(&status);

    let logs = sb
        .enforcer(&["logs", "--log", path_str(&log)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("DENY  connect 127.0.0.2:80/tcp profile=denylist"),
        "{text}"
    );
    let json = sb
        .enforcer(&[
            "logs",
            "--json",
            "--profile",
            "nope",
            "--log",
            path_str(&log),
        ])
        .output()
        .unwrap();
    assert!(json.stdout.is_empty());

    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(daemon.0.id()).unwrap(), libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success());
    assert_eq!(sb.records().len(), 1);
}

/// The six socket programs are attached; with BPF LSM, the three file
/// programs and the fourteen guards too.
fn assert_programs(status: &Value) {
    let programs: Vec<&str> = status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let mut expected = vec![
        "connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6",
    ];
    if status["features"]["file_rules"] == "enforced" {
        expected.extend([
            "file_open",
            "inode_rename",
            "inode_link",
            "guard_bpf",
            "guard_ptrace",
            "guard_signal",
            "guard_clone",
            "guard_socket_create",
            "guard_unix_connect",
            "guard_unix_send",
            "guard_unlink",
            "guard_rmdir",
            "guard_create",
            "guard_mkdir",
            "guard_mknod",
            "guard_symlink",
            "guard_umount",
        ]);
    }
    assert_eq!(programs, expected);
}

#[test]
fn logs_follow_prints_new_lines() {
    let sb = Sandbox::new();
    sb.profile("denylist", DENY_LIST);
    let log = sb.log();
    std::fs::write(&log, "").unwrap();
    let mut follower = Spawned(
        sb.enforcer(&["logs", "-f", "--json", "--log", path_str(&log)])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(sb.probe("denylist", &[], "tcp", "127.0.0.2:80"), "eperm");
    let mut stdout = follower.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while std::io::Read::read(&mut stdout, &mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        line
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "logs -f printed nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    let line: Value = serde_json::from_slice(&reader.join().unwrap()).unwrap();
    assert_eq!(line["target"], "127.0.0.2:80");
}

#[test]
fn check_names_file_line_and_key() {
    let sb = Sandbox::new();
    sb.profile("good", DENY_LIST.replace("denylist", "good").as_str());
    let ok = sb
        .enforcer(&["check", "--offline", "--rules", path_str(&sb.rules())])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    sb.profile(
        "bad",
        "name = \"bad\"\n[network]\ndeny = [\n  \"10.0.0.1/8\",\n]\ncolour = 1\n",
    );
    let bad = sb
        .enforcer(&["check", "--offline", "--rules", path_str(&sb.rules())])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bad.toml:6: `colour`"), "{err}");
    // A bad rule set is refused whole: no session starts on it.
    let out = sb.run("good", &[], &["true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:6"));
}
