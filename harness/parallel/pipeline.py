"""Pipeline parallelism over the mesh's outermost ``pp`` dimension (``torch.distributed.pipelining``).

The model is cut on the meta device, before anything else is applied (torchtitan's order: split ->
TP -> activation checkpointing -> compile -> FSDP): stage ``s`` gets the decoder layers
:func:`split_layers` gives it, the first stage the token embedding, the last the final norm and the
LM head. The stages a rank holds (one, or two for the looped and V schedules: :func:`stage_ids`) are
one module, its part (:func:`build_part`): the ``transformers`` model with the other parts removed
and its layers in a ``ModuleDict`` keyed by their index in the whole model, so every parameter keeps
the unsplit model's name: ``init_weights`` draws the same weights, the optimizer and the gradient norm
see one module, and DCP checkpoints and the HF export see the whole model's names (a checkpoint
written at one ``pp`` loads at another). Each stage runs as a :class:`StageView` over the part's
modules (the ``PipelineStage`` module, and FSDP2's root for the stage).

A step (:meth:`Pipeline.forward_backward`) runs the rank's micro-batches of that step as the
schedule's micro-batches (a schedule per micro-batch count, so the batch ramp keeps working): the
first stage feeds ``input_ids``, activations go stage to stage by send/recv, and the last stage's
loss function is the step's loss, each micro-batch's summed cross-entropy divided by the step's
target tokens over every data-parallel rank (``scale_grads=False``: the schedule does not rescale).
The loss, which only the last stage has, is summed over the ``pp`` group, so every rank logs the same
one; the gradient norm spans every stage (:func:`harness.parallel.norm.clip_grad_norm_` with the
``pp`` group).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from harness.config.validate import PP_SCHEDULES
from harness.parallel.loss import autocast

if TYPE_CHECKING:
    from harness.data import MicroBatch

V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")  # two stages per rank, placed in a V
# parallel.pp_schedule -> the torch.distributed.pipelining class
SCHEDULE_CLASSES = {
    "GPipe": "ScheduleGPipe",
    "1F1B": "Schedule1F1B",
    "Interleaved1F1B": "ScheduleInterleaved1F1B",
    "LoopedBFS": "ScheduleLoopedBFS",
    "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble",
    "ZBVZeroBubble": "ScheduleZBVZeroBubble",
    "DualPipeV": "ScheduleDualPipeV",
}


def split_layers(num_layers: int, num_stages: int, layers: list[int] | None = None) -> list[range]:
    """The decoder layers of each stage: ``layers`` (counts, first to last) when given, else balanced:
    the remainder's extra layers go to the middle stages first, then the first, the last stage last
    (it also runs the LM head and the loss, the largest matmul for a large vocabulary)."""
    if layers is None:
        base, extra = divmod(num_layers, num_stages)
        order = list(range(1, num_stages - 1)) + [0, num_stages - 1]
        layers = [base + (order.index(s) < extra) for s in range(num_stages)]
    starts = [sum(layers[:s]) for s in range(num_stages)]
    return [range(start, start + n) for start, n in zip(starts, layers)]


def build_part(model: torch.nn.Module, layers: list[int], first: bool, last: bool) -> torch.nn.Module:
    """A copy of ``model`` (a ``LlamaForCausalLM``, on the meta device) that holds only this rank's
    decoder ``layers`` (a ``ModuleDict`` keyed by each layer's index in ``model``), the embedding when
    it holds the first stage and the final norm and head when it holds the last; every parameter keeps
    its name in ``model``. Not called itself: its :class:`StageView` s run it."""
    blocks = model.model.layers
    model.model.layers = torch.nn.ModuleList()  # not copied: the part takes its own
    part = copy.deepcopy(model)
    model.model.layers = blocks
    part.model.layers = torch.nn.ModuleDict({str(i): copy.deepcopy(blocks[i]) for i in layers})
    if not first:
        part.model.embed_tokens = None
    if not last:
        part.model.norm = None
        part.lm_head = None
    return part


class StageView(torch.nn.Module):
    """One pipeline stage over the modules of its rank's part (shared, not copied): the stage's decoder
    layers, the embedding on the first stage, the final norm and the LM head on the last. The
    ``PipelineStage`` and FSDP2 (its root) see this module; checkpoints see the part."""

    def __init__(self, part: torch.nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.config = part.config
        self.embed_tokens = part.model.embed_tokens if first else None
        self.layers = torch.nn.ModuleDict({str(i): part.model.layers[str(i)] for i in layers})
        self.rotary_emb = part.model.rotary_emb
        self.norm = part.model.norm if last else None
        self.lm_head = part.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``input_ids`` ``[batch, seq]`` on the first stage, else the hidden states ``[batch,
        seq, hidden]``; returns the hidden states, or the logits ``[batch, seq, vocab]`` on the last
        stage. The causal mask and the rotary tables are recomputed per stage (positions 0..seq-1, or
        under ``cp`` the rank's chunks' positions in the whole sequence)."""
        from transformers.masking_utils import create_causal_mask

        from harness.parallel.context import local_positions

        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        positions = local_positions(h.shape[1], h.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=positions
        )
        rotary = self.rotary_emb(h, position_ids=positions)
        for layer in self.layers.values():
            h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        return h


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stages rank ``pp_rank`` of ``pp`` holds: its own (GPipe, 1F1B), every ``pp``-th from it
    (looped: Interleaved1F1B, LoopedBFS, InterleavedZeroBubble), or its own and its mirror in a V
    (ZBVZeroBubble, DualPipeV: rank 0 holds the first and the last)."""
    per_rank = PP_SCHEDULES[schedule]
    if per_rank == 1:
        return [pp_rank]
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(per_rank)]


def stage_owners(pp: int, schedule: str) -> list[int]:
    """The pipeline rank of each stage, first to last (:func:`stage_ids` inverted)."""
    owner = {s: r for r in range(pp) for s in stage_ids(r, pp, schedule)}
    return [owner[s] for s in range(len(owner))]


class Pipeline:
    """This rank's stages of the pipeline and the schedules that run a step through them.

    Built by :meth:`harness.parallel.base.Backend.parallelize` when ``parallel.pp > 1``: :meth:`split`
    cuts the meta model into this rank's part (one module whatever the number of its stages, with the
    whole model's parameter names: the optimizer, the norm and the checkpoints see it) and its stage
    views; the backend applies activation checkpointing -> compile -> its wrap (FSDP2: each block,
    then each view as a root). :meth:`forward_backward` / :meth:`evaluate_sums` stand in for the
    backend's (one schedule object per micro-batch count, made on first use).
    """

    def __init__(self, cfg, dims, env):
        self.cfg, self.dims, self.env = cfg, dims, env
        self.group = dims.pp_group(env.device.type)
        self.ranks = dist.get_process_group_ranks(self.group)
        self.pp_rank = dims.pp_rank(env.rank)
        self.stages_per_rank = PP_SCHEDULES[cfg.pp_schedule]
        self.num_stages = dims.pp * self.stages_per_rank
        self.stage_ids = stage_ids(self.pp_rank, dims.pp, cfg.pp_schedule)
        self.owner = stage_owners(dims.pp, cfg.pp_schedule)  # the rank of each stage
        self.views: list[StageView] = []  # in the order of stage_ids
        self._schedules: dict[int, object] = {}
        self._scale = None  # the step's 1 / global targets (x the backend's gradient factor)
        self._nan = False
        self._forwards: dict[int, int] = {}  # forwards started per stage in this step
        self._n = 0  # the step's micro-batches
        self.position = "no forward yet"
        from harness.parallel import comm

        comm.track_pipeline()  # the schedules' sends and receives in comm_by_dim["pp"]

    @property
    def is_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def is_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def split(self, model: torch.nn.Module) -> torch.nn.Module:
        """This rank's part of ``model`` (on the meta device); :attr:`views` its stages."""
        layers = split_layers(len(model.model.layers), self.num_stages, self.cfg.pp_layers)
        mine = [i for s in self.stage_ids for i in layers[s]]
        part = build_part(model, sorted(mine), self.is_first, self.is_last)
        last = self.num_stages - 1
        self.views = [StageView(part, layers[s], s == 0, s == last) for s in self.stage_ids]
        for s, view in zip(self.stage_ids, self.views):
            view.register_forward_pre_hook(self._counter(s))
        return part

    def _counter(self, stage: int):
        def started(_module, _args) -> None:  # a forward pre-hook: where the step is (hang dumps)
            self._forwards[stage] = self._forwards.get(stage, 0) + 1
            self.position = f"stage {stage}: forward of micro-batch {self._forwards[stage]} of {self._n}"

        return started

    def where(self) -> str:
        """This rank's stages and the latest forward they started (the hang watchdog's dump)."""
        return (
            f"pp rank {self.pp_rank} of {self.dims.pp} (stages {self.stage_ids} of {self.num_stages}, "
            f"{self.cfg.pp_schedule}); {self.position}"
        )

    def _schedule(self, n_microbatches: int):
        """The schedule for ``n_microbatches`` (made when the count changes: the batch ramp). Only the
        current one is kept: a schedule's stages hold a receive buffer per micro-batch."""
        if n_microbatches not in self._schedules:
            self._schedules.clear()
            from torch.distributed import pipelining

            stages = [
                pipelining.PipelineStage(m, s, self.num_stages, self.env.device, group=self.group)
                for m, s in zip(self.views, self.stage_ids)
            ]
            cls = getattr(pipelining, SCHEDULE_CLASSES[self.cfg.pp_schedule])
            one = stages[0] if self.stages_per_rank == 1 else stages
            self._schedules[n_microbatches] = cls(
                one, n_microbatches=n_microbatches, loss_fn=self._loss, scale_grads=False
            )
        return self._schedules[n_microbatches]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the step's loss (the schedule calls it on the last stage)."""
        from harness.parallel.loss import logits_loss_sum

        loss = logits_loss_sum(logits, labels) * self._scale
        if self._nan:  # fault injection: the step's first micro-batch
            self._nan = False
            loss = loss * float("nan")
        return loss

    def forward_backward(
        self, backend, micro_batches: list[MicroBatch], autocast_dtype=None, nan_loss: bool = False
    ) -> torch.Tensor:
        """As :meth:`harness.parallel.base.Backend.forward_backward`, through the schedule."""
        num_targets = backend.all_reduce_sum(torch.stack([mb.num_targets() for mb in micro_batches]).sum())
        self._scale, self._nan = backend.grad_scale / num_targets, nan_loss
        self._forwards, self._n = {}, len(micro_batches)
        self.position = f"no forward of the step's {self._n} micro-batches started yet"
        local = [backend.local_part(mb) for mb in micro_batches]  # under cp: this rank's chunks
        inputs = torch.cat([mb.input_ids for mb in local])
        labels = torch.cat([mb.labels for mb in local])
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        kwargs = {"target": labels, "losses": losses} if self.is_last else {}
        with autocast(inputs.device.type, autocast_dtype):
            self._schedule(len(micro_batches)).step(*args, **kwargs)
        mine = torch.stack([x.detach().float() for x in losses]).sum() if losses else torch.zeros(())
        total = (mine / backend.grad_scale).to(inputs.device)
        dist.all_reduce(total, group=self.group)  # the last stage's loss, on every stage
        return backend.sum_over_cp(backend.all_reduce_sum(total))

    @torch.no_grad()
    def evaluate_sums(self, backend, batches: list[MicroBatch], autocast_dtype=None):
        """As :meth:`harness.parallel.base.Backend.evaluate_sums`: forward only, one batch at a time,
        stage after stage, the hidden states (fp32 ``[batch, seq, hidden]``) sent to the next stage's
        rank; the last stage's sums, summed over the ``pp`` group."""
        from harness.parallel.loss import logits_loss_sum

        device = self.env.device
        loss_sum = torch.zeros((), device=device)
        targets = torch.zeros((), device=device, dtype=torch.long)
        views = dict(zip(self.stage_ids, self.views))
        for view in self.views:
            view.eval()
        hidden = self.views[0].config.hidden_size
        for whole in batches:
            whole = whole.to(device)
            mb = backend.local_part(whole)  # under cp: this rank's chunks
            x = mb.input_ids
            for s in range(self.num_stages):
                if s not in views:
                    continue
                if s > 0 and self.owner[s - 1] != self.pp_rank:
                    x = torch.empty((*mb.input_ids.shape, hidden), device=device)
                    dist.recv(x, self.ranks[self.owner[s - 1]], group=self.group)
                with autocast(device.type, autocast_dtype):
                    x = views[s](x)
                if s == self.num_stages - 1:
                    loss_sum += logits_loss_sum(x, mb.labels)
                    targets += whole.num_targets()  # of the whole sequences: counted once
                elif self.owner[s + 1] != self.pp_rank:
                    dist.send(x.float().contiguous(), self.ranks[self.owner[s + 1]], group=self.group)
                else:
                    x = x.float()
        for view in self.views:
            view.train()
        dist.all_reduce(loss_sum, group=self.group)
        dist.all_reduce(targets, group=self.group)
        return backend.sum_over_cp(backend.all_reduce_sum(loss_sum)), backend.all_reduce_sum(targets)

    def sends_stage(self) -> bool:
        """Whether this rank sends its part to rank 0 for an export: the ranks of rank 0's pipeline
        (data-parallel and tensor-parallel coordinate 0)."""
        return self.dims.dp_rank(self.env.rank) == 0 and self.env.rank % (self.dims.cp * self.dims.tp) == 0

    def gather_on_rank0(self, state: dict) -> dict | None:
        """The whole model's state dict on rank 0 (CPU tensors; None elsewhere) from each stage's
        whole ``state`` (on the ranks that :meth:`sends_stage`): the names and shapes first (one
        ``gather_object``), then one tensor at a time by send/recv over the ``pp`` group, so no rank's
        device holds more than one whole tensor of another stage."""
        if not self.sends_stage():
            return None
        device = self.env.device
        metas = [None] * self.dims.pp if self.env.rank == 0 else None
        mine = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
        dist.gather_object(mine, metas, dst=self.ranks[0], group=self.group)
        if self.env.rank != 0:
            for tensor in state.values():
                dist.send(tensor.to(device), self.ranks[0], group=self.group)
            return None
        whole = dict(state)
        for pp_rank, meta in enumerate(metas[1:], 1):
            for name, shape, dtype in meta:
                buf = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buf, self.ranks[pp_rank], group=self.group)
                whole[name] = buf.cpu()
        return whole
