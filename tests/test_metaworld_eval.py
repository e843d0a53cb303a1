"""Batched receding-horizon evaluation on Meta-World v3."""

import math
import os

import numpy as np
import pytest

from energyflow_jax.data import metaworld as md
from energyflow_jax.envs import metaworld as mwenv
from energyflow_jax.evaluation import metaworld_eval as me
from energyflow_jax.evaluation.statistics import pooled_success, wilson_interval

TASK = "button-press-v3"


class CountingPolicy:
    """Wraps a policy_fn and records every call's input batch."""

    def __init__(self, policy_fn):
        self.policy_fn = policy_fn
        self.inputs = []

    def __call__(self, obs_history):
        self.inputs.append(np.array(obs_history))
        return self.policy_fn(obs_history)


def test_expert_policy_succeeds_with_one_call_per_replan(tmp_path):
    policy = CountingPolicy(me.make_expert_policy_fn(TASK, pred_horizon=16))
    result = me.evaluate(policy, TASK, n_episodes=4, seed=0, obs_horizon=2, exec_horizon=4,
                         max_steps=200, n_plot=1, out_dir=str(tmp_path))
    assert result["success_rate"] >= 0.75
    assert result["n_episodes"] == 4 and len(result["episodes"]) == 4
    lo, hi = result["ci95"]
    assert 0.0 <= lo <= result["success_rate"] <= hi <= 1.0
    steps = [ep["steps"] for ep in result["episodes"]]
    assert all(1 <= s <= 200 for s in steps)
    assert result["env_steps"] == sum(steps)
    # One call serves all envs per replan: as many calls as the longest episode needs.
    assert len(policy.inputs) == result["n_policy_calls"] == math.ceil(max(steps) / 4)
    for batch in policy.inputs:
        assert batch.shape == (4, 2, md.OBS_DIM) and batch.dtype == np.float32
    # Start padding: the first history repeats the first observation.
    np.testing.assert_array_equal(policy.inputs[0][:, 0], policy.inputs[0][:, 1])
    # Later histories hold two consecutive, different observations.
    assert not np.array_equal(policy.inputs[1][:, 0], policy.inputs[1][:, 1])
    assert all(ep["return"] > 0 for ep in result["episodes"])
    assert result["env_steps_per_s"] > 0
    assert len(result["plots"]) == 1 and (tmp_path / result["plots"][0].split("/")[-1]).stat().st_size > 0


def test_random_policy_fails_and_waves_keep_batch_shape():
    policy = CountingPolicy(me.make_random_policy_fn(pred_horizon=8, seed=0))
    result = me.evaluate(policy, TASK, n_episodes=3, seed=0, exec_horizon=8, max_steps=80, num_envs=2)
    assert result["success_rate"] == 0.0
    assert result["ci95"][0] == 0.0
    assert [ep["steps"] for ep in result["episodes"]] == [80, 80, 80]
    # Two waves (2 + 1 episodes), 10 replans each, always a batch of num_envs rows.
    assert result["n_policy_calls"] == len(policy.inputs) == 2 * 10
    assert {batch.shape for batch in policy.inputs} == {(2, 2, md.OBS_DIM)}


def test_eval_configs_disjoint_from_demo_configs():
    result = me.evaluate(me.make_random_policy_fn(pred_horizon=8), TASK, n_episodes=3, seed=0,
                         exec_horizon=8, max_steps=8)
    eval_vecs = np.array([ep["rand_vec"] for ep in result["episodes"]])
    demo_vecs = md.config_rand_vecs(TASK, "demo", 0, range(20))
    md.assert_configs_disjoint(eval_vecs, demo_vecs)
    assert len(np.unique(eval_vecs, axis=0)) == 3
    # evaluate refuses layouts it is told to exclude (e.g. the demos' own).
    with pytest.raises(ValueError, match="shared between"):
        me.evaluate(me.make_random_policy_fn(pred_horizon=8), TASK, n_episodes=3, seed=0,
                    max_steps=8, exclude_rand_vecs=eval_vecs[1:2])
    # Accepted when the exclusion list really is disjoint.
    me.evaluate(me.make_random_policy_fn(pred_horizon=8), TASK, n_episodes=1, seed=0,
                max_steps=8, exclude_rand_vecs=demo_vecs)


def test_perturbed_start_with_an_undefined_reward_is_redrawn():
    # Found by the :ood sweep: hammer, eval seed 1, 15 cm, layout id 51 drew a hand start
    # from which the env's own reward raises at the first step. The start is redrawn.
    spec = me.eval_env_spec("hammer-v3", 50, 1, 500, 0.15)
    env = spec.make_env()
    try:
        hand = np.array(env.hand_init_pos, dtype=np.float64)
        obs, info = mwenv.reset_episode(env, spec.configs[1], hand, spec.perturbation,
                                        mwenv.perturbation_rng("hammer-v3", 1, 51))
        env.evaluate_state(obs, np.zeros(4))  # raised ValueError before the redraw
        assert np.linalg.norm(info["object_offset"]) > 0.1  # still perturbed
        assert np.linalg.norm(info["hand_offset"]) > 0.05
    finally:
        env.close()


