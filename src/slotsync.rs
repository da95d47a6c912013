//! Slot events between instances: several qsysd instances share one MySQL `gpu_slots` table, and
//! each keeps an in-memory mirror of it. When an instance claims or frees a slot it publishes that
//! on a Redis channel (`PREFIX:slots`); every other instance applies it to its own mirror, so a slot
//! freed by a callback that landed anywhere is offered again within milliseconds, not at the next
//! poll. MySQL stays the authority: a lost event costs at most a refused claim (which mirrors the
//! real holder) until the maintenance thread's periodic resync.
//!
//! Threads: `qsys-slotpub` publishes this instance's events (all those waiting in one message), and
//! `qsys-slotsub` applies the others'. Both reconnect with backoff and end with the stop.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::shared::Shared;

/// One claim or release, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotEvent {
    pub instance: String,
    pub claimed: bool,
    pub gpu: String,
    pub slot: usize,
    pub task_id: String,
    pub attempt: u32,
}

/// The deployment's slot channel.
pub fn channel(config: &crate::config::Config) -> String {
    format!("{}:slots", config.redis.key_prefix)
}

/// A published message: a batch of events, or one event (as instances before batching sent them,
/// so a rolling upgrade keeps working).
pub fn parse(payload: &[u8]) -> Result<Vec<SlotEvent>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Message {
        Batch(Vec<SlotEvent>),
        One(SlotEvent),
    }
    Ok(match serde_json::from_slice(payload)? {
        Message::Batch(b) => b,
        Message::One(e) => vec![e],
    })
}

/// Applies another instance's event to this instance's mirror. True if anything changed.
pub fn apply(shared: &Shared, e: &SlotEvent) -> bool {
    let mut m = shared.slots();
    if e.claimed {
        m.hold(&e.gpu, e.slot, e.task_id.clone(), e.attempt)
    } else {
        m.release(&e.gpu, e.slot, &e.task_id)
    }
}

pub fn run_publisher(shared: Arc<Shared>, client: redis::Client, events: Receiver<SlotEvent>) {
    let channel = channel(&shared.config());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut conn: Option<redis::Connection> = None;
    loop {
        shared.tick("qsys-slotpub");
        let first = match events.recv_timeout(Duration::from_millis(250)) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) if shared.stop.is_closing() => return,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Everything waiting goes out as one message: one PUBLISH, and one parse per subscriber,
        // for a whole claim round or callback batch.
        let batch: Vec<SlotEvent> = std::iter::once(first)
            .chain(events.try_iter().take(999))
            .collect();
        let text = serde_json::to_string(&batch).expect("slot events always serialize");
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(&channel).arg(text).ignore();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match crate::queue::connect(&client, Duration::from_secs(1)) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    // Others resync from MySQL; dropping events costs latency, never a slot.
                    log::warn!(error:% = e; "cannot publish slot events");
                    shared.stop.sleep(backoff.next_delay());
                    continue;
                }
            },
        };
        match pipe.query::<()>(c) {
            Ok(()) => backoff.reset(),
            Err(e) => {
                log::warn!(error:% = e; "cannot publish slot events");
                conn = None;
            }
        }
    }
}

pub fn run_subscriber(shared: Arc<Shared>, client: redis::Client) {
    let config = shared.config();
    let channel = channel(&config);
    let me = config.daemon.instance_id.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !shared.stop.is_closing() {
        shared.tick("qsys-slotsub");
        let mut conn = match client.get_connection_with_timeout(Duration::from_secs(2)) {
            Ok(c) => c,
            Err(e) => {
                log::warn!(error:% = e; "cannot subscribe to slot events");
                shared.stop.sleep(backoff.next_delay());
                continue;
            }
        };
        let mut sub = conn.as_pubsub();
        if let Err(e) = sub
            .subscribe(&channel)
            .and_then(|()| sub.set_read_timeout(Some(Duration::from_millis(250))))
        {
            log::warn!(error:% = e; "cannot subscribe to slot events");
            shared.stop.sleep(backoff.next_delay());
            continue;
        }
        backoff.reset();
        loop {
            shared.tick("qsys-slotsub");
            if shared.stop.is_closing() {
                return;
            }
            match sub.get_message() {
                Ok(msg) => {
                    let Ok(batch) = parse(msg.get_payload_bytes()) else {
                        log::warn!("unreadable slot event ignored");
                        continue;
                    };
                    let mut freed = false;
                    for e in batch.iter().filter(|e| e.instance != me) {
                        freed |= apply(&shared, e) && !e.claimed;
                    }
                    if freed {
                        shared.wake_scheduler();
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    log::warn!(error:% = e; "slot event subscription lost; reconnecting");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_single_events_parse() {
        let e = SlotEvent {
            instance: "a".into(),
            claimed: true,
            gpu: "g0".into(),
            slot: 2,
            task_id: "t".into(),
            attempt: 1,
        };
        let one = serde_json::to_vec(&e).expect("json");
        let many = serde_json::to_vec(&[e.clone(), e.clone()]).expect("json");
        assert_eq!(parse(&one).expect("one"), std::slice::from_ref(&e));
        assert_eq!(parse(&many).expect("many"), [e.clone(), e]);
        assert!(parse(b"{\"claimed\": true}").is_err());
        assert!(parse(b"[]").expect("empty").is_empty());
    }
}
