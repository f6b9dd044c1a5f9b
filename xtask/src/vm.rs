//! A throw-away QEMU virtual machine for kernel tests the host cannot run.
//!
//! Why this exists: the development and CI hosts refuse every BTF-attached
//! BPF program type (`BPF_PROG_TYPE_LSM`, fentry/fexit) with EPERM, so the
//! BPF-LSM half of the enforcer cannot be tested there. Debian's 6.1 *cloud*
//! kernel has `CONFIG_BPF_LSM=y`, BTF and cgroup BPF built in, and boots in a
//! few seconds under QEMU's software emulation (TCG; nested KVM fails on these
//! hosts). See `shared/KERNEL-NOTES.md`, "A kernel with BPF-LSM, in a VM".
//!
//! The guest has no disk and no network device: its root file system is an
//! initramfs built here that carries busybox, the test binaries with every
//! shared library `ldd` lists for them, and an `/init` script that mounts the
//! pseudo file systems the enforcer needs, runs the caller's shell script and
//! prints a sentinel line `VM-RESULT: exit=<code>` on the serial console
//! before powering off. The host reads the console, streams it to stdout so CI
//! logs show progress, and parses the sentinel.
//!
//! Typical use:
//!
//! ```ignore
//! vm::ensure_host_packages()?;
//! let kernel = vm::ensure_kernel(Path::new("target/vm"))?;
//! let outcome = vm::run(&kernel, Path::new("target/vm/run"), &VmRun {
//!     binaries: vec![PathBuf::from("target/debug/enforcer")],
//!     script: "enforcer --self-test".into(),
//!     ..VmRun::default()
//! })?;
//! ```

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::bootstrap;

/// The line `/init` prints after the user script, followed by its exit code.
pub const SENTINEL: &str = "VM-RESULT: exit=";

/// The line `/init` prints, on a line of its own, just before the user script
/// starts. The firmware's last console line (`Booting from ROM..` and terminal
/// escapes) has no line end, so without it the script's first line of output
/// would be glued to firmware noise; see [`VmOutcome::script_output`].
pub const SCRIPT_START: &str = "VM-SCRIPT-START";

/// Kernel command line. `quiet` keeps boot noise off the console (and out of
/// the way of the sentinel); `panic=-1` together with QEMU's `-no-reboot`
/// turns a guest panic into a prompt QEMU exit instead of a hang until the
/// timeout; the explicit `lsm=` list makes sure BPF-LSM is active whatever the
/// kernel's built-in default is.
const KERNEL_APPEND: &str = "console=ttyS0 quiet panic=-1 lsm=lockdown,capability,landlock,bpf";

/// How long QEMU may take to exit after the sentinel was seen before it is
/// killed (the result is already known, so this is not an error).
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// How long the guest may take to reach the user script. A boot takes about
/// 4 s; once in roughly 200 boots a TCG guest was seen to hang silently right
/// after the firmware. Such a boot is killed and tried again (nothing of the
/// caller's has run yet, so that is safe) instead of waiting out the whole
/// [`VmRun::timeout`].
const BOOT_TIMEOUT: Duration = Duration::from_mins(1);

/// Boots tried before a boot hang is an error.
const BOOT_ATTEMPTS: u32 = 2;

/// Console lines shown in errors (timeouts, missing sentinel).
const TAIL_LINES: usize = 40;

/// Where the guest's `/init` finds the caller's script.
const GUEST_SCRIPT: &str = "/vm/script.sh";

// ---------------------------------------------------------------------------
// Host packages
// ---------------------------------------------------------------------------

/// Makes sure the host tools the VM needs are installed, installing the
/// missing Debian packages with `apt-get` (as root, like CI and the
/// developer machines run) through [`bootstrap::ensure_debian_packages`].
///
/// Idempotent: when everything is present it runs nothing. `apt-get update`
/// runs once, and only when something has to be installed, because apt's
/// package lists may be missing or stale on a fresh machine.
///
/// busybox must be the *static* build (`busybox-static`): the guest has no
/// C library except the ones copied in for the test binaries.
pub fn ensure_host_packages() -> Result<()> {
    // A tool found on PATH is its own marker (present, so nothing to do);
    // a missing one is looked for where its Debian package puts it.
    let mut markers: Vec<(&str, String)> = [
        ("qemu-system-x86", "qemu-system-x86_64"),
        ("cpio", "cpio"),
        ("gzip", "gzip"),
        ("libc-bin", "ldd"),
    ]
    .into_iter()
    .map(|(package, tool)| {
        let marker = find_on_path(tool).map_or_else(
            || format!("/usr/bin/{tool}"),
            |path| path.to_string_lossy().into_owned(),
        );
        (package, marker)
    })
    .collect();
    // The dynamically linked `busybox` package also installs /bin/busybox,
    // so only a static busybox on PATH, or busybox-static itself being
    // installed, counts.
    let busybox_marker = static_busybox().map_or_else(
        |_| "/var/lib/dpkg/info/busybox-static.list".to_owned(),
        |path| path.to_string_lossy().into_owned(),
    );
    markers.push(("busybox-static", busybox_marker));
    let markers: Vec<(&str, &str)> = markers
        .iter()
        .map(|(package, marker)| (*package, marker.as_str()))
        .collect();
    bootstrap::ensure_debian_packages(&markers)?;
    static_busybox().context("busybox-static is installed but no static busybox is on PATH")?;
    Ok(())
}

