"""Top-1 / top-5 hit counts of a batch: one definition for the training loop's validation
and ``skray evaluate``, which so need not import the training loop.
"""

from __future__ import annotations

import torch

from skray.train.datasets import BAD_LABEL


def count_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits, decodable rows, undecodable rows) of one batch, float64 on its
    device: a row labeled ``BAD_LABEL`` is counted as undecodable, never as a hit."""
    good = labels != BAD_LABEL
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack(
        [(hits[:, 0] & good).sum(), (hits.any(dim=1) & good).sum(), good.sum(), (~good).sum()]
    ).double()
