-- wrk script for traffic at a bounded rate: the same request as post.lua, each
-- connection waiting 20 ms after every answer (at most 50 requests/s per connection).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
wrk.body = '{"model":"sim-1","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'

function delay()
    return 20
end
