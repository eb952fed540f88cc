#!/usr/bin/env bash
# Set up clim-fast on a fresh machine: a virtual environment in .venv with the package and its
# test extra installed (torch, torchvision, DALI, faiss, webdataset, ...). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -e ".[test]"
