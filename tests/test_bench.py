"""The benchmark's bookkeeping and the GPU check's smoke mode (no timing asserted: speed
targets live in the bench)."""
import json

import pytest

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


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    """The accelerator check's code path on CPU in its smoke mode, so it cannot rot
    between the sessions that have a GPU."""
    records = bench.main(["--gpu-check", "--smoke", "--out", str(tmp_path), "--skip", "torch_ref"])
    lines = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))  # every record printed is written
    stages = [r["stage"] for r in records]
    assert {"env", "flops", "train", "sample", "torch_ref", "sweep", "parity", "summary"} <= set(stages)
    assert not [r for r in records if "error" in r]
    assert next(r for r in records if r["stage"] == "torch_ref")["skipped"] == "--skip"
    parity = next(r for r in records if r["stage"] == "parity")["rel_err"]
    assert set(parity) == {"lax/highest", "windows/highest"}
    assert all(err < 1e-5 for form in parity.values() for err in form.values())
    for r in records:
        if r["stage"] == "train":
            assert r["steps_per_s"] > 0 and r["direct_gflop_per_step"] > 0
        if r["stage"] == "sample":
            assert 0 < r["ms_b1_median"] <= r["ms_b1_p90"]
        if r["stage"] == "sweep":
            assert r["n_members"] == 2 and r["aggregate_steps_per_s"] > 0
    summary = records[-1]
    assert summary["stage"] == "summary" and summary["auto_conv_impl"] == "windows+winograd"


def test_peaks_by_device_kind_unit_and_count():
    from energyflow_jax import gpu_check
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 494.7e12
    assert gpu_check.peak_flops("NVIDIA H200", "bf16", n_devices=8) == 8 * 989.4e12
    assert gpu_check.peak_flops("cpu", "fp32") is None
    assert gpu_check.matmul_unit("float32", "default", "gpu") == "tf32"
    assert gpu_check.matmul_unit("float32", "highest", "gpu") == "fp32"
    assert gpu_check.matmul_unit("bfloat16", "default", "gpu") == "bf16"
    result = {"dtype": "float32", "backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
              "devices": 2, "train_achieved_tflops": 98.94}
    assert abs(bench.peak_fraction(result) - 0.1) < 1e-9  # TF32 peak of two H100s
    assert bench.peak_fraction({**result, "backend": "cpu", "device_kind": "cpu"}) is None


def test_gpu_check_skip_names_the_stages(tmp_path):
    from energyflow_jax import gpu_check
    for bad in (("torch-ref",), ("summary",)):
        with pytest.raises(ValueError, match="torch_ref"):
            gpu_check.run(str(tmp_path / "out"), smoke=True, skip=bad)
    assert not (tmp_path / "out").exists()  # refused before anything is written
