"""Data: file resolution, formats, tokenization cache, packing, deterministic sharded order."""

import gzip
import json
import os

import numpy as np
import pytest
from conftest import compose

from harness.config import to_object
from harness.data import PackedSequences, StepLoader, build_data, load_token_store
from harness.data.sources import infer_format, resolve_corpus
from harness.errors import DataError
from harness.schedule import BatchRamp, IterationPlan


def _cfg(*overrides):
    return to_object(compose("tokenizer.train_vocab_size=300", "data.seq_len=32", *overrides))


def test_packing_windows_share_one_token():
    tokens = np.arange(100, dtype=np.uint16)
    seqs = PackedSequences(tokens, seq_len=8)
    assert len(seqs) == 12  # (100 - 1) // 8
    got = seqs.get(np.array([0, 3]))
    assert got.shape == (2, 9)
    assert got[0].tolist() == list(range(0, 9)) and got[1].tolist() == list(range(24, 33))


def test_loader_is_deterministic_covers_epoch_and_shards_ranks():
    seqs = PackedSequences(np.arange(1000, dtype=np.uint16), seq_len=9)  # 111 sequences
    plan = IterationPlan(len(seqs), 9, BatchRamp(full=8, increment=4), micro_batch_size=2, world_size=2)
    infos = [i for _, i in zip(range(14), plan.steps())]  # one epoch: ceil(111 / 8) = 14 steps
    a, b = StepLoader(seqs, seed=7, micro_batch_size=2), StepLoader(seqs, seed=7, micro_batch_size=2)
    seen = np.concatenate([a.step_indices(i) for i in infos])
    # the short last step (7 left) is cut to 6, a multiple of the world size: one sequence sits out this epoch
    assert infos[-1].global_batch_size == 6 and len(set(seen.tolist())) == len(seen) == 110
    assert infos[-1].end_position(111).epoch == 0 and next(plan.steps(14)).position.epoch == 1
    assert all((a.step_indices(i) == b.step_indices(i)).all() for i in infos)
    assert not (StepLoader(seqs, 8, 2).permutation(0) == a.permutation(0)).all()
    assert not (a.permutation(1) == a.permutation(0)).all()
    r0, r1 = StepLoader(seqs, 7, 2, rank=0, world_size=2), StepLoader(seqs, 7, 2, rank=1, world_size=2)
    first0 = [mb.input_ids[:, 0] for mb in r0.micro_batches(infos[0])]
    first1 = [mb.input_ids[:, 0] for mb in r1.micro_batches(infos[0])]
    assert len(first0) == len(first1) == 2  # 8 = 2 micro x 2 accumulation x 2 ranks
    starts = sorted(int(x) for t in first0 + first1 for x in t)
    assert starts == sorted(int(i) * 9 for i in a.step_indices(infos[0]))


