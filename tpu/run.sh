#!/usr/bin/env bash
# tpu/launch.py run: see `run.sh --help`; every option, --dry-run included, passes through.
set -euo pipefail
exec python3 "$(dirname "$0")/launch.py" run "$@"
