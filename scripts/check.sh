#!/usr/bin/env bash
# The checks a change must pass before it is committed: lint, format, types,
# then the test suite. Extra arguments go to pytest (e.g. -k health, -x).
#
#   scripts/check.sh                 everything
#   scripts/check.sh tests/test_sse.py
set -euo pipefail
cd "$(dirname "$0")/.."

ruff check llmproxy tests bench
ruff format --check llmproxy tests bench
mypy
pytest "$@"
