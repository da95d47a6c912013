//! Start-up and supervision: connects to MySQL and Redis, binds the callback listener, rebuilds the
//! slot matrix from MySQL, starts every thread, and joins them all.
//!
//! Runs on the main thread. Each worker thread is named (`qsys-poller`, `qsys-scheduler`,
//! `qsys-dispatch-N`, `qsys-handler-N`, `qsys-callback`) and reports its end on a channel through a
//! guard that also fires on panic. A thread that ends while the daemon is not stopping is a failure:
//! the supervisor stops the others and [`Daemon::wait`] returns an error, so the binary exits
//! non-zero and systemd restarts it.
//!
//! Stop order: the poller and scheduler end first (tasks in hand go back to Redis), then dispatch and
//! handler workers finish what they were given, then the callback server closes. Whatever is still
//! running when the grace period ends is abandoned (its row stays `processing`; exec handlers are
//! killed) and `wait` returns.

mod build;
pub(crate) mod notify;
mod signals;
mod threads;

use signals::{begin_stop, spawn_signal_thread};
use threads::{is_worker, DispatchPool};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};

use crate::config::Config;
use crate::contract::token::Signer;
use crate::fleet::GpuView;
use crate::net::tls::Renewable;
use crate::shared::Shared;
use crate::store::StoreError;
use crate::sync::{Locked, ReadWrite};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("mysql: {0}")]
    Mysql(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("cannot start thread {name}: {source}")]
    Thread {
        name: String,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("thread {0} ended unexpectedly")]
    ThreadDied(String),
}

/// A running daemon.
pub struct Daemon {
    shared: Arc<Shared>,
    /// Where SIGHUP re-reads the configuration from.
    config_path: Option<PathBuf>,
    callback_addr: SocketAddr,
    admin_addr: SocketAddr,
    done: Receiver<String>,
    threads: Vec<(String, JoinHandle<()>)>,
    dispatch: Mutex<DispatchPool>,
    /// The certificates of the listeners that serve TLS: a reload reads their files again.
    certs: Vec<Arc<Renewable>>,
}

