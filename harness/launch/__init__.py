"""Launching on clusters: the Slurm sbatch generator (:mod:`harness.launch.slurm`) and the per-node
signal relay it runs under srun (:mod:`harness.launch.node`). Every path ends in ``harness.train``."""
