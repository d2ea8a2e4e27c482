//! The scripts of a Redis store: the steps that must compare before they
//! write, each atomic and on one hash slot of a cluster (the record's one
//! key, or on one server the record's and the one staged beside it). They
//! read and write the layout of `value.rs` (Lua counts from 1: state 1,
//! fenced 2, fingerprint 3..34, token 35..50, tail from 51). The key's own
//! expiry is the lease while in flight and unfenced, and the TTL once
//! fenced or completed: a fenced record outlives its lease, so the next
//! request recovers it instead of running again.

/// `begin` when `SET … NX GET` found a fenced record in flight: takes it
/// over if its lease has run out. It decides afresh from what it reads, as
/// the record may have changed since. `ARGV[1]` is the lock value the
/// request tried to set, `ARGV[2]` its lease.
pub(super) const BEGIN: &str = r"
local k = KEYS[1]
local mine = ARGV[1]
local lease = tonumber(ARGV[2])
local v = redis.call('GET', k)
if not v then
  redis.call('SET', k, mine, 'PX', lease)
  return {'acquired', ''}
end
local fp = string.sub(mine, 3, 34)
local token = string.sub(mine, 35, 50)
if string.sub(v, 3, 34) ~= fp then return {'mismatch', ''} end
local state = string.sub(v, 1, 1)
local fenced = string.sub(v, 2, 2) == '1'
if state == 'i' and string.sub(v, 35, 50) == token then
  -- This very call, sent again by a client retry: it took the key.
  if fenced then return {'recover', ''} end
  return {'acquired', ''}
end
if state == 'i' then
  if not fenced then return {'in_flight', ''} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- A lease end it cannot read counts as run out: a recovery never repeats
  -- the effect, while waiting could hold the key for its whole TTL.
  if (tonumber(string.sub(v, 51)) or 0) > now then return {'in_flight', ''} end
  redis.call('SET', k, 'i1' .. fp .. token .. (now + lease), 'KEEPTTL')
  if redis.call('PTTL', k) < lease then redis.call('PEXPIRE', k, lease) end
  return {'recover', ''}
end
if state == 'n' then return {'not_replayable', ''} end
return {'completed', string.sub(v, 51)}
";

/// `complete` on one server, where `SET … IFEQ` is missing or left the
/// decision to it (a fenced lock, a missing key, a refused command).
/// `KEYS`: the record, the record staged beside it (`value.rs`). `ARGV`:
/// token, new state (`c` or `n`).
///
/// The staged record, whole, came in with a native `SET` just before, with
/// the record's TTL, which the rename keeps, so the response never becomes
/// a Lua string: Redis's Lua hashes every byte of every string it makes,
/// and each `redis.call` costs Redis about what a command of its own does.
/// The staged key is deleted whenever the lock is not the caller's.
pub(super) const COMPLETE_STAGED: &str = r"
local k, staged = KEYS[1], KEYS[2]
local v = redis.call('GET', k)
local held = v and string.sub(v, 35, 50) == ARGV[1]
-- Completed by this token already: a client retry of this very call.
if held and string.sub(v, 1, 1) == ARGV[2] then
  redis.call('DEL', staged)
  return 1
end
if not held or string.sub(v, 1, 1) ~= 'i' then
  redis.call('DEL', staged)
  return 0
end
-- Refused, and the lock left as it was, if nothing is staged.
local renamed = redis.pcall('RENAME', staged, k)
if type(renamed) == 'table' and renamed.err then return renamed end
return 1
";

/// `complete` on a cluster, where `SET … IFEQ` is missing or left the
/// decision to it, on the record's one key. `ARGV`: token, new state (`c` or
/// `n`), the record (`value.rs`), TTL.
///
/// It touches only the key it found, so that it runs while the key's slot
/// is being migrated between masters: a script there may not reach a key
/// the old master no longer holds, and one that emptied the key to write
/// the record afresh failed halfway, with the lock gone. The `SET`
/// replaces the lock with the record in one step.
pub(super) const COMPLETE: &str = r"
local k = KEYS[1]
local v = redis.call('GET', k)
if not v then return 0 end
local state = string.sub(v, 1, 1)
local held = string.sub(v, 35, 50) == ARGV[1]
-- Completed by this token already: a client retry of this very call.
if held and state == ARGV[2] then return 1 end
if state ~= 'i' or not held then return 0 end
redis.call('SET', k, ARGV[3], 'PX', ARGV[4])
return 1
";

/// `ARGV`: token.
pub(super) const RELEASE: &str = r"
local k = KEYS[1]
local v = redis.call('GET', k)
if not v or string.sub(v, 1, 1) ~= 'i' or string.sub(v, 35, 50) ~= ARGV[1] then return 0 end
if string.sub(v, 2, 2) == '1' then
  -- A fenced record stays, with a lease that has run out.
  redis.call('SET', k, string.sub(v, 1, 50) .. '0', 'KEEPTTL')
else
  redis.call('DEL', k)
end
return 1
";

/// `ARGV`: token, lease.
pub(super) const RENEW: &str = r"
local k = KEYS[1]
local lease = tonumber(ARGV[2])
local v = redis.call('GET', k)
if not v or string.sub(v, 1, 1) ~= 'i' or string.sub(v, 35, 50) ~= ARGV[1] then return 0 end
if string.sub(v, 2, 2) == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', k, string.sub(v, 1, 50) .. (now + lease), 'KEEPTTL')
  if redis.call('PTTL', k) < lease then redis.call('PEXPIRE', k, lease) end
else
  redis.call('PEXPIRE', k, lease)
end
return 1
";

/// `ARGV`: token, TTL. Answers `1` fenced, `0` lock lost, `2` fenced before.
pub(super) const FENCE: &str = r"
local k = KEYS[1]
local v = redis.call('GET', k)
if not v or string.sub(v, 1, 1) ~= 'i' or string.sub(v, 35, 50) ~= ARGV[1] then return 0 end
if string.sub(v, 2, 2) == '1' then return 2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = redis.call('PTTL', k)
redis.call('SET', k, 'i1' .. string.sub(v, 3, 50) .. (now + lease), 'KEEPTTL')
if lease < tonumber(ARGV[2]) then redis.call('PEXPIRE', k, ARGV[2]) end
return 1
";
