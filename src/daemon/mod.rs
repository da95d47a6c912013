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

pub(crate) mod notify;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use crate::config::Config;
use crate::contract::token::Signer;
use crate::fleet::{GpuView, SlotMatrix};
use crate::sched::scheduler::GpuJob;
use crate::sched::scheduler::Scheduler;
use crate::shared::Shared;
use crate::store::{Store, StoreError};
use crate::sync::Locked;
use crate::work::poller::Poller;

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

/// Sends the thread's name when dropped: at a normal return and during a panic's unwinding alike.
struct ExitGuard {
    name: String,
    done: Sender<String>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!(thread = self.name.as_str(); "thread panicked");
        }
        let _ = self.done.send(self.name.clone());
    }
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
}

/// The dispatch workers, which a reload may grow (never shrink: an idle worker costs nothing):
/// every response-mode slot must have a thread of its own ([`Config::dispatch_workers`]).
struct DispatchPool {
    jobs: Receiver<GpuJob>,
    agents: Arc<crate::net::http::Agents>,
    done: Sender<String>,
    count: usize,
    /// Started since the supervisor last looked; it adopts them.
    started: Vec<(String, JoinHandle<()>)>,
}

impl DispatchPool {
    /// Starts workers until there are `want`.
    fn grow_to(&mut self, shared: &Arc<Shared>, want: usize) -> Result<(), StartError> {
        while self.count < want {
            let (s, rx, a) = (
                Arc::clone(shared),
                self.jobs.clone(),
                Arc::clone(&self.agents),
            );
            spawn(
                &mut self.started,
                &self.done,
                format!("qsys-dispatch-{}", self.count),
                move || crate::work::dispatch::run_worker(s, rx, a),
            )?;
            self.count += 1;
        }
        Ok(())
    }
}

fn spawn(
    threads: &mut Vec<(String, JoinHandle<()>)>,
    done: &Sender<String>,
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), StartError> {
    let guard = ExitGuard {
        name: name.clone(),
        done: done.clone(),
    };
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let _guard = guard;
            f();
        })
        .map_err(|source| StartError::Thread {
            name: name.clone(),
            source,
        })?;
    threads.push((name, handle));
    Ok(())
}

/// Without a systemd watchdog, how long a loop may go without progress before it is reported.
pub(crate) const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Threads serving the callback listener.
const CALLBACK_THREADS: usize = 4;

/// Threads that must be gone before the callback and admin servers close.
fn is_worker(name: &str) -> bool {
    !name.starts_with("qsys-callback")
        && !matches!(
            name,
            "qsys-maintenance" | "qsys-heartbeat" | "qsys-admin" | "qsys-slotpub" | "qsys-slotsub"
        )
}

