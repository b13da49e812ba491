"""The docs match the code: the configuration reference is generated from it, and every message the
troubleshooting page is keyed by is one the code can still give."""

from __future__ import annotations

import re

import pytest

from goatcounter_exports.settings import OPTIONS, reference_markdown

from .support import PACKAGE, ROOT

pytestmark = pytest.mark.fast


def test_the_configuration_reference_is_the_one_the_code_generates() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    generated = doc.split("keeps it equal -->\n", 1)[1].split("<!-- end of generated table -->", 1)[0]
    assert generated == reference_markdown()
    for option in OPTIONS:
        assert not option.variable or option.variable in (ROOT / "README.md").read_text() + doc


def test_every_troubleshooting_heading_is_a_message_the_code_gives() -> None:
    headings = re.findall(r"^### `([^`]+)`", (ROOT / "docs" / "troubleshooting.md").read_text(), flags=re.M)
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    source = re.sub(r"\s*\"\n\s*(f?)\"", "", source)  # implicitly joined string literals, as Python joins them
    assert len(headings) >= 15

    def said(heading: str) -> bool:
        # A variable's name in a heading may be a placeholder in the code: f"{variable} must be ...".
        pattern = re.sub(r"GOATCOUNTER_[A-Z_]+", r"(?:GOATCOUNTER_[A-Z_]+|\\{[a-z_]+\\})", re.escape(heading))
        return re.search(pattern, source) is not None

    assert [heading for heading in headings if not said(heading)] == []
