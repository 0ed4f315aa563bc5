"""The straight-bundle dev family, now in the library (:mod:`esdmri.straight_phantom`).

The pretraining cohort (:mod:`esdmri.cohort`, the installed ``esdmri_pretrain``)
needs it, so the generator moved there; the benchmarks keep importing it from here.
"""

from esdmri.straight_phantom import StraightPhantom, make_straight_phantom, radial_for_fa

__all__ = ["StraightPhantom", "make_straight_phantom", "radial_for_fa"]
