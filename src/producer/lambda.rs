//! The AWS Lambda custom runtime (`provided.al2023`): `qsys-push` installed as `bootstrap`, run
//! with `AWS_LAMBDA_RUNTIME_API` set, takes the place of the seed's Python Lambda producer.
//!
//! One loop on the main thread, on the Lambda Runtime API: `GET .../invocation/next` (it blocks
//! until an event comes: a connect timeout but no overall one), push the event's tasks all or
//! nothing ([`crate::producer::events`], [`crate::producer::push::Pusher`]), then `POST .../response` with the seed's
//! answer `{"statusCode": 200, "body": [{"task_id", "queue", "type"}, ...]}`, or `POST .../error`
//! for a bad event or a Redis failure, so that Lambda's retries and dead-letter queues apply. An
//! API Gateway event gets its body as a JSON string, as a proxy integration requires.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Env, ProducerConfig};
use crate::producer::events::{Batch, Outgoing, Receipt, Rules, Shape};
use crate::producer::push::{PushError, Pusher};

const VERSION: &str = "2018-06-01";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds a post of a result to the (local) Runtime API.
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// Above Lambda's 6 MB invocation payload limit.
const MAX_EVENT: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RuntimeError {
    #[error("runtime api: {0}")]
    Http(String),
    #[error("runtime api: {what} answered {status}")]
    Status { what: &'static str, status: u16 },
    #[error("runtime api: the next invocation has no Lambda-Runtime-Aws-Request-Id")]
    NoRequestId,
}

impl From<ureq::Error> for RuntimeError {
    fn from(e: ureq::Error) -> Self {
        RuntimeError::Http(crate::net::http::describe(&e))
    }
}

/// One invocation: its request id and event.
struct Invocation {
    request_id: String,
    event: Vec<u8>,
}

/// Runs the runtime loop against the Runtime API at `api` (`host:port`) until it fails. Returns
/// the exit status: 2 when the config is bad (reported as an init error), 1 when the Runtime API
/// cannot be reached.
pub fn run(api: &str, config: Option<&Path>, env: &Env) -> u8 {
    let agent = crate::net::http::agent();
    let base = format!("http://{api}/{VERSION}/runtime");
    let init = ProducerConfig::load(config, env)
        .map_err(PushError::from)
        .and_then(|c| {
            let pusher = Pusher::new(&c.redis.url)?;
            let rules = Rules {
                default_queue: c.default_queue,
                types: c.types,
                // Stamped per invocation, below: a warm container lives for hours.
                stamp: None,
                due: None,
                cost: None,
            };
            Ok((rules, pusher))
        });
    let (mut rules, mut pusher) = match init {
        Ok(x) => x,
        Err(e) => {
            eprintln!("qsys-push: {e}");
            if let Err(post) = post(&agent, &format!("{base}/init/error"), &error_body(&e)) {
                eprintln!("qsys-push: {post}");
            }
            return 2;
        }
    };
    eprintln!("qsys-push: lambda runtime ready on {api}");
    loop {
        let inv = match next(&agent, &base) {
            Ok(inv) => inv,
            Err(e) => {
                eprintln!("qsys-push: {e}");
                return 1;
            }
        };
        let id = &inv.request_id;
        rules.stamp = Some(crate::contract::time::now_unix());
        let posted = match handle(&inv.event, &rules, &mut pusher) {
            Ok((answer, n)) => {
                eprintln!("qsys-push: request {id}: pushed {n} tasks");
                post(&agent, &format!("{base}/invocation/{id}/response"), &answer)
            }
            Err(e) => {
                for line in e.to_string().lines() {
                    eprintln!("qsys-push: request {id}: {line}");
                }
                post(
                    &agent,
                    &format!("{base}/invocation/{id}/error"),
                    &error_body(&e),
                )
            }
        };
        if let Err(e) = posted {
            eprintln!("qsys-push: request {id}: {e}");
            return 1;
        }
    }
}

/// Pushes the tasks of one event; the answer and how many tasks it pushed.
fn handle(event: &[u8], rules: &Rules, pusher: &mut Pusher) -> Result<(String, usize), PushError> {
    let mut batch = Batch::new(rules);
    let shape = batch.add_event_bytes(event);
    let messages = batch.finish()?;
    pusher.push(&messages)?;
    let receipts: Vec<Receipt> = messages.iter().map(Outgoing::receipt).collect();
    Ok((answer(shape, &receipts), messages.len()))
}

/// The seed's answer, `{"statusCode": 200, "body": [...]}`. API Gateway proxy integrations need
/// the body as a string (anything else is a 502 to the caller), so that shape gets it serialised.
fn answer(shape: Option<Shape>, receipts: &[Receipt]) -> String {
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Body<'a> {
        Receipts(&'a [Receipt<'a>]),
        Text(String),
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer<'a> {
        status_code: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        headers: Option<Value>,
        body: Body<'a>,
    }
    let answer = match shape {
        Some(Shape::ApiGateway) => Answer {
            status_code: 200,
            headers: Some(json!({"Content-Type": "application/json"})),
            body: Body::Text(to_json(&receipts)),
        },
        _ => Answer {
            status_code: 200,
            headers: None,
            body: Body::Receipts(receipts),
        },
    };
    to_json(&answer)
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("receipts and answers are plain strings and numbers")
}

fn error_body(e: &PushError) -> String {
    let kind = match e {
        PushError::Invalid(_) | PushError::Read { .. } => "InvalidEvent",
        PushError::Config(_) => "ConfigError",
        PushError::Redis(_) | PushError::NotAList { .. } | PushError::Partial(_) => "RedisError",
        PushError::Wait(_) => "MysqlError",
    };
    json!({"errorType": kind, "errorMessage": e.to_string(), "stackTrace": []}).to_string()
}

fn next(agent: &ureq::Agent, base: &str) -> Result<Invocation, RuntimeError> {
    let mut resp = agent
        .get(format!("{base}/invocation/next"))
        .config()
        // Long-polls until an event comes (or Lambda freezes the sandbox): no overall timeout.
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(None)
        .build()
        .call()?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(RuntimeError::Status {
            what: "invocation/next",
            status,
        });
    }
    let request_id = resp
        .headers()
        .get("Lambda-Runtime-Aws-Request-Id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or(RuntimeError::NoRequestId)?
        .to_string();
    let event = resp
        .body_mut()
        .with_config()
        .limit(MAX_EVENT)
        .read_to_vec()?;
    Ok(Invocation { request_id, event })
}

fn post(agent: &ureq::Agent, url: &str, body: &str) -> Result<(), RuntimeError> {
    let reply = crate::net::http::post_json(agent, url, None, body, CONNECT_TIMEOUT, POST_TIMEOUT)?;
    if !reply.is_success() {
        return Err(RuntimeError::Status {
            what: "a result post",
            status: reply.status,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_in_the_seed_shape_and_strings_for_api_gateway() {
        let r = [Receipt {
            task_id: "t",
            queue: "q",
            kind: "a",
        }];
        assert_eq!(
            answer(Some(Shape::Batch), &r),
            r#"{"statusCode":200,"body":[{"task_id":"t","queue":"q","type":"a"}]}"#
        );
        let api: Value = serde_json::from_str(&answer(Some(Shape::ApiGateway), &r)).expect("json");
        assert_eq!(api["statusCode"], 200);
        assert_eq!(
            api["body"], r#"[{"task_id":"t","queue":"q","type":"a"}]"#,
            "a string body"
        );
    }
}
