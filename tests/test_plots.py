"""Figures: what they draw (the analysis' values, plain tick labels, the y-range of the per-step
loss), and the PDF and 300-dpi PNG files, on constructed results.

Constructed sweeps come from `tests/test_analysis.py` (`fake_sweep`, `critical_sweep`); the
figures of a real sweep are drawn in `tests/test_sweep.py`.
"""

import math
import pathlib
import re
import struct

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.lines import Line2D

from batchjax import plots
from batchjax.analysis import analyse
from batchjax.critical import fit_critical_batch
from test_analysis import TARGET_ACC, TARGET_LOSS, critical_sweep, fake_sweep

ALL_FIGURES = ["bs8_curves", "bs16_curves", "bs32_curves", "bs128_curves", "step_loss",
               "validation",
               "gradient_variance", "noise_over_training", "roughness_gap", "sharpness_gap",
               "critical_batch"]
# A tick label is a plain number: 260, 0.001, 2k, −0.5; never 2.6e+02 or 10^-3.
PLAIN = re.compile(r"^(\N{MINUS SIGN}|-)?\d+(\.\d+)?k?$")


def png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def assert_figure_files(directory, names):
    for name in names:
        pdf, png = directory / f"{name}.pdf", directory / f"{name}.png"
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5000, pdf
        width, height = png_size(png)
        assert png.stat().st_size > 20000, png
        assert width >= plots.COLUMN_WIDTH * 300, f"{png} is {width} px wide: not 300 dpi"


def tick_texts(fig):
    """Every visible tick label and axis offset text of a drawn figure."""
    fig.canvas.draw()
    texts = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            texts += [t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels()
                      if t.get_visible() and t.get_text()]
            texts.append(axis.get_offset_text().get_text() or "0")
    return texts


def test_make_figures_writes_every_figure_and_marks_diverged_runs(tmp_path):
    # Four batch sizes: the three without a diverged seed give the critical-batch-size figure.
    results = fake_sweep(batch_sizes=(8, 16, 32, 128), seeds=(0, 1), diverged=[(8, 1, 2)])
    paths, notes = plots.make_figures(results, tmp_path)
    assert notes == []
    assert sorted(p.name for p in paths) == sorted(
        f"{n}.{ext}" for n in ALL_FIGURES for ext in ("pdf", "png"))
    assert_figure_files(tmp_path, ALL_FIGURES)
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_figures_drawn_in_several_processes_are_those_drawn_in_one(tmp_path):
    results = fake_sweep(batch_sizes=(8, 32, 128), seeds=(0, 1), diverged=[(8, 1, 2)])
    one, _ = plots.make_figures(results, tmp_path / "one", dpi=72)
    three, _ = plots.make_figures(results, tmp_path / "three", workers=3, dpi=72)
    assert [p.name for p in three] == [p.name for p in one]  # same files, same order
    for a, b in zip(one, three):
        if a.suffix == ".png":  # PDFs carry their creation time
            assert a.read_bytes() == b.read_bytes(), a.name
            assert png_size(a)[0] <= plots.PAGE_WIDTH * 72  # the dpi asked for, not 300


