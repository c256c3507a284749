"""The layer objective's Hessian `H = 2 X^T X / N`, summed over calibration batches."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Hessian:
    """Streams rows of a layer's inputs into `X^T X` (fp32, `(cols, cols)`): memory is one
    matrix per layer, whatever the number of calibration tokens.

    Example:
        >>> h = Hessian(2)
        >>> h.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> h.matrix().tolist()
        [[2.0, 2.0], [2.0, 4.0]]
    """

    def __init__(self, cols: int) -> None:
        self.xtx = torch.zeros(cols, cols)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add `(N, cols)` input rows."""
        rows = rows.float()
        self.xtx.addmm_(rows.T, rows)
        self.n += rows.shape[0]

    def reduce(self) -> None:
        """Under torch.distributed, sum every rank's rows (each rank calibrates on its own
        batches, as the activation observers do), so all ranks choose the same codes."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        n = torch.tensor([float(self.n)])
        dist.all_reduce(self.xtx)
        dist.all_reduce(n)
        self.n = int(n.item())

    def matrix(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration rows reached this layer")
        return self.xtx * (2.0 / self.n)
