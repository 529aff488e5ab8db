"""The configuration reference (README tables, docs/configuration.md) is generated from the
settings and must not drift."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from config_reference import PROGRAMS, configuration_md, sample_toml, unit_of  # noqa: E402
from update_docs import CONFIGURATION, README, updated  # noqa: E402

from common.settings import settings_from_layers  # noqa: E402


def test_readme_configuration_reference_matches_the_settings() -> None:
    text = README.read_text()
    assert updated(text) == text, "run: .venv/bin/python scripts/update_docs.py"


def test_readme_names_every_option() -> None:
    text = README.read_text()
    for option in ("--agent-grace-s", "--max-running-executions", "--state-dir", "--label",
                   "--retention-days", "--url"):  # fmt: skip
        assert f"`{option}`" in text


def test_configuration_md_matches_the_settings() -> None:
    assert CONFIGURATION.read_text() == configuration_md(), (
        "run: .venv/bin/python scripts/update_docs.py"
    )


def test_every_number_has_a_unit() -> None:
    unitless = [
        f"{title}: {field.name}"
        for title, cls, _prefix, _where in PROGRAMS
        for field in dataclasses.fields(cls)
        if unit_of(cls, field) == "?"
    ]
    assert unitless == [], "name the unit in scripts/config_reference.py COUNT_UNITS"


def test_the_sample_toml_files_parse_and_uncommented_give_the_defaults() -> None:
    for _title, cls, prefix, _where in PROGRAMS:
        text = sample_toml(cls)
        assert tomllib.loads(text) == {}  # everything commented out
        options = [
            line.removeprefix("# ")
            for line in text.splitlines()
            if line.startswith("# ") and " = " in line.split("#")[1]
        ]
        values = tomllib.loads("\n".join(options))
        assert set(values) == {f.name for f in dataclasses.fields(cls)}
        defaults = settings_from_layers(
            cls, toml={}, environ={prefix + "SERVER": "127.0.0.1:7443"}, flags={}, env_prefix=prefix
        )
        given = {k: v for k, v in values.items() if k != "server" and getattr(defaults, k)
                 is not None and k not in ("host_id", "labels")}  # fmt: skip
        loaded = settings_from_layers(
            cls, toml=given, environ={prefix + "SERVER": "127.0.0.1:7443"}, flags={},
            env_prefix=prefix,
        )  # fmt: skip
        assert loaded == defaults
