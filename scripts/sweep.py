"""Run the batch-size sweep, then draw its figures and write its report.

    python scripts/sweep.py                       # the original experiment: B = 8, 32, 128,
                                                  # 10 epochs, 3 seeds, data "auto"
    python scripts/sweep.py --resume              # continue a stopped sweep in --out
    python scripts/sweep.py --batch-sizes 16,64 --epochs 3 --seeds 1 --out /tmp/try
    python scripts/sweep.py --preset critical --out results/critical   # B = 8, 16, ..., 1024

Flags map one to one onto `batchjax.TrainConfig` fields (`--lr` is learning_rate,
`--noise-every` is noise_schedule); results go to --out (layout: `batchjax.results`), figures to
--figures-dir, and the report is printed and saved as OUT/report.md. Each run's sharpness is
measured at its end (`--no-sharpness` skips it; settings: `batchjax.sharpness.SharpnessSettings`).

A preset changes only defaults: flags given explicitly win. `--preset critical` is the critical
batch size experiment: batch sizes 8, 16, ..., 1024 (powers of two), 20 epochs, 3 seeds. 20
epochs give B = 1024 (4 steps per epoch on mnist-5k) 80 steps, which bring every batch size
below a training loss of about 0.23, the default target; the fitted B_crit hardly moves with the
budget (73-86 for 15 to 30 epochs on mnist-5k), while each further epoch costs mostly the
gradient-noise measurements at large batch sizes. On 2 CPU cores the preset takes about 2.5
minutes on mnist-5k (measured with nothing compiled yet: 136 s of training with noise at every
epoch end and sharpness at the end, then 13 s of figures and report).
`--target-loss` and `--target-accuracy` override the report's automatically chosen targets.
Compiled programs are kept for later runs in ~/.cache/batchjax/xla (`--compile-cache DIR`, or
`none`; `batchjax.sweep.enable_compile_cache`), and figures are drawn in up to 4 processes.

Bad input prints one line `error: ...` and exits with status 2; an interrupted sweep (Ctrl-C,
SIGTERM) keeps every finished run and exits with status 130.
"""

import argparse
import signal
import sys
import time

from batchjax.config import LR_SCALINGS, NOISE_SCHEDULES, OPTIMIZERS, TrainConfig
from batchjax.data import load_dataset
from batchjax.errors import BatchjaxError
from batchjax.plots import SCRIPT_WORKERS, make_figures
from batchjax.report import critical_analysis, write_report

DEFAULTS = TrainConfig()
# Flags a preset may change, with their values without a preset.
BASE = {"batch_sizes": [8, 32, 128], "epochs": DEFAULTS.epochs, "seeds": 3}
PRESETS = {
    "critical": {"batch_sizes": [2 ** k for k in range(3, 11)], "epochs": 20, "seeds": 3},
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 8,32,128, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="critical: batch sizes 8,16,...,1024, 20 epochs, 3 seeds; explicit "
                        "flags override it")
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help="comma-separated batch sizes (default 8,32,128)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {BASE['epochs']}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds: 0..S-1 (default 3)")
    p.add_argument("--dataset", default="auto",
                   help="auto (tfds mnist if prepared, else mnist-5k), mnist-5k, synthetic, or "
                        "a tfds name")
    p.add_argument("--data-dir", default=None, help="tfds data directory")
    p.add_argument("--download", action="store_true", help="let tfds download and prepare")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out: skip complete runs, redo the others")
    p.add_argument("--figures-dir", default="figures", help="default figures/")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress; the report still prints")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: join a jax.distributed job (coordinator, process count and "
                        "id from the flags below or detected from SLURM/Open MPI/...); each "
                        "process trains its share of the batch sizes into the shared --out, "
                        "process 0 writes figures and report")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="split the CPU into this many JAX devices so seeds train on separate "
                        "cores (e.g. --seeds 4 --cpu-devices 2); 0: JAX's default of one")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR for later runs; none: off (default: "
                        "$BATCHJAX_COMPILE_CACHE, else ~/.cache/batchjax/xla)")
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--lr", type=float, default=DEFAULTS.learning_rate, help="learning_rate")
    p.add_argument("--lr-scaling", choices=LR_SCALINGS, default=DEFAULTS.lr_scaling)
    p.add_argument("--reference-batch-size", type=int, default=DEFAULTS.reference_batch_size)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer)
    p.add_argument("--b1", type=float, default=DEFAULTS.b1)
    p.add_argument("--b2", type=float, default=DEFAULTS.b2)
    p.add_argument("--eps", type=float, default=DEFAULTS.eps)
    p.add_argument("--hidden", type=int, default=DEFAULTS.hidden)
    p.add_argument("--noise-every", choices=NOISE_SCHEDULES, default=DEFAULTS.noise_schedule,
                   help="noise_schedule: epoch (at init and every epoch end), log, or none")
    p.add_argument("--noise-points", type=int, default=DEFAULTS.noise_points)
    p.add_argument("--probe-size", type=int, default=DEFAULTS.probe_size,
                   help="training examples for the noise statistics (0: all)")
    p.add_argument("--unroll", type=int, default=DEFAULTS.unroll)
    p.add_argument("--sharpness", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each run's Hessian lambda_max and trace at its end (default "
                        "on: first 1,024 training examples, Lanczos to 1e-2, 20 probes)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="training-loss target of the critical batch size (default: the lowest "
                        "smoothed loss every run reaches, rounded up)")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="validation-accuracy target of claim 4 and the critical batch size "
                        "(default: the best every run reaches, rounded down to 0.5 points)")
    return p


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags not given with the preset's values, then with the plain defaults."""
    preset = PRESETS.get(args.preset, {})
    for name, value in BASE.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, value))
    return args


