//! A small authoritative DNS server for the integration tests.
//!
//! The test machines have no network and no DNS, so tests that need name
//! resolution point the enforcer (or a stub resolver) at a [`TestDnsServer`]
//! running on loopback. It answers from an in-memory zone that the test can
//! change at any time, over UDP and TCP on the same port, and can be switched
//! into [`HostileMode`]s to exercise the enforcer's handling of misbehaving
//! upstream servers.
//!
//! Messages are parsed and built with `hickory-proto`; networking is plain
//! blocking `std::net` with one thread for UDP, one accepting TCP
//! connections and one per TCP connection. Every blocking call has a short
//! timeout so that dropping the server stops all threads promptly.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// How long blocking socket calls wait before re-checking the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long a TCP write may block (a client that never reads must not keep
/// the server from shutting down).
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many times `start` tries to find a port free for both UDP and TCP.
const BIND_ATTEMPTS: usize = 50;

/// Longest CNAME chain followed before answering SERVFAIL (catches loops).
const MAX_CNAME_CHAIN: usize = 16;

/// Largest UDP response sent to a client that did not advertise a larger
/// buffer with EDNS (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;

/// The UDP payload size the server advertises in its own EDNS record.
const SERVER_EDNS_PAYLOAD: u16 = 1232;

/// Ways in which the server can misbehave, for testing the enforcer's
/// robustness against a broken or malicious upstream.
///
/// In every mode a well-formed query still counts towards
/// [`TestDnsServer::query_count`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostileMode {
    /// Answer correctly.
    #[default]
    None,
    /// Answer correctly except that the message id differs from the query's.
    MismatchedId,
    /// Over UDP, answer with the TC (truncated) bit set and an empty answer
    /// section, forcing a retry over TCP. Over TCP, answer correctly.
    Truncated,
    /// Reply with bytes that are not a valid DNS message (over TCP, framed
    /// with a correct length prefix).
    Garbage,
    /// Never answer (TCP connections stay open, without replies).
    Silent,
}

