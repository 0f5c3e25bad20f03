import pickle

import numpy as np
import pytest
from PIL import Image

from onnxplain.errors import InputError, ModelError, OptionError
from onnxplain.io import (
    Preprocess,
    load_array,
    load_image,
    load_inputs,
    prepare_images,
    save_array,
)


def write_png(path, pixels):
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def tiny(tmp_path):
    """A 2x2 RGB picture with distinct, known pixel values."""
    pixels = np.array([[[255, 0, 10], [0, 128, 20]], [[30, 60, 90], [200, 100, 50]]], dtype=np.uint8)
    return write_png(tmp_path / "tiny.png", pixels), pixels


def test_normalisation_matches_hand_computation(tiny):
    path, pixels = tiny
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 0.2)
    batch, display = prepare_images([path], Preprocess(mean=mean, std=std))
    r, g, b = (pixels[..., k].astype(np.float64) / 255 for k in range(3))
    expected = np.stack([(r - 0.5) / 0.5, (g - 0.25) / 0.25, (b - 0.125) / 0.2])
    assert batch.dtype == np.float32 and batch.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(batch[0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(display[0], pixels)


def test_default_preprocess_only_scales_to_unit_range(tiny):
    path, pixels = tiny
    batch, _ = prepare_images([path], Preprocess())
    np.testing.assert_allclose(batch[0], pixels.transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_center_crop_keeps_the_middle_columns(tmp_path):
    # 4 high x 8 wide, each column its own grey level; resize 4 keeps the size exactly.
    columns = np.arange(8, dtype=np.uint8) * 30
    pixels = np.repeat(np.tile(columns, (4, 1))[..., None], 3, axis=2)
    path = write_png(tmp_path / "wide.png", pixels)
    batch, display = prepare_images([path], Preprocess(size=(4, 4), resize=4))
    np.testing.assert_array_equal(display[0][0, :, 0], columns[2:6])
    assert batch.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("w,h", [(20, 10), (10, 20), (33, 17)])
def test_resize_then_crop_gives_the_model_size_for_any_aspect(tmp_path, w, h):
    path = write_png(tmp_path / "p.png", np.full((h, w, 3), 90, dtype=np.uint8))
    batch, display = prepare_images([path], Preprocess(size=(5, 6), resize=8))
    assert batch.shape == (1, 3, 5, 6)
    assert display[0].shape == (5, 6, 3) and display[0].dtype == np.uint8


def test_direct_resize_without_crop_reaches_size(tmp_path):
    path = write_png(tmp_path / "p.png", np.zeros((10, 30, 3), dtype=np.uint8))
    batch, _ = prepare_images([path], Preprocess(size=(7, 9)))
    assert batch.shape == (1, 3, 7, 9)


def test_nhwc_layout_puts_channels_last_and_bgr_reverses_them(tmp_path):
    red = np.zeros((3, 3, 3), dtype=np.uint8)
    red[..., 0] = 255
    path = write_png(tmp_path / "red.png", red)
    batch, _ = prepare_images([path], Preprocess(layout="nhwc", bgr=True))
    assert batch.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(batch[0, 1, 1], [0.0, 0.0, 1.0])


def test_grayscale_gives_one_channel_and_rgb_display(tiny):
    path, pixels = tiny
    batch, display = prepare_images([path], Preprocess(grayscale=True))
    expected = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32) / 255
    assert batch.shape == (1, 1, 2, 2) and display[0].shape == (2, 2, 3)
    np.testing.assert_allclose(batch[0, 0], expected, rtol=1e-6)


def test_imagenet_preset_has_the_torchvision_values():
    pre = Preprocess.preset("imagenet")
    assert (pre.size, pre.resize, pre.layout, pre.bgr) == ((224, 224), 256, "nchw", False)
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert Preprocess.preset("none") == Preprocess()


def test_unknown_preset_is_an_option_error_listing_presets():
    with pytest.raises(OptionError, match="imagenet"):
        Preprocess.preset("imagenett")


def test_metadata_fields_are_read_and_unknown_keys_ignored():
    meta = {"size": [224, 224], "resize": 256, "crop": "center", "mean": [0.4, 0.5, 0.6],
            "std": [0.2, 0.2, 0.2], "layout": "nhwc", "channels": "bgr", "scale": 1.0,
            "labels": "imagenet_classes.txt"}
    pre = Preprocess.from_metadata(meta)
    assert pre == Preprocess(size=(224, 224), resize=256, mean=(0.4, 0.5, 0.6), std=(0.2,) * 3,
                             layout="nhwc", bgr=True, scale=1.0)
    assert Preprocess.from_metadata('{"channels": "gray"}').grayscale


@pytest.mark.parametrize("meta", ["{not json", {"layout": "chwn"}, {"channels": "cmyk"}, {"mean": [1, 2], "std": [1]}])
def test_bad_metadata_is_a_model_error(meta):
    with pytest.raises(ModelError, match="onnxplain.preprocess"):
        Preprocess.from_metadata(meta)


@pytest.mark.parametrize("shape,layout,size,gray", [
    ((1, 3, 224, 224), "nchw", (224, 224), False),
    (("N", 224, 224, 3), "nhwc", (224, 224), False),
    ((None, 1, 28, 28), "nchw", (28, 28), True),
    (("N", 3, "H", "W"), "nchw", None, False),
])
def test_infer_reads_layout_size_and_channels_from_input_shape(shape, layout, size, gray):
    pre = Preprocess.infer(shape)
    assert (pre.layout, pre.size, pre.grayscale) == (layout, size, gray)


def test_infer_rejects_shapes_that_are_not_image_batches():
    with pytest.raises(InputError, match="not an image batch"):
        Preprocess.infer((1, 10))
    with pytest.raises(InputError, match="channel"):
        Preprocess.infer((1, 5, 7, 9))


def test_preset_adapts_to_an_nhwc_model_and_rejects_a_size_mismatch():
    pre = Preprocess.preset("imagenet")
    assert pre.for_input(("N", 224, 224, 3)).layout == "nhwc"
    with pytest.raises(InputError, match="299"):
        pre.for_input((1, 3, 299, 299))


@pytest.mark.parametrize("kwargs", [dict(layout="hwc"), dict(size=(0, 3)), dict(std=(1, 0, 1)),
                                    dict(size=(224, 224), resize=100), dict(bgr=True, grayscale=True)])
def test_impossible_preprocess_is_an_option_error(kwargs):
    with pytest.raises(OptionError):
        Preprocess(**kwargs)


def test_missing_and_unreadable_images_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "absent.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(InputError, match="bad.png"):
        load_image(bad)


def test_npz_round_trip_keeps_names_values_and_dtypes(tmp_path):
    arrays = {"pixels": np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32),
              "ids": np.arange(5, dtype=np.int64)}
    loaded = load_array(save_array(tmp_path / "x.npz", arrays))
    assert set(loaded) == set(arrays)
    for name in arrays:
        np.testing.assert_array_equal(loaded[name], arrays[name])
        assert loaded[name].dtype == arrays[name].dtype
    np.testing.assert_array_equal(load_array(tmp_path / "x.npz", key="ids"), arrays["ids"])


def test_single_array_npz_and_npy_load_as_arrays(tmp_path):
    a = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(load_array(save_array(tmp_path / "a.npz", a)), a)
    np.testing.assert_array_equal(load_array(save_array(tmp_path / "a.npy", a)), a)


def test_nan_in_an_array_input_is_an_input_error_naming_the_file(tmp_path):
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan]))
    with pytest.raises(InputError, match="nan.npy.*NaN"):
        load_array(tmp_path / "nan.npy")
    np.savez(tmp_path / "inf.npz", x=np.array([np.inf]))
    with pytest.raises(InputError, match="inf.npz"):
        load_inputs([tmp_path / "inf.npz"])