def check_targets(target_loss: float | None, target_accuracy: float | None) -> None:
    if target_loss is not None and not (target_loss > 0 and target_loss < float("inf")):
        raise BatchjaxError(f"--target-loss must be a finite number > 0, got {target_loss}")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise BatchjaxError(f"--target-accuracy must be in (0, 1], got {target_accuracy}")


def distributed_setup(args) -> dict:
    """Joins the multi-host job; returns run_sweep's process arguments."""
    import jax
    from jax.experimental import multihost_utils

    try:
        jax.distributed.initialize(args.coordinator_address, args.num_processes,
                                   args.process_id)
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BatchjaxError(f"--distributed: jax.distributed.initialize() failed ({first}); pass "
                            "--coordinator-address, --num-processes and --process-id, or run "
                            "under a cluster manager JAX detects (SLURM, Open MPI, ...)") from None
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "barrier": multihost_utils.sync_global_devices}


# Signals received. The handler's KeyboardInterrupt is lost when it lands inside a callback
# whose exceptions Python ignores (JAX's garbage-collection hook, a __del__), so the sweep also
# checks this list after every epoch and before the report.
_SIGNALS: list[int] = []


def _raise_interrupt(signum, frame):
    _SIGNALS.append(signum)
    raise KeyboardInterrupt


def _check_interrupt(*_):
    if _SIGNALS:
        raise KeyboardInterrupt


def main(argv=None) -> int:
    args = apply_preset(build_parser().parse_args(argv))
    # Imported here, not at the top: the figure processes start by importing this script
    # again, and drawing needs neither JAX nor the training code.
    from batchjax.sharpness import SharpnessSettings
    from batchjax.sweep import check_grid, compile_cache_dir, enable_compile_cache, run_sweep
    _SIGNALS.clear()
    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handled.append(signal.SIGINT)  # not where it is ignored, as for a background job
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in handled}
    try:
        config = TrainConfig(
            epochs=args.epochs, learning_rate=args.lr, lr_scaling=args.lr_scaling,
            reference_batch_size=args.reference_batch_size, optimizer=args.optimizer,
            b1=args.b1, b2=args.b2, eps=args.eps, hidden=args.hidden,
            noise_schedule=args.noise_every, noise_points=args.noise_points,
            probe_size=args.probe_size, unroll=args.unroll)
        if args.seeds < 1:
            raise BatchjaxError(f"--seeds must be at least 1, got {args.seeds}")
        check_targets(args.target_loss, args.target_accuracy)
        try:
            enable_compile_cache(compile_cache_dir(args.compile_cache))
        except BatchjaxError as err:
            if args.compile_cache is not None:
                raise
            print(f"note: {err}; compiling without it", file=sys.stderr)
        batch_sizes, seeds = check_grid(config, args.batch_sizes, range(args.seeds))
        dataset = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download,
                               verbose=not args.quiet)
        if args.cpu_devices < 0:
            raise BatchjaxError(f"--cpu-devices must be >= 0, got {args.cpu_devices}")
        if args.cpu_devices:
            import jax
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        processes = distributed_setup(args) if args.distributed else {}
        start = time.perf_counter()
        results = run_sweep(args.out, config, dataset, batch_sizes=batch_sizes, seeds=seeds,
                            resume=args.resume, command=sys.argv, verbose=not args.quiet,
                            sharpness=SharpnessSettings() if args.sharpness else None,
                            on_epoch_end=_check_interrupt, **processes)
        _check_interrupt()
        train_time = time.perf_counter() - start
        if processes.get("process_index", 0) != 0:
            return 0  # process 0 draws the figures and writes the report
        targets = {"target_loss": args.target_loss, "target_accuracy": args.target_accuracy}
        analysis = critical_analysis(results, **targets)
        figures, notes = ([], []) if args.no_figures else make_figures(
            results, args.figures_dir, analysis=analysis, workers=SCRIPT_WORKERS, **targets)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(write_report(results, figures=figures, notes=notes, analysis=analysis, **targets))
        if not args.quiet:
            print(f"sweep: {train_time:.1f} s; results in {args.out}/ (report.md, summary.csv, "
                  f"summary.tex)" + ("" if args.no_figures else
                                     f"; {len(figures)} figure files in {args.figures_dir}/"),
                  file=sys.stderr)
    except BatchjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are saved in {args.out}/; continue with --resume",
              file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
