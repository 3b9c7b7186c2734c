"""The module map (train/layers.py) against the imports, read from the source: nothing imported.

Every module of lm_kernels/, train/ and launcher/ is in the map; a module imports only from its
own layer and the layers below (imports inside functions count: they run, only later); the imports
between modules form no cycle; prepare time imports no torch, however indirectly; lm_kernels/
imports neither train/ nor launcher/; no private name crosses a module boundary; no library
module imports a command. `test_each_rule_catches_its_violation` feeds the checker small trees
that break one rule each: the proof that this test can fail.
"""
from __future__ import annotations

import ast
import re
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lm_kernels", "train", "launcher")
TABLE_FILE = "train/layers.py"
MAP_INTRO = """\
Training on one rank, in layers; each imports only from its own layer and the layers below.

The map is train/layers.py's table, rendered here; tests/test_layers.py checks both against the
imports (by reading the source, nothing imported). The folders follow the layers.
"""


@dataclass(frozen=True)
class Import:
    target: str  # a project module, or a third-party module as written (torch.distributed)
    names: tuple[str, ...]  # what `from target import ...` takes; () for a module
    line: int


def read_table(root: Path) -> dict:
    """train/layers.py's constants, by ast.literal_eval: the file is never run."""
    tree = ast.parse((root / TABLE_FILE).read_text())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def source_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py under the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> list[Import]:
    """Every import in the file, at any depth; `from package import module` names the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(sub, (), node.lineno) if sub in modules
                             else Import(base, (alias.name,), node.lineno))
    return found


def layer_of(table: dict) -> dict[str, tuple[int, str]]:
    return {module: (rank, layer) for rank, (layer, _, modules) in enumerate(table["LAYERS"])
            for module in modules}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def check(root: Path, table: dict | None = None) -> list[str]:
    """Every violation of the map's rules, as `file:line: rule: what to do` lines."""
    table = table or read_table(root)
    modules = source_modules(root)
    layers = layer_of(table)
    where = {m: p.relative_to(root).as_posix() for m, p in modules.items()}
    graph = {m: imports_of(p, m, modules) for m, p in modules.items()}
    project = {m: [i for i in imps if i.target in modules] for m, imps in graph.items()}
    problems = []
    for module in modules.keys() - layers.keys():
        problems.append(f"{where[module]}:1: not in the module map: add {module} to its layer "
                        f"in {TABLE_FILE}, with one line saying what it holds")
    for module in layers.keys() - modules.keys():
        problems.append(f"{TABLE_FILE}:1: stale map: {module} is in the map but no such file")
    for module, imps in sorted(project.items()):
        if module not in layers:
            continue
        rank, layer = layers[module]
        for imp in imps:
            if imp.target in layers and layers[imp.target][0] > rank:
                problems.append(f"{where[module]}:{imp.line}: upward import: {module} (layer "
                                f"{layer}) imports {imp.target} (layer {layers[imp.target][1]}); a "
                                f"module imports only from its own layer and the layers below")
            private = [n for n in imp.names if is_private(n)]
            if private and imp.target != module:
                problems.append(f"{where[module]}:{imp.line}: private name: {module} imports "
                                f"{', '.join(private)} from {imp.target}; make it public there "
                                f"or keep its use inside {imp.target}")
            if imp.target in table["COMMANDS"] and module not in table["COMMANDS"]:
                problems.append(f"{where[module]}:{imp.line}: library imports a command: "
                                f"{module} imports {imp.target}; move what it needs into a "
                                f"library module both can import")
    for module, imps in sorted(graph.items()):
        if module.split(".")[0] == "lm_kernels":
            for imp in imps:
                if imp.target.split(".")[0] in table["KERNELS_NEVER"]:
                    problems.append(f"{where[module]}:{imp.line}: lm_kernels imports "
                                    f"{imp.target}: lm_kernels/ imports torch and triton only")
    problems += torch_at_prepare_time(table, layers, graph, project, where)
    problems += cycles(project, where)
    return sorted(problems)