def test_figures_are_drawn_here_when_no_process_can_start(tmp_path, monkeypatch):
    import concurrent.futures

    def refuse(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", refuse)
    drawn = []  # what this process drew (the drawing itself is tested above)

    def render(job, figures_dir, analysis=None, dpi=300):
        assert analysis is not None  # here, not in a worker
        drawn.append(job[0])
        return [pathlib.Path(figures_dir) / f"{job[0]}.png"]

    monkeypatch.setattr(plots, "_render", render)
    results = fake_sweep(batch_sizes=(8, 32, 128), seeds=(0,))
    paths, _ = plots.make_figures(results, tmp_path, workers=4)
    assert [p.stem for p in paths] == drawn
    assert {"bs8_curves", "bs32_curves", "bs128_curves", "step_loss", "validation",
            "gradient_variance", "roughness_gap", "critical_batch"} <= set(drawn)


def test_missing_noise_and_sharpness_skip_figures_4_5_and_7_with_notes(tmp_path):
    paths, notes = plots.make_figures(fake_sweep(batch_sizes=(8, 32), seeds=(0,), noise=False,
                                                 sharpness_exponent=None), tmp_path, dpi=72)
    names = {p.stem for p in paths}
    assert "gradient_variance" not in names and "noise_over_training" not in names
    assert {"bs8_curves", "step_loss", "validation", "roughness_gap"} <= names
    noise_notes = [n for n in notes if "figures 4" in n]
    assert len(noise_notes) == 1 and "noise" in noise_notes[0]
    assert "sharpness_gap" not in names
    assert any("figure 7 (sharpness_gap) skipped" in n for n in notes)
    # Two batch sizes: no critical-batch-size fit, and the note says why.
    assert "critical_batch" not in names
    assert any("figure 8 (critical_batch) skipped: only 2 of 2 batch sizes" in n for n in notes)


def test_critical_batch_figure_on_runs_that_follow_the_model(tmp_path):
    a = analyse(critical_sweep(), target_loss=TARGET_LOSS, target_accuracy=TARGET_ACC)
    fig = plots.figure_critical_batch(a)
    assert "model-digits" in fig._suptitle.get_text()
    for ax, target in zip(fig.axes, a.critical.targets):
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(r"B_{\mathrm{crit}}$ = 200" in label for label in labels), labels
        assert any(r"B_{\mathrm{simple}}$ = 150" in label for label in labels), labels
        # The vertical lines stand at the analysis' B_crit and B_simple; the means are its steps.
        vertical = {line.get_xdata()[0] for line in ax.get_lines()
                    if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2}
        assert target.fit.b_crit in vertical and a.critical.b_simple.mean in vertical
        means = next(line for line in ax.get_lines() if line.get_label() == "mean over seeds")
        np.testing.assert_allclose(means.get_ydata(), target.steps[:, 0])
    plots.save_figure(fig, tmp_path, "critical_batch")
    assert_figure_files(tmp_path, ["critical_batch"])


def test_steps_to_target_figure_of_points_from_outside_a_sweep(tmp_path):
    batch_sizes = 2.0 ** np.arange(3, 11)
    rng = np.random.default_rng(3)
    model = 50.0 + 10_000.0 / batch_sizes
    steps = model[:, None] * np.exp(0.05 * rng.normal(size=(8, 3)))
    steps[-1, 0] = np.nan
    fig = plots.figure_steps_to_target(batch_sizes, steps, b_simple=150.0, dataset="mnist-5k",
                                       target="val. accuracy 0.95")
    path = tmp_path / "critical.png"
    fig.savefig(path, dpi=100)
    assert path.stat().st_size > 10_000
    assert fig.axes[0].get_xscale() == "log" and "mnist-5k" in fig.axes[0].get_title()
    assert all(PLAIN.match(t) for t in tick_texts(fig))
    plt.close(fig)
    # One seed, no B_simple, on given axes.
    fig, ax = plt.subplots()
    plots.plot_steps_to_target(ax, batch_sizes, model, fit_critical_batch(batch_sizes, model))
    assert ax.get_legend() is not None
    plt.close(fig)


FIGURES = [lambda a: plots.figure_curves(a, 8), plots.figure_step_loss, plots.figure_validation,
           plots.figure_gradient_variance, plots.figure_noise_over_training,
           plots.figure_roughness_gap, plots.figure_sharpness_gap, plots.figure_critical_batch]


@pytest.mark.parametrize("make", FIGURES)
def test_every_figure_names_the_dataset(make):
    fig = make(analyse(fake_sweep(seeds=(0, 1))))
    assert "fake-digits" in fig._suptitle.get_text()
    for ax in fig.axes:
        for text in (ax.xaxis.label, ax.yaxis.label):
            assert text.get_fontsize() >= 7
    plt.close(fig)


@pytest.mark.parametrize("make", FIGURES)
def test_tick_labels_are_plain_numbers(make):
    # Losses down to 1e-4 and variances up to hundreds: where %g would write exponents.
    results = fake_sweep(batch_sizes=(8, 16, 32, 128), seeds=(0, 1))
    for r in results.runs:
        r.step_losses = r.step_losses * 1e-3
        for rec in r.noise:
            rec["empirical"]["mean"] *= 100
            rec["minibatch_variance"] = {k: v * 100 for k, v in rec["minibatch_variance"].items()}
    fig = make(analyse(results))
    texts = tick_texts(fig)
    assert texts and all(PLAIN.match(t) for t in texts), [t for t in texts if not PLAIN.match(t)]
    plt.close(fig)


def test_tick_label_formats():
    assert [plots.tick_label(v) for v in (256, 260.4, 0.001, 0.0625, 1024, 2e-7, -0.5)] == [
        "256", "260", "0.001", "0.0625", "1024", "0.0000002", "\N{MINUS SIGN}0.5"]
    assert [plots.short_tick_label(v) for v in (0, 500, 2000, 15_000, 2500)] == [
        "0", "500", "2k", "15k", "2.5k"]


def test_step_loss_draws_the_analysis_curves():
    results = fake_sweep(seeds=(0, 1))
    a = analyse(results)
    fig = plots.figure_step_loss(a)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    ax = by_title["B = 32"]
    curve = a.step_loss[32]
    smoothed = next(line for line in ax.get_lines()
                    if line.get_label() == f"moving average ({curve.window} steps)")
    np.testing.assert_allclose(smoothed.get_xdata(), curve.smoothed.x)
    np.testing.assert_allclose(smoothed.get_ydata(), curve.smoothed.mean)
    raw = next(line for line in ax.get_lines() if line.get_label() == "raw (seed 0)")
    seed0 = next(r for r in results.runs if (r.batch_size, r.seed) == (32, 0))
    np.testing.assert_allclose(raw.get_ydata(), seed0.step_losses)
    # The all-batch-sizes panel draws every batch size's smoothed mean.
    every = by_title["smoothed, all batch sizes"]
    for b in (8, 32, 128):
        line = next(ln for ln in every.get_lines() if ln.get_label() == f"B = {b}")
        np.testing.assert_allclose(line.get_ydata(), a.step_loss[b].smoothed.mean)
    plt.close(fig)


def test_step_loss_range_follows_the_smoothed_curves_not_near_zero_losses():
    results = fake_sweep(seeds=(0, 1))
    a = analyse(results)
    lowest = min(float(np.min(c.smoothed.low)) for c in a.step_loss.values())
    bottom, top = plots.step_loss_ylim(a)
    # Moderate noise: the range is the raw losses' own (0.2nd to 99.9th percentile, padded).
    positive = [r.step_losses[r.step_losses > 0] for r in results.runs]
    lows = [np.quantile(p, 0.002) for p in positive]
    assert bottom == pytest.approx(min(lows) / 1.5)
    assert top == pytest.approx(max(np.quantile(p, 0.999) for p in positive) * 1.5)
    assert min(lows) > lowest / plots.STEP_LOSS_RANGE_BELOW  # the floor did not apply
    # Fitted small batches: 5% of B = 8's minibatch losses at 2e-7 (as on MNIST).
    rng = np.random.default_rng(5)
    for r in results.runs:
        if r.batch_size == 8:
            r.step_losses = np.where(rng.random(r.step_losses.size) < 0.05, 2e-7, r.step_losses)
    a = analyse(results)
    bottom, top = plots.step_loss_ylim(a)
    lowest = min(float(np.min(c.smoothed.low)) for c in a.step_loss.values())
    assert bottom == pytest.approx(lowest / plots.STEP_LOSS_RANGE_BELOW / 1.5)
    assert bottom > 1e-3 and math.log10(top / bottom) < 3.5  # not squeezed into 7 decades
    fig = plots.figure_step_loss(a)
    assert all(ax.get_ylim() == pytest.approx((bottom, top))
               for ax in fig.axes if ax.get_visible())
    plt.close(fig)


def test_summary_panels_draw_the_analysis_estimates():
    results = fake_sweep(seeds=(0, 1, 2))
    a = analyse(results)
    fig = plots.figure_roughness_gap(a)
    for ax, key in zip(fig.axes, ("roughness", "roughness_relative", "gap_loss",
                                  "gap_accuracy")):
        line = ax.get_lines()[0]  # the grey line through the means
        np.testing.assert_allclose(line.get_xdata(), [8, 32, 128])
        np.testing.assert_allclose(line.get_ydata(), [a.summary[b][key].mean for b in (8, 32, 128)])
        # Error bars: ± 1 s.d. over seeds.
        caps = [c for c in ax.collections if c.get_segments()]
        spans = sorted(float(np.ptp(seg[:, 1])) for c in caps for seg in c.get_segments())
        assert spans == pytest.approx(sorted(2 * a.summary[b][key].sd for b in (8, 32, 128)))
    plt.close(fig)


def test_gradient_variance_draws_the_measured_points():
    results = fake_sweep(seeds=(0, 1))
    a = analyse(results)
    with plt.rc_context(plots.STYLE):
        fig, ax = plt.subplots()
        plots.plot_gradient_variance(ax, a, epoch=1.0)
    points = [line for line in ax.get_lines() if line.get_marker() in ("o", "s", "^")]
    drawn = {int(line.get_xdata()[0]): float(line.get_ydata()[0]) for line in points}
    for b in (8, 32, 128):  # the mean over seeds of each run's own measurement after epoch 1
        emp = [r.noise[1]["empirical"]["mean"] for r in results.runs if r.batch_size == b]
        assert drawn[b] == pytest.approx(np.mean(emp))
    plt.close(fig)


def test_diverged_run_is_marked_not_plotted_as_numbers():
    a = analyse(fake_sweep(seeds=(0, 1), diverged=[(8, 1, 2)]))
    fig = plots.figure_curves(a, 8)
    crosses = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "x"]
    assert crosses, "the diverged seed is not marked"
    notes = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any("diverged: seed 1 at step 67" in n for n in notes), notes
    plt.close(fig)


