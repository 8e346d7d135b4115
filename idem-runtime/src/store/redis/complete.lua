local cur = redis.call('HMGET', KEYS[1], 'state', 'token')
if cur[1] ~= 'in_flight' or cur[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'completed', 'record', ARGV[2])
redis.call('HDEL', KEYS[1], 'lease_until')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], 'open', '0')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
-- Wake the key's waiters: ARGV[5] is PUBLISH, SPUBLISH (cluster) or empty.
if ARGV[5] ~= '' then
  redis.call(ARGV[5], KEYS[1] .. ':changed', '1')
end
return 1
