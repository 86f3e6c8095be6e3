"""The report: the analysis of constructed sweeps (`tests/test_analysis.py`) in words and files.

The numbers and verdicts themselves are tested on the analysis values in test_analysis.py; here,
that the report states them (with t, df and p), writes its files, and says what is missing.
"""

import csv
import io
import json
import re

import numpy as np
import pytest

from batchjax import report
from batchjax.analysis import analyse
from test_analysis import B_SIMPLE, TARGET_ACC, TARGET_LOSS, critical_sweep, fake_sweep


def test_claims_state_their_tests_and_verdicts():
    a = analyse(fake_sweep())
    text = report.build_report(a)
    for claim in a.claims:
        assert f"### Claim {claim.number}: {claim.statement}" in text
        assert f"**Verdict: {claim.verdict}.**" in text
        assert f"| {claim.number} | {claim.statement} | **{claim.verdict}** |" in text
    noise = report.claim_text(a.claims[0], a)
    # N = 512: the finite-population correction makes the expected slope -1.098, not -1.
    assert "-1.098, the slope of 1/B with the finite-population correction" in noise.evidence[0]
    assert "(consistent); empirical" in noise.evidence[0]
    # Every test states t, its degrees of freedom and p.
    gap = a.claims[2].gap
    line = report.claim_text(a.claims[2], a).evidence[-2]
    assert line.startswith("loss gap(8) - loss gap(128) = ")
    assert f"t = {gap.t:+.1f}, df = {gap.df:.1f}, one-sided p" in line
    assert "Welch" in text and "alpha = 0.05" in text and "2 standard errors" not in text


def test_t_text_states_t_df_and_p():
    from batchjax import stats
    test = stats.t_test(2.5, 1.0, 2.0)
    assert report.t_text(test) == "t = +2.5, df = 2, one-sided p = 0.065"
    assert report.t_text(test, "two") == "t = +2.5, df = 2, two-sided p = 0.130"
    assert report.t_text(stats.t_test(-40.0, 1.0, 7.0)) == "t = -40.0, df = 7, one-sided p < 0.001"
    assert report.t_text(stats.t_test(1.0, float("nan"), float("nan"))) == "t n/a (no SE)"


def test_one_seed_says_why_it_is_inconclusive():
    a = analyse(fake_sweep(seeds=(0,)))
    assert "seed" in report.claim_text(a.claims[1], a).reason
    assert "seed" in report.claim_text(a.claims[2], a).reason


def test_missing_noise_records_are_noted():
    text = report.build_report(analyse(fake_sweep(noise=False)))
    assert "no gradient-noise records" in text
    assert "Nothing was measured; rerun with --noise-every epoch." in text


def test_report_marks_diverged_runs():
    text = report.build_report(analyse(fake_sweep(diverged=[(8, 1, 2)])))
    assert "run bs00008_seed1 DIVERGED at step" in text and "1 diverged" in text


