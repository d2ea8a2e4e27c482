//! The scripts of a Redis store: one per step, each on the record's one
//! key, so each is atomic and lives on one hash slot of a cluster.

/// Each record is one hash: `f` fingerprint, `s` state (`i` in flight, `c`
/// completed, `n` not replayable), `t` lock token, `r` encoded response, and
/// for a fenced record `e` = `1` and `l` its lease's end (server time, ms).
/// The key's own expiry is the lease while in flight and unfenced, and the
/// TTL once fenced or completed: a fenced record outlives its lease, so the
/// next request recovers it instead of running again.
pub(super) const BEGIN: &str = r"
local k = KEYS[1]
-- Every field at once: a replay is this one read.
local rec = redis.call('HMGET', k, 's', 'f', 'e', 'l', 't', 'r')
if not rec[1] then
  redis.call('HSET', k, 'f', ARGV[1], 's', 'i', 't', ARGV[2])
  redis.call('PEXPIRE', k, ARGV[3])
  return {'acquired', ''}
end
if rec[2] ~= ARGV[1] then return {'mismatch', ''} end
if rec[1] == 'i' and rec[5] == ARGV[2] then
  -- This very call, sent again by a client retry: it took the key.
  if rec[3] == '1' then return {'recover', ''} end
  return {'acquired', ''}
end
if rec[1] == 'i' then
  if rec[3] ~= '1' then return {'in_flight', ''} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(rec[4]) > now then return {'in_flight', ''} end
  redis.call('HSET', k, 't', ARGV[2], 'l', now + tonumber(ARGV[3]))
  if redis.call('PTTL', k) < tonumber(ARGV[3]) then redis.call('PEXPIRE', k, ARGV[3]) end
  return {'recover', ''}
end
if rec[1] == 'n' then return {'not_replayable', ''} end
return {'completed', rec[6]}
";

pub(super) const COMPLETE: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't')
-- Completed by this token already: a client retry of this very call.
if rec[1] == ARGV[2] and rec[2] == ARGV[1] then return 1 end
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', k, 's', ARGV[2], 'r', ARGV[3])
redis.call('PEXPIRE', k, ARGV[4])
return 1
";

pub(super) const RELEASE: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't', 'e')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
if rec[3] == '1' then
  redis.call('HSET', k, 'l', 0)
else
  redis.call('DEL', k)
end
return 1
";

pub(super) const RENEW: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't', 'e')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
if rec[3] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', k, 'l', now + tonumber(ARGV[2]))
  if redis.call('PTTL', k) < tonumber(ARGV[2]) then redis.call('PEXPIRE', k, ARGV[2]) end
else
  redis.call('PEXPIRE', k, ARGV[2])
end
return 1
";

/// `1` fenced, `0` lock lost, `2` fenced before.
pub(super) const FENCE: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't', 'e')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
if rec[3] == '1' then return 2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = redis.call('PTTL', k)
redis.call('HSET', k, 'e', '1', 'l', now + lease)
if lease < tonumber(ARGV[2]) then redis.call('PEXPIRE', k, ARGV[2]) end
return 1
";
