"""The mutation table (scripts/mutation_check.py, docs/reliability.md) stays runnable: each
row's pattern occurs in its file exactly as often as the row says. A refactor that moves the
code it mutates must move the row with it (issue 26 found eight stale rows this way)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutation_pattern_occurs_as_often_as_its_row_says():
    spec = importlib.util.spec_from_file_location(
        "mutation_check", ROOT / "scripts/mutation_check.py"
    )
    mc = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = mc
    try:
        spec.loader.exec_module(mc)
    finally:
        sys.modules.pop("mutation_check", None)
    rows = mc.MUTATIONS
    assert rows
    stale = {
        m.id: (m.file, (ROOT / m.file).read_text().count(m.pattern), m.count)
        for m in rows
        if (ROOT / m.file).read_text().count(m.pattern) != m.count
    }
    assert stale == {}, "rows whose pattern moved (file, found, expected): " + repr(stale)
