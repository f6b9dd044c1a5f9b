//! `enforcer-bench`: the load generator behind `cargo xtask bench`.
//!
//! The orchestrator decides where each process runs (no enforcer, an agent
//! session, an nftables-filtered cgroup, under Landlock, outside any
//! session) and compares the figures; this binary only measures.
//!
//! ```text
//! enforcer-bench [--cgroup DIR] [--landlock-allow DIR] serve
//!     batches on request: stdin lines `tcp|udp ADDR:PORT N` or `open PATH N`,
//!     stdout `{"ns_per_op": X}` (TCP: connect + close with an RST; UDP:
//!     unconnected sendto; open: open + close)
//! enforcer-bench turns --request R --batches B --worker SCENARIO=COMMAND...
//!     serve workers taking turns; prints the median ns/op per scenario
//! enforcer-bench flood tcp|open TARGET --procs P --millis T
//!     denied operations from P processes; prints how many were attempted
//! enforcer-bench mkpaths LIST
//!     create the files and directories (ending in /) listed
//! enforcer-bench dns SERVER NAME COUNT
//!     COUNT UDP queries for NAME, one after another; prints the median and
//!     99th percentile round trip and the queries per second
//! ```

use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use enforcer_bench::{Worker, interleave, median};

#[derive(Parser)]
#[command(about = "Load generator for `cargo xtask bench`")]
struct Cli {
    /// Move this process into the cgroup2 directory DIR first.
    #[arg(long, global = true)]
    cgroup: Option<PathBuf>,
    /// Restrict this process with Landlock first: read access beneath DIR
    /// only, every other file-system access denied.
    #[arg(long, global = true)]
    landlock_allow: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Denied operations in a tight loop from several processes for a
    /// while; prints how many were attempted. Every attempt must fail with
    /// EPERM.
    Flood {
        kind: FloodKind,
        target: String,
        #[arg(long)]
        procs: u32,
        #[arg(long)]
        millis: u64,
    },
    /// One process of `flood`: prints its own count.
    #[command(hide = true)]
    FloodWorker {
        kind: FloodKind,
        target: String,
        #[arg(long)]
        millis: u64,
    },
    /// Measure batches on request, for as long as stdin is open: each line
    /// `tcp|udp ADDR:PORT N` or `open PATH N` runs N operations and prints
    /// `{"ns_per_op": X}` (their mean). TCP connects and closes with an RST
    /// (`SO_LINGER` 0, so no `TIME_WAIT` piles up); UDP sends 32 bytes from
    /// one unconnected socket. Lets the orchestrator alternate short
    /// batches between scenarios, so drift hits them alike.
    Serve,
    /// Start a `serve` worker per scenario and have them take turns: after
    /// a warm-up batch each, BATCHES rounds in which every worker runs
    /// REQUEST once (in an order rotated every round). Prints
    /// `{"SCENARIO": median ns/op of its batches, ...}`; workers of the
    /// same scenario are pooled.
    Turns {
        /// The request each batch sends, e.g. `open /tmp/f 2000`.
        #[arg(long)]
        request: String,
        #[arg(long)]
        batches: usize,
        /// `SCENARIO=COMMAND ARGS...` (split on spaces), a command that ends
        /// in `enforcer-bench serve`.
        #[arg(long = "worker", required = true)]
        workers: Vec<String>,
    },
    /// Create every path listed in the file LIST (one a line; a trailing
    /// `/` makes a directory, otherwise an empty file), with their parents.
    Mkpaths { list: PathBuf },
    /// COUNT A queries for NAME to SERVER (UDP, one after another, each
    /// answer checked); prints `{"median_us", "p99_us", "qps"}`.
    Dns {
        server: SocketAddr,
        name: String,
        count: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum FloodKind {
    /// TCP connects to a denied `ADDR:PORT`.
    Tcp,
    /// Opens of a protected file.
    Open,
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("enforcer-bench: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(dir) = &cli.cgroup {
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, "0\n").with_context(|| format!("joining {}", dir.display()))?;
    }
    if let Some(dir) = &cli.landlock_allow {
        landlock::restrict_to(dir)?;
    }
    match cli.command {
        Cmd::Flood {
            kind,
            target,
            procs,
            millis,
        } => flood(kind, &target, procs, millis),
        Cmd::FloodWorker {
            kind,
            target,
            millis,
        } => {
            let count = flood_worker(kind, &target, Duration::from_millis(millis))?;
            println!("{count}");
            Ok(())
        }
        Cmd::Serve => serve(),
        Cmd::Turns {
            request,
            batches,
            workers,
        } => turns(&request, batches, &workers),
        Cmd::Mkpaths { list } => mkpaths(&list),
        Cmd::Dns {
            server,
            name,
            count,
        } => dns(server, &name, count),
    }
}

fn serve() -> Result<()> {
    let mut out = io::stdout().lock();
    for line in io::stdin().lines() {
        let line = line.context("reading a request")?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [op, target, iters] = fields[..] else {
            bail!("bad request {line:?}: want `tcp|udp|open TARGET N`");
        };
        let iters: u64 = iters
            .parse()
            .with_context(|| format!("bad count in {line:?}"))?;
        ensure!(iters > 0, "bad count in {line:?}");
        let elapsed = match op {
            "tcp" => {
                let addr = target
                    .parse()
                    .with_context(|| format!("bad address in {line:?}"))?;
                time_n(iters, || tcp_connect(addr))?
            }
            "udp" => {
                let addr: SocketAddr = target
                    .parse()
                    .with_context(|| format!("bad address in {line:?}"))?;
                let socket = udp_socket(addr)?;
                time_n(iters, || udp_send(&socket, addr))?
            }
            "open" => {
                let path = Path::new(target);
                let c_path = CString::new(target)?;
                time_n(iters, || open_close(&c_path, path))?
            }
            other => bail!("unknown operation {other:?}"),
        };
        #[expect(clippy::cast_precision_loss, reason = "a ratio of two times")]
        let ns_per_op = elapsed.as_nanos() as f64 / iters as f64;
        writeln!(out, "{}", serde_json::json!({ "ns_per_op": ns_per_op }))?;
        out.flush()?;
    }
    Ok(())
}

fn turns(request: &str, batches: usize, specs: &[String]) -> Result<()> {
    let mut workers = specs
        .iter()
        .map(|spec| {
            let (scenario, command) = spec
                .split_once('=')
                .with_context(|| format!("--worker {spec:?} is not SCENARIO=COMMAND"))?;
            let mut words = command.split_whitespace();
            let program = words
                .next()
                .with_context(|| format!("--worker {spec:?} has no command"))?;
            let mut cmd = Command::new(program);
            cmd.args(words);
            Worker::spawn(scenario, cmd)
        })
        .collect::<Result<Vec<_>>>()?;
    let medians: serde_json::Map<String, serde_json::Value> =
        interleave(&mut workers, request, batches)?
            .into_iter()
            .map(|(scenario, figures)| (scenario, median(&figures).into()))
            .collect();
    println!("{}", serde_json::Value::Object(medians));
    Ok(())
}

/// How long `iters` runs of `op` take.
fn time_n(iters: u64, mut op: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    for _ in 0..iters {
        op()?;
    }
    Ok(start.elapsed())
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .context("binding a UDP socket")
}

fn udp_send(socket: &UdpSocket, addr: SocketAddr) -> Result<()> {
    socket
        .send_to(&[0u8; 32], addr)
        .map(drop)
        .with_context(|| format!("sendto {addr}"))
}

fn tcp_connect(addr: SocketAddr) -> Result<()> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size passed.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            socklen_of::<libc::linger>(),
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error()).context("setting SO_LINGER");
    }
    Ok(())
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("small struct")
}

