//! The raw layer: exactly what the TOML file may contain, with serde's unknown-key detection.
//! Every field is optional here; defaults are applied (and documented in etc/qsysd.toml) by
//! validation, so nothing downstream can see an unvalidated value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    #[serde(default)]
    pub(super) redis: RawRedis,
    #[serde(default)]
    pub(super) mysql: RawMysql,
    #[serde(default)]
    pub(super) callback: RawCallback,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) gpu: RawGpu,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) retention: RawRetention,
    pub(super) types: Option<BTreeMap<String, RawType>>,
    #[serde(default)]
    pub(super) daemon: RawDaemon,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) queues: Option<Vec<String>>,
    pub(super) pop_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMysql {
    pub(super) url: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) tls: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCallback {
    pub(super) listen: Option<String>,
    pub(super) public_url: Option<String>,
    pub(super) secret: Option<String>,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) max_body: Option<usize>,
    pub(super) max_result_bytes: Option<usize>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
}

/// `[gpu]` (the defaults) and each `[[gpu.endpoints]]` share one shape, so an endpoint can override any
/// default. `id`, `url` and `endpoints` are only meaningful at one of the two levels; validation refuses
/// them at the other. (serde's `flatten` would lose `deny_unknown_fields`.)
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGpu {
    pub(super) id: Option<String>,
    pub(super) url: Option<String>,
    pub(super) health_url: Option<String>,
    pub(super) eject_after: Option<u32>,
    pub(super) eject_cooldown: Option<String>,
    pub(super) eject_cooldown_max: Option<String>,
    pub(super) slots: Option<usize>,
    pub(super) completion: Option<String>,
    pub(super) bearer_token: Option<String>,
    pub(super) bearer_token_file: Option<PathBuf>,
    pub(super) request_timeout: Option<String>,
    pub(super) task_timeout: Option<String>,
    pub(super) heartbeat_timeout: Option<String>,
    pub(super) cancel_url: Option<String>,
    pub(super) pool: Option<String>,
    pub(super) speed: Option<f64>,
    pub(super) placement: Option<String>,
    pub(super) endpoints: Option<Vec<RawGpu>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) max_attempts: Option<u32>,
    pub(super) backoff: Option<String>,
    pub(super) backoff_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    pub(super) finished: Option<String>,
    pub(super) failed: Option<String>,
    pub(super) cancelled: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawType {
    pub(super) handler: String,
    pub(super) command: Option<Vec<String>>,
    pub(super) url: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) bearer_token: Option<String>,
    pub(super) bearer_token_file: Option<PathBuf>,
    pub(super) env: Option<Vec<String>>,
    pub(super) pool: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) instance_id: Option<String>,
    pub(super) instance_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) handler_threads: Option<usize>,
    pub(super) dispatch_threads: Option<usize>,
    pub(super) log_level: Option<String>,
    pub(super) log_target: Option<String>,
    pub(super) max_message_bytes: Option<usize>,
}
