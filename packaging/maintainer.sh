# Maintainer-script functions shared by the .deb and the .rpm; build.sh puts
# this file at the top of each maintainer script, followed by a dispatch on
# the package manager's arguments. POSIX sh: it runs under dash too.

MEP_ACCOUNT=mep
# Written when the package created the account, so a purge removes only an account it made.
MEP_ACCOUNT_MARKER=/etc/mep/.account-created-by-package  # /etc/mep outlives a remove; purge deletes it

mep_systemd_reload() {
    if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
}

# After unpacking: the router account, the state/run/log directories, byte-code for the installed Python.
mep_configure() {
    created=""
    if ! getent passwd "$MEP_ACCOUNT" >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "mep manager router" "$MEP_ACCOUNT"
        created=yes
    fi
    install -d -o root -g root -m 0755 /var/lib/mep   # state: service/ (0700) below, made by 'mep service init'
    # the managers' audit logs (0600 each); searchable (not listable) so each router reaches its router-<id>/
    install -d -o root -g root -m 0711 /var/log/mep
    install -d -o root -g root -m 0755 /run/mep       # the managers' run directories; tmpfiles.d recreates it at boot
    if [ -n "$created" ]; then : > "$MEP_ACCOUNT_MARKER"; fi
    mep_systemd_reload
}

# Before the files go: stop the daemons, drop byte-code written at run time (dpkg would leave those directories).
mep_before_remove() {
    if [ -d /run/systemd/system ]; then
        systemctl stop 'mep-manager@*.service' mep-service.service >/dev/null 2>&1 || true
    fi
    find /opt/mep /usr/share/mep -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
}

# After the files went: nothing of mep outside /etc/mep but the data its daemons wrote
# (the service's state, the audit and task logs under /var/lib/mep and /var/log/mep), which purge deletes.
mep_after_remove() {
    rm -rf /run/mep /var/lib/mep/demo /opt/mep
    rmdir /var/lib/mep /var/log/mep 2>/dev/null || true
    mep_systemd_reload
}

# Purge: everything, and the router account if this package created it.
mep_purge() {
    created=""
    if [ -f "$MEP_ACCOUNT_MARKER" ]; then created=yes; fi
    rm -rf /etc/mep /var/lib/mep /var/log/mep /run/mep
    if [ -n "$created" ] && getent passwd "$MEP_ACCOUNT" >/dev/null; then
        userdel "$MEP_ACCOUNT" >/dev/null 2>&1 || echo "mep: could not remove the account $MEP_ACCOUNT (still in use?)" >&2
        getent group "$MEP_ACCOUNT" >/dev/null && groupdel "$MEP_ACCOUNT" >/dev/null 2>&1 || true
    fi
}
