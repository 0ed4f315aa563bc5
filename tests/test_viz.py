import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from dipy.core.sphere import Sphere, sphere2cart  # noqa: E402
from dipy.data import default_sphere, get_sphere  # noqa: E402
from dipy.reconst.shm import sf_to_sh  # noqa: E402
from dipy.sims.voxel import multi_tensor_odf  # noqa: E402

from esdmri.shm import descoteaux_to_legacy  # noqa: E402
from esdmri.viz import (  # noqa: E402
    binned_mean_std,
    odf_glyph_outlines,
    plot_angular_error_vs_crossing,
    plot_fraction_maps,
    plot_odf_slice,
    plot_peaks_slice,
    plot_streamlines_slice,
    plot_training_curves,
    save_figure,
    slice_orientation,
)

FIT_SPHERE = get_sphere(name="repulsion724")
EVALS = np.array([[1.7e-3, 0.2e-3, 0.2e-3]] * 3)
X_AXIS, Y_AXIS = (90, 0), (90, 90)
HALF = 0.45  # default scale 0.9: a unit lobe reaches 0.45 voxel from the centre


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def fodf_sh(angles, fractions, sh_order_max=8, legacy=True):
    """SH of a multi-tensor ODF, fibres at (theta, phi), in DIPY's default
    (legacy descoteaux07) basis, the default of the plotting functions."""
    odf = multi_tensor_odf(FIT_SPHERE.vertices, EVALS[:len(angles)], angles, fractions)
    return sf_to_sh(odf, FIT_SPHERE, sh_order_max=sh_order_max,
                    basis_type="descoteaux07", legacy=legacy)


def function_sh(function, sh_order_max=8):
    """SH (DIPY's default basis) of a polynomial function of the direction
    (exact for its degree)."""
    return sf_to_sh(function(FIT_SPHERE.vertices), FIT_SPHERE,
                    sh_order_max=sh_order_max, basis_type="descoteaux07", legacy=True)


def volume(coeffs, shape=(1, 1, 1)):
    return np.broadcast_to(coeffs, shape + coeffs.shape[-1:]).copy()


def extents(outline, centre):
    offset = outline - centre
    return np.ptp(offset[:, 0]), np.ptp(offset[:, 1])


def render(figure):
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)


def coloured_pixels(image):
    """Saturated pixels: glyphs and peaks, not the black/grey/white frame."""
    return (image.max(axis=-1) - image.min(axis=-1)) > 80


def pixel_extent(image):
    rows, cols = np.nonzero(coloured_pixels(image))
    return np.ptp(cols) + 1, np.ptp(rows) + 1


def glyph_image(coeffs, shape=(1, 1, 1), **kwargs):
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    plot_odf_slice(volume(coeffs, shape), ax=ax, **kwargs)
    return render(fig), ax


# ---------------------------------------------------------------- glyph geometry

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_outline_of_quadratic_fodf_is_analytic(axis):
    # f(u) = (u . e)^2 with e the first in-plane axis: over an in-plane angle
    # phi the projected radius f(u) cos(elevation) = cos^3(el) cos^2(phi) is
    # largest in the plane, so the outline is R(phi) = cos^2(phi) exactly.
    first = [a for a in range(3) if a != axis][0]
    coeffs = function_sh(lambda u: u[:, first] ** 2)
    centres, outlines, colours = odf_glyph_outlines(volume(coeffs), axis=axis)
    n_angles = outlines.shape[1]
    phi = 2 * np.pi * np.arange(n_angles) / n_angles
    expected = HALF * np.cos(phi)[:, None] ** 2 * np.stack([np.cos(phi), np.sin(phi)], -1)
    np.testing.assert_array_equal(centres, [[0, 0]])
    np.testing.assert_allclose(outlines[0], expected, atol=1e-9)
    # The lobe tips are coloured by the first in-plane axis.
    tip = np.zeros(3)
    tip[first] = 1
    np.testing.assert_allclose(colours[0, 0], tip, atol=1e-9)


