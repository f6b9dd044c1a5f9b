//! Installing what the build needs, idempotently: each step checks first and
//! says what it installs. Versions are the ones known to work together (see
//! the README): nightly with rust-src for `-Z build-std=core`, LLVM 22 from
//! Debian, and bpf-linker 0.13 built against it (its LLVM major must match
//! the nightly's).

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{Mutex, PoisonError},
};

use anyhow::{Context, Result};

use crate::run;

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn ensure_build_tools() -> Result<()> {
    ensure_rust_src()?;
    ensure_debian_packages(&[("llvm-22-dev", &format!("{LLVM_PREFIX}/lib/libLLVM.so"))])?;
    ensure_bpf_linker()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "the nightly toolchain is missing: install it with `rustup toolchain install nightly`",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("xtask: installing rust-src for the nightly toolchain (needed for -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Install Debian packages whose marker file is missing: `(package, marker)`
/// pairs, where the marker is a file the package provides (a tool, a library,
/// or `/var/lib/dpkg/info/<package>.list`). Runs nothing when every marker
/// exists; otherwise `apt-get update` (once per run) and one `apt-get install`
/// of the missing packages, as root.
pub fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, marker)| !Path::new(marker).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    apt_get_update()?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| {
        format!(
            "could not install {}; install them by hand (as root)",
            missing.join(" ")
        )
    })
}

/// `apt-get update`, needed before installs and `apt-cache` searches on a
/// machine whose package lists are absent or stale. Runs at most once per
/// run once it has succeeded (a failed update is tried again by the next
/// caller).
pub fn apt_get_update() -> Result<()> {
    static UPDATED: Mutex<bool> = Mutex::new(false);
    let mut updated = UPDATED.lock().unwrap_or_else(PoisonError::into_inner);
    if !*updated {
        println!("xtask: apt-get update");
        run(Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("`apt-get update` failed; check the apt sources and that this runs as root")?;
        *updated = true;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(version) = output(Command::new("bpf-linker").arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    println!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            // Without it the build finds the system's older llvm-config first.
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}
