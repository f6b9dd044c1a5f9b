//! Judging a connect or sendmsg destination against the session's profile.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use enforcer_common::{
    ACTION_DENY, Counter, DNS_PORT, EVENT_NET, NO_RULE, NetEvent, OriginalDest,
    PROFILE_PREFIX_BITS, PROTO_TCP, PROTO_UDP, RuleList, Session, V4Key, V6Key, VERDICT_AUDIT,
    VERDICT_DENY, decide,
};

use crate::{
    maps::{DNS_ORIGINAL, EVENTS, NET_RULES_V4, NET_RULES_V6, count, count_rule_hit},
    session::{self, Lookup},
};

/// `cgroup_sock_addr` return values.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

enum Verdict {
    Allow,
    Deny,
    /// A DNS query from a session: send it to the session's proxy instead.
    SteerDns(Session),
}

struct Destination {
    family: u8,
    addr: [u8; 16],
    port: u16,
    proto: u8,
}

pub fn judge_v4(ctx: &SockAddrContext, op: u8) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for this hook.
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&loopback_if_unspecified_v4(sa.user_ip4.to_ne_bytes()));
    let dest = Destination {
        family: 4,
        addr,
        port: port_from_ctx(sa.user_port),
        proto: proto_from_ctx(sa.protocol),
    };
    match judge(op, &dest) {
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
        Verdict::SteerDns(session) => {
            if session.dns_port_v4 == 0 {
                count(Counter::DnsNoProxy);
                return DENY;
            }
            remember_original(ctx, &dest);
            sa.user_ip4 = u32::from_ne_bytes(LOOPBACK_V4);
            sa.user_port = port_to_ctx(session.dns_port_v4);
            count(Counter::DnsSteered);
            ALLOW
        }
    }
}

pub fn judge_v6(ctx: &SockAddrContext, op: u8) -> i32 {
    // SAFETY: as in judge_v4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr = read_ip6(sa);
    let port = port_from_ctx(sa.user_port);
    let proto = proto_from_ctx(sa.protocol);
    // `connect4` never runs for an IPv4-mapped destination on an AF_INET6
    // socket, so judge it here by the IPv4 rules.
    let dest = if is_v4_mapped(&addr) {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&loopback_if_unspecified_v4([
            addr[12], addr[13], addr[14], addr[15],
        ]));
        Destination {
            family: 4,
            addr: v4,
            port,
            proto,
        }
    } else {
        Destination {
            family: 6,
            addr: loopback_if_unspecified_v6(addr),
            port,
            proto,
        }
    };
    match judge(op, &dest) {
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
        Verdict::SteerDns(session) => {
            // An IPv6 socket reaches the proxy on ::1, also for an
            // IPv4-mapped resolver (the kernel refuses a rewrite to an
            // IPv4-mapped address).
            if session.dns_port_v6 == 0 {
                count(Counter::DnsNoProxy);
                return DENY;
            }
            remember_original(ctx, &dest);
            set_ip6(sa, &LOOPBACK_V6);
            sa.user_port = port_to_ctx(session.dns_port_v6);
            count(Counter::DnsSteered);
            ALLOW
        }
    }
}

/// A UDP reply on a socket whose query was steered: if it comes from the
/// session's proxy, make it come from the resolver the query was sent to.
pub fn restore_dns_source_v4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for this hook.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip4.to_ne_bytes() != LOOPBACK_V4 {
        return ALLOW;
    }
    let port = port_from_ctx(sa.user_port);
    if let Lookup::Inside(_, session) = session::current()
        && session.dns_port_v4 == port
        && port != 0
        && let Some(original) = original_dest(ctx)
        && original.family == 4
    {
        sa.user_ip4 = u32::from_ne_bytes([
            original.addr[0],
            original.addr[1],
            original.addr[2],
            original.addr[3],
        ]);
        sa.user_port = port_to_ctx(original.port);
    }
    ALLOW
}

/// As `restore_dns_source_v4`, for IPv6 sockets (whose resolver may have
/// been IPv4-mapped).
pub fn restore_dns_source_v6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if read_ip6(sa) != LOOPBACK_V6 {
        return ALLOW;
    }
    let port = port_from_ctx(sa.user_port);
    if let Lookup::Inside(_, session) = session::current()
        && session.dns_port_v6 == port
        && port != 0
        && let Some(original) = original_dest(ctx)
    {
        let addr = if original.family == 4 {
            let mut mapped = [0u8; 16];
            mapped[10] = 0xff;
            mapped[11] = 0xff;
            mapped[12..].copy_from_slice(&original.addr[..4]);
            mapped
        } else {
            original.addr
        };
        set_ip6(sa, &addr);
        sa.user_port = port_to_ctx(original.port);
    }
    ALLOW
}

