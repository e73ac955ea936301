"""The docs a user navigates: README stays short and its links resolve; the mkdocs site builds
under --strict (a broken link or anchor, a page outside the nav, any warning fails it); the
configuration reference holds every key of the schema."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftdist.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 300
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_readme_is_under_300_lines():
    lines = README.read_text().count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into a page of docs/"


def test_every_relative_link_in_readme_points_to_a_file():
    targets = [t for t in LINK.findall(README.read_text()) if not re.match(r"^([a-z]+:|#)", t)]
    assert targets, "README.md links to no page of docs/"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_mkdocs_config_is_strict_and_checks_links():
    text = (ROOT / "mkdocs.yml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["strict"] is True and cfg["docs_dir"] == "docs"
    assert cfg["validation"]["links"]["not_found"] == "warn"
    assert cfg["validation"]["links"]["anchors"] == "warn"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return done, out


def test_the_site_builds_under_strict_with_no_warning(site):
    done, _ = site
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, log
    # mkdocs says this at INFO level only: a page that exists but no menu leads to.
    assert "not included in the \"nav\"" not in log, f"a page of docs/ is missing from mkdocs.yml's nav:\n{log}"


def test_every_docs_page_and_bench_result_is_built(site):
    _, out = site
    pages = [p.stem for p in (ROOT / "docs").glob("*.md")]
    results = [p.stem for p in (ROOT / "bench" / "results").glob("*.md")]
    missing = [p for p in pages if not (out / p / "index.html").exists()]
    missing += [f"benchmarks/results/{r}" for r in results if not (out / "benchmarks" / "results" / r / "index.html").exists()]
    assert not missing, f"not built: {missing}"


def schema_models(model, found=None):
    """Every pydantic model class reachable from `model` (in a list, a mapping or a union too)."""
    from typing import get_args

    found = {} if found is None else found
    found[model] = True
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and hasattr(tp, "model_fields"):
                if tp not in found:
                    schema_models(tp, found)
            else:
                stack.extend(get_args(tp))
    return list(found)


def test_the_configuration_reference_holds_every_key_of_the_schema(site):
    _, out = site
    page = (out / "configuration" / "index.html").read_text()
    assert "<!-- config-reference -->" not in page
    # Each section class is expanded once, under the first key that uses it (data.train.N; then
    # data.eval points there): every field of every class has its row, by its dotted key.
    missing = [f"{model.__name__}.{name}" for model in schema_models(Config) for name in model.model_fields
               if not re.search(rf"<td><code>([\w.]+\.)?{name}</code></td>", page)]
    assert not missing, f"keys missing from the configuration reference: {missing}"
    rows = sum(len(model.model_fields) for model in schema_models(Config))
    assert page.count("<tr>") - page.count("<th>key</th>") >= rows
