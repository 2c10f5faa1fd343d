"""Start-up cost of a model under torchrun on CPU (gloo): each rank's peak resident memory and the
wall time from launch, as the first step starts and at the end of that step (optimizer step included).

    PYTHONPATH=$PWD .venv/bin/python bench/startup.py --world 4 --model llama_1b [--parallel fsdp]
        [--phase step|start] [--doc before|after] [--label TEXT] [--note TEXT] [--json bench/startup.json]
    PYTHONPATH=$PWD .venv/bin/python bench/startup.py ... --doc before|after --from-json SAVED.json

The harness measured is the one on ``PYTHONPATH`` (its checkout's commit is printed). One run:

- a JSON-lines corpus of 12 standard-library modules (as ``tests/conftest.py: small_corpus``) and the
  GPT-2 tokenizer of ``../shared/data`` (``--tokenizer bpe`` trains the harness's own instead);
- a warm-up run of the ``tiny`` model (1 process, 1 step) fills a private token cache, so the
  measured run does no tokenizing;
- ``torchrun --standalone --nproc_per_node WORLD`` of ``harness.train`` with ``train.max_steps=1``,
  ``data.seq_len=64``, micro-batch 1, global batch = WORLD (one micro-batch per rank: the step
  itself is cheap), evaluation, export and wandb off, ``OMP_NUM_THREADS=1`` per rank.

Each rank runs ``harness.train`` inside this file's ``--worker`` mode, which wraps ``Trainer.train``
(snapshot ``built``: the model is built and wrapped, no step yet) and replaces
``Trainer.save_checkpoint`` (called once, right after the only step; snapshot ``stepped``). A
snapshot is the rank's ``VmHWM`` (peak RSS, ``/proc/self/status``) and the seconds since launch, in
a JSON file per rank. The end-of-run checkpoint is not written (it is not start-up, and would write
the whole model to disk). ``--phase start`` returns from ``Trainer.train`` after ``built``: no step,
for a model whose step does not fit the host. From outside, every 0.1 s, this process samples each
rank's ``VmRSS`` / ``VmHWM`` (a cross-check, and the sum of the ranks' RSS at its peak) and kills
the ranks (SIGKILL by pid) if their summed RSS passes ``--max-gib`` or the machine's
``MemAvailable`` falls under ``--floor-gib``. Before launching it waits (polling every 30 s, up to
``--wait-min``) until ``MemAvailable`` is at least ``--need-gib``. Exit 1 with the ranks' log when
a run is killed or a rank's snapshot is missing; the result is still saved to ``--json``.

``--doc before|after`` writes the table into docs/benchmarks.md (section "Start-up memory and time
to first step (MODEL, PARALLEL, world WORLD, CPU)", made before "## GPU" if missing), replacing that
row set (and the "to be measured" placeholder) and keeping the other one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HARNESS_SHARED_DATA", REPO.parent / "shared" / "data"))
GPT2 = SHARED / "tokenizers" / "gpt2"
DOC = REPO / "docs" / "benchmarks.md"
GIB = 2**30
MODULES = "abc bisect calendar colorsys copy dataclasses fractions heapq numbers queue shlex textwrap"
LABELS = {
    "before": "full fp32 model built on every rank",
    "after": "meta-device build, only each rank's shards materialized",
}
T0_ENV = "STARTUP_BENCH_T0"


# ----------------------------------------------------------------------------- worker (one rank)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` of a process in bytes (``{}`` once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {m[1]: int(m[2]) * 1024 for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def worker(out_dir: str, phase: str, overrides: list[str]) -> None:
    """Run ``harness.train`` with ``overrides`` as this torchrun rank, writing ``rank_<r>.json`` with
    two snapshots: ``built`` as ``Trainer.train`` starts (model built and wrapped, optimizer made, no
    step yet) and ``stepped`` at the first checkpoint (the end of the run's only step, optimizer step
    included; the checkpoint itself is skipped). Each: ``vmhwm_bytes`` (peak RSS so far),
    ``vmrss_bytes``, ``time_s`` (since the launch time in ``$STARTUP_BENCH_T0``)."""
    import harness.train
    from harness.trainer import Trainer

    t0, rank = float(os.environ[T0_ENV]), int(os.environ["RANK"])
    rec: dict = {"rank": rank}
    train = Trainer.train

    def snapshot(name: str) -> None:
        rec[name] = {"time_s": time.time() - t0, **_lower(proc_status())}
        path = Path(out_dir, f"rank_{rank}.json")
        path.with_suffix(".tmp").write_text(json.dumps(rec))
        path.with_suffix(".tmp").replace(path)

    def train_recorded(trainer):  # replaces Trainer.train
        snapshot("built")
        if phase == "step":
            return train(trainer)
        for hook in trainer.hooks:
            hook.close()
        return trainer.state

    Trainer.train = train_recorded
    Trainer.save_checkpoint = lambda trainer: snapshot("stepped")
    sys.argv = [harness.train.__file__, *overrides]
    harness.train.main()


def _lower(status: dict[str, int]) -> dict[str, int]:
    return {f"{k.lower()}_bytes": v for k, v in status.items()}


# ----------------------------------------------------------------------------- launcher


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--parallel", default="fsdp")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--tokenizer", default=str(GPT2), help="a tokenizer directory, or 'bpe' (trained)")
    ap.add_argument("--need-gib", type=float, default=20.0, help="MemAvailable needed to launch")
    ap.add_argument("--wait-min", type=float, default=20.0, help="how long to wait for --need-gib")
    ap.add_argument("--max-gib", type=float, default=21.0, help="kill the ranks above this summed RSS")
    ap.add_argument("--floor-gib", type=float, default=1.0, help="kill the ranks under this MemAvailable")
    ap.add_argument("--timeout-min", type=float, default=30.0)
    ap.add_argument("--doc", choices=sorted(LABELS), help="write this row set into docs/benchmarks.md")
    ap.add_argument("--label", help="the row set's label (default: '<set> (<commit>: <what>)')")
    ap.add_argument(
        "--phase",
        choices=["step", "start"],
        default="step",
        help="step: to the end of step 1; start: stop as step 1 would begin (no step, no optimizer state)",
    )
    ap.add_argument("--note", default="", help="a sentence appended to the row set's note in the doc")
    ap.add_argument("--json", default="bench/startup.json")
    ap.add_argument("--from-json", help="write --doc from this saved result instead of measuring")
    ap.add_argument("extra", nargs="*", help="more harness.train overrides")
    return ap.parse_args()


def overrides(
    args: argparse.Namespace, corpus: Path, run_dir: Path, model: str, parallel: str, world: int
) -> list[str]:
    """``harness.train`` overrides of one cheap step (nothing written but metrics) of ``model`` under
    ``parallel`` at ``world`` ranks."""
    tok = ["tokenizer.path=null"] if args.tokenizer == "bpe" else [f"tokenizer.path={args.tokenizer}"]
    return [
        f"model={model}",
        f"parallel={parallel}",
        f"data.path={corpus}",
        f"data.seq_len={args.seq_len}",
        *tok,
        "train.max_steps=1",
        "train.micro_batch_size=1",
        f"train.global_batch_size={world}",
        "schedule.batch_warmup.start_global_batch_size=null",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.export_hf=false",
        "logging.wandb.mode=disabled",
        "logging.progress=off",
        f"hydra.run.dir={run_dir}",
        *args.extra,
    ]


def write_corpus(path: Path) -> None:
    """The 12 standard-library modules of ``tests/conftest.py: small_corpus`` as JSON lines."""
    stdlib = sysconfig.get_paths()["stdlib"]
    with open(path, "w") as f:
        for name in MODULES.split():
            text = Path(stdlib, f"{name}.py").read_text(encoding="utf-8")
            f.write(json.dumps({"text": text, "id": name}) + "\n")


def mem_available() -> int:
    """The machine's ``MemAvailable`` in bytes."""
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)[1]) * 1024


