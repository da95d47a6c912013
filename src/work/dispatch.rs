//! The dispatch pool (`qsys-dispatch-N`): bounded threads that make the blocking HTTP call to the
//! GPU endpoint for a slot the scheduler has already claimed in MySQL.
//!
//! Request (docs/contracts.md §5): `POST <endpoint url>`, JSON body = the task's `data` plus `task_id` and a
//! per-attempt signed `callback_url`, `Authorization: Bearer` when configured. In `callback` mode a
//! 2xx only means accepted and the thread is free again at once; in `response` mode the thread waits
//! for the answer for up to the task's lease (not the short request timeout: the seed's 30 s cap
//! failed long jobs while the GPU still worked on them) and a 2xx means finished. Anything else ends
//! the attempt through [`Shared::end_attempt`], which frees the slot and retries what may pass
//! (transport errors, timeouts, 5xx, 408, 429). Every answer also feeds the GPU's health record.
//!
//! Workers take jobs until the scheduler drops its sender, so jobs already handed over at a stop are
//! still sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde_json::Value;

use crate::config::{Completion, Endpoint};
use crate::fleet::HealthChange;
use crate::net::http::{self, Reply};
use crate::obs::trouble::Trouble;
use crate::shared::GpuJob;
use crate::shared::Shared;
use crate::store::Ending;

/// The JSON body sent to a GPU endpoint: `data` (which always holds `task_id`, see
/// [`crate::contract::message::parse`]) plus the callback URL.
pub(crate) fn request_body(job: &GpuJob, callback_url: &str) -> String {
    let mut data = job.task.msg.data.clone();
    data.insert("callback_url".into(), Value::String(callback_url.into()));
    Value::Object(data).to_string()
}

/// What one dispatch means for the task, given the mode and the endpoint's answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Accepted; the callback will say how it ended.
    AwaitCallback,
    Finished,
    Failed {
        error: String,
        retryable: bool,
    },
}

/// Whether a failure may pass on another try: transport errors, timeouts, 5xx, 408 and 429. Any
/// other status is the request's own fault.
pub(crate) fn retryable_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// The verdict on one dispatch. `maybe_delivered`: the request may have reached the endpoint
/// before the error (a timeout after connecting). In callback mode the GPU may then be working on
/// it, so the slot stays held until its callback or its lease: freeing it could put one task too
/// many on that GPU (issue 14). In response mode the call's own end is the verdict.
pub(crate) fn judge(
    ep: &Endpoint,
    result: &Result<Reply, String>,
    maybe_delivered: bool,
) -> Verdict {
    match (result, ep.completion) {
        (Ok(r), Completion::Callback) if r.is_success() => Verdict::AwaitCallback,
        (Err(_), Completion::Callback) if maybe_delivered => Verdict::AwaitCallback,
        (Ok(r), Completion::Response) if r.is_success() => Verdict::Finished,
        (Ok(r), _) => Verdict::Failed {
            error: format!(
                "gpu {} answered HTTP {}: {}",
                ep.id,
                r.status,
                r.body.trim()
            ),
            retryable: retryable_status(r.status),
        },
        (Err(e), _) => Verdict::Failed {
            error: format!("gpu {}: {e}", ep.id),
            retryable: true,
        },
    }
}

/// What was wrong with the endpoint itself, if anything: no answer, or a server error. A 4xx is
/// the request's fault, not the GPU's.
pub(crate) fn endpoint_error(ep: &Endpoint, result: &Result<Reply, String>) -> Option<String> {
    match result {
        Ok(r) if r.status < 500 => None,
        Ok(r) => Some(format!("HTTP {}", r.status)),
        Err(e) => Some(format!("{}: {e}", ep.id)),
    }
}

/// A job that waited longer than this for a worker has its lease restarted before it is sent.
const LEASE_SLACK: Duration = Duration::from_secs(1);

