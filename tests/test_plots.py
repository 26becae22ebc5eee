"""Evaluation figures: every function draws what it is given, writes a non-empty PNG atomically and rejects bad
input."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from plot_checks import check_spatial_scatter
from sklearn.metrics import confusion_matrix

from abc_pipeline import plots
from abc_pipeline.errors import InputError

matplotlib.use("Agg")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # no temporary file left behind
    return mpimg.imread(path)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plots functions draw, in order; each is still written to its PNG by ``plots._save``."""
    figures: list[Figure] = []
    save = plots._save

    def record(fig: Figure, path: Path, dpi: int) -> Path:
        figures.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", record)
    return figures


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_confusion_matrix_and_training_curves(tmp_path: Path, drawn: list[Figure]) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    out = plots.confusion_matrix_figure(y, pred, ["a", "b", "c", "d"], tmp_path / "cm.png")
    assert out == tmp_path / "cm.png"
    _check_png(out)
    _check_png(plots.confusion_matrix_figure(y, pred, list("abcd"), tmp_path / "cm_counts.png", normalize=False))
    for fig, normalize in zip(drawn, ("true", None)):
        ax = fig.axes[0]  # then the colour bar
        expected = confusion_matrix(y, pred, normalize=normalize)
        np.testing.assert_allclose(ax.images[0].get_array(), expected)
        assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" if normalize else str(v) for v in expected.ravel()]
        assert [t.get_text() for t in ax.get_xticklabels()] == list("abcd") and "n = 200" in ax.get_title()
    with pytest.raises(InputError, match="0..3"):
        plots.confusion_matrix_figure(y, pred - 1, list("abcd"), tmp_path / "bad.png")

    history = pd.DataFrame(
        {
            "epoch": range(6),
            "train_loss": np.linspace(1.2, 0.3, 6),
            "val_loss": np.linspace(1.1, 0.5, 6),
            "val_accuracy": np.linspace(0.4, 0.8, 6),
            "val_auc": np.linspace(0.6, 0.9, 6),
            "lr": 1e-3,
            "seconds": 1.0,
        }
    )
    history.to_csv(tmp_path / "history.tsv", sep="\t", index=False)
    _check_png(plots.training_curves_figure(tmp_path / "history.tsv", tmp_path / "curves.png"))
    loss, metric = drawn[-1].axes
    for ax, columns in ((loss, ["train_loss", "val_loss"]), (metric, ["val_accuracy", "val_auc"])):
        assert len(ax.lines) == len(columns)
        for line, column in zip(ax.lines, columns):
            np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 7))  # epochs counted from 1
            np.testing.assert_allclose(line.get_ydata(), history[column])
    assert _legend(metric) == ["accuracy", "auc"]
    history[["epoch", "lr"]].to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="train_loss"):
        plots.training_curves_figure(tmp_path / "bad.tsv", tmp_path / "x.png")


def test_region_maps_use_the_label_colours(tmp_path: Path, drawn: list[Figure]) -> None:
    true = np.zeros((40, 50), dtype=np.int64)
    true[5:20, 5:30], true[20:35, 10:45] = 1, 2
    pred = true.copy()
    pred[18:24] = 3
    colors = ["#ff0000", "#00ff00", "#0000ff"]
    path = plots.region_maps_figure(
        [true, true],
        [pred, true],
        ["A", "B", "C"],
        colors,
        ["section 1", "section 2"],
        tmp_path / "regions.png",
        spacing=10.0,
    )
    rgb = (_check_png(path)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    fig = drawn[-1]
    assert len(fig.axes) == 4 and [ax.get_title() for ax in fig.axes[:2]] == ["section 1: true", "section 1: predicted"]
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(), true)  # section 2 predicted = its truth
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["B", "A", "C"]  # present regions, most frequent first
    found = {tuple(c) for c in np.unique(rgb, axis=0)}
    assert {(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)} <= found  # regions + white background
    with pytest.raises(InputError, match="0..3"):
        plots.region_maps_figure([true], [pred + 1], ["A", "B", "C"], colors, ["s"], tmp_path / "bad.png")
    with pytest.raises(InputError, match="one colour per name"):
        plots.region_maps_figure([true], [pred], ["A", "B", "C"], colors[:2], ["s"], tmp_path / "bad.png")


