"""Command line: python -m energyflow_jax.main --config=sweeps/<name>.py[:preset] --workdir=DIR

Overrides use ml_collections syntax, e.g. --config.optim.total_steps=500.
Re-running the same command resumes from DIR's latest checkpoint.
"""
from __future__ import annotations

import functools
import importlib
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from energyflow_jax import config as config_lib
from energyflow_jax import xla_cpu
from energyflow_jax.io import run_dir

# experiment name -> "module:function" taking (config, workdir) and returning the report.
EXPERIMENTS = {
    "toy": "energyflow_jax.experiments.toy:train_and_evaluate",
    "sweep": "energyflow_jax.sweep.runner:run",
    "metaworld": "energyflow_jax.experiments.imitation:train_and_evaluate",
    "robomimic": "energyflow_jax.experiments.imitation:train_and_evaluate",
    "capacity": "energyflow_jax.experiments.capacity:train_and_evaluate",
    "sac": "energyflow_jax.experiments.sac:train_and_evaluate",
}

# Where an experiment's report goes when it is not DIR/report.json.
REPORT_FILES = {"capacity": "capacity.json"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (sweeps/*.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> dict:
    if config.experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {config.experiment!r}; known: {sorted(EXPERIMENTS)}")
    module_name, fn_name = EXPERIMENTS[config.experiment].split(":")
    config_lib.validate(config)  # before the lock file or anything else is written
    module = importlib.import_module(module_name)
    check = getattr(module, "check", None)  # an experiment's own inputs (tasks, data files)
    if check is not None:
        try:
            check(config)
        except (ValueError, FileNotFoundError) as e:
            raise config_lib.ConfigError(str(e)) from e
    train_config = config.get("train")
    if train_config is not None and train_config.get("distributed", False):
        # Once per process, before any device is touched; a run may call fit()
        # several times (tasks x seeds).
        jax.distributed.initialize()
    # One process per workdir: a second one fails here, naming the first one's pid.
    with run_dir.workdir_lock(workdir):
        return getattr(module, fn_name)(config, workdir)


def _interrupted(workdir: str, signum, frame) -> None:
    """Ctrl-C: stop at once, as a kill would, with one line instead of tracebacks.

    Unwinding a KeyboardInterrupt through orbax's save threads and the
    evaluation workers can hang or print pages; stopping at once is as safe as
    SIGKILL, which resume is tested against: an unfinished checkpoint is never
    listed, files are replaced atomically, and a torn metrics line is dropped.
    """
    steps = run_dir.checkpoint_steps(workdir)
    where = f"step {steps[-1]}" if steps else "the start (no checkpoint yet)"
    print(f"\ninterrupted: re-run the same command to resume {workdir} from {where}",
          file=sys.stderr, flush=True)
    os._exit(130)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    signal.signal(signal.SIGINT, functools.partial(_interrupted, _WORKDIR.value))
    try:
        report = run(_CONFIG.value, _WORKDIR.value)
    except (config_lib.ConfigError, run_dir.WorkdirError) as e:
        # Input the user can fix: the message says how, a traceback would bury it.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = {k: v for k, v in report.items() if k not in ("config",)}
    report_file = REPORT_FILES.get(_CONFIG.value.experiment, "report.json")
    print(f"report: {os.path.join(_WORKDIR.value, report_file)}")
    for key in sorted(summary):
        if not isinstance(summary[key], (dict, list)):
            print(f"  {key}: {summary[key]}")


if __name__ == "__main__":
    xla_cpu.configure()  # before JAX starts its backend; the library itself sets nothing
    if not (os.environ.get("MUJOCO_GL") or os.environ.get("DISPLAY")):
        # Headless: MuJoCo's default (glfw) needs a display; EGL renders offscreen
        # (the rollout videos, energyflow_jax.evaluation.video). Read when mujoco is imported.
        os.environ["MUJOCO_GL"] = "egl"
    app.run(main)
