"""Launching on clusters: the Slurm sbatch generator (:mod:`harness.cluster.slurm`) and the per-node
signal relay it runs under srun (:mod:`harness.cluster.node`). Every path ends in ``harness.train``."""
