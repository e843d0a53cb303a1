"""The benchmark's bookkeeping (no timing here: speed targets live in the bench)."""
from energyflow_jax import bench


def _figures(train, b1, b256):
    return {"train_steps_per_s_b256": train, "sample_ms_b1_k20": b1, "sample_ms_b256_k20": b256}


def test_ratios_apply_each_target_in_its_direction():
    ref = _figures(2.0, 200.0, 3000.0)
    r = bench.ratios(_figures(3.0, 50.0, 2000.0), ref)
    assert (r["train_speedup"], r["sample_b1_latency_ratio"], r["sample_b256_speedup"]) == (1.5, 0.25, 1.5)
    assert r["meets_targets"]  # every figure exactly at its target
    assert not bench.ratios(_figures(3.0, 52.0, 2000.0), ref)["meets_targets"]  # latency too high
    assert not bench.ratios(_figures(2.9, 40.0, 1000.0), ref)["meets_targets"]  # training too slow
    assert not bench.ratios(_figures(4.0, 40.0, 2100.0), ref)["meets_targets"]  # 256 chunks too slow


def test_missing_reference_is_reported_with_its_path(tmp_path):
    missing = tmp_path / "ref_torch.py"
    reason = bench.ref_unavailable(str(missing))
    assert str(missing) in reason and "ENERGYFLOW_REF_TORCH" in reason
    (tmp_path / "ref_torch.py").write_text("")
    assert bench.ref_unavailable(str(missing)) in (None, "torch is not importable")
