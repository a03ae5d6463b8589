"""docs/design.md stays true: every rule names a module and a test that exist, every "rule N"
cited in the code resolves there, and the product points at nothing outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from refresher.localidp import SHAPES
from refresher.presets import PRESETS, PROVIDERS

ROOT = Path(__file__).parent.parent
DESIGN = ROOT / "docs" / "design.md"


def rule_rows() -> dict[int, str]:
    rows: dict[int, str] = {}
    for line in DESIGN.read_text().splitlines():
        match = re.match(r"^\| (\d+) \|", line)
        if match:
            rows[int(match.group(1))] = line
    return rows


def test_every_rule_names_modules_and_tests_that_exist() -> None:
    rows = rule_rows()
    assert sorted(rows) == list(range(1, len(rows) + 1)), "rules are numbered 1..N"
    for number, row in rows.items():
        _, _, _, enforced, proved, _ = row.split("|")
        modules = re.findall(r"`([a-z_/]+\.py)`", enforced)
        assert modules, f"rule {number} names no module"
        for module in modules:
            assert (ROOT / "refresher" / module).is_file(), f"rule {number}: no refresher/{module}"
        tests = re.findall(r"`(tests/[a-z_]+\.py)(?:::([a-z0-9_]+))?`", proved)
        assert tests, f"rule {number} names no test"
        for path, name in tests:
            assert (ROOT / path).is_file(), f"rule {number}: no {path}"
            if name:
                defined = {
                    node.name
                    for node in ast.walk(ast.parse((ROOT / path).read_text()))
                    if isinstance(node, ast.FunctionDef)
                }
                assert name in defined, f"rule {number}: no test {path}::{name}"


def test_every_rule_cited_in_code_and_tests_exists() -> None:
    rows = rule_rows()
    cited = 0
    old_style = "design" + " rule"  # split, so this file does not cite itself
    for folder in ("refresher", "tests", "bench", "testdoubles"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert old_style not in text, f"{path}: cite rules as `rule N of docs/design.md`"
            for number in re.findall(r"\brules? (\d+)(?:,| and| of docs/design\.md)", text):
                cited += 1
                assert int(number) in rows, f"{path} cites rule {number}, not in docs/design.md"
    assert cited >= 5


def test_the_product_names_no_path_outside_the_repository() -> None:
    for path in (ROOT / "refresher").rglob("*.py"):
        text = path.read_text()
        for outside in ("/work/", "shared/seeds", "../shared", "../seeds"):
            assert outside not in text, f"{path} points outside the repository: {outside}"


def test_one_list_of_providers() -> None:
    # The presets, the local token server and the chart's schema all know the same providers.
    import json

    assert set(PRESETS) == set(SHAPES) == set(PROVIDERS)
    schema = json.loads((ROOT / "helm/refresher/values.schema.json").read_text())
    token = schema["properties"]["config"]["properties"]["tokens"]["items"]
    assert token["properties"]["provider"]["enum"] == list(PROVIDERS)
    providers_doc = (ROOT / "docs" / "providers.md").read_text()
    for name in PROVIDERS:
        assert f"`{name}`" in providers_doc
