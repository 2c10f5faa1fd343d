"""Documents: masking inside packed sequences (loss equality with separate sequences), the sharded
token store (round trip at 1 and 2 workers, many shards, document offsets, a killed prepare), and
tokenizers given as a bare ``tokenizer.json``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, compose, read_metrics, train_small

from harness.config import to_object
from harness.data import load_token_store
from harness.data.loader import MicroBatch
from harness.data.tokenizer import load_tokenizer
from harness.errors import ConfigError, DataError
from harness.model import build_model
from harness.parallel.loss import token_loss_sum

EOS = 0


def _model(arch: str):
    cfg = to_object(
        compose(
            f"model.arch={arch}",
            "model.hidden_size=64",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.num_kv_heads=4",
            "model.intermediate_size=128",
        )
    )
    return build_model(cfg.model, 64, seed=3).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_packed_loss_equals_the_documents_apart(arch):
    """[A, EOS, B] with masking: the summed loss is that of A+EOS and B as separate sequences."""
    model = _model(arch)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 64, (11,), generator=gen), torch.randint(1, 64, (13,), generator=gen)
    packed = torch.cat([a, torch.tensor([EOS]), b])[None]
    with torch.no_grad():
        masked = token_loss_sum(model, MicroBatch.from_sequences(packed, EOS), None)
        plain = token_loss_sum(model, MicroBatch.from_sequences(packed), None)
        apart = token_loss_sum(
            model, MicroBatch.from_sequences(torch.cat([a, torch.tensor([EOS])])[None]), None
        ) + token_loss_sum(model, MicroBatch.from_sequences(b[None]), None)
    mb = MicroBatch.from_sequences(packed, EOS)
    assert mb.position_ids[0].tolist() == list(range(12)) + list(range(12))  # A and its EOS, then B
    assert mb.num_targets().item() == 11 + 12  # A's 10 next tokens + EOS, then B's 12
    assert torch.isclose(masked, apart, rtol=1e-5, atol=0), (masked, apart)
    assert not torch.isclose(plain, apart, rtol=1e-3), "without masking B attends to A"


def test_a_short_run_with_document_masking(tmp_path, small_corpus, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="harness"):
        train_small(tmp_path, small_corpus, "train.max_steps=3", "data.document_mask=true", "eval.every=3")
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in recs)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("document mask:")]
    assert lines == [
        "document mask: SDPA with a block-diagonal causal mask (transformers, from the position_ids "
        "resets) on cpu"
    ]


def _prepare(out, corpus, *extra):
    from harness.prepare_data import prepare

    cfg = compose(
        "tokenizer.train_vocab_size=300",
        f"data.path={corpus}",
        f"prepare.output_dir={out}",
        *extra,
        schema="prepare",
    )
    return prepare(cfg)


def test_sharded_store_round_trip_at_one_and_two_workers(tmp_path, small_corpus):
    one = _prepare(tmp_path / "one", small_corpus, "data.num_proc=1", "prepare.max_shard_mb=0.02")
    two = _prepare(tmp_path / "two", small_corpus, "data.num_proc=2", "prepare.max_shard_mb=0.02")
    with pytest.raises(ConfigError, match=r"prepare.max_shard_mb=1e-06 must be >= 0.01"):
        _prepare(tmp_path / "tiny", small_corpus, "prepare.max_shard_mb=0.000001")
    cfg = to_object(compose("tokenizer.train_vocab_size=300", f"data.path={small_corpus}"))
    tok, cached = load_token_store(cfg.data, cfg.tokenizer)
    stores = [
        load_token_store(to_object(compose(f"data.path={p}")).data, cfg.tokenizer)[1] for p in (one, two)
    ]
    for store in stores:
        meta = store.meta
        assert meta["format"] == "harness-tokens-v2" and meta["dtype"] == "uint16"
        assert np.array_equal(np.asarray(store.tokens), np.asarray(cached.tokens))
        assert len(meta["shards"]) >= 10 and sum(s["tokens"] for s in meta["shards"]) == store.num_tokens
        assert all(
            os.path.getsize(os.path.join(store.path, s["file"])) <= 0.02 * 2**20 for s in meta["shards"]
        )
        docs = np.asarray(store.documents)
        assert docs[0] == 0 and len(docs) == meta["num_documents"] == 12
        assert (np.asarray(store.tokens)[docs[1:] - 1] == tok.eos_token_id).all()  # each follows an EOS
    assert stores[1].meta["num_proc"] == 2 and {s["file"][:17] for s in stores[1].meta["shards"]} == {
        "shards/tokens_000",
        "shards/tokens_001",
    }


def test_a_killed_prepare_leaves_no_store_and_a_rerun_cleans_up(tmp_path, small_corpus):
    out = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "harness.prepare_data",
        "tokenizer.train_vocab_size=300",
        f"data.path={small_corpus}",
        f"prepare.output_dir={out}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HARNESS_FAULT": "store_sleep:60"})
    deadline = time.time() + 120
    while not any(
        p.name.startswith(".tmp-store") and (p / "documents.npy").exists() for p in tmp_path.iterdir()
    ):
        assert time.time() < deadline and proc.poll() is None, "prepare never reached its shards"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(DataError, match="not a complete token store"):
        from harness.data.store import open_store

        open_store(str(next(tmp_path.iterdir())))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # the dead writer's temporary is gone
    assert json.loads((out / "meta.json").read_text())["num_documents"] == 12


@pytest.fixture
def bare_gpt2(tmp_path, shared_data):
    """GPT-2's ``tokenizer.json`` alone in a directory (no tokenizer_config.json: no declared EOS)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(f"{shared_data}/tokenizers/gpt2/tokenizer.json", bare / "tokenizer.json")
    return bare