impl Daemon {
    /// Builds every piece (connections, schema, listeners, the slot matrix), then starts every
    /// thread.
    pub fn start(config: Config) -> Result<Daemon, StartError> {
        let build::Built { store, matrix, io } = build::build(&config)?;
        let public_url = config.callback.public_url.clone().unwrap_or_else(|| {
            let scheme = if config.callback.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}/callback", io.callback_addr)
        });
        let signer = Signer::new(config.callback.secret.clone(), public_url);
        let (callback_addr, admin_addr) = (io.callback_addr, io.admin_addr);
        let certs = io.certs.clone();
        // Paused queues and types are in force from the first take, not a second later.
        let paused = store.paused()?;
        let (shared, events, slot_events) = Shared::new(config, store, matrix, signer);
        *shared.paused.writing() = paused;
        let shared = Arc::new(shared);
        let (done_tx, done) = unbounded();
        let (threads, dispatch) = threads::start_all(&shared, io, events, slot_events, &done_tx)?;
        let daemon = Daemon {
            shared,
            config_path: None,
            callback_addr,
            admin_addr,
            done,
            threads,
            dispatch: Mutex::new(dispatch),
            certs,
        };
        notify::ready(&daemon.shared.status_line());
        Ok(daemon)
    }

    /// Where the callback server listens (useful with port 0).
    pub fn callback_addr(&self) -> SocketAddr {
        self.callback_addr
    }

    /// Where the admin server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Every GPU's row of the slot matrix as it is now.
    pub fn slots(&self) -> Vec<GpuView> {
        self.shared.slots().view()
    }

    /// Slots held now, over every GPU.
    pub fn busy_slots(&self) -> usize {
        self.shared.slots().busy()
    }

    /// Whether this instance knows of another live one (checked every second): until it does, it
    /// publishes no slot events, and peers learn of its slots from MySQL's resync.
    pub fn sees_peers(&self) -> bool {
        self.shared.peers.load(Ordering::Relaxed)
    }

    /// Callbacks applied since start.
    pub fn callbacks_applied(&self) -> u64 {
        self.shared.metrics.callbacks.get("applied")
    }

    /// Starts the signal thread (`qsys-signal`): SIGTERM and SIGINT begin a graceful stop, SIGHUP
    /// asks for a reload.
    pub fn handle_signals(&self) -> std::io::Result<JoinHandle<()>> {
        spawn_signal_thread(Arc::clone(&self.shared))
    }

    /// Makes SIGHUP re-read the configuration from `path`.
    pub fn reload_from(&mut self, path: PathBuf) {
        self.config_path = Some(path);
    }

    /// Re-reads the config file (SIGHUP) with `RELOADING=1` ... `READY=1`. An invalid file is
    /// refused and logged; the old config stays.
    fn reload(&self) {
        let Some(path) = &self.config_path else {
            log::warn!("reload requested but the daemon has no config file to read");
            return;
        };
        crate::daemon::notify::reloading();
        match crate::config::Config::load(path, &crate::config::process_env()) {
            Ok(new) => self.apply_config(new),
            Err(e) => log::error!(error:% = e; "reload refused: the old configuration stays"),
        }
        crate::daemon::notify::ready(&self.shared.status_line());
    }

    /// Puts a new configuration in force without touching work in flight: GPUs, slot counts,
    /// handlers, timeouts, retry and health settings and the log level change; a removed GPU and
    /// slots beyond a lowered count drain. What needs a restart is kept as it was, with a warning.
    pub fn apply_config(&self, mut new: crate::config::Config) {
        let shared = &self.shared;
        let old = shared.config();
        for key in new.keep_fixed(&old) {
            log::warn!(key; "changed in the config file; takes effect at the next restart");
        }
        let gpus: Vec<(String, usize)> = new.gpus.iter().map(|g| (g.id.clone(), g.slots)).collect();
        if let Err(e) = shared.store.ensure_slots(&gpus) {
            log::error!(error:% = e; "reload refused: cannot create slot rows");
            return;
        }
        {
            let mut pool = self.dispatch.locked();
            if let Err(e) = pool.grow_to(shared, new.dispatch_workers()) {
                log::error!(error:% = e; "reload refused: cannot start dispatch workers");
                return;
            }
        }
        self.renew_certificates();
        shared.slots().reconfigure(&new.gpus);
        log::set_max_level(new.daemon.log_level);
        log::info!(gpus = new.gpus.len(), slots = new.total_slots(); "configuration reloaded");
        shared.set_config(new);
        shared.wake_scheduler();
    }

    /// Reads the TLS listeners' certificate files again (renewed certificates take effect from
    /// the next handshake); a file that does not load leaves its listener's certificate as it was.
    fn renew_certificates(&self) {
        for cert in &self.certs {
            match cert.renew() {
                Ok(()) => log::info!(cert:% = cert.cert_path(); "tls certificate reloaded"),
                Err(e) => log::error!(cert:% = cert.cert_path(), error = e.as_str();
                    "tls certificate not reloaded: the one in use stays"),
            }
        }
    }

    /// Begins a graceful stop.
    pub fn stop(&self) {
        begin_stop(&self.shared, None);
    }

    /// Blocks until every thread has ended (or the grace period after a stop ran out).
    pub fn wait(mut self) -> Result<(), RunError> {
        let shared = &self.shared;
        let grace = shared.config().daemon.shutdown_grace;
        let mut threads = std::mem::take(&mut self.threads);
        let mut live: BTreeSet<String> = threads.iter().map(|(n, _)| n.clone()).collect();
        let mut failure: Option<String> = None;
        let watchdog = crate::daemon::notify::watchdog_interval();
        let mut last_ping: Option<Instant> = None;
        while !live.is_empty() {
            if shared.reload_requested.swap(false, Ordering::SeqCst) && !shared.stop.is_stopping() {
                self.reload();
            }
            for (name, handle) in self.dispatch.locked().started.drain(..) {
                live.insert(name.clone());
                threads.push((name, handle));
            }
            // The watchdog is fed only while every thread lives, so a dead thread that somehow
            // did not stop us still gets us restarted.
            let every = watchdog.unwrap_or(Duration::from_secs(2));
            if last_ping.is_none_or(|t| t.elapsed() >= every) {
                last_ping = Some(Instant::now());
                // A loop that has not gone round for a whole watchdog period is stuck: let
                // systemd's watchdog restart us.
                let stalled =
                    shared.stalled(watchdog.map_or(crate::shared::STALL_LIMIT, |w| w * 2));
                if !stalled.is_empty() {
                    log::error!(threads:? = stalled; "threads made no progress; watchdog not fed");
                } else if watchdog.is_some() && failure.is_none() {
                    crate::daemon::notify::watchdog();
                }
                if !shared.stop.is_stopping() {
                    crate::daemon::notify::status(&shared.status_line());
                }
            }
            if !live.iter().any(|n| is_worker(n)) && !shared.stop.is_closing() {
                shared.stop.close();
            }
            if let Some(since) = shared.stop.stopping_since() {
                if since.elapsed() >= grace {
                    log::warn!(threads:? = live; "grace period over; abandoning threads still busy");
                    shared.kill_children();
                    break;
                }
            }
            match self.done.recv_timeout(Duration::from_millis(100)) {
                Ok(name) => {
                    live.remove(&name);
                    if !shared.stop.is_stopping() {
                        log::error!(thread = name.as_str(); "thread ended unexpectedly; stopping");
                        failure.get_or_insert(name);
                        begin_stop(shared, None);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        shared.stop.close();
        for (name, handle) in threads {
            if !live.contains(&name) {
                let _ = handle.join();
            }
        }
        log::info!("qsysd stopped");
        match failure {
            Some(name) => Err(RunError::ThreadDied(name)),
            None => Ok(()),
        }
    }
}