/// A DNS server on loopback (or any local address) answering from a
/// mutable in-memory zone, over UDP and TCP on the same port.
///
/// The server runs until dropped. All methods take `&self`, so a server can be
/// shared between threads.
///
/// Zone semantics:
/// - names are case-insensitive and may be given with or without the
///   trailing dot; invalid names make the zone setters panic;
/// - a name holds either a CNAME or address records (setting one replaces
///   the other), as in real DNS;
/// - A/AAAA queries follow CNAME chains inside the zone: the answer holds the
///   CNAME records and then the final records; a chain ending at a name not in
///   the zone gives NXDOMAIN (with the CNAMEs), a chain longer than 16 links
///   (e.g. a loop) gives SERVFAIL;
/// - a name not in the zone gives NXDOMAIN; a name in the zone without records
///   of the queried type gives NOERROR with an empty answer (NODATA). Setting
///   an empty address list makes such a name. No SOA is added to negative
///   answers;
/// - ANY queries return the A and AAAA records of the name;
/// - responses are authoritative (AA set, RA clear), copy the query id and
///   question, and carry an EDNS record if the query had one. A UDP response
///   bigger than the client's buffer (512 bytes without EDNS) is sent with
///   TC set and no answers.
pub struct TestDnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl TestDnsServer {
    /// Starts a server on `bind`, on an ephemeral port that is the same for
    /// UDP and TCP.
    pub fn start(bind: IpAddr) -> anyhow::Result<Self> {
        let (udp, tcp) = bind_pair(bind)?;
        let addr = udp
            .local_addr()
            .context("reading the DNS server's UDP address")?;
        udp.set_read_timeout(Some(POLL_INTERVAL))
            .context("setting the UDP read timeout")?;
        tcp.set_nonblocking(true)
            .context("making the TCP listener non-blocking")?;

        let shared = Arc::new(Shared::default());
        let mut server = Self {
            addr,
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        // If spawning the second thread fails, dropping `server` stops the
        // first.
        let udp_shared = Arc::clone(&shared);
        server.threads.push(
            thread::Builder::new()
                .name(format!("test-dns-udp-{}", addr.port()))
                .spawn(move || udp_loop(&udp, &udp_shared))
                .context("spawning the DNS server's UDP thread")?,
        );
        server.threads.push(
            thread::Builder::new()
                .name(format!("test-dns-tcp-{}", addr.port()))
                .spawn(move || tcp_accept_loop(&tcp, &shared))
                .context("spawning the DNS server's TCP thread")?,
        );
        Ok(server)
    }

    /// The address (same port for UDP and TCP) the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the A records of `name` (replacing its A records, or its CNAME).
    /// An empty `addrs` leaves the name in the zone with no A records.
    pub fn set_a(&self, name: &str, addrs: &[Ipv4Addr], ttl: u32) {
        let mut zone = self.shared.zone();
        let entry = zone.addrs_entry(name);
        entry.a = addrs.to_vec();
        entry.a_ttl = ttl;
    }

    /// Sets the AAAA records of `name` (replacing its AAAA records, or its
    /// CNAME). An empty `addrs` leaves the name in the zone with no AAAA
    /// records.
    pub fn set_aaaa(&self, name: &str, addrs: &[Ipv6Addr], ttl: u32) {
        let mut zone = self.shared.zone();
        let entry = zone.addrs_entry(name);
        entry.aaaa = addrs.to_vec();
        entry.aaaa_ttl = ttl;
    }

    /// Makes `name` a CNAME for `target`, replacing any records of `name`.
    pub fn set_cname(&self, name: &str, target: &str, ttl: u32) {
        let key = zone_key(&parse_name(name));
        let target = parse_name(target);
        self.shared
            .zone()
            .names
            .insert(key, Entry::Cname { target, ttl });
    }

    /// Removes `name` and all its records from the zone (queries for it then
    /// get NXDOMAIN). Returns whether the name was in the zone.
    pub fn remove(&self, name: &str) -> bool {
        let key = zone_key(&parse_name(name));
        self.shared.zone().names.remove(&key).is_some()
    }

    /// Number of well-formed queries received so far, over UDP and TCP,
    /// including those that a [`HostileMode`] answered badly or not at all.
    /// Unparsable messages and messages that are not queries are not
    /// counted.
    pub fn query_count(&self) -> u64 {
        self.shared.queries.load(Ordering::SeqCst)
    }

    /// Switches how the server misbehaves, from the next query on.
    pub fn set_hostile(&self, mode: HostileMode) {
        *lock(&self.shared.hostile) = mode;
    }
}

impl std::fmt::Debug for TestDnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDnsServer")
            .field("addr", &self.addr)
            .field("query_count", &self.query_count())
            .field("hostile", &*lock(&self.shared.hostile))
            .finish_non_exhaustive()
    }
}

impl Drop for TestDnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            // A panicking server thread has already printed its message;
            // panicking again in drop would abort.
            let _ = handle.join();
        }
    }
}

/// Binds UDP on an ephemeral port, then TCP on the same port, retrying with
/// a new port when the TCP port is taken.
fn bind_pair(bind: IpAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let mut last_error = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind(SocketAddr::new(bind, 0))
            .with_context(|| format!("binding a UDP socket on {bind}"))?;
        let port = udp.local_addr().context("reading the UDP port")?.port();
        match TcpListener::bind(SocketAddr::new(bind, port)) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last_error = Some((port, e)),
        }
    }
    let (port, error) = last_error.expect("BIND_ATTEMPTS is not zero");
    Err(error).with_context(|| {
        format!(
            "no port free for both UDP and TCP on {bind} after {BIND_ATTEMPTS} attempts \
             (last tried {port})"
        )
    })
}

/// State shared between the server handle and its threads.
#[derive(Default)]
struct Shared {
    zone: Mutex<Zone>,
    hostile: Mutex<HostileMode>,
    queries: AtomicU64,
    stop: AtomicBool,
    /// Varies the garbage between replies.
    garbage_counter: AtomicU64,
}

