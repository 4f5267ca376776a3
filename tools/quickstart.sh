#!/usr/bin/env bash
# The main job end to end on a built-in default. Grows with the project: today it resolves and
# prints the tiny run's config; the data, training and export stages are added as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m megalm.train --config configs/tiny.yaml --print-config
