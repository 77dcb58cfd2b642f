#!/usr/bin/env bash
set -euo pipefail
echo "bench: nothing to do yet"
