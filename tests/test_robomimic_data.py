"""RoboMimic low_dim hdf5 files: written and read back in the official layout, and
every malformed file refused with the demo and key named."""
import json

import h5py
import numpy as np
import pytest

from energyflow_jax.data import robomimic
from energyflow_jax.data.windows import validate_episodes

# Lift's low_dim keys and widths: object 10, eef_pos 3, eef_quat 4, gripper_qpos 2.
WIDTHS = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
ENV_ARGS = {"env_name": "Lift", "type": 1,
            "env_kwargs": {"robots": ["Panda"], "controller_configs": {"type": "OSC_POSE"}}}


def _episode(rng, length):
    obs = {k: rng.normal(size=(length + 1, w)).astype(np.float32) for k, w in WIDTHS.items()}
    return {"obs": {k: v[:-1] for k, v in obs.items()},
            "next_obs": {k: v[1:] for k, v in obs.items()},
            "actions": rng.uniform(-1, 1, size=(length, 7)).astype(np.float32),
            "states": rng.normal(size=(length, 32)),
            "rewards": np.zeros(length), "dones": np.eye(length)[-1],
            "model_file": "<mujoco model='lift'/>"}


@pytest.fixture
def lift_file(tmp_path):
    rng = np.random.default_rng(0)
    episodes = [_episode(rng, n) for n in (5, 7, 6, 4)]
    path = tmp_path / "low_dim.hdf5"
    robomimic.write_low_dim(path, episodes, ENV_ARGS, masks={"train": [0, 1, 3], "valid": [2]},
                            extra_attrs={"provenance": {"expert": "scripted", "seed": 0}})
    return path, episodes


def test_round_trip_keeps_order_keys_and_masks(lift_file):
    path, episodes = lift_file
    read, info = robomimic.read_low_dim(path, "lift")
    assert info["demos"] == ["demo_0", "demo_1", "demo_2", "demo_3"]
    assert info["total"] == 22 and info["env_args"] == ENV_ARGS
    assert info["obs_keys"] == ["object", "robot0_eef_pos", "robot0_eef_quat",
                                "robot0_gripper_qpos"]
    assert info["model_files"] == ["<mujoco model='lift'/>"] * 4
    for ep, got in zip(episodes, read):
        expected = np.concatenate([ep["obs"][k] for k in WIDTHS], axis=1)
        np.testing.assert_array_equal(got["obs"], expected)
        np.testing.assert_array_equal(got["actions"], ep["actions"])
        np.testing.assert_array_equal(got["states"], ep["states"])
    assert validate_episodes(read) == (robomimic.OBS_DIMS["lift"], 7)
    train, info = robomimic.read_low_dim(path, "lift", filter_key="train")
    assert info["demos"] == ["demo_0", "demo_1", "demo_3"] and len(train) == 3
    assert robomimic.filter_keys(path) == ["train", "valid"]
    with h5py.File(path) as f:  # the official layout, attribute by attribute
        assert json.loads(f["data"].attrs["provenance"])["expert"] == "scripted"
        assert f["data/demo_2"].attrs["num_samples"] == 6
        assert f["data/demo_2/next_obs/object"].shape == (6, 10)


def test_demo_order_is_numeric(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "many.hdf5"
    robomimic.write_low_dim(path, [_episode(rng, 2) for _ in range(12)], ENV_ARGS)
    _, info = robomimic.read_low_dim(path, "lift")
    assert info["demos"][:3] == ["demo_0", "demo_1", "demo_2"] and info["demos"][-1] == "demo_11"


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("edit, fragment", [
    (lambda f: f["data/demo_1/obs"].pop("robot0_eef_quat"), "demo_1 has no 'obs/robot0_eef_quat'"),
    (lambda f: f["data/demo_2"].pop("actions"), "demo_2 has no 'actions'"),
    (lambda f: f["data/demo_0"].attrs.__setitem__("num_samples", 9),
     "data.attrs['total'] is 22 but the 4 demos hold 26"),
    (lambda f: f["data"].attrs.__setitem__("total", 30), "truncated"),
    (lambda f: f["data"].attrs.__delitem__("env_args"), "no 'env_args'"),
    (lambda f: f["data"].attrs.__setitem__("env_args", "{not json"), "not JSON"),
])
def test_malformed_files_name_the_demo_and_key(lift_file, edit, fragment):
    path, _ = lift_file
    _edit(path, edit)
    with pytest.raises(robomimic.RobomimicFormatError, match=fragment.replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        robomimic.read_low_dim(path, "lift")


def test_non_finite_values_and_wrong_lengths_are_refused(lift_file):
    path, _ = lift_file

    def poison(f):
        values = f["data/demo_3/obs/object"][()]
        values[2, 4] = np.nan
        f["data/demo_3/obs/object"][...] = values
    _edit(path, poison)
    with pytest.raises(robomimic.RobomimicFormatError,
                       match=r"demo_3/obs/object has 1 non-finite value\(s\), first at step 2"):
        robomimic.read_low_dim(path, "lift")

    def shorten(f):
        del f["data/demo_3/obs/object"]
        f["data/demo_3/obs"].create_dataset("object", data=np.zeros((3, 10)))
    _edit(path, shorten)
    with pytest.raises(robomimic.RobomimicFormatError,
                       match="demo_3/obs/object has 3 rows but num_samples is 4"):
        robomimic.read_low_dim(path, "lift")


def test_wrong_task_dims_filters_and_non_hdf5_files(lift_file, tmp_path):
    path, _ = lift_file
    with pytest.raises(robomimic.RobomimicFormatError, match="transport takes 14-D actions"):
        robomimic.read_low_dim(path, "transport", keys=list(WIDTHS))
    with pytest.raises(robomimic.RobomimicFormatError,
                       match="no demo filter '20_percent'; the file has train, valid"):
        robomimic.read_low_dim(path, "lift", filter_key="20_percent")
    with pytest.raises(ValueError, match="choose one of lift, can, square, transport, tool_hang"):
        robomimic.read_low_dim(path, "lifts")
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(path.read_bytes()[:200])  # a download cut short
    with pytest.raises(robomimic.RobomimicFormatError, match="not a readable hdf5 file"):
        robomimic.read_low_dim(junk, "lift")


def test_obs_keys_by_task():
    assert len(robomimic.obs_keys("lift")) == 4
    assert robomimic.obs_keys("transport")[4:] == ("robot1_eef_pos", "robot1_eef_quat",
                                                    "robot1_gripper_qpos")
