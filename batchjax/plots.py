"""Figures of a sweep, drawn from its `batchjax.analysis.Analysis` (numbers) and saved runs.

Each panel is a `plot_<thing>(ax, analysis, **kw)` that draws on given axes; each figure is a
`figure_<name>(analysis) -> Figure` that composes panels under one style (`STYLE`, applied with
`plt.rc_context`): 7-8 pt fonts for panels about 3.4 in wide (a paper column), one palette (the
Okabe-Ito colour-blind-safe colours, `OKABE_ITO`) plus a marker per batch size (readable in
grey), batch-size axes in log base 2, reference scalings as dashed black lines, legends outside
the data, tick labels as plain numbers (260, 0.001, 2k: never 2.6e+02), and the dataset named
in every title. `save_figure` writes a vector PDF and a 300-dpi PNG, atomically. Every
statistic drawn (bands, error bars, fits, targets) comes from the analysis, the same values the
report states; the panels add only raw per-step and per-epoch curves.

Bands and error bars are ± 1 s.d. over seeds unless a panel says otherwise. Diverged runs are
left out of means and marked where they stopped (a black x on the top edge, named in the
legend), never plotted as numbers.

1. `figure_curves`: per batch size, loss and accuracy vs epoch, training and validation.
2. `figure_step_loss`: every step's training loss against examples seen, raw and smoothed; the
   shared y-range covers the smoothed curves and reaches below them only as far as the raw
   losses commonly go, at most 20x below the lowest smoothed value (`step_loss_ylim`), so that
   rare near-zero minibatch losses (2e-7 at B = 8 on MNIST) do not squeeze the curves.
3. `figure_validation`: validation loss and accuracy against epochs, steps and seconds.
4. `figure_gradient_variance`: minibatch gradient variance against B: analytic (from tr(Sigma)
   with the finite-population correction), empirical points, 1/B reference.
5. `figure_noise_over_training`: |G|^2, tr(Sigma) and B_simple over training.
6. `figure_roughness_gap`: curve roughness and generalisation gap against batch size.
7. `figure_sharpness_gap`: Hessian lambda_max and trace at the end of training against batch
   size, next to the final training loss (the confound) and the generalisation gap.
8. `figure_critical_batch`: steps to the training-loss target (and to the validation-accuracy
   target) against batch size, with the fit of McCandlish et al. eq. 2.11, its regimes, B_crit
   and B_simple (`plot_steps_to_target`), when >= 3 batch sizes reached it.

A learning-rate grid sweep (issue #15) gets three figures instead, each with one panel per grid
(an `Analysis`, or a name -> `Analysis` mapping for the comparison across optimizers,
`make_comparison_figures`): `figure_lr_steps_to_target` (steps to the target against B, one
faint line per learning rate, the best-rate envelope, the fit of eq. 2.11, B_crit and
B_simple), `figure_best_lr` (the best rate against B, the rates tried, the near-best range,
the eq. 2.7 fit and the power law) and `figure_b_simple_over_training` (B_simple along the best
runs up to the target, with B_crit marked).
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import textwrap
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
from cycler import cycler
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

from batchjax.analysis import (Analysis, Band, NoiseMoment, TargetAnalysis, analyse, band,
                               epoch_seconds, minibatch_variance_curve, steps_per_epoch)
from batchjax.critical import REGIME_FACTOR, CriticalFit, fit_critical_batch, regimes
from batchjax.errors import BatchjaxError
from batchjax.results import SweepResults, write_bytes_atomic
from batchjax.run import Run
from batchjax.stats import plain_number

# Okabe & Ito (2008), "Color Universal Design": the one palette of every figure.
OKABE_ITO = {"blue": "#0072B2", "orange": "#E69F00", "bluish_green": "#009E73",
             "vermillion": "#D55E00", "reddish_purple": "#CC79A7", "sky_blue": "#56B4E9",
             "black": "#000000", "yellow": "#F0E442"}
PALETTE = tuple(OKABE_ITO.values())  # batch sizes in this order; yellow last, faint on white
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
TRAIN_COLOR, VAL_COLOR, DIVERGED_COLOR = OKABE_ITO["blue"], OKABE_ITO["vermillion"], "black"
REGIME_COLOURS = {"perfect_scaling": OKABE_ITO["bluish_green"],
                  "diminishing_returns": OKABE_ITO["yellow"],
                  "maximal_data_parallelism": OKABE_ITO["reddish_purple"]}
COLUMN_WIDTH, PAGE_WIDTH = 3.4, 7.0  # inches
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "figure.titlesize": 8.5,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7,
    "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "axes.linewidth": 0.6,
    "lines.linewidth": 1.2, "lines.markersize": 3.5, "errorbar.capsize": 2,
    "legend.frameon": False, "legend.handlelength": 1.8,
    "axes.prop_cycle": cycler(color=PALETTE),
    # Linear axes: plain numbers too, no "1e-3" multiplier or "+0.9" offset above the axis.
    "axes.formatter.useoffset": False, "axes.formatter.limits": (-9, 9),
    "figure.dpi": 100, "savefig.dpi": 300, "pdf.fonttype": 42, "ps.fonttype": 42,
    "figure.constrained_layout.use": True,
}
# Figure 2's y-range reaches at most this factor below the lowest smoothed loss.
STEP_LOSS_RANGE_BELOW = 20.0


# --------------------------------------------------------------------------------------------
# Helpers


def tick_label(value: float) -> str:
    """A tick label as a plain number: 260 (not 2.6e+02), 0.001 (not 1e-03), 1024, 0.0625."""
    if value == 0:
        return "0"
    if value == round(value) and abs(value) < 1e15:
        text = f"{value:.0f}"
    else:
        text = plain_number(value, 3)
    return text.replace("-", "\N{MINUS SIGN}")


def short_tick_label(value: float) -> str:
    """As `tick_label`, thousands as 2k, 15k: labels that stay narrow."""
    if abs(value) >= 1000:
        return tick_label(value / 1000) + "k"
    return tick_label(value)


def _fit_number(value: float) -> str:
    """Three significant digits; whole numbers from 1000 on (9662, not 9.66e+03)."""
    return f"{value:.0f}" if 1e3 <= abs(value) < 1e7 else plain_number(value, 3)


def batch_style(batch_size: int, batch_sizes: Sequence[int]) -> dict:
    """Colour and marker of a batch size, fixed by its rank in the sweep."""
    i = sorted(batch_sizes).index(batch_size) if batch_size in batch_sizes else len(batch_sizes)
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}


def batch_label(batch_size: int, runs: Sequence[Run]) -> str:
    diverged = sum(r.diverged for r in runs)
    return f"B = {batch_size}" + (f" ({diverged}/{len(runs)} diverged)" if diverged else "")


def _ok(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if not r.diverged]


def _band(ax, curve: Band, *, color, label=None, linestyle="-", marker=None):
    """The band's mean line and, with more than one seed, its spread shaded."""
    ax.plot(curve.x, curve.mean, color=color, linestyle=linestyle, marker=marker, label=label,
            markevery=max(1, len(curve.x) // 12) if marker else None)
    if curve.n > 1:
        ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.18, linewidth=0)


def _history_band(runs: Sequence[Run], x: np.ndarray, key: str) -> Band:
    """Mean ± s.d. over seeds of a history series (`batchjax.analysis.band`)."""
    return band(x, [r.history[key] for r in runs])


def _mark_diverged(ax, x: float) -> None:
    """A black x on the top edge of `ax` at data-x `x`: where a run stopped with a NaN loss."""
    ax.plot([x], [1.0], marker="x", color=DIVERGED_COLOR, markersize=6, mew=1.5,
            transform=ax.get_xaxis_transform(), clip_on=False, linestyle="none", zorder=5)


def _diverged_handle(label: str = "diverged: run stopped here (top edge)") -> Line2D:
    return Line2D([], [], marker="x", color=DIVERGED_COLOR, linestyle="none", markersize=6,
                  mew=1.5, label=label)


def _suptitle(fig: Figure, analysis: Analysis, title: str, stat: str = "mean ± s.d.") -> None:
    seeds = analysis.seeds
    spread = f"{stat} over {seeds} seeds" if seeds > 1 else "1 seed, no spread to show"
    fig.suptitle(f"{title}\n{analysis.results.dataset_label()}; {spread}")


def _log2_batch_axis(ax, batch_sizes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("batch size B")


def _plain_log_ticks(axis, base: float = 10) -> None:
    """Ticks at 1, 2, 5 x 10^k (denser within a decade) labelled 0.05, 200, 2k, not 2 x 10^1."""
    low, high = sorted(axis.get_view_interval())
    narrow = base == 10 and 0 < low and high / low < 10
    subs = (1.0, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0) if base == 10 else (1.0,)
    axis.set_major_locator(LogLocator(base=base, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _: short_tick_label(v)))
    axis.set_minor_formatter(NullFormatter())


def _power_of_two_axis(axis) -> None:
    # Every power of two gets a plain-number tick (matplotlib thins them and writes 2^k).
    axis.set_major_locator(LogLocator(base=2, subs=(1.0,), numticks=30))
    axis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    axis.set_minor_formatter(NullFormatter())


def _figure_legend(fig: Figure, axes, extra: Sequence = (), ncol: int | None = None) -> None:
    """One legend for the whole figure, below the panels, deduplicated by label."""
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels and not l.startswith("_"):
                handles.append(h)
                labels.append(l)
    for h in extra:
        if h.get_label() not in labels:
            handles.append(h)
            labels.append(h.get_label())
    if handles:
        fig.legend(handles, labels, loc="outside lower center",
                   ncol=ncol or min(len(handles), 4))


def _any_diverged(analysis: Analysis) -> bool:
    return bool(analysis.diverged)


# --------------------------------------------------------------------------------------------
# Panels


def plot_epoch_curves(ax, analysis: Analysis, *, batch_size: int, metric: str = "loss"):
    """Training and validation `metric` ("loss" or "accuracy") vs epoch at one batch size."""
    runs = analysis.results.by_batch_size().get(batch_size, [])
    ok = _ok(runs)
    if ok:
        epochs = ok[0].history["epoch"]
        for split, color, style, marker, name in (("train", TRAIN_COLOR, "-", "o", "training"),
                                                  ("val", VAL_COLOR, "--", "s", "validation")):
            _band(ax, _history_band(ok, epochs, f"{split}_{metric}"), color=color,
                  linestyle=style, marker=marker, label=name)
    for r in runs:
        if r.diverged:
            spe = steps_per_epoch(r)
            if len(r.history["epoch"]):
                ax.plot(r.history["epoch"], r.history[f"train_{metric}"], color="0.6", lw=0.8)
            _mark_diverged(ax, (r.diverged_step + 1) / spe)
    if not ok:
        ax.text(0.5, 0.5, f"every seed diverged at B = {batch_size}", transform=ax.transAxes,
                ha="center", color=DIVERGED_COLOR)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))


