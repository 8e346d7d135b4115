local cur = redis.call('HMGET', KEYS[1], 'state', 'token')
if cur[1] ~= 'in_flight' or cur[2] ~= ARGV[1] then
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', string.format('%.0f', now_ms + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
