#!/usr/bin/env bash
# Train the MNIST CNN data-parallel on every device (8 virtual CPU devices without accelerators),
# setting up whatever is missing first:
#   - .venv with jaxdist (scripts/bootstrap.sh; a no-op when it is up to date);
#   - MNIST: TFDS's usual lookup ($TFDS_DATA_DIR, ~/tensorflow_datasets), then
#     ../shared/data/tensorflow_datasets beside the repository (its CI layout), else prepared by
#     TFDS when the `prepare` extra is installed (EXTRAS=dev,prepare) and there is internet;
#     otherwise one line naming both ways.
# Arguments go to `python -m experiments.mnist` (see --help), e.g. --strategy shard_map.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
download=()
if .venv/bin/python -c 'import tensorflow' >/dev/null 2>&1; then
  download=(--download)  # only used when MNIST is found nowhere
fi
exec .venv/bin/python -m experiments.mnist "${download[@]}" "$@"