def plot_step_loss(ax, analysis: Analysis, *, batch_size: int | None = None,
                   raw: bool = True, smoothed: bool = True, ylim=None):
    """Every step's training loss against examples seen.

    With `batch_size`, that batch size's raw losses (first non-diverged seed, light) and the
    smoothed mean over seeds (dark); without it, the smoothed curves of every batch size.
    Smoothing: `analysis.step_loss`, a centred moving average over 1/8 epoch of examples at
    every B, geometric mean ×/÷ geometric s.d. over seeds.
    """
    results = analysis.results
    groups = results.by_batch_size()
    selected = [batch_size] if batch_size is not None else list(groups)
    for b in selected:
        runs, ok = groups.get(b, []), _ok(groups.get(b, []))
        style = batch_style(b, results.batch_sizes)
        if raw and ok:
            r = ok[0]
            ax.plot(r.examples_seen, r.step_losses, color=style["color"], alpha=0.35, lw=0.4,
                    label=f"raw (seed {r.seed})" if batch_size is not None else None,
                    rasterized=len(r.step_losses) > 2000)
        curve = analysis.step_loss.get(b)
        if smoothed and curve is not None and curve.smoothed is not None:
            _band(ax, curve.smoothed,
                  color=style["color"] if batch_size is None else "black",
                  label=batch_label(b, runs) if batch_size is None else
                  f"moving average ({curve.window} steps)")
        for r in runs:
            if r.diverged and batch_size is not None:
                seen = float(np.sum(r.step_batch_sizes))
                ax.plot(r.examples_seen[:-1], r.step_losses[:-1], color=style["color"], lw=0.4,
                        alpha=0.35)
                _mark_diverged(ax, seen)
    ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    _plain_log_ticks(ax.yaxis)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short_tick_label(v)))
    ax.set_xlabel("examples seen")
    ax.set_ylabel("training loss (per step)")
    if batch_size is not None:
        ax.set_title(batch_label(batch_size, groups.get(batch_size, [])))
    else:
        ax.set_title("smoothed, all batch sizes")


def step_loss_ylim(analysis: Analysis) -> tuple[float, float] | None:
    """The y-range of figure 2, from the data.

    Top: the higher of the raw losses' 99.9th percentile and the smoothed bands' top. Bottom:
    the raw losses' 0.2nd percentile (the lowest over runs), but at most
    `STEP_LOSS_RANGE_BELOW` times below the lowest smoothed band: where minibatch losses of a
    fitted small batch fall towards zero, they leave the panel at its bottom instead of
    squeezing every curve into its top. Both padded by a factor 1.5. None without data.
    """
    finite = [r.step_losses[np.isfinite(r.step_losses)] for r in _ok(analysis.results.runs)]
    finite = [f[f > 0] for f in finite if len(f)]
    if not finite:
        return None
    low = min(np.quantile(f, 0.002) for f in finite)
    high = max(np.quantile(f, 0.999) for f in finite)
    bands = [c.smoothed for c in analysis.step_loss.values() if c.smoothed is not None]
    if bands:
        low = max(low, min(float(np.min(b.low)) for b in bands) / STEP_LOSS_RANGE_BELOW)
        high = max(high, max(float(np.max(b.high)) for b in bands))
    return low / 1.5, high * 1.5


def plot_validation(ax, analysis: Analysis, *, metric: str = "accuracy", x: str = "epoch"):
    """Validation `metric` of every batch size against `x`: "epoch", "steps" or "seconds".

    Seconds are cumulative training + validation time (compilation excluded) of the runs'
    training group.
    """
    results = analysis.results
    for b, runs in results.by_batch_size().items():
        ok = _ok(runs)
        style = batch_style(b, results.batch_sizes)
        if ok:
            if x == "seconds":
                xs = np.mean([np.cumsum(epoch_seconds(r)) for r in ok], axis=0)
            else:
                xs = ok[0].history["steps" if x == "steps" else "epoch"]
            _band(ax, _history_band(ok, xs, f"val_{metric}"), color=style["color"],
                  marker=style["marker"], label=batch_label(b, runs))
        for r in runs:
            if r.diverged:
                spe = steps_per_epoch(r)
                where = {"epoch": (r.diverged_step + 1) / spe, "steps": r.diverged_step + 1,
                         "seconds": float(np.sum(epoch_seconds(r)))}[x]
                if where > 0:
                    _mark_diverged(ax, where)
    if x in ("steps", "seconds"):
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    ax.set_xlabel({"epoch": "epoch", "steps": "optimizer steps",
                   "seconds": "wall-clock seconds (train + val)"}[x])
    ax.set_ylabel(f"validation {metric}")
    if x == "epoch":
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))


def _moment(analysis: Analysis, epoch: float) -> NoiseMoment:
    for m in analysis.noise_moments:
        if m.epoch == epoch:
            return m
    raise BatchjaxError(f"no gradient-noise moment at epoch {epoch:g} in this analysis; its "
                        f"moments are {[m.epoch for m in analysis.noise_moments]}")


