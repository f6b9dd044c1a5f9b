//! Reload when the rules directory changes (inotify).

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

use crate::controller::Controller;

/// Editors write a file in several steps; wait this long after the last
/// change before reloading.
const SETTLE: Duration = Duration::from_millis(300);

/// Watch `dir` and reload the controller's rules whenever a file in it is
/// written, created, moved or deleted.
pub fn spawn(dir: &Path, controller: Controller) -> Result<()> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .context("starting inotify to watch the rules directory")?;
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF,
        )
        .with_context(|| format!("watching the rules directory {}", dir.display()))?;
    // SAFETY: the AsyncFd owns the inotify instance, so its descriptor
    // stays open and the same for the AsyncFd's whole life.
    let readiness = unsafe { AsyncFd::register(Watch(inotify)) }
        .map_err(|e| anyhow::anyhow!("registering the inotify descriptor: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = readiness.readable().await else {
                tokio::time::sleep(SETTLE).await;
                continue;
            };
            // Drain this change and any that follow within SETTLE.
            loop {
                while readiness
                    .get_ref()
                    .0
                    .read_events()
                    .is_ok_and(|events| !events.is_empty())
                {}
                guard.clear_ready();
                match tokio::time::timeout(SETTLE, readiness.readable()).await {
                    Ok(Ok(next)) => guard = next,
                    _ => break,
                }
            }
            tracing::info!("the rules directory changed; reloading");
            // Errors are logged and kept for `status` by `reload`.
            let _ = controller.reload().await;
        }
    });
    Ok(())
}

/// The inotify instance, as tokio's `AsyncFd` wants it.
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}