def test_pickled_objects_are_refused(tmp_path):
    np.savez(tmp_path / "hostile.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="pickled"):
        load_array(tmp_path / "hostile.npz")
    (tmp_path / "hostile.npy").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError, match="pickled"):
        load_array(tmp_path / "hostile.npy")


def test_non_numeric_arrays_are_refused(tmp_path):
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(InputError, match="numeric"):
        load_array(tmp_path / "s.npy")


def test_empty_and_mixed_input_lists_are_input_errors(tmp_path, tiny):
    with pytest.raises(InputError, match="no input"):
        load_inputs([])
    np.save(tmp_path / "a.npy", np.zeros((1, 3)))
    with pytest.raises(InputError, match="mix"):
        load_inputs([tiny[0], tmp_path / "a.npy"])
    with pytest.raises(InputError, match="unknown input type"):
        load_inputs([tmp_path / "notes.txt"])


def test_image_inputs_give_batch_display_images_and_stems(tmp_path, tiny):
    other = write_png(tmp_path / "other.png", np.zeros((2, 2, 3), dtype=np.uint8))
    inputs = load_inputs([tiny[0], other], model_input_shape=("N", 2, 2, 3))
    assert inputs.batch.shape == (2, 2, 2, 3)
    assert inputs.names == ["tiny", "other"] and len(inputs.images) == 2


def test_array_inputs_gain_a_batch_axis_and_concatenate(tmp_path):
    np.save(tmp_path / "one.npy", np.ones((3, 4, 4), dtype=np.float32))
    np.save(tmp_path / "two.npy", np.zeros((2, 3, 4, 4), dtype=np.float32))
    inputs = load_inputs([tmp_path / "one.npy", tmp_path / "two.npy"], model_input_shape=(None, 3, 4, 4))
    assert inputs.batch.shape == (3, 3, 4, 4) and inputs.images is None
    assert inputs.names == ["one", "two_0", "two_1"]


def test_named_npz_inputs_stay_a_dict(tmp_path):
    np.savez(tmp_path / "m.npz", a=np.ones((2, 3)), b=np.zeros((2, 5)))
    inputs = load_inputs([tmp_path / "m.npz"])
    assert set(inputs.batch) == {"a", "b"} and inputs.batch["b"].shape == (2, 5)