def plot_gradient_variance(ax, analysis: Analysis, *, epoch: float):
    """Minibatch gradient variance E|G_B - G|^2 against B at one moment of training.

    Lines: the analytic variance from each batch size's run (mean over seeds), for every B up to
    N/2 of the probe set; points: the empirical mean of |G_B - G|^2 over sampled minibatches at
    the run's own batch size, error bars its standard error (combined over seeds); dashed: 1/B.
    """
    moment = _moment(analysis, epoch)
    groups = analysis.results.by_batch_size()
    top, n_probe = [], None
    for b, runs in groups.items():
        style = batch_style(b, analysis.results.batch_sizes)
        at = moment.by_batch_size[b]
        n_probe = at.probe_size or n_probe
        if at.trace is not None and n_probe:
            grid = np.unique(np.round(np.logspace(0, math.log2(n_probe / 2), 64, base=2)))
            curve = minibatch_variance_curve(at.trace, n_probe, grid)
            ax.plot(grid, curve, color=style["color"], lw=1.0, label=batch_label(b, runs))
            top.append(curve[0])
        if at.empirical_mean is not None:
            ax.errorbar([at.empirical_batch_size], [at.empirical_mean], yerr=[at.empirical_se],
                        color=style["color"], marker=style["marker"], markersize=5,
                        mfc="white", mew=1.2, linestyle="none", zorder=4)
    if top and n_probe:
        ref_b = np.array([1.0, n_probe / 2])
        anchor = 2.0 * max(top)  # above the curves, so it does not hide them
        ax.plot(ref_b, anchor / ref_b, "k--", lw=0.9, label="∝ 1/B (reference)")
        ax.set_xlim(0.8, n_probe / 2 * 1.25)
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    # Decades: 0.001, 0.01, ... read better than powers of two below 1 (0.00195).
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=7))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size B")
    ax.set_ylabel(r"E$|G_B - G|^2$")
    ax.set_title(moment.name)


NOISE_QUANTITIES = {  # quantity: (axis label, panel title)
    "grad_sq_norm": (r"$|G|^2$", "signal: squared mean gradient"),
    "trace_cov": (r"tr($\Sigma$)", "noise: per-example gradient variance"),
    "noise_scale": (r"$B_\mathrm{simple}$ = tr($\Sigma$) / $|G|^2$", "noise scale"),
}


def plot_noise_over_training(ax, analysis: Analysis, *, quantity: str = "noise_scale"):
    """One noise statistic (`NOISE_QUANTITIES`) over training for every batch size, log scale."""
    for b, runs in analysis.results.by_batch_size().items():
        style = batch_style(b, analysis.results.batch_sizes)
        series = analysis.noise_series[quantity].get(b)
        if series is not None:
            _band(ax, series, color=style["color"], marker=style["marker"],
                  label=batch_label(b, runs))
        for r in runs:
            if r.diverged:
                _mark_diverged(ax, (r.diverged_step + 1) / steps_per_epoch(r))
        if quantity == "noise_scale":
            ax.axhline(b, color=style["color"], lw=0.7, ls=":", zorder=0)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("epoch")
    ax.set_ylabel(NOISE_QUANTITIES[quantity][0])
    ax.set_title(NOISE_QUANTITIES[quantity][1])
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))


def _per_batch(analysis: Analysis, key: str):
    """(batch sizes, means, s.d.s, all-diverged batch sizes) of a summary quantity."""
    bs, means, sds, dead = [], [], [], []
    for b, row in analysis.summary.items():
        est = row[key]
        if est.n:
            bs.append(b)
            means.append(est.mean)
            sds.append(est.sd if np.isfinite(est.sd) else 0.0)
        else:
            dead.append(b)
    return np.array(bs), np.array(means), np.array(sds), dead


def _errorbars(ax, analysis: Analysis, bs, means, sds, dead):
    groups = analysis.results.by_batch_size()
    ax.plot(bs, means, color="0.5", lw=0.8, zorder=1)
    for b, m, s in zip(bs, means, sds):
        style = batch_style(int(b), analysis.batch_sizes)
        ax.errorbar([b], [m], yerr=[s], color=style["color"], marker=style["marker"],
                    markersize=5, linestyle="none", zorder=3,
                    label=batch_label(int(b), groups[int(b)]))
    for b in dead:
        _mark_diverged(ax, b)


def plot_roughness(ax, analysis: Analysis, *, relative: bool = False):
    """Roughness of the per-step loss (`analysis.compute_roughness`) against batch size.

    `relative=True` plots R / mean loss (level-free) instead of R in loss units. Dashed: a
    B^(-1/2) slope through the smallest batch size, what minibatch sampling of the loss alone
    gives at a fixed loss level.
    """
    bs, means, sds, dead = _per_batch(analysis,
                                      "roughness_relative" if relative else "roughness")
    _errorbars(ax, analysis, bs, means, sds, dead)
    if len(bs):
        ref = np.array([bs[0], max(bs[-1], bs[0] * 2)], float)
        ax.plot(ref, means[0] * np.sqrt(bs[0] / ref), "k--", lw=0.9,
                label=r"$\propto B^{-1/2}$ (minibatch sampling)")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    _log2_batch_axis(ax, analysis.batch_sizes)
    if relative:
        ax.set_ylabel("R / mean loss")
        ax.set_title("relative roughness (log-scale view)")
    else:
        ax.set_ylabel("R (loss per step)")
        ax.set_title("roughness in loss units")


def plot_gap(ax, analysis: Analysis, *, metric: str = "loss"):
    """Final generalisation gap against batch size: val - train loss, or train - val accuracy."""
    key = "gap_loss" if metric == "loss" else "gap_accuracy"
    bs, means, sds, dead = _per_batch(analysis, key)
    _errorbars(ax, analysis, bs, means, sds, dead)
    ax.axhline(0, color="black", lw=0.6)
    _log2_batch_axis(ax, analysis.batch_sizes)
    ax.set_ylabel("val - train loss" if metric == "loss" else "train - val accuracy")
    ax.set_title(f"generalisation gap ({metric})")


SHARPNESS_QUANTITIES = {  # run_stats key: (axis label, panel title)
    "lambda_max": (r"$\lambda_\max$ of the Hessian", "sharpness: top eigenvalue"),
    "hessian_trace": (r"tr($H$) (Hutchinson)", "sharpness: Hessian trace"),
    "train_loss": ("training loss (final)", "final training loss (confound)"),
}


def plot_sharpness(ax, analysis: Analysis, *, quantity: str = "lambda_max"):
    """A `SHARPNESS_QUANTITIES` quantity at the end of training against batch size, log scale.

    Points are means ± 1 s.d. over seeds; a batch size whose every run diverged (so was not
    measured) is marked on the top edge.
    """
    bs, means, sds, dead = _per_batch(analysis, quantity)
    _errorbars(ax, analysis, bs, means, sds, dead)
    ax.set_yscale("log")
    if len(means) and np.all(means > 0):
        low = np.min(np.where(means - sds > 0, means - sds, means))
        high = np.max(means + sds)
        pad = max((high / low) ** 0.12, 1.1) if high > low else 1.5
        ax.set_ylim(low / pad, high * pad)
    _plain_log_ticks(ax.yaxis)
    low, high = sorted(ax.get_ylim())
    if 0 < low and high / low < 3:  # within half a decade: a tick at every 1..9 x 10^k
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=np.arange(1.0, 10.0), numticks=12))
    _log2_batch_axis(ax, analysis.batch_sizes)
    ax.set_ylabel(SHARPNESS_QUANTITIES[quantity][0])
    ax.set_title(SHARPNESS_QUANTITIES[quantity][1])


def plot_gap_against_sharpness(ax, analysis: Analysis):
    """The final loss gap against lambda_max, one point per run, coloured by batch size."""
    pairs = list(zip(analysis.results.runs, analysis.run_stats))
    for b in analysis.batch_sizes:
        style = batch_style(b, analysis.batch_sizes)
        pts = [(s["lambda_max"], s["gap_loss"]) for r, s in pairs
               if r.batch_size == b and not r.diverged
               and np.isfinite(s["lambda_max"]) and np.isfinite(s["gap_loss"])]
        if pts:
            x, y = np.asarray(pts).T
            ax.plot(x, y, linestyle="none", color=style["color"], marker=style["marker"],
                    markersize=4.5, mfc="none", mew=1.0)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel(r"$\lambda_\max$ (each run)")
    ax.set_ylabel("val - train loss")
    ax.set_title("gap against sharpness, per run")


