//! Tasks on deck: the scheduler's GPU tasks whose pool had no free slot at its last round, where
//! whoever ends an attempt can take the next one for the slot it frees (issue 20).
//!
//! Without this, a freed slot waits for a round trip through the scheduler (an event, a round,
//! a claim transaction of its own): two commits and a gap per task at saturation. With it, the
//! ending's transaction claims the slot for the next task ([`crate::store::HandOver`]). The
//! scheduler still owns these tasks: it takes them all back at the start of each round and puts
//! back those that still find their pool full, so a pause, a drain, a reload or a change of
//! pools is seen at the next round like any other task in hand. They count in its hand's bound.
//!
//! A task is lent while an ending's transaction may claim it, then either claimed (it leaves)
//! or given back (to the front, in order). A stop closes the deck: what is on it goes back to
//! Redis with the hand, nothing more is lent, and a task given back afterwards stays `pending`
//! here in MySQL, resumed at the next start or by a peer (as a retry waiting at a stop does).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Task;

#[derive(Debug, Default)]
pub(crate) struct Deck {
    /// Waiting tasks with their pool, in hand order.
    waiting: VecDeque<(String, Task)>,
    /// Ids of the tasks lent to an ending's transaction.
    lent: HashSet<String>,
    closed: bool,
}

impl Deck {
    /// Tasks on deck or lent: what the scheduler's hand bound counts.
    pub(crate) fn len(&self) -> usize {
        self.waiting.len() + self.lent.len()
    }

    /// Whether nothing waits to be lent.
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() || self.closed
    }

    /// The ids this deck holds, for the sweep (they are held in memory).
    pub(crate) fn ids(&self) -> impl Iterator<Item = &str> {
        self.waiting
            .iter()
            .map(|(_, t)| t.msg.task_id.as_str())
            .chain(self.lent.iter().map(String::as_str))
    }

    /// Puts the round's tasks of full pools on deck, after those already there. Closed: they
    /// come back.
    pub(crate) fn put(&mut self, tasks: Vec<(String, Task)>) -> Vec<Task> {
        if self.closed {
            return tasks.into_iter().map(|(_, t)| t).collect();
        }
        self.waiting.extend(tasks);
        Vec::new()
    }

    /// Every waiting task, in order, for the scheduler's round (lent ones stay lent).
    pub(crate) fn take_all(&mut self) -> Vec<Task> {
        self.waiting.drain(..).map(|(_, t)| t).collect()
    }

    /// At a stop: nothing more is lent or put; the waiting tasks, in order.
    pub(crate) fn close(&mut self) -> Vec<Task> {
        self.closed = true;
        self.take_all()
    }

    /// Lends the first waiting task of `pool` that `takes` accepts.
    pub(crate) fn lend(
        &mut self,
        pool: &str,
        mut takes: impl FnMut(&Task) -> bool,
    ) -> Option<(String, Task)> {
        if self.closed {
            return None;
        }
        let i = self
            .waiting
            .iter()
            .position(|(p, t)| p == pool && takes(t))?;
        let (pool, task) = self.waiting.remove(i)?;
        self.lent.insert(task.msg.task_id.clone());
        Some((pool, task))
    }

    /// A lent task is claimed (or gone): it leaves the deck.
    pub(crate) fn settle(&mut self, task_id: &str) {
        self.lent.remove(task_id);
    }

    /// Lent tasks not claimed, back at the front in their order. Closed: they come back.
    pub(crate) fn give_back(&mut self, tasks: Vec<(String, Task)>) -> Vec<Task> {
        for (_, t) in &tasks {
            self.lent.remove(&t.msg.task_id);
        }
        if self.closed {
            return tasks.into_iter().map(|(_, t)| t).collect();
        }
        for t in tasks.into_iter().rev() {
            self.waiting.push_front(t);
        }
        Vec::new()
    }
}

