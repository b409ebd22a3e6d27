"""RESULTS.md's text-to-image section is what experiments/t2i_report.py writes from the committed raw files: a number
edited by hand, or a raw file changed without regenerating, fails here."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("t2i_report", ROOT / "experiments" / "t2i_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.WRITE_PLOTS = False  # the text only: the committed figures stay untouched
    return module


def test_text_to_image_section_is_generated(report):
    results = (ROOT / "RESULTS.md").read_text()
    start = re.search(r"^# Text-to-image", results, flags=re.M)
    assert start, "RESULTS.md has no '# Text-to-image' section"
    committed = results[start.start():]
    generated = report.section()
    assert committed == generated, (
        "RESULTS.md's text-to-image section differs from `python experiments/t2i_report.py`'s output; "
        "regenerate it from experiments/results/ rather than editing it")


def test_summary_row_is_generated(report):
    row = report.summary_row()
    assert row and row.startswith("| 6 |")
    assert row in (ROOT / "RESULTS.md").read_text().splitlines()
