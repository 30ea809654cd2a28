"""The package's shape: imports go one way (no cycle, counting imports inside functions), the command line is
imported by nothing in the library, and no module outgrows one job."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmkit"
MAX_LINES = 450
# The layers of README.md's Layout section, bottom first: a module imports only from its own layer or below.
LAYERS = [
    {"errors", "files", "devices", "version", "huge_pages"},
    {"model", "tokenizer", "float_formats", "scaled_formats", "ggml_blocks", "numerics", "data"},
    {"checkpoint", "gguf", "sampling", "generate", "loading", "engine", "speculative"},
    {"quantize", "quantized_files", "kernels", "quantized_linear", "cpu_kernels", "evaluate", "chat", "hub",
     "distributed"},
    {"cpu_codegen", "graph_passes", "compile", "artifacts", "aoti", "executorch"},
    {"openai_api", "engine_tp", "serve"},
    {"bench", "serve_bench", "speculative_bench", "pte_bench", "sweep", "plots", "widgets", "train"},
    {"cli", "cli_model", "__main__", "__init__"},
]


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imported(tree: ast.Module, names: set[str]) -> set[str]:
    """The llmkit modules a module imports anywhere in its body: at the top, in functions, under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("llmkit.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llmkit":
            if node.module == "llmkit":  # from llmkit import data, numerics as nm
                out |= {a.name for a in node.names if a.name in names}
            else:
                out.add(node.module.split(".")[1])
    return out


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: imported(tree, set(trees)) - {name} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as the list of modules along it, or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_llmkit_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_its_layer_and_imports_none_above_it():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = import_graph()
    assert set(graph) == set(layer), f"modules not in README's layers (or gone): {set(graph) ^ set(layer)}"
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer[d] > layer[m]]
    assert not upward, f"imports of a higher layer: {upward}"


def test_only_the_entry_points_import_the_command_line():
    importers = {name for name, deps in import_graph().items() if deps & {"cli", "cli_model"}}
    assert importers <= {"__main__", "cli"}, f"{sorted(importers)} import llmkit's command line; the library must not"


def test_argparse_lives_in_the_command_line_only():
    users = {name for name, tree in modules().items() if "argparse" in {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}}  # fmt: skip
    assert users <= {"cli", "cli_model"}, f"{sorted(users)} use argparse; subcommands belong in llmkit/cli.py"


def test_no_module_outgrows_one_job():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"
