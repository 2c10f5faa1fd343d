"""``python -m harness.export CHECKPOINT OUT_DIR``: a Hugging Face model from any backend's checkpoint.

Reads the model shape from the checkpoint's ``trainer_state.json``, its tokenizer from
``tokenizer/``, and the weights from ``dcp/`` (none/ddp/fsdp, ``torch.distributed.checkpoint``
loaded without a process group), ``model.pt`` (one-process checkpoints of the older format) or
``deepspeed/`` (ZeRO partitions consolidated to fp32 with DeepSpeed's ``zero_to_fp32``). Runs on one
CPU process.
The result loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from harness import checkpoint as ckpt
from harness.config import ModelConfig
from harness.errors import CheckpointError, HarnessError
from harness.model import build_model
from harness.parallel.dcp import DCP_DIR, quiet


def load_weights(path: str, model: torch.nn.Module) -> dict:
    """The checkpoint's full model state dict (CPU tensors), whatever backend wrote it.

    Raises:
        CheckpointError: no known weights format in ``path``.
    """
    if os.path.isfile(os.path.join(path, "model.pt")):
        return torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    if os.path.isdir(os.path.join(path, DCP_DIR)):
        import torch.distributed.checkpoint as dcp

        state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}  # filled in place
        with quiet():
            dcp.load(state, checkpoint_id=os.path.join(path, DCP_DIR), no_dist=True)
        return state["model"]
    if os.path.isdir(os.path.join(path, "deepspeed")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(path, tag="deepspeed")
    raise CheckpointError(f"{path} holds no model.pt, dcp/ or deepspeed/ weights")


def export(checkpoint: str, out_dir: str, overwrite: bool = False) -> str:
    """Export ``checkpoint`` as a Hugging Face model + tokenizer into ``out_dir``; returns ``out_dir``
    (normalized). ``out_dir`` may be new, an empty directory, or (with ``overwrite``) a non-empty one.

    Raises:
        CheckpointError: the checkpoint is incomplete, its weights do not fit its model config, or
            ``out_dir`` is a file or a non-empty directory without ``overwrite`` (checked first).
    """
    import transformers

    from harness.data.tokenizer import load_tokenizer

    ckpt.check_export_target(out_dir, overwrite)
    transformers.utils.logging.disable_progress_bar()
    if not ckpt.is_complete(checkpoint):
        raise CheckpointError(
            f"{checkpoint} is not a complete checkpoint (no manifest.json or wrong file sizes)"
        )
    ckpt.scan_pickles(checkpoint)
    state = ckpt.read_state(checkpoint)
    shape = dict(state["model"])
    vocab_size = shape.pop("vocab_size")
    shape["name"] = state["config"]["model"]["name"]
    mcfg = ModelConfig(**shape)
    tokenizer = load_tokenizer(os.path.join(checkpoint, "tokenizer"))
    model = build_model(mcfg, vocab_size, seed=0, eos_token_id=tokenizer.eos_token_id)
    weights = load_weights(checkpoint, model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and mcfg.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return ckpt.export_hf(model, tokenizer, out_dir, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="a checkpoint directory, e.g. runs/default/checkpoints/step_00000200"
    )
    parser.add_argument("out_dir", help="where to write the Hugging Face model and tokenizer (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out_dir, args.overwrite))
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
