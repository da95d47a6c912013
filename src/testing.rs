//! Test-only pause points (feature `test-utils`, on only for this crate's own tests): a test
//! stops one instance's thread at a named place, inside a window it wants to prove closed, and
//! lets it go on when it has looked. Production builds contain neither this module nor the calls
//! ([`pause_point!`](crate::pause_point) expands to nothing).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::sync::{wait_while, Locked};

#[derive(Default)]
struct Point {
    armed: bool,
    reached: bool,
}

static POINTS: Mutex<Option<HashMap<(String, &'static str), Point>>> = Mutex::new(None);
static CHANGED: Condvar = Condvar::new();

/// How long a paused thread waits for the test at most, so a failed test cannot hang the run.
const LONGEST_PAUSE: Duration = Duration::from_secs(120);

fn with<T>(f: impl FnOnce(&mut HashMap<(String, &'static str), Point>) -> T) -> T {
    let mut guard = POINTS.locked();
    f(guard.get_or_insert_with(HashMap::new))
}

/// Makes the next thread of `instance` that reaches `point` wait there until [`release`]; other
/// threads that reach it meanwhile pass.
pub fn arm(instance: &str, point: &'static str) {
    with(|m| {
        m.insert(
            (instance.to_string(), point),
            Point {
                armed: true,
                reached: false,
            },
        )
    });
}

/// Waits until a thread of `instance` is paused at `point`; false if none came within `timeout`.
pub fn wait_reached(instance: &str, point: &'static str, timeout: Duration) -> bool {
    let key = (instance.to_string(), point);
    let guard = POINTS.locked();
    let guard = wait_while(&CHANGED, guard, timeout, |m| {
        !m.as_ref()
            .and_then(|m| m.get(&key))
            .is_some_and(|p| p.reached)
    });
    guard
        .as_ref()
        .and_then(|m| m.get(&key))
        .is_some_and(|p| p.reached)
}

/// Lets the thread paused at `point` go on.
pub fn release(instance: &str, point: &'static str) {
    with(|m| m.remove(&(instance.to_string(), point)));
    CHANGED.notify_all();
}

/// Called at a pause point: waits while the point is armed for `instance`.
pub fn reached(instance: &str, point: &'static str) {
    let key = (instance.to_string(), point);
    let mut guard = POINTS.locked();
    match guard.get_or_insert_with(HashMap::new).get_mut(&key) {
        // One thread per arming: others passing meanwhile go on.
        Some(p) if p.armed && !p.reached => p.reached = true,
        _ => return,
    }
    CHANGED.notify_all();
    drop(wait_while(&CHANGED, guard, LONGEST_PAUSE, |m| {
        m.as_ref().is_some_and(|m| m.contains_key(&key))
    }));
}
