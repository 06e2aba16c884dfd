-- Read live locks for a restarting shard to adopt, a batch at a time, each
-- lock read atomically with its metadata.
-- KEYS = lock:{r1}, lock:{r1}:metadata, lock:{r2}, lock:{r2}:metadata, ...
-- Returns, per lock: {holderUserId or false, pttlMs, {field, value, ...}}
-- (false and -2 when the lock key is gone or is not a lock).
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('TYPE', KEYS[i]).ok == 'string' then
    out[#out + 1] = {redis.call('GET', KEYS[i]), redis.call('PTTL', KEYS[i]), redis.call('HGETALL', KEYS[i + 1])}
  else
    out[#out + 1] = {false, -2, {}}
  end
end
return out
