//! The signal thread (`qsys-signal`) and the one way a stop begins.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::shared::Shared;

/// Begins a graceful stop (once) and tells systemd. False if a stop had already begun.
pub(super) fn begin_stop(shared: &Shared, signal: Option<i32>) -> bool {
    if !shared.stop.stop() {
        return false;
    }
    crate::daemon::notify::stopping();
    match signal {
        Some(signal) => log::info!(signal; "stop requested; finishing calls in flight"),
        None => log::info!("stopping: no new tasks are taken"),
    }
    true
}

/// Starts `qsys-signal`: SIGHUP asks for a reload, SIGTERM/SIGINT begin a graceful stop, a second
/// one exits at once (status 130) after killing exec handlers.
pub(super) fn spawn_signal_thread(shared: Arc<Shared>) -> std::io::Result<JoinHandle<()>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("qsys-signal".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    log::info!("reload requested");
                    shared.reload_requested.store(true, Ordering::SeqCst);
                    continue;
                }
                if !begin_stop(&shared, Some(sig)) {
                    log::warn!(signal = sig; "second stop signal: exiting now");
                    shared.kill_children();
                    std::process::exit(130);
                }
            }
        })
}
