"""Per-node wrapper that the generated sbatch script runs under ``srun`` around torchrun or the
deepspeed launcher::

    python -m harness.cluster.node -- python -m torch.distributed.run ... -m harness.train ...

It exists for two reasons:

1. **Signals.** Slurm asks for a checkpoint with SIGUSR1 (``#SBATCH --signal=B:USR1@N``, relayed by
   the batch script through ``srun``). torchrun forwards only SIGTERM/SIGINT/SIGHUP/SIGQUIT to its
   workers (and the deepspeed launcher only SIGINT/SIGTERM), and USR1's default action would kill the
   launcher. So the launcher is started with USR1 ignored, and this wrapper sends USR1 to the training
   processes themselves (descendants whose command line runs ``harness.train``), which install their
   own handler: finish the step, checkpoint on every rank, exit 75. SIGTERM is relayed the same way.
2. **Exit status.** torchrun reports any worker failure as exit status 1, so a preempted run (75)
   would look like a crash. Training processes write their exit status into ``$HARNESS_EXIT_CODE_DIR``
   (``harness.exits.report_exit``); when the launcher fails and every status written there is 0, 2, 75
   or 130, the wrapper exits with that status (``harness.exits.combine_exit``): 75 becomes
   ``scontrol requeue`` in the batch script, 2 is a refused config (one ``error:`` line).

3. **Rendezvous.** With ``--rendezvous HOST:PORT`` (the generated script passes the first node's
   address), a node other than ``HOST`` first connects to it, retrying for ``--rendezvous-timeout``
   seconds (the head's launcher opens the port when it starts); when it cannot, it prints one line
   naming this node, ``HOST`` and ``PORT`` and the last error, and exits with status 2, before any
   training process starts (torchrun alone would wait out its own timeouts with a traceback).

Arguments after ``--`` of the form ``${SLURM_NODEID}`` (any ``SLURM_*`` variable, written in single
quotes in the batch script) are expanded here, on each node, from that node's environment.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

from harness.exits import EXIT_CODE_DIR_ENV, EXIT_USAGE, combine_exit

TRAIN_MODULE = "harness.train"
LAUNCHER_MODULES = (
    "torch.distributed.run",
    "torchrun",
    "deepspeed.launcher",
)  # their command lines name it too
_SLURM_VAR = re.compile(r"\$\{(SLURM_[A-Z0-9_]+)\}")


def expand_slurm_vars(args: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """Replace ``${SLURM_*}`` in each argument with this node's value.

    Raises:
        SystemExit: a referenced ``SLURM_*`` variable is not set (the wrapper runs outside srun).
    """
    environ = os.environ if environ is None else environ

    def value(m: re.Match) -> str:
        if m.group(1) not in environ:
            raise SystemExit(f"error: {m.group(1)} is not set; harness.cluster.node runs under srun")
        return environ[m.group(1)]

    return [_SLURM_VAR.sub(value, a) for a in args]


def reach_rendezvous(endpoint: str, timeout_s: float, node: str | None = None) -> str | None:
    """Connect to ``endpoint`` (``host:port``) until it accepts or ``timeout_s`` seconds have passed.

    Returns:
        None when it accepted (or this node is the endpoint's host: its own launcher opens it), else
        the one-line error naming this node, the host, the port and the last error.
    """
    host, _, port = endpoint.rpartition(":")
    node = node or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if not host or not port.isdigit():
        return f"--rendezvous {endpoint!r} is not HOST:PORT"
    if node in (host, host.split(".")[0]):
        return None
    deadline, last = time.monotonic() + timeout_s, "no attempt"
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, max(timeout_s, 0.1))):
                return None
        except OSError as e:
            last = f"{type(e).__name__}: {e.strerror or e}"
        if time.monotonic() >= deadline:
            return (
                f"node {node} cannot reach the rendezvous at {host}:{port} within {timeout_s:g} s "
                f"(last error: {last}); check that {host} resolves to its address from {node} and that "
                f"port {port} is open between the nodes (slurm.rdzv_port, slurm.rdzv_timeout_s)"
            )
        time.sleep(1.0)


def _training_processes(pid: int) -> list:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            cmd = p.cmdline()
            if TRAIN_MODULE in cmd and not any(m in a for a in cmd for m in LAUNCHER_MODULES):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _read_codes(directory: str) -> list[int]:
    codes = []
    for name in sorted(os.listdir(directory)):
        try:
            with open(os.path.join(directory, name)) as f:
                codes.append(int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return codes


def main(argv: list[str] | None = None) -> int:
    """Check the rendezvous (``--rendezvous``), run the launcher command after ``--``, relay USR1/TERM
    to the training processes; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    own, argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    opts = dict(zip(own[::2], own[1::2]))
    if not argv or len(own) % 2 or set(opts) - {"--rendezvous", "--rendezvous-timeout"}:
        print(
            "usage: python -m harness.cluster.node [--rendezvous HOST:PORT [--rendezvous-timeout S]] "
            "-- LAUNCHER ARGS...",
            file=sys.stderr,
        )
        return 2
    if "--rendezvous" in opts:
        timeout = opts.get("--rendezvous-timeout", "600")
        if not timeout.replace(".", "", 1).isdigit():
            print(f"error: --rendezvous-timeout {timeout!r} is not a number of seconds", file=sys.stderr)
            return 2
        error = reach_rendezvous(opts["--rendezvous"], float(timeout))
        if error is not None:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return EXIT_USAGE
    cmd = expand_slurm_vars(argv)
    with tempfile.TemporaryDirectory(prefix="harness-exit-") as codes_dir:
        env = {**os.environ, EXIT_CODE_DIR_ENV: codes_dir}

        def ignore_usr1() -> None:  # in the launcher: USR1 ignored (inherited by exec), workers set their own
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

        try:
            proc = subprocess.Popen(cmd, env=env, preexec_fn=ignore_usr1)
        except OSError as e:
            print(f"error: cannot start {cmd[0]!r}: {e.strerror}", file=sys.stderr)
            return 127

        def relay(signum, frame) -> None:  # USR1 and TERM may arrive together (srun relay + slurmstepd)
            try:
                targets = _training_processes(proc.pid)
            except Exception as e:  # noqa: BLE001  (a signal handler must not kill the wrapper)
                print(
                    f"[harness.cluster.node] cannot list training processes: {e}", file=sys.stderr, flush=True
                )
                return
            name = signal.Signals(signum).name
            print(
                f"[harness.cluster.node] {name}: asking {len(targets)} training processes to checkpoint and "
                "stop",
                file=sys.stderr,
                flush=True,
            )
            for p in targets:
                try:
                    p.send_signal(signal.SIGUSR1)
                except Exception:  # noqa: BLE001  (it may just have exited)
                    pass

        signal.signal(signal.SIGUSR1, relay)
        signal.signal(signal.SIGTERM, relay)
        # Ctrl-C reaches the launcher from the terminal (it forwards it to the workers): keep waiting.
        signal.signal(signal.SIGINT, lambda *_: None)
        rc = proc.wait()
        if rc < 0:  # killed by a signal: report it the way a shell does
            rc = 128 - rc
        return combine_exit(rc, _read_codes(codes_dir))


if __name__ == "__main__":
    status = main()
    # The launcher has exited: from here a TERM (srun's --kill-on-bad-exit after another node's wrapper
    # exited 75 first) must not turn this status into 143 while the interpreter shuts down (which
    # restores the default action of signals that have a Python handler).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(status)
