"""ftdist's import graph, checked: its layers, its cycles and its imports inside functions.

    python tools/imports.py            the layers, the cycle count and every import that breaks a rule
    python tools/imports.py --graph    also each module's imports of ftdist (* inside a function)
    python tools/imports.py --cycles   only the cycles (runs on any checkout, layers or none)

Rules (docs/architecture.md):
1. No cycle between ftdist modules, counting imports inside functions (an import under
   `if TYPE_CHECKING:` is for annotations only, never run: not counted).
2. A module imports only from its own package or from a layer below its own (LAYERS, top first;
   packages on one line are peers and do not import each other). A module may have a layer of
   its own (`objectives.registry`): the longest name in LAYERS that it starts with decides.
3. An import inside a function is there only to keep a heavy library (HEAVY) off a light path:
   the module it imports reaches a heavy library through its top-level imports, and the module
   importing it does not.
Exit status 1 when a rule is broken.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ftdist"

# Top to bottom. A name is a subpackage of ftdist or a top-level module of it.
LAYERS: list[list[str]] = [
    ["__main__"],
    ["cli"],
    ["tune"],
    ["launch"],
    ["training"],
    ["artifacts"],
    ["sizing"],
    ["objectives"],
    ["engines", "model"],
    ["data", "tracking"],
    ["io"],
    ["config"],
    # The rewards grpo's config names (torch-free): config validation imports a user's function.
    ["objectives.rewards"],
    # Which objective and which engine a config names (torch-free): config validation asks them.
    ["objectives.registry", "engines.registry"],
    ["objectives.protocol"],
    ["errors", "__init__"],
]
HEAVY = {"torch", "transformers", "peft", "deepspeed", "ray", "datasets", "bitsandbytes", "mlflow", "tensorboard",
         "wandb", "matplotlib", "s3fs", "pyarrow", "boto3", "botocore", "safetensors", "accelerate", "trl"}


@dataclass
class Module:
    name: str
    path: Path
    top: set[str] = field(default_factory=set)  # ftdist modules imported at module level
    inner: dict[str, int] = field(default_factory=dict)  # ftdist modules imported inside a function -> line
    heavy_top: set[str] = field(default_factory=set)  # heavy libraries imported at module level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def scan(modules: dict[str, Module]) -> None:
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        is_package = mod.path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    for orelse in child.orelse:
                        visit(orelse, in_function)
                    continue
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = resolve(mod.name, is_package, child)
                    # `from ftdist.x import y`: y is a module where ftdist/x/y.py exists
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
                for target in targets:
                    if target.split(".")[0] == PACKAGE:
                        while target not in modules and "." in target:
                            target = target.rsplit(".", 1)[0]
                        if target == mod.name:
                            continue
                        if inside:
                            mod.inner.setdefault(target, child.lineno)
                        else:
                            mod.top.add(target)
                    elif target.split(".")[0] in HEAVY and not inside:
                        mod.heavy_top.add(target.split(".")[0])
                visit(child, inside)

        visit(tree, False)


def load() -> dict[str, Module]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        name = module_name(path)
        modules[name] = Module(name, path)
    scan(modules)
    return modules


def layer_of(name: str) -> tuple[int, str]:
    """(layer, the LAYERS name that placed it): the longest name in LAYERS the module starts with."""
    parts = name.split(".")[1:] or ["__init__"]
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        for i, names in enumerate(LAYERS):
            if prefix in names:
                return i, prefix
    raise SystemExit(f"tools/imports.py: {name} is in no layer: add {parts[0]!r} to LAYERS")


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph = {m: sorted(mod.top | set(mod.inner)) for m, mod in modules.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            for j in range(i, len(graph[node])):
                nxt = graph[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return found


def heavy_reach(modules: dict[str, Module]) -> dict[str, set[str]]:
    """The heavy libraries each module loads through its top-level imports, transitively."""
    reach: dict[str, set[str]] = {}

    def walk(name: str, seen: set[str]) -> set[str]:
        if name in reach:
            return reach[name]
        seen = seen | {name}
        found = set(modules[name].heavy_top)
        # importing a submodule imports its parent packages first
        parts = name.split(".")
        deps = set(modules[name].top) | {".".join(parts[:k]) for k in range(1, len(parts))}
        for dep in deps:
            if dep in modules and dep not in seen:
                found |= walk(dep, seen)
        reach[name] = found
        return found

    for name in modules:
        walk(name, set())
    return reach


def problems(modules: dict[str, Module]) -> list[str]:
    found = [f"cycle: {' <-> '.join(c)}" for c in cycles(modules)]
    for name, mod in sorted(modules.items()):
        here, package = layer_of(name)
        for target in sorted(mod.top | set(mod.inner)):
            there, other = layer_of(target)
            if there > here or (other == package and there == here):
                continue
            where = "above" if there < here else "a peer of"
            found.append(f"layers: {name} imports {target}, {where} it ({other} is "
                         f"{'a peer' if there == here else 'layer ' + str(there)}, {package} layer {here})")
    reach = heavy_reach(modules)
    for name, mod in sorted(modules.items()):
        for target, line in sorted(mod.inner.items()):
            kept_off = reach[target] - reach[name]
            if not kept_off:
                why = (f"{target} loads no heavy library at import" if not reach[target]
                       else f"{name} already loads {', '.join(sorted(reach[target]))}")
                found.append(f"inner import: {mod.path.relative_to(ROOT)}:{line} imports {target} inside a function, "
                             f"but {why}: import it at the top")
    return found


def main(argv: list[str]) -> int:
    modules = load()
    if "--cycles" in argv:
        found = cycles(modules)
        inner = sum(len(m.inner) for m in modules.values())
        print(f"{len(modules)} modules, {len(found)} cycles, {inner} imports of ftdist inside functions")
        for component in found:
            print(f"cycle of {len(component)}: {' <-> '.join(component)}")
        return 1 if found else 0
    if "--graph" in argv:
        for name, mod in sorted(modules.items()):
            deps = sorted(mod.top) + [f"{t}*" for t in sorted(mod.inner)]
            print(f"{name}: {' '.join(deps)}")
    print("layers, top first: " + " > ".join(" | ".join(names) for names in LAYERS))
    inner = sum(len(m.inner) for m in modules.values())
    print(f"{len(modules)} modules, {len(cycles(modules))} cycles, {inner} imports of ftdist inside functions")
    found = problems(modules)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
