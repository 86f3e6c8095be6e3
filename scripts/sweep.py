"""Run the batch-size sweep, then draw its figures and write its report.

    python scripts/sweep.py                       # the original experiment: B = 8, 32, 128,
                                                  # 10 epochs, 3 seeds, data "auto"
    python scripts/sweep.py --resume              # continue a stopped sweep in --out
    python scripts/sweep.py --batch-sizes 16,64 --epochs 3 --seeds 1 --out /tmp/try
    python scripts/sweep.py --lr-grid 1e-3:1e-1:6 --target-loss 0.1 --out /tmp/grid
    python scripts/sweep.py --preset critical --out results/critical   # the critical batch
                                                  # size with the learning rate tuned per B
    python scripts/sweep.py --preset critical --dataset mnist-5k --out /tmp/c  # minutes
    python scripts/figures.py results --figures-dir figures   # redraw the committed figures/

Flags map one to one onto `batchjax.TrainConfig` fields (`--learning-rate` is learning_rate,
also `--lr`; `--noise-schedule` is noise_schedule, also `--noise-every`; `--hidden 256,128` is
hidden); results go to --out (layout: `batchjax.results`), figures to --figures-dir (default
OUT/figures, so that a sweep never overwrites the committed figures/ of another dataset),
the report to OUT/report.md; the console ends with the verdicts and the report's path. Each
run's sharpness is measured at its end (`--no-sharpness` skips it; settings:
`batchjax.sharpness.SharpnessSettings`).

Learning-rate grids: `--lrs 1e-3,3e-3,1e-2` or `--lr-grid LOW:HIGH:N` (N rates log-spaced from
LOW to HIGH, both included) train every rate x seed of a batch size in one program, each its own
run (`bs00032_lr0.001_seed0`), resumable per (batch size, rate, seed); the grid is part of the
sweep's identity (resume refuses another). With `--target-loss T` a batch size's runs stop at
the first epoch end at which each has reached T (the smoothed training loss), diverged, or is
hopeless (past `--stop-factor` x the fewest steps to T at that batch size, default 3); runs
that never reach T are saved and reported with the reason (`batchjax.sweep.EarlyStop`).

A preset changes only defaults: flags given explicitly win. `--preset critical` is the critical
batch size as McCandlish et al. (2018) and Shallue et al. (2019) measure it, at the best
learning rate of each batch size: B = 8, 16, ..., 1024; for each of sgd and adam_keras (into
OUT/sgd/ and OUT/adam_keras/, and their comparison into OUT/report.md), an adaptive grid of 6
rates a factor 2 apart (`batchjax.sweep.LearningRateSearch`: guess / 8 ... guess x 4), 3 seeds,
target training loss 0.1, stop factor 3. The guess at B is the best rate at B/2 times 2 (sgd)
or sqrt(2) (adam_keras); at B = 8 the centre is 0.1 (sgd) and 1e-3 (adam_keras). A best rate
on the grid's edge extends the grid by 2 rates past it (at most twice per direction), after
which it is marked unreliable. The budget is 20 epochs of 50,000 examples (real MNIST), on a
smaller training set the same examples in at most 100 epochs (mnist-5k, 4,000 examples: 100);
gradient noise on the log-spaced schedule (20 points, plus every epoch end) on a probe of the
first 10,000 training examples (all of them on a smaller set), 20 minibatches in its sampled
check (`batchjax.sweep.GRID_EMPIRICAL_BATCHES`); no sharpness.

The pilot behind the centres and the target (real MNIST, 50,000 / 10,000; hidden 128; one seed;
steps to a smoothed training loss of 0.1, "-" not reached, in brackets the lowest smoothed
loss then):

    sgd,  B = 8 (2 epochs):     lr 0.0125 - (0.152), 0.025 12,161, 0.05 8,263, 0.1 6,393,
                                0.2 8,251, 0.4 - (0.196)
    adam, B = 8 (2 epochs):     lr 6.25e-5 - (0.207), 1.25e-4 - (0.155), 2.5e-4 - (0.111),
                                5e-4 8,866, 1e-3 6,290, 2e-3 6,311
    sgd,  B = 1024 (20 epochs): lr 0.2 - (0.106), 0.4 593, 0.8 351, 1.6 - (0.219), 3.2 -
    adam, B = 1024 (20 epochs): lr 1e-3 484, 2e-3 264, 4e-3 154, 8e-3 110, 1.6e-2 105, 3.2e-2 106

So the centres are the best rates at B = 8, inside the grid, and 0.1 is reached at the best rate
of both optimizers at B = 1024 well inside the 980 steps of the budget (sgd 351): one target
for both, so that their critical batch sizes compare at the same loss. A lower target leaves
sgd at B = 1024 too little room (0.05: 793 steps). On mnist-5k, sgd at B = 1024 and lr 0.8
reaches 0.1 in 139 steps (35 epochs of its 4 steps), within its 100 epochs. Steps to a
training-loss target bunch at epoch starts (6,250 steps at B = 8, multiples of 49 at 1,024):
the loss drops when training revisits examples.

`--target-loss` and `--target-accuracy` override the report's automatically chosen targets (a
grid sweep fixes its --target-loss before training).
Compiled programs are kept for later runs in ~/.cache/batchjax/xla (`--compile-cache DIR`, or
`none`), and figures are drawn in up to 4 processes.

Limits: before any work the sweep estimates the memory of the grid (`batchjax.memory`) and
refuses one that cannot fit, or trains the runs in groups that fit (`--group-size`,
`--memory-limit`), saying so with the estimate. One sweep writes a results directory at a time
(a lock naming its holder).

Bad input prints one line `error: ...` and exits with status 2. Stopping: the first SIGINT
(Ctrl-C) or SIGTERM stops the sweep at the next safe point (between epoch segments of about
a second, measurements and runs), or, when no safe point comes within `STOP_SECONDS` (a long
compilation, a long measurement), ends the process then; a second signal ends it at once.
Either way the exit status is 130, every finished run is kept (all files are written
atomically) and `--resume` continues, the adaptive grids included.
"""

