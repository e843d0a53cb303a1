"""What a run leaves in its workdir: atomic files, checkpoints, metrics, the resume guard.

Only process 0 writes files; orbax coordinates checkpoints across hosts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import sys
import time
import warnings
from importlib import metadata
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
    # Not tempfile.mkstemp: its files are 0600, and a run's files should get the
    # ordinary mode (0666 less the umask), like every other file the run writes.
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


# Written by runs from before the run spec moved into each checkpoint; read only.
LEGACY_RUN_SPEC_FILE = "run_spec.json"

# Config keys a resumed run may change: they decide what is logged and
# evaluated, and how steps are chunked, checkpointed and spread over devices,
# not what is trained. (tasks/seeds/data.cache_dir: a multi-run's per-run
# config carries the whole list; the run's own task shows in its data.
# data.exec_horizon: how many predicted actions evaluation executes.)
RESUME_MAY_CHANGE = ("log", "eval", "tasks", "seeds", "data.cache_dir", "data.exec_horizon",
                     "train.num_devices", "train.distributed", "train.steps_per_chunk",
                     "train.checkpoint_every_chunks", "train.max_checkpoints",
                     "train.compilation_cache_dir",
                     # how the same parameters are computed (nn.kernels.KernelPolicy)
                     "model.conv_impl", "model.matmul_precision",
                     # how the trained policy acts, not what it learned
                     "diffusion.n_candidates")


class WorkdirError(ValueError):
    """A workdir this run must not use as it is (another run's, unverifiable, in use);
    the message says how to proceed."""


def run_spec(config_dict: dict, data_sha256: str | None) -> dict:
    """What a checkpoint was trained with: the config and a fingerprint of the data."""
    return {"config": json.loads(json.dumps(config_dict, default=_jsonable)),
            "data_sha256": data_sha256}


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
    raise WorkdirError(
        f"{workdir} holds a checkpoint trained with other settings, so it cannot be "
        "resumed by this run:\n" + "\n".join(changes) +
        "\nUse a fresh --workdir, or the original settings to resume it.")


def compare_run_specs(workdir: str, saved: dict, spec: dict,
                      may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> None:
    """Refuse (ValueError naming each key) when `spec` differs from a checkpoint's
    `saved` spec outside `may_change`; a data fingerprint of None is not compared."""
    changes = _config_changes(_flat_spec(saved["config"], may_change),
                              _flat_spec(spec["config"], may_change))
    if (spec.get("data_sha256") is not None
            and saved.get("data_sha256") != spec["data_sha256"]):
        changes.append("  the training data (another task, demo set or data seed)")
    if changes:
        _refuse(workdir, changes)


def _no_spec(workdir: str) -> None:
    raise WorkdirError(
        f"{workdir} holds checkpoints but no readable record of the settings they were "
        "trained with, so this run cannot tell whether resuming them is right. Use a fresh "
        f"--workdir; or, to start this workdir over, move {os.path.join(workdir, 'checkpoints')} "
        "away first.")


def check_workdir_settings(workdir: str, config_dict: dict,
                           may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> None:
    """Before any work: refuse a workdir whose newest checkpoint was trained with
    other settings (another experiment's or task's), or whose checkpoints carry no
    readable settings, so that nothing is written there. The data fingerprint is
    checked later, by `restore_verified`, once the data exists."""
    steps = checkpoint_steps(workdir)
    if not steps:
        return
    saved = None
    for step in reversed(steps):  # an unreadable newest one is dealt with at restore
        saved = read_checkpoint_spec(workdir, step)
        if saved is not None:
            break
    saved = saved or read_json(os.path.join(workdir, LEGACY_RUN_SPEC_FILE))
    if saved is None:
        _no_spec(workdir)
    compare_run_specs(workdir, saved, run_spec(config_dict, None), may_change)


def _torn_tail_lines(path: str, text: str) -> list[str]:
    """The lines of `text`, the JSON-lines file at `path`; a torn last line (a kill
    mid-write) is dropped with a warning naming the file. A bad line elsewhere is an
    error."""
    lines = [ln for ln in text.splitlines(keepends=True) if ln.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping its torn last line ({line.strip()[:60]!r}), "
                              "written by a run that was killed mid-write", stacklevel=3)
                return lines[:-1]
            raise ValueError(f"{path}, line {i + 1}, is not JSON ({e}); the metrics log is "
                             "damaged: repair or remove that line") from e
    return lines


def drop_metrics_after(path: str, step: int) -> None:
    """A run killed after logging but before checkpointing logged steps it
    will redo; drop them (atomically) so the resumed log has each step once.
    A torn last line goes too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    kept = [ln.rstrip("\n") + "\n" for ln in _torn_tail_lines(path, text)
            if json.loads(ln).get("step", 0) <= step]
    if "".join(kept) != text:
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
        return [json.loads(ln) for ln in _torn_tail_lines(path, f.read())]


def step_dir(workdir: str, step: int) -> str:
    """DIR/checkpoints/<step>: where checkpoint `step` lives."""
    return os.path.join(workdir, "checkpoints", str(step))


def checkpoint_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps in DIR/checkpoints, ascending (orbax writes unfinished
    ones under a temporary name, so a killed save is never listed)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir)
                  if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d)))


