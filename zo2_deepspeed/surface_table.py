"""DeepSpeedEngine's public surface, name by name, and how ZO2Engine answers each.

``ZO2Engine`` subclasses ``DeepSpeedEngine`` (Accelerate and the HF Trainer find the model through
``isinstance``) but never runs ``DeepSpeedEngine.__init__``, which builds a first-order engine. So
every public method, property and attribute of DeepSpeedEngine is answered in one of four ways:

``ZO``       implemented by this engine with zeroth-order meaning (engine.py or one of its mixins; for
             an attribute, set by the engine or a property of it);
``CONFIG``   DeepSpeedEngine's own getter, inherited unchanged: it reads only the DeepSpeed config, which
             the engine builds as DeepSpeedEngine does, and other getters of this table, so it answers
             what the config says (the first-order settings ZO does not use included);
``HELPER``   DeepSpeedEngine's own code that reads no engine state;
``refused``  raises ``NotSupportedError`` naming the method and why ZO has no such thing (for an
             attribute a ``NotSupportedAttributeError``, which is an AttributeError).

``DeepSpeedSurface`` installs the refusals, and refuses as well any public DeepSpeedEngine method
this table does not list (a newer DeepSpeed): nothing of DeepSpeedEngine runs unreviewed.
``tests/test_engine_surface.py`` lists the installed DeepSpeedEngine's public methods, properties and
attributes and fails on any name missing here, and checks each kind's promise.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    ZO = "implemented by ZO2Engine"
    CONFIG = "DeepSpeedEngine's getter of the config, inherited"
    HELPER = "DeepSpeedEngine's code that reads no engine state, inherited"
    REFUSED = "refused"


@dataclass(frozen=True)
class Answer:
    kind: Kind
    why: str = ""
    """For a refusal: why ZO has no such thing, and what to use instead."""


ZO = Answer(Kind.ZO)
CONFIG = Answer(Kind.CONFIG)
HELPER = Answer(Kind.HELPER)


def refused(why: str) -> Answer:
    return Answer(Kind.REFUSED, why)


# ------------------------------------------------------------------------------------- why ZO has none
NO_GRADIENTS = refused(
    "a ZO step computes no gradients: its forwards record one loss per perturbation group, those few floats are "
    "all-reduced once per step, and the update is regenerated from seeds")
NO_LOSS_SCALING = refused(
    "ZO runs no autograd backward and needs no loss scaling: engine.backward(loss), which has nothing to do, is "
    "all a step needs")
NO_COMPILE = refused(
    "the block pipeline runs Python (fetch, perturb, write back) around every block's forward, so neither "
    "torch.compile nor DeepSpeed's compiler passes apply (engine.compile() is refused too)")
NO_STATES_TO_MOVE = refused(
    "parameters live in their zero_optimization.offload_param tier between block residencies and ZO-SGD keeps no "
    "optimizer state: there are no engine states to move (engine.empty_partition_cache() frees the device buffers)")
NO_DATA_EFFICIENCY = refused(
    "DeepSpeed's data-efficiency library (curriculum learning, random-LTD) is not supported by the ZO engine")
NO_MOE = refused("DeepSpeed's MoE layers and expert parallelism are not supported by the ZO engine")
DATA_PARALLEL_ONLY = refused(
    "the ZO engine runs data parallelism (and zo2.parallel.perturbation) only, no model, pipeline, sequence or "
    "expert parallelism: get_data_parallel_rank(), dp_world_size and mpu give a rank's place")
NO_PROCESS_GROUP = refused(
    "the ZO engine keeps no data-parallel process group: it all-reduces the group losses over the world "
    "(zo2_deepspeed.comm); get_data_parallel_rank() and dp_world_size give a rank's replica")
OWN_CHECKPOINTS = refused(
    "ZO2 checkpoints are written by save_checkpoint (safetensors and JSON, atomically) and read by load_checkpoint "
    "(load_module_only=True for the weights alone), resharded to any world size; other weights are loaded into "
    "the model before initialize")
OWN_TIMERS = refused(
    "DeepSpeedEngine's timers are not built: the ZO engine reports its phase times in engine.last_step['phase_s'] "
    "and get_wall_clock_timers()")
NO_FLOPS_PROFILER = refused("DeepSpeed's flops profiler and autotuner do not run the ZO engine")
FIRST_ORDER_INTERNALS = refused(
    "part of DeepSpeedEngine's first-order machinery (gradient reduction and hooks, loss scaling, its checkpoint "
    "engine), which the ZO engine does not build")
CLIENT_OBJECTS = refused(
    "engine.optimizer is the ZO-SGD built from the config or sharing the parameter groups of the optimizer given to "
    "initialize, and engine.lr_scheduler the scheduler given or built")


SURFACE: dict[str, Answer] = {
    # ============================================================ methods and properties of DeepSpeedEngine
    # -- the training loop (engine.py, deepspeed_surface.py)
    "forward": ZO,
    "backward": ZO,
    "step": ZO,
    "train": ZO,
    "eval": ZO,
    "zero_grad": ZO,
    "no_sync": ZO,
    "coalesce_grad_reduction": ZO,
    "is_gradient_accumulation_boundary": ZO,
    "set_gradient_accumulation_boundary": ZO,
    "destroy": ZO,
    "compile": ZO,  # refused with a ConfigError naming the Trainer / Accelerate settings that turn it on
    "is_compiled": ZO,
    "is_deepcompile_active": ZO,
    # -- batch sizes and data (deepspeed_surface.py)
    "train_batch_size": ZO,
    "train_micro_batch_size_per_gpu": ZO,
    "gradient_accumulation_steps": ZO,
    "get_batch_info": ZO,
    "set_train_batch_size": ZO,
    "set_train_micro_batch_size": ZO,
    "dataloader_drop_last": ZO,
    "deepspeed_io": ZO,
    # -- ranks (deepspeed_surface.py): per data-parallel replica under zo2.parallel.perturbation
    "get_data_parallel_rank": ZO,
    "get_model_parallel_rank": ZO,
    "get_tensor_parallel_rank": ZO,
    "communication_data_type": ZO,
    # -- the step's results (deepspeed_surface.py)
    "get_lr": ZO,
    "get_mom": ZO,
    "optimizer_name": ZO,
    "get_global_grad_norm": ZO,
    "was_step_applied": ZO,
    "get_wall_clock_timers": ZO,
    "steps_per_print": ZO,
    # -- precision and ZeRO (deepspeed_surface.py)
    "fp16_enabled": ZO,
    "bfloat16_enabled": ZO,
    "get_data_types": ZO,
    "zero_optimization_stage": ZO,
    "zero_optimization_partition_weights": ZO,
    "zero_optimization_partition_gradients": ZO,
    "zero_nvme_offload_optimizer": ZO,
    "empty_partition_cache": ZO,
    # -- checkpoints and the model (checkpointing.py, model_saving.py)
    "save_checkpoint": ZO,
    "load_checkpoint": ZO,
    "save_16bit_model": ZO,
    "save_fp16_model": ZO,
    "module_state_dict": ZO,
    "zero_gather_16bit_weights_on_model_save": ZO,

    # -- getters of the DeepSpeed config, inherited
    "aio_config": CONFIG,
    "autotp_size": CONFIG,
    "autotuning_enabled": CONFIG,
    "autotuning_end_profile_step": CONFIG,
    "autotuning_metric": CONFIG,
    "autotuning_metric_path": CONFIG,
    "autotuning_model_info_path": CONFIG,
    "autotuning_profile_model_info": CONFIG,
    "autotuning_start_profile_step": CONFIG,
    "bf16_master_weights_and_gradients": CONFIG,
    "bf16_optimizer_states": CONFIG,
    "checkpoint_serialization_enabled": CONFIG,
    "checkpoint_tag_validation_enabled": CONFIG,
    "checkpoint_tag_validation_fail": CONFIG,
    "checkpoint_writer_enabled": CONFIG,
    "compile_autosp": CONFIG,
    "compile_autotp": CONFIG,
    "cpuadam_cores_perc": CONFIG,
    "curriculum_learning_config": CONFIG,
    "curriculum_learning_enabled": CONFIG,
    "data_efficiency_config": CONFIG,
    "data_efficiency_enabled": CONFIG,
    "data_sampling_config": CONFIG,
    "data_sampling_enabled": CONFIG,
    "dump_state": CONFIG,
    "dynamic_loss_scale": CONFIG,
    "dynamic_loss_scale_args": CONFIG,
    "flops_profiler_detailed": CONFIG,
    "flops_profiler_enabled": CONFIG,
    "flops_profiler_module_depth": CONFIG,
    "flops_profiler_output_file": CONFIG,
    "flops_profiler_profile_step": CONFIG,
    "flops_profiler_recompute_fwd_factor": CONFIG,
    "flops_profiler_top_modules": CONFIG,
    "fp16_auto_cast": CONFIG,
    "fp16_master_weights_and_gradients": CONFIG,
    "gradient_clipping": CONFIG,
    "gradient_predivide_factor": CONFIG,
    "initial_dynamic_scale": CONFIG,
    "is_deepcompile_enabled": CONFIG,
    "is_first_weights_partition_group": CONFIG,
    "is_sanity_checks_enabled": CONFIG,
    "load_universal_checkpoint": CONFIG,
    "log_level": CONFIG,
    "loss_scale": CONFIG,
    "managed_gradient_accumulation": CONFIG,
    "memory_breakdown": CONFIG,
    "optimizer_legacy_fusion": CONFIG,
    "optimizer_params": CONFIG,
    "postscale_gradients": CONFIG,
    "random_ltd_config": CONFIG,
    "random_ltd_enabled": CONFIG,
    "scheduler_name": CONFIG,
    "scheduler_params": CONFIG,
    "super_offload": CONFIG,
    "tensor_parallel_config": CONFIG,
    "torch_autocast_dtype": CONFIG,
    "torch_autocast_enabled": CONFIG,
    "torch_autocast_lower_precision_safe_modules": CONFIG,
    "use_node_local_storage": CONFIG,
    "uses_parallelization_pass_only": CONFIG,
    "wall_clock_breakdown": CONFIG,
    "zenflow_config": CONFIG,
    "zero_allgather_bucket_size": CONFIG,
    "zero_allgather_partitions": CONFIG,
    "zero_allgather_sequential": CONFIG,
    "zero_allow_untested_optimizer": CONFIG,
    "zero_compute_grad_norm": CONFIG,
    "zero_contiguous_gradients": CONFIG,
    "zero_cpu_offload": CONFIG,
    "zero_elastic_checkpoint": CONFIG,
    "zero_force_ds_cpu_optimizer": CONFIG,
    "zero_hpz_partition_size": CONFIG,
    "zero_ignore_unused_parameters": CONFIG,
    "zero_legacy_stage1": CONFIG,
    "zero_load_from_fp32_weights": CONFIG,
    "zero_log_trace_cache_warnings": CONFIG,
    "zero_max_live_parameters": CONFIG,
    "zero_max_reuse_distance": CONFIG,
    "zero_model_persistence_threshold": CONFIG,
    "zero_module_granularity_threshold": CONFIG,
    "zero_multi_rank_bucket_allreduce": CONFIG,
    "zero_offload_optimizer": CONFIG,
    "zero_offload_param": CONFIG,
    "zero_optimization": CONFIG,
    "zero_overlap_comm": CONFIG,
    "zero_param_persistence_threshold": CONFIG,
    "zero_parameter_alignment": CONFIG,
    "zero_partial_offload": CONFIG,
    "zero_prefetch_bucket_size": CONFIG,
    "zero_quantized_gradients": CONFIG,
    "zero_quantized_nontrainable_weights": CONFIG,
    "zero_quantized_weights": CONFIG,
    "zero_reduce_bucket_size": CONFIG,
    "zero_reduce_scatter": CONFIG,
    "zero_round_robin_gradients": CONFIG,
    "zero_save_muon_momentum_buffer_in_memory": CONFIG,
    "zero_sub_group_size": CONFIG,
    "zero_use_cpu_optimizer": CONFIG,

    # -- DeepSpeed's code that reads no engine state, inherited
    "collect_python_gc": HELPER,
    "is_iterable_style_dataset": HELPER,
    "is_map_style_dataset": HELPER,

    # -- refused
    "all_gather_scalar": NO_GRADIENTS,
    "allreduce_and_copy": NO_GRADIENTS,
    "allreduce_bucket": NO_GRADIENTS,
    "allreduce_gradients": NO_GRADIENTS,
    "allreduce_no_retain": NO_GRADIENTS,
    "buffered_allreduce_fallback": NO_GRADIENTS,
    "clip_fp32_gradients": NO_GRADIENTS,
    "sparse_all_gather": NO_GRADIENTS,
    "sparse_allreduce": NO_GRADIENTS,
    "sparse_allreduce_bucket": NO_GRADIENTS,
    "sparse_allreduce_no_retain": NO_GRADIENTS,
    "scale": NO_LOSS_SCALING,
    "compile_zero_optimization_stage": NO_COMPILE,
    "get_autosp_backend": NO_COMPILE,
    "get_autotp_backend": NO_COMPILE,
    "get_compile_time": NO_COMPILE,
    "get_deepcompile_backend": NO_COMPILE,
    "get_deepspeed_compile_backend": NO_COMPILE,
    "register_compile_pass": NO_COMPILE,
    "offload_states": NO_STATES_TO_MOVE,
    "reload_states": NO_STATES_TO_MOVE,
    "random_ltd_initialize": NO_DATA_EFFICIENCY,
    "set_custom_curriculum_learning_schedule": NO_DATA_EFFICIENCY,
    "set_data_post_process_func": NO_DATA_EFFICIENCY,
    "load_moe_state_dict": NO_MOE,
    "get_sequence_parallel_group": DATA_PARALLEL_ONLY,
    "load_module_state_dict": OWN_CHECKPOINTS,
    "print_forward_breakdown": OWN_TIMERS,
    "get_optimizer_configuration": refused(
        "DeepSpeed chooses an Adam implementation for a first-order optimizer there; the ZO engine trains with "
        "ZO-SGD (an SGD optimizer section, or the parameter groups of the optimizer given to initialize)"),
    "get_type": refused("DeepSpeed reads a per-group 'type' entry that ZO-SGD's parameter groups do not have: "
                        "optimizer_name() names the optimizer"),
    "swap_tensor_config": refused("DeepSpeed's own getter fails here (its config has no swap_tensor_config); the "
                                  "NVMe tier reads zero_optimization.offload_param and the aio section "
                                  "(aio_config())"),

    # ============================================================ attributes DeepSpeedEngine sets
    # -- set by the engine, with DeepSpeed's meaning
    "module": ZO,
    "optimizer": ZO,
    "lr_scheduler": ZO,
    "training_dataloader": ZO,
    "training_data": ZO,
    "collate_fn": ZO,
    "config": ZO,
    "monitor": ZO,
    "device": ZO,
    "global_steps": ZO,
    "global_samples": ZO,
    "micro_steps": ZO,
    "skipped_steps": ZO,
    "local_rank": ZO,
    "global_rank": ZO,
    "world_size": ZO,
    "dp_world_size": ZO,  # replicas: world_size / zo2.parallel.perturbation
    "seq_dp_world_size": ZO,
    "mp_world_size": ZO,
    "sequence_parallel_size": ZO,
    "mpu": ZO,
    "gradient_average": ZO,
    # -- refused
    "client_optimizer": CLIENT_OBJECTS,
    "client_lr_scheduler": CLIENT_OBJECTS,
    "basic_optimizer": CLIENT_OBJECTS,
    "data_parallel_group": NO_PROCESS_GROUP,
    "seq_data_parallel_group": DATA_PARALLEL_ONLY,
    "seq_parallel_group": DATA_PARALLEL_ONLY,
    "all_to_all_group": DATA_PARALLEL_ONLY,
    "local_all_to_all_group": DATA_PARALLEL_ONLY,
    "checkpoint_mp_rank": DATA_PARALLEL_ONLY,
    "pipeline_parallelism": DATA_PARALLEL_ONLY,
    "mesh_device": DATA_PARALLEL_ONLY,
    "has_moe_layers": NO_MOE,
    "moe_layers": NO_MOE,
    "num_experts": NO_MOE,
    "gate_modules": NO_MOE,
    "expert_data_parallel_group": NO_MOE,
    "expert_parallel_group": NO_MOE,
    "random_ltd_scheduler": NO_DATA_EFFICIENCY,
    "checkpoint_engine": OWN_CHECKPOINTS,
    "loaded_checkpoint_dp_world_size": OWN_CHECKPOINTS,
    "loaded_checkpoint_mp_world_size": OWN_CHECKPOINTS,
    "save_non_zero_checkpoint": OWN_CHECKPOINTS,
    "save_zero_checkpoint": OWN_CHECKPOINTS,
    "timers": OWN_TIMERS,
    "engine_timers": OWN_TIMERS,
    "engine_timers_cache": OWN_TIMERS,
    "tput_timer": OWN_TIMERS,
    "fwd_duration": OWN_TIMERS,
    "flops_profiler": NO_FLOPS_PROFILER,
    "flops": NO_FLOPS_PROFILER,
    "autotuning_model_info": NO_FLOPS_PROFILER,
    "losses": refused("DeepSpeedEngine's accumulated loss for its own logs: the ZO engine reports each step's loss "
                      "in engine.last_step['loss'] (and returns it from every forward)"),
    "dist_backend": refused("the ZO engine sets the process group up itself (zo2_deepspeed.distributed): "
                            "torch.distributed.get_backend() names its backend"),
    "enable_backward_allreduce": NO_GRADIENTS,
    "inside_no_sync_ctxt": NO_GRADIENTS,
    "scale_wrt_gas": NO_LOSS_SCALING,
    "warn_unscaled_loss": NO_LOSS_SCALING,
    "torch_autocast_z0_gradscaler": NO_LOSS_SCALING,
    "dont_change_device": FIRST_ORDER_INTERNALS,
    "first_dataloader_check": FIRST_ORDER_INTERNALS,
    "flatten": FIRST_ORDER_INTERNALS,
    "unflatten": FIRST_ORDER_INTERNALS,
    "module_forward_pre_hook": FIRST_ORDER_INTERNALS,
    "module_forward_post_hook": FIRST_ORDER_INTERNALS,
    "optimized_linear_base_weight_sharding": FIRST_ORDER_INTERNALS,
    "optimized_linear_lora_enabled": FIRST_ORDER_INTERNALS,
    "param_names": FIRST_ORDER_INTERNALS,
    "summary_events": FIRST_ORDER_INTERNALS,
    "update_interval": FIRST_ORDER_INTERNALS,
    "use_ds_comm": FIRST_ORDER_INTERNALS,
}
"""Every public name of DeepSpeedEngine (deepspeed 0.19.8), and how ZO2Engine answers it."""
