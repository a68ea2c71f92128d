"""ZO2Engine against the installed DeepSpeedEngine's public surface, and the engine state its parts share.

ZO2Engine subclasses DeepSpeedEngine without running its __init__. The census below lists every public
method, property and attribute of the installed DeepSpeedEngine and fails on a name that
zo2_deepspeed/surface_table.py does not classify, so a DeepSpeed upgrade cannot add one silently; the
tests after it check what each kind promises and how the ZO implementations behave.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine

import zo2_deepspeed
from conftest import ds_config
from tiny_models import batches, make_model
from zo2_deepspeed import ConfigError, NotSupportedError, ZO2Error
from zo2_deepspeed.deepspeed_surface import DeepSpeedSurface, ReplicaMpu
from zo2_deepspeed.distributed import ParallelGrid
from zo2_deepspeed.engine import ZO2Engine
from zo2_deepspeed.engine_state import EngineState
from zo2_deepspeed.errors import NotSupportedAttributeError
from zo2_deepspeed.surface_table import CONFIG, HELPER, SURFACE, Kind


def _self_attributes(source: str) -> tuple[set[str], set[str]]:
    """The ``self.<name>`` (and ``getattr(self, "<name>", ...)``) a piece of code reads and the ones it assigns."""
    reads, writes = set(), set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            (writes if isinstance(node.ctx, ast.Store) else reads).add(node.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
                and isinstance(node.args[1], ast.Constant)):
            reads.add(node.args[1].value)
    return reads, writes


def deepspeed_methods() -> set[str]:
    """Public methods and properties DeepSpeedEngine itself defines (not those of nn.Module)."""
    return {n for n in vars(DeepSpeedEngine) if not n.startswith("_")}


def deepspeed_attributes() -> set[str]:
    """Public attributes DeepSpeedEngine's code assigns on ``self`` (its __init__ and the set-up it calls), also
    through ``self.__dict__[name]`` (how it sets ``module``)."""
    source = textwrap.dedent(inspect.getsource(DeepSpeedEngine))
    _, writes = _self_attributes(source)
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and isinstance(node.slice, ast.Constant)
                and ast.unparse(node.value) == "self.__dict__"):
            writes.add(node.slice.value)
    return {n for n in writes if not n.startswith("_")}


def owner(cls: type, name: str):
    return next((k for k in cls.__mro__ if name in vars(k)), None)


def names_of(kind: Kind) -> list[str]:
    return sorted(n for n, answer in SURFACE.items() if answer.kind is kind)


@pytest.fixture(scope="module")
def engine():
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    yield engine
    engine.close()


# ---------------------------------------------------------------------------------------------- the census
def test_every_public_name_of_the_installed_deepspeed_engine_is_classified():
    import deepspeed
    public = deepspeed_methods() | deepspeed_attributes()
    unclassified = sorted(public - SURFACE.keys())
    assert not unclassified, (
        f"deepspeed {deepspeed.__version__}'s DeepSpeedEngine has public names that zo2_deepspeed/surface_table.py "
        f"does not classify: {unclassified}. Implement each with ZO meaning, mark it an inherited config getter, "
        f"or refuse it with a reason")
    stale = sorted(SURFACE.keys() - public)
    assert not stale, f"surface_table.SURFACE lists names DeepSpeedEngine no longer has: {stale}"
    assert len(deepspeed_methods()) >= 178  # deepspeed 0.19.8: 178 methods and properties of its own


def test_implemented_names_are_answered_by_the_engine_not_by_deepspeed(engine):
    for name in names_of(Kind.ZO):
        where = owner(type(engine), name)
        if where is not None and where is not DeepSpeedEngine:
            assert where.__module__.startswith("zo2_deepspeed."), (name, where)
            assert not hasattr(vars(where)[name], "refusal"), f"{name} is classified ZO but refused"
        else:
            assert name in vars(engine) or name in engine._modules, \
                f"{name} is classified ZO, but the engine neither defines nor sets it (DeepSpeedEngine's would run)"


class _ConfigOnly:
    """Runs DeepSpeedEngine's own getter against the engine's DeepSpeed config and nothing else.

    A getter may call other getters of the table (inherited ones run here too, implemented ones are the
    engine's); reading any other engine state raises, naming it.
    """

    def __init__(self, engine: ZO2Engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        if name == "_config":
            return self.engine._config
        answer = SURFACE.get(name)
        if answer is CONFIG:
            return vars(DeepSpeedEngine)[name].__get__(self, type(self))
        if answer is not None and answer.kind is Kind.ZO:
            return getattr(self.engine, name)
        raise AttributeError(f"DeepSpeedEngine's getter reads self.{name}, which is not the config")


@pytest.mark.parametrize("name", names_of(Kind.CONFIG))
def test_inherited_config_getters_read_only_the_config(engine, name):
    assert owner(type(engine), name) is DeepSpeedEngine, f"{name} is overridden: classify it ZO"
    expected = getattr(_ConfigOnly(engine), name)()
    assert getattr(engine, name)() == expected


def test_inherited_helpers_read_no_engine_state(engine):
    for name in names_of(Kind.HELPER):
        assert owner(type(engine), name) is DeepSpeedEngine, name
        function = vars(DeepSpeedEngine)[name]
        reads, writes = _self_attributes(inspect.getsource(getattr(function, "__func__", function)))
        assert not reads | writes, (name, reads | writes)
    assert engine.is_map_style_dataset([1, 2]) and not engine.is_map_style_dataset(iter([1, 2]))


@pytest.mark.parametrize("name", [n for n in names_of(Kind.REFUSED) if n in vars(DeepSpeedEngine)])
def test_refused_methods_raise_naming_the_method_and_why(engine, name):
    why = SURFACE[name].why
    with pytest.raises(NotSupportedError) as info:
        value = getattr(engine, name)
        value(None, None)  # any arguments: nothing of DeepSpeed's runs
    assert str(info.value) == f"ZO2Engine.{name}() is not supported: {why}"
    assert isinstance(info.value, ZO2Error) and isinstance(info.value, NotImplementedError)


@pytest.mark.parametrize("name", [n for n in names_of(Kind.REFUSED) if n not in vars(DeepSpeedEngine)])
def test_refused_attributes_are_attribute_errors_that_say_why(engine, name):
    assert not hasattr(engine, name) and getattr(engine, name, "absent") == "absent"
    with pytest.raises(NotSupportedAttributeError) as info:
        getattr(engine, name)
    assert str(info.value) == (f"ZO2Engine has no attribute {name!r} (an attribute of DeepSpeedEngine): "
                               f"{SURFACE[name].why}")


def test_a_deepspeed_method_missing_from_the_table_is_refused_as_unreviewed(monkeypatch):
    """What a DeepSpeed upgrade adds is refused at run time too, until the table classifies it."""
    monkeypatch.setattr(DeepSpeedEngine, "brand_new_getter", lambda self: 42, raising=False)
    monkeypatch.setattr(DeepSpeedEngine, "brand_new_flag", property(lambda self: True), raising=False)

    class Upgraded(DeepSpeedSurface, DeepSpeedEngine):
        pass

    with pytest.raises(NotSupportedError, match=r"^ZO2Engine.brand_new_getter\(\) is not supported: "
                                                r"DeepSpeedEngine.brand_new_getter \(deepspeed .*\) has not been "
                                                r"reviewed for the ZO engine"):
        Upgraded.brand_new_getter(object())
    with pytest.raises(NotSupportedError, match="DeepSpeedEngine.brand_new_flag .* has not been reviewed"):
        Upgraded.brand_new_flag.fget(object())
    assert Upgraded.gradient_clipping is DeepSpeedEngine.gradient_clipping  # config getters stay inherited
    assert Upgraded.train is DeepSpeedSurface.train


# ------------------------------------------------------------------------------------ a rank's place
def test_ranks_are_answered_per_data_parallel_replica(engine, monkeypatch):
    """Under zo2.parallel.perturbation the ranks of a replica share a data-parallel rank and a data shard.

    (A 2 × 2 grid of real ranks checks the same in test_perturbation_parallel.py.)"""
    assert (engine.get_data_parallel_rank(), engine.dp_world_size, engine.get_model_parallel_rank(),
            engine.get_tensor_parallel_rank(), engine.mp_world_size, engine.seq_dp_world_size) == (0, 1, 0, 0, 1, 1)
    rows = [{"input_ids": torch.tensor([i])} for i in range(40)]
    shards = {}
    for rank in range(6):
        grid = ParallelGrid(rank, 6, perturbation=3)
        monkeypatch.setattr(engine, "grid", grid)
        mpu = engine.mpu
        assert isinstance(mpu, ReplicaMpu)
        assert engine.get_data_parallel_rank() == mpu.get_data_parallel_rank() == rank // 3
        assert (mpu.get_data_parallel_world_size(), mpu.get_model_parallel_rank(),
                mpu.get_model_parallel_world_size()) == (2, 0, 1)
        shards[rank] = list(engine.deepspeed_io(rows, batch_size=4).sampler)
    assert shards[0] == shards[1] == shards[2] and shards[3] == shards[4] == shards[5]
    assert sorted(shards[0] + shards[3]) == list(range(40))


# ------------------------------------------------------------------------------------ batch sizes and data
def test_batch_sizes_change_as_in_deepspeed_and_the_steps_follow():
    """set_train_batch_size raises the accumulation steps; set_train_micro_batch_size the rows per forward.

    After the change a step averages the new number of micro-batches: 2 micro-batches of 4 rows give the
    step that one micro-batch of the same 8 rows gives (bit for bit, tests/test_determinism.py).
    """
    data = batches(4, rows=4, seed=3)
    joined = {k: torch.cat([data[2][k], data[3][k]]) for k in data[2]}
    a, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none", micro_batch=4))
    b, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none", micro_batch=4))
    for engine in (a, b):
        for batch in data[:2]:
            engine(**batch)
            engine.step()
    with pytest.raises(ConfigError, match=r"^set_train_batch_size\(6\): the train batch must be a positive multiple "
                                          r"of train_micro_batch_size_per_gpu 4 × world size 1 = 4$"):
        a.set_train_batch_size(6)
    with pytest.raises(ConfigError, match=r"set_train_micro_batch_size\(0\): the micro-batch must be a positive"):
        a.set_train_micro_batch_size(0)
    a.set_train_batch_size(8)
    assert a.get_batch_info() == (8, 4, 2)
    for batch in data[2:]:
        assert a.is_gradient_accumulation_boundary() == (batch is data[3])
        a(**batch)
        a.step()
    b.set_train_micro_batch_size(8)
    assert b.get_batch_info() == (8, 8, 1)
    b(**joined)
    b.step()
    assert a.global_steps == b.global_steps == 3 and a.global_samples == b.global_samples == 16
    assert a.last_step["group_losses"] == b.last_step["group_losses"]
    pa, pb = a.parameter_snapshot(), b.parameter_snapshot()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    a.close(), b.close()


def test_deepspeed_io_builds_the_engines_loader():
    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    data = [{k: v[i] for k, v in batches(1, rows=10)[0].items()} for i in range(10)]
    config = ds_config("none", micro_batch=4)
    config["dataloader_drop_last"] = False
    engine, _, loader, _ = zo2_deepspeed.initialize(model=make_model(), config=config, training_data=data,
                                                    collate_fn=collate)
    assert engine.training_data is data and engine.collate_fn is collate and not engine.dataloader_drop_last()
    again = engine.deepspeed_io(data)
    assert list(again.sampler) == list(loader.sampler) and again.collate_fn is collate and len(again) == 3
    ordered = engine.deepspeed_io(data, batch_size=5, route="eval")
    assert list(ordered.sampler) == list(range(10)) and [len(b["input_ids"]) for b in ordered] == [5, 5]
    with pytest.raises(NotSupportedError, match=r"deepspeed_io\(data_sampler=\.\.\.\) is not supported"):
        engine.deepspeed_io(data, data_sampler=torch.utils.data.SequentialSampler(data))
    engine.close()
    default, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("none"))
    assert default.dataloader_drop_last() and default.training_data is None
    default.close()


# ------------------------------------------------------------------------------------ the step's results
def test_step_results_and_getters():
    poison = {"on": False}

    def loss_fn(outputs, batch):
        loss = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 reduction="none").view(batch["labels"].shape[0], -1)
        return loss.mean(-1) * (float("nan") if poison["on"] else 1.0)

    config = ds_config("none", micro_batch=4)
    config["zo2"]["compute_dtype"] = "bf16"
    engine, *_ = zo2_deepspeed.initialize(model=make_model(), config=config, loss_fn=loss_fn)
    assert engine.bfloat16_enabled() and not engine.fp16_enabled()  # no bf16 section: zo2.compute_dtype decides
    assert engine.get_data_types() == (torch.bfloat16, torch.float64)
    assert not engine.was_step_applied() and engine.get_global_grad_norm() is None
    assert engine.get_wall_clock_timers() == {}
    data = batches(2)
    engine(**data[0])
    engine.step()
    assert engine.was_step_applied() and engine.get_global_grad_norm() == abs(engine.last_step["projected_grad"][0])
    timers = engine.get_wall_clock_timers()
    assert timers["step"] == 1000.0 * engine.last_step["step_time_s"] > 0
    assert {k: v for k, v in timers.items() if k != "step"} == {
        k: 1000.0 * v for k, v in engine.last_step["phase_s"].items()}
    poison["on"] = True
    engine(**data[1])
    engine.step()
    assert engine.last_step["skipped"] and not engine.was_step_applied() and engine.get_global_grad_norm() is None
    assert engine.get_lr() == [1e-3, 1e-3] and engine.get_mom() == [0.0, 0.0] and engine.optimizer_name() == "ZOSGD"
    assert (engine.communication_data_type, engine.is_compiled, engine.is_deepcompile_active()) == (
        torch.float64, False, False)
    assert not engine.zero_optimization_partition_gradients() and not engine.zero_nvme_offload_optimizer()
    with engine.coalesce_grad_reduction():
        pass
    engine.close()
    evaluating, *_ = zo2_deepspeed.initialize(model=make_model(), config={
        "train_micro_batch_size_per_gpu": 4, "zo2": {"method": "mezo"}})
    assert evaluating.optimizer is None
    assert (evaluating.get_lr(), evaluating.get_mom(), evaluating.optimizer_name()) == ([], [], None)
    evaluating.close()


def test_empty_partition_cache_frees_buffers_and_training_goes_on_unchanged():
    data = batches(3)
    a, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu"))
    b, *_ = zo2_deepspeed.initialize(model=make_model(), config=ds_config("cpu"))
    for t, batch in enumerate(data):
        for engine in (a, b):
            engine(**batch)
            engine.step()
        if t == 0:
            assert a.pool._free_bytes > 0
            a.empty_partition_cache()
            assert a.pool._free_bytes == 0
    pa, pb = a.parameter_snapshot(), b.parameter_snapshot()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    a.close(), b.close()


# ------------------------------------------------------------------------------------ saving the model
@pytest.mark.parametrize("tier", ["cpu", "none"])
def test_save_16bit_model_writes_the_current_weights(tmp_path, monkeypatch, tier):
    """The HF Trainer (stage 3 with stage3_gather_16bit_weights_on_model_save) and DeepSpeed scripts call it."""
    from safetensors.torch import load_file
    model = make_model(tied=True)
    start = {n: p.detach().clone() for n, p in make_model(tied=True).named_parameters()}
    engine, *_ = zo2_deepspeed.initialize(model=model, config=ds_config(tier, lr=1e-2))
    engine(**batches(1)[0])
    engine.step()  # its update is pending until something reads the weights
    assert engine.save_16bit_model(str(tmp_path / "out")) is True
    saved = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    expected = engine.consolidated_state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert any(not torch.equal(saved[n], start[n]) for n in start)
    assert engine.save_fp16_model(str(tmp_path / "out"), "model.safetensors") is True
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "pytorch_model.bin"]
    before = (tmp_path / "out" / "pytorch_model.bin").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as partial:
            partial.write(b"half a file")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            engine.save_16bit_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "pytorch_model.bin").read_bytes() == before  # the earlier file, whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "pytorch_model.bin"]
    if tier == "none":
        state = engine.module_state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    else:
        with pytest.raises(NotSupportedError, match=r"module_state_dict\(\) is not supported on the cpu tier: .* "
                                                    r"call consolidated_state_dict\(\) or save_16bit_model\(\)"):
            engine.module_state_dict()
    engine.close()


# ------------------------------------------------------------------------------------ the engine's shared state
def engine_parts() -> list[type]:
    return [k for k in ZO2Engine.__mro__
            if k.__module__.startswith("zo2_deepspeed.") and k not in (ZO2Engine, EngineState)]


def test_the_parts_use_only_engine_state_that_is_declared():
    """Every ``self.<name>`` a mixin reads or writes is declared in EngineState, or is a method of the engine."""
    declared = set(inspect.get_annotations(EngineState))
    module_fields = set(vars(torch.nn.Module()))
    used: set[str] = set()
    for part in engine_parts():
        reads, writes = _self_attributes(inspect.getsource(part))
        undeclared = sorted(n for n in reads | writes
                            if n not in declared and n not in module_fields and not hasattr(ZO2Engine, n))
        assert not undeclared, f"{part.__name__} uses engine fields not declared in EngineState: {undeclared}"
        used |= reads | writes
    assert not sorted(declared - used), "declared in EngineState but no part uses them"
    assert [k for k in vars(EngineState) if not k.startswith("__")] == []  # annotations only


def test_the_engine_sets_every_declared_field(engine):
    for name in inspect.get_annotations(EngineState):
        assert name in vars(engine) or name in engine._modules, f"EngineState declares {name}; the engine never sets it"
