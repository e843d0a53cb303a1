"""Train state (state.py), the one scan body (step.py) and the one run loop (loop.py)."""
from energyflow_jax.training.state import (HParams, TrainState, ema_decay_at, make_optimizer,
                                           strong_types)
from energyflow_jax.training.step import (make_mesh, make_train_chunk, replicate, sample_batch,
                                          train_step)

__all__ = ["HParams", "TrainState", "ema_decay_at", "make_optimizer", "strong_types",
           "make_mesh", "make_train_chunk", "replicate", "sample_batch", "train_step"]
