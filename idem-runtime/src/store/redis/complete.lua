local cur = redis.call('HMGET', KEYS[1], 'state', 'token', 'steps')
if cur[1] ~= 'in_flight' or cur[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'completed', 'record', ARGV[2])
if cur[3] then
  -- The result replaces the call's steps: drop every `s:` field and the marker.
  local gone = {'lease_until', 'steps'}
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 2) == 's:' then
      gone[#gone + 1] = field
    end
  end
  -- In slices: unpack() of too many values overflows Lua's stack.
  for i = 1, #gone, 1000 do
    redis.call('HDEL', KEYS[1], unpack(gone, i, math.min(i + 999, #gone)))
  end
else
  redis.call('HDEL', KEYS[1], 'lease_until')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], 'open', '0')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
-- Wake the key's waiters: ARGV[5] is PUBLISH, SPUBLISH (cluster) or empty.
if ARGV[5] ~= '' then
  redis.call(ARGV[5], KEYS[1] .. ':changed', '1')
end
return 1
