-- Grant a lock (seed BE-001.3 "Acquire lock on available resource"), atomically:
-- SET NX with a TTL, the next fencing token, and the metadata hash with the same TTL.
-- The seed writes `SET lock:{id} {userId} EX 30 NX`; PX lets a request's ttlMs
-- count in milliseconds. The metadata also names the holder's connection and
-- the lock's room and TTL, so a restarted shard can adopt the lock.
-- The fence counter lives `fenceTtlMs` past the last grant or renewal of the
-- resource (rounds.backends.locks.FENCE_TTL_MS); a counter that is new, or
-- expired, starts at Redis's clock in microseconds, above any token an older
-- counter of this resource issued, so tokens increase across shard restarts,
-- holders and expired counters alike (issue 3).
-- KEYS[1] = lock:{resourceId}   KEYS[2] = lock:{resourceId}:metadata   KEYS[3] = lock:{resourceId}:fence
-- ARGV = userId, lockId, ttlMs, lockType, acquiredAt (ISO), expiresAt (ISO), roomId, connId, fenceTtlMs
-- Returns {1, fencingToken} or, when someone holds it, {0, holderUserId, pttlMs}.
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3], 'NX') then
  local token
  if redis.call('EXISTS', KEYS[3]) == 1 then
    token = redis.call('INCR', KEYS[3])
  else
    local now = redis.call('TIME')
    token = tonumber(now[1]) * 1000000 + tonumber(now[2])
    redis.call('SET', KEYS[3], string.format('%d', token))
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[9])
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2],
    'lockType', ARGV[4], 'acquiredAt', ARGV[5], 'expiresAt', ARGV[6],
    'userId', ARGV[1], 'lockId', ARGV[2], 'fencingToken', string.format('%d', token),
    'roomId', ARGV[7], 'connId', ARGV[8], 'ttlMs', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {1, token}
end
return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
