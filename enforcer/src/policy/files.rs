//! File rules: the `[files]` entries, and their compilation into the
//! `FILE_INODES` map (identities of files and directories) and the name
//! tries (patterns). Pure: the file system is reached through a `stat`
//! function the caller passes in.
//!
//! Entry forms:
//! - `/path/file`, `~/path/file`: that file, by identity (device, inode),
//!   plus its name inside its parent directory, so a re-created file is
//!   covered too.
//! - `/path/dir/`, `~/dir/`: the directory and everything below it, by the
//!   directory's identity.
//! - `**/GLOB`: files with a matching name anywhere.
//! - `DIR/GLOB`: files directly inside DIR; `DIR/**/GLOB`: anywhere below.
//! - GLOB: `name`, `prefix*` or `*suffix`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use enforcer_common::{
    INODE_ALLOW, INODE_DENY, InodeRule, MAX_EXACT_NAME, NAME_BYTES, SUBTREE_ALLOW, SUBTREE_DENY,
};

use super::profile::Action;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Glob {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileTarget {
    /// A file (or anything) at this path, by identity.
    Exact(PathBuf),
    /// A directory and everything below it.
    Dir(PathBuf),
    /// Names anywhere.
    Anywhere(Glob),
    /// Names directly inside a directory.
    Child(PathBuf, Glob),
    /// Names anywhere below a directory.
    Subtree(PathBuf, Glob),
}

impl FileTarget {
    pub fn parse(text: &str) -> Result<FileTarget, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("**/") {
            return Ok(FileTarget::Anywhere(parse_glob(rest)?));
        }
        if !(text.starts_with('/') || text.starts_with("~/")) {
            return Err(format!(
                "`{text}` must be an absolute path, a `~/` path or a `**/NAME` pattern"
            ));
        }
        if text.contains("/../") || text.ends_with("/..") || text.contains("/./") {
            return Err(format!("`{text}` must not contain `.` or `..` components"));
        }
        if let Some(dir) = text.strip_suffix('/') {
            if dir.contains('*') {
                return Err(format!(
                    "`{text}`: wildcards are only allowed in the last name"
                ));
            }
            return Ok(FileTarget::Dir(PathBuf::from(if dir.is_empty() {
                "/"
            } else {
                dir
            })));
        }
        let (dir, last) = text.rsplit_once('/').unwrap_or(("", text));
        let only_last = || format!("`{text}`: wildcards are only allowed in the last name");
        if let Some(base) = dir.strip_suffix("/**") {
            if base.contains('*') {
                return Err(only_last());
            }
            return Ok(FileTarget::Subtree(PathBuf::from(base), parse_glob(last)?));
        }
        if dir.contains('*') {
            return Err(only_last());
        }
        if !last.contains('*') {
            return Ok(FileTarget::Exact(PathBuf::from(text)));
        }
        Ok(FileTarget::Child(
            PathBuf::from(if dir.is_empty() { "/" } else { dir }),
            parse_glob(last)?,
        ))
    }
}

fn parse_glob(glob: &str) -> Result<Glob, String> {
    if glob.is_empty() || glob.contains('/') {
        return Err(format!("`{glob}` must be a single file name"));
    }
    let stars = glob.matches('*').count();
    let parsed = match (stars, glob.strip_prefix('*'), glob.strip_suffix('*')) {
        (0, _, _) => Glob::Exact(glob.to_owned()),
        (1, Some(suffix), _) if !suffix.is_empty() => Glob::Suffix(suffix.to_owned()),
        (1, _, Some(prefix)) if !prefix.is_empty() => Glob::Prefix(prefix.to_owned()),
        _ => {
            return Err(format!(
                "`{glob}`: a name pattern is `name`, `prefix*` or `*suffix` (one `*`, at an end)"
            ));
        }
    };
    let len = match &parsed {
        Glob::Exact(s) => (s.len(), MAX_EXACT_NAME),
        Glob::Prefix(s) | Glob::Suffix(s) => (s.len(), NAME_BYTES),
    };
    if len.0 > len.1 {
        return Err(format!("`{glob}` is longer than {} bytes", len.1));
    }
    Ok(parsed)
}

/// Which of the two name tries an entry goes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trie {
    /// Exact names (with their NUL) and prefixes.
    Prefix,
    /// Suffixes, stored reversed.
    Suffix,
}

/// One name-trie entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameEntry {
    pub trie: Trie,
    /// Scope index (0 = anywhere).
    pub index: u32,
    pub allow: bool,
    /// The bytes the trie compares (reversed for suffixes).
    pub bytes: Vec<u8>,
    pub rule_id: u32,
}

/// A file rule with where it came from, as the compiler needs it.
pub struct FileRuleRef<'a> {
    pub action: Action,
    pub target: &'a FileTarget,
    pub rule_id: u32,
}

/// Compiled file policy (before the policy id is attached).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FilesCompiled {
    /// (device in kernel encoding, inode) -> rule.
    pub inodes: BTreeMap<(u32, u64), InodeRule>,
    pub names: Vec<NameEntry>,
    /// Rules naming a path that does not exist (yet), with the reason; they
    /// apply once the path exists and the policy is compiled again.
    pub missing: Vec<(u32, String)>,
}

