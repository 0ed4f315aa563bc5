"""HEALPix spheres and their graphs for spherical convolutions.

The working grid of every deconvolution network is a HEALPix sphere in NESTED
ordering: at ``nside`` it has ``12 nside**2`` vertices and the four children of
pixel ``p`` at ``2 nside`` are pixels ``4p .. 4p + 3``, so spherical pooling is a
reshape followed by a mean or max over groups of four.

dMRI signals and fODFs are antipodally symmetric, so a hemispherical sphere that
keeps one vertex per antipodal pair holds the same information with half the
vertices. The point reflection ``x -> -x`` maps the HEALPix tessellation onto
itself at every resolution (ring ``i`` maps to ring ``4 nside - i`` and the
azimuth shifts by pi, an integer number of pixel steps on every ring), hence
the antipodes of the children of ``p`` are exactly the children of the
antipode of ``p``. Choosing the representatives among the 12 base pixels and
keeping the children of kept pixels at every finer level therefore gives a
kept set that is closed under the pyramid: pooling stays a reshape.

The graph of the spherical convolutions is DeepSphere's nearest-neighbour
graph [1]_ as the published RT-ESD code builds it [2]_, with equally far
neighbours treated alike so that the graph keeps the grid's symmetries
(:meth:`HealpixSphere.adjacency`; rotation equivariance measured in
docs/benchmarks.md).

References
----------
.. [1] Defferrard M, Milani M, Gusset F, Perraudin N. DeepSphere: a
   graph-based spherical CNN. ICLR 2020.
.. [2] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-equivariant networks for
   spherical deconvolution in diffusion MRI. MIDL 2023.
"""

from functools import cached_property

import healpy as hp
import numpy as np
import scipy.sparse as sp
from dipy.core.sphere import HemiSphere, Sphere
from scipy.sparse.linalg import eigsh
from scipy.spatial import cKDTree

# One base pixel of each antipodal pair: the four northern polar pixels and two
# equatorial ones (base pixel 4 + j is antipodal to 4 + (j + 2) % 4, and
# northern pixel j to southern pixel 8 + (j + 2) % 4).
_HEMISPHERE_BASE_PIXELS = np.array([0, 1, 2, 3, 4, 5])

# Beyond this many vertices the largest eigenvalue is found iteratively.
_DENSE_EIGEN_LIMIT = 1024

# Neighbours per vertex of the sphere graph, as in DeepSphere's HEALPix graph.
_N_NEIGHBOURS = 8

# DeepSphere's Gaussian kernel widths for 8 neighbours, as pygsp's
# SphereHealpix uses them in the published code: tuned for rotation
# equivariance at nside 32 .. 1024, extrapolated (x2 per halving of nside)
# below and halved beyond.
DEEPSPHERE_KERNEL_WIDTHS = {1: 0.8, 2: 0.4, 4: 0.2, 8: 0.1, 16: 0.05, 32: 0.025,
                            64: 0.01228, 128: 0.00614, 256: 0.00307, 512: 0.00154,
                            1024: 0.00077, 2048: 0.000385}

# esdmri's widths: DeepSphere's, retuned where the extrapolation was off. The
# factors minimise the non-equivariant part of random Chebyshev filters
# (K = 3, 5) on spherical harmonics of degree <= 8 (benchmarks/bench_graph.py
# scans them; results in docs/benchmarks.md).
_TUNED_WIDTH_FACTORS = {4: 1.1, 16: 0.95}
KERNEL_WIDTHS = {nside: width * _TUNED_WIDTH_FACTORS.get(nside, 1.0)
                 for nside, width in DEEPSPHERE_KERNEL_WIDTHS.items()}

# Relative tolerance under which two neighbour distances count as equal.
_TIE_TOLERANCE = 1e-9


def _check_nside(nside):
    if isinstance(nside, bool) or not isinstance(nside, (int, np.integer)):
        raise TypeError(f"nside must be an int power of 2, got {nside!r}")
    if nside < 1 or nside & (nside - 1):
        raise ValueError(f"nside must be a power of 2 (1, 2, 4, ...), got {nside}")
    return int(nside)


