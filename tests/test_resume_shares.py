"""Resume integrity that scales: every rank hashes only its share of the chosen checkpoint, the ranks
agree on the verdict, and a load that fails on one rank ends every rank with status 74 and one line."""

import json
import os
import shutil
import socket
import subprocess
import sys
import traceback
from types import SimpleNamespace

import pytest
from conftest import REPO, SMALL, TORCHRUN2, checkpoints, torchrun_train, train_small

from harness import checkpoint as ckpt
from harness.faults import Faults

FILES = {
    "dcp/__0_0.distcp": {"size": 100, "rank": 0},
    "dcp/__1_0.distcp": {"size": 100, "rank": 1},
    "rng/rank_0.pt": {"size": 10, "rank": 0},
    "rng/rank_1.pt": {"size": 10, "rank": 1},
    "dcp/.metadata": {"size": 5, "rank": 0},
    "trainer_state.json": {"size": 3, "rank": 0},
}


def test_a_rank_checks_the_files_it_wrote_or_a_share_by_size():
    """Same world size as the writers: each rank its own files; another world size, or a manifest
    without writers: dealt by size, largest first, to the rank with the fewest bytes."""
    assert ckpt.share(FILES, 0, 2) == [
        "dcp/.metadata",
        "dcp/__0_0.distcp",
        "rng/rank_0.pt",
        "trainer_state.json",
    ]
    assert ckpt.share(FILES, 1, 2) == ["dcp/__1_0.distcp", "rng/rank_1.pt"]
    assert [ckpt.share(FILES, r, 3) for r in range(3)] == [
        ["dcp/__0_0.distcp"],
        ["dcp/__1_0.distcp"],
        ["dcp/.metadata", "rng/rank_0.pt", "rng/rank_1.pt", "trainer_state.json"],
    ]
    old = {n: {"size": v["size"]} for n, v in FILES.items()}  # written before manifests named writers
    assert [ckpt.share(old, r, 2) for r in range(2)] == [
        ["dcp/.metadata", "dcp/__0_0.distcp", "rng/rank_0.pt"],
        ["dcp/__1_0.distcp", "rng/rank_1.pt", "trainer_state.json"],
    ]
    assert ckpt.share(old, 0, 1) == sorted(FILES)


