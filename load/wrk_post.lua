-- wrk script for load.wrk: each connection posts photos as multipart uploads, one after another (closed loop),
-- starting at a different photo per thread; counts every status; prints one JSON line when done.
--   wrk -t2 -c256 -d30s -s load/wrk_post.lua <url> -- <manifest: one photo path per line> [field name]
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local function multipart(field, name, data)
  local boundary = "waterbirds-wrk-7d4a1c"
  local body = "--" .. boundary .. "\r\n" ..
    'Content-Disposition: form-data; name="' .. field .. '"; filename="' .. name .. '"\r\n' ..
    "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  return wrk.format("POST", nil, {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
end

function init(args)
  local field = args[2] or "file"
  requests = {}
  for path in io.lines(args[1]) do
    local f = assert(io.open(path, "rb"))
    requests[#requests + 1] = multipart(field, path:match("[^/]+$"), f:read("*a"))
    f:close()
  end
  assert(#requests > 0, "no photos in the manifest")
  next_request = (id * 37) % #requests
  statuses = {}
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do parts[#parts + 1] = string.format('"%d": %d', status, n) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us": %d, "requests": %d, "statuses": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}}\n',
    summary.duration, summary.requests, table.concat(parts, ", "), e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
