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
