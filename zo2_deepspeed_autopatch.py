"""The config switch: ``deepspeed.initialize`` and the HF Trainer dispatch on a "zo2" section, in unmodified scripts.

``zo2_deepspeed_autopatch.pth`` (installed next to this module by ``pip install .`` and ``pip install -e .``)
imports this module when the interpreter starts. Importing it only puts a finder at the front of
``sys.meta_path``; the finder acts when ``deepspeed`` or ``transformers.integrations.deepspeed`` is
imported, after the module has run and before anyone sees it:

* ``deepspeed.initialize`` becomes ``initialize`` below: a config without a "zo2" section goes to
  DeepSpeed's own function with the caller's arguments untouched; a config with one goes to
  ``zo2_deepspeed.initialize`` (the ZO2 engine). Accelerate calls ``deepspeed.initialize`` too.
* transformers' ``deepspeed_init`` (the Trainer's) becomes ``trainer_deepspeed_init`` below, which
  hands zo2 configs to ``zo2_deepspeed.hf``.
* ``deepspeed.zero.Init`` given a config with a "zo2" section builds the partitions the ZO2 engine
  stores: in ``zo2.storage_dtype``, on zo2's NVMe swapper (``zo2_deepspeed.partitioning``). This is
  how a Trainer script's ``from_pretrained`` gets 16-bit partitions from the JSON alone.
* ``DeepSpeedEngine`` refuses a config with a "zo2" section: whatever way such a config
  reaches DeepSpeed's first-order engine (the switch turned off, a DeepSpeed whose entry point moved,
  an engine built by hand), the run stops with the cause and the fix instead of training first-order.

The guard and the ``zero.Init`` dispatch act in ``__new__``, which has returned before DeepSpeed's
``__init__`` runs: a first-order run's tracebacks show no frame of this module there. The two
wrappers that must stay on the stack (``initialize``, ``trainer_deepspeed_init``) add a note to an
error raised beneath them saying that they only passed the call on.

A config without "zo2" whose top-level key is a near miss of it ("zo", "Zo2") is refused, as
``zo2_deepspeed.initialize`` refuses it, instead of training first-order. A module of the hook's
imported before the hook was installed (``python -S``, a ``.pth`` read earlier) is switched at
installation; the hook's bookkeeping is per thread, so a ``find_spec`` on another thread cannot
make an import skip it.

``ZO2_DEEPSPEED_AUTOPATCH=0`` turns the switch off (the guard stays). This module imports nothing
beyond ``os`` and ``sys`` at start-up and never imports zo2_deepspeed for a config without "zo2".
``python -m zo2_deepspeed_autopatch`` says whether the switch is active in an interpreter (exit
status 0 only when it is).
"""
import _thread
import os
import sys

ENV_VAR = "ZO2_DEEPSPEED_AUTOPATCH"
_DEEPSPEED_PARAMETERS = ("args", "model", "config", "config_params")
"""What the dispatch reads from ``deepspeed.initialize``'s signature; a DeepSpeed without them is refused."""


class SwitchError(RuntimeError):
    """A config with a "zo2" section would have trained first-order: the switch could not act."""


