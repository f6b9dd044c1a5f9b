#![allow(dead_code)]
#[path = "../vm.rs"]
mod vm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    vm::ensure_host_packages()?;
    let t = Instant::now();
    let kernel = vm::ensure_kernel(Path::new("target/vm"))?;
    println!(
        "kernel {} ({}) in {:?}",
        kernel.display(),
        vm::kernel_version(&kernel)?,
        t.elapsed()
    );
    let script = std::env::args().nth(1).unwrap_or_else(|| {
        "cat /sys/kernel/security/lsm; echo; grep -c . /proc/self/cgroup; ls /sys/fs/bpf; stat -c %s /bin/stat; uname -r; exit 3".into()
    });
    let t = Instant::now();
    let out = vm::run(
        &kernel,
        Path::new("target/vm/demo"),
        &vm::VmRun {
            binaries: vec![PathBuf::from("/usr/bin/stat")],
            files: vec![(
                PathBuf::from("/etc/os-release"),
                "/etc/host-os-release".into(),
            )],
            script,
            timeout: Duration::from_secs(120),
            memory_mb: 1024,
        },
    )?;
    println!(
        "\n== exit_code={} elapsed(sentinel)={:?} total={:?}",
        out.exit_code,
        out.elapsed,
        t.elapsed()
    );
    let lsm = out
        .console
        .lines()
        .find(|l| l.contains("capability"))
        .unwrap_or("");
    println!("== lsm line: {lsm:?} contains bpf: {}", lsm.contains("bpf"));
    Ok(())
}
