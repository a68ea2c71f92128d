#!/usr/bin/env bash
# Install everything, then run the whole test suite: the default (fast) suite first, then the tests
# marked slow / nvme / multirank / cluster. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
bash launch/install_cluster.sh   # SLURM, munge, iproute2, pdsh, sshd for the cluster tests (root only)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -m "not slow" tests "$@"
python -m pytest -q -m "slow" tests "$@" || [ $? -eq 5 ]  # 5: no test is marked slow