fn open_close(c_path: &CString, path: &Path) -> Result<()> {
    // SAFETY: a NUL-terminated path; the descriptor is closed right away.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("open {}", path.display()));
    }
    // SAFETY: we own `fd`.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Starts `procs` copies of this program as `flood-worker`, waits for them
/// and prints `{"attempted": N, "millis": T}` (T: from start to the last
/// worker's exit).
fn flood(kind: FloodKind, target: &str, procs: u32, millis: u64) -> Result<()> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let kind_name = match kind {
        FloodKind::Tcp => "tcp",
        FloodKind::Open => "open",
    };
    let start = Instant::now();
    let workers = (0..procs)
        .map(|_| {
            Command::new(&exe)
                .args(["flood-worker", kind_name, target, "--millis"])
                .arg(millis.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a flood worker")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut attempted: u64 = 0;
    for worker in workers {
        let out = worker.wait_with_output().context("waiting for a worker")?;
        ensure!(
            out.status.success(),
            "a flood worker failed ({})",
            out.status
        );
        let count = String::from_utf8_lossy(&out.stdout);
        attempted += count
            .trim()
            .parse::<u64>()
            .with_context(|| format!("a flood worker printed {count:?}"))?;
    }
    let elapsed = start.elapsed();
    println!(
        "{}",
        serde_json::json!({ "attempted": attempted, "millis": elapsed.as_secs_f64() * 1e3 })
    );
    io::stdout().flush()?;
    Ok(())
}

/// Repeats the denied operation until `duration` has passed; every attempt
/// must be refused with EPERM (anything else means the rules do not cover
/// the target, and the count would be meaningless).
fn flood_worker(kind: FloodKind, target: &str, duration: Duration) -> Result<u64> {
    let mut attempt: Box<dyn FnMut() -> io::Result<()>> = match kind {
        FloodKind::Tcp => {
            let addr: SocketAddr = target
                .parse()
                .with_context(|| format!("{target} is not ADDR:PORT"))?;
            // A refused connect leaves the socket unconnected, so one socket
            // serves every attempt.
            let domain = if addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            // SAFETY: plain socket(2).
            let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            ensure!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let (storage, len) = sockaddr(addr);
            Box::new(move || {
                // SAFETY: `storage` holds a sockaddr of `len` bytes.
                let r = unsafe { libc::connect(fd, (&raw const storage).cast(), len) };
                if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            })
        }
        FloodKind::Open => {
            let c_path = CString::new(target)?;
            Box::new(move || {
                // SAFETY: a NUL-terminated path.
                let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                if fd >= 0 {
                    // SAFETY: we own `fd`.
                    unsafe { libc::close(fd) };
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            })
        }
    };
    let start = Instant::now();
    let mut count: u64 = 0;
    loop {
        for _ in 0..64 {
            match attempt() {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => count += 1,
                Err(e) => bail!("attempt {} on {target}: {e} (expected EPERM)", count + 1),
                Ok(()) => bail!(
                    "attempt {} on {target} succeeded: the rules do not deny it",
                    count + 1
                ),
            }
        }
        if start.elapsed() >= duration {
            return Ok(count);
        }
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("small"),
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and aligned for it.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            socklen_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("small"),
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            socklen_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len)
}

fn mkpaths(list: &Path) -> Result<()> {
    let text = fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if line.ends_with('/') {
            fs::create_dir_all(line).with_context(|| format!("creating {line}"))?;
        } else {
            if let Some(parent) = Path::new(line).parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::write(line, b"").with_context(|| format!("creating {line}"))?;
        }
    }
    Ok(())
}

/// Landlock through its system calls (ABI 1), so the comparison needs no
/// library: one rule allowing reads beneath a directory, every other
/// file-system access handled (denied).
mod landlock {
    use std::{ffi::CString, io, os::unix::ffi::OsStrExt, path::Path};

    use anyhow::{Context, Result, bail, ensure};

    /// `struct landlock_ruleset_attr` (ABI 1).
    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
    }

    /// `struct landlock_path_beneath_attr` (packed in the kernel's UAPI).
    #[repr(C, packed)]
    struct PathBeneathAttr {
        allowed_access: u64,
        parent_fd: i32,
    }

    /// Every file-system access right of ABI 1 (`EXECUTE` .. `MAKE_SYM`).
    const ACCESS_FS_ABI1: u64 = (1 << 13) - 1;
    const ACCESS_FS_READ_FILE: u64 = 1 << 2;
    const ACCESS_FS_READ_DIR: u64 = 1 << 3;
    const RULE_PATH_BENEATH: libc::c_long = 1;

    fn check(ret: libc::c_long, what: &str) -> Result<libc::c_long> {
        if ret < 0 {
            return Err(io::Error::last_os_error()).context(what.to_owned());
        }
        Ok(ret)
    }

    /// Restricts this process: reads beneath `dir` allowed, everything else
    /// denied. Fails unless Landlock then refuses reading `/`, so a
    /// comparison is never made against a Landlock that is not enforcing.
    pub fn restrict_to(dir: &Path) -> Result<()> {
        let attr = RulesetAttr {
            handled_access_fs: ACCESS_FS_ABI1,
        };
        // SAFETY: a valid attr of the size passed.
        let ruleset = check(
            unsafe {
                libc::syscall(
                    libc::SYS_landlock_create_ruleset,
                    &raw const attr,
                    size_of::<RulesetAttr>(),
                    0,
                )
            },
            "landlock_create_ruleset (is Landlock enabled in this kernel?)",
        )?;
        let c_dir = CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path.
        let dir_fd = unsafe { libc::open(c_dir.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        ensure!(
            dir_fd >= 0,
            "open {}: {}",
            dir.display(),
            io::Error::last_os_error()
        );
        let rule = PathBeneathAttr {
            allowed_access: ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR,
            parent_fd: dir_fd,
        };
        // SAFETY: the ruleset fd from above and a valid rule.
        check(
            unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset,
                    RULE_PATH_BENEATH,
                    &raw const rule,
                    0,
                )
            },
            "landlock_add_rule",
        )?;
        // SAFETY: plain prctl; required before restricting without CAP_SYS_ADMIN
        // and harmless with it.
        check(
            libc::c_long::from(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }),
            "prctl(PR_SET_NO_NEW_PRIVS)",
        )?;
        // SAFETY: the ruleset fd from above.
        check(
            unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0) },
            "landlock_restrict_self",
        )?;
        // SAFETY: closing descriptors we own.
        unsafe {
            libc::close(dir_fd);
            libc::close(i32::try_from(ruleset)?);
        }
        match std::fs::read_dir("/") {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => Ok(()),
            other => bail!("Landlock is not enforcing: reading / gave {other:?}"),
        }
    }
}

