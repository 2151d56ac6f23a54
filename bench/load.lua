-- wrk script for bench/httpbench.py: random ids, a JSON summary line at the end.
-- `wrk ... URL -- item`  : GET /item/<random id>
-- `wrk ... URL -- mixed` : half GET /nodb, half GET /mixed/<random id>
-- `wrk ... URL -- item 10.5` : paced: each connection waits a random time (exponential,
--                              mean 10.5 ms) before each request, for latency below saturation
local counter = 1

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

function init(args)
  math.randomseed(os.time() * 1000 + (tid or 0))
  mode = args[1] or "item"
  pace = tonumber(args[2] or "0")
end

function delay()
  if pace > 0 then
    return -math.log(1 - math.random()) * pace
  end
  return 0
end

function request()
  if mode == "mixed" and math.random() < 0.5 then
    return wrk.format(nil, "/nodb")
  end
  local path = (mode == "mixed") and "/mixed/" or "/item/"
  return wrk.format(nil, path .. math.random(1, 10000))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
