"""The package's public names, and which imports pull in JAX (each case in a fresh interpreter)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The names other code relies on, with the module that defines each.
PUBLIC = {"load_dataset": "batchjax.data", "MLP": "batchjax.model",
          "TrainConfig": "batchjax.config", "train": "batchjax.train",
          "per_example_grads": "batchjax.noise", "gradient_stats": "batchjax.noise",
          "empirical_minibatch_variance": "batchjax.noise", "sharpness": "batchjax.sharpness",
          "train_seeds": "batchjax.train", "BatchjaxError": "batchjax.errors"}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("first", ["import batchjax", "import batchjax.train, batchjax.sharpness",
                                   "from batchjax.train import train_seeds"])
def test_public_names_are_the_functions_and_classes_whatever_is_imported_first(first):
    # `train` and `sharpness` are also submodule names: importing the submodules first must
    # not turn `batchjax.train` into a module.
    proc = run_python(f"""
        {first}
        import importlib, batchjax
        for name, module in {PUBLIC!r}.items():
            value = getattr(batchjax, name)
            assert value is getattr(importlib.import_module(module), name), name
            assert value.__module__ == module and name in batchjax.__all__, name
        assert callable(batchjax.train) and callable(batchjax.sharpness)
        from batchjax import gradient_stats, train
        assert train.__name__ == "train" and gradient_stats.__name__ == "gradient_stats"
        try:
            batchjax.no_such_name
        except AttributeError as err:
            assert "no_such_name" in str(err)
        else:
            raise AssertionError("no AttributeError")
        print(len(batchjax.__all__))
    """)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= len(PUBLIC)


def test_figures_and_reports_do_not_import_jax():
    # What a figure process imports: the sweep script (spawned processes import the main
    # module again), plots, report and results. JAX comes only with training and statistics.
    proc = run_python("""
        import importlib.util, sys
        for name in ("sweep", "figures"):
            spec = importlib.util.spec_from_file_location(name, f"scripts/{name}.py")
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        import batchjax, batchjax.plots, batchjax.report, batchjax.results
        assert "jax" not in sys.modules and "flax" not in sys.modules, "imported JAX"
        batchjax.gradient_stats
        assert "jax" in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_the_readme_library_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    proc = run_python(code + textwrap.dedent("""
        assert abs(traces.trace_cov - stats.trace_cov) < 1e-5 * stats.trace_cov
        assert traces.variance is None and stats.variance is not None
        assert len(result.noise) == config.epochs + 1
    """))
    assert proc.returncode == 0, proc.stderr[-2000:]


# The package's modules in the direction data flows: each may import only modules before it.
ORDER = ("errors", "config", "run", "mnist_files", "data", "model", "losses", "optim", "rng",
         "noise", "sharpness", "steps", "train", "results", "memory", "critical", "stats", "analysis",
         "plots", "report", "sweep")
# Modules that figure and report processes load: no JAX, no Flax, no optax.
JAX_FREE = ("errors", "config", "run", "results", "critical", "stats", "analysis", "plots",
            "report")


def batchjax_imports(path: Path) -> dict[str, set[str]]:
    """Every module a file imports (top level or inside functions): batchjax.* and others."""
    import ast

    found = {"batchjax": set(), "other": set()}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "batchjax":  # from batchjax import noise
                names = [f"batchjax.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("batchjax."):
                found["batchjax"].add(name.split(".")[1])
            else:
                found["other"].add(name.split(".")[0])
    return found


def test_modules_import_only_modules_before_them():
    modules = sorted(p.stem for p in (ROOT / "batchjax").glob("*.py") if p.stem != "__init__")
    assert set(modules) <= set(ORDER), f"modules missing from ORDER: {set(modules) - set(ORDER)}"
    wrong = []
    for name in modules:
        imports = batchjax_imports(ROOT / "batchjax" / f"{name}.py")["batchjax"]
        wrong += [f"{name} imports {dep}" for dep in sorted(imports)
                  if dep in ORDER and ORDER.index(dep) >= ORDER.index(name)]
    assert not wrong, wrong


def test_figure_side_modules_import_no_jax_even_indirectly():
    present = [n for n in JAX_FREE if (ROOT / "batchjax" / f"{n}.py").exists()]
    closure = {name: batchjax_imports(ROOT / "batchjax" / f"{name}.py") for name in present}
    for name in present:
        deps = closure[name]["batchjax"] - {"errors"}
        assert deps <= set(JAX_FREE), f"{name} imports {deps - set(JAX_FREE)}"
        heavy = closure[name]["other"] & {"jax", "jaxlib", "flax", "optax"}
        assert not heavy, f"{name} imports {heavy}"
