#!/usr/bin/env bash
# Build the OS packages: dist/mep_<version>_<arch>.deb and dist/mep-<version>-<release>.<arch>.rpm.
#
#   bash packaging/build.sh            both (needs dpkg-deb and rpmbuild: apt-get install rpm)
#   MEP_PACKAGES=deb bash packaging/build.sh   only one of them
#   MEP_RELEASE=2 ...                   the rpm's release number (default 1)
#
# Both hold the same staged tree:
#   /opt/mep/venv                      a virtual environment made from /usr/bin/python3, byte-compiled
#   /usr/bin/mep                       -> /opt/mep/venv/bin/mep
#   /usr/share/mep/{templates,identity_maps,pam.d,examples}  (the venv's share/mep points here)
#   /usr/lib/systemd/system/mep-service.service, mep-manager@.service, /usr/lib/tmpfiles.d/mep.conf
#   /etc/mep/service.yaml, /etc/mep/manager.example.yaml (conffiles), /etc/pam.d/mep, /etc/logrotate.d/mep
#   /usr/share/doc/mep/*.md
# The venv is built in a scratch directory and relocated to /opt/mep/venv (shebangs, pyvenv.cfg,
# activate scripts); the build fails if any byte still names the scratch directory.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
packaging="$repo/packaging"
python=/usr/bin/python3
packages=${MEP_PACKAGES:-deb rpm}
release=${MEP_RELEASE:-1}

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
for tool in $packages; do
    case $tool in
        deb) command -v dpkg-deb >/dev/null || { echo "error: dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; } ;;
        rpm) command -v rpmbuild >/dev/null || { echo "error: rpmbuild not found (apt-get install rpm)" >&2; exit 1; } ;;
        *) echo "error: MEP_PACKAGES names '$tool'; use deb and/or rpm" >&2; exit 1 ;;
    esac
done

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
py_abi=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
deb_arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
rpm_arch=$(uname -m)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
venv=/opt/mep/venv
staged="$root$venv"

# pip builds in the source tree: build from a private copy (the checkout may be read-only or dirty)
mkdir -p "$work/src"
for part in pyproject.toml README.md mep templates identity_maps packaging; do cp -r "$repo/$part" "$work/src/"; done
find "$work/src" -depth -type d \( -name __pycache__ -o -name '*.egg-info' -o -name build \) -exec rm -rf {} +

echo "building the virtual environment (mep $version, Python $py_abi)"
mkdir -p "$(dirname "$staged")"
"$python" -m venv "$staged"
# pip's warnings about this machine's local package index locations are noise, not errors
"$staged/bin/pip" install --quiet --disable-pip-version-check --no-compile "$work/src" 2>&1 \
    | { grep -v '^WARNING: Location' || true; }
"$staged/bin/python" -c 'import mep, zmq, dill, parsl'
"$staged/bin/pip" uninstall --quiet --yes pip  # the package manager owns this environment
find "$staged" -depth -type d -name __pycache__ -exec rm -rf {} +

# Data files: pip put them in the venv's share/mep; they live in /usr/share/mep, the venv points there.
mkdir -p "$root/usr/share"
mv "$staged/share/mep" "$root/usr/share/mep"
ln -s /usr/share/mep "$staged/share/mep"
mkdir -p "$root/usr/share/mep/examples"
cp "$repo/mep/cli/examples/"*.yaml "$root/usr/share/mep/examples/"

# Relocate: every text file naming the scratch root names the final path instead.
grep -rlI --null -F "$root" "$staged" | xargs -0 -r sed -i "s|$root||g"
if grep -rl -F "$root" "$staged" >/dev/null; then
    echo "error: these files still name the build directory:" >&2
    grep -rl -F "$root" "$staged" >&2
    exit 1
fi
# Byte-code compiled for its final path, so no account has to write it at run time.
"$staged/bin/python" -m compileall -q -j 0 -s "$root" -p / "$staged/lib" "$root/usr/share/mep" >/dev/null

install -d "$root/usr/bin" "$root/usr/lib/systemd/system" "$root/usr/lib/tmpfiles.d" "$root/usr/share/doc/mep" \
    "$root/etc/mep" "$root/etc/pam.d" "$root/etc/logrotate.d"
ln -s "$venv/bin/mep" "$root/usr/bin/mep"
install -m 0644 "$packaging/systemd/mep-service.service" "$packaging/systemd/mep-manager@.service" \
    "$root/usr/lib/systemd/system/"