import argparse
import dataclasses
import math
import os
import pathlib
import select
import signal
import socket
import sys
import threading
import time

from batchjax.config import LR_SCALINGS, NOISE_SCHEDULES, OPTIMIZERS, TrainConfig
from batchjax.errors import BatchjaxError

DEFAULTS = TrainConfig()
# Flags a preset may change, with their values without a preset (optimizers None: the one of
# --optimizer).
BASE = {"batch_sizes": [8, 32, 128], "epochs": DEFAULTS.epochs, "seeds": 3,
        "optimizers": None, "noise_schedule": DEFAULTS.noise_schedule,
        "probe_size": DEFAULTS.probe_size, "sharpness": True}
PRESETS = {
    "critical": {"batch_sizes": [2 ** k for k in range(3, 11)], "epochs": 20, "seeds": 3,
                 "optimizers": ["sgd", "adam_keras"], "noise_schedule": "log",
                 "probe_size": 10_000, "sharpness": False},
}
# The critical preset's adaptive learning-rate search per optimizer (`LearningRateSearch`):
# the centre of the grid at B = 8 (from the pilot of the module docstring) and the factor of
# the guess per doubling of B (design.md, round 2).
CRITICAL_SEARCH = {"sgd": {"centre": 0.1, "scale": 2.0, "centre_batch_size": 8},
                   "adam_keras": {"centre": 1e-3, "scale": math.sqrt(2.0),
                                  "centre_batch_size": 8}}
