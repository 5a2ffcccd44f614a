#!/usr/bin/env bash
# CI for the OS packages (as root, on a machine mep is not installed on): build both, verify the systemd
# units, install the .deb with apt-get, run `mep --version` and `mep demo` from the installed copy,
# remove it (only /etc/mep may stay, besides data the daemons wrote), purge it (nothing may stay), and
# inspect the .rpm. Leaves the machine as it found it; /opt/mep/venv is gone afterwards.
#
#   bash packaging/check.sh
#
# The service unit's `systemd-analyze security` exposure must stay at or below 2.0 (it scores 1.4:
# root without any capability, read-only file system but its state directory; the 0.4 for "runs as
# root" and 0.5 for "has network access" are the price of owning the admin's state and of serving).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
security_threshold=20  # systemd-analyze's scale is tenths: 20 means an exposure of 2.0
units=(mep-service.service mep-manager@.service)
fail() { echo "packaging check FAILED: $*" >&2; exit 1; }
step() { echo "--- $*"; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs and purges the .deb)"
if dpkg -s mep >/dev/null 2>&1; then fail "mep is installed already; this check would remove it"; fi
if ! command -v rpmbuild >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rpm >/dev/null
fi

step "build"
if [ -z "${MEP_CHECK_REUSE_DIST:-}" ]; then  # set it to check the packages already in dist/
    rm -f dist/mep_*.deb dist/mep-*.rpm
    bash packaging/build.sh
fi
debs=(dist/mep_*.deb)
rpms=(dist/mep-*.rpm)
[ "${#debs[@]}" -eq 1 ] && [ -f "${debs[0]}" ] || fail "expected one dist/mep_<version>_<arch>.deb"
[ "${#rpms[@]}" -eq 1 ] && [ -f "${rpms[0]}" ] || fail "expected one dist/mep-<version>-<release>.<arch>.rpm"
version=$(dpkg-deb -f "${debs[0]}" Version)

step "inspect the .rpm"
rpm_files=$(rpm -qpl "${rpms[0]}")
for path in /usr/bin/mep /opt/mep/venv/bin/python /opt/mep/venv/bin/mep /etc/mep/service.yaml \
    /etc/mep/manager.example.yaml /etc/pam.d/mep /etc/logrotate.d/mep /usr/lib/tmpfiles.d/mep.conf \
    /usr/lib/systemd/system/mep-service.service /usr/lib/systemd/system/mep-manager@.service \
    /usr/share/mep/templates/local.yaml.j2 /usr/share/mep/templates/local.schema.json \
    /usr/share/mep/identity_maps/example-domain-strip.json /usr/share/doc/mep/admin.md; do
    grep -qxF "$path" <<<"$rpm_files" || fail "the .rpm lacks $path"
done
# (outputs are captured first: grep -q closing a pipe early would fail the pipeline under pipefail)
requires=$(rpm -qpR "${rpms[0]}")
grep -q '^python(abi) = 3\.' <<<"$requires" || fail "the .rpm does not require a python(abi)"
grep -q 'shadow-utils' <<<"$requires" || fail "the .rpm does not require shadow-utils (useradd)"
if grep -q '\.so' <<<"$requires"; then fail "the .rpm requires the venv's bundled libraries"; fi
scripts=$(rpm -qp --scripts "${rpms[0]}")
for needed in "postinstall scriptlet" "preuninstall scriptlet" "postuninstall scriptlet" "useradd --system"; do
    grep -qF "$needed" <<<"$scripts" || fail "the .rpm's scripts lack '$needed'"
done
grep -qxF /etc/mep/service.yaml <<<"$(rpm -qpc "${rpms[0]}")" || fail "/etc/mep/service.yaml is not %config"

step "install ${debs[0]}"
paths=$(dpkg-deb -c "${debs[0]}" | awk '{print $6}' | sed 's|^\./|/|; s|/$||' | grep -v '^$' | grep -v '^/$')
existing=$(while read -r path; do if [ -e "$path" ] || [ -L "$path" ]; then echo "$path"; fi; done <<<"$paths")
had_account=no
getent passwd mep >/dev/null && had_account=yes
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "./${debs[0]}" >/dev/null
[ "$(dpkg-query -W -f '${Status}' mep)" = "install ok installed" ] || fail "dpkg does not list mep as installed"
[ "$(dpkg-query -W -f '${Conffiles}' mep | awk 'NF {print $1}' | sort | tr '\n' ' ')" \
    = "/etc/mep/manager.example.yaml /etc/mep/service.yaml " ] || fail "unexpected conffiles"