def enabled() -> bool:
    """False when ``ZO2_DEEPSPEED_AUTOPATCH`` is 0/false/no/off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


_DIRECT_ENGINE = ("the config reached DeepSpeed's first-order DeepSpeedEngine without passing deepspeed.initialize, "
                 "which the switch dispatches. Fix: build the engine with deepspeed.initialize or "
                 "zo2_deepspeed.initialize, or remove the \"zo2\" section to train first-order")
_guard_reason = _DIRECT_ENGINE
"""Why a zo2 config can reach DeepSpeedEngine; replaced when the switch is off or could not be installed."""
_announced: set = set()


# ------------------------------------------------------------------------------------- config reading
def read_config(config):
    """The config as a dict, the way DeepSpeed reads it (dict, JSON/HJSON path, base64 JSON); None if unreadable."""
    if isinstance(config, dict):
        return config
    if isinstance(config, os.PathLike):
        config = os.fspath(config)
    if not isinstance(config, str):
        return None
    import json
    try:
        if os.path.exists(config):
            with open(config) as f:
                text = f.read()
            try:
                import hjson  # DeepSpeed reads its configs as HJSON, a superset of JSON
                return dict(hjson.loads(text))
            except ImportError:
                return json.loads(text)
        import base64
        return json.loads(base64.urlsafe_b64decode(config).decode())
    except Exception:  # DeepSpeed reports an unreadable config itself
        return None


def config_of(arguments: dict):
    """The config ``deepspeed.initialize`` would use for these arguments (``args.deepspeed_config`` wins)."""
    config = arguments.get("config")
    if config is None:
        config = arguments.get("config_params")
    from_args = getattr(arguments.get("args"), "deepspeed_config", None)
    return read_config(from_args if from_args is not None else config)


def _has_zo2(config) -> bool:
    return isinstance(config, dict) and "zo2" in config


def near_misses_of_zo2(config) -> list:
    """Top-level keys that look like a misspelled "zo2" ("zo", "Zo2", "zo_2", "z02"); no DeepSpeed key is that close.

    DeepSpeed ignores unknown top-level keys, so such a section would train first-order without a word.
    """
    if not isinstance(config, dict):
        return []
    import difflib
    return [key for key in config if isinstance(key, str) and key != "zo2"
            and difflib.get_close_matches(key.lower(), ["zo2"], cutoff=0.6)]


def _source_of(arguments: dict):
    """The path the config was read from, for messages (None for a dict or a base64 string)."""
    source = getattr(arguments.get("args"), "deepspeed_config", None)
    if source is None:
        source = arguments.get("config") if arguments.get("config") is not None else arguments.get("config_params")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    return source if isinstance(source, str) and os.path.exists(source) else None


# ------------------------------------------------------------------------------------- messages
def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def announce(config) -> None:
    """Say once per process, on rank 0, which engine the config selects and why (at WARNING: shown by default)."""
    if _has_zo2(config):
        method = config["zo2"].get("method", "mezo") if isinstance(config["zo2"], dict) else "?"
        message = (f"zo2_deepspeed: the DeepSpeed config has a \"zo2\" section (method {method}): ZO2Engine, "
                   f"zeroth-order training ({ENV_VAR}=0 turns the switch off)")
    else:
        message = "zo2_deepspeed: the DeepSpeed config has no \"zo2\" section: plain DeepSpeed (first-order)"
    if message in _announced or _rank() != 0:
        return
    _announced.add(message)
    from deepspeed.utils import logger
    logger.warning(message)


# ------------------------------------------------------------------------------------- deepspeed.initialize
def _zo2(module: str):
    """Import a zo2_deepspeed module for a zo2 config, or stop with the cause and the fix."""
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise SwitchError(
            f"the DeepSpeed config has a \"zo2\" section, but {module} cannot be imported in this process "
            f"({type(exc).__name__}: {exc}), and plain DeepSpeed would train it first-order. Fix: install "
            f"zo2_deepspeed into the interpreter the ranks run ({sys.executable}: pip install zo2_deepspeed, or "
            f"pip install -e <checkout>), or remove the \"zo2\" section to train first-order") from exc


def original_initialize(deepspeed_module):
    """DeepSpeed's own ``initialize``, whether or not the switch is installed."""
    return getattr(deepspeed_module.initialize, "__wrapped__", deepspeed_module.initialize)


def _note_passed_on(error: BaseException, callee: str) -> None:
    """Say on an error raised beneath a wrapper of ours that the wrapper only passed the call on.

    Python keeps a frame in a traceback while it is on the stack; the note (printed under the error)
    tells the reader that the ``zo2_deepspeed_autopatch.py`` frame above the library's own is not the cause.
    """
    note = (f"zo2_deepspeed: the config has no \"zo2\" section, so the config switch only passed this call on to "
            f"{callee}, unchanged; the error above is raised there, not by zo2_deepspeed")
    if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)