def test_perturbation_levels_move_hand_and_object():
    env = md.make_env(TASK)
    hand = np.array(env.hand_init_pos, np.float64)
    config = md.sample_config(env, TASK, "eval", 0, 0)
    obs0, info0 = mwenv.reset_episode(env, config, hand, me.resolve_perturbation("0"), np.random.default_rng(0))
    assert info0["hand_offset"] == [0.0, 0.0, 0.0] and info0["object_offset"] == [0.0, 0.0]
    realized = {}
    for level in ("S", "M", "L"):
        p = me.resolve_perturbation(level)
        _, info = mwenv.reset_episode(env, config, hand, p, np.random.default_rng(1))
        realized[level] = (np.linalg.norm(info["hand_offset"]), np.linalg.norm(info["object_offset"]))
        assert realized[level][0] == pytest.approx(p.hand_shift, abs=0.01)
        assert realized[level][1] == pytest.approx(p.object_shift, abs=0.005)
    assert realized["S"][1] < realized["M"][1] < realized["L"][1]
    # Unperturbed reset afterwards restores the default layout and hand start.
    obs_again, _ = mwenv.reset_episode(env, config, hand, me.resolve_perturbation(0.0), np.random.default_rng(0))
    np.testing.assert_allclose(obs_again, obs0, atol=1e-9)
    assert me.resolve_perturbation(0.03).object_shift == 0.03
    # A shift's name resolves to the same shift: runs pass level names on to evaluation.
    named = me.resolve_perturbation(0.15)
    assert named.level == "0.15m" and me.resolve_perturbation(named.level) == named
    with pytest.raises(ValueError, match="Unknown perturbation level"):
        me.resolve_perturbation("XL")
    # Evaluation order: "0" first, then the config's order, each level once.
    assert list(me.evaluation_levels(("L", "s", 0.15, "0", "S", "0.15m"))) == ["0", "L", "S", "0.15m"]
    with pytest.raises(ValueError, match="Unknown perturbation level"):
        me.evaluation_levels(("S", "XL"))


def test_infeasible_layout_is_rejected_not_looped():
    # pick-place re-draws its layout while object and goal are < 15 cm apart; on a
    # frozen layout that would loop forever.
    task = "pick-place-v3"
    env = md.make_env(task)
    config = md.sample_config(env, task, "eval", 0, 0)
    bad = md.config_rand_vec(config).copy()
    bad[:2] = bad[3:5]  # object on the goal
    env.set_task(config)
    with pytest.raises(mwenv._InfeasibleLayout):
        mwenv._reset_with_rand_vec(env, bad)
    # The env is usable afterwards, and an "L" perturbation finds a feasible direction.
    _, info = mwenv.reset_episode(env, config, np.array(env.hand_init_pos, np.float64),
                                  me.resolve_perturbation("L"), np.random.default_rng(0))
    assert np.linalg.norm(info["object_offset"]) == pytest.approx(0.10, abs=0.01)


def test_wilson_interval_known_values():
    assert me.wilson_interval is wilson_interval  # re-exported for callers of metaworld_eval
    np.testing.assert_allclose(me.wilson_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
    np.testing.assert_allclose(me.wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(me.wilson_interval(10, 10), (0.7225, 1.0), atol=1e-4)
    assert me.wilson_interval(50, 50)[1] == 1.0


def test_pooled_success_sums_episodes():
    pooled = pooled_success([{"n_episodes": 10, "n_successes": 5}, {"n_episodes": 40, "n_successes": 35}])
    assert pooled["n_episodes"] == 50 and pooled["n_successes"] == 40 and pooled["success_rate"] == 0.8
    assert pooled["ci95"] == list(wilson_interval(40, 50))


def test_bad_policy_output_is_reported():
    with pytest.raises(ValueError, match="expected \\(2, pred_horizon >= exec_horizon=8, 4\\)"):
        me.evaluate(lambda obs: np.zeros((2, 4, 4)), TASK, n_episodes=2, seed=0, max_steps=8)
    with pytest.raises(ValueError, match="non-finite"):
        me.evaluate(lambda obs: np.full((1, 8, 4), np.nan), TASK, n_episodes=1, seed=0, max_steps=8)


def _frame_count(path):
    import imageio.v3 as iio

    return len(iio.imread(path, index=None))


def test_rollout_video_has_one_frame_per_episode_step(tmp_path):
    """The first episode replayed and rendered: one frame per step, ending as evaluated."""
    from energyflow_jax.evaluation import video

    reason = video.gl_unavailable()
    if reason:
        pytest.skip(reason)
    result = me.evaluate(me.make_expert_policy_fn(TASK), TASK, n_episodes=2, seed=0,
                         exec_horizon=4, max_steps=120, n_videos=1, out_dir=str(tmp_path))
    assert result["videos_skipped"] is None and len(result["videos"]) == 1
    v = result["videos"][0]
    episode = result["episodes"][0]
    assert v["episode"] == 0 and v["replay_matches"]
    assert episode["success"] and v["path"].endswith("_success.mp4")
    assert v["frames"] == episode["steps"] == _frame_count(v["path"])
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f]


def test_video_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from energyflow_jax.evaluation import video

    real = iio.imwrite

    def no_ffmpeg(path, *args, **kwargs):
        if str(path).endswith(".mp4"):
            raise OSError("Could not find a backend to open it")  # what imageio says
        return real(path, *args, **kwargs)

    monkeypatch.setattr(iio, "imwrite", no_ffmpeg)
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(5)[:, None, None] * 40  # distinct frames: a GIF keeps them all
    path = video.write_video(str(tmp_path / "clip"), frames)
    assert path.endswith("clip.gif") and os.listdir(tmp_path) == ["clip.gif"]
    assert _frame_count(path) == 5
    with pytest.raises(ValueError, match="frames must be"):
        video.write_video(str(tmp_path / "bad"), frames[0])


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend must survive the library's plots (they use Figure, not pyplot)."""
    import matplotlib

    from energyflow_jax.evaluation.plots import plot_rollout

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's backend
    try:
        traj = np.zeros((5, md.OBS_DIM))
        traj[:, 0] = np.linspace(0, 0.1, 5)
        plot_rollout(str(tmp_path / "r.png"), traj, "title")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "r.png").stat().st_size > 1000
    finally:
        matplotlib.use(before)
