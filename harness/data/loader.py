"""Packed sequences and the deterministic, resumable per-step batch loader."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.schedule import IterationPlan, StepInfo

IGNORE_INDEX = -100  # label value excluded from the loss (torch.nn.functional.cross_entropy default)


class PackedSequences:
    """Fixed-length windows over a token stream.

    Sequence ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (``seq_len + 1`` tokens:
    inputs are the first ``seq_len``, targets the last ``seq_len``), so consecutive windows
    share one token and no token is padding (the nanoGPT / Megatron packing).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    @staticmethod
    def count(num_tokens: int, seq_len: int) -> int:
        """Sequences of ``seq_len`` (+1) tokens that a stream of ``num_tokens`` tokens holds."""
        return max(0, (num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.count(len(self.tokens), self.seq_len)

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """Sequences ``indices`` as a ``(len(indices), seq_len + 1)`` int64 tensor."""
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        window = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]
        return torch.from_numpy(np.asarray(self.tokens[window], dtype=np.int64))


@dataclass
class MicroBatch:
    """One forward/backward's inputs: ``input_ids`` and ``labels``, both ``(batch, seq_len)`` int64,
    and with document masking ``position_ids`` (``(batch, seq_len)``, restarting at every document).

    ``labels`` are the next tokens; positions equal to ``IGNORE_INDEX`` are not trained on.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None

    @classmethod
    def from_sequences(cls, seqs: torch.Tensor, eos_id: int | None = None) -> MicroBatch:
        """Split ``(batch, seq_len + 1)`` windows into inputs and shifted labels.

        With ``eos_id`` (``data.document_mask``) each document of a packed window is its own sequence:
        positions restart after every EOS (``transformers`` then masks attention to each document,
        as Llama 3's pretraining did), and the target that would cross a boundary (the next
        document's first token, predicted at the EOS) is ignored, so a window [A, EOS, B] trains
        exactly as A+EOS and B would separately.
        """
        inputs, labels = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
        if eos_id is None:
            return cls(inputs, labels)
        is_eos = inputs == eos_id
        starts = torch.zeros_like(is_eos)
        starts[:, 0] = True
        starts[:, 1:] = is_eos[:, :-1]
        idx = torch.arange(inputs.shape[1]).expand_as(inputs)
        last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        labels = labels.masked_fill(is_eos, IGNORE_INDEX)
        return cls(inputs, labels, (idx - last_start).contiguous())

    def num_targets(self) -> torch.Tensor:
        """Number of trained target tokens (labels != IGNORE_INDEX), a 0-d int64 tensor."""
        return (self.labels != IGNORE_INDEX).sum()

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids}

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` overlaps with compute."""
        pos = self.position_ids.pin_memory() if self.position_ids is not None else None
        return MicroBatch(self.input_ids.pin_memory(), self.labels.pin_memory(), pos)

    def to(self, device: torch.device, non_blocking: bool = False) -> MicroBatch:
        pos = (
            self.position_ids.to(device, non_blocking=non_blocking) if self.position_ids is not None else None
        )
        return MicroBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            pos,
        )


class StepLoader:
    """Gives each rank its micro-batches for a planned optimizer step.

    Epoch ``e`` visits sequences in the permutation ``default_rng([seed, e])``, so the order
    depends only on the seed and the data position (epoch, offset) stored in checkpoints; a
    mixture's blended stream is already in its (seeded) order, so epoch ``e`` visits its global
    samples ``e*N .. (e+1)*N - 1``. A step's sequences ``perm[offset : offset + global_batch_size]``
    are cut into global micro-batches of ``micro_batch_size * world_size``; rank ``r`` takes the
    ``r``-th slice of ``micro_batch_size`` from each, so every rank reads only its own shard. A
    step that is not a whole number of global micro-batches (a batch-ramp stage, the short last
    step of an epoch; always a multiple of ``world_size``) ends with a shorter global micro-batch
    split evenly over the ranks, so every rank gets the same shapes.
    ``eos_id`` turns on document masking (see :meth:`MicroBatch.from_sequences`).
    """

    def __init__(
        self,
        sequences,
        seed: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        eos_id: int | None = None,
    ):
        self.sequences = sequences
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.eos_id = eos_id
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the sequences (int64 indices)."""
        if self._perm_epoch != epoch:
            n = len(self.sequences)
            if hasattr(self.sequences, "order"):  # a mixture: global sample numbers, already blended
                self._perm = np.arange(epoch * n, (epoch + 1) * n, dtype=np.int64)
            else:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return self._perm

    def step_indices(self, info: StepInfo) -> np.ndarray:
        """All ranks' sequence indices of a step, in order (length ``info.global_batch_size``)."""
        start = info.position.offset
        return self.permutation(info.position.epoch)[start : start + info.global_batch_size]

    def micro_batches(self, info: StepInfo) -> list[MicroBatch]:
        """This rank's ``info.gradient_accumulation_steps`` micro-batches for the step (on CPU)."""
        indices = self.step_indices(info)
        m, w = self.micro_batch_size, self.world_size
        out = []
        for k in range(info.gradient_accumulation_steps):
            chunk = indices[k * m * w : (k + 1) * m * w]  # a global micro-batch, the last may be short
            per_rank = len(chunk) // w  # the plan's step sizes are multiples of w: equal shares
            mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
            out.append(MicroBatch.from_sequences(self.sequences.get(mine), self.eos_id))
        return out

    def tokens_by_source(self, info: StepInfo) -> dict[str, int] | None:
        """A mixture's tokens of step ``info`` (all ranks) by source; None for one source."""
        if not hasattr(self.sequences, "counts_by_source"):
            return None
        counts = self.sequences.counts_by_source(self.step_indices(info))
        return {name: n * self.sequences.seq_len for name, n in counts.items()}


class _StepStream(torch.utils.data.IterableDataset):
    """Steps ``start+1 .. max_steps`` of a plan as ``(step, micro_batches)``; with W workers, worker w
    prepares every W-th step, and the DataLoader returns them round-robin, i.e. in step order."""

    def __init__(self, loader: StepLoader, plan, first: StepInfo, max_steps: int):
        self.loader, self.plan, self.first, self.max_steps = loader, plan, first, max_steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        first = self.first
        steps = self.plan.steps(first.step - 1, first.position, first.tokens_total - first.tokens)
        for k, step in enumerate(steps):
            if step.step > self.max_steps:
                return
            if k % workers == wid:
                yield step.step, self.loader.micro_batches(step)


class PrefetchLoader:
    """A :class:`StepLoader` whose next steps are prepared by ``workers`` processes
    (``torch.utils.data.DataLoader`` over the plan, ``prefetch_factor`` steps each, pinned memory
    on CUDA), so the training loop does not wait for indexing and copying.

    The batches are the StepLoader's, for the same planned steps, so resume and the data order
    are unchanged; :meth:`micro_batches` checks that the loop asks for the steps in order.
    """

    def __init__(
        self,
        loader: StepLoader,
        plan,
        max_steps: int,
        workers: int,
        pin_memory: bool,
        prefetch_factor: int = 2,
    ):
        self.loader, self.plan, self.max_steps = loader, plan, max_steps
        self.workers, self.pin_memory, self.prefetch_factor = workers, pin_memory, prefetch_factor
        self._it = None

    def tokens_by_source(self, info: StepInfo) -> dict[str, int] | None:
        return self.loader.tokens_by_source(info)

    def micro_batches(self, info: StepInfo) -> list[MicroBatch]:
        """This rank's micro-batches for ``info`` (the next step of the plan)."""
        if self._it is None:
            stream = _StepStream(self.loader, self.plan, info, self.max_steps)
            self._it = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.workers,
                    pin_memory=self.pin_memory,
                    prefetch_factor=self.prefetch_factor,
                )
            )
        step, batches = next(self._it)
        if step != info.step:
            raise RuntimeError(f"prefetching loader out of step: got step {step}, the loop is at {info.step}")
        return batches


