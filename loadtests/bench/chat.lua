-- wrk script for bench_overhead.py: POST /v1/chat/completions, closed loop.
--
-- 64 request bodies (about 1.1 KB each: one shared system prompt, then a user message that differs)
-- are rendered once in init() and handed out in turn, so wrk spends no per-request time building
-- them. The first script argument picks the shape: "stream" (max_tokens 64, "stream":true) or
-- anything else (non-streaming, max_tokens 16). done() prints one line, "BENCH {json}", which the
-- harness parses; latencies are wrk's, in microseconds, to the last byte of the response.

local requests = {}
local next_index = 0

function init(args)
  local stream = args[1] == "stream"
  local system = string.rep("You are a concise assistant behind an edge gateway; answer in plain text. ", 11)
  for k = 1, 64 do
    local user = string.format(
      "Request %02d of 64: list three facts about the number %d and explain why each one holds.", k, k * 7)
    local body = string.format(
      '{"model":"bench","messages":[{"role":"system","content":"%s"},{"role":"user","content":"%s"}],'
      .. '"max_tokens":%d,"stream":%s}',
      system, user, stream and 64 or 16, stream and "true" or "false")
    requests[k] = wrk.format("POST", "/v1/chat/completions",
      {["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench"}, body)
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,'
    .. '"max_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,'
    .. '"timeouts":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