def test_resolve_globs_dirs_lists_and_formats(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        f.write('{"text": "y"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("z")
    assert (
        infer_format("x.jsonl.gz") == "json"
        and infer_format("x.parquet") == "parquet"
        and infer_format("x.bin") is None
    )
    c = resolve_corpus(str(tmp_path / "*.json*"), None)
    assert c.format == "json" and len(c.files) == 2
    assert (
        resolve_corpus([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json.gz")], None)
        .files[1]
        .endswith("b.json.gz")
    )
    assert resolve_corpus(str(tmp_path / "sub"), None).format == "text"
    with pytest.raises(DataError, match=r"data.path: '.*nothing\*.jsonl' matches no file"):
        resolve_corpus(str(tmp_path / "nothing*.jsonl"), None)
    with pytest.raises(DataError, match="mixes formats"):
        resolve_corpus(str(tmp_path), None)
    with pytest.raises(
        DataError, match="matches no file"
    ):  # HF_HUB_OFFLINE=1: a typo is not tried on the hub
        resolve_corpus("allenai/c4", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def unreachable(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr("socket.create_connection", unreachable)
    with pytest.raises(DataError, match=r"hub \(huggingface.co:443\) cannot be reached .*Name or service"):
        resolve_corpus("allenai/c4", None)

    class Reachable:
        def close(self):
            pass

    monkeypatch.setattr("socket.create_connection", lambda *a, **k: Reachable())
    assert resolve_corpus("allenai/c4", None).format == "hub"


def test_missing_text_column_names_file_and_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "hello world"}\n' * 5)
    with pytest.raises(
        DataError, match=r"data.text_field='text': no such column in '.*docs.jsonl' \(columns: body\)"
    ):
        load_token_store(_cfg(f"data.path={path}").data, _cfg().tokenizer)
    _, store = load_token_store(_cfg(f"data.path={path}", "data.text_field=body").data, _cfg().tokenizer)
    assert store.num_tokens > 5


def test_parquet_and_gzip_json(tmp_path, small_corpus):
    import pandas as pd

    docs = [json.loads(line) for line in open(small_corpus)]
    pd.DataFrame({"content": [d["text"] for d in docs]}).to_parquet(tmp_path / "c.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d["text"]}) + "\n" for d in docs)
    tok = _cfg().tokenizer
    _, pq = load_token_store(_cfg(f"data.path={tmp_path}/c.parquet", "data.text_field=content").data, tok)
    _, gz = load_token_store(_cfg(f"data.path={tmp_path}/c.jsonl.gz").data, tok)
    _, js = load_token_store(_cfg(f"data.path={small_corpus}").data, tok)
    assert gz.meta["num_documents"] == pq.meta["num_documents"] == len(docs)
    # the BPE is trained per corpus, but the same text gives the same token count
    assert np.array_equal(np.asarray(gz.tokens), np.asarray(js.tokens))


def test_tokenization_is_cached(small_corpus):
    cfg = _cfg(f"data.path={small_corpus}")
    _, first = load_token_store(cfg.data, cfg.tokenizer)
    mtime = os.path.getmtime(os.path.join(first.path, "meta.json"))
    _, again = load_token_store(cfg.data, cfg.tokenizer)
    assert again.path == first.path and os.path.getmtime(os.path.join(again.path, "meta.json")) == mtime


def test_prepared_store_is_memory_mapped_and_matches_cache(tmp_path, small_corpus):
    from harness.prepare_data import prepare

    out = tmp_path / "prepared"
    cfg = compose(
        "tokenizer.train_vocab_size=300",
        "data.seq_len=32",
        f"data.path={small_corpus}",
        f"prepare.output_dir={out}",
        "data.num_proc=2",
        schema="prepare",
    )
    assert prepare(cfg) == str(out)
    assert json.load(open(out / "meta.json"))["format"] == "harness-tokens-v2"
    tok, store = load_token_store(_cfg(f"data.path={out}").data, _cfg().tokenizer)
    _, cached = load_token_store(_cfg(f"data.path={small_corpus}").data, _cfg().tokenizer)
    assert all(isinstance(m, np.memmap) for m in store.tokens.maps)
    assert np.array_equal(np.asarray(store.tokens), np.asarray(cached.tokens))
    assert store.tokens[-1] == tok.eos_token_id
    with pytest.raises(Exception, match="prepare.output_dir is not set"):
        prepare(compose(f"data.path={small_corpus}", schema="prepare"))
    with pytest.raises(Exception, match=r"prepare.output_dir='.*prepared' already exists"):
        prepare(cfg)


def test_real_corpus_with_gpt2_tokenizer(shared_data):
    cfg = _cfg(
        f"data.path={shared_data}/wikitext2/valid.jsonl", f"tokenizer.path={shared_data}/tokenizers/gpt2"
    )
    tok, store = load_token_store(cfg.data, cfg.tokenizer)
    assert len(tok) == 50257 and store.meta["num_documents"] == 60
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert ids == [15496, 995]
    assert 200_000 < store.num_tokens < 400_000


def test_corpus_too_small_for_one_batch(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("just a few words here\n" * 20)
    cfg = _cfg(f"data.path={path}")
    with pytest.raises(DataError, match=r"too small for one batch: .* train.global_batch_size=16"):
        build_data(cfg.data, cfg.tokenizer, 16, need_val=False)


def test_empty_and_unreadable_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match="empty"):
        load_token_store(_cfg(f"data.path={empty}", "tokenizer.path=null").data, _cfg().tokenizer)
    with pytest.raises(DataError, match=r"tokenizer.path: '.*' is not a directory"):
        load_token_store(_cfg(f"data.path={empty}").data, _cfg(f"tokenizer.path={tmp_path}/none").tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"cannot read .*bad.jsonl as json"):
        load_token_store(_cfg(f"data.path={bad}").data, _cfg().tokenizer)


def test_a_directory_names_the_files_it_skips_for_their_extension(tmp_path, caplog):
    import logging

    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "corpus.en").write_text("more text\n")
    with caplog.at_level(logging.WARNING, logger="harness"):
        corpus = resolve_corpus(str(tmp_path), None)
    assert [os.path.basename(f) for f in corpus.files] == ["a.txt"]
    assert [r.getMessage() for r in caplog.records] == [
        f"data.path: directory '{tmp_path}': skipped 1 file whose extension names no format (corpus.en); "
        "set data.format=text|json|parquet to read every file of the directory in that format, or list "
        "the files in data.path"
    ]
    text = resolve_corpus(str(tmp_path), "text")
    assert [os.path.basename(f) for f in text.files] == ["a.txt", "corpus.en"] and text.format == "text"
    (tmp_path / "a.txt").unlink()
    with pytest.raises(DataError) as e:
        resolve_corpus(str(tmp_path), None)
    assert str(e.value) == (
        f"data.path: directory '{tmp_path}' holds no .txt/.json/.jsonl/.parquet file (skipped for their "
        "extension: corpus.en; set data.format=text|json|parquet to read every file of the directory in "
        "that format)"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("just a few words here\n" * 20, "the corpus is too small for one batch"),
        (" ".join(f"w{i * 7919 % 1000}" for i in range(150)) + "\n", "data.val_fraction=0.05 holds out 22 "),
    ],
)
def test_plan_and_training_refuse_a_small_corpus_in_the_same_words(tmp_path, text, message):
    """The plan warned (fewer than one step per epoch) or said nothing where training refused."""
    from conftest import SMALL

    from harness.config import validate
    from harness.plan import make_plan

    (tmp_path / "small.txt").write_text(text)
    args = [*SMALL, f"data.path={tmp_path / 'small.txt'}", "data.val_fraction=0.05"]
    cfg = to_object(compose(*args))
    with pytest.raises(DataError) as trained:
        build_data(cfg.data, cfg.tokenizer, validate(cfg, 1).global_batch_size, need_val=True)
    with pytest.raises(DataError) as planned:
        make_plan(to_object(compose(*args, "plan.gpus=1", schema="plan")))
    assert message in str(trained.value) and str(planned.value) == str(trained.value)
