-- POST one JSON body on every request and report a JSON line the harness parses.
--
--   WRK_BODY_FILE=body.json wrk -t1 -c64 -d10s --latency -s bench/wrk/post.lua URL
--   WRK_BODY_FILE=rows.jsonl ...     (several lines: one body per line, taken in turn)
--   wrk ... -s bench/wrk/post.lua URL -- body.json        (or the path as a script argument)
--   WRK_BODY='{"features": [...]}' wrk ...                 (or the body itself)
--   WRK_WHOLE_BODY=1 WRK_HEADERS='Inference-Header-Content-Length: 120' ...  (one binary body)
--
-- The last line of output is `WRK_JSON {...}`: status counts (429 apart from 200),
-- wrk's socket errors, requests, duration and latency percentiles in microseconds.
-- wrk's latency histogram mixes every status: where refused requests must be timed
-- apart (overload), the harness measures them with its own probe client.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local body = os.getenv("WRK_BODY")
   local path = args[1] or os.getenv("WRK_BODY_FILE")
   if path then
      local f = assert(io.open(path, "rb"))
      body = f:read("*a")
      f:close()
   end
   assert(body, "set WRK_BODY_FILE or WRK_BODY, or pass the body file after --")
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   -- WRK_HEADERS: more headers, one "name: value" a line (a V2 binary body's header length).
   for line in (os.getenv("WRK_HEADERS") or ""):gmatch("[^\n]+") do
      local name, value = line:match("^([^:]+):%s*(.*)$")
      wrk.headers[name] = value
   end
   statuses = {}
   local requests = {}
   -- WRK_WHOLE_BODY=1: the file is one body, newlines and all (binary bytes).
   if not os.getenv("WRK_WHOLE_BODY") then
      for line in body:gmatch("[^\n]+") do
         table.insert(requests, wrk.format(nil, nil, nil, line))
      end
   end
   if #requests > 1 then
      -- Defined only here: with one body wrk sends it without calling into Lua at all.
      local i = 0
      request = function()
         i = i % #requests + 1
         return requests[i]
      end
   else
      wrk.body = body
   end
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local function object(t)
   local parts = {}
   for k, v in pairs(t) do
      table.insert(parts, string.format('"%s":%d', tostring(k), v))
   end
   return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
   local counts = {}
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses") or {}) do
         counts[status] = (counts[status] or 0) + n
      end
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"statuses":%s,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,' ..
      '"p95":%d,"p99":%d,"p999":%d}}\n',
      summary.requests, summary.duration, summary.bytes, object(counts),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(95), latency:percentile(99), latency:percentile(99.9)))
end
