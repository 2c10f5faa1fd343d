"""The training objective of every backend: next-token cross-entropy summed over a micro-batch's
target tokens (the step divides by its global target count: :meth:`Backend.forward_backward`)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from harness.data import IGNORE_INDEX

if TYPE_CHECKING:
    from harness.data import MicroBatch


def token_loss_sum(
    model: torch.nn.Module, mb: MicroBatch, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over ``mb``'s target tokens, in fp32 (0-d tensor).

    Positions whose label is ``IGNORE_INDEX`` contribute nothing.
    """
    with autocast(mb.input_ids.device.type, autocast_dtype):
        logits = model(**mb.model_inputs()).logits
    return logits_loss_sum(logits, mb.labels)


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type``, or nothing when ``dtype`` is None (fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats, fp32, 0-d) of ``logits`` ``[batch, seq, vocab]`` against
    ``labels`` ``[batch, seq]`` (``IGNORE_INDEX`` positions skipped)."""
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss  # loss-parallel: a DTensor