/// Record where a steered UDP query was going; TCP needs no reply rewrite.
#[inline(always)]
fn remember_original(ctx: &SockAddrContext, dest: &Destination) {
    if dest.proto != PROTO_UDP {
        return;
    }
    // SAFETY: the context pointer is the one the kernel passed in.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let original = OriginalDest {
        addr: dest.addr,
        port: dest.port,
        family: dest.family,
        _pad: 0,
    };
    if DNS_ORIGINAL.insert(cookie, original, 0).is_err() {
        count(Counter::DnsOriginalLost);
    }
}

#[inline(always)]
fn original_dest(ctx: &SockAddrContext) -> Option<OriginalDest> {
    // SAFETY: as in `remember_original`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied out at once.
    unsafe { DNS_ORIGINAL.get(cookie) }.copied()
}

#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> [u8; 16] {
    let mut addr = [0u8; 16];
    // The verifier only allows 4-byte accesses of user_ip6.
    let mut i = 0;
    while i < 4 {
        addr[i * 4..i * 4 + 4].copy_from_slice(&sa.user_ip6[i].to_ne_bytes());
        i += 1;
    }
    addr
}

#[inline(always)]
fn set_ip6(sa: &mut bpf_sock_addr, addr: &[u8; 16]) {
    let mut i = 0;
    while i < 4 {
        sa.user_ip6[i] = u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ]);
        i += 1;
    }
}

fn judge(op: u8, dest: &Destination) -> Verdict {
    let (session_cgroup, session) = match session::current() {
        Lookup::Outside => return Verdict::Allow,
        Lookup::Inside(cgroup, session) => (cgroup, session),
        Lookup::Unknown(cgroup) => {
            report(op, VERDICT_DENY, dest, cgroup, NO_RULE, NO_RULE);
            count(Counter::Denied);
            return Verdict::Deny;
        }
    };
    // Policy for names is the proxy's; the addresses it learns come back
    // here as rules.
    if dest.port == DNS_PORT && (dest.proto == PROTO_UDP || dest.proto == PROTO_TCP) {
        return Verdict::SteerDns(session);
    }
    let decision = decide(
        lookup(session, dest),
        dest.proto,
        dest.port,
        session.default_deny(),
    );
    if decision.action != ACTION_DENY {
        return Verdict::Allow;
    }
    if decision.rule_id != NO_RULE {
        count_rule_hit(decision.rule_id);
    }
    let audit = session.audit();
    let verdict = if audit { VERDICT_AUDIT } else { VERDICT_DENY };
    report(
        op,
        verdict,
        dest,
        session_cgroup,
        session.profile_id,
        decision.rule_id,
    );
    if audit {
        count(Counter::Audited);
        Verdict::Allow
    } else {
        count(Counter::Denied);
        Verdict::Deny
    }
}

fn lookup(session: Session, dest: &Destination) -> Option<&'static RuleList> {
    let profile = session.profile_id.to_be_bytes();
    if dest.family == 4 {
        let key = Key::new(
            PROFILE_PREFIX_BITS + 32,
            V4Key {
                profile,
                addr: [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]],
            },
        );
        NET_RULES_V4.get(&key)
    } else {
        let key = Key::new(
            PROFILE_PREFIX_BITS + 128,
            V6Key {
                profile,
                addr: dest.addr,
            },
        );
        NET_RULES_V6.get(&key)
    }
}

/// Send the event; if the ring buffer is full, count the loss instead.
fn report(
    op: u8,
    verdict: u8,
    dest: &Destination,
    session_cgroup: u64,
    profile_id: u32,
    rule_id: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<NetEvent>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    entry.write(NetEvent {
        kind: EVENT_NET,
        _pad0: 0,
        // SAFETY: helper without arguments.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        session_cgroup,
        tgid: (pid_tgid >> 32) as u32,
        #[expect(clippy::cast_possible_truncation, reason = "the uid is the low half")]
        uid: bpf_get_current_uid_gid() as u32,
        profile_id,
        rule_id,
        op,
        verdict,
        family: dest.family,
        proto: dest.proto,
        port: dest.port,
        _pad: 0,
        addr: dest.addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the port is the low 16 bits"
)]
fn port_from_ctx(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn port_to_ctx(port: u16) -> u32 {
    u32::from(port.to_be())
}

#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "IP protocol numbers fit in a byte"
)]
fn proto_from_ctx(protocol: u32) -> u8 {
    protocol as u8
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// Connecting to 0.0.0.0 reaches the local host, so judge it as 127.0.0.1;
/// otherwise a rule on loopback could be walked around.
#[inline(always)]
fn loopback_if_unspecified_v4(addr: [u8; 4]) -> [u8; 4] {
    if addr == [0; 4] { [127, 0, 0, 1] } else { addr }
}

/// Likewise `::` reaches `::1`.
#[inline(always)]
fn loopback_if_unspecified_v6(addr: [u8; 16]) -> [u8; 16] {
    if addr == [0; 16] { LOOPBACK_V6 } else { addr }
}
