"""SAC on Meta-World v3 with a learned-energy (or environment / adversarial) reward.

  python -m energyflow_jax.main --config=sweeps/sac.py --workdir=runs/sac            # CPU-sized
  python -m energyflow_jax.main --config=sweeps/sac.py --workdir=runs/sac \
      --config.reward.kinds="('sparse','dense','raw','centered','centered+sparse','adversarial')"
  python -m energyflow_jax.main --config=sweeps/sac.py:long --workdir=runs/sac_long  # GPU / long CPU
  python -m energyflow_jax.main --config=sweeps/sac.py:table --workdir=runs/sac_table # the verdict
  python -m energyflow_jax.main --config=sweeps/sac.py:tiny --workdir=/tmp/sac       # seconds

Reward kinds (energyflow_jax/rewards/energy.py): sparse, dense (the env's shaped reward, the
oracle), raw (-E), centered (-E + mean of E at 16 reference actions), advantage (-E + E of
the reward model's own action), raw+sparse, centered+sparse, adversarial (a GAIL-style
discriminator logit learned during SAC). Every kind is scaled by one rule (1 / std over
demo and random-policy transitions) and gated before RL (reward_quality.json).
Several kinds in one invocation share the demos and the reward model and produce one
table (results.md) and one plot (curves.png).

Presets:
  default  CPU-sized: button-press-v3, 3 seeds, 2 envs in lockstep, 200-step episodes,
           12k env steps per seed (sized for a 2-core CPU); reward model = the
           Meta-World default MLP energy (lr 2e-3).
  long     1M env steps per seed, 500-step episodes, 10 eval episodes: GPU or a long
           CPU run.
  table    the reward comparison with a verdict (README): every kind, 5 seeds, on the
           calibrated task; each kind's seeds are one vmapped program, the 7 programs
           spread over 2 worker processes.
  tiny     seconds, for tests.

Results of these commands:
docs/results.md.
"""
import ml_collections

from energyflow_jax.rewards import adversarial
from energyflow_jax.config import base_config, select_preset
from energyflow_jax.rl.sac import agent as sac


def reward_model_config() -> ml_collections.ConfigDict:
    """The energy reward model: sweeps/metaworld.py's CPU MLP with pred_horizon = 1."""
    c = base_config()
    c.experiment = "reward_model"
    c.model.arch = "mlp"
    c.model.mlp_dims = (256, 256, 256)
    c.model.head_dims = (128,)
    c.model.state_emb_dim = 64
    c.model.time_emb_dim = 64
    c.data.obs_horizon = 2
    c.data.pred_horizon = 1  # one action per chunk: what SAC scores (rewards/energy.py)
    c.data.exec_horizon = 1
    # Small models learn DSM slowly at the published lr 1e-4; 2e-3 escapes the plateau.
    c.optim.learning_rate = 2e-3
    c.optim.total_steps = 3000
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.train.steps_per_chunk = 250
    c.train.checkpoint_every_chunks = 4
    c.log.tensorboard = False
    return c


def _default(c):
    pass  # get_config's values are the CPU-sized default


def _long(c):
    c.sac.hidden_dims = (256, 256)
    c.sac.batch_size = 256
    c.max_episode_steps = 500
    c.sac.total_env_steps = 1_000_000
    c.sac.warmup_env_steps = 10_000
    c.sac.eval_every = 20_000
    c.sac.eval_episodes = 10
    c.sac.log_every = 5_000
    c.sac.checkpoint_every = 50_000
    c.data.n_demos = 200
    c.data.n_heldout = 20
    c.reward_model.optim.total_steps = 20_000


def _tiny(c):
    c.max_episode_steps = 40
    c.seeds = (0,)
    c.data.n_demos = 6
    c.data.n_heldout = 2
    c.reward_model.model.mlp_dims = (64, 64)
    c.reward_model.model.head_dims = (32,)
    c.reward_model.model.state_emb_dim = 16
    c.reward_model.model.time_emb_dim = 16
    c.reward_model.optim.total_steps = 600  # the raw action box needs more steps than 300
    c.reward_model.optim.warmup_steps = 20
    c.reward_model.optim.ema_decay = 0.99
    c.reward_model.train.batch_size = 64
    c.reward_model.train.steps_per_chunk = 100
    c.reward_model.log.progress = False
    c.sac.hidden_dims = (32, 32)
    c.sac.batch_size = 32
    c.sac.total_env_steps = 160
    c.sac.warmup_env_steps = 40
    c.sac.log_every = 40
    c.sac.eval_every = 80
    c.sac.eval_episodes = 1
    c.sac.checkpoint_every = 80
    c.sac.replay_capacity = 1000
    c.reward.adversarial.hidden_dims = (32, 32)
    c.reward.adversarial.batch_size = 32
    c.quality.n_random_episodes = 2
    c.quality.n_alternatives = 8
    c.quality.n_gate_episodes = 1
    c.reward.n_sample_steps = 4
    c.data.steps_after_success = 5
    c.log.progress = False


