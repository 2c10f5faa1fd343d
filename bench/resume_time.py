"""Resume time vs checkpoint size and world size: how long choosing and checking the checkpoint to
resume from takes (:meth:`CheckpointManager.find_resume`, measured inside each rank), for two
checkouts of the harness (before / after), under torchrun on CPU (gloo).

    PYTHONPATH=$PWD .venv/bin/python bench/resume_time.py --before /tmp/before-resume [--after .]
        [--models tiny llama_125m llama_1b] [--worlds 1 2 4] [--reps 2] [--json FILE] [--doc]

One point (model, world size W):

- a checkpoint ``step_00000002`` as an FSDP2 run at world size W writes it, without training: W
  ``dcp/__<r>_0.distcp`` shards splitting the model's fp32 weights and AdamW's two moments
  (12 bytes per parameter, the parameter count of ``configs/model/<model>.yaml`` with the default
  4,096-token vocabulary), a DCP ``.metadata``, ``rng/rank_<r>.pt``, ``trainer_state.json``, and a
  ``manifest.json`` with every file's size, SHA-256 and writer (``"rank"``). The shards are sparse
  files (zeros, no disk used), so a hash costs CPU, not disk reads: on a real file system the
  before column also pays reading the whole checkpoint once per rank;
- ``torchrun --standalone --nproc_per_node W`` of this file's ``--worker`` with ``PYTHONPATH`` at
  the checkout measured; each rank creates the gloo process group, waits at a barrier, then times
  ``find_resume()`` (``checkpoint.resume=auto``: listing, size checks, SHA-256, pickle scan, state)
  and counts the bytes it hashed (``checkpoint._sha256`` wrapped).

The checkpoint's files are read once before the runs (page cache), and each checkout runs ``--reps``
times per point, alternating which goes first. The figures: the slowest rank's wall seconds and
the busiest rank's CPU seconds (``time.process_time``, which other jobs on the machine do not
inflate), each the lowest of the runs.
Restoring the weights (``backend.load``) is not timed: this work does not change it (each rank
reads its part through DCP, before and after).
``--doc`` writes the table into docs/benchmarks.md (section "Resume time vs checkpoint size and world
size", made before "## GPU" if missing).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
TITLE = "### Resume time vs checkpoint size and world size (`find_resume`, CPU, gloo)"
GIB = 2**30
EXPLAIN = (
    "The time of `CheckpointManager.find_resume()` (choosing the newest complete checkpoint, sizes, "
    "SHA-256, pickle scan, its state): the slowest rank's wall seconds (and the busiest rank's CPU "
    "seconds, which the machine's other jobs do not inflate; each the lowest of the runs), and the bytes "
    "the busiest rank hashed. The checkpoint is an FSDP2 world-W layout (12 bytes per parameter: fp32 "
    "weights and AdamW's moments, the default 4,096-token vocabulary) in sparse files, so hashing costs "
    "CPU and no disk reads (see `bench/resume_time.py`; torch.distributed.checkpoint is imported before "
    "the clock starts). Before, every rank hashed the whole checkpoint; after, each rank hashes the files "
    "it wrote and the ranks agree in one gather. The machine's 2 CPU cores are shared by the W ranks and "
    "with other engineers' jobs: at W = 4 the ranks take turns on the cores, so wall time here cannot "
    "fall below the checkpoint's hashing time / 2 and is noisy; the CPU column shows the per-rank work, "
    "which on a host (or core) per rank is the resume time: the whole checkpoint's hashing on every rank "
    "before, 1/W of it after. At W = 1 both do the same work (their difference is noise)."
)


def parameters(model: str, vocab: int = 4096) -> int:
    """Parameters of a Llama-shaped ``configs/model/<model>.yaml`` (tied embeddings) at ``vocab``."""
    import yaml

    c = yaml.safe_load((REPO / "configs" / "model" / f"{model}.yaml").read_text())
    h, kv = c["hidden_size"], c["num_kv_heads"] * c["hidden_size"] // c["num_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"] + 2 * h
    return vocab * h * (1 if c.get("tie_word_embeddings", True) else 2) + c["num_layers"] * layer + h


_ZERO_SHA: dict[int, str] = {}


def zeros_sha256(size: int) -> str:
    if size not in _ZERO_SHA:
        h, block = hashlib.sha256(), bytes(1 << 24)
        for start in range(0, size, len(block)):
            h.update(block[: min(len(block), size - start)])
        _ZERO_SHA[size] = h.hexdigest()
    return _ZERO_SHA[size]


def make_checkpoint(root: Path, total: int, world: int) -> Path:
    """``root/checkpoints/step_00000002`` as described in the module docstring; returns it."""
    import torch
    from torch.distributed.checkpoint.metadata import Metadata

    path = root / "checkpoints" / "step_00000002"
    (path / "dcp").mkdir(parents=True)
    (path / "rng").mkdir()
    files = {}
    for r in range(world):
        shard = path / "dcp" / f"__{r}_0.distcp"
        size = total // world
        with open(shard, "wb") as f:
            f.truncate(size)
        files[f"dcp/__{r}_0.distcp"] = {"size": size, "sha256": zeros_sha256(size), "rank": r}
        torch.save({"torch": torch.get_rng_state()}, path / "rng" / f"rank_{r}.pt")
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))
    state = {"step": 2, "format": "dcp", "parallel": "fsdp", "world_size": world}
    (path / "trainer_state.json").write_text(json.dumps(state))
    for name in ["dcp/.metadata", "trainer_state.json", *(f"rng/rank_{r}.pt" for r in range(world))]:
        data = (path / name).read_bytes()
        rank = int(name[9:-3]) if name.startswith("rng/") else 0
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": rank}
    (path / "manifest.json").write_text(json.dumps({"step": 2, "files": files}))
    return path


def warm(path: Path) -> None:
    """Read every file once, so that no measured run is the first to fault in the page cache."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def worker(run_dir: str, out: str) -> None:
    """One rank: time ``find_resume`` over every rank (gloo), count the bytes it hashed."""
    from types import SimpleNamespace

    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401  (imported by then in a real resume; ~1 s here)

    from harness import checkpoint as ckpt

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    hashed = [0]
    sha = ckpt._sha256

    def counted(path: str) -> str:
        hashed[0] += os.path.getsize(path)
        return sha(path)

    ckpt._sha256 = counted

    # its own two collectives (not harness.dist's): this script also runs against the code before them
    def gather(obj):
        got = [None] * world
        dist.all_gather_object(got, obj)
        return got

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    backend = SimpleNamespace(
        name="fsdp",
        checkpoint_format="dcp",
        reshardable=True,
        gather_object=gather,
        broadcast_object=broadcast,
    )
    env = SimpleNamespace(rank=rank, world_size=world, is_main=rank == 0)
    manager = ckpt.CheckpointManager(SimpleNamespace(resume="auto"), run_dir, env, backend, {}, None)
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    path = manager.find_resume()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert path and path.endswith("step_00000002"), path
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "hashed_bytes": hashed[0]}, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(tree: Path, run_dir: Path, world: int) -> dict:
    """``{"seconds": slowest rank, "cpu_seconds": busiest rank's CPU time, "hashed_bytes": most hashed by
    one rank, "per_rank": [...]}``."""
    out = Path(tempfile.mkdtemp(prefix="resume_time_"))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    cmd += [__file__, "--worker", str(run_dir), str(out)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{tree} world {world} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(out)
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "cpu_seconds": max(r["cpu_seconds"] for r in ranks),
        "hashed_bytes": max(r["hashed_bytes"] for r in ranks),
        "per_rank": ranks,
    }


