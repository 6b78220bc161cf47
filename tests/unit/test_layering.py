"""The package's imports run one way, and only moejax/models/ knows which architecture is which.

Layers, low to high: errors, config, data, report, io, process, the safetensors reader and MXFP4 -> parallel ->
layers and the key-map machinery -> models (one module per architecture, with its key map) -> loading, checkpoints,
export, the PyTorch fixtures -> routing,
training, evaluation -> commands -> cli. A module may import its own layer or lower ones, never higher; imports form
no cycle, counted at any depth (inside functions too) with the lazy ones (importlib.import_module of a literal, a
registry's "module:Name" strings); `moejax/__init__.py` imports nothing of the package at module level (its public
names load on first use). Checked on the source with `ast`, no third-party tool; the checkers are tested on code
written to break them.
"""

from __future__ import annotations

import ast
import pathlib
import re

from moejax.models import ARCHITECTURES

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYERS = [
    ("moejax.errors", "moejax.config", "moejax.data", "moejax.report", "moejax.io", "moejax.process",
     "moejax.safetensors_io", "moejax.mxfp4"),
    ("moejax.parallel",),
    ("moejax.layers", "moejax.keymap"),
    ("moejax.models",),
    ("moejax.loading", "moejax.checkpoint", "moejax.export", "moejax.parity.fixtures"),
    ("moejax.routing", "moejax.training", "moejax.evaluation", "moejax.parity", "moejax.planning", "moejax.opening"),
    ("moejax.commands",),
    ("moejax.cli",),
]
# Where a module may look at which architecture a config is.
ARCHITECTURE_AWARE = ("moejax/models/",)
ARCHITECTURE_NAMES = set(ARCHITECTURES)
SNIFFED_FIELDS = {"num_experts", "n_routed_experts", "router_aux_loss_coef", "moe_latent_size",
                  "max_position_embeddings", "n_group", "topk_group", "model_type"}


def modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """The package's modules under `root` by dotted name (a package by its __init__.py) -> their files."""
    found = {}
    for package in ("moejax",):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


IMPORT_FUNCTIONS = ("importlib.import_module", "import_module", "__import__")
# A dotted module name, optionally ":Name": how lazy registries name what they import on first use.
MODULE_STRING = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?")


