//! Profiles: the TOML rule files, parsed with every entry's line kept, so
//! errors and log lines can point at the exact rule.

use std::{
    collections::BTreeMap,
    fmt, fs,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    files::FileTarget,
    guard::{self, AllowEntry, Guards, SocketRule},
    target::Target,
};

/// The built-in default profile, used when no rules directory exists and
/// available as `default` unless a rules file defines that name.
pub const BUILTIN_DEFAULT: &str = include_str!("../../../rules/default.toml");
pub const BUILTIN_SOURCE: &str = "<built-in>/default.toml";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// Where a rule came from, for errors and log lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
    /// The TOML key, like `network.deny[2]`.
    pub key: String,
}

#[derive(Clone, Debug)]
pub struct NetRule {
    pub action: Action,
    pub target: Target,
    /// The entry as written.
    pub text: String,
    pub origin: Origin,
}

#[derive(Clone, Debug)]
pub struct FileRule {
    pub action: Action,
    pub target: FileTarget,
    pub text: String,
    pub origin: Origin,
}

#[derive(Clone, Debug)]
pub struct Profile {
    pub name: String,
    pub mode: Mode,
    /// What happens to destinations no rule matches.
    pub default: Action,
    /// Where `default` was set (or the `[network]` table, or the file).
    pub default_origin: Origin,
    pub rules: Vec<NetRule>,
    pub file_rules: Vec<FileRule>,
    /// `[guard]`: re-allowed guards and the local sockets refused.
    pub guards: Guards,
}

/// A rule file problem, naming file, line and key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: `{}`: {}",
                self.file, self.line, self.key, self.message
            )
        }
    }
}

