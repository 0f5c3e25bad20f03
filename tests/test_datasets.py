"""The dataset reader as a specification: every source (folder, glob, shards, manifests,
Parquet) gives the same items, in a stable order, with unique ids, preprocessed exactly as
`onnxplain.io` preprocesses one file; an unreadable input is an item with its error."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxplain.datasets import open_dataset, preprocess_for
from onnxplain.errors import InputError, OptionError
from onnxplain.explainer import Explainer
from onnxplain.io import prepare_images

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_cnn.onnx"


@pytest.fixture(scope="module")
def pre():
    return preprocess_for(Explainer(TINY))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "b").mkdir()
    names = ["a1.png", "a2.jpg", "b/c.png", "z.png"]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(root / n)
    (root / "notes.txt").write_text("not an input")
    return root, names


def test_a_folder_gives_its_images_recursively_in_path_order_each_preprocessed_as_io_does(images, pre):
    root, names = images
    ds = open_dataset(root, pre)
    assert [e.id for e in ds.entries] == sorted(names)
    for item in ds:
        want, _ = prepare_images([root / item.id], pre)
        assert item.error is None and np.array_equal(item.inputs, want)


def test_a_glob_picks_the_files_it_matches(images, pre):
    root, _ = images
    ds = open_dataset(str(root / "*.png"), pre)
    assert [e.id for e in ds.entries] == ["a1.png", "z.png"]
    assert [e.id for e in open_dataset(str(root / "**" / "*.png"), pre).entries] == ["a1.png", "b/c.png", "z.png"]


def test_npy_and_npz_shards_give_one_item_per_row_of_their_batch_axis(tmp_path):
    a = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    np.save(tmp_path / "s0.npy", a)
    np.savez(tmp_path / "s1.npz", x=a[:2] + 100, mask=np.ones((2, 4), np.int64))
    one = open_dataset(tmp_path / "s0.npy")
    assert [e.id for e in one.entries] == ["s0.npy:0", "s0.npy:1", "s0.npy:2"]
    assert all(np.array_equal(it.inputs, a[i:i + 1]) for i, it in enumerate(one))
    named = list(open_dataset(tmp_path / "s1.npz"))
    assert [it.id for it in named] == ["s1.npz:0", "s1.npz:1"]
    assert np.array_equal(named[1].inputs["x"], a[1:2] + 100) and named[1].inputs["mask"].shape == (1, 4)
    # A folder of both shards: rows of each in file order.
    assert len(open_dataset(tmp_path)) == 5


def test_a_csv_manifest_gives_paths_relative_to_it_with_targets_and_ids(images, pre):
    root, _ = images
    (root / "m.csv").write_text("path,target,id\na1.png,3,first\nb/c.png,,second\nz.png,7.0,\n")
    ds = open_dataset(root / "m.csv", pre)
    assert [(e.id, e.target) for e in ds.entries] == [("first", 3), ("second", None), ("z.png", 7)]
    want, _ = prepare_images([root / "b" / "c.png"], pre)
    assert np.array_equal(list(ds)[1].inputs, want)


def test_a_jsonl_manifest_reads_like_the_csv_and_may_point_at_array_rows(images, tmp_path, pre):
    root, _ = images
    a = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", a)
    np.save(tmp_path / "one.npy", a[0])  # one sample without its batch axis
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"path": "x.npy", "row": 2, "target": 1}, {"path": "one.npy"}, {"path": str(root / "z.png"), "target": 4}]))
    ds = open_dataset(tmp_path / "m.jsonl", pre, rank=4)
    items = list(ds)
    assert [it.id for it in items] == ["x.npy:2", "one.npy", str(root / "z.png")]
    assert [it.target for it in items] == [1, None, 4]
    assert np.array_equal(items[0].inputs, a[2:3]) and np.array_equal(items[1].inputs, a[:1])


def test_a_parquet_table_reads_like_a_manifest(images, pre):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, _ = images
    pq.write_table(pa.table({"path": ["z.png", "a1.png"], "target": [2, None]}), root / "m.parquet")
    ds = open_dataset(root / "m.parquet", pre)
    assert [(e.id, e.target) for e in ds.entries] == [("z.png", 2), ("a1.png", None)]
    want, _ = prepare_images([root / "z.png"], pre)
    assert np.array_equal(next(iter(ds)).inputs, want)


def test_parquet_without_pyarrow_says_which_extra_to_install(images, monkeypatch):
    root, _ = images
    (root / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(OptionError, match=r"onnxplain\[parquet\]"):
        open_dataset(root / "x.parquet")


def test_a_corrupt_image_is_an_item_with_its_error_not_a_failure(images, tmp_path, pre):
    root, _ = images
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.open(root / "z.png").save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG not really")
    items = {it.id: it for it in open_dataset(folder, pre)}
    assert items["good.png"].error is None and items["bad.png"].inputs is None
    assert "cannot read image" in items["bad.png"].error


def test_ids_must_be_unique_and_sources_must_not_mix_kinds(images, tmp_path):
    root, _ = images
    (root / "dup.csv").write_text("path,id\na1.png,x\nz.png,x\n")
    with pytest.raises(InputError, match="appears twice"):
        open_dataset(root / "dup.csv")
    np.save(tmp_path / "a.npy", np.zeros((1, 3), np.float32))
    Image.open(root / "z.png").save(tmp_path / "b.png")
    with pytest.raises(InputError, match="mixes images"):
        open_dataset(tmp_path)
    with pytest.raises(InputError, match="not a class index"):
        (root / "badt.csv").write_text("path,target\na1.png,cat\n")
        open_dataset(root / "badt.csv")