def checkpoint_manager(workdir: str, max_to_keep: int | None = None, *,
                       asynchronous: bool = True) -> ocp.CheckpointManager:
    """Orbax manager for writing DIR/checkpoints (reading goes through `read_items`).

    asynchronous=False makes `save` return only once the checkpoint is written: needed
    by a loop whose next step donates (overwrites) the arrays being saved.
    """
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        # cleanup_tmp_directories: a save cut short by a kill leaves a temporary
        # directory; it is removed when the run resumes.
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=asynchronous,
                                             cleanup_tmp_directories=True),
    )


STATE_ITEM = "state"
# The JSON item beside the state: the run spec it was trained with, and the
# state's fingerprint, checked on restore.
SPEC_ITEM = "run_spec"
QUARANTINE_DIR = "checkpoints-quarantine"


def _verify(tree, sha256: str | None) -> str | None:
    """Why a state fails verification (NaN/inf, or not the fingerprint `sha256`), or None.
    One copy to the host serves both checks."""
    host = jax.device_get(tree)
    if not all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(host)
               if np.issubdtype(np.asarray(x).dtype, np.inexact)):
        return "it holds NaN or inf values"
    if sha256 is not None and tree_fingerprint(host) != sha256:
        return "its contents differ from the fingerprint saved with it"
    return None


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, spec: dict,
                    extra_items=None) -> None:
    """Save `state` as the item "state" of checkpoint `step`, with `spec` (see
    `run_spec`) and the state's fingerprint, beside `extra_items` ({name: orbax
    save args}, e.g. `Policy.checkpoint_args()`).

    A state with NaN or inf is refused: saving it would rotate a good checkpoint away.
    """
    host = jax.device_get(state)
    if _verify(host, None) is not None:
        raise FloatingPointError(
            f"the state at step {step} holds NaN or inf values; it is not checkpointed, so "
            f"the newest good checkpoint in {manager.directory} is kept")
    record = {**spec, "state_sha256": tree_fingerprint(host)}
    manager.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), SPEC_ITEM: ocp.args.JsonSave(record)},
        **(extra_items or {})))


def read_checkpoint_spec(workdir: str, step: int) -> dict | None:
    """The run spec saved with checkpoint `step`, or None (an older checkpoint
    without one, or one whose record cannot be read)."""
    if not os.path.isdir(os.path.join(step_dir(workdir, step), SPEC_ITEM)):
        return None
    try:
        return dict(read_items(workdir, step, **{SPEC_ITEM: ocp.args.JsonRestore()})[SPEC_ITEM])
    except Exception:  # noqa: BLE001 - a damaged record: the caller treats it as absent
        return None