def plot_steps_to_target(ax, batch_sizes: Sequence[float], steps: Any, fit: CriticalFit, *,
                         b_simple: float | None = None, factor: float = REGIME_FACTOR,
                         color: str = OKABE_ITO["blue"], label: str = "mean over seeds",
                         ylabel: str = "steps to target", legend: bool = True) -> None:
    """Steps to target against batch size on log2-log2 axes, with the fit and its regimes.

    Per-seed points (hollow) and their means (filled), the fitted S(B) (solid), perfect
    scaling through the smallest batch size's mean (dashed black), the three regimes shaded,
    and vertical lines at B_crit and, when given, B_simple.

    Args:
      ax: matplotlib axes to draw on.
      batch_sizes: [num_B].
      steps: [num_B] or [num_B, num_seeds], NaN where not reached.
      fit: the `batchjax.critical.CriticalFit` of these points.
      b_simple: the measured simple noise scale averaged over training, or None.
      factor: regime factor k (`batchjax.critical.regimes`).
      color: colour of the points.
      label: legend label of the means.
      ylabel: y-axis label.
      legend: draw the legend.
    """
    b_K = np.asarray(batch_sizes, np.float64)
    steps_KxS = np.asarray(steps, np.float64).reshape(b_K.size, -1)
    lo, hi = b_K.min() / 2**0.5, b_K.max() * 2**0.5
    if steps_KxS.shape[1] > 1:
        b_rep = np.repeat(b_K[:, None], steps_KxS.shape[1], axis=1)
        ax.scatter(b_rep.ravel(), steps_KxS.ravel(), s=16, facecolors="none",
                   edgecolors=color, linewidths=0.6, alpha=0.6, label="per seed", zorder=3)
    reached_K = np.isfinite(steps_KxS).any(axis=1)
    mean_K = np.full(b_K.size, np.nan)
    mean_K[reached_K] = np.nanmean(steps_KxS[reached_K], axis=1)
    in_fit_K = np.isin(b_K, fit.batch_sizes)
    ax.plot(b_K[in_fit_K], mean_K[in_fit_K], "o", color=color, ms=2.8, label=label, zorder=4)
    left_out_K = reached_K & ~in_fit_K
    if left_out_K.any():
        ax.plot(b_K[left_out_K], mean_K[left_out_K], "x", color=color, ms=4, mew=0.8,
                label="mean, not in fit", zorder=4)

    grid = np.geomspace(lo, hi, 200)
    first = int(np.argmax(reached_K))
    ax.plot(grid, mean_K[first] * b_K[first] / grid, "--", color="black", lw=0.8,
            label=r"perfect scaling, $S \propto 1/B$", zorder=2)
    if fit.valid:
        ax.plot(grid, fit.predict_steps(grid), "-", color=OKABE_ITO["vermillion"], lw=1.2,
                label=rf"fit: $S_{{\min}}$ = {_fit_number(fit.s_min)}, "
                rf"$E_{{\min}}$ = {_fit_number(fit.e_min)}",
                zorder=3)
        bounds = regimes(fit, factor)
        edges = [(lo, bounds.perfect_scaling_max, "perfect_scaling", "perfect scaling"),
                 (bounds.perfect_scaling_max, bounds.maximal_parallelism_min,
                  "diminishing_returns", "diminishing returns"),
                 (bounds.maximal_parallelism_min, hi, "maximal_data_parallelism",
                  "max. data parallelism")]
        for left, right, key, text in edges:
            left, right = max(left, lo), min(right, hi)
            if right > left:
                ax.axvspan(left, right, color=REGIME_COLOURS[key], alpha=0.18, lw=0,
                           label=text, zorder=0)
        crit_text = rf"$B_{{\mathrm{{crit}}}}$ = {_fit_number(fit.b_crit)}"
        if fit.b_crit_stderr > 1e-6 * fit.b_crit:  # exact points give a rounding-error 1e-11
            crit_text += rf" $\pm$ {plain_number(fit.b_crit_stderr, 2)}"
        if not lo <= fit.b_crit <= hi:
            crit_text += " (off scale)"
        ax.axvline(fit.b_crit, color=OKABE_ITO["vermillion"], ls=":", lw=1.2, label=crit_text,
                   zorder=3)
    if b_simple is not None and np.isfinite(b_simple):
        ax.axvline(b_simple, color=OKABE_ITO["sky_blue"], ls="-.", lw=1.2,
                   label=rf"$B_{{\mathrm{{simple}}}}$ = {_fit_number(b_simple)}"
                   + ("" if lo <= b_simple <= hi else " (off scale)"), zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlim(lo, hi)
    # The perfect-scaling line falls far below the data at large B; clip it to the data range.
    bottom = np.nanmin(steps_KxS)
    if fit.valid:
        bottom = min(bottom, fit.predict_steps(hi))
    ax.set_ylim(bottom / 1.6, np.nanmax(steps_KxS) * 1.6)
    _power_of_two_axis(ax.xaxis)
    _power_of_two_axis(ax.yaxis)
    ax.set_xlabel("batch size B")
    ax.set_ylabel(ylabel)
    if legend:  # below the axes: inside, it would cover the points at either end
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False,
                  handlelength=2.2, columnspacing=1.0)


# --------------------------------------------------------------------------------------------
# Figures


def figure_curves(analysis: Analysis, batch_size: int) -> Figure:
    """Figure 1, the original's figure at one batch size: loss and accuracy vs epoch."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.7))
        plot_epoch_curves(axes[0], analysis, batch_size=batch_size, metric="loss")
        plot_epoch_curves(axes[1], analysis, batch_size=batch_size, metric="accuracy")
        runs = analysis.results.by_batch_size().get(batch_size, [])
        dead = [f"seed {r.seed} at step {r.diverged_step} (epoch "
                f"{r.diverged_step // steps_per_epoch(r) + 1})" for r in runs if r.diverged]
        extra = [_diverged_handle("diverged: " + ", ".join(dead))] if dead else []
        _figure_legend(fig, axes, extra)
        _suptitle(fig, analysis, f"Training and validation curves, batch size {batch_size}")
    return fig


def figure_step_loss(analysis: Analysis) -> Figure:
    """Figure 2: every step's training loss, one panel per batch size plus all smoothed."""
    groups = analysis.results.by_batch_size()
    n = len(groups) + 1
    ncols = 2
    nrows = math.ceil(n / ncols)
    ylim = step_loss_ylim(analysis)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH, 2.3 * nrows + 0.6),
                                 sharex=True, sharey=True, squeeze=False)
        flat = axes.ravel()
        for ax, b in zip(flat, groups):
            plot_step_loss(ax, analysis, batch_size=b, ylim=ylim)
        plot_step_loss(flat[len(groups)], analysis, ylim=ylim, raw=False)
        for ax in flat[n:]:
            ax.set_visible(False)
        for ax in flat[:n]:
            ax.label_outer()
            ax.xaxis.set_tick_params(labelbottom=True)
        handles = [Line2D([], [], color="0.5", alpha=0.5, lw=0.8, label="raw loss, one seed"),
                   Line2D([], [], color="black", lw=1.2, label="moving average over 1/8 epoch, "
                          "geometric mean over seeds")]
        handles += [Line2D([], [], color=batch_style(b, analysis.batch_sizes)["color"],
                           label=batch_label(b, groups[b])) for b in groups]
        if _any_diverged(analysis):
            handles.append(_diverged_handle())
        fig.legend(handles=handles, loc="outside lower center", ncol=3)
        _suptitle(fig, analysis, "Per-step training loss: smaller batches give choppier curves",
                  stat="smoothed: geometric mean ×/÷ geometric s.d.")
    return fig


