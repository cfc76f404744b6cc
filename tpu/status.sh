#!/usr/bin/env bash
# tpu/launch.py status: see `status.sh --help`; every option, --dry-run included, passes through.
set -euo pipefail
exec python3 "$(dirname "$0")/launch.py" status "$@"
