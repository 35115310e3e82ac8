"""What a decode step costs, learnt from the steps the batch runs: at each batch size (rows),
seconds ~ a + b * tokens fed.

Speculation decides every step how many tokens to feed each row (verify.py), and the right answer
depends on the machine and on how many rows the step carries. On this project's 2-core CPU (embedded
model, ~560-token KV, verify steps through fastexp.py) one row's step is ~0.065 s and each extra fed
token ~0.009 s (a fixed part worth ~7 tokens), while 8 rows' step is ~0.12-0.15 s and each extra
token ~0.004 s (~30 tokens): one fit across batch sizes mixed the two and, once a batch of 8 stopped
drafting, learnt nothing that would make it start again. On a GPU, where a decode step is bound by
memory bandwidth, the fixed part is worth many more. `fixed(rows)` is a / b, in fed tokens, from a
least-squares fit over recent steps of that many rows (exponentially forgotten), and a measured
default until those steps vary enough to fit.
"""

from __future__ import annotations

# The fixed part of a decode step in fed tokens before a batch size has its own fit: between the one-
# and eight-row values measured on the project's CPU (see above).
DEFAULT_FIXED = 20.0
# Fits outside these bounds are noise (a step interrupted by other work), not the machine.
BOUNDS = (1.0, 512.0)
# A fit needs this many steps, and fed tokens that vary: their standard deviation at least this many
# tokens a row.
MIN_STEPS, MIN_SPREAD = 16, 0.4


class StepCost:
    def __init__(self, default: float = DEFAULT_FIXED, learn: bool = True, decay: float = 0.99):
        self.default = default
        self.learn = learn
        self.decay = decay
        self._fits: dict[int, _Fit] = {}

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        """A decode step of `rows` rows fed `tokens` tokens in all and took `seconds`."""
        self._fits.setdefault(rows, _Fit(MIN_SPREAD * rows)).add(tokens, seconds, self.decay)

    def fixed(self, rows: int) -> float:
        """The fixed cost of a step of `rows` rows in fed tokens: the learnt one when there is one,
        else the default."""
        fit = self._fits.get(rows)
        learnt = fit.fixed() if self.learn and fit is not None else None
        return self.default if learnt is None else min(max(learnt, BOUNDS[0]), BOUNDS[1])


class _Fit:
    """Exponentially forgotten sums for a least-squares line through (tokens, seconds)."""

    def __init__(self, spread: float) -> None:
        self.spread = spread
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.steps = 0

    def add(self, x: float, y: float, k: float) -> None:
        self.n, self.sx, self.sy = k * self.n + 1, k * self.sx + x, k * self.sy + y
        self.sxx, self.sxy = k * self.sxx + x * x, k * self.sxy + x * y
        self.steps += 1

    def fixed(self) -> float | None:
        """intercept / slope, or None without enough steps, spread or a positive slope."""
        if self.steps < MIN_STEPS:
            return None
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mean_x * mean_x
        if var < self.spread * self.spread:
            return None
        slope = (self.sxy / self.n - mean_x * mean_y) / var
        return (mean_y - slope * mean_x) / slope if slope > 0 else None