def nearest_neighbour_adjacency(vertices, n_neighbours, width, ties="share"):
    """Gaussian-weighted k-nearest-neighbour graph of points (DeepSphere).

    Each vertex chooses its k nearest vertices (Euclidean distance), an edge
    is kept if either end chose the other, and an edge of chord length ``d``
    weighs ``2 ** -(d / w)**2``: pygsp's ``NNGraph`` with its Gaussian kernel,
    which the published RT-ESD code uses through ``SphereHealpix``.

    Parameters
    ----------
    vertices : ndarray, shape (V, 3)
        Unit vectors.
    n_neighbours : int
        k.
    width : float
        Kernel width ``w``, the distance at which a weight falls to 1/2.
    ties : {"share", "arbitrary"}, optional
        When the k-th and (k+1)-th nearest vertices are equally far, as they
        often are on a HEALPix grid: "arbitrary" lets a k-d tree pick, as
        pygsp does (the published graph, which then lacks the symmetries of
        the grid); "share" links all the tied vertices and splits the
        remaining slots between them (an edge weighs ``s = free slots / tied
        vertices`` times the kernel, the chance that a random pick takes
        it), so every symmetry of the point set is kept.

    Returns
    -------
    adjacency : scipy.sparse.csr_matrix, shape (V, V)
        Symmetric, zero diagonal.

    References
    ----------
    .. [1] Defferrard M, Milani M, Gusset F, Perraudin N. DeepSphere: a
       graph-based spherical CNN. ICLR 2020.
    """
    if ties not in ("share", "arbitrary"):
        raise ValueError(f'ties must be "share" or "arbitrary", got {ties!r}')
    n_vertices = len(vertices)
    tree = cKDTree(vertices)
    distances, neighbours = tree.query(vertices, k=n_neighbours + 1)  # self included
    if ties == "share":
        kth = distances[:, -1]
        linked = tree.query_ball_point(vertices, kth * (1 + _TIE_TOLERANCE))
        rows = np.repeat(np.arange(n_vertices), [len(row) for row in linked])
        cols = np.concatenate(linked)
    else:
        rows = np.repeat(np.arange(n_vertices), n_neighbours + 1)
        cols = neighbours.ravel()
    off_diagonal = rows != cols
    rows, cols = rows[off_diagonal], cols[off_diagonal]
    chords = np.linalg.norm(vertices[rows] - vertices[cols], axis=-1)
    weights = np.exp2(-(chords / width) ** 2)
    if ties == "share":
        tied = chords > kth[rows] * (1 - _TIE_TOLERANCE)
        closer = np.bincount(rows[~tied], minlength=n_vertices)
        n_tied = np.bincount(rows[tied], minlength=n_vertices)
        free = n_neighbours - closer
        weights[tied] *= free[rows[tied]] / n_tied[rows[tied]]
    chosen = sp.coo_matrix((weights, (rows, cols)), shape=(n_vertices,) * 2).tocsr()
    return chosen.maximum(chosen.T).tocsr()


def normalized_laplacian(adjacency):
    """``I - D^-1/2 W D^-1/2`` of a sparse weighted adjacency ``W``.

    Parameters
    ----------
    adjacency : scipy.sparse matrix, shape (V, V)
        Symmetric, non-negative weights, every row with a positive sum.

    Returns
    -------
    laplacian : scipy.sparse.csr_matrix, shape (V, V)
    """
    inv_sqrt_degree = sp.diags(1.0 / np.sqrt(np.asarray(adjacency.sum(axis=1)).ravel()))
    identity = sp.identity(adjacency.shape[0], format="csr")
    return (identity - inv_sqrt_degree @ adjacency @ inv_sqrt_degree).tocsr()


def _hemisphere_pixels(nside):
    """NESTED pixel ids of one representative per antipodal pair, ascending."""
    pixels_per_base = nside * nside
    offsets = np.arange(pixels_per_base)
    return (_HEMISPHERE_BASE_PIXELS[:, None] * pixels_per_base + offsets).ravel()


