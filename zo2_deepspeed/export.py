"""Export a zo2 checkpoint as a Hugging Face model directory: ``python -m zo2_deepspeed.export CKPT OUT``.

CKPT is a ``global_step{N}`` directory or the ``save_dir`` holding a ``latest`` file. The partitions
of every rank are reassembled (no process group, no GPU needed) into the model described by the
configuration saved with the checkpoint, and written with safetensors, so that
``AutoModelForCausalLM.from_pretrained(OUT)`` loads it without zo2_deepspeed. Every tensor file is
first checked against the size and checksum recorded when it was saved (``--no-verify`` skips the
checksums); a damaged checkpoint is refused with the file named and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from .checkpoint import read_full_state
from .errors import CheckpointError


def export(checkpoint: str, out_dir: str, tokenizer: Optional[str] = None, verify: bool = True) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    tensors, meta = read_full_state(checkpoint, verify=verify)
    config_dict = meta.get("module_config")
    if config_dict is None:
        raise CheckpointError(f"{checkpoint} was saved from a model without a Hugging Face config: load it with "
                              f"engine.load_checkpoint and call engine.save_pretrained instead")
    if meta.get("exclude_frozen_parameters"):
        raise CheckpointError(f"{checkpoint} holds only the trainable parameters (exclude_frozen_parameters): "
                              f"export from the engine with engine.save_pretrained")
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config)  # buffers (e.g. rotary tables) are rebuilt from the config
    by_name = dict(model.named_parameters(remove_duplicate=False))
    unknown = [name for name in tensors if name not in by_name]
    if unknown:
        raise CheckpointError(f"{checkpoint}: tensors {unknown[:5]} are not parameters of a {model_type} model")
    covered = {id(by_name[name]) for name in tensors}
    missing = [name for name, p in by_name.items() if id(p) not in covered]
    if missing:
        raise CheckpointError(f"{checkpoint}: no tensors for {missing[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            by_name[name].copy_(tensor.to(by_name[name].dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out_dir)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zo2_deepspeed.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a global_step{N} directory, or the save_dir with a 'latest' file")
    parser.add_argument("out_dir", help="where to write the Hugging Face model directory")
    parser.add_argument("--tokenizer", default=None, help="copy this tokenizer (a model directory) alongside")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the files against their checksums (saves reading them twice)")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, args.tokenizer, verify=args.verify)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
