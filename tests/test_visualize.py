import numpy as np
import pytest
from PIL import Image

from onnxplain.errors import InputError, OptionError
from onnxplain.visualize import (
    DIVERGING,
    SEQUENTIAL,
    colormap,
    grid,
    heatmap,
    overlay,
    reduce_channels,
    save_heatmap,
    save_png,
)


@pytest.mark.parametrize("name", DIVERGING + SEQUENTIAL)
def test_colormaps_are_256x3_uint8_tables(name):
    lut = colormap(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8


@pytest.mark.parametrize("name,first,last", [
    ("bwr", (0, 0, 255), (255, 0, 0)),
    ("coldnhot", (0, 255, 255), (255, 255, 0)),
    ("jet", (0, 0, 128), (128, 0, 0)),
    ("gray", (0, 0, 0), (255, 255, 255)),
])
def test_colormap_endpoints(name, first, last):
    lut = colormap(name)
    assert tuple(lut[0]) == first and tuple(lut[-1]) == last


def test_sequential_inferno_runs_from_dark_to_bright():
    brightness = colormap("inferno").astype(int).sum(axis=1)
    assert brightness[0] < 20 and brightness[-1] > 600
    assert np.all(np.diff(brightness[::32]) > 0)


def test_diverging_centres_are_the_zero_colour():
    assert tuple(colormap("bwr")[128]) == (255, 255, 255)
    assert tuple(colormap("coldnhot")[128]) == (0, 0, 0)


def test_unknown_colormap_is_an_option_error_listing_names():
    with pytest.raises(OptionError, match="inferno"):
        colormap("viridis")


def test_reduce_channels_agrees_across_layouts():
    a = np.random.default_rng(0).normal(size=(3, 5, 6))
    np.testing.assert_allclose(reduce_channels(a, "nchw"), a.sum(0))
    np.testing.assert_allclose(reduce_channels(a.transpose(1, 2, 0), "nhwc"), a.sum(0))
    np.testing.assert_allclose(reduce_channels(a, "nchw", how="abs_max"), np.abs(a).max(0))
    np.testing.assert_allclose(reduce_channels(a, "nchw", how="norm"), np.linalg.norm(a, axis=0))
    np.testing.assert_allclose(reduce_channels(a[None], "nchw"), a.sum(0))
    np.testing.assert_array_equal(reduce_channels(a[0]), a[0])


def test_reduce_channels_guesses_the_channel_axis():
    assert reduce_channels(np.ones((512, 7, 7)), layout=None).shape == (7, 7)
    assert reduce_channels(np.ones((7, 7, 512)), layout=None).shape == (7, 7)
    assert reduce_channels(np.ones((5, 6, 3)), layout=None).shape == (5, 6)


def test_reduce_channels_rejects_non_image_shapes():
    with pytest.raises(InputError, match="shape"):
        reduce_channels(np.ones(10))
    with pytest.raises(OptionError):
        reduce_channels(np.ones((3, 4, 4)), how="mean")


@pytest.mark.parametrize("symmetric", [None, True, False])
def test_heatmap_of_all_zero_map_is_finite_and_flat(symmetric):
    with np.errstate(all="raise"):
        hm = heatmap(np.zeros((4, 5)), symmetric=symmetric)
    assert hm.shape == (4, 5, 3) and hm.dtype == np.uint8
    assert (hm == hm[0, 0]).all()


def test_symmetric_scaling_maps_zero_to_the_colormap_centre():
    a = np.array([[-2.0, 0.0, 1.0], [0.0, 0.5, -0.1]])
    hm = heatmap(a, cmap="coldnhot", clip_percentile=100)
    lut = colormap("coldnhot")
    assert tuple(hm[0, 1]) == tuple(lut[128]) and tuple(hm[1, 0]) == tuple(lut[128])
    assert tuple(hm[0, 0]) == tuple(lut[0])  # -max|a| is the negative end
    assert tuple(hm[0, 2]) == tuple(lut[192])  # +max|a|/2 is halfway up the positive side


def test_non_negative_map_uses_zero_to_max_on_a_sequential_map():
    a = np.array([[0.0, 1.0], [2.0, 4.0]])
    hm = heatmap(a, clip_percentile=100)
    lut = colormap(SEQUENTIAL[0])
    assert tuple(hm[0, 0]) == tuple(lut[0]) and tuple(hm[1, 1]) == tuple(lut[255])


def test_percentile_clipping_keeps_one_outlier_from_washing_out_the_map():
    a = np.ones((20, 20))
    a[0, 0] = 1e6
    hm = heatmap(a, clip_percentile=99)
    assert tuple(hm[5, 5]) == tuple(colormap(SEQUENTIAL[0])[255])


def test_heatmap_refuses_nan():
    with pytest.raises(InputError, match="NaN"):
        heatmap(np.array([[np.nan, 1.0]]))


def test_overlay_has_the_image_shape():
    image = np.full((32, 48, 3), 100, dtype=np.uint8)
    out = overlay(image, np.random.default_rng(1).normal(size=(8, 12)))
    assert out.shape == image.shape and out.dtype == np.uint8


def test_signed_overlay_leaves_the_photo_where_relevance_is_zero():
    image = np.random.default_rng(2).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    a = np.zeros((16, 16))
    a[:4, :4], a[-4:, -4:] = 1.0, -1.0
    out = overlay(image, a, alpha=0.7)
    np.testing.assert_array_equal(out[6:10, 6:10], image[6:10, 6:10])
    assert not np.array_equal(out[:3, :3], image[:3, :3])


def test_saved_png_reopens_with_the_same_pixels(tmp_path):
    pic = heatmap(np.random.default_rng(3).normal(size=(6, 7)))
    path = save_png(tmp_path / "sub" / "h.png", pic)
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), pic)