def test_write_report_files(tmp_path):
    results = fake_sweep()
    text = report.write_report(results, tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    for n in range(1, 6):
        assert f"### Claim {n}:" in text
    assert "**Verdict:" in text and "roughness" in text
    rows = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert [int(r["batch_size"]) for r in rows] == [8, 32, 128]
    assert {"val_accuracy_mean", "val_accuracy_sd", "gap_loss_mean", "b_simple_end_mean",
            "wall_seconds_mean", "steps_mean"} <= set(rows[0])
    a = analyse(results)
    assert float(rows[0]["gap_loss_mean"]) == pytest.approx(a.summary[8]["gap_loss"].mean,
                                                            rel=1e-5)
    tex = (tmp_path / "summary.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\pm" in tex and "fake-digits" in tex
    # An analysis renders the same report as the sweep it was made from.
    assert report.write_report(a, tmp_path / "again") == text
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_verdict_table_lists_each_verdict_with_its_numbers():
    a = analyse(fake_sweep())
    table = report.verdict_table(a).splitlines()
    assert table[0].split()[:3] == ["#", "claim", "verdict"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {"1", "2", "3", "4", "5", "S", "C"}
    for claim in a.claims:
        assert f"  {claim.verdict}  " in rows[str(claim.number)]
    assert f"slope {a.claims[0].decided_at.fit.slope:+.2f} at initialisation" in rows["1"]
    assert f"loss gap(8) - gap(128) = {a.claims[2].gap.diff:+.3f}" in rows["3"]
    assert "supported" in rows["S"]
    assert "no B_crit" in rows["C"] and "S_min = -" in rows["C"]  # steps fall faster than 1/B
    few = report.verdict_table(analyse(fake_sweep(batch_sizes=(8, 32)))).splitlines()[-1]
    assert "no fit" in few and "only 2 of 2 batch sizes" in few
    assert all(len(line) < 160 for line in table)


# --------------------------------------------------------------------------------------------
# Beyond the original: sharpness and the critical batch size


def test_sharpness_section_states_the_verdict_and_the_confound():
    a = analyse(fake_sweep())  # lambda_max and tr(H) grow as B^0.3
    text = report.build_report(a)
    section = text[text.index("## Sharp minima"):text.index("## Critical batch size")]
    assert "**Smaller batches ended in flatter minima here: supported.**" in section
    for m in a.sharpness.measures:
        assert (f"log2-log2 slope against B over 9 runs: {m.slope.slope:+.2f} ± "
                f"{m.slope.se:.2f} (95% interval [{m.slope.lo:+.2f}, {m.slope.hi:+.2f}], 7 df)"
                in section)
    assert "Confound" in section and "different training losses" in section
    assert "| 8 | " in section and "lambda_max" in section
    flatter_at_large = report.build_report(analyse(fake_sweep(sharpness_exponent=-0.3)))
    assert "flatter minima here: not supported.**" in flatter_at_large


def test_sharpness_section_without_measurements_says_so():
    text = report.build_report(analyse(fake_sweep(sharpness_exponent=None)))
    assert "## Sharp minima" in text and "Not measured in this sweep" in text


def test_critical_section_states_the_fit():
    a = analyse(critical_sweep(), target_loss=TARGET_LOSS, target_accuracy=TARGET_ACC)
    text = report.build_report(a)
    section = text[text.index("## Critical batch size"):]
    assert "### Primary target: training loss 0.4" in section
    assert "### Secondary target: val. accuracy 50.0%" in section
    assert section.count("**B_crit = 200 ± ") == 2 and "No fit" not in section
    assert section.count("95% t interval on 6 df [200, 200]") == 2
    assert "S_min = 50 ±" in section and "E_min = 10000 ±" in section
    assert "B_crit / B_simple = 1.3" in section
    assert "perfect scaling for B ≤ 50" in section and "B ≥ 800" in section
    # The regime of each batch size, in the table.
    assert "| 8 | 1300 | 10400 | 1/1 | perfect scaling |" in section
    assert "| 1024 | 60 | 61200 | 1/1 | maximal data parallelism |" in section
    assert "Target: training loss 0.4 (given)." in section
    assert not re.search(r"\d[eE][+-]\d", section), "a number in exponent notation"


def test_critical_section_without_enough_batch_sizes_says_why():
    two = analyse(critical_sweep(batch_sizes=(8, 64)), target_loss=TARGET_LOSS,
                  target_accuracy=TARGET_ACC)
    text = report.build_report(two)
    section = text[text.index("## Critical batch size"):]
    assert section.count("**No fit:** only 2 of 2 batch sizes reached") == 2
    assert "needs at least 3" in section and "**B_crit = " not in section


def test_critical_default_target_is_described():
    a = analyse(critical_sweep())
    text = report.build_report(a)
    assert ("(the lowest smoothed training loss every run reaches, rounded up to two "
            "significant digits)") in text


def test_write_report_saves_the_critical_analysis(tmp_path):
    report.write_report(critical_sweep(), tmp_path, target_loss=TARGET_LOSS)
    saved = json.loads((tmp_path / "critical.json").read_text())
    assert saved["primary"]["fit"]["b_crit"] == pytest.approx(200.0, rel=1e-6)
    assert saved["primary"]["target"] == TARGET_LOSS
    assert saved["primary"]["fit_df"] == 6
    assert saved["b_simple_mean"] == pytest.approx(B_SIMPLE)
    assert np.isfinite(saved["primary"]["b_crit_t_interval"]).all()


# --------------------------------------------------------------------------------------------
# The learning-rate grid (issue #15): constructed in tests/test_critical_lr.py


def test_grid_report_states_the_table_fits_and_the_comparison(tmp_path):
    import numpy as np
    from test_critical_lr import grid_sweep
    a = analyse(grid_sweep())
    g = a.grid
    text = report.write_report(a, tmp_path)
    assert (tmp_path / "report.md").read_text() == text and "### Claim" not in text
    assert "## SGD (`grid`)" in text
    # The table: every batch size, its best rate, S(B) and the flags.
    table = text[text.index("| B | best rate |"):text.index("Every rate tried")]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()
            if line.startswith("| ") and line[2:3].isdigit()}
    assert set(rows) == {str(b) for b in g.batch_sizes}
    assert rows["4"].count("**no rate reached**") == 1 and "6 budget, 6 hopeless" in rows["4"]
    assert "**unreliable**: best is the largest rate after 2 extensions up" in rows["1024"]
    assert "1 diverged" in rows["16"]
    eight = g.rates[8]
    assert f"| 8 | {report._rate(eight.best.learning_rate)} | 6 (" in rows["8"]
    assert f"| {eight.steps.mean:.0f} ± {eight.steps.sd:.0f} |" in rows["8"]
    assert f"[{eight.steps.lo:.0f}, {eight.steps.hi:.0f}]" in rows["8"]
    # Every rate tried, its mean steps over the seeds that reached and why the others did not.
    every = text[text.index("Every rate tried"):text.index("Runs not reaching the target")]
    assert f"**{report._rate(eight.best.learning_rate)}: {eight.steps.mean:.0f} (3/3)**" in every
    failed = g.rates[16].cells[4]
    assert (f"{report._rate(failed.learning_rate)}: {failed.steps.mean:.0f} (2/3; 1 diverged)"
            in every)
    assert "(1/3; 1 budget, 1 hopeless)" in every
    assert "hopeless: stopped as hopeless" in text
    # The fits and the comparison, with their numbers.
    assert "**B_crit = 200** (95% t interval on 6 df [200, 200]" in text
    assert "eps_max = 0.5 (95% t interval on 5 df [0.5, 0.5]), B_noise = 100" in text
    noise = g.noise
    assert f"B_simple / B_crit = **{noise.ratio:.2g}**" in text
    assert (f"t = {noise.test.t:+.1f}, df = {noise.test.df:.0f}, two-sided p < 0.001" in text)
    assert "significantly more: measured this way, B_simple overestimates B_crit" in text
    assert "probe subset of 1,000 training examples" in text and "log-spaced" in text
    assert "2 standard errors" not in text and "2-SE" in text  # "no 2-SE rule"
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved["fit"]["b_crit"] == pytest.approx(200.0, rel=1e-6)
    assert saved["rates"]["4"]["best_learning_rate"] is None
    assert saved["b_simple"]["outcome"] == "larger"
    rows_csv = list(csv.DictReader(io.StringIO((tmp_path / "grid.csv").read_text())))
    assert len(rows_csv) == sum(len(r.cells) for r in g.rates.values()) * 3
    assert {r["outcome"] for r in rows_csv} == {"reached", "diverged", "hopeless", "budget"}
    best = [r for r in rows_csv if r["best"] == "True" and r["batch_size"] == "8"]
    assert [float(r["steps_to_target"]) for r in best] == pytest.approx(
        [s.steps for s in eight.best.seeds])
    assert not re.search(r"\d[eE][+-]\d", text), "a number in exponent notation"
    assert np.isfinite(noise.ratio)


def test_comparison_report_says_which_way_it_comes_out():
    import numpy as np
    from test_critical_lr import grid_sweep
    sgd = analyse(grid_sweep(batch_sizes=(8, 32, 128, 512)))
    adam = analyse(grid_sweep(batch_sizes=(8, 32, 128, 512), optimizer="adam_keras",
                              rate=lambda b: 1e-3 * np.sqrt(b / 8)))
    # Adam's noise records scaled down 10x: B_simple falls below B_crit.
    for r in adam.results.runs:
        for rec in r.noise:
            rec["noise_scale"] /= 10
    adam = analyse(adam.results)
    text = report.critical_comparison({"sgd": sgd, "adam_keras": adam})
    summary = text[text.index("## Summary"):text.index("## SGD")]
    assert "| SGD | 200 |" in summary and "| Adam (Keras) | 200 |" in summary
    assert adam.grid.noise.outcome == "smaller" and sgd.grid.noise.outcome == "larger"
    assert "B_simple underestimates B_crit" in summary
    assert "B_simple overestimates B_crit" in summary
    assert "B_crit with Adam (Keras) is 1.00 times B_crit with SGD" in summary
    assert "power law eps ∝ B^k (the model for Adam): k = +0.50" in text
    with pytest.raises(report.BatchjaxError, match="not a learning-rate grid sweep"):
        report.critical_comparison({"plain": analyse(fake_sweep())})


def test_grid_verdict_table():
    from test_critical_lr import grid_sweep
    a = analyse(grid_sweep())
    rows = {line.split()[0]: line for line in report.verdict_table(a).splitlines()[1:]}
    assert set(rows) == {"C", "L", "F"}
    assert "B_crit 200 [200, 200] (t)" in rows["C"] and "larger" in rows["C"]
    assert "B_noise 100 [100, 100]" in rows["L"]
    assert "4: no rate reached; 1024: unreliable (edge)" in rows["F"]
