"""The "zo2" section of a DeepSpeed JSON config, and the checks on the standard keys it relies on.

Parsing is pure (no process group needed), so a bad config fails before anything is built, with
the path of the offending field in the message (``zo2.eps must be > 0, got -1``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zo2_deepspeed_autopatch import near_misses_of_zo2

from .errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_REQUIRED = ('optimizer.params.lr is required with zo2 to train (add "optimizer": {"type": "SGD", '
               '"params": {"lr": ...}})')


class ParallelConfig(BaseModel):
    """The ``"zo2": {"parallel": ...}`` section: how the ranks share a step."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, use_attribute_docstrings=True)

    perturbation: int = Field(1, ge=1)
    """Ranks that split one micro-batch's perturbation groups: the world is world/P data-parallel
    replicas × P perturbation ranks (1: data parallel only)."""


class FirstOrderConfig(BaseModel):
    """The ``"zo2": {"first_order": ...}`` section: a first-order tail trained from the ZO step's own forwards.

    The tail is the last ``blocks`` layers of the model's layer stack and, with ``head``, the final norm and
    the LM head (or, with ``modules``, every block holding a parameter whose name matches one of the regular
    expressions). It stays resident, is never perturbed, runs with autograd on the body's outputs, and trains
    with its own optimizer; the rest of the model trains zeroth-order (docs/first-order-tail.md).
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, use_attribute_docstrings=True)

    blocks: int = Field(0, ge=0)
    """The last K layers of the model's layer stack (with the head: everything after them runs with autograd)."""
    head: bool = True
    """The final norm and the LM head (the model's own output embedding; a tied input embedding with it)."""
    modules: Optional[list[str]] = None
    """Instead of blocks/head: regular expressions (re.search) on parameter names; every block holding a match
    joins the tail."""
    optimizer: dict = Field(default_factory=lambda: {"type": "AdamW", "params": {}})
    """DeepSpeed's optimizer vocabulary: {"type": "AdamW" | "Adam" | "SGD", "params": {"lr": ..., ...}}."""
    scheduler: Optional[dict] = None
    """DeepSpeed's scheduler vocabulary ({"type": "WarmupLR", "params": {...}}); none: a constant lr."""
    gradient_clipping: float = Field(0.0, ge=0)
    """Clip the tail's gradient to this global norm (0: no clipping)."""
    offload_optimizer: dict = Field(default_factory=lambda: {"device": "none"})
    """{"device": "cpu"}: fp32 master weights and optimizer state on the CPU, Adam by DeepSpeed's CPU Adam
    (as ZeRO-Offload); "none": on the compute device."""
    chunk_rows: Optional[int] = Field(None, ge=1)
    """Rows of a micro-batch per tail backward (each chunk's gradient is added in float64): runs whose
    micro-batches are multiples of it give bit-identical gradients however the batch is split. None: the
    whole micro-batch in one backward per group (fastest)."""
    max_fraction: float = Field(0.25, gt=0, le=1)
    """The largest share of the model's parameters the tail may hold (it stays resident on the device)."""


