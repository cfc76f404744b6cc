#!/usr/bin/env bash
# tpu/launch.py setup: see `setup.sh --help`; every option, --dry-run included, passes through.
set -euo pipefail
exec python3 "$(dirname "$0")/launch.py" setup "$@"