def test_outline_of_tilted_lobe_matches_brute_force_silhouette():
    # A sharp lobe f(u) = (u . v)^4 leaving the axial plane at 40 degrees: the
    # silhouette radius at each in-plane angle, maximised over a fine
    # elevation grid, is the reference.
    v = np.array(sphere2cart(1, np.radians(50), np.radians(30)))
    coeffs = function_sh(lambda u: (u @ v) ** 4)
    _, outlines, _ = odf_glyph_outlines(volume(coeffs), axis=2)
    n_angles = outlines.shape[1]
    phi = 2 * np.pi * np.arange(n_angles) / n_angles
    elevation = np.linspace(-np.pi / 2, np.pi / 2, 20001)
    u = np.stack(np.broadcast_arrays(
        np.cos(elevation) * np.cos(phi[:, None]), np.cos(elevation) * np.sin(phi[:, None]),
        np.sin(elevation)), axis=-1)
    reference = ((u @ v) ** 4 * np.cos(elevation)).max(axis=1)
    radius = np.linalg.norm(outlines[0], axis=-1) / HALF
    np.testing.assert_allclose(radius, reference, atol=0.01)
    # Outline points lie at their nominal angles.
    angle = np.arctan2(outlines[0, :, 1], outlines[0, :, 0]) % (2 * np.pi)
    present = radius > 1e-3
    np.testing.assert_allclose(np.cos(angle - phi)[present], 1, atol=1e-9)
    # The silhouette reaches beyond the projected tip (the lobe has width)
    # but stays shorter than an in-plane lobe.
    assert np.cos(np.radians(40)) < radius.max() < 0.9


def test_single_fibre_glyph_is_long_along_the_fibre():
    along_x = odf_glyph_outlines(volume(fodf_sh([X_AXIS], [100])))[1][0]
    along_y = odf_glyph_outlines(volume(fodf_sh([Y_AXIS], [100])))[1][0]
    width, height = extents(along_x, 0)
    assert width == pytest.approx(2 * HALF, rel=1e-3)
    assert width > 3 * height
    width, height = extents(along_y, 0)
    assert height > 3 * width