def test_a_bare_tokenizer_json_needs_an_eos_and_names_the_candidates(bare_gpt2):
    for path in (bare_gpt2, bare_gpt2 / "tokenizer.json"):
        with pytest.raises(DataError) as e:
            load_tokenizer(str(path))
        assert "declares no EOS token" in str(e.value) and "<|endoftext|>" in str(e.value)
        assert """set tokenizer.eos_token (quoted on the command line: 'tokenizer.eos_token="<|""" in str(
            e.value
        )
        tok = load_tokenizer(str(path), "<|endoftext|>")
        assert tok.eos_token_id == 50256 and tok("Hello world", add_special_tokens=False)["input_ids"] == [
            15496,
            995,
        ]
    with pytest.raises(DataError, match=r"tokenizer.eos_token='<eos>' is not in the vocabulary"):
        load_tokenizer(str(bare_gpt2), "<eos>")


def test_training_with_a_bare_tokenizer_json(tmp_path, bare_gpt2, small_corpus):
    state = train_small(
        tmp_path,
        small_corpus,
        f"tokenizer.path={bare_gpt2 / 'tokenizer.json'}",
        'tokenizer.eos_token="<|endoftext|>"',
        "train.max_steps=2",
        "eval.every=0",
        "checkpoint.export_hf=false",
    )
    assert state.step == 2


