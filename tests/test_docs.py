"""The configuration reference (README tables, docs/configuration.md) is generated from the
settings and must not drift."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from config_reference import PROGRAMS, configuration_md, sample_toml, unit_of  # noqa: E402
from update_docs import CONFIGURATION, README, updated  # noqa: E402

from common.settings import options, settings_from_layers  # noqa: E402


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
        f"{title}: {option.name}"
        for title, cls, _where in PROGRAMS
        for option in options(cls)
        if unit_of(option) == "?"
    ]
    assert unitless == [], "name the unit in scripts/config_reference.py COUNT_UNITS"


def test_the_sample_toml_files_parse_and_uncommented_give_the_defaults(tmp_path: Path) -> None:
    for title, cls, _where in PROGRAMS:
        prefix = cls.model_config.get("env_prefix", "")
        environ = {prefix + "SERVER": "127.0.0.1:7443"}
        text = sample_toml(cls)
        assert tomllib.loads(text) == {}  # everything commented out
        lines = [
            line.removeprefix("# ")
            for line in text.splitlines()
            if line.startswith("# ") and " = " in line.split("#")[1]
        ]
        values = tomllib.loads("\n".join(lines))
        assert set(values) == {option.name for option in options(cls)}
        defaults = settings_from_layers(cls, flags={}, environ=environ, toml_file=None)
        given = [line for line in lines if not line.startswith(("server ", "host_id ", "labels "))
                 and getattr(defaults, line.split(" = ")[0]) is not None]  # fmt: skip
        path = tmp_path / f"{title}.toml"
        path.write_text("\n".join(given))
        loaded = settings_from_layers(cls, flags={}, environ=environ, toml_file=path)
        assert loaded == defaults
