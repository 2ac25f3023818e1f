"""The Lua scripts of the Redis Streams transport.

Every change of delivery state happens inside one script, so it is atomic: no other
client sees a half-settled batch or a key locked without its entries. Scripts build
key names from the prefixes they are given, which works on a single Redis server (or
a replicated one behind Sentinel), not on Redis Cluster.

Names, for namespace ``ns`` and group ``G`` (``gp`` is ``ns:g:G:``):

* ``ns:t:<topic>``: the stream of a topic; consumer group ``G`` on it.
* ``ns:d:<G>``: the group's own stream, for replayed dead letters.
* ``ns:clock``: the last entry id handed out by :data:`PUBLISH` (ids ordered across streams).
* ``gp lock`` (hash): key -> ``consumer\\nref\\nref...``, the entries of that key in flight.
* ``gp q:<key>`` (list): refs of the key's entries waiting behind its head, in order.
* ``gp ready`` (sorted set, score = due time in ms): ``r<ref>`` for an unkeyed entry
  waiting for redelivery, ``k<key>`` for a key whose queue head may go out then.
* ``gp att`` (hash): ref -> attempts used, for waiting entries.
* ``gp h:<stream>`` (sorted set, score = ms part of the id): ids of the group's waiting
  entries in that stream, so that trimming keeps them.
* ``gp look`` (sorted set): entries read ahead of a stream with a backlog (see ``sequence``).
* ``gp cur`` (hash): stream -> XAUTOCLAIM cursor.
* ``gp wake`` (stream): written to wake the group's idle consumers.
* ``ns:dlq:r:<id>`` (hash), ``ns:dlq:all`` and ``ns:dlq:g:<G>`` (sorted sets by time).

A ref is ``<stream key>|<entry id>``. The PEL of a consumer group holds exactly the
entries in flight: an entry that must wait (behind its key, or for a retry) is
acknowledged in the group and tracked in the structures above, and put back into the
PEL with ``XCLAIM ... RETRYCOUNT n FORCE`` when it goes out again. So XAUTOCLAIM with
the lease as minimum idle time finds exactly the deliveries of dead consumers.
"""

from __future__ import annotations

_PRELUDE = r"""
local function split_ref(ref)
  local i = string.find(ref, '|[^|]*$')
  return string.sub(ref, 1, i - 1), string.sub(ref, i + 1)
end

local function parse_id(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function id_lt(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

local function fmt_id(ms, seq)
  return string.format('%.0f-%.0f', ms, seq)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function is_err(r)
  return type(r) == 'table' and r.err ~= nil
end
"""

