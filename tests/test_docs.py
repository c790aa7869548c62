"""The docs' figures are the committed benchmark files' figures, and the docs speak of the
project as it is (its history is in git)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", REPO / "benchmarks" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_in_the_docs_is_rendered_from_its_benchmark_file(tmp_path):
    tables = _doc_tables()
    assert not tables.stale(), "run: python benchmarks/doc_tables.py"
    used = {m["name"] for p in tables.DOCS for m in tables.BLOCK.finditer(p.read_text())}
    assert used == set(tables.TABLES)  # every table the generator knows is in some doc
    # a changed figure is caught: the README with one number edited is stale
    readme = (REPO / "README.md").read_text()
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace("| 223.7M |", "| 213.0M |", 1))
    assert edited.read_text() != readme and tables.stale([edited]) == [edited]


def test_docs_do_not_narrate_the_work_s_history():
    pattern = re.compile(r"\bsession \d+|\bsessions? \d|\bround \d+\b|\bissue \d+\b", re.I)
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
