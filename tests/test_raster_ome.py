"""Writing whole chunks directly gives the same Zarr v2 files as zarr-python's ``__setitem__``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from abc_pipeline.raster.ome import copy_array, create_array, write_chunks


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name[0] != "."
    }


def test_write_chunks_matches_setitem(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((7, 5, 9, 6)).astype(np.float32)  # (c, z, y, x); chunks (3, 2, 4, 4): partial at every end
    labels = rng.integers(0, 3, (5, 9, 6)) * (rng.random((5, 9, 6)) < 0.2)  # many all-zero chunks
    labels[:2, :4, :4] = 0
    regions = [
        (slice(0, 2), slice(0, 4), slice(0, 4)),
        (slice(0, 2), slice(0, 4), slice(4, 6)),
        (slice(0, 2), slice(4, 9), slice(0, 6)),
        (slice(2, 5), slice(0, 9), slice(0, 6)),
    ]  # whole chunks
    stores = {}
    for how in ("setitem", "direct"):
        root = zarr.open_group(str(tmp_path / how), mode="w", zarr_format=2)
        img = create_array(root, "0", image.shape, (3, 2, 4, 4), np.float32, write_empty_chunks=True)
        lab = create_array(root, "labels/0", labels.shape, (2, 4, 4), np.uint8)
        for region in regions:
            if how == "setitem":
                img[(slice(None), *region)] = image[(slice(None), *region)]
                lab[region] = labels[region]
            else:
                write_chunks(img, (slice(0, 7), *region), image[(slice(None), *region)])
                write_chunks(lab, region, labels[region])
        stores[how] = tmp_path / how
    direct, setitem = _files(stores["direct"]), _files(stores["setitem"])
    assert direct == setitem
    assert (
        any(k.startswith("labels/0/") for k in direct)
        and len([k for k in direct if k.startswith("labels")]) < 3 * 3 * 2
    )
    back = zarr.open_group(str(stores["direct"]), mode="r")
    np.testing.assert_array_equal(back["0"][...], image)
    np.testing.assert_array_equal(back["labels/0"][...], labels)
    # an unaligned region falls back to zarr-python
    write_chunks(
        back_rw := zarr.open_group(str(stores["direct"]), mode="r+")["0"],
        (slice(1, 2), slice(0, 1), slice(0, 3), slice(0, 2)),
        np.zeros((1, 1, 3, 2), np.float32),
    )
    assert back_rw[1, 0, :3, :2].sum() == 0 and back_rw[0, 0, 0, 0] == image[0, 0, 0, 0]


def test_copy_array_copies_string_chunks_verbatim(tmp_path: Path) -> None:
    src_root = zarr.open_group(str(tmp_path / "in.zarr"), mode="w", zarr_format=2)
    names = src_root.create_array("names", shape=(7,), chunks=(3,), dtype=str, fill_value="")
    names[:6] = [f"cell-{i}" for i in range(6)]  # the last chunk holds only the fill value
    numbers = src_root.create_array("numbers", shape=(7,), chunks=(3,), dtype=np.float32)
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="w", zarr_format=2)
    assert copy_array(numbers, out, "numbers") is None and "numbers" not in out
    copy = copy_array(names, out, "names")
    np.testing.assert_array_equal(copy[:], names[:])
    assert copy.chunks == names.chunks and copy.metadata.compressor == names.metadata.compressor
    src_files = {k: v for k, v in _files(tmp_path / "in.zarr" / "names").items() if k.isdigit()}
    assert sorted(src_files) == ["0", "1"]
    assert src_files == {k: v for k, v in _files(tmp_path / "out.zarr" / "names").items() if k.isdigit()}
