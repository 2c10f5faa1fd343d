"""Gradient accumulation: K x B micro-batches give the gradient of one batch of K*B."""

import torch
from conftest import compose

from harness.config import to_object
from harness.data import IGNORE_INDEX, MicroBatch
from harness.dist import DistEnv
from harness.model import build_model
from harness.parallel import ParallelDims, backend_class
from harness.parallel.loss import token_loss_sum


def _backend(model):
    cfg = to_object(compose()).parallel
    backend = backend_class("none")(DistEnv(0, 0, 1, torch.device("cpu")), cfg, ParallelDims(1, 1, 1, 1))
    backend.parallelize(model)
    return backend


def _batch(seed=0, n=8, seq=16, vocab=256):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, vocab, (n, seq + 1), generator=g)
    mb = MicroBatch.from_sequences(seqs)
    # Different numbers of valid targets per sequence: sequence i ignores its first 2*i targets.
    for i in range(n):
        mb.labels[i, : 2 * i] = IGNORE_INDEX
    return mb


def _grads(micro_batch_size):
    cfg = to_object(
        compose(
            "model.hidden_size=64",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.num_kv_heads=2",
            "model.intermediate_size=128",
        )
    ).model
    model = build_model(cfg, 256, seed=0)
    batch = _batch()
    mbs = [
        MicroBatch(batch.input_ids[i : i + micro_batch_size], batch.labels[i : i + micro_batch_size])
        for i in range(0, 8, micro_batch_size)
    ]
    loss = _backend(model).forward_backward(mbs)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, model, batch


def test_4x2_accumulation_equals_1x8_batch():
    loss_acc, g_acc, _, _ = _grads(micro_batch_size=2)  # 4 micro-batches of 2
    loss_one, g_one, model, batch = _grads(micro_batch_size=8)  # 1 batch of 8
    assert torch.allclose(loss_acc, loss_one, atol=1e-6, rtol=0)
    for name in g_one:
        assert torch.allclose(g_acc[name], g_one[name], atol=1e-6, rtol=0), name
    # and the loss is the token mean over the whole step's valid targets
    with torch.no_grad():
        total = token_loss_sum(model, batch, None) / (batch.labels != IGNORE_INDEX).sum()
    assert torch.allclose(loss_one, total, atol=1e-6)


def test_mean_of_micro_batch_means_would_differ():
    """The check above can fail: averaging per-micro-batch means weights tokens unequally."""
    _, _, model, batch = _grads(micro_batch_size=8)
    with torch.no_grad():
        means = [
            token_loss_sum(model, MicroBatch(batch.input_ids[i : i + 2], batch.labels[i : i + 2]), None)
            / (batch.labels[i : i + 2] != IGNORE_INDEX).sum()
            for i in range(0, 8, 2)
        ]
        token_mean = token_loss_sum(model, batch, None) / (batch.labels != IGNORE_INDEX).sum()
    assert abs(torch.stack(means).mean() - token_mean) > 1e-4
