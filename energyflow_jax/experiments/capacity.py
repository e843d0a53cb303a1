"""Capacity experiment: does the Rademacher complexity of conservative fields stay flat
in the action dimension d while that of free fields grows like sqrt(d) (Theorem 3.6)?
And does the generalisation gap follow?

`run(config, workdir)` (config: sweeps/capacity.py) writes
  capacity.json        every measured number, fitted log-log slopes and the theory's;
  complexity_vs_d.png  R_hat vs d per class and n (log-log, slopes in the legend);
  gap_vs_d.png         generalisation gap and clean / shifted errors vs d;
and returns a flat summary of the slopes.

Each (class, n) of the Rademacher sweep and each class of the generalisation sweep is
one compiled program covering every d (zero-padded to the largest, padded coordinates
inert) and every sign draw / restart / seed (vmapped).
"""

from __future__ import annotations

import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from energyflow_jax import config as config_lib
from energyflow_jax.io import run_dir
from energyflow_jax.capacity import generalization, rademacher

MODEL_CLASSES = ("conservative", "free")
# Exponents of d in the theorem's bounds: free Lambda B sqrt(d / n), conservative Lambda L / sqrt(n).
THEORY_D_SLOPE = {"conservative": 0.0, "free": 0.5}
THEORY_N_SLOPE = -0.5


# ----------------------------------------------------------------------------- fitting