def figure_validation(analysis: Analysis) -> Figure:
    """Figure 3: validation loss and accuracy against epochs, optimizer steps and seconds."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 3, figsize=(PAGE_WIDTH, 4.4), sharey="row")
        for j, x in enumerate(("epoch", "steps", "seconds")):
            for i, metric in enumerate(("loss", "accuracy")):
                plot_validation(axes[i, j], analysis, metric=metric, x=x)
                if j:
                    axes[i, j].set_ylabel("")
        extra = [_diverged_handle()] if _any_diverged(analysis) else []
        _figure_legend(fig, axes, extra)
        _suptitle(fig, analysis, "Validation progress per epoch, per step and per second")
    return fig


def figure_gradient_variance(analysis: Analysis) -> Figure:
    """Figure 4: minibatch gradient variance against B at several moments of training."""
    moments = [m.epoch for m in analysis.noise_moments]
    with plt.rc_context(STYLE):
        ncols = min(2, len(moments))
        nrows = math.ceil(len(moments) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH, 2.5 * nrows + 0.7),
                                 sharex=True, squeeze=False)
        for ax, epoch in zip(axes.ravel(), moments):
            plot_gradient_variance(ax, analysis, epoch=epoch)
            ax.label_outer(remove_inner_ticks=False)
            ax.yaxis.set_tick_params(labelleft=True)
        for ax in axes.ravel()[len(moments):]:
            ax.set_visible(False)
        point = Line2D([], [], color="0.3", marker="o", mfc="white", linestyle="none",
                       label="empirical, own B (± SE)")
        line = Line2D([], [], color="0.3", lw=1.0, label="analytic tr(Σ)/B·(N−B)/(N−1)")
        _figure_legend(fig, axes, [line, point], ncol=3)
        _suptitle(fig, analysis, "Minibatch gradient variance against batch size (lines: each "
                  "B's run, analytic; points: measured)", stat="mean (points ± SE)")
    return fig


def figure_noise_over_training(analysis: Analysis) -> Figure:
    """Figure 5: |G|^2, tr(Sigma) and B_simple over training for each batch size."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(PAGE_WIDTH, 2.6))
        for ax, q in zip(axes, NOISE_QUANTITIES):
            plot_noise_over_training(ax, analysis, quantity=q)
        extra = [Line2D([], [], color="0.4", ls=":", lw=0.7,
                        label="dotted: each run's own B (right panel)")]
        if _any_diverged(analysis):
            extra.append(_diverged_handle())
        _figure_legend(fig, axes, extra, ncol=4)
        _suptitle(fig, analysis, "Gradient signal, noise and the noise scale over training",
                  stat="geometric mean ×/÷ geometric s.d.")
    return fig


def figure_roughness_gap(analysis: Analysis) -> Figure:
    """Figure 6: curve roughness and final generalisation gap against batch size."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(PAGE_WIDTH, 4.6))
        plot_roughness(axes[0, 0], analysis)
        plot_roughness(axes[0, 1], analysis, relative=True)
        plot_gap(axes[1, 0], analysis, metric="loss")
        plot_gap(axes[1, 1], analysis, metric="accuracy")
        extra = [_diverged_handle()] if _any_diverged(analysis) else []
        _figure_legend(fig, axes, extra)
        _suptitle(fig, analysis, "Roughness of the per-step loss and generalisation gap at the "
                  "end of training")
    return fig


def figure_sharpness_gap(analysis: Analysis) -> Figure:
    """Figure 7: sharpness and generalisation gap at the end of training against batch size."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 3, figsize=(PAGE_WIDTH, 4.8))
        for ax, q in zip(axes[0], SHARPNESS_QUANTITIES):
            plot_sharpness(ax, analysis, quantity=q)
        plot_gap(axes[1, 0], analysis, metric="loss")
        plot_gap(axes[1, 1], analysis, metric="accuracy")
        plot_gap_against_sharpness(axes[1, 2], analysis)
        if len(analysis.batch_sizes) > 6:  # a third of a page is too narrow for every label
            shown = set(analysis.batch_sizes[::2])
            for ax in axes.ravel()[:5]:
                ax.xaxis.set_major_formatter(FuncFormatter(
                    lambda v, _: tick_label(v) if int(round(v)) in shown else ""))
        extra = [_diverged_handle("diverged: not measured (top edge)")] \
            if _any_diverged(analysis) else []
        _figure_legend(fig, axes, extra)
        probe = analysis.sharpness.probe_examples
        probe = f"{probe:,} training examples" if probe else "?"
        _suptitle(fig, analysis, f"Sharpness at the end of training (Hessian on {probe}) and "
                  "generalisation gap, at equal epochs")
    return fig


def _plot_unfitted_target(ax, target: TargetAnalysis) -> None:
    """The mean steps to a target that has no fit, and why there is none."""
    steps = np.where(target.steps > 0, target.steps, np.nan) if target.steps.size else None
    if steps is not None and np.isfinite(steps).any():
        reached = np.isfinite(steps).any(axis=1)
        upper = target.upper_bound.any(axis=1)
        for mask, marker, label in ((reached & ~upper, "o", "mean over seeds"),
                                    (reached & upper, "v", "upper bound (target reached at "
                                                           "the first evaluation)")):
            if mask.any():
                ax.plot(target.batch_sizes[mask], np.nanmean(steps[mask], axis=1), marker,
                        color=PALETTE[0], ms=4, label=label)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    ax.text(0.5, 0.5, "no fit: " + textwrap.fill(target.note or "", 45), ha="center",
            va="center", transform=ax.transAxes, fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "0.6", "lw": 0.5})
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"steps to {target.label}")


def figure_critical_batch(analysis: Analysis) -> Figure | None:
    """Figure 8: steps to target against batch size with the fit of eq. 2.11; None if no fit.

    Left, the training-loss target (per-step resolution); right, the validation-accuracy target
    (epoch resolution; upper bounds are drawn as x and not fitted). A target without a fit
    says why. None when neither target has a fit.
    """
    critical = analysis.critical
    targets = critical.targets
    if all(t.fit is None for t in targets):
        return None
    b_simple = critical.b_simple.mean if critical.b_simple.n else None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 4.4))
        for ax, t, name in zip(axes, targets, ("primary", "secondary")):
            if t.fit is None:
                _plot_unfitted_target(ax, t)
            else:
                steps = np.where(t.steps > 0, t.steps, np.nan)
                plot_steps_to_target(ax, t.batch_sizes, steps, t.fit, b_simple=b_simple,
                                     color=PALETTE[0], ylabel=f"steps to {t.label}")
                ax.get_legend().set_bbox_to_anchor((0.5, -0.2))
            resolution = "per step" if t.kind == "train_loss" else "per epoch"
            ax.set_title(f"{name}: {t.label} ({resolution})")
        _suptitle(fig, analysis, "Critical batch size: steps to a target, the fit of McCandlish "
                  "et al. eq. 2.11 and its regimes", stat="hollow: each seed; filled: mean")
    return fig


def figure_steps_to_target(batch_sizes: Sequence[float], steps: Any,
                           fit: CriticalFit | None = None, *, b_simple: float | None = None,
                           dataset: str | None = None, target: str | None = None,
                           factor: float = REGIME_FACTOR) -> Figure:
    """A one-column figure of `plot_steps_to_target` for steps measured outside a sweep.

    Args:
      batch_sizes, steps, b_simple, factor: as for `plot_steps_to_target`.
      fit: a `CriticalFit` of the points, or None to fit them here.
      dataset: dataset name for the title.
      target: what was reached, for the y label, e.g. "val. accuracy 0.95".

    Returns:
      A matplotlib Figure, COLUMN_WIDTH wide.
    """
    if fit is None:
        fit = fit_critical_batch(batch_sizes, steps)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.5))
        plot_steps_to_target(ax, batch_sizes, steps, fit, b_simple=b_simple, factor=factor,
                             ylabel=f"steps to {target}" if target else "steps to target")
        ax.set_title("Critical batch size" + (f" ({dataset})" if dataset else ""))
    return fig


