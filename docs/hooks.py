"""mkdocs hooks (mkdocs.yml: `hooks:`): the pages that are generated at build time, so they
cannot drift from what they describe.

- `configuration.md`: its `<!-- config-reference -->` marker is replaced by every key of
  `ftdist.config.schema.Config`, walked through pydantic's `model_fields` (a new key or section appears
  without touching this file), each with its type, default and description. The description is
  the field's own (`Field(description=...)`) or the comments beside it in the source: the comment
  lines right above the field and the `# ...` at the end of its line; a section's text is its
  class docstring.
- `architecture.md`: its `<!-- package-layout -->` marker is replaced by the import layers as
  tools/imports.py checks them (LAYERS) and every module of ftdist/ with the first sentence of
  its docstring: a new module appears, and a layer moves, without touching the page.
- `index.md`: README.md, its links into docs/ made relative to the site.
- Pages of docs/ link to `../bench/results/X.md`, `../bench/README.md` and `../README.md` as
  the repository has them; the site's copies are linked instead.
- `benchmarks/results/*`: every file of bench/results/ but the JSON (each `*.md` a page, listed
  under "Benchmarks" in the nav; images beside them), and bench/README.md as
  `benchmarks/how-they-measure.md`.
"""

from __future__ import annotations

import inspect
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MARKER = "<!-- config-reference -->"
LAYOUT_MARKER = "<!-- package-layout -->"
NAV_SECTION = "Benchmarks"


# --- build wiring ---------------------------------------------------------------------------

def on_config(config):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and NAV_SECTION in entry:
            pages = entry[NAV_SECTION] if isinstance(entry[NAV_SECTION], list) else [entry[NAV_SECTION]]
            pages.append({"How they measure": "benchmarks/how-they-measure.md"})
            pages.append({"Results": [f"benchmarks/results/{md.name}" for md in sorted(RESULTS.glob("*.md"))]})
            entry[NAV_SECTION] = pages
    return config


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=readme_as_index()))
    files.append(File.generated(config, "benchmarks/how-they-measure.md",
                                abs_src_path=str(ROOT / "bench" / "README.md")))
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and path.suffix != ".json":
            files.append(File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path)))
    return files


# Links a page of docs/ writes as they resolve in the repository (read on GitHub or in an
# editor), and where the same files are in the site.
REPO_LINKS = {"](../bench/results/": "](benchmarks/results/",
              "](../bench/README.md": "](benchmarks/how-they-measure.md",
              "](../README.md": "](index.md"}


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "configuration.md":
        from ftdist.config.schema import Config

        markdown = markdown.replace(MARKER, config_reference(Config))
    if page.file.src_uri == "architecture.md":
        markdown = markdown.replace(LAYOUT_MARKER, package_layout())
    if "/" not in page.file.src_uri and not page.file.generated_by:
        for repo, site in REPO_LINKS.items():
            markdown = markdown.replace(repo, site)
    return markdown


def readme_as_index() -> str:
    """README.md as the site's home page: its links to `docs/X` become `X`, to `bench/results/X`
    the generated `benchmarks/results/X`."""
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", text)
    return re.sub(r"\]\(bench/results/", "](benchmarks/results/", text)


# --- the package layout ---------------------------------------------------------------------

def package_layout() -> str:
    """The layers (tools/imports.py's LAYERS, top first), then each package's modules with the
    first sentence of their docstrings."""
    import ast
    import importlib.util

    spec = importlib.util.spec_from_file_location("ftdist_imports", ROOT / "tools" / "imports.py")
    imports = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = imports
    spec.loader.exec_module(imports)
    lines = ["| layer (top first) | packages and modules |", "|---|---|"]
    lines += [f"| {i} | {', '.join(f'`{n}`' for n in names)} |" for i, names in enumerate(imports.LAYERS)]
    lines += ["", "| module | what it is |", "|---|---|"]
    package = ROOT / "ftdist"
    for path in sorted(package.rglob("*.py"), key=lambda p: (p.parent != package, str(p.parent), p.name != "__init__.py", p.name)):
        if path.name == "__main__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        first = re.split(r"(?<=[.:])\s", first, maxsplit=1)[0] if len(first) > 160 else first
        rel = path.relative_to(ROOT).as_posix()
        lines.append(f"| `{rel}` | {cell(first)} |")
    return "\n".join(lines)


# --- the configuration reference ------------------------------------------------------------

