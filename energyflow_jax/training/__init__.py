"""Train state (state.py), the one scan body (step.py) and the one run loop (loop.py)."""
from energyflow_jax.training.state import (HParams, TrainState, ema_decay_at, make_optimizer,
                                           strong_types)
from energyflow_jax.training.step import (LossFn, make_member_chunk, make_mesh, make_run_steps,
                                          make_train, make_train_chunk, member_mesh, pad_members,
                                          replicate,
                                          sample_batch, stack, train_step, unstack)

__all__ = ["LossFn", "HParams", "TrainState", "ema_decay_at", "make_optimizer", "strong_types",
           "make_member_chunk", "make_mesh", "make_run_steps", "make_train", "make_train_chunk",
           "member_mesh", "pad_members", "replicate", "sample_batch", "stack", "train_step", "unstack"]
