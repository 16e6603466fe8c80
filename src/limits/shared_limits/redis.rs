//! Shared limits over Redis (blocking client, no async runtime).
//!
//! Redis keys, per API key (named by `h`, an HMAC-SHA-256 of the key keyed with the
//! namespace, truncated to 128 bits: never the key, not reversible), all with the hash
//! tag `{ns}` (literal braces around the namespace: one Redis Cluster slot per
//! namespace, so every script's keys are on one node):
//! - `kp:{ns}:h:leases`: sorted set of lease ids scored by expiry (Redis time, ms);
//! - `kp:{ns}:h:rate`: GCRA "theoretical arrival times" of `rpm` (`r`) and `tpm` (`t`);
//! - `kp:{ns}:h:state`: `cool_until` (ms) and `disabled` (reason), with a TTL;
//! - `kp:{ns}:h:day`: the daily quota's count (`rpd`): `day` (the UTC day on Redis's
//!   clock) and `n` (requests counted that day), expiring when that day ends;
//! - `kp:{ns}:h:aimd`: the shared learned limit of an adaptive key;
//! - `kp:{ns}:h:charge`: what each lease was charged (its refund gives back no more);
//! - `kp:{ns}:h:gone`: released lease ids (tombstones: a late renewal or ACQUIRE of a
//!   released id does nothing);
//! - `kp:{ns}:h:models`: model cooldowns at the key (issue 28): field the model's name
//!   as sent to the key (at most [`MODEL_NAME_MAX`] bytes, [`MODELS_MAX`] fields),
//!   value the end of its cooldown (Redis time, ms); the hash expires with its
//!   longest cooldown. Published on `kp:{ns}:models` too, so each process records it
//!   in its own `ModelVerdicts` and admissions never ask Redis about models.
//!
//! Per group (account), named by `gh`, an HMAC of the group's name under its own label
//! (see `GroupInfo`): `kp:{ns}:gh:leases` (its member keys' leases, same ids),
//! `kp:{ns}:gh:state` (`cool_until`), `kp:{ns}:gh:rate` (its GCRA) and
//! `kp:{ns}:gh:day` (its daily count), checked and taken in the same scripts as the
//! member key's.
//!
//! Every decision is one Lua script run atomically by Redis, on Redis's clock (`TIME`),
//! so hosts need no synchronised clocks: scripts answer waits as durations.
//!
//! Threads (per pool, only in shared mode):
//! - `keypool-lease-renew`: renews this process's leases every `lease_ms / 3` while it
//!   holds any, and, while Redis is unreachable, reconnects every second (registering
//!   the running requests, replaying queued releases): the only thread that connects
//!   after the start, so admissions never wait for a connection. Sleeps on a channel
//!   (no timeout) while there is nothing to do;
//! - `keypool-shared-sub`: subscribed to `kp:{ns}:released`, nudges the dispatcher when
//!   a process gives back a lease of a key that was full; subscribed to
//!   `kp:{ns}:models`, records a model cooldown another process saw at one of this
//!   pool's keys (and loads the live ones from `kp:{ns}:h:models` at each
//!   (re)subscription, so none published while it was away is missed). Its socket read timeout (1 s)
//!   only checks for shutdown; admissions never wait for it: a refused admission also
//!   carries a known instant to ask again (at most [`BUSY_RECHECK`] away) in case a
//!   message is lost while the subscriber reconnects.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;
use redis::{Script, Value};

use super::{DayCounts, SharedAdmit, SharedLimits};
use crate::admission::KeyVerdict;
use crate::config::Config;
use crate::error::Error;
use crate::shared_config::{OnUnavailable, SharedConfig, redact_url};

/// The longest a dispatcher waits on a full shared key before asking again, should the
/// release notification be lost (the subscriber reconnecting).
const BUSY_RECHECK: Duration = Duration::from_millis(200);
/// While Redis is unreachable, the renewer tries to reconnect this often (admissions
/// meanwhile follow `on_unavailable` at once: they never connect).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// A key disabled (401/403) or parked (402) stays so in Redis this long after the last
/// process saw it fail.
const DISABLED_TTL_MS: u64 = 3_600_000;
/// A model name longer than this (bytes, as sent to the key) is not shared: its
/// cooldown holds in the process that saw it only. Bounds Redis's keys and messages.
const MODEL_NAME_MAX: usize = 256;
/// At most this many live model cooldowns are kept per key in Redis (expired ones are
/// dropped first); past it a new one is still published, not stored.
const MODELS_MAX: usize = 64;

/// Records a model cooldown at keys and publishes it. KEYS: each key's models hash.
/// ARGV: cooldown ms, channel, MODELS_MAX, then for each key its hash and the model's
/// name as sent to it. A longer cooldown already stored stays (and is what is
/// published). Message: `<key hash> <ms left> <model>`.
const MODEL_COOL: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cd = tonumber(ARGV[1])
local cap = tonumber(ARGV[3])
local u = now + cd
for i, k in ipairs(KEYS) do
  local h, name = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local cur = tonumber(redis.call('HGET', k, name) or '0') or 0
  if u > cur then
    if cur == 0 and redis.call('HLEN', k) >= cap then
      local all = redis.call('HGETALL', k)
      for j = 1, #all, 2 do
        if (tonumber(all[j + 1]) or 0) <= now then redis.call('HDEL', k, all[j]) end
      end
    end
    if cur > 0 or redis.call('HLEN', k) < cap then
      redis.call('HSET', k, name, string.format('%d', u))
      if redis.call('PTTL', k) < cd then redis.call('PEXPIRE', k, cd) end
    end
  end
  redis.call('PUBLISH', ARGV[2], h .. ' ' .. string.format('%d', math.max(u, cur) - now) .. ' ' .. name)
end
return 0
"#;

/// Drops expired leases, then admits if the key is not disabled or cooling, has a free
/// slot, has budget and has not spent its daily quota — and, for a key of a group
/// (account), if the group is not cooling, has a free slot, has budget and has not spent
/// its daily quota too; takes the key's lease, budget and a request of its quota and
/// the group's (the same lease id in the group's set) in the same step, or nothing.
/// With `adaptive` ('1'), the key's slots are capped at its shared learned limit
/// (`kp:{ns}:{h}:aimd`: `limit`, a float ≥ 1, and `cuts`, the number of cuts so far).
/// A daily quota (`rpd`) is a hash `day` (the UTC day on Redis's clock, days since the
/// Unix epoch) and `n` (requests counted that day), expiring when that day ends.
/// KEYS: leases, state, rate, aimd, day[, group leases, group state, group rate, group
/// day], charge (each lease's charge: `cjson` {rpm ms, tpm ms, group rpm ms, group tpm
/// ms, day counted at the key (0: none), day counted at the group}), gone.
/// ARGV: max, lease id (chosen by the client, reused if the reply is lost), lease_ms,
/// rpm, tpm, tokens, adaptive, rpd (0: none)[, group max (0: none), group rpm, group
/// tpm, group rpd]. Returns {0, cuts, day, n, group n} admitted (cuts: the learned
/// limit's cut count now; n: the day's count with this request, 0 without a quota) —
/// {0, cuts} when this id already holds a live lease, with nothing taken twice —
/// {1, wait_ms} full (key or group), {2, wait_ms} cooling, {3, 0, reason} disabled,
/// {4, wait_ms} out of rate budget (key or group), {5, wait_ms} the group (account)
/// cooling, {6, 0} this id was released already, {7, ms_left} the key's daily quota
/// is spent until the day ends (ms_left away), {8, ms_left} the group's.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grp = #KEYS >= 11
local charge = KEYS[#KEYS - 1]
local gone = KEYS[#KEYS]
-- Idempotent: a lease id already released is never taken again (a late copy of this
-- call), and one already taken is admitted again without a second charge (a retry).
if redis.call('ZSCORE', gone, ARGV[2]) then return {6, 0} end
local mine = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]) or '0') or 0
if mine > now then
  return {0, tonumber(redis.call('HGET', KEYS[4], 'cuts') or '0') or 0}
end
local dis = redis.call('HGET', KEYS[2], 'disabled')
if dis then return {3, 0, dis} end
-- Daily quotas: the UTC day on Redis's clock, the ms left in it, today's counts.
local day = math.floor(now / 86400000)
local left = math.max(1, (day + 1) * 86400000 - now)
local function today(dk)
  if tonumber(redis.call('HGET', dk, 'day') or '-1') ~= day then return 0 end
  return tonumber(redis.call('HGET', dk, 'n') or '0') or 0
end
local rpd = tonumber(ARGV[8])
local grpd = grp and tonumber(ARGV[12]) or 0
local used, gused = 0, 0
if rpd > 0 then
  used = today(KEYS[5])
  if used >= rpd then return {7, left} end
end
if grpd > 0 then
  gused = today(KEYS[9])
  if gused >= grpd then return {8, left} end
end
local cool = tonumber(redis.call('HGET', KEYS[2], 'cool_until') or '0') or 0
if cool > now then return {2, cool - now} end
if grp then
  local gcool = tonumber(redis.call('HGET', KEYS[7], 'cool_until') or '0') or 0
  if gcool > now then return {5, gcool - now} end
end
local function full(leases, max)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('ZCARD', leases) >= max then
    local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
    return math.max(1, (tonumber(first[2]) or now) - now)
  end
  return nil
end
local max = tonumber(ARGV[1])
local cuts = 0
if ARGV[7] == '1' then
  local lim = tonumber(redis.call('HGET', KEYS[4], 'limit') or '1') or 1
  cuts = tonumber(redis.call('HGET', KEYS[4], 'cuts') or '0') or 0
  max = math.min(max, math.max(1, math.floor(lim)))
end
local w = full(KEYS[1], max)
if w then return {1, w} end
if grp then
  -- Pruned even without a limit: a crashed process's leases leave the set.
  local gmax = tonumber(ARGV[9])
  w = full(KEYS[6], gmax > 0 and gmax or math.huge)
  if w then return {1, w} end
end
-- tpm: a request bigger than the one-second burst may start once the budget is clear
-- (it could never start otherwise) but is charged in full: the key goes into debt, at
-- most one minute's worth, like the local bucket.
local tokens = tonumber(ARGV[6])
local function budget(rate, rpm, tpm)
  local wait, rtat, ttat, rc, tc = 0, nil, nil, 0, 0
  if rpm > 0 then
    local T = 60000 / rpm
    local tat = math.max(tonumber(redis.call('HGET', rate, 'r') or '0') or 0, now)
    if tat > now then wait = tat - now else rtat = tat + T; rc = T end
  end
  if tpm > 0 then
    local T = 60000 / tpm
    local cap = math.max(math.ceil(tpm / 60), 1)
    local tau = cap * T
    local need = math.min(tokens, cap) * T
    local tat = math.max(tonumber(redis.call('HGET', rate, 't') or '0') or 0, now)
    if tat + need - now > tau then wait = math.max(wait, tat + need - tau - now)
    else ttat = math.min(tat + tokens * T, now + 60000); tc = ttat - tat end
  end
  return wait, rtat, ttat, rc, tc
