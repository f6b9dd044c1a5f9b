//! Talking to systemd when run as `enforcer.service` (`Type=notify`):
//! READY, RELOADING and STOPPING notifications and watchdog pings over
//! `$NOTIFY_SOCKET`. Outside systemd (no `$NOTIFY_SOCKET`) all of this does
//! nothing.

use std::{os::unix::net::UnixDatagram, time::Duration};

/// Send `fields` (`KEY=VALUE`) to systemd, if it is listening.
pub fn notify(fields: &[&str]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let message = fields.join("\n");
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket address.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!("notifying systemd ({}): {e}", path.to_string_lossy());
    }
}

/// RELOADING=1 with the monotonic time, as `Type=notify-reload` wants.
pub fn notify_reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let usec = ts.tv_sec * 1_000_000 + ts.tv_nsec / 1_000;
    notify(&["RELOADING=1", &format!("MONOTONIC_USEC={usec}")]);
}

/// Ping systemd's watchdog at half its interval (`$WATCHDOG_USEC`), for as
/// long as the runtime keeps running tasks: a wedged runtime stops the
/// pings and systemd restarts the service.
pub fn spawn_watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|u| *u > 0)
    else {
        return;
    };
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        loop {
            notify(&["WATCHDOG=1"]);
            tokio::time::sleep(every).await;
        }
    });
}