class ZO2Config(BaseModel):
    """Fields of the ``"zo2"`` section. Unknown keys and wrong types are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, use_attribute_docstrings=True)

    method: Literal["mezo", "fzoo", "hizoo", "lozo"] = "mezo"
    """Which ZO estimator: MeZO-SGD (two-sided), FZOO (N one-sided Rademacher), HiZOO (diagonal Hessian),
    LOZO (two-sided along a low-rank U·Vᵀ per matrix)."""
    eps: float = Field(1e-3, gt=0)
    """Perturbation scale ε."""
    seed: int = Field(42, ge=0)
    """Base seed: the step seed is a stable hash of (seed, global step), identical on every rank."""
    num_perturbations: int = Field(8, ge=1)
    """FZOO: number of Rademacher directions per step."""
    hessian_smooth: float = Field(1e-8, gt=0, lt=1)
    """HiZOO: smoothing α of the diagonal Hessian estimate."""
    rank: int = Field(2, ge=1)
    """LOZO: rank r of each matrix's perturbation U·Vᵀ."""
    lazy_steps: int = Field(50, ge=1)
    """LOZO: ν, the number of consecutive steps that share V (U is new every step)."""
    write_back: Optional[Literal["window", "step"]] = None
    """When updated weights go back to their tier. "step": every step (every method). "window" (LOZO's
    default): a matrix's stored copy changes once per lazy window; its updates are held as U_acc beside
    it (see ``window.py``). None: "window" for LOZO, else "step"."""
    lowrank_forward: Literal["auto", "materialised", "factored"] = "auto"
    """With the window write-back, how a linear layer applies its perturbed weight a·W + (U_acc ± ε·U/√r)·Vᵀ:
    "materialised" (form the m × n matrix, then the plain forward) or "factored" (x·(a·W)ᵀ + (x·V)·Bᵀ, see
    ``factored.py``); "auto": the faster one measured for the device type (``factored.LOWRANK_FORWARD``)."""
    prefetch_blocks: int = Field(1, ge=0)
    """How many blocks ahead of the running one are fetched (and updated) in the background."""
    storage_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the offloaded copy (the ZeRO-3 partition). 16-bit halves the bytes moved."""
    compute_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """dtype the blocks run in on the device. Default: the DeepSpeed bf16/fp16 section, else fp32."""
    stochastic_rounding: bool = True
    """Round write-backs to a 16-bit storage dtype stochastically (seeded), so tiny updates survive."""
    exact_restore: bool = True
    """Keep each block's unperturbed tensors while perturbed copies run: restore is bit-exact."""
    noise_generator: Literal["auto", "philox", "torch"] = "auto"
    """Where z comes from: "philox" (by element index, fused Triton kernels), "torch" (torch's generator in
    seeded chunks); "auto": philox on an accelerator with Triton, else torch. They give different z."""
    check_sync_every: int = Field(0, ge=0)
    """Every N steps compare a parameter checksum across ranks (0: never)."""
    comm_timeout_s: float = Field(1800.0, gt=0)
    """A collective that waits longer than this (a dead or hung rank) fails instead of hanging."""
    max_skipped_steps: int = Field(10, ge=1)
    """Consecutive steps with a non-finite loss after which training stops with an error."""
    steps_per_print: Optional[int] = Field(None, ge=1)
    """Log the engine's step line every N steps, in place of DeepSpeed's top-level ``steps_per_print``, which
    Accelerate (and so the HF Trainer) overwrites with infinity. None: the top-level value."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Perturbation parallelism: the ranks of one replica run the same micro-batch, each for its share of
    the step's perturbation groups."""
    first_order: Optional[FirstOrderConfig] = None
    """A first-order tail (hybrid training): the ``zo2.first_order`` fields; none: every trainable parameter is ZO."""

    def storage_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.storage_dtype]

    @property
    def window_write_back(self) -> bool:
        """LOZO's window write-back is on (``write_back`` "window", the default for LOZO)."""
        return (self.write_back or ("window" if self.method == "lozo" else "step")) == "window"


@dataclass
class TrainSettings:
    """What the engine needs from the whole DeepSpeed config once it has been checked."""

    zo2: ZO2Config
    tier: Literal["resident", "device", "cpu", "nvme"]
    """resident: whole tensors on the device (no ZeRO-3); device/cpu/nvme: ZeRO-3 partitions stored there."""
    zero_stage: int
    compute_dtype: torch.dtype
    lr: Optional[float]
    weight_decay: float
    raw: dict = field(repr=False)
    warnings: list[str] = field(default_factory=list)


