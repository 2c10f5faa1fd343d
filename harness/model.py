"""Models: ``transformers`` causal LMs built from a shape config (on the meta device, or initialized by
:mod:`harness.weights`), plus
parameter counts and FLOPs per token for MFU."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from harness.config import ModelConfig, intermediate_size
from harness.errors import ConfigError


def resolve_vocab_size(model: ModelConfig, tokenizer_vocab: int) -> int:
    """The model's vocabulary: ``model.vocab_size`` if set, else the tokenizer's padded up to a
    multiple of ``model.vocab_multiple`` (64 by default, for matmul-friendly shapes).

    Raises:
        ConfigError: an explicit ``model.vocab_size`` smaller than the tokenizer's vocabulary.
    """
    if model.vocab_size is not None:
        if model.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab} tokens); raise it or set model.vocab_size=null to follow the tokenizer"
            )
        return model.vocab_size
    m = model.vocab_multiple
    return (tokenizer_vocab + m - 1) // m * m


def hf_config(model: ModelConfig, vocab_size: int, eos_token_id: int | None = None):
    """The ``transformers`` config (``LlamaConfig`` or ``GPT2Config``) for a shape."""
    from transformers import GPT2Config, LlamaConfig

    if model.arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=intermediate_size(model),
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            num_key_value_heads=model.num_kv_heads or model.num_heads,
            max_position_embeddings=model.max_position_embeddings,
            rms_norm_eps=model.norm_eps,
            initializer_range=model.init_std,
            tie_word_embeddings=model.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
            attention_dropout=model.dropout,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            use_cache=False,
        )
    else:
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=model.max_position_embeddings,
            n_embd=model.hidden_size,
            n_layer=model.num_layers,
            n_head=model.num_heads,
            n_inner=intermediate_size(model),
            layer_norm_epsilon=model.norm_eps,
            initializer_range=model.init_std,
            resid_pdrop=model.dropout,
            embd_pdrop=model.dropout,
            attn_pdrop=model.dropout,
            tie_word_embeddings=model.tie_word_embeddings,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            use_cache=False,
        )
    cfg._attn_implementation = model.attn_implementation
    return cfg


def build_model(
    model: ModelConfig,
    vocab_size: int,
    seed: int,
    eos_token_id: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """An ``AutoModelForCausalLM`` of the given shape (fp32 weights).

    ``device="meta"``: parameters on the meta device (no storage, at any size: give them storage with
    :func:`harness.weights.materialize`), buffers such as the rotary ``inv_freq`` computed on the CPU.
    Otherwise the model is built there and initialized by :func:`harness.weights.init_weights` with
    ``seed``: the same weights as a meta build materialized under any layout.
    """
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model, vocab_size, eos_token_id)
    with _parameters_on_meta():
        net = AutoModelForCausalLM.from_config(
            cfg, attn_implementation=model.attn_implementation, dtype=torch.float32
        )
    if torch.device(device).type == "meta":
        return net
    from harness.weights import init_weights, materialize

    return materialize(net, torch.device(device), lambda m: init_weights(m, model, seed))


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is moved to the meta device (buffers stay where they are
    made), as ``accelerate.init_empty_weights(include_buffers=False)`` does; ``transformers``' own
    initialization then has nothing to draw."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a tied parameter is already on meta: keep it
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@dataclass(frozen=True)
class ModelStats:
    """Parameter counts and training FLOPs of a model shape.

    Attributes:
        params: all trainable parameters (tied embeddings counted once).
        embedding_params: input token (and position) embedding tables.
        non_embedding_params: ``params - embedding_params`` (Kaplan et al. 2020's N).
        flops_per_token: training FLOPs per token at ``seq_len`` (forward + backward).
    """

    params: int
    embedding_params: int
    non_embedding_params: int
    flops_per_token: float


def model_stats(model: ModelConfig, vocab_size: int, seq_len: int) -> ModelStats:
    """Count parameters analytically and estimate training FLOPs per token.

    FLOPs per token = 6 * N_matmul + 12 * n_layers * hidden_size * seq_len, where N_matmul
    counts every weight used in a matrix multiply (all non-embedding weights plus the output
    projection, which costs the same whether or not it is tied to the input embedding) and
    the second term is attention's QK^T and AV products (forward 2 + backward 4 FLOPs per
    multiply-accumulate, non-causal count). Source: PaLM, Chowdhery et al. 2022, Appendix B;
    Kaplan et al. 2020, Table 1. Norm weights and biases are counted in N but add <0.1%.
    """
    h, L, v = model.hidden_size, model.num_layers, vocab_size
    kv = model.num_kv_heads or model.num_heads
    head_dim = h // model.num_heads
    ffn = intermediate_size(model)
    if model.arch == "llama":
        attn = h * h * 2 + 2 * h * kv * head_dim  # q, o + k, v
        mlp = 3 * h * ffn
        norms = 2 * h
        layer = attn + mlp + norms
        embedding = v * h
        final = h  # final RMSNorm
    else:
        attn = 4 * h * h + 4 * h  # c_attn (3h*h + 3h) + c_proj (h*h + h)
        mlp = 2 * h * ffn + ffn + h
        norms = 4 * h
        layer = attn + mlp + norms
        embedding = v * h + model.max_position_embeddings * h
        final = 2 * h
    lm_head = v * h
    non_embedding = L * layer + final
    params = embedding + non_embedding + (0 if model.tie_word_embeddings else lm_head)
    matmul_params = L * (layer - norms) + lm_head
    flops = 6.0 * matmul_params + 12.0 * L * h * seq_len
    return ModelStats(params, embedding, params - embedding, flops)


BIG_MODEL_PARAMS = 5e8  # from here on, a peak LR of 1e-3 or more is a small model's
SMALL_MODEL_LR = 1e-3


def lr_warning(params: int, lr: float) -> str | None:
    """One line when a model of ``params >= 5e8`` gets a peak ``lr >= 1e-3`` (the tiny model's default
    is 3e-3), else None; logged by the trainer and listed by ``harness.plan``.

    Published peaks from half a billion parameters on are 4e-4 or lower: GPT-3 760M 2.5e-4 and 1.3B
    2e-4 (Brown et al. 2020, Table 2.1), TinyLlama 1.1B 4e-4 (Zhang et al. 2024), Llama 2 7B 3e-4 and 70B
    1.5e-4 (Touvron et al. 2023, Table 1); ``configs/recipe/<model>.yaml`` sets them for the presets.
    """
    if params < BIG_MODEL_PARAMS or lr < SMALL_MODEL_LR:
        return None
    return (
        f"optim.lr={lr:g} is a small model's peak LR for {params / 1e9:.2f}B parameters: published runs "
        "from 0.5B parameters on peak at 4e-4 or lower (GPT-3 Table 2.1, TinyLlama, Llama 2 Table 1); "
        "lower optim.lr"
    )


def count_parameters(net: torch.nn.Module) -> int:
    """Trainable parameters of a built model (shared tensors counted once)."""
    seen = {}
    for p in net.parameters():
        if p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def check_attention(model: ModelConfig, device_type: str) -> None:
    """Refuse an attention kernel this machine cannot run, before any model exists.

    Raises:
        ConfigError: ``flash_attention_2`` without a CUDA device or without the ``flash-attn`` package.
    """
    if model.attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if device_type != "cuda":
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 runs on CUDA GPUs only (this run is on "
            f"{device_type}); use model.attn_implementation=sdpa"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn); or use model.attn_implementation=sdpa"
        )


def document_mask_path(model: ModelConfig, device_type: str) -> str:
    """How ``data.document_mask`` reaches attention for this model and device (a sentence for the log).

    The loader resets ``position_ids`` at every document and passes no ``attention_mask``;
    ``transformers`` (>= 4.56, ``masking_utils.find_packed_sequence_indices``) turns the resets
    into a block-diagonal causal mask for ``sdpa`` / ``eager`` / ``flex_attention``, and
    ``flash_attention_2`` takes them as its variable-length (``cu_seqlens``) path.

    Raises:
        ConfigError: the installed ``transformers`` does not read packed sequences from
            ``position_ids`` (attention would silently cross documents).
    """
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as e:
        import transformers

        raise ConfigError(
            f"data.document_mask=true needs transformers >= 4.56 (packed sequences from position_ids); "
            f"this is {transformers.__version__}: upgrade it or set data.document_mask=false"
        ) from e
    impl = model.attn_implementation
    if impl == "flash_attention_2":
        kernels = "flash_attention_2 variable-length kernels"
        return f"{kernels} (cu_seqlens from the position_ids resets) on {device_type}"
    kernel = "SDPA" if impl == "sdpa" else "eager attention"
    return (
        f"{kernel} with a block-diagonal causal mask (transformers, from the position_ids resets) "
        f"on {device_type}"
    )
