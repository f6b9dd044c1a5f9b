//! The DNS proxy each session's queries are steered to. The kernel rewrites
//! every UDP and TCP destination on port 53 from a session to the session's
//! proxy ports on 127.0.0.1 and `::1`, so the agent cannot choose a resolver
//! that bypasses policy. The proxy judges the name, asks the upstream
//! resolver, learns the answer's addresses into the kernel's rules, and only
//! then answers: the first connect after an answer never races the update.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, RecordType},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::JoinHandle,
    time::timeout,
};

use super::names::{NameVerdict, normalize};
use crate::controller::Controller;

/// How long the upstream resolver has to answer before the client gets
/// SERVFAIL.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest CNAME chain followed in an answer.
const MAX_CHAIN: usize = 16;
/// Queries answered at once per session; beyond this, UDP queries are
/// dropped (and counted) rather than queued without bound.
const MAX_IN_FLIGHT: usize = 256;
/// An idle TCP client connection is closed after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Tries to find a port free on both families and both transports.
const BIND_ATTEMPTS: usize = 32;

/// Counters over every session's proxy, shown by `enforcer status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub refused: AtomicU64,
    pub servfail: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub queries: u64,
    /// Answered NXDOMAIN because the profile denies the name.
    pub refused: u64,
    /// Answered SERVFAIL: upstream silent, malformed or hostile, or the
    /// learned addresses could not be installed.
    pub servfail: u64,
    /// UDP queries dropped because too many were in flight.
    pub dropped: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            queries: self.queries.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            servfail: self.servfail.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The session a proxy serves.
#[derive(Clone, Debug)]
pub struct SessionRef {
    pub name: String,
    pub profile: String,
    pub audit: bool,
}

/// A running proxy; dropping it stops it.
pub struct Proxy {
    pub port_v4: u16,
    /// 0 when the host has no IPv6 loopback (IPv6 queries are then denied).
    pub port_v6: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Clone)]
struct Served {
    controller: Controller,
    session: Arc<SessionRef>,
    upstream: Option<SocketAddr>,
    in_flight: Arc<Semaphore>,
}

impl Proxy {
    /// Bind the session's proxy sockets (one port for UDP and TCP on
    /// 127.0.0.1 and `::1`; `port`, or any free one) and serve them. Must
    /// run inside the runtime.
    pub fn start_on(
        controller: Controller,
        session: SessionRef,
        upstream: Option<SocketAddr>,
        port: Option<u16>,
    ) -> io::Result<Proxy> {
        let sockets = bind_sockets(port)?;
        let served = Served {
            controller,
            session: Arc::new(session),
            upstream,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        };
        let mut tasks = Vec::new();
        let port_v4 = sockets.udp_v4.local_addr()?.port();
        let port_v6 = if sockets.v6.is_some() { port_v4 } else { 0 };
        let mut serve = |udp: std::net::UdpSocket, tcp: std::net::TcpListener| -> io::Result<()> {
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            let udp = Arc::new(UdpSocket::from_std(udp)?);
            let tcp = TcpListener::from_std(tcp)?;
            tasks.push(tokio::spawn(serve_udp(udp, served.clone())));
            tasks.push(tokio::spawn(serve_tcp(tcp, served.clone())));
            Ok(())
        };
        serve(sockets.udp_v4, sockets.tcp_v4)?;
        if let Some((udp, tcp)) = sockets.v6 {
            serve(udp, tcp)?;
        }
        Ok(Proxy {
            port_v4,
            port_v6,
            tasks,
        })
    }
}

struct Sockets {
    udp_v4: std::net::UdpSocket,
    tcp_v4: std::net::TcpListener,
    v6: Option<(std::net::UdpSocket, std::net::TcpListener)>,
}

