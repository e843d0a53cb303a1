"""What a run leaves in its workdir: atomic files, checkpoints, metrics, the resume guard.

Only process 0 writes files; orbax coordinates checkpoints across hosts.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, BinaryIO, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


def is_main_process() -> bool:
    return jax.process_index() == 0


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(f) on a temp file beside path, fsync, then rename over path.

    A killed or failing writer never leaves half a file at path, and its temp
    file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serializable: {type(x)}")


def tree_fingerprint(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (params, data)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


RUN_SPEC_FILE = "run_spec.json"

# Config keys a resumed run may change: they decide what is logged and
# evaluated, and how steps are chunked, checkpointed and spread over devices,
# not what is trained. (tasks/seeds/data.cache_dir: a multi-run's per-run
# config carries the whole list; the run's own task shows in its data.)
RESUME_MAY_CHANGE = ("log", "eval", "tasks", "seeds", "data.cache_dir", "train.num_devices",
                     "train.distributed", "train.steps_per_chunk",
                     "train.checkpoint_every_chunks", "train.max_checkpoints")


def _flat_spec(config_dict: dict, may_change: tuple[str, ...]) -> dict:
    flat = traverse_util.flatten_dict(json.loads(json.dumps(config_dict, default=_jsonable)),
                                      sep=".")
    return {k: v for k, v in flat.items()
            if not any(k == m or k.startswith(m + ".") for m in may_change)}


def _config_changes(old: dict, new: dict) -> list[str]:
    return [f"  {k}: {old.get(k, '<absent>')!r} in the checkpointed run, "
            f"{new.get(k, '<absent>')!r} now"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _refuse(workdir: str, changes: list[str]) -> None:
    raise ValueError(
        f"{workdir} holds a checkpoint trained with other settings, so it cannot be "
        "resumed by this run:\n" + "\n".join(changes) +
        "\nUse a fresh --workdir, or the original settings to resume it.")


def check_resume(workdir: str, config_dict: dict, data_sha256: str | None, resuming: bool,
                 may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> None:
    """Refuse to resume a checkpoint trained under other settings or on other data.

    A fresh run records its config and a fingerprint of its training data in
    DIR/run_spec.json. A run that finds a checkpoint compares against that
    record: reusing a workdir for another task or learning rate then fails
    with the keys that differ, instead of silently continuing (or, when the
    old run had finished, skipping) the old run. Shapes alone cannot catch
    this: every Meta-World task has the same observation and action sizes.
    """
    spec = {"config": _flat_spec(config_dict, may_change), "data_sha256": data_sha256}
    path = os.path.join(workdir, RUN_SPEC_FILE)
    if resuming and os.path.exists(path):
        saved = read_json(path)
        changes = _config_changes(saved["config"], spec["config"])
        if saved.get("data_sha256") != data_sha256:
            changes.append("  the training data (another task, demo set or data seed)")
        if changes:
            _refuse(workdir, changes)
    elif is_main_process():
        write_json(path, spec)


def check_workdir_settings(workdir: str, config_dict: dict,
                           may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> None:
    """Before any work: refuse a workdir whose run_spec.json records other settings
    (another experiment's or task's checkpoint), so that nothing is written there.
    The data fingerprint is checked later, by `check_resume`, once the data exists."""
    saved = read_json(os.path.join(workdir, RUN_SPEC_FILE))
    if saved is not None and checkpoint_steps(workdir):
        changes = _config_changes(saved["config"], _flat_spec(config_dict, may_change))
        if changes:
            _refuse(workdir, changes)


def drop_metrics_after(path: str, step: int) -> None:
    """A run killed after logging but before checkpointing logged steps it
    will redo; drop them (atomically) so the resumed log has each step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


class MetricsWriter:
    """Appends to DIR/metrics.jsonl, and to TensorBoard / wandb when enabled.

    log_config: a config with `tensorboard`, `wandb` (and `wandb_project`) flags;
    None writes metrics.jsonl only. Lines for steps after resume_step (logged by a
    killed run after its last checkpoint, and redone now) are dropped first.
    """

    def __init__(self, workdir: str, log_config=None, config_dict: dict | None = None,
                 resume_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = is_main_process()
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        drop_metrics_after(self.path, resume_step)
        if log_config is None:
            return
        if log_config.tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if log_config.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("log.wandb=True needs `pip install wandb`") from e
            self._wandb = wandb.init(project=log_config.wandb_project, config=config_dict,
                                     dir=workdir, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        """metrics: {name: float, or a list of floats, one per member of a stacked run}."""
        if not self.enabled:
            return
        values = {k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)
                  for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        # TensorBoard and wandb get one scalar per member: name/m<i>.
        scalars = {}
        for k, v in values.items():
            scalars.update({f"{k}/m{i}": x for i, x in enumerate(v)} if isinstance(v, list)
                           else {k: v})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_json(path: str, default=None):
    """The JSON at path, or `default` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def checkpoint_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps in DIR/checkpoints, ascending (orbax writes unfinished
    ones under a temporary name, so a killed save is never listed)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir)
                  if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d)))


def checkpoint_manager(workdir: str, max_to_keep: int | None = None, *,
                       asynchronous: bool = True, read_only: bool = False
                       ) -> ocp.CheckpointManager:
    """Orbax manager for DIR/checkpoints.

    asynchronous=False makes `save` return only once the checkpoint is written: needed
    by a loop whose next step donates (overwrites in place) the arrays being saved.
    read_only=True (loading a policy) creates and deletes nothing.
    """
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                             read_only=read_only,
                                             enable_async_checkpointing=asynchronous),
    )


STATE_ITEM = "state"


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, extra_items=None) -> None:
    """Save `state` as the item "state" of checkpoint `step`, beside `extra_items`
    ({name: orbax save args}, e.g. `Policy.checkpoint_args()`)."""
    manager.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state)}, **(extra_items or {})))


def restore_latest(manager: ocp.CheckpointManager, target):
    """(state, step) from the newest complete checkpoint, or (target, 0).

    `target` supplies structure, shapes and shardings; orbax never reports an
    unfinished (killed mid-save) checkpoint as the latest step.
    """
    step = manager.latest_step()
    if step is None:
        return target, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        if os.path.isdir(os.path.join(str(manager.directory), str(step), STATE_ITEM)):
            restored = manager.restore(step, args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract)}))[STATE_ITEM]
        else:  # a checkpoint of the state alone (written before checkpoints had items)
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 - re-raised with the fix spelled out
        raise RuntimeError(
            f"could not restore checkpoint step {step} from {manager.directory}: {e}\n"
            "If the config changed shapes since that checkpoint, use a fresh --workdir."
        ) from e
    return restored, step
