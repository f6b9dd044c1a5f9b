//! The systemd side: the shipped unit passes `systemd-analyze verify`, and
//! the daemon sends READY, RELOADING, STOPPING and watchdog notifications
//! over `$NOTIFY_SOCKET` as `Type=notify` expects.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{Sandbox, Spawned, enforcer_bin, path_str};

#[test]
fn the_unit_file_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/enforcer.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    // Verify it as installed, with the binary where ExecStart says.
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("enforcer.service");
    std::fs::write(
        &installed,
        text.replace("/usr/local/bin/enforcer", path_str(&enforcer_bin())),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&installed)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for wanted in [
        "Type=notify",
        "ExecReload=",
        "WatchdogSec=",
        "Restart=on-failure",
    ] {
        assert!(text.contains(wanted), "the unit lacks {wanted}");
    }
}

#[test]
fn the_daemon_notifies_systemd() {
    let sb = Sandbox::new();
    sb.profile("p", "name = \"p\"\n[network]\ndeny = [\"127.0.0.2\"]\n");
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut daemon = Spawned(
        sb.daemon_command(&[])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000")
            .spawn()
            .unwrap(),
    );
    let mut seen = Vec::new();
    let mut wait_for = |wanted: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while !seen.iter().any(|m: &String| m.contains(wanted)) {
            assert!(Instant::now() < deadline, "no {wanted} in {seen:?}");
            let len = notify.recv(&mut buf).expect("a notification");
            seen.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        seen.clear();
    };
    wait_for("READY=1");
    wait_for("WATCHDOG=1");
    wait_for("WATCHDOG=1");
    let pid = i32::try_from(daemon.0.id()).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for("RELOADING=1");
    wait_for("READY=1");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("STOPPING=1");
    assert!(daemon.0.wait().unwrap().success());
}