def wait_for_memory(need_gib: float, wait_min: float) -> None:
    """Return once ``MemAvailable >= need_gib``; exit 3 after ``wait_min`` minutes without it."""
    deadline = time.time() + wait_min * 60
    while (avail := mem_available() / GIB) < need_gib:
        if time.time() > deadline:
            sys.exit(
                f"error: only {avail:.1f} GiB available after {wait_min:g} min (--need-gib {need_gib:g})"
            )
        print(f"{avail:.1f} GiB available < {need_gib:g}; waiting 30 s", flush=True)
        time.sleep(30)


def find_ranks(launcher_pid: int, ranks: dict[int, int]) -> None:
    """Add the torchrun workers under ``launcher_pid`` to ``ranks`` (pid -> RANK)."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        if child.pid in ranks:
            continue
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            ranks[child.pid] = int(rank)


def kill(launcher: subprocess.Popen, ranks: dict[int, int]) -> None:
    """SIGKILL the ranks (each in its own session under torchrun) and the launcher, by pid."""
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.kill()


def launch(args: argparse.Namespace, cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run ``cmd`` (torchrun) and sample its ranks every 0.1 s until it exits. Returns ``rc``,
    ``wall_s``, ``t0`` (launch time), ``sampled`` (per rank: peak ``VmRSS`` / ``VmHWM`` seen),
    ``peak_sum_bytes`` (the ranks' summed RSS at its peak) and ``killed`` (why, or None)."""
    t0 = time.time()
    env = {**env, T0_ENV: repr(t0)}
    ranks: dict[int, int] = {}
    sampled: dict[int, dict[str, int]] = {}
    peak_sum, killed, timeline = 0, None, []
    with open(log_path, "w") as log:
        p = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while p.poll() is None:
            find_ranks(p.pid, ranks)
            total = 0
            for pid, rank in ranks.items():
                st = proc_status(pid)
                seen = sampled.setdefault(rank, {"VmRSS": 0, "VmHWM": 0})
                for k, v in st.items():
                    seen[k] = max(seen[k], v)
                total += st.get("VmRSS", 0)
            peak_sum = max(peak_sum, total)
            if not timeline or time.time() - t0 >= timeline[-1][0] + 1:
                timeline.append((round(time.time() - t0, 1), total, mem_available()))
            if total > args.max_gib * GIB:
                killed = f"the ranks' summed RSS {total / GIB:.1f} GiB > --max-gib {args.max_gib:g}"
            elif mem_available() < args.floor_gib * GIB:
                killed = f"MemAvailable {mem_available() / GIB:.1f} GiB < --floor-gib {args.floor_gib:g}"
            elif time.time() - t0 > args.timeout_min * 60:
                killed = f"no exit after --timeout-min {args.timeout_min:g}"
            if killed:
                print(f"killing the ranks: {killed}", flush=True)
                kill(p, ranks)
                p.wait()
                break
            time.sleep(0.1)
    return {
        "rc": p.returncode,
        "wall_s": time.time() - t0,
        "t0": t0,
        "sampled": {r: _lower(s) for r, s in sorted(sampled.items())},
        "peak_sum_bytes": peak_sum,
        "killed": killed,
        "timeline": timeline,  # (seconds since launch, the ranks' summed RSS, MemAvailable), every 1 s
    }


