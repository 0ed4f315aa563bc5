"""The dev switch rule of benchmarks/noise_floor_dev.py on hand-made results."""

import pytest

from benchmarks.noise_floor_dev import switch_rule


def records(rows, threshold=0.2):
    """Results records of (family, snr, crossing AE, crossing FN, all-voxel FP)."""
    return [{"family": family, "snr": snr, "t": threshold, "all_success_rate": 0.9,
             "crossing_angular_error": ae, "crossing_fn_rate": fn, "all_fp_rate": fp}
            for family, snr, ae, fn, fp in rows]


BASE = records([("straight", 10, 5.0, 0.00, 0.00), ("dispersed", 10, 12.0, 0.15, 0.03)])


def test_a_lower_mean_within_every_tolerance_passes():
    candidate = records([("straight", 10, 5.19, 0.009, 0.019),
                         ("dispersed", 10, 10.0, 0.10, 0.03)])
    passed, rows, means = switch_rule(BASE, candidate)
    assert passed
    assert means == pytest.approx((8.5, 7.595))
    assert [row[-1] for row in rows] == [False, False]


@pytest.mark.parametrize("cell, value", [(2, 5.21), (3, 0.011), (4, 0.021)])
def test_one_phantom_over_one_tolerance_fails_despite_a_lower_mean(cell, value):
    row = ["straight", 10, 5.0, 0.0, 0.0]
    row[cell] = value
    candidate = records([tuple(row), ("dispersed", 10, 9.0, 0.10, 0.03)])
    passed, rows, means = switch_rule(BASE, candidate)
    assert not passed and rows[0][-1] and not rows[1][-1]
    assert means[1] < means[0]


def test_no_lower_mean_fails():
    assert not switch_rule(BASE, BASE)[0]


def test_each_side_at_its_own_threshold():
    candidate = records([("straight", 10, 9.0, 0.0, 0.0), ("dispersed", 10, 20.0, 0.3, 0.1)],
                        threshold=0.2)
    candidate += records([("straight", 10, 4.0, 0.0, 0.0), ("dispersed", 10, 11.0, 0.1, 0.0)],
                         threshold=0.3)
    assert not switch_rule(BASE, candidate, 0.2, 0.2)[0]
    assert switch_rule(BASE, candidate, 0.2, 0.3)[0]


def test_a_missing_phantom_is_an_error():
    with pytest.raises(ValueError, match="dispersed at SNR 10"):
        switch_rule(BASE, records([("straight", 10, 5.0, 0.0, 0.0)]))
