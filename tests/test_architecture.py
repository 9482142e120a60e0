"""The package's layout rules, read from its import graph with ``ast`` (no module is imported):

- only ``cli/`` talks to the terminal: nothing else imports typer or rich or calls ``print``;
- nothing imports ``cli/`` (but ``__main__``): the engine is usable, and testable, without the command line;
- ``trunks/`` stands alone: it imports nothing of ``pdsn/``, ``train/``, ``data/``, ``eval/``;
- plotting (matplotlib, PNG contact sheets) only in ``report/``: the engine returns what a figure needs, the
  command draws it;
- imports at module top: inside a function only an optional dependency (matplotlib, dlib, faiss), and only in a
  ``try`` that handles ImportError, so the import graph is the one the file shows at its top;
- no module over 600 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pdsn_cli"
MAX_LINES = 600
OPTIONAL = ("matplotlib", "dlib", "faiss", "safetensors")
#: imports that stay inside a function although the package is installed: each costs start-up time every command
#: would pay for a path few runs take
LAZY = {"torch._inductor.config": "2 s to import; only torch.compile on CUDA (accel.FastForward) needs it"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


@dataclass(frozen=True)
class Import:
    module: str  # the absolute dotted name imported (``from a import b`` → "a.b" and "a")
    line: int
    local: bool  # inside a function
    guarded: bool  # inside a try that handles ImportError


@dataclass
class Module:
    name: str  # dotted, e.g. pdsn_cli.eval.benchmark
    path: Path
    tree: ast.Module
    lines: int

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(PACKAGE.parent))

    def under(self, *folders: str) -> bool:
        return any(self.name == f"pdsn_cli.{f}" or self.name.startswith(f"pdsn_cli.{f}.") for f in folders)


def _modules() -> list[Module]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text(encoding="utf-8")
        out.append(Module(name, path, ast.parse(text, str(path)), len(text.splitlines())))
    return out


MODULES = _modules()


def _handles_import_error(node: ast.Try) -> bool:
    for h in node.handlers:
        types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(isinstance(t, ast.Name) and t.id in IMPORT_ERRORS for t in types):
            return True
    return False


def _imports(m: Module) -> list[Import]:
    package = m.name if m.path.name == "__init__.py" else m.name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node, local: bool, guarded: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, local, guarded) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.append(Import(base, child.lineno, local, guarded))
                found.extend(Import(f"{base}.{a.name}", child.lineno, local, guarded) for a in child.names)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, guarded)
            elif isinstance(child, ast.Try):
                g = guarded or _handles_import_error(child)
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), local, g)
                for part in [*child.handlers, *child.orelse, *child.finalbody]:
                    visit(part, local, guarded)
            else:
                visit(child, local, guarded)

    visit(m.tree, False, False)
    return found


def _is(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _report(violations: list[str], rule: str) -> None:
    assert not violations, f"{rule}:\n  " + "\n  ".join(violations)


def test_only_the_cli_imports_typer_or_rich():
    _report([f"{m.rel}:{i.line} imports {i.module}" for m in MODULES if not m.under("cli")
             for i in _imports(m) if _is(i.module, "typer", "rich")], "typer/rich outside pdsn_cli/cli")


def test_only_the_cli_prints():
    _report([f"{m.rel}:{n.lineno} calls print()" for m in MODULES if not m.under("cli")
             for n in ast.walk(m.tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"],
            "print() outside pdsn_cli/cli")


def test_nothing_imports_the_cli():
    _report([f"{m.rel}:{i.line} imports {i.module}" for m in MODULES
             if not m.under("cli") and m.name != "pdsn_cli.__main__"
             for i in _imports(m) if _is(i.module, "pdsn_cli.cli")], "imports of pdsn_cli.cli")


def test_trunks_stand_alone():
    _report([f"{m.rel}:{i.line} imports {i.module}" for m in MODULES if m.under("trunks")
             for i in _imports(m) if _is(i.module, *(f"pdsn_cli.{p}" for p in ("pdsn", "train", "data", "eval")))],
            "pdsn_cli/trunks importing pdsn/train/data/eval")


def test_plotting_only_in_report():
    _report([f"{m.rel}:{i.line} imports {i.module}" for m in MODULES if not m.under("report")
             for i in _imports(m) if _is(i.module, "matplotlib")], "matplotlib outside pdsn_cli/report")


def test_the_engine_does_not_render():
    """Commands call the engine, then report/ on its result: only cli/ and report/ draw figures or sheets."""
    drawing = ("pdsn_cli.report.plots", "pdsn_cli.report.markdown", "pdsn_cli.report.sheets")
    _report([f"{m.rel}:{i.line} imports {i.module}" for m in MODULES if not m.under("cli", "report")
             for i in _imports(m) if _is(i.module, *drawing)], "figures drawn outside cli/ and report/")
    png = [f"{m.rel}:{n.lineno} writes a PNG" for m in MODULES if not m.under("report") for n in ast.walk(m.tree)
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("imwrite", "imencode")
           and n.args and isinstance(n.args[0], ast.Constant) and str(n.args[0].value).lower().endswith("png")]
    _report(png, "PNG images written outside report/")


def test_imports_at_module_top():
    bad = []
    for m in MODULES:
        seen = set()
        for i in _imports(m):
            if not i.local or i.line in seen:  # one line per statement (``from a import b`` reads as a and a.b)
                continue
            seen.add(i.line)
            if _is(i.module, *LAZY):
                continue
            if not _is(i.module, *OPTIONAL):
                bad.append(f"{m.rel}:{i.line} imports {i.module} inside a function")
            elif not i.guarded:
                bad.append(f"{m.rel}:{i.line} imports optional {i.module} outside a try/except ImportError")
    _report(bad, "function-local imports")


def test_no_module_over_600_lines():
    _report([f"{m.rel}: {m.lines} lines" for m in MODULES if m.lines > MAX_LINES], f"modules over {MAX_LINES} lines")


@pytest.mark.parametrize("source, expected", [
    ("import typer\n", [("typer", False, False)]),
    ("def f():\n    try:\n        import dlib\n    except ImportError:\n        pass\n", [("dlib", True, True)]),
    ("def f():\n    import faiss\n", [("faiss", True, False)]),
    ("from . import x\n", [("pdsn_cli.eval", False, False), ("pdsn_cli.eval.x", False, False)]),
])
def test_the_import_reader(source, expected, tmp_path):
    m = Module("pdsn_cli.eval.probe", PACKAGE / "eval" / "probe.py", ast.parse(source), 1)
    assert [(i.module, i.local, i.guarded) for i in _imports(m)] == expected
