"""Any-angle evaluation: exact invariance of an invariant model under 90° turns of the test sections (the CNN
as the negative control), the 0° image is the raster's, angle-list errors."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from abc_pipeline.errors import InputError
from abc_pipeline.learn.any_angle import any_angle_predictions, any_angle_scores, rotate_points
from abc_pipeline.learn.atlas import train_atlas_task
from abc_pipeline.learn.choices import check_angles
from abc_pipeline.learn.predict import predict_raster


@pytest.fixture(scope="module")
def cnn_run(atlas, tmp_path_factory):
    """A CNN patch classifier on the same data as the fixture's moment-trivial-irrep (not invariant; a patch
    classifier, whose output is all context, unlike a cell-context model that starts from its invariant linear
    path)."""
    run = tmp_path_factory.mktemp("any_angle") / "cnn"
    train_atlas_task(
        atlas["section"],
        atlas["cells"],
        "celltype",
        "cnn",
        run,
        width=6,
        depth=2,
        patch_size=3,
        epochs=2,
        batch_size=64,
        lr=5e-3,
        max_samples_per_epoch=800,
        progress=False,
        architecture="patch",
    )
    return run


@pytest.fixture(scope="module")
def cell_context_run(atlas, tmp_path_factory):
    """A moment cell-context classifier (2D: any-angle runs it on whole sections, one pass per section)."""
    run = tmp_path_factory.mktemp("any_angle") / "cell_context"
    train_atlas_task(
        atlas["section"],
        atlas["cells"],
        "celltype",
        "moment-trivial-irrep",
        run,
        width=4,
        depth=2,
        patch_size=3,
        epochs=1,
        lr=5e-3,
        progress=False,
        architecture="cell-context",
        neighborhood_radii=(1.5, 4.0),
    )
    return run


def test_quarter_turns_give_identical_per_cell_predictions_for_an_invariant_model(atlas, cnn_run, cell_context_run):
    context = any_angle_predictions(
        cell_context_run / "checkpoint.pt", atlas["section"], atlas["cells"], angles=[0, 90, 270], device="cpu"
    )
    np.testing.assert_allclose(context["proba"][1:], context["proba"][[0, 0]], atol=1e-5)
    angles = [0, 90, 180, 270]
    moment = any_angle_predictions(
        atlas["out"] / "models" / "ct" / "checkpoint.pt",
        atlas["section"],
        atlas["cells"],
        angles=angles,
        sections=2,
        device="cpu",
    )
    assert moment["proba"].shape[:2] == (4, len(moment["rows"])) and len(moment["units"]) >= 1
    classes = moment["proba"].argmax(2)
    for k in range(1, 4):
        np.testing.assert_array_equal(classes[k], classes[0])
        np.testing.assert_allclose(moment["proba"][k], moment["proba"][0], atol=1e-5)
    cnn = any_angle_predictions(
        cnn_run / "checkpoint.pt", atlas["section"], atlas["cells"], angles=angles, sections=2, device="cpu"
    )
    np.testing.assert_array_equal(cnn["rows"], moment["rows"])
    # the CNN's quarter-turn differences are two orders of magnitude above the invariant model's tolerance
    assert np.abs(cnn["proba"][1] - cnn["proba"][0]).max() > 100 * 1e-5
    assert (cnn["proba"].argmax(2)[1:] != cnn["proba"].argmax(2)[0]).any()


@pytest.mark.parametrize("model", ["patch", "cell-context"])
def test_the_unrotated_image_reproduces_the_stored_predictions(atlas, cell_context_run, tmp_path, model):
    """At 0° the cells are binned exactly as the raster was: each cell reads what predict wrote for it (a cell-context
    model: from one pass over the section, predict from its dense context map)."""
    run = atlas["out"] / "models" / "ct" if model == "patch" else cell_context_run
    store = predict_raster(
        run / "checkpoint.pt", atlas["section"], tmp_path / "p.zarr", cells=atlas["cells"], progress=False
    )
    got = any_angle_predictions(run / "checkpoint.pt", atlas["section"], atlas["cells"], angles=[0], device="cpu")
    stored = np.asarray(zarr.open_group(str(store), mode="r")["cells/proba"][:])[got["rows"]]
    np.testing.assert_allclose(got["proba"][0], stored, atol=1e-5)


def test_scores_per_angle_mean_and_worst(atlas):
    s = any_angle_scores(
        atlas["out"] / "models" / "ct" / "checkpoint.pt",
        atlas["section"],
        atlas["cells"],
        angles=[0, 45, 90],
        sections=1,
        device="cpu",
    )
    acc = s["metrics"]["accuracy"]
    assert len(acc) == 3 and acc[0] == pytest.approx(acc[2], abs=1e-12)
    assert s["mean"]["accuracy"] == pytest.approx(np.mean(acc)) and s["worst"]["accuracy"] == min(acc)
    assert s["worst_angle"]["accuracy"] == [0.0, 45.0, 90.0][int(np.argmin(acc))] and s["n_cells"] > 0


def test_rotate_points_is_exact_for_quarter_turns():
    p = np.array([[1.25, -0.5], [3.0, 2.0]])
    np.testing.assert_array_equal(rotate_points(p, (1.0, 1.0), 90), [[2.5, 1.25], [0.0, 3.0]])
    np.testing.assert_array_equal(rotate_points(rotate_points(p, (1.0, 1.0), 90), (1.0, 1.0), 270), p)
    np.testing.assert_allclose(
        rotate_points(p, (0.0, 0.0), 30)[:, 0] ** 2 + rotate_points(p, (0.0, 0.0), 30)[:, 1] ** 2, (p**2).sum(axis=1)
    )


@pytest.mark.parametrize("bad", [[0, "ninety"], "0 15", [], [0, float("nan")], [True]])
def test_angle_lists_must_be_numbers(bad):
    with pytest.raises(InputError, match="evaluation.any_angles must"):
        check_angles(bad, "evaluation.any_angles")
    assert check_angles([0, 15.5, np.int64(30)]) == (0.0, 15.5, 30.0)
