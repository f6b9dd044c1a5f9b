//! What the tests run as the "agent": tries one way of reaching a destination
//! and reports the outcome on stdout as `ok`, `eperm` or `error <errno>`.
//!
//! ```text
//! Usage: probe <how> <addr:port>
//!   tcp            TCP connect (AF_INET for IPv4, AF_INET6 for IPv6)
//!   tcp-mapped     TCP connect from an AF_INET6 socket to ::ffff:<IPv4>
//!   udp-sendto     unconnected UDP sendto
//!   udp-mapped     unconnected UDP sendto from AF_INET6 to ::ffff:<IPv4>
//!   udp-connect    UDP connect, then send
//!   tcp-fastopen   TCP Fast Open: sendto(MSG_FASTOPEN) without connect
//!   nested-tcp     create a child cgroup under our own, move into it, TCP connect
//!   id             print uid, NoNewPrivs and cgroup, ignoring the address
//!
//! Usage: probe steps <step>...   one line of output per step, each step one
//! argument of space-separated words:
//!   query SERVER NAME TYPE [tcp]   DNS query (UDP, or TCP): `RCODE addr...`
//!   resolve NAME                   getaddrinfo (the system resolver): `ok addr...`
//!   resolve-tcp NAME PORT          getaddrinfo, then TCP connect to its first IPv4 answer
//!   race PREFIX COUNT SUFFIX PORT  COUNT times: resolve PREFIX<i>SUFFIX and connect at
//!                                  once; `ok COUNT` or the first failure
//!   tcp ADDR:PORT                  as `probe tcp`
//!   sleep SECONDS
//!   mark PATH                      create the file PATH (a signal to the test)
//!   wait PATH                      wait (up to 2 minutes) until the file PATH exists
//!   loop-tcp ADDR:PORT UNTIL       TCP connect again and again until the file UNTIL
//!                                  exists: `ok=N eperm=M other=K`
//!   count-tcp ADDR:PORT COUNT      COUNT TCP connects: `ok=N eperm=M other=K`
//!   loop-open PATH UNTIL           open PATH for reading again and again until UNTIL exists
//!
//! Usage: probe escape <how> [ARG]   one way around the enforcer; `ok`,
//! `eperm` or `error <errno>` as above
//!   bpf                   bpf(BPF_MAP_CREATE)
//!   obj-get PATH          bpf(BPF_OBJ_GET) of a pin
//!   kill PID              kill(PID, SIGTERM)
//!   ptrace PID            ptrace(PTRACE_ATTACH) (detached again if it worked)
//!   proc-mem PID          open /proc/PID/mem for reading
//!   cgroup-move DIR       write our pid into DIR/cgroup.procs
//!   clone-into DIR        clone3(CLONE_INTO_CGROUP) into the cgroup DIR
//!   raw                   socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)
//!   packet                socket(AF_PACKET, SOCK_RAW, 0)
//!   netlink               socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE) (not an escape)
//!   unix PATH             connect a Unix stream socket to PATH
//!   unix-dgram PATH       send a datagram to the Unix socket PATH
//!   open-write PATH       open PATH for writing (as `probe open-write`)
//!   create PATH           create the file PATH
//!   rename PATH           rename PATH to PATH.moved
//!   unlink PATH           unlink PATH
//!   rmdir PATH            remove the directory PATH
//!   umount PATH           umount2(PATH, MNT_DETACH)
//!
//! Usage: probe <how> <path>
//!   open           open for reading
//!   open-write     open for writing
//!   opath-reopen   open with O_PATH (allowed), then reopen /proc/self/fd/N
//!   read-dir       list a directory
//!   uring-open     open for reading through io_uring (IORING_OP_OPENAT)
//! ```

use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let how = args.get(1).map_or("", String::as_str);
    if how == "id" {
        print_identity();
        return;
    }
    if how == "escape" {
        let what = args.get(2).map_or("", String::as_str);
        report(escape(what, args.get(3).map_or("", String::as_str)));
        return;
    }
    if how == "steps" {
        for step in &args[2..] {
            let words: Vec<&str> = step.split_whitespace().collect();
            println!("{}", run_step(&words));
        }
        return;
    }
    if let Some(path) = args.get(2).filter(|_| {
        how.starts_with("open")
            || how.starts_with("opath")
            || how == "read-dir"
            || how == "uring-open"
    }) {
        report(open_file(how, path));
        return;
    }
    let Some(dest) = args.get(2).and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: probe <how> <addr:port>");
        std::process::exit(64);
    };
    let result = match how {
        "tcp" => TcpStream::connect_timeout(&dest, Duration::from_secs(2)).map(drop),
        "tcp-mapped" => TcpStream::connect_timeout(&mapped(dest), Duration::from_secs(2)).map(drop),
        "udp-sendto" => udp_sendto(dest),
        "udp-mapped" => udp_sendto(mapped(dest)),
        "udp-connect" => udp_connect(dest),
        "tcp-fastopen" => tcp_fastopen(dest),
        "nested-tcp" => nest()
            .and_then(|()| TcpStream::connect_timeout(&dest, Duration::from_secs(2)).map(drop)),
        other => {
            eprintln!("unknown probe `{other}`");
            std::process::exit(64);
        }
    };
    report(result);
}

