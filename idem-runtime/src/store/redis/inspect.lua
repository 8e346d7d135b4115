local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {redis.call('HGETALL', KEYS[1]), redis.call('PTTL', KEYS[1]), now_ms}
