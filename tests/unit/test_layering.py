"""The package's imports run one way, and only configs, models and key maps know which architecture is which.

Layers, low to high: errors, config, data, report, io, process -> parallel -> layers -> models ->
converters (key maps and readers) -> loading, checkpoints, export, the PyTorch reference helpers -> routing,
training, evaluation -> commands -> cli. A module may import its own layer or lower ones, never higher; module-level
imports form no cycle; `moejax/__init__.py` imports nothing of the package at module level (its public names
load on first use). Checked on the source with `ast`, no third-party tool; the checkers are tested on code
written to break them.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYERS = [
    ("moejax.errors", "moejax.config", "moejax.data", "moejax.report", "moejax.io", "moejax.process"),
    ("moejax.parallel",),
    ("moejax.layers",),
    ("moejax.models",),
    ("converters",),
    ("moejax.loading", "moejax.checkpoint", "moejax.export", "moejax.reference"),
    ("moejax.routing", "moejax.training", "moejax.evaluation", "moejax.parity", "moejax.planning"),
    ("moejax.commands",),
    ("moejax.cli",),
]
# Where a module may look at which architecture a config is.
ARCHITECTURE_AWARE = ("moejax/config.py", "moejax/models/", "converters/")
ARCHITECTURE_NAMES = {"qwen3_moe", "nemotron_h"}
SNIFFED_FIELDS = {"num_experts", "n_routed_experts", "router_aux_loss_coef", "moe_latent_size",
                  "max_position_embeddings", "n_group", "topk_group", "model_type"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in ("moejax", "converters"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def imports(tree: ast.Module, module: str, known: dict, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of `tree`, resolving `from a import b` to a.b when a.b is
    a module. TYPE_CHECKING blocks are skipped at module level (they never run)."""
    nodes = []

    def visit(body, top):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                nodes.append(node)
            elif not top_level_only:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.Import | ast.ImportFrom):
                        nodes.append(child)
                visit([n for n in ast.walk(node) if n is not node and isinstance(n, ast.stmt)
                       and not isinstance(n, ast.Import | ast.ImportFrom)], False)
    visit(tree.body, True)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add((name, node.lineno))
    return sorted(found)


def layering_violations(sources: dict[str, str]) -> list[str]:
    """Every import that runs the wrong way, every module-level cycle, and package-level imports in moejax/__init__."""
    known = set(sources)
    problems, graph = [], {}
    for module, text in sources.items():
        tree = ast.parse(text)
        rank = layer_of(module)
        if module == "moejax":
            problems += [f"moejax/__init__ imports {name} at module level (line {line})"
                         for name, line in imports(tree, module, known, True)]
            continue
        if rank is None:
            problems.append(f"{module} is in no layer")
            continue
        for name, line in imports(tree, module, known, False):
            other = layer_of(name)
            if other is not None and other > rank:
                problems.append(f"{module} (layer {rank}) imports {name} (layer {other}) at line {line}")
        graph[module] = {name for name, _ in imports(tree, module, known, True) if name != module}
    state = {}

    def cycle_from(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                problems.append("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                cycle_from(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            cycle_from(node, [node])
    return problems


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
    for path in sorted(list((ROOT / "moejax").rglob("*.py")) + list((ROOT / "converters").rglob("*.py"))):
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
    assert any("moejax.config (layer 0) imports moejax.commands.train (layer 7)" in p for p in problems)
    assert any("moejax.routing.stats (layer 6) imports moejax.cli (layer 8)" in p for p in problems)  # in a function
    assert any(p.startswith("import cycle:") and "moejax.layers.a" in p and "moejax.layers.b" in p for p in problems)
    assert any("moejax.mystery is in no layer" in p for p in problems)
    assert layering_violations({"moejax": "from moejax.loading import from_pretrained\n", "moejax.loading": ""})


def test_the_architecture_checker_catches_branches():
    code = ('if cfg.model_type == "nemotron_h":\n    pass\nx = "qwen3_moe" in kinds\n'
            'y = model_type in ("a", "b")\ne = getattr(cfg, "num_experts", None)\nk = cfg.num_routed_experts\n'
            'same = saved["model_type"] == cfg.model_type\n')
    assert len(architecture_branches("moejax/routing/stats.py", code)) == 4
    assert architecture_branches("moejax/models/__init__.py", code) == []
