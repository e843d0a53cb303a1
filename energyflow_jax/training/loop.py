"""The training run: chunks of jitted steps, with logging, checkpoints and resume between.

`fit` is task-agnostic: it takes windows already as arrays and the model.
"""
from __future__ import annotations

import math
import os
import signal
import contextlib
import functools
import json
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from energyflow_jax import training
from energyflow_jax.io import run_dir
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.objectives import dsm

# Test-only: SIGKILL this process right after chunk N, to test resumption
# against a real kill at a reproducible point.
_KILL_AFTER_CHUNK = "ENERGYFLOW_TEST_SIGKILL_AFTER_CHUNK"


def validate_data(data: dict) -> None:
    """Clear errors for what would otherwise fail deep inside jit, or train on NaN."""
    for key in ("obs", "actions"):
        if key not in data:
            raise ValueError(f"training data needs key {key!r}; got {sorted(data)}")
        arr = np.asarray(data[key])
        if arr.ndim != 3:
            raise ValueError(f"data[{key!r}] must be (N, horizon, dim), got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"data[{key!r}] holds no training windows (shape {arr.shape}): "
                             "the demos are shorter than one window, or there are none")
        if not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr).all(axis=(1, 2)))[:5, 0].tolist()
            raise ValueError(f"data[{key!r}] contains NaN or inf (first bad windows: {bad})")
    if data["obs"].shape[0] != data["actions"].shape[0]:
        raise ValueError(f"obs and actions disagree on the number of windows: "
                         f"{data['obs'].shape[0]} vs {data['actions'].shape[0]}")


class MemberRun(NamedTuple):
    """One of several runs trained together: its config (differing from the others
    only in vmappable hyperparameters) and its training seed."""

    config: ml_collections.ConfigDict
    seed: int


def use_compilation_cache(path: str) -> None:
    """Keep compiled programs in `path` (train.compilation_cache_dir; "" does
    nothing), so a re-run, resume or another seed of the same shapes loads them
    instead of compiling. Process-wide, like JAX's cache itself."""
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # the next compile opens the cache at path


def _init_state(config, model, members, mesh):
    # Jitted (op by op is several times slower); members are created one at a time
    # with the single-run program: vmapping the init compiles several times slower.
    create = _jitted_create(model, _optim_key(config))
    if members is None:
        state = create(training.HParams.from_config(config), jax.random.PRNGKey(config.seed))
        return training.replicate(state, mesh)
    states = [create(training.HParams.from_config(m.config), jax.random.PRNGKey(m.seed))
              for m in members]
    # Unpadded (checkpoints hold the real members only), so replicated until padded.
    return training.replicate(training.stack(states), mesh)


def _optim_key(config) -> str:
    return json.dumps(config.optim.to_dict(), sort_keys=True)


# Compiled programs are kept per shape for the process, so repeated fits (seeds
# run one after another, sweep groups, a resumed run) do not compile again.
@functools.lru_cache(maxsize=8)
def _jitted_create(model, optim_key: str):
    tx = training.make_optimizer(ml_collections.ConfigDict(json.loads(optim_key)))
    return jax.jit(lambda hparams, rng: training.TrainState.create(model, tx, hparams, rng))


@functools.lru_cache(maxsize=16)
def _chunk_program(model, optim_key: str, batch_size: int, n_steps: int, mesh, members: bool,
                   loss_fn):
    tx = training.make_optimizer(ml_collections.ConfigDict(json.loads(optim_key)))
    make = training.make_member_chunk if members else training.make_train_chunk
    return make(model, tx, batch_size, n_steps, mesh, loss_fn)


def _host(metrics, n_members: int | None = None) -> dict:
    """Chunk metrics on the host: floats for one run, lists (one per member, padding
    dropped) for several."""
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v[:n_members]]
    return out