def load_config(config: Any) -> dict:
    """A config given as a dict, a JSON path, or a JSON string, as ``deepspeed.initialize`` accepts."""
    if isinstance(config, Mapping):
        raw = json.loads(json.dumps(dict(config)))  # deep copy; also rejects non-JSON values early
        check_top_level_keys(raw)
        return raw
    if isinstance(config, (str, os.PathLike)):
        text = str(config)
        if os.path.isdir(text):
            raise ConfigError(f"DeepSpeed config {text} is a directory, not a JSON file")
        if os.path.exists(text):
            with open(text) as f:
                try:
                    loaded = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"DeepSpeed config {text} is not valid JSON: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"DeepSpeed config {text} must hold a JSON object, got {type(loaded).__name__}")
            check_top_level_keys(loaded, text)
            return loaded
        if isinstance(config, os.PathLike) or text.lower().endswith(".json"):
            raise ConfigError(f"DeepSpeed config file {text} does not exist")
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"DeepSpeed config {text!r} is neither an existing file nor a JSON string") from None
        if not isinstance(loaded, dict):
            raise ConfigError("DeepSpeed config JSON must be an object")
        check_top_level_keys(loaded)
        return loaded
    raise ConfigError(f"DeepSpeed config must be a dict or a path to a JSON file, got {type(config).__name__}")


def check_top_level_keys(raw: Mapping[str, Any], source: Optional[str] = None) -> None:
    """Refuse a top-level key that is a near miss of "zo2" ("zo", "Zo2", "zo_2", "z02").

    DeepSpeed ignores unknown top-level keys, so a misspelled section would silently select plain
    first-order DeepSpeed (which then fails much later, or trains with another optimizer). No
    DeepSpeed key is that close to "zo2", so the check has no false alarms on a valid config.
    """
    for key in near_misses_of_zo2(dict(raw))[:1]:
        where = f"DeepSpeed config {source}" if source else "the DeepSpeed config"
        raise ConfigError(f"{where} has a top-level key {key!r}: did you mean \"zo2\"? (a \"zo2\" section "
                          f"selects the ZO2 engine; without one the config trains first-order with plain "
                          f"DeepSpeed): rename it to \"zo2\" or remove it")


def has_zo2_section(config: Any) -> bool:
    """True when the config selects the ZO2 engine (a top-level "zo2" key)."""
    try:
        return "zo2" in load_config(config)
    except ConfigError:
        return False


def _auto_is_a_value() -> frozenset[str]:
    """Paths of zo2 fields for which "auto" is a choice of their own (``zo2.noise_generator``), not a placeholder."""
    return frozenset(f"zo2.{name}" for name, info in ZO2Config.model_fields.items()
                     if "auto" in get_args(info.annotation))


def find_auto(node: Any, path: str = "") -> Optional[str]:
    """The first value "auto" (the HF Trainer's placeholder) in ``node``, by path; None if there is none."""
    if isinstance(node, str) and node == "auto" and path not in _auto_is_a_value():
        return path
    if isinstance(node, dict):
        for key, value in node.items():
            hit = find_auto(value, f"{path}.{key}" if path else str(key))
            if hit:
                return hit
    if isinstance(node, list):
        for i, value in enumerate(node):
            hit = find_auto(value, f"{path}[{i}]")
            if hit:
                return hit
    return None


def _section_model(loc: tuple) -> type[BaseModel]:
    """The model of the section that holds the field at ``loc`` (``zo2`` itself, or a nested one like ``parallel``)."""
    model: type[BaseModel] = ZO2Config
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if annotation is not None and not isinstance(annotation, type):  # Optional[Section]
            annotation = next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)),
                              annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model


def _describe_pydantic_error(err: dict) -> str:
    path = "zo2" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in err["loc"])
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        known = ", ".join(_section_model(err["loc"]).model_fields)
        return f"{path} is not a known field (known fields: {known})"
    if kind == "model_type":
        return f"{path} must be an object, got {got!r} ({type(got).__name__})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        return f"{path} must be {op} {bound}, got {got!r}"
    if kind == "literal_error":
        return f"{path} must be one of {ctx.get('expected')}, got {got!r}"
    if kind in ("none_required", "enum"):
        return f"{path} must be one of {ctx.get('expected')}, got {got!r}"
    if kind in ("float_type", "int_type", "bool_type", "string_type", "int_from_float", "float_parsing"):
        want = kind.split("_")[0]
        want = {"float": "a number", "int": "an integer", "bool": "true or false", "string": "a string"}.get(want, want)
        return f"{path} must be {want}, got {got!r} ({type(got).__name__})"
    return f"{path}: {err['msg']}, got {got!r}"


