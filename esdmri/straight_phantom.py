"""Straight, undispersed crossing bundles: a phantom family unlike the project's others.

The project's other phantoms (``esdmri.sims.make_phantom``,
``esdmri.heldout_phantom``) have curved or Watson-dispersed bundles. This family
is a dev/test family of ``benchmarks/devset.py`` and a family of the simulated
pretraining cohort (:mod:`esdmri.cohort`), so it lives in the library. Here
every fibre is one axially symmetric tensor (``dipy.sims.voxel.multi_tensor``),
bundles are straight slabs of one direction, and crossings are exact: a bundle
A crosses bundle B at ``angles[0]`` in one half of the volume and bundle C at
``angles[1]`` in the other. A random rotation (``geometry_seed``) turns the whole layout, so dev and
test phantoms share no orientation with the grid or with each other. Voxels
outside the bundles are grey matter, the corners of the cube cerebrospinal
fluid (for the multi-tissue methods' responses). Issue 26 found the default fit
losing the second fibre on a held-back phantom of this kind.
"""

from dataclasses import dataclass

import numpy as np
from dipy.core.gradients import GradientTable
from dipy.sims.voxel import multi_tensor
from scipy.spatial.transform import Rotation

from .sims import MAX_FIBRES, add_rician_noise

# Share of the cube's smallest side that is a bundle's half width, and the
# radius (same unit) beyond which the corners are CSF.
HALF_WIDTH = 0.2
CSF_RADIUS = 0.62
GM_DIFFUSIVITY = 0.8e-3
CSF_DIFFUSIVITY = 3.0e-3


def radial_for_fa(axial, fa):
    """Radial diffusivity of an axially symmetric tensor of given axial diffusivity and FA.

    ``FA = |a - r| / sqrt(a^2 + 2 r^2)``, solved for ``r < a``.
    """
    if not 0 < fa < 1:
        raise ValueError(f"fa must be in (0, 1), got {fa}")
    # (a - r)^2 = FA^2 (a^2 + 2 r^2): a quadratic in r.
    f2 = fa * fa
    roots = np.roots([1 - 2 * f2, -2 * axial, axial * axial * (1 - f2)])
    roots = roots[np.isreal(roots)].real
    return float(roots[(roots > 0) & (roots < axial)].min())


@dataclass
class StraightPhantom:
    """A straight-bundle phantom and its ground truth (the fields the benchmarks score).

    Attributes
    ----------
    data : ndarray, shape (X, Y, Z, N), float32
    gtab : GradientTable
    mask : ndarray of bool, shape (X, Y, Z)
    fibre_dirs : ndarray, shape (X, Y, Z, 3, 3)
        Fibre directions (rows), NaN where absent.
    n_fibres : ndarray of int, shape (X, Y, Z)
    tissue_fractions : ndarray, shape (X, Y, Z, 3)
        (wm, gm, csf) volume fractions.
    crossing_angle : ndarray, shape (X, Y, Z)
        Degrees, NaN with fewer than two fibres.
    snr : float or None
    response : None
        Methods must estimate the responses from the data.
    """

    data: np.ndarray
    gtab: GradientTable
    mask: np.ndarray
    fibre_dirs: np.ndarray
    n_fibres: np.ndarray
    tissue_fractions: np.ndarray
    crossing_angle: np.ndarray
    snr: float | None
    response: None = None


def make_straight_phantom(gtab, shape=(16, 16, 16), snr=20, *, angles=(45.0, 90.0), fa=0.7,
                          axial=1.7e-3, geometry_seed=0, seed=0, s0=100.0):
    """Build a straight-bundle crossing phantom.

    Parameters
    ----------
    gtab : GradientTable
    shape : tuple of 3 int
    snr : float or None
        ``s0 / sigma`` of the Rician noise.
    angles : tuple of 2 float
        Crossing angles (degrees) of bundle A with B (one half of the volume)
        and with C (the other half).
    fa : float
        Fractional anisotropy of a single fibre.
    axial : float
        Axial diffusivity of a fibre (mm^2/s).
    geometry_seed : int
        Seeds the rotation of the layout.
    seed : int
        Seeds the noise.
    s0 : float

    Returns
    -------
    phantom : StraightPhantom
    """
    shape = tuple(int(s) for s in shape)
    rotation = Rotation.random(random_state=geometry_seed).as_matrix()
    e1, e2, e3 = rotation.T
    points = np.indices(shape).reshape(3, -1).T - (np.array(shape) - 1) / 2
    side = min(shape)
    half_width = HALF_WIDTH * side
    radians = np.deg2rad(angles)
    lower = points @ e3 < 0
    # Bundle A runs along e1 everywhere; B (lower half) and C (upper half)
    # lie in the e1-e2 plane at the two angles to it.
    directions = [e1, np.cos(radians[0]) * e1 + np.sin(radians[0]) * e2,
                  np.cos(radians[1]) * e1 + np.sin(radians[1]) * e2]
    normals = [np.cross(e3, d) for d in directions]
    inside = [np.abs(points @ n) < half_width for n in normals]
    inside[1] &= lower
    inside[2] &= ~lower
    csf = np.linalg.norm(points, axis=1) > CSF_RADIUS * side
    members = np.stack(inside, axis=1) & ~csf[:, None]
    n_fibres = members.sum(axis=1)

    radial = radial_for_fa(axial, fa)
    evals = np.array([axial, radial, radial])
    data = np.zeros((len(points), len(gtab.bvals)))
    fibre_dirs = np.full((len(points), MAX_FIBRES, 3), np.nan)
    # Every voxel of one configuration (which bundles it holds) has one signal.
    for pattern in np.unique(members, axis=0):
        voxels = np.flatnonzero((members == pattern).all(axis=1))
        chosen = [d for d, use in zip(directions, pattern) if use]
        if chosen:
            signal, _ = multi_tensor(gtab, np.tile(evals, (len(chosen), 1)), S0=s0,
                                     angles=[_angles_of(d) for d in chosen],
                                     fractions=[100.0 / len(chosen)] * len(chosen), snr=None)
            fibre_dirs[voxels, :len(chosen)] = chosen
            data[voxels] = signal
    gm = ~csf & (n_fibres == 0)
    data[gm] = s0 * np.exp(-gtab.bvals * GM_DIFFUSIVITY)
    data[csf] = s0 * np.exp(-gtab.bvals * CSF_DIFFUSIVITY)
    tissue_fractions = np.stack([n_fibres > 0, gm, csf], axis=1).astype(float)
    crossing = np.full(len(points), np.nan)
    crossing[members[:, 0] & members[:, 1]] = angles[0]
    crossing[members[:, 0] & members[:, 2]] = angles[1]
    noisy = add_rician_noise(data, snr, s0, np.random.default_rng(seed))
    return StraightPhantom(
        data=noisy.reshape(*shape, -1), gtab=gtab, mask=np.ones(shape, dtype=bool),
        fibre_dirs=fibre_dirs.reshape(*shape, MAX_FIBRES, 3),
        n_fibres=n_fibres.reshape(shape),
        tissue_fractions=tissue_fractions.reshape(*shape, 3),
        crossing_angle=crossing.reshape(shape), snr=snr)


def _angles_of(direction):
    """(theta, phi) in degrees of a unit vector, as ``multi_tensor`` takes them."""
    x, y, z = direction
    return np.rad2deg(np.arccos(np.clip(z, -1, 1))), np.rad2deg(np.arctan2(y, x))
