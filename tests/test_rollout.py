"""The environment-agnostic rollout, the BatchedEnv protocol and env worker processes."""

import chex
import numpy as np
import pytest

from energyflow_jax.envs.base import BatchedEnv, StepResult
from energyflow_jax.envs.workers import (
    SubprocessBatchedEnv,
    WorkerError,
    make_batched_env,
)
from energyflow_jax.evaluation import metaworld_eval as me
from energyflow_jax.evaluation.rollout import rollout

SPEED = 0.5  # the point moves SPEED * action per step


class PointEnv:
    """A 1-D point that must reach x = 0. Layout i starts at x = i; obs = (x, i).

    Success at a step whose result is x == 0 exactly (halves are exact in floats).
    Reward -|x|. Stepping an inactive slot, or past max_steps, is an error.
    """

    def __init__(self, num_envs: int, max_steps: int = 50, fail_layout: int | None = None):
        self._n, self._max_steps, self.fail_layout = num_envs, max_steps, fail_layout
        self.x = np.zeros(num_envs)
        self.layout = np.zeros(num_envs)
        self.t = np.zeros(num_envs, np.int64)

    num_envs = property(lambda self: self._n)
    obs_dim = property(lambda self: 2)
    action_dim = property(lambda self: 1)
    max_steps = property(lambda self: self._max_steps)

    def _obs(self):
        return np.stack([self.x, self.layout], axis=1)

    def reset(self, layout_ids):
        for slot, layout in enumerate(layout_ids):
            if layout == self.fail_layout:
                raise RuntimeError(f"cannot reset to layout {layout}")
            self.x[slot] = self.layout[slot] = layout
            self.t[slot] = 0
        return self._obs()[:len(layout_ids)], [{"start": float(i)} for i in layout_ids]

    def step(self, actions, active):
        chex.assert_shape(actions, (self._n, 1))
        assert not np.any(self.t[active] >= self._max_steps), "stepped past max_steps"
        self.x[active] += SPEED * np.clip(actions[active, 0], -1, 1)
        self.t[active] += 1
        obs = self._obs()
        obs[~active] = np.nan  # unspecified rows: the rollout must not read them
        return StepResult(obs, -np.abs(self.x), active & (self.x == 0.0))

    def close(self):
        pass


def point_factory(num_envs):
    return PointEnv(num_envs, max_steps=50, fail_layout=99)


class GoToZero:
    """Full speed toward 0 (a = clip(-x / SPEED)), the same action over the whole chunk."""

    def __init__(self, pred_horizon=5):
        self.pred_horizon, self.inputs = pred_horizon, []

    def __call__(self, history):
        self.inputs.append(history.copy())
        a = np.clip(-history[:, -1, 0] / SPEED, -1, 1)
        return np.repeat(a[:, None, None], self.pred_horizon, axis=1)


def test_point_env_is_a_batched_env():
    assert isinstance(PointEnv(2), BatchedEnv)