def validation_batches(
    sequences: PackedSequences,
    num_sequences: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    eos_id: int | None = None,
) -> list[MicroBatch]:
    """A fixed validation set: the first ``num_sequences`` sequences, in order (``eval.batches`` global
    batches, the same at every world size and micro-batch size, so ``val_loss`` does not depend on the
    layout), cut into global micro-batches of ``micro_batch_size * world_size``: this rank's share of
    each.

    Every rank gets the same number of micro-batches (sharded backends gather parameters in every
    forward, so a rank that skipped one would hang the others): where a short last batch leaves a
    rank nothing, it gets one sequence with every label ``IGNORE_INDEX`` (no loss, no targets).
    """
    n = min(len(sequences), num_sequences)
    idx = np.arange(n)
    out = []
    per = micro_batch_size * world_size
    for k in range(0, n, per):
        mine = idx[k + rank * micro_batch_size : min(n, k + (rank + 1) * micro_batch_size)]
        if len(mine):
            out.append(MicroBatch.from_sequences(sequences.get(mine), eos_id))
        else:
            mb = MicroBatch.from_sequences(sequences.get(idx[:1]), eos_id)
            out.append(MicroBatch(mb.input_ids, torch.full_like(mb.labels, IGNORE_INDEX), mb.position_ids))
    return out


def build_loader(
    sequences: PackedSequences,
    seed: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    workers: int | None,
    device_type: str,
    plan: IterationPlan,
    max_steps: int,
    eos_id: int | None = None,
) -> StepLoader | PrefetchLoader:
    """The step loader of this rank; with ``workers`` > 0 (``data.loader_workers``; None: 2 on CUDA,
    0 on CPU) its next steps are prepared by worker processes (same batches, same order);
    ``eos_id`` turns on document masking."""
    loader = StepLoader(sequences, seed, micro_batch_size, rank, world_size, eos_id)
    if workers is None:
        workers = 2 if device_type == "cuda" else 0
    if workers == 0:
        return loader
    return PrefetchLoader(loader, plan, max_steps, workers, pin_memory=device_type == "cuda")