#: Settle the previous batch, then claim the next one, atomically.
#:
#: ARGV: gp, group, consumer, lease_ms, limit, dlq prefix, dead_at (s), wake key,
#: nstreams, streams..., nacks, (ref, lockkey)..., nholds, (ref, lockkey, delay_ms,
#: attempts)..., nparks, (ref, lockkey, attempts, reason, record id, topic, message id,
#: record key, body)...
#: A lock key is ``""`` for an entry without a key, else ``"=" .. key``.
#:
#: Returns ``{batch, next_due_ms, more, tops}``: the batch as one binary string (per
#: entry: the ref, attempts, the number of fields, then each field name and value; each
#: string with a 4-byte big-endian length before it, each number 4 bytes big-endian),
#: which the client parses far faster than one reply element per field; milliseconds
#: until the next waiting entry is due (-1 if none), 1 if more entries may be ready at
#: once, and the last id of each stream and the wake stream (``{key, id}`` pairs) to
#: block on until something new arrives.
SETTLE_AND_CLAIM = (
    _PRELUDE
    + r"""
local gp, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local lease_ms, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local dlq, dead_at, wake = ARGV[6], ARGV[7], ARGV[8]
local streams = {}
local a = 10
for j = 1, tonumber(ARGV[9]) do streams[j] = ARGV[a]; a = a + 1 end

local now = now_ms()
local lock_hash, ready, att = gp .. 'lock', gp .. 'ready', gp .. 'att'

local function lock_key(k)
  if k == '' then return nil end
  return string.sub(k, 2)
end

local function owned(ref)
  local sk, id = split_ref(ref)
  local p = redis.pcall('XPENDING', sk, group, id, id, 1, consumer)
  return type(p) == 'table' and not p.err and p[1] ~= nil
end

local function hold_index(ref, attempts)
  local sk, id = split_ref(ref)
  local ms = parse_id(id)
  redis.call('ZADD', gp .. 'h:' .. sk, ms, id)
  if attempts > 0 then redis.call('HSET', att, ref, attempts) end
end

-- 1. Settle. Only entries still pending with this consumer are settled: after a lost
--    reply the same settlement may come again, and after a lapsed lease another
--    consumer has the entries.
local released, released_order = {}, {}
local held_front, held_due = {}, {}
local function touch(key)
  if key and not released[key] then
    released[key] = true
    released_order[#released_order + 1] = key
  end
end

local acks = {}
local n = tonumber(ARGV[a]); a = a + 1
for _ = 1, n do
  local ref, key = ARGV[a], lock_key(ARGV[a + 1]); a = a + 2
  if owned(ref) then
    local sk, id = split_ref(ref)
    acks[sk] = acks[sk] or {}
    table.insert(acks[sk], id)
    touch(key)
  end
end
for sk, ids in pairs(acks) do
  for i = 1, #ids, 500 do
    redis.call('XACK', sk, group, unpack(ids, i, math.min(i + 499, #ids)))
  end
end

n = tonumber(ARGV[a]); a = a + 1
for _ = 1, n do
  local ref, key = ARGV[a], lock_key(ARGV[a + 1])
  local delay, attempts = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  if owned(ref) then
    local sk, id = split_ref(ref)
    redis.call('XACK', sk, group, id)
    hold_index(ref, attempts)
    if key then
      held_front[key] = held_front[key] or {}
      table.insert(held_front[key], ref)
      if held_due[key] == nil then held_due[key] = now + delay end
      touch(key)
    else
      redis.call('ZADD', ready, now + delay, 'r' .. ref)
    end
  end
end

n = tonumber(ARGV[a]); a = a + 1
local dead_ms = math.floor(tonumber(dead_at) * 1000)
for _ = 1, n do
  local ref, key, attempts, reason = ARGV[a], lock_key(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  local rid, topic, mid = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local rkey, body = ARGV[a + 7], ARGV[a + 8]
  a = a + 9
  if owned(ref) then
    local sk, id = split_ref(ref)
    local rk = dlq .. ':r:' .. rid
    redis.call('HSET', rk, 'group', group, 'topic', topic, 'message_id', mid, 'body', body,
      'reason', reason, 'attempts', attempts, 'dead_at', dead_at, 'entry', ref)
    if rkey ~= '' then redis.call('HSET', rk, 'key', string.sub(rkey, 2)) end
    redis.call('ZADD', dlq .. ':all', dead_ms, rid)
    redis.call('ZADD', dlq .. ':g:' .. group, dead_ms, rid)
    redis.call('XACK', sk, group, id)
    touch(key)
  end
end

-- Release the keys of the settled batch: entries put back go to the front of their
-- key's queue (they came before anything queued behind them), and the queue head
-- becomes due when the first of them is.
local woke = false
for _, key in ipairs(released_order) do
  local lk = redis.call('HGET', lock_hash, key)
  if lk and string.sub(lk, 1, #consumer + 1) == consumer .. '\n' then
    redis.call('HDEL', lock_hash, key)
  end
  local q = gp .. 'q:' .. key
  local back = held_front[key]
  if back then
    for i = #back, 1, -1 do redis.call('LPUSH', q, back[i]) end
    redis.call('ZADD', ready, held_due[key], 'k' .. key)
  elseif redis.call('EXISTS', q) == 1 then
    redis.call('ZADD', ready, now, 'k' .. key)
    woke = true
  end
end
if woke and limit <= 0 then
  -- This consumer stops: the others must pick up what it released.
  redis.call('XADD', wake, 'MAXLEN', '~', 16, '*', 'w', '1')
end

-- 2. Claim.
local batch, taken, mine = {}, {}, {}
local room = limit
local more = 0

local function hand(ref, attempts, fields)
  local out = {struct.pack('>I4', #ref), ref, struct.pack('>I4I4', attempts, #fields / 2)}
  for _, f in ipairs(fields) do
    out[#out + 1] = struct.pack('>I4', #f)
    out[#out + 1] = f
  end
  batch[#batch + 1] = table.concat(out)
  taken[ref] = true
  room = room - 1
end

local function delivered(sk, id)
  local p = redis.call('XPENDING', sk, group, id, id, 1)
  if p[1] then return tonumber(p[1][4]) end
  return 1
end

local function mine_add(key, ref)
  mine[key] = mine[key] or {}
  table.insert(mine[key], ref)
end

local function key_busy(key)
  return redis.call('HEXISTS', lock_hash, key) == 1 or redis.call('EXISTS', gp .. 'q:' .. key) == 1
end

-- A waiting entry goes out again: back into the PEL with its attempt count.
local function take_waiting(ref)
  local sk, id = split_ref(ref)
  local used = tonumber(redis.call('HGET', att, ref) or '0')
  redis.call('HDEL', att, ref)
  redis.call('ZREM', gp .. 'h:' .. sk, id)
  local c = redis.pcall('XCLAIM', sk, group, consumer, 0, id, 'RETRYCOUNT', used + 1, 'FORCE')
  if type(c) == 'table' and not c.err and c[1] and type(c[1][2]) == 'table' then
    hand(ref, used + 1, c[1][2])
    return true
  end
  return false
end

-- Entries just taken by XAUTOCLAIM, with their fields. XAUTOCLAIM counted a delivery
-- for each; one that goes back to wait instead did not get it.
local autoclaimed = {}

-- Entries that were in flight go to wait at the front of their key's queue.
local function requeue_front(key, refs)
  local q = gp .. 'q:' .. key
  for i = #refs, 1, -1 do
    local sk, id = split_ref(refs[i])
    local used = delivered(sk, id)
    if autoclaimed[refs[i]] then used = used - 1 end
    redis.call('XACK', sk, group, id)
    hold_index(refs[i], used)
    redis.call('LPUSH', q, refs[i])
    taken[refs[i]] = true
  end
end

-- Take over a key whose entries were in flight with a consumer whose lease lapsed:
-- all of them, in their order, so no later one overtakes an earlier one.
local function take_over(key, ref)
  local lk = redis.call('HGET', lock_hash, key)
  local refs = {}
  if lk then
    local first = true
    for part in string.gmatch(lk, '[^\n]+') do
      if first then first = false else refs[#refs + 1] = part end
    end
  end
  local found = false
  for _, r in ipairs(refs) do if r == ref then found = true end end
  if not found then table.insert(refs, 1, ref) end
  mine[key] = mine[key] or {}
  local rest = {}
  for _, r in ipairs(refs) do
    if not taken[r] then
      local sk, id = split_ref(r)
      if room <= 0 or #rest > 0 then
        -- No room: this one and every later one of the key wait (if still in flight).
        if autoclaimed[r] or redis.call('XPENDING', sk, group, id, id, 1)[1] then
          rest[#rest + 1] = r
        end
      elseif autoclaimed[r] then
        hand(r, delivered(sk, id), autoclaimed[r])
        mine_add(key, r)
      else
        local c = redis.pcall('XCLAIM', sk, group, consumer, 0, id)
        if type(c) == 'table' and not c.err and c[1] and type(c[1][2]) == 'table' then
          hand(r, delivered(sk, id), c[1][2])
          mine_add(key, r)
        end
      end
    end
  end
  if #rest > 0 then requeue_front(key, rest) end
end

-- Entries deleted from a stream while in flight (by XDEL, or by someone else's
-- XADD MAXLEN): XAUTOCLAIM drops them from the PEL; free their keys too, or the
-- keys would stay locked for good. Rare, so a scan of the locks is fine.
local function forget_deleted(sk, ids)
  local gone = {}
  for _, id in ipairs(ids) do gone[sk .. '|' .. id] = true end
  local locks = redis.call('HGETALL', lock_hash)
  for i = 1, #locks, 2 do
    local key, parts, keep, changed = locks[i], {}, {}, false
    for part in string.gmatch(locks[i + 1], '[^\n]+') do parts[#parts + 1] = part end
    for j = 2, #parts do
      if gone[parts[j]] then changed = true else keep[#keep + 1] = parts[j] end
    end
    if changed then
      if #keep > 0 then
        redis.call('HSET', lock_hash, key, parts[1] .. '\n' .. table.concat(keep, '\n'))
      else
        redis.call('HDEL', lock_hash, key)
        if redis.call('EXISTS', gp .. 'q:' .. key) == 1 then
          redis.call('ZADD', ready, 'NX', now, 'k' .. key)
        end
      end
    end
  end
end

local function ensure_groups()
  for _, sk in ipairs(streams) do
    redis.pcall('XGROUP', 'CREATE', sk, group, '0', 'MKSTREAM')
  end
end

if limit > 0 then
  -- 2a. Entries in flight with a consumer that stopped renewing its lease.
  for _, sk in ipairs(streams) do
    if room <= 0 then break end
    local cursor = redis.call('HGET', gp .. 'cur', sk) or '0-0'
    local r = redis.pcall('XAUTOCLAIM', sk, group, consumer, lease_ms, cursor, 'COUNT', room)
    if not is_err(r) then
      redis.call('HSET', gp .. 'cur', sk, r[1])
      if r[3] and #r[3] > 0 then forget_deleted(sk, r[3]) end
      for _, e in ipairs(r[2]) do
        if type(e[2]) == 'table' then autoclaimed[sk .. '|' .. e[1]] = e[2] end
      end
      for _, e in ipairs(r[2]) do
        local ref = sk .. '|' .. e[1]
        if type(e[2]) == 'table' and not taken[ref] then
          local key = field(e[2], 'key')
          if key then take_over(key, ref)
          elseif room > 0 then hand(ref, delivered(sk, e[1]), e[2])
          else
            -- No room: wait as a redelivery due now.
            local used = delivered(sk, e[1]) - 1
            redis.call('XACK', sk, group, e[1])
            hold_index(ref, used)
            redis.call('ZADD', ready, now, 'r' .. ref)
          end
        end
      end
    end
  end

  -- 2b. Waiting entries that are due: retries, and heads of released keys.
  if room > 0 then
    local due = redis.call('ZRANGEBYSCORE', ready, '-inf', now, 'LIMIT', 0, room)
    for _, m in ipairs(due) do
      if room <= 0 then break end
      redis.call('ZREM', ready, m)
      local rest = string.sub(m, 2)
      if string.sub(m, 1, 1) == 'r' then
        if not taken[rest] then take_waiting(rest) end
      elseif mine[rest] == nil and redis.call('HEXISTS', lock_hash, rest) == 0 then
        -- (A locked key gets its token back when its holder settles.)
        local q = gp .. 'q:' .. rest
        local refs = redis.call('LRANGE', q, 0, room - 1)
        redis.call('LTRIM', q, #refs, -1)
        mine[rest] = {}
        for _, r in ipairs(refs) do
          if take_waiting(r) then table.insert(mine[rest], r) end
        end
      end
    end
  end

  -- 2c. New entries, in id order across streams. The ids come from one clock (see
  --     PUBLISH), so id order is publish order. A stream that filled the read may hold
  --     more below the ids read from other streams: entries above the lowest such
  --     "cutoff" wait in the look-ahead set until every stream has been read past them.
  local function sequence(sk, id, fields, fresh, cut_ms, cut_seq)
    local ref = sk .. '|' .. id
    local ms, seq = parse_id(id)
    if cut_ms and id_lt(cut_ms, cut_seq, ms, seq) then
      if fresh then
        redis.call('XACK', sk, group, id)
        hold_index(ref, 0)
        redis.call('ZADD', gp .. 'look', ms, ref)
      end
      return
    end
    if not fresh then redis.call('ZREM', gp .. 'look', ref) end
    local key = field(fields, 'key')
    local go
    if key then
      if mine[key] then
        go = room > 0 and redis.call('EXISTS', gp .. 'q:' .. key) == 0
      else
        go = room > 0 and not key_busy(key)
      end
    else
      go = room > 0
    end
    if go then
      local handed = true
      if fresh then hand(ref, 1, fields) else handed = take_waiting(ref) end
      if key and handed then mine_add(key, ref) end
      return
    end
    if fresh then
      redis.call('XACK', sk, group, id)
      hold_index(ref, 0)
    end
    if key then
      redis.call('RPUSH', gp .. 'q:' .. key, ref)
      if not mine[key] and redis.call('HEXISTS', lock_hash, key) == 0 then
        redis.call('ZADD', ready, 'NX', now, 'k' .. key)
      end
    else
      redis.call('ZADD', ready, now, 'r' .. ref)
    end
  end

  local rounds = 0
  while room > 0 and rounds < 8 do
    rounds = rounds + 1
    local cmd = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', room, 'STREAMS'}
    for _, sk in ipairs(streams) do cmd[#cmd + 1] = sk end
    for _ = 1, #streams do cmd[#cmd + 1] = '>' end
    local r = redis.pcall(unpack(cmd))
    if is_err(r) then
      if not string.find(r.err, 'NOGROUP', 1, true) then return redis.error_reply(r.err) end
      -- The group is gone (a stream deleted, or a server that kept nothing on disk
      -- restarted): recreate it and read everything still there.
      ensure_groups()
      r = redis.call(unpack(cmd))
    end
    local cands = {}
    local cut_ms, cut_seq = nil, nil
    local full = false
    if r then
      for _, s in ipairs(r) do
        local sk, entries = s[1], s[2]
        for _, e in ipairs(entries) do
          if type(e[2]) == 'table' then cands[#cands + 1] = {sk, e[1], e[2], true} end
        end
        if #entries >= room and #entries > 0 then
          full = true
          local ms, seq = parse_id(entries[#entries][1])
          if cut_ms == nil or id_lt(ms, seq, cut_ms, cut_seq) then cut_ms, cut_seq = ms, seq end
        end
      end
    end
    for _, ref in ipairs(redis.call('ZRANGE', gp .. 'look', 0, -1)) do
      local sk, id = split_ref(ref)
      local e = redis.call('XRANGE', sk, id, id)
      if e[1] then
        cands[#cands + 1] = {sk, id, e[1][2], false}
      else
        redis.call('ZREM', gp .. 'look', ref)
        redis.call('ZREM', gp .. 'h:' .. sk, id)
      end
    end
    for _, c in ipairs(cands) do c[5], c[6] = parse_id(c[2]) end
    table.sort(cands, function(x, y)
      if x[5] ~= y[5] then return x[5] < y[5] end
      if x[6] ~= y[6] then return x[6] < y[6] end
      return x[1] < y[1]
    end)
    for _, c in ipairs(cands) do sequence(c[1], c[2], c[3], c[4], cut_ms, cut_seq) end
    if not full then break end
    more = 1
  end
  if room <= 0 then more = 1 end
end

for key, refs in pairs(mine) do
  if #refs > 0 then
    redis.call('HSET', lock_hash, key, consumer .. '\n' .. table.concat(refs, '\n'))
  else
    -- Nothing of the key went out (taken over without room, or its queue head was
    -- gone): the key is free, with a token if anything waits.
    redis.call('HDEL', lock_hash, key)
    if redis.call('EXISTS', gp .. 'q:' .. key) == 1 then
      redis.call('ZADD', ready, 'NX', now, 'k' .. key)
    end
  end
end

local next_due = -1
local first = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
if first[2] then next_due = math.max(0, tonumber(first[2]) - now) end
local tops = {}
local watch = {}
for _, sk in ipairs(streams) do watch[#watch + 1] = sk end
watch[#watch + 1] = wake
for _, sk in ipairs(watch) do
  local top = redis.call('XREVRANGE', sk, '+', '-', 'COUNT', 1)
  tops[#tops + 1] = sk
  if top[1] then tops[#tops + 1] = top[1][1] else tops[#tops + 1] = '0-0' end
end
return {table.concat(batch), next_due, more, tops}
"""
)

