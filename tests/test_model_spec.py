"""ModelSpec: every zoo model is rebuilt from its checkpoint's spec alone (non-default kernel size, padding and
activation included) and gives identical outputs; checkpoints without a spec fail with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from abc_pipeline.errors import InputError
from abc_pipeline.learn.checkpoint import load_model, save_checkpoint
from abc_pipeline.nn import MODELS, ModelSpec, build_model

TWO_D_ONLY = ("cfnet", "se2n-interp")
CASES = [  # name, head, dim, spacing, input size
    *[(name, head, 2, None, (11, 11)) for name in MODELS if name != "cfnet" for head in ("classify", "segment")],
    *[(name, "patch", 3, (2.0, 1.0, 1.0), (13, 13, 13)) for name in MODELS if name not in TWO_D_ONLY],
    ("se2n-interp", "patch", 2, None, (13, 13)),
    ("cfnet", "classify", 2, None, (12, 12)),
]


def _build(name: str, head: str, dim: int, spacing, **overrides) -> torch.nn.Module:
    args = dict(
        width=1 if name == "gcnn-regular" and dim == 3 else 3,
        spacing=spacing,
        depth=2,
        kernel_size=5,
        padding_mode="zeros" if name == "cfnet" else "circular",
        scalar_act="gelu",
        patch_size=3,
    )
    args.update(overrides)
    return build_model(name, dim, 2, 3, head, **args)


@pytest.mark.parametrize("name, head, dim, spacing, size", CASES)
def test_rebuild_from_checkpoint_spec(tmp_path: Path, name: str, head: str, dim: int, spacing, size) -> None:
    torch.manual_seed(0)
    model = _build(name, head, dim, spacing).eval()
    spec = json.loads(json.dumps(model.spec.to_dict()))  # what a checkpoint stores: plain JSON values
    assert spec["kernel_size"] == 5 and spec["scalar_act"] == "gelu" and spec["depth"] == 2 and spec["head"] == head
    path = save_checkpoint({"model": model.state_dict(), "model_name": name, "model_spec": spec}, tmp_path / "c.pt")
    rebuilt, _ = load_model(path)
    assert rebuilt.spec == model.spec
    x = torch.randn(2, 2, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # negative control: the same name and sizes with the default kernel size, padding and activation is another
    # network, which the spec alone tells apart
    default = _build(name, head, dim, spacing, kernel_size=3, padding_mode="zeros", scalar_act="relu").spec
    assert default != model.spec and ModelSpec.from_dict(spec) == model.spec


def test_cell_context_rebuilds_with_its_expression_width(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("moment-trivial-irrep", 2, 5, 3, "cell-context", width=2, depth=2, patch_size=3, kernel_size=5)
    model.eval()
    assert model.spec.n_expression == 4 and model.spec.patch_size == (3, 3)
    path = save_checkpoint(
        {"model": model.state_dict(), "model_name": "m", "model_spec": model.spec.to_dict()}, tmp_path / "c.pt"
    )
    rebuilt, _ = load_model(path)
    patch = torch.randn(4, 5, 7, 7, generator=torch.Generator().manual_seed(2))
    expression = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(rebuilt(patch, expression), model(patch, expression))


def test_old_or_foreign_checkpoints_fail_clearly(tmp_path: Path) -> None:
    model = build_model("cnn", 2, 1, 2, width=2)
    old = {"name": "cnn", "dim": 2, "in_channels": 1, "n_classes": 2}
    path = save_checkpoint({"model": model.state_dict(), "model_name": "cnn", "model_kwargs": old}, tmp_path / "o.pt")
    with pytest.raises(InputError, match="older abc-pipeline.*retrain"):
        load_model(path)
    bad = {**model.spec.to_dict(), "stride": 2}
    path = save_checkpoint({"model": model.state_dict(), "model_name": "cnn", "model_spec": bad}, tmp_path / "b.pt")
    with pytest.raises(InputError, match=r"unknown \['stride'\]"):
        load_model(path)
    with pytest.raises(InputError, match="padding_mode"):
        build_model("cnn", 2, 1, 2, padding_mode="mirror")
    with pytest.raises(InputError, match="scalar_act"):
        build_model("cnn", 2, 1, 2, scalar_act="tanh")