def _probe(tmp_path, root, resume=None) -> list[dict]:
    out = tmp_path / f"probe_{len(list(tmp_path.glob('probe_*')))}"
    out.mkdir()
    cmd = [*TORCHRUN2, "tests/resume_probe.py", str(out), str(root), *([str(resume)] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum sees it
    path.write_bytes(bytes(data))


def _largest(files: dict, names: list[str]) -> str:
    return max(names, key=lambda n: (files[n]["size"], n))


def test_two_ranks_hash_disjoint_shares_and_agree_on_a_damaged_file(tmp_path, small_corpus):
    """At world 2 the ranks' hashed files are disjoint and cover the manifest; a file damaged in rank
    1's share (rank 0 never reads it) moves both ranks to the previous checkpoint, with one warning
    (rank 0's) naming it; ``checkpoint.resume=<that checkpoint>`` is refused alike on both."""
    run_dir = tmp_path / "run"
    train_small(
        run_dir, small_corpus, "train.max_steps=6", "checkpoint.every=3", "checkpoint.export_hf=false"
    )
    root = run_dir / "checkpoints"
    newest = root / "step_00000006"
    files = ckpt._manifest_files(str(newest))
    ranks = _probe(tmp_path, root)
    assert [r["chosen"] for r in ranks] == [str(newest)] * 2
    shares = [set(r["hashed"]) for r in ranks]
    assert all(len(r["hashed"]) == len(s) > 0 for r, s in zip(ranks, shares))
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == {f"step_00000006/{n}" for n in files}
    assert [r["warnings"] for r in ranks] == [[], []]

    target = _largest(files, ckpt.share(files, 1, 2))
    assert target not in ckpt.share(files, 0, 2)
    _flip(newest / target)
    ranks = _probe(tmp_path, root, newest)
    assert [r["chosen"] for r in ranks] == [str(root / "step_00000003")] * 2
    assert f"step_00000006/{target}" in ranks[1]["hashed"]
    assert f"step_00000006/{target}" not in ranks[0]["hashed"]
    assert ranks[0]["warnings"] == [
        f"skipping damaged checkpoint {newest}: {target} does not match its SHA-256 in the manifest; trying "
        "the previous one"
    ]
    assert ranks[1]["warnings"] == []
    refused = (
        f"CheckpointError: checkpoint.resume: {newest} is damaged ({target} does not match its SHA-256 in "
        "the manifest); choose another checkpoint"
    )
    assert [r["find_resume"] for r in ranks] == [refused, refused]


def test_a_load_failing_in_any_form_ends_with_one_line(tmp_path, monkeypatch):
    """torch.distributed.checkpoint's CheckpointException derives from BaseException: restore still
    turns it into harness.failures.fail with the rank, host and path (one process)."""
    from torch.distributed.checkpoint.api import CheckpointException

    path = tmp_path / "step_00000003"
    path.mkdir()
    (path / "trainer_state.json").write_text('{"step": 3}')

    def load(directory):
        raise CheckpointException("load", {1: (ValueError("shard 1 is short"), traceback.StackSummary())})

    calls = []

    class Left(Exception):
        pass

    def fail(line, error=None):
        calls.append(line)
        raise Left

    monkeypatch.setattr(ckpt.failures, "fail", fail)
    env, backend = SimpleNamespace(rank=0, world_size=1), SimpleNamespace(load=load)
    manager = ckpt.CheckpointManager(None, str(tmp_path), env, backend, {}, Faults())
    with pytest.raises(Left):
        manager.restore(str(path))
    host = socket.gethostname()
    assert calls == [
        f"checkpoint load failed on rank 0 (host {host}): {path}: CheckpointException: CheckpointException "
        "ranks:dict_keys([1]) Traceback (most recent call last): (RANK 1) ValueError: shard 1 is short"
    ]


# -- the trainer at world size 2 (gloo, FSDP2) -----------------------------------------------------------


@pytest.fixture(scope="module")
def world2_run(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("w2") / "run"
    args = [*SMALL, f"data.path={small_corpus}", "parallel=fsdp", "checkpoint.export_hf=false"]
    torchrun_train(2, *args, "train.max_steps=6", "checkpoint.every=3", f"hydra.run.dir={run_dir}")
    assert checkpoints(run_dir) == ["step_00000003", "step_00000006"]
    return run_dir, args


def test_world2_resume_moves_both_ranks_past_a_file_damaged_in_rank1s_share(tmp_path, world2_run):
    src, args = world2_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    newest = run_dir / "checkpoints" / "step_00000006"
    files = ckpt._manifest_files(str(newest))
    target = _largest(files, ckpt.share(files, 1, 2))
    _flip(newest / target)
    proc = torchrun_train(2, *args, "train.max_steps=8", "checkpoint.every=3", f"hydra.run.dir={run_dir}")
    out = proc.stdout + proc.stderr
    assert out.count("skipping damaged checkpoint") == 1, out[-3000:]
    assert f"skipping damaged checkpoint {newest}: {target} does not match its SHA-256" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} at step 3" in out


def _launch2(args: list[str], env: dict) -> list[subprocess.Popen]:
    """Two ranks of ``harness.train`` started directly (no torchrun agent to stop the slower one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        rdv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "harness.train", *args],
                cwd=REPO,
                env={**os.environ, **env, **ranks, **rdv},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def test_world2_load_fault_on_rank1_ends_both_ranks_with_74_and_one_line(tmp_path, world2_run):
    """Rank 1's load of step 6 fails (fault ``load_eio``) while rank 0 waits inside DCP's load: both
    exit 74, the job prints one ``error:`` line naming rank 1, its host and the checkpoint, the
    checkpoints stay as they were, and a rerun without the fault continues."""
    src, args = world2_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    newest = run_dir / "checkpoints" / "step_00000006"
    overrides = [*args, "train.max_steps=8", "checkpoint.every=3", f"hydra.run.dir={run_dir}"]
    procs = _launch2(overrides, {"HARNESS_FAULT": "load_eio:6:1"})
    results = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert codes == [74, 74], [err[-2000:] for _, err in results]
    host = socket.gethostname()
    assert errors == [
        f"error: checkpoint load failed on rank 1 (host {host}): {newest}: OSError: Input/output error "
        "(injected)"
    ]
    assert checkpoints(run_dir) == ["step_00000003", "step_00000006"] and ckpt.verify(str(newest)) is None
    proc = torchrun_train(2, *overrides)
    assert f"resumed from {newest} at step 6" in proc.stdout + proc.stderr
    assert checkpoints(run_dir)[-1] == "step_00000008"