fn report(result: io::Result<()>) {
    match result {
        Ok(()) => println!("ok"),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => println!("eperm"),
        Err(e) => println!("error {} ({e})", e.raw_os_error().unwrap_or(-1)),
    }
}

fn open_file(how: &str, path: &str) -> io::Result<()> {
    use std::io::Read;
    match how {
        "open" => std::fs::File::open(path)?.read(&mut [0u8; 16]).map(drop),
        "open-write" => std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop),
        "opath-reopen" => {
            let c_path = std::ffi::CString::new(path).map_err(io::Error::other)?;
            // SAFETY: valid C string; the fd is owned right away.
            let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH) };
            if fd < 0 {
                return Err(io::Error::other(format!(
                    "O_PATH open failed: {}",
                    io::Error::last_os_error()
                )));
            }
            // SAFETY: fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
                .read(&mut [0u8; 16])
                .map(drop)
        }
        "read-dir" => std::fs::read_dir(path).map(drop),
        "uring-open" => uring_open(path),
        other => Err(io::Error::other(format!("unknown probe `{other}`"))),
    }
}

fn mapped(dest: SocketAddr) -> SocketAddr {
    match dest.ip() {
        IpAddr::V4(v4) => SocketAddr::V6(SocketAddrV6::new(v4.to_ipv6_mapped(), dest.port(), 0, 0)),
        IpAddr::V6(_) => dest,
    }
}

fn bind_any(dest: SocketAddr) -> io::Result<UdpSocket> {
    if dest.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")
    } else {
        UdpSocket::bind("[::]:0")
    }
}

fn udp_sendto(dest: SocketAddr) -> io::Result<()> {
    bind_any(dest)?.send_to(b"probe", dest).map(drop)
}

fn udp_connect(dest: SocketAddr) -> io::Result<()> {
    let socket = bind_any(dest)?;
    socket.connect(dest)?;
    socket.send(b"probe").map(drop)
}

fn tcp_fastopen(dest: SocketAddr) -> io::Result<()> {
    let family = if dest.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr(dest);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            b"probe".as_ptr().cast(),
            5,
            libc::MSG_FASTOPEN,
            (&raw const storage).cast(),
            len,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(dest: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match dest {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6 fits"),
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, libc::socklen_t::try_from(len).unwrap_or(0))
}

/// Our own cgroup directory.
fn own_cgroup() -> io::Result<std::path::PathBuf> {
    let relative = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or_else(|| io::Error::other("no cgroup v2 line in /proc/self/cgroup"))?;
    let mount = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })
        .ok_or_else(|| io::Error::other("no cgroup2 mount"))?;
    Ok(std::path::Path::new(&mount).join(relative.trim_start_matches('/')))
}

/// `-1` as an `io::Result`.
fn check(result: i64) -> io::Result<i64> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn escape(how: &str, arg: &str) -> io::Result<()> {
    let pid = || arg.parse::<libc::pid_t>().map_err(io::Error::other);
    let c_arg = || std::ffi::CString::new(arg).map_err(io::Error::other);
    let socket = |family, kind, proto| {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = check(i64::from(unsafe { libc::socket(family, kind, proto) }))?;
        // SAFETY: a fresh descriptor nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) });
        Ok(())
    };
    match how {
        "bpf" => {
            // union bpf_attr for BPF_MAP_CREATE: an array of one u32.
            let mut attr = [0u32; 32];
            attr[0] = 2; // BPF_MAP_TYPE_ARRAY
            attr[1] = 4;
            attr[2] = 4;
            attr[3] = 1;
            // SAFETY: attr is a zero-padded bpf_attr of the size passed.
            let fd = check(unsafe {
                libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), size_of_val(&attr))
            })?;
            // SAFETY: a fresh descriptor nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) });
            Ok(())
        }
        "obj-get" => {
            let path = c_arg()?;
            let mut attr = [0u64; 16];
            attr[0] = path.as_ptr() as u64;
            // SAFETY: attr is a zero-padded bpf_attr with a valid path pointer.
            let fd = check(unsafe {
                libc::syscall(libc::SYS_bpf, 7, attr.as_ptr(), size_of_val(&attr))
            })?;
            // SAFETY: a fresh descriptor nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) });
            Ok(())
        }
        // SAFETY: plain syscalls with integer arguments.
        "kill" => check(i64::from(unsafe { libc::kill(pid()?, libc::SIGTERM) })).map(drop),
        "ptrace" => {
            let pid = pid()?;
            // SAFETY: as above; null address and data are what ATTACH takes.
            check(unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            })?;
            // SAFETY: as above.
            unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
                libc::ptrace(
                    libc::PTRACE_DETACH,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                );
            }
            Ok(())
        }
        "proc-mem" => std::fs::File::open(format!("/proc/{}/mem", pid()?)).map(drop),
        "cgroup-move" => std::fs::write(format!("{arg}/cgroup.procs"), "0"),
        "clone-into" => clone_into(arg),
        "raw" => socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        "packet" => socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
        "netlink" => socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
        "unix" => std::os::unix::net::UnixStream::connect(arg).map(drop),
        "unix-dgram" => std::os::unix::net::UnixDatagram::unbound()?
            .send_to(b"probe", arg)
            .map(drop),
        "open-write" => open_file(how, arg),
        "create" => std::fs::File::create_new(arg).map(drop),
        "rename" => std::fs::rename(arg, format!("{arg}.moved")),
        "unlink" => std::fs::remove_file(arg),
        "rmdir" => std::fs::remove_dir(arg),
        "umount" => {
            let path = c_arg()?;
            // SAFETY: valid C string.
            check(i64::from(unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH)
            }))
            .map(drop)
        }
        other => Err(io::Error::other(format!("unknown escape `{other}`"))),
    }
}

