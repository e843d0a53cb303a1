"""The layers' kernels: 1-D convolution forms and dots, chosen by a KernelPolicy.

On CPU, XLA's convolutions are about 10x slower than its dots, and double
backprop through them is worse (docs/design.md): there every convolution is a
dense matmul, Winograd minimal filtering for large float32 batches and shifted
windows with one dot otherwise. On GPU and TPU the backend's own convolution
(`lax.conv_general_dilated`, cuDNN on NVIDIA) does each pass in one kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

CONV_IMPLS = ("auto", "lax", "winograd", "windows")
# model.matmul_precision -> lax.Precision of the network's dots and convolutions.
# "default" lets the backend choose (TF32 on recent NVIDIA GPUs, bfloat16 passes
# on TPU); normalization statistics, the sampler's step selection and the
# spectral-norm power iteration always run at HIGHEST.
MATMUL_PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH,
                     "highest": jax.lax.Precision.HIGHEST}
HIGHEST = jax.lax.Precision.HIGHEST
# The resolved form of conv_impl="auto" on CPU: shifted windows below
# WINOGRAD_MIN_BATCH, Winograd from there (float32 only); measured in docs/performance.md.
CPU_MEASURED = "windows+winograd"


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """How the layers compute (hashable: a flax module attribute).

    conv: "lax" (the backend's convolution; strided ones as stride 1 then a
    subsample, so no derivative is an lhs-dilated convolution), "winograd"
    (Winograd for every stride-1 convolution, shifted windows for the rest),
    "windows" (shifted windows and one dot), or CPU_MEASURED. Every form has
    the same parameters and computes the same function.
    precision: a key of MATMUL_PRECISIONS.
    """

    conv: str = CPU_MEASURED
    precision: str = "default"

    @property
    def dot_precision(self):
        return MATMUL_PRECISIONS[self.precision]

    @property
    def plain(self) -> bool:
        """The accelerator forms: plain dots, gathers and broadcasts instead of the
        CPU's matmul tricks (the batch-1 cotangent form, one-hot selection, the
        GroupNorm spread dot)."""
        return self.conv == "lax"


def resolve_policy(conv_impl: str = "auto", matmul_precision: str = "default",
                   dtype: str = "float32", backend: str | None = None) -> KernelPolicy:
    """The KernelPolicy of model.conv_impl / model.matmul_precision on `backend`
    (default: jax.default_backend()). "auto" is CPU_MEASURED on CPU and "lax" on
    GPU and TPU. Unknown names, and Winograd under bfloat16 (its transforms
    amplify bfloat16 rounding), raise ValueError."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"model.matmul_precision must be one of {tuple(MATMUL_PRECISIONS)}, "
                         f"got {matmul_precision!r}")
    if conv_impl == "winograd" and dtype == "bfloat16":
        raise ValueError("model.conv_impl='winograd' cannot run with model.dtype='bfloat16': "
                         "the Winograd transforms amplify bfloat16 rounding; use 'lax' or "
                         "'windows' (or 'auto')")
    if conv_impl == "auto":
        conv_impl = CPU_MEASURED if (backend or jax.default_backend()) == "cpu" else "lax"
    return KernelPolicy(conv_impl, matmul_precision)


