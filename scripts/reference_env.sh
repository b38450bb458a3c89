#!/usr/bin/env bash
# Creates .venv-reference: Python 3.11 with torch (CPU), transformers, safetensors and numpy, the
# reference implementation tests/test_hf.py compares jaxdist's Llama with (tests/hf_reference.py
# runs there, in a subprocess). PyTorch's CPU wheel here is built for Python 3.11 only, hence a
# venv of its own. Does nothing when it is already set up (a stamp file); about 35 s otherwise.
# Exits 2 with one line on stderr when it cannot be made (no python3.11, no torch wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-reference
STAMP=$VENV/reference-installed
PACKAGES="torch==2.13.0 transformers safetensors numpy"
want="$PACKAGES"
if [ -x $VENV/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0  # up to date
fi
PY=""
for candidate in "${PYTHON311:-}" python3.11 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.11*/bin/python3; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
      >/dev/null 2>&1; then
    PY=$candidate; break
  fi
done
if [ -z "$PY" ]; then
  echo "no python3.11 found (the torch CPU wheel needs it); set PYTHON311=/path/to/python3.11" >&2
  exit 2
fi
echo "setting up $VENV with $PY (once; about 35 s)" >&2
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
# shellcheck disable=SC2086
if ! $VENV/bin/python -m pip install -q $PACKAGES > $VENV/pip-install.log 2>&1; then
  echo "installing $PACKAGES into $VENV failed: $(grep -m1 -i error $VENV/pip-install.log)" >&2
  exit 2
fi
echo "$want" > "$STAMP"
