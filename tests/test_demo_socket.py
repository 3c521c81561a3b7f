"""``llmproxy demo``, as a new user runs it: a simulated provider, the proxy in
front of it, traffic from the openai SDK, and a summary of what was recorded."""

from __future__ import annotations

import json
import subprocess
import sys

from test_shutdown_socket import free_port


def test_demo_sends_traffic_and_says_where_to_look_socket() -> None:
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "llmproxy", "demo", "--exit", "--requests", "4"]
    argv += ["--port", str(port), "--admin-port", str(admin)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    lines = [json.loads(line) for line in done.stdout.splitlines()]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == 4
    assert {r["stream"] for r in requests} == {True, False}
    assert [r["operation"] for r in requests] == ["chat", "chat", "chat", "embeddings"]
    for r in requests:
        assert r["status"] == 200 and r["usage_source"] == "provider"
        assert r["input_tokens"] > 0
        assert r["output_tokens"] > 0 or r["operation"] == "embeddings"
    assert any("first_token_s" in r for r in requests if r["stream"])

    assert "what the proxy recorded" in done.stderr
    assert f"OPENAI_BASE_URL=http://127.0.0.1:{port}/v1" in done.stderr
    assert f"curl http://127.0.0.1:{admin}/metrics" in done.stderr
    assert "Ctrl-C" not in done.stderr  # it has exited, as asked
