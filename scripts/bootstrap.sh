#!/usr/bin/env bash
# Creates or updates .venv (Python >= 3.12) with jaxdist and its extras ($EXTRAS, default dev).
# Does nothing when .venv already holds an install of this pyproject.toml with these extras, so
# scripts/train.sh and scripts/test.sh call it every time.
# Python 3.12+ is needed for jax >= 0.12, the first release whose CPU collectives did not deadlock
# on a 2-core machine. Prefers 3.12 (the version the CPU-collective measurements were made on):
# $PYTHON, then python3.12 / python3 / python3.13 on PATH, then pyenv's installed versions.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev}
STAMP=.venv/jaxdist-installed
want="$(sha256sum pyproject.toml | cut -c1-16) extras=${EXTRAS}"
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0  # up to date
fi

is_new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

PY=""
for candidate in "${PYTHON:-}" python3.12 python3 python3.13 \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[3-9]*/bin/python3; do
  if [ -n "$candidate" ] && is_new_enough "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
  echo "error: no Python >= 3.12 found; install one (or set PYTHON=/path/to/python3.12)" >&2
  exit 2
fi
if [ -x .venv/bin/python ] && ! is_new_enough .venv/bin/python; then
  echo "error: .venv has $(.venv/bin/python --version); remove it (rm -r .venv) to rebuild with $PY" >&2
  exit 2
fi
echo "setting up .venv with $PY ($("$PY" --version)), extras [${EXTRAS}] (once; about a minute)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip > .venv/pip-install.log 2>&1 || true
if ! .venv/bin/python -m pip install -q -e ".[${EXTRAS}]" >> .venv/pip-install.log 2>&1; then
  grep -v "^WARNING: Location" .venv/pip-install.log >&2
  echo "error: installing jaxdist failed (log: .venv/pip-install.log)" >&2
  exit 1
fi
.venv/bin/python -c 'import jax, flax, optax, grain, tensorflow_datasets; print("installed jax", jax.__version__, "flax", flax.__version__)' >&2
echo "$want" > "$STAMP"
