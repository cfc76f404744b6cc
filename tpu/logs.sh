#!/usr/bin/env bash
# tpu/launch.py logs: see `logs.sh --help`; every option, --dry-run included, passes through.
set -euo pipefail
exec python3 "$(dirname "$0")/launch.py" logs "$@"
