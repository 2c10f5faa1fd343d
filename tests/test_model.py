"""Model presets, parameter counts against published figures, FLOPs per token, vocabulary."""

import pytest
import torch
from conftest import compose

from harness.config import to_object
from harness.errors import ConfigError
from harness.model import build_model, count_parameters, model_stats, resolve_vocab_size


@pytest.mark.parametrize(
    "preset,vocab,published",
    [
        ("llama3_8b", 128256, 8_030_261_248),  # Meta Llama 3 8B
        ("llama_1b", 128256, 1_235_814_400),  # Meta Llama 3.2 1B
        ("gpt2_124m", 50257, 124_439_808),  # GPT-2 small (HF gpt2)
    ],
)
def test_parameter_counts_match_published(preset, vocab, published):
    mcfg = to_object(compose(f"model={preset}")).model
    assert model_stats(mcfg, vocab, 2048).params == published
    with torch.device("meta"):
        net = build_model(mcfg, vocab, seed=0, device="meta")
    assert count_parameters(net) == published


@pytest.mark.parametrize("preset", ["tiny", "gpt2_tiny", "llama_125m"])
def test_analytic_count_equals_built_model(preset):
    mcfg = to_object(compose(f"model={preset}")).model
    net = build_model(mcfg, 4096, seed=0, device="meta")
    stats = model_stats(mcfg, 4096, 256)
    assert stats.params == count_parameters(net)
    assert stats.non_embedding_params == stats.params - stats.embedding_params
    assert net.config._attn_implementation == "sdpa"


def test_flops_per_token_formula():
    """6 * N_matmul + 12 * L * d * T (PaLM appendix B) for the tiny model, by hand."""
    mcfg = to_object(compose("model=tiny")).model
    h, L, v, ffn, T = 256, 4, 4096, 688, 256
    matmul = L * (4 * h * h + 3 * h * ffn) + v * h  # attention q,k,v,o + SwiGLU + output projection
    assert model_stats(mcfg, v, T).flops_per_token == 6 * matmul + 12 * L * h * T


def test_same_seed_same_init():
    mcfg = to_object(compose("model=tiny")).model
    a, b = build_model(mcfg, 512, seed=3), build_model(mcfg, 512, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_vocab_follows_tokenizer_padded_and_explicit_too_small_fails():
    mcfg = to_object(compose()).model
    assert resolve_vocab_size(mcfg, 50257) == 50304
    assert resolve_vocab_size(mcfg, 4096) == 4096
    mcfg.vocab_size = 32000
    with pytest.raises(
        ConfigError, match=r"model.vocab_size=32000 is smaller than the tokenizer's vocabulary \(50257"
    ):
        resolve_vocab_size(mcfg, 50257)