def fit_loglog(x, y) -> dict:
    """Least-squares slope of log y on log x, with its standard error (NaN if < 2 points
    or any y <= 0: such points are dropped and counted)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(y) & (y > 0)
    lx, ly = np.log(x[keep]), np.log(y[keep])
    result = {"n_points": int(keep.sum()), "n_dropped": int((~keep).sum())}
    if keep.sum() < 2:
        return {**result, "slope": float("nan"), "intercept": float("nan"), "slope_stderr": float("nan")}
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    dof = keep.sum() - 2
    stderr = np.sqrt(resid @ resid / dof / np.sum((lx - lx.mean()) ** 2)) if dof > 0 else float("nan")
    return {**result, "slope": float(slope), "intercept": float(intercept), "slope_stderr": float(stderr)}


def fit_pooled_slope(groups: list[tuple]) -> dict:
    """One common log-log slope across groups (e.g. sample sizes), each with its own
    intercept: centre log x and log y within each group, then regress."""
    lx, ly = [], []
    for x, y in groups:
        x, y = np.asarray(x, float), np.asarray(y, float)
        keep = np.isfinite(y) & (y > 0)
        if keep.sum() >= 2:
            gx, gy = np.log(x[keep]), np.log(y[keep])
            lx.append(gx - gx.mean())
            ly.append(gy - gy.mean())
    if not lx:
        return {"slope": float("nan"), "slope_stderr": float("nan")}
    lx, ly = np.concatenate(lx), np.concatenate(ly)
    slope = float(lx @ ly / (lx @ lx))
    resid = ly - slope * lx
    dof = max(len(lx) - len(groups) - 1, 1)
    return {"slope": slope, "slope_stderr": float(np.sqrt(resid @ resid / dof / (lx @ lx)))}


# ----------------------------------------------------------------------------- sweeps


def action_masks(action_dims, d_max: int) -> jax.Array:
    return jnp.stack([(jnp.arange(d_max) < d).astype(jnp.float32) for d in action_dims])


def rademacher_program(field_class, keys, masks, n, n_draws, n_restarts, steps, scale, n_ref_draws, lr):
    """All action dimensions (padded) x sign draws x restarts for one class and one n."""
    state_dim = field_class.state_dim

    def one_setting(key, mask):
        k_x, k_est, k_ref = jax.random.split(key, 3)
        x = generalization.sample_inputs(k_x, n, state_dim, mask, scale)
        out = rademacher.estimate_rademacher(field_class, x, k_est, n_draws, n_restarts, steps, lr, mask)
        del out["sigma"]
        # Closed-form reference classes on the same points; their sups cost nothing, so
        # they get many more sign draws and show the exact sqrt(d) law cleanly.
        sigma = rademacher.rademacher_signs(k_ref, (n_ref_draws, n, mask.shape[0])) * mask
        out["ref_constant_field"] = jax.vmap(lambda s: rademacher.constant_field_sup(s, 1.0))(sigma)
        out["ref_linear_frobenius"] = jax.vmap(lambda s: rademacher.linear_frobenius_sup(x, s, 1.0))(sigma)
        return out

    return jax.vmap(one_setting)(keys, masks)


@functools.lru_cache(maxsize=None)
def _jitted(kind: str, fast_compile: bool):
    """The two sweep programs, jitted. fast_compile: XLA backend optimisation level 0,
    which compiles ~3x faster and runs ~3-5x slower: worth it only for tiny sweeps."""
    options = {"xla_backend_optimization_level": 0} if fast_compile else None
    if kind == "rademacher":
        return jax.jit(rademacher_program, static_argnums=(0, 3, 4, 5, 6, 7, 8), compiler_options=options)
    return jax.jit(generalization.generalization_sweep, static_argnums=(0,),
                   static_argnames=generalization.GENERALIZATION_STATIC_ARGNAMES, compiler_options=options)


def rademacher_sweep(config, progress=None) -> dict:
    """Returns {"rows": [...], "references": [...]}: one row per (class, d, n)."""
    rc = config.rademacher
    dims = tuple(config.action_dims)
    d_max = max(dims)
    masks = action_masks(dims, d_max)
    rows, refs = [], []
    for class_name in MODEL_CLASSES:
        field_class = rademacher.build_class(class_name, config.state_dim, d_max, tuple(config.hidden_widths),
                                             config.spectral_bound, config.activation)
        for n in rc.sample_sizes:
            # Same key per (n, d) for both classes: both are probed on the same points and signs.
            keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), n), d)
                              for d in dims])
            start = time.perf_counter()
            program = _jitted("rademacher", bool(config.get("fast_compile", False)))
            out = jax.device_get(program(field_class, keys, masks, int(n), int(rc.n_sign_draws),
                                                     int(rc.n_restarts), int(rc.ascent_steps), rc.input_scale,
                                                     int(rc.reference_sign_draws), float(rc.ascent_lr)))
            seconds = time.perf_counter() - start
            steps = int(rc.ascent_steps)
            for i, d in enumerate(dims):
                trace = out["trace"][i]
                rows.append({
                    "class": class_name, "d": int(d), "n": int(n),
                    "mean": float(out["mean"][i]), "std": float(out["std"][i]),
                    "per_draw": out["per_draw"][i].tolist(),
                    # Share of the sup a constant field (the sample mean of f) accounts for.
                    "constant_share": float(out["constant_part"][i].mean() / out["mean"][i]),
                    # Ascent still climbing? final / value at 80% of the steps (1.0 = flat).
                    "final_over_80pct": float(trace[-1] / trace[int(0.8 * steps)]),
                    "program_seconds": seconds,
                })
                if class_name == MODEL_CLASSES[0]:
                    for ref in ("constant_field", "linear_frobenius"):
                        values = out[f"ref_{ref}"][i]
                        refs.append({"class": ref, "d": int(d), "n": int(n), "bound": 1.0, "n_draws": len(values),
                                     "mean": float(values.mean()), "std": float(values.std())})
            if progress is not None:
                progress.set_postfix_str(f"rademacher {class_name} n={n} ({seconds:.0f}s)")
                progress.update()
    return {"rows": rows, "references": refs}


def generalization_sweep(config, progress=None) -> list[dict]:
    gc = config.generalization
    dims = tuple(gc.action_dims)
    d_max = max(dims)
    masks = action_masks(dims, d_max)
    seed_keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), int(gc.n_seeds))
    # Same target, data and init key per (d, seed) for both classes.
    keys = jnp.stack([jax.vmap(lambda k: jax.random.fold_in(k, d))(seed_keys) for d in dims])
    rows = []
    for class_name in MODEL_CLASSES:
        field_class = rademacher.build_class(class_name, config.state_dim, d_max, tuple(config.hidden_widths),
                                             config.spectral_bound, config.activation)
        start = time.perf_counter()
        program = _jitted("generalization", bool(config.get("fast_compile", False)))
        out = jax.device_get(program(
            field_class, keys, masks, n_train=int(gc.n_train), n_test=int(gc.n_test), steps=int(gc.train_steps),
            lr=float(gc.train_lr), n_features=int(gc.target_features), frequency=float(gc.target_frequency),
            label_noise=float(gc.label_noise), ood_shift=float(gc.ood_shift), scale=gc.input_scale))
        seconds = time.perf_counter() - start
        for i, d in enumerate(dims):
            row = {"class": class_name, "d": int(d), "n_train": int(gc.n_train), "program_seconds": seconds}
            for metric, values in out.items():
                row[f"{metric}_mean"] = float(values[i].mean())
                row[f"{metric}_std"] = float(values[i].std())
                row[f"{metric}_per_seed"] = values[i].tolist()
            rows.append(row)
        if progress is not None:
            progress.set_postfix_str(f"generalization {class_name} ({seconds:.0f}s)")
            progress.update()
    return rows


# ----------------------------------------------------------------------------- slopes


def rademacher_slopes(rows: list[dict], refs: list[dict]) -> dict:
    slopes = {}
    for name in sorted({r["class"] for r in rows + refs}):
        table = [r for r in rows + refs if r["class"] == name]
        ns = sorted({r["n"] for r in table})
        ds = sorted({r["d"] for r in table})
        by_n = {n: sorted((r for r in table if r["n"] == n), key=lambda r: r["d"]) for n in ns}
        per_n = {}
        for n, group in by_n.items():
            d, m = [r["d"] for r in group], [r["mean"] for r in group]
            half = len(d) // 2
            per_n[str(n)] = {**fit_loglog(d, m),
                             # Local exponents: is the growth a power law or does it bend?
                             "slope_small_d": fit_loglog(d[:half + 1], m[:half + 1])["slope"],
                             "slope_large_d": fit_loglog(d[half:], m[half:])["slope"]}
        n_slopes = {}
        for d in ds:
            group = sorted((r for r in table if r["d"] == d), key=lambda r: r["n"])
            n_slopes[str(d)] = fit_loglog([r["n"] for r in group], [r["mean"] for r in group])["slope"]
        slopes[name] = {
            "d_slope_pooled": fit_pooled_slope([([r["d"] for r in g], [r["mean"] for r in g]) for g in by_n.values()]),
            "d_slope_per_n": per_n,
            "n_slope_per_d": n_slopes,
            "n_slope_pooled": fit_pooled_slope([
                ([r["n"] for r in table if r["d"] == d], [r["mean"] for r in table if r["d"] == d]) for d in ds]),
            "theory_d_slope": THEORY_D_SLOPE.get(name, 0.5),  # references: exactly sqrt(d)
            "theory_n_slope": THEORY_N_SLOPE,
        }
    return slopes


GENERALIZATION_METRICS = ("gap", "test_clean_err", "ood_clean_err", "train_err", "test_err")


def generalization_slopes(rows: list[dict]) -> dict:
    slopes = {}
    for name in MODEL_CLASSES:
        group = sorted((r for r in rows if r["class"] == name), key=lambda r: r["d"])
        if not group:
            continue
        d = [r["d"] for r in group]
        slopes[name] = {metric: fit_loglog(d, [r[f"{metric}_mean"] for r in group]) for metric in GENERALIZATION_METRICS}
        slopes[name]["theory_gap_slope"] = THEORY_D_SLOPE[name]
    return slopes


# ----------------------------------------------------------------------------- plots


def _plot_complexity(path, rows, refs, slopes):
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    colors = {"conservative": "tab:blue", "free": "tab:red"}
    ns = sorted({r["n"] for r in rows})
    markers = "osd^v<>"
    for name in MODEL_CLASSES:
        for j, n in enumerate(ns):
            group = sorted((r for r in rows if r["class"] == name and r["n"] == n), key=lambda r: r["d"])
            d = np.array([r["d"] for r in group])
            fit = slopes[name]["d_slope_per_n"][str(n)]
            ax.errorbar(d, [r["mean"] for r in group], yerr=[r["std"] for r in group], color=colors[name],
                        marker=markers[j % len(markers)], ls="none", alpha=0.4 + 0.6 * (j + 1) / len(ns), capsize=2)
            ax.plot(d, np.exp(fit["intercept"]) * d ** fit["slope"], color=colors[name],
                    alpha=0.4 + 0.6 * (j + 1) / len(ns), label=f"{name}, n={n}: slope {fit['slope']:.2f}")
    n_ref = ns[-1]
    group = sorted((r for r in refs if r["class"] == "constant_field" and r["n"] == n_ref), key=lambda r: r["d"])
    fit = slopes["constant_field"]["d_slope_per_n"][str(n_ref)]
    ax.plot([r["d"] for r in group], [r["mean"] for r in group], "k--", alpha=0.6,
            label=f"constant fields ||c||<=1 (conservative), n={n_ref}: slope {fit['slope']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("action dimension d")
    ax.set_ylabel(r"empirical Rademacher complexity $\hat R$")
    ax.set_title("Theorem 3.6: free ~ d^0.5, conservative ~ d^0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_gap(path, rows, slopes):
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    colors = {"conservative": "tab:blue", "free": "tab:red"}
    for name in MODEL_CLASSES:
        group = sorted((r for r in rows if r["class"] == name), key=lambda r: r["d"])
        if not group:
            continue
        d = np.array([r["d"] for r in group])
        for ax, metrics in ((axes[0], ("gap",)), (axes[1], ("test_clean_err", "ood_clean_err"))):
            for metric, ls in zip(metrics, ("-", ":")):
                fit = slopes[name][metric]
                ax.errorbar(d, [r[f"{metric}_mean"] for r in group], yerr=[r[f"{metric}_std"] for r in group],
                            color=colors[name], ls=ls, marker="o", capsize=2,
                            label=f"{name} {metric}: slope {fit['slope']:.2f}")
                if np.isfinite(fit["slope"]):
                    ax.plot(d, np.exp(fit["intercept"]) * d ** fit["slope"], color=colors[name], ls=ls, lw=0.8,
                            alpha=0.5)
    axes[0].set_title("generalisation gap (test - train, noisy labels)")
    axes[1].set_title("error vs the true field: in distribution / shifted")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("action dimension d")
        ax.legend(fontsize=7)
    axes[1].set_ylabel(r"$E\|f - f^*\|^2$  ($E\|f^*\|^2 = 1$)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- entry point


def summarize(slopes: dict, gen_slopes: dict, rows: list[dict]) -> dict:
    summary = {}
    n_max, dims = max(r["n"] for r in rows), sorted({r["d"] for r in rows})
    for name in MODEL_CLASSES:
        for d in (dims[0], dims[-1]):
            row = next(r for r in rows if r["class"] == name and r["n"] == n_max and r["d"] == d)
            summary[f"rademacher_{name}_d{d}_n{n_max}"] = row["mean"]
            summary[f"constant_share_{name}_d{d}_n{n_max}"] = row["constant_share"]
    for name in (*MODEL_CLASSES, "constant_field", "linear_frobenius"):
        if name in slopes:
            summary[f"rademacher_d_slope_{name}"] = slopes[name]["d_slope_pooled"]["slope"]
            summary[f"rademacher_n_slope_{name}"] = slopes[name]["n_slope_pooled"]["slope"]
    for name in MODEL_CLASSES:
        summary[f"theory_d_slope_{name}"] = THEORY_D_SLOPE[name]
        if name in gen_slopes:
            for metric in ("gap", "test_clean_err", "ood_clean_err"):
                summary[f"{metric}_d_slope_{name}"] = gen_slopes[name][metric]["slope"]
    return summary


def train_and_evaluate(config, workdir) -> dict:
    """Runs the sweep described by `config`, writes capacity.json and the two plots to
    `workdir`, and returns the summary (fitted slopes)."""
    config_lib.validate(config)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    n_programs = len(MODEL_CLASSES) * (len(config.rademacher.sample_sizes) + int(config.generalization.enabled))
    with tqdm(total=n_programs, desc="capacity sweep", unit="program") as progress:
        rad = rademacher_sweep(config, progress)
        gen_rows = generalization_sweep(config, progress) if config.generalization.enabled else []
    slopes = rademacher_slopes(rad["rows"], rad["references"])
    gen_slopes = generalization_slopes(gen_rows)
    summary = summarize(slopes, gen_slopes, rad["rows"])
    summary["runtime_seconds"] = time.perf_counter() - start

    _plot_complexity(os.path.join(workdir, "complexity_vs_d.png"), rad["rows"], rad["references"], slopes)
    if gen_rows:
        _plot_gap(os.path.join(workdir, "gap_vs_d.png"), gen_rows, gen_slopes)

    report = {
        "experiment": "capacity",
        "config": config.to_dict(),
        "definition": "R_hat = E_sigma sup_f (1/n) sum_i <sigma_i, f(x_i)>, sigma_i uniform in {-1,+1}^d; "
                      "sup by Adam ascent over norm-constrained parameters (a lower bound), best of restarts, "
                      "mean/std over sign draws",
        "theory": {"d_slope": THEORY_D_SLOPE, "n_slope": THEORY_N_SLOPE,
                   "statement": "free fields: Lambda*B*sqrt(d)/sqrt(n); conservative: Lambda*L/sqrt(n) (no d)"},
        "rademacher": rad["rows"],
        "rademacher_references": rad["references"],
        "generalization": gen_rows,
        "slopes": {"rademacher": slopes, "generalization": gen_slopes},
        "summary": summary,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()], "python": platform.python_version()},
    }
    run_dir.write_json(os.path.join(workdir, "capacity.json"), report)
    return summary