# The critical preset's training-loss target per optimizer (the module docstring says why).
CRITICAL_TARGET_LOSS = {"sgd": 0.1, "adam_keras": 0.1}
# The critical preset's epoch budget is 20 epochs of real MNIST's 50,000 examples; on a
# smaller training set, as many epochs as give the same examples, at most this many.
CRITICAL_MAX_EPOCHS = 100
# The longest a stop request waits for a safe point before the process ends anyway
# ($BATCHJAX_STOP_SECONDS overrides it).
STOP_SECONDS = float(os.environ.get("BATCHJAX_STOP_SECONDS") or 5.0)
COMPILE_CACHE_ENV = "BATCHJAX_COMPILE_CACHE"


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


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 1e-3,3e-3,1e-2, got {text!r}")
    return values


def lr_grid(text: str) -> list[float]:
    """`LOW:HIGH:N`: N learning rates log-spaced from LOW to HIGH, both included."""
    parts = text.split(":")
    try:
        low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"expected LOW:HIGH:N such as 1e-3:1e-1:6, got {text!r}") from None
    if not (0 < low < high < math.inf):
        raise argparse.ArgumentTypeError(f"expected 0 < LOW < HIGH in LOW:HIGH:N, got {text!r}")
    if count < 2:
        raise argparse.ArgumentTypeError(f"expected N >= 2 rates in LOW:HIGH:N, got {text!r}")
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="critical: the critical batch size with the learning rate tuned per "
                        "batch size: batch sizes 8,16,...,1024, an adaptive grid of 6 rates, "
                        "3 seeds, at most 20 epochs, sgd and adam_keras into OUT/<optimizer>/; "
                        "explicit flags override it")
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help="comma-separated batch sizes (default 8,32,128)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {BASE['epochs']}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds: 0..S-1 (default 3)")
    p.add_argument("--dataset", default="auto",
                   help="auto (real MNIST if found locally: tfds-prepared, Keras' cached "
                        "mnist.npz or IDX files in --data-dir; else the bundled mnist-5k; never "
                        "downloads), mnist (the same sources, content checked by SHA-256), "
                        "fashion_mnist, mnist-5k, synthetic, or a tfds name")
    p.add_argument("--data-dir", default=None,
                   help="tfds data directory, also searched for the four MNIST or "
                        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
    p.add_argument("--download", action="store_true",
                   help="mnist: fetch Keras' mnist.npz (11 MB, SHA-256 pinned) into "
                        "$KERAS_HOME/datasets or ~/.keras/datasets when not found; other tfds "
                        "datasets: let tfds download and prepare (needs TensorFlow)")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out: skip complete runs, redo the others")
    p.add_argument("--figures-dir", default=None,
                   help="default OUT/figures; the committed figures/ are redrawn on purpose: "
                        "python scripts/figures.py results --figures-dir figures")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress; the verdicts still print")
    p.add_argument("--group-size", type=int, default=None,
                   help="most seeds trained together (default: as many as fit in memory)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory one device may use, e.g. 8G (default: the device's, or the "
                        "host's available memory; also $BATCHJAX_MEMORY_LIMIT)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: join a jax.distributed job (coordinator, process count and "
                        "id from the flags below or detected from SLURM/Open MPI/...); each "
                        "process trains its share of the batch sizes into the shared --out, "
                        "process 0 writes figures and report")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="split the CPU into this many JAX devices so seeds (and a grid's "
                        "rates) train on separate cores (e.g. --seeds 4 --cpu-devices 2); 0: "
                        "JAX's default of one")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR for later runs; none: off (default: "
                        "$BATCHJAX_COMPILE_CACHE, else ~/.cache/batchjax/xla)")
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float,
                   default=DEFAULTS.learning_rate)
    p.add_argument("--lr-scaling", choices=LR_SCALINGS, default=DEFAULTS.lr_scaling)
    p.add_argument("--reference-batch-size", type=int, default=DEFAULTS.reference_batch_size)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"default {DEFAULTS.optimizer} (--preset critical: sgd and adam_keras)")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--lrs", type=float_list, default=None, metavar="LR,LR,...",
                       help="a learning-rate grid: every rate x seed of a batch size trained "
                            "together, each its own run (bs00032_lr0.001_seed0)")
    rates.add_argument("--lr-grid", type=lr_grid, default=None, metavar="LOW:HIGH:N",
                       help="a learning-rate grid of N rates log-spaced from LOW to HIGH")
    p.add_argument("--stop-factor", type=float, default=None,
                   help="a learning-rate grid's run is hopeless past this many times the fewest "
                        "steps to --target-loss at its batch size (default 3)")
    p.add_argument("--momentum", type=float, default=DEFAULTS.momentum,
                   help="of the momentum and nesterov optimizers")
    p.add_argument("--b1", type=float, default=DEFAULTS.b1)
    p.add_argument("--b2", type=float, default=DEFAULTS.b2)
    p.add_argument("--eps", type=float, default=DEFAULTS.eps)
    p.add_argument("--hidden", type=int_list, default=list(DEFAULTS.hidden),
                   help="hidden layer widths, comma-separated (default 128; e.g. 256,128)")
    p.add_argument("--noise-schedule", "--noise-every", dest="noise_schedule",
                   choices=NOISE_SCHEDULES, default=None,
                   help="epoch (at init and every epoch end), log, or none")
    p.add_argument("--noise-points", type=int, default=DEFAULTS.noise_points)
    p.add_argument("--probe-size", type=int, default=None,
                   help="training examples for the noise statistics (0: all)")
    p.add_argument("--unroll", type=int, default=DEFAULTS.unroll)
    p.add_argument("--sharpness", action=argparse.BooleanOptionalAction, default=None,
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
    args.from_preset = set()
    if args.optimizer is not None:
        args.optimizers = [args.optimizer]
    else:
        args.optimizers = None
    for name, value in BASE.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, value))
            if name in preset:
                args.from_preset.add(name)
    if args.optimizers is None:
        args.optimizers = [DEFAULTS.optimizer]
    args.optimizer = args.optimizers[0]
    return args