/// Finds an executable called `name` on `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The statically linked busybox on `PATH` (Debian's `busybox-static` puts it
/// at `/bin/busybox`).
fn static_busybox() -> Result<PathBuf> {
    let path = find_on_path("busybox")
        .context("busybox is not on PATH; run `apt-get install busybox-static`")?;
    let bytes = fs::read(&path).with_context(|| format!("could not read {}", path.display()))?;
    ensure!(
        elf_is_static(&bytes).with_context(|| format!("{} is not a usable ELF", path.display()))?,
        "{} is dynamically linked; the VM needs the static build: `apt-get install busybox-static`",
        path.display()
    );
    Ok(path)
}

/// True if a 64-bit little-endian ELF file has no `PT_INTERP` program header,
/// i.e. needs no dynamic loader (and so no shared libraries in the guest).
fn elf_is_static(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let field = |offset: usize, len: usize| {
        elf.get(offset..offset + len)
            .context("truncated ELF header")
    };
    ensure!(field(0, 4)? == b"\x7fELF", "no ELF magic");
    ensure!(field(4, 2)? == [2, 1], "not a 64-bit little-endian ELF");
    let u16_at = |offset| -> Result<usize> {
        let b = field(offset, 2)?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let phoff_bytes: [u8; 8] = field(0x20, 8)?.try_into()?;
    let phoff = usize::try_from(u64::from_le_bytes(phoff_bytes))?;
    let (phentsize, phnum) = (u16_at(0x36)?, u16_at(0x38)?);
    for index in 0..phnum {
        let p_type: [u8; 4] = field(phoff + index * phentsize, 4)?.try_into()?;
        if u32::from_le_bytes(p_type) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------

/// Returns the path of a Debian cloud kernel (`vmlinuz-<version>`), downloading
/// and unpacking it into `cache_dir` the first time.
///
/// A kernel already unpacked in `cache_dir` is reused without asking apt, so
/// repeated runs are fast, work offline and keep testing the same kernel. To
/// move to a newer kernel, delete `cache_dir`.
///
/// Otherwise the newest `linux-image-<version>-cloud-amd64` that
/// `apt-cache search` lists is downloaded (6.1.x, bookworm's own kernel, is
/// preferred over the 6.12 backports; the signed image is preferred over the
/// `-unsigned` one; `-dbg` and meta-packages are never taken), and unpacked
/// with `dpkg-deb -x` into `cache_dir/<version>/`. If a download fails the
/// next candidate is tried. Modules are unpacked too but never used: the
/// guest runs from an initramfs and needs no drivers.
///
/// The kernel version string is the file name after `vmlinuz-`; see
/// [`kernel_version`].
pub fn ensure_kernel(cache_dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(cache_dir)
        .with_context(|| format!("could not create the kernel cache {}", cache_dir.display()))?;
    if let Some(cached) = cached_kernel(cache_dir)? {
        return Ok(cached);
    }

    let mut candidates = search_cloud_kernels()?;
    if candidates.is_empty() {
        // A fresh machine may have no package lists yet.
        bootstrap::apt_get_update()?;
        candidates = search_cloud_kernels()?;
    }
    ensure!(
        !candidates.is_empty(),
        "`apt-cache search` lists no linux-image-*-cloud-amd64 package; \
         this needs a Debian (bookworm) apt source"
    );

    let mut failures = String::new();
    for candidate in &candidates {
        match download_and_unpack(cache_dir, candidate) {
            Ok(vmlinuz) => return Ok(vmlinuz),
            Err(error) => {
                eprintln!("vm: could not use {}: {error:#}", candidate.package);
                let _ = writeln!(failures, "  {}: {error:#}", candidate.package);
            }
        }
    }
    bail!("no cloud kernel package could be downloaded and unpacked:\n{failures}")
}

/// The kernel version of a `vmlinuz-<version>` path as returned by
/// [`ensure_kernel`], e.g. `6.1.0-56-cloud-amd64` (what `uname -r` prints in
/// the guest).
pub fn kernel_version(vmlinuz: &Path) -> Result<String> {
    vmlinuz
        .file_name()
        .and_then(OsStr::to_str)
        .and_then(|name| name.strip_prefix("vmlinuz-"))
        .map(str::to_owned)
        .with_context(|| format!("{} is not named vmlinuz-<version>", vmlinuz.display()))
}

/// A cloud kernel package apt can provide.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KernelPackage {
    /// Debian package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    package: String,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    version: String,
}

/// Lists installable cloud kernel images, best first.
fn search_cloud_kernels() -> Result<Vec<KernelPackage>> {
    let output = Command::new("apt-cache")
        .args(["search", "--names-only", "^linux-image-.*-cloud-amd64"])
        .output()
        .context("could not run apt-cache search (is this a Debian host?)")?;
    ensure!(
        output.status.success(),
        "`apt-cache search` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(parse_cloud_kernels(&String::from_utf8_lossy(
        &output.stdout,
    )))
}

