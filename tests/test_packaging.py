"""The top-level import names this project ships collide with no other distribution's.

Our kernels package was once `kernels/`, the import name of Hugging Face's `kernels`
distribution, which transformers >= 5.25 requires: with both installed, transformers imported
ours and no model loaded (and a non-editable install would have written into
site-packages/kernels/). The packages come from setup.py's own `find_packages(include=...)`,
read with ast (setup.py is never run).
"""
from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "slurm-lm"
# Import names our dependencies are known to use though no test environment may install them:
# `kernels` is Hugging Face's kernels package (transformers >= 5.25 requires it).
DEPENDENCY_IMPORT_NAMES = ("kernels",)


def shipped_top_levels(root: Path) -> set[str]:
    """The top-level packages setup.py ships: its find_packages include list, applied here."""
    for node in ast.walk(ast.parse((root / "setup.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "find_packages":
            include = next(ast.literal_eval(k.value) for k in node.keywords if k.arg == "include")
            return {name.split(".")[0] for name in find_packages(str(root), include=include)}
    raise AssertionError("setup.py: no find_packages(include=[...]) call")


def normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def collisions(top_levels: set[str], providers: dict[str, list[str]]) -> list[str]:
    """One line per shipped import name that another distribution provides, or that a
    dependency is known to use."""
    problems = []
    for name in sorted(top_levels):
        others = sorted({d for d in providers.get(name, ()) if normalized(d) != DISTRIBUTION})
        if others:
            problems.append(f"top-level package {name}/ is also provided by the installed "
                            f"distribution(s) {', '.join(others)}: rename ours")
        elif name in DEPENDENCY_IMPORT_NAMES:
            problems.append(f"top-level package {name}/ is the import name of a dependency's "
                            f"package: rename ours")
    return problems


def test_shipped_packages_are_found():
    assert shipped_top_levels(ROOT) == {"lm_kernels", "train", "launcher"}


def test_no_installed_distribution_shares_a_top_level_import_name():
    problems = collisions(shipped_top_levels(ROOT), metadata.packages_distributions())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("top_levels,providers,expected", [
    ({"kernels", "train"}, {"kernels": ["kernels"], "train": ["slurm_lm"]},
     ["top-level package kernels/ is also provided by the installed distribution(s) kernels: "
      "rename ours"]),
    ({"kernels"}, {}, ["top-level package kernels/ is the import name of a dependency's package: "
                       "rename ours"]),
    ({"lm_kernels", "train"}, {"lm_kernels": ["slurm-lm"], "kernels": ["kernels"]}, []),
])
def test_collisions_are_caught(top_levels, providers, expected):
    """The proof that the test above can fail: the old name, installed beside HF's kernels or not."""
    assert collisions(top_levels, providers) == expected
