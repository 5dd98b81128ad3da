"""The two server-side steps of the Redis broker (DESIGN §9), as Lua scripts.

Every key of one stream shares the hash tag ``{NAME}`` (``--broker-stream``), so
the scripts also run on one Redis Cluster node. The keys:

- ``{NAME}:epoch``: the stream's epoch; ``{NAME}:seq``: the last seq assigned;
- ``{NAME}:stream:<epoch>``: the capped stream, one entry per published batch
  with the ID ``0-<seq of its last event>``, so that the entries after seq S
  are ``XREAD ... 0-S`` and resuming costs no index. Fields: ``n`` (events),
  ``d`` (their bytes as accepted, end to end), ``l`` (their lengths, comma
  separated), ``p`` (per event, the ``previous_state`` to splice in as JSON,
  or nothing; newline separated: no JSON text holds a raw newline) and ``a``
  (per event, the time the publishing relay gave an event without a
  ``timestamp`` of its own, or nothing; comma separated), so every relay's
  registry records the same ``last_activity``. One entry
  per batch is one XADD and one reply per batch, not per event. It is trimmed
  by MINID, exactly (a Redis macro node holds 100 entries, so ``~`` could keep
  100 batches too many), to the entries that hold its last ``cap`` events;
- ``{NAME}:registry``: machine id -> current state, previous state and last
  activity as JSON, then the bytes of its last event that carried ``data``
  (empty if none), newline separated (the event last: it may hold newlines);
- ``{NAME}:active``: machine id scored by the seq of its last event, so the
  least recently active is evicted first, as in the relay's own registry;
- ``{NAME}:done:<relay>``: the last batch a relay published, so a batch resent
  after a lost reply is not applied twice.

Whenever a script finds no epoch, Redis lost the stream (or never had it); when
it finds fewer events of the relay's epoch than the relay already has, Redis
came back from an older copy of it (a snapshot or AOF that lost the last
writes). Either way it starts a new epoch from seq 0 with an empty registry:
a seq never names two events. An epoch therefore always
begins empty, which is what lets a relay that missed the change replay it from
its first event.
"""

from __future__ import annotations

__all__ = ["PUBLISH", "SNAPSHOT"]

#: Both scripts begin here; they name REGISTRY, ACTIVE, STREAM (of the epoch the
#: relay believes in), BELIEVED (that epoch) and SEEN (the last seq the relay has
#: of it) first.
_NEW_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
local broken = not epoch or #epoch > 64 or not string.match(epoch, '^[%w_-]+$')
if not broken and epoch == BELIEVED then
  local known = tonumber(redis.call('GET', KEYS[2]) or '0')
  local top = redis.call('XREVRANGE', STREAM, '+', '-', 'COUNT', 1)[1]
  -- Fewer events than a relay already has (Redis came back from an older copy),
  -- or a newest entry that is not the last seq's (someone else wrote to it).
  broken = known == nil or known < SEEN or (top ~= nil and top[1] ~= string.format('0-%d', known))
end
if broken then
  -- No stream (the first start, or Redis lost its data), or one that cannot go
  -- on without giving a seq a second meaning: a new epoch begins, empty.
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2], REGISTRY, ACTIVE, STREAM)
  redis.call('SET', KEYS[1], epoch)
end
"""

#: KEYS: epoch, seq, stream (of the epoch the relay believes in), registry, active, done.
#: ARGV: a fresh epoch (for a new one), the believed epoch, the batch number, the
#: stream's cap in events, --max-machines, the event count, the last seq the relay
#: has of the believed epoch, the events' bytes end to end, then 6 fields per event
#: (outbox.OutboxEntry, its bytes replaced by their length). Returns {epoch, last
#: seq}; last seq -1 when the believed epoch is not the stream's (nothing applied),
#: -2 when the batch was applied before.
PUBLISH = ("""
local REGISTRY, ACTIVE, STREAM = KEYS[4], KEYS[5], KEYS[3]
local BELIEVED, SEEN = ARGV[2], tonumber(ARGV[7])""" + _NEW_EPOCH + """
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
local blob = ARGV[8]
local call, find, sub, concat = redis.call, string.find, string.sub, table.concat
-- A state as the relays write them: JSON null or a JSON string.
local function json_state(text)
  if text == 'null' or find(text, '^"[^"\\\\]*"$') then
    return true
  end
  local ok, value = pcall(cjson.decode, text)
  return ok and type(value) == 'string'
