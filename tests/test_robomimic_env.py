"""RoboMimic over robosuite: generated demos in the official layout, the env built from a
file's env_args, reset_to(states[0]) reproducing obs[0], replays, the experiment on an
official-layout file, and bad data paths refused before any work."""
import json
import os

import h5py
import jax
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.data import robomimic, robomimic_demos, robomimic_sim
from energyflow_jax.evaluation import robomimic_eval

pytestmark = pytest.mark.slow  # robosuite envs: a few seconds each, numba compiles once


@pytest.fixture(scope="module")
def lift_file(tmp_path_factory):
    """Three scripted Lift demos, written as the official files are, plus a 20_percent mask."""
    path = tmp_path_factory.mktemp("rm") / "lift.hdf5"
    robomimic_demos.load_or_collect(path, "lift", 3, 0, 400)
    with h5py.File(path, "r+") as f:
        f["mask"].create_dataset("20_percent", data=np.array([b"demo_0"]))
    return path


def test_generated_file_has_the_official_layout(lift_file):
    episodes, info = robomimic.read_low_dim(lift_file, "lift")
    assert info["env_args"]["env_name"] == "Lift" and info["env_args"]["type"] == 1
    assert info["env_args"]["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"
    assert robomimic.filter_keys(lift_file) == ["20_percent", "train", "valid"]
    with h5py.File(lift_file) as f:
        assert f["data"].attrs["total"] == sum(len(ep["actions"]) for ep in episodes)
        for name in info["demos"]:
            demo = f["data"][name]
            n = demo.attrs["num_samples"]
            assert demo["states"].shape == (n, 32) and demo["actions"].shape == (n, 7)
            assert "<mujoco" in demo.attrs["model_file"]
            assert demo["next_obs/object"].shape == (n, 10)
            np.testing.assert_array_equal(demo["next_obs/object"][:-1], demo["obs/object"][1:])
            assert demo["dones"][-1] == 1 and demo["dones"][:-1].sum() == 0
        provenance = json.loads(f["data"].attrs["provenance"])
    assert provenance["task"] == "lift" and provenance["expert_success_rate"] > 0.5
    assert all(ep["obs"].shape[1] == robomimic.OBS_DIMS["lift"] for ep in episodes)


def test_reset_to_first_state_gives_obs0_and_the_replay_succeeds(lift_file):
    episodes, info = robomimic.read_low_dim(lift_file, "lift")
    sim = robomimic_sim.RobomimicSim(info["env_args"])
    try:
        for ep in episodes[:2]:
            obs = sim.reset_to_state(ep["states"][0])
            np.testing.assert_allclose(obs, ep["obs"][0], atol=1e-6)
            successes = [sim.step(a)[2] for a in ep["actions"]]
            assert successes[-1] and not any(successes[:-3])  # success where the demo had it
    finally:
        sim.close()


def test_layouts_are_seeded_held_out_and_leave_numpy_alone(lift_file):
    episodes, info = robomimic.read_low_dim(lift_file, "lift")
    spec = robomimic_eval.eval_env_spec(info["env_args"], 3, seed=0)
    assert spec.max_steps == 400 and spec.split == "eval"
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    env = spec(2)
    try:
        first, infos = env.reset([0, 1])
        again, _ = env.reset([1, 0])
        assert np.random.rand() == expected_draw  # the global generator is put back
        np.testing.assert_array_equal(first[0], again[1])
        assert np.abs(first[0] - first[1]).max() > 1e-3 and first.shape == (2, 19)
        assert infos == [{"layout": 0}, {"layout": 1}]
        starts = robomimic.object_start("lift", np.stack([ep["obs"][0] for ep in episodes]))
        eval_starts = robomimic_eval.layout_starts(spec)
        np.testing.assert_array_equal(eval_starts[:2], first[:, :3])  # lift: cube_pos first
        robomimic_eval.assert_layouts_disjoint(eval_starts, starts)
        with pytest.raises(ValueError, match="evaluation layout 0 starts its object where demo 0"):
            robomimic_eval.assert_layouts_disjoint(starts[:1], starts)
        result = env.step(np.zeros((2, 7)), np.array([True, False]))
        assert result.obs.shape == (2, 19) and not result.obs[1].any()
        # reset_to: a slot put in a demo's recorded first state observes its obs[0].
        np.testing.assert_allclose(env.reset_to(1, episodes[0]["states"][0]),
                                   episodes[0]["obs"][0], atol=1e-6)
    finally:
        env.close()


def test_controller_configs_are_converted_for_robosuite_1_5():
    kwargs = robomimic_sim.robosuite_kwargs(robomimic_sim.default_env_args("can"))
    right = kwargs["controller_configs"]["body_parts"]["right"]
    assert right["type"] == "OSC_POSE" and right["kp"] == 150 and right["gripper"]["type"] == "GRIP"
    assert kwargs["lite_physics"] is False and kwargs["ignore_done"] is True
    args = robomimic_sim.default_env_args("lift")
    del args["env_kwargs"]["lite_physics"]
    assert robomimic_sim.robosuite_kwargs(args)["lite_physics"] is False  # not 1.5's default
    with pytest.raises(ValueError, match="not a RoboMimic task"):
        robomimic_sim.task_of({"env_name": "Door"})


def tiny(**overrides):
    return config_lib.load("sweeps/robomimic.py:tiny", overrides)


def test_tiny_run_on_an_official_layout_file_and_policy_load(lift_file, tmp_path):
    from energyflow_jax.experiments import imitation
    from energyflow_jax.policy import Policy

    workdir = tmp_path / "run"
    report = imitation.train_and_evaluate(
        tiny(**{"data.path": str(lift_file), "data.filter_key": "train"}), str(workdir))
    assert report["task"] == "lift" and report["n_episodes"] == 2 and report["steps"] == 20
    assert report["demos"]["provenance"]["n_episodes"] == 2  # the train mask: 2 of 3 demos
    assert report["demos"]["cache_path"] == str(lift_file)
    assert (workdir / "summary.md").read_text().startswith("# lift (conservative)")
    assert len(report["rollout_plots"]) == 1 and os.path.exists(report["rollout_plots"][0])
    policy = Policy.load(str(workdir))
    episodes, _ = robomimic.read_low_dim(lift_file, "lift")
    actions = np.asarray(policy.act(np.stack([episodes[0]["obs"][:2]]), jax.random.PRNGKey(0)))
    assert actions.shape == (1, 16, 7) and np.all(np.abs(actions) <= 1)


@pytest.mark.parametrize("make, task, message", [
    (lambda d: d / "missing.hdf5", "lift", "does not exist"),
    (lambda d: (d / "junk.hdf5").write_bytes(b"not hdf5") and d / "junk.hdf5", "lift",
     "not a readable hdf5 file"),
    ("lift_file", "can", "name env 'Lift', but task 'can' is 'PickPlaceCan'"),
    ("six_d_actions", "lift", "its actions are 6-D; lift takes 7-D actions"),
])
def test_bad_data_paths_are_refused_before_any_work(lift_file, tmp_path, make, task, message):
    from energyflow_jax.experiments import imitation

    if make == "six_d_actions":  # a Lift file whose actions have another width
        path = tmp_path / "six.hdf5"
        robomimic.write_low_dim(path, [{
            "obs": {"object": np.zeros((3, 10))}, "next_obs": {"object": np.zeros((3, 10))},
            "actions": np.zeros((3, 6)), "states": np.zeros((3, 32)), "rewards": np.zeros(3),
            "dones": np.zeros(3)}], robomimic_sim.default_env_args("lift"))
    else:
        path = lift_file if make == "lift_file" else make(tmp_path)
    workdir = tmp_path / "run"
    with pytest.raises((FileNotFoundError, robomimic.RobomimicFormatError), match=message):
        imitation.train_and_evaluate(tiny(**{"data.path": str(path), "task": task}), str(workdir))
    assert not workdir.exists()


def test_a_task_without_an_expert_needs_a_file(tmp_path):
    from energyflow_jax.experiments import imitation

    with pytest.raises(ValueError, match="no scripted expert for square .* --config.data.path"):
        imitation.train_and_evaluate(tiny(task="square"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_every_task_builds_with_the_datasets_dimensions():
    """obs 19/23/23/59/53, states 32/71/45/115/58, actions 7 (14 for transport)."""
    states = {"lift": 32, "can": 71, "square": 45, "transport": 115, "tool_hang": 58}
    for task in ("square", "transport", "tool_hang"):  # lift and can: the tests above
        sim = robomimic_sim.RobomimicSim(robomimic_sim.default_env_args(task))
        try:
            assert sim.obs().shape == (robomimic.OBS_DIMS[task],), task
            assert sim.state().shape == (states[task],) and sim.env.action_dim == robomimic.ACTION_DIMS[task]
            layout = robomimic.plot_layout(task)
            eef = sim.obs()[slice(*layout["end effector"])]
            np.testing.assert_allclose(eef, sim.raw["robot0_eef_pos"])
        finally:
            sim.close()


def test_cli_refuses_a_bad_data_path_with_one_line_and_no_workdir(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "energyflow_jax.main",
                           "--config=sweeps/robomimic.py:tiny", f"--workdir={workdir}",
                           f"--config.data.path={tmp_path / 'nope.hdf5'}"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: data.path {tmp_path / 'nope.hdf5'} does not exist"
    assert not workdir.exists()


def test_demos_collected_in_worker_processes_are_the_same(lift_file):
    """An episode depends on its layout only: two spawned workers give the file's demos."""
    episodes, tried = robomimic_demos.collect_demos("lift", 2, 0, 400, num_workers=2)
    stored, _ = robomimic.read_low_dim(lift_file, "lift")
    assert tried == 2 and [ep["layout_index"] for ep in episodes] == [0, 1]
    for ep, ref in zip(episodes, stored):
        np.testing.assert_array_equal(ep["actions"].astype(np.float32), ref["actions"])
        np.testing.assert_array_equal(ep["states"], ref["states"])
