"""The docs build: the guide in docs/ is a mkdocs site whose links, anchors and API references all
resolve, the README stays a front door, and the copies the guide quotes match their sources."""

import ast
import importlib.util
import itertools
import re
import subprocess
import sys

import yaml

from conftest import REPO

README_MAX_LINES = 300


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _config() -> dict:
    return yaml.safe_load((REPO / "mkdocs.yml").read_text())


def test_the_site_builds_strictly_with_its_api_reference(tmp_path):
    # dev dependencies: a missing one is a failure, not a skip
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        assert importlib.util.find_spec(module) is not None, (
            f"{module} is missing: pip install -e '.[dev]' (or '.[docs]')")
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    for name in ("jaxdist.Trainer", "jaxdist.fit", "jaxdist.errors", "jaxdist.parallel.rules"):
        assert f'id="{name}"' in api, f"the API reference lacks {name}"


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    docs = REPO / _config().get("docs_dir", "docs")
    nav = _nav_pages(_config()["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice"
    assert [page for page in nav if not (docs / page).is_file()] == []
    pages = sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md"))
    assert [page for page in pages if page not in nav] == []
    assert "api.md" in nav and "::: jaxdist" in (docs / "api.md").read_text()


def test_the_readme_is_a_front_door_that_links_to_pages_that_exist():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\((docs/[^)#\s]+)", text)
    assert links, "the README points into docs/"
    assert [link for link in links if not (REPO / link).exists()] == []
    assert "```bash\nbash scripts/train.sh" in text and "bash scripts/test.sh -m slow" in text
    assert "**no authentication**" in text and "must be private" in text


def _block_after(text: str, marker: str) -> str:
    after = text[text.index(marker):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_guides_copy_of_the_readme_example_is_the_one_the_readme_runs():
    marker = "<!-- example: own-model "
    assert (_block_after((REPO / "docs" / "training.md").read_text(), marker)
            == _block_after((REPO / "README.md").read_text(), marker))


def test_the_exit_code_table_quoted_in_the_guide_is_the_docstring_of_jaxdist_errors():
    doc = ast.get_docstring(ast.parse((REPO / "jaxdist" / "errors.py").read_text()))
    table = [line for line in doc.splitlines() if line.startswith("|")]
    assert len(table) >= 7
    page = (REPO / "docs" / "fault-tolerance.md").read_text()
    assert [line for line in table if line not in page.splitlines()] == []


def test_the_strategies_page_tabulates_the_registry_and_the_readme_names_every_strategy():
    from jaxdist import STRATEGIES

    page = (REPO / "docs" / "strategies.md").read_text().splitlines()
    start = page.index("| name | value | options | what it does | layout |")
    table = itertools.takewhile(lambda line: line.startswith("|"), page[start + 2:])
    rows = [line.split("|")[1:-1] for line in table]
    assert [cells[0].strip().strip("`") for cells in rows] == list(STRATEGIES)
    for (name, value, _, _, layout), strategy in zip(rows, STRATEGIES.values()):
        assert value.strip().startswith(f"`{type(strategy).__name__}("), name
        assert layout.strip() == strategy.layout, name
    readme = (REPO / "README.md").read_text()
    assert [name for name in STRATEGIES if f"| `{name}` |" not in readme] == []
