#!/usr/bin/env bash
# Install mep (non-editable) into a virtual environment made from the system interpreter,
# then, given "demo", run `mep demo`.
#
#   root:            /opt/mep/venv, readable by every account (user endpoints exec it)
#   ordinary user:   ~/.local/share/mep/venv
#   override with MEP_VENV=/path
#
# The system interpreter matters: a venv made from a python under a 0700 home
# (such as pyenv's under /root) can't be run by the accounts tasks run as.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${MEP_PYTHON:-/usr/bin/python3}
if [ "$(id -u)" -eq 0 ]; then venv=${MEP_VENV:-/opt/mep/venv}; else venv=${MEP_VENV:-$HOME/.local/share/mep/venv}; fi

if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "error: $python cannot create virtual environments; install python3-venv" >&2
        exit 1
    fi
fi

if [ ! -w "$repo" ]; then  # pip builds in the source tree: use a private copy of a read-only checkout
    copy=$(mktemp -d)
    trap 'rm -rf "$copy"' EXIT
    mkdir "$copy/src"
    for part in pyproject.toml README.md mep templates identity_maps packaging; do cp -r "$repo/$part" "$copy/src/"; done
    repo="$copy/src"
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# pip's warnings about this machine's local package index locations are noise, not errors
"$venv/bin/pip" install --quiet --disable-pip-version-check "$repo[test]" 2>&1 | grep -v '^WARNING: Location' || true
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall "$repo" 2>&1 \
    | grep -v '^WARNING: Location' || true
"$venv/bin/python" -c 'import mep, dill, zmq' # fail loudly if the install did not take
if [ "$(id -u)" -eq 0 ]; then chmod -R a+rX "$(dirname "$venv")"; fi
echo "mep installed in $venv"

if [ "${1:-}" = "demo" ]; then
    shift
    cd /  # run from a directory every account can read
    exec "$venv/bin/mep" demo "$@"
fi