/// `clone3(CLONE_INTO_CGROUP)`: the child would start in `dir`'s cgroup.
fn clone_into(dir: &str) -> io::Result<()> {
    /// `struct clone_args` (linux/sched.h), up to `cgroup`.
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let cgroup = std::fs::File::open(dir)?;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: u64::try_from(libc::SIGCHLD).map_err(io::Error::other)?,
        cgroup: u64::try_from(cgroup.as_raw_fd()).map_err(io::Error::other)?,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed; the child
    // only calls _exit.
    let pid =
        check(unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) })?;
    if pid == 0 {
        // SAFETY: the child exits at once.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: reaping our own child.
    unsafe {
        libc::waitpid(
            libc::pid_t::try_from(pid).unwrap_or(-1),
            std::ptr::null_mut(),
            0,
        )
    };
    Ok(())
}

fn nest() -> io::Result<()> {
    let child = own_cgroup()?.join("nested");
    std::fs::create_dir_all(&child)?;
    std::fs::write(child.join("cgroup.procs"), "0")
}

fn print_identity() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let nnp = status
        .lines()
        .find_map(|l| l.strip_prefix("NoNewPrivs:"))
        .map_or("?", str::trim);
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let cgroup = own_cgroup().map_or_else(|e| format!("? ({e})"), |p| p.display().to_string());
    println!("uid={uid} nnp={nnp} cgroup={cgroup}");
}

/// `openat` through `io_uring`: the kernel opens the file on our behalf.
fn uring_open(path: &str) -> io::Result<()> {
    let c_path = std::ffi::CString::new(path).map_err(io::Error::other)?;
    let mut ring = io_uring::IoUring::new(2)?;
    let open = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), c_path.as_ptr())
        .flags(libc::O_RDONLY)
        .build();
    // SAFETY: `c_path` outlives the submission, which completes below.
    unsafe { ring.submission().push(&open) }.map_err(io::Error::other)?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    let result = cqe.result();
    if result < 0 {
        return Err(io::Error::from_raw_os_error(-result));
    }
    // SAFETY: a successful openat returns a descriptor we now own.
    drop(unsafe { OwnedFd::from_raw_fd(result) });
    Ok(())
}

fn verdict(result: io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => "eperm".into(),
        Err(e) => format!("error {} ({e})", e.raw_os_error().unwrap_or(-1)),
    }
}

