//! What qsysd tells its operator: the log sink and the metrics registry.

pub mod logging;
pub(crate) mod metrics;
pub(crate) mod trouble;
