-- wrk script: each connection waits PACE_MS (default 1) after every
-- response before sending the next request, so the offered load stays
-- below what the proxies can take and their latencies compare at the same
-- load instead of at their own saturation points.
local pace = tonumber(os.getenv("PACE_MS") or "1")
function delay()
  return pace
end