/// Picks the real kernel images out of `apt-cache search` output
/// (`<name> - <description>` lines) and orders them best first: 6.1.x before
/// anything else, newer before older, signed before `-unsigned`.
fn parse_cloud_kernels(search_output: &str) -> Vec<KernelPackage> {
    let mut found: Vec<(bool, KernelPackage)> = search_output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| {
            let (rest, unsigned) = match name.strip_suffix("-unsigned") {
                Some(rest) => (rest, true),
                None => (name, false),
            };
            let release = rest
                .strip_prefix("linux-image-")?
                .strip_suffix("-cloud-amd64")?;
            // Meta-packages (`linux-image-cloud-amd64`, `linux-image-6.12-cloud-amd64`)
            // carry no kernel: a real release has at least three numbers.
            (release_numbers(release).len() >= 3).then(|| {
                let package = KernelPackage {
                    package: name.to_owned(),
                    version: format!("{release}-cloud-amd64"),
                };
                (unsigned, package)
            })
        })
        .collect();
    found.sort_by(|(a_unsigned, a), (b_unsigned, b)| {
        release_rank(&b.version)
            .cmp(&release_rank(&a.version))
            .then(a_unsigned.cmp(b_unsigned))
    });
    found.dedup();
    found.into_iter().map(|(_, package)| package).collect()
}

/// Leading numbers of a kernel release: `6.1.0-56-cloud-amd64` → `[6, 1, 0, 56]`,
/// `6.12.117+deb12-cloud-amd64` → `[6, 12, 117]`.
fn release_numbers(release: &str) -> Vec<u64> {
    release
        .split(['.', '-', '+'])
        .map_while(|part| part.parse().ok())
        .collect()
}

/// Sort key for kernel releases: bookworm's own 6.1 series first, then by
/// version.
fn release_rank(release: &str) -> (bool, Vec<u64>) {
    let numbers = release_numbers(release);
    (numbers.starts_with(&[6, 1]), numbers)
}

/// Finds an already unpacked kernel: `cache_dir/<version>/boot/vmlinuz-<version>`.
fn cached_kernel(cache_dir: &Path) -> Result<Option<PathBuf>> {
    let entries = fs::read_dir(cache_dir)
        .with_context(|| format!("could not list the kernel cache {}", cache_dir.display()))?;
    let mut best: Option<(String, PathBuf)> = None;
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", cache_dir.display()))?;
        let Some(version) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let vmlinuz = entry.path().join("boot").join(format!("vmlinuz-{version}"));
        if !vmlinuz.is_file() {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(v, _)| release_rank(&version) > release_rank(v))
        {
            best = Some((version, vmlinuz));
        }
    }
    Ok(best.map(|(_, path)| path))
}

/// `apt-get download`s one kernel package into `cache_dir` and unpacks it to
/// `cache_dir/<version>/` (through a temporary directory, so an interrupted
/// run never leaves a half-unpacked kernel that looks cached).
fn download_and_unpack(cache_dir: &Path, kernel: &KernelPackage) -> Result<PathBuf> {
    println!("vm: downloading {}", kernel.package);
    let status = Command::new("apt-get")
        // `_apt` cannot write into a root-owned cache directory; downloading
        // as root avoids apt's warning about that.
        .args(["-o", "APT::Sandbox::User=root", "download", &kernel.package])
        .current_dir(cache_dir)
        .status()
        .context("could not start apt-get download")?;
    ensure!(
        status.success(),
        "`apt-get download {}` failed ({status})",
        kernel.package
    );

    let prefix = format!("{}_", kernel.package);
    let deb = fs::read_dir(cache_dir)
        .with_context(|| format!("could not list {}", cache_dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|name| {
                    name.starts_with(&prefix)
                        && Path::new(name).extension() == Some(OsStr::new("deb"))
                })
        })
        .with_context(|| {
            format!(
                "apt-get download left no {prefix}*.deb in {}",
                cache_dir.display()
            )
        })?;

    let unpacking = cache_dir.join(format!(".{}.partial", kernel.version));
    remove_if_exists(&unpacking)?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacking)
        .status()
        .context("could not start dpkg-deb")?;
    ensure!(
        status.success(),
        "`dpkg-deb -x {}` failed ({status})",
        deb.display()
    );

    let vmlinuz_name = format!("vmlinuz-{}", kernel.version);
    ensure!(
        unpacking.join("boot").join(&vmlinuz_name).is_file(),
        "{} has no /boot/{vmlinuz_name}",
        deb.display()
    );
    let final_dir = cache_dir.join(&kernel.version);
    remove_if_exists(&final_dir)?;
    fs::rename(&unpacking, &final_dir).with_context(|| {
        format!(
            "could not move {} to {}",
            unpacking.display(),
            final_dir.display()
        )
    })?;
    // The .deb is no longer needed; keeping it would only cost disk space.
    fs::remove_file(&deb).with_context(|| format!("could not remove {}", deb.display()))?;
    println!(
        "vm: kernel {} unpacked in {}",
        kernel.version,
        final_dir.display()
    );
    Ok(final_dir.join("boot").join(vmlinuz_name))
}

