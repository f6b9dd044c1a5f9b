//! The escape suite: from inside a session, every way of switching the
//! enforcer off or acting through something outside the session
//! (../shared/THREATS.md, "Turning the enforcer off" and "Someone else
//! making the connection"), as root and as an ordinary user.
//!
//! As root, each attempt must be refused by a guard (BPF LSM) and logged
//! with the guard's name; these run where BPF LSM is active (the VM) and
//! are skipped on the host. As an ordinary user (`sudo` drop, `no_new_privs`),
//! each must be refused on every kernel: on one without BPF LSM this is
//! what holds (the kernel's own permission checks), and the suite says so.

use std::{
    os::unix::net::{UnixDatagram, UnixListener},
    path::Path,
    process::Command,
};

use integration_tests::{Sandbox, Spawned, bpf_lsm, cgroup2_mount, path_str, probe_bin};
use serde_json::Value;

const PROFILE: &str = "name = \"agent\"\n[network]\ndeny = [\"127.0.0.2\"]\n";

/// Who the agent runs as.
#[derive(Clone, Copy, Debug)]
enum As {
    Root,
    /// `nobody`, as `sudo enforcer run` would drop to.
    User,
}

/// `probe escape HOW ARG` in a session of `profile` served by the daemon;
/// the probe's verdict line.
fn attempt(sb: &Sandbox, who: As, profile: &str, how: &str, arg: &str) -> String {
    let mut cmd = sb.enforcer(&[
        "run",
        "--profile",
        profile,
        "--",
        probe_bin(),
        "escape",
        how,
    ]);
    if !arg.is_empty() {
        cmd.arg(arg);
    }
    if let As::User = who {
        cmd.env("SUDO_UID", "65534").env("SUDO_GID", "65534");
    }
    let out = cmd.output().expect("running enforcer run");
    let verdict = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!(
        "{who:?} {how} {arg}: {verdict} (stderr: {})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(out.status.success(), "enforcer run failed: {out:?}");
    verdict
}

/// Records of `op`, waiting a little for the daemon to write them.
fn records_of(sb: &Sandbox, op: &str) -> Vec<Value> {
    let mut found = Vec::new();
    for _ in 0..100 {
        found = sb.records().into_iter().filter(|r| r["op"] == op).collect();
        if !found.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    found
}

/// As root: refused by the guard `op` (with `EPERM`), and logged against
/// the session.
fn refused_and_logged(sb: &Sandbox, how: &str, arg: &str, op: &str) -> Value {
    refused_with_and_logged(sb, how, arg, op, "eperm")
}

/// As `refused_and_logged`, where the kernel turns the guard's `EPERM`
/// into the probe's `verdict`.
fn refused_with_and_logged(sb: &Sandbox, how: &str, arg: &str, op: &str, verdict: &str) -> Value {
    let before = usize::try_from(sb.count_records(op)).expect("a count");
    assert_eq!(
        attempt(sb, As::Root, "agent", how, arg),
        verdict,
        "{how} {arg}"
    );
    let records = records_of(sb, op);
    assert!(
        records.len() > before,
        "no `{op}` record for {how} {arg}: {:#?}",
        sb.records()
    );
    let record = records.last().expect("a record").clone();
    assert_eq!(record["verdict"], "deny", "{record}");
    assert_eq!(record["profile"], "agent", "{record}");
    assert!(
        record["session"]
            .as_str()
            .is_some_and(|s| s.starts_with("agent."))
    );
    record
}

/// As the user: refused, whatever the kernel.
fn refused_as_user(sb: &Sandbox, how: &str, arg: &str) {
    let verdict = attempt(sb, As::User, "agent", how, arg);
    assert_ne!(
        verdict, "ok",
        "an unprivileged agent got through: {how} {arg}"
    );
}

/// The daemon with the `agent` profile.
fn daemon(sb: &Sandbox) -> Spawned {
    sb.profile("agent", PROFILE);
    sb.daemon(&[])
}

fn alive(process: &mut Spawned) -> bool {
    matches!(process.0.try_wait(), Ok(None))
}

#[test]
fn the_controller_cannot_be_signalled_or_traced() {
    let sb = Sandbox::new();
    let mut daemon = daemon(&sb);
    let pid = daemon.0.id().to_string();
    for how in ["kill", "ptrace", "proc-mem"] {
        refused_as_user(&sb, how, &pid);
    }
    if bpf_lsm() {
        let record = refused_and_logged(&sb, "kill", &pid, "signal");
        assert_eq!(
            record["target"],
            format!("pid {pid} (enforcer)"),
            "{record}"
        );
        assert_eq!(record["proto"], "signal 15", "{record}");
        refused_and_logged(&sb, "ptrace", &pid, "ptrace");
        // The kernel answers a refused /proc/<pid>/mem open with EACCES.
        refused_with_and_logged(
            &sb,
            "proc-mem",
            &pid,
            "ptrace",
            "error 13 (Permission denied (os error 13))",
        );
    }
    assert!(alive(&mut daemon), "the daemon died");
    assert!(sb.enforcer(&["status"]).output().unwrap().status.success());
}

#[test]
fn processes_outside_the_session_cannot_be_signalled_unless_re_allowed() {
    let sb = Sandbox::new();
    sb.profile(
        "relaxed",
        "name = \"relaxed\"\n[guard]\nallow = [\"signal\", \"ptrace\"]\n",
    );
    let _daemon = daemon(&sb);
    let mut outside = Spawned(Command::new("sleep").arg("60").spawn().unwrap());
    let pid = outside.0.id().to_string();
    if bpf_lsm() {
        refused_and_logged(&sb, "kill", &pid, "signal");
        assert!(alive(&mut outside));
        assert_eq!(attempt(&sb, As::Root, "relaxed", "kill", &pid), "ok");
        assert!(
            !alive(&mut outside),
            "the re-allowed signal was not delivered"
        );
    }
    // Inside its own session, an agent signals and traces its children.
    let script = format!(
        "sleep 30 & child=$!; {probe} escape ptrace $child; {probe} escape kill $child",
        probe = probe_bin()
    );
    let out = sb
        .enforcer(&["run", "--profile", "agent", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\nok\n", "{out:?}");
}

#[test]
fn a_session_cannot_leave_its_cgroup() {
    let sb = Sandbox::new();
    let _daemon = daemon(&sb);
    let root = cgroup2_mount().expect("cgroup2 is mounted");
    let root = path_str(&root);
    for how in ["cgroup-move", "clone-into"] {
        refused_as_user(&sb, how, root);
    }
    if bpf_lsm() {
        let moved = refused_and_logged(&sb, "cgroup-move", root, "cgroup");
        assert_eq!(moved["target"], "cgroup.procs", "{moved}");
        assert_eq!(moved["mode"], "write", "{moved}");
        let cloned = refused_and_logged(&sb, "clone-into", root, "cgroup");
        assert_eq!(cloned["target"], "clone3(CLONE_INTO_CGROUP)", "{cloned}");
    }
}

#[test]
fn a_session_cannot_use_bpf_or_touch_the_pins() {
    let sb = Sandbox::new();
    let _daemon = daemon(&sb);
    let pins = sb.pin_dir();
    let map = pins.join("v1/maps/SESSIONS");
    assert!(map.exists(), "the daemon pinned {}", map.display());
    let map = path_str(&map);
    refused_as_user(&sb, "bpf", "");
    refused_as_user(&sb, "obj-get", map);
    refused_as_user(&sb, "unlink", map);
    refused_as_user(&sb, "umount", "/sys/fs/bpf");
    if bpf_lsm() {
        refused_and_logged(&sb, "bpf", "", "bpf");
        refused_and_logged(&sb, "obj-get", map, "bpf");
        let unlinked = refused_and_logged(&sb, "unlink", map, "pins");
        assert_eq!(unlinked["target"], "SESSIONS", "{unlinked}");
        refused_and_logged(&sb, "rmdir", path_str(&pins.join("v1/maps")), "pins");
        refused_and_logged(&sb, "umount", "/sys/fs/bpf", "pins");
        assert!(Path::new(map).exists(), "the pin survived");
    }
}

#[test]
fn a_session_cannot_change_the_rules_the_binary_or_the_log() {
    let sb = Sandbox::new();
    let _daemon = daemon(&sb);
    let profile = sb.rules().join("agent.toml");
    let new = sb.rules().join("new.toml");
    let log = sb.log();
    let binary = integration_tests::enforcer_bin();
    let attempts: [(&str, &Path); 6] = [
        ("open-write", &profile),
        ("create", &new),
        ("unlink", &profile),
        ("rename", &profile),
        ("open-write", &log),
        // Writing a running binary is refused anyway (ETXTBSY); replacing
        // it is the way to change it.
        ("rename", &binary),
    ];
    for (how, path) in attempts {
        refused_as_user(&sb, how, path_str(path));
    }
    if bpf_lsm() {
        for (how, path) in attempts {
            let record = refused_and_logged(&sb, how, path_str(path), "enforcer-files");
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(record["target"], name, "{record}");
        }
        assert!(!new.exists() && profile.exists(), "the rules changed");
        // The daemon still has its rules and reloads them.
        assert!(sb.enforcer(&["reload"]).status().unwrap().success());
        // A file next to the rules directory is no enforcer file.
        let beside = sb.rules().with_file_name("beside");
        assert_eq!(
            attempt(&sb, As::Root, "agent", "create", path_str(&beside)),
            "ok"
        );
    }
}

#[test]
fn a_session_cannot_open_raw_or_packet_sockets() {
    let sb = Sandbox::new();
    let _daemon = daemon(&sb);
    refused_as_user(&sb, "raw", "");
    refused_as_user(&sb, "packet", "");
    if bpf_lsm() {
        let raw = refused_and_logged(&sb, "raw", "", "raw-socket");
        assert_eq!(raw["target"], "family 2 type 3", "{raw}");
        refused_and_logged(&sb, "packet", "", "raw-socket");
    }
    // Netlink's SOCK_RAW (`ip`, getaddrinfo) is not a way around anything.
    assert_eq!(attempt(&sb, As::Root, "agent", "netlink", ""), "ok");
    assert_eq!(attempt(&sb, As::User, "agent", "netlink", ""), "ok");
}

#[test]
fn local_services_that_act_outside_the_session_are_out_of_reach() {
    let sb = Sandbox::new();
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("docker.sock");
    let bus = dir.path().join("bus");
    let other = dir.path().join("other.sock");
    let link = dir.path().join("link.sock");
    let _docker = UnixListener::bind(&docker).unwrap();
    let _bus = UnixDatagram::bind(&bus).unwrap();
    let _other = UnixListener::bind(&other).unwrap();
    std::os::unix::fs::symlink(&docker, &link).unwrap();
    for path in [&docker, &bus, &other] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
    }
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let base = dir.path().display();
    sb.profile(
        "agent",
        &format!("{PROFILE}[guard]\nsockets = [\"{base}/*.sock\", \"{base}/bus\"]\n"),
    );
    sb.profile(
        "docker",
        &format!(
            "name = \"docker\"\n[guard]\nsockets = [\"{base}/*.sock\"]\nallow = [\"{base}/docker.sock\"]\n"
        ),
    );
    let _daemon = sb.daemon(&[]);
    let control = sb.socket();
    if bpf_lsm() {
        // Logged by the socket's first name: the link is docker.sock.
        for (path, name) in [(&docker, &docker), (&link, &docker), (&other, &other)] {
            let record = refused_and_logged(&sb, "unix", path_str(path), "local-socket");
            assert_eq!(record["target"], path_str(name), "{record}");
        }
        refused_and_logged(&sb, "unix-dgram", path_str(&bus), "local-socket");
        // The control socket, whatever the profile says.
        refused_and_logged(&sb, "unix", path_str(&control), "local-socket");
        // Re-allowed by the `docker` profile, and only that socket.
        assert_eq!(
            attempt(&sb, As::Root, "docker", "unix", path_str(&docker)),
            "ok"
        );
        assert_eq!(
            attempt(&sb, As::Root, "docker", "unix", path_str(&other)),
            "eperm"
        );
    }
    refused_as_user(&sb, "unix", path_str(&control));
    if bpf_lsm() {
        for path in [&docker, &link] {
            assert_eq!(
                attempt(&sb, As::User, "agent", "unix", path_str(path)),
                "eperm"
            );
        }
    }
}