/// Identity of a path: (device in kernel encoding, inode), following
/// symlinks; `None` if it does not exist.
pub type Stat<'a> = &'a dyn Fn(&Path) -> Option<(u32, u64)>;

pub fn compile(rules: &[FileRuleRef<'_>], home: &Path, stat: Stat<'_>) -> FilesCompiled {
    let mut out = FilesCompiled::default();
    let mut scopes: BTreeMap<((u32, u64), bool), u32> = BTreeMap::new();
    let expand = |p: &Path| -> PathBuf {
        match p.strip_prefix("~") {
            Ok(rest) => home.join(rest),
            Err(_) => p.to_owned(),
        }
    };
    for rule in rules {
        let allow = rule.action == Action::Allow;
        let (file_flag, tree_flag) = if allow {
            (INODE_ALLOW, SUBTREE_ALLOW)
        } else {
            (INODE_DENY, SUBTREE_DENY)
        };
        let mut add_scoped = |out: &mut FilesCompiled, dir: &Path, subtree: bool, glob: &Glob| {
            let Some(id) = stat(dir) else {
                out.missing
                    .push((rule.rule_id, format!("{} does not exist", dir.display())));
                return;
            };
            let next = u32::try_from(scopes.len() + 1).unwrap_or(u32::MAX);
            let index = *scopes.entry((id, subtree)).or_insert(next);
            let entry = out.inodes.entry(id).or_default();
            if subtree {
                entry.subtree_scope = index;
            } else {
                entry.child_scope = index;
            }
            out.names.push(name_entry(glob, index, allow, rule.rule_id));
        };
        match rule.target {
            FileTarget::Exact(path) => {
                let path = expand(path);
                if let Some(id) = stat(&path) {
                    let entry = out.inodes.entry(id).or_default();
                    if entry.flags & (INODE_ALLOW | INODE_DENY) == 0 {
                        entry.rule_id = rule.rule_id;
                    }
                    entry.flags |= file_flag;
                }
                if let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
                    let name = Glob::Exact(name.to_string_lossy().into_owned());
                    add_scoped(&mut out, parent, false, &name);
                }
            }
            FileTarget::Dir(dir) => {
                let dir = expand(dir);
                match stat(&dir) {
                    Some(id) => {
                        let entry = out.inodes.entry(id).or_default();
                        if entry.flags & (INODE_ALLOW | INODE_DENY) == 0 {
                            entry.rule_id = rule.rule_id;
                        }
                        if entry.flags & (SUBTREE_ALLOW | SUBTREE_DENY) == 0 {
                            entry.subtree_rule_id = rule.rule_id;
                        }
                        entry.flags |= file_flag | tree_flag;
                    }
                    None => out
                        .missing
                        .push((rule.rule_id, format!("{} does not exist", dir.display()))),
                }
            }
            FileTarget::Anywhere(glob) => out.names.push(name_entry(glob, 0, allow, rule.rule_id)),
            FileTarget::Child(dir, glob) => add_scoped(&mut out, &expand(dir), false, glob),
            FileTarget::Subtree(dir, glob) => add_scoped(&mut out, &expand(dir), true, glob),
        }
    }
    out
}

fn name_entry(glob: &Glob, index: u32, allow: bool, rule_id: u32) -> NameEntry {
    let (trie, bytes) = match glob {
        Glob::Exact(name) => {
            let mut b = name.as_bytes().to_vec();
            b.push(0);
            (Trie::Prefix, b)
        }
        Glob::Prefix(prefix) => (Trie::Prefix, prefix.as_bytes().to_vec()),
        Glob::Suffix(suffix) => (Trie::Suffix, suffix.bytes().rev().collect()),
    };
    NameEntry {
        trie,
        index,
        allow,
        bytes,
        rule_id,
    }
}

