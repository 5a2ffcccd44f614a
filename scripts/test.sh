#!/usr/bin/env bash
# Install mep as scripts/install.sh does, then run the test suite from that installation.
# As root (as CI runs it) every test runs: real accounts, real privilege drops.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "$(id -u)" -eq 0 ]; then venv=${MEP_VENV:-/opt/mep/venv}; else venv=${MEP_VENV:-$HOME/.local/share/mep/venv}; fi
MEP_VENV=$venv bash "$repo/scripts/install.sh"
if [ "$(id -u)" -eq 0 ]; then
    # the scheduler tests need a real single-node Slurm (with Torque's qsub over it); idempotent
    bash "$repo/scripts/slurm-setup.sh"
fi
cd "$repo"
# -P: the source tree must not shadow the installed package
exec "$venv/bin/python" -P -m pytest -p no:cacheprovider "$@"