/// Removes a file or directory tree if it exists.
fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
    .with_context(|| format!("could not remove {}", path.display()))
}

// ---------------------------------------------------------------------------
// Running a VM
// ---------------------------------------------------------------------------

/// One VM boot: what goes into the guest and what runs there.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// Host executables to copy to the guest's `/bin/<file name>` (ahead of
    /// busybox's applets on `PATH`), with every shared library `ldd` lists
    /// for them at the same path as on the host. Libraries loaded with
    /// `dlopen` are not found this way: add them to `files`.
    pub binaries: Vec<PathBuf>,
    /// Extra host files and the absolute guest path of each (permissions are
    /// kept). Parent directories are created.
    pub files: Vec<(PathBuf, String)>,
    /// Shell script (busybox `sh`) run after the guest is set up, with stdin
    /// from `/dev/null` and output to the console. Its exit code is the
    /// result.
    pub script: String,
    /// Wall-clock limit for the whole boot, from starting QEMU to its exit.
    /// Emulation is slow: allow for tens of seconds for anything non-trivial.
    pub timeout: Duration,
    /// Guest memory. The initramfs is unpacked into RAM, so it must exceed
    /// the uncompressed size of everything in it by a comfortable margin.
    pub memory_mb: u32,
}

impl Default for VmRun {
    fn default() -> Self {
        Self {
            binaries: Vec::new(),
            files: Vec::new(),
            script: String::new(),
            timeout: Duration::from_mins(3),
            memory_mb: 1024,
        }
    }
}

/// What a VM boot produced.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// Exit code of the script, from the sentinel line.
    pub exit_code: i32,
    /// The whole serial console (kernel messages and script output), with
    /// `\r\n` turned into `\n`.
    pub console: String,
    /// Wall-clock time from starting QEMU until the sentinel line arrived.
    pub elapsed: Duration,
}

impl VmOutcome {
    /// What the script printed: the console between the [`SCRIPT_START`] line
    /// and the sentinel line (kernel messages that arrived meanwhile included).
    /// The whole console if the start line is missing.
    pub fn script_output(&self) -> &str {
        script_output(&self.console)
    }
}

/// See [`VmOutcome::script_output`].
fn script_output(console: &str) -> &str {
    let marker = format!("{SCRIPT_START}\n");
    let Some(start) = console.find(&marker) else {
        return console;
    };
    let rest = &console[start + marker.len()..];
    // `/init` prints a line end before the sentinel, so that a script whose
    // output ends without one still leaves the sentinel on its own line; that
    // extra line end is not the script's.
    rest.find(&format!("\n{SENTINEL}"))
        .map_or(rest, |end| &rest[..end])
}

/// Boots `kernel` with an initramfs made for `run` and returns the script's
/// exit code and the console output.
///
/// `work_dir` receives the staging tree (`initramfs/`) and the image
/// (`initrd.gz`); both are rebuilt on every call. The console is copied to
/// our stdout as it arrives. Fails if QEMU cannot start, if the run exceeds
/// `run.timeout` (QEMU is killed), or if the guest never printed the sentinel
/// (a kernel panic, a broken `/init`); the errors show the last console
/// lines.
pub fn run(kernel: &Path, work_dir: &Path, run: &VmRun) -> Result<VmOutcome> {
    ensure!(
        kernel.is_file(),
        "kernel image {} does not exist; get one with ensure_kernel",
        kernel.display()
    );
    fs::create_dir_all(work_dir).with_context(|| {
        format!(
            "could not create the VM work directory {}",
            work_dir.display()
        )
    })?;
    let initrd = build_initramfs(work_dir, run)?;
    boot(kernel, &initrd, run)
}

// --- initramfs -------------------------------------------------------------

/// One file system entry of the initramfs, keyed by its guest path.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// A copy of a host file.
    Copy(PathBuf),
    /// A symbolic link with this target.
    Symlink(String),
    /// A file with these contents and mode.
    Contents(String, u32),
}

