//! systemd notifications (`Type=notify`): `READY=1` once Redis, MySQL and the listener are up,
//! `STATUS=` with slot use, `WATCHDOG=1` while every thread lives, `STOPPING=1` at a stop.
//!
//! Called from the supervisor (main thread) and the signal thread. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op, so tests and terminals need nothing special. A failed
//! notification is logged and otherwise ignored: it must never take the daemon down.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!(error:% = e; "sd_notify failed");
    }
}

pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` with the `MONOTONIC_USEC` that `Type=notify-reload` expects; `READY=1` follows.
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub(crate) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

pub(crate) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// How often to send `WATCHDOG=1`: half of systemd's `WatchdogSec`, or never.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