# Fields of TrainConfig the flags set (the flag is the field with dashes).
CONFIG_FLAGS = ("epochs", "learning_rate", "lr_scaling", "reference_batch_size", "optimizer",
                "momentum", "b1", "b2", "eps", "hidden", "noise_schedule", "noise_points",
                "probe_size", "unroll")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS})


def check_targets(target_loss: float | None, target_accuracy: float | None) -> None:
    if target_loss is not None and not (target_loss > 0 and target_loss < float("inf")):
        raise BatchjaxError(f"--target-loss must be a finite number > 0, got {target_loss}")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise BatchjaxError(f"--target-accuracy must be in (0, 1], got {target_accuracy}")


# --------------------------------------------------------------------------------------------
# Compilation cache (process-wide JAX settings: the script's business, not the library's)


def compile_cache_dir(flag: str | None = None) -> str | None:
    """The compilation cache directory of `--compile-cache FLAG` (None: off).

    FLAG "none" (or empty) turns the cache off. Without the flag: $BATCHJAX_COMPILE_CACHE if
    set (again "none": off); else a cache JAX was already given (JAX_COMPILATION_CACHE_DIR);
    else $XDG_CACHE_HOME/batchjax/xla, by default ~/.cache/batchjax/xla.
    """
    import jax

    chosen = flag if flag is not None else os.environ.get(COMPILE_CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none") else chosen
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "batchjax", "xla")


def enable_compile_cache(path: str | os.PathLike | None) -> str | None:
    """Keep this process's compiled XLA programs in JAX's persistent cache at `path`.

    A later process that compiles the same program (same code, shapes, options, jax and
    jaxlib) loads it instead. Loaded and freshly compiled programs compute the same numbers.
    Every program is cached, however quickly it compiled (unless
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise). Call before the first
    compilation; `path` None turns the cache off for this process. Returns the directory.

    Raises:
      BatchjaxError: `path` cannot be created or written (the cache is then left off).
    """
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    if path is None:
        return None
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as err:
        raise BatchjaxError(f"compile cache {path} is not a writable directory "
                            f"({err.strerror or err})") from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's choice wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


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


