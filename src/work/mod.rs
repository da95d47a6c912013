//! The threads that move and run tasks: the poller, the dispatch and handler pools, the callback
//! server and writer, the canceller and the maintenance thread.

pub(crate) mod backlog;
pub(crate) mod callback;
pub(crate) mod cancel;
pub(crate) mod dispatch;
pub(crate) mod handlers;
pub(crate) mod maintenance;
pub(crate) mod poller;
pub(crate) mod retention;
