//! What a producer (`qsys-push`, its Lambda runtime) reads of a config file.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

use super::env::mysql_url;
use super::raw::{RawMysql, RawRedis};
use super::validate::redis_config;
use super::{
    invalid, parse_error, read_config_file, ConfigError, Env, MysqlConfig, RedisConfig,
    DEFAULT_PATH,
};
use crate::contract::names::{is_key_name, NAME_RULE};

/// What a producer (`qsys-push`) reads of a config: `[redis]`, the names in `[types]`, and `[mysql]`
/// only when asked (for `--wait`). Other tables are not read and `[mysql]`'s password file only on
/// demand, so a producer needs none of the daemon's secrets.
#[derive(Debug)]
pub(crate) struct ProducerConfig {
    pub redis: RedisConfig,
    /// Where a task that names no queue goes: `QUEUE_NAME`, else the first of the queues.
    pub default_queue: String,
    /// The task types of the file's `[types]` table. `None` (no file, or no table) accepts any
    /// type: a producer without the daemon's config cannot know them.
    pub types: Option<BTreeSet<String>>,
    mysql: RawMysql,
    env: Env,
}

impl ProducerConfig {
    /// Reads `path`, else [`DEFAULT_PATH`] when it exists, else only `env` and the defaults.
    pub(crate) fn load(path: Option<&Path>, env: &Env) -> Result<ProducerConfig, ConfigError> {
        // Lenient at the top (the daemon's tables are skipped), strict inside what is read.
        #[derive(Default, Deserialize)]
        struct ProducerOnly {
            #[serde(default)]
            redis: RawRedis,
            #[serde(default)]
            mysql: RawMysql,
            types: Option<toml::Table>,
        }
        let default = Path::new(DEFAULT_PATH);
        let path = path.or_else(|| default.exists().then_some(default));
        let raw: ProducerOnly = match path {
            None => ProducerOnly::default(),
            Some(path) => {
                let text = read_config_file(path)?;
                toml::from_str(&text).map_err(|e| parse_error(path, &e))?
            }
        };
        let redis = redis_config(&raw.redis, env)?;
        let default_queue = match env.get("QUEUE_NAME") {
            Some(q) if !is_key_name(q) => return Err(invalid("QUEUE_NAME", q, NAME_RULE)),
            Some(q) => q.clone(),
            // redis_config refuses an empty list.
            None => redis.queues[0].clone(),
        };
        Ok(ProducerConfig {
            redis,
            default_queue,
            types: raw.types.map(|t| t.keys().cloned().collect()),
            mysql: raw.mysql,
            env: env.clone(),
        })
    }

    /// The `[mysql]` settings with the seed's `DB_*` variables applied, as the daemon builds them.
    pub(crate) fn mysql(&self) -> Result<MysqlConfig, ConfigError> {
        Ok(MysqlConfig {
            url: mysql_url(&self.mysql, &self.env)?,
            tls: self.mysql.tls.unwrap_or(false),
        })
    }
}