/// How many tasks the scheduler holds (hand and deck), as the poller must see it before it starts
/// a task arriving ahead of them ([`crate::shared::Shared::reserve_now`]). A batch counts from
/// before the poller sends it (`given`) until the scheduler has counted it in what it holds
/// (`taken`), so no batch is ever between the two counts unseen.
#[derive(Debug, Default)]
pub(crate) struct HandCount {
    given: AtomicUsize,
    taken: AtomicUsize,
    held: AtomicUsize,
}

impl HandCount {
    /// The poller is about to send a batch of `n`.
    pub(crate) fn giving(&self, n: usize) {
        self.given.fetch_add(n, Ordering::SeqCst);
    }

    /// The scheduler took in a batch of `n` and now holds `held`.
    pub(crate) fn taken(&self, n: usize, held: usize) {
        self.held.store(held, Ordering::SeqCst);
        self.taken.fetch_add(n, Ordering::SeqCst);
    }

    /// The scheduler holds `held` now.
    pub(crate) fn set_held(&self, held: usize) {
        self.held.store(held, Ordering::SeqCst);
    }

    /// Nothing held by the scheduler or on its way to it.
    pub(crate) fn is_empty(&self) -> bool {
        let given = self.given.load(Ordering::SeqCst);
        self.held.load(Ordering::SeqCst) == 0 && self.taken.load(Ordering::SeqCst) == given
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> Task {
        let raw = format!(r#"{{"type":"t","data":{{"task_id":"{id}"}}}}"#);
        let msg = crate::contract::message::parse(raw.as_bytes(), || unreachable!("has an id"))
            .expect("a well-formed message");
        Task::new(msg, "q", 0)
    }

    fn ids(tasks: &[Task]) -> Vec<&str> {
        tasks.iter().map(|t| t.msg.task_id.as_str()).collect()
    }

    #[test]
    fn lent_tasks_count_and_come_back_in_order_until_the_deck_closes() {
        let mut d = Deck::default();
        assert!(d.is_idle());
        let back = d.put(vec![
            ("a".into(), task("a1")),
            ("b".into(), task("b1")),
            ("a".into(), task("a2")),
            ("a".into(), task("a3")),
        ]);
        assert!(back.is_empty());
        let (_, first) = d.lend("a", |_| true).expect("a1");
        // A task the caller refuses is passed over, not lent.
        let (_, second) = d.lend("a", |t| t.msg.task_id != "a2").expect("a3, past a2");
        assert_eq!(ids(&[first.clone(), second.clone()]), ["a1", "a3"]);
        assert!(d.lend("c", |_| true).is_none(), "no task of pool c");
        assert_eq!(d.len(), 4, "lent tasks still count");
        let mut held: Vec<&str> = d.ids().collect();
        held.sort();
        assert_eq!(held, ["a1", "a2", "a3", "b1"]);
        d.settle("a3");
        assert!(d.give_back(vec![("a".into(), first.clone())]).is_empty());
        assert_eq!(d.len(), 3);
        assert_eq!(ids(&d.take_all()), ["a1", "b1", "a2"]);
        // Closed at a stop: nothing is lent, and what comes back is the caller's.
        d.put(vec![("a".into(), task("a4"))]);
        let (_, lent) = d.lend("a", |_| true).expect("a4");
        d.put(vec![("a".into(), task("a5"))]);
        assert_eq!(ids(&d.close()), ["a5"]);
        assert!(d.is_idle());
        assert!(d.lend("a", |_| true).is_none());
        assert_eq!(ids(&d.give_back(vec![("a".into(), lent)])), ["a4"]);
        assert_eq!(ids(&d.put(vec![("a".into(), task("a6"))])), ["a6"]);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_batch_counts_from_before_its_send_until_the_scheduler_has_counted_it() {
        let h = HandCount::default();
        assert!(h.is_empty());
        h.giving(3);
        // Sent, received, not yet counted: still held.
        h.set_held(0);
        assert!(!h.is_empty());
        h.taken(3, 3);
        assert!(!h.is_empty());
        h.set_held(0);
        assert!(h.is_empty());
    }
}
