//! Starting the agent's command inside its session cgroup.
//!
//! The child joins the cgroup between fork and exec, so the command's first
//! instruction already runs enforced and no socket of its own is ever
//! created outside. Under sudo it then drops to the invoking user with
//! `no_new_privs`, so it cannot regain root through setuid binaries, leave its
//! cgroup, or touch the controller.

use std::{
    ffi::{CString, OsString},
    fs::OpenOptions,
    os::{fd::AsRawFd, unix::process::ExitStatusExt},
    path::Path,
    process::ExitStatus,
};

use anyhow::{Context, Result, bail};
use nix::unistd::{Gid, Uid, User};
use tokio::signal::unix::{SignalKind, signal};

/// The user the agent runs as when `enforcer run` was started through sudo.
pub struct DropTo {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    user: User,
}

impl DropTo {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The invoking user, from sudo's environment, when we are root.
    pub fn from_sudo() -> Result<Option<DropTo>> {
        if !Uid::effective().is_root() {
            return Ok(None);
        }
        let Some(uid) = std::env::var("SUDO_UID")
            .ok()
            .and_then(|u| u.parse::<u32>().ok())
        else {
            return Ok(None);
        };
        if uid == 0 {
            return Ok(None);
        }
        let user = User::from_uid(Uid::from_raw(uid))
            .context("looking up the sudo user")?
            .with_context(|| format!("SUDO_UID={uid} names no user"))?;
        let name = CString::new(user.name.as_str())?;
        let groups = nix::unistd::getgrouplist(&name, user.gid)
            .context("reading the sudo user's groups")?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        Ok(Some(DropTo {
            uid,
            gid: user.gid.as_raw(),
            groups,
            user,
        }))
    }
}

/// Run `argv` in the session cgroup `cgroup` and wait for it, forwarding
/// SIGTERM and SIGHUP. Returns how it ended.
pub async fn run(argv: &[OsString], cgroup: &Path, drop_to: Option<&DropTo>) -> Result<ExitStatus> {
    let Some((program, program_args)) = argv.split_first() else {
        bail!("no command given: use `enforcer run [OPTIONS] -- COMMAND [ARGS...]`");
    };
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let procs_fd = procs.as_raw_fd();

    let mut command = tokio::process::Command::new(program);
    command.args(program_args);
    if let Some(d) = drop_to {
        command
            .env("HOME", &d.user.dir)
            .env("USER", &d.user.name)
            .env("LOGNAME", &d.user.name)
            .env("SHELL", &d.user.shell);
    }
    let (uid, gid, groups) = match drop_to {
        Some(d) => (Some(d.uid), d.gid, d.groups.clone()),
        None => (None, 0, Vec::new()),
    };
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process: this child, before exec.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(uid) = uid {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting `{}`", program.to_string_lossy()))?;
    drop(procs);
    let pid = child
        .id()
        .context("the agent exited before it could be tracked")?;

    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    // The terminal sends SIGINT to the agent directly; ignore our copy.
    let mut int = signal(SignalKind::interrupt())?;
    let forward = |sig: i32| {
        // SAFETY: plain syscall on the child's pid.
        unsafe { libc::kill(pid.cast_signed(), sig) };
    };
    loop {
        tokio::select! {
            status = child.wait() => return status.context("waiting for the agent"),
            _ = term.recv() => forward(libc::SIGTERM),
            _ = hup.recv() => forward(libc::SIGHUP),
            _ = int.recv() => {}
        }
    }
}

/// The shell convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
