"""One way to run a network (learn/inference.py) and one score of its output (evaluate.score)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from abc_pipeline.learn.inference import forward, predict_batches, predict_proba
from abc_pipeline.metrics import classification_metrics, score, segmentation_metrics


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()


def test_forward_on_the_cpu_is_the_plain_float32_network_without_autograd() -> None:
    net, x = _net(), torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    out = forward(net, x, torch.device("cpu"))
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    both = forward(lambda v: (net(v), net(v).sum(1)), x, torch.device("cpu"))  # several outputs: each float32
    assert isinstance(both, tuple) and torch.equal(both[1], net(x).sum(1).detach())


def test_batches_and_datasets_give_the_single_pass_outputs() -> None:
    net, x = _net(), torch.randn(7, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    whole = net(x).detach()
    cpu = torch.device("cpu")
    torch.testing.assert_close(predict_batches(net, x, cpu, batch_size=3), whole)
    proba = predict_proba(net, TensorDataset(x, torch.zeros(7)), batch_size=2, device="cpu")  # pairs: inputs only
    torch.testing.assert_close(proba, torch.softmax(whole, dim=1))
    np.testing.assert_allclose(proba.sum(1).numpy(), 1.0, atol=1e-6)


def test_score_dispatches_to_the_classification_or_segmentation_metrics() -> None:
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    y = rng.integers(0, 3, 40)
    proba = rng.dirichlet(np.ones(3), 40)
    assert score(y, proba, names) == classification_metrics(y, proba, names)
    maps = rng.integers(-1, 3, (4, 6, 6))
    scores = rng.normal(size=(4, 3, 6, 6))
    expected = segmentation_metrics(maps, scores.argmax(1), names, ignore=-1)
    assert score(maps, scores, names, segment=True) == expected  # class scores: argmax over axis 1
    assert score(maps, scores.argmax(1), names, segment=True) == expected  # predicted labels as they are
    with pytest.raises(Exception, match="shape"):
        score(y, proba[:, :2], names)
