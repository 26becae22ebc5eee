"""``abc-pipeline transfer``: atlas-trained models annotate a user's "new experiment" (held-out sections of the
synthetic atlas exported as an h5ad and as a MERSCOPE folder, in µm, rotated, shifted, with a gene subset in
shuffled order); per-cell agreement with the same models' predictions in the atlas run; missing genes; channels
that share names but not their definition are refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from user_export import export_sections, write_merscope

from abc_pipeline.cells import CellSource
from abc_pipeline.errors import InputError
from abc_pipeline.learn.atlas import train_atlas_task
from abc_pipeline.learn.predict import predict_raster
from abc_pipeline.learn.transfer import transfer
from abc_pipeline.raster import open_raster, rasterize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(assembled: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A section raster (PCA 8 of 40 genes, 0.1 mm) of the atlas, a celltype patch classifier and a region U-Net
    (moment-trivial-irrep, 2D) trained on it, and both models' predictions of the atlas raster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("transfer")
        src = CellSource(assembled)
        usable = [g for g, b in zip(src.gene_symbols, src.blank) if not b]
        genes = usable[::12][:40]
        raster = rasterize(
            assembled,
            out / "s.ome.zarr",
            space="section",
            voxel_size=0.1,
            genes=genes,
            pca=8,
            labels=["class", "parcellation_division"],
            progress=False,
        )
        runs = {
            "celltype": train_atlas_task(
                raster,
                assembled,
                "celltype",
                "moment-trivial-irrep",
                out / "ct",
                width=6,
                depth=2,
                patch_size=3,
                epochs=4,
                batch_size=64,
                lr=5e-3,
                max_samples_per_epoch=800,
                progress=False,
            ),
            "region": train_atlas_task(
                raster,
                assembled,
                "region",
                "moment-trivial-irrep",
                out / "rg",
                width=4,
                depth=2,
                tile_size=32,
                epochs=4,
                batch_size=4,
                lr=1e-2,
                progress=False,
            ),
        }
        preds = {
            task: predict_raster(
                out / d / "checkpoint.pt", raster, out / d / "predictions.zarr", cells=assembled, progress=False
            )
            for task, d in (("celltype", "ct"), ("region", "rg"))
        }
    finally:
        torch.set_num_threads(n)
    labels = zarr.open_group(str(raster), mode="r")["cells/cell_label"][:]
    cells = pd.Index([str(v) for v in np.asarray(labels).tolist()])
    atlas_pred = {}
    for task, store in preds.items():
        g = zarr.open_group(str(store), mode="r")
        names = g.attrs["abc_pipeline"]["predictions"]["class_names"]
        codes = np.asarray(g["cells/pred"][:])
        atlas_pred[task] = pd.Series(
            np.where(codes >= 0, np.asarray(names, dtype=object)[np.clip(codes, 0, None)], None), index=cells
        )
    test_z = runs["celltype"]["splits"]["test"]
    r = open_raster(raster)
    held_out = [r.grid.sections[z] for z in test_z]
    return {
        "out": out,
        "raster": r,
        "genes": genes,
        "held_out": held_out,
        "atlas_pred": atlas_pred,
        "checkpoints": [out / "ct" / "checkpoint.pt", out / "rg" / "checkpoint.pt"],
        "cells": assembled,
    }


def _user_genes(trained: dict, rng: np.random.Generator, drop: int = 0) -> list[str]:
    """Gene ids: the model's 40 genes (minus ``drop``) and 60 others, shuffled."""
    src = CellSource(trained["cells"])
    to_id = dict(zip(src.gene_symbols, src.gene_ids))
    model = [to_id[g] for g in trained["genes"]]
    others = [g for g in src.gene_ids if g not in set(model) and not g.startswith("Blank")]
    genes = model[drop:] + list(rng.choice(others, 60, replace=False))
    return list(rng.permutation(genes))