def parse_zo2_section(section: Any) -> ZO2Config:
    if not isinstance(section, dict):
        raise ConfigError(f"zo2 must be an object, got {type(section).__name__}")
    try:
        zo2 = ZO2Config(**section)
    except ValidationError as e:
        raise ConfigError("; ".join(_describe_pydantic_error(err) for err in e.errors())) from None
    _check_perturbation_groups(zo2)
    _check_write_back(zo2)
    if zo2.first_order is not None:
        from .first_order.settings import check_first_order  # the first_order package imports this module
        check_first_order(zo2.first_order, section.get("first_order", {}))
    return zo2


def _check_write_back(zo2: ZO2Config) -> None:
    """"window" holds updates as low-rank factors: only LOZO's updates are low rank. Fills in the default."""
    if zo2.write_back == "window" and zo2.method != "lozo":
        raise ConfigError(f"zo2.write_back 'window' needs zo2.method 'lozo' (its updates within a lazy window are "
                          f"one low-rank product per matrix); {zo2.method} changes every weight every step: use "
                          f"'step' or remove zo2.write_back")
    if zo2.write_back is None:
        zo2.write_back = "window" if zo2.window_write_back else "step"
    if zo2.lowrank_forward != "auto" and not zo2.window_write_back:
        raise ConfigError(f"zo2.lowrank_forward {zo2.lowrank_forward!r} applies to LOZO's window write-back, but "
                          f"zo2.method is {zo2.method!r} with zo2.write_back {zo2.write_back!r}: remove "
                          f"zo2.lowrank_forward or use method 'lozo' with write_back 'window'")


def _check_perturbation_groups(zo2: ZO2Config) -> None:
    """Every perturbation rank needs at least one of the step's G groups (MeZO 2, HiZOO 3, FZOO N + 1)."""
    ranks = zo2.parallel.perturbation
    if ranks == 1:
        return
    from .methods import build_method  # the methods import this module
    groups = len(build_method(zo2).groups())
    if ranks > groups:
        more = " or raise zo2.num_perturbations (FZOO runs num_perturbations + 1 groups)" if zo2.method == "fzoo" \
            else ""
        raise ConfigError(f"zo2.parallel.perturbation is {ranks}, more than the {groups} perturbation groups of a "
                          f"{zo2.method} step: every perturbation rank needs at least one group; set it to at most "
                          f"{groups}{more}")


def data_parallel_size(world_size: int, perturbation: int) -> int:
    """Data-parallel replicas of a world of ``world_size`` ranks with ``perturbation`` ranks per replica."""
    if world_size % perturbation:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(f"zo2.parallel.perturbation {perturbation} does not divide the world size {world_size}: the "
                          f"world is world/P data-parallel replicas × P perturbation ranks; set it to one of "
                          f"{divisors}")
    return world_size // perturbation


def perturbation_ranks(raw: Mapping[str, Any]) -> int:
    """zo2.parallel.perturbation of a whole DeepSpeed config (1 without a zo2 section)."""
    return parse_zo2_section(raw["zo2"]).parallel.perturbation if "zo2" in raw else 1


def replicas_label(world_size: int, perturbation: int) -> str:
    """How messages name the number of data-parallel replicas: the world size unless perturbation ranks share them."""
    if perturbation == 1:
        return f"world size {world_size}"
    return (f"data-parallel size {world_size // perturbation} (world size {world_size} / zo2.parallel.perturbation "
            f"{perturbation})")


