//! The connection of a Redis store: one server or a cluster, and what the
//! store asks of it beyond its scripts.

use std::time::Duration;

use redis::{
    aio::ConnectionManager,
    cluster_async::ClusterConnection,
    cluster_routing::{
        MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr,
    },
    FromRedisValue, RedisResult, ScriptInvocation, Value,
};

/// One server through a reconnecting multiplexed connection, or a cluster
/// through redis-rs's cluster client, which follows `MOVED` and `ASK`.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            Self::Single(connection) => invocation.invoke_async(&mut connection.clone()).await,
            Self::Cluster(connection) => invocation.invoke_async(&mut connection.clone()).await,
        }
    }

    /// A command on the node that holds its key.
    pub(super) async fn query<T: FromRedisValue>(&self, command: &redis::Cmd) -> RedisResult<T> {
        match self {
            Self::Single(connection) => command.query_async(&mut connection.clone()).await,
            Self::Cluster(connection) => command.query_async(&mut connection.clone()).await,
        }
    }

    /// `WAIT replicas timeout` on the node that holds `key`, after the
    /// writes this connection sent it: how many replicas acknowledged them.
    pub(super) async fn wait(
        &self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout.as_millis() as u64);
        match self {
            Self::Single(connection) => wait.query_async(&mut connection.clone()).await,
            Self::Cluster(connection) => {
                let node = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(node));
                let answer = connection.clone().route_command(wait, routing).await?;
                Ok(i64::from_redis_value(answer)?)
            }
        }
    }

    /// The `maxmemory-policy` of every master, as `(node, policy)`; a node
    /// that refuses `CONFIG GET` (some managed services do) is left out.
    pub(super) async fn eviction_policies(&self) -> RedisResult<Vec<String>> {
        let mut config = redis::cmd("CONFIG");
        config.arg("GET").arg("maxmemory-policy");
        let mut words = Vec::new();
        strings_in(&self.on_every_master(config).await?, &mut words);
        Ok(words
            .into_iter()
            .filter(|word| word != "maxmemory-policy" && !word.contains(':'))
            .collect())
    }

    /// The version of every master (`redis_version` of `INFO server`). A
    /// master whose answer names none (an error, a renamed command) makes
    /// this an error, which the store warns of, rather than a list that
    /// leaves that master out.
    pub(super) async fn versions(&self) -> RedisResult<Vec<ServerVersion>> {
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let answer = self.on_every_master(info).await?;
        let replies: Vec<&Value> = match &answer {
            Value::Map(pairs) => pairs.iter().map(|(_, reply)| reply).collect(),
            reply => vec![reply],
        };
        replies
            .into_iter()
            .map(|reply| {
                let mut texts = Vec::new();
                strings_in(reply, &mut texts);
                let field = |name: &str| {
                    texts
                        .iter()
                        .flat_map(|text| text.lines())
                        .find_map(|line| line.strip_prefix(name))
                        .map(|version| version.trim().to_owned())
                };
                let redis = field("redis_version:").ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "a master's INFO server names no redis_version",
                    ))
                })?;
                Ok(ServerVersion {
                    redis,
                    valkey: field("valkey_version:"),
                })
            })
            .collect()
    }

    async fn on_every_master(&self, command: redis::Cmd) -> RedisResult<Value> {
        match self {
            Self::Single(connection) => command.query_async(&mut connection.clone()).await,
            Self::Cluster(connection) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                connection.clone().route_command(command, routing).await
            }
        }
    }
}

/// Every string in a reply, in order, however it is nested.
fn strings_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => out.push(text.clone()),
        Value::Array(items) | Value::Set(items) => items.iter().for_each(|v| strings_in(v, out)),
        Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            strings_in(k, out);
            strings_in(v, out);
        }),
        _ => {}
    }
}

/// What a master's `INFO server` says it runs: the Redis version it
/// answers to (Valkey names one too, `7.2.4`), and Valkey's own.
#[derive(Debug)]
pub(super) struct ServerVersion {
    pub(super) redis: String,
    pub(super) valkey: Option<String>,
}

impl ServerVersion {
    /// Whether it has `SET` with both `NX` and `GET`, which came with
    /// Redis 7.0.
    pub(super) fn sets_and_gets(&self) -> bool {
        at_least(&self.redis, (7, 0))
    }

    /// Whether it has `SET … IFEQ`, which came with Valkey 8.1 and Redis 8.4.
    pub(super) fn sets_if_equal(&self) -> bool {
        match &self.valkey {
            Some(valkey) => at_least(valkey, (8, 1)),
            None => at_least(&self.redis, (8, 4)),
        }
    }
}

/// Whether `version` (`8.1.1`) is `major.minor` or later.
fn at_least(version: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        (Some(a), None) => a > major,
        _ => false,
    }
}

/// Whether a `maxmemory-policy` may evict keys that carry a TTL, as every
/// lock and record of the store does.
pub(super) fn evicts_keys_with_a_ttl(policy: &str) -> bool {
    policy.starts_with("volatile-") || policy.starts_with("allkeys-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(version: &str) -> ServerVersion {
        ServerVersion {
            redis: version.to_owned(),
            valkey: None,
        }
    }

    fn valkey(version: &str) -> ServerVersion {
        ServerVersion {
            redis: "7.2.4".to_owned(),
            valkey: Some(version.to_owned()),
        }
    }

    #[test]
    fn set_with_nx_and_get_needs_redis_7() {
        assert!(redis("7.0.15").sets_and_gets());
        assert!(redis("8.2.1").sets_and_gets());
        assert!(valkey("8.0.2").sets_and_gets());
        assert!(!redis("6.2.14").sets_and_gets());
        assert!(!redis("unknown").sets_and_gets());
    }

    #[test]
    fn set_if_equal_needs_valkey_8_1_or_redis_8_4() {
        assert!(valkey("8.1.1").sets_if_equal());
        assert!(valkey("9.0.0").sets_if_equal());
        assert!(redis("8.4.0").sets_if_equal());
        assert!(redis("10.0.1").sets_if_equal());
        assert!(!valkey("8.0.2").sets_if_equal());
        assert!(!redis("8.2.1").sets_if_equal());
        assert!(!redis("7.0.15").sets_if_equal());
        assert!(!redis("unknown").sets_if_equal());
    }
}
