"""The named device mesh every backend is applied over (after torchtitan's ``ParallelDims``).

One object, built once from the ``parallel`` section and the world size, says how the ranks are
laid out: ``pp x dp_replicate x dp_shard x cp x tp`` (outermost to innermost, so ``tp`` stays inside a
node and pipeline stages, which only send activations, span the slowest links; ``pp`` and ``cp`` are
on the mesh only when above 1).
Data parallelism spans ``dp_replicate x dp_shard``: DDP replicates over all ranks, FSDP2 shards
over ``dp_shard`` (and HSDP replicates over ``dp_replicate``), ZeRO shards over all ranks.
Tensor parallelism (``harness.parallel.tensor``) shards each layer over ``tp``; the ``tp`` ranks of
one data-parallel rank read the same micro-batches, so the loss and the token counts are summed
over the data-parallel ranks only (:meth:`ParallelDims.dp_group`). So do the ``pp`` ranks: every
stage of a pipeline reads its data-parallel rank's micro-batches (the first the inputs, the last the
labels; :mod:`harness.parallel.pipeline`), and so do the ``cp`` ranks, each keeping its chunks of every
sequence (:mod:`harness.parallel.context`); FSDP2 shards over ``dp_shard x cp``, so the cp ranks'
gradients are summed with the data-parallel ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import ParallelConfig, mesh_degrees
from harness.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    """Degrees of the mesh dimensions (ranks); their product is the world size.

    Raises (on construction):
        ConfigError: a degree below 1, or degrees whose product is not ``world_size``.
    """

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    pp: int = 1
    cp: int = 1
    _mesh: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in MESH_DIMS:
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel mesh: {name}={getattr(self, name)} must be >= 1")
        product = self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            cp = f"cp={self.cp} x " if self.cp > 1 else ""
            raise ConfigError(
                f"parallel mesh: pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} "
                f"x {cp}tp={self.tp} = {product} != world_size={self.world_size}"
            )

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The layout the chosen backend uses at ``world_size`` ranks
        (:func:`harness.config.validate.mesh_degrees`).

        Raises:
            ConfigError: ``parallel.dp_replicate`` (FSDP) or ``parallel.tp`` does not divide the world size.
        """
        return cls(*mesh_degrees(cfg, world_size), world_size, pp=max(cfg.pp, 1), cp=max(cfg.cp, 1))

    @property
    def dp(self) -> int:
        """Data-parallel ranks: they see different micro-batches (``dp_replicate x dp_shard``)."""
        return self.dp_replicate * self.dp_shard

    @property
    def mesh_dims(self) -> tuple[str, ...]:
        """The mesh's dimension names: :data:`MESH_DIMS` (``pp`` and ``cp`` only when above 1)."""
        return tuple(d for d in MESH_DIMS if d not in ("pp", "cp") or getattr(self, d) > 1)

    def mesh(self, device_type: str):
        """The ``DeviceMesh`` with dims ``(pp, dp_replicate, dp_shard, cp, tp)`` (``pp``, ``cp`` when > 1;
        built once; collective)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = tuple(getattr(self, name) for name in self.mesh_dims)
            self._mesh = init_device_mesh(device_type, shape, mesh_dim_names=self.mesh_dims)
        return self._mesh

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank`` (tp innermost: ``cp x tp`` consecutive ranks share
        one; the ``pp`` stages of one data-parallel rank share it too)."""
        return rank % (self.world_size // self.pp) // (self.cp * self.tp)

    def cp_rank(self, rank: int) -> int:
        """The context-parallel rank (which chunks of every sequence) of global ``rank``."""
        return rank // self.tp % self.cp

    def cp_group(self, device_type: str):
        """The process group of this rank's context-parallel peers (same pp, dp and tp coordinates)."""
        return self.mesh(device_type).get_group("cp")

    def pp_rank(self, rank: int) -> int:
        """The pipeline rank (which stage, or which stages) of global ``rank``."""
        return rank // (self.world_size // self.pp)

    def pp_group(self, device_type: str):
        """The process group of this rank's pipeline (its stages' ranks, same dp and tp coordinates)."""
        return self.mesh(device_type).get_group("pp")

    def dp_group(self, device_type: str):
        """The process group of this rank's data-parallel peers (same pp, cp and tp coordinates); None
        when the world is the data-parallel group (tp=pp=cp=1), or when there is one data-parallel rank."""
        if self.tp * self.pp * self.cp == 1 or self.dp == 1:
            return None
        mesh = self.mesh(device_type)
        sub = mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]
        return sub._flatten("dp").get_group() if self.dp_replicate > 1 else sub.get_group()

    def group_dims(self, device_type: str) -> dict[str, str]:
        """``process group name -> mesh dimension`` for the dimensions of more than one rank (the
        communication accounting's split); a dimension spanning the world owns the default group."""
        import torch.distributed as dist

        names: dict[str, str] = {}
        if self.world_size == 1:
            return names
        mesh = self.mesh(device_type)
        for dim in self.mesh_dims:
            if getattr(self, dim) > 1:
                names.setdefault(mesh.get_group(dim).group_name, dim)
        if self.cp > 1:  # FSDP2's gradients and gathers over dp_shard x cp
            self.fsdp_mesh(device_type)
            names.setdefault(mesh["dp_shard_cp"].get_group().group_name, "dp_shard_cp")
        dp = self.dp_group(device_type)
        if dp is not None:
            names.setdefault(dp.group_name, "dp")
        names.setdefault(dist.group.WORLD.group_name, "world")
        return names

    def rank_dims(self, device_type: str) -> dict[tuple[int, ...], str]:
        """``sorted global ranks -> mesh dimension`` of this rank's group along each dimension of more
        than one rank (``dp`` for the flattened data-parallel group, ``world`` for all ranks when no
        dimension spans them): labels process groups created outside the mesh by the ranks they span."""
        import torch.distributed as dist

        out: dict[tuple[int, ...], str] = {}
        if self.world_size == 1:
            return out
        mesh = self.mesh(device_type)
        groups = [(mesh.get_group(dim), dim) for dim in self.mesh_dims if getattr(self, dim) > 1]
        if self.cp > 1:
            self.fsdp_mesh(device_type)
            groups.append((mesh["dp_shard_cp"].get_group(), "dp_shard_cp"))
        dp = self.dp_group(device_type)
        for group, dim in groups + ([(dp, "dp")] if dp is not None else []):
            out.setdefault(tuple(sorted(dist.get_process_group_ranks(group))), dim)
        out.setdefault(tuple(range(self.world_size)), "world")
        return out

    def fsdp_mesh(self, device_type: str):
        """The mesh FSDP2 shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP; with
        ``cp > 1`` ``dp_shard x cp`` flattened into one dimension, ``dp_shard_cp``."""
        mesh = self.mesh(device_type)
        if self.cp > 1:
            shard = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
            return mesh["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else shard
        return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]

    @property
    def shard_degree(self) -> int:
        """Ranks FSDP2 shards (and averages gradients) over: ``dp_shard x cp``."""
        return self.dp_shard * self.cp
