"""Draw a sweep's figures and write its report, from the saved results only.

    python scripts/figures.py results/                     # figures into figures/
    python scripts/figures.py results/ --figures-dir out/ --target-accuracy 0.9
    python scripts/figures.py results/critical --target-loss 0.1   # critical batch size target

Bad input (no such directory, a corrupt results file) prints one line `error: ...` and exits
with status 2.
"""

import argparse
import sys

from batchjax.errors import BatchjaxError
from batchjax.plots import SCRIPT_WORKERS, make_figures
from batchjax.report import critical_analysis, write_report
from batchjax.results import load_sweep



class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir", help="a sweep directory written by scripts/sweep.py")
    p.add_argument("--figures-dir", default="figures", help="default figures/")
    p.add_argument("--no-figures", action="store_true", help="only the report")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="validation accuracy for claim 4 and the critical batch size (default: "
                        "the best every run reaches, rounded down to 0.5 points)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="training-loss target of the critical batch size (default: the lowest "
                        "smoothed loss every run reaches, rounded up)")
    p.add_argument("--quiet", action="store_true", help="do not print the report")
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
        targets = {"target_loss": args.target_loss, "target_accuracy": args.target_accuracy}
        analysis = critical_analysis(results, **targets)
        figures, notes = ([], []) if args.no_figures else make_figures(
            results, args.figures_dir, analysis=analysis, workers=SCRIPT_WORKERS, **targets)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        text = write_report(results, figures=figures, notes=notes, analysis=analysis, **targets)
        if not args.quiet:
            print(text)
    except BatchjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