def commit(tree: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "?"


def run(args: argparse.Namespace) -> dict:
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    rows = []
    for model in args.models:
        params = parameters(model)
        for world in args.worlds:
            with tempfile.TemporaryDirectory(prefix="resume_ckpt_", dir=args.tmp) as tmp:
                warm(make_checkpoint(Path(tmp), 12 * params, world))
                row = {"model": model, "parameters": params, "bytes": 12 * params, "world": world}
                for rep in range(args.reps):  # before, after, after, before, ...: the faster of each
                    for label in list(trees) if rep % 2 == 0 else list(trees)[::-1]:
                        got = measure(trees[label], Path(tmp), world)
                        print(
                            model,
                            world,
                            label,
                            f"{got['seconds']:.2f} s, CPU {got['cpu_seconds']:.2f} s",
                            flush=True,
                        )
                        best = row.setdefault(label, got)
                        best["seconds"] = min(best["seconds"], got["seconds"])
                        best["cpu_seconds"] = min(best["cpu_seconds"], got["cpu_seconds"])
                rows.append(row)
    return {
        "rows": rows,
        "commits": {k: commit(v) for k, v in trees.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": os.getloadavg()[0],
    }


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"


def table(res: dict) -> list[str]:
    out = [
        "| model | checkpoint | world | before: s (CPU s) | before: hashed per rank | after: s (CPU s) "
        "| after: hashed per rank | before / after (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        b, a = r["before"], r["after"]
        cells = [
            f"`{r['model']}` ({r['parameters'] / 1e6:,.0f} M parameters)",
            size(r["bytes"]),
            str(r["world"]),
            f"{b['seconds']:.2f} ({b['cpu_seconds']:.2f})",
            size(b["hashed_bytes"]),
            f"{a['seconds']:.2f} ({a['cpu_seconds']:.2f})",
            size(a["hashed_bytes"]),
            f"{b['seconds'] / a['seconds']:.1f}x ({b['cpu_seconds'] / a['cpu_seconds']:.1f}x)",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_doc(res: dict, command: str) -> None:
    text = DOC.read_text()
    body = "\n".join(
        [
            TITLE,
            "",
            f"`{command}` ({res['date']}; before = {res['commits']['before']}, after = "
            f"{res['commits']['after']}; load average {res['load']:.1f} at the end)",
            "",
            *textwrap.wrap(EXPLAIN, 100),
            "",
            *table(res),
            "",
        ]
    )
    start = text.find(TITLE + "\n")
    if start < 0:
        at = text.index("\n## GPU") + 1
        text = text[:at] + body + "\n" + text[at:]
    else:
        nxt = text.find("\n##", start + len(TITLE))
        text = text[:start] + body + (text[nxt + 1 :] if nxt >= 0 else "")
    DOC.write_text(text)
    print(f"wrote {DOC} ({TITLE[4:]})")


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("RUN_DIR", "OUT"), help=argparse.SUPPRESS)
    p.add_argument(
        "--before", help="the checkout measured as before (git worktree add /tmp/before-resume 8e3f59f)"
    )
    p.add_argument("--after", default=str(REPO), help="the checkout measured as after (default: this one)")
    p.add_argument("--models", nargs="+", default=["tiny", "llama_125m", "llama_1b"])
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=2, help="runs of each checkout per point (the fastest counts)")
    p.add_argument("--tmp", default=None, help="where the sparse checkpoints go (default: $TMPDIR)")
    p.add_argument("--json", default=None, help="also save the results here")
    p.add_argument("--doc", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return None
    if not args.before:
        p.error("--before CHECKOUT is required")
    res = run(args)
    print("\n".join(table(res)))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.doc:
        shown = ["python bench/resume_time.py --before /tmp/before-resume"]
        shown += [f"--models {' '.join(args.models)}", f"--worlds {' '.join(map(str, args.worlds))}"]
        shown += [f"--reps {args.reps}", "--doc"]
        write_doc(res, " ".join(shown))
    return res


if __name__ == "__main__":
    main()