# Up to this many rows the dot of _small_matmul's transposed form was faster
# in a standalone chain of 1280 x 256 weights (2x at 4 rows, 1.3x at 16,
# 1.08x at 64; a tie at 256).
SMALL_MATMUL_MAX_ROWS = 64


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _small_matmul(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """x @ w (float32) for a few rows of x, whose input cotangent is fast.

    At batch 1 the dots have 4 to 16 rows and stream their weights from
    memory. Reverse mode would compute the cotangent as g @ w.T, a dot whose
    XLA:CPU kernel streamed the weights at half the speed (19 vs 38 GB/s at 4
    rows) of (w @ g.T).T. The tangent rule below is written so that its
    transpose is that form; the optimization barrier keeps XLA from
    canonicalising it back. The primal stays the plain x @ w, so only
    forward-mode derivatives run the slower form.
    """
    return jnp.dot(x, w, precision=precision)


@functools.partial(_small_matmul.defjvp, symbolic_zeros=True)
def _small_matmul_jvp(precision, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = jnp.dot(x, w, precision=precision)
    terms = []
    if not isinstance(dx, SymbolicZero):
        rows = dx.reshape(-1, dx.shape[-1])
        # (dx @ w).T as a dot of w with dx.T: reverse mode transposes this
        # into w @ g.T (then .T), the fast form.
        dy_t = jax.lax.dot_general(w, jax.lax.optimization_barrier(rows.T),
                                   (((0,), (0,)), ((), ())), precision=precision)
        terms.append(dy_t.T.reshape(y.shape))
    if not isinstance(dw, SymbolicZero):
        terms.append(jnp.dot(x, dw, precision=precision))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


def _matmul(x: jax.Array, w: jax.Array, dtype, policy: KernelPolicy = KernelPolicy()) -> jax.Array:
    """x @ w in the compute dtype, returning that dtype.

    Returning the compute dtype (not float32) matters under bfloat16: the
    cotangents flowing back are then bfloat16 too, so the backward and
    second-order dots also run as bfloat16 matmuls (accumulated in float32 by
    the backends) instead of falling back to float32 with converts.
    A float32 dot with at most SMALL_MATMUL_MAX_ROWS rows (batch-1 sampling)
    is _small_matmul, whose cotangent streams the weights faster (CPU forms only).
    """
    x, w = x.astype(dtype), w.astype(dtype)
    if (not policy.plain and jnp.dtype(dtype) == jnp.float32
            and math.prod(x.shape[:-1]) <= SMALL_MATMUL_MAX_ROWS):
        return _small_matmul(x, w, policy.dot_precision)
    return jnp.dot(x, w, precision=policy.dot_precision)


def window_matrix(length: int, kernel_size: int, stride: int = 1) -> np.ndarray:
    """The 0/1 matrix M, (out_len * kernel_size, length), of 'same'-padded windows.

    (M @ x)[o * kernel_size + j] = x[o * stride + j - kernel_size // 2], and 0
    where that index falls in the padding.
    """
    pad = kernel_size // 2
    out_len = -(-length // stride)
    m = np.zeros((out_len, kernel_size, length), np.float32)
    for o in range(out_len):
        for j in range(kernel_size):
            i = o * stride + j - pad
            if 0 <= i < length:
                m[o, j, i] = 1.0
    return m.reshape(out_len * kernel_size, length)


def _shifted_windows(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """(B, L, C) -> (B, ceil(L / stride), kernel_size * C), zero padded 'same'.

    One dot with window_matrix rather than pad, slices and concatenate: at
    batch 1 those became a dozen tiny kernels per convolution (forward and
    backward) and the batch-1 sampler ran about 20% slower.
    """
    batch, length, channels = x.shape
    m = jnp.asarray(window_matrix(length, kernel_size, stride), x.dtype)
    out_len = m.shape[0] // kernel_size
    # HIGHEST: a 0/1 selection must copy its inputs exactly whatever the policy.
    if batch == 1:
        windows = jnp.dot(m, x[0], precision=HIGHEST)[None]
    else:
        windows = jnp.einsum("wl,blc->bwc", m, x, precision=HIGHEST)
    return windows.reshape(batch, out_len, kernel_size * channels)



# Winograd / Toom-Cook interpolation points; the last one is infinity.
_WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)
# Outputs per Winograd tile. F(4, 5) does 8 channel matmuls per 4 outputs where
# the window form does 20 (5 per output); its float32 error is about 3e-7
# relative (tested), larger tiles need larger points and lose accuracy fast.
WINOGRAD_TILE = 4


def _vandermonde(n: int, cols: int) -> np.ndarray:
    """(n, cols) evaluation of a degree cols-1 polynomial at n - 1 points and infinity."""
    if n - 1 > len(_WINOGRAD_POINTS):
        raise ValueError(f"{n} evaluation points requested, {len(_WINOGRAD_POINTS) + 1} available")
    v = np.zeros((n, cols))
    for row, p in enumerate(_WINOGRAD_POINTS[: n - 1]):
        v[row] = p ** np.arange(cols)
    v[n - 1, cols - 1] = 1.0  # the point at infinity picks the leading coefficient
    return v


def winograd_matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Toom-Cook matrices (A^T, G, B^T) of the minimal filtering F(m, r).

    The correlation y_i = sum_k d_{i+k} g_k of an (m + r - 1)-long input tile d
    with an r-tap filter g is y = A^T [(G g) * (B^T d)]. It is the transpose of
    polynomial multiplication by evaluation at m + r - 2 points plus infinity,
    built here in float64 from the Vandermonde matrices.
    """
    n = m + r - 1
    return _vandermonde(n, m).T, _vandermonde(n, r), np.linalg.inv(_vandermonde(n, n)).T


def short_sequence_matrices(length: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T, G, B^T) of a whole 'same'-padded r-tap correlation of a length-L sequence.

    With the padding known to be zero, the L outputs are a Toeplitz
    matrix-vector product, the middle product of x with a (2L - 1)-tap filter,
    which takes 2L - 1 multiplies: 7 for L = 4 where F(4, 5) takes 8. Here B^T
    acts on the L real inputs (no padding), y = A^T [(G g) * (B^T x)].
    """
    n, pad = 2 * length - 1, r // 2
    v_x = _vandermonde(n, length)
    embed = np.zeros((n, r))  # filter tap k sits at offset k + L - 1 - pad of the long filter
    for k in range(r):
        if 0 <= k + length - 1 - pad < n:
            embed[k + length - 1 - pad, k] = 1.0
    return v_x.T[::-1], np.linalg.inv(_vandermonde(n, n)).T @ embed, v_x


def _weighted_sum(coeffs: Sequence[float], terms: Sequence[jax.Array | None],
                  zero: jax.Array | None) -> jax.Array:
    """sum_j coeffs[j] * terms[j], skipping zero coefficients and absent terms.

    Scaled sums of whole arrays (not a dot with a tiny constant matrix), so XLA
    fuses each Winograd transform into one elementwise pass.
    """
    acc = None
    for c, term in zip(coeffs, terms):
        if c != 0.0 and term is not None:
            scaled = term if c == 1.0 else term * np.float32(c)
            acc = scaled if acc is None else acc + scaled
    return zero if acc is None else acc


def _winograd_conv(x: jax.Array, kernel: jax.Array, kernel_size: int,
                   precision=None) -> jax.Array:
    """'Same'-padded stride-1 conv of (B, L, C) by a (k*C, N) kernel via Winograd.

    Each tile of 4 outputs reads 4 + k - 1 padded inputs (F(4, k)); sequences
    of at most 4 are one tile over their real inputs (short_sequence_matrices).
    After the input transform B^T, the channel mixing is one batched dot over
    the transformed positions, and A^T maps its result back to the outputs.

    Positions are picked with lax.split and put back with concatenate, never
    with strided slices: the transposes that the score and the DSM gradient
    run through are then splits and concatenates again. The slice form
    transposes to one zero-padded full-size array per tap, which cost as much
    as the matmuls.
    """
    batch, length, channels = x.shape
    r = kernel_size
    if length <= WINOGRAD_TILE:  # one tile whose padding is known to be zero
        m, pad = length, 0
        a_t, g, b_t = short_sequence_matrices(length, r)
    else:
        m, pad = WINOGRAD_TILE, r // 2
        a_t, g, b_t = winograd_matrices(m, r)
    n = len(b_t)
    tiles = -(-length // m)
    positions = jax.lax.split(x, [1] * length, axis=1)  # each (B, 1, C)
    zero_in = jnp.zeros((batch, 1, channels), x.dtype)

    def tile_inputs(t):  # the zero-padded tile: None where it reads padding
        return [positions[p] if 0 <= p < length else None
                for p in range(t * m - pad, t * m - pad + b_t.shape[1])]

    tile_in = [tile_inputs(t) for t in range(tiles)]
    v = jnp.concatenate([
        jnp.concatenate([_weighted_sum(row, tile_in[t], zero_in) for t in range(tiles)],
                        axis=1).reshape(1, batch * tiles, channels)
        for row in b_t], axis=0)  # (n, B*T, C)
    taps = list(kernel.reshape(r, channels, -1))
    u = jnp.stack([_weighted_sum(row, taps, None) for row in g])  # (n, C, N), weights only
    prod = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))),
                               precision=precision)  # (n, B*T, N)
    features = prod.shape[-1]
    # rows[alpha][t]: (B, 1, N), the alpha-th product of tile t
    rows = [jax.lax.split(p.reshape(batch, tiles, features), [1] * tiles, axis=1)
            for p in jax.lax.split(prod, [1] * n, axis=0)]
    zero_out = jnp.zeros((batch, 1, features), prod.dtype)
    outputs = [_weighted_sum(a_t[o % m], [row[o // m] for row in rows], zero_out)
               for o in range(length)]
    return jnp.concatenate(outputs, axis=1)


# Batch size from which the Winograd form pays: its weight transform costs about
# as much as the convolution itself at batch 1, and XLA does not hoist it out
# of a sampler loop.
WINOGRAD_MIN_BATCH = 32



def _lax_conv(x: jax.Array, kernel: jax.Array, kernel_size: int, stride: int,
              precision=None) -> jax.Array:
    """'Same'-padded conv of (B, L, C) by a (k*C, N) kernel with lax.conv_general_dilated.

    A stride-2 convolution is computed at stride 1 and subsampled: the input
    cotangent of a strided convolution is an lhs-dilated (transposed)
    convolution, which XLA on CUDA runs very slowly (jax-ml/jax#23783), and the
    DSM loss differentiates the network twice. The subsample's transpose is a
    pad with interior zeros instead.
    """
    channels = x.shape[-1]
    pad = kernel_size // 2
    y = jax.lax.conv_general_dilated(
        x, kernel.reshape(kernel_size, channels, -1), window_strides=(1,),
        padding=[(pad, kernel_size - 1 - pad)], dimension_numbers=("NWC", "WIO", "NWC"),
        precision=precision)
    return y[:, ::stride] if stride > 1 else y


def conv1d(x: jax.Array, kernel: jax.Array, kernel_size: int, stride: int, dtype,
           policy: KernelPolicy) -> jax.Array:
    """'Same'-padded 1-D convolution (B, L, C) -> (B, ceil(L / stride), N) in the
    form `policy.conv` names; kernel (kernel_size * C, N), taps major."""
    batch = x.shape[0]
    if policy.conv == "lax":
        return _lax_conv(x.astype(dtype), kernel.astype(dtype), kernel_size, stride,
                         policy.dot_precision)
    winograd = stride == 1 and kernel_size > 1 and jnp.dtype(dtype) == jnp.float32 and (
        policy.conv == "winograd"
        or (policy.conv == CPU_MEASURED and batch >= WINOGRAD_MIN_BATCH))
    if winograd:
        return _winograd_conv(x, kernel, kernel_size, policy.dot_precision)
    if kernel_size == 1 and stride == 1:
        windows = x
    else:
        windows = _shifted_windows(x, kernel_size, stride)
    return _matmul(windows, kernel, dtype, policy)