def harness_commit() -> str:
    """Short commit of the checkout whose ``harness`` is imported (``+dirty`` with changes)."""
    import harness

    root = Path(harness.__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    sha = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return f"{sha or 'unknown'}{'+dirty' if dirty.stdout.strip() else ''} ({root})"


def measure(args: argparse.Namespace) -> dict:
    """Warm the token cache, launch the measured run, and collect each rank's record."""
    tmp = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    corpus, out = tmp / "corpus.jsonl", tmp / "ranks"
    out.mkdir()
    write_corpus(corpus)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HARNESS_CACHE_DIR": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    warm = overrides(args, corpus, tmp / "warm", "tiny", "none", 1)
    t = time.time()
    subprocess.run(
        [sys.executable, "-m", "harness.train", *warm], cwd=REPO, env=env, check=True, capture_output=True
    )
    warm_s = time.time() - t
    wait_for_memory(args.need_gib, args.wait_min)
    train = overrides(args, corpus, tmp / "run", args.model, args.parallel, args.world)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}"]
    cmd += [__file__, "--worker", str(out), args.phase, *train]
    res = launch(args, cmd, env, tmp / "torchrun.log")
    res["ranks"] = [json.loads(p.read_text()) for p in sorted(out.glob("rank_*.json"))]
    metrics = tmp / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    res["record"] = json.loads(lines[0]) if lines else None
    res.update(
        warm_s=warm_s,
        tmp=str(tmp),
        load=os.getloadavg()[0],
        overrides=train,
        log=(tmp / "torchrun.log").read_text()[-3000:],
    )
    return res


