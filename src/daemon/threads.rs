//! Starting the daemon's threads: each is named and reports its end, normal or by panic, on the
//! supervisor's channel; the dispatch pool may grow on a reload.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use tiny_http::Server;

use super::build::Io;
use super::StartError;
use crate::contract::slot_event::SlotEvent;
use crate::sched::scheduler::Scheduler;
use crate::shared::{Event, GpuJob, Shared};
use crate::sync::Locked;
use crate::work::poller::Poller;

/// A started thread, by name.
pub(super) type Thread = (String, JoinHandle<()>);

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

/// The dispatch workers, which a reload may grow (never shrink: an idle worker costs nothing):
/// every response-mode slot must have a thread of its own ([`crate::config::Config::dispatch_workers`]).
pub(super) struct DispatchPool {
    pub(super) jobs: Receiver<GpuJob>,
    pub(super) agents: Arc<crate::net::http::Agents>,
    pub(super) done: Sender<String>,
    pub(super) count: usize,
    /// Started since the supervisor last looked; it adopts them.
    pub(super) started: Vec<Thread>,
}

impl DispatchPool {
    /// Starts workers until there are `want`.
    pub(super) fn grow_to(&mut self, shared: &Arc<Shared>, want: usize) -> Result<(), StartError> {
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

pub(super) fn spawn(
    threads: &mut Vec<Thread>,
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

/// Threads serving the callback listener.
pub(super) const CALLBACK_THREADS: usize = 4;

/// Threads that must be gone before the callback and admin servers close.
pub(super) fn is_worker(name: &str) -> bool {
    !name.starts_with("qsys-callback")
        && !matches!(
            name,
            "qsys-maintenance"
                | "qsys-heartbeat"
                | "qsys-admin"
                | "qsys-slotpub"
                | "qsys-slotsub"
                | "qsys-canceller"
                | "qsys-retention"
        )
}

/// Every thread of a daemon, started in dependency order (consumers before producers), with the
/// dispatch pool that a reload may grow.
pub(super) fn start_all(
    shared: &Arc<Shared>,
    io: Io,
    events: Receiver<Event>,
    slot_events: Receiver<SlotEvent>,
    done: &Sender<String>,
) -> Result<(Vec<Thread>, DispatchPool), StartError> {
    let mut threads = Vec::new();
    let dispatch = start_task_flow(shared, &io.client, events, done, &mut threads)?;
    start_callback_servers(shared, io.callback, done, &mut threads)?;
    let mut start =
        |name: &str, f: Box<dyn FnOnce() + Send>| spawn(&mut threads, done, name.to_string(), f);
    let (s, cl) = (Arc::clone(shared), io.client.clone());
    start(
        "qsys-slotpub",
        Box::new(move || crate::sched::slotsync::run_publisher(s, cl, slot_events)),
    )?;
    let (s, cl) = (Arc::clone(shared), io.client.clone());
    start(
        "qsys-slotsub",
        Box::new(move || crate::sched::slotsync::run_subscriber(s, cl)),
    )?;
    let (s, cl, admin) = (Arc::clone(shared), io.client.clone(), io.admin);
    start(
        "qsys-admin",
        Box::new(move || crate::admin::serve(s, admin, cl)),
    )?;
    let (s, cl) = (Arc::clone(shared), io.client);
    start(
        "qsys-maintenance",
        Box::new(move || crate::work::maintenance::run(s, cl)),
    )?;
    let s = Arc::clone(shared);
    start(
        "qsys-retention",
        Box::new(move || crate::work::retention::run(s)),
    )?;
    let s = Arc::clone(shared);
    start(
        "qsys-canceller",
        Box::new(move || crate::work::cancel::run(s)),
    )?;
    let s = Arc::clone(shared);
    start(
        "qsys-heartbeat",
        Box::new(move || crate::work::maintenance::run_heartbeat(s)),
    )?;
    Ok((threads, dispatch))
}

/// The path of a task: dispatch and handler workers, the scheduler (which first resumes what
/// MySQL says this instance held), then the poller that feeds it.
fn start_task_flow(
    shared: &Arc<Shared>,
    client: &redis::Client,
    events: Receiver<Event>,
    done: &Sender<String>,
    threads: &mut Vec<Thread>,
) -> Result<DispatchPool, StartError> {
    // A rendezvous: the poller hands over a batch only when the scheduler has room for it.
    let (task_tx, task_rx) = bounded(0);
    // Jobs never outnumber claimed slots; unbounded because a reload may add slots.
    let (gpu_tx, gpu_rx) = unbounded();
    // Endings that hand their slot over send jobs too, until the scheduler's stop.
    *shared.dispatch.locked() = Some(gpu_tx.clone());
    let (handler_tx, handler_rx) = bounded(0);
    let mut dispatch = DispatchPool {
        jobs: gpu_rx,
        agents: Arc::new(crate::net::http::Agents::default()),
        done: done.clone(),
        count: 0,
        started: Vec::new(),
    };
    dispatch.grow_to(shared, shared.config().dispatch_workers())?;
    threads.append(&mut dispatch.started);
    for i in 0..shared.config().daemon.handler_threads {
        let (s, rx) = (Arc::clone(shared), handler_rx.clone());
        spawn(threads, done, format!("qsys-handler-{i}"), move || {
            crate::work::handlers::run_worker(s, rx)
        })?;
    }
    let mut scheduler = Scheduler::new(
        Arc::clone(shared),
        shared.store.clone(),
        task_rx,
        events,
        gpu_tx,
        handler_tx,
        client.clone(),
    );
    let resumed = scheduler.resume()?;
    if resumed > 0 {
        log::info!(count = resumed; "resuming pending tasks held before the restart");
    }
    spawn(threads, done, "qsys-scheduler".into(), move || {
        scheduler.run()
    })?;
    let poller = Poller::new(Arc::clone(shared), client.clone(), task_tx);
    spawn(threads, done, "qsys-poller".into(), move || poller.run())?;
    Ok(dispatch)
}

/// The callback listener's threads and the writer that ends their attempts in batches.
fn start_callback_servers(
    shared: &Arc<Shared>,
    server: Server,
    done: &Sender<String>,
    threads: &mut Vec<Thread>,
) -> Result<(), StartError> {
    let server = Arc::new(server);
    // Bounded: when MySQL is slow the callback threads wait here, and the fleet's callers wait
    // on their open requests, rather than the backlog growing in memory.
    let (verified_tx, verified_rx) = bounded(1024);
    for i in 0..CALLBACK_THREADS {
        let (s, srv, w) = (Arc::clone(shared), Arc::clone(&server), verified_tx.clone());
        spawn(threads, done, format!("qsys-callback-{i}"), move || {
            crate::work::callback::serve(s, srv, w)
        })?;
    }
    let s = Arc::clone(shared);
    spawn(threads, done, "qsys-callback-writer".into(), move || {
        crate::work::callback::run_writer(s, verified_rx)
    })?;
    Ok(())
}
