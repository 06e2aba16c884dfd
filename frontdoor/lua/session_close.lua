-- Close one session of a user: drop its field from the user's session hash
-- and, when it was the user's last session, the activity key too. Atomic, so
-- a tab opening at the same moment never loses its activity key.
-- KEYS[1] = user:{id}:session   KEYS[2] = user:{id}:activity   ARGV[1] = session id
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
