-- Grant a lock (seed BE-001.3 "Acquire lock on available resource"), atomically:
-- SET NX with a TTL, the next fencing token, and the metadata hash with the same TTL.
-- The seed writes `SET lock:{id} {userId} EX 30 NX`; PX lets a request's ttlMs
-- count in milliseconds. The fence counter never expires, so tokens keep
-- increasing across shard restarts and across holders (issue 3).
-- KEYS[1] = lock:{resourceId}   KEYS[2] = lock:{resourceId}:metadata   KEYS[3] = lock:{resourceId}:fence
-- ARGV = userId, lockId, ttlMs, lockType, acquiredAt (ISO), expiresAt (ISO)
-- Returns {1, fencingToken} or, when someone holds it, {0, holderUserId, pttlMs}.
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3], 'NX') then
  local token = redis.call('INCR', KEYS[3])
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2],
    'lockType', ARGV[4], 'acquiredAt', ARGV[5], 'expiresAt', ARGV[6],
    'userId', ARGV[1], 'lockId', ARGV[2], 'fencingToken', string.format('%d', token))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {1, token}
end
return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
