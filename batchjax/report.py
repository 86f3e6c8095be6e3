"""The claims report: a sweep's `batchjax.analysis.Analysis` in words, as Markdown, CSV and LaTeX.

Words only: every number here is a value of the analysis (`batchjax.analysis` defines them
and its docstring the quantities; `batchjax.stats` the tests). `write_report` writes, into the
sweep directory, `report.md`, `summary.csv`, `summary.tex` and `critical.json`;
`verdict_table` is the few lines a console shows.

A learning-rate grid sweep (issue #15) has no claims: its report is the critical batch size at
the best rate of each batch size (`grid_section`), and `write_report` writes `report.md`,
`grid.json` (`grid_record`) and `grid.csv` (one row per batch size, rate and seed).
`critical_comparison(analyses)` puts the grids of several optimizers side by side.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from typing import Sequence

import numpy as np

from batchjax import stats
from batchjax.analysis import (AT_START, BUDGET, DIVERGED, HOPELESS, INCONCLUSIVE, MISSING,
                               NOT_REACHED, NOT_SUPPORTED, OUTCOME_TEXT, SUPPORTED, Analysis,
                               BalanceClaim,
                               BatchRates, BatchSummary, Claim, CriticalAnalysis,
                               GeneralisationClaim, GridAnalysis, NoiseClaim, RoughnessClaim,
                               SpeedClaim, TargetAnalysis, analyse)
from batchjax.critical import LOSS_WINDOW_EXAMPLES
from batchjax.errors import BatchjaxError
from batchjax.results import SweepResults, rows_to_csv, to_jsonable, write_bytes_atomic
from batchjax.stats import ALPHA, Estimate, TTest, plain_number

__all__ = ["SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE", "build_report", "claim_text",
           "critical_comparison", "critical_record", "grid_record", "grid_section",
           "write_critical_comparison",
           "summary_csv", "summary_latex", "summary_markdown", "verdict_table", "write_report"]

# --------------------------------------------------------------------------------------------
# Numbers in words


def fmt_estimate(e: Estimate, fmt: str = ".4f") -> str:
    """"mean ± s.d." (just the mean with one value; "n/a" with none)."""
    if not np.isfinite(e.mean):
        return "n/a"
    if e.n > 1 and np.isfinite(e.sd):
        return f"{e.mean:{fmt}} ± {e.sd:{fmt}}"
    return f"{e.mean:{fmt}}"


def _number(value: float) -> str:
    """Three significant digits; whole numbers from 1000 on (9662, not 9.66e+03)."""
    return f"{value:.0f}" if 1e3 <= abs(value) < 1e7 else plain_number(value, 3)


def _spread(value: float, scale: float = 1.0) -> str:
    """An SE or residual to two significant digits; "0" when it is rounding error of `scale`."""
    return "0" if abs(value) < 1e-9 * abs(scale) else plain_number(value, 2)


def _fmt_t(t: float) -> str:
    if np.isnan(t):
        return "n/a"
    return f"{t:+.1f}" if np.isfinite(t) else ("+inf" if t > 0 else "-inf")


def _fmt_df(df: float) -> str:
    if np.isnan(df):
        return "n/a"
    if math.isinf(df):
        return "∞"
    return f"{df:.0f}" if abs(df - round(df)) < 0.05 else f"{df:.1f}"


def _fmt_p(p: float) -> str:
    if np.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def t_text(test: TTest, sided: str = "one") -> str:
    """"t = +2.4, df = 3.7, one-sided p = 0.037" ("two": the two-sided p)."""
    if not test.known:
        return "t n/a (no SE)" if np.isnan(test.se) else f"t = {_fmt_t(test.t)} (no df)"
    p = test.p_one_sided if sided == "one" else test.p()
    return (f"t = {_fmt_t(test.t)}, df = {_fmt_df(test.df)}, "
            f"{'one' if sided == 'one' else 'two'}-sided p {_fmt_p(p)}")


def _diff_text(test: TTest, fmt: str, unit: str = "", se_note: str = "SE") -> str:
    return f"{test.diff:+{fmt}} ± {test.se:{fmt}}{unit} ({se_note}), {t_text(test)}"


# --------------------------------------------------------------------------------------------
# Summary tables


COLUMNS = [  # key, header, format
    ("steps", "steps", ".0f"),
    ("train_loss", "train loss", ".4f"),
    ("val_loss", "val loss", ".4f"),
    ("train_accuracy", "train acc", ".4f"),
    ("val_accuracy", "val acc", ".4f"),
    ("gap_loss", "loss gap", ".4f"),
    ("gap_accuracy", "acc gap", ".4f"),
    ("b_simple_end", "B_simple end", ".1f"),
    ("lambda_max", "lambda_max", ".3g"),
    ("hessian_trace", "tr(H)", ".3g"),
    ("roughness", "roughness", ".4f"),
    ("roughness_relative", "rel. roughness", ".3f"),
    ("wall_seconds", "time (s)", ".2f"),
    ("compile_seconds", "compile (s)", ".2f"),
]


def summary_csv(analysis: Analysis) -> str:
    """The summary as CSV: one row per batch size, `<quantity>_mean` and `<quantity>_sd` columns."""
    summary = analysis.summary
    keys = list(next(iter(summary.values())).stats) if summary else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["batch_size", "runs", "diverged"]
                    + [f"{k}_{s}" for k in keys for s in ("mean", "sd")])
    for b, row in summary.items():
        writer.writerow([b, row.runs, row.diverged] + [
            "" if not np.isfinite(v) else f"{v:.6g}"
            for k in keys for v in (row[k].mean, row[k].sd)])
    return buf.getvalue()


def summary_latex(analysis: Analysis) -> str:
    """The summary as a booktabs LaTeX table (mean $\\pm$ s.d. over seeds)."""
    def cell(e: Estimate, fmt: str) -> str:
        if not np.isfinite(e.mean):
            return "--"
        if e.n > 1 and np.isfinite(e.sd):
            return f"${e.mean:{fmt}} \\pm {e.sd:{fmt}}$"
        return f"${e.mean:{fmt}}$"

    caption = (f"Final metrics per batch size on {analysis.results.dataset_label()}, mean "
               "$\\pm$ s.d. over seeds.")
    headers = ["$B$", "runs"] + [h.replace("_", r"\_") for _, h, _ in COLUMNS]
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
             r"\begin{tabular}{" + "r" * len(headers) + "}", r"\toprule",
             " & ".join(headers) + r" \\", r"\midrule"]
    for b, row in analysis.summary.items():
        runs = f"{row.runs}" + (f" ({row.diverged} div.)" if row.diverged else "")
        lines.append(" & ".join([str(b), runs] + [cell(row[k], f) for k, _, f in COLUMNS])
                     + r" \\")
    caption = caption.replace("_", r"\_").replace("%", r"\%")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}",
              r"\label{tab:batch-size-summary}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict[int, BatchSummary]) -> str:
    headers = ["B", "runs"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for b, row in summary.items():
        runs = f"{row.runs}" + (f" ({row.diverged} diverged)" if row.diverged else "")
        lines.append("| " + " | ".join([str(b), runs] + [fmt_estimate(row[k], f)
                                                         for k, _, f in COLUMNS]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Claims


class ClaimText:
    """A claim in words: the test applied, the evidence (one line per number) and the reason
    for its verdict."""

    def __init__(self, test: str, evidence: list[str], reason: str):
        self.test, self.evidence, self.reason = test, evidence, reason


def _at_moment(epoch: float) -> str:
    return "at initialisation" if epoch == 0 else f"after epoch {epoch:g}"


def _noise_text(claim: NoiseClaim) -> ClaimText:
    test = ("At each moment of training, a weighted least-squares fit of log2 of the empirical "
            "minibatch gradient variance E|G_B - G|^2 (measured at each run's own batch size, "
            "weights from its standard error over minibatches) against log2 B, over all runs. "
            "1/B scaling predicts a slope of -1 (slightly steeper with the finite-population "
            "correction). The verdict comes from the first moment, initialisation, where every "
            "batch size has the same parameters (same seed), so the fit isolates the batch size: "
            f"the claim holds if that slope is negative at one-sided p < {ALPHA:g} (t test of "
            "the slope on n - 2 df; its SE is that of the error bars, scaled up by the residual "
            "scatter where it exceeds them). Agreement with -1 is a two-sided test. Later "
            "moments compare runs at different parameters and are reported, not judged.")
    if not claim.measured:
        return ClaimText(test, ["no gradient-noise records in these results (noise schedule "
                                "'none')"], "Nothing was measured; rerun with --noise-every epoch.")
    evidence = []
    for m in claim.moments:
        if m.fit is None:
            evidence.append(f"{m.name}: standard errors missing; no fit")
            continue
        fit = m.fit
        vs_zero, vs_one, vs_fpc = m.tests()
        consistent = ["consistent" if t.known and t.p() >= ALPHA else "inconsistent"
                      for t in (vs_one, vs_fpc)]
        evidence.append(
            f"{m.name}: slope {fit.slope:+.3f} ± {fit.se:.3f} (SE; {fit.n} runs, "
            f"B = {', '.join(map(str, m.batch_sizes))}; 95% interval [{fit.lo:+.3f}, "
            f"{fit.hi:+.3f}] on {_fmt_df(fit.df)} df); {abs(vs_zero.t):.1f} SE "
            f"{'below' if fit.slope < 0 else 'above'} zero (one-sided p "
            f"{_fmt_p(vs_zero.p_one_sided)}); against -1: {t_text(vs_one, 'two')} "
            f"({consistent[0]}); against {m.fpc_slope:+.3f}, the slope of 1/B with the "
            f"finite-population correction at N = {m.probe_size}: {t_text(vs_fpc, 'two')} "
            f"({consistent[1]}); empirical within 3 SE of the analytic value in "
            f"{m.within_3se}/{m.compared} runs")
    decided = claim.decided_at
    if decided is None:
        return ClaimText(test, evidence or ["fewer than two batch sizes with empirical "
                                            "measurements"],
                         "A slope needs at least two batch sizes with measurements.")
    later = [f"{m.fit.slope:+.2f} ± {m.fit.se:.2f} {_at_moment(m.epoch)}"
             for m in claim.moments if m.fit is not None and m is not decided]
    trajectory = (f" Across runs, which training has taken to different parameters, the slope "
                  f"is {', '.join(later)}." if later else "")
    at = _at_moment(decided.epoch).capitalize()
    fit, vs_zero = decided.fit, decided.fit.test(0.0)
    if claim.verdict == SUPPORTED:
        reason = (f"{at}, the minibatch gradient variance falls as B^({fit.slope:+.2f} ± "
                  f"{fit.se:.2f}) with the batch size ({t_text(vs_zero)}).{trajectory}")
    elif claim.verdict == NOT_SUPPORTED:
        reason = f"{at}, the variance grows with B ({t_text(vs_zero)}).{trajectory}"
    else:
        reason = (f"{at}, the slope does not differ significantly from zero "
                  f"({t_text(vs_zero)}).{trajectory}")
    return ClaimText(test, evidence, reason)


def _roughness_text(claim: RoughnessClaim, summary: dict[int, BatchSummary]) -> ClaimText:
    test = ("Roughness of each run's per-step training loss, in loss units (R) and relative to "
            "the loss level (R_rel = R / mean loss), as defined above; mean ± s.d. over seeds "
            "per batch size. The claim holds if both fall with B and, for both, the smallest "
            f"batch size's exceeds the largest's significantly (one-sided Welch t test, p < "
            f"{ALPHA:g}); it fails if both are significantly lower at the smallest. The "
            "log-log slopes are fitted over runs, with t intervals on n - 2 df.")
    bs = claim.batch_sizes
    evidence = [f"B = {b}: R = {fmt_estimate(summary[b]['roughness'], '.4f')}, R_rel = "
                f"{fmt_estimate(summary[b]['roughness_relative'], '.3f')}" for b in bs]
    if len(bs) < 2:
        return ClaimText(test, evidence, "Only one batch size.")
    for m in claim.measures:
        name = "R" if m.key == "roughness" else "R_rel"
        slope = (f"log-log slope against B over {m.slope.n} runs {m.slope.slope:+.2f} (95% "
                 f"interval [{m.slope.lo:+.2f}, {m.slope.hi:+.2f}], {_fmt_df(m.slope.df)} df)"
                 if m.slope is not None else "log-log slope against B n/a")
        evidence.append(f"{name}({bs[0]}) - {name}({bs[-1]}) = {_diff_text(m.test, '.4f')}; "
                        f"{slope} (sampling noise at a fixed loss level: -0.5)")
    outcomes = [m.outcome for m in claim.measures]
    if "unknown" in outcomes:
        reason = f"At {claim.seeds} seed(s) the seed-to-seed uncertainty cannot be estimated."
    elif claim.verdict == SUPPORTED:
        reason = (f"Per-step losses at B = {bs[0]} fluctuate {claim.measures[0].ratio:.1f}x as "
                  f"much as at B = {bs[-1]} in loss units and {claim.measures[1].ratio:.1f}x "
                  "relative to the loss level, falling with every step up in batch size.")
    elif claim.verdict == NOT_SUPPORTED:
        reason = "The smallest batch size gives the smoother curve."
    else:
        reason = (f"The two measures disagree or do not separate (R: {outcomes[0]}, R_rel: "
                  f"{outcomes[1]}).")
    return ClaimText(test, evidence, reason)


def _generalisation_text(claim: GeneralisationClaim, summary: dict[int, BatchSummary]
                         ) -> ClaimText:
    test = ("Final generalisation gap (validation loss - training loss, both at the final "
            "parameters), smallest against largest batch size, with SE over seeds. The claim "
            f"holds if the smallest batch size's gap is significantly smaller (one-sided Welch t "
            f"test, p < {ALPHA:g}) and fails if it is significantly larger. Runs compare at "
            "equal epochs, so the smaller batch size has taken more optimizer steps.")
    bs = claim.batch_sizes
    evidence = [f"B = {b}: loss gap {fmt_estimate(summary[b]['gap_loss'])}, accuracy gap "
                f"{fmt_estimate(summary[b]['gap_accuracy'])}, val accuracy "
                f"{fmt_estimate(summary[b]['val_accuracy'])}, val loss "
                f"{fmt_estimate(summary[b]['val_loss'])}" for b in bs]
    if claim.gap is None:
        return ClaimText(test, evidence, "Only one batch size.")
    b0, b1 = bs[0], bs[-1]
    evidence.append(f"loss gap({b0}) - loss gap({b1}) = {_diff_text(claim.gap, '.4f')}")
    evidence.append(f"val accuracy({b0}) - val accuracy({b1}) = "
                    f"{_diff_text(claim.accuracy, '.4f')}")
    if not claim.gap.known:
        reason = f"At {claim.seeds} seed(s) the seed-to-seed uncertainty cannot be estimated."
    elif claim.verdict == SUPPORTED:
        reason = f"B = {b0} ends with a smaller gap than B = {b1}."
    elif claim.verdict == NOT_SUPPORTED:
        steps0, steps1 = summary[b0]["steps"].mean, summary[b1]["steps"].mean
        reason = (f"B = {b0} ends with a larger gap than B = {b1} (after {steps0:,.0f} vs "
                  f"{steps1:,.0f} steps): at equal epochs the smaller batch fits the training "
                  "set more closely.")
        if claim.accuracy.direction() > 0:
            reason += (f" Its validation accuracy is nevertheless higher by "
                       f"{100 * claim.accuracy.diff:.1f} points ({t_text(claim.accuracy)}): it "
                       "generalises no better by the gap, but ends more accurate on held-out "
                       "data.")
    else:
        reason = f"The gaps do not differ significantly ({t_text(claim.gap)})."
    return ClaimText(test, evidence, reason)


def _speed_text(claim: SpeedClaim, summary: dict[int, BatchSummary]) -> ClaimText:
    test = ("Read as the trade-off it describes: an epoch takes less wall time at a larger batch "
            "size, yet a smaller batch size reaches a target validation accuracy in fewer seconds. "
            "(If 'progress faster per epoch' meant more progress per epoch, both halves could not "
            "hold at once unless small-batch epochs were also faster; epochs to target are listed "
            "for that reading.) The SE of an epoch time is over epochs; the SE of the time to "
            "target adds the seed-to-seed spread and the epoch-time jitter in quadrature. Each "
            f"half is a one-sided t test at p < {ALPHA:g}: Welch's for the epoch times, and for "
            "the times to target the df of the summed variances (Satterthwaite).")
    bs = claim.batch_sizes
    target = claim.target
    target_text = f"{100 * target:.1f}%" if target is not None else "n/a"
    evidence = [f"target validation accuracy: {target_text}"]
    for b in bs:
        row = summary[b]
        evidence.append(f"B = {b}: {fmt_estimate(row['epoch_seconds'], '.3f')} s per epoch; to "
                        f"target: {fmt_estimate(row['epochs_to_target'], '.1f')} epochs, "
                        f"{fmt_estimate(row['steps_to_target'], '.0f')} steps, "
                        f"{fmt_estimate(row['seconds_to_target'], '.2f')} s")
    if claim.epoch_time_test is None:
        return ClaimText(test, evidence, "Needs two batch sizes and a reachable target.")
    b0, b1 = bs[0], bs[-1]
    epoch_test, target_test = claim.epoch_time_test, claim.time_to_target_test
    evidence.append(f"epoch time({b0}) - epoch time({b1}) = "
                    f"{_diff_text(epoch_test, '.3f', ' s', 'SE over epochs')}")
    evidence.append(f"time to target({b0}) - time to target({b1}) = "
                    f"{_diff_text(target_test, '.2f', ' s')}")
    if claim.fastest is not None:
        evidence.append(f"fastest to the target: B = {claim.fastest} "
                        f"({summary[claim.fastest]['seconds_to_target'].mean:.2f} s); the "
                        f"verdict compares the pre-set pair B = {b0} and B = {b1}")
    e0, e1 = summary[b0]["epochs_to_target"].mean, summary[b1]["epochs_to_target"].mean
    evidence.append(f"per epoch of data, B = {b0 if e0 < e1 else b1} gets to the target sooner "
                    f"({e0:.1f} vs {e1:.1f} epochs)" if e0 != e1 else
                    f"both reach the target after {e0:.1f} epochs")
    t0, t1 = claim.epoch_time[b0].mean, claim.epoch_time[b1].mean
    s0, s1 = summary[b0]["seconds_to_target"].mean, summary[b1]["seconds_to_target"].mean
    faster_epochs, faster_target = epoch_test.direction() > 0, target_test.direction() < 0
    if not (epoch_test.known and target_test.known):
        reason = "The uncertainty of the times cannot be estimated at this number of seeds."
    elif claim.verdict == SUPPORTED:
        reason = (f"Epochs at B = {b1} take {t1 / t0:.2f}x the time of those at B = {b0}, but "
                  f"B = {b0} reaches {target_text} in {s0:.2f} s against {s1:.2f} s.")
    elif claim.verdict == NOT_SUPPORTED:
        reason = (f"B = {b1} " + ("does not run epochs faster" if epoch_test.direction() < 0
                                  else f"reaches {target_text} sooner in wall time")
                  + f" than B = {b0}.")
    else:
        halves = [(f"epochs take {t1:.3f} s at B = {b1} against {t0:.3f} s at B = {b0} "
                   f"({t_text(epoch_test)})"),
                  (f"B = {b0} reaches {target_text} in {s0:.2f} s against {s1:.2f} s at "
                   f"B = {b1} ({t_text(target_test)})")]
        reason = (f"The first half {'holds' if faster_epochs else 'is undecided'}: "
                  f"{halves[0]}; the second {'holds' if faster_target else 'is undecided'}: "
                  f"{halves[1]}. Validation runs only at epoch ends, so times to target move in "
                  "whole epochs.")
    return ClaimText(test, evidence, reason)


_BALANCE_NAMES = {"val_accuracy": ("final validation accuracy", ".4f"),
                  "seconds_to_target": ("time to target (s)", ".2f")}


def _balance_text(claim: BalanceClaim, summary: dict[int, BatchSummary]) -> ClaimText:
    b_mid = claim.batch_size
    test = (f"Judged from claims 1-4: B = {b_mid} strikes the balance if neither its final "
            "validation accuracy nor its time to the target is significantly worse than the "
            f"best batch size's (one-sided t tests, p < {ALPHA:g}; or it is the best), and its "
            "curve is significantly smoother than the smallest batch size's. It fails if it is "
            "significantly worse than the best on either, or significantly rougher than the "
            "smallest.")
    evidence = ["claims 1-4: " + ", ".join(f"{n} {v}" for n, v in claim.prior)]
    if claim.b_simple_end:
        evidence.append("B_simple at the end of training (batch sizes well below it are "
                        "noise-dominated, McCandlish et al. 2018): " + "; ".join(
                            f"{b}: {fmt_estimate(e, '.0f')}" for b, e in
                            claim.b_simple_end.items()))
    if not claim.in_sweep:
        return ClaimText(test, evidence, f"B = {b_mid} and at least one other batch size must "
                                         "be in the sweep.")
    failed = []
    for c in claim.checks:
        if c.key == "roughness":
            evidence.append(f"roughness: B = {b_mid} vs B = {c.against}: "
                            f"{_diff_text(c.test, '.4f')}")
            if c.outcome == "failed":
                failed.append(f"a smoother curve than B = {c.against}")
            continue
        name, fmt = _BALANCE_NAMES[c.key]
        if c.outcome == "best":
            evidence.append(f"{name}: B = {b_mid} is the best")
        elif c.test is not None:
            evidence.append(f"{name}: B = {b_mid} vs the best (B = {c.against}): "
                            f"{_diff_text(c.test, fmt)}")
        if c.outcome == "failed":
            failed.append(name)
    if claim.verdict == NOT_SUPPORTED:
        reason = f"B = {b_mid} falls short on: {', '.join(failed)}."
    elif claim.verdict == INCONCLUSIVE:
        reason = (f"Some comparisons cannot be decided at {summary[b_mid]['val_accuracy'].n} "
                  "seed(s).")
    else:
        reason = (f"B = {b_mid} is as accurate and as fast to the target as the best batch size "
                  f"within the uncertainty, with a smoother curve than B = "
                  f"{list(summary)[0]}.")
    return ClaimText(test, evidence, reason)


def claim_text(claim: Claim, analysis: Analysis) -> ClaimText:
    """The test, evidence and reason of one claim of `analysis`, in words."""
    summary = analysis.summary
    if isinstance(claim, NoiseClaim):
        return _noise_text(claim)
    if isinstance(claim, RoughnessClaim):
        return _roughness_text(claim, summary)
    if isinstance(claim, GeneralisationClaim):
        return _generalisation_text(claim, summary)
    if isinstance(claim, SpeedClaim):
        return _speed_text(claim, summary)
    return _balance_text(claim, summary)


def claim_markdown(claim: Claim, analysis: Analysis) -> str:
    text = claim_text(claim, analysis)
    lines = [f"### Claim {claim.number}: {claim.statement}", "",
             f"**Verdict: {claim.verdict}.** {text.reason}", "", f"*Test.* {text.test}", ""]
    lines += [f"- {e}" for e in text.evidence]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Beyond the original: sharpness


def _loss_ratio_text(analysis: Analysis) -> str:
    bs = analysis.batch_sizes
    losses = analysis.sharpness.train_loss
    small, large = losses[bs[0]], losses[bs[-1]]
    if not (np.isfinite(small) and np.isfinite(large) and small > 0 and large > 0):
        return ""
    ratio = large / small
    return (f", where B = {bs[0]} also ended at a {ratio:.2g}x lower training loss (see the "
            "confound)" if ratio > 1 else f", where B = {bs[0]} ended at a {1 / ratio:.2g}x "
            "HIGHER training loss")


def sharpness_section(analysis: Analysis) -> list[str]:
    """Markdown lines of the section testing the "sharp minima" claim (Keskar et al. 2017)."""
    title = "## Sharp minima (Keskar et al. 2017)"
    statement = ("Keskar et al. (2017, arXiv:1609.04836) report that large-batch training "
                 "converges to sharp minimizers of the training loss and small-batch training to "
                 "flat ones, and that the sharp ones generalise worse; the original write-up "
                 "speaks of large batches settling in \"sharp local minima\".")
    s = analysis.sharpness
    if not s.measured:
        return [title, "", statement, "", "Not measured in this sweep (run with --sharpness).",
                ""]
    summary, bs = analysis.summary, s.batch_sizes
    settings = (f"the Hessian of the mean training loss over the first "
                f"{s.probe_examples or '?':,} training examples at each run's final parameters; "
                f"lambda_max by Lanczos on Hessian-vector products to a relative Ritz residual of "
                f"{s.tol if s.tol is not None else '?'}, tr(H) by Hutchinson's estimator with "
                f"{s.hutchinson_samples} Rademacher probes")
    lines = [title, "", statement, "",
             f"*Measured:* {settings}. Every run stops after the same "
             "number of epochs, so batch sizes are compared at equal epochs (not at equal "
             "steps or equal training loss). Mean ± s.d. over seeds; diverged runs have no "
             "sharpness and are left out. Smallest against largest batch size by one-sided "
             f"Welch t tests at p < {ALPHA:g}; log-log slopes over runs with t intervals.", "",
             "| B | lambda_max | tr(H) | lambda_min | final train loss | loss gap | "
             "val accuracy |", "|---|---|---|---|---|---|---|"]
    for b in bs:
        row = summary[b]
        lines.append(f"| {b} | {fmt_estimate(row['lambda_max'], '.3g')} | "
                     f"{fmt_estimate(row['hessian_trace'], '.3g')} | "
                     f"{fmt_estimate(row['lambda_min'], '.3g')} | "
                     f"{fmt_estimate(row['train_loss'], '.4f')} | "
                     f"{fmt_estimate(row['gap_loss'], '.4f')} | "
                     f"{fmt_estimate(row['val_accuracy'], '.4f')} |")
    lines.append("")
    evidence = []
    for m in s.measures:
        if m.test is None:
            continue
        name = "lambda_max" if m.key == "lambda_max" else "tr(H)"
        slope = (f"{m.slope.slope:+.2f} ± {m.slope.se:.2f} (95% interval [{m.slope.lo:+.2f}, "
                 f"{m.slope.hi:+.2f}], {_fmt_df(m.slope.df)} df)" if m.slope is not None
                 else "n/a")
        evidence.append(f"{name}({bs[0]}) - {name}({bs[-1]}) = {m.test.diff:+.4g} ± "
                        f"{plain_number(m.test.se, 2)} (SE), {t_text(m.test)}; log2-log2 slope "
                        f"against B over {m.points} runs: {slope}")
    if np.isfinite(s.correlation):
        evidence.append(f"correlation of log lambda_max with the loss gap over "
                        f"{s.correlation_runs} runs: r = {s.correlation:+.2f} (runs of all batch "
                        "sizes pooled, so it mixes the batch size's effect on both)")
    if s.runs:
        median = s.median_negative_ratio
        evidence.append(f"lambda_min < 0 in {s.negative}/{s.runs} runs"
                        + (f" (median |lambda_min| / lambda_max = {median:.2g})"
                           if np.isfinite(median) else "")
                        + (": the end points are minima up to nearly flat directions"
                           if median < 1e-3 else
                           ": the end points are not minima, as usual for a network trained "
                           "for a fixed number of epochs" if s.negative else ""))
    if s.unconverged:
        evidence.append(f"Lanczos did not reach its tolerance in {s.unconverged} run(s); "
                        "their lambda_max is a lower bound")
    outcomes = [m.outcome for m in s.measures]
    if "unknown" in outcomes or len(bs) < 2:
        reason = ("Only one batch size." if len(bs) < 2 else
                  f"At {summary[bs[0]]['lambda_max'].n} seed(s) the seed-to-seed uncertainty "
                  "cannot be estimated.")
    elif s.verdict == SUPPORTED:
        reason = (f"B = {bs[0]} ended at a flatter point than B = {bs[-1]} by both measures "
                  f"(lambda_max {s.lambda_ratio:.2g}x smaller), significantly, at equal epochs"
                  + _loss_ratio_text(analysis) + ".")
    elif s.verdict == NOT_SUPPORTED:
        reason = (f"B = {bs[0]} ended at a SHARPER point than B = {bs[-1]} by both measures, "
                  "significantly, at equal epochs" + _loss_ratio_text(analysis) + ".")
    else:
        reason = (f"lambda_max and tr(H) do not both separate the smallest from the largest "
                  f"batch size in the same direction (lambda_max: {outcomes[0]}, tr(H): "
                  f"{outcomes[1]} at B = {bs[0]} relative to B = {bs[-1]}).")
    losses = s.train_loss
    confound = ("*Confound.* The comparison is at equal epochs, and the runs end at different "
                "training losses")
    if len(bs) > 1 and all(np.isfinite(list(losses.values()))):
        confound += (f": {losses[bs[0]]:.4f} at B = {bs[0]} against {losses[bs[-1]]:.4f} at "
                     f"B = {bs[-1]} (final parameters, whole training set)")
    confound += (". The Hessian of the softmax cross-entropy is weighted by the predicted "
                 "probabilities' variance p(1 - p), which vanishes as the training examples are "
                 "fitted with growing confidence: a run that has gone further down the loss is "
                 "flatter for that reason alone, whatever its batch size. Sharpness measured "
                 "once at the end cannot separate the two; comparing at equal training loss "
                 "would. Sharpness also depends on the parametrisation (Dinh et al. 2017, "
                 "arXiv:1703.04933), so it is a description of these runs, not a cause of the "
                 "gap.")
    lines += [f"**Smaller batches ended in flatter minima here: {s.verdict}.** {reason}", ""]
    lines += [f"- {e}" for e in evidence] + ["", confound, ""]
    corr = s.correlation
    if np.isfinite(corr):
        lines += [f"*Sharper and worse?* Across runs, r = {corr:+.2f} between log lambda_max "
                  "and the loss gap: " + ("sharper end points went with larger gaps" if
                                          corr > 0.5 else "sharper end points went with "
                                          "SMALLER gaps" if corr < -0.5 else
                                          "no strong relation") + " in this sweep.", ""]
    return lines


# --------------------------------------------------------------------------------------------
# Beyond the original: the critical batch size


def _chosen(target: TargetAnalysis) -> str:
    if target.given:
        return "given"
    if target.kind == "train_loss":
        return ("the lowest smoothed training loss every run reaches, rounded up to two "
                "significant digits")
    return "the best validation accuracy every run reaches, rounded down to 0.5 points"


def critical_record(analysis: CriticalAnalysis) -> dict:
    """The critical-batch-size analysis as plain values (NaN: not reached), for critical.json."""
    def target(t: TargetAnalysis) -> dict:
        return {"kind": t.kind, "target": t.target, "chosen": _chosen(t),
                "batch_sizes": t.batch_sizes, "seeds": t.seeds, "steps": t.steps,
                "examples": t.examples, "upper_bound": t.upper_bound,
                "fit": t.fit.to_dict() if t.fit is not None else None, "note": t.note,
                "fit_df": t.fit_df, "b_crit_t_interval": t.b_crit_t_interval}

    return {"primary": target(analysis.primary), "secondary": target(analysis.secondary),
            "b_simple_mean": analysis.b_simple.mean, "b_simple_sd": analysis.b_simple.sd,
            "b_simple_runs": analysis.b_simple.n,
            "b_simple_to_primary_target_mean": analysis.b_simple_to_target.mean,
            "b_simple_by_batch_size": {b: e.mean for b, e in
                                       analysis.b_simple_by_batch_size.items()}}


def _target_lines(target: TargetAnalysis, heading: str, caveat: str) -> list[str]:
    lines = [f"### {heading}: {target.label}", "",
             f"Target: {target.label} ({_chosen(target)}). {caveat}", ""]
    if target.target is None:
        return lines + [f"**No fit:** {target.note}.", ""]
    fit, bounds = target.fit, target.regimes
    lines += ["| B | steps to target | examples to target | seeds reached | regime |",
              "|---|---|---|---|---|"]
    for b, steps, examples, reached, n_up in target.by_batch_size():
        regime = bounds.regime(b).replace("_", " ") if bounds else "-"
        if fit is not None and float(b) not in fit.batch_sizes:
            regime += " (not in fit)"
        mark = ""
        if n_up:
            mark = (f" ({n_up} at the first evaluation: upper bound)"
                    if target.kind == "val_accuracy" else f" ({n_up} at step 0: not fitted)")
        lines.append(f"| {b} | {fmt_estimate(steps, '.0f')} | {fmt_estimate(examples, '.0f')} "
                     f"| {reached}/{len(target.seeds)}{mark} | {regime} |")
    lines.append("")
    if fit is None:
        return lines + [f"**No fit:** {target.note}.", ""]
    intervals = ""
    if target.b_crit_t_interval is not None:
        lo, hi = target.b_crit_t_interval
        intervals += (f"; 95% t interval on {target.fit_df} df [{_number(lo)}, "
                      f"{_number(hi)}]")
    if fit.b_crit_interval and fit.num_seeds >= 3:
        intervals += (f"; 95% bootstrap interval over seeds [{_number(fit.b_crit_interval[0])}, "
                      f"{_number(fit.b_crit_interval[1])}]")
    b_text = (f"**B_crit = {_number(fit.b_crit)} ± {_spread(fit.b_crit_stderr, fit.b_crit)}** (± SE "
              f"of the weighted fit, delta method{intervals})")
    n_fit = len(fit.batch_sizes)
    lines.append(f"Fit over B = {', '.join(f'{b:g}' for b in fit.batch_sizes)}"
                 + (f" (left out: {', '.join(f'{b:g}' for b in fit.excluded_batch_sizes)})"
                    if fit.excluded_batch_sizes else "")
                 + f": S_min = {_number(fit.s_min)} ± {_spread(fit.s_min_stderr, fit.s_min)} steps, "
                 f"E_min = {_number(fit.e_min)} ± {_spread(fit.e_min_stderr, fit.e_min)} examples, "
                 f"{b_text}; relative rms residual {_spread(fit.rms_relative_residual)}."
                 + (f" With {n_fit} batch sizes the residual SE rests on {n_fit - 2} degree(s) "
                    "of freedom and S_min on the largest one or two batch sizes; "
                    + ("the bootstrap interval is the better guide, and "
                       if fit.b_crit_interval and fit.num_seeds >= 3 else "")
                    + "--preset critical (8 batch sizes) is the better experiment."
                    if n_fit < 5 else ""))
    if bounds:
        lines.append(f"Regimes (Shallue et al. 2019; factor {bounds.factor:g}): perfect scaling "
                     f"for B ≤ {_number(bounds.perfect_scaling_max)}, diminishing "
                     f"returns in between, maximal data parallelism for B ≥ "
                     f"{_number(bounds.maximal_parallelism_min)}.")
    else:
        lines.append(f"The fit is not of the model's shape (S_min = {fit.s_min:.3g}, E_min = "
                     f"{fit.e_min:.3g}): no B_crit or regimes to report.")
    return lines + [""]


def critical_section(analysis: Analysis) -> list[str]:
    """Markdown lines of the critical-batch-size section."""
    results, crit = analysis.results, analysis.critical
    lines = ["## Critical batch size (McCandlish et al. 2018)", "",
             "McCandlish et al. (2018, arXiv:1812.06162, eq. 2.11) model the optimizer steps S "
             "and examples E = B S needed to reach a target as (S / S_min - 1)(E / E_min - 1) = "
             "1, i.e. S(B) = S_min + E_min / B, with the critical batch size B_crit = E_min / "
             "S_min: below it, doubling B nearly halves the steps; above it, it barely saves "
             "any. Steps to target are the first crossing per run; the fit uses the mean over "
             "seeds of each batch size that every seed brought to the target, weighted by "
             "relative error (`batchjax.critical`).", ""]
    lines += _target_lines(
        crit.primary, "Primary target",
        f"Per-step resolution: every step's minibatch loss, smoothed by a centred moving "
        f"average over {LOSS_WINDOW_EXAMPLES:,} examples, crossing interpolated "
        "between steps.")
    n_val = results.dataset.get("num_train", 0)
    lines += _target_lines(
        crit.secondary, "Secondary target",
        "Resolution caveat: validation runs only at epoch ends, so the crossing is "
        "interpolated between two evaluations one epoch apart"
        + (f" ({n_val // results.batch_sizes[0]:,} steps at B = {results.batch_sizes[0]})"
           if n_val and results.batch_sizes else "")
        + "; a run already at the target at its first evaluation gives only an upper bound "
          "and is left out of the fit.")
    lines += ["### B_crit against the measured noise scale", ""]
    b_simple = crit.b_simple
    if not b_simple.n:
        return lines + ["No gradient-noise records: B_simple is unavailable (run with "
                        "--noise-every epoch).", ""]
    per_b = "; ".join(f"{b}: {fmt_estimate(e, '.0f')}" for b, e in
                      crit.b_simple_by_batch_size.items() if e.n)
    lines += [f"B_simple = tr(Sigma) / |G|^2 averaged over training (each run's mean over its "
              f"{crit.records_per_run} noise records, then over {b_simple.n} runs): "
              f"**{fmt_estimate(b_simple, '.0f')}** (mean ± s.d. over runs; per batch size: "
              f"{per_b}).", ""]
    early = crit.b_simple_to_target
    if early.n:
        lines += [f"Averaged only over the records up to each run's crossing of the primary "
                  f"target (the part of training that the steps to target count; the noise "
                  f"scale grows as the loss falls): {fmt_estimate(early, '.0f')} over "
                  f"{early.n} runs.", ""]
    lines.append("The paper derives B_crit ≈ B_noise for SGD near a quadratic minimum, with "
                 "B_simple equal to B_noise when the Hessian is a multiple of the identity, and "
                 "finds B_simple a good predictor of the measured B_crit up to a factor of order "
                 "one. This sweep trains with Adam, whose per-parameter step sizes are outside "
                 "that derivation.")
    lines.append("")
    for target in crit.targets:
        fit = target.fit
        if fit is None or not fit.valid:
            lines.append(f"- {target.label}: no B_crit to compare"
                         + (f" ({target.note})" if target.note else "") + ".")
            continue
        ratio = fit.b_crit / b_simple.mean
        inside = ""
        if fit.b_crit_interval and fit.num_seeds >= 3:
            lo, hi = fit.b_crit_interval
            where = "inside" if lo <= b_simple.mean <= hi else "outside"
            inside = f" B_simple lies {where} the bootstrap interval of B_crit."
        lines.append(f"- {target.label}: B_crit = {_number(fit.b_crit)} ± "
                     f"{_spread(fit.b_crit_stderr, fit.b_crit)} against B_simple = "
                     f"{b_simple.mean:.0f}: B_crit / B_simple = {ratio:.2g}." + inside)
    lines.append("")
    primary = crit.primary.fit
    if primary is not None and primary.valid:
        ratio = primary.b_crit / b_simple.mean
        found = (f"with Adam, B_crit and B_simple agree within a factor of "
                 f"{max(ratio, 1 / ratio):.2g}." if 0.5 <= ratio <= 2 else
                 f"with Adam, B_crit is {ratio:.2g} times B_simple averaged over training: "
                 + ("the benefit of larger batches saturates well before the gradient noise "
                    "scale predicts." if ratio < 1 else "larger batches keep paying off "
                    "beyond the gradient noise scale."))
        if early.n:
            found += (f" Up to the target, B_crit / B_simple = "
                      f"{primary.b_crit / early.mean:.2g}.")
        lines += ["**Found (primary target):** " + found, ""]
    return lines


# --------------------------------------------------------------------------------------------
# The critical batch size with the learning rate tuned per batch size (issue #15)

_EDGE_WORDS = {"low": "smallest", "high": "largest", "single": "only"}
_OUTCOME_SHORT = {DIVERGED: "diverged", HOPELESS: "hopeless", BUDGET: "budget",
                  NOT_REACHED: "not reached", MISSING: "missing", AT_START: "at step 0"}
_OPTIMIZER_NAMES = {"sgd": "SGD", "momentum": "SGD with momentum", "nesterov": "Nesterov SGD",
                    "adam": "Adam", "adam_keras": "Adam (Keras)"}


def _rate(value: float) -> str:
    return plain_number(value, 3)


def _interval(lo_hi: tuple[float, float] | None, fmt=None) -> str:
    fmt = fmt or _number
    return f"[{fmt(lo_hi[0])}, {fmt(lo_hi[1])}]" if lo_hi is not None else "n/a"


def _optimizer_name(name: str) -> str:
    return _OPTIMIZER_NAMES.get(name, name)


def _grid_of(analysis: Analysis) -> GridAnalysis:
    if analysis.grid is None:
        raise BatchjaxError(f"{analysis.results.path} is not a learning-rate grid sweep (one "
                            "learning rate per batch size); its report is build_report's")
    return analysis.grid


def _flags(rates: BatchRates) -> str:
    flags = []
    if rates.best is None:
        flags.append("**no rate reached** (left out of every fit)")
    elif rates.unreliable:
        direction = {"low": "down", "high": "up"}.get(rates.edge)
        times = rates.extended.count(direction) if direction else 0
        ext = (f" after {times} extension{'s' if times != 1 else ''} {direction}"
               if times else ", grid not extended")
        flags.append(f"**unreliable**: best is the {_EDGE_WORDS[rates.edge]} rate{ext} "
                     "(out of the rate fits; its S is an upper bound"
                     + ("; a resumed sweep may extend the grid further)"
                        if rates.extended and rates.extensions_left else ")"))
    elif rates.extended:
        flags.append("grid extended " + ", ".join(rates.extended))
    choice = rates.choice
    if len(choice.ties) > 1:
        flags.append("exact tie with " + ", ".join(_rate(rates.cells[i].learning_rate)
                                                    for i in choice.ties[1:])
                     + " (the smaller rate taken)")
    for i in choice.faster_partial:
        cell = rates.cells[i]
        flags.append(f"rate {_rate(cell.learning_rate)} faster on the {cell.reached}/"
                     f"{len(cell.seeds)} seeds that reached (not eligible)")
    return "; ".join(flags) or "-"


def _not_reached_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {_OUTCOME_SHORT.get(k, k)}" for k, n in sorted(counts.items())) or "0"


def grid_table(grid: GridAnalysis) -> list[str]:
    """Markdown lines: per batch size the best rate, S(B) and E(B) there, and the flags."""
    lines = ["| B | best rate | rates tried | near-best rates | S(B) steps | 95% t interval | "
             "E(B) examples | runs not reaching (all rates) | flags |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b, r in grid.rates.items():
        tried = (f"{len(r.cells)} ({_rate(r.learning_rates[0])}..{_rate(r.learning_rates[-1])})"
                 if r.cells else "0")
        if r.best is None:
            lines.append(f"| {b} | - | {tried} | - | - | - | - | "
                         f"{_not_reached_text(r.not_reached())} | {_flags(r)} |")
            continue
        steps = r.steps
        near = ", ".join(_rate(r.cells[i].learning_rate) for i in r.choice.near)
        interval = (f"[{steps.lo:.0f}, {steps.hi:.0f}]" if np.isfinite(steps.lo) else "n/a")
        lines.append(f"| {b} | {_rate(r.best.learning_rate)} | {tried} | {near} | "
                     f"{fmt_estimate(steps, '.0f')} | {interval} | "
                     f"{fmt_estimate(r.examples, '.0f')} | "
                     f"{_not_reached_text(r.not_reached())} | {_flags(r)} |")
    return lines


def rates_table(grid: GridAnalysis) -> list[str]:
    """Markdown lines: per batch size, every rate tried with its mean steps to the target over
    the seeds that reached it and how many did (the best in bold; a dash: none reached)."""
    lines = ["| B | each rate: mean steps to the target (seeds reached; why not) |", "|---|---|"]
    for b, r in grid.rates.items():
        cells = []
        for cell in r.cells:
            counts = cell.outcomes()
            why = ", ".join(f"{n} {_OUTCOME_SHORT[k]}" for k, n in sorted(counts.items())
                            if k != "reached")
            steps = f"{cell.steps.mean:.0f}" if cell.steps.n else "-"
            text = (f"{_rate(cell.learning_rate)}: {steps} ({cell.reached}/{len(cell.seeds)}"
                    + (f"; {why}" if why else "") + ")")
            cells.append(f"**{text}**" if cell is r.best else text)
        lines.append(f"| {b} | " + " · ".join(cells) + " |")
    return lines


def _fit_lines(grid: GridAnalysis) -> list[str]:
    fit = grid.fit
    if fit is None:
        return [f"**No fit of eq. 2.11:** {grid.fit_note}.", ""]
    left_out = [b for b in grid.batch_sizes if float(b) not in fit.batch_sizes]
    intervals = f"95% t interval on {grid.fit_df} df {_interval(grid.b_crit_t_interval)}"
    if fit.b_crit_interval is not None:
        intervals += (f"; 95% bootstrap interval {_interval(fit.b_crit_interval)} over "
                      f"{grid.num_bootstrap} draws of the seeds within each batch size, the "
                      "best rate re-selected in each")
    lines = [f"Eq. 2.11 at the best rates, over B = {', '.join(f'{b:g}' for b in fit.batch_sizes)}"
             + (f" (left out, no rate reached: {', '.join(map(str, left_out))})"
                if left_out else "")
             + f": S_min = {_number(fit.s_min)} ± {_spread(fit.s_min_stderr, fit.s_min)} steps, "
             f"E_min = {_number(fit.e_min)} ± {_spread(fit.e_min_stderr, fit.e_min)} examples, "
             f"**B_crit = {_number(fit.b_crit)}** ({intervals}); relative rms residual "
             f"{_spread(fit.rms_relative_residual)}."]
    if fit.valid and not min(fit.batch_sizes) <= fit.b_crit <= max(fit.batch_sizes):
        lines.append(f"B_crit lies outside the batch sizes fitted ({min(fit.batch_sizes):g} to "
                     f"{max(fit.batch_sizes):g}): an extrapolation of the model.")
    if not fit.valid:
        lines.append(f"The fit is not of the model's shape (S_min = {fit.s_min:.3g}, E_min = "
                     f"{fit.e_min:.3g}): no B_crit to compare.")
    elif grid.regimes is not None:
        bounds = grid.regimes
        lines.append(f"Regimes (factor {bounds.factor:g}): perfect scaling for B ≤ "
                     f"{_number(bounds.perfect_scaling_max)}, maximal data parallelism for "
                     f"B ≥ {_number(bounds.maximal_parallelism_min)}.")
    robust = grid.fit_without_unreliable
    if robust is not None:
        lines.append(f"Without the unreliable batch sizes ({', '.join(map(str, grid.unreliable))}"
                     f"): B_crit = {_number(robust.b_crit)}"
                     + ("" if robust.valid else " (not of the model's shape)") + ".")
    elif grid.unreliable and fit is not None:
        lines.append(f"The unreliable batch sizes ({', '.join(map(str, grid.unreliable))}) stay "
                     "in this fit (their steps are upper bounds); too few others remain to fit "
                     "without them.")
    return lines + [""]


def _scaling_lines(grid: GridAnalysis) -> list[str]:
    s = grid.scaling
    excluded = "; ".join(f"B = {b}: {why}" for b, why in s.excluded)
    optima = ", ".join(f"{b}: {_rate(v)}" for b, v in zip(s.batch_sizes, s.learning_rates))
    lines = ["*Best learning rate against B* over B = "
             + (", ".join(map(str, s.batch_sizes)) or "none")
             + (f" (left out: {excluded})" if excluded else "") + ". Each point is the "
             "vertex of the parabola through log mean steps against log rate at the best grid "
             "rate and its two neighbours (the grid rate itself where a neighbour did not "
             "reach the target): a grid a factor 2 apart knows its best rate only to a factor "
             "sqrt(2) either way, and each grid is centred on a guess scaled from the best "
             "rate of the batch size before, so grid rates alone would hand the fits the "
             "search's own scaling" + (f". Optima: {optima}." if optima else ".")]
    if s.eq27 is None and s.power is None:
        return lines + [f"No fit: {s.note}.", ""]
    fit = s.eq27
    if fit is not None:
        if fit.identified:
            text = (f"eps_max = {_rate(fit.eps_max)} (95% t interval on {fit.df} df "
                    f"{_interval(fit.eps_max_interval, _rate)}), B_noise = "
                    f"{_number(fit.b_noise)} ({_interval(fit.b_noise_interval)}); rms residual "
                    f"of ln eps {_spread(fit.rms_log_residual)}")
        else:
            text = (f"B_noise is not identified: the best rates are fitted best with B_noise at "
                    f"the end of the search range ({_number(fit.b_noise)}), i.e. "
                    + ("they do not grow with B over this range" if fit.b_noise < s.batch_sizes[0]
                       else "they grow in proportion to B over this range"))
        lines.append(f"- eq. 2.7, eps_opt(B) = eps_max / (1 + B_noise / B), least squares in "
                     f"log space{' (the model for SGD)' if s.primary == 'eq27' else ''}: "
                     f"{text}.")
    power = s.power
    model = " (the model for Adam)" if s.primary == "power" else ""
    if power is not None and not np.isfinite(power.se):
        lines.append(f"- power law eps ∝ B^k{model}: k = {power.slope:+.2f}, the points exactly "
                     "on a line (no residual: no interval, no test).")
    elif power is not None:
        half, one = power.test(0.5), power.test(1.0)
        lines.append(f"- power law eps ∝ B^k{model}: k = {power.slope:+.2f} ± "
                     f"{power.se:.2f} (95% t interval on {_fmt_df(power.df)} df "
                     f"[{power.lo:+.2f}, {power.hi:+.2f}]); against the "
                     f"square-root rule k = 1/2: {t_text(half, 'two')}; against linear scaling "
                     f"k = 1: {t_text(one, 'two')}.")
    return lines + [""]


def _comparison_sentence(name: str, grid: GridAnalysis) -> str:
    fit, noise = grid.fit, grid.noise
    who = _optimizer_name(name)
    if fit is None or not fit.valid:
        return f"With {who}: no B_crit, so no comparison ({grid.fit_note or 'fit not valid'})."
    if noise is None:
        return (f"With {who}: B_crit = {_number(fit.b_crit)}; no gradient-noise records along "
                "the best runs, so no comparison with B_simple.")
    ratio, (lo, hi) = noise.ratio, noise.ratio_interval
    numbers = (f"B_simple = {_number(noise.b_simple.mean)} against B_crit = "
               f"{_number(fit.b_crit)}: B_simple / B_crit = {ratio:.2g} (95% t interval "
               f"[{lo:.2g}, {hi:.2g}]; {t_text(noise.test, 'two')})")
    outcome = noise.outcome
    if outcome == "larger":
        verdict = (f"the noise scale is {ratio:.2g} times the critical batch size, significantly "
                   "more: measured this way, B_simple overestimates B_crit")
    elif outcome == "smaller":
        verdict = (f"the noise scale is {1 / ratio:.2g} times smaller than the critical batch "
                   "size, significantly: B_simple underestimates B_crit")
    elif outcome == "indistinguishable":
        verdict = ("the two are not significantly different: B_simple predicts B_crit within "
                   f"the uncertainty, which spans a factor {hi / lo:.2g}")
    else:
        verdict = "the uncertainty of the ratio cannot be estimated"
    caveats = []
    unreliable = [b for b in grid.unreliable if float(b) in fit.batch_sizes]
    if unreliable:
        caveats.append(f"{len(unreliable)} of the {len(fit.batch_sizes)} batch sizes in the fit "
                       "have their best rate on the grid's edge (their steps are upper bounds)")
    if not min(fit.batch_sizes) <= fit.b_crit <= max(fit.batch_sizes):
        caveats.append("B_crit lies outside the batch sizes fitted")
    caveat = f" Caveat: {'; '.join(caveats)}." if caveats else ""
    return f"With {who}, {numbers}; {verdict}.{caveat}"


def _noise_lines(grid: GridAnalysis) -> list[str]:
    noise = grid.noise
    lines = [f"*B_simple along the best runs.* Gradient noise was {grid.noise_description}. "
             "Each best run's B_simple = tr(Sigma) / |G|^2 is averaged over its training from "
             "step 0 to its crossing of the target, as a time average (the records joined by "
             "straight lines; a plain mean of log-spaced records would weigh the first steps "
             "as much as all the rest), then over its seeds, then over the batch sizes in the "
             "fit (t interval on their number - 1 df)."]
    if noise is None:
        return lines + ["No B_simple along the best runs (no noise records, or no B_crit).", ""]
    per_b = "; ".join(f"{b}: {fmt_estimate(e, '.0f')}" for b, e in noise.by_batch_size.items())
    b_simple = noise.b_simple
    lines.append(f"Per batch size (mean ± s.d. over seeds): {per_b}. Mean over batch sizes: "
                 f"**B_simple = {_number(b_simple.mean)}** (95% t interval on "
                 f"{_fmt_df(b_simple.df)} df [{_number(b_simple.lo)}, {_number(b_simple.hi)}]; "
                 f"up to {noise.records} records a run).")
    boot = (f"; over the seed bootstrap (the same draws as B_crit's, the best rate re-selected) "
            f"[{noise.ratio_bootstrap[0]:.2g}, {noise.ratio_bootstrap[1]:.2g}]"
            if noise.ratio_bootstrap else "")
    lines.append(f"B_simple / B_crit = **{noise.ratio:.2g}**: 95% t interval "
                 f"[{noise.ratio_interval[0]:.2g}, {noise.ratio_interval[1]:.2g}] (delta method "
                 f"on the logs, Satterthwaite df){boot}.")
    return lines + [""]


def grid_section(name: str, analysis: Analysis, level: int = 2) -> list[str]:
    """Markdown lines of one optimizer's grid: setup, the table, the fits, B_simple, the
    comparison sentence."""
    grid = _grid_of(analysis)
    settings = grid.settings
    h = "#" * level
    seeds = ", ".join(map(str, grid.seeds))
    stop = (f"; runs of a batch size stop once each has reached the target, diverged or run "
            f"{settings['stop_factor']:g}x the fewest steps to the target of that batch size "
            "(hopeless)" if settings.get("stop_factor") else "")
    budget = (f", or at {settings['max_epochs']} epochs (budget)"
              if settings.get("max_epochs") else "")
    source = {"manifest": "fixed by the sweep before training", "given": "given",
              "default": "the sweep recorded none: the lowest loss that some rate brings every "
                         "seed to at every batch size, rounded up"}.get(grid.target_source,
                                                                        grid.target_source)
    lines = [f"{h} {_optimizer_name(grid.optimizer)} (`{name}`)", "",
             f"Target: smoothed training loss {grid.target_loss:g} ({source}); "
             f"seeds {seeds}; {sum(len(r.cells) for r in grid.rates.values())} (batch size, "
             f"rate) pairs{stop}{budget}.", ""]
    lines += grid_table(grid) + [""]
    lines += ["Every rate tried (the best in bold; steps over the seeds that reached the "
              "target; also in `grid.csv`):", ""] + rates_table(grid) + [""]
    reasons = sorted({k for r in grid.rates.values() for k in r.not_reached()})
    if reasons:
        lines += ["Runs not reaching the target: " + "; ".join(
            f"{_OUTCOME_SHORT.get(k, k)}: {OUTCOME_TEXT.get(k, k)}" for k in reasons) + ".", ""]
    lines += _fit_lines(grid) + _scaling_lines(grid) + _noise_lines(grid)
    lines += [f"**Found:** {_comparison_sentence(name, grid)}", ""]
    return lines


_METHOD = ("Steps to the target are counted at the BEST learning rate of each batch size, as "
           "McCandlish et al. (2018, arXiv:1812.06162) and Shallue et al. (2019, "
           "arXiv:1811.03600) count them. Per batch size, each rate of its grid was trained "
           "with every seed; a run reaches the target at the first step where its per-step "
           f"training loss, smoothed by a centred moving average over {LOSS_WINDOW_EXAMPLES:,} "
           "examples, falls to it (interpolated between steps). The best rate has the fewest "
           "mean steps among the rates where EVERY seed reached the target; a run that "
           "diverged, was stopped as hopeless or at the budget, or is missing makes its rate "
           "ineligible and is counted in the table, never dropped. A best rate at either end of "
           "its grid (after the sweep's extensions) is unreliable: the optimum may lie beyond "
           "it. Near-best rates are those whose mean steps are not significantly above the "
           f"best's (one-sided Welch t test, p < {ALPHA:g}). S(B) and E(B) are the mean steps and "
           "examples over seeds at the best rate, with t intervals. Eq. 2.11, (S / S_min - 1)(E "
           "/ E_min - 1) = 1, is fitted to S(B) by relative-error least squares "
           "(`batchjax.critical`); B_crit = E_min / S_min has a t interval from the fit's "
           "residuals (delta method, on the log scale, n - 2 df) and a bootstrap interval: "
           "within each batch size the seeds are resampled with replacement and the best rate "
           "is chosen again among the eligible rates, so the interval includes the uncertainty "
           "of the choice (batch sizes are drawn independently: with 3 seeds, whole seed "
           "columns would give only 10 distinct draws; a seed's common effect on every batch "
           "size cancels in B_crit). With 3 seeds the bootstrap is coarse; the t interval is "
           "the one the verdicts use. Every verdict is a t test (no 2-SE rule).")


def _cross_optimizer_lines(grids: dict[str, GridAnalysis]) -> list[str]:
    valid = {n: g for n, g in grids.items() if g.fit is not None and g.fit.valid
             and g.fit_df > 0 and np.isfinite(g.fit.b_crit_stderr)}
    if len(valid) != 2:
        return []
    (na, a), (nb, b) = valid.items()
    diff = math.log(b.fit.b_crit) - math.log(a.fit.b_crit)
    test = stats.combined_test(diff, [((a.fit.b_crit_stderr / a.fit.b_crit) ** 2, a.fit_df),
                                      ((b.fit.b_crit_stderr / b.fit.b_crit) ** 2, b.fit_df)])
    lo, hi = test.interval()
    return [f"B_crit with {_optimizer_name(nb)} is {math.exp(diff):.2f} times B_crit with "
            f"{_optimizer_name(na)} (95% t interval [{math.exp(lo):.2f}, {math.exp(hi):.2f}] on "
            f"the logs; {t_text(test, 'two')}).", ""]


def critical_comparison(analyses: dict[str, Analysis], *,
                        figures: Sequence[str | os.PathLike] = (),
                        notes: Sequence[str] = ()) -> str:
    """The comparison report of grid sweeps, one per optimizer, as Markdown.

    Per optimizer: the table of batch sizes (best rate, S, E, flags), the fits of eq. 2.11 and
    of the best rate against B (eq. 2.7; a power law), B_crit against B_simple along the best
    runs, and a sentence that states the outcome whichever way it comes out.

    Args:
      analyses: name (e.g. "sgd", "adam_keras": the sweep directory's name) -> the `Analysis`
        of a grid sweep.
      figures: figure files to list at the end.
      notes: notes to print at the top.

    Raises:
      BatchjaxError: an analysis is not of a grid sweep, or none is given.
    """
    if not analyses:
        raise BatchjaxError("critical_comparison needs at least one grid analysis")
    grids = {name: _grid_of(a) for name, a in analyses.items()}
    first = next(iter(analyses.values())).results
    lines = ["# The critical batch size with the learning rate tuned per batch size", ""]
    all_notes = list(notes) + [f"{name}: run {run} DIVERGED at step {step}; counted as not "
                               "reaching the target" for name, a in analyses.items()
                               for run, step in a.diverged]
    if all_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    lines += [f"Data: {first.dataset_label()}. " + _METHOD, "",
              "## Summary", "",
             "| optimizer | B_crit | 95% t interval | bootstrap interval | B_simple | "
             "B_simple / B_crit | 95% t interval | outcome |", "|---|---|---|---|---|---|---|---|"]
    for name, g in grids.items():
        fit, noise = g.fit, g.noise
        crit = _number(fit.b_crit) if fit is not None and fit.valid else "n/a"
        boot = _interval(fit.b_crit_interval) if fit is not None else "n/a"
        if noise is not None:
            lines.append(f"| {_optimizer_name(g.optimizer)} | {crit} | "
                         f"{_interval(g.b_crit_t_interval)} | {boot} | "
                         f"{_number(noise.b_simple.mean)} | {noise.ratio:.2g} | "
                         f"[{noise.ratio_interval[0]:.2g}, {noise.ratio_interval[1]:.2g}] | "
                         f"{noise.outcome} |")
        else:
            lines.append(f"| {_optimizer_name(g.optimizer)} | {crit} | "
                         f"{_interval(g.b_crit_t_interval)} | {boot} | n/a | n/a | n/a | - |")
    lines.append("")
    lines += [f"- {_comparison_sentence(name, g)}" for name, g in grids.items()] + [""]
    lines += _cross_optimizer_lines(grids)
    lines.append("McCandlish et al. report B_simple for MNIST at about 900 and call it an "
                 "overestimate of B_crit there; the rows above measure both on the same runs.")
    lines.append("")
    for name, a in analyses.items():
        lines += grid_section(name, a)
    if figures:
        lines += ["## Figures", ""] + [f"- `{f}`" for f in figures] + [""]
    return "\n".join(lines)


def write_critical_comparison(analyses: dict[str, Analysis], out_dir: str | os.PathLike, *,
                              figures: Sequence[str | os.PathLike] = (),
                              notes: Sequence[str] = ()) -> str:
    """Write `critical_comparison(analyses)` to `out_dir/report.md` and every grid's
    `grid_record` to `out_dir/grids.json` (keyed by name), atomically; returns the Markdown."""
    out_dir = pathlib.Path(out_dir)
    text = critical_comparison(analyses, figures=figures, notes=notes)
    record = {name: grid_record(_grid_of(a)) for name, a in analyses.items()}
    write_bytes_atomic(out_dir / "grids.json", (json.dumps(to_jsonable(record), indent=1,
                                                           allow_nan=False) + "\n").encode())
    write_bytes_atomic(out_dir / "report.md", text.encode())
    return text


def grid_record(grid: GridAnalysis) -> dict:
    """The grid analysis as plain values (NaN: not reached), for grid.json."""
    def est(e: Estimate) -> dict:
        return {"mean": e.mean, "sd": e.sd, "n": e.n, "lo": e.lo, "hi": e.hi}

    rates = {}
    for b, r in grid.rates.items():
        rates[b] = {
            "learning_rates": r.learning_rates, "extended": r.extended,
            "best_learning_rate": r.best.learning_rate if r.best else None,
            "edge": r.edge, "unreliable": r.unreliable if r.best else None, "note": r.note,
            "near_best": [r.cells[i].learning_rate for i in r.choice.near],
            "steps": est(r.steps), "examples": est(r.examples),
            "cells": [{"learning_rate": c.learning_rate,
                       "seeds": [{"seed": s.seed, "outcome": s.outcome, "steps": s.steps,
                                  "examples": s.examples, "b_simple": s.b_simple,
                                  "run": s.name} for s in c.seeds]} for c in r.cells]}
    s, noise = grid.scaling, grid.noise
    return {
        "optimizer": grid.optimizer, "target_loss": grid.target_loss,
        "target_source": grid.target_source, "seeds": grid.seeds, "rates": rates,
        "fit": grid.fit.to_dict() if grid.fit is not None else None, "fit_df": grid.fit_df,
        "b_crit_t_interval": grid.b_crit_t_interval, "fit_note": grid.fit_note,
        "fit_without_unreliable": (grid.fit_without_unreliable.to_dict()
                                   if grid.fit_without_unreliable is not None else None),
        "scaling": {"batch_sizes": s.batch_sizes, "learning_rates": s.learning_rates,
                    "excluded": s.excluded, "primary": s.primary, "note": s.note,
                    "eq27": s.eq27.to_dict() if s.eq27 is not None else None,
                    "power": ({"k": s.power.slope, "se": s.power.se, "df": s.power.df,
                               "lo": s.power.lo, "hi": s.power.hi}
                              if s.power is not None else None)},
        "b_simple": None if noise is None else {
            "mean": noise.b_simple.mean, "lo": noise.b_simple.lo, "hi": noise.b_simple.hi,
            "by_batch_size": {b: e.mean for b, e in noise.by_batch_size.items()},
            "ratio": noise.ratio, "ratio_interval": noise.ratio_interval,
            "ratio_bootstrap": noise.ratio_bootstrap, "t": noise.test.t, "df": noise.test.df,
            "p_two_sided": noise.test.p(), "outcome": noise.outcome},
        "noise_description": grid.noise_description, "num_bootstrap": grid.num_bootstrap}


def grid_rows(grid: GridAnalysis) -> list[dict]:
    """One row per batch size, learning rate and seed: the outcome and the steps to target."""
    return [{"batch_size": b, "learning_rate": c.learning_rate, "seed": s.seed,
             "run": s.name, "outcome": s.outcome, "steps_to_target": s.steps,
             "examples_to_target": s.examples, "b_simple_to_target": s.b_simple,
             "best": r.best is c}
            for b, r in grid.rates.items() for c in r.cells for s in c.seeds]


def _head(title: str, analysis: Analysis, notes: Sequence[str], diverged_fate: str
          ) -> tuple[list[str], list[str]]:
    """A report's title and provenance lines, and its notes so far: the given ones, then one
    per diverged run saying what became of it."""
    lines = [title, ""] + _provenance_lines(analysis.results) + [""]
    all_notes = list(notes) + [f"run {name} DIVERGED at step {step} (non-finite loss); "
                               f"{diverged_fate}" for name, step in analysis.diverged]
    return lines, all_notes


def _grid_report(analysis: Analysis, figures: Sequence[str | os.PathLike],
                 notes: Sequence[str]) -> str:
    results, grid = analysis.results, analysis.grid
    lines, all_notes = _head(f"# Learning-rate grid report: {results.dataset_label()}",
                             analysis, notes, "counted as not reaching the target")
    if all_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    lines += ["## Method", "", _METHOD, ""]
    lines += grid_section(results.path.name if results.path else grid.optimizer, analysis)
    if figures:
        lines += ["## Figures", ""] + [f"- `{f}`" for f in figures] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The report


def _provenance_lines(results: SweepResults) -> list[str]:
    m = results.manifest
    sweep, config, d = m.get("sweep", {}), m.get("config", {}), results.dataset
    sessions = m.get("sessions", [])
    last = sessions[-1] if sessions else {}
    versions = last.get("versions", {})
    rate = (f"learning rate {config.get('learning_rate', '?')} ({config.get('lr_scaling', '?')} "
            f"scaling, reference B {config.get('reference_batch_size', '?')})"
            if not m.get("grid") else "learning rates: a grid per batch size (below)")
    epochs = (f"at most {m['grid']['max_epochs']} epochs" if (m.get("grid") or {}).get("max_epochs")
              else f"{config.get('epochs', '?')} epochs")
    lines = [
        f"- data: {results.dataset_label()}; source: {d.get('source', 'unknown')}",
        f"- batch sizes {', '.join(map(str, sweep.get('batch_sizes', results.batch_sizes)))}; "
        f"seeds {', '.join(map(str, sweep.get('seeds', [])))}; {epochs}; {rate}; optimizer "
        f"{config.get('optimizer', '?')}; hidden {config.get('hidden', '?')}; noise schedule "
        f"{config.get('noise_schedule', '?')}; sharpness at the end of each run: "
        + (", ".join(f"{k} {v}" for k, v in m["sharpness"].items()) if m.get("sharpness")
           else "off"),
    ]
    if last:
        lines.append(f"- device: {last.get('device_count')} x {last.get('device_kind')} "
                     f"({last.get('backend')}), {last.get('platform')}, Python "
                     f"{last.get('python')}; " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                                           if v))
        lines.append(f"- started {m.get('started')}, finished {m.get('finished') or 'not yet'}"
                     f" ({len(sessions)} session{'s' if len(sessions) != 1 else ''})")
    return lines


def build_report(analysis: Analysis, *, figures: Sequence[str | os.PathLike] = (),
                 notes: Sequence[str] = ()) -> str:
    """The report as Markdown: provenance, notes, the summary table, definitions, the claims,
    then sharpness and the critical batch size.

    Args:
      analysis: `batchjax.analysis.analyse(results, ...)`.
      figures: figure files to list.
      notes: notes to print at the top.
    """
    if analysis.grid is not None:
        return _grid_report(analysis, figures, notes)
    results, summary = analysis.results, analysis.summary
    target = analysis.target_accuracy
    target_text = "n/a" if target is None else f"{100 * target:.1f}%" + (
        " (given)" if analysis.target_accuracy_given else
        " (the best accuracy every run reaches, rounded down to 0.5 points)")
    lines, all_notes = _head(f"# Batch-size sweep report: {results.dataset_label()}",
                             analysis, notes,
                             "left out of the means and shown as diverged in the figures")
    if results.missing:
        all_notes.append("incomplete: no finished run for " + ", ".join(
            f"B = {b} seed {s}" for b, s in results.missing) + " (continue with --resume)")
    if not results.has_noise and not any("noise" in n for n in notes):
        all_notes.append("no gradient-noise records (noise schedule 'none'): B_simple and "
                         "claim 1 are unavailable, figures 4 and 5 were skipped")
    if all_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    lines += ["## Summary per batch size", "",
              f"Mean ± s.d. over seeds (up to {analysis.seeds}); diverged runs left out. Losses "
              "and accuracies at the end of training; train loss/accuracy evaluated at the final "
              "parameters; gaps as defined below; time = training + validation seconds "
              "(compilation separate; seeds train together, so times are per vmapped group). "
              "Also in `summary.csv` and `summary.tex`.", "",
              summary_markdown(summary), "",
              "## Definitions", "",
              "- **loss gap** = validation loss - training loss; **accuracy gap** = training "
              "accuracy - validation accuracy (both at the final parameters; larger = worse "
              "generalisation).",
              "- **roughness** R = sd(l_{t+1} - l_t) / sqrt(2) over the per-step training losses "
              "l_t of each epoch 2..E (epoch 1 when E = 1), partial batches left out, averaged "
              "over epochs; the first difference removes the slow trend. R is the step-to-step "
              "noise of the loss curve in loss units (a linear-scale plot). **rel. roughness** "
              "R_rel divides each epoch's R by that epoch's mean loss (a log-scale plot): at "
              "equal epochs small batches reach lower losses, whose fluctuations are smaller in "
              "absolute terms, so R_rel is the level-free comparison.",
              "- **B_simple** = tr(Sigma) / |G|^2 at the last measurement (McCandlish et al. "
              "2018).",
              "- **lambda_max**, **tr(H)**: the largest eigenvalue and the trace of the Hessian "
              "of the training loss at the final parameters (see *Sharp minima* below).",
              f"- **target** validation accuracy for claim 4: {target_text}.",
              f"- **significant**: by a t test at alpha = {ALPHA:g}. A difference between batch "
              "sizes is tested with Welch's t (SE^2 = sd_1^2 / n_1 + sd_2^2 / n_2, over seeds "
              "unless stated) on the Welch-Satterthwaite degrees of freedom, which with 3 seeds "
              "are 2 to 4: a difference needs t of about 2.1 to 2.9, not 2. A claim that "
              "predicts a direction is tested one-sided in that direction, and refuted by the "
              "one-sided test the other way; agreement with a predicted slope is tested "
              "two-sided. Each test states t, df and p; intervals are 95% t intervals.", "",
              "## Claims", ""]
    claims = analysis.claims
    lines += ["| # | claim | verdict |", "|---|---|---|"]
    lines += [f"| {c.number} | {c.statement} | **{c.verdict}** |" for c in claims] + [""]
    lines += [claim_markdown(c, analysis) for c in claims]
    lines += sharpness_section(analysis)
    lines += critical_section(analysis)
    if figures:
        lines += ["## Figures", ""] + [f"- `{f}`" for f in figures] + [""]
    return "\n".join(lines)


def write_report(results_or_analysis: SweepResults | Analysis,
                 out_dir: str | os.PathLike | None = None, *,
                 figures: Sequence[str | os.PathLike] = (), notes: Sequence[str] = (),
                 target_accuracy: float | None = None, target_loss: float | None = None,
                 analysis: Analysis | None = None) -> str:
    """Write `report.md`, `summary.csv`, `summary.tex` and `critical.json` (targets, steps to
    them, fits and B_simple; `critical_record`) into `out_dir` (default: the sweep's), each
    atomically; for a learning-rate grid, `report.md`, `grid.json` and `grid.csv`.

    Args:
      results_or_analysis: an `Analysis`, or a loaded sweep to analyse here (with
        `target_accuracy` and `target_loss`, unless `analysis` is given).
      out_dir: where the files go (default: the sweep directory).
      figures, notes: as for `build_report`.
      target_accuracy, target_loss: targets of the analysis when it is computed here.
      analysis: the analysis of the sweep given as `results_or_analysis`, if at hand.

    Returns:
      The Markdown report.
    """
    if isinstance(results_or_analysis, Analysis):
        analysis = results_or_analysis
    elif analysis is None:
        analysis = analyse(results_or_analysis, target_loss=target_loss,
                           target_accuracy=target_accuracy)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else analysis.results.path
    text = build_report(analysis, figures=figures, notes=notes)
    if analysis.grid is not None:
        write_bytes_atomic(out_dir / "grid.json",
                           (json.dumps(to_jsonable(grid_record(analysis.grid)), indent=1,
                                       allow_nan=False) + "\n").encode())
        write_bytes_atomic(out_dir / "grid.csv", rows_to_csv(grid_rows(analysis.grid)).encode())
        write_bytes_atomic(out_dir / "report.md", text.encode())
        return text
    write_bytes_atomic(out_dir / "summary.csv", summary_csv(analysis).encode())
    write_bytes_atomic(out_dir / "summary.tex", summary_latex(analysis).encode())
    write_bytes_atomic(out_dir / "critical.json",
                       (json.dumps(to_jsonable(critical_record(analysis.critical)), indent=1,
                                   allow_nan=False) + "\n").encode())
    write_bytes_atomic(out_dir / "report.md", text.encode())
    return text


# --------------------------------------------------------------------------------------------
# The console


def _short_p(test: TTest | None) -> str:
    if test is None or not test.known:
        return "p n/a"
    return f"p {_fmt_p(test.p_one_sided)}"


def _key_numbers(claim: Claim, analysis: Analysis) -> str:
    summary = analysis.summary
    if isinstance(claim, NoiseClaim):
        m = claim.decided_at
        if m is None:
            return "no noise records" if not claim.measured else "no fit"
        return (f"slope {m.fit.slope:+.2f} {_at_moment(m.epoch)} (t = {_fmt_t(m.fit.test().t)}, "
                f"df {_fmt_df(m.fit.df)}, {_short_p(m.fit.test())})")
    if isinstance(claim, RoughnessClaim):
        if not claim.measures:
            return "one batch size"
        bs = claim.batch_sizes
        r, rel = claim.measures
        return (f"R({bs[0]}) / R({bs[-1]}) = {r.ratio:.1f} ({_short_p(r.test)}), "
                f"R_rel {rel.ratio:.1f} ({_short_p(rel.test)})")
    if isinstance(claim, GeneralisationClaim):
        if claim.gap is None:
            return "one batch size"
        bs = claim.batch_sizes
        return (f"loss gap({bs[0]}) - gap({bs[-1]}) = {claim.gap.diff:+.3f} "
                f"(t = {_fmt_t(claim.gap.t)}, df {_fmt_df(claim.gap.df)}, "
                f"{_short_p(claim.gap)})")
    if isinstance(claim, SpeedClaim):
        if claim.epoch_time_test is None:
            return "no target or one batch size"
        b0, b1 = claim.batch_sizes[0], claim.batch_sizes[-1]
        s = summary
        return (f"epoch {claim.epoch_time[b0].mean:.2f} vs {claim.epoch_time[b1].mean:.2f} s "
                f"({_short_p(claim.epoch_time_test)}); to {100 * claim.target:.1f}%: "
                f"{s[b0]['seconds_to_target'].mean:.2f} vs {s[b1]['seconds_to_target'].mean:.2f}"
                f" s ({_short_p(claim.time_to_target_test)})")
    if isinstance(claim, BalanceClaim):
        parts = []
        for c in claim.checks:
            name = {"val_accuracy": "accuracy", "seconds_to_target": "time",
                    "roughness": "roughness"}[c.key]
            parts.append(f"{name} {c.outcome}" + (f" ({_short_p(c.test)})" if c.test else ""))
        return "; ".join(parts) or f"B = {claim.batch_size} not in the sweep"
    return ""


def verdict_table(analysis: Analysis) -> str:
    """A plain-text table for the console: each claim, its verdict and its key numbers, then
    the sharp-minima verdict and B_crit against B_simple (for a grid: B_crit at the best rates,
    B_simple and the best rate against B)."""
    if analysis.grid is not None:
        return _grid_verdict_table(analysis.grid)
    rows = [(str(c.number), c.statement, c.verdict, _key_numbers(c, analysis))
            for c in analysis.claims]
    s = analysis.sharpness
    if s.measured:
        lam = next((m for m in s.measures if m.key == "lambda_max"), None)
        key = (f"lambda_max({s.batch_sizes[0]}) / lambda_max({s.batch_sizes[-1]}) = "
               f"{1 / s.lambda_ratio:.2g} ({_short_p(lam.test)})"
               if lam is not None and lam.test is not None and np.isfinite(s.lambda_ratio)
               else "")
        rows.append(("S", "smaller batches end in flatter minima", s.verdict, key))
    crit = analysis.critical
    fit = crit.primary.fit
    if fit is not None and fit.valid:
        key = f"B_crit {_number(fit.b_crit)} ± {_spread(fit.b_crit_stderr, fit.b_crit)}"
        if crit.b_simple.n:
            key += f", B_simple {crit.b_simple.mean:.0f}"
        rows.append(("C", f"critical batch size ({crit.primary.label})", "fitted", key))
    elif fit is not None:
        rows.append(("C", f"critical batch size ({crit.primary.label})", "no B_crit",
                     f"fit not of the model's shape (S_min = {fit.s_min:.3g})"))
    else:
        rows.append(("C", "critical batch size", "no fit",
                     (crit.primary.note or "").split(";")[0]))
    width = 52
    rows = [(n, st if len(st) <= width else st[:width - 1] + "…", v, k) for n, st, v, k in rows]
    header = ("#", "claim", "verdict", "key numbers")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines)


def _grid_verdict_table(grid: GridAnalysis) -> str:
    fit, noise, s = grid.fit, grid.noise, grid.scaling
    rows = []
    if fit is not None and fit.valid:
        key = (f"B_crit {_number(fit.b_crit)} {_interval(grid.b_crit_t_interval)} (t), "
               f"bootstrap {_interval(fit.b_crit_interval)}")
        if noise is not None:
            key += (f"; B_simple {_number(noise.b_simple.mean)}, ratio {noise.ratio:.2g} "
                    f"[{noise.ratio_interval[0]:.2g}, {noise.ratio_interval[1]:.2g}]")
        rows.append(("C", f"critical batch size at the best rates ({grid.optimizer})",
                     noise.outcome if noise is not None else "fitted", key))
    else:
        rows.append(("C", f"critical batch size at the best rates ({grid.optimizer})", "no fit",
                     (grid.fit_note or "not of the model's shape").split(";")[0]))
    if s.eq27 is not None and s.primary == "eq27":
        key = (f"eps_max {_rate(s.eq27.eps_max)}, B_noise {_number(s.eq27.b_noise)} "
               f"{_interval(s.eq27.b_noise_interval)}" if s.eq27.identified
               else "B_noise not identified")
        rows.append(("L", "best rate against B: eq. 2.7", "fitted", key))
    elif s.power is not None:
        rows.append(("L", "best rate against B: power law", "fitted",
                     f"k = {s.power.slope:+.2f} [{s.power.lo:+.2f}, {s.power.hi:+.2f}]"
                     if np.isfinite(s.power.se) else f"k = {s.power.slope:+.2f} (exact, no interval)"))
    else:
        rows.append(("L", "best rate against B", "no fit", s.note or ""))
    flagged = [f"{b}: no rate reached" for b in grid.unreached]
    flagged += [f"{b}: unreliable (edge)" for b in grid.unreliable]
    if flagged:
        rows.append(("F", "flagged batch sizes", str(len(flagged)), "; ".join(flagged)))
    header = ("#", "quantity", "outcome", "key numbers")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines)


def critical_analysis(results: SweepResults, *, target_loss: float | None = None,
                      target_accuracy: float | None = None) -> Analysis:
    """Transitional: `batchjax.analysis.analyse` under the name scripts/sweep.py imports.

    Returns the whole `Analysis`, which `make_figures(analysis=...)` and
    `write_report(..., analysis=...)` take. Delete once scripts/sweep.py calls `analyse`.
    """
    return analyse(results, target_loss=target_loss, target_accuracy=target_accuracy)
