local cur = redis.call('HMGET', KEYS[1], 'state', 'token')
local state, token = cur[1], cur[2]
if not state then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return {'corrupt', 'record hash without a state field'}
  end
  return {'absent'}
end
if state ~= 'in_flight' and state ~= 'completed' then
  return {'corrupt', 'unknown state'}
end
if not token then
  return {'corrupt', 'record hash without a token field'}
end
if state == 'in_flight' and ARGV[1] ~= '1' then
  return {'refused', token}
end
redis.call('DEL', KEYS[1])
-- The fence keeps `last`, so no later claim gets this token again; `open` 0, as after a
-- release: the next claim is no takeover.
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'open', '0')
end
-- Wake the key's waiters: ARGV[2] is PUBLISH, SPUBLISH (cluster) or empty.
if ARGV[2] ~= '' then
  redis.call(ARGV[2], KEYS[1] .. ':changed', '1')
end
return {state, token}