/// Every error of a rule set, so a user fixes them all in one pass.
#[derive(Debug, thiserror::Error)]
pub struct RuleErrors(pub Vec<RuleError>);

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: Spanned<String>,
    #[serde(default)]
    mode: Option<Spanned<Mode>>,
    #[serde(default)]
    network: Option<Spanned<NetworkSection>>,
    #[serde(default)]
    files: Option<FilesSection>,
    #[serde(default)]
    guard: Option<GuardSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardSection {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    sockets: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesSection {
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSection {
    #[serde(default)]
    default: Option<Spanned<Action>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

/// Where each line of a rule file ends, so that an entry's line number is a
/// binary search instead of a scan of all the text before it (the scan made
/// loading a 100 000-rule profile take over a minute).
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Lines {
        Lines(text.match_indices('\n').map(|(at, _)| at).collect())
    }

    /// The 1-based line `span` starts on.
    fn of(&self, span: &Range<usize>) -> usize {
        self.0.partition_point(|&newline| newline < span.start) + 1
    }
}

/// Parse a section's `deny` and `allow` entries with `T::parse`, keeping
/// each entry's origin; bad entries become errors naming file, line and key.
fn entries<T: EntryTarget, R>(
    file: &str,
    lines: &Lines,
    deny: Vec<Spanned<String>>,
    allow: Vec<Spanned<String>>,
    section: &str,
    errors: &mut Vec<RuleError>,
    make: impl Fn(Action, T, String, Origin) -> R,
) -> Vec<R> {
    let mut out = Vec::new();
    for (action, list, list_key) in [
        (Action::Deny, deny, "deny"),
        (Action::Allow, allow, "allow"),
    ] {
        for (i, entry) in list.into_iter().enumerate() {
            let line = lines.of(&entry.span());
            let key = format!("{section}.{list_key}[{i}]");
            let entry = entry.into_inner();
            match T::parse_entry(&entry) {
                Ok(target) => out.push(make(
                    action,
                    target,
                    entry,
                    Origin {
                        file: file.to_owned(),
                        line,
                        key,
                    },
                )),
                Err(message) => errors.push(RuleError {
                    file: file.to_owned(),
                    line,
                    key,
                    message,
                }),
            }
        }
    }
    out
}

/// What a rule entry parses into: a network target or a file target.
trait EntryTarget: Sized {
    fn parse_entry(text: &str) -> Result<Self, String>;
}

impl EntryTarget for Target {
    fn parse_entry(text: &str) -> Result<Self, String> {
        Target::parse(text)
    }
}

impl EntryTarget for FileTarget {
    fn parse_entry(text: &str) -> Result<Self, String> {
        FileTarget::parse(text)
    }
}

/// The innermost key a TOML error talks about, from its message (the toml
/// crate says "unknown field `x`" or "missing field `x`").
fn key_in_message(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_owned)
        .unwrap_or_default()
}

impl Profile {
    /// Parse one profile. `file` is only used in errors and log lines.
    pub fn parse(file: &str, text: &str) -> Result<Profile, RuleErrors> {
        let err = |line, key: &str, message: String| RuleError {
            file: file.to_owned(),
            line,
            key: key.to_owned(),
            message,
        };
        let lines = Lines::new(text);
        let parsed: ProfileFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| lines.of(&s));
            let message = e.message().trim().to_owned();
            RuleErrors(vec![err(line, &key_in_message(&message), message)])
        })?;
        let mut errors = Vec::new();

        let name_line = lines.of(&parsed.name.span());
        let name = parsed.name.into_inner();
        if let Err(why) = validate_name(&name) {
            errors.push(err(name_line, "name", why));
        }
        let mode = parsed.mode.map_or(Mode::Enforce, Spanned::into_inner);
        let mut default = Action::Allow;
        let mut default_origin = Origin {
            file: file.to_owned(),
            line: 1,
            key: "network.default".into(),
        };
        let mut rules = Vec::new();
        if let Some(network) = parsed.network {
            default_origin.line = lines.of(&network.span());
            let network = network.into_inner();
            if let Some(d) = network.default {
                default_origin.line = lines.of(&d.span());
                default = d.into_inner();
            }
            rules = entries(
                file,
                &lines,
                network.deny,
                network.allow,
                "network",
                &mut errors,
                |action, target, text, origin| NetRule {
                    action,
                    target,
                    text,
                    origin,
                },
            );
        }
        let file_rules = match parsed.files {
            Some(files) => entries(
                file,
                &lines,
                files.deny,
                files.allow,
                "files",
                &mut errors,
                |action, target, text, origin| FileRule {
                    action,
                    target,
                    text,
                    origin,
                },
            ),
            None => Vec::new(),
        };
        let guards = parsed
            .guard
            .map(|g| parse_guards(file, &lines, g, &mut errors))
            .unwrap_or_default();
        if errors.is_empty() {
            Ok(Profile {
                name,
                mode,
                default,
                default_origin,
                rules,
                file_rules,
                guards,
            })
        } else {
            Err(RuleErrors(errors))
        }
    }

    pub fn builtin_default() -> Profile {
        Profile::parse(BUILTIN_SOURCE, BUILTIN_DEFAULT)
            .unwrap_or_else(|e| panic!("the built-in default profile is invalid: {e}"))
    }

    /// Host names this profile's rules mention, each once.
    pub fn host_names(&self) -> impl Iterator<Item = &str> {
        let mut seen = std::collections::BTreeSet::new();
        self.rules.iter().filter_map(move |r| match &r.target.host {
            super::target::Host::Name(n) if seen.insert(n.as_str()) => Some(n.as_str()),
            _ => None,
        })
    }
}

/// The `[guard]` section, with each bad entry an error naming its line.
fn parse_guards(
    file: &str,
    lines: &Lines,
    section: GuardSection,
    errors: &mut Vec<RuleError>,
) -> Guards {
    let mut guards = Guards::default();
    let mut each = |list: Vec<Spanned<String>>,
                    list_key: &str,
                    parse: &dyn Fn(&str) -> Result<AllowEntry, String>,
                    guards: &mut Guards| {
        for (i, entry) in list.into_iter().enumerate() {
            let origin = Origin {
                file: file.to_owned(),
                line: lines.of(&entry.span()),
                key: format!("guard.{list_key}[{i}]"),
            };
            let text = entry.into_inner();
            match parse(&text) {
                Ok(AllowEntry::Guard(bit)) => guards.allowed |= bit,
                Ok(AllowEntry::Socket(pattern)) => {
                    let rule = SocketRule { pattern, origin };
                    if list_key == "allow" {
                        guards.allowed_sockets.push(rule);
                    } else {
                        guards.sockets.push(rule);
                    }
                }
                Err(message) => errors.push(RuleError {
                    file: origin.file,
                    line: origin.line,
                    key: origin.key,
                    message,
                }),
            }
        }
    };
    each(section.allow, "allow", &guard::parse_allow, &mut guards);
    each(
        section.sockets,
        "sockets",
        &|text| guard::parse_socket(text).map(AllowEntry::Socket),
        &mut guards,
    );
    guards
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "profile name `{name}` must be 1-64 characters of a-z, 0-9, `-` and `_`"
        ))
    }
}

