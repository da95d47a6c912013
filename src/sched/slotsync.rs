//! Slot events between instances: several qsysd instances share one MySQL `gpu_slots` table, and
//! each keeps an in-memory mirror of it. When an instance claims or frees a slot it publishes that
//! on a Redis channel (`PREFIX:slots`); every other instance applies it to its own mirror, so a slot
//! freed by a callback that landed anywhere is offered again within milliseconds, not at the next
//! poll. MySQL stays the authority: a lost event costs at most a refused claim (which mirrors the
//! real holder) until the maintenance thread's periodic resync.
//!
//! Anyone who can PUBLISH on the channel can send anything, and an instance whose configuration
//! differs (a rolling reload) sends events for GPUs or slots this one does not have. So every
//! message is read by [`read`] before anything touches the mirror: its size and event count are
//! bounded, each event is judged on its own (a bad one spoils only itself), and an event applies
//! only if it names a GPU of this instance, a slot below that GPU's configured count, and ids of
//! sane length. The rest is ignored: counted in `qsys_errors_total{kind="slot_event"}` and logged
//! once per sender, for a bounded number of senders ([`Warnings`]). Losing such an event costs
//! what losing any event costs: MySQL's resync repairs the mirror.
//!
//! Threads: `qsys-slotpub` publishes this instance's events (all those waiting in one message), and
//! `qsys-slotsub` applies the others'. Both reconnect with backoff and end with the stop.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::de::{Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::config::Endpoint;
use crate::contract::slot_event::SlotEvent;
use crate::net::backoff::Backoff;
use crate::net::redis::Timeouts;
use crate::obs::trouble::Trouble;
use crate::shared::Shared;

/// Largest message read, in bytes. The publisher's largest batch of the longest ids, every
/// character escaped, stays well below it (see the tests).
pub(crate) const MAX_MESSAGE: usize = 2 << 20;
/// Most events read from one message (the publisher sends at most [`PUBLISH_BATCH`]).
pub(crate) const MAX_BATCH: usize = 4096;
/// Most events the publisher puts in one message.
const PUBLISH_BATCH: usize = 1000;
/// Longest instance id and GPU id, the config's limit for both.
const MAX_ID: usize = 64;
/// Senders of refused events named in the log; beyond them refusals are only counted.
const NAMED_SENDERS: usize = 32;
/// Longest parse error kept: serde quotes an offending string whole, and it may be huge.
const MAX_REASON: usize = 200;

/// Why a slot message, or one event in it, was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("slot message of {0} bytes is larger than {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("slot message unreadable: {0}")]
    Unreadable(String),
    #[error("slot event unreadable: {0}")]
    BadEvent(String),
    #[error("slot event {field} of {len} bytes (expected 1 to {MAX_ID})")]
    BadId { field: &'static str, len: usize },
    #[error("slot event task_id refused: {0}")]
    BadTaskId(String),
    #[error("slot event for gpu {0:?}, which this instance does not run")]
    UnknownGpu(String),
    #[error("slot event for slot {slot} of gpu {gpu}, which has {slots} slots here")]
    NoSuchSlot {
        gpu: String,
        slot: usize,
        slots: usize,
    },
}

/// The deployment's slot channel.
pub(crate) fn channel(config: &crate::config::Config) -> String {
    format!("{}:slots", config.redis.key_prefix)
}

/// Whether `e` may touch the mirror of an instance running `gpus`.
pub(crate) fn check(e: &SlotEvent, gpus: &[Arc<Endpoint>]) -> Result<(), Refused> {
    for (field, id) in [("instance", &e.instance), ("gpu", &e.gpu)] {
        if id.is_empty() || id.len() > MAX_ID {
            return Err(Refused::BadId {
                field,
                len: id.len(),
            });
        }
    }
    crate::contract::message::check_task_id(&e.task_id).map_err(Refused::BadTaskId)?;
    let gpu = gpus
        .iter()
        .find(|g| g.id == e.gpu)
        .ok_or_else(|| Refused::UnknownGpu(e.gpu.clone()))?;
    if e.slot >= gpu.slots {
        return Err(Refused::NoSuchSlot {
            gpu: e.gpu.clone(),
            slot: e.slot,
            slots: gpu.slots,
        });
    }
    Ok(())
}

