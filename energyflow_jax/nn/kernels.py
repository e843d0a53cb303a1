"""CPU-fast kernels for 1-D convolutions and small dots, all lowered to dense matmuls.

XLA's CPU convolutions are about 10x slower than its dots here, and double
backprop through them is worse (docs/design.md). Large float32 batches use
Winograd minimal filtering, everything else shifted windows and one dot; both
lower to dense dots on every backend.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero



# Up to this many rows the dot of _small_matmul's transposed form was faster
# in a standalone chain of 1280 x 256 weights (2x at 4 rows, 1.3x at 16,
# 1.08x at 64; a tie at 256).
SMALL_MATMUL_MAX_ROWS = 64


@jax.custom_jvp
def _small_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w (float32) for a few rows of x, whose input cotangent is fast.

    At batch 1 the dots have 4 to 16 rows and stream their weights from
    memory. Reverse mode would compute the cotangent as g @ w.T, a dot whose
    XLA:CPU kernel streamed the weights at half the speed (19 vs 38 GB/s at 4
    rows) of (w @ g.T).T. The tangent rule below is written so that its
    transpose is that form; the optimization barrier keeps XLA from
    canonicalising it back. The primal stays the plain x @ w, so only
    forward-mode derivatives run the slower form.
    """
    return x @ w


@functools.partial(_small_matmul.defjvp, symbolic_zeros=True)
def _small_matmul_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = x @ w
    terms = []
    if not isinstance(dx, SymbolicZero):
        rows = dx.reshape(-1, dx.shape[-1])
        # (dx @ w).T as a dot of w with dx.T: reverse mode transposes this
        # into w @ g.T (then .T), the fast form.
        dy_t = jax.lax.dot_general(w, jax.lax.optimization_barrier(rows.T),
                                   (((0,), (0,)), ((), ())))
        terms.append(dy_t.T.reshape(y.shape))
    if not isinstance(dw, SymbolicZero):
        terms.append(x @ dw)
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


def _matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x @ w in the compute dtype, returning that dtype.

    Returning the compute dtype (not float32) matters under bfloat16: the
    cotangents flowing back are then bfloat16 too, so the backward and
    second-order dots also run as bfloat16 matmuls (accumulated in float32 by
    the backends) instead of falling back to float32 with converts.
    A float32 dot with at most SMALL_MATMUL_MAX_ROWS rows (batch-1 sampling)
    is _small_matmul, whose cotangent streams the weights faster.
    """
    x, w = x.astype(dtype), w.astype(dtype)
    if jnp.dtype(dtype) == jnp.float32 and math.prod(x.shape[:-1]) <= SMALL_MATMUL_MAX_ROWS:
        return _small_matmul(x, w)
    return jnp.dot(x, w)


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
    if batch == 1:
        windows = (m @ x[0])[None]
    else:
        windows = jnp.einsum("wl,blc->bwc", m, x)
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


def _winograd_conv(x: jax.Array, kernel: jax.Array, kernel_size: int) -> jax.Array:
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
    prod = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # (n, B*T, N)
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