fn dns(server: SocketAddr, name: &str, count: u32) -> Result<()> {
    use hickory_proto::{
        op::{Message, Query, ResponseCode},
        rr::{Name, RecordType},
    };
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut query = Message::new();
    query.set_recursion_desired(true).add_query(Query::query(
        Name::from_ascii(name).context("query name")?,
        RecordType::A,
    ));
    let mut buf = vec![0u8; 4096];
    let mut rtts = Vec::with_capacity(count as usize);
    let started = Instant::now();
    for id in 0..count {
        #[expect(clippy::cast_possible_truncation, reason = "ids wrap")]
        query.set_id(id as u16);
        let bytes = query.to_vec()?;
        let sent = Instant::now();
        socket.send_to(&bytes, server)?;
        let len = socket
            .recv(&mut buf)
            .with_context(|| format!("query {id} for {name} to {server}"))?;
        rtts.push(sent.elapsed().as_secs_f64() * 1e6);
        let reply = Message::from_vec(&buf[..len])?;
        ensure!(
            reply.response_code() == ResponseCode::NoError && !reply.answers().is_empty(),
            "query {id} for {name}: {} with {} answers",
            reply.response_code(),
            reply.answers().len()
        );
    }
    let total = started.elapsed().as_secs_f64();
    rtts.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into the sorted round trips"
    )]
    let p99 = rtts[((rtts.len() as f64 * 0.99) as usize).min(rtts.len() - 1)];
    println!(
        "{}",
        serde_json::json!({
            "median_us": median(&rtts),
            "p99_us": p99,
            "qps": f64::from(count) / total,
        })
    );
    Ok(())
}
