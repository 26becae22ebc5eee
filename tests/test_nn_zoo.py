"""Zoo models: exact invariance (classify) / equivariance (segment) over the whole grid group, random
weights, odd and even sizes, through down- and upsampling; the CNN baseline fails the same test."""

from __future__ import annotations

import pytest
import torch

from abc_pipeline.cli import main
from abc_pipeline.errors import InputError
from abc_pipeline.nn import MODELS, build_model, fields, format_model_table, model_table

EQUIVARIANT = ["moment-trivial", "moment-trivial-irrep", "gcnn-regular"]
C4 = [fields.rot90(2, (0, 1), k) for k in range(4)]

CASES = [  # dim, spacing, sizes (odd and even; anisotropic: the 16-element group)
    (2, None, [(8, 8), (9, 9), (6, 11)]),
    (3, None, [(6, 6, 6), (5, 5, 5)]),
    (3, (3.0, 1.0, 1.0), [(5, 6, 6), (4, 7, 7)]),
]


def _model(name, dim, task, spacing=None, dtype=torch.float64, seed=0, sizes=None):
    """A model with random weights and batch-norm statistics calibrated on random inputs of the test
    sizes (so that every layer's output is O(1) and the test is sensitive), in eval mode."""
    torch.manual_seed(seed)
    width = 1 if name == "gcnn-regular" and dim == 3 else 4
    model = build_model(name, dim, 2, 3, task, width=width, spacing=spacing)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration passes
            m.weight.data.mul_(torch.empty_like(m.weight).uniform_(0.5, 1.5))
            m.bias.data.normal_(0, 0.3)
        if name.startswith("moment") and hasattr(m, "thresholds"):
            for t in m.thresholds:
                t.data.uniform_(0.5, 1.5)
    model.to(dtype).train()
    with torch.no_grad():
        for size in sizes or [(8,) * dim]:
            model(torch.randn(4, 2, *size, dtype=dtype))
    return model.eval()


def _error(model, x, group, task):
    return fields.equivariance_error(model, x, group, invariant=task == "classify")


@pytest.mark.parametrize("task", ["classify", "segment"])
@pytest.mark.parametrize("name", EQUIVARIANT)
@pytest.mark.parametrize("dim, spacing, sizes", CASES)
def test_models_are_exactly_equivariant(name, task, dim, spacing, sizes):
    model = _model(name, dim, task, spacing, sizes=sizes)
    group = fields.grid_group(dim, spacing)
    assert len(group) == {2: 8, 3: 48 if spacing is None else 16}[dim]
    for i, size in enumerate(sizes):
        torch.manual_seed(i)
        x = torch.randn(1, 2, *size, dtype=torch.float64)
        y = model(x)
        assert y.shape == ((1, 3) if task == "classify" else (1, 3, *size))
        assert _error(model, x, group, task) < 1e-10
    x32 = x.float()
    assert _error(model.float(), x32, group, task) < 1e-5


@pytest.mark.parametrize("task", ["classify", "segment"])
@pytest.mark.parametrize("dim, spacing, sizes", CASES)
def test_cnn_baseline_fails_the_same_test(task, dim, spacing, sizes):
    model = _model("cnn", dim, task, spacing, sizes=sizes)
    group = fields.grid_group(dim, spacing)
    x = torch.randn(1, 2, *sizes[0], dtype=torch.float64)
    assert _error(model, x, group, task) > 1e-6  # orders of magnitude above the 1e-10 tolerance


def test_cfnet_is_invariant_to_rotations_about_the_centre_only():
    model = _model("cfnet", 2, "classify", sizes=[(15, 15), (16, 16)])
    for n in (15, 16):
        x = torch.randn(1, 2, n, n, dtype=torch.float64)
        assert _error(model, x, C4, "classify") < 1e-10
        assert _error(model.float(), x.float(), C4, "classify") < 1e-5
        model.double()
    # CFNet is a rotation (C4) model: reflections are not symmetries of it
    assert _error(model, x, fields.grid_group(2), "classify") > 1e-6
    with pytest.raises(InputError, match="square"):
        model(torch.randn(1, 2, 8, 9, dtype=torch.float64))


def test_training_mode_batch_statistics_keep_equivariance():
    model = _model("moment-trivial-irrep", 3, "segment", sizes=[(6, 6, 6)]).train()
    x = torch.randn(2, 2, 6, 6, 6, dtype=torch.float64)
    y = model(x)
    for g in fields.grid_group(3)[::11]:
        assert (model(fields.transform(x, g)) - fields.transform(y, g)).abs().max() < 1e-10 * y.abs().max()


@pytest.mark.parametrize("name", ["cnn", "moment-trivial-irrep", "gcnn-regular"])
def test_small_and_odd_inputs(name):
    """Any size works: 9^3 or 15x15 patches classify; segmentation returns the input's size (odd/even)."""
    with torch.no_grad():
        m3 = build_model(name, 3, 1, 4, "classify", width=2).eval()
        assert m3(torch.randn(2, 1, 9, 9, 9)).shape == (2, 4)
        assert m3(torch.randn(1, 1, 1, 3, 2)).shape == (1, 4)
        m2 = build_model(name, 2, 3, 5, "classify", width=2).eval()
        assert m2(torch.randn(2, 3, 15, 15)).shape == (2, 5)
        seg = build_model(name, 3, 1, 4, "segment", width=2, spacing=(4, 1, 1)).eval()
        for size in [(3, 10, 9), (1, 5, 6), (2, 17, 16)]:
            assert seg(torch.randn(1, 1, *size)).shape == (1, 4, *size)
        seg2 = build_model(name, 2, 2, 3, "segment", width=2, depth=5).eval()
        assert seg2(torch.randn(1, 2, 13, 30)).shape == (1, 3, 13, 30)


def test_parameter_matching_and_table():
    # the lab's 2D MedMNIST layout reproduces its parameter counts exactly (reference §2)
    assert build_model("cnn", 2, 3, 8, width=32).n_params == 1_574_664
    assert build_model("moment-trivial", 2, 3, 8, width=55).n_params == 1_555_408
    for name in MODELS:
        m = build_model(name, 2, 3, 8, target_params=1_500_000)
        assert abs(m.n_params - 1_500_000) / 1_500_000 < 0.1, (name, m.width, m.n_params)
        below = build_model(name, 2, 3, 8, width=m.width - 1).n_params
        above = build_model(name, 2, 3, 8, width=m.width + 1).n_params
        assert abs(m.n_params - 1_500_000) <= min(abs(below - 1_500_000), abs(above - 1_500_000))
    rows = model_table(3, 1, 2, "segment", target_params=200_000)
    assert [r["model"] for r in rows] == [n for n in MODELS if n not in ("cfnet", "se2n-interp")]  # 2D-only models
    irrep = next(r for r in rows if r["model"] == "moment-trivial-irrep")
    s, v = (int(t.split()[0]) for t in irrep["first_layer"].split(" + "))
    assert irrep["first_layer_channels"] == s + 3 * v and s + v == irrep["width"]
    assert "| moment-trivial |" in format_model_table(rows)


def test_cli_models_table(capsys):
    assert main(["models", "--dim", "2", "--in-channels", "3", "--classes", "8", "--target-params", "300000"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert f"| {name} |" in out


def test_bad_arguments():
    with pytest.raises(InputError, match="cfnet"):
        build_model("cfnet", 3, 1, 2)
    with pytest.raises(InputError, match="unknown model"):
        build_model("resnet", 2, 1, 2)
    with pytest.raises(InputError, match="either"):
        build_model("cnn", 2, 1, 2, width=4, target_params=1000)
