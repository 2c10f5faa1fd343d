"""The named device mesh every backend is applied over (after torchtitan's ``ParallelDims``).

One object, built once from the ``parallel`` section and the world size, says how the ranks are
laid out: ``dp_replicate x dp_shard x tp`` (outermost to innermost, so ``tp`` stays inside a node).
Data parallelism spans ``dp_replicate x dp_shard``: DDP replicates over all ranks, FSDP2 shards
over ``dp_shard`` (and HSDP replicates over ``dp_replicate``), ZeRO shards over all ranks.
Tensor parallelism (``harness.parallel.tensor``) shards each layer over ``tp``; the ``tp`` ranks of
one data-parallel rank read the same micro-batches, so the loss and the token counts are summed
over the data-parallel ranks only (:meth:`ParallelDims.dp_group`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import ParallelConfig, mesh_degrees
from harness.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


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
    _mesh: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in MESH_DIMS:
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel mesh: {name}={getattr(self, name)} must be >= 1")
        if self.dp_replicate * self.dp_shard * self.tp != self.world_size:
            raise ConfigError(
                f"parallel mesh: dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp} "
                "= "
                f"{self.dp_replicate * self.dp_shard * self.tp} != world_size={self.world_size}"
            )

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The layout the chosen backend uses at ``world_size`` ranks
        (:func:`harness.config.validate.mesh_degrees`).

        Raises:
            ConfigError: ``parallel.dp_replicate`` (FSDP) or ``parallel.tp`` does not divide the world size.
        """
        return cls(*mesh_degrees(cfg, world_size), world_size)

    @property
    def dp(self) -> int:
        """Data-parallel ranks: they see different micro-batches (``dp_replicate x dp_shard``)."""
        return self.dp_replicate * self.dp_shard

    def mesh(self, device_type: str):
        """The ``DeviceMesh`` with dims ``(dp_replicate, dp_shard, tp)`` (built once; collective)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = tuple(getattr(self, name) for name in MESH_DIMS)
            self._mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        return self._mesh

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank`` (tp innermost: ``tp`` consecutive ranks share one)."""
        return rank // self.tp

    def dp_group(self, device_type: str):
        """The process group of this rank's data-parallel peers (same tp coordinate); None when the
        world is the data-parallel group (tp=1), or when there is one data-parallel rank."""
        if self.tp == 1 or self.dp == 1:
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
        for dim in MESH_DIMS:
            if getattr(self, dim) > 1:
                names.setdefault(mesh.get_group(dim).group_name, dim)
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
        groups = [(mesh.get_group(dim), dim) for dim in MESH_DIMS if getattr(self, dim) > 1]
        dp = self.dp_group(device_type)
        for group, dim in groups + ([(dp, "dp")] if dp is not None else []):
            out.setdefault(tuple(sorted(dist.get_process_group_ranks(group))), dim)
        out.setdefault(tuple(range(self.world_size)), "world")
        return out

    def fsdp_mesh(self, device_type: str):
        """The mesh FSDP2 shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP."""
        mesh = self.mesh(device_type)
        return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]