def config_reference(root: type) -> str:
    """Markdown for every key of `root` (a pydantic model): a table of its keys, then one section
    per nested model, depth first, each model class expanded once (later uses point to it)."""
    out: list[str] = []
    seen: dict[type, str] = {}

    def section(model: type, prefix: str, level: int) -> None:
        seen[model] = prefix
        comments = field_comments(model)
        if prefix:
            out.append(f"{'#' * level} `{prefix}`\n")
        doc = inspect.getdoc(model) if model.__dict__.get("__doc__") else None
        if doc:
            out.append(prose(" ".join(doc.split())) + "\n")
        out.append("| key | type | default | description |\n| --- | --- | --- | --- |")
        nested: list[tuple[type, str]] = []
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            kind = type_name(field.annotation, field.metadata, key, nested, seen)
            text = field.description or comments.get(name, "")
            out.append(f"| `{key}` | {cell(kind)} | {cell(default_of(field))} | {cell(text)} |")
        out.append("")
        for sub, sub_prefix in nested:
            if sub not in seen:
                section(sub, sub_prefix, min(level + 1, 4) if prefix else level)

    section(root, "", 2)
    return "\n".join(out)


def cell(text: str) -> str:
    """`text` for a table cell: one line, pipes escaped, `<name>` shown as written."""
    return prose(text).replace("|", "\\|").replace("\n", " ")


def prose(text: str) -> str:
    """Source comments and docstrings as Markdown text: `<` and `>` outside code spans escaped,
    so that `eval_loss/<name>` is not read as an HTML tag."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def is_model(tp) -> bool:
    return inspect.isclass(tp) and hasattr(tp, "model_fields")


def type_name(tp, metadata, key: str, nested: list, seen: dict) -> str:
    """`tp` in words: Literal choices joined by |, constraints appended, a nested model named by
    the key where its section is (queued in `nested` the first time)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0], list(args[1:]) + list(metadata), key, nested, seen)
    words = _constraints(metadata)
    is_path = any(getattr(getattr(m, "func", None), "__name__", "") == "expand_env" for m in metadata)
    if is_model(tp):
        if tp in seen or any(tp is t for t, _ in nested):
            where = seen.get(tp) or next(p for t, p in nested if t is tp)
            return f"section, as `{where}`"
        nested.append((tp, key))
        return f"section `{key}`"
    if origin is typing.Literal:
        base = " | ".join(f"`{_yaml(a)}`" for a in args)
    elif origin in (typing.Union, types.UnionType):
        parts = [type_name(a, [], key, nested, seen) for a in args if a is not type(None)]
        base = "; or ".join(parts) + ("; or `null`" if type(None) in args else "")
    elif origin is list:
        base = f"list of {type_name(args[0], [], key + '.N', nested, seen)}" if args else "list"
    elif origin is tuple:
        base = "[" + ", ".join(type_name(a, [], key, nested, seen) for a in args) + "]"
    elif origin is dict:
        base = (f"mapping of {type_name(args[0], [], key, nested, seen)} to "
                f"{type_name(args[1], [], key + '.KEY', nested, seen)}") if args else "mapping"
    elif tp is typing.Any:
        base = "any"
    elif tp is str and is_path:
        base = "path (`$VAR` expanded)"
    else:
        base = getattr(tp, "__name__", str(tp))
    return base + (f" ({', '.join(words)})" if words else "")


def _constraints(metadata) -> list[str]:
    words = []
    for m in metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None and type(m).__name__ in (attr.capitalize(), "_PydanticGeneralMetadata"):
                words.append(f"{sign} {getattr(m, attr)}")
        if type(m).__name__ == "MinLen":
            words.append(f"at least {m.min_length} long")
        if type(m).__name__ == "MaxLen":
            words.append(f"at most {m.max_length} long")
        if getattr(m, "pattern", None):
            words.append(f"matching `{m.pattern}`")
    return words


def default_of(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if is_model(type(value)):
        return "its defaults"
    return f"`{_yaml(value)}`"


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def field_comments(model: type) -> dict[str, str]:
    """{field: its comments} for the fields a model class's body declares (and its bases'): the
    comment lines right above a field (no blank line between) and the comment ending its line."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if is_model(cls) and cls.__module__ != "pydantic.main":
            try:
                found.update(_class_comments(inspect.getsource(cls)))
            except (OSError, TypeError):
                pass
    return found


def _class_comments(source: str) -> dict[str, str]:
    source = inspect.cleandoc("\n" + source) if source[:1].isspace() else source
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    body_col = next((t.end[1] for t in tokens if t.type == tokenize.INDENT), None)
    found: dict[str, str] = {}
    above: list[str] = []
    line_start = True  # the next token begins a logical line
    field = None  # the field whose logical line is being read
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if field is not None:
                found[field] = " ".join(filter(None, [found.get(field, ""), text]))
            elif tok.line.strip().startswith("#") and tok.start[1] == body_col:
                above.append(text)
            continue
        if tok.type == tokenize.NL:
            if not tok.line.strip():
                above = []
            continue
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            continue
        if tok.type == tokenize.NEWLINE:
            field, line_start = None, True
            continue
        if line_start:
            line_start = False
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if (tok.type == tokenize.NAME and tok.start[1] == body_col and nxt is not None
                    and nxt.type == tokenize.OP and nxt.string == ":"):
                field = tok.string
                found[field] = " ".join(above)
            above = []
    return {k: v for k, v in found.items() if v}