def fit(config: ml_collections.ConfigDict, workdir: str, model: EnergyFlowModel,
        data: dict, make_policy: Callable[[Any], Any] | None = None, *,
        members: Sequence[MemberRun] | None = None, member_devices: int = 0,
        loss_fn: training.LossFn = dsm.dsm_loss,
        on_chunk: Callable[[int], None] | None = None) -> tuple[training.TrainState, dict]:
    """Train (or resume) to config.optim.total_steps; returns (state, info).

    The one run loop: chunks of `train.steps_per_chunk` jitted steps, with
    metrics (DIR/metrics.jsonl, TensorBoard), a progress bar, orbax checkpoints
    every `train.checkpoint_every_chunks` chunks and at the end, and resume from
    the latest checkpoint of DIR (refused if it was trained with other settings
    or data). DIR/status.json counts invocations and chunks trained.

    make_policy(ema_params) -> Policy: when given, each checkpoint also saves
    the policy (see `Policy.load`). members: train these runs together, the
    state stacked along a leading member axis sharded over up to
    `member_devices` devices (0: all), one vmapped program; metrics are then
    per-member lists. loss_fn: the objective (DSM by default).
    on_chunk(step) runs after each chunk and its checkpoint.

    A chunk's metrics are fetched after the next chunk is dispatched, so the
    host's logging overlaps the device's work; chunks that end in a checkpoint
    (whose state the next chunk would donate) or an on_chunk call are waited for.
    """
    validate_data(data)
    use_compilation_cache(config.train.get("compilation_cache_dir", ""))
    if members is not None and make_policy is not None:
        raise ValueError("fit saves a Policy for single runs only, not for stacked members")
    data_sha256 = run_dir.tree_fingerprint(data)
    if members is None:
        mesh = training.make_mesh(config.train.num_devices or None)
    else:
        mesh = training.member_mesh(len(members), member_devices)
    data = training.replicate(jax.tree.map(jnp.asarray, data), mesh)

    # Released and closed on any exit, a refused resume or an error mid-run included.
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(run_dir.workdir_lock(workdir))
        config_dict = config.to_dict()
        if members is not None:  # what the members differ in is part of what was trained
            config_dict["members"] = [{"seed": m.seed, "hparams": _hparams_dict(m.config)}
                                      for m in members]
        spec = run_dir.run_spec(config_dict, data_sha256)
        state = _init_state(config, model, members, mesh)
        state, start_step = run_dir.restore_verified(
            workdir, state, spec,
            may_change=run_dir.RESUME_MAY_CHANGE + (("sweep",) if members else ()))
        if members is None:
            real = lambda st: st
        else:  # padded to whole members per device; checkpoints and results drop the copies
            real = lambda st: jax.tree.map(lambda x: x[:len(members)], st)
            state = jax.device_put(training.pad_members(state, mesh),
                                   NamedSharding(mesh, P("member")))
        # Opened after the restore, which may have set bad checkpoints aside.
        manager = run_dir.checkpoint_manager(workdir, config.train.max_checkpoints)
        cleanup.callback(manager.close)
        total = config.optim.total_steps
        per_chunk = config.train.steps_per_chunk
        if start_step % per_chunk and start_step != total:
            raise RuntimeError(f"checkpoint step {start_step} is not a multiple of "
                               f"train.steps_per_chunk={per_chunk}; resume with the original config")
        writer = run_dir.MetricsWriter(workdir, config.log, config.to_dict(), resume_step=start_step)
        cleanup.callback(writer.close)
        status_path = os.path.join(workdir, "status.json")
        status = run_dir.read_json(status_path, {"chunks_trained": 0, "runs": 0})
        status.update(runs=status["runs"] + 1, step=start_step, total_steps=total)
        if run_dir.is_main_process():
            run_dir.write_json(status_path, status)
        chunk_fns = {}
        kill_after = int(os.environ.get(_KILL_AFTER_CHUNK, "0"))
        n_chunks = math.ceil(total / per_chunk)
        bar = tqdm(total=total, initial=start_step, desc="train", unit="step",
                   disable=not (config.log.progress and run_dir.is_main_process()))
        cleanup.callback(bar.close)
        # A finished run re-run trains nothing and reports its last logged metrics.
        finished = start_step >= total
        logged = ([m for m in run_dir.read_metrics(workdir) if m.get("step") == start_step]
                  if finished else [])
        metrics = {k: v for k, v in logged[-1].items() if k != "step"} if logged else {}
        if finished and members is None:
            _check_report_fingerprint(workdir, state)
        step = start_step
        n_real = None if members is None else len(members)
        t_last = time.perf_counter()

        def log(chunk_step: int, n: int, chunk_metrics) -> dict:
            """Fetch one chunk's metrics (waiting for it) and record them."""
            nonlocal t_last
            metrics = _host(chunk_metrics, n_real)
            now = time.perf_counter()
            metrics["steps_per_s"] = n / (now - t_last)  # between completions
            t_last = now
            loss = np.asarray(metrics["loss"])
            if not np.all(np.isfinite(loss)):
                # Non-finite steps are skipped by the optimizer; a non-finite mean
                # loss over a whole chunk still deserves a loud warning.
                tqdm.write(f"warning: non-finite mean loss in the chunk ending at step "
                           f"{chunk_step}")
            writer.write(chunk_step, metrics)
            bar.update(n)
            bar.set_postfix(loss=f"{float(np.mean(loss)):.4f}", sps=f"{metrics['steps_per_s']:.2f}")
            status.update(chunks_trained=status["chunks_trained"] + 1, step=chunk_step)
            if run_dir.is_main_process():
                run_dir.write_json(status_path, status)
            return metrics

        pending = None  # (step, n, metrics) of a dispatched chunk not yet logged
        for chunk_index in range(n_chunks if finished else start_step // per_chunk, n_chunks):
            n = min(per_chunk, total - step)
            if n not in chunk_fns:  # the last chunk may be shorter: a second program
                chunk_fns[n] = _chunk_program(model, _optim_key(config), config.train.batch_size,
                                              n, mesh, members is not None, loss_fn)
            state, chunk_metrics = chunk_fns[n](state, data)  # dispatched, runs on
            if pending is not None:  # the previous chunk's metrics, fetched while this one runs
                metrics = log(*pending)
            step += n
            pending = (step, n, chunk_metrics)
            last = chunk_index == n_chunks - 1
            checkpoint = last or (chunk_index + 1) % config.train.checkpoint_every_chunks == 0
            killed = kill_after and chunk_index + 1 == kill_after
            if not (checkpoint or killed or on_chunk is not None):
                continue  # the next dispatch donates this state: only unsaved chunks overlap
            metrics, pending = log(*pending), None
            if checkpoint:
                extra = make_policy(state.ema_params).checkpoint_args() if make_policy else None
                run_dir.save_checkpoint(manager, step, real(state), spec, extra)
                if members is not None:
                    manager.wait_until_finished()
            if on_chunk is not None:
                on_chunk(step)
            if killed:
                manager.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            t_last = time.perf_counter()  # the next chunk's rate leaves the save out
        manager.wait_until_finished()
    state = real(state)
    steps = np.asarray(jax.device_get(state.step))
    skipped = np.asarray(jax.device_get(state.n_skipped))
    info = {"final_metrics": metrics, "resumed_from_step": start_step,
            "steps": int(steps) if steps.ndim == 0 else steps.tolist(),
            "n_skipped_updates": int(skipped) if skipped.ndim == 0 else skipped.tolist(),
            "n_params": int(sum(x.size for x in jax.tree.leaves(state.params))
                            // (1 if members is None else len(members))),
            "devices": [str(d) for d in mesh.devices.flat],
            # how this process computed (may differ from the run's earlier invocations)
            "kernels": {"conv_impl": model.policy.conv,
                        "matmul_precision": model.policy.precision,
                        "backend": jax.default_backend()}}
    return state, info


def _check_report_fingerprint(workdir: str, state: training.TrainState) -> None:
    """A finished run re-run: its report must describe the parameters restored."""
    report = run_dir.read_json(os.path.join(workdir, "report.json"))
    if report is None or "ema_params_sha256" not in report:
        return
    found = run_dir.tree_fingerprint(jax.device_get(state.ema_params))
    if found != report["ema_params_sha256"]:
        raise run_dir.WorkdirError(
            f"{workdir}/report.json describes parameters with fingerprint "
            f"{report['ema_params_sha256'][:12]}..., but the checkpoint restored holds "
            f"{found[:12]}...: the report or the checkpoint was replaced or damaged. Use a "
            "fresh --workdir to retrain.")


def _hparams_dict(member_config) -> dict:
    h = training.HParams.from_config(member_config)
    return {"learning_rate": float(h.learning_rate), "ema_decay": float(h.ema_decay),
            "sigma_min": float(h.schedule.sigma_min), "sigma_max": float(h.schedule.sigma_max)}


def write_report(workdir: str, config, state: training.TrainState, info: dict,
                 wall_time_s: float, **extra) -> dict:
    report = {"config": config.to_dict(), **info,
              "ema_params_sha256": run_dir.tree_fingerprint(state.ema_params),
              "wall_time_s": wall_time_s, **extra}
    if run_dir.is_main_process():
        run_dir.write_json(os.path.join(workdir, "report.json"), report)
    return report