# --------------------------------------------------------------------------------------------
# The critical batch size with the learning rate tuned per batch size (issue #15)

RATE_LINE_COLOR = "0.55"
BEST_COLOR, FIT_COLOR = OKABE_ITO["blue"], OKABE_ITO["vermillion"]
B_SIMPLE_COLOR, OTHER_FIT_COLOR = OKABE_ITO["sky_blue"], OKABE_ITO["bluish_green"]


def _grid_analyses(analyses: Analysis | Mapping[str, Analysis]) -> list[tuple[str, Analysis]]:
    """(name, analysis) pairs of grid sweeps: one analysis, or a name -> analysis mapping."""
    pairs = (list(analyses.items()) if isinstance(analyses, Mapping)
             else [(analyses.grid.optimizer if analyses.grid else "", analyses)])
    for name, a in pairs:
        if a.grid is None:
            raise BatchjaxError(f"{name or a.results.path}: not a learning-rate grid sweep; its "
                                "figures are make_figures'")
    return pairs


def _grid_suptitle(fig: Figure, pairs: Sequence[tuple[str, Analysis]], title: str,
                   stat: str = "mean ± s.d. over {seeds} seeds") -> None:
    seeds = max(len(a.grid.seeds) for _, a in pairs)
    spread = stat.format(seeds=seeds) if seeds > 1 else "1 seed, no spread to show"
    width = 66 if len(pairs) == 1 else 110  # characters that fit the figure's width
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in (
        title, f"{pairs[0][1].results.dataset_label()}; {spread}")))


def _panel_title(name: str, grid) -> str:
    return f"{name} (optimizer {grid.optimizer})" if name != grid.optimizer else name


def _mark_top(ax, x: float, color: str = "black", marker: str = "v") -> None:
    """A marker on the top edge of `ax` at data-x `x` (a batch size without a value)."""
    ax.plot([x], [1.0], marker=marker, color=color, markersize=5, linestyle="none",
            transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)


def plot_lr_steps_to_target(ax, grid, *, b_simple: float | None = None) -> None:
    """Steps to the target against B: one faint line per learning rate (mean over seeds, where
    every seed reached the target), the best-rate envelope S(B) (± 1 s.d. over seeds; hollow:
    unreliable, the best rate on the grid's edge), the fit of eq. 2.11 with B_crit, perfect
    scaling (dashed) and B_simple along the best runs; batch sizes where no rate reached are
    marked on the top edge.

    Args:
      ax: axes to draw on.
      grid: a `batchjax.analysis.GridAnalysis`.
      b_simple: B_simple to mark (default: the analysis' mean along the best runs).
    """
    lines: dict[float, list[tuple[int, float]]] = {}
    for b, rates in grid.rates.items():
        for cell in rates.cells:
            key = next((k for k in lines if math.isclose(k, cell.learning_rate, rel_tol=1e-6)),
                       cell.learning_rate)
            if cell.complete:
                lines.setdefault(key, []).append((b, cell.steps.mean))
    placed: list[tuple[float, float]] = []
    for i, (lr, points) in enumerate(sorted(lines.items())):
        x, y = np.asarray(sorted(points)).T
        ax.plot(x, y, "-", color=RATE_LINE_COLOR, lw=0.6, alpha=0.55, marker=".", ms=2.5,
                label="each learning rate where every seed reached (mean)" if i == 0 else None,
                zorder=1)
        # The rate at the right end of its line, unless another label is that close.
        if len(x) > 1 and not any(px == x[-1] and abs(math.log(py / y[-1])) < 0.12
                                  for px, py in placed):
            placed.append((x[-1], y[-1]))
            ax.annotate(plain_number(lr, 2), (x[-1], y[-1]), xytext=(4, 0),
                        textcoords="offset points", fontsize=4.5, color="0.4", va="center")
    best = [(b, r) for b, r in grid.rates.items() if r.best is not None]
    if best:
        b_K = np.array([b for b, _ in best], float)
        s_K = np.array([r.steps.mean for _, r in best])
        sd_K = np.array([r.steps.sd if np.isfinite(r.steps.sd) else 0.0 for _, r in best])
        ax.plot(b_K, s_K, "-", color=BEST_COLOR, lw=1.0, zorder=3)
        for (b, r), s, sd in zip(best, s_K, sd_K):
            ax.errorbar([b], [s], yerr=[sd], color=BEST_COLOR, marker="o", ms=4,
                        mfc="white" if r.unreliable else BEST_COLOR, mew=1.0, linestyle="none",
                        zorder=4)
        ax.plot([], [], "o-", color=BEST_COLOR, ms=4, label="best rate: S(B) ± s.d.")
        if grid.unreliable:
            ax.plot([], [], "o", color=BEST_COLOR, mfc="white", ms=4,
                    label="best rate on the grid's edge (unreliable)")
    fit = grid.fit
    all_b = np.array(grid.batch_sizes, float)
    lo, hi = all_b.min() / 2 ** 0.5, all_b.max() * 2 ** 0.5
    grid_B = np.geomspace(lo, hi, 200)
    if best:
        ax.plot(grid_B, s_K[0] * b_K[0] / grid_B, "--", color="black", lw=0.8,
                label=r"perfect scaling, $S \propto 1/B$", zorder=2)
    if fit is not None and fit.valid:
        ax.plot(grid_B, fit.predict_steps(grid_B), "-", color=FIT_COLOR, lw=1.2, zorder=3,
                label=rf"eq. 2.11: $S_{{\min}}$ = {_fit_number(fit.s_min)}, "
                      rf"$E_{{\min}}$ = {_fit_number(fit.e_min)}")
        interval = grid.b_crit_t_interval
        text = rf"$B_{{\mathrm{{crit}}}}$ = {_fit_number(fit.b_crit)}"
        if interval is not None and interval[1] > interval[0] * (1 + 1e-6):
            text += f", 95% t [{_fit_number(interval[0])}, {_fit_number(interval[1])}]"
        if not lo <= fit.b_crit <= hi:
            text += " (off scale)"
        ax.axvline(fit.b_crit, color=FIT_COLOR, ls=":", lw=1.2, label=text, zorder=3)
    if b_simple is None and grid.noise is not None:
        b_simple = grid.noise.b_simple.mean
    if b_simple is not None and np.isfinite(b_simple):
        ax.axvline(b_simple, color=B_SIMPLE_COLOR, ls="-.", lw=1.2, zorder=3,
                   label=rf"$B_{{\mathrm{{simple}}}}$ = {_fit_number(b_simple)} (best runs)"
                         + ("" if lo <= b_simple <= hi else " (off scale)"))
    for b in grid.unreached:
        _mark_top(ax, b)
    if grid.unreached:
        ax.plot([], [], "v", color="black", ms=5, label="no rate reached (top edge)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlim(lo, hi * 1.3)  # room for the rate labels at the right ends
    values = [v for pts in lines.values() for _, v in pts]
    if values:
        bottom = min(values)
        if fit is not None and fit.valid:
            bottom = min(bottom, fit.predict_steps(hi))
        ax.set_ylim(bottom / 1.5, max(values) * 1.5)
    _power_of_two_axis(ax.xaxis)
    _power_of_two_axis(ax.yaxis)
    ax.set_xticks(grid.batch_sizes)
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"steps to training loss {grid.target_loss:g}")