def test_batch_size_axes_are_log2():
    a = analyse(fake_sweep(seeds=(0, 1)))
    with plt.rc_context(plots.STYLE):
        fig, axes = plt.subplots(1, 4)
        plots.plot_roughness(axes[0], a)
        plots.plot_gap(axes[1], a, metric="accuracy")
        plots.plot_gradient_variance(axes[2], a, epoch=0)
        plots.plot_sharpness(axes[3], a, quantity="lambda_max")
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    # The 1/B reference is a dashed black line.
    dashed = [ln for ln in axes[2].get_lines() if ln.get_linestyle() == "--"]
    assert dashed and dashed[0].get_color() in ("k", "black", (0, 0, 0, 1))
    plt.close(fig)


def test_one_palette():
    styles = [plots.batch_style(b, [8, 32, 128]) for b in (8, 32, 128)]
    assert len({s["color"] for s in styles}) == 3 and len({s["marker"] for s in styles}) == 3
    assert isinstance(plots._diverged_handle(), Line2D)
    okabe_ito = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00",
                 "#CC79A7"}
    assert set(plots.PALETTE) == okabe_ito and set(plots.REGIME_COLOURS.values()) <= okabe_ito
    assert {plots.TRAIN_COLOR, plots.VAL_COLOR} <= okabe_ito


