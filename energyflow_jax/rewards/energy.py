"""Rewards for RL from a learned energy, plus the environment's own rewards.

Energy rewards
--------------
Under max-entropy optimality the energy is E(a, s) = -Q*(s, a) / alpha + c(s): within
one state it ranks actions exactly, but the state-only offset c(s) is arbitrary, so raw
energies are not comparable across states.

* raw:      r(s, a) = -E(a, s, gamma)
* centered: r(s, a) = -(E(a, s, gamma) - mean_m E(a'_m, s, gamma)),  a'_m ~ N(0, I)
  drawn once (M = 16 fixed actions in raw action space, normalized like any action;
  the reward model's action space is the raw [-1, 1] box by default, where this is the
  paper's definition). The offset c(s) appears in both terms and cancels, so the
  centered reward is invariant to it.
* advantage: r(s, a) = -(E(a, s, gamma) - E(a_hat(s), s, gamma)), a_hat(s) the reward
  model's own probability-flow-ODE sample started from the prior's mode (a_T = 0, so
  a_hat is a deterministic function of s). The baseline is the energy of an action the
  model itself would take, so r = Q*(s, a)/alpha - Q*(s, a_hat)/alpha: an advantage, and
  the state-only part it subtracts is potential-based shaping of the hidden reward,
  while centered's b(s) (an average over N(0, I) actions) is not.

gamma (default 1e-3) is the diffusion time at which the energy is read.

One action versus a chunk
-------------------------
SAC acts one step at a time, the energy scores chunks of `pred_horizon` actions. Our
choice: the reward model is a separate energy model trained on the same demos with
pred_horizon = 1 (obs_horizon as configured), so a single action *is* a chunk of length
one. Scoring a single action with a 16-step model would need the 15 future actions the
policy has not chosen yet; padding or marginalizing them would put guesses into the
reward. `make_reward_fn` therefore refuses energy models with pred_horizon != 1.

Inputs
------
Every reward reads a batch of `RewardInputs`: the raw observation history ending at s_t
(padded at episode start by repeating the first observation, as the training windows
are), the raw environment action a_t, the environment's reward and its success flag.
Energy rewards normalize observations and actions with the caller's normalizers (the
ones the reward model was trained with) before calling the energy.

Reward objects
--------------
`make_reward_fn` returns a `Reward`: a pytree whose leaves are the arrays it needs
(energy parameters, reference chunks), so a jitted training step can take it as an
argument instead of baking millions of parameters into the compiled program as
constants. Calling `reward(inputs)` gives one reward per transition, shape (B,).
Kind "adversarial" returns a learned reward (see `energyflow_jax.rewards.adversarial`) that the SAC
loop keeps updating; it follows the `LearnedReward` protocol below.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from scipy import stats

from energyflow_jax.objectives import dsm
from energyflow_jax.rewards import adversarial
from energyflow_jax.rewards.inputs import RewardInputs

EnergyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (a, s, t) -> (B,)
Normalizer = Callable[[jax.Array], jax.Array]

REWARD_KINDS = ("sparse", "dense", "raw", "centered", "advantage", "raw+sparse",
                "centered+sparse", "adversarial")
ENERGY_KINDS = ("raw", "centered", "advantage", "raw+sparse", "centered+sparse")


# --------------------------------------------------------------------------- energies


def raw_energy_reward(energy_fn: EnergyFn, s: jax.Array, a: jax.Array,
                      gamma: float = 1e-3) -> jax.Array:
    """-E(a, s, gamma); s (B, obs_horizon, obs_dim), a (B, pred_horizon, act_dim)."""
    t = jnp.full((a.shape[0],), gamma, dtype=a.dtype)
    return -energy_fn(a, s, t)


def centered_energy_reward(energy_fn: EnergyFn, s: jax.Array, a: jax.Array,
                           ref_actions: jax.Array, gamma: float = 1e-3) -> jax.Array:
    """-(E(a, s, gamma) - mean_m E(ref_m, s, gamma)); ref_actions (M, pred_horizon, act_dim).

    The M reference chunks are scored in every state of the batch in one call of size
    B * M, so the energy sees one flat batch.
    """
    batch, num_ref = a.shape[0], ref_actions.shape[0]
    s_rep = jnp.repeat(s, num_ref, axis=0)  # (B*M, ...): state b repeated M times
    ref_rep = jnp.tile(ref_actions, (batch, 1, 1))  # (B*M, ...): refs 0..M-1 per state
    baseline = raw_energy_reward(energy_fn, s_rep, ref_rep, gamma).reshape(batch, num_ref)
    return raw_energy_reward(energy_fn, s, a, gamma) - baseline.mean(axis=1)


def make_reference_actions(rng: jax.Array, num_reference: int, pred_horizon: int,
                           act_dim: int) -> jax.Array:
    """M fixed reference chunks a'_m ~ N(0, I) in raw action space."""
    return jax.random.normal(rng, (num_reference, pred_horizon, act_dim))


