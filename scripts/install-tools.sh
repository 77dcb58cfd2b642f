#!/usr/bin/env bash
set -euo pipefail
echo "install-tools: nothing to do yet"