/// Whether `job` may still be sent: its lease, if it waited for a worker, is renewed from now
/// (one that ran out meanwhile was ended and retried elsewhere already, and sending now would run
/// the task twice at once); an attempt an operator cancelled meanwhile is ended instead, its slot
/// freed (the GPU never had it).
fn still_to_send(shared: &Shared, job: &GpuJob) -> bool {
    let (ep, task_id) = (&job.endpoint, job.task.msg.task_id.as_str());
    if job.claimed_at.elapsed() > LEASE_SLACK {
        match shared
            .store
            .renew_lease(task_id, job.attempt, job.lease, ep.heartbeat_timeout)
        {
            Ok(true) => {}
            Ok(false) => {
                log::warn!(task_id, gpu = ep.id.as_str(), attempt = job.attempt;
                    "lease ended before the dispatch was sent; not sent");
                return false;
            }
            Err(e) => log::warn!(task_id, error:% = e;
                "mysql error renewing a lease; sent under the claim's lease"),
        }
    }
    if shared.cancel_asked(task_id, job.attempt) {
        log::warn!(task_id, gpu = ep.id.as_str(), attempt = job.attempt;
            "task cancelled before its dispatch was sent; not sent");
        shared.end_attempt_patiently(task_id, job.attempt, Ending::Cancelled, "cancel", PATIENCE);
        return false;
    }
    true
}

pub(crate) fn run_worker(shared: Arc<Shared>, jobs: Receiver<GpuJob>, agents: Arc<http::Agents>) {
    while let Ok(job) = jobs.recv() {
        let ep = &job.endpoint;
        let task_id = job.task.msg.task_id.as_str();
        crate::pause_point!(shared.store.instance(), "dispatch:before-send");
        if !still_to_send(&shared, &job) {
            continue;
        }
        let body = request_body(&job, &shared.signer.callback_url(task_id, job.attempt));
        let total = match ep.completion {
            Completion::Callback => ep.request_timeout,
            Completion::Response => job
                .task
                .msg
                .timeout_s
                .map(Duration::from_secs)
                .unwrap_or(ep.task_timeout),
        };
        let started = Instant::now();
        // A response-mode answer is the result: kept up to one byte past its limit, so one
        // over it is told apart from one that fits.
        let keep = match ep.completion {
            Completion::Callback => 2048,
            Completion::Response => shared.config().callback.max_result_bytes as u64 + 1,
        };
        let sent = http::post_json_keeping(
            &agents.get(&ep.id),
            &ep.url,
            ep.bearer_token.as_ref(),
            &body,
            (ep.request_timeout, total),
            keep,
        );
        let maybe_delivered = sent.as_ref().is_err_and(http::maybe_delivered);
        let result = sent.map_err(|e| http::describe(&e));
        shared.metrics.dispatch_seconds.observe(started.elapsed());
        let policy = shared.config().health;
        let trouble = endpoint_error(ep, &result);
        if trouble.is_some() {
            shared.count(Trouble::Dispatch);
        }
        let change =
            shared
                .slots()
                .record_dispatch(&ep.id, trouble.as_deref(), Instant::now(), &policy);
        match change {
            HealthChange::Ejected { cooldown } => log::warn!(gpu = ep.id.as_str(),
                cooldown:? = cooldown; "gpu ejected after repeated failures"),
            HealthChange::Ramped { limit } => log::info!(gpu = ep.id.as_str(), limit;
                "gpu ramping up"),
            HealthChange::None => {}
        }
        let verdict = judge(ep, &result, maybe_delivered);
        let kept = match (&verdict, &result) {
            (Verdict::Finished, Ok(reply)) => response_result(&shared, task_id, &reply.body),
            _ => None,
        };
        let ending = match &verdict {
            Verdict::AwaitCallback if result.is_err() => {
                log::warn!(task_id, gpu = ep.id.as_str(), attempt = job.attempt;
                    "no answer to the dispatch; the gpu may be running it: slot held until its callback or lease");
                continue;
            }
            Verdict::AwaitCallback => {
                log::debug!(task_id, gpu = ep.id.as_str(), attempt = job.attempt;
                    "dispatched; awaiting callback");
                continue;
            }
            Verdict::Finished => Ending::Finished {
                result: kept.as_deref(),
            },
            Verdict::Failed { error, retryable } => Ending::Failed {
                error,
                retryable: *retryable,
            },
        };
        shared.end_attempt_patiently(task_id, job.attempt, ending, "dispatch", PATIENCE);
    }
}

