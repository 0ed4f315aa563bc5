"""``python -m benchmarks.pretrain --variants``: the ratio to the network-free fit and the
rule for replacing the shipped weights (issue 27), on hand-made devset results."""

import json

from benchmarks import pretrain
from benchmarks.devset import THRESHOLDS

ALONE, REFINED = pretrain.PRETRAINED_ROWS["rtesd"]
METHODS = {pretrain.NETWORK_FREE_ROW: "rtesd-prior+refine", ALONE: "rtesd-pretrained",
           REFINED: "rtesd-pretrained+refine"}


def results(path, errors):
    """A devset results file whose crossing AE / FN per (family, SNR, row) are ``errors``;
    every threshold of the sweep scores the same."""
    outcomes = [{"family": family, "snr": snr, "split": "dev", "row": row,
                 "method": METHODS[row], "error": "",
                 "sweep": [{"crossing": {"angular_error": ae, "fn_rate": fn,
                                         "success_rate": 1.0, "fp_rate": 0.0}}
                           for _ in THRESHOLDS]}
                for (family, snr, row), (ae, fn) in errors.items()]
    path.write_text(json.dumps({"outcomes": outcomes, "thresholds": {
        method: float(THRESHOLDS[3]) for method in METHODS.values()}}))
    return str(path)


def test_variants_count_the_goal_and_flag_worse_weights(tmp_path, capsys):
    free = {("straight", 10): 10.0, ("straight", 20): 5.0, ("dispersed", 10): 20.0}
    shipped = {("straight", 10): 8.0, ("straight", 20): 4.6, ("dispersed", 10): 18.0}
    # New weights: better on straight 10, 0.2 degree worse on straight 20, FN 0.01 worse
    # on dispersed 10 with the same AE.
    new = {("straight", 10): 7.0, ("straight", 20): 4.8, ("dispersed", 10): 18.0}
    fn = {("dispersed", 10): 0.01}
    first = results(tmp_path / "a.json", {
        **{(*key, pretrain.NETWORK_FREE_ROW): (ae, 0.0) for key, ae in free.items()},
        **{(*key, REFINED): (ae, 0.0) for key, ae in shipped.items()}})
    second = results(tmp_path / "b.json", {
        (*key, REFINED): (ae, fn.get(key, 0.0)) for key, ae in new.items()})
    pretrain.variants([f"shipped={first}", f"new={second}"])
    out = capsys.readouterr().out
    ratio_table = out.split("refined crossing AE / network-free crossing AE")[1]
    assert "| straight | 10 | 0.80 | 0.70 |" in ratio_table
    assert "| straight | 20 | 0.92 | 0.96 |" in ratio_table
    assert "| dispersed | 10 | 0.90 | 0.90 |" in ratio_table
    assert "| at most 0.90x |  | 2 of 3 | 2 of 3 |" in ratio_table
    assert ("| worse than shipped refined |  | none | dispersed 10, straight 20 |"
            in ratio_table)
