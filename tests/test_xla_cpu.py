import importlib.metadata

from energyflow_jax import xla_cpu


def test_flag_added_once_and_user_choices_win(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: xla_cpu.MEASURED_JAXLIB)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.configure(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.YNN_DOTS_ONLY}"
    assert not xla_cpu.configure(env)  # already there: not added twice
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    assert not xla_cpu.configure(own)
    assert own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    keep = {"ENERGYFLOW_KEEP_XLA_FLAGS": "1"}
    assert not xla_cpu.configure(keep) and "XLA_FLAGS" not in keep


def test_flag_not_set_for_an_unmeasured_jaxlib(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0.0")
    env = {}
    assert not xla_cpu.configure(env) and "XLA_FLAGS" not in env