def quarantine_checkpoint(workdir: str, step: int, reason: str, failed: bool = True) -> str:
    """Move checkpoint `step` to DIR/checkpoints-quarantine/ (never deleted), with one
    message saying why (`failed`: it failed verification; else it is set aside);
    returns where it went."""
    src = step_dir(workdir, step)
    dest = os.path.join(workdir, QUARANTINE_DIR, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    if is_main_process():
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(src, dest)
    what = "failed verification" if failed else "is set aside"
    print(f"checkpoint step {step} in {workdir} {what} ({reason}); moved it to {dest}"
          + (" and resuming from the newest good checkpoint" if failed else ""), file=sys.stderr)
    return dest


def restore_verified(workdir: str, target, spec: dict,
                     may_change: tuple[str, ...] = RESUME_MAY_CHANGE):
    """(state, step) from the newest checkpoint that passes verification, or (target, 0).

    Each checkpoint, newest first, must have been trained with `spec` (else
    WorkdirError: the workdir belongs to another run), restore, hold finite
    values and match the fingerprint saved with it. One that fails is moved to
    DIR/checkpoints-quarantine/ and the next older one is tried. `target`
    supplies structure, shapes and shardings; orbax never lists an unfinished
    (killed mid-save) checkpoint.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    legacy_spec = read_json(os.path.join(workdir, LEGACY_RUN_SPEC_FILE))
    for step in reversed(checkpoint_steps(workdir)):
        if os.path.isdir(os.path.join(step_dir(workdir, step), SPEC_ITEM)):
            saved = read_checkpoint_spec(workdir, step)
            if saved is None:
                quarantine_checkpoint(workdir, step, "its run record cannot be read")
                continue
        elif legacy_spec is not None:  # written before the spec moved into checkpoints
            saved = legacy_spec
        else:
            _no_spec(workdir)
        compare_run_specs(workdir, saved, spec, may_change)
        try:
            state = _restore_state(workdir, step, abstract)
        except Exception as e:  # noqa: BLE001
            if "state_sha256" not in saved:  # an old checkpoint: most likely a shape change
                raise RuntimeError(
                    f"could not restore checkpoint step {step} from "
                    f"{step_dir(workdir, step)}: {e}\n"
                    "If the config changed shapes since that checkpoint, use a fresh "
                    "--workdir.") from e
            quarantine_checkpoint(workdir, step, f"it cannot be read: {str(e).splitlines()[0]}")
            continue
        reason = _verify(state, saved.get("state_sha256"))
        if reason is not None:
            quarantine_checkpoint(workdir, step, reason)
            continue
        return state, step
    return target, 0


def read_items(workdir: str, step: int, **items) -> dict:
    """Read the named items of checkpoint `step` ({name: orbax restore args}).

    Straight from the step's directory, without a CheckpointManager: reading
    creates, deletes and logs nothing.
    """
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(os.path.abspath(step_dir(workdir, step)),
                                    args=ocp.args.Composite(**items))


def _restore_state(workdir: str, step: int, abstract):
    # "default": a checkpoint of the state alone (written before checkpoints had items).
    name = STATE_ITEM if os.path.isdir(os.path.join(step_dir(workdir, step), STATE_ITEM)) \
        else "default"
    return read_items(workdir, step, **{name: ocp.args.StandardRestore(abstract)})[name]


# Workdirs this process holds the lock of (for re-entry only).
_HELD_LOCKS: set[str] = set()


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold DIR/.lock (an OS advisory lock) for the block: a second process on the
    same workdir fails at once, naming the holder's pid. The OS drops the lock when
    its process dies, so a killed run leaves no stale lock. Re-entrant within a
    process (an experiment and the fit inside it lock the same workdir)."""
    key = os.path.realpath(workdir)
    if key in _HELD_LOCKS:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirError(f"{workdir} is in use by another run (pid {holder}); wait for "
                               "it to finish, stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(key)
    finally:
        os.close(fd)  # releases the lock


def package_versions(packages) -> dict[str, str]:
    """{package: installed version or "not installed"}: the part of a cache's provenance
    that says which simulator produced it."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