TABLE_KINDS = ("sparse", "dense", "raw", "centered", "advantage", "centered+sparse",
               "adversarial")


def _table(c):
    # The task and budget where dense SAC succeeds and sparse SAC mostly does not on two
    # CPU cores, over 5 seeds (calibration: docs/results.md), so the kinds can separate.
    c.task = "coffee-button-v3"
    c.reward.kinds = TABLE_KINDS
    c.seeds = (0, 1, 2, 3, 4)
    c.num_workers = 2
    c.sac.total_env_steps = 24_000
    c.sac.eval_every = 6_000
    c.sac.eval_episodes = 20
    c.sac.checkpoint_every = 6_000


PRESETS = {"default": _default, "long": _long, "tiny": _tiny, "table": _table}


def get_config(preset=None):
    c = ml_collections.ConfigDict()
    c.experiment = "sac"
    c.task = "button-press-v3"
    c.seeds = (0, 1, 2)           # () -> (sac.seed,)
    c.num_envs = 2                # envs stepped in lockstep per seed
    c.vmap_seeds = 0              # seeds of a kind trained as one vmapped program (0: all)
    c.num_workers = 1             # > 1: the (kind, seed group) runs spread over spawned processes
    c.max_episode_steps = 200     # the expert needs 54-128 steps on button-press

    c.reward = ml_collections.ConfigDict(dict(
        kind="centered+sparse",
        kinds=(),                 # several variants in one invocation (overrides kind)
        gamma=1e-3,               # diffusion time at which the energy is read
        num_reference=16,         # reference actions of the centered reward
        reference_seed=0,
        success_weight=1.0,       # the "+sparse" bonus, relative to the unit-std reward term
        scale_rule="std",         # "std": each term / its std over demos + random steps; "none"
        n_sample_steps=20,        # PF-ODE steps of the advantage reward's a_hat(s)
        # Reward inputs (energy model and discriminator alike): observation std floor, and
        # the action space ("box": raw [-1, 1]; "standardized": std floored at action_min_std).
        obs_min_std=0.1,
        action_space="box",
        action_min_std=0.2,
        model_dir="",             # "" -> <workdir>/reward_model; else a shared model
    ))
    c.reward.adversarial = adversarial.default_config()
    c.reward_model = reward_model_config()

    c.data = ml_collections.ConfigDict(dict(
        n_demos=50,               # the last n_heldout are held out for reward_quality.json
        n_heldout=5,
        demo_seed=0,
        max_steps=500,            # the expert's step budget per demo
        steps_after_success=50,   # the expert goes on this long after its first success
        cache_dir="",             # "" -> <workdir>/demos
    ))
    c.quality = ml_collections.ConfigDict(dict(
        n_alternatives=16,        # perturbed / random actions per held-out expert state
        noise_scale=0.3,          # std of the Gaussian perturbation (actions in [-1, 1])
        n_random_episodes=5,      # random-policy trajectories (dense correlation, scales)
        seed=0,
        # Gates (rewards/gates.py): reference policies on n_gate_episodes shared layouts.
        n_gate_episodes=5,
        gate_noise_scales=(0.1, 0.3, 0.6),
        gate_delay=30,
        gate_xyz_accuracy=0.75,
        gate_kendall_tau=0.5,
    ))

    c.sac = sac.default_config()
    c.sac.critic_layer_norm = True
    # CPU-sized: ~50-100 env steps/s with 2 shared cores at (256, 256) / batch 256.
    c.sac.hidden_dims = (128, 128)
    c.sac.batch_size = 128
    c.sac.total_env_steps = 12_000
    c.sac.warmup_env_steps = 2_000
    c.sac.replay_capacity = 100_000
    c.sac.log_every = 1_000
    c.sac.eval_every = 2_000
    c.sac.eval_episodes = 5
    c.sac.checkpoint_every = 10_000

    c.log = ml_collections.ConfigDict(dict(progress=True))
    return select_preset(c, PRESETS, preset)
