//! DNS-aware host rules against the real kernel: every query from a session
//! is steered to the controller's proxy, which refuses denied names, learns
//! the addresses of answers into the kernel's rules, and answers only after
//! they are installed. The upstream is a loopback DNS server of the tests'
//! own; the agent asks resolvers that do not exist (10.255.0.53, 192.0.2.1,
//! `2001:db8::53`) and gets answers anyway, because the kernel steers port 53.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use integration_tests::{
    Sandbox,
    dns::{HostileMode, TestDnsServer},
    listen,
};
use serde_json::Value;

/// Resolvers the agent asks; none exists, all are steered to the proxy.
const NOWHERE_V4: &str = "10.255.0.53:53";
const NOWHERE_V4_OTHER: &str = "192.0.2.1:53";
const NOWHERE_V6: &str = "[2001:db8::53]:53";

fn upstream() -> TestDnsServer {
    TestDnsServer::start(Ipv4Addr::LOCALHOST.into()).expect("test DNS server")
}

/// Run the probe's `steps` in one session of `profile`, with `server` as the
/// controller's upstream; returns one output line per step.
fn steps(sb: &Sandbox, profile: &str, server: &TestDnsServer, steps: &[&str]) -> Vec<String> {
    let upstream = server.addr().to_string();
    let mut agent = vec![integration_tests::probe_bin(), "steps"];
    agent.extend_from_slice(steps);
    let out = sb.run(
        profile,
        &["--resolver", &upstream, "--dns-ttl-floor", "1"],
        &agent,
    );
    assert!(out.status.success(), "enforcer run failed: {out:?}");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), steps.len(), "{lines:?}");
    lines
}

fn dns_records(sb: &Sandbox) -> Vec<Value> {
    sb.records()
        .into_iter()
        .filter(|r| r["op"] == "dns")
        .collect()
}

const DENY_NAMES: &str = r#"
name = "names"
[network]
deny = ["api.railway.test", "*.prod.test"]
"#;

#[test]
fn exact_and_wildcard_names_are_refused_in_any_spelling_and_their_addresses_denied() {
    let sb = Sandbox::new();
    sb.profile("names", DENY_NAMES);
    let server = upstream();
    server.set_a("api.railway.test", &[Ipv4Addr::new(127, 0, 3, 1)], 300);
    server.set_a("db.prod.test", &[Ipv4Addr::new(127, 0, 3, 2)], 300);
    server.set_a("ok.test", &[Ipv4Addr::new(127, 0, 3, 3)], 300);
    server.set_a("prod.test", &[Ipv4Addr::new(127, 0, 3, 4)], 300);
    let (_l, db) = listen("127.0.3.2:0");
    let (_l2, ok) = listen("127.0.3.3:0");
    let out = steps(
        &sb,
        "names",
        &server,
        &[
            &format!("query {NOWHERE_V4} api.railway.test A"),
            &format!("query {NOWHERE_V4} API.Railway.TEST. A"),
            &format!("query {NOWHERE_V4} db.prod.test A"),
            &format!("query {NOWHERE_V4} a.b.prod.test A"),
            &format!("query {NOWHERE_V4} ok.test A"),
            // The wildcard covers names below prod.test, not prod.test.
            &format!("query {NOWHERE_V4} prod.test A"),
            // The denied name's address, used literally, is denied too.
            &format!("tcp {db}"),
            &format!("tcp {ok}"),
        ],
    );
    assert_eq!(
        out,
        [
            "NXDOMAIN",
            "NXDOMAIN",
            "NXDOMAIN",
            "NXDOMAIN",
            "NOERROR 127.0.3.3",
            "NOERROR 127.0.3.4",
            "eperm",
            "ok"
        ]
    );
    let dns = dns_records(&sb);
    let targets: Vec<&str> = dns.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(
        targets,
        [
            "api.railway.test",
            "api.railway.test",
            "db.prod.test",
            "a.b.prod.test"
        ]
    );
    assert_eq!(dns[0]["rule"]["text"], "api.railway.test");
    assert_eq!(dns[2]["rule"]["text"], "*.prod.test");
    assert_eq!(dns[2]["verdict"], "deny");
    let connect: Vec<Value> = sb
        .records()
        .into_iter()
        .filter(|r| r["op"] == "connect")
        .collect();
    assert_eq!(connect.len(), 1, "{connect:#?}");
    assert_eq!(connect[0]["target"], db.to_string());
    assert_eq!(connect[0]["host"], "db.prod.test");
    assert_eq!(connect[0]["rule"]["text"], "*.prod.test");
}

