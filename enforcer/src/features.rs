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
}

pub fn detect() -> Features {
    Features {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
        cgroup2: crate::cgroup::Hierarchy::find()
            .ok()
            .map(|h| h.mount.display().to_string()),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        lsm: fs::read_to_string("/sys/kernel/security/lsm")
            .ok()
            .map(|s| s.trim().to_owned()),
    }
}
