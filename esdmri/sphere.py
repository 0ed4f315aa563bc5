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
"""

from functools import cached_property

import healpy as hp
import numpy as np
import scipy.sparse as sp
from dipy.core.sphere import HemiSphere, Sphere
from scipy.sparse.linalg import eigsh

# One base pixel of each antipodal pair: the four northern polar pixels and two
# equatorial ones (base pixel 4 + j is antipodal to 4 + (j + 2) % 4, and
# northern pixel j to southern pixel 8 + (j + 2) % 4).
_HEMISPHERE_BASE_PIXELS = np.array([0, 1, 2, 3, 4, 5])

# Beyond this many vertices the largest eigenvalue is found iteratively.
_DENSE_EIGEN_LIMIT = 1024


def _check_nside(nside):
    if isinstance(nside, bool) or not isinstance(nside, (int, np.integer)):
        raise TypeError(f"nside must be an int power of 2, got {nside!r}")
    if nside < 1 or nside & (nside - 1):
        raise ValueError(f"nside must be a power of 2 (1, 2, 4, ...), got {nside}")
    return int(nside)


def _normalized_laplacian(adjacency):
    """``I - D^-1/2 W D^-1/2`` of a sparse weighted adjacency ``W``."""
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
    def _edges(self):
        """Graph edges (rows, cols) and their chord lengths, duplicates kept."""
        neighbours = hp.get_all_neighbours(self.nside, self.pixels, nest=True)  # (8, V)
        rows = np.broadcast_to(np.arange(self.n_vertices), neighbours.shape)
        valid = neighbours >= 0  # healpy marks missing neighbours with -1
        neighbour_pixels = neighbours[valid]
        rows = rows[valid]
        neighbour_vectors = np.stack(hp.pix2vec(self.nside, neighbour_pixels, nest=True), -1)
        # The chord to the true neighbour, not to its kept antipode.
        chords = np.linalg.norm(self.vertices[rows] - neighbour_vectors, axis=-1)
        return rows, self._row_of_pixel[neighbour_pixels], chords

    def adjacency(self):
        """Symmetric weighted adjacency of the 8-neighbour graph.

        Weights are ``exp(-d**2 / mean(d**2))`` on the chord distance ``d``
        between neighbouring pixel centres; the kernel width adapts to the
        resolution, so the graph looks the same at every nside.

        Returns
        -------
        adjacency : scipy.sparse.csr_matrix, shape (V, V)
        """
        rows, cols, chords = self._edges
        weights = np.exp(-chords**2 / np.mean(chords**2))
        # On the hemisphere an edge and its mirror image can land on the same
        # pair of representatives: the COO -> CSR conversion sums them, which
        # is what the full-sphere graph does for even functions.
        matrix = sp.coo_matrix((weights, (rows, cols)), shape=(self.n_vertices,) * 2).tocsr()
        return (matrix + matrix.T) / 2

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
        laplacian = _normalized_laplacian(self.adjacency())
        # The full sphere's lambda_max also for the hemisphere: its spectrum
        # is the even half of the full one, and sharing the scale makes the
        # hemispherical filters exactly the full-sphere filters on even signals.
        full = self if not self.hemisphere else HealpixSphere(self.nside)
        full_laplacian = laplacian if full is self else _normalized_laplacian(full.adjacency())
        if full.n_vertices <= _DENSE_EIGEN_LIMIT:
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
