"""Per-byte-offset tests that a set of equally long byte strings looks uniformly random, with
p-values computed here (no scipy): the chi-square survival function from the regularized upper
incomplete gamma function, and exact binomial tails.

Two statistics per offset, over the strings' bytes at that offset:

- *nibbles*: the 2n nibbles (high and low) in 16 bins, chi-square with 15 degrees of freedom;
- *bits*: for each of the 8 bit positions, how many strings have it set, two-sided exact
  binomial test against 1/2. A single fixed bit (an X25519 public key's top bit) is diluted in
  the nibble test (it moves half of one nibble's mass) but is all-or-nothing here.

For each statistic: the number of tests with p < 0.001 must be what chance allows (the mean of
the binomial count plus 6 standard deviations), and the smallest p-value over a region of
interest must not be extreme (a Bonferroni-style floor chosen so that uniform data fails it
about once in 10^5 runs).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

ALPHA = 0.001
NIBBLE_FLOOR = 1e-8  # x 1168 tests: uniform data fails about once in 10^5 runs
BIT_FLOOR = 1e-9  # two-sided, 64 strings: p < 1e-9 only for <= 8 or >= 56 ones (5.6e-10 each)


def gammaincc(a: float, x: float) -> float:
    """Regularized upper incomplete gamma function Q(a, x) (series below a + 1, Lentz's
    continued fraction above; Numerical Recipes 6.2)."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while term > total * 1e-16:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return math.exp(log_front) * h


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with ``dof`` degrees of freedom."""
    return gammaincc(dof / 2, x / 2)


def binomial_two_sided(n: int) -> list[float]:
    """p-value of observing k ones out of n fair bits, two-sided (k = 0..n)."""
    total = 2**n
    cdf = []
    acc = 0
    for k in range(n + 1):
        acc += math.comb(n, k)
        cdf.append(acc / total)
    return [min(1.0, 2 * cdf[min(k, n - k)]) for k in range(n + 1)]


def chance_bound(tests: int, rate: float) -> float:
    """Mean + 6 standard deviations of Binomial(tests, rate)."""
    return tests * rate + 6 * math.sqrt(tests * rate * (1 - rate))


@dataclass
class Uniformity:
    offsets: int
    nibble_low: int  # offsets with nibble p < ALPHA
    nibble_bound: float
    nibble_min: tuple[float, int]  # smallest nibble p over the region, at offset
    bit_tests: int
    bit_low: int
    bit_bound: float
    bit_min: tuple[float, int, int]  # smallest bit p over the region, offset, bit
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.offsets} offsets: nibble chi-square p<{ALPHA} at {self.nibble_low} (chance bound "
            f"{self.nibble_bound:.1f}), smallest p in region {self.nibble_min[0]:.3g} at offset {self.nibble_min[1]}; "
            f"{self.bit_tests} bit tests: p<{ALPHA} at {self.bit_low} (chance bound {self.bit_bound:.1f}), smallest p "
            f"in region {self.bit_min[0]:.3g} at offset {self.bit_min[1]} bit {self.bit_min[2]}"
        )


def uniformity(samples: list[bytes], region: range) -> Uniformity:
    """Run both statistics at every offset below the shortest sample's length."""
    n = len(samples)
    offsets = min(len(s) for s in samples)
    bit_p = binomial_two_sided(n)
    bit_null_rate = sum(math.comb(n, k) for k in range(n + 1) if bit_p[k] < ALPHA) / 2**n
    expected = 2 * n / 16
    nibble_low = bit_low = 0
    nibble_min = (1.0, -1)
    bit_min = (1.0, -1, -1)
    for off in range(offsets):
        nibbles = [0] * 16
        ones = [0] * 8
        for value, count in Counter(s[off] for s in samples).items():
            nibbles[value >> 4] += count
            nibbles[value & 15] += count
            for bit in range(8):
                if value >> bit & 1:
                    ones[bit] += count
        p = chi2_sf(sum((c - expected) ** 2 / expected for c in nibbles), 15)
        nibble_low += p < ALPHA
        if off in region and p < nibble_min[0]:
            nibble_min = (p, off)
        for bit in range(8):
            q = bit_p[ones[bit]]
            bit_low += q < ALPHA
            if off in region and q < bit_min[0]:
                bit_min = (q, off, bit)
    result = Uniformity(
        offsets,
        nibble_low,
        chance_bound(offsets, ALPHA),
        nibble_min,
        8 * offsets,
        bit_low,
        chance_bound(8 * offsets, bit_null_rate),
        bit_min,
    )
    if result.nibble_low > result.nibble_bound:
        result.failures.append(f"{nibble_low} offsets with nibble p < {ALPHA}")
    if result.bit_low > result.bit_bound:
        result.failures.append(f"{bit_low} bit tests with p < {ALPHA}")
    if nibble_min[0] < NIBBLE_FLOOR:
        result.failures.append(f"nibble p {nibble_min[0]:.3g} at offset {nibble_min[1]}")
    if bit_min[0] < BIT_FLOOR:
        result.failures.append(f"bit p {bit_min[0]:.3g} at offset {bit_min[1]} bit {bit_min[2]}")
    return result