#[test]
fn cnames_aaaa_tcp_and_other_resolvers_cannot_lead_around_a_denial() {
    let sb = Sandbox::new();
    sb.profile("names", DENY_NAMES);
    let server = upstream();
    server.set_cname("innocent.test", "hop.test", 300);
    server.set_cname("hop.test", "backboard.prod.test", 300);
    server.set_a("backboard.prod.test", &[Ipv4Addr::new(127, 0, 3, 10)], 300);
    server.set_aaaa("v6.prod.test", &[Ipv6Addr::LOCALHOST], 300);
    server.set_a("fine.test", &[Ipv4Addr::new(127, 0, 3, 11)], 300);
    let (_l, target) = listen("127.0.3.10:0");
    let (_l6, target6) = listen("[::1]:0");
    let out = steps(
        &sb,
        "names",
        &server,
        &[
            &format!("query {NOWHERE_V4} innocent.test A"),
            &format!("tcp {target}"),
            &format!("query {NOWHERE_V4} v6.prod.test AAAA"),
            &format!("tcp {target6}"),
            &format!("query {NOWHERE_V4} db.prod.test A tcp"),
            &format!("query {NOWHERE_V4_OTHER} db.prod.test A"),
            &format!("query {NOWHERE_V6} db.prod.test A"),
            &format!("query {NOWHERE_V6} fine.test A tcp"),
            &format!("query {NOWHERE_V4_OTHER} fine.test A"),
        ],
    );
    assert_eq!(
        out,
        [
            "NXDOMAIN",
            "eperm",
            "NXDOMAIN",
            "eperm",
            "NXDOMAIN",
            "NXDOMAIN",
            "NXDOMAIN",
            "NOERROR 127.0.3.11",
            "NOERROR 127.0.3.11",
        ]
    );
    let dns = dns_records(&sb);
    assert_eq!(dns[0]["target"], "innocent.test");
    assert_eq!(dns[0]["rule"]["text"], "*.prod.test");
}

#[test]
fn the_system_resolver_path_works_through_the_proxy() {
    // getaddrinfo asks the nameserver in /etc/resolv.conf (or 127.0.0.1)
    // and drops replies from any other source address: the reply must look
    // like it came from where the query went.
    let sb = Sandbox::new();
    sb.profile("names", DENY_NAMES);
    let server = upstream();
    server.set_a("fine.test", &[Ipv4Addr::new(127, 0, 3, 20)], 300);
    server.set_a("x.prod.test", &[Ipv4Addr::new(127, 0, 3, 21)], 300);
    let out = steps(
        &sb,
        "names",
        &server,
        &["resolve fine.test", "resolve x.prod.test"],
    );
    assert_eq!(out[0], "ok 127.0.3.20");
    assert!(out[1].starts_with("error"), "{out:?}");
}

const ALLOW_LIST: &str = r#"
name = "allow"
[network]
default = "deny"
allow = ["api.allowed.test", "*.cdn.test"]
"#;

#[test]
fn allow_lists_reach_only_names_they_allow() {
    let sb = Sandbox::new();
    sb.profile("allow", ALLOW_LIST);
    let server = upstream();
    server.set_a("api.allowed.test", &[Ipv4Addr::new(127, 0, 4, 1)], 300);
    server.set_a("img.cdn.test", &[Ipv4Addr::new(127, 0, 4, 2)], 300);
    server.set_a("other.test", &[Ipv4Addr::new(127, 0, 4, 3)], 300);
    let (_l1, a1) = listen("127.0.4.1:0");
    let (_l2, a2) = listen("127.0.4.2:0");
    let (_l3, a3) = listen("127.0.4.3:0");
    let (_l4, a4) = listen("127.0.4.4:0");
    let queries_before = server.query_count();
    let out = steps(
        &sb,
        "allow",
        &server,
        &[
            // Not yet resolved: not reachable. (Exact names like
            // api.allowed.test are also resolved by the controller itself.)
            &format!("tcp {a2}"),
            &format!("resolve-tcp img.cdn.test {}", a2.port()),
            &format!("resolve-tcp api.allowed.test {}", a1.port()),
            "resolve other.test",
            &format!("query {NOWHERE_V4} other.test A"),
            &format!("tcp {a3}"),
            &format!("tcp {a4}"),
        ],
    );
    assert_eq!(out[0], "eperm");
    assert_eq!(out[1], "ok");
    assert_eq!(out[2], "ok");
    assert!(out[3].starts_with("error"), "{out:?}");
    assert_eq!(out[4], "NXDOMAIN");
    assert_eq!(out[5], "eperm");
    assert_eq!(out[6], "eperm");
    // Names the allow-list does not name were never forwarded upstream:
    // A and AAAA for each of the two allowed names only (and the
    // controller's own re-resolving of the exact name).
    let forwarded = server.query_count() - queries_before;
    assert!((4..=6).contains(&forwarded), "{forwarded} queries upstream");
    let dns = dns_records(&sb);
    assert!(dns.iter().all(|r| r["target"] == "other.test"), "{dns:#?}");
    assert_eq!(dns[0]["rule"]["text"], "default = \"deny\"");
}