HEADER = (
    "| rank | peak RSS before step 1, GiB | launch to step 1, s "
    "| peak RSS to the end of step 1, GiB | launch to the end of step 1, s |"
)


def table(res: dict) -> list[str]:
    """Markdown rows under :data:`HEADER`, one per rank (``not run`` for the step under ``--phase start``)."""
    rows = []
    for r in res["ranks"]:
        built, stepped = r["built"], r.get("stepped")
        row = f"| {r['rank']} | {built['vmhwm_bytes'] / GIB:.2f} | {built['time_s']:.1f} |"
        row += (
            f" {stepped['vmhwm_bytes'] / GIB:.2f} | {stepped['time_s']:.1f} |"
            if stepped
            else " not run | not run |"
        )
        rows.append(row)
    return rows


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    args = parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res["ranks"] = [
            {"rank": r["rank"], **{k: v for k, v in r.items() if k != "rank"}} for r in res["ranks"]
        ]
    else:
        res = measure(args)
        res.update(commit=harness_commit(), world=args.world, model=args.model, parallel=args.parallel)
        with open(REPO / args.json, "w") as f:
            json.dump({k: v for k, v in res.items() if k != "log"}, f, indent=1)
    commit = res["commit"]
    if res["killed"] or [len(r) for r in res["ranks"]] != [2 if args.phase == "start" else 3] * args.world:
        print(res.get("log", ""), file=sys.stderr)
        sys.exit(f"error: run failed (rc {res['rc']}, {res['killed'] or 'ranks missing'}); see {res['tmp']}")
    report(args, res)
    if not args.from_json:
        shutil.rmtree(res["tmp"], ignore_errors=True)
    if args.doc:
        label = args.label or f"{args.doc} ({commit.split()[0]}: {LABELS[args.doc]})"
        write_doc(args, res, label)


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this measurement (from the checkout to measure)."""
    flags = f"--world {args.world} --model {args.model} --parallel {args.parallel}"
    flags += f" --phase {args.phase}" if args.phase != "step" else ""
    return f"PYTHONPATH=$PWD python bench/startup.py {flags}"


def report(args: argparse.Namespace, res: dict) -> None:
    """Print the table, the command, the outside samples and the run's totals."""
    print(f"\nharness: {res['commit']}")
    print(f"command: {command(args)}")
    launched = f"torchrun --standalone --nproc_per_node {args.world} bench/startup.py --worker DIR"
    print(f"measured: {launched} {' '.join(res['overrides'])}")
    print("\n" + HEADER)
    print("|---:|---:|---:|---:|---:|")
    print("\n".join(table(res)))
    for rank, s in res["sampled"].items():
        rss, hwm = s["vmrss_bytes"] / GIB, s["vmhwm_bytes"] / GIB
        print(f"rank {rank} sampled from outside until exit: max VmRSS {rss:.2f} GiB, VmHWM {hwm:.2f} GiB")
    rec = res["record"] or {}
    print(f"the ranks' summed RSS at its peak: {res['peak_sum_bytes'] / GIB:.2f} GiB (sampled every 0.1 s)")
    print(f"launch to exit {res['wall_s']:.1f} s; warm-up run {res['warm_s']:.1f} s")
    if rec:
        step, peak0 = rec["step_time_s"], rec["max_memory_bytes"] / GIB
        print(
            f"rank 0's record: step_time_s {step:.2f}, max_memory_bytes {peak0:.2f} GiB, loss {rec['loss']}"
        )


