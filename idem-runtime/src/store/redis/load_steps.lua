local cur = redis.call('HMGET', KEYS[1], 'state', 'token', 'steps')
if cur[1] ~= 'in_flight' or cur[2] ~= ARGV[1] then
  return 0
end
local steps = {}
if not cur[3] then
  return steps
end
-- Name, record, name, record...: the `s:` fields without their prefix.
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local field = fields[i]
  if string.sub(field, 1, 2) == 's:' then
    steps[#steps + 1] = string.sub(field, 3)
    steps[#steps + 1] = fields[i + 1]
  end
end
return steps