def _lattice_transform(trained: dict, rng: np.random.Generator) -> dict:
    """A rotation centre on the atlas raster's voxel lattice and a shift taking it to a lattice point of the user's
    frame (whole voxels): the same cells share voxels in both rasters (a grid symmetry of the binning)."""
    grid = trained["raster"].grid
    s = grid.voxel_size[1]
    i, j = (np.asarray(grid.shape[1:]) // 2)[::-1]  # (x, y) voxel near the centre
    center = np.array([grid.origin[2] + i * s, grid.origin[1] + j * s])
    return {"center_mm": center, "shift_mm": -center + s * rng.integers(-200, 200, 2)}


def _agreement(adata: ad.AnnData, trained: dict) -> dict:
    out = {}
    for task in ("celltype", "region"):
        ref = trained["atlas_pred"][task].loc[adata.obs_names]
        got = adata.obs[f"pred_{task}"].astype(object)
        both = ref.notna().to_numpy() & got.notna().to_numpy()
        out[task] = {
            "agreement": float((ref[both].to_numpy() == got[both].to_numpy()).mean()),
            "cells": int(both.sum()),
            "classes_predicted": int(got[both].nunique()),
        }
    return out


def test_transfer_agrees_with_the_atlas_run(trained: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    report = {"exact_90": [], "any_angle": []}
    for fmt, k in (("h5ad", int(rng.integers(1, 4))), ("merscope", int(rng.integers(1, 4)))):
        angle = 90.0 * k
        user = export_sections(
            trained["cells"],
            trained["held_out"],
            angle_deg=angle,
            genes=_user_genes(trained, rng),
            var_names="ids" if fmt == "h5ad" else "symbols",
            **_lattice_transform(trained, rng),
        )
        if fmt == "h5ad":
            user.write_h5ad(tmp_path / "new.h5ad")
            out = transfer(
                trained["checkpoints"], tmp_path / "new.h5ad", tmp_path / "a.h5ad", section="slide", progress=False
            )
        else:
            folder = write_merscope(tmp_path / "merscope", user[user.obs["slide"] == trained["held_out"][0]])
            out = transfer(trained["checkpoints"], folder, tmp_path / "m.h5ad", kind="merscope", progress=False)
        annotated = ad.read_h5ad(out)
        agree = _agreement(annotated, trained)
        report["exact_90"].append({"format": fmt, "angle": angle, **agree})
        assert agree["celltype"]["classes_predicted"] >= 3  # a model that says one class everywhere proves nothing
        assert agree["celltype"]["agreement"] >= 0.95, agree  # the patch classifier is exactly invariant
        proba = annotated.obsm["pred_celltype_proba"]
        assert list(proba.columns) == list(annotated.obs["pred_celltype"].cat.categories)
        np.testing.assert_allclose(annotated.obs["pred_celltype_confidence"], proba.max(axis=1), rtol=1e-6)
        meta = annotated.uns["abc_pipeline"]["transfer"]["pred_celltype"]
        assert meta["missing_fraction"] == 0 and meta["channel_mode"] == "pca" and meta["genes_used"] == 40
        assert ("slide" if fmt == "h5ad" else "volume") in annotated.obs and annotated.n_vars == 100  # the user's data
    for angle in rng.uniform(0, 360, 2).round(1):
        user = export_sections(
            trained["cells"],
            trained["held_out"],
            angle_deg=float(angle),
            shift_mm=(3.3, -7.1),
            genes=_user_genes(trained, rng),
        )
        user.write_h5ad(tmp_path / "any.h5ad")
        annotated = ad.read_h5ad(
            transfer(
                trained["checkpoints"],
                tmp_path / "any.h5ad",
                tmp_path / "any_out.h5ad",
                section="slide",
                progress=False,
            )
        )
        report["any_angle"].append({"format": "h5ad", "angle": float(angle), **_agreement(annotated, trained)})
    logging.getLogger(__name__).warning("transfer agreement: %s", json.dumps(report))  # shown with pytest -rA


def test_missing_genes_refused_or_zero_filled(trained: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    user = export_sections(trained["cells"], trained["held_out"][:1], genes=_user_genes(trained, rng, drop=2))
    user.write_h5ad(tmp_path / "u.h5ad")
    with pytest.raises(InputError, match=r"lacks 2 of the model's 40 genes.*--fill-missing-genes"):
        transfer(trained["checkpoints"][:1], tmp_path / "u.h5ad", tmp_path / "o.h5ad", progress=False)
    assert not (tmp_path / "o.h5ad").exists() and not list(tmp_path.glob(".o.h5ad*"))
    with caplog.at_level(logging.WARNING):
        out = transfer(
            trained["checkpoints"][:1],
            tmp_path / "u.h5ad",
            tmp_path / "o.h5ad",
            fill_missing_genes=True,
            progress=False,
        )
    assert "2 of the 40 genes" in caplog.text
    meta = ad.read_h5ad(out).uns["abc_pipeline"]["transfer"]["pred_celltype"]
    assert meta["missing_fraction"] == pytest.approx(0.05) and len(meta["genes_missing"]) == 2


def test_no_gene_overlap(trained: dict, tmp_path: Path) -> None:
    user = export_sections(trained["cells"], trained["held_out"][:1], genes=None)
    user.var_names = [f"other{i}" for i in range(user.n_vars)]
    user.write_h5ad(tmp_path / "u.h5ad")
    with pytest.raises(InputError, match="shares no gene with the model"):
        transfer(
            trained["checkpoints"][:1],
            tmp_path / "u.h5ad",
            tmp_path / "o.h5ad",
            fill_missing_genes=True,
            progress=False,
        )


def test_channels_with_the_same_names_but_other_loadings_are_refused(trained: dict, tmp_path: Path) -> None:
    other = rasterize(
        trained["cells"],
        tmp_path / "other.ome.zarr",
        space="section",
        voxel_size=0.1,
        genes=trained["genes"][::-1],
        pca=8,
        labels=[],
        progress=False,
    )  # PC1..PC8 of other loadings
    assert open_raster(other).feature_channels == trained["raster"].feature_channels
    with pytest.raises(InputError, match="channel names of .* but not their definition"):
        predict_raster(trained["checkpoints"][0], other, tmp_path / "p.zarr", progress=False)


def test_zarr_store_and_imported_cells_inputs(trained: dict, tmp_path: Path) -> None:
    from abc_pipeline.atlas.import_user import import_user_data

    rng = np.random.default_rng(5)
    user = export_sections(trained["cells"], trained["held_out"][:1], genes=_user_genes(trained, rng))
    user.write_zarr(tmp_path / "u.zarr")
    a = ad.read_h5ad(transfer(trained["checkpoints"][:1], tmp_path / "u.zarr", tmp_path / "a.h5ad", progress=False))
    cells = import_user_data("anndata", tmp_path / "u.zarr", tmp_path / "cells.zarr", progress=False)
    b = ad.read_h5ad(transfer(trained["checkpoints"][:1], cells, tmp_path / "b.h5ad", kind="cells", progress=False))
    assert list(a.obs_names) == list(user.obs_names) == list(b.obs_names)
    assert a.obs["pred_celltype"].notna().all() and "brain_section_label" in b.obs  # b: the imported cells.zarr
    np.testing.assert_array_equal(a.obs["pred_celltype"], b.obs["pred_celltype"])
