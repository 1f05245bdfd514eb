"""The STYLE rules on size (../shared/STYLE.md, rule 6): every top-level file reads in one sitting,
every function is short; and the files import one another without circles (issue 24). Measured
with `ast`, as the issue note does."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 650
MAX_FUNCTION_LINES = 70
# The backward kernel (76 lines) is one Triton program: its reverse-time loop reads and writes
# a dozen running values, and splitting it into @triton.jit helpers would hide that loop's state.
EXEMPT = {("mamba_triton.py", "_scan_bwd_kernel")}


def functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_top_level_file_is_longer_than_one_sitting():
    long = {p.name: n for p in REPO.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_is_longer_than_the_limit():
    long = [(p.name, name, n) for p in REPO.glob("*.py") for name, n in functions(p)
            if n > MAX_FUNCTION_LINES and (p.name, name) not in EXEMPT]
    assert not long, long


def project_imports(path, modules):
    """The project's modules that `path` imports anywhere, a function's body included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return (found & modules) - {path.stem}


def import_cycle(graph):
    """One cycle of the graph {module: modules it imports} as a list of modules, or None."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state and (cycle := visit(other, path + [other])):
                return cycle
        state[module] = "done"
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def test_import_cycle_finder_on_a_hand_made_graph():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_file_imports_a_file_that_imports_it_back():
    """A command-line flag that dispatches to another file (train.py --bench once imported
    train_bench, which imports train) made a circle; each such file now has its own entry point."""
    paths = list(REPO.glob("*.py"))
    modules = {p.stem for p in paths}
    graph = {p.stem: project_imports(p, modules) for p in paths}
    assert graph["train_bench"] >= {"train"} and graph["mamba_compile"] >= {"mamba_triton"}  # the edges checked
    assert import_cycle(graph) is None, import_cycle(graph)
