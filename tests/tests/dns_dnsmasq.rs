//! DNS-aware rules with a standard resolver from Debian's packages
//! (dnsmasq) as the upstream, as a new user would run it, instead of the
//! tests' own server. Host kernel only (the VM carries no dnsmasq).

use std::{
    net::UdpSocket,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{Sandbox, Spawned, listen, probe_bin};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// dnsmasq on 127.0.0.1:<free port>, answering from the command line only:
/// `*.railway.test` (and railway.test) at 127.0.9.1, `api.allowed.test` at
/// 127.0.9.2, and `alias.test` a CNAME of `api.railway.test`.
fn dnsmasq() -> (Spawned, String) {
    assert!(
        Path::new(DNSMASQ).exists(),
        "{DNSMASQ} is missing: `apt-get install dnsmasq-base` (cargo xtask test installs it)"
    );
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(DNSMASQ)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file=",
            "--local-ttl=1",
            &format!("--port={port}"),
            "--address=/railway.test/127.0.9.1",
            "--host-record=api.allowed.test,127.0.9.2",
            "--host-record=api.railway.test,127.0.9.1",
            "--cname=alias.test,api.railway.test",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("starting dnsmasq");
    let server = format!("127.0.0.1:{port}");
    // Ready once it answers a TCP connect.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&server).is_err() {
        assert!(Instant::now() < deadline, "dnsmasq did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Spawned(child), server)
}

fn steps(sb: &Sandbox, profile: &str, upstream: &str, steps: &[&str]) -> Vec<String> {
    let mut agent = vec![probe_bin(), "steps"];
    agent.extend_from_slice(steps);
    let out = sb.run(profile, &["--resolver", upstream], &agent);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn deny_list_wildcards_and_cnames_with_dnsmasq_upstream() {
    let (_dnsmasq, upstream) = dnsmasq();
    let sb = Sandbox::new();
    sb.profile(
        "deny",
        "name = \"deny\"\n[network]\ndeny = [\"*.railway.test\"]\n",
    );
    let (_l, target) = listen("127.0.9.1:0");
    let (_l2, fine) = listen("127.0.9.2:0");
    let out = steps(
        &sb,
        "deny",
        &upstream,
        &[
            "query 10.255.0.53:53 backboard.railway.test A",
            "query 10.255.0.53:53 Backboard.RAILWAY.test. A tcp",
            "query 10.255.0.53:53 alias.test A",
            "resolve backboard.railway.test",
            &format!("tcp {target}"),
            "resolve api.allowed.test",
            &format!("tcp {fine}"),
        ],
    );
    assert_eq!(out[0], "NXDOMAIN");
    assert_eq!(out[1], "NXDOMAIN");
    assert_eq!(out[2], "NXDOMAIN");
    assert!(out[3].starts_with("error"), "{out:?}");
    assert_eq!(out[4], "eperm");
    assert_eq!(out[5], "ok 127.0.9.2");
    assert_eq!(out[6], "ok");
    let connect: Vec<_> = sb
        .records()
        .into_iter()
        .filter(|r| r["op"] == "connect")
        .collect();
    assert_eq!(connect.len(), 1, "{connect:#?}");
    assert_eq!(connect[0]["host"], "backboard.railway.test");
}

#[test]
fn allow_list_with_dnsmasq_upstream() {
    let (_dnsmasq, upstream) = dnsmasq();
    let sb = Sandbox::new();
    sb.profile(
        "allow",
        "name = \"allow\"\n[network]\ndefault = \"deny\"\nallow = [\"api.allowed.test\"]\n",
    );
    let (_l, allowed) = listen("127.0.9.2:0");
    let (_l2, other) = listen("127.0.9.1:0");
    let out = steps(
        &sb,
        "allow",
        &upstream,
        &[
            &format!("resolve-tcp api.allowed.test {}", allowed.port()),
            "query 10.255.0.53:53 api.railway.test A",
            &format!("tcp {other}"),
        ],
    );
    assert_eq!(out, ["ok", "NXDOMAIN", "eperm"]);
}
