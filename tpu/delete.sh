#!/usr/bin/env bash
# tpu/launch.py delete: see `delete.sh --help`; every option, --dry-run included, passes through.
set -euo pipefail
exec python3 "$(dirname "$0")/launch.py" delete "$@"
