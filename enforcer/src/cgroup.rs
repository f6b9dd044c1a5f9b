//! The cgroup v2 tree the enforcer manages:
//!
//! ```text
//! <cgroup2 mount>/enforcer/<instance>/<session>/...
//! ```
//!
//! One instance directory per controller (the daemon, or an embedded
//! controller of one `enforcer run`), one session directory per agent. The
//! kernel programs judge a task by its ancestor at the session level, so
//! cgroups an agent creates below its session stay enforced.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The cgroup2 mount point and its depth in the hierarchy.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// Depth of the mount's root inside the hierarchy (0 unless only a
    /// subtree is mounted).
    root_level: u32,
}

impl Hierarchy {
    /// Find the cgroup2 mount from `/proc/self/mountinfo`; its place differs
    /// between hosts (`/sys/fs/cgroup`, `/sys/fs/cgroup/unified`).
    pub fn find() -> Result<Hierarchy> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo to find the cgroup2 mount")?;
        parse_mountinfo(&mountinfo).context(
            "no cgroup v2 hierarchy is mounted; mount one with \
             `mount -t cgroup2 none /sys/fs/cgroup` (cgroup v2 is required)",
        )
    }

    /// Depth of `path` below the hierarchy's root (the root is 0).
    pub fn level(&self, path: &Path) -> Result<u32> {
        let relative = path.strip_prefix(&self.mount).with_context(|| {
            format!("{} is not inside {}", path.display(), self.mount.display())
        })?;
        let depth = u32::try_from(relative.components().count()).context("cgroup path too deep")?;
        Ok(self.root_level + depth)
    }
}

fn parse_mountinfo(mountinfo: &str) -> Option<Hierarchy> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options... - fstype source opts
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount = fields.next()?;
        let root_level =
            u32::try_from(Path::new(root).components().count().saturating_sub(1)).ok()?;
        Some(Hierarchy {
            mount: PathBuf::from(unescape_octal(mount)),
            root_level,
        })
    })
}

/// mountinfo escapes spaces and a few other bytes as `\NNN`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if digits.len() == 3
                && let Ok(byte) = u8::from_str_radix(&digits, 8)
            {
                out.push(char::from(byte));
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// The kernel's id for a cgroup v2 directory: its inode number, which is
/// what `bpf_get_current_cgroup_id` and friends return.
pub fn id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading cgroup {}", path.display()))?
        .ino())
}

pub fn create_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", path.display())),
    }
}

/// Whether any process is in `path` or below it.
pub fn populated(path: &Path) -> Result<bool> {
    let events = fs::read_to_string(path.join("cgroup.events"))
        .with_context(|| format!("reading {}/cgroup.events", path.display()))?;
    Ok(events.lines().any(|l| l == "populated 1"))
}

/// Kill every process in `path` and below, and wait until it is empty.
pub fn kill_all(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(path)? {
        // cgroup.kill (5.14+) kills the whole subtree atomically, so a
        // forking process cannot outrun it.
        if fs::write(path.join("cgroup.kill"), "1").is_err() {
            kill_listed(path)?;
        }
        if Instant::now() > deadline {
            bail!(
                "processes in cgroup {} survived SIGKILL for 10 s",
                path.display()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn kill_listed(path: &Path) -> Result<()> {
    for dir in walk(path)? {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            // SAFETY: plain syscall; a pid that already exited just fails.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    Ok(())
}

/// `path` and every cgroup below it, deepest first.
fn walk(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(walk(&entry.path())?);
        }
    }
    out.push(path.to_owned());
    Ok(out)
}

/// Remove an empty cgroup and every empty cgroup below it.
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for dir in walk(path)? {
        fs::remove_dir(&dir).with_context(|| format!("removing cgroup {}", dir.display()))?;
    }
    Ok(())
}

/// The directories directly below `path` (sessions of an instance, or
/// instances under the enforcer root).
pub fn children(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !path.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let h = parse_mountinfo(info).unwrap();
        assert_eq!(h.mount, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(
            h.level(Path::new("/sys/fs/cgroup/unified/enforcer/x"))
                .unwrap(),
            2
        );
    }

    #[test]
    fn subtree_mount_counts_its_root_depth() {
        let info = "41 31 0:38 /a/b /cg\\040x rw - cgroup2 cgroup2 rw\n";
        let h = parse_mountinfo(info).unwrap();
        assert_eq!(h.mount, Path::new("/cg x"));
        assert_eq!(h.level(Path::new("/cg x/enforcer")).unwrap(), 3);
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert!(parse_mountinfo("1 0 0:1 / / rw - ext4 /dev/sda rw\n").is_none());
    }
}
