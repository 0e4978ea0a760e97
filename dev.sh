#!/usr/bin/env bash
# One entry point for the two Quick start commands (and a few helpers).
#   ./dev.sh demo    build into .venv and run the demo
#   ./dev.sh test    fmt, clippy, cargo test, build a wheel, install it into a fresh venv, run pytest + stub checks
#   ./dev.sh bench   build (release) into .venv and run the benchmarks
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# PySide6 6.12.0 loses a reference to None per QObject.killTimer (qasync calls it per callback)
# and aborts CPython 3.11: stay below it.
TEST_DEPS=(pytest pytest-asyncio pytest-timeout uvloop pydantic mypy "qasync==0.28.0" "PySide6-Essentials>=6.5,<6.12" "prometheus_client>=0.17")

venv() {  # venv DIR PACKAGES...
  local dir=$1; shift
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$dir/bin/python" -m pip install -q "$@"
}

develop() {
  venv .venv "maturin>=1.9.4,<2" "${TEST_DEPS[@]}"
  .venv/bin/maturin develop --release -q
}

case "${1:-}" in
  demo)
    develop
    .venv/bin/python examples/demo.py
    ;;
  test)
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    cargo clippy --all-targets --no-default-features -- -D warnings
    cargo test --no-default-features
    venv .venv "maturin>=1.9.4,<2"
    PYO3_PYTHON="$PWD/.venv/bin/python" cargo test --lib python::  # the glue's unit tests (need pyo3)
    rm -rf dist
    .venv/bin/maturin build --release -o dist -q
    rm -rf .venv-test
    venv .venv-test "${TEST_DEPS[@]}"
    .venv-test/bin/python -m pip install -q dist/oxbus-*.whl
    # Run from tests/ so `import oxbus` finds the installed wheel, not ./python.
    (cd tests && ../.venv-test/bin/python -m pytest -c ../pyproject.toml --rootdir .. "${@:2}")
    .venv-test/bin/python -m mypy.stubtest oxbus._oxbus
    .venv-test/bin/python -m mypy --strict examples/typed_example.py
    ;;
  bench)
    develop
    .venv/bin/python -m pip install -q pyee blinker
    .venv/bin/python benches/bench_inmemory.py "${@:2}"
    ;;
  *)
    echo "usage: $0 demo|test|bench" >&2
    exit 2
    ;;
esac