/// Builds `work_dir/initrd.gz` (newc cpio, gzip) for `run`.
fn build_initramfs(work_dir: &Path, run: &VmRun) -> Result<PathBuf> {
    let busybox = static_busybox()?;
    let mut tree: BTreeMap<PathBuf, Entry> = BTreeMap::new();
    tree.insert("bin/busybox".into(), Entry::Copy(busybox.clone()));
    tree.insert("init".into(), Entry::Contents(init_script(), 0o755));
    tree.insert(
        guest_relative(GUEST_SCRIPT)?,
        Entry::Contents(run.script.clone(), 0o755),
    );

    for binary in &run.binaries {
        let name = binary
            .file_name()
            .with_context(|| format!("binary {} has no file name", binary.display()))?;
        let source = fs::canonicalize(binary)
            .with_context(|| format!("binary {} for the VM does not exist", binary.display()))?;
        add_entry(&mut tree, Path::new("bin").join(name), Entry::Copy(source))?;
        for library in shared_libraries(binary)? {
            let guest =
                guest_relative(library.to_str().with_context(|| {
                    format!("library path {} is not UTF-8", library.display())
                })?)?;
            // The same library is listed for most binaries: same path, same file.
            add_entry(&mut tree, guest, Entry::Copy(library))?;
        }
    }
    for (host, guest) in &run.files {
        ensure!(
            host.exists(),
            "file {} for the VM does not exist",
            host.display()
        );
        add_entry(&mut tree, guest_relative(guest)?, Entry::Copy(host.clone()))?;
    }
    // busybox applets last, so that the caller's binaries and files win.
    for applet in busybox_applets(&busybox)? {
        tree.entry(applet)
            .or_insert_with(|| Entry::Symlink("/bin/busybox".into()));
    }

    let staging = work_dir.join("initramfs");
    remove_if_exists(&staging)?;
    materialize(&staging, &tree)?;
    let initrd = work_dir.join("initrd.gz");
    write_cpio_gz(&staging, &initrd)?;
    Ok(initrd)
}

/// Adds an entry, refusing two different things at one guest path.
fn add_entry(tree: &mut BTreeMap<PathBuf, Entry>, guest: PathBuf, entry: Entry) -> Result<()> {
    if let Some(existing) = tree.get(&guest) {
        ensure!(
            *existing == entry,
            "two different files for guest path /{}: {existing:?} and {entry:?}",
            guest.display()
        );
    }
    tree.insert(guest, entry);
    Ok(())
}

/// Turns an absolute guest path into one relative to the initramfs root,
/// refusing relative paths and `..` (which would escape the staging tree).
fn guest_relative(guest: &str) -> Result<PathBuf> {
    let path = Path::new(guest);
    ensure!(path.is_absolute(), "guest path {guest:?} must be absolute");
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                bail!("guest path {guest:?} must not contain `..`")
            }
        }
    }
    ensure!(
        !relative.as_os_str().is_empty(),
        "guest path {guest:?} names the root"
    );
    Ok(relative)
}

/// Applet paths (`bin/sh`, `sbin/ip`, …) of the host busybox, so the guest has
/// its links from the first instruction (`busybox --install` would need
/// `/proc` mounted first).
fn busybox_applets(busybox: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("could not run {} --list-full", busybox.display()))?;
    ensure!(
        output.status.success(),
        "`{} --list-full` failed ({})",
        busybox.display(),
        output.status
    );
    let list = String::from_utf8_lossy(&output.stdout);
    let applets: Vec<PathBuf> = list
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| guest_relative(&format!("/{line}")))
        .collect::<Result<_>>()?;
    ensure!(
        applets.iter().any(|path| path == Path::new("bin/sh")),
        "{} has no `sh` applet",
        busybox.display()
    );
    Ok(applets)
}

/// Shared libraries (and the dynamic loader) a binary needs, from `ldd`.
/// Static binaries need none.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let bytes = fs::read(binary).with_context(|| format!("could not read {}", binary.display()))?;
    if elf_is_static(&bytes)
        .with_context(|| format!("{} is not a 64-bit ELF executable", binary.display()))?
    {
        return Ok(Vec::new());
    }
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("could not run ldd (package libc-bin)")?;
    ensure!(
        output.status.success(),
        "`ldd {}` failed ({}): {}",
        binary.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    parse_ldd(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("libraries of {}", binary.display()))
}

/// Parses `ldd` output:
///
/// ```text
///     linux-vdso.so.1 (0x00007ffc…)                         (in the kernel: skipped)
///     libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)   (a library)
///     /lib64/ld-linux-x86-64.so.2 (0x…)                     (the loader)
///     libfoo.so.1 => not found                              (an error)
/// ```
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    let mut missing = Vec::new();
    for line in output.lines().map(str::trim) {
        let target = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    missing.push(name.trim().to_owned());
                    continue;
                }
                target
            }
            None => line,
        };
        if let Some(path) = target
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            libraries.push(PathBuf::from(path));
        }
    }
    ensure!(missing.is_empty(), "ldd cannot find {}", missing.join(", "));
    Ok(libraries)
}

/// The guest's `/init`: set up what the enforcer's tests need, run the
/// script, report its exit code, power off.
///
/// Mount failures are reported but not fatal, so a test can still see (and
/// assert on) what is missing. `poweroff -f` skips init shutdown; if it ever
/// returned, `/init` exiting would panic the kernel, which (with `panic=-1`
/// and `-no-reboot`) also ends QEMU.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mkdir -p /proc /sys /dev /tmp /run /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "vm-init: cgroup2 mount failed"
mount -t bpf bpf /sys/fs/bpf || echo "vm-init: bpffs mount failed"
mount -t securityfs securityfs /sys/kernel/security || echo "vm-init: securityfs mount failed"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up || echo "vm-init: could not bring up lo"
hostname vm
cd /
echo
echo "{SCRIPT_START}"
sh {GUEST_SCRIPT} </dev/null
code=$?
echo
echo "{SENTINEL}$code"
sync
poweroff -f
"#
    )
}