/// Locks a mutex, ignoring poisoning: a panic in one test thread must not
/// turn every later zone update into a panic too.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Shared {
    fn zone(&self) -> MutexGuard<'_, Zone> {
        lock(&self.zone)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Handles one received message; returns the bytes to send back, if any.
    fn handle(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let query = Message::from_vec(packet).ok()?;
        if query.message_type() != MessageType::Query {
            return None;
        }
        self.queries.fetch_add(1, Ordering::SeqCst);

        let mode = *lock(&self.hostile);
        let mut response = match mode {
            HostileMode::Silent => return None,
            HostileMode::Garbage => return Some(self.garbage()),
            HostileMode::None | HostileMode::MismatchedId | HostileMode::Truncated => {
                self.respond(&query)
            }
        };
        if mode == HostileMode::MismatchedId {
            response.set_id(query.id() ^ 0x5a5a);
        }
        if transport == Transport::Udp && mode == HostileMode::Truncated {
            response = truncated(&response);
        }

        let mut bytes = response.to_vec().ok()?;
        if transport == Transport::Udp && bytes.len() > udp_limit(&query) {
            bytes = truncated(&response).to_vec().ok()?;
        }
        Some(bytes)
    }

    /// The correct response to `query`.
    fn respond(&self, query: &Message) -> Message {
        let mut header = Header::response_from_request(query.header());
        header.set_authoritative(true);
        let mut response = Message::new();
        response.set_header(header);
        response.add_queries(query.queries().iter().cloned());
        if query.extensions().is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(SERVER_EDNS_PAYLOAD);
            response.set_edns(edns);
        }

        let rcode = if query.op_code() != OpCode::Query {
            ResponseCode::NotImp
        } else if let [question] = query.queries() {
            if question.query_class() == DNSClass::IN {
                let (rcode, answers) = self.zone().resolve(question.name(), question.query_type());
                response.add_answers(answers);
                rcode
            } else {
                ResponseCode::Refused
            }
        } else {
            ResponseCode::FormErr
        };
        response.set_response_code(rcode);
        response
    }

    /// Bytes that do not parse as a DNS message.
    fn garbage(&self) -> Vec<u8> {
        let counter = self.garbage_counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut state = (u64::from(nanos) << 32) ^ counter ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for _ in 0..16 {
            let len = 12 + usize::try_from(next() % 53).expect("below 53");
            let bytes: Vec<u8> = (0..len).map(|_| next().to_be_bytes()[0]).collect();
            if Message::from_vec(&bytes).is_err() {
                return bytes;
            }
        }
        // Shorter than a DNS header: never parses.
        vec![0xde, 0xad, 0xbe, 0xef, 0x00]
    }
}

/// `response` with the TC bit set and no records (question and EDNS kept).
fn truncated(response: &Message) -> Message {
    let mut truncated = response.clone();
    truncated.set_truncated(true);
    truncated.take_answers();
    truncated.take_name_servers();
    truncated.take_additionals();
    truncated
}

/// The largest UDP response `query`'s sender accepts.
fn udp_limit(query: &Message) -> usize {
    query
        .extensions()
        .as_ref()
        .map_or(CLASSIC_UDP_LIMIT, |edns| {
            usize::from(edns.max_payload()).max(CLASSIC_UDP_LIMIT)
        })
}

/// The records of one name.
#[derive(Debug, Clone)]
enum Entry {
    Cname { target: Name, ttl: u32 },
    Addrs(AddrRecords),
}

#[derive(Debug, Clone, Default)]
struct AddrRecords {
    a: Vec<Ipv4Addr>,
    a_ttl: u32,
    aaaa: Vec<Ipv6Addr>,
    aaaa_ttl: u32,
}

/// The zone: records by lowercased fully qualified name.
#[derive(Debug, Default)]
struct Zone {
    names: HashMap<Name, Entry>,
}

impl Zone {
    /// The address records of `name`, created (replacing a CNAME) if needed.
    fn addrs_entry(&mut self, name: &str) -> &mut AddrRecords {
        let entry = self
            .names
            .entry(zone_key(&parse_name(name)))
            .or_insert_with(|| Entry::Addrs(AddrRecords::default()));
        if let Entry::Cname { .. } = entry {
            *entry = Entry::Addrs(AddrRecords::default());
        }
        match entry {
            Entry::Addrs(records) => records,
            Entry::Cname { .. } => unreachable!("just replaced"),
        }
    }

