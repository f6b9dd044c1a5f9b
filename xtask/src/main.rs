//! `cargo xtask`: bootstrap the toolchain, build, test and run the enforcer.
//!
//! Every command first makes sure the machine has what building needs
//! (nightly rust-src, LLVM 22, bpf-linker), installing what is missing and
//! saying so, so the README's commands work on a fresh machine.

mod bootstrap;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Bootstrap,
    /// Build target/release/enforcer (kernel programs embedded).
    Build,
    /// Run every test: unit tests, then the kernel integration tests as root.
    Test,
    /// Build, then run target/release/enforcer with the given arguments,
    /// e.g. `cargo xtask run -- run -- curl https://backboard.railway.app`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap => bootstrap::ensure_build_tools(),
        Cmd::Build => build().map(drop),
        Cmd::Test => test(),
        Cmd::Run { args } => {
            let enforcer = build()?;
            let status = Command::new(&enforcer)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", enforcer.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Run a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn build() -> Result<PathBuf> {
    bootstrap::ensure_build_tools()?;
    run(cargo().args(["build", "--release", "-p", "enforcer"]))?;
    Ok(workspace_root().join("target/release/enforcer"))
}

fn test() -> Result<()> {
    let enforcer = build()?;
    println!("xtask: unit tests");
    run(cargo().args([
        "test",
        "-p",
        "enforcer",
        "-p",
        "enforcer-common",
        "-p",
        "xtask",
    ]))?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the kernel integration tests load BPF programs and need root: run `sudo -E cargo xtask test`"
        );
    }
    println!(
        "xtask: kernel integration tests on the host kernel (one at a time: they share kernel state)"
    );
    run(cargo()
        .args(["test", "-p", "integration-tests", "--", "--test-threads=1"])
        .env("ENFORCER_BIN", &enforcer))?;
    Ok(())
}