def imports(tree: ast.Module, module: str, known: set[str], top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of `tree` at any depth: import statements (in functions and
    methods too; `from a import b` is a.b when a.b is a module), importlib.import_module / __import__ of a string
    literal, and string constants naming a module ("a.b", or "a.b:Name" as lazy registries write them). The bodies
    of `if TYPE_CHECKING:` never run and are skipped. top_level_only: only the import statements and calls that run
    when the module is imported (none inside a function, no strings)."""
    found = set()

    def add(name: str, line: int) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add((name, line))

    def visit(node: ast.AST) -> None:
        if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            children = node.orelse
        else:
            children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno)
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in IMPORT_FUNCTIONS and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node.lineno)
        elif (not top_level_only and isinstance(node, ast.Constant) and isinstance(node.value, str)
              and MODULE_STRING.fullmatch(node.value) and node.value.partition(":")[0] in known):
            found.add((node.value.partition(":")[0], node.lineno))
        for child in children:
            visit(child)

    visit(tree)
    return sorted(found)


def import_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """One cycle through each back edge of a depth-first walk of `graph` (module -> {imported module: line}), as
    "a (line 3) -> b (line 9) -> a": a imports b at line 3, b imports a at line 9. Empty when there is none."""
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                ring = stack[stack.index(nxt):]
                cycles.append("import cycle: " + " -> ".join(
                    f"{m} (line {graph[m][n]})" for m, n in zip(ring, [*ring[1:], nxt], strict=True)) + f" -> {nxt}")
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return cycles


def layering_violations(sources: dict[str, str]) -> list[str]:
    """Every import that runs the wrong way, every import cycle (imports at any depth, lazy ones included), and
    package-level imports in moejax/__init__."""
    known = set(sources)
    problems, graph = [], {}
    for module, text in sources.items():
        tree = ast.parse(text)
        found = imports(tree, module, known)
        graph[module] = {}
        for name, line in found:
            if name != module:
                graph[module].setdefault(name, line)
        rank = layer_of(module)
        if module == "moejax":
            problems += [f"moejax/__init__ imports {name} at module level (line {line})"
                         for name, line in imports(tree, module, known, top_level_only=True)]
            continue
        if rank is None:
            problems.append(f"{module} is in no layer")
            continue
        for name, line in found:
            other = layer_of(name)
            if other is not None and other > rank:
                problems.append(f"{module} (layer {rank}) imports {name} (layer {other}) at line {line}")
    return problems + import_cycles(graph)


def architecture_branches(path: str, text: str) -> list[str]:
    """Comparisons with a model_type or an architecture name, and getattr on config fields only one architecture
    has, outside the places allowed to know architectures."""
    if path.startswith(ARCHITECTURE_AWARE):
        return []
    problems = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = any(isinstance(o, ast.Constant) and o.value in ARCHITECTURE_NAMES for o in operands)
            typed = any(isinstance(o, ast.Attribute) and o.attr == "model_type" or isinstance(o, ast.Name)
                        and o.id == "model_type" for o in operands)
            constant = any(isinstance(o, ast.Constant | ast.Tuple | ast.List | ast.Set) for o in operands)
            # Two model types compared with each other (a checkpoint's against its config's) pick no architecture.
            if named or typed and constant:
                problems.append(f"{path}:{node.lineno}: branches on the architecture: {ast.unparse(node)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in SNIFFED_FIELDS):
            problems.append(f"{path}:{node.lineno}: sniffs a config field: {ast.unparse(node)}")
    return problems


def test_imports_run_one_way():
    sources = {name: path.read_text(encoding="utf-8") for name, path in modules().items()}
    assert layering_violations(sources) == []


def test_nothing_outside_configs_models_and_key_maps_branches_on_the_architecture():
    problems = []
    for path in sorted((ROOT / "moejax").rglob("*.py")):
        problems += architecture_branches(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    assert problems == []


def test_the_layering_checker_catches_violations():
    sources = {"moejax": "", "moejax.config": "from moejax.commands.train import TrainSettings\n",
               "moejax.commands": "", "moejax.commands.train": "import moejax.config\n",
               "moejax.layers": "", "moejax.layers.a": "from moejax.layers import b\n",
               "moejax.layers.b": "def f():\n    from moejax.layers import a\nimport moejax.layers.a\n",
               "moejax.routing": "", "moejax.routing.stats": "def f():\n    from moejax.cli import main\n",
               "moejax.cli": "", "moejax.mystery": ""}
    problems = layering_violations(sources)
    assert any("moejax.config (layer 0) imports moejax.commands.train (layer 6)" in p for p in problems)
    assert any("moejax.routing.stats (layer 5) imports moejax.cli (layer 7)" in p for p in problems)  # in a function
    assert any(p.startswith("import cycle:") and "moejax.layers.a" in p and "moejax.layers.b" in p for p in problems)
    assert any("moejax.mystery is in no layer" in p for p in problems)
    assert layering_violations({"moejax": "from moejax.loading import from_pretrained\n", "moejax.loading": ""})


def test_the_cycle_checker_sees_imports_at_any_depth(tmp_path):
    """Modules written to a temporary package: a cycle made only of imports inside functions is found, so is one
    through importlib.import_module("...") and a lazy registry's "module:Name" string; one through an
    `if TYPE_CHECKING:` block is not a cycle (the block never runs)."""
    files = {
        "moejax/__init__.py": "",
        "moejax/models/__init__.py": 'MODELS = {"a": "moejax.models.a:Model"}\n',
        "moejax/models/a.py": "def generate():\n    from moejax.models import b\n",
        "moejax/models/b.py": ("class B:\n    def load(self):\n        import importlib\n\n"
                               "        return importlib.import_module('moejax.models.c')\n"),
        "moejax/models/c.py": "def registry():\n    import moejax.models\n",
        "moejax/models/common.py": "class CausalLM:\n    def generate(self):\n        from moejax.models.generation "
                                   "import generate\n",
        "moejax/models/generation.py": "def generate():\n    from moejax.models.common import check_ids\n",
        "moejax/models/d.py": "import typing\n\nif typing.TYPE_CHECKING:\n    from moejax.models import e\n",
        "moejax/models/e.py": "import moejax.models.d\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    sources = {name: path.read_text() for name, path in modules(tmp_path).items()}
    assert layering_violations(sources) == [
        "import cycle: moejax.models (line 1) -> moejax.models.a (line 2) -> moejax.models.b (line 5) -> "
        "moejax.models.c (line 2) -> moejax.models",
        "import cycle: moejax.models.common (line 3) -> moejax.models.generation (line 2) -> moejax.models.common",
    ]
    assert import_cycles({"x": {"y": 1}, "y": {"z": 2}, "z": {}}) == []


def test_the_architecture_checker_catches_branches():
    code = ('if cfg.model_type == "nemotron_h":\n    pass\nx = "qwen3_moe" in kinds\n'
            'y = model_type in ("a", "b")\ne = getattr(cfg, "num_experts", None)\nk = cfg.num_routed_experts\n'
            'same = saved["model_type"] == cfg.model_type\n')
    assert len(architecture_branches("moejax/routing/stats.py", code)) == 4
    assert architecture_branches("moejax/models/__init__.py", code) == []
