//! What the running kernel offers the enforcer, for `enforcer status`.

use std::{fs, path::Path};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Features {
    pub kernel: String,
    pub cgroup2: Option<String>,
    /// `/sys/kernel/btf/vmlinux` exists (needed later for kernel struct offsets).
    pub btf: bool,
    /// The active LSM list, if securityfs is mounted.
    pub lsm: Option<String>,
    /// `enforced` when file rules can be enforced (BPF LSM loads and
    /// attaches), else why not and what to do.
    pub file_rules: String,
}

/// What this kernel offers; `file_enforcement` is the result of actually
/// loading and attaching the BPF LSM program.
pub fn detect(file_enforcement: Result<(), String>) -> Features {
    Features {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
        cgroup2: crate::cgroup::Hierarchy::find()
            .ok()
            .map(|h| h.mount.display().to_string()),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        lsm: crate::kernel::active_lsms(),
        file_rules: match file_enforcement {
            Ok(()) => "enforced".into(),
            Err(why) => format!("NOT enforceable: {why}"),
        },
    }
}