impl Daemon {
    /// Connects, migrates, binds and starts every thread.
    pub fn start(config: Config) -> Result<Daemon, StartError> {
        let c = &config;
        let store = Store::connect(
            &c.mysql.url,
            c.mysql.tls,
            &c.daemon.instance_id,
            // Handler workers hold a connection per task; the poller, scheduler, callback writer,
            // maintenance and admin threads one each; dispatch workers only to record a failure or
            // a response-mode result, briefly. Few connections keep the server's prepared
            // statements (each connection caches its own) well under its limit.
            c.daemon.handler_threads + 16,
        )?;
        let version = store.migrate()?;
        let gpus: Vec<(String, usize)> = c.gpus.iter().map(|g| (g.id.clone(), g.slots)).collect();
        store.ensure_slots(&gpus)?;

        let client = redis::Client::open(c.redis.url.as_str())?;
        {
            let mut conn = crate::work::poller::connect(&client, c.redis.pop_timeout)
                .map_err(|crate::work::poller::QueueError::Redis(e)| e)?;
            redis::cmd("PING").query::<String>(&mut conn)?;
        }

        crate::net::server::raise_fd_limit();
        let server =
            crate::net::server::bind(c.callback.listen, c.callback.max_body).map_err(|e| {
                StartError::Listen {
                    addr: c.callback.listen,
                    reason: e.to_string(),
                }
            })?;
        let callback_addr = server
            .server_addr()
            .to_ip()
            .expect("an http server on an IP address has an IP address");
        let admin_server = crate::net::server::bind(c.admin.listen, crate::admin::MAX_BODY)
            .map_err(|e| StartError::Listen {
                addr: c.admin.listen,
                reason: e.to_string(),
            })?;
        let admin_addr = admin_server
            .server_addr()
            .to_ip()
            .expect("an http server on an IP address has an IP address");
        let public_url = c
            .callback
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{callback_addr}/callback"));

        // Handler attempts this instance was running died with its previous run. (What it had
        // moved to its in-hand lists is taken again by the poller when it connects.)
        let orphans = store.expire_orphaned_handlers()?;
        store.heartbeat()?;
        if orphans > 0 {
            log::info!(count = orphans; "handler attempts of the previous run will be retried");
        }

        // The slot matrix starts as MySQL says: attempts awaiting callbacks keep their slots.
        let mut matrix = SlotMatrix::new(&c.gpus);
        for held in store.held_slots()? {
            if !matrix.hold(
                &held.gpu_id,
                held.slot_index,
                held.task_id.clone(),
                held.attempt,
            ) {
                log::warn!(gpu = held.gpu_id.as_str(), slot = held.slot_index,
                    task_id = held.task_id.as_str();
                    "held slot of an unconfigured gpu or slot; ignored");
            }
        }
        matrix.set_drained(&store.drained()?);
        log::info!(instance = c.daemon.instance_id.as_str(), schema = version,
            gpus = c.gpus.len(), slots = matrix.total(), busy = matrix.busy(),
            callback:% = callback_addr, admin:% = admin_addr; "qsysd starting");

        let (events_tx, events_rx) = unbounded();
        let (slot_tx, slot_rx) = unbounded();
        let shared = Arc::new(Shared {
            signer: Signer::new(c.callback.secret.clone(), public_url),
            slots: Mutex::new(matrix),
            store,
            stop: crate::shared::shutdown::Shutdown::new(),
            events: events_tx,
            children: Mutex::new(Default::default()),
            in_transit: Mutex::new(Default::default()),
            problems: Mutex::new(Default::default()),
            config: RwLock::new(Arc::new(config)),
            reload_requested: AtomicBool::new(false),
            progress: Mutex::new(Default::default()),
            queue_depths: Mutex::new(Vec::new()),
            metrics: Default::default(),
            slot_events: slot_tx,
            // Until the first check: publishing to nobody is harmless, staying silent is not.
            peers: AtomicBool::new(true),
        });
        let cfg = shared.config();

        let (done_tx, done_rx) = unbounded();
        let mut threads = Vec::new();
        // A rendezvous: the poller hands over a batch only when the scheduler has room for it.
        let (task_tx, task_rx) = bounded(0);
        // Jobs never outnumber claimed slots; unbounded because a reload may add slots.
        let (gpu_tx, gpu_rx) = unbounded();
        let (handler_tx, handler_rx) = bounded(0);

        let mut dispatch = DispatchPool {
            jobs: gpu_rx,
            agents: Arc::new(crate::net::http::Agents::default()),
            done: done_tx.clone(),
            count: 0,
            started: Vec::new(),
        };
        dispatch.grow_to(&shared, cfg.dispatch_workers())?;
        threads.append(&mut dispatch.started);
        for i in 0..cfg.daemon.handler_threads {
            let (s, rx) = (Arc::clone(&shared), handler_rx.clone());
            spawn(
                &mut threads,
                &done_tx,
                format!("qsys-handler-{i}"),
                move || crate::work::handlers::run_worker(s, rx),
            )?;
        }
        let mut scheduler = Scheduler::new(
            Arc::clone(&shared),
            task_rx,
            events_rx,
            gpu_tx,
            handler_tx,
            client.clone(),
        );
        let resumed = scheduler.resume()?;
        if resumed > 0 {
            log::info!(count = resumed; "resuming pending tasks held before the restart");
        }
        spawn(&mut threads, &done_tx, "qsys-scheduler".into(), move || {
            scheduler.run()
        })?;
        let poller = Poller::new(Arc::clone(&shared), client.clone(), task_tx);
        spawn(&mut threads, &done_tx, "qsys-poller".into(), move || {
            poller.run()
        })?;
        let server = Arc::new(server);
        // Bounded: when MySQL is slow the callback threads wait here, and the fleet's callers
        // wait on their open requests, rather than the backlog growing in memory.
        let (verified_tx, verified_rx) = bounded(1024);
        for i in 0..CALLBACK_THREADS {
            let (s, srv, w) = (
                Arc::clone(&shared),
                Arc::clone(&server),
                verified_tx.clone(),
            );
            spawn(
                &mut threads,
                &done_tx,
                format!("qsys-callback-{i}"),
                move || crate::work::callback::serve(s, srv, w),
            )?;
        }
        drop(verified_tx);
        let s = Arc::clone(&shared);
        spawn(
            &mut threads,
            &done_tx,
            "qsys-callback-writer".into(),
            move || crate::work::callback::run_writer(s, verified_rx),
        )?;
        let (s, cl) = (Arc::clone(&shared), client.clone());
        spawn(&mut threads, &done_tx, "qsys-slotpub".into(), move || {
            crate::sched::slotsync::run_publisher(s, cl, slot_rx)
        })?;
        let (s, cl) = (Arc::clone(&shared), client.clone());
        spawn(&mut threads, &done_tx, "qsys-slotsub".into(), move || {
            crate::sched::slotsync::run_subscriber(s, cl)
        })?;
        let (s, cl) = (Arc::clone(&shared), client.clone());
        spawn(&mut threads, &done_tx, "qsys-admin".into(), move || {
            crate::admin::serve(s, admin_server, cl)
        })?;
        let s = Arc::clone(&shared);
        spawn(
            &mut threads,
            &done_tx,
            "qsys-maintenance".into(),
            move || crate::work::maintenance::run(s, client),
        )?;
        let s = Arc::clone(&shared);
        spawn(&mut threads, &done_tx, "qsys-heartbeat".into(), move || {
            crate::work::maintenance::run_heartbeat(s)
        })?;

        let daemon = Daemon {
            shared,
            config_path: None,
            callback_addr,
            admin_addr,
            done: done_rx,
            threads,
            dispatch: Mutex::new(dispatch),
        };
        crate::daemon::notify::ready(&daemon.shared.status_line());
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
        shared.slots().reconfigure(&new.gpus);
        log::set_max_level(new.daemon.log_level);
        log::info!(gpus = new.gpus.len(), slots = new.total_slots(); "configuration reloaded");
        shared.set_config(new);
        shared.wake_scheduler();
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
                let stalled = shared.stalled(watchdog.map_or(STALL_LIMIT, |w| w * 2));
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

/// Begins a graceful stop (once) and tells systemd. False if a stop had already begun.
fn begin_stop(shared: &Shared, signal: Option<i32>) -> bool {
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
fn spawn_signal_thread(shared: Arc<Shared>) -> std::io::Result<JoinHandle<()>> {
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
