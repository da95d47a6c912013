//! Trouble: the kinds of failure qsysd counts (`qsys_errors_total{kind}`). The macros in lib.rs
//! count and log one in a single call (`trouble!`), or for the threads that judge a dependency's
//! health (the heartbeat for MySQL, the poller for Redis) also raise it as a `/healthz` problem
//! until it works again (`outage!`), so no site can do one and forget another.

/// A kind of failure, by its `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trouble {
    /// A GPU endpoint did not take a dispatch (transport error, timeout, 5xx).
    Dispatch,
    /// An exec or HTTP handler run failed.
    Handler,
    Mysql,
    Redis,
    /// Another instance's slot event was refused.
    SlotEvent,
}

impl Trouble {
    /// Every kind: the label set of `qsys_errors_total`, fixed so a scrape never grows.
    pub(crate) const LABELS: &'static [&'static str] =
        &["dispatch", "handler", "mysql", "redis", "slot_event"];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Trouble::Dispatch => "dispatch",
            Trouble::Handler => "handler",
            Trouble::Mysql => "mysql",
            Trouble::Redis => "redis",
            Trouble::SlotEvent => "slot_event",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_label() {
        let all = [
            Trouble::Dispatch,
            Trouble::Handler,
            Trouble::Mysql,
            Trouble::Redis,
            Trouble::SlotEvent,
        ];
        let labels: Vec<&str> = all.iter().map(|t| t.label()).collect();
        assert_eq!(labels, Trouble::LABELS);
    }
}
