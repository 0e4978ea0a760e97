#!/bin/sh
# Instructions per event of benches/profile_publish.py under callgrind, counted between its
# markers (see its docstring): (Ir at N2 - Ir at N1) / (N2 - N1).
# Usage: benches/callgrind_per_event.sh BUS KIND [WORKERS] [SUBS]; N1, N2, OUT, PY (the
# python, .venv/bin/python) from the environment.
set -e
cd "$(dirname "$0")/.."
bus=$1 kind=$2 w=${3:-1} s=${4:-1}
N1=${N1:-5000} N2=${N2:-25000}
out=${OUT:-/tmp/cg}
for n in $N1 $N2; do
  f="$out.$bus.$kind.$w.$s.$n"
  rm -f "$f" "$f".*
  valgrind --tool=callgrind --callgrind-out-file="$f" --zero-before=os_getppid \
    --dump-before=os_getpgrp \
    "${PY:-.venv/bin/python}" benches/profile_publish.py "$bus" "$kind" "$n" "$w" "$s" 2>"$f.log"
  mv "$f.1" "$f.region"  # the dump at the end marker: the measured region only
done
ir() { grep -E '^(summary|totals):' "$1" | head -1 | awk '{print $2}'; }
a=$(ir "$out.$bus.$kind.$w.$s.$N1.region"); b=$(ir "$out.$bus.$kind.$w.$s.$N2.region")
echo "$bus $kind workers=$w subs=$s: $(( (b - a) / (N2 - N1) )) instructions/event ($(( b / N2 )) at N=$N2, all included)"