end
-- Each machine is read once and written once per batch, however many of its
-- events the batch holds: {current, prior, activity, data, data offset, length, seq}.
local machines, order = {}, {}
local lengths, previous, stamps = {}, {}, {}
local offset = 0
for b = 9, 8 + 6 * n, 6 do
  seq = seq + 1
  local flags, size = ARGV[b + 4], ARGV[b + 5]
  local before = ''
  if sub(flags, 1, 1) == '1' then
    local id = ARGV[b]
    local m = machines[id]
    if not m then
      m = {'null', 'null', 'null', ''}
      local record = call('HGET', REGISTRY, id)
      local i = record and find(record, '\\n', 1, true)
      local j = i and find(record, '\\n', i + 1, true)
      local k = j and find(record, '\\n', j + 1, true)
      if k then
        local current, prior, activity = sub(record, 1, i - 1), sub(record, i + 1, j - 1),
                                         sub(record, j + 1, k - 1)
        -- Spliced into every client's stream as they are: only what a relay wrote.
        if json_state(current) and json_state(prior) and tonumber(activity) then
          m[1], m[2], m[3], m[4] = current, prior, activity, sub(record, k + 1)
        end
      end
      machines[id] = m
      order[#order + 1] = id
    end
    before = m[1]
    local state = ARGV[b + 1]
    if state ~= '' then
      -- registry.Registry.update: the emitter's previous_state if it gave one.
      if ARGV[b + 2] ~= '' then m[2] = ARGV[b + 2] else m[2] = m[1] end
      m[1] = state
    end
    m[3] = ARGV[b + 3]
    if sub(flags, 3, 3) == '1' then
      m[4], m[5], m[6] = nil, offset, tonumber(size)
    end
    m[7] = seq
  elseif sub(flags, 2, 2) == '1' then
    before = 'null'
  end
  if sub(flags, 2, 2) == '1' then
    previous[#previous + 1] = before
  else
    previous[#previous + 1] = ''
  end
  if sub(flags, 4, 4) == '1' then
    stamps[#stamps + 1] = ARGV[b + 3]
  else
    stamps[#stamps + 1] = ''
  end
  lengths[#lengths + 1] = size
  offset = offset + tonumber(size)
end
if #order > 0 then
  local hset, zadd = {}, {}
  for _, id in ipairs(order) do
    local m = machines[id]
    local data = m[4] or sub(blob, m[5] + 1, m[5] + m[6])
    hset[#hset + 1] = id
    hset[#hset + 1] = m[1] .. '\\n' .. m[2] .. '\\n' .. m[3] .. '\\n' .. data
    zadd[#zadd + 1] = m[7]
    zadd[#zadd + 1] = id
  end
  call('HSET', REGISTRY, unpack(hset))
  call('ZADD', ACTIVE, unpack(zadd))
end
local entry = string.format('0-%d', last)
local fields = {'n', n, 'd', blob, 'l', concat(lengths, ','), 'p', concat(previous, '\\n'),
                'a', concat(stamps, ',')}
local keep = last - tonumber(ARGV[4])
if keep > 0 then
  call('XADD', KEYS[3], 'MINID', string.format('0-%d', keep), entry, unpack(fields))
else
  call('XADD', KEYS[3], entry, unpack(fields))
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

#: KEYS: epoch, seq, registry, active, stream (of the believed epoch). ARGV: a fresh
#: epoch (for a new one), "1" to include the registry, the believed epoch, the last
#: seq the relay has of it. Returns {epoch, seq, id, record, id, record, ...} in one
#: step, so the registry is exactly the one at that seq; least recently active first.
SNAPSHOT = ("""
local REGISTRY, ACTIVE, STREAM = KEYS[3], KEYS[4], KEYS[5]
local BELIEVED, SEEN = ARGV[3], tonumber(ARGV[4])""" + _NEW_EPOCH + """
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