def test_crossing_glyph_shows_both_fibres():
    _, outlines, colours = odf_glyph_outlines(volume(fodf_sh([X_AXIS, Y_AXIS], [50, 50])))
    width, height = extents(outlines[0], 0)
    assert width == pytest.approx(height, rel=0.05)
    # The outline dips between the lobes (a cross, not a disc).
    n_angles = outlines.shape[1]
    radius = np.linalg.norm(outlines[0], axis=-1)
    assert radius[n_angles // 8] < 0.6 * radius[0]
    # Each lobe carries its own colour: red along x, green along y.
    assert colours[0, 0].argmax() == 0 and colours[0, n_angles // 4].argmax() == 1


def test_user_sphere_gives_the_same_glyph():
    coeffs = volume(fodf_sh([X_AXIS, (90, 60)], [60, 40]))
    _, reference, _ = odf_glyph_outlines(coeffs)
    _, outlines, _ = odf_glyph_outlines(coeffs, sphere=default_sphere.subdivide(n=1))
    np.testing.assert_allclose(extents(outlines[0], 0), extents(reference[0], 0), rtol=0.03)


def test_norm_scale_mask_and_empty_voxels():
    coeffs = np.zeros((4, 1, 1, 45))
    coeffs[0, 0, 0] = coeffs[1, 0, 0] = fodf_sh([X_AXIS], [100])
    coeffs[1, 0, 0] *= 0.5
    coeffs[2, 0, 0] = np.nan  # 3: all zero
    centres, outlines, _ = odf_glyph_outlines(coeffs)
    np.testing.assert_array_equal(centres, [[0, 0], [1, 0]])
    widths = [extents(o, c)[0] for o, c in zip(outlines, centres)]
    np.testing.assert_allclose(widths, [0.9, 0.9], rtol=1e-3)
    _, outlines, _ = odf_glyph_outlines(coeffs, norm="global", scale=0.5)
    widths = [extents(o, c)[0] for o, c in zip(outlines, centres)]
    np.testing.assert_allclose(widths, [0.5, 0.25], rtol=1e-3)
    mask = np.zeros((4, 1, 1), bool)
    mask[1] = True
    centres, _, _ = odf_glyph_outlines(coeffs, mask=mask)
    np.testing.assert_array_equal(centres, [[1, 0]])


def test_glyph_input_errors():
    coeffs = volume(fodf_sh([X_AXIS], [100]), (2, 2, 2))
    with pytest.raises(ValueError, match="shm_coeff"):
        odf_glyph_outlines(coeffs[..., :44])
    with pytest.raises(ValueError, match="shm_coeff"):
        odf_glyph_outlines(coeffs[0])
    with pytest.raises(ValueError, match="axis"):
        odf_glyph_outlines(coeffs, axis=3)
    with pytest.raises(ValueError, match="index"):
        odf_glyph_outlines(coeffs, index=2)
    with pytest.raises(ValueError, match="norm"):
        odf_glyph_outlines(coeffs, norm="sum")
    with pytest.raises(ValueError, match="basis_type"):
        odf_glyph_outlines(coeffs, basis_type="mrtrix")
    with pytest.raises(ValueError, match="mask"):
        odf_glyph_outlines(coeffs, mask=np.ones((2, 2)))
    with pytest.raises(TypeError, match="sphere"):
        odf_glyph_outlines(coeffs, sphere=np.eye(3))
    with pytest.raises(ValueError, match="sphere"):
        odf_glyph_outlines(coeffs, sphere=Sphere(xyz=np.eye(3)))
    with pytest.raises(ValueError, match="background"):
        plot_odf_slice(coeffs, background=np.ones((2, 2, 3)))


# ---------------------------------------------------------------- glyph images

def test_glyph_images_follow_the_fibre():
    image_x, _ = glyph_image(fodf_sh([X_AXIS], [100]))
    image_y, _ = glyph_image(fodf_sh([Y_AXIS], [100]))
    image_cross, _ = glyph_image(fodf_sh([X_AXIS, Y_AXIS], [50, 50]))
    width, height = pixel_extent(image_x)
    assert width > 3 * height
    width, height = pixel_extent(image_y)
    assert height > 3 * width
    width, height = pixel_extent(image_cross)
    assert 0.9 < width / height < 1.1
    assert np.abs(image_x - image_y).sum() > 0
    # Red for x, green for y (MRtrix3/DIPY colouring).
    red = image_x[coloured_pixels(image_x)].mean(axis=0)
    green = image_y[coloured_pixels(image_y)].mean(axis=0)
    assert red.argmax() == 0 and green.argmax() == 1


def test_glyph_fills_its_voxel_cell():
    image, ax = glyph_image(fodf_sh([X_AXIS], [100]))
    cell = ax.transData.transform([[0.5, 0], [-0.5, 0]])
    width, _ = pixel_extent(image)
    assert width / abs(cell[0, 0] - cell[1, 0]) == pytest.approx(0.9, abs=0.05)


def test_slice_orientation_and_background():
    # Voxel (i, j) sits at data (i, j): first axis to the right, second up.
    shape = (3, 2, 1)
    mask = np.zeros(shape, bool)
    mask[2, 0, 0] = True
    background = np.zeros(shape)
    background[0, 1, 0] = 1.0
    image, ax = glyph_image(fodf_sh([X_AXIS, Y_AXIS], [50, 50]), shape=shape,
                            mask=mask, background=background)
    rows, cols = np.nonzero(coloured_pixels(image))
    x, y = ax.transData.transform([2, 0])
    assert np.mean(cols) == pytest.approx(x, abs=2)
    assert np.mean(rows) == pytest.approx(image.shape[0] - y, abs=2)
    bright = ax.transData.transform([0, 1])
    dark = ax.transData.transform([1, 1])
    pixel = [image[int(image.shape[0] - p[1]), int(p[0])] for p in (bright, dark)]
    assert pixel[0].mean() > 200 and pixel[1].mean() < 50


# ---------------------------------------------------------------- peaks

def peak_volume():
    directions = np.full((2, 1, 1, 3, 3), np.nan)
    values = np.zeros((2, 1, 1, 3))
    tilted = np.array(sphere2cart(1, np.radians(30), 0.0))  # 60 degrees out of plane
    directions[0, 0, 0, :2] = [[1, 0, 0], [0, 1, 0]]
    values[0, 0, 0, :2] = [1.0, 0.5]
    directions[1, 0, 0, 0] = tilted
    values[1, 0, 0, 0] = 2.0
    return directions, values


def test_peak_segments_are_projected_and_scaled():
    directions, values = peak_volume()
    ax = plot_peaks_slice(directions, values, scale=0.9)
    segments = np.array(ax.collections[-1].get_segments())
    expected = np.array([
        [[-0.45, 0], [0.45, 0]],
        [[0, -0.225], [0, 0.225]],
        [[1 - 0.45 * np.sin(np.radians(30)), 0], [1 + 0.45 * np.sin(np.radians(30)), 0]],
    ])
    np.testing.assert_allclose(segments, expected, atol=1e-12)
    # Default overlay: one colour (black), unlike the direction-coloured glyphs.
    np.testing.assert_allclose(ax.collections[-1].get_colors()[:, :3], [[0, 0, 0]])
    ax = plot_peaks_slice(directions, values, color="direction", scale=0.9)
    colours = ax.collections[-1].get_colors()[:, :3]
    np.testing.assert_allclose(colours[0], [1, 0, 0])
    # Without values every peak spans the full scale: by default the whole
    # voxel, longer than the glyphs (90% of it), so an overlay shows.
    ax = plot_peaks_slice(directions)
    half = np.abs(np.diff(np.array(ax.collections[-1].get_segments()), axis=1)).max(-1) / 2
    np.testing.assert_allclose(half.ravel(), [0.5, 0.5, 0.5 * np.sin(np.radians(30))])


def test_peak_images_differ_by_direction():
    along_x = np.full((1, 1, 1, 2, 3), np.nan)
    along_x[0, 0, 0, 0] = [1, 0, 0]
    along_y = along_x[..., [1, 0, 2]]
    images = []
    for directions in (along_x, along_y):
        fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
        plot_peaks_slice(directions, ax=ax, linewidth=3, color="direction")
        images.append(render(fig))
    width, height = pixel_extent(images[0])
    assert width > 5 * height
    width, height = pixel_extent(images[1])
    assert height > 5 * width


def test_peak_overlay_is_visible_on_glyphs_without_hiding_them():
    # Over the glyph of its own fibre the default peak is longer (the whole
    # voxel against 90% of it), black with a thin white edge, and thinner
    # than the lobe it runs through, so the lobe's colour shows on both sides.
    centres, outlines, _ = odf_glyph_outlines(volume(fodf_sh([X_AXIS], [100])))
    glyph_half = np.abs(outlines[0, :, 0] - centres[0, 0]).max()
    lobe_half_width = np.abs(outlines[0, :, 1] - centres[0, 1]).max()
    peaks = np.full((1, 1, 1, 1, 3), np.nan)
    peaks[0, 0, 0, 0] = [1, 0, 0]
    fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
    plot_peaks_slice(peaks, ax=ax)
    lines = ax.collections[-1]
    segment = np.array(lines.get_segments())[0]
    assert np.ptp(segment[:, 0]) / 2 > glyph_half + 0.04
    assert lines.get_colors()[0, :3].tolist() == [0, 0, 0]
    (edge,) = lines.get_path_effects()
    # Line and edge together, in data units, against the lobe's width.
    points_per_voxel = ax.transData.transform([1, 0])[0] - ax.transData.transform([0, 0])[0]
    points_per_voxel *= 72 / fig.dpi
    assert (lines.get_linewidths()[0] + 1.0) / points_per_voxel < lobe_half_width


def test_default_basis_is_that_of_fit_shm_coeff():
    # fit.shm_coeff is in DIPY's legacy basis: plotted by default it gives the
    # glyph of the non-legacy coefficients plotted with legacy=False.
    non_legacy = volume(fodf_sh([(60, 40), (90, 100)], [60, 40], legacy=False))
    legacy = descoteaux_to_legacy(non_legacy, 8)
    assert not np.allclose(legacy, non_legacy)
    _, default, _ = odf_glyph_outlines(legacy)
    _, explicit, _ = odf_glyph_outlines(non_legacy, legacy=False)
    np.testing.assert_allclose(default, explicit, atol=1e-9)
    _, wrong, _ = odf_glyph_outlines(non_legacy)
    assert np.abs(wrong - explicit).max() > 0.05


def test_peak_input_errors():
    directions, values = peak_volume()
    with pytest.raises(ValueError, match="directions"):
        plot_peaks_slice(directions[..., :2])
    with pytest.raises(ValueError, match="values"):
        plot_peaks_slice(directions, values[..., :2])
    with pytest.raises(ValueError, match="index"):
        plot_peaks_slice(directions, axis=0, index=5)


# ---------------------------------------------------------------- fraction maps

def test_fraction_maps_show_each_tissue():
    rng = np.random.default_rng(0)
    stack = rng.dirichlet([1, 1, 1], size=(4, 5, 3))
    names = ("wm", "gm", "csf")
    fig = plot_fraction_maps(stack, names=names, axis=2, index=1)
    assert len(fig.axes) == 6  # three panels, three colour bars
    for panel, t in zip(fig.axes[:3], range(3)):
        np.testing.assert_array_equal(panel.images[0].get_array(), stack[:, :, 1, t].T)
        assert panel.images[0].get_clim() == (0.0, 1.0)
        assert names[t] in panel.get_title()
    same = plot_fraction_maps(dict(zip(names, np.moveaxis(stack, -1, 0))), index=1)
    swapped = plot_fraction_maps(dict(zip(names, np.moveaxis(stack[..., ::-1], -1, 0))),
                                 index=1)
    assert np.array_equal(render(fig), render(same))
    assert np.abs(render(fig) - render(swapped)).sum() > 0


def test_fraction_map_errors():
    stack = np.zeros((4, 5, 3, 2))
    with pytest.raises(ValueError, match="names"):
        plot_fraction_maps(stack, names=("wm",))
    with pytest.raises(ValueError, match="gm"):
        plot_fraction_maps({"wm": stack[..., 0], "gm": stack[:3, ..., 0]})
    with pytest.raises(ValueError, match="ax"):
        plot_fraction_maps(stack, ax=[plt.subplots()[1]])


# ---------------------------------------------------------------- training curves

def history(epochs=12, decay=0.2):
    return [{"epoch": e, "total": 1.2 * np.exp(-decay * e), "intensity": np.exp(-decay * e),
             "sparsity": 0.2 * np.exp(-decay * e), "nonnegativity": 0.0 if e > 3 else 0.01,
             "total_variation": 1e-3, "lr": 1e-3 * 0.5 ** (e // 5)} for e in range(epochs)]


def test_training_curves_plot_every_term():
    records = history()
    ax = plot_training_curves(records)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"total", "intensity", "sparsity", "nonnegativity",
                          "total_variation"}
    np.testing.assert_allclose(lines["sparsity"].get_ydata(),
                               [r["sparsity"] for r in records])
    # A switched-off term leaves the log plot instead of plotting log(0).
    assert np.isnan(lines["nonnegativity"].get_ydata()[4:]).all()
    assert ax.get_yscale() == "log"
    twin = [a for a in ax.figure.axes if a is not ax][0]
    np.testing.assert_allclose(twin.get_lines()[0].get_ydata(), [r["lr"] for r in records])
    other = plot_training_curves(history(decay=0.5))
    assert np.abs(render(ax.figure) - render(other.figure)).sum() > 0


def test_training_curve_errors():
    with pytest.raises(ValueError, match="history"):
        plot_training_curves([])
    with pytest.raises(ValueError, match="lack"):
        plot_training_curves(history(), terms=["total", "dice"])


# ---------------------------------------------------------------- angular error

def test_binned_mean_std_matches_brute_force():
    rng = np.random.default_rng(1)
    angles = rng.uniform(0, 90, 500)
    angles[:5] = [0, 90, np.nan, 10, 89.999]
    errors = rng.gamma(2, 3, 500)
    bins = np.array([0, 10, 30, 60, 90])
    mean, std, count = binned_mean_std(angles, errors, bins)
    for k in range(4):
        last = k == 3
        inside = (angles >= bins[k]) & ((angles <= bins[k + 1]) if last
                                        else (angles < bins[k + 1]))
        assert count[k] == inside.sum()
        assert mean[k] == pytest.approx(errors[inside].mean())
        assert std[k] == pytest.approx(errors[inside].std())
    mean, _, count = binned_mean_std([5, 6], [1, 2], bins)
    assert count.tolist() == [2, 0, 0, 0] and np.isnan(mean[1:]).all()


def test_angular_error_plot_per_method():
    rng = np.random.default_rng(2)
    angles = rng.uniform(0, 90, 300)
    good = (angles, 20 * np.exp(-angles / 30))
    bad = (angles, 40 * np.exp(-angles / 30))
    ax = plot_angular_error_vs_crossing({"csd": bad, "rtesd": good}, bins=[0, 30, 60, 90])
    means = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers}
    np.testing.assert_allclose(means["csd"], binned_mean_std(*bad, [0, 30, 60, 90])[0])
    np.testing.assert_allclose(means["rtesd"], binned_mean_std(*good, [0, 30, 60, 90])[0])
    other = plot_angular_error_vs_crossing({"csd": good, "rtesd": bad}, bins=[0, 30, 60, 90])
    assert np.abs(render(ax.figure) - render(other.figure)).sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        plot_angular_error_vs_crossing({"csd": (angles, angles[:10])})
    with pytest.raises(ValueError, match="bins"):
        plot_angular_error_vs_crossing({"csd": good}, bins=[0, 50, 40])


# ---------------------------------------------------------------- orientation, streamlines

def rotation_z(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def test_orientation_labels_follow_the_affine():
    coeffs = volume(fodf_sh([X_AXIS], [100]), shape=(2, 2, 2))
    flipped = np.diag([-2.0, 2.0, 2.0, 1.0])  # x runs towards the subject's left
    ax = plot_odf_slice(coeffs, affine=flipped, background=np.ones((2, 2, 2)),
                        background_label="GFA of gfa.nii.gz")
    edges = {text.get_text(): text.get_position() for text in ax.texts
             if text.get_gid() == "orientation"}
    assert edges["L"][0] > 0.9 and edges["R"][0] < 0.1  # right edge: increasing x
    assert edges["A"][1] > 0.9 and edges["P"][1] < 0.1
    assert ax.get_title() == "axial slice z = 1"
    assert ax.get_xlabel() == "x (voxel, towards L)"
    # The background's colour bar says what it shows.
    (bar,) = [other for other in ax.figure.axes if other is not ax]
    assert bar.get_ylabel() == "GFA of gfa.nii.gz"
    # A sagittal slice of a voxel grid rotated by 20 degrees about z (oblique):
    # y points mostly to A, and the labels say by how much it is tilted.
    oblique = np.eye(4)
    oblique[:3, :3] = rotation_z(20) * 2
    plane, codes, tilt = slice_orientation(oblique, axis=0)
    assert (plane, codes) == ("sagittal", ("A", "S"))
    np.testing.assert_allclose(tilt, (20, 0), atol=1e-9)
    ax = plot_fraction_maps({"wm": np.ones((2, 2, 2))}, axis=0, affine=oblique).axes[0]
    assert ax.get_title() == "wm (sagittal slice x = 1)"
    assert ax.get_xlabel() == "y (voxel, towards A, 20 deg oblique)"
    with pytest.raises(ValueError, match="affine"):
        plot_odf_slice(coeffs, affine=np.zeros((4, 4)))


def test_streamlines_are_drawn_in_voxel_coordinates_by_direction():
    # 2 mm voxels shifted by (10, 20, 30) mm: world point p is voxel (p - t) / 2.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    along_y = np.array([[12.0, 20, 34], [12, 24, 34], [12, 28, 34]])  # voxels x=1, z=2
    along_x_far = np.array([[10.0, 22, 38], [16, 22, 38]])  # slice z = 4
    ax = plot_streamlines_slice([along_y, along_x_far], affine, (4, 5, 6), axis=2, index=2,
                                background=np.zeros((4, 5, 6)))
    lines = ax.collections[-1]
    np.testing.assert_allclose(np.array(lines.get_segments()),
                               [[[1, 0], [1, 2]], [[1, 2], [1, 4]], [[0, 1], [3, 1]]])
    np.testing.assert_allclose(lines.get_colors()[:, :3], [[0, 1, 0], [0, 1, 0], [1, 0, 0]])
    assert ax.get_title() == "axial slice z = 2"
    # A slab of 1 voxel keeps the steps within half a voxel of the slice.
    ax = plot_streamlines_slice([along_y, along_x_far], affine, (4, 5, 6), axis=2, index=2,
                                slab=1.0)
    assert len(ax.collections[-1].get_segments()) == 2
    with pytest.raises(ValueError, match="affine"):
        plot_streamlines_slice([along_y], None, (4, 5, 6))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        plot_streamlines_slice([along_y[:, :2]], affine, (4, 5, 6))


def test_accuracy_plot_counts_voxels_and_states_the_threshold():
    angles = np.array([5.0, 15, 15, 25, 25, 25])
    errors = np.arange(6.0)
    ax = plot_angular_error_vs_crossing({"a": (angles, errors), "b": (angles, errors)},
                                        bins=[0, 10, 20, 30], threshold=0.5)
    (top,) = ax.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["1", "2", "3"]
    assert "relative peak threshold 0.5" in ax.get_title()
    fewer = (angles[:4], errors[:4])
    ax = plot_angular_error_vs_crossing({"a": (angles, errors), "b": fewer},
                                        bins=[0, 10, 20, 30])
    (top,) = ax.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["1/1", "2/2", "3/1"]


def test_training_curves_tick_whole_epochs():
    ax = plot_training_curves(history()[:3])
    ax.figure.canvas.draw()
    ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks)


# ---------------------------------------------------------------- saving

def test_save_figure_never_overwrites_unless_forced(tmp_path):
    ax = plot_training_curves(history())
    path = tmp_path / "curves.png"
    assert save_figure(ax.figure, path) == path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100
    written = path.read_bytes()
    other = plot_training_curves(history(decay=0.5))
    with pytest.raises(FileExistsError, match="force"):
        save_figure(other.figure, path)
    assert path.read_bytes() == written
    save_figure(other, path, force=True)  # an Axes saves its figure
    assert path.read_bytes() != written
    missing = tmp_path / "no_such_folder"
    with pytest.raises(ValueError, match="no_such_folder"):
        save_figure(ax.figure, missing / "curves.png")
    with pytest.raises(TypeError, match="fig"):
        save_figure("figure", tmp_path / "x.png")
