"""A faster float32 CPU matmul for the linear layers of batched decoding.

For an input of a few rows, torch's `F.linear(x, W)` on CPU in float32 takes a kernel whose cost grows
with every row until 16 rows, where it switches to a blocked matrix product: 8 rows of a 1536 x 576
projection cost 0.55 ms, 16 rows 0.56 ms, one thread. `W @ x.T` (no transposed operand) runs the blocked
kernel from 8 rows on: 0.38 ms at 8 rows, 0.39 at 16.

- From 16 to 63 rows, `linear` computes `W @ x.T`: the same values as `F.linear`, bit for bit (the
  same kernel), faster.
- From 8 to 15 rows only inside `batched_rows()`: faster, but not bit for bit what `F.linear` gives
  for so few rows (float32 rounding, as a different batch size changes it anyway). Batched decode
  steps use it (`swarm.blocks`, `client.generator`); a lone sequence's forward does not, so it stays
  the transformers model's own arithmetic.

Only for bias-free float32 weights of at least `MIN_WEIGHT` elements on CPU; everything else is
`F.linear`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

MIN_WEIGHT = 500_000  # smaller projections (a 576 x 576 attention projection) gain nothing
_BATCHED = contextvars.ContextVar("batched_rows", default=False)


@contextlib.contextmanager
def batched_rows() -> Iterator[None]:
    """Within: `linear` takes the fast kernel from 8 rows on (see the module's docstring)."""
    token = _BATCHED.set(True)
    try:
        yield
    finally:
        _BATCHED.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias, with the faster kernel where it applies."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fast = 16 <= rows < 64 or (8 <= rows < 16 and _BATCHED.get())
    if not fast or weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.numel() < MIN_WEIGHT:
        return torch.nn.functional.linear(x, weight)
    return (weight @ x.reshape(rows, x.shape[-1]).t()).t().contiguous().reshape(*x.shape[:-1], weight.shape[0])


class RowsLinear(torch.nn.Linear):
    """An `nn.Linear` without bias whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def use_rows_linear(module: torch.nn.Module) -> None:
    """Make every plain bias-free `nn.Linear` in `module` a `RowsLinear` (same parameters and hooks)."""
    for child in module.modules():
        if type(child) is torch.nn.Linear and child.bias is None:
            child.__class__ = RowsLinear
