#!/bin/sh
# Thin wrapper: `carousel cluster status` (a local Ray head + worker nodes + MLflow server; see docs/operations.md).
# Options pass through, e.g. ./cluster/local/up.sh --workers 3 --worker-cpus 2
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
exec "${CAROUSEL:-$here/.venv/bin/carousel}" cluster status "$@"
