-- Release a lock (seed BE-001.3 "Explicit lock release"): delete the lock key
-- and its metadata only if this lock id of this user still holds it (never
-- read-then-write: a lock taken over in between must survive). The fence
-- counter stays.
-- On expiry the caller also passes the expiresAt it last stored: a lock
-- renewed since by someone else is not the caller's to end.
-- KEYS[1] = lock:{resourceId}   KEYS[2] = lock:{resourceId}:metadata
-- ARGV = lockId, userId[, expiresAt (ISO)]
-- Returns 1 when released, 0 when the lock was gone, held by another, or renewed elsewhere.
if redis.call('HGET', KEYS[2], 'lockId') == ARGV[1] and redis.call('GET', KEYS[1]) == ARGV[2] then
  if ARGV[3] and redis.call('HGET', KEYS[2], 'expiresAt') ~= ARGV[3] then
    return 0
  end
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
