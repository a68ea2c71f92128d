#!/usr/bin/env bash
# Install zo2_deepspeed and what it needs (idempotent; 3-6 min the first time, plus the AsyncIO build below).
#
# Where: the active virtual/conda environment, else the project's .venv/ (made from python3 on PATH), never the
# system Python (launch/python_env.sh). As root, apt-get installs libaio-dev (the NVMe tier) and, where missing,
# the venv package; without root those steps are skipped with a message.
# torch is pinned first: on a CPU-only machine `pip install torch==2.13.0` takes the CPU wheel, while a bare
# `torch` (or a range admitting a newer release) would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python_env.sh
zo2_resolve_python create
zo2_say "installing into $ZO2_PY_WHERE"
PIP=("$ZO2_PY" -m pip install -q --disable-pip-version-check)
"$ZO2_PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[train,test,ecosystem]"
# torch caches compiled ops by op name only (~/.cache/torch_extensions/<op>), yet a build links against one
# environment's torch and DeepSpeed: two environments used in turn would each recompile the other's ops, for
# minutes, every time. This environment gets its own cache, <env>/torch_extensions, through a .pth file that sets
# TORCH_EXTENSIONS_DIR at interpreter start-up; a TORCH_EXTENSIONS_DIR set by the user still wins.
"$ZO2_PY" - <<'PY'
import os, sysconfig
line = ('import os, sys; os.environ.setdefault("TORCH_EXTENSIONS_DIR", '
        'os.path.join(sys.prefix, "torch_extensions"))\n')
with open(os.path.join(sysconfig.get_paths()["purelib"], "zo2_torch_extensions_dir.pth"), "w") as f:
    f.write(line)
PY
# NVMe tier (ZeRO-Infinity): DeepSpeed's AsyncIO op needs libaio headers.
if [ "${ZO2_SKIP_AIO:-0}" != 1 ] && ! [ -e /usr/include/libaio.h ]; then
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    zo2_say "installing libaio-dev with apt-get (as root) for the NVMe tier"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq libaio-dev >/dev/null) \
      || zo2_say "could not install libaio-dev; the NVMe tier and its tests will be unavailable"
  else
    zo2_say "libaio-dev is missing and apt-get cannot run as root here; the NVMe tier needs it (sudo apt-get install libaio-dev)"
  fi
fi
# DeepSpeed compiles its C++ ops on first use; build them now, once, rather than inside a training run or a timed
# test. Announced with its duration; a stale lock left by a killed build is removed (zo2_deepspeed.prebuild).
if [ "${ZO2_SKIP_PREBUILD:-0}" != 1 ]; then
  "$ZO2_PY" -m zo2_deepspeed.prebuild
fi
zo2_say "done: zo2_deepspeed is installed in $ZO2_PY_WHERE"
