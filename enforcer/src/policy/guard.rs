//! The `[guard]` section: which of the session guards a profile re-allows,
//! and which local sockets (services that would act for the agent outside
//! its cgroup) its sessions may not connect to.
//!
//! ```toml
//! [guard]
//! allow   = ["ptrace", "/run/user/*/bus"]   # guards, or built-in sockets, to re-allow
//! sockets = ["/run/my-runner.sock"]         # more sockets to refuse
//! ```

use std::{
    fs,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
};

use enforcer_common::{GUARDS, GUARDS_ALWAYS};

use super::profile::Origin;

/// Unix sockets whose services act on a client's behalf outside its cgroup:
/// container engines start containers, the D-Bus buses and systemd start
/// units (`systemd-run`), a terminal multiplexer started earlier runs
/// commands in its own cgroup. `*` matches within one path component.
pub const BUILTIN_SOCKETS: [&str; 17] = [
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/run/podman/podman.sock",
    "/run/libvirt/libvirt-sock",
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/run/user/*/bus",
    "/run/user/*/systemd/private",
    "/run/user/*/docker.sock",
    "/run/user/*/podman/podman.sock",
    "/tmp/tmux-*/*",
    "/run/screen/S-*/*",
    "/run/snapd.socket",
];

/// One entry of `[guard] sockets` or a socket path in `[guard] allow`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketRule {
    /// An absolute path; `*` matches within one component.
    pub pattern: String,
    pub origin: Origin,
}

/// A profile's guard settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guards {
    /// `GUARD_*` bits the profile re-allows.
    pub allowed: u32,
    /// Socket patterns the profile re-allows (removed from the refused set).
    pub allowed_sockets: Vec<SocketRule>,
    /// Socket patterns refused in addition to [`BUILTIN_SOCKETS`].
    pub sockets: Vec<SocketRule>,
}

/// What one `[guard] allow` entry means.
#[derive(Debug, PartialEq, Eq)]
pub enum AllowEntry {
    Guard(u32),
    Socket(String),
}

/// Parses a `[guard] allow` entry: a guard's name or a socket path.
pub fn parse_allow(text: &str) -> Result<AllowEntry, String> {
    if text.starts_with('/') {
        return parse_socket(text).map(AllowEntry::Socket);
    }
    match GUARDS.iter().find(|(_, name)| *name == text) {
        Some((bit, name)) if bit & GUARDS_ALWAYS != 0 => Err(format!(
            "`{name}` cannot be re-allowed: nothing in a session may change the enforcer"
        )),
        Some((bit, _)) => Ok(AllowEntry::Guard(*bit)),
        None => Err(format!(
            "unknown guard `{text}`; the guards are {} (or give a socket path)",
            GUARDS
                .iter()
                .filter(|(bit, _)| bit & GUARDS_ALWAYS == 0)
                .map(|(_, name)| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Parses a socket pattern: absolute, no `..`, `*` only inside components.
pub fn parse_socket(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!("socket path `{text}` must be absolute"));
    }
    if text.split('/').any(|c| c == "..") {
        return Err(format!("socket path `{text}` must not contain `..`"));
    }
    if text.split('/').any(|c| c.matches('*').count() > 1) {
        return Err(format!(
            "socket path `{text}`: at most one `*` in each path component"
        ));
    }
    Ok(text.to_owned())
}

/// The name of a guard bit, for the log.
pub fn guard_name(guard: u32) -> &'static str {
    GUARDS
        .iter()
        .find(|(bit, _)| *bit == guard)
        .map_or("guard", |(_, name)| name)
}

/// Paths that exist now and match `pattern` (`*` within a component).
pub fn expand(pattern: &str) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/")];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for dir in &found {
            if let Some((prefix, suffix)) = component.split_once('*') {
                let Ok(entries) = fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| {
                        n.len() >= prefix.len() + suffix.len()
                            && n.starts_with(prefix)
                            && n.ends_with(suffix)
                    })
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| dir.join(n)));
            } else {
                let path = dir.join(component);
                if fs::symlink_metadata(&path).is_ok() {
                    next.push(path);
                }
            }
        }
        found = next;
    }
    found
}