    /// The response code and answer records for a question.
    fn resolve(&self, qname: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
        let mut answers = Vec::new();
        let mut owner = qname.clone();
        for _ in 0..=MAX_CNAME_CHAIN {
            let Some(entry) = self.names.get(&zone_key(&owner)) else {
                return (ResponseCode::NXDomain, answers);
            };
            match entry {
                Entry::Cname { target, ttl } => {
                    answers.push(Record::from_rdata(
                        owner,
                        *ttl,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    if qtype == RecordType::CNAME {
                        return (ResponseCode::NoError, answers);
                    }
                    owner = target.clone();
                }
                Entry::Addrs(records) => {
                    if matches!(qtype, RecordType::A | RecordType::ANY) {
                        answers.extend(records.a.iter().map(|ip| {
                            Record::from_rdata(owner.clone(), records.a_ttl, RData::A(A(*ip)))
                        }));
                    }
                    if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
                        answers.extend(records.aaaa.iter().map(|ip| {
                            Record::from_rdata(
                                owner.clone(),
                                records.aaaa_ttl,
                                RData::AAAA(AAAA(*ip)),
                            )
                        }));
                    }
                    return (ResponseCode::NoError, answers);
                }
            }
        }
        (ResponseCode::ServFail, answers)
    }
}

/// Parses a zone name given by a test, with or without the trailing dot.
fn parse_name(name: &str) -> Name {
    let mut parsed =
        Name::from_ascii(name).unwrap_or_else(|e| panic!("invalid DNS name {name:?}: {e}"));
    parsed.set_fqdn(true);
    parsed
}

/// The zone's key for `name`: lowercased and fully qualified.
fn zone_key(name: &Name) -> Name {
    let mut key = name.to_lowercase();
    key.set_fqdn(true);
    key
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn udp_loop(socket: &UdpSocket, shared: &Shared) {
    let mut buf = vec![0_u8; 65_536];
    while !shared.stopping() {
        match socket.recv_from(&mut buf) {
            Ok((len, peer)) => {
                if let Some(reply) = shared.handle(&buf[..len], Transport::Udp) {
                    // The client may be gone; nothing to do about it.
                    let _ = socket.send_to(&reply, peer);
                }
            }
            Err(e) if is_timeout(&e) => {}
            // E.g. an ICMP error from an earlier reply; keep serving.
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

fn tcp_accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopping() {
        match listener.accept() {
            Ok((stream, peer)) => {
                let shared = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("test-dns-tcp-conn-{peer}"))
                    .spawn(move || tcp_connection(stream, &shared));
                if let Ok(handle) = spawned {
                    connections.push(handle);
                }
            }
            // Nothing pending (non-blocking), or a transient error such as
            // a connection reset before it was accepted.
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
        let (finished, running): (Vec<_>, Vec<_>) =
            connections.into_iter().partition(JoinHandle::is_finished);
        for handle in finished {
            let _ = handle.join();
        }
        connections = running;
    }
    for handle in connections {
        let _ = handle.join();
    }
}

/// Serves DNS-over-TCP queries (each framed by a 2-byte big-endian length)
/// on one connection until the client closes it or the server stops.
fn tcp_connection(mut stream: TcpStream, shared: &Shared) {
    let configured = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(POLL_INTERVAL)))
        .and_then(|()| stream.set_write_timeout(Some(TCP_WRITE_TIMEOUT)))
        .and_then(|()| stream.set_nodelay(true));
    if configured.is_err() {
        return;
    }
    loop {
        let mut len = [0_u8; 2];
        if !matches!(read_full(&mut stream, &mut len, shared), Ok(true)) {
            return;
        }
        let mut message = vec![0_u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(read_full(&mut stream, &mut message, shared), Ok(true)) {
            return;
        }
        let Some(reply) = shared.handle(&message, Transport::Tcp) else {
            continue;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).is_err() {
            return;
        }
    }
}

/// Fills `buf` from `stream`. `Ok(false)` means the client closed the
/// connection before sending anything, or the server is stopping.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], shared: &Shared) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        if shared.stopping() {
            return Ok(false);
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