/// What a message holds for this instance: the events to apply, and the refused ones, each with
/// the sender it claims (`None` when even that cannot be read). This instance's own events, which
/// the channel brings back, are in neither.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Read {
    pub apply: Vec<SlotEvent>,
    pub refused: Vec<(Option<String>, Refused)>,
}

/// Reads one message: a batch of events, or one event (as instances before batching sent them, so
/// a rolling upgrade keeps working). A message too large, not JSON, nested too deep or with too
/// many events is refused whole; otherwise each event is judged on its own.
pub(crate) fn read(payload: &[u8], me: &str, gpus: &[Arc<Endpoint>]) -> Read {
    let whole = |why| Read {
        apply: Vec::new(),
        refused: vec![(None, why)],
    };
    if payload.len() > MAX_MESSAGE {
        return whole(Refused::TooLarge(payload.len()));
    }
    let unreadable = |e: serde_json::Error| Refused::Unreadable(shorten(&e.to_string()));
    // Slices of the payload, not parsed values: reading costs no more memory than the message.
    let events = if payload.trim_ascii_start().starts_with(b"[") {
        serde_json::from_slice::<Batch<'_>>(payload).map(|b| b.0)
    } else {
        serde_json::from_slice::<&RawValue>(payload).map(|e| vec![e])
    };
    let events = match events {
        Ok(events) => events,
        Err(e) => return whole(unreadable(e)),
    };
    let mut out = Read::default();
    for raw in events {
        match serde_json::from_str::<SlotEvent>(raw.get()) {
            Ok(e) if e.instance == me => {}
            Ok(e) => match check(&e, gpus) {
                Ok(()) => out.apply.push(e),
                Err(why) => out.refused.push((Some(e.instance), why)),
            },
            Err(err) => out
                .refused
                .push((sender(raw), Refused::BadEvent(shorten(&err.to_string())))),
        }
    }
    out
}

/// The `instance` a malformed event claims, if it is a string.
fn sender(raw: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct From {
        instance: String,
    }
    serde_json::from_str::<From>(raw.get())
        .ok()
        .map(|f| f.instance)
}

/// A JSON array of at most [`MAX_BATCH`] elements, each left unparsed; reading stops at the first
/// element beyond.
struct Batch<'a>(Vec<&'a RawValue>);

impl<'de> Deserialize<'de> for Batch<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Events;
        impl<'de> Visitor<'de> for Events {
            type Value = Vec<&'de RawValue>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX_BATCH} slot events")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut events = Vec::new();
                while let Some(e) = seq.next_element()? {
                    if events.len() == MAX_BATCH {
                        return Err(A::Error::custom(format_args!(
                            "more than {MAX_BATCH} events"
                        )));
                    }
                    events.push(e);
                }
                Ok(events)
            }
        }
        d.deserialize_seq(Events).map(Batch)
    }
}

/// At most [`MAX_REASON`] bytes of `s`, cut at a character boundary.
fn shorten(s: &str) -> String {
    prefix(s, MAX_REASON).to_string()
}

fn prefix(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The senders of refused events already named in the log. Each is named once, and at most
/// [`NAMED_SENDERS`] ever (by their first [`MAX_ID`] bytes), so a flood of forged names can grow
/// neither this set nor the log.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    named: HashSet<String>,
    full: bool,
}

/// What to log about one refused event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Warn<'a> {
    /// The first from this sender (`""`: unknown): name it.
    First(&'a str),
    /// The first from a sender beyond the named ones: say that no more are named.
    TooMany,
    /// Already said.
    Quiet,
}

