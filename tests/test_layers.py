"""The package's modules form layers: each imports only from the layers below it, and no
import circle exists. Read from the source (every import statement, in functions too, and
importlib.import_module / __import__ calls), not from what happens to be imported at run time.

A new module must be given its place in LAYERS; an import that points up, a circle, or a
dynamic import whose module cannot be read from the source fails here."""

import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fusedloss")
PACKAGE = "fusedloss"

# Bottom up. A module may import only modules that stand before it in this list.
LAYERS = (
    "_C",                        # the compiled ops (csrc/)
    "_common",                   # leaf helpers: reductions, accumulation dtype, sums, chunking
    "_ops",                      # the op table and the test seam
    "_handover",                 # the gradient hand-over, once
    "_fake",                     # fake kernels of every op
    "_composite",                # the differentiable compositions
    "_compiled",                 # the compiled path's Function
    "_autograd",                 # autograd of every op; install() builds an OpSet
    "_args",                     # checks with public names, layout, result shaping
    "_route",                    # the choice of path for one call
    "parallel",                  # vocab-parallel: the package, then its modules bottom up
    "parallel.protocol",
    "parallel.combine",
    "parallel.cross_entropy",
    "parallel.linear",
    "parallel.distillation",
    "parallel.dtensor",
    "functional",                # the public API
    "linear",
    "distillation",              # the distillation losses, plain and fused-linear
    "nn",
    "__init__",                  # the package: loads _C, registers, re-exports
    "integrations",              # optional integrations, each importing only the package
    "integrations.transformers",
    "__main__",
)
RANK = {name: i for i, name in enumerate(LAYERS)}


def _modules():
    """{module name relative to the package ('__init__' for the package itself): path}."""
    found = {}
    for folder, _dirs, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
            if rel.endswith(".__init__"):
                rel = rel[: -len(".__init__")]
            found[rel] = os.path.join(folder, f)
    return found


MODULES = _modules()


def _package_of(module):
    """The package a module's relative imports start from ('' is the top package)."""
    path = MODULES[module]
    is_package = os.path.basename(path) == "__init__.py"
    if module == "__init__":
        return ""
    parts = module.split(".")
    return module if is_package else ".".join(parts[:-1])


def _resolve_relative(module, level, name):
    """The absolute name (relative to the package) of `from <level dots><name>` in module."""
    base = _package_of(module).split(".") if _package_of(module) else []
    if level > 1:
        base = base[: len(base) - (level - 1)]
    parts = base + (name.split(".") if name else [])
    return ".".join(parts)


def _target(name):
    """A package-relative dotted name -> the module it names ('__init__' for the package)."""
    return name if name else "__init__"


def _imports(module):
    """[(line, imported module)] of every import of the package's modules in `module`."""
    tree = ast.parse(open(MODULES[module]).read(), MODULES[module])
    found = []

    def add(line, name):
        # `name` is package-relative; a name that is not a module is a name of its package
        while name and name not in MODULES and name != "_C":
            name = name.rpartition(".")[0]
        found.append((line, _target(name)))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(node.lineno, alias.name[len(PACKAGE) + 1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, node.level, node.module or "")
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                base = node.module[len(PACKAGE) + 1:]
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                add(node.lineno, sub if sub in MODULES or sub == "_C" else base)
        elif isinstance(node, ast.Call):
            func = node.func
            dynamic = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
                isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
            if not dynamic:
                continue
            arg = node.args[0] if node.args else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                pytest.fail(f"fusedloss/{module}: line {node.lineno}: a dynamic import whose "
                            f"module is not a literal string cannot be checked")
            name = arg.value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                add(node.lineno, _resolve_relative(module, level, name.lstrip(".")))
            elif name == PACKAGE or name.startswith(PACKAGE + "."):
                add(node.lineno, name[len(PACKAGE) + 1:])
    return found


def _edges():
    return {m: [(line, t) for line, t in _imports(m) if t != m] for m in MODULES}


def test_every_module_has_a_layer():
    missing = sorted(set(MODULES) - set(RANK))
    assert not missing, f"modules without a place in tests/test_layers.py's LAYERS: {missing}"
    gone = sorted(set(RANK) - set(MODULES) - {"_C"})
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


def test_imports_point_down():
    up = [f"fusedloss/{m}:{line} imports {t} (layer {RANK[t]} >= its own {RANK[m]})"
          for m, edges in _edges().items() for line, t in edges
          if m in RANK and t in RANK and RANK[t] >= RANK[m]]
    assert not up, "imports that point up or sideways:\n" + "\n".join(up)


def test_no_import_circles():
    graph = {m: sorted({t for _line, t in edges}) for m, edges in _edges().items()}
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The reader itself: function-level, relative, absolute and importlib imports are found
    (a checker that missed one kind would pass a circle through it)."""
    pkg = tmp_path / "fusedloss"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("import importlib\nM = importlib.import_module('.sub.c', "
                              "__package__)\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import fusedloss.a\nfrom ..b import M\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(pkg))
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _modules())
    assert _imports("a") == [(2, "b")]
    assert _imports("b") == [(2, "sub.c")]
    assert _imports("sub.c") == [(1, "a"), (2, "b")]
    assert _imports("__init__") == [(1, "a")]
