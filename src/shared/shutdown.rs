//! Stop coordination: one [`Shutdown`] shared by every thread.
//!
//! A stop has two stages. `stopping`: the poller stops taking tasks and the scheduler hands back what
//! it holds; dispatch calls in flight go on. `closing`: set by the supervisor once the workers are
//! done (or the grace period is over), it ends the callback server. Threads that wait use
//! [`Shutdown::sleep`], which a stop interrupts, so no wait outlives a stop by more than a poll
//! interval. The signal thread (`qsys-signal`) turns SIGTERM/SIGINT into a stop and a second one into
//! an immediate exit.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sync::{wait_while, Locked};

#[derive(Debug, Default)]
struct Flags {
    stopping: Option<Instant>,
    closing: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    flags: Mutex<Flags>,
    wake: Condvar,
}

impl Shutdown {
    pub(crate) fn new() -> Shutdown {
        Shutdown::default()
    }

    fn flags(&self) -> MutexGuard<'_, Flags> {
        self.flags.locked()
    }

    /// Begins a graceful stop. Returns false if one had already begun.
    pub(crate) fn stop(&self) -> bool {
        let mut f = self.flags();
        let first = f.stopping.is_none();
        if first {
            f.stopping = Some(Instant::now());
        }
        self.wake.notify_all();
        first
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.flags().stopping.is_some()
    }

    /// When the stop began.
    pub(crate) fn stopping_since(&self) -> Option<Instant> {
        self.flags().stopping
    }

    /// Ends the last stage: the callback server closes.
    pub(crate) fn close(&self) {
        let mut f = self.flags();
        f.closing = true;
        f.stopping.get_or_insert_with(Instant::now);
        self.wake.notify_all();
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.flags().closing
    }

    /// Sleeps for `d` or until a stop begins. Returns true if stopping.
    pub(crate) fn sleep(&self, d: Duration) -> bool {
        wait_while(&self.wake, self.flags(), d, |f| f.stopping.is_none())
            .stopping
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stop_interrupts_sleep() {
        let s = Arc::new(Shutdown::new());
        let s2 = Arc::clone(&s);
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let stopped = s2.sleep(Duration::from_secs(30));
            (stopped, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.stop());
        assert!(!s.stop(), "second stop reports it was not the first");
        let (stopped, took) = t.join().expect("sleeper");
        assert!(stopped && took < Duration::from_secs(5));
        assert!(!s.sleep(Duration::ZERO) || s.is_stopping());
    }

    #[test]
    fn sleep_times_out_without_stop() {
        let s = Shutdown::new();
        assert!(!s.sleep(Duration::from_millis(10)));
        assert!(!s.is_closing());
        s.close();
        assert!(s.is_closing() && s.is_stopping());
    }
}