def plot_best_lr(ax, grid) -> None:
    """The best learning rate against B: the rates tried (grey ticks), the near-best range
    (light bar: rates not significantly slower than the best), the best (filled; hollow and
    pointing at the edge: unreliable), and the fits: eq. 2.7 eps_opt(B) = eps_max / (1 +
    B_noise / B) with eps_max and B_noise marked, and the power law eps ∝ B^k. The model of
    the optimizer (eq. 2.7 for SGD, the power law for Adam) is drawn solid, the other dashed.
    """
    for i, (b, rates) in enumerate(grid.rates.items()):
        ax.plot([b] * len(rates.cells), rates.learning_rates, "_", color="0.6", ms=6, mew=0.8,
                label="rates tried" if i == 0 else None, zorder=1)
        if rates.best is None:
            _mark_top(ax, b)
            continue
        near = [rates.cells[j].learning_rate for j in rates.choice.near]
        if len(near) > 1:
            ax.plot([b, b], [min(near), max(near)], "-", color=BEST_COLOR, alpha=0.25, lw=5,
                    solid_capstyle="butt", zorder=2)
        marker = {"high": "^", "low": "v"}.get(rates.edge or "", "o")
        ax.plot([b], [rates.best.learning_rate], marker, color=BEST_COLOR, ms=4.5,
                mfc="white" if rates.unreliable else BEST_COLOR, mew=1.0, zorder=4)
        if not rates.unreliable and rates.optimum != rates.best.learning_rate:
            ax.plot([b], [rates.optimum], "x", color="black", ms=4.5, mew=1.0, zorder=5)
    ax.plot([], [], "o", color=BEST_COLOR, ms=4.5, label="best rate of the grid")
    ax.plot([], [], "x", color="black", ms=4.5, mew=1.0,
            label="refined: parabola through it and its neighbours (fitted)")
    ax.plot([], [], "-", color=BEST_COLOR, alpha=0.25, lw=5, label="not significantly slower")
    if grid.unreliable:
        ax.plot([], [], "^", color=BEST_COLOR, mfc="white", ms=4.5,
                label="on the grid's edge (unreliable, not fitted)")
    if grid.unreached:
        ax.plot([], [], "v", color="black", ms=5, label="no rate reached (top edge)")
    s = grid.scaling
    all_b = np.array(grid.batch_sizes, float)
    lo, hi = all_b.min() / 2 ** 0.5, all_b.max() * 2 ** 0.5
    grid_B = np.geomspace(lo, hi, 200)
    styles = {"eq27": ("-", FIT_COLOR, 1.2), "power": ("-", FIT_COLOR, 1.2)}
    secondary = ("--", OTHER_FIT_COLOR, 0.9)
    if s.eq27 is not None:
        ls, color, lw = styles["eq27"] if s.primary == "eq27" else secondary
        fit = s.eq27
        label = (rf"eq. 2.7: $\epsilon_\max$ = {plain_number(fit.eps_max, 3)}, "
                 rf"$B_\mathrm{{noise}}$ = {_fit_number(fit.b_noise)}"
                 if fit.identified else r"eq. 2.7 ($B_\mathrm{noise}$ not identified)")
        ax.plot(grid_B, fit.predict(grid_B), ls, color=color, lw=lw, label=label, zorder=3)
        if s.primary == "eq27" and fit.identified:
            ax.axhline(fit.eps_max, color=color, ls=":", lw=0.8, zorder=2)
            ax.annotate(r"$\epsilon_\max$", (0.01, fit.eps_max), xycoords=("axes fraction", "data"),
                        xytext=(0, 2), textcoords="offset points", color=color, fontsize=6)
            if lo <= fit.b_noise <= hi:
                ax.axvline(fit.b_noise, color=color, ls=":", lw=0.8, zorder=2)
                ax.annotate(r"$B_\mathrm{noise}$", (fit.b_noise, 0.02),
                            xycoords=("data", "axes fraction"), xytext=(2, 0),
                            textcoords="offset points", color=color, fontsize=6)
    if s.power is not None:
        ls, color, lw = styles["power"] if s.primary == "power" else secondary
        power = s.power
        ax.plot(grid_B, 2.0 ** (power.intercept + power.slope * np.log2(grid_B)), ls,
                color=color, lw=lw, zorder=3,
                label=rf"power law: $\epsilon \propto B^{{{power.slope:.2f}}}$ "
                      f"[{power.lo:.2f}, {power.hi:.2f}]")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    _power_of_two_axis(ax.xaxis)
    ax.set_xticks(grid.batch_sizes)
    _plain_log_ticks(ax.yaxis)
    tried = sorted({round(v, 12) for r in grid.rates.values() for v in r.learning_rates})
    distinct = [v for i, v in enumerate(tried) if i == 0 or v > tried[i - 1] * (1 + 1e-6)]
    if len(distinct) <= 10:  # a few rates shared by every batch size: tick each
        ax.yaxis.set_major_locator(FixedLocator(distinct))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: plain_number(v, 3)))
    ax.set_xlabel("batch size B")
    ax.set_ylabel("learning rate")


def plot_b_simple_over_training(ax, grid) -> None:
    """B_simple over training along the best runs, against the fraction of the way to the
    target (steps / that run's steps to target): one colour per batch size, one line per
    seed; the mean over batch sizes of the time averages (dashed) and B_crit with its t
    interval (dotted, shaded)."""
    sizes = grid.batch_sizes
    for b, rates in grid.rates.items():
        if rates.best is None:
            continue
        style = batch_style(b, sizes)
        for k, seed in enumerate(rates.best.seeds):
            if seed.run is None or not np.isfinite(seed.steps):
                continue
            recs = sorted((rec["step"], rec["noise_scale"]) for rec in seed.run.noise
                          if rec.get("noise_scale") is not None and rec.get("step") is not None
                          and np.isfinite(rec["noise_scale"]))
            x, y = np.asarray(recs, float).reshape(-1, 2).T
            if not x.size or x[0] > seed.steps:
                continue
            inside = x < seed.steps
            # The records, and the value at the crossing as the time average takes it.
            ax.plot(x[inside] / seed.steps, y[inside], linestyle="none", color=style["color"],
                    marker=style["marker"], ms=2.2, alpha=0.8)
            ax.plot(np.r_[x[inside], seed.steps] / seed.steps,
                    np.r_[y[inside], np.interp(seed.steps, x, y)], "-", color=style["color"],
                    lw=0.8, alpha=0.8, marker=style["marker"], ms=2.2, markevery=[0],
                    label=f"B = {b}" if k == 0 else None)
    fit = grid.fit
    if fit is not None and fit.valid:
        ax.axhline(fit.b_crit, color=FIT_COLOR, ls=":", lw=1.4,
                   label=rf"$B_\mathrm{{crit}}$ = {_fit_number(fit.b_crit)}")
        interval = grid.b_crit_t_interval
        if interval is not None:
            ax.axhspan(*interval, color=FIT_COLOR, alpha=0.12, lw=0,
                       label=r"$B_\mathrm{crit}$: 95% t interval")
    if grid.noise is not None:
        ax.axhline(grid.noise.b_simple.mean, color="black", ls="--", lw=1.0,
                   label=rf"$B_\mathrm{{simple}}$ time-averaged = "
                         f"{_fit_number(grid.noise.b_simple.mean)}")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("fraction of the steps to the target")
    ax.set_ylabel(r"$B_\mathrm{simple}$ = tr($\Sigma$) / $|G|^2$")


def _grid_figure(analyses, draw: Callable, title: str,
                 stat: str = "mean ± s.d. over {seeds} seeds", height: float = 3.8) -> Figure:
    """One panel per grid sweep, each with its own legend below it (the fitted numbers
    differ between panels)."""
    pairs = _grid_analyses(analyses)
    width = 4.4 if len(pairs) == 1 else PAGE_WIDTH
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(pairs), figsize=(width, height), squeeze=False)
        for ax, (name, a) in zip(axes[0], pairs):
            draw(ax, a.grid)
            ax.set_title(_panel_title(name, a.grid))
            entries = len(ax.get_legend_handles_labels()[1])
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16),
                      ncol=2 if entries > 8 else 1, fontsize=6, frameon=False,
                      handlelength=2.2, columnspacing=1.0)
        _grid_suptitle(fig, pairs, title, stat)
    return fig


def figure_lr_steps_to_target(analyses: Analysis | Mapping[str, Analysis]) -> Figure:
    """Steps to the target against B for every learning rate, the best-rate envelope and the
    fit of eq. 2.11 (`plot_lr_steps_to_target`); one panel per grid sweep."""
    return _grid_figure(analyses, plot_lr_steps_to_target,
                        "Steps to the target at every learning rate, the best rate's envelope "
                        "and eq. 2.11", height=5.2)