impl Warnings {
    pub(crate) fn note<'a>(&mut self, sender: Option<&'a str>) -> Warn<'a> {
        let key = prefix(sender.unwrap_or(""), MAX_ID);
        if self.named.contains(key) {
            Warn::Quiet
        } else if self.named.len() < NAMED_SENDERS {
            self.named.insert(key.to_string());
            Warn::First(key)
        } else if !self.full {
            self.full = true;
            Warn::TooMany
        } else {
            Warn::Quiet
        }
    }
}

/// Applies another instance's event, already [`check`]ed, to this instance's mirror. True if
/// anything changed.
pub(crate) fn apply(shared: &Shared, e: &SlotEvent) -> bool {
    let mut m = shared.slots();
    if e.claimed {
        m.hold(&e.gpu, e.slot, e.task_id.clone(), e.attempt)
    } else {
        m.release(&e.gpu, e.slot, &e.task_id)
    }
}

pub(crate) fn run_publisher(
    shared: Arc<Shared>,
    client: redis::Client,
    events: Receiver<SlotEvent>,
) {
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
            .chain(events.try_iter().take(PUBLISH_BATCH - 1))
            .collect();
        let text = serde_json::to_string(&batch).expect("slot events always serialize");
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(&channel).arg(text).ignore();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match crate::net::redis::connect(
                &client,
                Timeouts::reading(Duration::from_secs(11)),
            ) {
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

pub(crate) fn run_subscriber(shared: Arc<Shared>, client: redis::Client) {
    let config = shared.config();
    let channel = channel(&config);
    let me = config.daemon.instance_id.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut warnings = Warnings::default();
    while !shared.stop.is_closing() {
        shared.tick("qsys-slotsub");
        let mut conn = match crate::net::redis::connect(
            &client,
            Timeouts {
                // A short connect: this loop notices a stop between attempts.
                connect: Duration::from_secs(2),
                ..Timeouts::SHORT
            },
        ) {
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
                    // The GPUs in force now: a reload may have changed them.
                    let read = read(msg.get_payload_bytes(), &me, &shared.config().gpus);
                    for (sender, why) in &read.refused {
                        shared.count(Trouble::SlotEvent);
                        warn(&mut warnings, sender.as_deref(), why);
                    }
                    let mut freed = false;
                    for e in &read.apply {
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

/// Logs a refused event, unless its sender was named already.
fn warn(warnings: &mut Warnings, sender: Option<&str>, why: &Refused) {
    match warnings.note(sender) {
        Warn::First(sender) => {
            let sender = if sender.is_empty() { "unknown" } else { sender };
            log::warn!(sender, error:% = why;
                "invalid slot event ignored; further ones from this sender are not logged");
        }
        Warn::TooMany => log::warn!(error:% = why;
            "invalid slot event ignored; too many senders to name, qsys_errors_total{{kind=\"slot_event\"}} counts them"),
        Warn::Quiet => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, Env};

    /// g0 with 2 slots, g1 with 4, as a validated config has them.
    fn gpus() -> Vec<Arc<Endpoint>> {
        let text = "[callback]\nlisten = \"127.0.0.1:1\"\nsecret = \"0123456789abcdef\"\n\
                    [gpu]\nslots = 2\n[[gpu.endpoints]]\nid = \"g0\"\nurl = \"http://h/0\"\n\
                    [[gpu.endpoints]]\nid = \"g1\"\nurl = \"http://h/1\"\nslots = 4\n";
        Config::from_toml(text, Path::new("t"), &Env::new())
            .expect("valid config")
            .gpus
    }

    fn event(instance: &str, gpu: &str, slot: usize, task_id: &str) -> SlotEvent {
        SlotEvent {
            instance: instance.into(),
            claimed: true,
            gpu: gpu.into(),
            slot,
            task_id: task_id.into(),
            attempt: 1,
        }
    }

    fn json(v: &impl serde::Serialize) -> Vec<u8> {
        serde_json::to_vec(v).expect("json")
    }

    #[test]
    fn batches_and_single_events_are_read() {
        let e = event("a", "g0", 1, "t");
        let me = "me";
        assert_eq!(read(&json(&e), me, &gpus()).apply, std::slice::from_ref(&e));
        let both = read(&json(&[e.clone(), event("a", "g1", 3, "u")]), me, &gpus());
        assert_eq!(both.apply, [e, event("a", "g1", 3, "u")]);
        assert!(both.refused.is_empty());
        assert_eq!(read(b" [ ] ", me, &gpus()), Read::default());
    }

    #[test]
    fn events_are_checked_against_this_instances_gpus() {
        let g = gpus();
        assert_eq!(check(&event("a", "g1", 3, "t"), &g), Ok(()));
        let refused = |e: SlotEvent| check(&e, &g).expect_err("refused");
        assert_eq!(
            refused(event("a", "g0", 2, "t")),
            Refused::NoSuchSlot {
                gpu: "g0".into(),
                slot: 2,
                slots: 2
            }
        );
        assert!(matches!(
            refused(event("a", "g0", usize::MAX, "t")),
            Refused::NoSuchSlot { .. }
        ));
        assert_eq!(
            refused(event("a", "g9", 0, "t")),
            Refused::UnknownGpu("g9".into())
        );
        let long = "x".repeat(65);
        assert_eq!(
            refused(event("a", &long, 0, "t")),
            Refused::BadId {
                field: "gpu",
                len: 65
            }
        );
        assert_eq!(
            refused(event(&long, "g0", 0, "t")),
            Refused::BadId {
                field: "instance",
                len: 65
            }
        );
        assert!(matches!(
            refused(event("", "g0", 0, "t")),
            Refused::BadId { len: 0, .. }
        ));
        for bad in ["", "a\nb", &"t".repeat(256)] {
            assert!(matches!(
                refused(event("a", "g0", 0, bad)),
                Refused::BadTaskId(_)
            ));
        }
        assert_eq!(check(&event("a", "g0", 1, &"t".repeat(255)), &g), Ok(()));
    }

    #[test]
    fn a_bad_event_spoils_only_itself() {
        let good = event("peer", "g1", 0, "ok");
        let payload = format!(
            r#"[{{"instance": "x", "claimed": true, "gpu": "g0", "slot": 18446744073709551615, "task_id": "t", "attempt": 1}},
                {{"instance": "y", "claimed": "yes", "gpu": 5, "slot": -1, "task_id": [], "attempt": 1e9}},
                {{"instance": "z", "claimed": true, "gpu": "g0", "slot": 0, "task_id": "t", "attempt": 99999999999}},
                42, null, [], "text", {{}}, {{"instance": 7}},
                {{"instance": "me", "claimed": true, "gpu": "g0", "slot": 0, "task_id": "echo", "attempt": 1}},
                {},
                {{"instance": "w", "claimed": true, "gpu": "{}", "slot": 0, "task_id": "t", "attempt": 1}}]"#,
            String::from_utf8(json(&good)).expect("utf8"),
            "g".repeat(100_000),
        );
        let r = read(payload.as_bytes(), "me", &gpus());
        assert_eq!(r.apply, [good], "only the good one, and not our own echo");
        let senders: Vec<Option<&str>> = r.refused.iter().map(|(s, _)| s.as_deref()).collect();
        assert_eq!(
            senders,
            [
                Some("x"),
                Some("y"),
                Some("z"),
                None,
                None,
                None,
                None,
                None,
                None,
                Some("w")
            ]
        );
        assert!(matches!(r.refused[0].1, Refused::NoSuchSlot { .. }));
        assert!(matches!(r.refused[1].1, Refused::BadEvent(_)));
        assert!(matches!(
            r.refused[9].1,
            Refused::BadId { field: "gpu", .. }
        ));
        for (_, why) in &r.refused {
            assert!(why.to_string().len() < 2 * MAX_REASON, "{why}");
        }
    }

    #[test]
    fn hostile_messages_are_refused_whole_and_cheaply() {
        let g = gpus();
        let one = |payload: &[u8]| {
            let r = read(payload, "me", &g);
            assert!(r.apply.is_empty());
            assert_eq!(r.refused.len(), 1, "one refusal");
            r.refused.into_iter().next().expect("one")
        };
        let whole = |payload: &[u8]| {
            let (sender, why) = one(payload);
            assert_eq!(sender, None);
            why
        };
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(whole(&big), Refused::TooLarge(MAX_MESSAGE + 1));
        // Nesting as deep as the size allows is skipped without recursion: no stack is at risk.
        let depth = MAX_MESSAGE / 2 - 100;
        let deep = "[".repeat(depth) + &"]".repeat(depth);
        assert!(matches!(whole(deep.as_bytes()), Refused::BadEvent(_)));
        let nested = format!(
            r#"{{"instance": "x", "a": {}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let (sender, why) = one(nested.as_bytes());
        assert_eq!(sender.as_deref(), Some("x"));
        assert!(matches!(why, Refused::BadEvent(_)), "{why}");
        let unclosed = "{\"a\": ".to_string() + &"[".repeat(depth);
        assert!(matches!(whole(unclosed.as_bytes()), Refused::Unreadable(_)));
        let many = json(&vec![event("a", "g0", 0, "t"); MAX_BATCH + 1]);
        assert!(
            matches!(whole(&many), Refused::Unreadable(ref r) if r.contains("more than 4096")),
            "too many events"
        );
        assert_eq!(
            read(&json(&vec![event("a", "g0", 0, "t"); MAX_BATCH]), "me", &g)
                .apply
                .len(),
            MAX_BATCH
        );
        for junk in [
            &b"hello"[..],
            b"",
            b"\xff\xfe",
            b"{\"instance\": \"\xff\"}",
            b"[1,",
        ] {
            assert!(matches!(whole(junk), Refused::Unreadable(_)), "{junk:?}");
        }
    }

    #[test]
    fn the_largest_honest_message_is_read() {
        // Every character of the ids escaped in JSON: the most a batch can weigh.
        let batch = vec![
            SlotEvent {
                instance: "\u{1}".repeat(MAX_ID),
                claimed: false,
                gpu: "g1".into(),
                slot: 3,
                task_id: "\"".repeat(crate::contract::message::MAX_TASK_ID),
                attempt: u32::MAX,
            };
            PUBLISH_BATCH
        ];
        let payload = json(&batch);
        assert!(payload.len() < MAX_MESSAGE / 2, "{}", payload.len());
        assert_eq!(read(&payload, "me", &gpus()).apply, batch);
    }

    #[test]
    fn each_sender_is_named_once_and_only_so_many() {
        let mut w = Warnings::default();
        assert_eq!(w.note(Some("a")), Warn::First("a"));
        assert_eq!(w.note(Some("a")), Warn::Quiet);
        assert_eq!(w.note(None), Warn::First(""));
        assert_eq!(w.note(None), Warn::Quiet);
        let long = "b".repeat(10_000);
        assert_eq!(w.note(Some(&long)), Warn::First(&long[..MAX_ID]));
        assert_eq!(
            w.note(Some(&format!("{long}c"))),
            Warn::Quiet,
            "same first bytes"
        );
        let logged = (0..10_000)
            .filter(|i| w.note(Some(&format!("s{i}"))) != Warn::Quiet)
            .count();
        assert_eq!(
            logged,
            NAMED_SENDERS - 3 + 1,
            "the rest, then one 'too many'"
        );
        assert_eq!(w.named.len(), NAMED_SENDERS);
        assert_eq!(w.note(Some("a")), Warn::Quiet);
    }
}
