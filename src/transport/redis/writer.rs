//! The writes skald counts on (publish, delayed publish, dead letter, ack): the
//! primary's reply, then, when `SKALD_REDIS_WAIT_REPLICAS` asks for it, `WAIT` for
//! that many replicas to have the write before it counts as done. An ack is one write
//! ([`Writer::script`]); the publisher sends the publishes waiting together as one
//! batch ([`Writer::write_all`]), with one `WAIT` for all of them.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{
    Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisResult, Script, ScriptInvocation,
    ServerErrorKind, Value,
};

use crate::config::RedisWait;
use crate::transport::TransportError;

/// Why a write does not count as done.
#[derive(Debug, Clone)]
pub(super) enum WriteError {
    /// The command failed or the connection did.
    Redis(RedisError),
    /// The primary applied the write, but fewer replicas than required acknowledged
    /// it in time.
    NotReplicated {
        reached: i64,
        wanted: u16,
        waited: Duration,
    },
}

impl From<WriteError> for TransportError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Redis(e) => TransportError::Connection(e.to_string()),
            WriteError::NotReplicated {
                reached,
                wanted,
                waited,
            } => TransportError::NotAccepted(format!(
                "Redis applied the write, but only {reached} of the {wanted} replicas \
                 SKALD_REDIS_WAIT_REPLICAS asks for acknowledged it within {} ms \
                 (SKALD_REDIS_WAIT_MS); it is not counted as done",
                waited.as_millis()
            )),
        }
    }
}

/// Whether `reached` replicas (`WAIT`'s reply) are enough for `wait`.
fn replicated(reached: i64, wait: RedisWait) -> Result<(), WriteError> {
    if reached >= i64::from(wait.replicas) {
        Ok(())
    } else {
        Err(WriteError::NotReplicated {
            reached,
            wanted: wait.replicas,
            waited: wait.timeout,
        })
    }
}

/// Sends writes, each write or batch followed by `WAIT` when configured. With `WAIT`
/// it has a connection of its own: `WAIT` blocks the connection it runs on, and the
/// lease renewals must not queue behind it.
#[derive(Clone)]
pub(super) struct Writer {
    conn: ConnectionManager,
    wait: RedisWait,
}

impl Writer {
    pub fn new(conn: ConnectionManager, wait: RedisWait) -> Self {
        Writer { conn, wait }
    }

    /// Runs `cmd`; with `WAIT`, in one pipeline with it, so that nothing else of this
    /// connection comes between: the replicas counted have this write.
    pub async fn write<T: FromRedisValue>(&self, cmd: Cmd) -> Result<T, WriteError> {
        let mut conn = self.conn.clone();
        if !self.wait.enabled() {
            return cmd.query_async(&mut conn).await.map_err(WriteError::Redis);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd)
            .cmd("WAIT")
            .arg(self.wait.replicas)
            .arg(self.wait.timeout.as_millis() as u64);
        let (value, reached): (T, i64) = pipe
            .query_async(&mut conn)
            .await
            .map_err(WriteError::Redis)?;
        replicated(reached, self.wait)?;
        Ok(value)
    }

    /// Runs `pipe`'s commands in order, in one round trip; with `WAIT`, followed by it
    /// in the same pipeline, so that the replicas counted have every one of them.
    /// Returns each command's own reply, a server error included (the caller judges
    /// them); fails when the connection does, and with `WAIT` when `WAIT` fails or
    /// fewer replicas than required have the writes.
    pub async fn write_all(
        &self,
        mut pipe: Pipeline,
    ) -> Result<Vec<RedisResult<Value>>, WriteError> {
        if self.wait.enabled() {
            pipe.cmd("WAIT")
                .arg(self.wait.replicas)
                .arg(self.wait.timeout.as_millis() as u64);
        }
        let mut conn = self.conn.clone();
        let mut replies: Vec<RedisResult<Value>> = pipe
            .ignore_errors()
            .query_async(&mut conn)
            .await
            .map_err(WriteError::Redis)?;
        if self.wait.enabled() {
            let waited = replies
                .pop()
                .unwrap_or_else(|| Err((ErrorKind::Parse, "no reply to WAIT").into()));
            let reached: i64 = waited
                .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
                .map_err(WriteError::Redis)?;
            replicated(reached, self.wait)?;
        }
        Ok(replies)
    }

    /// Runs `script` as `invocation` prepared it, through [`Writer::write`], loading
    /// the script first if the server does not know it (after a restart).
    pub async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, WriteError> {
        match self.write(Cmd::invoke_script(invocation)).await {
            Err(WriteError::Redis(e))
                if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
            {
                let mut conn = self.conn.clone();
                script
                    .load_async(&mut conn)
                    .await
                    .map_err(WriteError::Redis)?;
                self.write(Cmd::invoke_script(invocation)).await
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_counts_only_once_enough_replicas_have_it() {
        let wait = RedisWait {
            replicas: 2,
            timeout: Duration::from_millis(300),
        };
        assert!(replicated(2, wait).is_ok());
        assert!(replicated(3, wait).is_ok());
        let short = replicated(1, wait).expect_err("one of two is not enough");
        let said = TransportError::from(short).to_string();
        assert!(
            said.contains("only 1 of the 2 replicas") && said.contains("300 ms"),
            "{said}"
        );
    }

    #[test]
    fn without_wait_the_primarys_reply_is_enough() {
        assert!(replicated(0, RedisWait::default()).is_ok());
    }
}