def test_rollout_known_successes_and_steps():
    # Layout i >= 1 needs exactly 2i steps at full speed; layout 0 succeeds at its first
    # step (action 0 keeps x = 0). With max_steps 7 layouts 4 and 5 are out of reach.
    layouts = [0, 1, 2, 3, 4, 5]
    policy = GoToZero()
    env = PointEnv(num_envs=4)
    out = rollout(env, policy, layouts, obs_horizon=2, exec_horizon=3, max_steps=7, n_record=2)
    chex.assert_shape([out.success, out.steps, out.returns], (6,))
    chex.assert_shape(out.final_obs, (6, 2))
    np.testing.assert_array_equal(out.success, [True, True, True, True, False, False])
    np.testing.assert_array_equal(out.steps, [1, 2, 4, 6, 7, 7])
    np.testing.assert_array_equal(out.final_obs[:, 0], [0, 0, 0, 0, 4 - 3.5, 5 - 3.5])
    np.testing.assert_array_equal(out.final_obs[:, 1], layouts)
    np.testing.assert_allclose(out.returns[:3], [0.0, -0.5, -(1.5 + 1 + 0.5)])
    assert [info["start"] for info in out.reset_infos] == layouts
    assert out.env_steps == 1 + 2 + 4 + 6 + 7 + 7
    # Two waves (4 + 2 episodes): ceil(6 / 3) + ceil(7 / 3) replans, each one call for all slots.
    assert out.n_policy_calls == len(policy.inputs) == 2 + 3
    chex.assert_shape(policy.inputs, (4, 2, 2))
    assert all(batch.dtype == np.float32 for batch in policy.inputs)
    # Start padding: the first history of each wave repeats the first observation...
    np.testing.assert_array_equal(policy.inputs[0][:, 0], policy.inputs[0][:, 1])
    np.testing.assert_array_equal(policy.inputs[0][:, 1, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(policy.inputs[2][:, 1, 0], [4, 5, 4, 4])  # spare rows copy row 0
    # ...later histories hold the two newest observations, and finished slots keep theirs.
    np.testing.assert_array_equal(policy.inputs[1][:, :, 0], [[0, 0], [0.5, 0], [1, 0.5], [2, 1.5]])
    # Trajectories of the first n_record episodes: first obs, then one per step.
    assert sorted(out.trajectories) == [0, 1]
    np.testing.assert_array_equal(out.trajectories[1][:, 0], [1, 0.5, 0])


def test_rollout_to_the_horizon_counts_any_success():
    # stop_at_success=False (SAC's fixed-horizon evaluation): every episode runs max_steps
    # steps and succeeds if any step did; replanning every step, GoToZero stays at 0.
    out = rollout(PointEnv(num_envs=4), GoToZero(), [0, 1, 2, 3, 4, 5], obs_horizon=2,
                  exec_horizon=1, max_steps=7, stop_at_success=False)
    np.testing.assert_array_equal(out.success, [True, True, True, True, False, False])
    np.testing.assert_array_equal(out.steps, [7] * 6)
    assert out.env_steps == 42
    np.testing.assert_allclose(out.returns[:4], [0.0, -0.5, -(1.5 + 1 + 0.5), -7.5])


def test_rollout_checks_the_policy_output():
    env = PointEnv(num_envs=2)
    with pytest.raises(ValueError, match=r"expected \(2, pred_horizon >= exec_horizon=4, 1\)"):
        rollout(env, lambda h: np.zeros((2, 3, 1)), [1, 2], 2, 4, 10)
    with pytest.raises(ValueError, match="non-finite"):
        rollout(env, lambda h: np.full((2, 4, 1), np.nan), [1, 2], 2, 4, 10)
    with pytest.raises(ValueError, match="max_steps"):
        rollout(env, GoToZero(), [1], 2, 4, env.max_steps + 1)


def test_workers_equal_in_process_on_the_fake_env():
    # Slots (0, 1) run in worker 0 and slot 2 in worker 1.
    layouts = list(range(7))
    kwargs = {"obs_horizon": 3, "exec_horizon": 2, "max_steps": 9, "n_record": 7}
    local = rollout(make_batched_env(point_factory, 3, num_workers=0), GoToZero(), layouts, **kwargs)
    env = make_batched_env(point_factory, 3, num_workers=2)
    try:
        assert isinstance(env, SubprocessBatchedEnv) and env.num_workers == 2
        assert (env.num_envs, env.obs_dim, env.action_dim, env.max_steps) == (3, 2, 1, 50)
        remote = rollout(env, GoToZero(), layouts, **kwargs)
        # A worker's exception reaches the parent with its traceback; the worker lives on.
        with pytest.raises(WorkerError, match="cannot reset to layout 99"):
            env.reset([0, 1, 99])
        np.testing.assert_array_equal(env.reset([4, 5, 6])[0][:, 0], [4, 5, 6])
    finally:
        env.close()
    for name in ("success", "steps", "returns", "final_obs"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(local, name), err_msg=name)
    assert remote.reset_infos == local.reset_infos and remote.n_policy_calls == local.n_policy_calls
    for e in layouts:
        np.testing.assert_array_equal(remote.trajectories[e], local.trajectories[e])


@pytest.mark.slow
def test_metaworld_workers_equal_in_process():
    task, n, max_steps = "button-press-v3", 4, 30
    spec = me.eval_env_spec(task, n_episodes=n, seed=0, max_steps=max_steps, perturbation="S")
    outs = []
    for num_workers in (0, 2):
        env = make_batched_env(spec, n, num_workers)
        try:
            outs.append(rollout(env, me.make_random_policy_fn(pred_horizon=8, seed=1), list(range(n)),
                                obs_horizon=2, exec_horizon=8, max_steps=max_steps, n_record=n))
        finally:
            env.close()
    local, remote = outs
    chex.assert_shape(local.final_obs, (n, 39))
    assert local.steps.tolist() == [max_steps] * n  # random actions do not press the button
    for name in ("success", "steps", "returns", "final_obs"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(local, name), err_msg=name)
    assert remote.reset_infos == local.reset_infos
    for e in range(n):
        np.testing.assert_array_equal(remote.trajectories[e], local.trajectories[e])
    # evaluate() itself: same episodes either way (the expert succeeds within budget).
    results = [me.evaluate(me.make_expert_policy_fn(task), task, n_episodes=n, seed=0, exec_horizon=4,
                           max_steps=80, num_workers=w) for w in (0, 2)]
    assert results[0]["episodes"] == results[1]["episodes"]
    assert results[0]["n_successes"] == results[1]["n_successes"] >= 3
