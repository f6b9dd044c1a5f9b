//! Tests of the integration tests' own DNS server (`integration_tests::dns`).
//!
//! They query it with hand-built `hickory-proto` messages over plain std
//! sockets, and need nothing beyond loopback.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use integration_tests::dns::{HostileMode, TestDnsServer};

const TIMEOUT: Duration = Duration::from_secs(3);

fn start() -> TestDnsServer {
    TestDnsServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("starting the test DNS server")
}

fn build_query(id: u16, name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut opt = Edns::new();
        opt.set_max_payload(4096);
        message.set_edns(opt);
    }
    message.to_vec().unwrap()
}

/// Sends `packet` over UDP and returns the raw reply, or `None` on timeout.
fn udp_exchange_raw(server: SocketAddr, packet: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket.send_to(packet, server).unwrap();
    let mut buf = vec![0_u8; 65_536];
    match socket.recv_from(&mut buf) {
        Ok((len, from)) => {
            assert_eq!(from, server, "reply from an unexpected address");
            buf.truncate(len);
            Some(buf)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("receiving the UDP reply: {e}"),
    }
}

fn udp_query_with(server: &TestDnsServer, id: u16, name: &str, rtype: RecordType) -> Message {
    let raw = udp_exchange_raw(server.addr(), &build_query(id, name, rtype, false), TIMEOUT)
        .expect("no UDP reply");
    Message::from_vec(&raw).expect("parsing the UDP reply")
}

fn udp_query(server: &TestDnsServer, name: &str, rtype: RecordType) -> Message {
    let response = udp_query_with(server, 0x1234, name, rtype);
    check_header(&response, 0x1234, name, rtype);
    response
}

fn tcp_connect(server: &TestDnsServer) -> TcpStream {
    let stream = TcpStream::connect_timeout(&server.addr(), TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

fn tcp_send(stream: &mut TcpStream, packet: &[u8]) {
    let len = u16::try_from(packet.len()).unwrap();
    stream.write_all(&len.to_be_bytes()).unwrap();
    stream.write_all(packet).unwrap();
}

fn tcp_receive_raw(stream: &mut TcpStream) -> Vec<u8> {
    let mut len = [0_u8; 2];
    stream.read_exact(&mut len).unwrap();
    let mut reply = vec![0_u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).unwrap();
    reply
}

fn tcp_query(stream: &mut TcpStream, id: u16, name: &str, rtype: RecordType) -> Message {
    tcp_send(stream, &build_query(id, name, rtype, false));
    let response = Message::from_vec(&tcp_receive_raw(stream)).expect("parsing the TCP reply");
    check_header(&response, id, name, rtype);
    response
}

/// Checks the parts every well-behaved response has.
fn check_header(response: &Message, id: u16, name: &str, rtype: RecordType) {
    assert_eq!(response.id(), id);
    assert_eq!(response.message_type(), MessageType::Response);
    assert_eq!(response.op_code(), OpCode::Query);
    assert!(response.authoritative(), "AA not set");
    assert!(response.recursion_desired(), "RD not copied");
    assert!(!response.truncated(), "TC set");
    assert_eq!(response.queries().len(), 1);
    let question = &response.queries()[0];
    assert!(question.name().eq_case(&Name::from_ascii(name).unwrap()));
    assert_eq!(question.query_type(), rtype);
}

fn a_of(record: &Record) -> Ipv4Addr {
    match record.data() {
        Some(RData::A(a)) => a.0,
        other => panic!("expected an A record, got {other:?}"),
    }
}

fn aaaa_of(record: &Record) -> Ipv6Addr {
    match record.data() {
        Some(RData::AAAA(aaaa)) => aaaa.0,
        other => panic!("expected an AAAA record, got {other:?}"),
    }
}

fn cname_of(record: &Record) -> Name {
    match record.data() {
        Some(RData::CNAME(cname)) => cname.0.clone(),
        other => panic!("expected a CNAME record, got {other:?}"),
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

#[test]
fn answers_a_records() {
    let server = start();
    let ips = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)];
    server.set_a("www.example.com", &ips, 300);

    let response = udp_query(&server, "www.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    let answers = response.answers();
    assert_eq!(answers.len(), 2);
    for (record, ip) in answers.iter().zip(ips) {
        assert_eq!(record.name(), &name("www.example.com."));
        assert_eq!(record.record_type(), RecordType::A);
        assert_eq!(record.ttl(), 300);
        assert_eq!(a_of(record), ip);
    }
}

#[test]
fn answers_aaaa_records() {
    let server = start();
    let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
    server.set_aaaa("v6.example.com", &[ip], 60);

    let response = udp_query(&server, "v6.example.com.", RecordType::AAAA);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert_eq!(response.answers().len(), 1);
    assert_eq!(aaaa_of(&response.answers()[0]), ip);
    assert_eq!(response.answers()[0].ttl(), 60);
}

#[test]
fn a_and_aaaa_coexist_with_their_own_ttls() {
    let server = start();
    let v4 = Ipv4Addr::new(198, 51, 100, 7);
    let v6: Ipv6Addr = "2001:db8::7".parse().unwrap();
    server.set_a("dual.example.com", &[v4], 111);
    server.set_aaaa("dual.example.com", &[v6], 222);

    let a = udp_query(&server, "dual.example.com.", RecordType::A);
    assert_eq!(a.answers().len(), 1);
    assert_eq!(a_of(&a.answers()[0]), v4);
    assert_eq!(a.answers()[0].ttl(), 111);

    let aaaa = udp_query(&server, "dual.example.com.", RecordType::AAAA);
    assert_eq!(aaaa.answers().len(), 1);
    assert_eq!(aaaa_of(&aaaa.answers()[0]), v6);
    assert_eq!(aaaa.answers()[0].ttl(), 222);
}

#[test]
fn follows_cname_chains() {
    let server = start();
    let ip = Ipv4Addr::new(203, 0, 113, 9);
    server.set_cname("alias.example.com", "middle.example.net", 30);
    server.set_cname("middle.example.net.", "final.example.org", 40);
    server.set_a("final.example.org", &[ip], 50);

    let response = udp_query(&server, "alias.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    let answers = response.answers();
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert_eq!(answers[0].name(), &name("alias.example.com."));
    assert_eq!(cname_of(&answers[0]), name("middle.example.net."));
    assert_eq!(answers[0].ttl(), 30);
    assert_eq!(answers[1].name(), &name("middle.example.net."));
    assert_eq!(cname_of(&answers[1]), name("final.example.org."));
    assert_eq!(answers[1].ttl(), 40);
    assert_eq!(answers[2].name(), &name("final.example.org."));
    assert_eq!(a_of(&answers[2]), ip);
    assert_eq!(answers[2].ttl(), 50);

    // The chain without AAAA records at its end: NODATA, CNAMEs included.
    let response = udp_query(&server, "alias.example.com.", RecordType::AAAA);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert_eq!(response.answers().len(), 2);

    // A CNAME query gets just the first link.
    let response = udp_query(&server, "alias.example.com.", RecordType::CNAME);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert_eq!(response.answers().len(), 1);
    assert_eq!(
        cname_of(&response.answers()[0]),
        name("middle.example.net.")
    );
}

#[test]
fn dangling_and_looping_cnames() {
    let server = start();
    server.set_cname("dangling.example.com", "nowhere.example.com", 30);
    let response = udp_query(&server, "dangling.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NXDomain);
    assert_eq!(response.answers().len(), 1);

    server.set_cname("loop1.example.com", "loop2.example.com", 30);
    server.set_cname("loop2.example.com", "loop1.example.com", 30);
    let response = udp_query(&server, "loop1.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::ServFail);
}

#[test]
fn unknown_name_is_nxdomain_and_missing_type_is_nodata() {
    let server = start();
    server.set_a("v4only.example.com", &[Ipv4Addr::new(192, 0, 2, 3)], 300);

    let response = udp_query(&server, "unknown.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NXDomain);
    assert!(response.answers().is_empty());

    let response = udp_query(&server, "v4only.example.com.", RecordType::AAAA);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert!(response.answers().is_empty());

    let response = udp_query(&server, "v4only.example.com.", RecordType::MX);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert!(response.answers().is_empty());

    // An empty address list keeps the name known.
    server.set_a("empty.example.com", &[], 300);
    let response = udp_query(&server, "empty.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NoError);
    assert!(response.answers().is_empty());
}

#[test]
fn zone_changes_are_visible_on_the_next_query() {
    let server = start();
    let first = Ipv4Addr::new(192, 0, 2, 10);
    let second = Ipv4Addr::new(192, 0, 2, 20);

    server.set_a("moving.example.com", &[first], 5);
    let response = udp_query(&server, "moving.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), first);
    assert_eq!(response.answers()[0].ttl(), 5);

    server.set_a("moving.example.com", &[second], 7);
    let response = udp_query(&server, "moving.example.com.", RecordType::A);
    assert_eq!(response.answers().len(), 1);
    assert_eq!(a_of(&response.answers()[0]), second);
    assert_eq!(response.answers()[0].ttl(), 7);

    // A CNAME replaces the addresses, and addresses replace a CNAME.
    server.set_a("target.example.com", &[first], 5);
    server.set_cname("moving.example.com", "target.example.com", 5);
    let response = udp_query(&server, "moving.example.com.", RecordType::A);
    assert_eq!(response.answers().len(), 2);
    assert_eq!(a_of(&response.answers()[1]), first);
    server.set_a("moving.example.com", &[second], 5);
    let response = udp_query(&server, "moving.example.com.", RecordType::A);
    assert_eq!(response.answers().len(), 1);
    assert_eq!(a_of(&response.answers()[0]), second);

    assert!(server.remove("moving.example.com"));
    assert!(!server.remove("moving.example.com"));
    let response = udp_query(&server, "moving.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NXDomain);
}

#[test]
fn names_are_case_insensitive() {
    let server = start();
    let ip = Ipv4Addr::new(192, 0, 2, 30);
    server.set_a("MiXeD.Example.COM", &[ip], 300);

    let response = udp_query(&server, "mixed.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), ip);

    // The owner name echoes the question's spelling, as real servers do.
    let response = udp_query(&server, "MIXED.EXAMPLE.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), ip);
    assert!(
        response.answers()[0]
            .name()
            .eq_case(&name("MIXED.EXAMPLE.com."))
    );

    assert!(server.remove("mixed.EXAMPLE.com."));
    let response = udp_query(&server, "mixed.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NXDomain);
}

#[test]
fn trailing_dot_is_optional() {
    let server = start();
    let with_dot = Ipv4Addr::new(192, 0, 2, 40);
    let without_dot = Ipv4Addr::new(192, 0, 2, 41);
    server.set_a("dotted.example.com.", &[with_dot], 300);
    server.set_a("undotted.example.com", &[without_dot], 300);

    let response = udp_query(&server, "dotted.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), with_dot);
    let response = udp_query(&server, "undotted.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), without_dot);

    // Both spellings name the same entry.
    server.set_a("dotted.example.com", &[without_dot], 300);
    let response = udp_query(&server, "dotted.example.com.", RecordType::A);
    assert_eq!(response.answers().len(), 1);
    assert_eq!(a_of(&response.answers()[0]), without_dot);
}

#[test]
fn tcp_serves_several_queries_per_connection() {
    let server = start();
    let v4 = Ipv4Addr::new(192, 0, 2, 50);
    let v6: Ipv6Addr = "2001:db8::50".parse().unwrap();
    server.set_a("tcp.example.com", &[v4], 300);
    server.set_aaaa("tcp.example.com", &[v6], 300);
    server.set_cname("alias.tcp.example.com", "tcp.example.com", 300);

    let mut stream = tcp_connect(&server);
    let response = tcp_query(&mut stream, 1, "tcp.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), v4);
    let response = tcp_query(&mut stream, 2, "tcp.example.com.", RecordType::AAAA);
    assert_eq!(aaaa_of(&response.answers()[0]), v6);
    let response = tcp_query(&mut stream, 3, "alias.tcp.example.com.", RecordType::A);
    assert_eq!(response.answers().len(), 2);
    let response = tcp_query(&mut stream, 4, "missing.example.com.", RecordType::A);
    assert_eq!(response.response_code(), ResponseCode::NXDomain);

    // Two pipelined queries in one write, then the answers in order.
    let mut both = Vec::new();
    for (id, rtype) in [(5, RecordType::A), (6, RecordType::AAAA)] {
        let packet = build_query(id, "tcp.example.com.", rtype, false);
        both.extend_from_slice(&u16::try_from(packet.len()).unwrap().to_be_bytes());
        both.extend_from_slice(&packet);
    }
    stream.write_all(&both).unwrap();
    let first = Message::from_vec(&tcp_receive_raw(&mut stream)).unwrap();
    let second = Message::from_vec(&tcp_receive_raw(&mut stream)).unwrap();
    assert_eq!(first.id(), 5);
    assert_eq!(a_of(&first.answers()[0]), v4);
    assert_eq!(second.id(), 6);
    assert_eq!(aaaa_of(&second.answers()[0]), v6);

    // A second connection works alongside the first.
    let mut other = tcp_connect(&server);
    let response = tcp_query(&mut other, 7, "tcp.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), v4);
    let response = tcp_query(&mut stream, 8, "tcp.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), v4);
}

#[test]
fn counts_queries() {
    let server = start();
    server.set_a("count.example.com", &[Ipv4Addr::new(192, 0, 2, 60)], 300);
    assert_eq!(server.query_count(), 0);
    udp_query(&server, "count.example.com.", RecordType::A);
    udp_query(&server, "nothing.example.com.", RecordType::A);
    let mut stream = tcp_connect(&server);
    tcp_query(&mut stream, 9, "count.example.com.", RecordType::A);
    assert_eq!(server.query_count(), 3);

    // Garbage sent to the server is not a query.
    assert!(udp_exchange_raw(server.addr(), b"not dns", Duration::from_millis(200)).is_none());
    assert_eq!(server.query_count(), 3);
}

#[test]
fn large_answers_are_truncated_over_udp_unless_edns_allows_them() {
    let server = start();
    let ips: Vec<Ipv4Addr> = (1..=60).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
    server.set_a("big.example.com", &ips, 300);

    // 60 A records do not fit in 512 bytes.
    let raw = udp_exchange_raw(
        server.addr(),
        &build_query(1, "big.example.com.", RecordType::A, false),
        TIMEOUT,
    )
    .unwrap();
    let response = Message::from_vec(&raw).unwrap();
    assert!(response.truncated());
    assert!(response.answers().is_empty());
    assert_eq!(response.queries().len(), 1);

    // With EDNS they do, and the response carries EDNS too.
    let raw = udp_exchange_raw(
        server.addr(),
        &build_query(2, "big.example.com.", RecordType::A, true),
        TIMEOUT,
    )
    .unwrap();
    let response = Message::from_vec(&raw).unwrap();
    assert!(!response.truncated());
    assert_eq!(response.answers().len(), 60);
    assert!(response.extensions().is_some());

    // TCP has no such limit.
    let mut stream = tcp_connect(&server);
    let response = tcp_query(&mut stream, 3, "big.example.com.", RecordType::A);
    assert_eq!(response.answers().len(), 60);
}

#[test]
fn hostile_mismatched_id() {
    let server = start();
    server.set_a("h.example.com", &[Ipv4Addr::new(192, 0, 2, 70)], 300);
    server.set_hostile(HostileMode::MismatchedId);

    let response = udp_query_with(&server, 0x4242, "h.example.com.", RecordType::A);
    assert_ne!(response.id(), 0x4242);
    assert_eq!(response.answers().len(), 1);

    let mut stream = tcp_connect(&server);
    tcp_send(
        &mut stream,
        &build_query(0x4343, "h.example.com.", RecordType::A, false),
    );
    let response = Message::from_vec(&tcp_receive_raw(&mut stream)).unwrap();
    assert_ne!(response.id(), 0x4343);

    server.set_hostile(HostileMode::None);
    udp_query(&server, "h.example.com.", RecordType::A);
}

#[test]
fn hostile_truncated() {
    let server = start();
    let ip = Ipv4Addr::new(192, 0, 2, 80);
    server.set_a("h.example.com", &[ip], 300);
    server.set_hostile(HostileMode::Truncated);

    let response = udp_query_with(&server, 0x1111, "h.example.com.", RecordType::A);
    assert_eq!(response.id(), 0x1111);
    assert!(response.truncated());
    assert!(response.answers().is_empty());

    // The TCP retry gets the real answer.
    let mut stream = tcp_connect(&server);
    let response = tcp_query(&mut stream, 0x1112, "h.example.com.", RecordType::A);
    assert_eq!(a_of(&response.answers()[0]), ip);
}

#[test]
fn hostile_garbage() {
    let server = start();
    server.set_a("h.example.com", &[Ipv4Addr::new(192, 0, 2, 90)], 300);
    server.set_hostile(HostileMode::Garbage);

    for id in 0..5 {
        let raw = udp_exchange_raw(
            server.addr(),
            &build_query(id, "h.example.com.", RecordType::A, false),
            TIMEOUT,
        )
        .expect("garbage is still a reply");
        assert!(!raw.is_empty());
        assert!(Message::from_vec(&raw).is_err(), "garbage parsed: {raw:?}");
    }

    let mut stream = tcp_connect(&server);
    tcp_send(
        &mut stream,
        &build_query(9, "h.example.com.", RecordType::A, false),
    );
    let raw = tcp_receive_raw(&mut stream);
    assert!(Message::from_vec(&raw).is_err(), "garbage parsed: {raw:?}");
    assert_eq!(server.query_count(), 6);
}

#[test]
fn hostile_silent() {
    let server = start();
    server.set_a("h.example.com", &[Ipv4Addr::new(192, 0, 2, 100)], 300);
    server.set_hostile(HostileMode::Silent);

    let reply = udp_exchange_raw(
        server.addr(),
        &build_query(1, "h.example.com.", RecordType::A, false),
        Duration::from_millis(300),
    );
    assert!(reply.is_none());

    let mut stream = tcp_connect(&server);
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    tcp_send(
        &mut stream,
        &build_query(2, "h.example.com.", RecordType::A, false),
    );
    let mut byte = [0_u8; 1];
    let error = stream.read_exact(&mut byte).unwrap_err();
    assert!(matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    assert_eq!(server.query_count(), 2);

    // Back to normal: the same connection answers again.
    server.set_hostile(HostileMode::None);
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let response = tcp_query(&mut stream, 3, "h.example.com.", RecordType::A);
    assert_eq!(response.answers().len(), 1);
}

#[test]
fn drop_stops_the_server_promptly() {
    let server = start();
    let addr = server.addr();
    server.set_a("bye.example.com", &[Ipv4Addr::new(192, 0, 2, 110)], 300);
    // An open, idle TCP connection must not hold up shutdown.
    let mut stream = tcp_connect(&server);
    tcp_query(&mut stream, 1, "bye.example.com.", RecordType::A);

    let started = Instant::now();
    drop(server);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        started.elapsed()
    );

    assert!(TcpStream::connect_timeout(&addr, TIMEOUT).is_err());
    let reply = udp_exchange_raw(
        addr,
        &build_query(2, "bye.example.com.", RecordType::A, false),
        Duration::from_millis(200),
    );
    assert!(reply.is_none());
    // The server closed its end of the idle connection.
    let mut byte = [0_u8; 1];
    assert!(matches!(stream.read(&mut byte), Ok(0) | Err(_)));
}

#[test]
fn serves_on_ipv6_loopback() {
    let server = match TestDnsServer::start(IpAddr::V6(Ipv6Addr::LOCALHOST)) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("skipping: no IPv6 loopback ({e:#})");
            return;
        }
    };
    let ip = Ipv4Addr::new(192, 0, 2, 120);
    server.set_a("v6.example.com", &[ip], 300);
    let socket = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket
        .send_to(
            &build_query(1, "v6.example.com.", RecordType::A, false),
            server.addr(),
        )
        .unwrap();
    let mut buf = [0_u8; 512];
    let len = socket.recv(&mut buf).unwrap();
    let response = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(a_of(&response.answers()[0]), ip);
}
