"""``${VAR:-default}`` expansion in run YAMLs: set, unset with default, unset without (refused by name)."""
from __future__ import annotations

import pytest

from ahcq.yaml_schema import SchemaError, expand_env


def test_expands_set_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AHCQ_TEST_ROOT", "/data/x")
    monkeypatch.delenv("AHCQ_TEST_UNSET", raising=False)
    data = {"root": "${AHCQ_TEST_ROOT}/val", "calib": ["${AHCQ_TEST_UNSET:-a/b}", 3], "n": 2}
    assert expand_env(data) == {"root": "/data/x/val", "calib": ["a/b", 3], "n": 2}


def test_unset_without_default_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AHCQ_TEST_UNSET", raising=False)
    with pytest.raises(SchemaError, match="AHCQ_TEST_UNSET"):
        expand_env({"root": "${AHCQ_TEST_UNSET}"})
