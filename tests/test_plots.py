"""Figures: every file is written as a non-empty PDF and 300-dpi PNG, on constructed results.

Constructed sweeps come from `tests/test_report.py` (`fake_sweep`); the figures of a real sweep
are drawn in `tests/test_sweep.py`.
"""

import struct

import matplotlib.pyplot as plt
import pytest
from matplotlib.lines import Line2D

from batchjax import plots
from test_report import TARGET_ACC, TARGET_LOSS, critical_sweep, fake_sweep

ALL_FIGURES = ["bs8_curves", "bs16_curves", "bs32_curves", "bs128_curves", "step_loss",
               "validation",
               "gradient_variance", "noise_over_training", "roughness_gap", "sharpness_gap",
               "critical_batch"]


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
    results = fake_sweep(batch_sizes=(8, 16, 32, 128), seeds=(0, 1), diverged=[(8, 1, 2)])
    one, _ = plots.make_figures(results, tmp_path / "one")
    three, _ = plots.make_figures(results, tmp_path / "three", workers=3)
    assert [p.name for p in three] == [p.name for p in one]  # same files, same order
    for a, b in zip(one, three):
        if a.suffix == ".png":  # PDFs carry their creation time
            assert a.read_bytes() == b.read_bytes(), a.name


def test_figures_are_drawn_here_when_no_process_can_start(tmp_path, monkeypatch):
    import concurrent.futures

    def refuse(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", refuse)
    results = fake_sweep(batch_sizes=(8, 32), seeds=(0,))
    paths, _ = plots.make_figures(results, tmp_path, workers=4)
    assert paths and all(p.exists() for p in paths)


def test_missing_noise_and_sharpness_skip_figures_4_5_and_7_with_notes(tmp_path):
    paths, notes = plots.make_figures(fake_sweep(batch_sizes=(8, 32), seeds=(0,), noise=False,
                                                 sharpness_exponent=None), tmp_path)
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
    results = critical_sweep()
    analysis = plots.report.critical_analysis(results, target_loss=TARGET_LOSS,
                                              target_accuracy=TARGET_ACC)
    fig = plots.figure_critical_batch(results, analysis)
    assert "model-digits" in fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(r"B_{\mathrm{crit}}$ = 200" in label for label in labels), labels
        assert any(r"B_{\mathrm{simple}}$ = 150" in label for label in labels), labels
    plots.save_figure(fig, tmp_path, "critical_batch")
    assert_figure_files(tmp_path, ["critical_batch"])


@pytest.mark.parametrize("make", [
    lambda r: plots.figure_curves(r, 8), plots.figure_step_loss, plots.figure_validation,
    plots.figure_gradient_variance, plots.figure_noise_over_training,
    plots.figure_roughness_gap, plots.figure_sharpness_gap, plots.figure_critical_batch])
def test_every_figure_names_the_dataset(make):
    fig = make(fake_sweep(seeds=(0, 1)))
    assert "fake-digits" in fig._suptitle.get_text()
    for ax in fig.axes:
        for text in (ax.xaxis.label, ax.yaxis.label):
            assert text.get_fontsize() >= 7
    plt.close(fig)


def test_diverged_run_is_marked_not_plotted_as_numbers():
    results = fake_sweep(seeds=(0, 1), diverged=[(8, 1, 2)])
    fig = plots.figure_curves(results, 8)
    crosses = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "x"]
    assert crosses, "the diverged seed is not marked"
    notes = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any("diverged: seed 1 at step 67" in n for n in notes), notes
    plt.close(fig)


def test_batch_size_axes_are_log2():
    results = fake_sweep(seeds=(0, 1))
    with plt.rc_context(plots.STYLE):
        fig, axes = plt.subplots(1, 4)
        plots.plot_roughness(axes[0], results)
        plots.plot_gap(axes[1], results, metric="accuracy")
        plots.plot_gradient_variance(axes[2], results, epoch=0)
        plots.plot_sharpness(axes[3], results, quantity="lambda_max")
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    # The 1/B reference is a dashed black line.
    dashed = [ln for ln in axes[2].get_lines() if ln.get_linestyle() == "--"]
    assert dashed and dashed[0].get_color() in ("k", "black", (0, 0, 0, 1))
    plt.close(fig)


def test_palette_is_distinct_per_batch_size():
    styles = [plots.batch_style(b, [8, 32, 128]) for b in (8, 32, 128)]
    assert len({s["color"] for s in styles}) == 3 and len({s["marker"] for s in styles}) == 3
    assert isinstance(plots._diverged_handle(), Line2D)
