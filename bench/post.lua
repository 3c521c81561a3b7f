-- wrk script for the bench: one non-streamed chat completion per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
wrk.body = '{"model":"sim-1","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
