#!/usr/bin/env bash
# Install mep from this source checkout (non-editable) into a virtual environment made from
# the system interpreter, then, given "demo", run `mep demo` from it.
#
#   bash scripts/install.sh [demo [--as ACCOUNT]]
#
#   root:            /opt/mep/venv, readable by every account (user endpoints exec it)
#   ordinary user:   ~/.local/share/mep/venv
#   MEP_VENV=/path   another location; MEP_PYTHON=/path another interpreter (default /usr/bin/python3)
#
# As root only the venv itself is made world-readable; directories this script creates on the way
# to it are made searchable, existing ones are left alone (a warning names any that other accounts
# can't search). The OS packages (bash packaging/build.sh) install to /opt/mep/venv as well.
#
# The system interpreter matters: a venv made from a python under a 0700 home
# (such as pyenv's under /root) can't be run by the accounts tasks run as.
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi

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

# pip builds in the source tree, and setuptools reuses its build/ directory: a module deleted from the tree since
# the last install would stay installed. Build from a private copy every time (a read-only checkout needs one too).
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
mkdir "$copy/src"
for part in pyproject.toml README.md mep templates identity_maps packaging; do cp -r "$repo/$part" "$copy/src/"; done
repo="$copy/src"

# As root, directories created on the way to the venv are searchable by every account (they are ours).
parent=$(dirname "$venv")
if [ "$(id -u)" -eq 0 ] && [ ! -d "$parent" ]; then (umask 022 && mkdir -p "$parent"); fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# pip's warnings about this machine's local package index locations are noise, not errors
"$venv/bin/pip" install --quiet --disable-pip-version-check "$repo[test]" 2>&1 | grep -v '^WARNING: Location' || true
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall "$repo" 2>&1 \
    | grep -v '^WARNING: Location' || true
"$venv/bin/python" -c 'import mep, dill, zmq' # fail loudly if the install did not take
if [ "$(id -u)" -eq 0 ]; then
    chmod -R a+rX "$venv"  # user endpoints exec it; nothing above it changes
    dir=$(cd "$parent" && pwd -P)
    while [ "$dir" != / ]; do
        if [ "$(( 0$(stat -c %a "$dir") & 01 ))" -eq 0 ]; then
            echo "warning: $dir is not searchable by other accounts, so user endpoints can't run from $venv" \
                "(chmod o+x $dir, or choose another MEP_VENV)" >&2
        fi
        dir=$(dirname "$dir")
    done
fi
echo "mep installed in $venv"

if [ "${1:-}" = "demo" ]; then
    shift
    cd /  # run from a directory every account can read
    exec "$venv/bin/mep" demo "$@"
fi