def _number(value: Any, path: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _optimizer_settings(raw: dict, warnings: list[str]) -> tuple[Optional[float], float]:
    opt = raw.get("optimizer")
    if opt is None:
        return None, 0.0
    if not isinstance(opt, dict):
        raise ConfigError(f"optimizer must be an object, got {type(opt).__name__}")
    kind = str(opt.get("type", "SGD"))
    if kind.lower() not in ("sgd", "zosgd", "zo-sgd"):
        raise ConfigError(
            f"optimizer.type must be 'SGD' with a zo2 section (the ZO update is SGD on a projected gradient), "
            f"got {kind!r}; remove the zo2 section to train first-order with {kind}")
    params = dict(opt.get("params", {}))
    lr = _number(params.pop("lr", None), "optimizer.params.lr") if "lr" in params else None
    wd = _number(params.pop("weight_decay", 0.0), "optimizer.params.weight_decay")
    momentum = params.pop("momentum", 0.0)
    if momentum not in (0, 0.0):
        raise ConfigError(f"optimizer.params.momentum is not supported by zo2 (it would need a stored gradient), "
                          f"got {momentum!r}")
    for key in ("dampening", "nesterov", "maximize", "foreach", "differentiable", "fused"):
        params.pop(key, None)
    if params:
        raise ConfigError(f"optimizer.params.{sorted(params)[0]} is not used by zo2's SGD "
                          f"(accepted: lr, weight_decay, momentum=0)")
    return lr, wd


def _zero_settings(raw: dict, warnings: list[str]) -> tuple[str, int]:
    zero = raw.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization must be an object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    offload = zero.get("offload_param") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else offload
    if device not in ("none", "cpu", "nvme", None):
        raise ConfigError(f"zero_optimization.offload_param.device must be 'none', 'cpu' or 'nvme', got {device!r}")
    device = device or "none"
    if device != "none" and stage != 3:
        raise ConfigError(f"zero_optimization.offload_param.device={device!r} needs zero_optimization.stage 3 "
                          f"(parameter partitions), got stage {stage}")
    if device == "nvme" and not offload.get("nvme_path"):
        raise ConfigError("zero_optimization.offload_param.nvme_path is required when offload_param.device is 'nvme'")
    if stage in (1, 2):
        warnings.append(f"zero_optimization.stage {stage} partitions gradients and optimizer states, which ZO "
                        f"training does not have: parameters stay resident on the device")
    if zero.get("offload_optimizer") and (zero["offload_optimizer"] or {}).get("device", "none") != "none":
        warnings.append("zero_optimization.offload_optimizer is ignored with zo2: ZO-SGD keeps no optimizer state")
    tier = {"none": "device", "cpu": "cpu", "nvme": "nvme"}[device] if stage == 3 else "resident"
    return tier, stage


BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
"""DeepSpeed's batch fields: any two determine the third through train = micro × accumulation × world size."""


def batch_sizes(raw: Mapping[str, Any]) -> dict[str, Optional[int]]:
    """The batch fields of a config, each a positive integer or None when absent.

    DeepSpeed itself fails on a string with a raw ``TypeError`` and accepts a float, after which every
    batch has the wrong size; here each field is checked by name, and what does not need the world
    size is checked too (train_batch_size must be a multiple of micro × accumulation).
    """
    sizes: dict[str, Optional[int]] = {}
    for key in BATCH_KEYS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key} must be a positive integer, got {value!r} ({type(value).__name__})")
        sizes[key] = value
    train, micro, accumulation = (sizes[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                     "gradient_accumulation_steps"))
    if train is None and micro is None:
        raise ConfigError("train_micro_batch_size_per_gpu is required (or train_batch_size, from which DeepSpeed "
                          "derives it): give the rows per micro-batch on each rank")
    if train is not None and micro is not None and train % (micro * (accumulation or 1)):
        per_step = f"train_micro_batch_size_per_gpu {micro}" + (
            f" × gradient_accumulation_steps {accumulation}" if accumulation else "")
        raise ConfigError(f"train_batch_size {train} is not a multiple of {per_step}: DeepSpeed needs "
                          f"train_batch_size = micro-batch × accumulation steps × world size; drop train_batch_size "
                          f"to have it derived")
    if train is not None and micro is None and accumulation is not None and train % accumulation:
        raise ConfigError(f"train_batch_size {train} is not a multiple of gradient_accumulation_steps {accumulation}: "
                          f"DeepSpeed needs train_batch_size = micro-batch × accumulation steps × world size")
    return sizes


