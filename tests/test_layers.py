"""The package's shape: the layers contract, no import cycles, no process-wide state at import."""
import os
import pathlib
import subprocess
import sys

import grimp

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_layers_contract_kept():
    # pyproject.toml's [tool.importlinter] contract: nn -> models -> objectives -> policy ->
    # training -> data/envs -> evaluation -> rewards -> rl -> sweep -> experiments -> main.
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lint-imports")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("energyflow_jax")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(imported, module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    # A package's __init__ importing its own submodules is not a cycle of the design.
    cycles = [c for c in cycles if not _init_reexport(c)]
    assert not cycles, "\n".join(cycles)


def _init_reexport(cycle: str) -> bool:
    first, second = cycle.split(" -> ")[:2]
    return second.startswith(first + ".") or first.startswith(second + ".")


def test_importing_every_module_changes_no_process_state():
    code = """
import os, sys, pkgutil, importlib
# Third-party packages set variables of their own when imported (TF_CPP_MIN_LOG_LEVEL,
# PYGAME_HIDE_SUPPORT_PROMPT, ...): import them first, then compare what ours adds.
for dep in ("jax", "flax.linen", "optax", "orbax.checkpoint", "distrax", "gymnasium",
            "metaworld", "tensorboardX", "matplotlib", "ml_collections", "tqdm"):
    importlib.import_module(dep)
before = dict(os.environ)
import energyflow_jax
for m in pkgutil.walk_packages(energyflow_jax.__path__, "energyflow_jax."):
    importlib.import_module(m.name)
changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
assert not changed, changed
import jax
assert not jax._src.xla_bridge.backends_are_initialized(), "a JAX backend started at import"
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
