local cur = redis.call('HMGET', KEYS[1], 'state', 'token')
if cur[1] ~= 'in_flight' or cur[2] ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'open', '0')
-- Wake the key's waiters: ARGV[2] is PUBLISH, SPUBLISH (cluster) or empty.
if ARGV[2] ~= '' then
  redis.call(ARGV[2], KEYS[1] .. ':changed', '1')
end
return 1
