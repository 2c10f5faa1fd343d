"""One tokenization per job (harness.data.once): on a cold cache one process trains the tokenizer and
writes the token store while the others wait; who prepares (shared cache: rank 0; per-node caches:
each node's local rank 0) is decided by rank 0's probe file; a failing preparer ends every waiter with
its one line."""

import errno
import filecmp
import json
import os
import threading

import pytest
import torch.distributed as dist
from conftest import SMALL, compose, torchrun_train

from harness.config import to_object
from harness.data import PrepareOnce, load_token_store
from harness.errors import DataError

# world 2 of the cold cache tests: no evaluation, no checkpoint, two steps
RUN = [
    *SMALL,
    "parallel=ddp",
    "eval.every=0",
    "checkpoint.every=0",
    "train.max_steps=2",
    "checkpoint.export_hf=false",
    "schedule.batch_warmup.start_global_batch_size=null",  # a fixed batch of 8: worlds 2 and 4
]


def _ranks(store, layout: list[tuple[str, int]], **kw) -> list[PrepareOnce]:
    """A PrepareOnce per rank of ``layout`` ((node, local rank) by global rank), one in-memory store."""
    return [
        PrepareOnce(store, rank, local, node, host=node, poll_s=0.001, **kw)
        for rank, (node, local) in enumerate(layout)
    ]


def _run(fns) -> list:
    """Run each of ``fns`` on its own thread (as the job's ranks); their results or raised errors."""
    out = [None] * len(fns)

    def call(i):
        try:
            out[i] = fns[i]()
        except Exception as e:  # noqa: BLE001
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return out


LAYOUT = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]  # two nodes of two ranks


@pytest.mark.parametrize(
    "shared, preparers, waits_for",
    [
        (True, [True, False, False, False], ["rank0", "rank0", "rank0", "rank0"]),
        (False, [True, False, True, False], ["rank0", "rank0", "b", "b"]),
    ],
)
def test_rank_zero_prepares_a_shared_cache_each_node_its_own(tmp_path, shared, preparers, waits_for):
    """Two simulated nodes (host names a and b): the same cache directory, or one each (node b does not
    see rank 0's probe)."""
    caches = {"a": str(tmp_path / "a"), "b": str(tmp_path / ("a" if shared else "b"))}
    ranks = _ranks(dist.HashStore(), LAYOUT)
    errors = _run([lambda r=r: r.begin(caches[r.node]) for r in ranks])
    assert errors == [None] * 4
    assert [r.preparer()["done"].rsplit("/", 1)[1] for r in ranks] == waits_for
    assert [r.prepares for r in ranks] == preparers
    assert len(os.listdir(tmp_path / "a" / ".probes")) == 1  # rank 0's probe, in its cache only
    assert not (tmp_path / "b" / ".probes").exists()


def test_a_failing_preparer_ends_every_waiter_with_its_one_line(tmp_path):
    made = []

    def rank(once: PrepareOnce):
        def make():
            made.append(once.rank)
            if once.rank == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with once.preparing(str(tmp_path)):
            return once.make("tokenize data.path (c.jsonl)", lambda: False, make)

    out = _run([lambda r=r: rank(r) for r in _ranks(dist.HashStore(), LAYOUT)])
    line = (
        "rank 0 (host a) failed to tokenize data.path (c.jsonl): OSError: [Errno 28] No space left on device"
    )
    assert isinstance(out[0], OSError)  # the preparer's own error, as without the others
    assert [type(e) for e in out[1:]] == [DataError] * 3 and {str(e) for e in out[1:]} == {line}
    assert made == [0]  # no waiter tokenized


def test_a_waiter_without_answer_leaves_at_data_prepare_timeout_s(tmp_path):
    store = dist.HashStore()
    (rank0, rank1) = _ranks(store, [("a", 0), ("a", 1)], timeout_s=0.05)
    store.set(
        "harness/data/node/a",
        json.dumps({"done": "harness/data/done/rank0", "who": "rank 0 (host a)", "node": "a"}),
    )
    with pytest.raises(DataError) as e:
        rank1.make("tokenize data.path (c.jsonl)", lambda: False, lambda: None)
    assert str(e.value).startswith("data.prepare_timeout_s=0.05: rank 1 (host a) waited ")
    assert str(e.value).endswith(
        " s for rank 0 (host a) to prepare the data cache; raise data.prepare_timeout_s, or prepare "
        "the corpus once with python -m harness.prepare_data"
    )


class LateStore:
    """The job's store, in which rank 0's ``done`` key appears at the 7th ``check``."""

    def __init__(self):
        self.inner, self.checks = dist.HashStore(), 0
        self.set, self.get = self.inner.set, self.inner.get

    def check(self, keys) -> bool:
        self.checks += 1
        if self.checks == 7:
            self.inner.set("harness/data/done/rank0", "ok")
        return self.inner.check(keys)


@pytest.mark.parametrize("local_rank, lines", [(1, 5), (2, 0)])
def test_one_waiter_of_a_node_says_it_waits(tmp_path, caplog, local_rank, lines):
    """Every poll is a progress interval here (progress_s=0): on rank 0's node local rank 1 says it
    waits (once per poll that finds nothing: the 2nd to 6th check), local rank 2 keeps quiet."""
    store = LateStore()
    rank0, waiter = (
        PrepareOnce(store, rank, rank, "a", host="a", poll_s=0.001, progress_s=0.0)
        for rank in (0, local_rank)
    )
    rank0.begin(str(tmp_path))
    with caplog.at_level("WARNING", logger="harness"):
        got = waiter.make("tokenize data.path (c.jsonl)", lambda: store.checks >= 7, lambda: "opened")
    assert got == "opened" and store.checks == 7
    line = f"rank {local_rank} (host a): waiting for rank 0 (host a) to prepare the data cache (0 s)"
    assert [r.getMessage() for r in caplog.records] == [line] * lines