#: Append messages to their topics' streams, with ids from the namespace's clock.
#:
#: ARGV: clock key, n, then per message: stream, owning group (``""`` unless a command
#: topic), message id, key (``""`` for none, else ``"=" .. key``), body.
#: A command topic's group is created (from id 0) before its first message, so commands
#: wait for their service even if it never ran.
PUBLISH = (
    _PRELUDE
    + r"""
local clock = ARGV[1]
local n = tonumber(ARGV[2])
local last = redis.call('GET', clock)
local lms, lseq = 0, 0
if last then lms, lseq = parse_id(last) end
local now = now_ms()
local created = {}
local a = 3
for _ = 1, n do
  local sk, owner, mid, key, body = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  if owner ~= '' and not created[sk] then
    created[sk] = true
    redis.pcall('XGROUP', 'CREATE', sk, owner, '0', 'MKSTREAM')
  end
  if now > lms then lms, lseq = now, 0 else lseq = lseq + 1 end
  local fields
  if key == '' then fields = {'id', mid, 'body', body}
  else fields = {'id', mid, 'key', string.sub(key, 2), 'body', body} end
  local r = redis.pcall('XADD', sk, fmt_id(lms, lseq), unpack(fields))
  if is_err(r) then
    -- The stream is ahead of the clock (someone else added an entry): take its next id.
    r = redis.call('XADD', sk, '*', unpack(fields))
    local ms, seq = parse_id(r)
    if id_lt(lms, lseq, ms, seq) then lms, lseq = ms, seq end
  end
end
redis.call('SET', clock, fmt_id(lms, lseq))
return n
"""
)

