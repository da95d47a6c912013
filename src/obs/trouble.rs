//! Trouble: the kinds of failure qsysd counts (`qsys_errors_total{kind}`), of which losing Redis
//! or MySQL also makes `/healthz` answer 503 until it works again. The `trouble!` macro (lib.rs)
//! counts, raises and logs one in a single call, so no site can do one and forget another.

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

    /// Whether this trouble makes the daemon unhealthy while it lasts: a lost dependency does;
    /// one task's or one peer's failure does not.
    pub(crate) fn is_outage(self) -> bool {
        matches!(self, Trouble::Mysql | Trouble::Redis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_label_and_only_dependencies_are_outages() {
        let all = [
            Trouble::Dispatch,
            Trouble::Handler,
            Trouble::Mysql,
            Trouble::Redis,
            Trouble::SlotEvent,
        ];
        let labels: Vec<&str> = all.iter().map(|t| t.label()).collect();
        assert_eq!(labels, Trouble::LABELS);
        let outages: Vec<&str> = all
            .iter()
            .filter(|t| t.is_outage())
            .map(|t| t.label())
            .collect();
        assert_eq!(outages, ["mysql", "redis"]);
    }
}
