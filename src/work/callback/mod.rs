//! The callback server (`qsys-callback`): `tiny_http` on `callback.listen`, serving `POST /callback`
//! (completions, and heartbeats: `"status": "running"`) and `GET /healthz`.
//!
//! A callback must carry the per-attempt token that qsysd put in the `callback_url` it sent
//! ([`crate::contract::token`]); without it the answer is 401 and nothing changes. A few threads
//! (`qsys-callback-N`) share the listener, parse and verify; a valid callback goes with its open
//! request to the writer ([`run_writer`]), which ends the attempts of every callback waiting in one
//! transaction through [`crate::shared::Shared::end_attempts`] and then answers each by its typed result, mapped
//! onto the reply codes of docs/contracts.md §5: 200 applied, 200 with `"duplicate": true` for a repeat, 404
//! unknown task, 409 stale attempt or terminal conflict, 400 malformed, 413 too large, 405 wrong
//! method, 503 when MySQL cannot be reached (the GPU should retry).

mod server;
mod writer;

pub(crate) use server::serve;
pub(crate) use writer::run_writer;

use serde_json::Value;
use tiny_http::Request;

use crate::contract::report::Report;

/// A callback whose token checked out, waiting for the writer with its open request.
pub(crate) struct Verified {
    req: Request,
    report: Report,
    attempt: u32,
}

/// A callback's HTTP status, JSON reply, and `result` label for `qsys_callbacks_total`.
type Answer = (u16, Value, &'static str);
