local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'record', 'lease_until')
-- The server's time, read only where it decides something (a lease's end, a new claim): a
-- completed record is live until Redis expires it, so a hit needs no TIME.
local now, now_ms
local function clock()
  if not now then
    now = redis.call('TIME')
    now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  end
end
local state = rec[1]
if state then
  if state ~= 'in_flight' and state ~= 'completed' then
    return {'corrupt', 'unknown state'}
  end
  local expired = false
  if state == 'in_flight' and rec[4] then
    local lease_until = tonumber(rec[4])
    if not lease_until then
      return {'corrupt', 'lease_until is not a number'}
    end
    clock()
    expired = lease_until <= now_ms
  end
  if not expired then
    local fp = rec[2]
    if fp and ARGV[1] ~= '' and fp ~= ARGV[1] then
      return {'reuse'}
    end
    if state == 'in_flight' then
      return {'in_flight'}
    end
    if not rec[3] then
      return {'corrupt', 'completed record without its record field'}
    end
    return {'completed', rec[3]}
  end
  -- Only an in-flight record whose lease ended gets here (a completed one is live until Redis
  -- expires it): a takeover. It keeps the call's steps (the `s:` fields and the `steps`
  -- marker) for the new holder; the HSET below replaces state, token, lease_until and
  -- claimed_at, and fp, which goes if the new claim has none.
  if ARGV[1] == '' and rec[2] then
    redis.call('HDEL', KEYS[1], 'fp')
  end
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  return {'corrupt', 'record hash without a state field'}
end
local fence = redis.call('HMGET', KEYS[2], 'last', 'open')
clock()
local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(fence[1])
if last and last >= token then
  token = last + 1
end
token = string.format('%.0f', token)
local lease_until = string.format('%.0f', now_ms + tonumber(ARGV[2]))
local claimed_at = string.format('%.0f', now_ms)
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'state', 'in_flight', 'token', token, 'lease_until', lease_until, 'claimed_at', claimed_at, 'fp', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'state', 'in_flight', 'token', token, 'lease_until', lease_until, 'claimed_at', claimed_at)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], 'last', token, 'open', '1')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if fence[2] == '1' then
  return {'acquired', token, 1}
end
return {'acquired', token, 0}