install -m 0644 "$packaging/tmpfiles.conf" "$root/usr/lib/tmpfiles.d/mep.conf"
install -m 0644 "$repo/mep/cli/examples/service.yaml" "$root/etc/mep/service.yaml"
install -m 0644 "$repo/mep/cli/examples/manager.yaml" "$root/etc/mep/manager.example.yaml"
install -m 0644 "$packaging/pam.d/mep" "$root/etc/pam.d/mep"
install -m 0644 "$packaging/logrotate" "$root/etc/logrotate.d/mep"
install -m 0644 "$repo/README.md" "$repo"/docs/*.md "$root/usr/share/doc/mep/"
chmod -R u=rwX,go=rX "$root"

mkdir -p "$repo/dist"
conffiles="/etc/mep/service.yaml /etc/mep/manager.example.yaml"
summary="Multi-user function-serving endpoint: run Python functions on a cluster as each researcher's own account"
description="Researchers send Python functions from a laptop or Jupyter; a service queues them durably and a
 per-endpoint manager runs each one as the submitter's mapped Unix account, shaped by the admin's templates."

# maintainer script: the shared functions, then a dispatch on the package manager's arguments
maintainer_script() {
    printf '#!/bin/sh\nset -e\n'
    cat "$packaging/maintainer.sh"
    printf '\n%s\n' "$1"
}

if [[ " $packages " == *" deb "* ]]; then
    deb_root="$work/deb"
    cp -a "$root" "$deb_root"
    mkdir -p "$deb_root/DEBIAN"
    cat > "$deb_root/DEBIAN/control" <<EOF
Package: mep
Version: $version
Architecture: $deb_arch
Maintainer: mep maintainers <mep@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$deb_root" | cut -f1)
Depends: python$py_abi, passwd, libpam0g, libpam-runtime
Recommends: logrotate
Section: net
Priority: optional
Homepage: https://example.org/mep
Description: $summary
 $description
EOF
    printf '%s\n' $conffiles > "$deb_root/DEBIAN/conffiles"
    maintainer_script 'case "$1" in configure) mep_configure ;; esac' > "$deb_root/DEBIAN/postinst"
    maintainer_script 'case "$1" in remove|upgrade|deconfigure|failed-upgrade) mep_before_remove ;; esac' \
        > "$deb_root/DEBIAN/prerm"
    maintainer_script 'case "$1" in remove) mep_after_remove ;; purge) mep_after_remove; mep_purge ;; esac' \
        > "$deb_root/DEBIAN/postrm"
    chmod 0755 "$deb_root/DEBIAN/postinst" "$deb_root/DEBIAN/prerm" "$deb_root/DEBIAN/postrm"
    deb="$repo/dist/mep_${version}_${deb_arch}.deb"
    dpkg-deb --root-owner-group -Zgzip --build "$deb_root" "$deb" >/dev/null
    echo "wrote $deb"
fi

if [[ " $packages " == *" rpm "* ]]; then
    top="$work/rpmbuild"
    mkdir -p "$top/SPECS" "$top/RPMS"
    # Debian's rpm has none of Fedora's macros (%_unitdir, %systemd_post ...): every path is spelled out,
    # and rpm's own post-install steps (strip, byte-compile, build-id links) are off: the tree is final.
    {
        cat <<EOF
%global __os_install_post %{nil}
%global debug_package %{nil}
%global _build_id_links none
Name: mep
Version: $version
Release: $release
Summary: $summary
License: Apache-2.0
URL: https://example.org/mep
BuildArch: $rpm_arch
# The venv's wheels bring their own libraries: do not let rpm export them as Provides.
AutoReqProv: no
Requires: /usr/bin/python3
Requires: python(abi) = $py_abi
Requires: shadow-utils
Requires: pam

%description
$description

%install
cp -a "$root/." "%{buildroot}/"

%post
EOF
        maintainer_script 'mep_configure' | tail -n +2
        echo '%preun'
        maintainer_script 'if [ "$1" -eq 0 ]; then mep_before_remove; fi' | tail -n +2
        echo '%postun'
        maintainer_script 'if [ "$1" -eq 0 ]; then mep_after_remove; fi' | tail -n +2
        cat <<EOF
%files
%dir /etc/mep
%config(noreplace) /etc/mep/service.yaml
%config(noreplace) /etc/mep/manager.example.yaml
%config /etc/pam.d/mep
%config /etc/logrotate.d/mep
/opt/mep
/usr/bin/mep
/usr/lib/systemd/system/mep-service.service
/usr/lib/systemd/system/mep-manager@.service
/usr/lib/tmpfiles.d/mep.conf
/usr/share/mep
%doc /usr/share/doc/mep
EOF
    } > "$top/SPECS/mep.spec"
    rpmbuild --quiet -bb --define "_topdir $top" --define "_rpmfilename %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        --target "$rpm_arch" "$top/SPECS/mep.spec"
    rpm="$repo/dist/mep-${version}-${release}.${rpm_arch}.rpm"
    mv "$top/RPMS/mep-${version}-${release}.${rpm_arch}.rpm" "$rpm"
    echo "wrote $rpm"
fi
