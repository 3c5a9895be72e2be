//! The Lua scripts of the Redis transport: each runs atomically on the server, so a
//! lease check and the write it guards, or a due message's move from the schedule to
//! its stream, cannot be separated by a crash or another client.

use std::sync::LazyLock;

use redis::{Cmd, Script};

/// Acknowledges one entry, fenced by the partition's lease: only the consumer whose
/// token holds the lease may ack; the entry is then removed from the group's pending
/// list and deleted from the stream (so acknowledged entries do not accumulate).
///
/// KEYS: lease, stream. ARGV: token, group, entry id. Returns 1 acked, 0 refused (the
/// lease is not this token's: nothing changed). A refusal is a reply, not an error, so
/// that it reads the same when a `WAIT` follows in the pipeline.
pub static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return 1
",
    )
});

/// Renews a lease held by `token`, or takes a free one when ARGV[3] is `1` (`SET NX PX`).
///
/// KEYS: lease. ARGV: token, lease ms, may acquire. Returns 1 renewed, 2 acquired,
/// 0 held by another consumer (or free and not to be acquired now).
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if ARGV[3] == '1' and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 2
end
return 0
",
    )
});

/// Gives a lease up, if `token` still holds it, so that another consumer takes the
/// partition at once.
///
/// KEYS: lease. ARGV: token. Returns 1 when released.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Schedules a delayed message: due at the server's clock plus the delay, plus one
/// millisecond for the clock's sub-millisecond part, so it is never due early.
///
/// KEYS: delayed set. ARGV: delay ms, partition, key, body, unique id. Returns the due
/// time (ms since the epoch, server clock).
///
/// Sent as `EVAL` with its source ([`schedule`]), not `EVALSHA`: the publisher sends it
/// in one pipeline with other writes, where an `EVALSHA` the server does not know (its
/// script cache is empty after a restart) would fail, to be loaded and sent again in a
/// second round trip. The source is a few hundred bytes.
const SCHEDULE: &str = r"
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 1 + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], due, cmsgpack.pack(ARGV[2], ARGV[3], ARGV[4], ARGV[5]))
return due
";

/// The command that schedules `body`, under `key` in `partition`, in the delayed set
/// `delayed`, due `delay_ms` from the server's now (see [`SCHEDULE`]). Each gets a
/// unique id, so that two equal messages are two members of the set.
pub fn schedule(delayed: &str, delay_ms: u64, partition: u16, key: &str, body: &[u8]) -> Cmd {
    let mut eval = redis::cmd("EVAL");
    eval.arg(SCHEDULE)
        .arg(1)
        .arg(delayed)
        .arg(delay_ms)
        .arg(partition)
        .arg(key)
        .arg(body)
        .arg(uuid::Uuid::new_v4().simple().to_string());
    eval
}

/// Moves due delayed messages (by the server's clock) to their partition streams, in
/// due order, in one atomic step: a message is in the schedule or in its stream,
/// never both, never neither.
///
/// KEYS: delayed set. ARGV: stream name prefix, at most how many. Returns how many
/// moved.
pub static MOVE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local p, k, b = cmsgpack.unpack(m)
  redis.call('XADD', ARGV[1] .. p, '*', 'k', k, 'b', b)
  redis.call('ZREM', KEYS[1], m)
end
return #due
",
    )
});