def batch_sizes_for_world(raw: Mapping[str, Any], world_size: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation steps, train batch) as DeepSpeed derives them at this world size.

    DeepSpeed derives a missing field by integer division and then asserts train = micro ×
    accumulation × data-parallel size; a train_batch_size that does not divide would end in that bare
    assertion, so the rule is checked here first with the fields named. With ``zo2.parallel.perturbation``
    P the P ranks of a replica share one micro-batch, so the data-parallel size is world/P: as with
    DeepSpeed's model parallelism, train_batch_size counts distinct samples per step.
    """
    sizes = batch_sizes(raw)
    perturbation = perturbation_ranks(raw)
    replicas = data_parallel_size(world_size, perturbation)
    label = replicas_label(world_size, perturbation)
    train, micro, accumulation = (sizes[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                     "gradient_accumulation_steps"))
    if train is None:
        return micro, accumulation or 1, micro * (accumulation or 1) * replicas
    if micro is not None and accumulation is not None:
        if train != micro * accumulation * replicas:
            raise ConfigError(
                f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} × gradient_accumulation_steps "
                f"{accumulation} × {label} = {micro * accumulation * replicas}: correct one of them, "
                f"or drop train_batch_size to have it derived")
        return micro, accumulation, train
    given = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation}
    known = " × ".join([f"{k} {v}" for k, v in given.items() if v is not None] + [label])
    product = (micro or 1) * (accumulation or 1) * replicas
    if train % product:
        derived = "gradient_accumulation_steps" if micro is not None else "train_micro_batch_size_per_gpu"
        raise ConfigError(f"train_batch_size {train} is not a multiple of {known} = {product}, so {derived} cannot "
                          f"be derived from it: give train_micro_batch_size_per_gpu and gradient_accumulation_steps "
                          f"instead")
    if micro is not None:
        return micro, train // product, train
    return train // product, accumulation or 1, train


def _compute_dtype(raw: dict, zo2: ZO2Config) -> torch.dtype:
    enabled = [name for name, key in (("bf16", "bf16"), ("fp16", "fp16"))
               if isinstance(raw.get(key), dict) and raw[key].get("enabled") is True]
    if zo2.compute_dtype is None:
        return DTYPES[enabled[0]] if enabled else torch.float32
    if enabled and enabled[0] != zo2.compute_dtype:
        raise ConfigError(f"{enabled[0]}.enabled is true but zo2.compute_dtype is {zo2.compute_dtype!r}: "
                          f"set zo2.compute_dtype to {enabled[0]!r} or disable {enabled[0]}")
    return DTYPES[zo2.compute_dtype]


def storage_settings(raw: dict) -> tuple[str, ZO2Config]:
    """The tier and the checked zo2 section of a config: all that building its partitions needs.

    "auto" values elsewhere are allowed: transformers builds the model under ``zero.Init`` before the
    Trainer fills them.
    """
    return _zero_settings(raw, [])[0], parse_zo2_section(raw["zo2"])


def parse_config(config: Any) -> TrainSettings:
    """Check a whole DeepSpeed config that carries a "zo2" section; no process group is needed."""
    raw = load_config(config)
    auto = find_auto(raw)
    if auto:
        raise ConfigError(f"{auto} is still 'auto': give it a value (the HF Trainer fills 'auto' values only on "
                          f"its own path; with zo2_deepspeed.initialize every field needs a value)")
    if "zo2" not in raw:
        raise ConfigError("config has no 'zo2' section")
    zo2 = parse_zo2_section(raw["zo2"])
    batch_sizes(raw)
    warnings: list[str] = []
    tier, stage = _zero_settings(raw, warnings)
    lr, wd = _optimizer_settings(raw, warnings)
    clip = raw.get("gradient_clipping", 0)
    if clip:
        tail = "; the first-order tail clips with zo2.first_order.gradient_clipping" if zo2.first_order else ""
        warnings.append(f"gradient_clipping={clip} is ignored with zo2: there is no gradient to clip{tail}")
    if zo2.storage_dtype != "fp32" and tier == "resident":
        raise ConfigError(f"zo2.storage_dtype={zo2.storage_dtype!r} applies to offloaded partitions: it needs "
                          f"zero_optimization.stage 3 (offload_param cpu, nvme or none)")
    return TrainSettings(zo2=zo2, tier=tier, zero_stage=stage, compute_dtype=_compute_dtype(raw, zo2), lr=lr,
                         weight_decay=wd, raw=raw, warnings=warnings)