def model_action(energy_fn: EnergyFn, s: jax.Array, like: jax.Array, schedule: dsm.VESchedule,
                 n_steps: int = 20, gamma: float = 1e-3) -> jax.Array:
    """a_hat(s): the PF-ODE sample of the energy's field from a_T = 0, shape of `like`."""
    def score(a, k, t):
        return -jax.grad(lambda a_: energy_fn(a_, s, jnp.full((a_.shape[0],), t)).sum())(a)

    return dsm.integrate_pf_ode(score, jnp.zeros_like(like), schedule, n_steps, gamma)


def advantage_energy_reward(energy_fn: EnergyFn, s: jax.Array, a: jax.Array,
                            schedule: dsm.VESchedule, n_steps: int = 20,
                            gamma: float = 1e-3) -> jax.Array:
    """-(E(a, s, gamma) - E(a_hat(s), s, gamma)); zero at the model's own action."""
    a_hat = jax.lax.stop_gradient(model_action(energy_fn, s, a, schedule, n_steps, gamma))
    return raw_energy_reward(energy_fn, s, a, gamma) - raw_energy_reward(energy_fn, s, a_hat, gamma)


# ------------------------------------------------------------------ environment rewards


def sparse_reward(inputs: RewardInputs) -> jax.Array:
    """1 on success, else 0."""
    return inputs.success.astype(jnp.float32)


def dense_reward(inputs: RewardInputs) -> jax.Array:
    """The environment's own shaped reward: the oracle the energy rewards are compared to."""
    return inputs.env_reward.astype(jnp.float32)


def with_success_bonus(reward_fn: Callable[[RewardInputs], jax.Array],
                       weight: float = 1.0) -> Callable[[RewardInputs], jax.Array]:
    """r(s, a) + weight * success."""

    def reward(inputs: RewardInputs) -> jax.Array:
        return reward_fn(inputs) + weight * sparse_reward(inputs)

    return reward


# ----------------------------------------------------------------------- reward objects


class _ByIdentity:
    """Hashable-by-identity wrapper so arbitrary callables can sit in a pytree's treedef."""

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value


def _split_partial(energy_fn: EnergyFn) -> tuple[Callable, Any]:
    """partial(model.energy, params) -> (model.energy, (args, kwargs)) so params can be traced."""
    if isinstance(energy_fn, functools.partial):
        return energy_fn.func, (energy_fn.args, dict(energy_fn.keywords))
    return energy_fn, ((), {})


class Reward(struct.PyTreeNode):
    """A fixed per-transition reward, callable on `RewardInputs` -> (B,).

    `params` holds every array the reward needs; `compute(params, inputs)` is pure. The
    declared shapes (None = any) let the SAC loop refuse a mismatched reward model early.
    """

    params: Any
    compute: _ByIdentity = struct.field(pytree_node=False)
    kind: str = struct.field(pytree_node=False)
    obs_dim: int | None = struct.field(pytree_node=False, default=None)
    act_dim: int | None = struct.field(pytree_node=False, default=None)
    obs_horizon: int = struct.field(pytree_node=False, default=1)

    def __call__(self, inputs: RewardInputs) -> jax.Array:
        return self.compute.value(self.params, inputs)


