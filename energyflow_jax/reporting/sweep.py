"""Sweep results: mean and std over seeds per setting, the best marked; table and plot."""
from __future__ import annotations

import math
import os

import numpy as np

from energyflow_jax.io import run_dir


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_fmt(v) for v in value) + ")"
    return str(value)


def summarize(config, members: list[dict]) -> dict:
    """Mean and std over seeds per setting; the best setting by sweep.metric."""
    by_setting: dict[int, list[dict]] = {}
    for m in members:
        by_setting.setdefault(m["setting_index"], []).append(m)
    names = sorted({k for m in members for k, v in m["metrics"].items()
                    if isinstance(v, (int, float))})
    rows = []
    for si in sorted(by_setting):
        ms = by_setting[si]
        row = {"setting_index": si, "setting": ms[0]["setting"],
               "seeds": [m["seed"] for m in ms], "group": ms[0]["group"]}
        for name in names:
            vals = np.asarray([m["metrics"][name] for m in ms if name in m["metrics"]], float)
            if vals.size:
                # Sample std over seeds (0 for a single seed).
                row[name] = {"mean": float(vals.mean()),
                             "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                             "n": int(vals.size)}
        rows.append(row)
    metric, mode = config.sweep.metric, config.sweep.metric_mode
    if mode not in ("max", "min"):
        raise ValueError(f"sweep.metric_mode must be 'max' or 'min', got {mode!r}")
    ranked = [r for r in rows if metric in r and math.isfinite(r[metric]["mean"])]
    best = None
    if ranked:
        pick = max if mode == "max" else min
        best = pick(ranked, key=lambda r: r[metric]["mean"])["setting_index"]
    swept = sorted({k for r in rows for k in r["setting"]})
    return {"metric": metric, "metric_mode": mode, "best_setting_index": best,
            "swept_keys": swept, "metric_names": names, "settings": rows, "members": members}


def results_markdown(summary: dict) -> str:
    keys, names = summary["swept_keys"], summary["metric_names"]
    lines = ["# Sweep results", "",
             f"{len(summary['members'])} members, {len(summary['settings'])} settings; "
             f"mean ± std over seeds; best by {summary['metric']} ({summary['metric_mode']}) "
             "marked ★.", ""]
    if "heldout_loss" in names and any(k.startswith("diffusion.") for k in keys):
        lines += ["heldout_loss is measured under each member's own noise schedule, so it "
                  "is not comparable across sigma settings.", ""]
    header = ["", *keys, "seeds", *names, "group"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary["settings"]:
        mark = "★" if r["setting_index"] == summary["best_setting_index"] else ""
        cells = [mark, *[_fmt(r["setting"].get(k, "")) for k in keys], str(len(r["seeds"]))]
        for name in names:
            cells.append(f"{r[name]['mean']:.4f} ± {r[name]['std']:.4f}" if name in r else "")
        cells.append(r["group"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += _published_markdown(summary.get("published"))
    lines += _comparison_markdown(summary.get("kind_comparison"))
    members = [m for m in summary["members"] if "ci95" in m["metrics"]]
    if members:  # success rates: each member with its Wilson interval
        lines += ["", "## Members", "",
                  "| member | " + " | ".join(keys) + " | seed | success % | 95% CI (Wilson) | "
                  "episodes |", "|" + "---|" * (len(keys) + 5)]
        for m in members:
            ev = m["metrics"]
            lo, hi = ev["ci95"]
            lines.append(f"| {m['member']} | " + "".join(f"{_fmt(m['setting'].get(k, ''))} | "
                                                         for k in keys)
                         + f"{m['seed']} | {100 * ev['success_rate']:.1f} | "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}] | {ev['n_episodes']} |")
    return "\n".join(lines) + "\n"


def _published_markdown(table: dict | None) -> list[str]:
    """Our success % (mean ± std over seeds) per column beside the published rows,
    with each row's average over the columns it has."""
    if not table:
        return []
    cols = table["columns"]

    def row(name: str, values: dict) -> str:
        cells = []
        for c in cols:
            v = values.get(c)
            cells.append("-" if v is None else
                         f"{v[0]:.1f} ± {v[1]:.1f}" if isinstance(v, tuple | list) else f"{v:.1f}")
        have = [values[c][0] if isinstance(values[c], tuple | list) else values[c]
                for c in cols if values.get(c) is not None]
        avg = f"{np.mean(have):.1f}" if len(have) == len(cols) else "-"
        return f"| {name} | " + " | ".join(cells) + f" | {avg} |"

    lines = ["", f"## Beside the published numbers ({table['source']})", "",
             "| success % | " + " | ".join(cols) + " | average |", "|" + "---|" * (len(cols) + 2),
             row("ours (mean ± std over seeds)", table["ours"])]
    lines += [row(f"{method} (paper)", values) for method, values in table["published"].items()]
    return lines


def _comparison_markdown(table: dict | None) -> list[str]:
    """Per setting and perturbation level: each kind's success and the paired difference."""
    if not table:
        return []
    a, b = table["a"], table["b"]
    lines = ["", f"## {a} vs {b}, episode by episode", "",
             f"Success % (mean ± std over seeds); {a} - {b} over paired episodes (same seed, "
             "layout and perturbation) with its bootstrap 95% CI.", "",
             f"| setting | level | {a} | {b} | {a} - {b} | 95% CI | pairs |",
             "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        name = ", ".join(f"{k}={_fmt(v)}" for k, v in row["setting"].items()) or "-"
        for lv in row["levels"]:
            d = lv["difference"]
            lines.append(f"| {name} | {lv['level']} | {100 * lv[a]['mean']:.1f} ± "
                         f"{100 * lv[a]['std']:.1f} | {100 * lv[b]['mean']:.1f} ± "
                         f"{100 * lv[b]['std']:.1f} | {100 * d['mean']:+.1f} | "
                         f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | {lv['n_pairs']} |")
    return lines


def plot_comparison(table: dict, path: str) -> None:
    """Success against perturbation level, one panel per setting, one line per kind."""
    from matplotlib.figure import Figure

    rows = table["rows"]
    fig = Figure(figsize=(4.0 * len(rows), 3.2))
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, row in zip(axes, rows):
        levels = [lv["level"] for lv in row["levels"]]
        for kind in (table["a"], table["b"]):
            ax.errorbar(range(len(levels)), [100 * lv[kind]["mean"] for lv in row["levels"]],
                        yerr=[100 * lv[kind]["std"] for lv in row["levels"]], marker="o",
                        capsize=3, label=kind)
        ax.set_xticks(range(len(levels)), levels)
        ax.set_ylim(-5, 105)
        ax.set_xlabel("perturbation level")
        ax.set_ylabel("success %")
        ax.set_title(", ".join(f"{_fmt(v)}" for v in row["setting"].values()) or "all", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"{table['a']} vs {table['b']}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def plot_results(summary: dict, path: str) -> None:
    """One panel per (metric, swept key): mean ± std vs that key's value, one
    line per combination of the other swept keys."""
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    keys = summary["swept_keys"] or ["setting_index"]
    names = summary["metric_names"]
    fig = Figure(figsize=(4.5 * len(keys), 3.5 * len(names)))
    axes = fig.subplots(len(names), len(keys), squeeze=False)
    rows = summary["settings"]
    for j, key in enumerate(keys):
        def value(r, k=key):
            return r["setting_index"] if k == "setting_index" else r["setting"].get(k)
        values = [value(r) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({_fmt(v) for v in values}) if not numeric else None
        others = [k for k in keys if k != key and k != "setting_index"]
        lines: dict[str, list[dict]] = {}
        for r in rows:
            lines.setdefault(", ".join(f"{k}={_fmt(r['setting'].get(k))}" for k in others), []).append(r)
        for i, name in enumerate(names):
            ax = axes[i, j]
            for label, rs in lines.items():
                rs = [r for r in rs if name in r]
                if not rs:
                    continue
                xs = [value(r) if numeric else labels.index(_fmt(value(r))) for r in rs]
                order = np.argsort(xs)
                ax.errorbar(np.asarray(xs, float)[order], [rs[o][name]["mean"] for o in order],
                            yerr=[rs[o][name]["std"] for o in order], marker="o", capsize=3,
                            label=label or None)
                best = [k for k, r in enumerate(rs) if r["setting_index"] == summary["best_setting_index"]]
                if best and name == summary["metric"]:
                    ax.scatter([xs[best[0]]], [rs[best[0]][name]["mean"]], s=150,
                               facecolors="none", edgecolors="red", zorder=5)
            if numeric and min(values) > 0 and max(values) / min(values) >= 10:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
            ax.set_xlabel(key)
            ax.set_ylabel(name)
            if i == 0 and len(lines) > 1:
                ax.legend(fontsize=6)
    fig.suptitle(f"Sweep: mean ± std over seeds (best by {summary['metric']} circled)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def write_results(workdir: str, summary: dict) -> None:
    run_dir.write_json(os.path.join(workdir, "results.json"), summary)
    run_dir.atomic_write_text(os.path.join(workdir, "results.md"), results_markdown(summary))
    plot_results(summary, os.path.join(workdir, "results.png"))
    if summary.get("kind_comparison"):
        plot_comparison(summary["kind_comparison"], os.path.join(workdir, "ood.png"))
