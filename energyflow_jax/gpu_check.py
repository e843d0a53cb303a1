"""The accelerator check: python -m energyflow_jax.bench --gpu-check --out DIR [--smoke]

One JSON line per stage on stdout (and in DIR/gpu_check.jsonl), written as each
stage ends, so a run cut short keeps what it measured:
  env       versions, backend, devices, what conv_impl="auto" resolves to
  parity    each convolution form against lax at HIGHEST, and at the default precision
  train     DSM steps/s per form at batch 256 and 2048, compile time, achieved
            TFLOP/s (the direct form's FLOP count) and the fraction of tensor-core peak
  sample    PF-ODE latency, K = 20: batch 1 (median, p90) and batch 256, per form
  sweep     8 and 64 vmapped members against one member (aggregate steps/s)
  torch_ref the published PyTorch recipe on the same device (when torch sees it),
            interleaved with ours; ratios are medians of per-repeat ratios
  summary   each goal and whether it was met

--smoke runs every stage on a tiny model in seconds (CI runs it on CPU).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from energyflow_jax import training
from energyflow_jax.config import base_config
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.nn import kernels
from energyflow_jax.objectives import dsm

# Dense (no sparsity) peak FLOP/s per device by the unit a float32 / bfloat16
# matmul runs on: "tf32" is a float32 matmul at default precision on NVIDIA
# tensor cores, "fp32" at HIGHEST precision. Vendor datasheets (SXM parts).
PEAK_FLOPS = {
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
    "L4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12},
    # TPUs run float32 matmuls at default precision as bfloat16 passes.
    "TPU v4": {"fp32": 275e12, "tf32": 275e12, "bf16": 275e12},
    "TPU v5 lite": {"fp32": 197e12, "tf32": 197e12, "bf16": 197e12},
    "TPU v5": {"fp32": 459e12, "tf32": 459e12, "bf16": 459e12},
    "TPU v6": {"fp32": 918e12, "tf32": 918e12, "bf16": 918e12},
}
GOALS = {"sample_ms_b1_k20_max": 3.0, "train_vs_torch_min": 2.0, "sweep8_speedup_min": 6.0}


@dataclasses.dataclass(frozen=True)
class Sizes:
    model: tuple  # (key, value) overrides of base_config().model
    obs_shape: tuple
    action_shape: tuple
    batches: tuple
    sample_batch: int
    members: tuple
    n_steps: int  # DSM steps per timed call
    sample_steps: int  # K
    repeats: int
    forms: tuple  # convolution forms timed, float32 (bfloat16 drops Winograd)


FULL = Sizes(model=(), obs_shape=(2, 39), action_shape=(16, 4), batches=(256, 2048),
             sample_batch=256, members=(8, 64), n_steps=20, sample_steps=20, repeats=3,
             forms=("lax", "windows", "winograd"))
# The smoke run checks the stages' code, not the forms (tests/test_kernels.py does):
# an MLP compiles in a fraction of a U-Net's time on CPU.
SMOKE = Sizes(model=(("arch", "mlp"), ("mlp_dims", (8,)), ("head_dims", (4,)),
                     ("state_emb_dim", 4), ("time_emb_dim", 4)),
              obs_shape=(2, 3), action_shape=(4, 2), batches=(4,), sample_batch=4, members=(2,),
              n_steps=2, sample_steps=2, repeats=1, forms=("lax", "windows"))


def peak_flops(device_kind: str, unit: str, n_devices: int = 1) -> float | None:
    for name, peaks in PEAK_FLOPS.items():  # "H100" before a plain match of "H1"
        if name.lower() in device_kind.lower():
            return peaks[unit] * n_devices
    return None


def matmul_unit(dtype: str, precision: str, backend: str) -> str:
    if dtype == "bfloat16":
        return "bf16"
    if precision == "highest" or backend == "cpu":
        return "fp32"
    return "tf32"


def _model_config(sizes: Sizes, conv_impl: str, precision: str = "default",
                  dtype: str = "float32"):
    c = base_config().model
    c.update(**dict(sizes.model), conv_impl=conv_impl, matmul_precision=precision, dtype=dtype)
    return c


def _create_state(model, tx, hparams, rng):
    return jax.jit(lambda h, r: training.TrainState.create(model, tx, h, r))(hparams, rng)


def _data(sizes: Sizes, n: int = 4096) -> dict:
    return {"obs": jax.random.normal(jax.random.PRNGKey(0), (n, *sizes.obs_shape)),
            "actions": jax.random.normal(jax.random.PRNGKey(1), (n, *sizes.action_shape))}


def direct_form_flops(sizes: Sizes, batch: int) -> float:
    """FLOPs of one DSM train step with every convolution in the direct form, counted
    by XLA on the CPU from the unoptimized program (the same count for every form
    and backend; nothing is compiled)."""
    cpu = jax.local_devices(backend="cpu")[0]
    config = base_config()
    model = EnergyFlowModel.create(_model_config(sizes, "lax"), sizes.obs_shape,
                                   sizes.action_shape, backend="cpu")
    tx = training.make_optimizer(config.optim)
    with jax.default_device(cpu):
        state, data = jax.eval_shape(lambda: (training.TrainState.create(
            model, tx, training.HParams.from_config(config), jax.random.PRNGKey(0)),
            _data(sizes, batch)))
        step = jax.jit(lambda st, b: training.train_step(model, tx, st, b))
        analysis = step.lower(state, data).cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def advancing_call(chunk, holder: dict, data, key: str = "state"):
    """fn() running one train chunk from holder[key] and keeping the new state
    there (the chunk donates its input state)."""
    def call():
        holder[key], metrics = chunk(holder[key], data)
        return metrics
    return call


def first_call_s(fn) -> float:
    """Seconds of fn's first call, compile included."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _timed_calls(fn, n: int) -> list[float]:
    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _rel(x, ref) -> float:
    num = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
              for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(ref)))
    den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref))
    return num / (den + 1e-30)


