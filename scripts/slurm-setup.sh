#!/usr/bin/env bash
# A single-node Slurm on this machine, for the scheduler tests (tests/test_slurm.py, tests/test_torque.py).
#
# As root, on Debian without systemd: installs Debian's slurmctld, slurmd, slurm-client, munge and
# slurm-wlm-torque (qsub/qstat/qdel over Slurm), writes /etc/slurm/slurm.conf for this one node,
# starts munged, slurmctld and slurmd by hand, and waits until sinfo shows the node idle.
# Idempotent: run it again and it only starts what is not running (and restarts the Slurm
# daemons if the configuration it writes has changed).
#
# The node advertises more CPUs than the machine has (config_overrides), so several endpoints'
# one-CPU blocks run at once. Two partitions, debug (the default) and batch, so one account
# asking for each gets two endpoints. EnforcePartLimits=NO makes Slurm accept a request no
# partition can ever satisfy (more nodes than exist) and leave it pending, which is the tests'
# "job that never starts".
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "error: run scripts/slurm-setup.sh as root" >&2
    exit 1
fi

# Debian's packages would try to start their daemons at install; policy-rc.d forbids that here.
packages=(slurmctld slurmd slurm-client munge slurm-wlm-torque)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

host=$(hostname -s)
cpus=$(( $(nproc) * 4 ))
[ "$cpus" -ge 16 ] || cpus=16
memory_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)

install -d -o munge -g munge -m 0755 /run/munge
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
install -d -m 0755 /var/spool/slurmd /etc/slurm

config=$(cat <<EOF
# Written by mep's scripts/slurm-setup.sh: one node, for tests.
ClusterName=mep-test
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
EnforcePartLimits=NO
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=batch Nodes=ALL MaxTime=INFINITE State=UP
EOF
)

config_changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$config" ]; then
    printf '%s\n' "$config" > /etc/slurm/slurm.conf
    chmod 0644 /etc/slurm/slurm.conf
    config_changed=1
fi

# running PIDFILE: true when the pid in PIDFILE is a live process
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop PIDFILE: end the daemon whose pid is in PIDFILE and wait until it is gone
stop() {
    local pid
    running "$1" || return 0
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "error: daemon $pid ($1) did not stop" >&2
    exit 1
}

if [ "$config_changed" -eq 1 ]; then
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi

if ! running /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged
fi
if ! running /run/slurmctld.pid; then
    /usr/sbin/slurmctld -i
fi
if ! running /run/slurmd.pid; then
    /usr/sbin/slurmd
fi

for _ in $(seq 300); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated)
            echo "slurm ready: node $host ($cpus CPUs advertised) is $state"
            exit 0
            ;;
    esac
    sleep 0.2
done
echo "error: the Slurm node did not become idle within 60 s (state: ${state:-none}); see /var/log/slurm/" >&2
exit 1
