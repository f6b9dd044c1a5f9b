//! The denial log: JSON Lines, one object per decision that denied (or, in
//! audit mode, would have denied). Written only by the controller; read by
//! `enforcer logs`.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const DEFAULT_LOG: &str = "/var/log/enforcer/denials.jsonl";

/// The rule that decided, as written in its file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub file: String,
    pub line: usize,
    pub text: String,
}

impl RuleRef {
    /// The rule `text` found at `origin`.
    pub fn at(origin: &crate::policy::profile::Origin, text: &str) -> RuleRef {
        RuleRef {
            file: origin.file.clone(),
            line: origin.line,
            text: text.to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339, UTC.
    pub ts: String,
    /// None when the process was in no registered session (fail closed).
    pub profile: Option<String>,
    pub session: Option<String>,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    /// `connect` or `sendmsg`.
    pub op: String,
    /// `deny` or `audit`.
    pub verdict: String,
    /// `ip:port`, IPv6 in brackets.
    pub target: String,
    /// `tcp`, `udp` or the protocol number.
    pub proto: String,
    /// The rule's host name, when the rule named a host.
    pub host: Option<String>,
    /// For file opens: `read`, `write` or `read-write`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub rule: RuleRef,
}

impl Record {
    /// The record of a session started without its file rules.
    pub fn session_degraded(session: &str, profile: &str, why: &str) -> Record {
        Record {
            ts: format!("{:.6}", jiff::Timestamp::now()),
            profile: Some(profile.to_owned()),
            session: Some(session.to_owned()),
            pid: std::process::id(),
            uid: 0,
            comm: "enforcer".into(),
            op: "session".into(),
            verdict: "degraded".into(),
            target: String::new(),
            proto: String::new(),
            host: None,
            mode: None,
            rule: RuleRef {
                file: String::new(),
                line: 0,
                text: format!("file rules NOT enforced: {why}"),
            },
        }
    }

    /// One line for people.
    pub fn human(&self) -> String {
        format!(
            "{ts} {verdict:<5} {op} {target}{proto}{host} profile={profile} session={session} \
             pid={pid} uid={uid} comm={comm} rule={file}:{line} {text:?}",
            ts = self.ts,
            verdict = self.verdict.to_uppercase(),
            op = self.op,
            target = self.target,
            proto = match (&self.mode, self.proto.as_str()) {
                (Some(mode), _) => format!(" ({mode})"),
                (None, "") => String::new(),
                (None, proto) => format!("/{proto}"),
            },
            host = self
                .host
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default(),
            profile = self.profile.as_deref().unwrap_or("-"),
            session = self.session.as_deref().unwrap_or("-"),
            pid = self.pid,
            uid = self.uid,
            comm = self.comm,
            file = self.rule.file,
            line = self.rule.line,
            text = self.rule.text,
        )
    }
}

/// The open log file, appended to one whole line per write so readers never
/// see half a record.
pub struct Writer {
    path: PathBuf,
    file: File,
}

impl Writer {
    pub fn open(path: &Path) -> Result<Writer> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating the log directory {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .with_context(|| format!("opening the denial log {}", path.display()))?;
        Ok(Writer {
            path: path.to_owned(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the path again, after the file was rotated away. Lines written
    /// until now went to the rotated file, so none are lost.
    pub fn reopen(&mut self) -> Result<()> {
        *self = Writer::open(&self.path)?;
        Ok(())
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_vec(record).context("encoding a log record")?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .with_context(|| format!("writing the denial log {}", self.path.display()))
    }
}

pub struct Filter {
    pub profile: Option<String>,
}

impl Filter {
    fn keeps(&self, record: &Record) -> bool {
        self.profile
            .as_ref()
            .is_none_or(|p| record.profile.as_deref() == Some(p.as_str()))
    }
}

/// Print the log, and with `follow` keep printing new lines as they are
/// written, across truncation and rotation (a new file at the same path).
pub fn print(path: &Path, json: bool, follow: bool, filter: &Filter) -> Result<()> {
    let open =
        || File::open(path).with_context(|| format!("opening the denial log {}", path.display()));
    let mut file = match open() {
        Ok(f) => f,
        Err(_) if follow => wait_for(path)?,
        Err(e) => return Err(e),
    };
    let mut pending = String::new();
    let mut out = io::stdout().lock();
    loop {
        let mut reader = BufReader::new(&mut file);
        loop {
            let mut chunk = String::new();
            if reader.read_line(&mut chunk)? == 0 {
                break;
            }
            pending.push_str(&chunk);
            if !pending.ends_with('\n') {
                // A line still being written; finish it on the next read.
                continue;
            }
            emit(&mut out, pending.trim_end(), json, filter)?;
            pending.clear();
        }
        if !follow {
            return Ok(());
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(100));
        let position = file.stream_position()?;
        match fs::metadata(path) {
            Ok(meta) if meta.ino() != file.metadata()?.ino() => {
                // Rotated: finish the old file, then continue with the new.
                let mut rest = String::new();
                file.read_to_string(&mut rest)?;
                for line in rest.lines() {
                    emit(&mut out, line, json, filter)?;
                }
                file = open()?;
                pending.clear();
            }
            Ok(meta) if meta.len() < position => {
                file.seek(SeekFrom::Start(0))?;
                pending.clear();
            }
            _ => {}
        }
    }
}

fn wait_for(path: &Path) -> Result<File> {
    loop {
        if let Ok(f) = File::open(path) {
            return Ok(f);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn emit(out: &mut impl Write, line: &str, json: bool, filter: &Filter) -> Result<()> {
    if line.is_empty() {
        return Ok(());
    }
    match serde_json::from_str::<Record>(line) {
        Ok(record) if !filter.keeps(&record) => Ok(()),
        Ok(record) if !json => Ok(writeln!(out, "{}", record.human())?),
        // Lines this version cannot parse are shown as they are, never dropped.
        _ => Ok(writeln!(out, "{line}")?),
    }
}
