"""Counter-based random numbers: the same draws on every device, drawn where they are used.

A `Stream` is a 64-bit key and a position. Its i-th 64-bit word is SplitMix64's (Steele, Lea and
Flood, OOPSLA 2014): ``mix(key + (i + 1) * 0x9E3779B97F4A7C15)`` with the mixing function of
Vigna's `splitmix64.c` (two xor-shift-multiply rounds and a final xor-shift), computed in torch's
int64 arithmetic (wrapping products, shifts masked to act as logical ones). Integer operations are
exact, so the words are bit for bit the same on every CPU kernel (`ATEN_CPU_CAPABILITY`) and on a
GPU: the noise of a metric can be drawn on the metric's device instead of being drawn on the CPU and
copied (on a GPU the CPU draws cost more than the model's forwards: 1.35 M normals per ViT-B image
for ROAD, ~7 ms on the host of an H200). Each draw is a function of (key, position) alone, so a
sample's noise does not depend on the batch it is in, nor on the device, nor on the threads.

From the words (a sample of m values takes n = ceil(m / 2) words; value j < n comes from word j's
high 32-bit half k1, value n + j from its low half k2):

* **uniform** on [0, 1): ``k * 2^-32``;
* **normal**: Box-Muller on ``u1 = (k1 + 1/2) 2^-32`` and ``u2 = (k2 + 1/2) 2^-32``: value j is
  ``sqrt(-2 ln u1) cos 2πu2``, value n + j ``sqrt(-2 ln u1) sin 2πu2``. The tails stop at
  ``sqrt(2 ln 2^33) = 6.77`` (the smallest u1): for the noise of a metric (σ = 0.01-0.1) no sample
  beyond 6.77 σ matters.

The integer words are exact everywhere; the floating-point steps after them (``log``, ``cos``,
``sin``, ``sqrt``) are each within an ulp or two of the true value on every kernel and device, so the
draws of two machines agree to ~1e-16 relative (tests/test_rng.py checks the words against a pure
Python SplitMix64 and the normals against the formula in Python's `math`), far below the float64
rounding of the model's forwards that follow (docs/numerics.md).
"""
from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
#: the name of these draws (recorded in a suite file's config: a file drawn otherwise is not resumed)
GENERATOR = "splitmix64-boxmuller-v1"


def _signed(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


GOLDEN = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)
#: words computed per block on a CPU (~0.5 MB of int64: the chain of element-wise steps stays in cache;
#: drawing 1.35 M normals in one piece is ~2x slower on one thread)
CPU_BLOCK = 1 << 16


class Stream:
    """A key and a position (the number of 64-bit words used so far); `take(n)` reserves n words."""

    __slots__ = ("key", "position")

    def __init__(self, key: int, position: int = 0):
        self.key = int(key) & _MASK64
        self.position = int(position)

    def take(self, words: int) -> int:
        start = self.position
        self.position += int(words)
        return start

    def __repr__(self):
        return f"Stream(key={self.key:#x}, position={self.position})"


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words by k (torch's >> on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 words (element-wise, wrapping); overwrites z."""
    t = torch.empty_like(z)
    for shift, factor in ((30, MIX1), (27, MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t &= (1 << (64 - shift)) - 1  # a logical shift
        z ^= t
        if factor is not None:
            z *= factor
    return z


def words(keys: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
    """(R,) int64 keys and first positions -> (R, n) int64: words start..start+n-1 of each key's stream."""
    z = starts.view(-1, 1) + torch.arange(1, n + 1, dtype=torch.int64, device=keys.device)
    z *= GOLDEN
    z += keys.view(-1, 1)
    return mix(z)


#: the bits of the float64 2^52: OR-ed with an integer k < 2^52 they are the float64 2^52 + k
_TWO52_BITS = 0x4330000000000000


def _as_float(k: torch.Tensor) -> torch.Tensor:
    """int64 integers in [0, 2^52) -> the same numbers in float64, exactly (a bit trick: torch's
    int64 -> float64 cast is ~10x slower on a CPU than the element-wise steps around it)."""
    return (k | _TWO52_BITS).view(torch.float64) - 2.0 ** 52


def _fill(out: torch.Tensor, z: torch.Tensor, kind: str) -> None:
    """Write the values of (R, n) words z into out, an (R, 2, n) float64 view: row 0 from each word's
    high 32-bit half, row 1 from its low half.

    "rand": the halves times 2^-32 (uniform on [0, 1)); "randn": Box-Muller on u1 = (high + 1/2) 2^-32,
    u2 = (low + 1/2) 2^-32: sqrt(-2 ln u1) cos 2πu2 in row 0, sqrt(-2 ln u1) sin 2πu2 in row 1."""
    high = _as_float(_srl(z, 32))
    low = _as_float(z & 0xFFFFFFFF)
    if kind == "rand":
        torch.mul(high, 2.0 ** -32, out=out[:, 0])
        torch.mul(low, 2.0 ** -32, out=out[:, 1])
        return
    r = high.add_(0.5).mul_(2.0 ** -32).log_().mul_(-2.0).sqrt_()
    t = low.add_(0.5).mul_(2.0 ** -32 * 2.0 * math.pi)
    torch.mul(r, torch.cos(t), out=out[:, 0])
    torch.mul(r, t.sin_(), out=out[:, 1])


def words_needed(count: int) -> int:
    """The words `draw` uses for `count` values (two per word, normal or uniform)."""
    return (count + 1) // 2


def draw(streams, shape, kind: str = "randn", device=None) -> torch.Tensor:
    """(B, ...) float64 values on `device`: sample b's from streams[b] (a list, one Stream per sample;
    samples that share a Stream take their words in turn), or all from one Stream, row-major.

    kind "randn": standard normal; "rand": uniform on [0, 1). The values are a function of each
    sample's (key, position) alone: the same on every device and for any batch composition."""
    if kind not in ("randn", "rand"):
        raise ValueError(f"unknown kind {kind!r}: use randn or rand")
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in shape)
    if isinstance(streams, Stream):
        rows, per = [streams], math.prod(shape)
    else:
        rows, per = list(streams), math.prod(shape[1:])
        if len(rows) != shape[0]:
            raise ValueError(f"{len(rows)} streams for a batch of {shape[0]}")
    n = words_needed(per)
    keys = torch.tensor([_signed(s.key) for s in rows], dtype=torch.int64, device=device)
    starts = torch.tensor([s.take(n) for s in rows], dtype=torch.int64, device=device)
    out = torch.empty(len(rows), 2, n, dtype=torch.float64, device=device)
    # on a CPU in blocks of words that stay in cache; on a GPU at once
    step = max(1, CPU_BLOCK // max(1, len(rows))) if device.type == "cpu" else max(1, n)
    for a in range(0, n, step):
        b = min(n, a + step)
        _fill(out[:, :, a:b], words(keys, starts + a, b - a), kind)
    out = out.view(len(rows), 2 * n)[:, :per]
    return out.reshape(shape)