fn bind_sockets(wanted: Option<u16>) -> io::Result<Sockets> {
    let mut last = None;
    let attempts = if wanted.is_some() { 1 } else { BIND_ATTEMPTS };
    for _ in 0..attempts {
        let udp_v4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, wanted.unwrap_or(0)))?;
        let port = udp_v4.local_addr()?.port();
        let tcp_v4 = match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(t) => t,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let v6 = match std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port)) {
            Ok(udp) => match std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)) {
                Ok(tcp) => Some((udp, tcp)),
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                tracing::warn!(
                    "no IPv6 loopback (::1): DNS queries over IPv6 from sessions are denied"
                );
                None
            }
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        return Ok(Sockets { udp_v4, tcp_v4, v6 });
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port")))
}

async fn serve_udp(socket: Arc<UdpSocket>, served: Served) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::error!("DNS proxy of session {}: {e}", served.session.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = served.in_flight.clone().try_acquire_owned() else {
            served
                .controller
                .dns_stats()
                .dropped
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let query = buf[..len].to_vec();
        let socket = socket.clone();
        let served = served.clone();
        tokio::spawn(async move {
            if let Some(reply) = served.answer(&query, false).await {
                let _ = socket.send_to(&reply, peer).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: TcpListener, served: Served) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(serve_tcp_client(stream, served.clone()));
    }
}

async fn serve_tcp_client(mut stream: TcpStream, served: Served) {
    loop {
        let Ok(Ok(query)) = timeout(TCP_IDLE, read_framed(&mut stream)).await else {
            return;
        };
        let Ok(_permit) = served.in_flight.acquire().await else {
            return;
        };
        let Some(reply) = served.answer(&query, true).await else {
            return;
        };
        if write_framed(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

impl Served {
    /// The reply to one query from the agent, or `None` to stay silent
    /// (bytes too short to answer at all).
    async fn answer(&self, bytes: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let stats = self.controller.dns_stats();
        stats.queries.fetch_add(1, Ordering::Relaxed);
        let Ok(query) = Message::from_vec(bytes) else {
            return reply_to_raw(bytes, ResponseCode::FormErr);
        };
        if query.message_type() != MessageType::Query || query.op_code() != OpCode::Query {
            return encode(&reply_to(&query, ResponseCode::NotImp));
        }
        let [question] = query.queries() else {
            return encode(&reply_to(&query, ResponseCode::FormErr));
        };
        let qname = normalize(&question.name().to_ascii());
        let qtype = question.query_type();

        // An allow-list answers only names it allows: other queries are
        // not even forwarded. A denied name is forwarded, so its addresses
        // are learned and a connect to them by literal address is denied.
        let before = self
            .controller
            .judge_name(&self.session, std::slice::from_ref(&qname));
        if before == NameVerdict::Refuse(None) && self.refuse(&qname, qtype, None) {
            return encode(&reply_to(&query, ResponseCode::NXDomain));
        }
        let Some(upstream) = self.upstream else {
            stats.servfail.fetch_add(1, Ordering::Relaxed);
            return encode(&reply_to(&query, ResponseCode::ServFail));
        };
        let (raw, reply) = match exchange(upstream, &query, tcp).await {
            Ok(got) => got,
            Err(why) => {
                tracing::debug!("DNS `{qname}` {qtype}: {why}");
                stats.servfail.fetch_add(1, Ordering::Relaxed);
                return encode(&reply_to(&query, ResponseCode::ServFail));
            }
        };
        let found = read_answer(&qname, &reply);
        let verdict = self.controller.judge_name(&self.session, &found.chain);
        let refused = matches!(verdict, NameVerdict::Refuse(_));
        let learned = self.controller.learn(&self.session, &found, refused);
        if let NameVerdict::Refuse(rule) = verdict
            && (before != NameVerdict::Refuse(None) || !self.session.audit)
            && self.refuse(&qname, qtype, rule)
        {
            if let Err(e) = learned {
                tracing::error!("DNS `{qname}`: installing the denied addresses failed: {e:#}");
            }
            return encode(&reply_to(&query, ResponseCode::NXDomain));
        }
        if let Err(e) = learned {
            tracing::error!("DNS `{qname}`: installing the learned addresses failed: {e:#}");
            stats.servfail.fetch_add(1, Ordering::Relaxed);
            return encode(&reply_to(&query, ResponseCode::ServFail));
        }
        let mut raw = raw;
        raw[..2].copy_from_slice(&query.id().to_be_bytes());
        if !tcp && raw.len() > usize::from(query.max_payload().max(512)) {
            // Too big for the client's UDP buffer: tell it to ask over TCP.
            let mut truncated = reply_to(&query, reply.response_code());
            truncated.set_truncated(true);
            return encode(&truncated);
        }
        Some(raw)
    }

    /// Log a refusal; returns whether to answer NXDOMAIN (not in audit mode).
    fn refuse(&self, qname: &str, qtype: RecordType, rule: Option<usize>) -> bool {
        self.controller
            .log_dns_refusal(&self.session, qname, &qtype.to_string(), rule);
        if self.session.audit {
            return false;
        }
        self.controller
            .dns_stats()
            .refused
            .fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// What an answer says about the query name.
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    /// The query name, then each CNAME target in turn.
    pub chain: Vec<String>,
    /// A and AAAA records of any name in the chain.
    pub addresses: Vec<IpAddr>,
    /// The smallest TTL along the chain (0 when there are no records).
    pub ttl: u32,
}

/// Follow `qname` through the answer's CNAMEs and collect its addresses.
pub fn read_answer(qname: &str, reply: &Message) -> Found {
    let mut chain = vec![qname.to_owned()];
    let mut ttl: Option<u32> = None;
    let mut min_ttl = |t: u32| ttl = Some(ttl.map_or(t, |m| m.min(t)));
    while chain.len() <= MAX_CHAIN {
        let last = chain.last().cloned().unwrap_or_default();
        let next = reply.answers().iter().find_map(|r| match r.data() {
            Some(RData::CNAME(target)) if normalize(&r.name().to_ascii()) == last => {
                Some((normalize(&target.0.to_ascii()), r.ttl()))
            }
            _ => None,
        });
        match next {
            Some((target, t)) if !chain.contains(&target) => {
                min_ttl(t);
                chain.push(target);
            }
            _ => break,
        }
    }
    let mut addresses = Vec::new();
    for record in reply.answers() {
        if !chain.contains(&normalize(&record.name().to_ascii())) {
            continue;
        }
        let addr = match record.data() {
            Some(RData::A(a)) => IpAddr::V4(a.0),
            Some(RData::AAAA(a)) => IpAddr::V6(a.0),
            _ => continue,
        };
        min_ttl(record.ttl());
        addresses.push(addr);
    }
    addresses.sort();
    addresses.dedup();
    Found {
        chain,
        addresses,
        ttl: ttl.unwrap_or(0),
    }
}

/// Ask `upstream`, over TCP if the client used TCP or the UDP answer was
/// truncated. Returns the raw reply and its parse. Replies with another id
/// or question are ignored (spoofing); a reply with our id that does not
/// parse is an error.
async fn exchange(
    upstream: SocketAddr,
    query: &Message,
    tcp: bool,
) -> Result<(Vec<u8>, Message), String> {
    let mut ours = query.clone();
    ours.set_id(random_id());
    let bytes = ours
        .to_vec()
        .map_err(|e| format!("encoding the query: {e}"))?;
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    if !tcp {
        let raw = timeout(UPSTREAM_TIMEOUT, exchange_udp(upstream, &bytes, &ours))
            .await
            .map_err(|_| "upstream did not answer in time".to_owned())??;
        let reply = Message::from_vec(&raw).map_err(|e| format!("malformed reply: {e}"))?;
        if !reply.truncated() {
            return Ok((raw, reply));
        }
    }
    let raw = tokio::time::timeout_at(deadline, exchange_tcp(upstream, &bytes))
        .await
        .map_err(|_| "upstream did not answer in time over TCP".to_owned())??;
    let reply = Message::from_vec(&raw).map_err(|e| format!("malformed reply: {e}"))?;
    if reply.id() != ours.id() || reply.queries() != ours.queries() {
        return Err("the TCP reply does not match the query".into());
    }
    Ok((raw, reply))
}

async fn exchange_udp(
    upstream: SocketAddr,
    bytes: &[u8],
    ours: &Message,
) -> Result<Vec<u8>, String> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.connect(upstream).await.map_err(|e| e.to_string())?;
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let len = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        let raw = &buf[..len];
        if raw.len() < 2 || raw[..2] != ours.id().to_be_bytes() {
            continue;
        }
        match Message::from_vec(raw) {
            Ok(reply) if reply.queries() == ours.queries() => return Ok(raw.to_vec()),
            Ok(_) => {}
            Err(e) => return Err(format!("malformed reply: {e}")),
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("connecting over TCP: {e}"))?;
    write_framed(&mut stream, bytes)
        .await
        .map_err(|e| e.to_string())?;
    read_framed(&mut stream).await.map_err(|e| e.to_string())
}

async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_framed(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("message too long"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await
}

/// A reply carrying only the question and `code`.
fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code)
        .add_queries(query.queries().to_vec());
    reply
}

/// A bare reply to bytes that did not parse, if they hold an id at all.
fn reply_to_raw(bytes: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?);
    let mut reply = Message::new();
    reply
        .set_id(id)
        .set_message_type(MessageType::Response)
        .set_response_code(code);
    encode(&reply)
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    message.to_vec().ok()
}

fn random_id() -> u16 {
    let mut id = [0u8; 2];
    // SAFETY: valid buffer of the given length.
    let got = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if got != 2 {
        // Never happens on Linux ≥ 3.17; the connected socket's random
        // source port still guards against spoofed replies.
        return 0x5a5a;
    }
    u16::from_ne_bytes(id)
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::{
        Name, Record,
        rdata::{A, AAAA, CNAME},
    };

    use super::*;

    fn record(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, data)
    }

    #[test]
    fn follows_cnames_and_collects_addresses_with_the_smallest_ttl() {
        let mut m = Message::new();
        m.add_answers([
            record(
                "Alias.Test.",
                300,
                RData::CNAME(CNAME(Name::from_ascii("mid.test.").unwrap())),
            ),
            record(
                "mid.test.",
                60,
                RData::CNAME(CNAME(Name::from_ascii("backboard.railway.app.").unwrap())),
            ),
            record(
                "backboard.railway.app.",
                30,
                RData::A(A([127, 0, 0, 7].into())),
            ),
            record(
                "backboard.railway.app.",
                30,
                RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
            ),
            record("unrelated.test.", 1, RData::A(A([127, 0, 0, 8].into()))),
        ]);
        let found = read_answer("alias.test", &m);
        assert_eq!(
            found.chain,
            ["alias.test", "mid.test", "backboard.railway.app"]
        );
        assert_eq!(
            found.addresses,
            vec![
                IpAddr::from([127, 0, 0, 7]),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
        assert_eq!(found.ttl, 30);
    }

    #[test]
    fn cname_loops_end() {
        let mut m = Message::new();
        m.add_answers([
            record(
                "a.test.",
                5,
                RData::CNAME(CNAME(Name::from_ascii("b.test.").unwrap())),
            ),
            record(
                "b.test.",
                5,
                RData::CNAME(CNAME(Name::from_ascii("a.test.").unwrap())),
            ),
        ]);
        let found = read_answer("a.test", &m);
        assert_eq!(found.chain, ["a.test", "b.test"]);
        assert!(found.addresses.is_empty());
    }

    #[test]
    fn unparsable_queries_get_formerr_with_their_id() {
        let reply = reply_to_raw(&[0x12, 0x34, 0xff], ResponseCode::FormErr).unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.id(), 0x1234);
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        assert!(reply_to_raw(&[1], ResponseCode::FormErr).is_none());
    }
}
