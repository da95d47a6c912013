//! The canceller (`qsys-canceller`): stops the running attempts of this instance that an
//! operator cancelled ([`crate::store::Store::cancel`] marks the row from any host; this thread
//! finds the marks every [`TICK`]).
//!
//! - on a GPU with a `cancel_url`: POSTs `{"task_id", "attempt"}` there with the endpoint's
//!   Bearer token; a 2xx ends the attempt (`cancelled`) and frees the slot. Anything else is
//!   tried again every [`RETRY`]; meanwhile the slot stays held until the GPU's callback or the
//!   lease, never freed before the GPU lets go of the task, so a cancel cannot put one task too
//!   many on a GPU;
//! - on a GPU without one: nothing to send; the callback or the lease ends the attempt, and the
//!   task is `cancelled` then;
//! - in an `exec` handler: its id goes into [`Shared::cancels`], which the run checks every few
//!   milliseconds, and the program's process group is killed (a GPU attempt's goes there too: a
//!   dispatch not sent yet is then not sent);
//! - in an `http` handler: the request cannot be recalled, so it is abandoned: the attempt ends
//!   now and the handler's answer, when it comes, changes nothing.
//!
//! Every call is bounded (the MySQL timeouts, [`CANCEL_TIMEOUT`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::{Config, Handler};
use crate::net::http;
use crate::shared::Shared;
use crate::store::{Cancelling, Ending};
use crate::sync::Locked;

/// How often the marks are looked for.
const TICK: Duration = Duration::from_millis(500);
/// How long before a cancel the GPU did not confirm is sent again.
const RETRY: Duration = Duration::from_secs(5);
/// How long before an attempt whose GPU had no `cancel_url` is looked at again: a reload may
/// have given it one.
const RECHECK: Duration = Duration::from_secs(30);
/// The longest a cancel call may take, whatever the endpoint's `request_timeout`: one GPU that
/// does not answer must not hold up the cancels of the others for long.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// When each cancelled attempt may next be acted on: `None` when nothing more can be done here.
type Acted = HashMap<(String, u32), Option<Instant>>;

pub(crate) fn run(shared: Arc<Shared>) {
    let agent = http::agent();
    let mut acted = Acted::new();
    loop {
        shared.tick("qsys-canceller");
        if !shared.problems().contains_key("mysql") {
            round(&shared, &agent, &mut acted);
        }
        if shared.stop.sleep(TICK) {
            break;
        }
    }
    log::debug!("canceller stopped");
}

/// One look at the marks, and what is due for each.
fn round(shared: &Shared, agent: &ureq::Agent, acted: &mut Acted) {
    let marked = match shared.store.cancelling() {
        Ok(m) => m,
        Err(e) => {
            log::warn!(error:% = e; "cannot look for cancelled attempts");
            return;
        }
    };
    let config = shared.config();
    let now = Instant::now();
    for c in &marked {
        let key = (c.task_id.clone(), c.attempt);
        let seen = acted.get(&key);
        if seen.is_some_and(|next| next.is_none_or(|t| now < t)) {
            continue;
        }
        let next = act(shared, agent, &config, c, seen.is_none());
        acted.insert(key, next);
    }
    // What is no longer marked has ended: forget it.
    let live: HashSet<(&str, u32)> = marked
        .iter()
        .map(|c| (c.task_id.as_str(), c.attempt))
        .collect();
    acted.retain(|(id, attempt), _| live.contains(&(id.as_str(), *attempt)));
    shared
        .cancels
        .locked()
        .retain(|(id, attempt)| live.contains(&(id.as_str(), *attempt)));
}

/// Stops one cancelled attempt as its kind allows (`first`: the first time it is looked at);
/// when to try again, if ever.
fn act(
    shared: &Shared,
    agent: &ureq::Agent,
    config: &Config,
    c: &Cancelling,
    first: bool,
) -> Option<Instant> {
    let task_id = c.task_id.as_str();
    let Some(gpu) = &c.gpu_id else {
        let kind = c.kind.as_deref().unwrap_or("");
        if let Some(Handler::Http { .. }) = config.types.get(kind) {
            log::warn!(task_id, attempt = c.attempt; "http handler request abandoned: task cancelled");
            return end(shared, c);
        }
        // An exec run sees this within a tick of its own loop; one that already ended leaves
        // the mark to the lease.
        shared
            .cancels
            .locked()
            .insert((c.task_id.clone(), c.attempt));
        return None;
    };
    // A dispatch not sent yet sees the mark and is not sent at all.
    shared
        .cancels
        .locked()
        .insert((c.task_id.clone(), c.attempt));
    let endpoint = config.gpus.iter().find(|g| &g.id == gpu);
    let Some((endpoint, url)) = endpoint.and_then(|e| Some((e, e.cancel_url.as_ref()?))) else {
        if first {
            log::info!(task_id, gpu = gpu.as_str(), attempt = c.attempt;
                "task cancelled; its gpu has no cancel_url: the slot is held until its callback or lease");
        }
        return Some(Instant::now() + RECHECK);
    };
    let body = json!({ "task_id": task_id, "attempt": c.attempt }).to_string();
    let timeout = endpoint.request_timeout.min(CANCEL_TIMEOUT);
    let sent = http::post_json(
        agent,
        url,
        endpoint.bearer_token.as_ref(),
        &body,
        timeout,
        timeout,
    );
    match sent {
        Ok(r) if r.is_success() => {
            log::warn!(task_id, gpu = gpu.as_str(), attempt = c.attempt;
                "gpu confirmed the cancel");
            end(shared, c)
        }
        other => {
            let why = match other {
                Ok(r) => format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => http::describe(&e),
            };
            log::warn!(task_id, gpu = gpu.as_str(), attempt = c.attempt, error = why.as_str(),
                retry_in:? = RETRY; "gpu did not confirm the cancel; slot held");
            Some(Instant::now() + RETRY)
        }
    }
}

/// Ends a cancelled attempt now (the task becomes `cancelled`, its slot frees); on a MySQL
/// error, when to try again.
fn end(shared: &Shared, c: &Cancelling) -> Option<Instant> {
    match shared.end_attempt(&c.task_id, c.attempt, Ending::Cancelled, "cancel") {
        Ok(_) => None,
        Err(e) => {
            log::warn!(task_id = c.task_id.as_str(), error:% = e, retry_in:? = RETRY;
                "cannot record a cancelled attempt");
            Some(Instant::now() + RETRY)
        }
    }
}
