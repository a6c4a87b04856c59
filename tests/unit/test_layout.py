"""The checkout's own module names must not hide installed ones.

`python bench/x.py` puts bench/ first on sys.path, and `python -m` or `python -c` run from the
checkout puts its root there: a bench script or a top-level folder named like a module that a
dependency imports (transformers >= 5.25 imports the `kernels` package) would be imported in its
place. kernels/ keeps its name (it is `trieserve.kernels`) and refuses, with a clear error, to be
imported as the top-level `kernels`.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def installed_top_level_names() -> set[str]:
    return set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)


def test_no_bench_script_takes_the_name_of_an_installed_or_standard_module():
    taken = installed_top_level_names()
    scripts = sorted(p.stem for p in (ROOT / "bench").glob("*.py"))
    assert "decoding" in scripts and "triton_kernels" in scripts  # the scan sees the real folder
    assert [name for name in scripts if name in taken] == []


def test_no_top_level_package_but_kernels_takes_an_installed_name():
    taken = installed_top_level_names()
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert {"server", "decoding", "cache", "kernels"} <= set(packages)
    assert [name for name in packages if name in taken and name != "kernels"] == []


def test_kernels_folder_imported_as_top_level_package_says_why():
    done = subprocess.run(
        [sys.executable, "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "trieserve.kernels" in done.stderr and "the `trieserve` command" in done.stderr


def test_a_bench_script_runs_from_the_checkout_root():
    # bench/ first on sys.path, as `python bench/batch_step.py` gives it: imports torch and transformers
    done = subprocess.run(
        [sys.executable, "bench/batch_step.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--tree-rows" in done.stdout