#[test]
fn learned_addresses_expire_and_follow_address_changes() {
    let sb = Sandbox::new();
    sb.profile("allow", ALLOW_LIST);
    let server = upstream();
    server.set_a("moving.cdn.test", &[Ipv4Addr::new(127, 0, 5, 1)], 1);
    let (_l1, a1) = listen("127.0.5.1:0");
    let (_l2, a2) = listen("127.0.5.2:0");
    let port = a1.port();
    let port2 = a2.port();
    // The server's answer changes once the agent has used the first one
    // (it says so by creating `mark`): its next lookup gets, and may reach,
    // the new address; the old one expires.
    let mark = sb.rules().with_file_name("used-first-answer");
    let mark_step = format!("mark {}", mark.display());
    let out = std::thread::scope(|scope| {
        scope.spawn(|| {
            let deadline = std::time::Instant::now() + Duration::from_mins(2);
            while !mark.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            server.set_a("moving.cdn.test", &[Ipv4Addr::new(127, 0, 5, 2)], 1);
        });
        steps(
            &sb,
            "allow",
            &server,
            &[
                &format!("resolve-tcp moving.cdn.test {port}"),
                &format!("tcp {a1}"),
                &mark_step,
                "sleep 5",
                // TTL 1 s and a 1 s floor: long expired.
                &format!("tcp {a1}"),
                &format!("tcp {a2}"),
                &format!("resolve-tcp moving.cdn.test {port2}"),
            ],
        )
    });
    assert_eq!(out, ["ok", "ok", "ok", "slept", "eperm", "eperm", "ok"]);
}

#[test]
fn no_connect_races_the_learning_of_its_answer() {
    let sb = Sandbox::new();
    sb.profile("allow", ALLOW_LIST);
    let server = upstream();
    let count: u8 = 200;
    for i in 0..count {
        server.set_a(
            &format!("n{i}.cdn.test"),
            &[Ipv4Addr::new(127, 0, 6, i + 1)],
            300,
        );
    }
    let (listener, addr) = listen("0.0.0.0:0");
    // Accept (and close) every connection, so the backlog never fills.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let out = steps(
        &sb,
        "allow",
        &server,
        &[&format!("race n {count} .cdn.test {}", addr.port())],
    );
    assert_eq!(out, [format!("ok {count}")]);
}

#[test]
fn a_flood_of_unique_names_stays_within_the_cap() {
    let sb = Sandbox::new();
    sb.profile("allow", ALLOW_LIST);
    let server = upstream();
    let count: u16 = 300;
    for i in 0..count {
        let [hi, lo] = i.to_be_bytes();
        server.set_a(
            &format!("f{i}.cdn.test"),
            &[Ipv4Addr::new(127, 7, hi, lo)],
            300,
        );
    }
    let upstream_addr = server.addr().to_string();
    let _daemon = sb.daemon(&["--resolver", &upstream_addr, "--dns-learned-max", "50"]);
    let queries: Vec<String> = (0..count)
        .map(|i| format!("query {NOWHERE_V4} f{i}.cdn.test A"))
        .collect();
    let mut agent = vec![integration_tests::probe_bin(), "steps"];
    agent.extend(queries.iter().map(String::as_str));
    let out = sb
        .enforcer(&["run", "--profile", "allow", "--"])
        .args(&agent)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("NOERROR")).count(),
        usize::from(count),
        "{out:?}"
    );
    let status = sb.status();
    assert!(
        status["dns"]["learned"].as_u64().unwrap() <= 50,
        "{status:#}"
    );
    assert_eq!(
        status["dns"]["learned_evicted"].as_u64().unwrap(),
        u64::from(count) - 50,
        "{status:#}"
    );
}

#[test]
fn hostile_upstream_answers_get_servfail_and_the_proxy_survives() {
    let sb = Sandbox::new();
    sb.profile("names", DENY_NAMES);
    let server = upstream();
    server.set_a("fine.test", &[Ipv4Addr::new(127, 0, 8, 1)], 300);
    let upstream_addr = server.addr().to_string();
    let _daemon = sb.daemon(&["--resolver", &upstream_addr]);
    let query = |how: &str| -> String {
        let out = sb
            .enforcer(&["run", "--profile", "names", "--"])
            .args([
                integration_tests::probe_bin(),
                "steps",
                &format!("query {NOWHERE_V4} fine.test A {how}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for (mode, udp, tcp) in [
        (HostileMode::Garbage, "SERVFAIL", "SERVFAIL"),
        (HostileMode::MismatchedId, "SERVFAIL", "SERVFAIL"),
        (HostileMode::Silent, "SERVFAIL", "SERVFAIL"),
        // Truncated over UDP: the proxy asks again over TCP.
        (
            HostileMode::Truncated,
            "NOERROR 127.0.8.1",
            "NOERROR 127.0.8.1",
        ),
    ] {
        server.set_hostile(mode);
        assert_eq!(query("udp"), udp, "{mode:?} over UDP");
        assert_eq!(query("tcp"), tcp, "{mode:?} over TCP");
    }
    server.set_hostile(HostileMode::None);
    assert_eq!(query("udp"), "NOERROR 127.0.8.1");
    let status = sb.status();
    assert!(status["dns"]["proxy"]["servfail"].as_u64().unwrap() >= 6);
}
