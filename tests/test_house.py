"""The house rules that a reviewer would otherwise check by hand."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "gradsift"


def test_no_module_of_the_package_passes_500_lines():
    lengths = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert len(lengths) > 30  # the package was found
    assert {name: n for name, n in lengths.items() if n > 500} == {}