def test_flash_attention_2_is_refused_on_cpu_before_any_model(tmp_path, small_corpus, capsys, monkeypatch):
    import harness.train as harness_train
    import harness.trainer

    monkeypatch.setattr(harness.trainer, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    argv = [
        "model.attn_implementation=flash_attention_2",
        "data.document_mask=true",
        f"data.path={small_corpus}",
    ]
    code = harness_train.run_cli(compose(*argv), str(tmp_path / "run"), argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == [
        "error: model.attn_implementation=flash_attention_2 runs on CUDA GPUs only (this run is on cpu); "
        "use model.attn_implementation=sdpa"
    ]
    assert not (tmp_path / "run").exists()


SPECIAL_TEXT_DOCS = [
    'EOS = "<|endoftext|>"  # from a tokenizer module\nprint(EOS)\n',
    "a web page that ends with </s> and <s> in its text",
    "a plain document without any marker",
]


@pytest.mark.parametrize("tokenizer", ["bpe", "gpt2", "gpt2_json", "mistral"])
def test_special_token_text_in_a_document_is_text_and_masks_only_real_boundaries(
    tmp_path, shared_data, tokenizer
):
    """The literal ``<|endoftext|>`` (``</s>``) inside a document is tokenized as text: the only EOS ids
    of the store are the one after each document, and document masking restarts only there."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SPECIAL_TEXT_DOCS * 30))
    given = {
        "bpe": ["tokenizer.path=null", "tokenizer.train_vocab_size=300"],
        "gpt2": [f"tokenizer.path={shared_data}/tokenizers/gpt2"],
        "gpt2_json": [
            f"tokenizer.path={shared_data}/tokenizers/gpt2/tokenizer.json",
            'tokenizer.eos_token="<|endoftext|>"',
        ],
        "mistral": [f"tokenizer.path={shared_data}/tokenizers/mistral_v1_spm"],
    }[tokenizer]
    cfg = to_object(compose(f"data.path={corpus}", *given))
    tok, store = load_token_store(cfg.data, cfg.tokenizer)
    tokens = np.asarray(store.tokens)
    ends = np.append(store.documents[1:], len(tokens)) - 1  # the EOS after each document
    assert store.meta["num_documents"] == 90
    assert np.flatnonzero(tokens == tok.eos_token_id).tolist() == ends.tolist()
    assert store.meta["parse_special_tokens"] is False
    assert tok.decode(tokens[: ends[0]]) == SPECIAL_TEXT_DOCS[0]
    window = torch.from_numpy(tokens[: ends[5] + 2].astype(np.int64))[None]  # 6 documents + 1 token
    restarts = (MicroBatch.from_sequences(window, tok.eos_token_id).position_ids[0] == 0).nonzero()
    assert restarts.flatten().tolist() == [0, *store.documents[1:6].tolist()]
    if tokenizer == "gpt2":  # the documented opt-in reads the text as the special token
        cfg = to_object(compose(f"data.path={corpus}", *given, "tokenizer.parse_special_tokens=true"))
        _, parsed = load_token_store(cfg.data, cfg.tokenizer)
        assert parsed.path != store.path and parsed.meta["parse_special_tokens"] is True
        assert int((np.asarray(parsed.tokens) == tok.eos_token_id).sum()) == 90 + 30


def test_an_eos_that_a_tokenizer_json_leaves_unspecial_is_made_special(tmp_path, shared_data):
    spec = json.loads((shared_data / "tokenizers" / "gpt2" / "tokenizer.json").read_text())
    spec["added_tokens"][0]["special"] = False  # <|endoftext|> as a plain added token
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"), "<|endoftext|>")
    from harness.data.tokenizer import encode_documents

    assert encode_documents(tok, ["x <|endoftext|> y"]) == [[87, 1279, 91, 437, 1659, 5239, 91, 29, 331]]
    assert encode_documents(tok, ["x <|endoftext|> y"], parse_special_tokens=True) == [[87, 220, 50256, 331]]


def test_resuming_with_another_document_mask_warns(tmp_path, small_corpus, caplog):
    import logging

    args = ["train.max_steps=3", "eval.every=0", "checkpoint.export_hf=false"]
    train_small(tmp_path, small_corpus, *args, "train.stop_at_step=2")
    with caplog.at_level(logging.WARNING, logger="harness"):
        train_small(tmp_path, small_corpus, *args, "data.document_mask=true")
    assert [r.getMessage() for r in caplog.records if "document_mask" in r.getMessage()] == [
        "resuming with changed data.document_mask False -> True: from step 3 on attention stops at "
        "document boundaries within packed sequences, so the loss is not comparable across the change"
    ]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
