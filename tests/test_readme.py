"""The README's commands, run as written (with a short budget), so the README cannot drift.

Every command line of every ```bash block is in :data:`COMMANDS`: either run here (placeholder
paths replaced by real files, a short budget and a temporary run directory appended) or skipped
with the reason (GPU nodes, clusters, Docker). A command added to the README without an entry
here fails :func:`test_every_readme_command_is_covered`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import subprocess

import pytest
from conftest import REPO

README = REPO / "README.md"
SHORT = ["train.max_steps=3", "schedule.batch_warmup.steps=2", "eval.every=0", "logging.wandb.mode=disabled"]
TINY = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "data.seq_len=64",
]

# command prefix (as in the README) -> ("run", extra overrides) or ("skip", reason)
COMMANDS = {
    "make train": ("run", [*SHORT]),
    "make test": ("skip", "the suite itself"),
    ".venv/bin/python -m harness.train run_name=wikitext": ("run", [*SHORT, *TINY]),
    ".venv/bin/python -m harness.train run_name=c4": (
        "run",
        [*SHORT, *TINY, "train.global_batch_size=8", "train.micro_batch_size=2"],
    ),
    ".venv/bin/python -m harness.train run_name=lines": (
        "run",
        [
            *SHORT,
            *TINY,
            "data.seq_len=8",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "schedule.batch_warmup.start_global_batch_size=4",
        ],
    ),
    ".venv/bin/python -m harness.prepare_data": ("run", ["data.num_proc=2"]),
    ".venv/bin/python -m harness.train run_name=c4-prepared data.path=/data/c4_tok": (
        "run",
        [*SHORT, *TINY, "train.global_batch_size=8", "train.micro_batch_size=2"],
    ),
    ".venv/bin/python -m harness.plan data=mixture": ("run", []),
    ".venv/bin/python -m harness.train run_name=mixture data=mixture": ("run", [*SHORT, *TINY]),
    ".venv/bin/python -m harness.train run_name=web-code": (
        "run",
        [*SHORT, *TINY, "train.global_batch_size=8", "train.micro_batch_size=2"],
    ),
    ".venv/bin/torchrun --standalone --nproc_per_node 2 -m harness.train run_name=ddp parallel=ddp": (
        "run",
        [*SHORT, *TINY],
    ),
    ".venv/bin/torchrun --standalone --nproc_per_node 2 -m harness.train run_name=profiled parallel=ddp": (
        "run",
        [*SHORT, *TINY],
    ),
    ".venv/bin/torchrun --standalone --nproc_per_node 8": ("skip", "8 processes of llama_1b: a GPU node"),
    ".venv/bin/torchrun --standalone --nproc_per_node 2 -m harness.train run_name=tp2": (
        "skip",
        "run by tests/test_tensor_parallel.py (parallel=fsdp parallel.tp=2, tied and untied, world 2, "
        "to parity)",
    ),
    ".venv/bin/torchrun --nnodes 4": ("skip", "four nodes of 8 GPUs (Llama 3 70B)"),
    ".venv/bin/torchrun --nnodes 8": (
        "skip",
        "eight nodes of 8 GPUs (Llama 3 70B, 3-D); tests/test_pipeline.py validates its config at world 64",
    ),
    ".venv/bin/torchrun --standalone --nproc_per_node 2 -m harness.train run_name=pp2": ("run", [*SHORT]),
    ".venv/bin/torchrun --standalone --nproc_per_node 2 -m harness.train run_name=cp2": (
        "run",
        [*SHORT, *TINY, "train.global_batch_size=8", "train.micro_batch_size=2"],
    ),
    ".venv/bin/torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500 "
    "-m harness.train run_name=llama3-8b-128k": (
        "skip",
        "four nodes of 8 GPUs (Llama 3 8B at 128k tokens); tests/test_context_parallel.py validates its "
        "config at world 32",
    ),
    ".venv/bin/python -m harness.plan model=llama3_8b model.vocab_size=128256 parallel=fsdp parallel.tp=2": (
        "run",
        [],
    ),
    ".venv/bin/torchrun --standalone --nproc_per_node 2 -m harness.train run_name=zero3 parallel=deepspeed": (
        "run",
        [*SHORT, *TINY],
    ),
    ".venv/bin/deepspeed --num_gpus 2": ("run", [*SHORT, *TINY]),
    ".venv/bin/python -m harness.export": ("run", []),
    ".venv/bin/python -m harness.train run_name=continued model.init_from=runs/default/hf": ("run", [*SHORT]),
    ".venv/bin/python -m harness.plan model=llama3_8b": ("run", []),
    ".venv/bin/python -m harness.plan model=llama3_70b": ("run", []),  # the 512-GPU dry run (~75 s of CPU)
    ".venv/bin/python -m harness.train run_name=smoke": (
        "run",
        ["logging.wandb.mode=disabled"],
    ),
    "NPROC=8 launch/torchrun.sh": (
        "skip",
        "8 processes of llama_1b: a GPU node (launch/torchrun.sh: test_run_integrity)",
    ),
    "NPROC=8 launch/deepspeed.sh": ("skip", "8 processes of llama_1b: a GPU node"),
    "NNODES=4": ("skip", "four nodes"),
    ".venv/bin/python -m harness.cluster.slurm model=llama3_8b": ("run", ["slurm.dry_run=true"]),
    ".venv/bin/python -m harness.train -m run_name=lr-sweep": (
        "skip",
        "an h100 Slurm partition (submitit sweeps: tests/test_slurm.py)",
    ),
    "docker build": ("skip", "no Docker builds on the CI machines (the Dockerfile is linted in test_launch)"),
    "docker run": ("skip", "needs the image and GPUs"),
    ".venv/bin/python -m harness.cluster.slurm slurm.container_image": ("run", ["slurm.dry_run=true"]),
    "tests/cluster/start-nodes.sh": ("skip", "root; tests/test_multinode.py starts the two-node cluster"),
    "tests/cluster/exec.sh .venv/bin/python -m harness.cluster.slurm run_name=two-nodes": (
        "skip",
        "submitted as written (plus data.path) by tests/test_multinode.py on the two-node cluster",
    ),
    "tests/cluster/exec.sh squeue": ("skip", "the two-node cluster (tests/test_multinode.py runs squeue)"),
    "tests/cluster/stop-nodes.sh": ("skip", "root; tests/test_multinode.py stops the cluster it started"),
}


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def readme_overrides(marker: str) -> list[str]:
    """The ``key=value`` arguments of the README command that contains ``marker``."""
    import shlex

    line = next(c for c in readme_commands() if marker in c)
    return [a for a in shlex.split(line) if "=" in a and not a.startswith("--")]


def entry(command: str):
    matches = [k for k in COMMANDS if command.startswith(k)]
    return COMMANDS[max(matches, key=len)] if matches else None


def test_every_readme_command_is_covered():
    missing = [c for c in readme_commands() if entry(c) is None]
    assert not missing, f"README commands without an entry in tests/test_readme.py: {missing}"


def _substitutions(tmp, shared) -> dict[str, str]:
    (tmp / "a.txt").write_text("".join(f"line {i} of a, some words here\n" for i in range(400)))
    (tmp / "b.txt").write_text("".join(f"line {i} of b, other words there\n" for i in range(400)))
    return {
        "DIR/valid.jsonl": str(shared / "wikitext2" / "valid.jsonl"),
        "DIR/gpt2": str(shared / "tokenizers" / "gpt2"),
        "DIR/c4/": str(shared / "c4_sample") + "/",
        "DIR/llama_tokenizer": str(shared / "tokenizers" / "mistral_v1_spm"),
        "/data/c4/": str(shared / "c4_sample") + "/",
        "/data/tok": str(shared / "tokenizers" / "mistral_v1_spm"),
        "/data/c4_tok": str(tmp / "c4_tok"),
        "[a.txt,b.txt]": f"[{tmp}/a.txt,{tmp}/b.txt]",
        "/scratch": str(tmp / "scratch"),
        "runs/default/hf": str(tmp / "runs" / "default" / "hf"),  # make train's export
    }


def _run(command: str, extra: list[str], tmp, subs: dict, index: int, checkpoint: list):
    pattern = "|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True))
    command = re.sub(
        pattern, lambda m: subs[m.group(0)], command
    )  # one pass: no replacement of a replacement
    if checkpoint:
        command = command.replace("runs/default/checkpoints/step_00000200", checkpoint[0])
    command = command.replace(" exported/", f" {tmp}/exported/")
    args = shlex.split(command)
    names = [a.split("=", 1)[1] for a in args if a.startswith("run_name=")]
    run_dir = tmp / "runs" / (names[-1] if names else "default")  # runs/<run_name>, as for a user
    trains = "harness.train" in command
    if args[0] == "make":
        args += [f"ARGS={' '.join([*extra, f'hydra.run.dir={run_dir}'])}"]
    elif "harness.plan" in command:
        args += [*extra, f"plan.png={tmp}/plan{index}.png"]
    elif "harness.cluster.slurm" in command and "hydra.run.dir=" in command:
        args += extra
    elif "harness.export" not in command:
        args += [*extra, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    if trains or args[0] == "make":
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = int(re.findall(r"train\.max_steps=(\d+)", " ".join(args))[-1])
        assert [r["step"] for r in records] == list(range(1, steps + 1)), command
        checkpoint[:] = [str(sorted((run_dir / "checkpoints").iterdir())[-1])]
    return proc, run_dir


def test_every_training_command_has_its_own_run_name():
    """Only ``make train`` uses ``runs/default``; every other command that trains names its own run, so
    that no command lands on another's checkpoints (a one-process run's, say, under DeepSpeed)."""
    names = []
    for command in readme_commands():
        trains = re.search(r"harness\.train|launch/(torchrun|deepspeed)\.sh|^docker run", command)
        if not trains or command.startswith("make train") or command.startswith("docker build"):
            continue
        found = re.findall(r"(?:run_name=|hydra\.run\.dir=\S*/)(\S+)", command)
        assert found, f"README command without a run_name: {command}"
        names.append(found[-1])
    assert len(names) >= 18 and "default" not in names
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)


def _runs_beside(command: str) -> bool:
    """Commands that read no data and write no run (the model plans, the Slurm dry runs): they run in
    a thread beside the others (one process each, so two of the CI machine's cores are busy)."""
    return "harness.plan model=" in command or "harness.cluster.slurm" in command


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_commands_run_as_written(tmp_path, shared_data):
    subs = _substitutions(tmp_path, shared_data)
    checkpoint: list[str] = []
    commands = [(i, c) for i, c in enumerate(readme_commands()) if entry(c)[0] != "skip"]
    with concurrent.futures.ThreadPoolExecutor(1) as beside:
        futures = {
            c: beside.submit(_run, c, entry(c)[1], tmp_path, subs, i, [])
            for i, c in commands
            if _runs_beside(c)
        }
        done = [
            (c, _run(c, entry(c)[1], tmp_path, subs, i, checkpoint)) for i, c in commands if c not in futures
        ]
        done += [(c, f.result()) for c, f in futures.items()]
    for command, (proc, run_dir) in done:
        _check(command, proc, run_dir, tmp_path)
    assert len(done) >= 17


def _check(command: str, proc, run_dir, tmp_path) -> None:
    """The figures and files the README shows for ``command``, in its output."""
    if (
        "harness.plan model=llama3_8b" in command
        and "plan.gpus=32" in command
        and "parallel.cp" not in command
    ):
        assert "max_steps          238,982 optimizer steps" in proc.stdout
    if "harness.plan data=mixture" in command:  # the README's table is this output
        table = README.read_text().split("== Mixture")[1].split("```")[0]
        assert table.strip() in proc.stdout.split("== Mixture")[1]
    if "harness.plan" in command and "parallel.tp=2" in command:  # the README's tables are this output
        section = README.read_text().split("## Tensor parallelism")[1]
        for head in ("== Communication", "== Layouts"):
            table = section.split(head)[1].split("```")[0]
            assert table.strip() in proc.stdout.split(head)[1], head
    if "harness.train" in command and ("data.sources=" in command or "data=mixture" in command):
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(sum(r["tokens_by_source"].values()) == r["tokens"] for r in records)
    if "harness.plan" in command and "parallel.pp=4" in command:  # the README's table is this output
        table = README.read_text().split("## Pipeline parallelism")[1].split("```text")[1].split("```")[0]
        assert table.strip() in proc.stdout
    if "plan.dry_run=true" in command:  # the README's table is this output (all but the timing)
        section = README.read_text().split("## Check a big config before you queue it")[1]
        table = section.split("== Dry run")[1].split("dry run            ")[0]
        assert table in proc.stdout, proc.stdout
    if "harness.export" in command:
        assert (tmp_path / "exported" / "config.json").is_file()
    if "model.init_from=" in command:  # every tensor of make train's export, in one process
        assert (
            "38 tensors from 1 file(s), 16,851,968 of the checkpoint's 16,851,968 bytes read"
            in (run_dir / "train.log").read_text()
        )
    if "harness.cluster.slurm" in command:
        assert "slurm.dry_run=true: not submitted" in proc.stdout
