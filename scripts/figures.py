"""Draw a sweep's figures and write its report, from the saved results only.

    python scripts/figures.py results/                     # figures into results/figures/
    python scripts/figures.py results/ --figures-dir figures   # redraw the committed figures/
    python scripts/figures.py results/ --figures-dir out/ --target-accuracy 0.9
    python scripts/figures.py results/critical --target-loss 0.1   # critical batch size target
    python scripts/figures.py results-critical/            # grid sweeps per optimizer inside:
                                                           # each one's report, and the
                                                           # comparison (report.md, figures/)

A learning-rate grid sweep (`--preset critical`) gets the critical batch size at the best rate
of each batch size instead of the claims. A directory without a manifest whose subdirectories
are grid sweeps (OUT/sgd, OUT/adam_keras) gets each sweep's report and figures and, at its top,
the comparison across them. The console shows the verdict table and where the full report is.
Bad input (no such directory, a corrupt results file) prints one line `error: ...` and exits
with status 2.
"""

import argparse
import pathlib
import sys

from batchjax.analysis import analyse
from batchjax.errors import BatchjaxError
from batchjax.plots import SCRIPT_WORKERS, make_comparison_figures, make_figures
from batchjax.report import verdict_table, write_critical_comparison, write_report
from batchjax.results import MANIFEST, load_sweep


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir", help="a sweep directory written by scripts/sweep.py, or a "
                                       "directory of grid sweeps (one per optimizer)")
    p.add_argument("--figures-dir", default=None,
                   help="default RESULTS_DIR/figures (the committed figures/ are redrawn only "
                        "when asked: --figures-dir figures)")
    p.add_argument("--no-figures", action="store_true", help="only the report")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="validation accuracy for claim 4 and the critical batch size (default: "
                        "the best every run reaches, rounded down to 0.5 points)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="training-loss target of the critical batch size (default: the lowest "
                        "smoothed loss every run reaches, rounded up; a grid sweep: the target "
                        "it fixed before training)")
    p.add_argument("--quiet", action="store_true", help="do not print the verdict table")
    return p


def report_one(results_dir, args, figures_dir=None):
    """Figures and report of one sweep directory; returns its analysis."""
    results = load_sweep(results_dir)
    figures_dir = figures_dir or str(results.path / "figures")
    analysis = analyse(results, target_loss=args.target_loss,
                       target_accuracy=args.target_accuracy)
    figures, notes = ([], []) if args.no_figures else make_figures(
        results, figures_dir, analysis=analysis, workers=SCRIPT_WORKERS)
    for note in notes:
        print(f"note: {results.path.name}: {note}", file=sys.stderr)
    write_report(analysis, figures=figures, notes=notes)
    if not args.quiet:
        print(verdict_table(analysis))
        print(f"\nfull report: {results.path / 'report.md'}")
    return analysis


def grid_subdirectories(path: pathlib.Path) -> list[pathlib.Path]:
    """Subdirectories holding a sweep, when `path` itself holds none."""
    if not path.is_dir() or (path / MANIFEST).exists():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / MANIFEST).exists())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
            raise BatchjaxError(f"--target-accuracy must be in (0, 1], got "
                                f"{args.target_accuracy}")
        if args.target_loss is not None and not 0 < args.target_loss < float("inf"):
            raise BatchjaxError(f"--target-loss must be a finite number > 0, got "
                                f"{args.target_loss}")
        path = pathlib.Path(args.results_dir)
        subdirs = grid_subdirectories(path)
        if not subdirs:
            report_one(path, args, args.figures_dir)
            return 0
        analyses = {}
        for sub in subdirs:
            if not args.quiet:
                print(f"== {sub.name}")
            analyses[sub.name] = report_one(sub, args)
        not_grid = [name for name, a in analyses.items() if a.grid is None]
        if not_grid:
            raise BatchjaxError(f"{path} holds sweeps without a learning-rate grid "
                                f"({', '.join(not_grid)}); the comparison needs grid sweeps "
                                "(--preset critical); run figures.py on each instead")
        figures_dir = args.figures_dir or str(path / "figures")
        figures = [] if args.no_figures else make_comparison_figures(analyses, figures_dir)
        write_critical_comparison(analyses, path, figures=figures)
        if not args.quiet:
            print(f"\ncomparison: {path / 'report.md'}")
    except BatchjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