def test_equivariance_curve_and_orientation_bars(tmp_path: Path, drawn: list[Figure]) -> None:
    angles = [0, 15, 30, 45, 60, 75, 90]
    curves = {
        "cnn": (angles, [1, 0.8, 0.7, 0.6, 0.7, 0.8, 0.9]),
        "moment-trivial": (angles, [1, 1, 0.95, 0.9, 0.95, 1, 1]),
    }
    img = _check_png(plots.equivariance_curve_figure(curves, tmp_path / "eq.png"))
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 2  # lines, text: not a blank canvas
    _check_png(plots.orientation_bar_figure({"cnn": (0.8, 0.6), "moment-trivial": (0.85, 0.85)}, tmp_path / "ob.png"))
    curve_ax, bars_ax = drawn[0].axes[0], drawn[1].axes[0]
    assert _legend(curve_ax) == list(curves) and list(curve_ax.get_xticks()) == angles
    for line, (x, agreement) in zip(curve_ax.lines, curves.values()):
        np.testing.assert_array_equal(line.get_xdata(), x)
        np.testing.assert_allclose(line.get_ydata(), agreement)
    # bars: plain scores of every model, then the worst-orientation ones, each labelled with its value
    np.testing.assert_allclose([b.get_height() for b in bars_ax.patches], [0.8, 0.85, 0.6, 0.85])
    assert [t.get_text() for t in bars_ax.texts] == ["0.800", "0.850", "0.600", "0.850"]
    assert [t.get_text() for t in bars_ax.get_xticklabels()] == ["cnn", "moment-trivial"]
    assert _legend(bars_ax) == ["test split as is", "worst orientation"]
    with pytest.raises(InputError, match="angles"):
        plots.equivariance_curve_figure({"cnn": ([0, 45], [1.0])}, tmp_path / "bad.png")


def test_any_angle_figure_draws_one_panel_per_task(tmp_path: Path, drawn: list[Figure]) -> None:
    angles = [0, 45, 90]
    panels = {
        "celltype": {"cnn": (angles, [0.9, 0.5, 0.85]), "moment-trivial": (angles, [0.8, 0.8, 0.8])},
        "region": {"cnn": (angles, [0.7, 0.3, 0.7])},
    }
    _check_png(plots.any_angle_figure(panels, tmp_path / "any_angle.png"))
    axes = drawn[-1].axes
    assert [ax.get_title() for ax in axes] == list(panels)
    for ax, curves in zip(axes, panels.values()):
        assert _legend(ax) == list(curves)
        for line, (x, scores) in zip(ax.lines, curves.values(), strict=True):
            np.testing.assert_array_equal(line.get_xdata(), x)
            np.testing.assert_allclose(line.get_ydata(), scores)
    with pytest.raises(InputError, match="no any-angle scores"):
        plots.any_angle_figure({"region": {}}, tmp_path / "bad.png")


def test_repeated_region_colours_become_distinct_and_the_overview_draws() -> None:
    """The real CCF gives several divisions one colour; squidpy's categorical colouring needs distinct ones."""
    import anndata
    import numpy as np
    import pandas as pd
    import squidpy as sq
    from matplotlib import pyplot as plt

    from abc_pipeline.report import distinct_colors

    colors = ["#cccccc", "#aaaaaa", "#cccccc", "#cccccc", "#ffffff", "#ffffff", "#cccccd"]
    out = distinct_colors(colors)
    assert len(set(out)) == len(out) and out[:2] == ["#cccccc", "#aaaaaa"]
    assert all(int(a[1:], 16) >> 8 == int(b[1:], 16) >> 8 for a, b in zip(colors, out))  # only blue moves
    assert all(abs((int(a[1:], 16) & 0xFF) - (int(b[1:], 16) & 0xFF)) <= 3 for a, b in zip(colors, out))
    rng = np.random.default_rng(0)
    labels = rng.choice(["A", "B", "C"], 50).astype(object)
    labels[:5] = None  # cells without a prediction (NA), as in pred_region
    adata = anndata.AnnData(
        obs=pd.DataFrame(
            {"division": pd.Categorical(labels, categories=["A", "B", "C"])}, index=[str(i) for i in range(50)]
        ),
        obsm={"spatial": rng.random((50, 2))},
        uns={"division_colors": np.array(["#cccccc", "#cccccc", "#aaaaaa"], dtype=object)},
    )
    fig, ax = plt.subplots()
    with pytest.raises(AttributeError):  # what squidpy does with repeated colours
        sq.pl.spatial_scatter(adata, shape=None, color="division", ax=ax)
    adata.uns["division_colors"] = np.array(distinct_colors(list(adata.uns["division_colors"])), dtype=object)
    check_spatial_scatter(adata, "division", ax=ax)  # 50 points in their colours, the legend A, B, C, NA
