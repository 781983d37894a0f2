"""The dataset record's Lua scripts (shared/datasets.py runs them): each a move that must be atomic, or must
decide on what it finds, in one round trip."""

from __future__ import annotations

RETIRE = """
if redis.call('SCARD', KEYS[3]) == 0 and redis.call('SCARD', KEYS[4]) == 0
   and (redis.call('HGET', KEYS[5], 'updated_at') or '') < ARGV[2] then
  redis.call('SREM', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
"""Retire a dataset only if, at that instant, nothing is queued or running and it was last touched
before the cutoff (ISO-8601 UTC strings compare as times): a submit racing the check keeps it active."""

MARK_DONE = """#!lua flags=allow-oom
if redis.call('SMOVE', KEYS[1], KEYS[2], ARGV[1]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('SREM', KEYS[5], ARGV[1])
  redis.call('HDEL', KEYS[6], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('SADD', KEYS[12], ARGV[4])
  redis.call('SREM', KEYS[13], ARGV[4])
  redis.call('HSETNX', KEYS[10], 'created_at', ARGV[5])
end
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('HDEL', KEYS[8], ARGV[1], ARGV[6])
if ARGV[2] ~= '' then
  redis.call('SADD', KEYS[9], ARGV[2])
end
if tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBYFLOAT', KEYS[10], 'gpu_seconds', ARGV[3])
end
redis.call('HSET', KEYS[10], 'updated_at', ARGV[5])
local now = redis.call('TIME')
redis.call('ZADD', KEYS[11], tonumber(now[1]) + tonumber(now[2]) / 1000000, ARGV[1])
if ARGV[7] ~= '' and redis.call('GET', KEYS[14]) == ARGV[7] then
  redis.call('DEL', KEYS[14])
end
"""
"""A job done, atomically: where it was running (the common case) one SMOVE moves it, and the dataset is
known to be active; anywhere else it is cleared from every other state as any move does. Its sent record
goes, and its attempts with its last error (one hash, ARGV[6] the error's field); its finishing time is
stamped with Redis' clock (one clock for every worker, so a stream of results that reads "done since t" misses
none). The worker that rendered it passes its claim (KEYS[14], its owner ARGV[7]): released here, not in a
call of its own. It runs even in a full Redis (allow-oom, Redis 7): the sent record it deletes is larger than what it
adds, so recording results is how a full farm drains."""

READ_RECORDS = """#!lua flags=no-writes
local since = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 9 do
  local first = redis.call('ZRANGEBYSCORE', KEYS[i + 8], since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  out[#out + 1] = {
    redis.call('HGETALL', KEYS[i]),
    redis.call('SCARD', KEYS[i + 1]), redis.call('SCARD', KEYS[i + 2]), redis.call('SCARD', KEYS[i + 3]),
    redis.call('SCARD', KEYS[i + 4]), redis.call('SCARD', KEYS[i + 5]),
    redis.call('SMEMBERS', KEYS[i + 6]),
    redis.call('HGETALL', KEYS[i + 7]),
    first[2] or '',
    redis.call('ZCOUNT', KEYS[i + 8], since, '+inf'),
  }
end
return out
"""
"""Many datasets' records in one command (9 keys each: meta, the five state sets, levels, failures, done_at;
ARGV[1] the rate window's start): `fluxfarm status` and every exporter scrape read all active datasets, and
a command a part cost the client more than Redis (20,000 datasets: 1.3 s, 0.1 s of it Redis')."""