@runtime_checkable
class LearnedReward(Protocol):
    """A reward with state that is trained during RL (e.g. an adversarial discriminator).

    The SAC loop stores `RewardInputs` in replay and, inside each gradient step, calls
    `update` on the sampled policy transitions, then relabels the batch with `reward`.
    All three methods must be pure and jit-able; `state` is checkpointed with the agent.
    """

    kind: str
    obs_dim: int | None
    act_dim: int | None
    obs_horizon: int

    def init(self, rng: jax.Array) -> Any: ...

    def reward(self, state: Any, inputs: RewardInputs) -> jax.Array: ...

    def update(self, state: Any, policy_inputs: RewardInputs,
               rng: jax.Array) -> tuple[Any, dict]: ...


def make_reward_fn(
    kind: str,
    *,
    energy_fn: EnergyFn | None = None,
    obs_dim: int | None = None,
    act_dim: int | None = None,
    obs_horizon: int = 1,
    pred_horizon: int = 1,
    gamma: float = 1e-3,
    num_reference: int = 16,
    reference_rng: jax.Array | None = None,
    success_weight: float = 1.0,
    scale: float = 1.0,
    obs_normalizer: Normalizer | None = None,
    action_normalizer: Normalizer | None = None,
    expert_inputs: RewardInputs | None = None,
    adversarial_config: Any = None,
    schedule: dsm.VESchedule | None = None,
    n_sample_steps: int = 20,
) -> Reward | LearnedReward:
    """Builds a reward of one of REWARD_KINDS.

    Energy kinds ("raw", "centered", "advantage" and the "+sparse" variants) need
    `energy_fn` (a, s, t) -> (B,) from a model trained with pred_horizon = 1, its obs/act
    dims and obs_horizon, and the normalizers it was trained with (identity if None);
    "advantage" also the model's diffusion `schedule` (its sampler runs n_sample_steps).
    "adversarial" needs `expert_inputs` and returns `adversarial.AdversarialReward`, whose
    features use the same normalizers.
    `scale` multiplies the kind's own term, `success_weight` the "+sparse" bonus: the
    experiment sets both by one rule (1 / std over demo and random-policy transitions).
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {REWARD_KINDS}")

    if kind == "adversarial":
        if expert_inputs is None:
            raise ValueError("reward kind 'adversarial' needs expert_inputs")
        return adversarial.AdversarialReward.from_expert(
            expert_inputs, adversarial_config, obs_normalizer=obs_normalizer,
            action_normalizer=action_normalizer)

    if kind in ("sparse", "dense"):
        fn = sparse_reward if kind == "sparse" else dense_reward
        return Reward(params=(), compute=_ByIdentity(lambda _, inputs: scale * fn(inputs)),
                      kind=kind, obs_horizon=obs_horizon)

    if energy_fn is None:
        raise ValueError(f"reward kind {kind!r} needs an energy_fn")
    if pred_horizon != 1:
        raise ValueError(
            f"energy rewards need a reward model trained with pred_horizon=1 (got "
            f"{pred_horizon}): SAC scores one action at a time, and a longer chunk would "
            "need future actions the policy has not chosen")
    if obs_dim is None or act_dim is None:
        raise ValueError("energy rewards need the reward model's obs_dim and act_dim")
    if kind == "advantage" and schedule is None:
        raise ValueError("reward kind 'advantage' needs the reward model's diffusion schedule")

    energy_func, energy_args = _split_partial(energy_fn)
    norm_obs = obs_normalizer.normalize if obs_normalizer is not None else (lambda x: x)
    norm_act = action_normalizer.normalize if action_normalizer is not None else (lambda x: x)
    centered = kind.startswith("centered")
    bonus = success_weight if kind.endswith("+sparse") else 0.0
    if centered:
        if reference_rng is None:
            reference_rng = jax.random.PRNGKey(0)
        refs = make_reference_actions(reference_rng, num_reference, 1, act_dim)
    else:
        refs = jnp.zeros((0, 1, act_dim))

    def compute(params, inputs: RewardInputs) -> jax.Array:
        (args, kwargs), ref_actions = params
        energy = functools.partial(energy_func, *args, **kwargs)
        s = norm_obs(inputs.obs.astype(jnp.float32))
        a = norm_act(inputs.action.astype(jnp.float32))[:, None, :]  # chunk of length one
        if centered:
            ref_model = norm_act(ref_actions)  # raw-space references, normalized as actions are
            r = centered_energy_reward(energy, s, a, ref_model, gamma)
        elif kind == "advantage":
            r = advantage_energy_reward(energy, s, a, schedule, n_sample_steps, gamma)
        else:
            r = raw_energy_reward(energy, s, a, gamma)
        return scale * r + bonus * sparse_reward(inputs)

    return Reward(params=(energy_args, refs), compute=_ByIdentity(compute), kind=kind,
                  obs_dim=obs_dim, act_dim=act_dim, obs_horizon=obs_horizon)


def reward_obs_horizon(reward: Reward | LearnedReward) -> int:
    return int(getattr(reward, "obs_horizon", 1))


def check_reward_compatibility(reward: Reward | LearnedReward, obs_dim: int,
                               act_dim: int) -> None:
    """Raises ValueError if `reward` cannot score this environment's transitions.

    Checks the declared dims, then traces the reward (no FLOPs, `jax.eval_shape`) on
    inputs shaped like the environment's, which also catches a model whose layers were
    built for other shapes.
    """
    kind = getattr(reward, "kind", type(reward).__name__)
    for name, declared, actual in (("obs_dim", getattr(reward, "obs_dim", None), obs_dim),
                                   ("act_dim", getattr(reward, "act_dim", None), act_dim)):
        if declared is not None and declared != actual:
            raise ValueError(
                f"reward {kind!r} was built for {name}={declared} but the environment has "
                f"{name}={actual}; train or load a reward model for this environment")
    horizon = reward_obs_horizon(reward)
    batch = 2
    dummy = RewardInputs(
        obs=jax.ShapeDtypeStruct((batch, horizon, obs_dim), jnp.float32),
        action=jax.ShapeDtypeStruct((batch, act_dim), jnp.float32),
        env_reward=jax.ShapeDtypeStruct((batch,), jnp.float32),
        success=jax.ShapeDtypeStruct((batch,), jnp.float32),
    )
    try:
        if isinstance(reward, LearnedReward):
            out = jax.eval_shape(lambda i: reward.reward(reward.init(jax.random.PRNGKey(0)), i),
                                 dummy)
        else:
            out = jax.eval_shape(reward, dummy)
    except Exception as err:  # any shape/type error from inside the model
        raise ValueError(
            f"reward {kind!r} cannot score transitions with obs_dim={obs_dim}, "
            f"act_dim={act_dim}, obs_horizon={horizon}: {type(err).__name__}: {err}") from err
    if out.shape != (batch,):
        raise ValueError(f"reward {kind!r} returned shape {out.shape} for a batch of "
                         f"{batch}; expected ({batch},)")


# ------------------------------------------------------------- reward quality without RL


def perturb_actions(rng: jax.Array, actions: jax.Array, num: int, noise_scale: float,
                    low: float = -1.0, high: float = 1.0) -> jax.Array:
    """(N, A) -> (N, num, A): Gaussian perturbations of each action, clipped to bounds."""
    noise = noise_scale * jax.random.normal(rng, (actions.shape[0], num, actions.shape[1]))
    return jnp.clip(actions[:, None, :] + noise, low, high)


def random_actions(rng: jax.Array, num_states: int, num: int, act_dim: int,
                   low: float = -1.0, high: float = 1.0) -> jax.Array:
    """(N, num, A) uniform random actions."""
    return jax.random.uniform(rng, (num_states, num, act_dim), minval=low, maxval=high)


def _correlation(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    """scipy's Pearson or Spearman (ties averaged); NaN where undefined
    (fewer than two points, or a constant input), without scipy's warning."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(x, y)[0])


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return _correlation("pearson", x, y)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _correlation("spearman", x, y)


