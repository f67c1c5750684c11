"""Tests for cipherhive.runtime.config with the real ServerConfig and NodeConfig dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from cipherhive.node.config import NodeConfig
from cipherhive.runtime import config
from cipherhive.runtime.config import ConfigError
from cipherhive.server.config import MIN_PARTICIPANTS_FLOOR, ServerConfig


def _parser(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, cls)
    return parser


def _server(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    args = _parser(ServerConfig).parse_args(argv or [])
    return config.load(ServerConfig, args, environ={} if environ is None else environ)


def _toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


INSECURE = "[server]\ninsecure = true\n"


# --------------------------------------------------------------------------- precedence


def test_defaults() -> None:
    cfg = _server(["--insecure"])
    assert cfg.min_participants == 3
    assert cfg.listen == "127.0.0.1:7443"
    assert cfg.state_dir == Path("server-state")
    assert cfg.tls_cert is None
    assert cfg.insecure is True


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    path = _toml(
        tmp_path / "server.toml",
        INSECURE
        + "[rounds]\ntimeout_seconds = 100\nmax_rounds = 5\nmin_participants = 4\n"
        + '[log]\nlog_level = "DEBUG"\n',
    )
    environ = {
        "CIPHERHIVE_ROUNDS_MAX_ROUNDS": "7",
        "CIPHERHIVE_ROUNDS_MIN_PARTICIPANTS": "5",
        "CIPHERHIVE_LOG_LOG_JSON": "yes",
    }
    cfg = _server(["--config", str(path), "--min-participants", "6"], environ)
    assert cfg.weight_unit == 1000.0  # default
    assert cfg.timeout_seconds == 100.0  # TOML
    assert isinstance(cfg.timeout_seconds, float)
    assert cfg.log_level == "DEBUG"  # TOML
    assert cfg.max_rounds == 7  # env over TOML
    assert cfg.log_json is True  # env over default
    assert cfg.min_participants == 6  # flag over env over TOML


def test_bool_flag_overrides_env() -> None:
    cfg = _server(["--no-log-json", "--insecure"], {"CIPHERHIVE_LOG_LOG_JSON": "true"})
    assert cfg.log_json is False
    cfg = _server(["--insecure"], {"CIPHERHIVE_LOG_LOG_JSON": "off"})
    assert cfg.log_json is False


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[rounds]\nmax_rounds = 9\n")
    cfg = _server([], {"CIPHERHIVE_CONFIG": str(path)})
    assert cfg.insecure and cfg.max_rounds == 9


def test_node_config_options_table(tmp_path: Path) -> None:
    path = _toml(
        tmp_path / "node.toml",
        '[node]\ninsecure = true\nname = "n1"\n'
        '[trainer]\nplugin = "pkg.mod:Trainer"\n[trainer.options]\nlr = 0.1\nepochs = 2\n',
    )
    args = _parser(NodeConfig).parse_args(["--config", str(path)])
    cfg = config.load(NodeConfig, args, environ={})
    assert cfg.plugin == "pkg.mod:Trainer"
    assert cfg.options == {"lr": 0.1, "epochs": 2}
    assert config.load(NodeConfig, _parser(NodeConfig).parse_args(["--config", str(path)]), environ={}) == cfg


def test_node_config_defaults_are_not_shared() -> None:
    environ = {
        "CIPHERHIVE_TRAINER_PLUGIN": "m:o",
        "CIPHERHIVE_NODE_INSECURE": "1",
        "CIPHERHIVE_NODE_NAME": "n",
    }
    a = config.load(NodeConfig, None, environ=environ)
    b = config.load(NodeConfig, None, environ=environ)
    a.options["x"] = 1
    assert b.options == {}


# --------------------------------------------------------------------------- errors


def test_unknown_section(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[bogus]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[bogus\]") as info:
        _server(["--config", str(path)])
    assert str(path) in str(info.value)
    assert "rounds" in str(info.value)  # lists the known ones
    assert "did you mean" not in str(info.value)  # nothing is close to "bogus"


def test_misspelt_section_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[round]\nmax_rounds = 3\n")
    with pytest.raises(ConfigError) as info:
        _server(["--config", str(path)])
    assert str(info.value).startswith(
        f"{path}: unknown section [round]; did you mean [rounds]? (known sections:"
    )


def test_key_as_a_section_header(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[min_participants]\nx = 3\n")
    with pytest.raises(ConfigError, match=r"'min_participants' is a key of \[rounds\], not a section"):
        _server(["--config", str(path)])


def test_unknown_key(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[rounds]\nmin_participant = 3\n")
    with pytest.raises(ConfigError) as info:
        _server(["--config", str(path)])
    # The file, the section, the key and the closest valid key.
    assert str(info.value) == (
        f"{path}: unknown key 'min_participant' in [rounds]; did you mean 'min_participants'?"
    )


def test_unknown_key_close_to_a_key_of_another_section(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[rounds]\nrequests_per_secnd = 3\n")
    with pytest.raises(ConfigError) as info:
        _server(["--config", str(path)])
    assert str(info.value) == (
        f"{path}: unknown key 'requests_per_secnd' in [rounds]; "
        "did you mean 'requests_per_second' in [limits]?"
    )


def test_unknown_key_with_nothing_close_lists_the_sections_keys(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[log]\nverbosity = 3\n")
    with pytest.raises(ConfigError) as info:
        _server(["--config", str(path)])
    assert str(info.value).startswith(f"{path}: unknown key 'verbosity' in [log] (keys of [log]: ")
    assert "log_level" in str(info.value) and "did you mean" not in str(info.value)


def test_key_in_wrong_section(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "min_participants = 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'min_participants' in \[server\]; it belongs in \[rounds\]"
    ):
        _server(["--config", str(path)])


def test_key_outside_any_section(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", "min_participants = 3\n" + INSECURE)
    with pytest.raises(ConfigError) as info:
        _server(["--config", str(path)])
    assert str(info.value) == f"{path}: 'min_participants' is outside any [section]; it belongs in [rounds]"
    path = _toml(tmp_path / "t.toml", "insecur = true\n" + INSECURE)
    with pytest.raises(ConfigError, match=r"did you mean 'insecure' in \[server\]\?"):
        _server(["--config", str(path)])


def test_node_toml_unknown_key_gets_a_did_you_mean(tmp_path: Path) -> None:
    """The same loader reads node.toml: its keys and sections are the ones suggested."""
    path = _toml(
        tmp_path / "node.toml",
        '[node]\ninsecure = true\nname = "n1"\nmin_particpants = 4\n[trainer]\nplugin = "m:o"\n',
    )
    with pytest.raises(ConfigError) as info:
        config.load(NodeConfig, _parser(NodeConfig).parse_args(["--config", str(path)]), environ={})
    assert (
        str(info.value)
        == f"{path}: unknown key 'min_particpants' in [node]; did you mean 'min_participants'?"
    )
    path = _toml(
        tmp_path / "node2.toml",
        '[node]\ninsecure = true\nname = "n1"\n[trainer]\nplugin = "m:o"\n[trainer.option]\nlr = 0.1\n',
    )
    with pytest.raises(ConfigError, match=r"unknown key 'option' in \[trainer\]; did you mean 'options'\?"):
        config.load(NodeConfig, _parser(NodeConfig).parse_args(["--config", str(path)]), environ={})


def test_missing_and_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        _server(["--config", str(tmp_path / "nope.toml")])
    path = _toml(tmp_path / "bad.toml", "[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        _server(["--config", str(path)])


def test_bad_type_in_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + '[rounds]\nmin_participants = "three"\n')
    with pytest.raises(ConfigError, match=r"\[rounds\] min_participants: .*'three'") as info:
        _server(["--config", str(path)])
    assert str(path) in str(info.value)


def test_bad_whole_number(tmp_path: Path) -> None:
    path = _toml(tmp_path / "s.toml", INSECURE + "[rounds]\nmax_rounds = 2.5\n")
    with pytest.raises(ConfigError, match=r"expected a whole number, got 2\.5"):
        _server(["--config", str(path)])


def test_bad_bool_in_environment() -> None:
    with pytest.raises(ConfigError, match="environment CIPHERHIVE_SERVER_INSECURE: expected true or false"):
        _server([], {"CIPHERHIVE_SERVER_INSECURE": "maybe"})


def test_bad_number_in_flag() -> None:
    with pytest.raises(ConfigError, match="flag --timeout-seconds"):
        _server(["--insecure", "--timeout-seconds", "soon"])


@pytest.mark.parametrize("value", ["1", "0", "-3"])
def test_privacy_floor(value: str) -> None:
    with pytest.raises(ConfigError, match=f"at least {MIN_PARTICIPANTS_FLOOR}") as info:
        _server(["--insecure", "--min-participants", value])
    assert "single member" in str(info.value)
    assert _server(["--insecure", "--min-participants", str(MIN_PARTICIPANTS_FLOOR)]).min_participants == 2


def test_server_tls_files_required() -> None:
    with pytest.raises(ConfigError, match="--tls-cert, --tls-key, --tls-ca") as info:
        _server([])
    assert "--insecure" in str(info.value)
    with pytest.raises(ConfigError, match=r"needs --tls-key, --tls-ca \("):
        _server(["--tls-cert", "s.crt"])
    cfg = _server(["--tls-cert", "s.crt", "--tls-key", "s.key", "--tls-ca", "ca.crt"])
    assert cfg.insecure is False and cfg.tls_ca == Path("ca.crt")


def test_node_tls_files_required() -> None:
    environ = {"CIPHERHIVE_TRAINER_PLUGIN": "m:o"}
    with pytest.raises(ConfigError, match="--tls-cert, --tls-key, --tls-ca"):
        config.load(NodeConfig, None, environ=environ)
    with pytest.raises(ConfigError, match="needs a node --name"):
        config.load(NodeConfig, None, environ={**environ, "CIPHERHIVE_NODE_INSECURE": "true"})
    with pytest.raises(ConfigError, match="no trainer"):
        config.load(NodeConfig, None, environ={"CIPHERHIVE_NODE_INSECURE": "true"})


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = _toml(
        tmp_path / "etc" / "server.toml",
        '[server]\nstate_dir = "state"\npublic_context = "/abs/public.ctx"\n'
        '[tls]\ntls_cert = "certs/server.crt"\ntls_key = "certs/server.key"\ntls_ca = "../ca/ca.crt"\n',
    )
    cfg = _server(["--config", str(path)])
    etc = (tmp_path / "etc").resolve()
    assert cfg.state_dir == etc / "state"
    assert cfg.tls_cert == etc / "certs" / "server.crt"
    assert cfg.tls_ca == etc / ".." / "ca" / "ca.crt"
    assert cfg.public_context == Path("/abs/public.ctx")

    # The same config file given by a relative path resolves the same way.
    relative = Path("..") / "etc" / "server.toml"
    assert _server(["--config", str(relative)]).state_dir == etc / "state"

    # Paths from flags and the environment stay relative to the working directory.
    cfg = _server(["--config", str(path), "--tls-key", "flag.key"], {"CIPHERHIVE_TLS_TLS_CERT": "env.crt"})
    assert cfg.tls_key == Path("flag.key")
    assert cfg.tls_cert == Path("env.crt")
    assert cfg.state_dir == etc / "state"


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _server(["--insecure", "--state-dir", "~/state"])
    assert cfg.state_dir == tmp_path / "state"


# --------------------------------------------------------------------------- flags and reference


@pytest.mark.parametrize("cls", [ServerConfig, NodeConfig])
def test_reference_lists_every_field(cls: type) -> None:
    table = config.reference(cls)
    lines = table.splitlines()
    fields = dataclasses.fields(cls)
    assert len(lines) == 2 + len(fields)
    for field in fields:
        row = next(line for line in lines if f"] {field.name}`" in line)
        assert f"`[{field.metadata['section']}] {field.name}`" in row
        if field.name == "options":  # a table: TOML only, no flag or variable
            assert "TOML only" in row and config.flag_name(field) not in row
            continue
        assert f"`{config.flag_name(field)}`" in row
        assert f"`{config.env_name(field)}`" in row
        assert field.metadata["help"] in row
    expected = (
        "| `[rounds] min_participants` | `--min-participants` | `CIPHERHIVE_ROUNDS_MIN_PARTICIPANTS` | `3` |"
    )
    assert expected in config.reference(ServerConfig)


def test_flags_match_fields() -> None:
    parser = _parser(ServerConfig)
    options = {opt for action in parser._actions for opt in action.option_strings}
    for field in dataclasses.fields(ServerConfig):
        assert config.flag_name(field) in options
    assert "--no-insecure" in options
    args = parser.parse_args([])
    assert all(getattr(args, f.name) is None for f in dataclasses.fields(ServerConfig))


def test_table_fields_have_no_flag() -> None:
    parser = _parser(NodeConfig)
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert "--plugin" in options
    assert "--options" not in options