def _files(root) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _cold_cache_run(tmp_path, small_corpus, nproc: int):
    cache = tmp_path / "cache"
    proc = torchrun_train(
        nproc,
        *RUN,
        f"data.path={small_corpus}",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    out = (proc.stdout + proc.stderr).splitlines()  # hydra logs to stdout
    lines = [line for line in out if "preparing the cache on" in line]
    (store,) = os.listdir(cache / "tokens")
    (bpe,) = os.listdir(cache / "tokenizers")
    # the same steps in one process, into another cache: the same tokenizer and the same store
    solo = to_object(compose(*RUN, f"data.path={small_corpus}", f"data.cache_dir={tmp_path / 'solo'}"))
    _, expected = load_token_store(solo.data, solo.tokenizer)
    assert os.path.basename(expected.path) == store
    written = cache / "tokens" / store
    mine, theirs = _files(written), _files(expected.path)
    meta, solo_meta = (json.loads(f.pop("meta.json")) for f in (mine, theirs))
    assert mine == theirs  # shards, documents.npy, tokenizer files: byte for byte
    assert {**meta, "write_seconds": 0} == {**solo_meta, "write_seconds": 0}
    assert filecmp.dircmp(cache / "tokenizers" / bpe, tmp_path / "solo" / "tokenizers" / bpe).diff_files == []
    return lines, bpe, written


@pytest.mark.distributed
def test_a_cold_cache_at_world_2_is_tokenized_once_by_rank_0(tmp_path, small_corpus):
    lines, bpe, store = _cold_cache_run(tmp_path, small_corpus, 2)
    host = os.uname().nodename
    assert [line.split("preparing the cache on ", 1)[1] for line in lines] == [
        f"rank 0 (host {host}): train the BPE tokenizer (300 tokens) of data.path",
        f"rank 0 (host {host}): tokenize data.path ({small_corpus}) into {store}",
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_cold_cache_at_world_4_is_tokenized_once_by_rank_0(tmp_path, small_corpus):
    lines, _, _ = _cold_cache_run(tmp_path, small_corpus, 4)
    assert [line.split("preparing the cache on ", 1)[1].split(":")[0] for line in lines] == [
        f"rank 0 (host {os.uname().nodename})"
    ] * 2


@pytest.mark.distributed
def test_a_full_disk_on_the_preparer_ends_both_ranks_with_one_error_line(tmp_path, small_corpus):
    """Rank 0 alone fails to write the store (HARNESS_FAULT=store_enospc, rank 0): rank 1, waiting for
    it, leaves too, and the job prints one ``error:`` line (status 2, a data error), not a hang."""
    cache = tmp_path / "cache"
    proc = torchrun_train(
        2,
        *RUN,
        f"data.path={small_corpus}",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"HARNESS_FAULT": "store_enospc:0:0"},
        check=False,
    )
    out = (proc.stdout + proc.stderr).splitlines()
    (target,) = [line.rsplit(" into ", 1)[1] for line in out if ": tokenize data.path (" in line]
    errors = [line for line in out if line.startswith("error:")]
    assert errors == [
        f"error: data.cache_dir: writing the token store {target} failed: No space left on device"
    ]
    assert proc.returncode != 0 and os.listdir(cache / "tokens") == []  # no store, no temporary


def test_data_prepare_timeout_s_must_be_positive():
    from harness.config import validate
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.prepare_timeout_s=0\.0 must be > 0$"):
        validate(to_object(compose("data.prepare_timeout_s=0")))


def test_a_read_only_prepared_cache_takes_no_probe_and_every_node_waits_for_rank_0(tmp_path, monkeypatch):
    """A cache directory that cannot be written (a prepared cache shared read-only): rank 0 publishes no
    probe instead of failing, and the other node's local rank 0 then waits for rank 0 (which fails only
    if it has something to write)."""
    from harness.data import once

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(once.os, "makedirs", refuse)
    store = dist.HashStore()
    rank0, _, node_b, _ = _ranks(store, LAYOUT)
    rank0.begin(str(tmp_path))
    assert json.loads(store.get("harness/data/probe"))["file"] is None
    node_b.begin(str(tmp_path))
    assert node_b._preparer["who"] == "rank 0 (host a)" and node_b._preparer["shared"] is True
    assert not node_b.prepares


class GoneStore:
    """The job's store after the process that hosts it died (torch raises DistNetworkError)."""

    def set(self, key, value):
        pass

    def check(self, keys):
        raise RuntimeError("Broken pipe")


def test_a_waiter_whose_store_is_gone_leaves_with_one_line():
    waiter = PrepareOnce(GoneStore(), 1, 1, "a", host="a", poll_s=0.001)
    waiter._preparer = {
        "done": "harness/data/done/rank0",
        "who": "rank 0 (host a)",
        "shared": True,
        "node": "a",
    }
    with pytest.raises(DataError) as e:
        waiter.make("tokenize data.path (c.jsonl)", lambda: False, lambda: None)
    assert str(e.value) == (
        "rank 1 (host a) lost the job's key-value store (RuntimeError) while waiting for rank 0 (host a) "
        "to prepare the data cache: that process probably died; see its log"
    )