/// Writes every entry of `tree` under `staging`.
fn materialize(staging: &Path, tree: &BTreeMap<PathBuf, Entry>) -> Result<()> {
    fs::create_dir_all(staging)
        .with_context(|| format!("could not create {}", staging.display()))?;
    for (relative, entry) in tree {
        let target = staging.join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("could not create {}", parent.display()))?;
        }
        match entry {
            Entry::Copy(source) => {
                fs::copy(source, &target).with_context(|| {
                    format!(
                        "could not copy {} to {}",
                        source.display(),
                        target.display()
                    )
                })?;
            }
            Entry::Symlink(link) => symlink(link, &target)
                .with_context(|| format!("could not create symlink {}", target.display()))?,
            Entry::Contents(contents, mode) => {
                fs::write(&target, contents)
                    .with_context(|| format!("could not write {}", target.display()))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(*mode))
                    .with_context(|| format!("could not chmod {}", target.display()))?;
            }
        }
    }
    Ok(())
}

/// Every path under `dir`, relative to it and prefixed `./`, parents before
/// children (what `cpio -o` wants on stdin). Symlinks are not followed.
fn list_tree(dir: &Path, prefix: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("could not list {}", dir.display()))?
        .collect::<io::Result<_>>()
        .with_context(|| format!("could not list {}", dir.display()))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let relative = prefix.join(entry.file_name());
        out.push(relative.clone());
        let file_type = entry
            .file_type()
            .with_context(|| format!("could not stat {}", entry.path().display()))?;
        if file_type.is_dir() {
            list_tree(&entry.path(), &relative, out)?;
        }
    }
    Ok(())
}

/// Packs `staging` as a newc cpio archive (all files owned by root) piped
/// through the host's `gzip` into `output`.
fn write_cpio_gz(staging: &Path, output: &Path) -> Result<()> {
    let mut paths = Vec::new();
    list_tree(staging, Path::new("."), &mut paths)?;
    let mut list = Vec::new();
    for path in &paths {
        list.extend_from_slice(path.as_os_str().as_encoded_bytes());
        list.push(b'\n');
    }

    let out_file = fs::File::create(output)
        .with_context(|| format!("could not create {}", output.display()))?;
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
        .current_dir(staging)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start cpio (run `apt-get install cpio`)")?;
    let cpio_out = cpio.stdout.take().context("cpio has no stdout pipe")?;
    let gzip = Command::new("gzip")
        .arg("-c")
        .stdin(cpio_out)
        .stdout(out_file)
        .spawn();
    let mut gzip = match gzip {
        Ok(gzip) => gzip,
        Err(error) => {
            let _ = cpio.kill();
            let _ = cpio.wait();
            return Err(error).context("could not start gzip");
        }
    };
    // cpio consumes the list while gzip drains cpio, so this cannot deadlock.
    let write_result = cpio
        .stdin
        .take()
        .context("cpio has no stdin pipe")?
        .write_all(&list);
    let cpio_status = cpio.wait().context("waiting for cpio")?;
    let gzip_status = gzip.wait().context("waiting for gzip")?;
    write_result.context("could not send the file list to cpio")?;
    ensure!(
        cpio_status.success(),
        "cpio failed ({cpio_status}) packing {}",
        staging.display()
    );
    ensure!(
        gzip_status.success(),
        "gzip failed ({gzip_status}) writing {}",
        output.display()
    );
    Ok(())
}

// --- QEMU --------------------------------------------------------------------

/// How one QEMU boot ended, short of an error.
enum Attempt {
    /// The sentinel line arrived.
    Done(VmOutcome),
    /// The guest never reached the script within [`BOOT_TIMEOUT`]; the last
    /// console lines.
    BootHang(String),
}

/// Boots QEMU, retrying a boot that hung before the script started.
fn boot(kernel: &Path, initrd: &Path, run: &VmRun) -> Result<VmOutcome> {
    let mut attempt = 1;
    loop {
        match boot_once(kernel, initrd, run)? {
            Attempt::Done(outcome) => return Ok(outcome),
            Attempt::BootHang(_) if attempt < BOOT_ATTEMPTS => {
                eprintln!(
                    "vm: the guest did not reach the script within {BOOT_TIMEOUT:?} \
                     (attempt {attempt} of {BOOT_ATTEMPTS}); booting again"
                );
                attempt += 1;
            }
            Attempt::BootHang(last_lines) => bail!(
                "the guest did not reach the script within {BOOT_TIMEOUT:?} in {BOOT_ATTEMPTS} \
                 boots (a boot normally takes about 4 s); last console lines:\n{last_lines}"
            ),
        }
    }
}

