//! A store that never connects, for unit tests whose code under test reaches MySQL only through
//! a trait (the scheduler's [`crate::sched::scheduler::Claims`]) while the shared state it also
//! uses still holds a `Store`.

use mysql::{OptsBuilder, Pool, PoolConstraints, PoolOpts};

use super::Store;

impl Store {
    /// A store on a pool with no connections, opened lazily and never here: any use fails.
    pub(crate) fn offline(instance: &str) -> Store {
        let constraints = PoolConstraints::new(0, 1).expect("0 is not above 1");
        let opts = OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(1)
            .pool_opts(PoolOpts::default().with_constraints(constraints));
        Store {
            pool: Pool::new(opts).expect("a pool without connections opens none"),
            instance: instance.to_string(),
        }
    }
}
