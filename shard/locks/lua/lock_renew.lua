-- Renew a lock (seed BE-001.3 "Lock renewal before expiration"): extend both
-- keys' TTL and the metadata's expiresAt, only if this lock id of this user
-- still holds it, so a stale holder can never extend someone else's lock.
-- The fence counter's TTL is refreshed too: it must outlive the lock.
-- KEYS[1] = lock:{resourceId}   KEYS[2] = lock:{resourceId}:metadata   KEYS[3] = lock:{resourceId}:fence
-- ARGV = lockId, userId, ttlMs, expiresAt (ISO), fenceTtlMs
-- Returns 1 when renewed, 0 when the lock is gone or held by another.
if redis.call('HGET', KEYS[2], 'lockId') == ARGV[1] and redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[2], 'expiresAt', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
  return 1
end
return 0