/// Boots QEMU once and follows the console until QEMU exits, a timeout
/// passes, or (after the sentinel) the poweroff grace period passes.
fn boot_once(kernel: &Path, initrd: &Path, run: &VmRun) -> Result<Attempt> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-m", &run.memory_mb.to_string(), "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", KERNEL_APPEND])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start qemu-system-x86_64 (run `apt-get install qemu-system-x86`)")?;

    let (sender, chunks) = mpsc::channel::<Vec<u8>>();
    let stdout = child.stdout.take().context("QEMU has no stdout pipe")?;
    let stdout_reader = thread::spawn(move || forward_chunks(stdout, &sender));
    let stderr = child.stderr.take().context("QEMU has no stderr pipe")?;
    let stderr_reader = thread::spawn(move || tee_stderr(stderr));

    let mut console = ConsoleLog::default();
    let deadline = started + run.timeout;
    let boot_deadline = started + BOOT_TIMEOUT.min(run.timeout);
    let (mut timed_out, mut boot_hang) = (false, false);
    loop {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        if !console.script_started && now >= boot_deadline {
            boot_hang = true;
            break;
        }
        if let Some((_, seen_at)) = console.result
            && now.duration_since(started) >= seen_at + POWEROFF_GRACE
        {
            eprintln!("vm: QEMU did not exit after the result line; killing it");
            break;
        }
        match chunks.recv_timeout((deadline - now).min(Duration::from_millis(200))) {
            Ok(chunk) => {
                let mut out = io::stdout().lock();
                // Echo failures (e.g. a closed stdout) must not abort the run.
                let _ = out.write_all(&chunk).and_then(|()| out.flush());
                console.push(&chunk, started.elapsed());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // QEMU closed its stdout: it has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = finish(&mut child)?;
    let _ = stdout_reader.join();
    // Whatever arrived after the loop stopped (e.g. QEMU's last words).
    for chunk in chunks.try_iter() {
        let _ = io::stdout().write_all(&chunk);
        console.push(&chunk, started.elapsed());
    }
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let text = console.text();

    if let Some((exit_code, elapsed)) = console.result {
        return Ok(Attempt::Done(VmOutcome {
            exit_code,
            console: text,
            elapsed,
        }));
    }
    if boot_hang {
        return Ok(Attempt::BootHang(tail(&text, TAIL_LINES)));
    }
    if timed_out {
        bail!(
            "the VM run timed out after {:?} and QEMU was killed; last console lines:\n{}",
            run.timeout,
            tail(&text, TAIL_LINES)
        );
    }
    let cause = if text.contains("Kernel panic") {
        "the guest kernel panicked"
    } else {
        "the guest kernel or /init failed"
    };
    let qemu_said = String::from_utf8_lossy(&qemu_stderr);
    let qemu_said = match qemu_said.trim() {
        "" => String::new(),
        said => format!("QEMU said: {said}\n"),
    };
    bail!(
        "QEMU exited ({}) without the `{SENTINEL}` line: {cause}.\n{qemu_said}\
         Last console lines:\n{}",
        status.map_or_else(|| "killed".to_owned(), |s| s.to_string()),
        tail(&text, TAIL_LINES)
    )
}

/// Reads a pipe to its end, passing every chunk on.
fn forward_chunks(mut pipe: impl Read, sender: &mpsc::Sender<Vec<u8>>) {
    let mut buffer = [0u8; 8192];
    loop {
        match pipe.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                if sender.send(buffer[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Copies QEMU's stderr to ours as it arrives and returns all of it.
fn tee_stderr(mut pipe: impl Read) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match pipe.read(&mut buffer) {
            Ok(0) => return all,
            Ok(n) => {
                let _ = io::stderr().write_all(&buffer[..n]);
                all.extend_from_slice(&buffer[..n]);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return all,
        }
    }
}

/// Kills QEMU if it is still running and reaps it. `None` means it was killed.
fn finish(child: &mut Child) -> Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait().context("could not check on QEMU")? {
        return Ok(Some(status));
    }
    // Give a QEMU that is already exiting a moment before killing it.
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(50));
        if let Some(status) = child.try_wait().context("could not check on QEMU")? {
            return Ok(Some(status));
        }
    }
    child.kill().context("could not kill QEMU")?;
    child.wait().context("could not reap QEMU")?;
    Ok(None)
}

/// The console as it arrives, scanned line by line for the sentinel.
#[derive(Default)]
struct ConsoleLog {
    bytes: Vec<u8>,
    /// Start of the line not yet complete (everything before was scanned).
    line_start: usize,
    /// Whether the [`SCRIPT_START`] line was seen.
    script_started: bool,
    /// Exit code from the sentinel and when it was seen (since QEMU started).
    result: Option<(i32, Duration)>,
}

impl ConsoleLog {
    fn push(&mut self, chunk: &[u8], now: Duration) {
        self.bytes.extend_from_slice(chunk);
        while let Some(newline) = self.bytes[self.line_start..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let end = self.line_start + newline;
            if self.result.is_none() {
                let line = String::from_utf8_lossy(&self.bytes[self.line_start..end]);
                if line.trim_end().ends_with(SCRIPT_START) {
                    self.script_started = true;
                } else if let Some(code) = parse_sentinel_line(&line) {
                    self.result = Some((code, now));
                }
            }
            self.line_start = end + 1;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).replace("\r\n", "\n")
    }
}

/// The exit code from a console line holding the sentinel. Kernel messages
/// may share the line, so the sentinel may sit anywhere in it; what follows
/// must start with the number.
fn parse_sentinel_line(line: &str) -> Option<i32> {
    let (_, rest) = line.rsplit_once(SENTINEL)?;
    let digits: String = rest
        .trim_start()
        .chars()
        .enumerate()
        .take_while(|&(i, c)| c.is_ascii_digit() || (i == 0 && c == '-'))
        .map(|(_, c)| c)
        .collect();
    digits.parse().ok()
}

/// The exit code from a whole console transcript (the first sentinel line).
/// Runs follow the console live ([`ConsoleLog`]); this is for the tests.
#[cfg(test)]
fn parse_sentinel(console: &str) -> Option<i32> {
    console.lines().find_map(parse_sentinel_line)
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_is_parsed_from_noisy_console() {
        let console = "[    0.1] Linux version 6.1.0\r\nhello\r\n\r\nVM-RESULT: exit=3\r\n[ 2.0] reboot: Power down\r\n";
        assert_eq!(parse_sentinel(console), Some(3));
        assert_eq!(
            parse_sentinel_line("[ 1.2] audit: x VM-RESULT: exit=0"),
            Some(0)
        );
        assert_eq!(parse_sentinel_line("VM-RESULT: exit=127\r"), Some(127));
        assert_eq!(parse_sentinel_line("VM-RESULT: exit="), None);
        assert_eq!(parse_sentinel("no result here\n"), None);
    }

    #[test]
    fn script_output_is_cut_from_the_console() {
        let console = "SeaBIOS\nBooting from ROM..\x1bc\nVM-SCRIPT-START\nline 1\nline 2\n\nVM-RESULT: exit=0\n[ 4.1] reboot\n";
        assert_eq!(script_output(console), "line 1\nline 2\n");
        let no_newline = "x\nVM-SCRIPT-START\npartial\nVM-RESULT: exit=1\n";
        assert_eq!(script_output(no_newline), "partial");
        let silent = "VM-SCRIPT-START\n\nVM-RESULT: exit=0\n";
        assert_eq!(script_output(silent), "");
    }

    #[test]
    fn console_log_finds_sentinel_split_across_chunks() {
        let mut log = ConsoleLog::default();
        log.push(b"boot\r\nVM-RES", Duration::from_secs(1));
        assert!(log.result.is_none());
        log.push(b"ULT: exit=42", Duration::from_secs(2));
        assert!(log.result.is_none(), "the line is not complete yet");
        log.push(b"\r\n", Duration::from_secs(3));
        assert_eq!(log.result, Some((42, Duration::from_secs(3))));
        assert_eq!(log.text(), "boot\nVM-RESULT: exit=42\n");
    }

    #[test]
    fn ldd_output_is_parsed() {
        let output = "\tlinux-vdso.so.1 (0x00007fc4c8b86000)\n\
            \tlibselinux.so.1 => /lib/x86_64-linux-gnu/libselinux.so.1 (0x00007fc4c8b2b000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fc4c8949000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007fc4c8b88000)\n";
        assert_eq!(
            parse_ldd(output).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libselinux.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        let error = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(error.to_string().contains("libfoo.so.1"), "{error}");
    }

    #[test]
    fn cloud_kernels_are_picked_and_ordered() {
        let search = "\
linux-image-6.1.0-50-cloud-amd64-dbg - Debug symbols for linux-image-6.1.0-50-cloud-amd64
linux-image-6.1.0-50-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12.117+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.1.0-9-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-50-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
";
        let names: Vec<String> = parse_cloud_kernels(search)
            .into_iter()
            .map(|k| k.package)
            .collect();
        assert_eq!(
            names,
            [
                "linux-image-6.1.0-50-cloud-amd64",
                "linux-image-6.1.0-50-cloud-amd64-unsigned",
                "linux-image-6.1.0-9-cloud-amd64",
                "linux-image-6.12.117+deb12-cloud-amd64",
            ]
        );
        assert_eq!(
            parse_cloud_kernels(search)[1].version,
            "6.1.0-50-cloud-amd64"
        );
        assert_eq!(
            kernel_version(Path::new("/x/boot/vmlinuz-6.1.0-50-cloud-amd64")).unwrap(),
            "6.1.0-50-cloud-amd64"
        );
    }

    #[test]
    fn guest_paths_stay_inside_the_initramfs() {
        assert_eq!(
            guest_relative("/etc/x.toml").unwrap(),
            Path::new("etc/x.toml")
        );
        assert!(guest_relative("etc/x").is_err());
        assert!(guest_relative("/etc/../../x").is_err());
        assert!(guest_relative("/").is_err());
    }

    #[test]
    fn static_elf_is_recognised() {
        // A minimal ELF64 header with one program header of type `ty`.
        let elf = |ty: u32| {
            let mut bytes = vec![0u8; 64 + 56];
            bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
            bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
            bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            bytes[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            bytes[64..68].copy_from_slice(&ty.to_le_bytes());
            bytes
        };
        assert!(elf_is_static(&elf(1)).unwrap());
        assert!(!elf_is_static(&elf(3)).unwrap());
        assert!(elf_is_static(b"#!/bin/sh\n").is_err());
    }
}