def _make_initialize(original):
    import inspect
    signature = inspect.signature(original)

    def initialize(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # DeepSpeed words the error
            bound = None
        config = config_of(bound.arguments) if bound is not None else None
        if not _has_zo2(config):
            if near_misses_of_zo2(config):
                _zo2("zo2_deepspeed.config").check_top_level_keys(config, _source_of(bound.arguments))
            if bound is not None:
                announce(config)
            try:
                return original(*args, **kwargs)  # no "zo2" section: DeepSpeed's own initialize, arguments unchanged
            except Exception as error:
                _note_passed_on(error, "DeepSpeed's own deepspeed.initialize")
                raise
        zo2_initialize = _zo2("zo2_deepspeed").initialize
        accepted = inspect.signature(zo2_initialize).parameters
        unknown = sorted(set(bound.arguments) - set(accepted))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            raise SwitchError(f"deepspeed.initialize was given {unknown}, which zo2_deepspeed.initialize does not "
                              f"take: drop them for a zo2 config, or upgrade zo2_deepspeed")
        _zo2("zo2_deepspeed.config").parse_config(config)  # a bad section fails here, before the banner names it
        announce(config)
        return zo2_initialize(**bound.arguments)

    initialize.__wrapped__ = original
    initialize.__doc__ = ("deepspeed.initialize, dispatched by zo2_deepspeed on the config's \"zo2\" section.\n\n"
                          + (original.__doc__ or ""))
    initialize._zo2_dispatch = True
    return initialize


def install_deepspeed(deepspeed_module) -> None:
    """Dispatch ``deepspeed.initialize`` and ``deepspeed.zero.Init`` on the config and guard ``DeepSpeedEngine``
    (idempotent)."""
    global _guard_reason
    _guard_engine(deepspeed_module)
    current = getattr(deepspeed_module, "initialize", None)
    if getattr(current, "_zo2_dispatch", False):  # installed, or its binding put back after an uninstall
        _switch_zero_init(deepspeed_module)
        _guard_reason = _DIRECT_ENGINE
        return
    import inspect
    try:
        names = set(inspect.signature(current).parameters) if callable(current) else set()
    except (TypeError, ValueError):
        names = set()
    missing = [name for name in _DEEPSPEED_PARAMETERS if name not in names]
    if missing:
        version = getattr(deepspeed_module, "__version__", "?")
        _guard_reason = (f"deepspeed {version} has no deepspeed.initialize({', '.join(_DEEPSPEED_PARAMETERS)}) "
                         f"(missing: {', '.join(missing)}), so the config switch could not be installed. Fix: "
                         f"install a DeepSpeed release zo2_deepspeed supports (see its setup.py), or upgrade "
                         f"zo2_deepspeed")
        raise SwitchError(_guard_reason)
    deepspeed_module.initialize = _make_initialize(current)
    _switch_zero_init(deepspeed_module)
    _guard_reason = _DIRECT_ENGINE


def uninstall_deepspeed(deepspeed_module) -> None:
    """Give DeepSpeed its own ``initialize`` and ``zero.Init`` back (the engine guard stays: a zo2 config never trains
    first-order)."""
    global _guard_reason
    deepspeed_module.initialize = original_initialize(deepspeed_module)
    _guard_reason = ("zo2_deepspeed.unpatch_deepspeed() took the config switch out, and plain DeepSpeed would train "
                     "it first-order. Fix: call zo2_deepspeed.patch_deepspeed(), or remove the \"zo2\" section")


def _ours(cls) -> bool:
    """zo2_deepspeed's own subclasses (the ZO2 engine, the switched zero.Init) are never refused or redirected."""
    return cls.__module__.split(".")[0] == "zo2_deepspeed"


def _install_new(cls, new) -> None:
    """Make ``new(cls, args, kwargs)`` choose the class that ``cls(...)`` instantiates, in the class's ``__new__``.

    Installed once and never removed: CPython leaves a class whose assigned ``__new__`` was deleted unable to
    take constructor arguments, so what turns the choice off is state that ``new`` reads.
    """
    original_new = cls.__dict__.get("__new__")

    def __new__(subclass, *args, **kwargs):
        chosen = new(subclass, args, kwargs)
        if original_new is not None:
            return original_new.__func__(chosen, *args, **kwargs) if isinstance(original_new, staticmethod) \
                else original_new(chosen, *args, **kwargs)
        return object.__new__(chosen)

    __new__._zo2_original = original_new
    cls.__new__ = staticmethod(__new__)


def _switched(cls) -> bool:
    current = cls.__dict__.get("__new__")
    return hasattr(getattr(current, "__func__", current), "_zo2_original")


def _guard_engine(deepspeed_module) -> None:
    """``DeepSpeedEngine(...)`` with a zo2 config raises SwitchError from ``__new__``, before DeepSpeed's ``__init__``."""
    engine_class = getattr(getattr(getattr(deepspeed_module, "runtime", None), "engine", None), "DeepSpeedEngine", None)
    if engine_class is None or _switched(engine_class):
        return
    import inspect
    signature = inspect.signature(engine_class.__init__)

    def refuse_zo2(cls, args, kwargs):
        if _ours(cls):
            return cls
        try:
            arguments = signature.bind(None, *args, **kwargs).arguments
        except TypeError:  # DeepSpeed's __init__ words the error
            return cls
        config = getattr(arguments.get("config_class"), "_param_dict", None)
        if config is None:
            config = config_of(arguments)
        if _has_zo2(config):
            raise SwitchError(f"the DeepSpeed config has a \"zo2\" section, but {_guard_reason}")
        return cls

    _install_new(engine_class, refuse_zo2)


def _zero_init_class(deepspeed_module):
    return getattr(getattr(getattr(getattr(deepspeed_module, "runtime", None), "zero", None), "partition_parameters",
                           None), "Init", None)


def _switch_active() -> bool:
    """Whether ``deepspeed.initialize`` dispatches now: the ``zero.Init`` dispatch follows it (unpatch turns both off)."""
    return getattr(getattr(sys.modules.get("deepspeed"), "initialize", None), "_zo2_dispatch", False)


def _switch_zero_init(deepspeed_module) -> None:
    """``deepspeed.zero.Init`` with a zo2 config builds zo2's partitions (``zo2_deepspeed.partitioning.SwitchedInit``)
    while the switch is active.

    Any other config gets DeepSpeed's own class, untouched: the choice is made in ``__new__``.
    """
    init_class = _zero_init_class(deepspeed_module)
    if init_class is None or _switched(init_class):
        return
    import inspect
    signature = inspect.signature(init_class.__init__)

    def choose(cls, args, kwargs):
        if _ours(cls) or not _switch_active():
            return cls
        try:
            arguments = signature.bind(None, *args, **kwargs).arguments
        except TypeError:  # DeepSpeed's __init__ words the error
            return cls
        config = arguments.get("config_dict_or_path")
        if config is None:
            config = arguments.get("config")
        config = read_config(config)
        if not _has_zo2(config):
            return cls
        return _zo2("zo2_deepspeed.partitioning").switched_init_class(cls)

    _install_new(init_class, choose)


# ------------------------------------------------------------------------------------- HF Trainer
_TRAINER_MODULES = ("transformers.integrations.deepspeed", "transformers.trainer")
"""Where transformers binds ``deepspeed_init`` (the Trainer's module imports the name)."""
_original_deepspeed_init = None


def trainer_deepspeed_init(trainer, num_training_steps, inference=False):
    """transformers' ``deepspeed_init``; for a zo2 config ``zo2_deepspeed.hf.zo2_deepspeed_init`` (its lifecycle)."""
    try:
        config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
    except AttributeError:  # a transformers/accelerate layout this was not written for: theirs, and
        config = {}         # deepspeed.initialize (switched) still gives zo2 configs the ZO2 engine
    if "zo2" not in config:
        try:  # no "zo2" section: the next line is transformers' own deepspeed_init, arguments unchanged
            return _original_deepspeed_init(trainer, num_training_steps, inference=inference)  # only passed on
        except Exception as error:
            _note_passed_on(error, "transformers' own deepspeed_init")
            raise
    hf = _zo2("zo2_deepspeed.hf")
    return hf.zo2_deepspeed_init(trainer, num_training_steps, inference, _original_deepspeed_init)


def install_trainer(integration) -> None:
    """Put ``trainer_deepspeed_init`` where transformers binds ``deepspeed_init`` (idempotent).

    transformers' function is remembered whenever it is found, and the wrapper is never taken for it: after an
    uninstall whose bindings someone put back (a test's clean-up), installing again must not make the wrapper
    call itself.
    """
    global _original_deepspeed_init
    if integration.deepspeed_init is not trainer_deepspeed_init:
        _original_deepspeed_init = integration.deepspeed_init
    for name in _TRAINER_MODULES:
        module = sys.modules.get(name, integration if name == integration.__name__ else None)
        if module is not None and getattr(module, "deepspeed_init", None) is _original_deepspeed_init:
            module.deepspeed_init = trainer_deepspeed_init


def uninstall_trainer() -> None:
    """Give transformers its own ``deepspeed_init`` back (still remembered: the wrapper keeps working where held)."""
    if _original_deepspeed_init is None:
        return
    for name in _TRAINER_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "deepspeed_init", None) is trainer_deepspeed_init:
            module.deepspeed_init = _original_deepspeed_init