fn run_step(words: &[&str]) -> String {
    match words {
        ["query", server, name, qtype, rest @ ..] => {
            dns_query(server, name, qtype, rest.first() == Some(&"tcp"))
                .unwrap_or_else(|e| format!("error ({e})"))
        }
        ["resolve", name] => match resolve(name) {
            Ok(addrs) => {
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                format!("ok {}", list.join(" "))
            }
            Err(e) => format!("error ({e})"),
        },
        ["resolve-tcp", name, port] => verdict(resolve_connect(name, port)),
        ["race", prefix, count, suffix, port] => {
            let count: usize = count.parse().expect("count");
            for i in 0..count {
                let name = format!("{prefix}{i}{suffix}");
                if let Err(e) = resolve_connect(&name, port) {
                    return format!("{} at {name} ({i} of {count})", verdict(Err(e)));
                }
            }
            format!("ok {count}")
        }
        ["tcp", dest] => verdict(
            dest.parse::<SocketAddr>()
                .map_err(io::Error::other)
                .and_then(|d| TcpStream::connect_timeout(&d, Duration::from_secs(2)).map(drop)),
        ),
        ["mark", path] => verdict(std::fs::write(path, b"")),
        ["wait", path] => {
            let deadline = std::time::Instant::now() + Duration::from_mins(2);
            while !std::path::Path::new(path).exists() {
                if std::time::Instant::now() > deadline {
                    return format!("timed out waiting for {path}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            "waited".into()
        }
        ["loop-tcp", dest, until] => {
            attempts(connect(dest), || !std::path::Path::new(until).exists())
        }
        ["count-tcp", dest, count] => {
            let mut left: u64 = count.parse().expect("count");
            attempts(connect(dest), || {
                left = left.saturating_sub(1);
                left > 0
            })
        }
        ["loop-open", path, until] => attempts(
            || std::fs::File::open(path).map(drop),
            || !std::path::Path::new(until).exists(),
        ),
        ["sleep", secs] => {
            std::thread::sleep(Duration::from_secs_f64(secs.parse().expect("seconds")));
            "slept".into()
        }
        other => format!("unknown step {other:?}"),
    }
}

fn resolve(name: &str) -> io::Result<Vec<IpAddr>> {
    use std::net::ToSocketAddrs;
    let mut addrs: Vec<IpAddr> = (name, 0).to_socket_addrs()?.map(|a| a.ip()).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

fn resolve_connect(name: &str, port: &str) -> io::Result<()> {
    let ip = resolve(name)?
        .into_iter()
        .find(IpAddr::is_ipv4)
        .ok_or_else(|| io::Error::other("no IPv4 address"))?;
    let port: u16 = port.parse().map_err(io::Error::other)?;
    TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2)).map(drop)
}

/// One DNS query straight to `server`, bypassing the system resolver.
fn dns_query(server: &str, name: &str, qtype: &str, tcp: bool) -> Result<String, String> {
    use hickory_proto::{
        op::{Message, Query, ResponseCode},
        rr::{Name, RData, RecordType},
    };
    use std::io::{Read, Write};
    let server: SocketAddr = server.parse().map_err(|e| format!("{e}"))?;
    let qtype: RecordType = qtype.parse().map_err(|e| format!("{e}"))?;
    let mut query = Message::new();
    query
        .set_id(0x4242)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).map_err(|e| e.to_string())?,
            qtype,
        ));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let raw = if tcp {
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .map_err(|e| verdict(Err(e)))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(8)))
            .map_err(|e| e.to_string())?;
        let len = u16::try_from(bytes.len()).map_err(|e| e.to_string())?;
        stream
            .write_all(&[&len.to_be_bytes()[..], &bytes].concat())
            .map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
        buf
    } else {
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("address")
        } else {
            "[::]:0".parse().expect("address")
        };
        let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(8)))
            .map_err(|e| e.to_string())?;
        socket
            .send_to(&bytes, server)
            .map_err(|e| verdict(Err(e)))?;
        let mut buf = vec![0u8; 65_535];
        let (len, from) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
        // A resolver drops replies from another address than it asked.
        if from != server {
            return Err(format!("reply came from {from}, not {server}"));
        }
        buf.truncate(len);
        buf
    };
    let reply = Message::from_vec(&raw).map_err(|e| e.to_string())?;
    let code = match reply.response_code() {
        ResponseCode::NoError => "NOERROR".to_owned(),
        ResponseCode::NXDomain => "NXDOMAIN".to_owned(),
        ResponseCode::ServFail => "SERVFAIL".to_owned(),
        ResponseCode::FormErr => "FORMERR".to_owned(),
        ResponseCode::Refused => "REFUSED".to_owned(),
        other => u16::from(other).to_string(),
    };
    let mut out = vec![code];
    for record in reply.answers() {
        match record.data() {
            Some(RData::A(a)) => out.push(a.0.to_string()),
            Some(RData::AAAA(a)) => out.push(a.0.to_string()),
            _ => {}
        }
    }
    Ok(out.join(" "))
}

fn connect(dest: &str) -> impl FnMut() -> io::Result<()> {
    let dest: SocketAddr = dest.parse().expect("address");
    move || TcpStream::connect_timeout(&dest, Duration::from_secs(2)).map(drop)
}

/// `attempt` for as long as `go_on` says (at least once):
/// `ok=N eperm=M other=K`.
fn attempts(
    mut attempt: impl FnMut() -> io::Result<()>,
    mut go_on: impl FnMut() -> bool,
) -> String {
    let (mut ok, mut eperm, mut other) = (0u64, 0u64, 0u64);
    loop {
        match attempt() {
            Ok(()) => ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(_) => other += 1,
        }
        if !go_on() {
            break;
        }
    }
    format!("ok={ok} eperm={eperm} other={other}")
}
