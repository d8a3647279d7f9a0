"""The rows one online selection sees, across processes.

Alone, the window of a step is the micro-batches this process fetched. Under several data-parallel processes (DDP:
torchrun, `accelerate launch`), Algorithm 1 selects from the batch the step trains on, which is every rank's
micro-batches together. Each rank scores its own rows; `gather_window` all-gathers what the rule reads (a few numbers
and a 16-character content digest per row, rank after rank), the rule runs once on the global window on every rank,
and each rank trains on its own slice of the kept set. The rule is a pure function of the gathered numbers (ties
broken by row position, `random` seeded by the config), so every rank computes the same kept set without a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradsift.distributed import Team
from gradsift.tokenization import sample_ids

# The per-row columns a window carries (each a 1-d array over the window's rows); `dots`/`cosines` only with an anchor.
COLUMNS = ("losses", "norms", "counts", "tokens", "status", "dots", "cosines")


@dataclass
class Window:
    """Per-row numbers of a selection window, rank after rank; `sizes[r]` are rank r's micro-batch sizes."""

    losses: np.ndarray
    norms: np.ndarray
    counts: np.ndarray  # response tokens (the labels the loss counts)
    tokens: np.ndarray  # attention-mask tokens (TRL's `num_tokens` metric)
    status: np.ndarray
    digests: list[str]
    sizes: list[list[int]]
    rank: int = 0
    dots: np.ndarray | None = None
    cosines: np.ndarray | None = None
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._starts = [int(s) for s in np.cumsum([0, *(sum(sizes) for sizes in self.sizes)])]

    @property
    def mine(self) -> slice:
        """This rank's rows in the window."""
        return slice(self._starts[self.rank], self._starts[self.rank + 1])

    def groups(self, window: str) -> list[np.ndarray]:
        """The row sets the rule runs on: all rows (`step`), or each micro-batch index across the ranks."""
        if window == "step":
            return [np.arange(len(self.losses))]
        count = max(len(sizes) for sizes in self.sizes)
        groups: list[list[int]] = [[] for _ in range(count)]
        for rank, sizes in enumerate(self.sizes):
            bounds = self._starts[rank] + np.cumsum([0, *sizes])
            for b in range(len(sizes)):
                groups[b] += range(int(bounds[b]), int(bounds[b + 1]))
        return [np.array(group, dtype=int) for group in groups]

    def sample_ids(self) -> list[str]:
        """`digest#k` per row, k its occurrence among identical rows of the window (as `assign_sample_ids`)."""
        return sample_ids(self.digests)


def gather_window(team: Team, local: Window) -> Window:
    """Every rank's window joined in rank order (a collective call: every rank must make it); alone, `local`."""
    if team.world_size == 1:
        return local
    parts = team.gather(
        {
            **{name: getattr(local, name) for name in COLUMNS},
            "digests": local.digests,
            "sizes": local.sizes[0],
        }
    )
    joined = {}
    for name in COLUMNS:
        values = [part[name] for part in parts]
        joined[name] = None if values[0] is None else np.concatenate(values)
    return Window(
        digests=[digest for part in parts for digest in part["digests"]],
        sizes=[part["sizes"] for part in parts],
        rank=team.rank,
        **joined,
    )


def all_reduce_sum(tensors: list, team: Team) -> list:
    """The element-wise sum over the ranks of each tensor (one flat all-reduce on their device); alone, as given."""
    if team.world_size == 1 or not tensors:
        return tensors
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return out