def test_grid_tiles_pictures_with_titles_above_them():
    pics = [np.zeros((10, 12, 3), dtype=np.uint8), np.full((5, 6, 3), 255, dtype=np.uint8)]
    untitled = grid(pics, ncols=2)
    titled = grid(pics, titles=["gradient", "a very long method name indeed"])
    assert untitled.shape == (4 + 10 + 4, 4 + 2 * (12 + 4), 3)
    assert titled.shape[0] > untitled.shape[0] and titled.shape[1] == untitled.shape[1]
    assert grid(pics * 3, ncols=2).shape[0] == 4 + 3 * (10 + 4)


def test_save_heatmap_overlays_on_an_image_and_writes_a_png(tmp_path):
    attr = np.random.default_rng(4).normal(size=(1, 3, 8, 8))
    image = np.full((16, 16, 3), 50, dtype=np.uint8)
    pic = save_heatmap(tmp_path / "o.png", attr, image=image)
    assert pic.shape == (16, 16, 3)
    with Image.open(tmp_path / "o.png") as img:
        assert img.size == (16, 16)
    assert save_heatmap(tmp_path / "h.png", attr[0].transpose(1, 2, 0), layout="nhwc").shape == (8, 8, 3)


# ----------------------------------------------------------------------------- readable pictures

from onnxplain.visualize import SIGNS, VIEWS, colorbar, picture, scale_range, with_sign  # noqa: E402


@pytest.mark.parametrize("name,first,last", [
    ("seismic", (0, 0, 76), (128, 0, 0)), ("hot", (0, 0, 0), (255, 255, 255)), ("cold", (0, 0, 0), (255, 255, 255)),
    ("wred", (255, 255, 255), (255, 0, 0)), ("wblue", (255, 255, 255), (0, 0, 255))])
def test_zennit_and_matplotlib_colormaps_have_their_endpoints(name, first, last):
    lut = colormap(name)
    assert tuple(lut[0]) == first and tuple(lut[-1]) == last


def test_a_map_with_a_large_offset_is_drawn_over_its_range_not_one_colour():
    """Before: RISE's scores 8.9..11.2 on [0, max] were a uniformly yellow picture."""
    a = 8.9 + 2.3 * np.linspace(0, 1, 64).reshape(8, 8)
    hm = heatmap(a, clip_percentile=100)
    lut = colormap(SEQUENTIAL[0])
    assert tuple(hm[0, 0]) == tuple(lut[0]) and tuple(hm[-1, -1]) == tuple(lut[255])
    assert scale_range(a, clip_percentile=100)[:2] == pytest.approx((8.9, 11.2))


def test_a_cam_overlay_lets_the_photo_show_through_where_the_map_is_low():
    """Before: a non-negative map was blended at a constant alpha 0.8: an opaque sheet."""
    image = np.random.default_rng(2).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    cam = np.zeros((16, 16))
    cam[:4, :4] = 1.0
    out = overlay(image, cam, alpha=0.8)
    np.testing.assert_array_equal(out[8:, 8:], image[8:, 8:])
    assert not np.array_equal(out[:3, :3], image[:3, :3])


@pytest.mark.parametrize("sign", SIGNS)
def test_sign_keeps_the_part_of_the_map_captum_names(sign):
    a = np.array([[-2.0, 1.0], [0.0, 3.0]])
    m, symmetric = with_sign(a, sign)
    expected = {"all": a, "positive": [[0, 1], [0, 3]], "negative": [[2, 0], [0, 0]], "absolute": np.abs(a)}[sign]
    np.testing.assert_array_equal(m, expected)
    assert symmetric is (None if sign == "all" else False)


def test_colour_bar_runs_from_the_top_value_down_and_is_labelled():
    bar = colorbar(240, "bwr", True, -2.0, 2.0, "relevance")
    lut = colormap("bwr")
    assert bar.shape[0] == 240 and bar.shape[1] > 30
    column = bar[:, 6 + 8]
    assert np.abs(column[1].astype(int) - lut[255]).max() <= 6  # inside the outline: the top is +2
    assert np.abs(column[-2].astype(int) - lut[0]).max() <= 6
    assert np.abs(column[120].astype(int) - lut[128]).max() <= 6  # the middle is 0
    labels = bar[:, 6 + 16 + 5:]
    assert (labels < 100).any()  # dark text: the tick values and the caption


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_has_a_title_and_a_colour_bar_and_is_at_least_224_pixels(view):
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    attr = np.random.default_rng(4).normal(size=(3, 32, 32))
    bare = picture(attr, image=image, view=view, bar=False)
    pic = picture(attr, image=image, view=view, title="tiny_cnn: class 3, gradient")
    assert pic.shape[0] >= 224 and pic.shape[0] > bare.shape[0]
    k = 7  # 32 px enlarged to 224
    assert pic.shape[1] >= bare.shape[1] * k + 30  # the bar beside it
    assert (pic[:14] < 100).any()  # the title's dark text on the white band above
    if view == "side-by-side":
        assert bare.shape[1] == 3 * 32 + 8