#: Keep the leases of a batch in hand: reset the idle time of each entry still pending
#: with this consumer. ARGV: group, consumer, refs...
RENEW = (
    _PRELUDE
    + r"""
local group, consumer = ARGV[1], ARGV[2]
local renewed = 0
for i = 3, #ARGV do
  local sk, id = split_ref(ARGV[i])
  local p = redis.pcall('XPENDING', sk, group, id, id, 1, consumer)
  if type(p) == 'table' and not p.err and p[1] then
    redis.call('XCLAIM', sk, group, consumer, 0, id, 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""
)

#: Trim a stream below the lowest entry any group still needs, and forget consumers
#: that are gone. ARGV: namespace, stream, idle ms after which an empty consumer is
#: removed. Returns the number of entries trimmed.
#:
#: A group needs every entry after its last-delivered id (unread), every entry in its
#: PEL (in flight) and every entry it keeps waiting (``h:<stream>``). Dead letters hold
#: copies. Groups that atoll did not create count by their PEL and last-delivered id.
TRIM = (
    _PRELUDE
    + r"""
local ns, sk, forget_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local groups = redis.pcall('XINFO', 'GROUPS', sk)
if is_err(groups) then return 0 end
local min_ms, min_seq = nil, nil
local function keep(ms, seq)
  if min_ms == nil or id_lt(ms, seq, min_ms, min_seq) then min_ms, min_seq = ms, seq end
end
for _, g in ipairs(groups) do
  local name, pending, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'pending' then pending = tonumber(g[i + 1])
    elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  keep(parse_id(last))
  if pending > 0 then
    local s = redis.call('XPENDING', sk, name)
    if s[2] then keep(parse_id(s[2])) end
  end
  local h = redis.call('ZRANGE', ns .. ':g:' .. name .. ':h:' .. sk, 0, 0, 'WITHSCORES')
  if h[2] then keep(tonumber(h[2]), 0) end
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', sk, name)) do
    local cname, cpending, idle
    for i = 1, #c, 2 do
      if c[i] == 'name' then cname = c[i + 1]
      elseif c[i] == 'pending' then cpending = tonumber(c[i + 1])
      elseif c[i] == 'idle' then idle = tonumber(c[i + 1]) end
    end
    if cpending == 0 and idle > forget_ms then
      redis.call('XGROUP', 'DELCONSUMER', sk, name, cname)
    end
  end
end
if #groups == 0 then
  -- Nobody subscribes: nothing waits for these entries. Keep the last one, so the
  -- stream (and its top id) stays.
  local top = redis.call('XREVRANGE', sk, '+', '-', 'COUNT', 1)
  if top[1] then keep(parse_id(top[1][1])) end
end
if min_ms == nil then return 0 end
return redis.call('XTRIM', sk, 'MINID', fmt_id(min_ms, min_seq))
"""
)

#: Remove a stopping consumer from its groups if it holds nothing.
#: ARGV: group, consumer, streams...
RETIRE = r"""
local group, consumer = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local p = redis.pcall('XPENDING', ARGV[i], group, '-', '+', 1, consumer)
  if type(p) == 'table' and not p.err and p[1] == nil then
    redis.pcall('XGROUP', 'DELCONSUMER', ARGV[i], group, consumer)
  end
end
return 1
"""

#: Deliver a dead letter again to its group (through the group's own stream, with
#: fresh attempts) and delete the record, in one step. ARGV: namespace, record id.
REPLAY = r"""
local ns, rid = ARGV[1], ARGV[2]
local rk = ns .. ':dlq:r:' .. rid
local r = redis.call('HGETALL', rk)
if #r == 0 then return 0 end
local rec = {}
for i = 1, #r, 2 do rec[r[i]] = r[i + 1] end
local sk = ns .. ':d:' .. rec.group
redis.pcall('XGROUP', 'CREATE', sk, rec.group, '0', 'MKSTREAM')
if rec.key then
  redis.call('XADD', sk, '*', 'topic', rec.topic, 'id', rec.message_id, 'key', rec.key,
    'body', rec.body)
else
  redis.call('XADD', sk, '*', 'topic', rec.topic, 'id', rec.message_id, 'body', rec.body)
end
redis.call('DEL', rk)
redis.call('ZREM', ns .. ':dlq:all', rid)
redis.call('ZREM', ns .. ':dlq:g:' .. rec.group, rid)
return 1
"""

#: Delete a dead letter for good, in one step. ARGV: namespace, record id.
PURGE = r"""
local ns, rid = ARGV[1], ARGV[2]
local rk = ns .. ':dlq:r:' .. rid
local group = redis.call('HGET', rk, 'group')
if not group then return 0 end
redis.call('DEL', rk)
redis.call('ZREM', ns .. ':dlq:all', rid)
redis.call('ZREM', ns .. ':dlq:g:' .. group, rid)
return 1
"""
