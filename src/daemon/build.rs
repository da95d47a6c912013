//! Building the daemon's pieces before any thread starts: MySQL connected and migrated, Redis
//! answering, both listeners bound, the previous run's handler attempts expired and the slot
//! matrix rebuilt from MySQL. A failure here leaves nothing running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tiny_http::Server;

use super::StartError;
use crate::config::{Config, TlsFiles};
use crate::fleet::SlotMatrix;
use crate::net::tls::Renewable;
use crate::store::Store;

/// What the shared state is made of.
pub(super) struct Built {
    pub(super) store: Store,
    pub(super) matrix: SlotMatrix,
    pub(super) io: Io,
}

/// What the threads are started with: the Redis client and the bound listeners (and the
/// certificates of those that serve TLS, which a reload renews).
pub(super) struct Io {
    pub(super) certs: Vec<Arc<Renewable>>,
    pub(super) client: redis::Client,
    pub(super) callback: Server,
    pub(super) admin: Server,
    pub(super) callback_addr: SocketAddr,
    pub(super) admin_addr: SocketAddr,
}

pub(super) fn build(c: &Config) -> Result<Built, StartError> {
    let (store, version) = connect_store(c)?;
    let client = connect_redis(c)?;
    crate::net::server::raise_fd_limit();
    let mut certs = Vec::new();
    let (callback, callback_addr) = listen(
        c.callback.listen,
        c.callback.max_body,
        c.callback.tls.as_ref(),
        &mut certs,
    )?;
    let (admin, admin_addr) = listen(
        c.admin.listen,
        crate::admin::MAX_BODY,
        c.admin.tls.as_ref(),
        &mut certs,
    )?;
    // Handler attempts this instance was running died with its previous run. (What it had moved
    // to its in-hand lists is taken again by the poller when it connects.)
    let orphans = store.expire_orphaned_handlers()?;
    store.heartbeat()?;
    if orphans > 0 {
        log::info!(count = orphans; "handler attempts of the previous run will be retried");
    }
    let matrix = rebuild_matrix(c, &store)?;
    log::info!(instance = c.daemon.instance_id.as_str(), schema = version,
        gpus = c.gpus.len(), slots = matrix.total(), busy = matrix.busy(),
        callback:% = callback_addr, admin:% = admin_addr; "qsysd starting");
    Ok(Built {
        store,
        matrix,
        io: Io {
            certs,
            client,
            callback,
            admin,
            callback_addr,
            admin_addr,
        },
    })
}

/// The store, migrated, with a slot row for every configured slot; and the schema version.
fn connect_store(c: &Config) -> Result<(Store, u32), StartError> {
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
    Ok((store, version))
}

/// A Redis client whose server answered a `PING`.
fn connect_redis(c: &Config) -> Result<redis::Client, StartError> {
    let client = redis::Client::open(c.redis.url.as_str())?;
    let mut conn = crate::net::redis::connect(
        &client,
        crate::net::redis::Timeouts::reading(c.redis.pop_timeout + Duration::from_secs(10)),
    )?;
    redis::cmd("PING").query::<String>(&mut conn)?;
    Ok(client)
}

/// A listener on `addr` with its limits, over TLS when `tls` is set (its certificate joins
/// `certs`), and the address it got (port 0 picks one).
fn listen(
    addr: SocketAddr,
    max_body: usize,
    tls: Option<&TlsFiles>,
    certs: &mut Vec<Arc<Renewable>>,
) -> Result<(Server, SocketAddr), StartError> {
    let listen_error = |reason: String| StartError::Listen { addr, reason };
    let cert = tls.map(Renewable::load).transpose().map_err(listen_error)?;
    let server = crate::net::server::bind(addr, max_body, cert.as_ref())
        .map_err(|e| listen_error(e.to_string()))?;
    certs.extend(cert);
    let bound = server
        .server_addr()
        .to_ip()
        .expect("an http server on an IP address has an IP address");
    Ok((server, bound))
}

/// The slot matrix as MySQL says: attempts awaiting callbacks keep their slots, drained GPUs stay
/// drained, learned speeds are kept.
fn rebuild_matrix(c: &Config, store: &Store) -> Result<SlotMatrix, StartError> {
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
    matrix.reseed(&store.speeds()?);
    Ok(matrix)
}
