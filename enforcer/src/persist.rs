//! What the daemon keeps on disk so that a restarted daemon adopts the
//! sessions its predecessor left enforced (by pinned programs and maps)
//! instead of starting over. Written atomically after every change.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Where a persisting controller (the daemon) keeps its state.
#[derive(Clone, Debug)]
pub struct Persist {
    /// Root of the pins in the BPF filesystem.
    pub pin_root: PathBuf,
    /// The state file.
    pub state_file: PathBuf,
    /// The daemon's control socket (sessions may never connect to it).
    pub socket: PathBuf,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    pub instance_dir: PathBuf,
    pub next_profile_id: u32,
    pub next_file_policy: u32,
    pub next_session: u64,
    pub sessions: Vec<SavedSession>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedSession {
    pub cgroup_id: u64,
    pub name: String,
    pub profile: String,
    pub cgroup: PathBuf,
    pub uid: u32,
    pub forced_audit: bool,
    pub allow_degraded: bool,
    pub degraded: Option<String>,
    pub dns_port_v4: u16,
    pub dns_port_v6: u16,
    pub started: String,
}

impl Saved {
    /// The saved state, if there is one.
    pub fn read(path: &Path) -> Result<Option<Saved>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("reading the saved state {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Write it whole or not at all (a temporary file renamed over it).
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn remove(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}
