#!/usr/bin/env bash
# The test suite, with the same set-up as scripts/train.sh: .venv, and MNIST from $TFDS_DATA_DIR,
# else ../shared/data/tensorflow_datasets where it exists, else TFDS's default
# (tests/conftest.py); the tests that need MNIST skip, saying so, where it is not prepared.
# CI (.ci/run) runs exactly this. Arguments go to pytest, e.g. -m slow, or tests/test_resume.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