/// A user-space `st_dev` in the kernel's `dev_t` encoding (`major << 20 |
/// minor`), which is what `super_block.s_dev` holds.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
    (major << 20) | (minor & 0xf_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        use FileTarget as T;
        let cases = [
            ("~/.aws/credentials", T::Exact("~/.aws/credentials".into())),
            ("/etc/shadow", T::Exact("/etc/shadow".into())),
            ("~/.config/railway/", T::Dir("~/.config/railway".into())),
            ("**/.env", T::Anywhere(Glob::Exact(".env".into()))),
            ("**/*.pem", T::Anywhere(Glob::Suffix(".pem".into()))),
            ("**/.env.*", T::Anywhere(Glob::Prefix(".env.".into()))),
            (
                "~/.ssh/id_*",
                T::Child("~/.ssh".into(), Glob::Prefix("id_".into())),
            ),
            (
                "/etc/ssl/certs/**/*.pem",
                T::Subtree("/etc/ssl/certs".into(), Glob::Suffix(".pem".into())),
            ),
            (
                "/proc/**/environ",
                T::Subtree("/proc".into(), Glob::Exact("environ".into())),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(FileTarget::parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_what_the_kernel_cannot_match() {
        for (text, needle) in [
            ("relative/path", "absolute"),
            ("~/a/*/b", "last name"),
            ("**/a*b", "one `*`"),
            ("**/*", "one `*`"),
            ("**/a/b", "single file name"),
            ("/a/../b", "`..`"),
            ("~/*x/", "last name"),
        ] {
            let err = FileTarget::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let long = format!("**/{}", "x".repeat(MAX_EXACT_NAME + 1));
        assert!(FileTarget::parse(&long).unwrap_err().contains("longer"));
    }

    fn fake_fs(
        paths: &'static [(&'static str, (u32, u64))],
    ) -> impl Fn(&Path) -> Option<(u32, u64)> {
        move |p: &Path| {
            paths
                .iter()
                .find(|(q, _)| Path::new(q) == p)
                .map(|(_, id)| *id)
        }
    }

    fn compile_rules(rules: &[(Action, &str)], stat: Stat<'_>) -> FilesCompiled {
        let targets: Vec<FileTarget> = rules
            .iter()
            .map(|(_, t)| FileTarget::parse(t).unwrap())
            .collect();
        let refs: Vec<FileRuleRef<'_>> = rules
            .iter()
            .zip(&targets)
            .enumerate()
            .map(|(i, ((action, _), target))| FileRuleRef {
                action: *action,
                target,
                rule_id: 10 + u32::try_from(i).unwrap(),
            })
            .collect();
        compile(&refs, Path::new("/home/u"), stat)
    }

    #[test]
    fn exact_file_is_its_identity_and_its_name_in_the_parent() {
        let fs = fake_fs(&[
            ("/home/u/.aws/credentials", (1, 100)),
            ("/home/u/.aws", (1, 50)),
        ]);
        let c = compile_rules(&[(Action::Deny, "~/.aws/credentials")], &fs);
        assert_eq!(
            c.inodes[&(1, 100)],
            InodeRule {
                flags: INODE_DENY,
                rule_id: 10,
                ..Default::default()
            }
        );
        assert_eq!(c.inodes[&(1, 50)].child_scope, 1);
        assert_eq!(
            c.names,
            [NameEntry {
                trie: Trie::Prefix,
                index: 1,
                allow: false,
                bytes: b"credentials\0".to_vec(),
                rule_id: 10
            }]
        );
        assert!(c.missing.is_empty());
    }

    #[test]
    fn missing_file_still_covers_its_name_and_missing_dir_is_reported() {
        let fs = fake_fs(&[("/home/u/.aws", (1, 50))]);
        let c = compile_rules(
            &[
                (Action::Deny, "~/.aws/credentials"),
                (Action::Deny, "~/.kube/"),
            ],
            &fs,
        );
        assert_eq!(c.names.len(), 1);
        assert_eq!(c.missing, [(11, "/home/u/.kube does not exist".to_owned())]);
    }

    #[test]
    fn directory_rule_covers_itself_and_its_subtree() {
        let fs = fake_fs(&[("/home/u/.config/railway", (2, 7))]);
        let c = compile_rules(&[(Action::Deny, "~/.config/railway/")], &fs);
        let r = c.inodes[&(2, 7)];
        assert_eq!(r.flags, INODE_DENY | SUBTREE_DENY);
        assert_eq!((r.rule_id, r.subtree_rule_id), (10, 10));
    }

    #[test]
    fn patterns_get_scopes_and_suffixes_are_reversed() {
        let fs = fake_fs(&[("/home/u/.ssh", (1, 9)), ("/etc/ssl/certs", (3, 4))]);
        let c = compile_rules(
            &[
                (Action::Deny, "**/*.pem"),
                (Action::Deny, "~/.ssh/id_*"),
                (Action::Allow, "~/.ssh/*.pub"),
                (Action::Allow, "/etc/ssl/certs/**/*.pem"),
            ],
            &fs,
        );
        assert_eq!(
            c.names[0],
            NameEntry {
                trie: Trie::Suffix,
                index: 0,
                allow: false,
                bytes: b"mep.".to_vec(),
                rule_id: 10
            }
        );
        assert_eq!(
            (c.names[1].index, c.names[2].index),
            (1, 1),
            "one child scope for ~/.ssh"
        );
        assert_eq!((c.names[2].allow, c.names[2].trie), (true, Trie::Suffix));
        assert_eq!(c.inodes[&(3, 4)].subtree_scope, 2);
        assert_eq!(c.inodes[&(1, 9)].child_scope, 1);
    }

    #[test]
    fn deny_and_allow_on_one_inode_keep_both_flags() {
        let fs = fake_fs(&[("/x", (1, 1))]);
        let c = compile_rules(&[(Action::Deny, "/x"), (Action::Allow, "/x")], &fs);
        assert_eq!(c.inodes[&(1, 1)].flags, INODE_DENY | INODE_ALLOW);
    }

    #[test]
    fn dev_encoding_matches_the_kernel() {
        // st_dev for 8:1 (glibc encoding) -> (8 << 20) | 1.
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(0, 45)), 45);
        assert_eq!(
            kernel_dev(libc::makedev(259, 0x1_1170)),
            (259 << 20) | 0x1_1170
        );
    }
}