grep -q ':/usr/sbin/nologin$' <<<"$(getent passwd mep)" || fail "no mep account with a nologin shell"
[ "$(getent passwd mep | cut -d: -f3)" -lt 1000 ] || fail "the mep account is not a system account"
for dir in "/var/lib/mep root:root 755" "/var/log/mep root:root 711" "/run/mep root:root 755"; do
    set -- $dir
    [ "$(stat -c '%U:%G %a' "$1")" = "$2 $3" ] || fail "$1 is $(stat -c '%U:%G %a' "$1"), not $2 $3"
done
[ "$(readlink -f /usr/bin/mep)" = /opt/mep/venv/bin/mep ] || fail "/usr/bin/mep does not lead to the venv"
[[ "$(head -1 /opt/mep/venv/bin/mep)" =~ ^'#!/opt/mep/venv/bin/python'3?$ ]] || fail "the venv's scripts name another python"

step "verify the units"
for unit in "${units[@]}"; do
    out=$(systemd-analyze verify "/usr/lib/systemd/system/$unit" 2>&1) || fail "systemd-analyze verify $unit: $out"
    [ -z "$out" ] || fail "systemd-analyze verify $unit printed: $out"
done
systemd-analyze security --offline=yes --threshold="$security_threshold" \
    /usr/lib/systemd/system/mep-service.service >/dev/null \
    || fail "mep-service.service's exposure exceeds $security_threshold/10: systemd-analyze security --offline=yes"

step "run the installed copy"
[ "$(mep --version)" = "mep $version" ] || fail "mep --version printed '$(mep --version)', expected 'mep $version'"
(cd / && mep demo) || fail "mep demo from the installed package failed"
# the units' command lines with the shipped settings, and an endpoint configured from the shipped examples
mep service init >/dev/null || fail "mep service init failed"
address_file=$(mktemp -u)
mep service start --config /etc/mep/service.yaml --listen tcp://127.0.0.1:0 --address-file "$address_file" \
    2>/dev/null &
service_pid=$!
for _ in $(seq 100); do [ -s "$address_file" ] && break; sleep 0.2; done
[ -s "$address_file" ] || fail "mep service start --config /etc/mep/service.yaml did not listen"
mep endpoint configure ci --service-address "$(cat "$address_file")" >/dev/null 2>&1 \
    || fail "mep endpoint configure failed"
kill "$service_pid" && wait "$service_pid" || true
rm -f "$address_file"
[ "$(mep endpoint status ci --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])')" \
    = stopped ] || fail "mep endpoint status ci does not report a stopped manager"
[ -z "$(find /opt/mep /usr/share/mep -name '*.pyc' -newer /usr/bin/mep -print -quit)" ] \
    || fail "byte-code was written at run time (the package ships it compiled)"

step "remove"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq mep >/dev/null
left=$(while read -r path; do
    if { [ -e "$path" ] || [ -L "$path" ]; } && ! grep -qxF "$path" <<<"$existing"; then echo "$path"; fi
done <<<"$paths")
[ "$(grep -v '^/etc/mep' <<<"$left" | grep -v '^$' || true)" = "" ] || fail "remove left: $(grep -v '^/etc/mep' <<<"$left")"
[ -f /etc/mep/service.yaml ] || fail "remove deleted the conffiles in /etc/mep"
for path in /opt/mep /run/mep /usr/share/mep; do [ ! -e "$path" ] || fail "remove left $path"; done
# the service's state and the demo's audit and task logs are data mep's daemons wrote: kept until purge
[ -f /var/lib/mep/service/service.key ] || fail "remove deleted the service's state"
[ -f /etc/mep/ci/config.yaml ] || fail "remove deleted the configured endpoint in /etc/mep/ci"
left=$(find /var/lib/mep /var/log/mep -mindepth 1 ! -path '/var/lib/mep/service*' ! -name 'audit-*.jsonl' \
    ! -path '/var/log/mep/router-*' 2>/dev/null)
[ -z "$left" ] || fail "remove left $left"

step "purge"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq mep >/dev/null
if dpkg -L mep >/dev/null 2>&1; then fail "dpkg still lists files of mep"; fi
left=$(while read -r path; do
    if { [ -e "$path" ] || [ -L "$path" ]; } && ! grep -qxF "$path" <<<"$existing"; then echo "$path"; fi
done <<<"$paths")
[ -z "$left" ] || fail "purge left: $left"
for path in /etc/mep /var/lib/mep /var/log/mep /run/mep /opt/mep; do [ ! -e "$path" ] || fail "purge left $path"; done
if [ "$had_account" = no ] && getent passwd mep >/dev/null; then fail "purge left the mep account it created"; fi
echo "packaging check passed: ${debs[0]} ${rpms[0]}"