/// All profiles available to sessions: the rules directory's, plus the
/// built-in default unless a file overrides it.
#[derive(Clone, Debug)]
pub struct ProfileSet {
    pub dir: Option<PathBuf>,
    pub profiles: BTreeMap<String, Profile>,
}

impl ProfileSet {
    /// Load every `*.toml` file in `dir`. A missing directory means only the
    /// built-in default applies; any bad file fails the whole set, so a
    /// half-valid policy is never put in force.
    pub fn load(dir: &Path) -> Result<ProfileSet, RuleErrors> {
        let mut profiles = BTreeMap::new();
        let builtin = Profile::builtin_default();
        profiles.insert(builtin.name.clone(), builtin);
        if !dir.exists() {
            return Ok(ProfileSet {
                dir: None,
                profiles,
            });
        }
        let dir_error = |message: String| {
            RuleErrors(vec![RuleError {
                file: dir.display().to_string(),
                line: 1,
                key: String::new(),
                message,
            }])
        };
        let entries = fs::read_dir(dir)
            .map_err(|e| dir_error(format!("cannot read the rules directory: {e}")))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut errors = Vec::new();
        let mut defined_in: BTreeMap<String, String> = BTreeMap::new();
        for path in files {
            let file = path.display().to_string();
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(RuleError {
                        file,
                        line: 1,
                        key: String::new(),
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            match Profile::parse(&file, &text) {
                Ok(profile) => {
                    if let Some(other) = defined_in.insert(profile.name.clone(), file.clone()) {
                        errors.push(RuleError {
                            file,
                            line: 1,
                            key: "name".into(),
                            message: format!(
                                "profile `{}` is already defined in {other}",
                                profile.name
                            ),
                        });
                    } else {
                        profiles.insert(profile.name.clone(), profile);
                    }
                }
                Err(RuleErrors(e)) => errors.extend(e),
            }
        }
        if errors.is_empty() {
            Ok(ProfileSet {
                dir: Some(dir.to_owned()),
                profiles,
            })
        } else {
            Err(RuleErrors(errors))
        }
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::target::Host;

    const EXAMPLE: &str = r#"name = "coding-agent"
mode = "audit"
[network]
default = "deny"
deny  = ["backboard.railway.app", "10.0.0.0/8",
         "192.0.2.7:443/tcp"]
allow = ["api.anthropic.com:443"]
"#;

    #[test]
    fn parses_profile_with_lines_and_keys() {
        let p = Profile::parse("p.toml", EXAMPLE).unwrap();
        assert_eq!(p.name, "coding-agent");
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.default, Action::Deny);
        assert_eq!(p.default_origin.line, 4);
        assert_eq!(p.rules.len(), 4);
        let third = &p.rules[2];
        assert_eq!(third.text, "192.0.2.7:443/tcp");
        assert_eq!(third.origin.line, 6);
        assert_eq!(third.origin.key, "network.deny[2]");
        assert_eq!(p.rules[3].action, Action::Allow);
        assert_eq!(
            p.rules[3].target.host,
            Host::Name("api.anthropic.com".into())
        );
    }

    #[test]
    fn defaults_are_enforce_and_allow() {
        let p = Profile::parse("p.toml", "name = \"x\"\n").unwrap();
        assert_eq!((p.mode, p.default), (Mode::Enforce, Action::Allow));
        assert!(p.rules.is_empty());
    }

    #[test]
    fn bad_entry_names_file_line_and_key() {
        let text = "name = \"x\"\n[network]\ndeny = [\n  \"ok.example\",\n  \"10.0.0.1/8\",\n]\n";
        let errs = Profile::parse("dir/x.toml", text).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        let e = &errs[0];
        assert_eq!(
            (e.file.as_str(), e.line, e.key.as_str()),
            ("dir/x.toml", 5, "network.deny[1]")
        );
        assert!(
            e.to_string()
                .starts_with("dir/x.toml:5: `network.deny[1]`: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors() {
        let unknown = Profile::parse("x.toml", "name = \"x\"\n[network]\ndenny = []\n")
            .unwrap_err()
            .0;
        assert_eq!((unknown[0].line, unknown[0].key.as_str()), (3, "denny"));
        let wrong = Profile::parse("x.toml", "name = \"x\"\nmode = \"block\"\n")
            .unwrap_err()
            .0;
        assert_eq!(wrong[0].line, 2);
        assert!(wrong[0].message.contains("block"), "{}", wrong[0].message);
        let not_list = Profile::parse("x.toml", "name = \"x\"\n[network]\ndeny = \"a.b\"\n")
            .unwrap_err()
            .0;
        assert_eq!(not_list[0].line, 3);
        let missing = Profile::parse("x.toml", "[network]\n").unwrap_err().0;
        assert_eq!(missing[0].key, "name");
    }

    #[test]
    fn unknown_sections_are_refused_not_ignored() {
        let errs = Profile::parse("x.toml", "name = \"x\"\n[processes]\ndeny = []\n")
            .unwrap_err()
            .0;
        assert_eq!(errs[0].key, "processes");
    }

    #[test]
    fn guard_section_re_allows_guards_and_names_bad_entries() {
        let text = "name = \"x\"\n[guard]\nallow = [\"ptrace\", \"/run/user/*/bus\"]\nsockets = [\"/run/ci.sock\"]\n";
        let p = Profile::parse("x.toml", text).unwrap();
        assert_eq!(p.guards.allowed, enforcer_common::GUARD_PTRACE);
        assert_eq!(p.guards.allowed_sockets[0].pattern, "/run/user/*/bus");
        assert_eq!(p.guards.sockets[0].pattern, "/run/ci.sock");
        assert_eq!(p.guards.sockets[0].origin.line, 4);

        let text = "name = \"x\"\n[guard]\nallow = [\n  \"signal\",\n  \"pins\",\n]\nsockets = [\"ci.sock\"]\n";
        let errs = Profile::parse("x.toml", text).unwrap_err().0;
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].key.as_str()), (5, "guard.allow[1]"));
        assert!(errs[0].message.contains("cannot be re-allowed"), "{errs:?}");
        assert_eq!(
            (errs[1].line, errs[1].key.as_str()),
            (7, "guard.sockets[0]")
        );
        assert!(errs[1].message.contains("must be absolute"), "{errs:?}");
        // A guard's name is no socket path.
        assert!(Profile::parse("x.toml", "name = \"x\"\n[guard]\nsockets = [\"bpf\"]\n").is_err());
    }

    #[test]
    fn file_rules_parse_with_lines_and_bad_ones_name_their_key() {
        let text = "name = \"x\"\n[files]\ndeny = [\"~/.aws/\", \"**/.env\"]\nallow = [\"**/.env.example\"]\n";
        let p = Profile::parse("x.toml", text).unwrap();
        assert_eq!(p.file_rules.len(), 3);
        assert_eq!(
            (p.file_rules[2].action, p.file_rules[2].origin.line),
            (Action::Allow, 4)
        );
        let bad = "name = \"x\"\n[files]\ndeny = [\"relative/x\"]\n";
        let errs = Profile::parse("x.toml", bad).unwrap_err().0;
        assert_eq!((errs[0].line, errs[0].key.as_str()), (3, "files.deny[0]"));
    }

    #[test]
    fn builtin_default_profile_parses_and_covers_metadata() {
        let p = Profile::builtin_default();
        assert_eq!((p.name.as_str(), p.default), ("default", Action::Allow));
        let texts: Vec<&str> = p.rules.iter().map(|r| r.text.as_str()).collect();
        for needed in [
            "169.254.169.254",
            "fd00:ec2::254",
            "metadata.google.internal",
            "backboard.railway.app",
        ] {
            assert!(texts.contains(&needed), "default profile lacks {needed}");
        }
    }

    #[test]
    fn directory_loads_all_files_and_reports_every_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.toml"), "name = \"a\"\n").unwrap();
        fs::write(dir.path().join("README.md"), "not a profile").unwrap();
        let set = ProfileSet::load(dir.path()).unwrap();
        assert!(set.get("a").is_some() && set.get("default").is_some());

        fs::write(dir.path().join("b.toml"), "name = \"a\"\n").unwrap();
        fs::write(dir.path().join("c.toml"), "name = \"c\"\nmode = 3\n").unwrap();
        let errs = ProfileSet::load(dir.path()).unwrap_err().0;
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].message.contains("already defined"));
    }

    #[test]
    fn missing_directory_means_builtin_only() {
        let set = ProfileSet::load(Path::new("/nonexistent/enforcer-rules")).unwrap();
        assert_eq!(set.profiles.keys().collect::<Vec<_>>(), ["default"]);
    }
}
