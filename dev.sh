#!/usr/bin/env bash
# One entry point for the two Quick start commands (and a few helpers).
#   ./dev.sh demo    build into .venv and run the demo
#   ./dev.sh test    fmt, clippy, cargo test, the documentation site, build wheels, install each
#                    into a fresh venv of the oldest (3.10) and of the newest (3.13) supported
#                    CPython, run pytest (README and docs/ code blocks included) + stub checks in each
#   ./dev.sh docs    build the documentation site (mkdocs.yml, docs/) into site/, --strict
#   ./dev.sh wheels  release wheels for CPython 3.10 to 3.13 into dist/
#   ./dev.sh bench   build (release) into .venv and run the benchmarks
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# The oldest and the newest CPython oxbus supports (pyproject: requires-python, classifiers).
OLDEST=3.10
NEWEST=3.13
# PySide6 6.12.0 loses a reference to None per QObject.killTimer (qasync calls it per callback)
# and aborts CPython 3.11: stay below it.
# The documentation site: mkdocs-material, and mkdocstrings reading python/ statically (griffe:
# no import of oxbus, no compiled module needed); ruff formats the signatures.
DOCS_DEPS=("mkdocs>=1.6.1,<2" "mkdocs-material>=9.6,<10" "mkdocstrings>=1.0.8,<2"
  "mkdocstrings-python>=2.0,<3" ruff)
TEST_DEPS=(pytest pytest-asyncio pytest-timeout uvloop pydantic mypy "qasync==0.28.0" "PySide6-Essentials>=6.5,<6.12" "prometheus_client>=0.17" "aio-pika>=9")

venv() {  # venv DIR PYTHON PACKAGES...
  local dir=$1 py=$2; shift 2
  [ -x "$dir/bin/python" ] || "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
  [ $# -eq 0 ] || "$dir/bin/python" -m pip install -q "$@"
}

python_for() {  # python_for 3.X: that CPython (pyenv's, else pythonX.Y on PATH); else, outside
  # CI, $PY with the reason on stderr; under OXBUS_CI=1 a missing version fails the run.
  local v=$1 p
  for p in "$HOME"/.pyenv/versions/"$v".*/bin/python "$(command -v "python$v" || true)"; do
    if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return; fi
  done
  if [ "${OXBUS_CI:-}" = 1 ]; then
    echo "error: CPython $v not found (~/.pyenv/versions/$v.*/bin/python or python$v); OXBUS_CI=1 requires it" >&2
    return 1
  fi
  echo "warning: CPython $v not found (~/.pyenv/versions/$v.*/bin/python or python$v): testing with $PY ($("$PY" -V 2>&1)) instead" >&2
  command -v "$PY"
}

docs() {  # the site into site/; any warning (a broken link, a bad docstring) fails the build
  venv .venv-docs "$PY" "${DOCS_DEPS[@]}"
  NO_MKDOCS_2_WARNING=1 .venv-docs/bin/mkdocs build --strict --quiet
  echo "documentation site built into site/"
}

develop() {  # develop PACKAGES...: a release build into .venv, with what the caller needs
  venv .venv "$PY" "maturin>=1.9.4,<2" "$@"
  .venv/bin/maturin develop --release -q
}

suite() {  # suite PYTHON: the wheel into a fresh venv of PYTHON, then pytest and the stub checks
  local py=$1 dir
  dir=.venv-test-$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  echo "== CPython $("$py" -c 'import platform; print(platform.python_version())') ($py) in $dir"
  rm -rf "$dir"
  venv "$dir" "$py" "${TEST_DEPS[@]}"
  local tag wheel='' w
  tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  for w in dist/oxbus-*-"$tag-$tag"-*.whl dist/oxbus-*-abi3-*.whl; do
    if [ -f "$w" ]; then wheel=$w; break; fi
  done
  "$dir/bin/python" -m pip install -q "${wheel:?no wheel in dist/ for $tag}"
  # Run from tests/ so `import oxbus` finds the installed wheel, not ./python.
  (cd tests && "../$dir/bin/python" -m pytest -c ../pyproject.toml --rootdir .. "${PYTEST_ARGS[@]}")
  "$dir/bin/python" -m mypy.stubtest oxbus._oxbus
  "$dir/bin/python" -m mypy python/oxbus  # the package's own sources, strict (pyproject)
  "$dir/bin/python" -m mypy --strict examples/typed_example.py
}

case "${1:-}" in
  demo)
    develop  # maturin and oxbus's own dependencies: not the test stack
    .venv/bin/python examples/demo.py
    ;;
  test)
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    cargo clippy --all-targets --no-default-features -- -D warnings
    cargo clippy --all-targets --features abi3 -- -D warnings
    cargo test --no-default-features
    oldest=$(python_for "$OLDEST")
    newest=$(python_for "$NEWEST")
    venv .venv "$PY" "maturin>=1.9.4,<2"
    PYO3_PYTHON="$PWD/.venv/bin/python" cargo test --lib python::  # the glue's unit tests (need pyo3)
    docs
    rm -rf dist
    # One wheel per CPython version, not one abi3 wheel: abi3 costs ~25% of the publish +
    # handler throughput (benches/README.md, "abi3 or one wheel per version").
    .venv/bin/maturin build --release -o dist -q -i "$oldest" -i "$newest"
    PYTEST_ARGS=("${@:2}")
    suite "$oldest"
    if [ "$(realpath "$newest")" != "$(realpath "$oldest")" ]; then
      suite "$newest"
    fi
    ;;
  wheels)
    # Release wheels for every supported CPython found (3.10 to 3.13) into dist/.
    venv .venv "$PY" "maturin>=1.9.4,<2"
    pys=()
    for v in 3.10 3.11 3.12 3.13; do pys+=(-i "$(python_for "$v")"); done
    rm -rf dist
    .venv/bin/maturin build --release -o dist -q "${pys[@]}"
    ls dist
    ;;
  docs)
    docs
    ;;
  bench)
    develop pyee blinker
    .venv/bin/python benches/bench_inmemory.py "${@:2}"
    ;;
  *)
    echo "usage: $0 demo|test|docs|wheels|bench" >&2
    exit 2
    ;;
esac