end
local wait, rtat, ttat, rc, tc = budget(KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
local gwait, grtat, gttat, grc, gtc = 0, nil, nil, 0, 0
if grp then
  gwait, grtat, gttat, grc, gtc = budget(KEYS[8], tonumber(ARGV[10]), tonumber(ARGV[11]))
end
wait = math.max(wait, gwait)
if wait > 0 then return {4, math.max(1, math.ceil(wait))} end
local lease_ms = tonumber(ARGV[3])
local function take(leases, rate, r, tt)
  redis.call('ZADD', leases, now + lease_ms, ARGV[2])
  redis.call('PEXPIRE', leases, lease_ms * 2)
  if r then redis.call('HSET', rate, 'r', tostring(r)) end
  if tt then redis.call('HSET', rate, 't', tostring(tt)) end
  if r or tt then redis.call('PEXPIRE', rate, 180000) end
end
take(KEYS[1], KEYS[3], rtat, ttat)
if grp then take(KEYS[6], KEYS[8], grtat, gttat) end
-- One request of a daily quota, counted for today (a new day starts from 0).
local function count(dk, n)
  if n == 0 then redis.call('HSET', dk, 'day', day, 'n', 1)
  else redis.call('HINCRBY', dk, 'n', 1) end
  redis.call('PEXPIRE', dk, left)
  return n + 1
end
local kd, gd = 0, 0
if rpd > 0 then used = count(KEYS[5], used); kd = day end
if grpd > 0 then gused = count(KEYS[9], gused); gd = day end
-- What this lease was charged (ms of each GCRA, the day of each quota), so a refund
-- or a correction gives back no more than that.
if rc + tc + grc + gtc + kd + gd > 0 then
  redis.call('HSET', charge, ARGV[2], cjson.encode({rc, tc, grc, gtc, kd, gd}))
  redis.call('PEXPIRE', charge, math.max(180000, lease_ms * 2))
end
return {0, cuts, day, used, gused}
"#;

/// The Lua function `unday(dk, d)` that SETTLE and CHARGE share: gives back one
/// request of daily quota `dk` counted on day `d` (0: none), if that day is still the
/// one counted.
macro_rules! unday_lua {
    () => {
        r#"local function unday(dk, d)
  d = tonumber(d) or 0
  if d > 0 and tonumber(redis.call('HGET', dk, 'day') or '-1') == d
    and (tonumber(redis.call('HGET', dk, 'n') or '0') or 0) > 0 then
    redis.call('HINCRBY', dk, 'n', -1)
  end
end"#
    };
}

/// Ends an admission or corrects a budget, in one step. KEYS: leases, state, rate,
/// aimd, day[, group leases, group state, group rate, group day], charge, gone (the
/// key's released lease ids, scored by expiry: tombstones a renewal respects).
/// ARGV: lease id ('' for none), max, cooldown_ms (0 none), disable reason ('' none),
/// rpm, rpm delta (requests), tpm, tpm delta (tokens), channel, key hash, disabled TTL,
/// adaptive ('1'), outcome ('r' a 429, 's' a success, '' neither), the admission's cut
/// count[, group max (0 none), group cooldown_ms (0 none), group rpm, group tpm, group
/// hash], refund ('1': give the lease's recorded charge back — an admission whose reply
/// was lost —, its daily quotas' request too if still the same day), tombstone lifetime
/// (ms). The shared learned limit (AIMD, as `adaptive.rs` without its probe pacing):
/// a success while the key used its whole limit adds 1/limit (up to max); a 429 of an
/// admission made since the last cut multiplies it by 0.8 (at least 1) — once per
/// overshoot, whichever process sees the 429s. A lease given back to a full key or a
/// full group is published on the channel (processes waiting for a slot look again).
const SETTLE: &str = concat!(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grp = #KEYS >= 11
local charge = KEYS[#KEYS - 1]
local gone = KEYS[#KEYS]
"#,
    unday_lua!(),
    r#"
if ARGV[1] ~= '' then
  local max = tonumber(ARGV[2])
  local count = redis.call('ZCARD', KEYS[1])
  local lim = max
  if ARGV[12] == '1' then
    local l = tonumber(redis.call('HGET', KEYS[4], 'limit') or '1') or 1
    local cuts = tonumber(redis.call('HGET', KEYS[4], 'cuts') or '0') or 0
    lim = math.min(max, math.max(1, math.floor(l)))
    if ARGV[13] == 'r' and tonumber(ARGV[14]) >= cuts then
      redis.call('HSET', KEYS[4], 'limit', tostring(math.max(1, l * 0.8)), 'cuts', cuts + 1)
    elseif ARGV[13] == 's' and count >= lim and l < max then
      redis.call('HSET', KEYS[4], 'limit', tostring(math.min(max, l + 1 / lim)))
    end
    redis.call('PEXPIRE', KEYS[4], 86400000)
  end
  local removed = redis.call('ZREM', KEYS[1], ARGV[1])
  -- A lease whose admission never got its answer gives its charge back.
  local c = redis.call('HGET', charge, ARGV[1])
  if c and removed == 1 and ARGV[#ARGV - 1] == '1' then
    local ch = cjson.decode(c)
    local function back(rate, field, d)
      local tat = tonumber(redis.call('HGET', rate, field) or '0') or 0
      if d > 0 and tat > 0 then redis.call('HSET', rate, field, tostring(tat - d)) end
    end
    back(KEYS[3], 'r', ch[1])
    back(KEYS[3], 't', ch[2])
    if grp then back(KEYS[8], 'r', ch[3]); back(KEYS[8], 't', ch[4]) end
    unday(KEYS[5], ch[5])
    if grp then unday(KEYS[9], ch[6]) end
  end
  if c then redis.call('HDEL', charge, ARGV[1]) end
  -- A tombstone: a renewal that copied this id before the release never re-adds it.
  local ttl = tonumber(ARGV[#ARGV])
  redis.call('ZREMRANGEBYSCORE', gone, '-inf', now)
  redis.call('ZADD', gone, now + ttl, ARGV[1])
  redis.call('PEXPIRE', gone, ttl)
  if count >= lim and removed == 1 then redis.call('PUBLISH', ARGV[9], ARGV[10]) end
  if grp then
    local gmax = tonumber(ARGV[15])
    local gcount = redis.call('ZCARD', KEYS[6])
    local gremoved = redis.call('ZREM', KEYS[6], ARGV[1])
    if gmax > 0 and gcount >= gmax and gremoved == 1 then
      redis.call('PUBLISH', ARGV[9], ARGV[19])
    end
  end
end
local function cool(state, cd)
  if cd > 0 then
    local u = now + cd
    local cur = tonumber(redis.call('HGET', state, 'cool_until') or '0') or 0
    if u > cur then redis.call('HSET', state, 'cool_until', u) end
    if redis.call('PTTL', state) < cd + 1000 then redis.call('PEXPIRE', state, cd + 1000) end
  end
end
cool(KEYS[2], tonumber(ARGV[3]))
if grp then cool(KEYS[7], tonumber(ARGV[16])) end
if ARGV[4] ~= '' then
  redis.call('HSETNX', KEYS[2], 'disabled', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[11]))
end
local function shift(rate, field, per_min, delta)
  if per_min > 0 and delta ~= 0 then
    local tat = tonumber(redis.call('HGET', rate, field) or '0') or 0
    if tat > 0 then
      tat = math.min(tat + delta * 60000 / per_min, now + 60000)
      redis.call('HSET', rate, field, tostring(tat))
    end
  end
end
shift(KEYS[3], 'r', tonumber(ARGV[5]), tonumber(ARGV[6]))
shift(KEYS[3], 't', tonumber(ARGV[7]), tonumber(ARGV[8]))
if grp then
  shift(KEYS[8], 'r', tonumber(ARGV[17]), tonumber(ARGV[6]))
  shift(KEYS[8], 't', tonumber(ARGV[18]), tonumber(ARGV[8]))
end
return 0
"#
);

/// Gives back (refund) or corrects (tpm: estimated vs actual tokens) the charge of one
/// lease, recorded by `ACQUIRE`: a refund returns exactly what was charged, and a
/// correction never takes the charge below zero — so neither erases other requests'
/// debt; a refund gives back the request of each daily quota the lease counted, if
/// still the same UTC day. KEYS: rate, charge, day[, group rate, group day]. ARGV: lease
/// id, refund ('1') or correct (''), tokens delta (correct), tpm, group tpm, actual
/// tokens (correct). Without a record (a fallback slot, or one older than the record's
/// lifetime) only a positive correction applies.
const CHARGE: &str = concat!(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grp = #KEYS >= 5
"#,
    unday_lua!(),
    r#"
local function move(rate, field, d)
  if d == 0 then return 0 end
  local tat = tonumber(redis.call('HGET', rate, field) or '0') or 0
  if tat <= 0 then return 0 end
  local n = math.min(tat + d, now + 60000)
  redis.call('HSET', rate, field, tostring(n))
  return n - tat
end
local c = redis.call('HGET', KEYS[2], ARGV[1])
local d = tonumber(ARGV[3])
local tpm, gtpm = tonumber(ARGV[4]), tonumber(ARGV[5])
if not c then
  if ARGV[2] ~= '1' and d > 0 then
    if tpm > 0 then move(KEYS[1], 't', d * 60000 / tpm) end
    if grp and gtpm > 0 then move(KEYS[4], 't', d * 60000 / gtpm) end
  end
  return 0
end
local ch = cjson.decode(c)
if ARGV[2] == '1' then
  move(KEYS[1], 'r', -ch[1])
  move(KEYS[1], 't', -ch[2])
  if grp then move(KEYS[4], 'r', -ch[3]); move(KEYS[4], 't', -ch[4]) end
  unday(KEYS[3], ch[5])
  if grp then unday(KEYS[5], ch[6]) end
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
-- The charge becomes what the actual count costs (still at most a minute's debt).
local actual = tonumber(ARGV[6])
if tpm > 0 then ch[2] = ch[2] + move(KEYS[1], 't', actual * 60000 / tpm - ch[2]) end
if grp and gtpm > 0 then
  ch[4] = ch[4] + move(KEYS[4], 't', actual * 60000 / gtpm - ch[4])
end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(ch))
return 1
"#
);

/// Adds to daily quotas' counts the requests a process admitted on fallback slots
/// while Redis was unreachable (see `Unsynced`). KEYS: the quotas' `day` hashes. ARGV:
/// for each, the UTC day it counted (the process's clock) and how many. A day other
/// than Redis's today adds nothing (it is over there, or not begun).
const DAY_ADD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(now / 86400000)
local left = math.max(1, (day + 1) * 86400000 - now)
for i, dk in ipairs(KEYS) do
  local n = tonumber(ARGV[2 * i])
  if tonumber(ARGV[2 * i - 1]) == day and n > 0 then
    if tonumber(redis.call('HGET', dk, 'day') or '-1') == day then
      redis.call('HINCRBY', dk, 'n', n)
    else
      redis.call('HSET', dk, 'day', day, 'n', n)
    end
    redis.call('PEXPIRE', dk, left)
  end
end
return 0
"#;

/// Renews this process's leases of one key (re-adding any Redis lost, e.g. in a
/// restart: those requests are still running) in every set of KEYS but the first: the
/// key's leases and, for a key of a group, the group's — except a lease released
/// meanwhile (its id is in KEYS[1], the key's tombstones: the renewal copied it before
/// the release ran). ARGV: lease_ms, ids…
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
local live = {}
for i = 2, #ARGV do
  local dead = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not dead or tonumber(dead) <= now then live[#live + 1] = ARGV[i] end
end
for k = 2, #KEYS do
  for _, id in ipairs(live) do redis.call('ZADD', KEYS[k], now + lease_ms, id) end
  redis.call('PEXPIRE', KEYS[k], lease_ms * 2)
end
return 0
"#;

/// One admission this process holds on a key: a lease id. A slot of the local fallback
/// (taken while Redis was unreachable) has an id too, registered as a lease when Redis
/// answers again, so the requests still running then count against the shared limit.
#[derive(Debug)]
struct Held {
    /// Its number in this pool (`Admission::lease`).
    seq: u64,
    id: String,
    /// Registered in Redis (as far as this process knows): its release must reach Redis.
    in_redis: bool,
    /// The shared learned limit's cut count when admitted (adaptive keys).
    cuts: u64,
    /// The tokens it was admitted for (corrected once known): a refund or a correction
    /// of that many goes to this lease's recorded charge.
    tokens: u64,
    /// Its charge was given back already (`refund`).
    refunded: bool,
    /// A fallback slot counted in its key's (and group's) `Unsynced` on this UTC day
    /// (0: not counted): a refund takes it back there.
    unsynced_day: u64,
}

/// A release (and the attempt's verdict) whose Redis call failed, retried when Redis
/// answers again (see [`Conn::pending`]).
#[derive(Debug)]
struct Pending {
    key: usize,
    lease: Option<String>,
    /// Cool the key until this instant (429), if still ahead when retried.
    cool_until: Option<Instant>,
    /// Cool the key's group (account) until this instant, if still ahead when retried.
    group_cool_until: Option<Instant>,
    disable: String,
    /// Give the lease's recorded charge back (its admission's reply was lost).
    refund: bool,
}

/// At most this many releases wait for Redis to come back; beyond, the oldest is
/// dropped (its lease still expires within `lease_ms`).
const PENDING_CAP: usize = 4096;

/// Local fallback pacing (Redis down, `on_unavailable: local`): a GCRA of the scaled
/// limit, in seconds since the pool started.
#[derive(Debug, Default)]
struct Pace {
    tat: f64,
}

impl Pace {
    /// Admits `cost` units at `per_min` with a burst of `burst` units, or says when.
    fn take(&mut self, now: f64, per_min: f64, cost: f64, burst: f64) -> Result<(), f64> {
        let t = 60.0 / per_min;
        let tat = self.tat.max(now);
        let cost = cost.min(burst);
        if tat + cost * t - now > burst * t + 1e-9 {
            Err(tat + cost * t - burst * t - now)
        } else {
            self.tat = tat + cost * t;
            Ok(())
        }
    }
}

/// What a release tells the shared learned limit (adaptive keys).
#[derive(Debug, Clone, Copy)]
struct Aimd {
    /// "r": a 429; "s": a success; "": neither.
    outcome: &'static str,
    /// The admission's cut count.
    cuts: u64,
}

impl Aimd {
    const NONE: Aimd = Aimd {
        outcome: "",
        cuts: 0,
    };
}

struct KeyInfo {
    leases: String,
    /// Released lease ids (tombstones, see `SETTLE`).
    gone: String,
    /// Each lease's charge (see `ACQUIRE`).
    charge: String,
    aimd: String,
    adaptive: bool,
    state: String,
    rate: String,
    /// Its daily count (see `ACQUIRE`).
    day: String,
    hash: String,
    max: usize,
    rpm: u64,
    tpm: u64,
    /// Requests per UTC day (0: none).
    rpd: u64,
    /// The key's group (account), an index into `Inner::groups`.
    group: Option<usize>,
    /// Its model cooldowns (see the module's doc).
    models: String,
    /// Its `model_map` (the name a request asks for → the name sent to this key).
    model_map: std::collections::BTreeMap<String, String>,
}

impl KeyInfo {
    /// The name `model` is sent to this key under.
    fn wire<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_map.get(model).map_or(model, String::as_str)
    }
}

/// A group (account) in Redis, named by `gh`, an HMAC of its name keyed with the
/// namespace (a domain label apart from keys': the two never collide):
/// `kp:{ns}:{gh}:leases` (the leases of all its keys, same ids as theirs),
/// `kp:{ns}:{gh}:state` (`cool_until`), `kp:{ns}:{gh}:rate` (GCRA of its rpm/tpm) and
/// `kp:{ns}:{gh}:day` (its daily count over all its keys).
struct GroupInfo {
    leases: String,
    state: String,
    rate: String,
    day: String,
    hash: String,
    /// 0: no concurrency limit.
    max: usize,
    rpm: u64,
    tpm: u64,
    /// Requests per UTC day over all its keys (0: none).
    rpd: u64,
}

/// Requests of a daily quota (`rpd`) admitted on fallback slots, which Redis has not
/// counted: the UTC day (this process's clock) and how many. Added to the count in
/// Redis when it answers again (`DAY_ADD`), so other processes see them too.
#[derive(Debug, Default, Clone, Copy)]
struct Unsynced {
    day: u64,
    n: u64,
}

impl Unsynced {
    /// Counts one on `day` (a new day drops an older day's count: over there too).
    fn add(&mut self, day: u64) {
        if self.day != day {
            *self = Unsynced { day, n: 0 };
        }
        self.n += 1;
    }

    /// Takes back a count that could not be added in Redis (unless a later day's
    /// count began meanwhile: that day is over).
    fn merge(&mut self, u: Unsynced) {
        if self.n == 0 {
            *self = u;
        } else if self.day == u.day {
            self.n += u.n;
        }
    }

    /// Takes one back (a fallback slot that never reached the wire), if of `day`.
    fn sub(&mut self, day: u64) {
        if self.day == day {
            self.n = self.n.saturating_sub(1);
        }
    }
}

#[derive(Default)]
struct KeyLocal {
    held: Vec<Held>,
    rpm: Pace,
    tpm: Pace,
    /// Its daily quota's requests admitted on fallback slots, not yet in Redis.
    unsynced: Unsynced,
}

/// A group's (account's) local share while Redis is unreachable: the admissions this
/// process holds on its member keys (the sum of their `KeyLocal::held`, kept in step
/// with them under the key's lock: a key's `KeyLocal`, then its group's, always in that
/// order) and the fallback pacing of the group's scaled `rpm`/`tpm`.
#[derive(Default)]
struct GroupLocal {
    held: usize,
    rpm: Pace,
    tpm: Pace,
    /// Its daily quota's requests admitted on fallback slots, not yet in Redis.
    unsynced: Unsynced,
}

/// The admissions' connection. Admissions, releases and corrections only ever use
/// it as it is: while it is `None` they follow `on_unavailable` (or queue) without a
/// network call. Only the renewer thread connects, registers and replays (see
/// [`Inner::reconnect`]), never under a gate's lock nor this one.
struct Conn {
    con: Option<redis::Connection>,
    /// Redis was unreachable at the last attempt (logged once per outage).
    down: bool,
    /// The last failure, masked.
    last_error: String,
    /// Releases whose Redis call failed, oldest first, replayed (in order) by the next
    /// reconnection before it installs its connection. Bounded by [`PENDING_CAP`].
    /// Pushed only under this lock and while `con` is `None`, so every entry meets the
    /// next reconnection.
    pending: std::collections::VecDeque<Pending>,
    /// Releases dropped because the queue was full (logged once per outage).
    dropped: u64,
}

struct Inner {
    client: redis::Client,
    cfg: SharedConfig,
    keys: Vec<KeyInfo>,
    groups: Vec<GroupInfo>,
    local: Vec<Mutex<KeyLocal>>,
    /// One per group, as `groups`.
    group_local: Vec<Mutex<GroupLocal>>,
    conn: Mutex<Conn>,
    acquire: Script,
    settle: Script,
    renew: Script,
    charge: Script,
    day_add: Script,
    model_cool: Script,
    channel: String,
    /// Where model cooldowns are published (see the module's doc).
    models_channel: String,
    /// The pool's model verdicts, where other processes' are recorded.
    verdicts: Arc<crate::model_verdicts::ModelVerdicts>,
    /// Key hash → the indices of this pool's keys with it.
    by_hash: std::collections::HashMap<String, Vec<usize>>,
    /// Unique per pool: prefixes its lease ids.
    token: String,
    next_lease: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

/// The Redis implementation of [`SharedLimits`].
pub(crate) struct RedisLimits {
    inner: Arc<Inner>,
    renew_tx: Option<Sender<()>>,
    stop_tx: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

/// HMAC-SHA-256 of `value` keyed with `label` and the namespace, 128 bits in hex.
fn hmac_hex(label: &str, namespace: &str, value: &str) -> String {
    let k = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        format!("{label}\0{namespace}").as_bytes(),
    );
    let tag = ring::hmac::sign(&k, value.as_bytes());
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name of an API key in Redis: HMAC-SHA-256 keyed with the namespace, 128 bits.
pub(crate) fn key_hash(namespace: &str, api_key: &str) -> String {
    hmac_hex("keypool shared limits v1", namespace, api_key)
}

/// The name of a group (account) in Redis: like [`key_hash`], under its own label.
pub(crate) fn group_hash(namespace: &str, group: &str) -> String {
    hmac_hex("keypool shared groups v1", namespace, group)
}

impl Inner {
    fn mask(&self, msg: String) -> String {
        if self.cfg.redis_url.is_empty() {
            msg
        } else {
            msg.replace(&self.cfg.redis_url, &redact_url(&self.cfg.redis_url))
        }
    }

    /// Runs `f` on the admissions' connection. `None` while Redis is unreachable — at
    /// once, without a connection attempt (the renewer reconnects) — or if the call
    /// fails (the failure is recorded and the connection dropped).
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        self.with_conn_else(f, |_| {})
    }

    /// [`Inner::with_conn`], running `on_fail` under the connection's lock (with the
    /// connection dropped) when Redis is unreachable or the call fails.
    fn with_conn_else<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
        on_fail: impl FnOnce(&mut Conn),
    ) -> Option<T> {
        let mut c = self.conn.lock();
        let r = match c.con.as_mut().map(f) {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                self.fail(&mut c, e);
                None
            }
            None => None,
        };
        if r.is_none() {
            on_fail(&mut c);
        }
        r
    }

    /// A new connection with the configured timeouts, checked with a `PING` (a Redis
    /// that accepts connections but never answers is unreachable). On Redis Cluster, a
    /// connection to the node that serves the namespace's slot (every key of a
    /// namespace shares one hash tag): the configured node answers a keyed command
    /// with `MOVED` otherwise, and that node is used — again at every reconnection, so
    /// a failover or a resharding is followed.
    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let open = |client: &redis::Client| -> redis::RedisResult<redis::Connection> {
            let mut con = client.get_connection_with_timeout(timeout)?;
            con.set_read_timeout(Some(timeout))?;
            con.set_write_timeout(Some(timeout))?;
            redis::cmd("PING").query::<String>(&mut con)?;
            Ok(con)
        };
        let mut con = open(&self.client)?;
        let probe = format!("kp:{{{}}}:slot", self.cfg.namespace);
        match redis::cmd("PTTL").arg(&probe).query::<i64>(&mut con) {
            Ok(_) => Ok(con),
            Err(e) => {
                let Some((node, _)) = e.redirect_node() else {
                    return Err(e);
                };
                let Some((host, port)) = node
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse().ok()?)))
                else {
                    return Err(e);
                };
                let info = self.client.get_connection_info().clone();
                let addr = match info.addr() {
                    redis::ConnectionAddr::Tcp(..) => {
                        redis::ConnectionAddr::Tcp(host.to_owned(), port)
                    }
                    redis::ConnectionAddr::TcpTls {
                        insecure,
                        tls_params,
                        ..
                    } => redis::ConnectionAddr::TcpTls {
                        host: host.to_owned(),
                        port,
                        insecure: *insecure,
                        tls_params: tls_params.clone(),
                    },
                    _ => return Err(e),
                };
                let mut con = open(&redis::Client::open(info.set_addr(addr))?)?;
                redis::cmd("PTTL").arg(&probe).query::<i64>(&mut con)?;
                Ok(con)
            }
        }
    }

    /// Brings the admissions' connection back (renewer thread only, no lock held during
    /// a network call): on a new connection, registers every request still running
    /// here as a lease (leases lost in a Redis restart, fallback slots taken during the
    /// outage), then replays the releases queued meanwhile, in order, and installs the
    /// connection once the queue is empty. An entry leaves the queue only once Redis
    /// has taken it. Returns whether Redis is reachable again.
    fn reconnect(&self) -> bool {
        let r = self.connect().and_then(|mut con| {
            for (i, k) in self.keys.iter().enumerate() {
                let ids = self.register_held(i);
                if !ids.is_empty() {
                    self.renew_leases(&mut con, k, &ids)?;
                }
            }
            loop {
                let batch: Vec<Pending> = {
                    let mut c = self.conn.lock();
                    if c.pending.is_empty() {
                        // Fallback slots taken since the registration above: registered
                        // before the connection is installed (no fallback admission can
                        // happen meanwhile: they wait for this lock), so no process
                        // ever sees this one's slots missing once it admits on Redis.
                        // Usually none: no network call under the lock then.
                        for (i, k) in self.keys.iter().enumerate() {
                            let ids: Vec<String> = {
                                let mut l = self.local[i].lock();
                                (l.held.iter_mut())
                                    .filter(|h| !h.in_redis)
                                    .map(|h| {
                                        h.in_redis = true;
                                        h.id.clone()
                                    })
                                    .collect()
                            };
                            if !ids.is_empty() {
                                self.renew_leases(&mut con, k, &ids)?;
                            }
                        }
                        // So are the daily requests counted meanwhile (usually none).
                        self.sync_days(&mut con)?;
                        if c.down {
                            log::info!("keypool: shared limits: Redis is reachable again");
                        }
                        c.con = Some(con);
                        c.down = false;
                        c.dropped = 0;
                        return Ok(());
                    }
                    c.pending.drain(..).collect()
                };
                let mut batch = batch.into_iter();
                while let Some(p) = batch.next() {
                    if let Err(e) = self.replay(&mut con, &p) {
                        // Back at the front, in order, ahead of anything queued since.
                        let mut c = self.conn.lock();
                        for p in batch.rev() {
                            c.pending.push_front(p);
                        }
                        c.pending.push_front(p);
                        while c.pending.len() > PENDING_CAP {
                            c.pending.pop_front();
                            c.dropped += 1;
                        }
                        return Err(e);
                    }
                }
            }
        });
        match r {
            Ok(()) => true,
            Err(e) => {
                self.fail(&mut self.conn.lock(), e);
                false
            }
        }
    }

    /// Replays one queued release on `con`.
    fn replay(&self, con: &mut redis::Connection, p: &Pending) -> redis::RedisResult<i64> {
        let now = Instant::now();
        let left = |at: Option<Instant>| {
            at.map_or(0, |u| {
                u64::try_from(u.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
            })
        };
        let (cooldown_ms, group_cooldown_ms) = (left(p.cool_until), left(p.group_cool_until));
        self.settle_on(
            con,
            p.key,
            p.lease.as_deref(),
            (cooldown_ms, group_cooldown_ms),
            &p.disable,
            p.refund,
            Aimd::NONE,
        )
    }

    fn fail(&self, c: &mut Conn, e: redis::RedisError) {
        let msg = self.mask(format!(
            "Redis at {} unavailable: {e}",
            redact_url(&self.cfg.redis_url)
        ));
        if !c.down {
            log::warn!(
                "keypool: shared limits: {msg}; {}",
                match self.cfg.on_unavailable {
                    OnUnavailable::Local => "using local limits until it is back",
                    OnUnavailable::Fail => "refusing requests until it is back",
                }
            );
        }
        c.con = None;
        c.down = true;
        c.last_error = msg;
    }

    /// How long a released lease's tombstone lives: longer than any renewal that
    /// copied its id before the release can take to reach Redis.
    fn tombstone_ms(&self) -> u64 {
        2 * (self.cfg.lease_ms + self.cfg.timeout_ms)
    }

    /// A lease number (never 0) and id unique to this pool.
    fn lease_id(&self) -> (u64, String) {
        let seq = 1 + self
            .next_lease
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (seq, format!("{}:{seq}", self.token))
    }

    fn acquire(&self, key: usize, tokens: u64) -> (SharedAdmit, bool) {
        let k = &self.keys[key];
        let (seq, id) = self.lease_id();
        let mut sent = false;
        let reply = self.with_conn(|con| {
            let mut inv = self.acquire.key(&k.leases);
            inv.key(&k.state)
                .key(&k.rate)
                .key(&k.aimd)
                .key(&k.day)
                .arg(k.max)
                .arg(&id)
                .arg(self.cfg.lease_ms)
                .arg(k.rpm)
                .arg(k.tpm)
                .arg(tokens)
                .arg(if k.adaptive { "1" } else { "0" })
                .arg(k.rpd);
            if let Some(g) = k.group.map(|g| &self.groups[g]) {
                inv.key(&g.leases)
                    .key(&g.state)
                    .key(&g.rate)
                    .key(&g.day)
                    .arg(g.max)
                    .arg(g.rpm)
                    .arg(g.tpm)
                    .arg(g.rpd);
            }
            inv.key(&k.charge).key(&k.gone);
            sent = true;
            inv.invoke::<Vec<Value>>(con)
        });
        let now = Instant::now();
        let Some(reply) = reply else {
            // The call went out and failed: Redis may have run it (its reply lost), so
            // the lease id may hold a lease there. A fallback slot reuses the id (its
            // registration then renews that lease rather than adding one) and is
            // released in Redis in the end; refused, the id is released at once (or
            // when Redis answers again).
            let admit = self.fallback(key, tokens, now, (seq, id.clone()), sent);
            let held = matches!(admit, SharedAdmit::Yes(s, _) if s == seq);
            if sent && !held {
                self.release(key, Some(id), (None, None), "", Aimd::NONE, true);
            }
            // A fallback slot wakes the renewer too: it registers the slot in Redis
            // as soon as Redis answers.
            return (admit, held);
        };
        let int = |i: usize| match reply.get(i) {
            Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        let after = |ms: u64| now + Duration::from_millis(ms.min(crate::MAX_DURATION_MS));
        let admit = match int(0) {
            0 => {
                let cuts = int(1);
                let mut l = self.local[key].lock();
                l.held.push(Held {
                    seq,
                    id,
                    in_redis: true,
                    cuts,
                    tokens,
                    refunded: false,
                    unsynced_day: 0,
                });
                if let Some(g) = k.group {
                    self.group_local[g].lock().held += 1;
                }
                let day = DayCounts {
                    day: int(2),
                    key: int(3),
                    group: int(4),
                };
                return (SharedAdmit::Yes(seq, day), true);
            }
            1 => SharedAdmit::WakeAt(after(int(1)).min(now + BUSY_RECHECK)),
            2 => SharedAdmit::Cooling(after(int(1))),
            3 => {
                let reason = match reply.get(2) {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => "disabled by another process".to_owned(),
                };
                SharedAdmit::Disabled(reason)
            }
            5 => SharedAdmit::GroupCooling(after(int(1))),
            6 => SharedAdmit::WakeAt(now + BUSY_RECHECK),
            7 => SharedAdmit::Exhausted(Duration::from_millis(int(1).max(1))),
            8 => SharedAdmit::GroupExhausted(Duration::from_millis(int(1).max(1))),
            _ => SharedAdmit::WakeAt(after(int(1))),
        };
        (admit, false)
    }

    /// Admission while Redis is unreachable: the key's limits and its group's, scaled
    /// by `local_share_percent`, counted in this process alone. The slot takes lease id
    /// `id`; `maybe_in_redis`: an ACQUIRE of that id may have run (its reply lost), so
    /// its release must reach Redis.
    fn fallback(
        &self,
        key: usize,
        tokens: u64,
        now: Instant,
        (seq, id): (u64, String),
        maybe_in_redis: bool,
    ) -> SharedAdmit {
        if self.cfg.on_unavailable == OnUnavailable::Fail {
            return SharedAdmit::Unavailable;
        }
        let k = &self.keys[key];
        let pct = u64::from(self.cfg.local_share_percent);
        // Rounded down (at least 1): N processes with a share of 1/N each never hold
        // more than a key's (or an account's) limit together.
        let scaled = |n: u64| (n.saturating_mul(pct) / 100).max(1) as f64;
        let mut l = self.local[key].lock();
        if l.held.len() >= scaled(k.max as u64) as usize {
            return SharedAdmit::WakeAt(now + BUSY_RECHECK);
        }
        // The key's lock, then its group's.
        let group = k
            .group
            .map(|g| (&self.groups[g], self.group_local[g].lock()));
        if let Some((gi, gl)) = &group {
            if gi.max > 0 && gl.held as u64 >= scaled(gi.max as u64) as u64 {
                return SharedAdmit::WakeAt(now + BUSY_RECHECK);
            }
        }
        let t = now.saturating_duration_since(self.epoch).as_secs_f64();
        // Checked on copies first so a refusal by one budget spends neither.
        // One request against a request budget and a token budget (0: none), scaled;
        // the longest wait if either refuses.
        let pace = |rpm: &mut Pace, tpm: &mut Pace, rpm_max: u64, tpm_max: u64| -> f64 {
            let mut wait: f64 = 0.0;
            if rpm_max > 0 {
                if let Err(w) = rpm.take(t, scaled(rpm_max), 1.0, 1.0) {
                    wait = wait.max(w);
                }
            }
            if tpm_max > 0 {
                let per_min = scaled(tpm_max);
                let burst = (per_min / 60.0).ceil().max(1.0);
                if let Err(w) = tpm.take(t, per_min, tokens as f64, burst) {
                    wait = wait.max(w);
                }
            }
            wait
        };
        let (mut rpm, mut tpm) = (Pace { tat: l.rpm.tat }, Pace { tat: l.tpm.tat });
        let mut wait = pace(&mut rpm, &mut tpm, k.rpm, k.tpm);
        let mut group = group.map(|(gi, gl)| {
            let paces = (Pace { tat: gl.rpm.tat }, Pace { tat: gl.tpm.tat });
            (gi, gl, paces)
        });
        if let Some((gi, _, (grpm, gtpm))) = group.as_mut() {
            wait = wait.max(pace(grpm, gtpm, gi.rpm, gi.tpm));
        }
        if wait > 0.0 {
            return SharedAdmit::WakeAt(
                now + crate::admission::secs_saturating(wait, Duration::from_secs(60)),
            );
        }
        l.rpm = rpm;
        l.tpm = tpm;
        // A request of each daily quota that Redis did not count (unless its ACQUIRE
        // may have run): added there when it answers again.
        let day = crate::admission::utc_day().0;
        let mut unsynced_day = 0;
        if k.rpd > 0 && !maybe_in_redis {
            l.unsynced.add(day);
            unsynced_day = day;
        }
        if let Some((gi, mut gl, (grpm, gtpm))) = group {
            gl.rpm = grpm;
            gl.tpm = gtpm;
            gl.held += 1;
            if gi.rpd > 0 && !maybe_in_redis {
                gl.unsynced.add(day);
                unsynced_day = day;
            }
        }
        l.held.push(Held {
            seq,
            id,
            in_redis: maybe_in_redis,
            cuts: 0,
            tokens,
            refunded: false,
            unsynced_day,
        });
        // Counted by the gate alone (its `rpd`, this process's requests).
        SharedAdmit::Yes(seq, DayCounts::default())
    }

    /// Ends an admission (gives `lease` back, publishes the verdict) in Redis; if Redis
    /// cannot take it now, queues it for the next reconnection (bounded: the oldest
    /// entry is dropped when full, its lease then expires within `lease_ms`).
    /// A release queued for a later reconnection carries no learned-limit outcome: the
    /// shared limit then misses that one step.
    fn release(
        &self,
        key: usize,
        lease: Option<String>,
        (cooldown, group_cooldown): (Option<Duration>, Option<Duration>),
        disable: &str,
        aimd: Aimd,
        refund: bool,
    ) {
        let ms = |c: Option<Duration>| {
            c.map_or(0, |d| {
                u64::try_from(d.as_millis())
                    .unwrap_or(u64::MAX)
                    .clamp(1, crate::MAX_DURATION_MS)
            })
        };
        let cooldown_ms = (ms(cooldown), ms(group_cooldown));
        let queued_at = Instant::now();
        let lease_ref = lease.clone();
        self.with_conn_else(
            |con| {
                self.settle_on(
                    con,
                    key,
                    lease_ref.as_deref(),
                    cooldown_ms,
                    disable,
                    refund,
                    aimd,
                )
            },
            |c| {
                if c.pending.len() >= PENDING_CAP {
                    c.pending.pop_front();
                    if c.dropped == 0 {
                        log::warn!(
                            "keypool: shared limits: {PENDING_CAP} releases wait for Redis; \
                             dropping the oldest (their leases expire within lease_ms)"
                        );
                    }
                    c.dropped += 1;
                }
                c.pending.push_back(Pending {
                    key,
                    lease,
                    cool_until: cooldown.and_then(|d| queued_at.checked_add(d)),
                    group_cool_until: group_cooldown.and_then(|d| queued_at.checked_add(d)),
                    disable: disable.to_owned(),
                    refund,
                });
            },
        );
    }

    /// Gives back (`refund`) or corrects by `delta` tokens the charge of a lease this
    /// process holds on key `key`: `lease` if given, else one for `tokens` tokens (the
    /// newest such one, not yet refunded: a correction names no lease). Not retried if
    /// Redis is unreachable (a lost one errs by at most that request).
    fn recharge(&self, key: usize, lease: Option<u64>, tokens: u64, refund: bool, delta: i64) {
        let id = {
            let mut l = self.local[key].lock();
            let open = |h: &Held| h.in_redis && !h.refunded;
            let own = (l.held.iter()).position(|h| lease.is_some_and(|s| s != 0 && h.seq == s));
            if let (true, Some(i)) = (refund, own) {
                // A fallback slot's daily request, not in Redis yet: taken back here.
                let l = &mut *l;
                let h = &mut l.held[i];
                if !h.in_redis && h.unsynced_day != 0 {
                    let day = std::mem::take(&mut h.unsynced_day);
                    l.unsynced.sub(day);
                    if let Some(g) = self.keys[key].group {
                        self.group_local[g].lock().unsynced.sub(day);
                    }
                }
            }
            let at = match own {
                // Its own lease: a fallback slot (never charged in Redis) gives nothing.
                Some(i) => Some(i).filter(|&i| open(&l.held[i])),
                None => (l.held.iter().rposition(|h| open(h) && h.tokens == tokens))
                    .or_else(|| l.held.iter().rposition(open)),
            };
            let Some(h) = at.map(|i| &mut l.held[i]) else {
                return; // a fallback slot: nothing charged in Redis
            };
            if refund {
                h.refunded = true;
            } else {
                h.tokens = tokens.saturating_add_signed(delta);
            }
            h.id.clone()
        };
        let k = &self.keys[key];
        let _ = self.with_conn(|con| {
            let mut inv = self.charge.key(&k.rate);
            inv.key(&k.charge)
                .key(&k.day)
                .arg(&id)
                .arg(if refund { "1" } else { "" })
                .arg(delta)
                .arg(k.tpm);
            match k.group.map(|g| &self.groups[g]) {
                Some(g) => inv.key(&g.rate).key(&g.day).arg(g.tpm),
                None => inv.arg(0),
            };
            inv.arg(tokens.saturating_add_signed(delta));
            inv.invoke::<i64>(con)
        });
    }

    /// The release/correction script on `con`.
    #[allow(clippy::too_many_arguments)]
    fn settle_on(
        &self,
        con: &mut redis::Connection,
        key: usize,
        lease: Option<&str>,
        (cooldown_ms, group_cooldown_ms): (u64, u64),
        disable: &str,
        refund: bool,
        aimd: Aimd,
    ) -> redis::RedisResult<i64> {
        let k = &self.keys[key];
        let mut inv = self.settle.key(&k.leases);
        inv.key(&k.state)
            .key(&k.rate)
            .key(&k.aimd)
            .key(&k.day)
            .arg(lease.unwrap_or(""))
            .arg(k.max)
            .arg(cooldown_ms)
            .arg(disable)
            .arg(k.rpm)
            .arg(0)
            .arg(k.tpm)
            .arg(0)
            .arg(&self.channel)
            .arg(&k.hash)
            .arg(DISABLED_TTL_MS)
            .arg(if k.adaptive { "1" } else { "0" })
            .arg(aimd.outcome)
            .arg(aimd.cuts);
        if let Some(g) = k.group.map(|g| &self.groups[g]) {
            inv.key(&g.leases)
                .key(&g.state)
                .key(&g.rate)
                .key(&g.day)
                .arg(g.max)
                .arg(group_cooldown_ms)
                .arg(g.rpm)
                .arg(g.tpm)
                .arg(&g.hash);
        }
        inv.key(&k.charge)
            .key(&k.gone)
            .arg(if refund { "1" } else { "" })
            .arg(self.tombstone_ms());
        inv.invoke::<i64>(con)
    }

    /// The lease ids of key `i`'s running requests, each marked as known to Redis
    /// (fallback slots too: renewing or recovering registers them).
    fn register_held(&self, i: usize) -> Vec<String> {
        let mut l = self.local[i].lock();
        l.held
            .iter_mut()
            .map(|h| {
                h.in_redis = true;
                h.id.clone()
            })
            .collect()
    }

    /// Renews (or registers) the leases `ids` of key `k`, in its group's set too.
    fn renew_leases(
        &self,
        con: &mut redis::Connection,
        k: &KeyInfo,
        ids: &[String],
    ) -> redis::RedisResult<i64> {
        let mut inv = self.renew.key(&k.gone);
        inv.key(&k.leases);
        if let Some(g) = k.group {
            inv.key(&self.groups[g].leases);
        }
        inv.arg(self.cfg.lease_ms);
        for id in ids {
            inv.arg(id);
        }
        inv.invoke::<i64>(con)
    }

    /// Renews every lease this process holds (registering fallback slots), on the
    /// renewer's own connection `rcon` (connected if needed; dropped on failure, the
    /// pass then ends: the next one retries).
    fn renew_all(&self, rcon: &mut Option<redis::Connection>) {
        for (i, k) in self.keys.iter().enumerate() {
            if self.local[i].lock().held.is_empty() {
                continue;
            }
            let con = match rcon {
                Some(con) => con,
                None => match self.connect() {
                    Ok(con) => rcon.insert(con),
                    Err(_) => return,
                },
            };
            let ids = self.register_held(i);
            if !ids.is_empty() && self.renew_leases(con, k, &ids).is_err() {
                *rcon = None;
                return;
            }
        }
        // Daily requests of fallback slots taken while the connection came back.
        if let Some(con) = rcon.as_mut() {
            if self.sync_days(con).is_err() {
                *rcon = None;
            }
        }
    }

    /// Adds the daily quotas' requests admitted on fallback slots (`Unsynced`) to their
    /// counts in Redis, on `con` (no call if there are none); kept for the next try if
    /// the call fails.
    fn sync_days(&self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        let take = |u: &mut Unsynced| Some(std::mem::take(u)).filter(|u| u.n > 0);
        let keys = (self.local.iter().enumerate())
            .filter_map(|(i, l)| Some((false, i, take(&mut l.lock().unsynced)?)));
        let groups = (self.group_local.iter().enumerate())
            .filter_map(|(g, l)| Some((true, g, take(&mut l.lock().unsynced)?)));
        let taken: Vec<(bool, usize, Unsynced)> = keys.chain(groups).collect();
        if taken.is_empty() {
            return Ok(());
        }
        let mut inv = self.day_add.prepare_invoke();
        for &(group, i, u) in &taken {
            let day = if group {
                &self.groups[i].day
            } else {
                &self.keys[i].day
            };
            inv.key(day).arg(u.day).arg(u.n);
        }
        inv.invoke::<i64>(con).map(|_| ()).inspect_err(|_| {
            for (group, i, u) in taken {
                if group {
                    self.group_local[i].lock().unsynced.merge(u);
                } else {
                    self.local[i].lock().unsynced.merge(u);
                }
            }
        })
    }

    /// Stores and publishes a model cooldown at `keys` (see [`MODEL_COOL`]). Best
    /// effort: never queued while Redis is unreachable (the verdict holds here; the
    /// other processes meet the server's own 429 then).
    fn cool_model(&self, keys: &[usize], model: &str, cooldown: Duration) {
        let ms = u64::try_from(cooldown.as_millis())
            .unwrap_or(u64::MAX)
            .min(crate::MAX_DURATION_MS);
        let keys: Vec<&KeyInfo> = keys
            .iter()
            .filter_map(|&i| self.keys.get(i))
            .filter(|k| k.wire(model).len() <= MODEL_NAME_MAX)
            .collect();
        if ms == 0 || keys.is_empty() {
            return;
        }
        let done = self.with_conn(|con| {
            let mut inv = self.model_cool.prepare_invoke();
            inv.arg(ms).arg(&self.models_channel).arg(MODELS_MAX);
            for k in &keys {
                inv.key(&k.models).arg(&k.hash).arg(k.wire(model));
            }
            inv.invoke::<i64>(con)
        });
        if done.is_none() {
            log::debug!(
                "keypool: shared limits: a model cooldown was not shared (Redis unavailable); \
                 it holds in this process"
            );
        }
    }

    /// Records a model cooldown shared by some process: `model` (as sent to the key
    /// named `hash`) cools for `ms` from now at each of this pool's keys with that
    /// hash — under that name and under every name the key's `model_map` sends as it.
    fn record_model(&self, hash: &str, ms: u64, model: &str) {
        let Some(idx) = self.by_hash.get(hash) else {
            return;
        };
        if model.is_empty() || model.len() > MODEL_NAME_MAX || ms == 0 {
            return;
        }
        let now = Instant::now();
        let until = now
            .checked_add(Duration::from_millis(ms.min(crate::MAX_DURATION_MS)))
            .unwrap_or(now + crate::retry_after::MAX_WAIT);
        let name: Arc<str> = Arc::from(model);
        for &i in idx {
            self.verdicts.cool(i, &name, until);
            for (alias, sent) in &self.keys[i].model_map {
                if sent == model && alias != model {
                    self.verdicts.cool(i, &Arc::from(alias.as_str()), until);
                }
            }
        }
    }

    /// Loads the live model cooldowns of this pool's keys on `con`: one pipeline of
    /// `TIME` and an `HGETALL` of each key's models hash (read only, no script: at most
    /// [`MODELS_MAX`] are taken per key). Returns how many were recorded.
    fn load_models(&self, con: &mut redis::Connection) -> redis::RedisResult<usize> {
        if self.keys.is_empty() {
            return Ok(0);
        }
        let mut p = redis::pipe();
        p.cmd("TIME");
        for k in &self.keys {
            p.cmd("HGETALL").arg(&k.models);
        }
        let mut out = p.query::<Vec<Value>>(con)?.into_iter();
        let Some(Ok((secs, micros))) = out.next().map(redis::from_redis_value::<(u64, u64)>) else {
            return Ok(0);
        };
        let now = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let mut n = 0;
        for (k, v) in self.keys.iter().zip(out) {
            let Ok(live) = redis::from_redis_value::<Vec<(String, String)>>(v) else {
                continue;
            };
            for (name, until) in live.iter().take(MODELS_MAX) {
                let Ok(until) = until.parse::<u64>() else {
                    continue;
                };
                if until > now {
                    self.record_model(&k.hash, until - now, name);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// No connection to Redis (it failed, and no reconnection succeeded since).
    fn is_down(&self) -> bool {
        self.conn.lock().con.is_none()
    }

    fn holds_any(&self) -> bool {
        self.local.iter().any(|l| !l.lock().held.is_empty())
    }
}

impl RedisLimits {
    pub(crate) fn start(
        sc: &SharedConfig,
        config: &Config,
        events: Sender<()>,
        verdicts: Arc<crate::model_verdicts::ModelVerdicts>,
    ) -> Result<RedisLimits, Error> {
        let client = redis::Client::open(sc.redis_url.as_str())
            .map_err(|_| Error::config("shared.redis_url", "not a valid Redis URL"))?;
        let ns = &sc.namespace;
        // Every key of a namespace carries one hash tag, `{ns}`: a script's keys (a key's,
        // its group's) then share one slot, as Redis Cluster requires.
        let tag = format!("kp:{{{ns}}}");
        let groups = config
            .groups
            .iter()
            .map(|g| {
                let hash = group_hash(ns, &g.name);
                GroupInfo {
                    leases: format!("{tag}:{hash}:leases"),
                    state: format!("{tag}:{hash}:state"),
                    rate: format!("{tag}:{hash}:rate"),
                    day: format!("{tag}:{hash}:day"),
                    hash,
                    max: g.max_concurrent.unwrap_or(0),
                    rpm: g.rpm.map_or(0, u64::from),
                    tpm: g.tpm.unwrap_or(0),
                    rpd: g.rpd.map_or(0, u64::from),
                }
            })
            .collect::<Vec<_>>();
        let keys = config
            .keys
            .iter()
            .map(|k| {
                let hash = key_hash(ns, k.key.expose());
                KeyInfo {
                    leases: format!("{tag}:{hash}:leases"),
                    state: format!("{tag}:{hash}:state"),
                    rate: format!("{tag}:{hash}:rate"),
                    day: format!("{tag}:{hash}:day"),
                    aimd: format!("{tag}:{hash}:aimd"),
                    gone: format!("{tag}:{hash}:gone"),
                    charge: format!("{tag}:{hash}:charge"),
                    models: format!("{tag}:{hash}:models"),
                    adaptive: k.adaptive,
                    hash,
                    max: k.max_concurrent,
                    rpm: k.rpm.map_or(0, u64::from),
                    tpm: k.tpm.unwrap_or(0),
                    rpd: k.rpd.map_or(0, u64::from),
                    group: k
                        .group
                        .as_ref()
                        .and_then(|name| config.groups.iter().position(|g| &g.name == name)),
                    model_map: k.model_map.clone(),
                }
            })
            .collect::<Vec<_>>();
        let token = format!("{:016x}{:08x}", fastrand::u64(..), std::process::id());
        let mut by_hash = std::collections::HashMap::<String, Vec<usize>>::new();
        for (i, k) in keys.iter().enumerate() {
            by_hash.entry(k.hash.clone()).or_default().push(i);
        }
        let inner = Arc::new(Inner {
            client: client.clone(),
            cfg: sc.clone(),
            local: keys.iter().map(|_| Mutex::default()).collect(),
            group_local: groups.iter().map(|_| Mutex::default()).collect(),
            keys,
            groups,
            conn: Mutex::new(Conn {
                con: None,
                down: false,
                last_error: String::new(),
                pending: std::collections::VecDeque::new(),
                dropped: 0,
            }),
            acquire: Script::new(ACQUIRE),
            settle: Script::new(SETTLE),
            renew: Script::new(RENEW),
            charge: Script::new(CHARGE),
            day_add: Script::new(DAY_ADD),
            model_cool: Script::new(MODEL_COOL),
            channel: format!("kp:{ns}:released"),
            models_channel: format!("kp:{ns}:models"),
            verdicts,
            by_hash,
            token: token.clone(),
            next_lease: std::sync::atomic::AtomicU64::new(0),
            epoch: Instant::now(),
        });
        // Connect now so a reachable Redis is used from the first request; an
        // unreachable one is not fatal (see `on_unavailable`): the renewer retries.
        // The model cooldowns live now, so the first requests already avoid them (the
        // subscriber loads them again once subscribed: none is missed in between).
        match inner.connect() {
            Ok(mut con) => {
                if let Err(e) = inner.load_models(&mut con) {
                    log::debug!(
                        "keypool: shared limits: loading model cooldowns: {}",
                        inner.mask(e.to_string())
                    );
                }
                inner.conn.lock().con = Some(con);
            }
            Err(e) => inner.fail(&mut inner.conn.lock(), e),
        }
        let (renew_tx, renew_rx) = crossbeam_channel::bounded(1);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .stack_size(256 * 1024)
                .spawn(f)
                .map_err(|e| Error::Spawn {
                    thread: name.to_owned(),
                    message: e.to_string(),
                })
        };
        let r = Arc::clone(&inner);
        threads.push(spawn(
            "keypool-lease-renew",
            Box::new(move || renewer(r, renew_rx)),
        )?);
        let sub = Subscriber {
            client,
            inner: Arc::clone(&inner),
            channel: inner.channel.clone(),
            stop_channel: format!("kp:{ns}:stop:{token}"),
            stop_rx,
            events,
            url: sc.redis_url.clone(),
        };
        match spawn("keypool-shared-sub", Box::new(move || sub.run())) {
            Ok(h) => threads.push(h),
            Err(e) => {
                drop(renew_tx);
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
        Ok(RedisLimits {
            inner,
            renew_tx: Some(renew_tx),
            stop_tx: Some(stop_tx),
            threads,
        })
    }
}

/// The lease renewer: renews this process's leases every `lease_ms / 3` while it holds
/// any, and, while Redis is unreachable, reconnects every [`RECONNECT_AFTER`] (a
/// reconnection registers the requests running here, fallback slots included, and
/// replays the queued releases: see [`Inner::reconnect`]). It is the only thread that
/// connects to Redis after the start, so no admission ever waits for a connection.
/// Sleeps on `rx` (an admission took a lease or a fallback slot, a release was queued,
/// a Redis call failed) while nothing is to be done. Ends when the pool's limits are
/// dropped.
fn renewer(inner: Arc<Inner>, rx: Receiver<()>) {
    let interval = Duration::from_millis(inner.cfg.lease_ms / 3);
    // The renewer's own connection: a slow renewal never holds admissions up.
    let mut rcon: Option<redis::Connection> = None;
    let mut retry_at = Instant::now();
    let mut renew_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if inner.is_down() {
            if now >= retry_at {
                // At most one attempt per RECONNECT_AFTER, successful or not.
                retry_at = now + RECONNECT_AFTER;
                if inner.reconnect() {
                    // Fallback slots taken while it reconnected.
                    inner.renew_all(&mut rcon);
                    renew_at = None;
                }
            }
        } else if renew_at.is_some_and(|at| now >= at) {
            inner.renew_all(&mut rcon);
            renew_at = None;
        }
        let down = inner.is_down();
        if !down && renew_at.is_none() && inner.holds_any() {
            renew_at = Some(Instant::now() + interval);
        }
        let deadline = if down { Some(retry_at) } else { renew_at };
        let woke = match deadline {
            Some(at) => rx.recv_deadline(at),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        if let Err(RecvTimeoutError::Disconnected) = woke {
            return;
        }
    }
}

struct Subscriber {
    client: redis::Client,
    /// For model cooldowns: the keys' names, the pool's verdicts, a loading connection.
    inner: Arc<Inner>,
    channel: String,
    stop_channel: String,
    stop_rx: Receiver<()>,
    events: Sender<()>,
    url: String,
}

impl Subscriber {
    fn stopped(&self) -> bool {
        matches!(self.stop_rx.try_recv(), Err(TryRecvError::Disconnected))
    }

    fn run(self) {
        while !self.stopped() {
            if let Err(e) = self.listen() {
                if self.stopped() {
                    return;
                }
                log::debug!(
                    "keypool: shared limits subscriber: {}",
                    e.to_string().replace(&self.url, &redact_url(&self.url))
                );
                // Reconnect later, or stop at once.
                if let Err(RecvTimeoutError::Disconnected) =
                    self.stop_rx.recv_timeout(RECONNECT_AFTER)
                {
                    return;
                }
            }
        }
    }

    fn listen(&self) -> redis::RedisResult<()> {
        let mut con = self
            .client
            .get_connection_with_timeout(Duration::from_secs(1))?;
        let mut ps = con.as_pubsub();
        ps.set_read_timeout(Some(Duration::from_secs(1)))?;
        ps.subscribe(&self.channel)?;
        ps.subscribe(&self.inner.models_channel)?;
        ps.subscribe(&self.stop_channel)?;
        // Model cooldowns published while we were not listening (subscribed first, so
        // none falls in between): on a connection of their own (this one listens); no
        // script, so an admission script's count in Redis's stats stays its own.
        // Best effort: a failure here leaves them to the server's own answers.
        match self
            .inner
            .connect()
            .and_then(|mut c| self.inner.load_models(&mut c))
        {
            Ok(_) => {}
            Err(e) => log::debug!(
                "keypool: shared limits: loading model cooldowns: {}",
                self.inner.mask(e.to_string())
            ),
        }
        // Anything released while we were not listening: look again.
        let _ = self.events.try_send(());
        loop {
            match ps.get_message() {
                Ok(msg) => {
                    let channel = msg.get_channel_name();
                    if channel == self.stop_channel {
                        return Ok(());
                    }
                    if channel == self.inner.models_channel {
                        self.model_message(msg.get_payload_bytes());
                    }
                    let _ = self.events.try_send(());
                }
                Err(e) if e.is_timeout() => {
                    if self.stopped() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Subscriber {
    /// A model cooldown published by some process: `<key hash> <ms left> <model>`.
    /// Anything else (or a key this pool does not have) is ignored.
    fn model_message(&self, payload: &[u8]) {
        if payload.len() > 32 + 1 + 20 + 1 + MODEL_NAME_MAX {
            return;
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let mut parts = text.splitn(3, ' ');
        let (Some(hash), Some(ms), Some(model)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let Ok(ms) = ms.parse::<u64>() else {
            return;
        };
        self.inner.record_model(hash, ms, model);
    }
}

impl RedisLimits {
    /// Wakes the renewer (a lease or a fallback slot to renew, Redis to reconnect).
    fn wake_renewer(&self) {
        if let Some(tx) = &self.renew_tx {
            let _ = tx.try_send(());
        }
    }

    /// Wakes the renewer if Redis is unreachable: it reconnects.
    fn wake_if_down(&self) {
        if self.inner.is_down() {
            self.wake_renewer();
        }
    }
}

impl SharedLimits for RedisLimits {
    fn acquire(&self, key: usize, tokens: u64) -> SharedAdmit {
        let (admit, held) = self.inner.acquire(key, tokens);
        if held || self.inner.is_down() {
            self.wake_renewer();
        }
        admit
    }

    fn release(&self, key: usize, lease: u64, v: &KeyVerdict) {
        let held = {
            let mut l = self.inner.local[key].lock();
            // Its own lease, whose cut count decides whether a 429 cuts the shared
            // learned limit (an overshoot admitted since the last cut does). Without
            // one (never in practice), a 429 takes the oldest count, anything else the
            // newest.
            let own = l.held.iter().position(|h| lease != 0 && h.seq == lease);
            let pick = own.or_else(|| {
                if v.rate_limited {
                    l.held.iter().enumerate().min_by_key(|(_, h)| h.cuts)
                } else {
                    l.held.iter().enumerate().max_by_key(|(_, h)| h.cuts)
                }
                .map(|(i, _)| i)
            });
            let held = pick.map(|i| l.held.swap_remove(i));
            if let (Some(_), Some(g)) = (&held, self.inner.keys[key].group) {
                let mut gl = self.inner.group_local[g].lock();
                gl.held = gl.held.saturating_sub(1);
            }
            held
        };
        let aimd = Aimd {
            outcome: if v.rate_limited {
                "r"
            } else if v.accepted {
                "s"
            } else {
                ""
            },
            cuts: held.as_ref().map_or(0, |h| h.cuts),
        };
        // A fallback slot never registered in Redis has nothing to give back there.
        let lease = held.filter(|h| h.in_redis).map(|h| h.id);
        let disable = v.disable.as_deref().unwrap_or("");
        if lease.is_none()
            && v.cooldown.is_none()
            && v.group_cooldown.is_none()
            && disable.is_empty()
        {
            return;
        }
        let cooldowns = (v.cooldown, v.group_cooldown);
        self.inner
            .release(key, lease, cooldowns, disable, aimd, false);
        self.wake_if_down();
    }

    fn disable(&self, key: usize, reason: &str) {
        self.inner
            .release(key, None, (None, None), reason, Aimd::NONE, false);
        self.wake_if_down();
    }

    fn refund(&self, key: usize, lease: u64, tokens: u64) {
        let k = &self.inner.keys[key];
        let g = k.group.map(|g| &self.inner.groups[g]);
        if k.rpm == 0
            && k.tpm == 0
            && k.rpd == 0
            && g.is_none_or(|g| g.rpm == 0 && g.tpm == 0 && g.rpd == 0)
        {
            return;
        }
        self.inner.recharge(key, Some(lease), tokens, true, 0);
        self.wake_if_down();
    }

    fn correct_tokens(&self, key: usize, estimated: u64, actual: u64) {
        let k = &self.inner.keys[key];
        let group_tpm = k.group.is_some_and(|g| self.inner.groups[g].tpm > 0);
        if (k.tpm == 0 && !group_tpm) || estimated == actual {
            return;
        }
        let delta = i128::from(actual) - i128::from(estimated);
        let delta = i64::try_from(delta).unwrap_or(if delta > 0 { i64::MAX } else { i64::MIN });
        self.inner.recharge(key, None, estimated, false, delta);
        self.wake_if_down();
    }

    fn cool_model(&self, keys: &[usize], model: &str, cooldown: Duration) {
        self.inner.cool_model(keys, model, cooldown);
        self.wake_if_down();
    }

    fn add_spend(&self, dollars: f64) -> Option<f64> {
        let key = format!("kp:{{{}}}:spend", self.inner.cfg.namespace);
        let total = self.inner.with_conn(|con| {
            if dollars > 0.0 {
                redis::cmd("INCRBYFLOAT")
                    .arg(&key)
                    .arg(dollars)
                    .query::<f64>(con)
            } else {
                redis::cmd("GET")
                    .arg(&key)
                    .query::<Option<f64>>(con)
                    .map(|v| v.unwrap_or(0.0))
            }
        });
        if total.is_none() {
            self.wake_if_down();
        }
        total.filter(|t| t.is_finite())
    }

    fn unavailable_reason(&self) -> String {
        let c = self.inner.conn.lock();
        if c.last_error.is_empty() {
            "Redis unavailable".to_owned()
        } else {
            c.last_error.clone()
        }
    }
}

impl Drop for RedisLimits {
    fn drop(&mut self) {
        self.renew_tx = None;
        self.stop_tx = None;
        // Wake the subscriber at once rather than at its next read timeout.
        let stop_channel = format!("kp:{}:stop:{}", self.inner.cfg.namespace, self.inner.token);
        let _ = self.inner.with_conn(|con| {
            redis::cmd("PUBLISH")
                .arg(&stop_channel)
                .arg(1)
                .query::<i64>(con)
        });
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_hides_the_key() {
        let a = key_hash("team-a", "sk-secret-123");
        assert_eq!(a.len(), 32);
        assert!(!a.contains("secret"));
        assert_eq!(a, key_hash("team-a", "sk-secret-123"));
        assert_ne!(a, key_hash("team-b", "sk-secret-123"));
        assert_ne!(a, key_hash("team-a", "sk-secret-124"));
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// A `redis-server` on a free loopback port, killed on drop; `None` (skip) if it is
    /// not installed, except in CI.
    struct TestRedis(std::process::Child, u16);

    impl TestRedis {
        fn start() -> Option<TestRedis> {
            TestRedis::start_on(free_port())
        }

        fn start_on(port: u16) -> Option<TestRedis> {
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                    panic!("redis-server is not installed, and CI=true")
                }
                Err(_) => {
                    eprintln!("SKIPPED: redis-server not found");
                    return None;
                }
            };
            let r = TestRedis(child, port);
            let t0 = Instant::now();
            while redis::Client::open(r.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_err()
            {
                assert!(t0.elapsed() < Duration::from_secs(10), "redis-server");
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(r)
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.1)
        }

        fn conn(&self) -> redis::Connection {
            redis::Client::open(self.url())
                .unwrap()
                .get_connection()
                .unwrap()
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The lease number of an admission.
    fn yes(a: SharedAdmit) -> u64 {
        match a {
            SharedAdmit::Yes(lease, _) => lease,
            other => panic!("expected Yes, got {other:?}"),
        }
    }

    /// Issue 23.5: a 429 cuts the shared learned limit against its own admission's cut
    /// count. A request admitted before a cut still runs; one admitted after the cut
    /// overshoots again: its 429 cuts again (the old code used the oldest running
    /// admission's count, so no fresh overshoot cut while a stale one ran), and the
    /// stale one's 429 does not.
    #[test]
    fn a_429_cuts_against_its_own_admission() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let l = limits(&redis, false, r#", "adaptive": true"#);
        let mut con = redis.conn();
        let aimd = l.inner.keys[0].aimd.clone();
        let _: () = redis::cmd("HSET")
            .arg(&aimd)
            .arg("limit")
            .arg(4)
            .query(&mut con)
            .unwrap();
        let mut cuts = || -> u64 {
            redis::cmd("HGET")
                .arg(&aimd)
                .arg("cuts")
                .query::<Option<u64>>(&mut con)
                .unwrap()
                .unwrap_or(0)
        };
        let limited = KeyVerdict {
            rate_limited: true,
            ..KeyVerdict::default()
        };
        let stale = yes(l.acquire(0, 0));
        let first = yes(l.acquire(0, 0));
        l.release(0, first, &limited);
        assert_eq!(cuts(), 1);
        let fresh = yes(l.acquire(0, 0)); // admitted since the cut
        l.release(0, fresh, &limited);
        assert_eq!(cuts(), 2, "a fresh overshoot's 429 cuts");
        l.release(0, stale, &limited);
        assert_eq!(cuts(), 2, "a stale overshoot's 429 does not");
    }

    /// Shared limits on one key of `max_concurrent` 2 with the fields `extra` (in group
    /// `g` if `group`).
    fn limits(redis: &TestRedis, group: bool, extra: &str) -> RedisLimits {
        let json = format!(
            r#"{{"base_url": "http://127.0.0.1:9", "keys": [{{"key": "sk-unit", "max_concurrent": 2{extra}{}}}],
                {} "shared": {{"redis_url": "{}", "namespace": "unit", "lease_ms": 3000}}}}"#,
            if group { r#", "group": "g""# } else { "" },
            if group {
                r#""groups": [{"name": "g", "max_concurrent": 2}],"#
            } else {
                ""
            },
            redis.url()
        );
        let config = Config::from_json(&json).unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        RedisLimits::start(config.shared.as_ref().unwrap(), &config, tx, Arc::default()).unwrap()
    }

    /// Issue 23.2: a renewal that copied a lease id before its release ran (the
    /// renewer's RENEW reaching Redis after the SETTLE) does not bring the lease back,
    /// in the key's set nor in its group's.
    #[test]
    fn a_late_renewal_does_not_resurrect_a_released_lease() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let l = limits(&redis, true, "");
        let a = yes(l.acquire(0, 0));
        let ids = l.inner.register_held(0);
        assert_eq!(ids.len(), 1);
        l.release(0, a, &KeyVerdict::default());
        let mut con = redis.conn();
        l.inner
            .renew_leases(&mut con, &l.inner.keys[0], &ids)
            .unwrap();
        let g = l.inner.keys[0].group.unwrap();
        for set in [&l.inner.keys[0].leases, &l.inner.groups[g].leases] {
            let n: usize = redis::cmd("ZCARD").arg(set).query(&mut con).unwrap();
            assert_eq!(n, 0, "{set}: a released lease is back");
        }
        // A lease still held is renewed (re-added if Redis lost it).
        yes(l.acquire(0, 0));
        let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
        let ids = l.inner.register_held(0);
        l.inner
            .renew_leases(&mut con, &l.inner.keys[0], &ids)
            .unwrap();
        let n: usize = redis::cmd("ZCARD")
            .arg(&l.inner.keys[0].leases)
            .query(&mut con)
            .unwrap();
        assert_eq!(n, 1);
    }

    /// Issue 23.6: the tpm charge of a request bigger than a minute's budget is capped
    /// at one minute of debt; its refund gives back exactly that (not the full token
    /// count, which would erase other requests' debt), and a correction to the actual
    /// usage moves the charge, never below zero.
    #[test]
    fn a_refund_or_correction_returns_no_more_than_was_charged() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        // 600 tpm: 100 ms a token, a burst of 10 tokens.
        let l = limits(&redis, false, r#", "tpm": 600"#);
        let mut con = redis.conn();
        let rate = l.inner.keys[0].rate.clone();
        let mut tat = || -> f64 {
            redis::cmd("HGET")
                .arg(&rate)
                .arg("t")
                .query::<String>(&mut con)
                .unwrap()
                .parse()
                .unwrap()
        };
        let now_ms = || -> f64 {
            let (s, us): (u64, u64) = redis::cmd("TIME").query(&mut redis.conn()).unwrap();
            (s * 1000 + us / 1000) as f64
        };
        let t0 = now_ms();
        let a = yes(l.acquire(0, 100_000));
        let charged = tat() - t0;
        assert!((59_000.0..=60_100.0).contains(&charged), "{charged}");
        l.refund(0, a, 100_000);
        let back = tat();
        assert!(back >= t0 - 5.0 && back <= now_ms() + 5.0, "{back} vs {t0}");
        l.release(0, a, &KeyVerdict::default());
        // The same request used 10 tokens: 1 s of budget, not 10,000 s given back.
        let t1 = now_ms();
        let b = yes(l.acquire(0, 100_000));
        l.correct_tokens(0, 100_000, 10);
        let corrected = tat() - t1;
        assert!((950.0..=1_100.0).contains(&corrected), "{corrected}");
        // A correction upward is charged (up to a minute's debt), and given back by a
        // later refund no further than the charge.
        l.correct_tokens(0, 10, 30);
        let up = tat() - t1;
        assert!((2_950.0..=3_100.0).contains(&up), "{up}");
        l.refund(0, b, 30);
        let down = tat();
        assert!(down >= t1 - 5.0 && down <= now_ms() + 5.0, "{down} vs {t1}");
        l.release(0, b, &KeyVerdict::default());
    }

    /// Issue 28: a model cooldown is stored under the name sent to the key (its
    /// `model_map` target), for its duration; a pool started while it is live loads it
    /// and cools the name and every alias that maps to it. Names past the bound, and
    /// keys this pool does not have, change nothing.
    #[test]
    fn a_model_cooldown_is_stored_and_loaded_under_its_sent_name() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let mapped = r#", "model_map": {"fast": "acme/x"}"#;
        let a = limits(&redis, false, mapped);
        a.cool_model(&[0], "fast", Duration::from_millis(1_500));
        let long = "m".repeat(MODEL_NAME_MAX + 1);
        a.cool_model(&[0], &long, Duration::from_millis(1_500));
        let mut con = redis.conn();
        let models = a.inner.keys[0].models.clone();
        let fields: Vec<String> = redis::cmd("HKEYS").arg(&models).query(&mut con).unwrap();
        assert_eq!(fields, ["acme/x"]);
        let ttl: i64 = redis::cmd("PTTL").arg(&models).query(&mut con).unwrap();
        assert!((1..=1_500).contains(&ttl), "{ttl}");
        // A pool started now knows it before its first admission.
        let json = format!(
            r#"{{"base_url": "http://127.0.0.1:9", "keys": [{{"key": "sk-other"}}, {{"key": "sk-unit"{mapped}}}],
                "shared": {{"redis_url": "{}", "namespace": "unit", "lease_ms": 3000}}}}"#,
            redis.url()
        );
        let config = Config::from_json(&json).unwrap();
        let verdicts = Arc::new(crate::model_verdicts::ModelVerdicts::default());
        let (tx, _rx) = crossbeam_channel::unbounded();
        let b = RedisLimits::start(
            config.shared.as_ref().unwrap(),
            &config,
            tx,
            verdicts.clone(),
        )
        .unwrap();
        let now = Instant::now();
        for name in ["acme/x", "fast"] {
            let until = verdicts.cooling_until(1, name).expect(name);
            assert!(until > now + Duration::from_millis(1_000), "{name}");
            assert!(until <= now + Duration::from_millis(1_500), "{name}");
            assert!(verdicts.cooling_until(0, name).is_none(), "{name}");
        }
        assert!(verdicts.cooling_until(1, &long).is_none());
        b.inner.record_model(&"0".repeat(32), 1_000, "y");
        assert!(verdicts.cooling_until(0, "y").is_none());
        assert!(verdicts.cooling_until(1, "y").is_none());
    }

    /// Issue 24.3: a daily quota (`rpd`) is one count in Redis for every pool sharing
    /// the key (or the group), on Redis's UTC day, in a hash that expires when the day
    /// ends; an admission past it is refused as exhausted until then. A refund (a
    /// request never sent) gives its request back once, and so does the release of an
    /// admission whose reply was lost.
    #[test]
    fn a_daily_quota_is_counted_once_across_pools_and_refunded_once() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let json = format!(
            r#"{{"base_url": "http://127.0.0.1:9",
                "keys": [{{"key": "sk-unit", "max_concurrent": 8, "rpd": 3, "group": "g"}},
                         {{"key": "sk-unit-2", "max_concurrent": 8, "group": "g"}}],
                "groups": [{{"name": "g", "rpd": 4}}],
                "shared": {{"redis_url": "{}", "namespace": "unit", "lease_ms": 3000}}}}"#,
            redis.url()
        );
        let config = Config::from_json(&json).unwrap();
        let pool = || {
            let (tx, _rx) = crossbeam_channel::unbounded();
            RedisLimits::start(config.shared.as_ref().unwrap(), &config, tx, Arc::default())
                .unwrap()
        };
        let (a, b) = (pool(), pool());
        let mut con = redis.conn();
        let (secs, _): (u64, u64) = redis::cmd("TIME").query(&mut con).unwrap();
        let today = secs / 86_400;
        let counted = |l: &RedisLimits, key: usize| -> (u64, DayCounts) {
            match l.acquire(key, 0) {
                SharedAdmit::Yes(lease, day) => (lease, day),
                other => panic!("expected Yes, got {other:?}"),
            }
        };
        let day = |key, group| DayCounts {
            day: today,
            key,
            group,
        };
        assert_eq!(counted(&a, 0).1, day(1, 1));
        assert_eq!(counted(&b, 0).1, day(2, 2));
        assert_eq!(counted(&b, 1).1, day(0, 3));
        let (last, d) = counted(&a, 0);
        assert_eq!(d, day(3, 4));
        let left_today = Duration::from_secs((today + 1) * 86_400 - secs);
        match b.acquire(0, 0) {
            SharedAdmit::Exhausted(left) => assert!(left <= left_today, "{left:?}"),
            other => panic!("expected Exhausted, got {other:?}"),
        }
        match a.acquire(1, 0) {
            SharedAdmit::GroupExhausted(left) => assert!(left <= left_today, "{left:?}"),
            other => panic!("expected GroupExhausted, got {other:?}"),
        }
        // Named by hashes, on Redis's day, gone when the day ends.
        let hashes = [&a.inner.keys[0].day, &a.inner.groups[0].day];
        for h in hashes {
            assert!(!h.contains("sk-unit") && !h.contains(":g:"), "{h}");
            let ttl: u64 = redis::cmd("PTTL").arg(h).query(&mut con).unwrap();
            assert!(ttl >= 1 && ttl <= left_today.as_millis() as u64, "{ttl}");
        }
        let n = |con: &mut redis::Connection, h: &str| -> (u64, u64) {
            redis::cmd("HMGET")
                .arg(h)
                .arg("day")
                .arg("n")
                .query(con)
                .unwrap()
        };
        // A refund gives one back at the key and at the group, once.
        a.refund(0, last, 0);
        a.refund(0, last, 0);
        assert_eq!(n(&mut con, hashes[0]), (today, 2));
        assert_eq!(n(&mut con, hashes[1]), (today, 3));
        a.release(0, last, &KeyVerdict::default());
        // An admission whose reply was lost is released with its charge given back.
        let (lost, d) = counted(&b, 1);
        assert_eq!(d, day(0, 4));
        let id = (b.inner.local[1].lock().held.iter())
            .find(|h| h.seq == lost)
            .map(|h| h.id.clone())
            .unwrap();
        b.inner
            .release(1, Some(id), (None, None), "", Aimd::NONE, true);
        assert_eq!(n(&mut con, hashes[1]), (today, 3));
        assert_eq!(counted(&a, 0).1, day(3, 4));
    }

    /// Issue 24.3: requests of daily quotas admitted on fallback slots while Redis is
    /// unreachable (`on_unavailable: local`) are added to the counts in Redis when it
    /// answers again — at the key and at its group — except those given back (a refund,
    /// once).
    #[test]
    fn fallback_daily_requests_are_counted_in_redis_when_it_answers() {
        let port = free_port();
        let json = format!(
            r#"{{"base_url": "http://127.0.0.1:9",
                "keys": [{{"key": "sk-unit", "max_concurrent": 8, "rpd": 5, "group": "g"}}],
                "groups": [{{"name": "g", "rpd": 9}}],
                "shared": {{"redis_url": "redis://127.0.0.1:{port}/0", "namespace": "unit",
                            "on_unavailable": "local", "timeout_ms": 200}}}}"#
        );
        let config = Config::from_json(&json).unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let l = RedisLimits::start(config.shared.as_ref().unwrap(), &config, tx, Arc::default())
            .unwrap();
        let kept = (0..3).map(|_| yes(l.acquire(0, 0))).collect::<Vec<_>>();
        l.refund(0, kept[2], 0);
        l.refund(0, kept[2], 0);
        assert_eq!(l.inner.local[0].lock().unsynced.n, 2);
        assert_eq!(l.inner.group_local[0].lock().unsynced.n, 2);
        let Some(redis) = TestRedis::start_on(port) else {
            return;
        };
        assert!(l.inner.reconnect());
        let mut con = redis.conn();
        let (secs, _): (u64, u64) = redis::cmd("TIME").query(&mut con).unwrap();
        for h in [&l.inner.keys[0].day, &l.inner.groups[0].day] {
            let (day, n): (u64, u64) = redis::cmd("HMGET")
                .arg(h)
                .arg("day")
                .arg("n")
                .query(&mut con)
                .unwrap();
            assert_eq!((day, n), (secs / 86_400, 2), "{h}");
        }
        assert_eq!(l.inner.local[0].lock().unsynced.n, 0);
    }

    #[test]
    fn local_pace_spaces_requests() {
        let mut p = Pace::default();
        assert!(p.take(0.0, 60.0, 1.0, 1.0).is_ok());
        let w = p.take(0.0, 60.0, 1.0, 1.0).unwrap_err();
        assert!((w - 1.0).abs() < 1e-6);
        assert!(p.take(1.0, 60.0, 1.0, 1.0).is_ok());
    }
}
