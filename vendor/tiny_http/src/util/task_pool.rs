use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// Manages a collection of threads.
///
/// A new thread is created every time all the existing threads are full.
/// Any idle thread will automatically die after a few seconds.
pub struct TaskPool {
    sharing: Arc<Sharing>,
}

struct Sharing {
    // list of the tasks to be done by worker threads
    todo: Mutex<VecDeque<Box<dyn FnMut() + Send>>>,

    // condvar that will be notified whenever a task is added to `todo`
    condvar: Condvar,

    // number of total worker threads running
    active_tasks: AtomicUsize,

    // number of idle worker threads
    waiting_tasks: AtomicUsize,
}

/// Minimum number of active threads.
static MIN_THREADS: usize = 4;

struct Registration<'a> {
    nb: &'a AtomicUsize,
}

impl<'a> Registration<'a> {
    fn new(nb: &'a AtomicUsize) -> Registration<'a> {
        nb.fetch_add(1, Ordering::Release);
        Registration { nb }
    }
}

impl<'a> Drop for Registration<'a> {
    fn drop(&mut self) {
        self.nb.fetch_sub(1, Ordering::Release);
    }
}

impl TaskPool {
    pub fn new() -> TaskPool {
        let pool = TaskPool {
            sharing: Arc::new(Sharing {
                todo: Mutex::new(VecDeque::new()),
                condvar: Condvar::new(),
                active_tasks: AtomicUsize::new(0),
                waiting_tasks: AtomicUsize::new(0),
            }),
        };

        for _ in 0..MIN_THREADS {
            pool.add_thread(None)
        }

        pool
    }

    /// Executes a function in a thread.
    /// If no thread is available, spawns a new one.
    pub fn spawn(&self, code: Box<dyn FnMut() + Send>) {
        let mut queue = self.sharing.todo.lock().unwrap_or_else(|e| e.into_inner());
        self.spawn_locked(&mut queue, code);
    }

    /// qsysd patch: queue a task only if an idle thread is left for it.
    ///
    /// `waiting_tasks` counts a woken thread until it has re-taken the lock, so upstream's test
    /// (`waiting_tasks == 0`) queued two tasks back to back for one idle thread: the second waited
    /// until some thread's current task ended, which for a keep-alive connection may be never
    /// (qsysd issue 20: a dispatch or callback that was never read). Every counted thread pops
    /// one task when it gets the lock, so a task may wait in the queue only while there are more
    /// counted threads than queued tasks.
    fn spawn_locked(
        &self,
        queue: &mut VecDeque<Box<dyn FnMut() + Send>>,
        code: Box<dyn FnMut() + Send>,
    ) {
        if self.sharing.waiting_tasks.load(Ordering::Acquire) <= queue.len() {
            self.add_thread(Some(code));
        } else {
            queue.push_back(code);
            self.sharing.condvar.notify_one();
        }
    }

    fn add_thread(&self, initial_fn: Option<Box<dyn FnMut() + Send>>) {
        let sharing = self.sharing.clone();

        // qsysd patch: named, and a failed spawn (thread limit) drops the task (its connection
        // closes) instead of panicking the accept thread.
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                let sharing = sharing;
                let _active_guard = Registration::new(&sharing.active_tasks);

                if let Some(mut f) = initial_fn {
                    f();
                }

                loop {
                    let mut task: Box<dyn FnMut() + Send> = {
                        let mut todo = sharing.todo.lock().unwrap_or_else(|e| e.into_inner());

                        let task;
                        loop {
                            if let Some(poped_task) = todo.pop_front() {
                                task = poped_task;
                                break;
                            }
                            let _waiting_guard = Registration::new(&sharing.waiting_tasks);

                            let received =
                                if sharing.active_tasks.load(Ordering::Acquire) <= MIN_THREADS {
                                    todo = sharing
                                        .condvar
                                        .wait(todo)
                                        .unwrap_or_else(|e| e.into_inner());
                                    true
                                } else {
                                    let (new_lock, waitres) = sharing
                                        .condvar
                                        .wait_timeout(todo, Duration::from_millis(5000))
                                        .unwrap_or_else(|e| e.into_inner());
                                    todo = new_lock;
                                    !waitres.timed_out()
                                };

                            if !received && todo.is_empty() {
                                return;
                            }
                        }

                        task
                    };

                    task();
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start a connection thread: {}", e);
        }
    }
}

impl Drop for TaskPool {
    fn drop(&mut self) {
        self.sharing
            .active_tasks
            .store(999_999_999, Ordering::Release);
        self.sharing.condvar.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// qsysd patch: the window of issue 20, forced. While the lock is held no woken thread can
    /// take a task, exactly as when two connections are accepted back to back; one more task than
    /// there are idle threads must still start while every earlier one blocks for good.
    #[test]
    fn a_task_never_waits_behind_busy_threads() {
        let pool = TaskPool::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.sharing.waiting_tasks.load(Ordering::Acquire) < MIN_THREADS {
            assert!(
                std::time::Instant::now() < deadline,
                "pool threads never went idle"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let (started, seen) = mpsc::channel();
        let (release, hold) = mpsc::channel::<()>();
        let hold = Arc::new(Mutex::new(hold));
        {
            let mut queue = pool.sharing.todo.lock().unwrap();
            for i in 0..=MIN_THREADS {
                let started = started.clone();
                let hold = hold.clone();
                pool.spawn_locked(
                    &mut queue,
                    Box::new(move || {
                        started.send(i).unwrap();
                        // Busy until the test ends, like a keep-alive connection.
                        let _ = hold.lock().unwrap().recv_timeout(Duration::from_secs(10));
                    }),
                );
            }
        }
        let mut ran: Vec<usize> = (0..=MIN_THREADS)
            .map(|_| {
                seen.recv_timeout(Duration::from_secs(3))
                    .expect("a task never started")
            })
            .collect();
        ran.sort();
        assert_eq!(ran, (0..=MIN_THREADS).collect::<Vec<_>>());
        drop(release);
    }
}