def stage_env() -> dict:
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    devices = jax.devices()
    return {"versions": versions, "python": sys.version.split()[0],
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "n_devices": len(devices),
            "auto_conv_impl": kernels.resolve_policy("auto").conv}


def stage_parity(sizes: Sizes, batch: int = 32) -> dict:
    """Energy, score and DSM gradient of each form and precision against lax at HIGHEST."""
    hp = training.HParams.from_config(base_config())
    data = _data(sizes, batch)
    rng = jax.random.PRNGKey(2)
    a, s = data["actions"], data["obs"]
    t = jax.random.uniform(rng, (batch,))

    def terms(model, params):
        return jax.jit(lambda p: (
            model.energy(p, a, s, t), model.score(p, a, s, t),
            jax.grad(lambda q: dsm.dsm_loss(model, q, data, rng, hp.schedule))(p)))(params)

    ref_model = EnergyFlowModel.create(_model_config(sizes, "lax", "highest"), sizes.obs_shape,
                                       sizes.action_shape)
    params = ref_model.init(jax.random.PRNGKey(0))
    ref = terms(ref_model, params)
    out = {}
    # On CPU both precisions are float32; the smoke run checks one.
    for precision in ("highest",) if sizes is SMOKE else ("highest", "default"):
        for form in sizes.forms:
            model = EnergyFlowModel.create(_model_config(sizes, form, precision),
                                           sizes.obs_shape, sizes.action_shape)
            got = terms(model, params)
            out[f"{form}/{precision}"] = {
                name: float(f"{_rel(g, r):.3g}")
                for name, g, r in zip(("energy", "score", "dsm_grad"), got, ref)}
    return {"batch": batch, "reference": "lax/highest", "rel_err": out}


# Set up (and compiled) once per process: the reference stage reuses the programs.
@functools.lru_cache(maxsize=None)
def _train_setup(sizes: Sizes, conv_impl: str, batch: int, dtype: str = "float32"):
    config = base_config()
    model = EnergyFlowModel.create(_model_config(sizes, conv_impl, dtype=dtype),
                                   sizes.obs_shape, sizes.action_shape)
    tx = training.make_optimizer(config.optim)
    mesh = training.make_mesh(1)
    data = training.replicate(_data(sizes), mesh)
    state = training.replicate(_create_state(
        model, tx, training.HParams.from_config(config), jax.random.PRNGKey(0)), mesh)
    chunk = training.make_train_chunk(model, tx, batch, sizes.n_steps, mesh)
    return model, chunk, {"state": state}, data


