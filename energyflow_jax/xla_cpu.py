"""The XLA CPU flag the CLI and the benchmark set before JAX starts.

jaxlib 0.10.2 hands dots and reductions to YNNPACK by default on CPU. Its
reductions (GroupNorm statistics here) are slower than XLA's own: keeping
YNNPACK to the dots made sampling 256 chunks about 10% faster and training
about 5% faster on our 2-core machine, with scores equal to 2e-6 relative
(measured with `python -m energyflow_jax.bench`).

XLA reads XLA_FLAGS when JAX first starts its backend, so this only takes
effect if configure() runs before the first JAX computation. The
flag is experimental and XLA aborts on flags it does not know, so it is only
set for the jaxlib it was measured with; a ynn_fusion_type the user set
wins, and ENERGYFLOW_KEEP_XLA_FLAGS=1 leaves XLA_FLAGS alone.
"""
from __future__ import annotations

import importlib.metadata
import os

YNN_DOTS_ONLY = ("--xla_cpu_experimental_ynn_fusion_type="
                 "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
MEASURED_JAXLIB = "0.10.2"


def configure(environ=os.environ) -> bool:
    """Add YNN_DOTS_ONLY to XLA_FLAGS where it is safe; returns whether it did."""
    flags = environ.get("XLA_FLAGS", "")
    if environ.get("ENERGYFLOW_KEEP_XLA_FLAGS") == "1" or "ynn_fusion_type" in flags:
        return False
    try:
        if importlib.metadata.version("jaxlib") != MEASURED_JAXLIB:
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_DOTS_ONLY}".strip()
    return True
