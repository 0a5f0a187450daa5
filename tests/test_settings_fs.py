"""``[fs.roots]`` in the config file: parsing, validation, and where relative roots lead."""

from __future__ import annotations

from pathlib import Path

import pytest

from luanette.settings import FsSettings, Settings, SettingsError, load_settings, parse_settings


def test_no_section_means_no_roots() -> None:
    assert Settings().fs.roots == {}
    assert Settings().fs_roots() == {}
    assert load_settings(None).fs_roots() == {}


def test_roots_absolute_and_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "conf" / "luanette.toml"
    config.parent.mkdir()
    config.write_text(
        """
[fs.roots]
samples = "/srv/samples"
renders = "out/renders"
_scratch2 = "./scratch"
"""
    )
    monkeypatch.chdir(tmp_path)  # not the config's directory
    s = load_settings(config)
    assert s.fs.roots == {"samples": "/srv/samples", "renders": "out/renders", "_scratch2": "./scratch"}
    assert s.fs_roots() == {
        "samples": Path("/srv/samples"),
        "renders": tmp_path / "conf" / "out" / "renders",
        "_scratch2": tmp_path / "conf" / "scratch",
    }
    # relative to the same directory as a trigger's script_file
    assert Path(s.config_dir) == tmp_path / "conf"


def test_without_a_file_relative_roots_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = parse_settings({"fs": {"roots": {"samples": "samples"}}}, source="test")
    assert s.fs_roots() == {"samples": tmp_path / "samples"}
    assert FsSettings(roots={"a": "x"}).resolved(tmp_path / "base") == {"a": tmp_path / "base" / "x"}


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = parse_settings({"fs": {"roots": {"home": "~/music"}}})
    assert s.fs_roots() == {"home": tmp_path / "music"}


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[fs.roots]\n"my-samples" = "/srv"', "f.toml: fs.roots.my-samples: a root name is an identifier"),
        ('[fs.roots]\n"2nd" = "/srv"', "f.toml: fs.roots.2nd: a root name is an identifier"),
        ('[fs.roots]\n"a:b" = "/srv"', "f.toml: fs.roots.a:b: a root name is an identifier"),
        ('[fs.roots]\n"" = "/srv"', "f.toml: fs.roots.: a root name is an identifier"),
        ('[fs.roots]\nsamples = ""', "f.toml: fs.roots.samples: must be a directory path, got an empty string"),
        ('[fs.roots]\nsamples = "/srv/\\u0000x"', "f.toml: fs.roots.samples: must not contain a NUL character"),
        ("[fs.roots]\nsamples = 3", "f.toml: fs.roots: expected str, got int"),
        ('[fs]\nroots = "/srv"', "f.toml: fs.roots: expected a table, got str"),
        ('[fs]\nroot = { a = "/srv" }', "f.toml: fs.root: unknown key (known: roots)"),
        ('fs = "x"', "f.toml: fs: expected a table, got str"),
    ],
)
def test_bad_roots_name_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "f.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value).startswith(str(path.parent / expected)), str(info.value)


def test_the_struct_checks_roots_itself() -> None:
    with pytest.raises(ValueError, match="roots: bad-name: a root name is an identifier"):
        FsSettings(roots={"bad-name": "/srv"})


def test_unknown_sections_list_fs() -> None:
    with pytest.raises(SettingsError, match=r"unknown section \(known: .*fs"):
        parse_settings({"filesystem": {}})
