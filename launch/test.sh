#!/usr/bin/env bash
# Install everything, then run the whole test suite in the environment launch/install.sh installed into:
#   1. the default suite (pytest -m "not slow"), in file order;
#   2. the tests marked slow (nvme / multirank / cluster / set-up);
#   3. the multi-rank equality tests once more with two threads per rank;
#   4. the default suite again in a random order (pytest-randomly; the seed is printed: rerun a failure with
#      --randomly-seed=N), so that a test which passes only after another one fails here;
#   5. the documentation site's strict build (mkdocs build --strict into site/), when the docs extra is installed:
#      this script installs it (ZO2_SKIP_DOCS=1 skips that).
# Every suite runs even when an earlier one fails; a summary follows, and the exit status is non-zero if any
# failed. Extra arguments go to every pytest run. As root, install.sh and install_cluster.sh use apt-get.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh || exit $?
bash launch/install_cluster.sh || echo "test.sh: install_cluster.sh failed; the cluster tests will skip" >&2
source launch/python_env.sh
zo2_resolve_python || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${ZO2_SKIP_DOCS:-0}" != 1 ]; then  # the site's tools, pinned in setup.py's docs extra
  "$ZO2_PY" -m pip install -q --disable-pip-version-check -e ".[docs]" \
    || echo "test.sh: could not install the docs extra; the strict docs build is skipped" >&2
fi
SEED="${ZO2_TEST_SEED:-$(date +%s)}"
names=() statuses=() seconds=()

suite() {  # suite NAME ACCEPTED_EXIT_CODES... -- pytest arguments
  local name="$1"; shift
  local accepted=()
  while [ "$1" != -- ]; do accepted+=("$1"); shift; done
  shift
  echo "==== test.sh: $name"
  local start=$SECONDS status
  "$@"
  status=$?
  for ok in "${accepted[@]}"; do [ "$status" = "$ok" ] && status=0; done
  names+=("$name"); statuses+=("$status"); seconds+=($((SECONDS - start)))
}

suite "default suite" 0 -- "$ZO2_PY" -m pytest -q -p no:randomly -m "not slow" tests "$@"
suite "slow suite" 0 5 -- "$ZO2_PY" -m pytest -q -p no:randomly -m "slow" tests "$@"  # 5: no test is marked slow
# The slow suite runs each rank with one thread. 1 rank, 2 data-parallel ranks, accumulation and 2
# perturbation ranks must end bit-identical whatever the thread count: a reduction that depended on
# it would fail here rather than on a user's machine.
suite "two-thread multi-rank rerun" 0 -- env OMP_NUM_THREADS=2 "$ZO2_PY" -m pytest -q -p no:randomly -m multirank \
    tests/test_data_parallel.py tests/test_perturbation_parallel.py \
    -k "test_two_ranks_equal_one_rank_and_accumulation and (hizoo or fzoo) or test_two_perturbation_ranks_equal_one_rank_bitwise and cpu-hizoo" "$@"
suite "default suite, random order (seed $SEED)" 0 -- "$ZO2_PY" -m pytest -q --randomly-seed="$SEED" \
    -m "not slow" tests "$@"
# Any warning fails the build: a page left out of the nav, a link to a missing page or anchor (tests/test_docs.py checks
# links and the generated pages without the site tools).
if "$ZO2_PY" -c "import mkdocs, material" 2>/dev/null; then
  suite "docs build (strict)" 0 -- env NO_MKDOCS_2_WARNING=1 "$ZO2_PY" -m mkdocs build --strict --clean --quiet
else
  echo "test.sh: the docs extra is not installed (pip install -e \".[docs]\"): the strict docs build is skipped"
fi

echo "==== test.sh: summary"
failed=0
for i in "${!names[@]}"; do
  verdict=passed; [ "${statuses[$i]}" = 0 ] || { verdict="FAILED (exit ${statuses[$i]})"; failed=1; }
  printf '  %-45s %-18s %5d s\n' "${names[$i]}" "$verdict" "${seconds[$i]}"
done
exit $failed