def torch_at_prepare_time(table, layers, graph, project, where) -> list[str]:
    """Breadth first from the prepare-time modules through project imports, and through the
    packages whose __init__ an import runs first: every module reached, with the chain that
    reaches it, must import no torch."""
    roots = [m for m, (_, layer) in layers.items() if layer in table["TORCH_FREE"]]
    roots += [m for m in table["TORCH_FREE"] if m in layers]
    via = {m: m for m in roots if m in graph}
    queue = deque(via)
    while queue:
        module = queue.popleft()
        parents = [".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)]
        for target in [imp.target for imp in project[module]] + parents:
            if target not in via and target in graph:
                via[target] = f"{via[module]} -> {target}"
                queue.append(target)
    return [f"{where[m]}:{imp.line}: torch at prepare time: {imp.target} imported by prepare-time "
            f"code ({chain}); prepare runs where torch may be absent"
            for m, chain in sorted(via.items()) for imp in graph[m]
            if imp.target.split(".")[0] in table["TORCH_PACKAGES"]]


def cycles(project, where) -> list[str]:
    """One line per import cycle: depth first, a back edge closes a cycle."""
    problems, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for imp in project[module]:
            if state.get(imp.target) == "open":
                loop = stack[stack.index(imp.target):] + [imp.target]
                problems.append(f"{where[module]}:{imp.line}: import cycle: {' -> '.join(loop)}; "
                                f"make the imports point one way (move the shared part down)")
            elif imp.target not in state:
                visit(imp.target)
        stack.pop()
        state[module] = "done"

    for module in sorted(project):
        if module not in state:
            visit(module)
    return problems


def render_map(table: dict) -> str:
    """train/__init__.py's docstring: the intro, then each layer's heading and modules."""
    lines = [MAP_INTRO]
    for _, heading, modules in table["LAYERS"]:
        lines.append(heading)
        width = max(len(m) for m in modules)
        lines += [f"    {m:<{width}}  {what}" for m, what in modules.items()]
    return "\n".join(lines) + "\n"


def test_the_code_follows_the_map():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def test_train_init_docstring_is_the_map_rendered():
    expected = render_map(read_table(ROOT))
    assert all(len(line) <= 100 for line in expected.splitlines()), \
        f"a line of the map is over 100 columns: shorten it in {TABLE_FILE}"
    actual = ast.get_docstring(ast.parse((ROOT / "train/__init__.py").read_text()), clean=False)
    assert actual == expected, \
        f"train/__init__.py's docstring is stale; make it:\n\"\"\"{expected}\"\"\""


# A small tree that keeps every rule; each case below adds or changes files to break one.
TOY_TABLE = {
    "LAYERS": (("kernels", "", {"lm_kernels": "", "lm_kernels.attn": ""}),
               ("base", "", {"train": "", "train.errors": ""}),
               ("prepare", "", {"train.data": "", "train.data.src": "", "train.data.ner": ""}),
               ("run", "", {"train.run": "", "train.run.loop": ""}),
               ("commands", "", {"train.__main__": ""}),
               ("launcher", "", {"launcher": "", "launcher.partition": "",
                                 "launcher.__main__": ""})),
    "COMMANDS": ("train.__main__", "launcher.__main__"),
    "TORCH_FREE": ("prepare",),
    "TORCH_PACKAGES": ("torch",),
    "KERNELS_NEVER": ("train", "launcher"),
}
TOY_TREE = {
    "lm_kernels/__init__.py": "from lm_kernels.attn import attend\n",
    "lm_kernels/attn.py": "import torch\n\ndef attend(q):\n    return torch.softmax(q, -1)\n",
    "train/__init__.py": "",
    "train/errors.py": "class UsageError(Exception):\n    pass\n",
    "train/data/__init__.py": "",
    "train/data/src.py": "from train.errors import UsageError\n\ndef decode(b):\n    return b\n",
    "train/data/ner.py": "from train.data.src import decode\n",
    "train/run/__init__.py": "",
    "train/run/loop.py": ("import torch\nfrom ..data import ner\n"
                          "from train.errors import UsageError\n"),
    "train/__main__.py": "from train.run import loop\n",
    "launcher/__init__.py": "",
    "launcher/partition.py": ("from train.errors import UsageError\n\n"
                              "def minutes(t):\n    return 1\n"),
    "launcher/__main__.py": "from launcher.partition import minutes\nfrom train import __main__\n",
}
FUNCTION_IMPORT = "\n\ndef late():\n    {}\n"


@pytest.mark.parametrize("case,files,expected", [
    ("a module missing from the map", {"train/run/extra.py": ""},
     r"train/run/extra.py:1: not in the module map: add train.run.extra"),
    ("a module in the map with no file", {"train/data/ner.py": None},
     r"train/layers.py:1: stale map: train.data.ner"),
    ("an upward import inside a function",
     {"train/data/src.py": FUNCTION_IMPORT.format("from train.run.loop import x")},
     r"train/data/src.py:4: upward import: train.data.src \(layer prepare\) imports "
     r"train.run.loop \(layer run\)"),
    ("a relative upward import", {"train/errors.py": "from .data import src\n"},
     r"train/errors.py:1: upward import: train.errors \(layer base\) imports train.data.src"),
    ("torch at prepare time", {"train/data/ner.py": "import torch.nn\n"},
     r"train/data/ner.py:1: torch at prepare time: torch.nn imported by prepare-time code "
     r"\(train.data.ner\)"),
    ("torch at prepare time through a lower layer",
     {"train/errors.py": FUNCTION_IMPORT.format("import torch")},
     r"train/errors.py:4: torch at prepare time: torch imported by prepare-time code "
     r"\(train.data.src -> train.errors\)"),
    ("torch at prepare time through a package's __init__",
     {"lm_kernels/__init__.py": "import torch\n",
      "train/data/ner.py": "from lm_kernels.attn import f\n"},
     r"lm_kernels/__init__.py:1: torch at prepare time: torch imported by prepare-time code "
     r"\(train.data.ner -> lm_kernels.attn -> lm_kernels\)"),
    ("lm_kernels imports train", {"lm_kernels/attn.py": "from train import errors\n"},
     r"lm_kernels/attn.py:1: lm_kernels imports train.errors: lm_kernels/ imports torch and "
     r"triton only"),
    ("a private name across modules", {"train/data/ner.py": "from train.data.src import _raw\n"},
     r"train/data/ner.py:1: private name: train.data.ner imports _raw from train.data.src"),
    ("a library imports its command line",
     {"launcher/partition.py": FUNCTION_IMPORT.format("from launcher.__main__ import main")},
     r"launcher/partition.py:4: library imports a command: launcher.partition imports "
     r"launcher.__main__"),
    ("a cycle through a function-level import",
     {"train/data/src.py": FUNCTION_IMPORT.format("from train.data import ner")},
     r"train/data/src.py:4: import cycle: train.data.ner -> train.data.src -> train.data.ner"),
])
def test_each_rule_catches_its_violation(tmp_path, case, files, expected):
    def write(tree):
        for rel, text in tree.items():
            path = tmp_path / rel
            if text is None:
                path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))

    write(TOY_TREE)
    assert check(tmp_path, TOY_TABLE) == [], "the toy tree itself must keep every rule"
    write(files)
    problems = check(tmp_path, TOY_TABLE)
    assert any(re.match(expected, p) for p in problems), "\n".join(problems) or "nothing found"