# ----------------------------------------------------------------------------- docs/benchmarks.md


def section_title(args: argparse.Namespace) -> str:
    return (
        f"### Start-up memory and time to first step ({args.model}, {args.parallel}, world {args.world}, CPU)"
    )


def write_doc(args: argparse.Namespace, res: dict, label: str) -> None:
    """Put ``res``'s rows under ``label`` into the section (created before ``## GPU`` if missing),
    replacing the rows and note of the same set (``before`` / ``after``) and keeping the other's."""
    text = DOC.read_text()
    title = section_title(args)
    sets = parse_section(text, title)
    rows = [f"| {label} |{row[1:]}" for row in table(res)]
    rec = res["record"] or {}
    date = datetime.datetime.fromtimestamp(res["t0"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total, step = res["peak_sum_bytes"] / GIB, rec.get("step_time_s", 0)
    parts = [date, f"the ranks' summed RSS at its peak {total:.1f} GiB (sampled every 0.1 s)"]
    parts += [f"rank 0's first step {step:.1f} s"] if rec else []
    parts += [f"launch to exit {res['wall_s']:.0f} s"]
    parts += [f"load average {res['load']:.1f} at the end"] if "load" in res else []
    note = f"- {label}: " + "; ".join(parts) + "." + (f" {args.note.rstrip('.')}." if args.note else "")
    sets[args.doc] = (rows, note)
    body = render_section(args, title, sets)
    start, end = section_span(text, title)
    if start is None:
        gpu = text.index("\n## GPU") + 1
        text = text[:gpu] + body + text[gpu:]
    else:
        text = text[:start] + body + text[end:]
    DOC.write_text(text)
    print(f"wrote {label} into {DOC} ({title[4:]})")


def section_span(text: str, title: str) -> tuple[int | None, int | None]:
    """Start and end offsets of the section under ``title`` (ending at the next ``##``/``###``)."""
    start = text.find(title + "\n")
    if start < 0:
        return None, None
    nxt = re.search(r"^#{2,3} ", text[start + len(title) :], re.M)
    return start, start + len(title) + nxt.start() if nxt else len(text)


def parse_section(text: str, title: str) -> dict[str, tuple[list[str], str]]:
    """``{set: (table rows, note line)}`` of the measured sets already in the section."""
    start, end = section_span(text, title)
    sets: dict[str, tuple[list[str], str]] = {}
    if start is None:
        return sets
    lines = text[start:end].splitlines()
    for name in LABELS:
        rows = [ln for ln in lines if ln.startswith(f"| {name} (") and "to be measured" not in ln]
        notes = [ln for ln in lines if ln.startswith(f"- {name} (")]
        if rows:
            sets[name] = (rows, notes[0] if notes else "")
    return sets


def render_section(args: argparse.Namespace, title: str, sets: dict[str, tuple[list[str], str]]) -> str:
    out = [
        title,
        "",
        f"`{command(args)} --doc before|after`",
        "",
        "Each rank's peak RSS (`VmHWM`) and the wall time from launching torchrun, at two points: as the",
        "first step starts (imports, config and data checks, model build, the backend's wrap, optimizer)",
        "and at the end of that step (optimizer step included: AdamW's state is made there). One cheap",
        "step: seq 64, micro-batch 1, one micro-batch per rank; gloo, `OMP_NUM_THREADS=1` per rank, the",
        "GPT-2 tokenizer (vocabulary padded to 50,304); 2 cores shared with other jobs (times move with",
        "the machine's load). `--phase start` ends each rank as step 1 would begin (the step's columns",
        "read `not run`): the step adds the gradient and AdamW shards (12 bytes per parameter / world in",
        "fp32) and the unsharded buffers of the layer in flight, which the build does not change.",
        "",
        "| code " + HEADER,
        "|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, what in LABELS.items():
        if name in sets:
            out += sets[name][0]
            notes.append(sets[name][1])
        else:
            out += [f"| {name} (to be measured: {what}) | all |" + " to be measured |" * 4]
    return "\n".join([*out, "", *[n for n in notes if n]]) + "\n\n"


if __name__ == "__main__":
    main()