/// The Unix socket files the sessions of a profile with `guards` may not
/// connect to, found now: `always` (the control socket, never re-allowed),
/// then the built-in list (unless `local-socket` is re-allowed) and the
/// profile's own, less those it re-allows. Identity is the caller's
/// (`identity`: the file's device and inode, following symlinks).
pub fn protected_sockets<I: PartialEq>(
    guards: &Guards,
    always: &[&Path],
    identity: impl Fn(&Path) -> Option<I>,
) -> Vec<(PathBuf, I)> {
    let local_allowed = guards.allowed & enforcer_common::GUARD_LOCAL_SOCKET != 0;
    let excluded: Vec<I> = guards
        .allowed_sockets
        .iter()
        .flat_map(|s| expand(&s.pattern))
        .filter_map(|p| identity(&p))
        .collect();
    let mut candidates: Vec<(PathBuf, bool)> =
        always.iter().map(|p| (p.to_path_buf(), true)).collect();
    if !local_allowed {
        let patterns = BUILTIN_SOCKETS
            .iter()
            .copied()
            .chain(guards.sockets.iter().map(|s| s.pattern.as_str()));
        candidates.extend(patterns.flat_map(expand).map(|p| (p, false)));
    }
    let mut out: Vec<(PathBuf, I)> = Vec::new();
    for (path, forced) in candidates {
        let is_socket = fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket());
        let Some(id) = is_socket.then(|| identity(&path)).flatten() else {
            continue;
        };
        if (forced || !excluded.contains(&id)) && !out.iter().any(|(_, seen)| *seen == id) {
            out.push((path, id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::{fs::MetadataExt, net::UnixListener};

    use super::*;

    fn rule(pattern: &str) -> SocketRule {
        SocketRule {
            pattern: pattern.into(),
            origin: Origin {
                file: "t.toml".into(),
                line: 1,
                key: "guard.sockets[0]".into(),
            },
        }
    }

    fn identity(path: &Path) -> Option<(u64, u64)> {
        fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    #[test]
    fn allow_entries_are_guards_or_socket_paths() {
        assert_eq!(
            parse_allow("ptrace"),
            Ok(AllowEntry::Guard(enforcer_common::GUARD_PTRACE))
        );
        assert_eq!(
            parse_allow("/run/user/*/bus"),
            Ok(AllowEntry::Socket("/run/user/*/bus".into()))
        );
        assert!(
            parse_allow("pins")
                .unwrap_err()
                .contains("cannot be re-allowed")
        );
        let unknown = parse_allow("ptrac").unwrap_err();
        assert!(unknown.contains("unknown guard `ptrac`"), "{unknown}");
        assert!(unknown.contains("`raw-socket`"), "{unknown}");
        assert!(!unknown.contains("`pins`"), "{unknown}");
        assert!(parse_allow("enforcer-files").is_err());
        assert!(parse_socket("run/x.sock").is_err());
        assert!(parse_socket("/run/../etc/x").is_err());
        assert!(parse_socket("/run/*a*/x").is_err());
    }

    #[test]
    fn patterns_expand_within_components() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["tmux-0", "tmux-1000", "other"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
            fs::write(dir.path().join(sub).join("default"), "").unwrap();
        }
        let base = dir.path().display();
        let found = expand(&format!("{base}/tmux-*/*"));
        assert_eq!(
            found,
            [
                dir.path().join("tmux-0/default"),
                dir.path().join("tmux-1000/default")
            ]
        );
        assert!(expand(&format!("{base}/nothing/*")).is_empty());
        assert_eq!(
            expand(&format!("{base}/other/default")),
            [dir.path().join("other/default")]
        );
    }

    #[test]
    fn sockets_are_found_by_identity_and_re_allowed_ones_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let _a = UnixListener::bind(path("a.sock")).unwrap();
        let _b = UnixListener::bind(path("b.sock")).unwrap();
        let _control = UnixListener::bind(path("control.sock")).unwrap();
        fs::write(path("plain"), "").unwrap();
        std::os::unix::fs::symlink(path("a.sock"), path("link.sock")).unwrap();
        let base = dir.path().display();
        let guards = Guards {
            sockets: vec![
                rule(&format!("{base}/*.sock")),
                rule(&format!("{base}/plain")),
            ],
            allowed_sockets: vec![rule(&format!("{base}/b.sock"))],
            ..Guards::default()
        };
        let control = path("control.sock");
        let found: Vec<PathBuf> = protected_sockets(&guards, &[&control], identity)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        // The link is the same socket as a.sock; b.sock is re-allowed; a
        // plain file is no socket.
        assert_eq!(found, [control.clone(), path("a.sock")]);

        let everything = Guards {
            allowed: enforcer_common::GUARD_LOCAL_SOCKET,
            ..guards
        };
        let found = protected_sockets(&everything, &[&control], identity);
        assert_eq!(found.len(), 1, "the control socket is always refused");
    }
}
