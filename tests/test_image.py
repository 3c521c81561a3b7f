"""The container image: built with buildah on a debootstrapped Debian base, then run.

Takes minutes (debootstrap, then pip inside the build), so it runs only with
LLMPROXY_IMAGE_TEST=1, as root, with buildah and debootstrap installed:

    apt-get install buildah debootstrap
    LLMPROXY_IMAGE_TEST=1 pytest -m image -s

The build is scripts/build-image.sh --debootstrap, which users run too. The
image's processes share the host's network (buildah's chroot isolation), so the
proxy inside talks to a fake provider on 127.0.0.1 and the test reaches it there.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/llmproxy:test"
UID = "10001"

pytestmark = [
    pytest.mark.image,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LLMPROXY_IMAGE_TEST") != "1",
        reason="builds a container image for minutes: set LLMPROXY_IMAGE_TEST=1",
    ),
]


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), "--debootstrap", "--tag", TAG],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    print(f"\nimage {TAG} built in {time.monotonic() - started:.0f}s")
    return TAG


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = f"llmproxy-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["buildah", "from", "--name", name, image],
        capture_output=True,
        check=True,
        timeout=120,
    )
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, timeout=120)


def run_in(
    container: str, *argv: str, volume: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = ["buildah", "run", "--isolation", "chroot"]
    if volume:
        command += ["--volume", volume]
    return subprocess.run(
        [*command, container, "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_image_config(image: str) -> None:
    result = subprocess.run(
        ["buildah", "inspect", "--type", "image", image],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    config = json.loads(result.stdout)["Docker"]["config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["llmproxy"] and config["Cmd"] == ["serve"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}
    assert "LLMPROXY_CONFIG=/etc/llmproxy/config.yaml" in config["Env"]
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "python3", "-c"]


def test_runs_as_non_root_with_uvloop(container: str) -> None:
    assert run_in(container, "id", "-u").stdout.strip() == UID
    result = run_in(container, "python3", "-c", "import uvloop, llmproxy.cli")
    assert result.returncode == 0, result.stderr


def test_baked_config_is_valid(container: str) -> None:
    result = run_in(
        container, "llmproxy", "check", "--config", "/etc/llmproxy/config.yaml"
    )
    assert result.returncode == 0, result.stderr


def test_demo_serves_requests_socket(container: str) -> None:
    result = run_in(
        container,
        "llmproxy",
        "demo",
        "--exit",
        "--requests",
        "3",
        "--port",
        str(free_port()),
        "--admin-port",
        str(free_port()),
    )
    assert result.returncode == 0, result.stderr[-3000:]


class FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """A chat completions endpoint that remembers the credentials it was sent."""

    seen: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(self.headers.get("Authorization"))
        body = json.dumps(
            {
                "id": "chatcmpl-image",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 3,
                    "completion_tokens": 1,
                    "total_tokens": 4,
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_openai() -> Iterator[str]:
    FakeOpenAI.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def mounted_config(directory: Path, upstream: str) -> tuple[int, int]:
    """The baked config, pointed at ``upstream`` on free loopback ports."""
    raw = yaml.safe_load((ROOT / "deploy" / "docker" / "config.yaml").read_text())
    port, admin = free_port(), free_port()
    raw["server"].update(
        listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}", drain_grace="2s"
    )
    raw["upstreams"]["openai"]["url"] = upstream
    directory.chmod(0o755)  # the image's user must read it
    (directory / "config.yaml").write_text(yaml.safe_dump(raw))
    (directory / "config.yaml").chmod(0o644)
    return port, admin


def get(url: str, **kwargs: Any) -> tuple[int, bytes]:
    request = urllib.request.Request(url, **kwargs)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(admin: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[1][-3000:]
        try:
            if get(f"http://127.0.0.1:{admin}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail("the proxy in the image did not become ready in 60s")


def proxy_pid(root: int) -> int:
    """The llmproxy process under ``buildah run``: the one to send SIGTERM to.

    With worker processes (the image starts one per CPU) that is their
    supervisor, never a worker: a worker told to stop is replaced.
    """
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    family, grew = {root}, True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in family}
        grew = not children <= family
        family |= children
    for pid in family:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        serves = argv[0].endswith((b"python3", b"python")) and b"serve" in argv
        if serves and b"--worker" not in argv:
            return pid
    raise AssertionError("no llmproxy process under buildah run")


def test_serves_mounted_config_and_drains_on_sigterm_socket(
    container: str, fake_openai: str, tmp_path: Path
) -> None:
    port, admin = mounted_config(tmp_path, fake_openai)
    server = subprocess.Popen(
        [
            "buildah",
            "run",
            "--isolation",
            "chroot",
            "--volume",
            f"{tmp_path}:/etc/llmproxy:ro",
            container,
            "--",
            "llmproxy",  # the image's CMD, with its LLMPROXY_CONFIG
            "serve",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(admin, server)

        # The image's HEALTHCHECK, pointed at this test's admin port.
        inspect = subprocess.run(
            ["buildah", "inspect", "--type", "image", TAG],
            capture_output=True,
            text=True,
            check=True,
        )
        check = json.loads(inspect.stdout)["Docker"]["config"]["Healthcheck"]["Test"]
        code = check[3].replace(":9090/", f":{admin}/")
        assert run_in(container, "python3", "-c", code).returncode == 0

        status, body = get(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "gpt-4o-mini", "messages": []}).encode(),
            headers={
                "Authorization": "Bearer sk-client-key",
                "Content-Type": "application/json",
            },
        )
        assert status == 200 and json.loads(body)["id"] == "chatcmpl-image"
        assert FakeOpenAI.seen == ["Bearer sk-client-key"]
        metrics = get(f"http://127.0.0.1:{admin}/metrics")[1].decode()
        assert "llmproxy_requests_total{" in metrics

        os.kill(proxy_pid(server.pid), signal.SIGTERM)
        logs, errors = server.communicate(timeout=30)
        assert server.returncode == 0, errors[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    events = [
        json.loads(line)["event"] for line in logs.splitlines() if line[:1] == "{"
    ]
    assert "proxy.stopping" in events and "proxy.stopped" in events