def figure_best_lr(analyses: Analysis | Mapping[str, Analysis]) -> Figure:
    """The best learning rate against B with the eq. 2.7 fit and the power law
    (`plot_best_lr`); one panel per grid sweep."""
    return _grid_figure(analyses, plot_best_lr,
                        "The best learning rate of each batch size", height=4.8,
                        stat="best: the fewest mean steps over {seeds} seeds")


def figure_b_simple_over_training(analyses: Analysis | Mapping[str, Analysis]) -> Figure:
    """B_simple over training along the best runs, with B_crit marked
    (`plot_b_simple_over_training`); one panel per grid sweep."""
    return _grid_figure(analyses, plot_b_simple_over_training,
                        "B_simple along the best runs up to the target, and B_crit",
                        height=4.6, stat="one line per seed ({seeds} seeds)")


GRID_FIGURES = {"lr_steps_to_target": figure_lr_steps_to_target,
                "best_lr": figure_best_lr,
                "b_simple_over_training": figure_b_simple_over_training}


def _grid_jobs(analysis: Analysis) -> tuple[list, list[str]]:
    grid, notes = analysis.grid, []
    jobs = [("lr_steps_to_target", figure_lr_steps_to_target, ()),
            ("best_lr", figure_best_lr, ())]
    if grid.noise is not None:
        jobs.append(("b_simple_over_training", figure_b_simple_over_training, ()))
    else:
        notes.append("figure b_simple_over_training skipped: "
                     + ("no gradient-noise records" if not analysis.results.has_noise
                        else f"no B_crit ({grid.fit_note or 'fit not of the model shape'})"))
    return jobs, notes


def make_comparison_figures(analyses: Mapping[str, Analysis], figures_dir: str | os.PathLike
                            ) -> list[pathlib.Path]:
    """The three grid figures with one panel per optimizer (`GRID_FIGURES`), saved into
    `figures_dir`; b_simple_over_training only when some grid has B_simple along its best
    runs."""
    paths = []
    for name, figure in GRID_FIGURES.items():
        if name == "b_simple_over_training" and all(a.grid.noise is None
                                                    for a in analyses.values()):
            continue
        paths += save_figure(figure(analyses), figures_dir, name)
    return paths


# --------------------------------------------------------------------------------------------
# Saving


def save_figure(fig: Figure, directory: str | os.PathLike, name: str,
                dpi: float = 300) -> list[pathlib.Path]:
    """Write `fig` as `name.pdf` (vector) and `name.png` (`dpi`), atomically; closes it."""
    directory = pathlib.Path(directory)
    paths = []
    with plt.rc_context(STYLE):
        for ext, kw in (("pdf", {}), ("png", {"dpi": dpi})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, **kw)
            path = directory / f"{name}.{ext}"
            write_bytes_atomic(path, buf.getvalue())
            paths.append(path)
    plt.close(fig)
    return paths


# What the scripts pass as `make_figures(workers=...)`: one process more than the cores (a
# drawing process spends part of its time starting), at most 4. Measured on 2 cores: 3 beat 4.
SCRIPT_WORKERS = min(4, (os.cpu_count() or 1) + 1)

# Figures rendered in other processes (`make_figures(workers=...)`) find the analysis here.
_WORKER_ANALYSIS: Analysis | None = None


def _init_worker(analysis: Analysis) -> None:
    global _WORKER_ANALYSIS
    _WORKER_ANALYSIS = analysis


def _render(job: tuple[str, Callable, tuple], figures_dir, analysis: Analysis | None = None,
            dpi: float = 300) -> list[pathlib.Path]:
    """Draw and save one figure: `job` is (file name, figure function, its other arguments)."""
    name, figure, args = job
    fig = figure(analysis if analysis is not None else _WORKER_ANALYSIS, *args)
    return [] if fig is None else save_figure(fig, figures_dir, name, dpi)


def _render_all(jobs, figures_dir, analysis: Analysis, workers: int,
                dpi: float = 300) -> list[list]:
    """Each job's files, in order; with workers > 1, spread over `workers` processes.

    This process renders too, from the end of the list, every job no other process has
    started yet (a future it can still cancel). The others are spawned, not forked (JAX's
    threads do not survive a fork); if they cannot start, this process renders everything.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [_render(job, figures_dir, analysis, dpi) for job in jobs]
    import concurrent.futures
    import multiprocessing
    done: list[list | None] = [None] * len(jobs)
    try:
        pool = concurrent.futures.ProcessPoolExecutor(
            min(workers, len(jobs)) - 1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(analysis,))
    except (OSError, ValueError):
        return [_render(job, figures_dir, analysis, dpi) for job in jobs]
    try:
        with pool:
            futures = [pool.submit(_render, job, figures_dir, None, dpi) for job in jobs]
            for i in reversed(range(len(jobs))):
                if futures[i].cancel():
                    done[i] = _render(jobs[i], figures_dir, analysis, dpi)
            for i, future in enumerate(futures):
                if done[i] is None:
                    done[i] = future.result()
    except concurrent.futures.process.BrokenProcessPool:
        pass  # a process died: this one draws what is left
    return [files if files is not None else _render(job, figures_dir, analysis, dpi)
            for job, files in zip(jobs, done)]


def make_figures(results: SweepResults, figures_dir: str | os.PathLike, *,
                 analysis: Analysis | None = None, target_loss: float | None = None,
                 target_accuracy: float | None = None, workers: int = 1, dpi: float = 300
                 ) -> tuple[list[pathlib.Path], list[str]]:
    """Draw and save every figure of a sweep.

    Args:
      results: a loaded sweep.
      figures_dir: where the PDF and PNG files go.
      analysis: `batchjax.analysis.analyse(results, ...)`, when the caller has it (the report
        should state the numbers the figures draw); computed here otherwise.
      target_loss, target_accuracy: the targets of that analysis when it is computed here.
      workers: processes drawing figures at once (this one included). Each figure is drawn
        and saved by one process; the files are the same. The others are started with
        `multiprocessing`'s "spawn", which imports the caller's main module again: call with
        workers > 1 only from under `if __name__ == "__main__":`, and keep JAX out of that
        module's imports (the drawing itself needs none). The scripts use `SCRIPT_WORKERS`.
      dpi: the PNGs' resolution (300, print quality; lower draws a quick look sooner).

    Returns:
      The written files and notes on figures that were skipped (e.g. no noise records).
    """
    if analysis is None:
        analysis = analyse(results, target_loss=target_loss, target_accuracy=target_accuracy)
    results = analysis.results
    if analysis.grid is not None:
        jobs, notes = _grid_jobs(analysis)
        paths = [p for files in _render_all(jobs, figures_dir, analysis, workers, dpi)
                 for p in files]
        return paths, notes
    notes = []
    jobs = [(f"bs{b}_curves", figure_curves, (b,)) for b in results.batch_sizes]
    jobs += [("step_loss", figure_step_loss, ()), ("validation", figure_validation, ())]
    if results.has_noise:
        jobs += [("gradient_variance", figure_gradient_variance, ()),
                 ("noise_over_training", figure_noise_over_training, ())]
    else:
        notes.append("no gradient-noise records in these results (noise schedule 'none'): "
                     "figures 4 (gradient_variance) and 5 (noise_over_training) skipped")
    jobs.append(("roughness_gap", figure_roughness_gap, ()))
    if results.has_sharpness:
        jobs.append(("sharpness_gap", figure_sharpness_gap, ()))
    else:
        notes.append("no sharpness measurements in these results (--no-sharpness): figure 7 "
                     "(sharpness_gap) skipped")
    if any(t.fit is not None for t in analysis.critical.targets):
        jobs.append(("critical_batch", figure_critical_batch, ()))
    else:
        notes.append(f"figure 8 (critical_batch) skipped: {analysis.critical.primary.note}")
    paths = [p for files in _render_all(jobs, figures_dir, analysis, workers, dpi)
             for p in files]
    return paths, notes
