"""RoboMimic imitation (robosuite, low_dim observations), without torch.

  python -m energyflow_jax.main --config=sweeps/robomimic.py --workdir=runs/lift        # CPU-sized
  python -m energyflow_jax.main --config=sweeps/robomimic.py --workdir=runs/can \
      --config.task=can
  python -m energyflow_jax.main --config=sweeps/robomimic.py --workdir=runs/square \
      --config.task=square --config.data.path=/data/square/ph/low_dim_v15.hdf5
  python -m energyflow_jax.main --config=sweeps/robomimic.py:paper --workdir=runs/rm_paper
  python -m energyflow_jax.main --config=sweeps/robomimic.py:tiny --workdir=/tmp/rm   # seconds

Demos: with `data.path` empty, scripted experts (lift, can) write a file in the
official low_dim format under <workdir>/demos/ (energyflow_jax.data.robomimic_demos);
with `data.path`, an official file (any of the five tasks) is read instead, all demos
or `data.filter_key`'s (e.g. "train"). Evaluation: held-out layouts in the env the
file's env_args describe, the task's budget (400 or 700 steps).

Presets:
  default  CPU-sized: lift, MLP energy, 200 scripted demos, 30k steps, 4 actions
           executed per chunk, the lowest-energy of 8 sampled chunks.
  paper    the published recipe: U-Net (64,128,256), 100k steps, batch 256, lr 1e-4,
           EMA 0.9999, 3 training seeds, 50 rollouts; accelerator-sized.
  tiny     seconds, for tests.

Results of these commands: docs/results.md (RoboMimic).
"""
import ml_collections

from energyflow_jax.config import base_config, select_preset


def _default(c):
    """CPU-sized, as sweeps/metaworld.py's default: small models need lr 2e-3."""
    c.model.arch = "mlp"
    c.model.mlp_dims = (256, 256, 256)
    c.model.head_dims = (128,)
    c.model.state_emb_dim = 64
    c.model.time_emb_dim = 64
    c.optim.learning_rate = 2e-3
    c.optim.total_steps = 30_000
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.data.exec_horizon = 4
    # The energy picks among 8 sampled chunks: the grasp is where single samples fail.
    c.diffusion.n_candidates = 8
    c.train.steps_per_chunk = 250
    c.train.checkpoint_every_chunks = 4
    c.data.num_workers = 2
    c.eval.num_workers = 2


def _paper(c):
    """The published recipe (NOTES.md): base_config's network and optimizer as is."""
    c.seeds = (0, 1, 2)
    c.train.steps_per_chunk = 1000


def _tiny(c):
    """Seconds, for tests: three lift demos, a few steps, two short rollouts."""
    c.model.arch = "mlp"
    c.model.mlp_dims = (32, 32)
    c.model.head_dims = (16,)
    c.model.state_emb_dim = 8
    c.model.time_emb_dim = 8
    c.data.n_demos = 3
    c.diffusion.n_sample_steps = 4
    c.optim.total_steps = 20
    c.optim.warmup_steps = 5
    c.train.batch_size = 32
    c.train.steps_per_chunk = 10
    c.train.checkpoint_every_chunks = 2
    c.eval.n_episodes = 2
    c.eval.max_steps = 16
    c.eval.n_plot = 1
    c.eval.n_videos = 0
    c.log.tensorboard = False
    c.log.progress = False


PRESETS = {"default": _default, "paper": _paper, "tiny": _tiny}


def get_config(preset=None):
    c = base_config()
    c.experiment = "robomimic"
    c.task = "lift"               # lift | can | square | transport | tool_hang
    c.tasks = ()                  # several tasks in one invocation (overrides c.task)
    c.seeds = ()                  # training seeds; () means (c.seed,)
    c.data.path = ""              # an official low_dim hdf5; "" -> scripted demos (lift, can)
    c.data.filter_key = ""        # mask/<filter_key> of the file; "" -> every demo
    c.data.n_demos = 200          # scripted demos (ignored with data.path)
    c.data.demo_seed = 0          # layout stream of the scripted demos ("demo" split)
    c.data.cache_dir = ""         # "" -> <workdir>/demos
    c.data.num_workers = 0        # processes rolling out scripted demos; 0 -> this one
    c.eval = ml_collections.ConfigDict(dict(
        n_episodes=50,
        seeds=(0,),               # eval layout streams ("eval" split, disjoint from demos)
        max_steps=0,              # 0 -> the task's budget (400; 700 for transport, tool_hang)
        num_envs=0,               # envs stepped together; 0 -> all episodes at once
        num_workers=0,            # env worker processes; 0 -> step the envs in-process
        n_plot=3,                 # rollout plots of the first episodes (first eval seed)
        n_videos=1,               # rollout videos of the first episodes (needs MuJoCo GL)
    ))
    return select_preset(c, PRESETS, preset)
