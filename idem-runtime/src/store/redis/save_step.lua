local cur = redis.call('HMGET', KEYS[1], 'state', 'token')
if cur[1] ~= 'in_flight' or cur[2] ~= ARGV[1] then
  return 0
end
-- In the record's own hash: the step expires, is deleted and moves (cluster slot) with it.
-- `steps` tells complete.lua there are step fields to drop, without a look at every field.
redis.call('HSET', KEYS[1], 's:' .. ARGV[2], ARGV[3], 'steps', '1')
return 1
