"""Tokenizers: a local ``transformers`` tokenizer, or a byte-level BPE trained on the corpus and cached."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile

from harness.errors import DataError

EOS = "<|endoftext|>"


_EOS_LIKE = re.compile(r"^(<\|?(end|eos|eot|im_end)[a-z_]*\|?>|</s>|\[SEP\]|<\|endoftext\|>)$", re.IGNORECASE)


def load_tokenizer(path: str, eos_token: str | None = None):
    """Load a tokenizer offline: a directory ``AutoTokenizer.from_pretrained`` reads, a directory
    holding only ``tokenizer.json`` (as GPT-NeoX/OLMo and Llama 3 release them), or a
    ``tokenizer.json`` file. ``eos_token`` (``tokenizer.eos_token``) names the document separator
    when the tokenizer declares none (or overrides the declared one).

    Raises:
        DataError: no tokenizer at ``path``, ``eos_token`` not in the vocabulary, or no EOS at all
            (the message lists the EOS-like tokens of the vocabulary and the key to set).
    """
    tok = _load(path)
    if eos_token is not None:
        if eos_token not in tok.get_vocab():
            raise DataError(f"tokenizer.eos_token={eos_token!r} is not in the vocabulary of {path!r}")
        tok.eos_token = eos_token
    if tok.eos_token_id is None:
        found = sorted(t for t in tok.get_vocab() if _EOS_LIKE.match(t))[:6]
        hint = (
            f"EOS-like tokens in its vocabulary: {', '.join(found)}"
            if found
            else "no EOS-like token in its vocabulary"
        )
        example = found[0] if found else "<eos>"
        raise DataError(
            f"tokenizer.path: the tokenizer in {path!r} declares no EOS token to separate documents "
            f"({hint}); set tokenizer.eos_token (quoted on the command line: "
            f"'tokenizer.eos_token=\"{example}\"')"
        )
    _eos_is_special(tok)
    return tok


def _eos_is_special(tok) -> None:
    """Mark the EOS special in the backend when it is a plain added token there (a tokenizer.json may
    declare it so), so that :func:`encode_documents` reads its text inside a document as text."""
    from tokenizers import AddedToken

    backend = getattr(tok, "backend_tokenizer", None)
    added = backend.get_added_tokens_decoder() if backend is not None else {}
    eos = added.get(tok.eos_token_id)
    if eos is not None and not eos.special:
        backend.add_special_tokens(
            [
                AddedToken(
                    eos.content,
                    single_word=eos.single_word,
                    lstrip=eos.lstrip,
                    rstrip=eos.rstrip,
                    normalized=eos.normalized,
                    special=True,
                )
            ]
        )


def encode_documents(tokenizer, texts: list[str], parse_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each of ``texts`` (no BOS/EOS added; the store appends the EOS).

    The text of a special token inside a document (``<|endoftext|>`` in source code, ``</s>`` in a web
    page) is data: it is tokenized as the characters it is, never as the special token's id, so a
    document boundary is only where the store puts one. ``parse_special_tokens``
    (``tokenizer.parse_special_tokens``) reads such text as the special tokens instead, for corpora
    written with them on purpose (e.g. chat-formatted text).
    """
    out = tokenizer(
        texts, add_special_tokens=False, split_special_tokens=not parse_special_tokens, verbose=False
    )
    return out["input_ids"]


def _load(path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    expanded = os.path.expanduser(path)
    only_json = os.path.isdir(expanded) and not os.path.isfile(
        os.path.join(expanded, "tokenizer_config.json")
    )
    json_file = os.path.join(expanded, "tokenizer.json") if only_json else expanded
    try:
        if os.path.isfile(json_file) and json_file.endswith(".json"):
            return PreTrainedTokenizerFast(tokenizer_file=json_file)
        if not os.path.isdir(expanded):
            raise DataError(f"tokenizer.path: {path!r} is not a directory or a tokenizer.json file")
        return AutoTokenizer.from_pretrained(expanded, local_files_only=True)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"tokenizer.path: cannot load a tokenizer from {path!r} (need tokenizer.json, or vocab/merges "
            f"or tokenizer.model, with tokenizer_config.json): {type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}"
        ) from e


def tokenizer_fingerprint(tok) -> str:
    """A short hash of a tokenizer's vocabulary and rules (part of the token-cache key)."""
    backend = getattr(tok, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{payload}|{tok.eos_token_id}".encode()).hexdigest()[:16]


def bpe_cache_dir(cache_dir: str, key: str, vocab_size: int) -> str:
    """Where :func:`train_bpe_tokenizer` caches the BPE of corpus ``key`` and ``vocab_size`` tokens."""
    return os.path.join(cache_dir, "tokenizers", f"bpe-{key}-{vocab_size}")


def train_bpe_tokenizer(texts_iter, vocab_size: int, cache_dir: str, key: str):
    """Train (or load from cache) a byte-level BPE tokenizer on an iterator of texts.

    The tokenizer has ``vocab_size`` entries (256 byte symbols, merges, and ``<|endoftext|>``)
    in the GPT-2 style (Radford et al. 2019). It is saved with ``save_pretrained`` under
    ``<cache_dir>/tokenizers/<key>-<vocab_size>`` so later runs load it instantly.

    Args:
        texts_iter: a zero-argument callable returning an iterator of strings (called on a cache miss).
        vocab_size: target vocabulary size (tokens).
        cache_dir: cache root.
        key: corpus fingerprint.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    target = bpe_cache_dir(cache_dir, key, vocab_size)
    if os.path.isfile(os.path.join(target, "tokenizer.json")):
        return load_tokenizer(target)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts_iter(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    os.chmod(tmp, 0o755)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(target)