def score_transitions(reward, inputs: RewardInputs) -> jax.Array:
    """reward(inputs) compiled once per reward structure: a `Reward`'s arrays are passed as
    arguments, not baked into the program; any other callable is jitted as a function."""
    if isinstance(reward, Reward):
        return _score_reward(reward, inputs)
    return jax.jit(reward)(inputs)


@jax.jit
def _score_reward(reward: Reward, inputs: RewardInputs) -> jax.Array:
    return reward(inputs)


def _rank_scores_of(reward, expert: RewardInputs, alternative_actions: jax.Array):
    """(r(expert) (N,), r(alternatives) (P, N)) in one program: one compile per reward
    and shape (the alternatives are mapped, not vmapped, to keep memory at one batch)."""
    def score_alternative(actions: jax.Array) -> jax.Array:  # (N, A) -> (N,)
        return reward(expert.replace(action=actions))

    return reward(expert), jax.lax.map(score_alternative, jnp.swapaxes(alternative_actions, 0, 1))


_rank_scores = jax.jit(_rank_scores_of)  # a Reward is a pytree: its arrays are arguments


def reward_quality(
    reward_fn: Callable[[RewardInputs], jax.Array],
    expert: RewardInputs,
    alternative_actions: jax.Array,
    trajectories: RewardInputs | None = None,
    episode_ids: np.ndarray | None = None,
) -> dict[str, float]:
    """How good a reward is, measured without RL.

    ranking_accuracy: over held-out expert states, the fraction of (state, alternative)
        pairs where the expert action scores above the alternative (ties count half).
        `alternative_actions` (N, P, act_dim): perturbed or random actions, same states.
    pearson / spearman: correlation of the reward with `trajectories.env_reward` over all
        given transitions (pooled), and, with `episode_ids`, the mean within-episode
        Spearman (the ordering along each trajectory, free of across-episode offsets).
    """
    if isinstance(reward_fn, Reward):  # pass its arrays as arguments, not as constants
        r_expert, r_alt = _rank_scores(reward_fn, expert, alternative_actions)
        reward_fn = functools.partial(_score_reward, reward_fn)
    else:
        r_expert, r_alt = jax.jit(functools.partial(_rank_scores_of, reward_fn))(
            expert, alternative_actions)
        reward_fn = jax.jit(reward_fn)
    wins = (r_expert[None] > r_alt).astype(jnp.float32) + 0.5 * (r_expert[None] == r_alt)
    out = {
        "ranking_accuracy": float(wins.mean()),
        "expert_reward_mean": float(r_expert.mean()),
        "alternative_reward_mean": float(r_alt.mean()),
    }
    if trajectories is not None:
        r = np.asarray(r_expert if trajectories is expert else reward_fn(trajectories), np.float64)
        dense = np.asarray(trajectories.env_reward, dtype=np.float64)
        out["pearson"] = _pearson(r, dense)
        out["spearman"] = _spearman(r, dense)
        if episode_ids is not None:
            episode_ids = np.asarray(episode_ids)
            per_episode = [_spearman(r[episode_ids == e], dense[episode_ids == e])
                           for e in np.unique(episode_ids)]
            defined = [x for x in per_episode if np.isfinite(x)]
            out["spearman_within_episode"] = float(np.mean(defined)) if defined else float("nan")
    return out
