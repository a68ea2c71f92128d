#!/usr/bin/env bash
# Install what the cluster tests (tests/test_cluster_infra.py) need: SLURM + munge for a one-node
# cluster, iproute2 for network namespaces, and pdsh + openssh for the deepspeed multi-node launcher.
# Idempotent: packages already present are not reinstalled. Needs root (the tests do too); without it,
# it says so and exits 0 so that a non-root install still succeeds and the cluster tests skip.
set -euo pipefail
PKGS=(slurmd slurmctld slurm-client munge iproute2 pdsh openssh-server openssh-client)
if [ "$(id -u)" != 0 ]; then
  echo "install_cluster.sh: not root; skipping (cluster tests need root and will be skipped)." >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_cluster.sh: apt-get not found; install ${PKGS[*]} by hand." >&2
  exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_cluster.sh: all present (${PKGS[*]})."
  exit 0
fi
echo "install_cluster.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101: keep the packages' post-install scripts from starting system-wide daemons
# (munged, slurmd, slurmctld, sshd); the tests start private instances with their own configs.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created_policy=1
fi
trap 'if [ $created_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install_cluster.sh: done."
