"""The two server-side steps of the Redis broker (DESIGN §9), as Lua scripts.

Every key of one stream shares the hash tag ``{NAME}`` (``--broker-stream``), so
the scripts also run on one Redis Cluster node. The keys:

- ``{NAME}:epoch``: the stream's epoch; ``{NAME}:seq``: the last seq assigned;
- ``{NAME}:stream:<epoch>``: the capped stream, one entry per event with the ID
  ``0-<seq>``, so that resuming is ``XRANGE (0-S +``; fields ``d`` (the event's
  bytes as accepted) and ``p`` (its ``previous_state`` as JSON, when the relay
  must splice one in);
- ``{NAME}:registry``: machine id -> its entry as four JSON texts joined by
  newlines (current state, previous state, last activity, data; data empty
  when never given), which no JSON text contains unescaped;
- ``{NAME}:active``: machine id scored by the seq of its last event, so the
  least recently active is evicted first, as in the relay's own registry;
- ``{NAME}:done:<relay>``: the last batch a relay published, so a batch resent
  after a lost reply is not applied twice.

Whenever a script finds no epoch, Redis lost the stream (or never had it): it
starts a new epoch from seq 0 with an empty registry. An epoch therefore always
begins empty, which is what lets a relay that missed the change replay it from
its first event.
"""

from __future__ import annotations

__all__ = ["PUBLISH", "SNAPSHOT"]

_NEW_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2], REGISTRY, ACTIVE)
  redis.call('SET', KEYS[1], epoch)
end
"""

#: KEYS: epoch, seq, stream (of the epoch the relay believes in), registry, active, done.
#: ARGV: a fresh epoch (used if none exists), the believed epoch, the batch number,
#: the stream's cap, --max-machines, the event count, then 7 fields per event
#: (outbox.OutboxEntry). Returns {epoch, last seq}; last seq -1 when the believed
#: epoch is not the stream's (nothing applied), -2 when the batch was applied before.
PUBLISH = ("local REGISTRY, ACTIVE = KEYS[4], KEYS[5]" + _NEW_EPOCH + """
if epoch ~= ARGV[2] then
  return {epoch, -1}
end
local batch = tonumber(ARGV[3])
local done = redis.call('GET', KEYS[6])
if done and tonumber(done) >= batch then
  return {epoch, -2}
end
local n = tonumber(ARGV[6])
local last = redis.call('INCRBY', KEYS[2], n)
local seq = last - n
local stream, maxlen = KEYS[3], ARGV[4]
local call, find, sub, format = redis.call, string.find, string.sub, string.format
for b = 7, 6 + 7 * n, 7 do
  seq = seq + 1
  local flags = ARGV[b + 5]
  local previous = 'null'
  if sub(flags, 1, 1) == '1' then
    local id = ARGV[b]
    local current, prior, data = 'null', 'null', ''
    local record = call('HGET', REGISTRY, id)
    if record then
      local i = find(record, '\\n', 1, true)
      local j = find(record, '\\n', i + 1, true)
      local k = find(record, '\\n', j + 1, true)
      current, prior, data = sub(record, 1, i - 1), sub(record, i + 1, j - 1), sub(record, k + 1)
    end
    previous = current
    local state = ARGV[b + 1]
    if state ~= '' then
      -- registry.Registry.update: the emitter's previous_state if it gave one.
      if ARGV[b + 2] ~= '' then prior = ARGV[b + 2] else prior = current end
      current = state
    end
    if ARGV[b + 4] ~= '' then data = ARGV[b + 4] end
    call('HSET', REGISTRY, id, current .. '\\n' .. prior .. '\\n' .. ARGV[b + 3] .. '\\n' .. data)
    call('ZADD', ACTIVE, seq, id)
  end
  local id = format('0-%d', seq)
  if sub(flags, 2, 2) == '1' then
    call('XADD', stream, 'MAXLEN', '~', maxlen, id, 'd', ARGV[b + 6], 'p', previous)
  else
    call('XADD', stream, 'MAXLEN', '~', maxlen, id, 'd', ARGV[b + 6])
  end
end
local excess = call('ZCARD', ACTIVE) - tonumber(ARGV[5])
if excess > 0 then
  local gone = call('ZPOPMIN', ACTIVE, excess)
  for i = 1, #gone, 2 do
    call('HDEL', REGISTRY, gone[i])
  end
end
call('SET', KEYS[6], batch, 'EX', 86400)
return {epoch, last}
""")

#: KEYS: epoch, seq, registry, active. ARGV: a fresh epoch (used if none exists),
#: "1" to include the registry. Returns {epoch, seq, id, record, id, record, ...}
#: in one step, so the registry is exactly the one at that seq; least recently
#: active first.
SNAPSHOT = ("local REGISTRY, ACTIVE = KEYS[3], KEYS[4]" + _NEW_EPOCH + """
local out = {epoch, tonumber(redis.call('GET', KEYS[2]) or '0')}
if ARGV[2] ~= '1' then
  return out
end
local ids = redis.call('ZRANGE', ACTIVE, 0, -1)
-- HMGET in pieces: unpack() of a whole large registry overflows Lua's stack.
for i = 1, #ids, 1000 do
  local chunk = {}
  for j = i, math.min(i + 999, #ids) do
    chunk[#chunk + 1] = ids[j]
  end
  local records = redis.call('HMGET', REGISTRY, unpack(chunk))
  for j = 1, #chunk do
    out[#out + 1] = chunk[j]
    out[#out + 1] = records[j] or ''
  end
end
return out
""")
