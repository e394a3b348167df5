#!/usr/bin/env bash
# Installs a built kdfast wheel into a fresh virtual environment with no compiler reachable and
# runs the whole test suite against it.
#
# Usage: bash tools/check_wheel.sh WHEEL WORKDIR [PYTEST ARGS...]
#
# WORKDIR (created, must not exist) receives: venv/ (the environment), tree/ (a copy of the
# checkout's files that git tracks or would track, in which python/ is never importable:
# `import kdfast` must resolve to the installed wheel, which a pytest plugin checks before any
# test runs), install.time (seconds for `pip install` of the wheel and its dependencies into the
# fresh environment), install_kdfast.time (seconds to reinstall the wheel alone, its
# dependencies present), the pip logs and pytest.log. Every install runs with
# `--only-binary=:all:` under constraints.txt, with PATH holding only the venv and a folder of
# links to basic tools, and CC/CXX/CUDACXX set to /bin/false, so any attempt to compile fails.
# The tests then run with the ordinary PATH (torch.compile's CPU backend needs a C++ compiler
# of its own). Exit status: pytest's.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 WHEEL WORKDIR [PYTEST ARGS...]" >&2; exit 2; }
WHEEL=$(realpath "$1"); WORK=$2; shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir "$WORK"; WORK=$(realpath "$WORK")

# a PATH without compilers: links to the few tools pip and the venv need
mkdir "$WORK/bin"
for tool in sh bash env uname cat ls cp mv rm mkdir ln grep sed date; do
  ln -s "$(command -v "$tool")" "$WORK/bin/$tool"
done
"$(command -v "$PYTHON")" -m venv "$WORK/venv"
NOCC=(env PATH="$WORK/venv/bin:$WORK/bin" CC=/bin/false CXX=/bin/false CUDACXX=/bin/false)
for compiler in cc gcc g++ c++ clang nvcc cmake; do
  if "${NOCC[@]}" sh -c "command -v $compiler" >/dev/null; then echo "$compiler is reachable" >&2; exit 1; fi
done

start=$(date +%s.%N)
"${NOCC[@]}" pip install --only-binary=:all: -c "$ROOT/constraints.txt" "$WHEEL" >"$WORK/install.log" 2>&1
end=$(date +%s.%N)
python3 -c "print(f'{$end - $start:.1f}')" >"$WORK/install.time"
echo "pip install of the wheel and its dependencies: $(cat "$WORK/install.time") s"
# kdfast alone (its dependencies already there), as when torch is installed before it
start=$(date +%s.%N)
"${NOCC[@]}" pip install --only-binary=:all: --no-deps --force-reinstall "$WHEEL" >"$WORK/install_kdfast.log" 2>&1
end=$(date +%s.%N)
python3 -c "print(f'{$end - $start:.1f}')" >"$WORK/install_kdfast.time"
echo "pip install of the wheel alone (dependencies present): $(cat "$WORK/install_kdfast.time") s"
# the test extra (pytest, ruff, mkdocs, transformers, ...), installed the same way
"${NOCC[@]}" pip install --only-binary=:all: -c "$ROOT/constraints.txt" "$WHEEL[test]" >"$WORK/extras.log" 2>&1

mkdir "$WORK/tree"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/tree")
cat >"$WORK/installed_kdfast.py" <<'PLUGIN'
"""pytest plugin: fail the run at once unless `kdfast` is the installed wheel."""
import sys
from pathlib import Path


def pytest_configure(config):
    import kdfast
    where = Path(kdfast.__file__).resolve()
    if Path(sys.prefix).resolve() not in where.parents:
        raise SystemExit(f"kdfast imported from {where}, not from the environment {sys.prefix}")
    print(f"kdfast {kdfast.__version__} from {where.parent}")
PLUGIN
cd "$WORK/tree"
set +e
PYTHONPATH="$WORK" "$WORK/venv/bin/python" -m pytest -p installed_kdfast -p no:cacheprovider -q "$@" 2>&1 \
  | tee "$WORK/pytest.log"
status=${PIPESTATUS[0]}
exit "$status"
