"""The documentation site (mkdocs.yml, docs/) builds without a single warning, and its nav is complete.

`mkdocs build --strict` renders every page and the API reference from the package's docstrings
(mkdocstrings): a broken link, a page missing from the nav, a nav entry without its page or a
docstring section that cannot be parsed fails the build. The nav checks run without building.
Both skip only when mkdocs is not installed (it is part of the `test` and `docs` extras).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"

pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -c constraints.txt mkdocs mkdocs-material "
                                     "'mkdocstrings[python]', or the test/docs extra)")
yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of mkdocs) is not installed")


def _nav_pages(entries):
    """Every page path named in a (nested) mkdocs nav."""
    for entry in entries:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            if isinstance(value, list):
                yield from _nav_pages(value)
            elif isinstance(value, str) and not value.startswith(("http://", "https://")):
                yield value


def _nav():
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    return list(_nav_pages(config["nav"]))


def test_every_docs_page_is_in_the_nav():
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    missing = sorted(pages - set(_nav()))
    assert not missing, f"pages under docs/ that mkdocs.yml's nav does not list: {missing}"


def test_every_nav_entry_exists():
    nav = _nav()
    absent = [page for page in nav if not (DOCS / page).is_file()]
    assert not absent, f"nav entries of mkdocs.yml without a file under docs/: {absent}"
    repeated = sorted({page for page in nav if nav.count(page) > 1})
    assert not repeated, f"pages listed twice in the nav: {repeated}"


def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG),
                             "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "functional" / "index.html").is_file()


def test_distillation_trainer_signature_matches_its_page():
    """`DistillationTrainer` exists only once transformers is imported, so mkdocstrings cannot
    render it: docs/api/huggingface.md writes its signature by hand, checked here."""
    pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
    import inspect

    from kdfast.integrations.huggingface import DistillationTrainer

    page = (DOCS / "api" / "huggingface.md").read_text(encoding="utf-8")
    keywords = [parameter for parameter in inspect.signature(DistillationTrainer.__init__).parameters.values()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    written = [parameter.name if parameter.default is inspect.Parameter.empty
               else f"{parameter.name}={parameter.default!r}".replace("'", '"') for parameter in keywords]
    signature = "DistillationTrainer(*args, " + ", ".join(written) + ", **kwargs)"
    assert " ".join(signature.split()) in " ".join(page.split()), signature