# ------------------------------------------------------------------------------------- the import hook
def _on_deepspeed(module) -> None:
    global _guard_reason
    if not enabled():
        _guard_reason = (f"{ENV_VAR}={os.environ.get(ENV_VAR)} turns the config switch off, and plain DeepSpeed "
                         f"would train it first-order. Fix: unset {ENV_VAR} (or call zo2_deepspeed.patch_deepspeed()), "
                         f"or remove the \"zo2\" section to train first-order")
        _guard_engine(module)
        return
    install_deepspeed(module)


def _on_transformers_deepspeed(module) -> None:
    if enabled():
        install_trainer(module)


_HOOKS = {"deepspeed": _on_deepspeed, "transformers.integrations.deepspeed": _on_transformers_deepspeed}


def _run_hook(hook, module) -> None:
    try:
        hook(module)
    except Exception as exc:  # never break `import deepspeed`; the guard keeps zo2 configs from training
        sys.stderr.write(f"zo2_deepspeed: the config switch could not be installed on {module.__name__}: "
                         f"{type(exc).__name__}: {exc}\n")


class _HookedLoader:
    """The module's own loader, followed by the hook once the module has run."""

    def __init__(self, loader, hook) -> None:
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # the module looks as if never hooked
        self._loader.exec_module(module)
        _run_hook(self._hook, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Acts on the few module names in ``_HOOKS``; every other import costs one dictionary lookup."""

    def __init__(self) -> None:
        # (thread, name) pairs this finder is resolving: another finder that asks sys.meta_path again must not loop
        # back here, while a find_spec of the same name on another thread (a finder calling ours directly, without
        # the import lock) must not make that thread's import skip the hook.
        self._searching: set = set()

    def find_spec(self, fullname, path=None, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        key = (_thread.get_ident(), fullname)
        if key in self._searching:
            return None
        self._searching.add(key)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._searching.discard(key)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, hook)
        return spec

    def invalidate_caches(self) -> None:
        pass


def _hook_imported_modules() -> None:
    """Run the hook on a module of ``_HOOKS`` that was imported before the finder was in place.

    ``python -S``, a ``.pth`` file read before ours, or a ``sitecustomize`` can import deepspeed first;
    its ``initialize`` is switched now (a name bound earlier with ``from deepspeed import initialize``
    keeps DeepSpeed's, and the engine guard stops a zo2 config that reaches it). A module that is
    still being imported cannot be switched after the fact: that is said on stderr.
    """
    for name, hook in _HOOKS.items():
        module = sys.modules.get(name)
        if module is None:
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            sys.stderr.write(f"zo2_deepspeed: the config switch was loaded while {name} was being imported, and cannot "
                             f"be installed on it: import zo2_deepspeed_autopatch before {name}, or call "
                             f"zo2_deepspeed.patch_deepspeed() after it\n")
            continue
        _run_hook(hook, module)


def install_hook() -> None:
    """Put the finder first on ``sys.meta_path`` (once) and switch what is already imported; done by the .pth file at
    interpreter start."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    _hook_imported_modules()


def _main() -> int:
    if "zo2_deepspeed_autopatch" not in sys.modules:
        print(f"zo2_deepspeed config switch: not loaded at start-up of {sys.executable}: "
              f"zo2_deepspeed_autopatch.pth is not in its site-packages (reinstall zo2_deepspeed with pip)")
        return 1
    import deepspeed
    active = getattr(deepspeed.initialize, "_zo2_dispatch", False)
    print(f"zo2_deepspeed config switch: {'active' if active else 'off'} in {sys.executable} "
          f"({ENV_VAR}={os.environ.get(ENV_VAR, 'unset')})")
    return 0 if active else 1


if __name__ == "__main__":
    sys.exit(_main())
else:
    install_hook()
