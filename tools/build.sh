#!/usr/bin/env bash
# Rebuild the extensions in place (incremental), serialised so concurrent callers never clash.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/hfc-engine-build.lock python setup.py -q build_ext --inplace
