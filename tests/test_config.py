"""Configs load from Python as on the command line: locked, and strict about keys."""
import pytest

from energyflow_jax import config as config_lib


def test_load_applies_overrides_and_locks():
    c = config_lib.load("sweeps/metaworld.py:tiny", {"optim.total_steps": 7, "seed": 3})
    assert c.optim.total_steps == 7 and c.seed == 3 and c.experiment == "metaworld"
    assert c.is_locked
    with pytest.raises(AttributeError):
        c.optim.lerning_rate = 1.0  # a locked config refuses new keys


def test_load_rejects_a_misspelt_key_naming_it():
    with pytest.raises(KeyError, match="optim.lerning_rate"):
        config_lib.load("sweeps/toy.py", {"optim.lerning_rate": 1e-3})
    with pytest.raises(KeyError, match="'optimm'"):
        config_lib.load("sweeps/toy.py", {"optimm.learning_rate": 1e-3})
    with pytest.raises(TypeError):
        config_lib.load("sweeps/toy.py", {"optim.total_steps": "many"})


def test_load_rejects_unknown_presets_and_files():
    with pytest.raises(ValueError, match="unknown preset 'tinny'"):
        config_lib.load("sweeps/metaworld.py:tinny")
    with pytest.raises(FileNotFoundError, match="sweeps/nope.py"):
        config_lib.load("sweeps/nope.py")