# --------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """SIGTERM and SIGINT (where not ignored) as stop requests, with a bounded wait.

    The first signal sets the request, which the sweep polls at its safe points (`__call__`,
    passed as `should_stop`); in phases marked interruptible (set-up, figures) it also raises
    KeyboardInterrupt in the main thread at once. The main thread may be inside one long call
    that Python cannot interrupt (an XLA compilation, a long measurement): the signal handler
    of Python runs only between bytecodes of the main thread. So the signals also reach a
    watchdog thread through `signal.set_wakeup_fd`, which the interpreter's C-level handler
    writes at once; if the main thread has not finished (`claim_exit`) within `seconds` of the
    first signal, or when a second signal comes, the watchdog ends the process with status 130
    (after releasing the results directory's lock and ending the figure processes). Files are
    written atomically, so no half-written file looks complete.
    """

    def __init__(self, seconds: float = STOP_SECONDS, out_dir: str = "results",
                 stream=None):
        self.seconds, self.out_dir = seconds, out_dir
        self.stream = stream if stream is not None else sys.stderr
        self.phase, self.interruptible = "set-up", True
        self.requested_at: float | None = None
        self._exit_lock = threading.Lock()  # held by whoever ends the process
        self._say_lock = threading.Lock()  # orders the watchdog's notice before the last line
        self._finishing = False

    def __call__(self) -> bool:
        return self.requested_at is not None

    def set_phase(self, text: str, interruptible: bool = False) -> None:
        """Name what the main thread does now; `interruptible`: a KeyboardInterrupt raised
        anywhere in it is harmless (no training state, no half-done step)."""
        self.phase, self.interruptible = text, interruptible

    def interrupted_line(self, reason: str = "") -> str:
        return (f"interrupted: finished runs are saved in {self.out_dir}/; continue with "
                f"--resume{reason}")

    def __enter__(self) -> "StopSignals":
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._done_read, self._done_write = os.pipe()
        handled = [signal.SIGTERM]
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            handled.append(signal.SIGINT)  # not where it is ignored, as for a background job
        self._handled = set(handled)
        self._previous = {s: signal.signal(s, self._python_handler) for s in handled}
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="batchjax-stop", daemon=True)
        self._thread.start()
        return self

    def _python_handler(self, signum, frame) -> None:
        # Runs in the main thread, possibly late; the watchdog acts on the signal in any case.
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            if self.interruptible:
                raise KeyboardInterrupt

    def _watch(self) -> None:
        count, deadline = 0, None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._read, self._done_read], [], [], timeout)
            if self._done_read in ready:
                return
            if self._read in ready:
                count += sum(1 for s in self._read.recv(64) if s in self._handled)
                if count == 1 and deadline is None:
                    deadline = time.monotonic() + self.seconds
                    if self.requested_at is None:
                        self.requested_at = time.monotonic()
                    with self._say_lock:
                        if not self._finishing:
                            self._say(f"stopping at the next safe point ({self.phase}); "
                                      "signal again to stop at once")
                elif count > 1:
                    self._exit(" (stopped at once by a second signal)")
            elif deadline is not None and time.monotonic() >= deadline:
                self._exit(f" (stopped during {self.phase}: no safe point within "
                           f"{self.seconds:g} s)")

    def _say(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _exit(self, reason: str) -> None:
        if not self._exit_lock.acquire(blocking=False):
            return  # the main thread is finishing already
        try:
            from batchjax.results import DirectoryLock
            DirectoryLock.release_all()
        except Exception:  # noqa: BLE001 - nothing may keep the process from ending
            pass
        if "multiprocessing" in sys.modules:
            for child in sys.modules["multiprocessing"].active_children():
                child.terminate()
        self._say(self.interrupted_line(reason))
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os._exit(130)

    def claim_exit(self) -> bool:
        """The main thread takes over ending the process; False if the watchdog is doing it."""
        with self._say_lock:
            self._finishing = True
        return self._exit_lock.acquire(blocking=False)

    def __exit__(self, *exc) -> None:
        os.write(self._done_write, b"x")
        self._thread.join()
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        for f in (self._read, self._write):
            f.close()
        os.close(self._done_read)
        os.close(self._done_write)


# --------------------------------------------------------------------------------------------
# Main


def _grid_settings(args: argparse.Namespace, config: TrainConfig) -> dict:
    """{optimizer: (its config, its directory, learning_rates, target_loss)} of the sweeps to
    run: one, or with --preset critical one per optimizer in OUT/<optimizer>/."""
    from batchjax.sweep import LearningRateSearch

    critical = args.preset == "critical"
    rates = args.lrs if args.lrs is not None else args.lr_grid
    if args.stop_factor is not None and rates is None and not critical:
        raise BatchjaxError("--stop-factor applies to a learning-rate grid; give --lrs or "
                            "--lr-grid (or --preset critical)")
    settings = {}
    for name in args.optimizers:
        optimizer_config = dataclasses.replace(config, optimizer=name)
        out = os.path.join(args.out, name) if critical else args.out
        target = args.target_loss
        learning_rates = rates
        if critical:
            if target is None:
                target = CRITICAL_TARGET_LOSS.get(name)
            if learning_rates is None:
                if name not in CRITICAL_SEARCH:
                    raise BatchjaxError(f"--preset critical has search centres for "
                                        f"{' and '.join(CRITICAL_SEARCH)} only; give --lrs or "
                                        f"--lr-grid for {name}")
                learning_rates = LearningRateSearch(**CRITICAL_SEARCH[name])
            if target is None:
                raise BatchjaxError(f"--preset critical has no default target for {name}; give "
                                    "--target-loss")
        settings[name] = (optimizer_config, out, learning_rates,
                          target if learning_rates is not None else None)
    return settings


def sweep_and_report(args: argparse.Namespace, stop: StopSignals) -> int:
    config = config_from_args(args)
    if args.seeds < 1:
        raise BatchjaxError(f"--seeds must be at least 1, got {args.seeds}")
    check_targets(args.target_loss, args.target_accuracy)
    if args.cpu_devices < 0:
        raise BatchjaxError(f"--cpu-devices must be >= 0, got {args.cpu_devices}")
    if args.memory_limit is not None:
        from batchjax.memory import parse_bytes
        parse_bytes(args.memory_limit)
    # Imported here, not at the top: the figure processes start by importing this script
    # again, and drawing needs neither JAX nor the training code.
    stop.set_phase("set-up (importing JAX)", interruptible=True)
    from batchjax.data import load_dataset
    from batchjax.sharpness import SharpnessSettings
    from batchjax.sweep import STOP_FACTOR, Interrupted, check_grid, check_learning_rates, run_sweep

    started = time.perf_counter()
    stop_factor = args.stop_factor if args.stop_factor is not None else STOP_FACTOR
    sweeps = _grid_settings(args, config)
    batch_sizes, seeds = check_grid(config, args.batch_sizes, range(args.seeds))
    for optimizer_config, _, learning_rates, target in sweeps.values():
        check_learning_rates(learning_rates, optimizer_config, batch_sizes, target, stop_factor)
    try:
        enable_compile_cache(compile_cache_dir(args.compile_cache))
    except BatchjaxError as err:
        if args.compile_cache is not None:
            raise
        print(f"note: {err}; compiling without it", file=sys.stderr)
    stop.set_phase("set-up (loading the dataset)", interruptible=True)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download,
                           verbose=not args.quiet)
    if stop():
        raise Interrupted
    if "probe_size" in args.from_preset and config.probe_size > dataset.num_train:
        # The preset's probe, on a smaller training set: all of it.
        sweeps = {name: (dataclasses.replace(c, probe_size=0), *rest)
                  for name, (c, *rest) in sweeps.items()}
    if args.preset == "critical" and "epochs" in args.from_preset:
        # The preset's budget in examples (20 epochs of 50,000), at most CRITICAL_MAX_EPOCHS.
        epochs = min(CRITICAL_MAX_EPOCHS, -(-args.epochs * 50_000 // dataset.num_train))
        sweeps = {name: (dataclasses.replace(c, epochs=max(1, epochs)), *rest)
                  for name, (c, *rest) in sweeps.items()}
    if args.cpu_devices:
        import jax
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    processes = distributed_setup(args) if args.distributed else {}
    start = time.perf_counter()
    swept = {}
    for name, (optimizer_config, out, learning_rates, target) in sweeps.items():
        if len(sweeps) > 1 and not args.quiet:
            print(f"== {name}: {out}", file=sys.stderr)
        swept[name] = run_sweep(
            out, optimizer_config, dataset, batch_sizes=batch_sizes, seeds=seeds,
            resume=args.resume, command=sys.argv, verbose=not args.quiet,
            sharpness=SharpnessSettings() if args.sharpness else None,
            group_size=args.group_size, memory_limit=args.memory_limit, should_stop=stop,
            on_phase=stop.set_phase, learning_rates=learning_rates, target_loss=target,
            stop_factor=stop_factor, **processes)
    train_time = time.perf_counter() - start
    if processes.get("process_index", 0) != 0:
        return 0  # process 0 draws the figures and writes the report
    stop.set_phase("figures and report", interruptible=True)
    if stop():
        raise Interrupted
    from batchjax.analysis import analyse
    from batchjax.plots import SCRIPT_WORKERS, make_comparison_figures, make_figures
    from batchjax.report import verdict_table, write_critical_comparison, write_report

    analyses, figure_count = {}, 0
    for name, results in swept.items():
        figures_dir = (os.path.join(results.path, "figures") if len(swept) > 1 or
                       args.preset == "critical" else
                       args.figures_dir or os.path.join(args.out, "figures"))
        analysis = analyse(results, target_loss=args.target_loss,
                           target_accuracy=args.target_accuracy)
        figures, notes = ([], []) if args.no_figures else make_figures(
            results, figures_dir, analysis=analysis, workers=SCRIPT_WORKERS)
        if stop():
            raise Interrupted
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        write_report(analysis, figures=figures, notes=notes)
        figure_count += len(figures)
        analyses[name] = analysis
        print(verdict_table(analysis))
    report = swept[next(iter(swept))].path / "report.md"
    if args.preset == "critical":
        figures = [] if args.no_figures else make_comparison_figures(
            analyses, args.figures_dir or os.path.join(args.out, "figures"))
        figure_count += len(figures)
        write_critical_comparison(analyses, args.out, figures=figures)
        report = pathlib.Path(args.out) / "report.md"
    print(f"full report: {report}")
    if not args.quiet:
        print(f"sweep: {train_time:.1f} s of training, {time.perf_counter() - started:.1f} s in "
              f"all; results in {args.out}/ (history.csv, noise.csv, report.md, ...)"
              + ("" if args.no_figures else f"; {figure_count} figure files"), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = apply_preset(build_parser().parse_args(argv))
    with StopSignals(out_dir=args.out) as stop:
        try:
            return sweep_and_report(args, stop)
        except BatchjaxError as err:
            if not stop():
                print(f"error: {err}", file=sys.stderr)
                return 2
        except KeyboardInterrupt:  # batchjax.sweep.Interrupted, or raised by the handler
            pass
        except Exception:
            if not stop():
                raise
            # After a stop request, e.g. figure processes that the signal ended too.
        if not stop.claim_exit():
            time.sleep(STOP_SECONDS + 60)  # the watchdog is ending the process
        print(stop.interrupted_line(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
