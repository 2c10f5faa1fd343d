"""The training command: ``python -m harness.train [hydra overrides]`` (console script ``harness-train``).

compose (Hydra) -> check and build (:meth:`Trainer.from_config`) -> ``trainer.train()`` -> exit
status (:mod:`harness.exits`): 0 done, 2 a refused input (one ``error:`` line), 75 preempted and
130 Ctrl-C (both after a complete checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings

import hydra

from harness import checkpoint as ckpt
from harness.config import CONFIG_DIR, compose_checked
from harness.dist import announce_error, read_ranks
from harness.errors import ConfigError, HarnessError
from harness.exits import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, exit_code, report_exit
from harness.trainer import Trainer, TrainState

# DeepSpeed still calls the collectives torch 2.13 renamed; DDP warns about broadcast_buffers once per rank.
warnings.filterwarnings(
    "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
)
warnings.filterwarnings("ignore", message=r".*broadcast_buffers.*", category=FutureWarning)


def run(cfg, run_dir: str, overrides: list[str] | None = None) -> TrainState:
    """Train as ``cfg`` (a composed config) says, writing into ``run_dir``; returns the final state.

    Nothing is written into ``run_dir`` until the config, the data and any checkpoint to resume from
    have passed their checks and rank 0 holds the directory's lock (see :mod:`harness.rundir`).

    Raises:
        HarnessError: a config, data or checkpoint problem, or a run directory in use.
    """
    with Trainer.from_config(cfg, run_dir, overrides or []) as trainer:
        return trainer.train()


def run_cli(cfg, run_dir: str, overrides: list[str]) -> int:
    """:func:`run` with the command line's exit status; a :class:`HarnessError` is one ``error:`` line
    on stderr, printed by rank 0 before any rank exits."""
    try:
        return exit_code(run(cfg, run_dir, overrides).stop_signal)
    except HarnessError as e:
        return _refuse(e, run_dir)
    except KeyboardInterrupt:
        latest = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        print(
            f"interrupted; newest checkpoint: {latest or 'none'} (rerun with checkpoint.resume=auto to "
            "continue)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _refuse(e: HarnessError, run_dir: str | None = None) -> int:
    announce_error(str(e))
    report_exit(_rank(), EXIT_USAGE)
    if run_dir:
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)  # only if the rejected run left it empty
    return EXIT_USAGE


def _world_size() -> int:
    try:
        return read_ranks()[2]
    except ConfigError:
        return 1


def _rank() -> int:
    try:
        return read_ranks()[0]
    except ConfigError:
        return 0


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    signal.signal(signal.SIGTERM, _discarding(hydra_cfg.runtime.output_dir))  # until the trainer's own
    code = run_cli(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
    # a worker of several (torchrun's, srun's) ends here; a sweep's job returns to Hydra/submitit
    if code == EXIT_PREEMPTED or (_world_size() > 1 and hydra_cfg.mode != RunMode.MULTIRUN):
        _exit_now(code)
    if code:
        sys.exit(code)


def _discarding(run_dir: str):
    """A SIGTERM handler for a worker's start-up: the directory Hydra has just made is removed if nothing
    was written into it yet (torchrun SIGTERMs the other workers as soon as one exits: a refused config
    must not leave an empty run directory behind on a slower rank), then the signal's default action."""

    def handle(signum, _frame) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)  # only an empty one
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handle


def _exit_now(code: int) -> None:
    """End a training worker (one of several processes, or a preempted run) with ``code`` now,
    skipping the interpreter's teardown: the run is over (its checkpoint complete, every file and sink
    closed, the process group destroyed), and the launcher, the requeue and the node wrapper depend on
    this status. In teardown third-party threads may still
    be inside C++ calls (wandb's after ``scancel`` killed ``wandb-core``, gloo's, a store client's): an
    abort there (``terminate called without an active exception``, SIGABRT, seen in CI and in about 1 of
    25 two-process runs) would turn a finished run (0) or a preempted one (75, requeued) into a crash,
    and so would a late SIGTERM (ignored here: see :func:`harness.exits.stop_signals_ignored`)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def check_overrides(overrides: list[str]) -> None:
    """Raise :class:`ConfigError` (one line) when Hydra cannot compose ``overrides`` (see
    ``compose_checked``)."""
    compose_checked(overrides)


def main() -> None:
    """Console-script entry (``harness-train``): one ``error:`` line and exit 2 for a config Hydra
    cannot compose; otherwise Hydra's own main (multirun, ``--cfg`` etc. go straight to Hydra)."""
    argv = sys.argv[1:]
    if not any(a.startswith("-") for a in argv):
        try:
            check_overrides(argv)
        except ConfigError as e:
            sys.exit(_refuse(e))
    _hydra_main()


if __name__ == "__main__":
    main()
