"""The Lua scripts that make each shared-state update one atomic step inside Redis.

Time is Redis's own clock (``TIME``), so every worker agrees on budget windows and breaker
cool-downs whatever their own clocks say. Money is integer nano-dollars passed as strings.

Budget layout, one hash per key and period (``KEYS[1]``), fields per epoch-aligned window:
``s:<win>`` settled spend, ``p:<win>`` reserved, ``r:<id>`` = ``"<win>:<amount>"`` one live
reservation, ``cur`` the newest window seen. ``KEYS[2]`` is a sorted set of reservation ids by
expiry (a crashed worker's reservation stops holding money back); ``KEYS[3]`` remembers settled
ids for two budget periods plus the reservation TTL (at least an hour), as long as a replayed
settle could still land in a window being enforced, so one replayed after an outage is not
charged twice.
"""

from __future__ import annotations

__all__ = [
    "BREAKER_CHECK",
    "BREAKER_FAILURE",
    "BUDGET_COUNTS",
    "BUDGET_RESERVE",
    "BUDGET_SETTLE",
    "FLAG_SWAP",
    "LATENCY_OBSERVE",
]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_EXPIRE_STALE = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, rid in ipairs(stale) do
  local r = redis.call('HGET', KEYS[1], 'r:' .. rid)
  if r then
    local w, amt = string.match(r, '^(-?%d+):(%d+)$')
    redis.call('HINCRBY', KEYS[1], 'p:' .. w, '-' .. amt)
    redis.call('HDEL', KEYS[1], 'r:' .. rid)
  end
  redis.call('ZREM', KEYS[2], rid)
end
"""

BUDGET_RESERVE = _NOW + """
-- ARGV: id, amount, limit, period_s, ttl_ms
local period = tonumber(ARGV[4])
local win = math.floor(now / 1000 / period)
local ws = string.format('%d', win)
""" + _EXPIRE_STALE + """
local cur = tonumber(redis.call('HGET', KEYS[1], 'cur') or '-1')
if cur < win then
  -- rollover: a new window is new fields, so nothing is reset and no spend can be lost;
  -- fields of windows before the previous one are dropped
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    local w = string.match(f, '^[sp]:(-?%d+)$')
    if w and tonumber(w) < win - 1 then redis.call('HDEL', KEYS[1], f) end
  end
  redis.call('HSET', KEYS[1], 'cur', ws)
end
local spent = redis.call('HGET', KEYS[1], 's:' .. ws) or '0'
local pending = redis.call('HGET', KEYS[1], 'p:' .. ws) or '0'
local nows = string.format('%d', now)
if tonumber(spent) + tonumber(pending) + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  return {0, spent, pending, ws, nows}
end
redis.call('HSET', KEYS[1], 'r:' .. ARGV[1], ws .. ':' .. ARGV[2])
redis.call('HINCRBY', KEYS[1], 'p:' .. ws, ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
local keep = math.floor((win + 2) * period * 1000 - now) + tonumber(ARGV[5])
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return {1, spent, pending, ws, nows}
"""

BUDGET_SETTLE = _NOW + """
-- ARGV: id, win, charged, keep_ms. Returns 1 if recorded, 0 if this id was already closed.
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
local r = redis.call('HGET', KEYS[1], 'r:' .. ARGV[1])
if r then
  local w, amt = string.match(r, '^(-?%d+):(%d+)$')
  redis.call('HINCRBY', KEYS[1], 'p:' .. w, '-' .. amt)
  redis.call('HDEL', KEYS[1], 'r:' .. ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
-- charged even when the reservation expired meanwhile: spend is never dropped
if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[1], 's:' .. ARGV[2], ARGV[3]) end
-- settled ids are remembered while a replay could still be charged to a live window
local mem = math.max(3600000, tonumber(ARGV[4]))
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - mem)
redis.call('PEXPIRE', KEYS[3], mem)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""

BUDGET_COUNTS = _NOW + """
-- ARGV: period_s. Returns settled and reserved spend of the current window.
local win = string.format('%d', math.floor(now / 1000 / tonumber(ARGV[1])))
""" + _EXPIRE_STALE + """
return {redis.call('HGET', KEYS[1], 's:' .. win) or '0',
        redis.call('HGET', KEYS[1], 'p:' .. win) or '0'}
"""

BREAKER_CHECK = _NOW + """
-- KEYS: state hash, probe key. ARGV: cooldown_ms.
-- Returns {0} closed, {1} this caller is the probe, {2, wait_ms} open, {3, ms} probe in flight.
local opened = redis.call('HGET', KEYS[1], 'opened')
if not opened then return {0, 0} end
local wait = tonumber(opened) + tonumber(ARGV[1]) - now
if wait > 0 then return {2, wait} end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return {1, 0} end
return {3, redis.call('PTTL', KEYS[2])}
"""

BREAKER_FAILURE = _NOW + """
-- KEYS: state hash, probe key. ARGV: failure_threshold, cooldown_ms, keep_ms.
local f = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local opened = redis.call('HGET', KEYS[1], 'opened')
if not opened then
  if f >= tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[1], 'opened', string.format('%d', now))
  end
elseif now - tonumber(opened) >= tonumber(ARGV[2]) then
  -- half-open and the probe (or a call begun before the circuit opened) failed: cool down anew
  redis.call('HSET', KEYS[1], 'opened', string.format('%d', now))
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return f
"""

LATENCY_OBSERVE = """
-- KEYS: latency hash, index set. ARGV: seconds, failed ('1' or '0'), endpoint.
-- An exponentially weighted mean, as the local store keeps it.
redis.call('SADD', KEYS[2], ARGV[3])
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], 'failures', 1)
else
  local calls = redis.call('HINCRBY', KEYS[1], 'calls', 1)
  local mean = tonumber(redis.call('HGET', KEYS[1], 'mean') or '0')
  local a = 0.2
  if calls == 1 then a = 1.0 end
  mean = mean + a * (tonumber(ARGV[1]) - mean)
  redis.call('HSET', KEYS[1], 'mean', string.format('%.17g', mean))
end
return {redis.call('HGET', KEYS[1], 'calls') or '0', redis.call('HGET', KEYS[1], 'failures')
        or '0', redis.call('HGET', KEYS[1], 'mean') or '0'}
"""

FLAG_SWAP = """
-- KEYS: the flag. ARGV: has_expected ('1'/'0'), expected, has_value ('1'/'0'), value.
-- Compare-and-set: 1 when the flag held the expected value (or was absent, as expected) and
-- now holds the new one (or is gone); 0, changing nothing, when another writer came first.
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
if ARGV[3] == '1' then redis.call('SET', KEYS[1], ARGV[4]) else redis.call('DEL', KEYS[1]) end
return 1
"""
