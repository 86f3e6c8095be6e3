"""Draw a sweep's figures and write its report, from the saved results only.

    python scripts/figures.py results/                     # figures into results/figures/
    python scripts/figures.py results/ --figures-dir figures   # redraw the committed figures/
    python scripts/figures.py results/ --figures-dir out/ --target-accuracy 0.9
    python scripts/figures.py results/critical --target-loss 0.1   # critical batch size target

The console shows the verdict table and where the full report is (RESULTS/report.md). Bad input
(no such directory, a corrupt results file) prints one line `error: ...` and exits with
status 2.
"""

import argparse
import sys

from batchjax.analysis import analyse
from batchjax.errors import BatchjaxError
from batchjax.plots import SCRIPT_WORKERS, make_figures
from batchjax.report import verdict_table, write_report
from batchjax.results import load_sweep


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir", help="a sweep directory written by scripts/sweep.py")
    p.add_argument("--figures-dir", default=None,
                   help="default RESULTS_DIR/figures (the committed figures/ are redrawn only "
                        "when asked: --figures-dir figures)")
    p.add_argument("--no-figures", action="store_true", help="only the report")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="validation accuracy for claim 4 and the critical batch size (default: "
                        "the best every run reaches, rounded down to 0.5 points)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="training-loss target of the critical batch size (default: the lowest "
                        "smoothed loss every run reaches, rounded up)")
    p.add_argument("--quiet", action="store_true", help="do not print the verdict table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
            raise BatchjaxError(f"--target-accuracy must be in (0, 1], got "
                                f"{args.target_accuracy}")
        if args.target_loss is not None and not 0 < args.target_loss < float("inf"):
            raise BatchjaxError(f"--target-loss must be a finite number > 0, got "
                                f"{args.target_loss}")
        results = load_sweep(args.results_dir)
        figures_dir = args.figures_dir or str(results.path / "figures")
        analysis = analyse(results, target_loss=args.target_loss,
                           target_accuracy=args.target_accuracy)
        figures, notes = ([], []) if args.no_figures else make_figures(
            results, figures_dir, analysis=analysis, workers=SCRIPT_WORKERS)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        write_report(analysis, figures=figures, notes=notes)
        if not args.quiet:
            print(verdict_table(analysis))
            print(f"\nfull report: {results.path / 'report.md'}")
    except BatchjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
