-- wrk script: each connection's requests rotate through the paths listed (one per line) in the file
-- given after `--`; each thread starts at a different place. Requests are formatted once, up front,
-- so the load generator spends its CPU on sending, not on Lua. Prints one machine-readable line.

local paths = {}
local requests = {}
local position = 0
local thread_count = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      paths[#paths + 1] = line
      requests[#requests + 1] = wrk.format("GET", line)
    end
  end
  position = ((thread_index or 0) * 7) % #requests
end

function request()
  position = position % #requests + 1
  return requests[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