# --------------------------------------------------------------------------------------------
# The learning-rate grid (issue #15): constructed in tests/test_critical_lr.py

GRID_FIGURES = [plots.figure_lr_steps_to_target, plots.figure_best_lr,
                plots.figure_b_simple_over_training]


def test_make_figures_on_a_grid_sweep_draws_the_grid_figures(tmp_path):
    from test_critical_lr import grid_sweep
    results = grid_sweep(batch_sizes=(4, 8, 32, 128, 1024))
    paths, notes = plots.make_figures(results, tmp_path)
    assert notes == []
    names = ["lr_steps_to_target", "best_lr", "b_simple_over_training"]
    assert sorted(p.name for p in paths) == sorted(f"{n}.{e}" for n in names
                                                   for e in ("pdf", "png"))
    assert_figure_files(tmp_path, names)
    _, notes = plots.make_figures(grid_sweep(batch_sizes=(8, 32, 128), noise=False),
                                  tmp_path / "quiet", dpi=72)
    assert notes == ["figure b_simple_over_training skipped: no gradient-noise records"]


@pytest.mark.parametrize("make", GRID_FIGURES)
def test_grid_figures_name_the_dataset_and_write_plain_ticks(make):
    import numpy as np
    from test_critical_lr import grid_sweep
    sgd = analyse(grid_sweep())
    adam = analyse(grid_sweep(optimizer="adam_keras", rate=lambda b: 1e-3 * np.sqrt(b / 8)))
    for analyses, panels in ((sgd, 1), ({"sgd": sgd, "adam_keras": adam}, 2)):
        fig = make(analyses)
        assert "grid-digits" in fig._suptitle.get_text() and len(fig.axes) == panels
        texts = tick_texts(fig)
        assert texts and all(PLAIN.match(t) for t in texts), [t for t in texts
                                                              if not PLAIN.match(t)]
        assert all(ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
                   for ax in fig.axes) or make is plots.figure_b_simple_over_training
        plt.close(fig)


