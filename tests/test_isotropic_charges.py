"""Linear charges on the isotropic fractions (``gm_charge``, ``csf_charge``): the
refinement's objective against the uncharged one plus the charge (value and gradient, the
whole objective and a restriction, float64), the columns they fall on, and their effect on
a refinement."""

import numpy as np
import pytest
import torch
from test_refine import ORDER, field, phantom, refine_field  # noqa: F401
from test_refine_buffers import coupled_problem

from esdmri.reconst.losses import LossWeights
from esdmri.reconst.refine import isotropic_charges
from esdmri.shm import n_coeffs


def test_the_charges_fall_on_the_named_tissues_columns():
    weights = LossWeights(gm_charge=5e-3, csf_charge=2e-2)
    assert isotropic_charges(("wm", "gm", "csf"), 45, weights) == ((45, 5e-3), (46, 2e-2))
    assert isotropic_charges(("wm", "csf"), 45, weights) == ((45, 2e-2),)
    assert isotropic_charges(("wm", "gm", "csf"), 45, LossWeights()) == ()
    assert isotropic_charges(("wm", "gm"), 15, LossWeights(csf_charge=1.0)) == ()
    with pytest.raises(ValueError, match="gm_charge must be >= 0"):
        LossWeights(gm_charge=-1.0)


@pytest.mark.parametrize("class_order", [False, True])
def test_charged_objective_is_the_objective_plus_the_charges(  # noqa: F811
        phantom, field, class_order):  # noqa: F811
    """Value: the uncharged value plus each charge times its column's sum; gradient: the
    uncharged gradient plus the charge on its column (float64), for the whole objective
    and for a restriction to some rows (whose held rows' charges are in its offset)."""
    weights = LossWeights(gm_charge=3e-3, csf_charge=7e-3)
    plain, *_, start, _ = coupled_problem(phantom, field, LossWeights(), 20.0,
                                          class_order=class_order)
    charged, *_ = coupled_problem(phantom, field, weights, 20.0, class_order=class_order)
    n_wm = n_coeffs(ORDER)
    charged.charges = isotropic_charges(("wm", "gm", "csf"), n_wm, weights)
    c = start.clone()
    c[:, n_wm:] = c[:, n_wm:].abs()
    value, gradient = plain(c)
    charged_value, charged_gradient = charged(c)
    expected = value + 3e-3 * float(c[:, n_wm].sum()) + 7e-3 * float(c[:, n_wm + 1].sum())
    assert charged_value == pytest.approx(expected, rel=1e-13)
    gradient[:, n_wm] += 3e-3
    gradient[:, n_wm + 1] += 7e-3
    torch.testing.assert_close(charged_gradient, gradient, rtol=1e-12, atol=1e-15)
    rows = torch.arange(0, len(c), 3)
    part = charged.restricted(rows, c)
    raw, _ = part(c[rows].clone())
    part.offset = charged_value - raw
    moved = c.clone()
    moved[rows, n_wm:] += 0.01
    whole_value, whole_gradient = charged(moved)
    part_value, part_gradient = part(moved[rows].clone())
    assert part_value == pytest.approx(whole_value, rel=1e-13)
    torch.testing.assert_close(part_gradient, whole_gradient[rows], rtol=1e-12, atol=1e-15)


def test_a_charge_lowers_its_tissues_fraction_in_a_refinement(phantom, field):  # noqa: F811
    """The refinement's GM coefficients fall as their charge rises, the WM and CSF ones
    take the isotropic signal, and a charge of 0 is the uncharged refinement to the bit."""
    signal, mask, start = field
    n_wm = n_coeffs(ORDER)
    three = ("wm", "gm", "csf")
    options = dict(steps=40, method="lbfgs", dtype=torch.float64)
    plain, _ = refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights(),
                            **options)
    free, _ = refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights(),
                           tissues=three, **options)
    np.testing.assert_array_equal(free, plain)
    gm = [plain[mask][:, n_wm].sum()]
    for charge in (1e-2, 1e-1):
        refined, _ = refine_field(phantom, phantom.gtab, signal, mask, start,
                                  LossWeights(gm_charge=charge), tissues=three, **options)
        gm.append(refined[mask][:, n_wm].sum())
    assert gm[0] > gm[1] > gm[2] >= 0
