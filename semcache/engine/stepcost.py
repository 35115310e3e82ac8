"""What a decode step costs, learnt from the steps the batch runs: seconds ~ a + b * tokens fed.

Speculation decides every step how many tokens to feed each row (verify.py), and the right answer
depends on the machine: on this project's 2-core CPU a step's fixed part (weights read once,
Python, sampling) is worth ~10 fed tokens (8 rows x 1 token: 0.12 s, 8 x 4: 0.26 s, 8 x 8: 0.45 s,
embedded model, ~560-token KV); on a GPU, where a decode step is bound by memory bandwidth, it is
worth many more. `fixed()` is a / b, in fed tokens, from a least-squares fit over recent steps
(exponentially forgotten), and a measured default until the steps seen vary enough to fit.
"""

from __future__ import annotations

# The fixed part of a decode step in fed tokens, measured on the project's CPU (see above).
DEFAULT_FIXED = 10.0
# Fits outside these bounds are noise (a step interrupted by other work), not the machine.
BOUNDS = (1.0, 512.0)
# A fit needs this many steps and this spread of fed tokens (their standard deviation).
MIN_STEPS, MIN_SPREAD = 16, 2.0


class StepCost:
    def __init__(self, default: float = DEFAULT_FIXED, learn: bool = True, decay: float = 0.99):
        self.default = default
        self.learn = learn
        self.decay = decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.steps = 0

    def observe(self, tokens: int, seconds: float) -> None:
        """A decode step fed `tokens` tokens in all and took `seconds`."""
        k = self.decay
        self.n, self.sx, self.sy = k * self.n + 1, k * self.sx + tokens, k * self.sy + seconds
        self.sxx, self.sxy = k * self.sxx + tokens * tokens, k * self.sxy + tokens * seconds
        self.steps += 1

    def fixed(self) -> float:
        """A step's fixed cost in fed tokens: the learnt one when there is one, else the default."""
        if not self.learn or self.steps < MIN_STEPS:
            return self.default
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mean_x * mean_x
        if var < MIN_SPREAD * MIN_SPREAD:
            return self.default
        slope = (self.sxy / self.n - mean_x * mean_y) / var
        if slope <= 0:
            return self.default
        return min(max((mean_y - slope * mean_x) / slope, BOUNDS[0]), BOUNDS[1])