def test_grid_figures_draw_the_analysis_values():
    from test_critical_lr import grid_sweep
    a = analyse(grid_sweep())
    g = a.grid
    with plt.rc_context(plots.STYLE):
        fig, axes = plt.subplots(1, 3)
        plots.plot_lr_steps_to_target(axes[0], g)
        plots.plot_best_lr(axes[1], g)
        plots.plot_b_simple_over_training(axes[2], g)
    # Steps: the best-rate envelope through S(B); B_crit and B_simple as vertical lines.
    best = [b for b in g.batch_sizes if g.rates[b].best is not None]
    envelope = next(ln for ln in axes[0].get_lines() if ln.get_color() == plots.BEST_COLOR
                    and len(ln.get_xdata()) == len(best))
    np.testing.assert_allclose(envelope.get_ydata(), [g.rates[b].steps.mean for b in best])
    vertical = {ln.get_xdata()[0] for ln in axes[0].get_lines()
                if len(ln.get_xdata()) == 2 and len(set(ln.get_xdata())) == 1}
    assert g.fit.b_crit in vertical and g.noise.b_simple.mean in vertical
    fit_line = next(ln for ln in axes[0].get_lines() if ln.get_label().startswith("eq. 2.11"))
    np.testing.assert_allclose(fit_line.get_ydata(), 50 + 10_000 / fit_line.get_xdata(),
                               rtol=1e-6)
    # The unreliable best (B = 1024, on the upper edge) is drawn hollow, as an upward triangle.
    top = [ln for ln in axes[1].get_lines() if list(ln.get_xdata()) == [1024]
           and ln.get_marker() == "^"]
    assert top and top[0].get_markerfacecolor() == "white"
    assert top[0].get_ydata()[0] == pytest.approx(g.rates[1024].best.learning_rate)
    filled = {ln.get_xdata()[0]: ln.get_ydata()[0] for ln in axes[1].get_lines()
              if ln.get_marker() == "o" and len(ln.get_xdata()) == 1}
    for b in g.scaling.batch_sizes:
        assert filled[b] == pytest.approx(g.rates[b].best.learning_rate)
    eq27 = next(ln for ln in axes[1].get_lines() if ln.get_label().startswith("eq. 2.7"))
    np.testing.assert_allclose(eq27.get_ydata(), 0.5 / (1 + 100 / eq27.get_xdata()), rtol=1e-6)
    # B_simple: each best run's records to its crossing, ending at the interpolated value.
    seed = g.rates[64].best.seeds[0]
    line = next(ln for ln in axes[2].get_lines() if ln.get_label() == "B = 64")
    assert line.get_xdata()[-1] == pytest.approx(1.0)
    steps = np.array([r["step"] for r in seed.run.noise], float)
    values = np.array([r["noise_scale"] for r in seed.run.noise])
    assert line.get_ydata()[-1] == pytest.approx(np.interp(seed.steps, steps, values))
    horizontal = {ln.get_ydata()[0] for ln in axes[2].get_lines()
                  if len(ln.get_ydata()) == 2 and len(set(ln.get_ydata())) == 1}
    assert g.fit.b_crit in horizontal and g.noise.b_simple.mean in horizontal
    plt.close(fig)


def test_comparison_figures_are_saved(tmp_path):
    from test_critical_lr import grid_sweep
    analyses = {"sgd": analyse(grid_sweep(batch_sizes=(8, 32, 128))),
                "adam_keras": analyse(grid_sweep(batch_sizes=(8, 32, 128),
                                                 optimizer="adam_keras"))}
    paths = plots.make_comparison_figures(analyses, tmp_path)
    assert sorted(p.stem for p in paths if p.suffix == ".png") == [
        "b_simple_over_training", "best_lr", "lr_steps_to_target"]
    assert_figure_files(tmp_path, ["best_lr"])
    with pytest.raises(plots.BatchjaxError, match="not a learning-rate grid sweep"):
        plots.figure_best_lr(analyse(fake_sweep()))
