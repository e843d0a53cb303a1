"""Benchmarks: python -m energyflow_jax.bench [--json] [--dtypes ...] [--repeats 3] [--sweep] [--eval-workers N] [--sac-seeds N]

Times the published network and shapes (obs 2x39, chunk 16x4, batch 256):
DSM train steps/s (AdamW, clipping, EMA included, as in the reference),
PF-ODE sampling latency for 1 and 256 chunks (K = 20), and, when torch is
importable, ../shared/bench/ref_torch.py in the same invocation, with ratios.
Ours and the reference are measured in turn --repeats times; the figures
and ratios are medians, and --json also lists every repeat. On a GPU it also
reports the fraction of the device's peak FLOP/s reached.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from energyflow_jax import gpu_check, training, xla_cpu
from energyflow_jax.objectives import dsm
from energyflow_jax.config import base_config
from energyflow_jax.models import EnergyFlowModel

OBS_SHAPE, ACTION_SHAPE, BATCH = (2, 39), (16, 4), 256
TARGETS = {"train_speedup": 1.5, "sample_b1_latency_ratio": 0.25, "sample_b256_speedup": 1.5}


def _time(fn, n: int, min_seconds: float = 0.0) -> float:
    """Mean seconds per call after one warm-up call (which also compiles), over
    at least n calls and at least min_seconds of calls."""
    jax.block_until_ready(fn())
    calls, t0 = 0, time.perf_counter()
    while calls < n or time.perf_counter() - t0 < min_seconds:
        jax.block_until_ready(fn())
        calls += 1
    return (time.perf_counter() - t0) / calls


def setup_ours(dtype: str, train_steps: int = 20, sample_reps: int = 10):
    """Build and compile our train chunk and sampler; returns measure() -> dict."""
    config = base_config()
    config.model.dtype = dtype
    model = EnergyFlowModel.create(config.model, OBS_SHAPE, ACTION_SHAPE)
    tx = training.make_optimizer(config.optim)
    mesh = training.make_mesh()
    rng = jax.random.PRNGKey(0)
    data = {"obs": jax.random.normal(rng, (4096, *OBS_SHAPE)),
            "actions": jax.random.normal(jax.random.PRNGKey(1), (4096, *ACTION_SHAPE))}
    data = training.replicate(data, mesh)
    state = training.replicate(
        training.TrainState.create(model, tx, training.HParams.from_config(config), rng), mesh)
    # Steps per jitted call: the trainer runs train.steps_per_chunk (100 by
    # default) per call; 10 keeps the per-call overhead in the figure.
    per_call = 10
    chunk = training.make_train_chunk(model, tx, BATCH, per_call, mesh)
    holder = {"state": state}
    train_call = gpu_check.advancing_call(chunk, holder, data)
    compile_s = gpu_check.first_call_s(train_call)
    # The direct form's count (every convolution form does the same model work).
    step_flops = gpu_check.direct_form_flops(gpu_check.FULL, BATCH)

    schedule = training.HParams.from_config(config).schedule
    sampler = jax.jit(lambda p, o, r: dsm.sample(model, p, o, r, schedule, 20, 1e-3))
    obs1, obs256 = data["obs"][:1], data["obs"][:BATCH]

    def measure() -> dict:
        train_sps = per_call / _time(train_call, max(train_steps // per_call, 1))
        params = holder["state"].ema_params  # the chunk donates the previous state
        # A window as long as the reference's (10 calls of ~0.2 s), so a short burst
        # of memory-bandwidth contention from other tenants weighs no more here than there.
        lat1 = _time(lambda: sampler(params, obs1, rng), sample_reps, min_seconds=2.0)
        lat256 = _time(lambda: sampler(params, obs256, rng), 2)
        return {
            "impl": "energyflow-jax", "dtype": dtype, "backend": jax.default_backend(),
            "devices": len(jax.devices()), "device_kind": jax.devices()[0].device_kind,
            "train_steps_per_s_b256": round(train_sps, 3), "train_compile_s": round(compile_s, 1),
            "train_gflop_per_step": round(step_flops / 1e9, 2),  # direct form
            "train_achieved_tflops": round(step_flops * train_sps / 1e12, 3),
            "sample_ms_b1_k20": round(lat1 * 1e3, 2), "sample_ms_b256_k20": round(lat256 * 1e3, 1),
        }

    return measure


def median_result(runs: list[dict]) -> dict:
    """Field-wise median of repeated measurements.

    Fields equal in every run (dtype, devices, parameter count) keep their
    value and type; per-run derived dicts (vs_ref) are left out.
    """
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            continue
        values = [r[key] for r in runs]
        out[key] = value if len(set(values)) == 1 else round(float(np.median(values)), 3)
    return out


def peak_fraction(result: dict) -> float | None:
    """Achieved over the peak of the unit the matmuls run on (tensor cores on GPUs),
    for the devices used."""
    unit = gpu_check.matmul_unit(result["dtype"], "default", result["backend"])
    peak = gpu_check.peak_flops(result["device_kind"], unit, result["devices"])
    return None if peak is None else result["train_achieved_tflops"] * 1e12 / peak


def default_ref_path() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("ENERGYFLOW_REF_TORCH",
                          os.path.join(repo, "..", "shared", "bench", "ref_torch.py"))


def ref_unavailable(path: str) -> str | None:
    """Why the PyTorch reference cannot run here, or None when it can."""
    if not os.path.exists(path):
        return f"{path} not found (pass --ref or set ENERGYFLOW_REF_TORCH)"
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    if probe.returncode != 0:
        return "torch is not importable"
    return None


def bench_ref(path: str, threads: int) -> dict:
    """Run the PyTorch reference in a subprocess (see ref_unavailable)."""
    out = subprocess.run([sys.executable, path, str(threads)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(ours: dict, ref: dict) -> dict:
    r = {
        "train_speedup": ours["train_steps_per_s_b256"] / ref["train_steps_per_s_b256"],
        "sample_b1_latency_ratio": ours["sample_ms_b1_k20"] / ref["sample_ms_b1_k20"],
        "sample_b256_speedup": ref["sample_ms_b256_k20"] / ours["sample_ms_b256_k20"],
    }
    r = {k: round(v, 3) for k, v in r.items()}
    r["meets_targets"] = (r["train_speedup"] >= TARGETS["train_speedup"]
                          and r["sample_b1_latency_ratio"] <= TARGETS["sample_b1_latency_ratio"]
                          and r["sample_b256_speedup"] >= TARGETS["sample_b256_speedup"])
    return r


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ref", default=default_ref_path(), help="path to ref_torch.py")
    parser.add_argument("--no-ref", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating measurements of ours and the reference; "
                             "figures are medians")
    parser.add_argument("--eval-workers", type=int, default=0, metavar="N",
                        help="time only Meta-World evaluation: env steps/s in-process vs N "
                             "worker processes (10 envs x 100 steps, random policy)")
    parser.add_argument("--sac-seeds", type=int, default=0, metavar="N",
                        help="time only SAC's loop step: N seeds as one vmapped group vs N "
                             "groups of one (sweeps/sac.py:table's learner, dense reward)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time an 8-member vmapped sweep against 8 sequential runs")
    parser.add_argument("--gpu-check", action="store_true",
                        help="the accelerator check (energyflow_jax.gpu_check): one JSON line "
                             "per stage, also written to OUT/gpu_check.jsonl")
    parser.add_argument("--out", default="gpu_check", help="--gpu-check's output folder")
    parser.add_argument("--smoke", action="store_true",
                        help="--gpu-check on a tiny model, in seconds (CI runs it on CPU)")
    parser.add_argument("--skip", default="", metavar="STAGES",
                        help="--gpu-check: comma-separated stages not to run (say torch_ref, "
                             "once measured, to reach the later stages sooner)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="--gpu-check skips the stages that would start after this many "
                             "seconds")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.smoke and not args.gpu_check:
        parser.error("--smoke is a mode of --gpu-check")
    if args.gpu_check:
        from energyflow_jax import gpu_check
        return gpu_check.run(args.out, smoke=args.smoke, ref_path=args.ref,
                             budget_s=args.budget_s,
                             skip=tuple(x for x in args.skip.split(",") if x))

    if args.sac_seeds:
        results = bench_sac_seeds(args.sac_seeds, repeats=max(args.repeats, 3))
        print(json.dumps(results, indent=2))
        return results
    if args.eval_workers:
        results = bench_eval_workers(args.eval_workers, repeats=max(args.repeats, 2))
        print(json.dumps(results, indent=2))
        return results
    if args.no_ref:
        ref_skipped = "--no-ref"
    elif jax.default_backend() != "cpu":
        ref_skipped = f"the reference is timed on the CPU only (backend: {jax.default_backend()})"
    else:
        ref_skipped = ref_unavailable(args.ref)
    if ref_skipped:  # said up front, so that a run without ratios is not mistaken for one with
        print(f"bench: not timing the PyTorch reference: {ref_skipped}", file=sys.stderr)
    measures = {d: setup_ours(d) for d in args.dtypes.split(",")}
    # Ours and the reference alternate, and each figure is the median over the
    # repeats: other tenants' load comes and goes within minutes on this CPU,
    # and a one-shot pair can land on different sides of it.
    runs = []
    for _ in tqdm.trange(args.repeats, desc="bench repeats", disable=args.repeats == 1):
        run = {"ours": [measure() for measure in measures.values()]}
        run["ref_torch"] = None if ref_skipped else bench_ref(args.ref, args.threads)
        if run["ref_torch"] is not None:
            for r in run["ours"]:
                r["vs_ref"] = ratios(r, run["ref_torch"])
        runs.append(run)
    results = {"ours": [median_result([run["ours"][i] for run in runs])
                        for i in range(len(measures))],
               "targets": TARGETS, "repeats": args.repeats, "ref_skipped": ref_skipped}
    refs = [run["ref_torch"] for run in runs if run["ref_torch"] is not None]
    results["ref_torch"] = median_result(refs) if refs else None
    for i, r in enumerate(results["ours"]):
        if results["ref_torch"] is not None:
            r["vs_ref"] = ratios(r, results["ref_torch"])  # ratios of the medians
            # Paired: each repeat's ours and reference ran back to back.
            per_repeat = [run["ours"][i]["vs_ref"] for run in runs if "vs_ref" in run["ours"][i]]
            r["vs_ref_median_of_ratios"] = {
                k: round(float(np.median([p[k] for p in per_repeat])), 3)
                for k in ("train_speedup", "sample_b1_latency_ratio", "sample_b256_speedup")}
        frac = peak_fraction(r)
        if frac is not None:
            r["train_peak_flops_fraction"] = round(frac, 4)
    if args.repeats > 1:
        results["runs"] = runs
    if args.sweep:
        # The published shapes, and a member of the shipped toy sweep
        # (sweeps/sweep_toy.py: MLP (128, 128) on 2-D states and actions).
        results["sweep"] = bench_sweep()
        results["sweep_toy_member"] = bench_sweep(mlp_dims=(128, 128), obs_shape=(1, 2),
                                                  action_shape=(1, 2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
    return results


def _print_table(results: dict) -> None:
    rows = [("impl", "train steps/s", "1 chunk ms", "256 chunks ms")]
    ref = results["ref_torch"]
    if ref:
        rows.append(("torch ref", ref["train_steps_per_s_b256"], ref["sample_ms_b1_k20"],
                     ref["sample_ms_b256_k20"]))
    for r in results["ours"]:
        rows.append((f"jax {r['dtype']}", r["train_steps_per_s_b256"], r["sample_ms_b1_k20"],
                     r["sample_ms_b256_k20"]))
    for row in rows:
        print(f"{row[0]:<16}{row[1]:>15}{row[2]:>12}{row[3]:>15}")
    for r in results["ours"]:
        if "vs_ref" in r:
            print(f"{r['dtype']}: {r['vs_ref']}")
    for key in ("sweep", "sweep_toy_member"):
        if key in results:
            print(f"{key}: {results[key]}")


def bench_sweep(n_members: int = 8, steps: int = 20, batch_size: int = 256,
                mlp_dims=(256, 256, 256), repeats: int = 3,
                obs_shape=(2, 39), action_shape=(16, 4)) -> dict:
    """Aggregate DSM steps/s: n_members trained in one vmapped program vs the
    same members one after another with the single-run program
    (`training.make_train_chunk`), in this process.

    Model: the energy MLP (mlp_dims, head 128, embeddings 64, spectral-norm
    head) on the published shapes (obs 2x39, chunk 16x4), batch 256. Compile
    time is excluded from both (reported separately); members differ in seed
    and learning rate.
    """
    from energyflow_jax.config import base_config

    config = base_config()
    config.model.arch = "mlp"
    config.model.mlp_dims = tuple(mlp_dims)
    config.model.head_dims = (128,)
    config.model.state_emb_dim = 64
    config.model.time_emb_dim = 64
    config.optim.warmup_steps = 10
    config.train.batch_size = batch_size
    obs_shape, action_shape = tuple(obs_shape), tuple(action_shape)
    model = EnergyFlowModel.create(config.model, obs_shape, action_shape)
    data = {"obs": jax.random.normal(jax.random.PRNGKey(0), (4096, *obs_shape)),
            "actions": jax.random.normal(jax.random.PRNGKey(1), (4096, *action_shape))}
    lrs = np.geomspace(1e-4, 1e-3, n_members)

    def hparams(i):  # fresh arrays per use: the single-run chunk donates its state
        return training.HParams.from_config(config).replace(learning_rate=jnp.float32(lrs[i]))

    rngs = [jax.random.PRNGKey(i) for i in range(n_members)]
    tx = training.make_optimizer(config.optim)

    def timed(fn):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t

    # Vmapped: one program for all members.
    mesh = training.member_mesh(n_members, 1)  # one device: compare like with like
    vm_chunk = training.make_member_chunk(model, tx, batch_size, steps, mesh)
    vm = {"state": training.stack([training.TrainState.create(model, tx, hparams(i), rngs[i])
                                   for i in range(n_members)])}

    def vm_call():
        vm["state"], m = vm_chunk(vm["state"], data)
        return m

    # One after another: the single-run program, compiled once, called per member.
    chunk = training.make_train_chunk(model, tx, batch_size, steps, training.make_mesh(1))
    states = [training.TrainState.create(model, tx, hparams(i), rngs[i])
              for i in range(n_members)]

    def seq_call():
        out = None
        for i in range(n_members):
            states[i], out = chunk(states[i], data)
            jax.block_until_ready(out)
        return out

    vm_first, seq_first = timed(vm_call), timed(seq_call)  # compiles
    # Interleaved repeats, median: other load on the machine hits both alike.
    vm_times, seq_times = [], []
    for _ in range(repeats):
        vm_times.append(timed(vm_call))
        seq_times.append(timed(seq_call))
    vm_s, seq_s = float(np.median(vm_times)), float(np.median(seq_times))
    total = n_members * steps
    n_params = sum(x.size for x in jax.tree.leaves(states[0].params))
    return {"model": f"mlp{tuple(mlp_dims)} energy, obs {obs_shape}, chunk {action_shape}",
            "n_params": int(n_params),
            "batch_size": batch_size, "n_members": n_members, "steps_per_member": steps,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "vmapped_steps_per_s": round(total / vm_s, 2),
            "sequential_steps_per_s": round(total / seq_s, 2),
            "speedup": round(seq_s / vm_s, 3),
            "vmapped_compile_s": round(vm_first - vm_s, 1),
            "sequential_compile_s": round(seq_first - seq_s, 1),
            "repeats": repeats}


def bench_eval_workers(num_workers: int, n_envs: int = 10, steps: int = 100,
                       repeats: int = 4, task: str = "button-press-v3") -> dict:
    """Env steps/s of the rollout with the envs in this process vs in worker processes.

    A random policy, so the figure is the environment side alone. The two
    alternate (order flipped every repeat); the speedup is the median of
    per-repeat ratios. Start-up (building envs, spawning workers) is reported
    separately.
    """
    from energyflow_jax.envs.workers import make_batched_env
    from energyflow_jax.evaluation import metaworld_eval
    from energyflow_jax.evaluation.rollout import rollout

    spec = metaworld_eval.eval_env_spec(task, n_envs, seed=0, max_steps=steps)
    rates = {0: [], num_workers: []}
    startup = {0: [], num_workers: []}
    for r in range(repeats):
        for workers in ((0, num_workers) if r % 2 == 0 else (num_workers, 0)):
            t0 = time.perf_counter()
            env = make_batched_env(spec, n_envs, workers)
            t1 = time.perf_counter()
            try:
                out = rollout(env, metaworld_eval.make_random_policy_fn(8, seed=r),
                              list(range(n_envs)), 2, 8, steps)
            finally:
                env.close()
            rates[workers].append(out.env_steps / (time.perf_counter() - t1))
            startup[workers].append(t1 - t0)
    ratios = [w / s for s, w in zip(rates[0], rates[num_workers])]
    return {"task": task, "n_envs": n_envs, "steps": steps, "repeats": repeats,
            "num_workers": num_workers,
            "in_process_steps_per_s": round(float(np.median(rates[0])), 1),
            "workers_steps_per_s": round(float(np.median(rates[num_workers])), 1),
            "workers_speedup_median_of_ratios": round(float(np.median(ratios)), 3),
            "per_repeat_ratios": [round(x, 3) for x in ratios],
            "in_process_startup_s": round(float(np.median(startup[0])), 2),
            "workers_startup_s": round(float(np.median(startup[num_workers])), 2)}


def bench_sac_seeds(n_seeds: int, steps: int = 100, repeats: int = 5) -> dict:
    """Seed-steps/s of SAC's compiled loop step (`rl.sac.loop._step`: score and insert 2
    transitions per seed, 2 SAC updates, the next actions, fetched) for n_seeds seeds as
    one vmapped group against n_seeds groups of one called in turn, in this process.

    The learner of sweeps/sac.py:table ((128, 128) networks, LayerNorm critics, batch
    128, 39-D observations, 4-D actions) with the dense reward, on replay buffers of 1000
    random transitions. The two alternate; the speedup is the median of per-repeat
    ratios; compiling is excluded.
    """
    from energyflow_jax.rewards import energy as rewards
    from energyflow_jax.rl.sac import agent as sac, loop

    config = sac.default_config()
    config.update(hidden_dims=(128, 128), critic_layer_norm=True, batch_size=128,
                  replay_capacity=10_000)
    obs_dim, act_dim, num_envs = 39, 4, 2
    reward = rewards.make_reward_fn("dense")
    gen = np.random.default_rng(0)

    def transitions(n_runs: int, n: int) -> dict:
        shape = (n_runs, n)
        return {"obs": gen.normal(size=(*shape, obs_dim)).astype(np.float32),
                "actions": gen.uniform(-1, 1, (*shape, act_dim)).astype(np.float32),
                "masks": np.ones(shape, np.float32),
                "next_obs": gen.normal(size=(*shape, obs_dim)).astype(np.float32),
                "reward_inputs": rewards.RewardInputs(
                    obs=gen.normal(size=(*shape, 1, obs_dim)).astype(np.float32),
                    action=gen.uniform(-1, 1, (*shape, act_dim)).astype(np.float32),
                    env_reward=gen.normal(size=shape).astype(np.float32),
                    success=np.zeros(shape, np.float32))}

    def group(seeds) -> loop.LoopState:
        example = loop.transition_example(obs_dim, act_dim, 1, learned=False)
        members = []
        for seed in seeds:
            member_config = config.copy_and_resolve_references()
            member_config.seed = seed
            members.append(loop.fresh_state(member_config, obs_dim, act_dim, example, num_envs))
        state = training.stack(members)
        fill = transitions(len(seeds), 1000)
        state, *_ = loop._step(state, fill, fill["obs"][:, :num_envs], reward, 0,
                               config.batch_size, None, True)
        return state

    groups = {"vmapped": [group(range(n_seeds))], "one_by_one": [group([s]) for s in range(n_seeds)]}
    inputs = {name: [transitions(g.rng.shape[0], num_envs) for g in gs]
              for name, gs in groups.items()}

    def run(name: str, n_steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            for i, (state, batch) in enumerate(zip(groups[name], inputs[name])):
                state, _, actions, _ = loop._step(state, batch, batch["next_obs"], reward,
                                                  2, config.batch_size, None, False)
                np.asarray(actions)  # the loop's one host sync per step
                groups[name][i] = state
        return time.perf_counter() - t0

    for name in groups:
        run(name, 2)  # compile
    times = {name: [] for name in groups}
    for r in range(repeats):
        for name in (("vmapped", "one_by_one") if r % 2 == 0 else ("one_by_one", "vmapped")):
            times[name].append(run(name, steps))
    ratios = [b / a for a, b in zip(times["vmapped"], times["one_by_one"])]
    per_s = {name: n_seeds * steps / float(np.median(t)) for name, t in times.items()}
    return {"n_seeds": n_seeds, "steps": steps, "repeats": repeats,
            "vmapped_seed_steps_per_s": round(per_s["vmapped"], 1),
            "one_by_one_seed_steps_per_s": round(per_s["one_by_one"], 1),
            "speedup_median_of_ratios": round(float(np.median(ratios)), 3),
            "per_repeat_ratios": [round(x, 3) for x in ratios]}


if __name__ == "__main__":
    xla_cpu.configure()  # before JAX starts its backend: the measured CPU setting
    main()
