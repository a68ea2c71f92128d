#!/usr/bin/env bash
# Install zo2_deepspeed and what it needs on a fresh machine (idempotent, ~2 min the first time).
# torch is pinned first: on a CPU-only machine `pip install torch==2.13.0` takes the CPU wheel, while a
# bare `torch` (or a range admitting a newer release) would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PIP torch==2.13.0
$PIP -e ".[train,test,ecosystem]"
# NVMe tier (ZeRO-Infinity): DeepSpeed's AsyncIO op needs libaio headers; it JIT-builds once (~3 min).
if [ "${ZO2_SKIP_AIO:-0}" != 1 ] && ! [ -e /usr/include/libaio.h ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq libaio-dev >/dev/null) \
    || echo "install.sh: could not install libaio-dev; the NVMe tier and its tests will be unavailable" >&2
fi
