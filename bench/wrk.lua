-- wrk script for bench/run. Configured through the environment (wrk passes it to Lua):
--
--   BENCH_MODE   "status": GET /api/task/query?task_id=… over the ids in BENCH_IDS, round robin
--                "gen":    POST /api/image/gen with a small JSON body
--                "mixed":  generations over five routes in turn (image, Sora video, Seedance
--                          video, Midjourney, Suno), each with its own body
--                "text":   POST /api/v1/chat/completions with BENCH_BODY
--   BENCH_IDS    status mode: a file with one "TOKEN TASK_ID" pair per line (the bearer token
--                may differ per line, so one run can spread over many teams); a line with only
--                a task id uses BENCH_TOKEN
--   BENCH_TOKEN  the bearer token (team key for the gateway, upstream token for the fake)
--   BENCH_KEYS   gen mode, optional: a file with one bearer token per line, used round robin
--                (many teams generating at once) instead of BENCH_TOKEN
--   BENCH_BODY   gen and text modes: the request body (default: one gempix2 image)
--
-- At the end it prints one machine-readable line that bench/run parses:
--   BENCH requests=N duration_us=N rps=F p50_us=N p90_us=N p99_us=N p999_us=N max_us=N
--         errors_connect=N errors_read=N errors_write=N errors_timeout=N non2xx=N

local mode = os.getenv("BENCH_MODE") or "status"
local token = os.getenv("BENCH_TOKEN") or ""
local body = os.getenv("BENCH_BODY") or '{"model":"google/gempix2","prompt":"bench"}'

local function load_pairs(path)
  local pairs_ = {}
  local file = assert(io.open(path, "r"), "BENCH_IDS: cannot open " .. tostring(path))
  for line in file:lines() do
    local a, b = line:match("^(%S+)%s+(%S+)$")
    if a then
      pairs_[#pairs_ + 1] = { a, b }
    elseif line:match("^%S+$") then
      pairs_[#pairs_ + 1] = { token, line }
    end
  end
  file:close()
  assert(#pairs_ > 0, "BENCH_IDS: no task ids in " .. path)
  return pairs_
end

-- Each thread gets its own Lua state; `setup` numbers them so they start at different ids.
local counter = 0
function setup(thread)
  thread:set("thread_no", counter)
  counter = counter + 1
end

local requests = {}
local index = 1

function init(args)
  if mode == "status" then
    local list = load_pairs(os.getenv("BENCH_IDS"))
    -- Pre-format every request once: the load generator should spend its time on I/O.
    for i, pair in ipairs(list) do
      requests[i] = wrk.format("GET", "/api/task/query?task_id=" .. pair[2], {
        ["Authorization"] = "Bearer " .. pair[1],
      })
    end
    index = ((thread_no or 0) * 7919) % #requests + 1
  else
    local tokens = { token }
    local keys = os.getenv("BENCH_KEYS")
    if keys and keys ~= "" then
      tokens = {}
      for _, pair in ipairs(load_pairs(keys)) do
        tokens[#tokens + 1] = pair[2]
      end
    end
    local routes = { { "/api/image/gen", body } }
    if mode == "text" then
      routes = { { "/api/v1/chat/completions", body } }
    elseif mode == "mixed" then
      routes = {
        { "/api/image/gen", body },
        { "/api/sora2/gen", '{"model":"sora-2","prompt":"bench","duration":"10"}' },
        { "/api/video/seedance/gen",
          '{"model":"seedance-2.0","duration":5,"content":[{"type":"text","text":"bench"}]}' },
        { "/api/midjourney/imagine", '{"prompt":"bench","speed":"fast"}' },
        { "/api/suno/generate", '{"mv":"chirp-v4-5","prompt":"bench"}' },
      }
    end
    for _, t in ipairs(tokens) do
      for _, route in ipairs(routes) do
        requests[#requests + 1] = wrk.format("POST", route[1], {
          ["Authorization"] = "Bearer " .. t,
          ["Content-Type"] = "application/json",
        }, route[2])
      end
    end
    index = ((thread_no or 0) * 7919) % #requests + 1
  end
end

function request()
  local r = requests[index]
  index = index + 1
  if index > #requests then
    index = 1
  end
  return r
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d "
      .. "errors_connect=%d errors_read=%d errors_write=%d errors_timeout=%d non2xx=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
