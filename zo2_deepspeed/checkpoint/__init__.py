"""Atomic, verified, DeepSpeed-layout checkpoints that are data, never code.

Layout on disk (``save_dir`` as given to ``engine.save_checkpoint``)::

    latest                          the tag of the newest complete checkpoint (replaced by rename)
    global_step{N}/
        zo2_checkpoint.json         counters, config, optimizer/scheduler/data-loader state, tensor index,
                                    the size and checksum of every other file, and its own checksum
        rank00000.safetensors ...   each rank's partitions ("param/<name>", "state/<state>/<name>")
        client_state.pt             optional; loaded with ``torch.load(weights_only=True)``

The engine applies its pending ZO update, then passes a ``CheckpointSubject`` (``subject``: the
parameter slots and their store, counters, settings, optimizer, scheduler, data loader): the package
never imports the engine. Each module has one job, in the order a save and a load use them:

- ``subject``  what a checkpoint reads from and writes back to an engine;
- ``ranks``    steps every rank runs together (a failure on one raises on all), rank-0 logs;
- ``format``   names of the layout, safetensors headers and bytes;
- ``space``    bytes a save needs on its filesystem and bytes free there;
- ``plan``     a save's plan: what each rank writes, every size known before a byte is written;
- ``hashing``  files hashed (xxh3-128) while written, the manifest's own checksum;
- ``durable``  fsync of files and directories; a directory replaced by one atomic exchange where it can be;
- ``save``     plan, check the space, write into ``.partial-<tag>``, fsync, rename, replace ``latest``;
- ``paths``    which directory ``load_dir``/``tag`` name (or what an interrupted save left), the manifest,
               earlier tags to offer;
- ``verify``   every file a load reads checked against its recorded size and checksum first;
- ``shards``   tensor files read one tensor at a time, whole or as this rank's partition;
- ``load``     resolve, check compatibility, verify, then restore the engine; whole-model reads.

A crash at any moment of a save (tests/test_crash_points.py kills one at each of its file-system
mutations) leaves a complete checkpoint for ``load_checkpoint(save_dir)``: the previous or the new
one. A failure on any rank, a second Ctrl-C included, removes the partial directory on every rank.
ZeRO-3 partitions are saved by their rank (a sharded model is never gathered to save) and
reassembled on load for another world size; with the same world size each rank reads only its own
file. Resuming continues bitwise as if the run had
never stopped.
"""
from .format import (CHUNK, CLIENT_STATE, FORMAT, HASH, LATEST, LR_SCHEDULER, MANIFEST_CHECKSUM, META,
                     OPERATIONAL_KEYS, PARTIAL, REQUIRED_KEYS, SAFETENSORS_DTYPES, SAFETENSORS_NAMES, TRASH,
                     _raw_bytes, _safetensors_header, _tensor_index, rank_file)
from .durable import replace_dir
from .hashing import _write_hashed
from .load import load_checkpoint, open_full_state, read_full_state
from .paths import nothing_to_resume, read_meta, resolve
from .ranks import _log_info, _warn_rank0, together
from .save import save_checkpoint
from .shards import _open_safetensors, _Shards
from .space import _free_bytes, bytes_on_disk, free_space
from .subject import CheckpointSubject, Counters, PartitionStore, RunSettings, Slot, Stateful

__all__ = [
    "CheckpointSubject", "Counters", "RunSettings", "PartitionStore", "Slot", "Stateful",
    "save_checkpoint", "load_checkpoint", "open_full_state", "read_full_state", "resolve", "read_meta",
    "nothing_to_resume", "together", "free_space", "bytes_on_disk", "replace_dir", "rank_file",
    "FORMAT", "META", "LATEST", "CLIENT_STATE", "LR_SCHEDULER", "PARTIAL", "TRASH", "HASH", "MANIFEST_CHECKSUM",
    "CHUNK", "OPERATIONAL_KEYS", "REQUIRED_KEYS", "SAFETENSORS_DTYPES", "SAFETENSORS_NAMES",
]