/// A response-mode answer's body as the task's result: its JSON as sent, when it is JSON (and
/// not `null`) and within `callback.max_result_bytes`. Over the limit the task still finished (the
/// GPU did the work): the result is dropped, and said so.
fn response_result(shared: &Shared, task_id: &str, body: &str) -> Option<String> {
    let max = shared.config().callback.max_result_bytes;
    if body.len() > max {
        log::warn!(task_id, max;
            "response-mode answer over callback.max_result_bytes: the task finished, its result is not kept");
        return None;
    }
    // Kept as the endpoint wrote it, like a callback's result.
    let raw: &serde_json::value::RawValue = serde_json::from_str(body).ok()?;
    (raw.get() != "null").then(|| raw.get().to_string())
}

/// How long a dispatch worker keeps trying to record an outcome through a MySQL outage before it
/// leaves the attempt to its lease.
const PATIENCE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(completion: Completion) -> Endpoint {
        Endpoint {
            id: "g1".into(),
            url: "http://127.0.0.1:1/".into(),
            health_url: "http://127.0.0.1:1/".into(),
            slots: 4,
            completion,
            bearer_token: None,
            request_timeout: Duration::from_secs(1),
            task_timeout: Duration::from_secs(60),
            heartbeat_timeout: None,
            cancel_url: None,
            pool: "default".into(),
            speed: None,
        }
    }

    fn reply(status: u16) -> Result<Reply, String> {
        Ok(Reply {
            status,
            body: "busy\n".into(),
        })
    }

    #[test]
    fn verdicts_by_mode() {
        let cb = ep(Completion::Callback);
        let resp = ep(Completion::Response);
        assert_eq!(judge(&cb, &reply(202), false), Verdict::AwaitCallback);
        assert_eq!(judge(&resp, &reply(200), false), Verdict::Finished);
        assert_eq!(
            judge(&cb, &reply(503), false),
            Verdict::Failed {
                error: "gpu g1 answered HTTP 503: busy".into(),
                retryable: true
            }
        );
        assert_eq!(
            judge(&resp, &Err("connection failed".into()), false),
            Verdict::Failed {
                error: "gpu g1: connection failed".into(),
                retryable: true
            }
        );
    }

    /// A timeout after the request may have arrived: in callback mode the GPU may be running it,
    /// so the slot waits for the callback or the lease; in response mode the call has ended.
    #[test]
    fn an_answer_lost_after_sending_keeps_a_callback_slot() {
        let timed_out = Err("timed out (Global)".to_string());
        assert_eq!(
            judge(&ep(Completion::Callback), &timed_out, true),
            Verdict::AwaitCallback
        );
        assert!(matches!(
            judge(&ep(Completion::Callback), &timed_out, false),
            Verdict::Failed {
                retryable: true,
                ..
            }
        ));
        assert!(matches!(
            judge(&ep(Completion::Response), &timed_out, true),
            Verdict::Failed {
                retryable: true,
                ..
            }
        ));
    }

    #[test]
    fn which_failures_are_retried() {
        for s in [500, 502, 503, 504, 408, 429] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 422] {
            assert!(!retryable_status(s), "{s}");
        }
        let cb = ep(Completion::Callback);
        assert!(matches!(
            judge(&cb, &reply(400), false),
            Verdict::Failed {
                retryable: false,
                ..
            }
        ));
        assert_eq!(endpoint_error(&cb, &reply(404)), None);
        assert_eq!(
            endpoint_error(&cb, &reply(502)).as_deref(),
            Some("HTTP 502")
        );
        assert!(endpoint_error(&cb, &Err("timed out".into())).is_some());
    }
}
