"""The shape of the code, measured: the figures issue 20 reports before and after a restructuring.

    .venv/bin/python bench/house.py            # files, lines, largest module, longest functions, README lines
    .venv/bin/python bench/house.py --lint     # and `lint-imports` (the contracts in pyproject.toml)

Counts the Python files under orchestrator/ and jobs/ (tests and bench apart), their lines, the largest
module, the longest functions (ast: first to last line of the def, decorators included), the import cycles
among orchestrator's modules (imports at module level, as import-linter sees them at any level) and README.md's
lines. `duplicates --most 200 | head -1` (the tool library's, not the repository's) gives the pairs.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> list[Path]:
    return sorted(p for d in ("orchestrator", "jobs") for p in (ROOT / d).rglob("*.py"))


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.end_lineno - start + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """orchestrator modules this one imports, at any level (import-linter's view)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycles(paths: list[Path]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    names = {_module_name(p): p for p in paths if _module_name(p).startswith("orchestrator")}
    graph = {n: _imports(p, n, set(names)) for n, p in names.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lint", action="store_true", help="also run lint-imports")
    ap.add_argument("--top", type=int, default=5, help="how many of the longest functions to list")
    args = ap.parse_args()
    paths = _modules()
    sizes = sorted(((len(p.read_text().splitlines()), p) for p in paths), reverse=True)
    funcs = sorted((f for p in paths for f in _functions(p)), reverse=True)
    print(f"files: {len(paths)} Python files under orchestrator/ and jobs/, {sum(s for s, _ in sizes)} lines")
    print("largest modules: " + ", ".join(f"{p.relative_to(ROOT)} {s}" for s, p in sizes[:3]))
    print(f"modules over 400 lines: {sum(1 for s, _ in sizes if s > 400)}")
    print("longest functions: " + ", ".join(f"{loc} {n}" for n, loc in funcs[: args.top]))
    print(f"functions over 60 lines: {sum(1 for n, _ in funcs if n > 60)}")
    cycles = _cycles(paths)
    print(f"import cycles among modules: {len(cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cycles))
    print(f"README.md: {len((ROOT / 'README.md').read_text().splitlines())} lines")
    if args.lint:
        exe = Path(sys.executable).with_name("lint-imports")
        r = subprocess.run([str(exe) if exe.exists() else "lint-imports"], cwd=ROOT, capture_output=True, text=True)
        tail = [ln for ln in r.stdout.splitlines() if "kept" in ln or "broken" in ln]
        print(f"lint-imports: exit {r.returncode}; " + ("; ".join(tail) or (r.stdout + r.stderr).strip()[-300:]))


if __name__ == "__main__":
    main()
