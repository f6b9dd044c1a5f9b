//! The daemon's control socket: one JSON request per line, one JSON response
//! per line. Only root may connect (checked with `SO_PEERCRED`).
//!
//! A session opened on a connection is tied to it: when `enforcer run`
//! closes the session (or its connection drops), the daemon keeps enforcing
//! until the session's cgroup is empty, then removes it.

use std::{
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::controller::{Controller, Grant, Status};

pub const DEFAULT_SOCKET: &str = "/run/enforcer/control.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    OpenSession {
        profile: String,
        audit: bool,
        /// The user the agent will run as (`~` in file rules is their home).
        uid: u32,
        /// Start even if the profile's file rules cannot be enforced.
        allow_degraded: bool,
    },
    CloseSession,
    Status,
    /// Load the rules directory again (as SIGHUP does).
    Reload,
    /// Stop the daemon; with `unload`, remove enforcement too.
    Stop {
        unload: bool,
        force: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Session(Grant),
    Closed,
    Status(Box<Status>),
    /// What the reload put in force.
    Reloaded(String),
    Stopped,
    Error(String),
}

/// Bind the socket, refusing if another daemon already answers on it.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if UnixStream::connect(path).await.is_ok() {
        bail!(
            "another enforcer daemon is already listening on {}",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, controller: Controller) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let controller = controller.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, controller).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
            Err(e) => tracing::error!("accepting on the control socket: {e}"),
        }
    }
}

async fn handle(stream: UnixStream, controller: Controller) -> Result<()> {
    let peer = stream
        .peer_cred()
        .context("reading the peer's credentials")?;
    let (read, mut write) = stream.into_split();
    if peer.uid() != 0 {
        let reply = Response::Error(format!(
            "the control socket accepts only root (you are uid {})",
            peer.uid()
        ));
        write.write_all(&encode(&reply)?).await?;
        return Ok(());
    }
    let mut lines = BufReader::new(read).lines();
    let mut session: Option<u64> = None;
    let result = async {
        while let Some(line) = lines.next_line().await? {
            let reply = match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::Error(format!("bad request: {e}")),
                Ok(Request::Status) => Response::Status(Box::new(controller.status())),
                Ok(Request::Stop { unload, force }) => {
                    let unloaded = if unload {
                        let c = controller.clone();
                        tokio::task::spawn_blocking(move || c.unload(force)).await?
                    } else {
                        Ok(())
                    };
                    match unloaded {
                        Ok(()) => {
                            controller.request_stop();
                            Response::Stopped
                        }
                        Err(e) => Response::Error(format!("{e:#}")),
                    }
                }
                Ok(Request::Reload) => match controller.reload().await {
                    Ok(summary) => Response::Reloaded(summary),
                    Err(e) => Response::Error(format!("{e:#}")),
                },
                Ok(Request::OpenSession { .. }) if session.is_some() => {
                    Response::Error("this connection already has a session".into())
                }
                Ok(Request::OpenSession {
                    profile,
                    audit,
                    uid,
                    allow_degraded,
                }) => match controller.open_session(&profile, audit, uid, allow_degraded) {
                    Ok(grant) => {
                        session = Some(grant.cgroup_id);
                        Response::Session(grant)
                    }
                    Err(e) => Response::Error(format!("{e:#}")),
                },
                Ok(Request::CloseSession) => match session.take() {
                    Some(id) => {
                        let c = controller.clone();
                        match tokio::task::spawn_blocking(move || c.close_session(id, false))
                            .await?
                        {
                            Ok(()) => Response::Closed,
                            Err(e) => Response::Error(format!("{e:#}")),
                        }
                    }
                    None => Response::Error("no session is open on this connection".into()),
                },
            };
            write.write_all(&encode(&reply)?).await?;
        }
        anyhow::Ok(())
    }
    .await;
    // The client went away with its session open: keep enforcing until the
    // cgroup empties (the sweeper ends it).
    if let Some(id) = session {
        controller.close_session(id, false)?;
    }
    result
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    Ok(line)
}

/// A connection to the daemon.
pub struct Client {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
    path: PathBuf,
}

impl Client {
    /// `Ok(None)` when no daemon listens there.
    pub async fn connect(path: &Path) -> Result<Option<Client>> {
        match UnixStream::connect(path).await {
            Ok(stream) => {
                let (read, write) = stream.into_split();
                Ok(Some(Client {
                    lines: BufReader::new(read).lines(),
                    write,
                    path: path.to_owned(),
                }))
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                Ok(None)
            }
            Err(e) => {
                Err(e).with_context(|| format!("connecting to the daemon at {}", path.display()))
            }
        }
    }

    pub async fn request(&mut self, request: &Request) -> Result<Response> {
        self.write.write_all(&encode(request)?).await?;
        let line = self.lines.next_line().await?.with_context(|| {
            format!(
                "the daemon at {} closed the connection",
                self.path.display()
            )
        })?;
        serde_json::from_str(&line).context("reading the daemon's reply")
    }
}