def stage_train(sizes: Sizes, conv_impl: str, batch: int, flops_per_step: float,
                dtype: str = "float32") -> dict:
    model, chunk, holder, data = _train_setup(sizes, conv_impl, batch, dtype)
    call = advancing_call(chunk, holder, data)
    compile_s = first_call_s(call)
    times = _timed_calls(call, max(sizes.repeats, 3))
    sps = sizes.n_steps / float(np.median(times))
    backend = jax.default_backend()
    peak = peak_flops(jax.devices()[0].device_kind, matmul_unit(dtype, "default", backend))
    achieved = flops_per_step * sps
    return {"conv_impl": conv_impl, "resolved": model.policy.conv, "dtype": dtype,
            "batch": batch, "steps_per_s": round(sps, 2), "compile_s": round(compile_s, 1),
            "direct_gflop_per_step": float(f"{flops_per_step / 1e9:.4g}"),
            "achieved_tflops": round(achieved / 1e12, 3),
            "peak_fraction": None if peak is None else round(achieved / peak, 4)}


@functools.lru_cache(maxsize=None)
def _sampler_setup(sizes: Sizes, conv_impl: str):
    """(model, measure(n_calls) -> dict) for the PF-ODE sampler, compiled for batch 1
    and sizes.sample_batch."""
    config = base_config()
    model = EnergyFlowModel.create(_model_config(sizes, conv_impl), sizes.obs_shape,
                                   sizes.action_shape)
    params = model.init(jax.random.PRNGKey(0))
    schedule = training.HParams.from_config(config).schedule
    k = sizes.sample_steps
    sampler = jax.jit(lambda p, o, r: dsm.sample(model, p, o, r, schedule, k, 1e-3))
    obs = _data(sizes, sizes.sample_batch)["obs"]
    rng = jax.random.PRNGKey(3)
    compile_s = first_call_s(lambda: (sampler(params, obs[:1], rng), sampler(params, obs, rng)))

    def measure(n_calls: int) -> dict:
        b1 = np.asarray(_timed_calls(lambda: sampler(params, obs[:1], rng), n_calls)) * 1e3
        bn = np.asarray(_timed_calls(lambda: sampler(params, obs, rng),
                                     max(n_calls // 5, 2))) * 1e3
        return {"conv_impl": conv_impl, "resolved": model.policy.conv, "K": k,
                "ms_b1_median": round(float(np.median(b1)), 3),
                "ms_b1_p90": round(float(np.percentile(b1, 90)), 3),
                "ms_bn_median": round(float(np.median(bn)), 2), "bn": sizes.sample_batch,
                "compile_s": round(compile_s, 1)}

    return model, measure


def stage_sample(sizes: Sizes, conv_impl: str, n_calls: int = 50) -> dict:
    return _sampler_setup(sizes, conv_impl)[1](n_calls)


def stage_sweep(sizes: Sizes, n_members: int, batch: int, conv_impl: str) -> dict:
    """Aggregate steps/s of n_members vmapped in one program against one member alone
    (the single-run program), interleaved repeats."""
    config = base_config()
    # One member is the train stage's program (same form and batch): compiled once.
    model, one_chunk, one, data = _train_setup(sizes, conv_impl, batch)
    tx = training.make_optimizer(config.optim)
    lrs = np.geomspace(1e-4, 1e-3, n_members)
    hp = lambda i: training.HParams.from_config(config).replace(learning_rate=jnp.float32(lrs[i]))
    vm_chunk = training.make_member_chunk(model, tx, batch, sizes.n_steps,
                                          training.member_mesh(n_members, 1))
    holder = {"vm": training.stack([_create_state(model, tx, hp(i), jax.random.PRNGKey(i))
                                    for i in range(n_members)])}

    vm_call = advancing_call(vm_chunk, holder, data, "vm")
    one_call = advancing_call(one_chunk, one, data)
    vm_compile = first_call_s(vm_call)
    jax.block_until_ready(one_call())
    ratios, vm_sps, one_sps = [], [], []
    for _ in range(sizes.repeats):
        (t_vm,) = _timed_calls(vm_call, 1)
        (t_one,) = _timed_calls(one_call, 1)
        vm_sps.append(n_members * sizes.n_steps / t_vm)
        one_sps.append(sizes.n_steps / t_one)
        ratios.append(vm_sps[-1] / one_sps[-1])
    return {"n_members": n_members, "batch": batch, "conv_impl": model.policy.conv,
            "aggregate_steps_per_s": round(float(np.median(vm_sps)), 1),
            "one_member_steps_per_s": round(float(np.median(one_sps)), 1),
            "speedup_median_of_ratios": round(float(np.median(ratios)), 2),
            "per_repeat": [round(r, 2) for r in ratios], "compile_s": round(vm_compile, 1)}


def torch_cuda_ref_command(path: str) -> list[str]:
    """The reference script run as is on CUDA (bench.bench_ref runs it on the CPU):
    every tensor it makes is placed on the GPU and its perf_counter synchronizes
    first, so its timings count the device's work rather than the launches."""
    code = ("import runpy, sys, time, torch\n"
            "torch.set_default_device('cuda')\n"
            "_pc = time.perf_counter\n"
            "time.perf_counter = lambda: (torch.cuda.synchronize(), _pc())[1]\n"
            f"sys.argv = [{path!r}, '1']\n"
            f"runpy.run_path({path!r}, run_name='__main__')\n")
    return [sys.executable, "-c", code]


def torch_cuda_unavailable(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path} not found (set ENERGYFLOW_REF_TORCH)"
    probe = subprocess.run([sys.executable, "-c", "import torch, sys; "
                            "sys.exit(0 if torch.cuda.is_available() else 3)"],
                           capture_output=True)
    if probe.returncode == 3:
        return "torch cannot use a GPU here"
    if probe.returncode != 0:
        return "torch is not importable"
    return None


def stage_torch_ref(ref_path: str, measure_ours, repeats: int) -> dict:
    """Ours (auto form) and the reference on CUDA in turn; medians of per-repeat ratios."""
    runs = []
    for _ in range(repeats):
        ours = measure_ours()
        out = subprocess.run(torch_cuda_ref_command(ref_path), capture_output=True,
                             text=True, check=True, timeout=600)
        ref = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append({"ours": ours, "ref": ref,
                     "train_speedup": ours["steps_per_s"] / ref["train_steps_per_s_b256"],
                     "sample_b1_latency_ratio": ours["ms_b1"] / ref["sample_ms_b1_k20"],
                     "sample_b256_speedup": ref["sample_ms_b256_k20"] / ours["ms_b256"]})
    med = lambda key: round(float(np.median([r[key] for r in runs])), 3)
    return {"device": "cuda", "repeats": repeats,
            "train_speedup": med("train_speedup"),
            "sample_b1_latency_ratio": med("sample_b1_latency_ratio"),
            "sample_b256_speedup": med("sample_b256_speedup"),
            "ref_train_steps_per_s": med_of(runs, "ref", "train_steps_per_s_b256"),
            "ref_sample_ms_b1": med_of(runs, "ref", "sample_ms_b1_k20"),
            "ref_sample_ms_b256": med_of(runs, "ref", "sample_ms_b256_k20"),
            "runs": runs}


def med_of(runs, side, key):
    return round(float(np.median([r[side][key] for r in runs])), 3)


STAGES = ("env", "flops", "train", "sample", "torch_ref", "parity", "sweep", "summary")


def run(out_dir: str, smoke: bool = False, ref_path: str | None = None,
        budget_s: float = 480.0, skip: tuple[str, ...] = ()) -> list[dict]:
    """Run the stages, most important first, skipping those named in skip and
    those that start after budget_s; returns the records (also printed and written)."""
    unknown = sorted(set(skip) - set(STAGES) | ({"env", "summary"} & set(skip)))
    if unknown:
        raise ValueError(f"cannot skip {unknown}; stages that may be skipped: "
                         f"{[s for s in STAGES if s not in ('env', 'summary')]}")
    sizes = SMOKE if smoke else FULL
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "gpu_check.jsonl")
    records = []
    t_start = time.perf_counter()

    def emit(stage: str, fn, *args, **kwargs):
        elapsed = time.perf_counter() - t_start
        t0 = time.perf_counter()
        if stage in skip:
            rec = {"stage": stage, "skipped": "--skip"}
        elif elapsed > budget_s and stage != "summary":
            rec = {"stage": stage, "skipped": f"over the {budget_s:.0f} s budget"}
        else:
            try:
                rec = {"stage": stage, **fn(*args, **kwargs)}
            except Exception as e:  # noqa: BLE001 - one failed stage must not lose the rest
                rec = {"stage": stage, "error": f"{type(e).__name__}: {e}"[:2000]}
        rec["stage_s"] = round(time.perf_counter() - t0, 1)
        rec["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        records.append(rec)
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")
        return rec

    emit("env", stage_env)
    auto = kernels.resolve_policy("auto").conv
    b0 = sizes.batches[0]
    flops = {}
    for b in sizes.batches:
        rec = emit("flops", lambda b=b: {"batch": b, "direct_flops_per_step":
                                         direct_form_flops(sizes, b)})
        flops[b] = rec.get("direct_flops_per_step", 0.0)  # 0: no TFLOP/s figures
    train, sample, sweep = {}, {}, {}
    # The form "auto" picks here first, then the PyTorch reference beside it.
    first = "lax" if auto == "lax" or "winograd" not in sizes.forms else "winograd"
    order = [first] + [f for f in sizes.forms if f != first]
    rec = emit("train", stage_train, sizes, first, b0, flops[b0])
    train[(first, b0)] = rec
    rec = emit("sample", stage_sample, sizes, "windows" if auto != "lax" else "lax",
               50 if not smoke else 3)
    sample[rec.get("conv_impl")] = rec
    ref = None
    ref_path = ref_path or os.environ.get("ENERGYFLOW_REF_TORCH", "")
    why_not = ("--skip" if "torch_ref" in skip else None) or ("smoke" if smoke else None) or \
        (None if jax.default_backend() == "gpu" else "not on a GPU") or \
        torch_cuda_unavailable(ref_path)
    if why_not:
        emit("torch_ref", lambda: {"skipped": why_not})
    else:
        _, chunk, holder, data = _train_setup(sizes, first, b0)
        _, measure_sampler = _sampler_setup(sizes, first)

        call = advancing_call(chunk, holder, data)

        def measure_ours():
            sps = sizes.n_steps / float(np.median(_timed_calls(call, 3)))
            s = measure_sampler(20)
            return {"steps_per_s": sps, "ms_b1": s["ms_b1_median"], "ms_b256": s["ms_bn_median"]}
        ref = emit("torch_ref", stage_torch_ref, ref_path, measure_ours, sizes.repeats)
    # The smoke run times one form (its parity stage still compares two).
    for form in order[1:] if not smoke else ():
        train[(form, b0)] = emit("train", stage_train, sizes, form, b0, flops[b0])
    emit("parity", stage_parity, sizes)
    # The sweeps compile a vmapped program each (over 2 minutes for 8 members on
    # an H200), so they come after the forms' own figures.
    sweep[sizes.members[0]] = emit("sweep", stage_sweep, sizes, sizes.members[0], b0, first)
    for form in sizes.forms if not smoke else ():
        if form not in sample:
            rec = emit("sample", stage_sample, sizes, form, 50 if not smoke else 3)
            sample[form] = rec
    for batch in sizes.batches[1:]:
        for form in order:
            train[(form, batch)] = emit("train", stage_train, sizes, form, batch, flops[batch])
    for n in sizes.members[1:]:
        sweep[n] = emit("sweep", stage_sweep, sizes, n, b0, first)
    if not smoke:
        emit("train", stage_train, sizes, "lax", b0, flops[b0], "bfloat16")

    ok = lambda d: {k: v for k, v in d.items() if v and "error" not in v and "skipped" not in v}
    train, sample, sweep = ok(train), ok(sample), ok(sweep)
    auto_sample = sample.get("lax" if auto == "lax" else "windows", {})
    best_train = max((v for k, v in train.items() if k[1] == b0),
                     key=lambda r: r["steps_per_s"], default=None)
    best_sample = min(sample.values(), key=lambda r: r["ms_b1_median"], default=None)
    sweep8 = sweep.get(sizes.members[0], {}).get("speedup_median_of_ratios")
    summary = {
        "auto_conv_impl": auto,
        "fastest_train_form": best_train and best_train["conv_impl"],
        "fastest_sample_form_b1": best_sample and best_sample["conv_impl"],
        "sample_ms_b1_k20_auto": auto_sample.get("ms_b1_median"),
        "sample_goal_met": auto_sample.get("ms_b1_median", 1e9) <= GOALS["sample_ms_b1_k20_max"],
        "sweep8_speedup": sweep8,
        "sweep_goal_met": (sweep8 or 0) >= GOALS["sweep8_speedup_min"],
        "goals": GOALS,
    }
    if ref and "train_speedup" in ref:
        summary["train_vs_torch"] = ref["train_speedup"]
        summary["train_goal_met"] = ref["train_speedup"] >= GOALS["train_vs_torch_min"]
    emit("summary", lambda: summary)
    return records
