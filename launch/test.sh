#!/usr/bin/env bash
# Install everything, then run the whole test suite: the default (fast) suite first, then the tests
# marked slow / nvme / multirank / cluster, then the multi-rank equality tests once more with two
# threads per rank. Extra arguments go to every pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
bash launch/install_cluster.sh   # SLURM, munge, iproute2, pdsh, sshd for the cluster tests (root only)
source launch/python_env.sh
zo2_resolve_python
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$ZO2_PY" -m pytest -q -m "not slow" tests "$@"
"$ZO2_PY" -m pytest -q -m "slow" tests "$@" || [ $? -eq 5 ]  # 5: no test is marked slow
# The slow suite runs each rank with one thread. 1 rank, 2 data-parallel ranks, accumulation and 2
# perturbation ranks must end bit-identical whatever the thread count: a reduction that depended on
# it would fail here rather than on a user's machine (55 s on 2 idle cores, about 3 min under load).
OMP_NUM_THREADS=2 "$ZO2_PY" -m pytest -q -m multirank tests/test_data_parallel.py tests/test_perturbation_parallel.py \
    -k "test_two_ranks_equal_one_rank_and_accumulation and (hizoo or fzoo) or test_two_perturbation_ranks_equal_one_rank_bitwise and cpu-hizoo" "$@"