class HealpixSphere:
    """A HEALPix sphere (NESTED ordering) with its graph and pyramid.

    Parameters
    ----------
    nside : int
        HEALPix resolution, a power of 2. The full sphere has ``12 nside**2``
        vertices, the hemisphere half of them.
    hemisphere : bool, optional
        Keep one vertex per antipodal pair. Neighbours that fall on the other
        half are replaced by their antipodes, which is exact for even
        functions such as dMRI signals and fODFs.

    Attributes
    ----------
    vertices : ndarray, shape (V, 3)
        Unit vectors of the kept pixel centres, in ascending NESTED order.
    pixels : ndarray, shape (V,)
        NESTED pixel ids of the kept vertices.
    """

    def __init__(self, nside, hemisphere=False):
        self.nside = _check_nside(nside)
        self.hemisphere = bool(hemisphere)
        n_pixels = hp.nside2npix(self.nside)
        if self.hemisphere:
            self.pixels = _hemisphere_pixels(self.nside)
        else:
            self.pixels = np.arange(n_pixels)
        self.vertices = np.stack(hp.pix2vec(self.nside, self.pixels, nest=True), axis=-1)
        # Row of each NESTED pixel in `vertices` (its antipode's row for a
        # pixel that the hemisphere does not keep).
        self._row_of_pixel = np.full(n_pixels, -1)
        self._row_of_pixel[self.pixels] = np.arange(self.pixels.size)
        if self.hemisphere:
            dropped = np.flatnonzero(self._row_of_pixel < 0)
            antipodes = self._pixels_of(*(-np.asarray(hp.pix2vec(self.nside, dropped, nest=True))))
            self._row_of_pixel[dropped] = self._row_of_pixel[antipodes]

    def __repr__(self):
        return (f"HealpixSphere(nside={self.nside}, hemisphere={self.hemisphere}, "
                f"n_vertices={self.n_vertices})")

    @property
    def n_vertices(self):
        return self.pixels.size

    def _pixels_of(self, x, y, z):
        return hp.vec2pix(self.nside, x, y, z, nest=True)

    def to_dipy(self):
        """The vertices as a DIPY ``Sphere`` (``HemiSphere`` for a hemisphere)."""
        x, y, z = self.vertices.T
        if self.hemisphere:
            return HemiSphere(x=x, y=y, z=z)
        return Sphere(x=x, y=y, z=z)

    @cached_property
    def _full_adjacency(self):
        """Weighted k-NN adjacency of the full sphere, shape (12 nside**2,) * 2."""
        full_vertices = np.stack(hp.pix2vec(self.nside, np.arange(hp.nside2npix(self.nside)),
                                            nest=True), axis=-1)
        if self.nside not in KERNEL_WIDTHS:
            raise ValueError(f"nside must be at most {max(KERNEL_WIDTHS)} for a graph (no "
                             f"kernel width known beyond), got {self.nside}")
        return nearest_neighbour_adjacency(full_vertices, _N_NEIGHBOURS,
                                           KERNEL_WIDTHS[self.nside])

    def adjacency(self):
        """Symmetric weighted adjacency of the nearest-neighbour graph.

        DeepSphere's HEALPix graph, which the published RT-ESD code builds
        with pygsp's ``SphereHealpix(nside, nest=True, k=8)``: the 8 nearest
        pixel centres of each vertex, edges weighted ``2 ** -(d / w)**2`` on
        the chord length d (:func:`nearest_neighbour_adjacency`). Two
        differences, both for rotation equivariance: equally far 8th
        neighbours share the last slots instead of being picked arbitrarily
        (the graph keeps every symmetry of the grid), and the kernel widths w
        are ``KERNEL_WIDTHS`` (DeepSphere's ``DEEPSPHERE_KERNEL_WIDTHS``,
        retuned at nside 4 and 16).

        On the hemisphere, an edge to a dropped vertex goes to its antipode:
        the full-sphere graph is antipodally symmetric, so this is exact for
        even functions.

        Returns
        -------
        adjacency : scipy.sparse.csr_matrix, shape (V, V)

        References
        ----------
        .. [1] Defferrard M, Milani M, Gusset F, Perraudin N. DeepSphere: a
           graph-based spherical CNN. ICLR 2020.
        """
        full = self._full_adjacency
        if not self.hemisphere:
            return full.copy()
        kept = full[self.pixels]
        # Columns of dropped pixels land on their antipodes' rows (summed by
        # the COO -> CSR conversion when both ends of a pair are linked).
        folded = kept.tocoo()
        return sp.coo_matrix((folded.data, (folded.row, self._row_of_pixel[folded.col])),
                             shape=(self.n_vertices,) * 2).tocsr()

    def laplacian(self, sparse=False):
        """Normalised graph Laplacian rescaled to the spectrum [-1, 1].

        ``L = I - D^-1/2 W D^-1/2`` and ``L~ = 2 L / lambda_max - I``, the
        argument of the Chebyshev polynomials.

        Parameters
        ----------
        sparse : bool, optional
            Return a scipy CSR matrix instead of a dense array.

        Returns
        -------
        laplacian : ndarray or scipy.sparse.csr_matrix, shape (V, V)
        """
        scaled = self._scaled_laplacian
        return scaled.copy() if sparse else scaled.toarray()

    @cached_property
    def _scaled_laplacian(self):
        laplacian = normalized_laplacian(self.adjacency())
        # The full sphere's lambda_max also for the hemisphere: its spectrum
        # is the even half of the full one, and sharing the scale makes the
        # hemispherical filters exactly the full-sphere filters on even signals.
        full_laplacian = normalized_laplacian(self._full_adjacency)
        if full_laplacian.shape[0] <= _DENSE_EIGEN_LIMIT:
            lambda_max = np.linalg.eigvalsh(full_laplacian.toarray())[-1]
        else:
            lambda_max = eigsh(full_laplacian, k=1, which="LA", return_eigenvectors=False)[0]
        identity = sp.identity(self.n_vertices, format="csr")
        return (2.0 / lambda_max * laplacian - identity).tocsr()

    def chebyshev_basis(self, kernel_size):
        """Dense Chebyshev polynomials of the rescaled Laplacian.

        Parameters
        ----------
        kernel_size : int
            Number of polynomials K (filter support of K - 1 hops).

        Returns
        -------
        basis : ndarray, shape (K, V, V)
            ``T_0 = I``, ``T_1 = L~``, ``T_k = 2 L~ T_{k-1} - T_{k-2}``.
        """
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer)) \
                or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        scaled = self._scaled_laplacian  # sparse: each recursion step is O(V^2)
        basis = np.empty((kernel_size, self.n_vertices, self.n_vertices))
        basis[0] = np.eye(self.n_vertices)
        if kernel_size > 1:
            basis[1] = scaled.toarray()
        for k in range(2, kernel_size):
            basis[k] = 2 * scaled @ basis[k - 1] - basis[k - 2]
        return basis

    def coarser(self):
        """The sphere at ``nside // 2`` whose vertex j is the parent of rows 4j..4j+3."""
        if self.nside == 1:
            raise ValueError("nside=1 is the coarsest HEALPix level: cannot pool further")
        return HealpixSphere(self.nside // 2, hemisphere=self.hemisphere)

    def pyramid(self, depth):
        """Spheres ``[nside, nside/2, ..., nside/2**(depth-1)]`` for a U-Net.

        Parameters
        ----------
        depth : int
            Number of levels, at least 1.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if (1 << (depth - 1)) > self.nside:
            raise ValueError(
                f"depth={depth} needs nside >= {1 << (depth - 1)} to halve nside at each of "
                f"its {depth - 1} poolings, got nside={self.nside}")
        levels = [self]
        for _ in range(depth - 1):
            levels.append(levels[-1].coarser())
        return levels

    def parent_index(self):
        """Row of each vertex's parent in ``self.coarser()``, shape (V,)."""
        self.coarser()  # validates that a coarser level exists
        return np.arange(self.n_vertices) // 4

    def symmetry_permutation(self, rotation):
        """Vertex permutation realising a rotation that maps the grid onto itself.

        Parameters
        ----------
        rotation : array_like, shape (3, 3)
            Orthogonal matrix, e.g. a rotation by 90 degrees about z.

        Returns
        -------
        perm : ndarray, shape (V,)
            ``f_rotated = f[..., perm]`` is the function ``f(R^T x)`` sampled at
            the vertices, for any function ``f`` sampled as ``f[..., j] = f(v_j)``.
        """
        rotation = np.asarray(rotation, dtype=float)
        if rotation.shape != (3, 3) or not np.allclose(rotation @ rotation.T, np.eye(3)):
            raise ValueError("rotation must be an orthogonal (3, 3) matrix")
        # f(R^T v_j) = f(v_perm[j]) with v_perm[j] = R^T v_j.
        pulled_back = self.vertices @ rotation
        pixels = self._pixels_of(*pulled_back.T)
        perm = self._row_of_pixel[pixels]
        target = self.vertices[perm]
        if self.hemisphere:
            mismatch = np.minimum(np.linalg.norm(target - pulled_back, axis=-1),
                                  np.linalg.norm(target + pulled_back, axis=-1))
        else:
            mismatch = np.linalg.norm(target - pulled_back, axis=-1)
        if mismatch.max() > 1e-9:
            raise ValueError("rotation does not map this HEALPix grid onto itself "
                             "(use e.g. multiples of 90 degrees about z)")
        return perm
