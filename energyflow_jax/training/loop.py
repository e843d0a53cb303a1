"""The training run: chunks of jitted steps, with logging, checkpoints and resume between.

`fit` is task-agnostic: it takes windows already as arrays and the model.
"""
from __future__ import annotations

import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from tqdm.auto import tqdm

from energyflow_jax import training
from energyflow_jax.io import run_dir
from energyflow_jax.models import EnergyFlowModel

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
        if not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr).all(axis=(1, 2)))[:5, 0].tolist()
            raise ValueError(f"data[{key!r}] contains NaN or inf (first bad windows: {bad})")
    if data["obs"].shape[0] != data["actions"].shape[0]:
        raise ValueError(f"obs and actions disagree on the number of windows: "
                         f"{data['obs'].shape[0]} vs {data['actions'].shape[0]}")


def fit(config: ml_collections.ConfigDict, workdir: str, model: EnergyFlowModel,
        data: dict) -> tuple[training.TrainState, dict]:
    """Train (or resume) to config.optim.total_steps; returns (state, info)."""
    validate_data(data)
    data_sha256 = run_dir.tree_fingerprint(data)
    mesh = training.make_mesh(config.train.num_devices or None)
    tx = training.make_optimizer(config.optim)
    state = training.TrainState.create(model, tx, training.HParams.from_config(config),
                                       jax.random.PRNGKey(config.seed))
    state = training.replicate(state, mesh)
    data = training.replicate(jax.tree.map(jnp.asarray, data), mesh)

    manager = run_dir.checkpoint_manager(workdir, config.train.max_checkpoints)
    run_dir.check_resume(workdir, config.to_dict(), data_sha256,
                        resuming=manager.latest_step() is not None)
    state, start_step = run_dir.restore_latest(manager, state)
    total = config.optim.total_steps
    per_chunk = config.train.steps_per_chunk
    if start_step % per_chunk and start_step != total:
        raise RuntimeError(f"checkpoint step {start_step} is not a multiple of "
                           f"train.steps_per_chunk={per_chunk}; resume with the original config")
    writer = run_dir.MetricsWriter(workdir, config.log, config.to_dict(), resume_step=start_step)
    chunk_fns = {}
    kill_after = int(os.environ.get(_KILL_AFTER_CHUNK, "0"))
    n_chunks = math.ceil(total / per_chunk)
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step",
               disable=not (config.log.progress and run_dir.is_main_process()))
    # A finished run re-run trains nothing and reports its last logged metrics.
    finished = start_step >= total
    logged = ([m for m in run_dir.read_metrics(workdir) if m.get("step") == start_step]
              if finished else [])
    metrics = {k: v for k, v in logged[-1].items() if k != "step"} if logged else {}
    step = start_step
    for chunk_index in range(n_chunks if finished else start_step // per_chunk, n_chunks):
        n = min(per_chunk, total - step)
        if n not in chunk_fns:  # the last chunk may be shorter: a second program
            chunk_fns[n] = training.make_train_chunk(model, tx, config.train.batch_size, n, mesh)
        t0 = time.perf_counter()
        state, chunk_metrics = chunk_fns[n](state, data)
        metrics = {k: float(v) for k, v in jax.device_get(chunk_metrics).items()}
        step += n
        metrics["steps_per_s"] = n / (time.perf_counter() - t0)
        if not math.isfinite(metrics["loss"]):
            # Non-finite steps are skipped by the optimizer; a non-finite mean
            # loss over a whole chunk still deserves a loud warning.
            tqdm.write(f"warning: non-finite mean loss in the chunk ending at step {step}")
        writer.write(step, metrics)
        bar.update(n)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['steps_per_s']:.2f}")
        last = chunk_index == n_chunks - 1
        if last or (chunk_index + 1) % config.train.checkpoint_every_chunks == 0:
            manager.save(step, args=run_dir.ocp.args.StandardSave(state))
        if kill_after and chunk_index + 1 == kill_after:
            manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    manager.wait_until_finished()
    writer.close()
    info = {"final_metrics": metrics, "resumed_from_step": start_step,
            "steps": int(jax.device_get(state.step)),
            "n_skipped_updates": int(jax.device_get(state.n_skipped)),
            "n_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
            "devices": [str(d) for d in mesh.devices.flat]}
    return state, info


def write_report(workdir: str, config, state: training.TrainState, info: dict,
                 wall_time_s: float, **extra) -> dict:
    report = {"config": config.to_dict(), **info,
              "ema_params_sha256": run_dir.tree_fingerprint(state.ema_params),
              "wall_time_s": wall_time_s, **extra}
    if run_dir.is_main_process():
        run_dir.write_json(os.path.join(workdir, "report.json"), report)
    return report
