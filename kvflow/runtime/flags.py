"""Every flag of every command from four layers: defaults < config file < KVFLOW_* env < command line.

A command builds its argparse parser as usual, wrapping the code that adds each part's
flags in `config_section(parser, "frontend")` (or "worker", "router", "runtime"), then
parses with `parse_layered(parser, argv)`. Nothing else is needed for a new flag: its
config-file key is its long name with underscores (`--http-port` → `http_port` in the
section that added it; a section's own prefix may be left out, `[router] block_size`
for `--router-block-size`) and its variable is `KVFLOW_` + the key in capitals
(`KVFLOW_HTTP_PORT`). An unknown key or section is an error naming the nearest valid one.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvflow.runtime.config import CONFIG_FILE_ENV, ENV_PREFIX, environ, read_config_file
from kvflow.runtime.errors import ConfigError

# Sections a config file may hold; a command reads the ones its parser was built with.
SECTIONS = ("runtime", "frontend", "router", "worker", "planner")
_NOT_LAYERED = ("help", "version", "config")


@dataclass
class FlagSections:
    """Which parser actions belong to which config-file section."""

    actions: dict[str, list[argparse.Action]] = field(default_factory=dict)
    # Keys another variant of this command reads (another engine's flags): skipped, not errors.
    tolerated: dict[str, set[str]] = field(default_factory=dict)

    def lookup(self, section: str) -> dict[str, argparse.Action]:
        """Keys accepted in `section`: each flag's key, and the key without the section prefix."""
        keys: dict[str, argparse.Action] = {}
        for action in self.actions.get(section, []):
            key = flag_key(action)
            keys[key] = action
            if key.startswith(section + "_"):
                keys.setdefault(key[len(section) + 1 :], action)
        return keys


def flag_key(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0][2:].replace("-", "_") if longs else action.dest


def _sections(parser: argparse.ArgumentParser) -> FlagSections:
    found = getattr(parser, "kvflow_sections", None)
    if found is None:
        found = FlagSections()
        parser.kvflow_sections = found  # type: ignore[attr-defined]
    return found


@contextlib.contextmanager
def config_section(parser: argparse.ArgumentParser, name: str) -> Iterator[None]:
    """Flags added to `parser` inside this block are read from the file's [name] section."""
    assert name in SECTIONS, f"add {name!r} to kvflow.runtime.flags.SECTIONS"
    before = len(parser._actions)
    yield
    added = [a for a in parser._actions[before:] if a.option_strings and a.dest not in _NOT_LAYERED]
    _sections(parser).actions.setdefault(name, []).extend(added)


def tolerate_keys(parser: argparse.ArgumentParser, section: str, keys: set[str]) -> None:
    """Let [section] hold `keys` this parser does not read (they belong to a sibling variant)."""
    _sections(parser).tolerated.setdefault(section, set()).update(keys)


def flag_keys(parser: argparse.ArgumentParser) -> set[str]:
    """Every layered key of a parser, in any section."""
    return {flag_key(a) for actions in _sections(parser).actions.values() for a in actions}


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"config file (TOML or JSON) with [section] tables of flag keys; also ${CONFIG_FILE_ENV}. "
        "Precedence: defaults < file < KVFLOW_* variables < flags")


def parse_layered(
    parser: argparse.ArgumentParser, argv: Sequence[str], *, known_only: bool = False,
    env: Mapping[str, str] | None = None,
) -> Any:
    """Parse `argv` over defaults taken from the config file and KVFLOW_* variables.

    Returns the namespace, or (namespace, unknown args) with `known_only`.
    """
    env = environ() if env is None else env
    path = _config_path(argv, env)
    layered = layer_values(_sections(parser), path, env)
    for action, value in layered.items():
        action.default = value
        action.required = False
    if known_only:
        return parser.parse_known_args(list(argv))
    return parser.parse_args(list(argv))


def _config_path(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    return known.config or env.get(CONFIG_FILE_ENV) or None


def layer_values(
    sections: FlagSections, path: str | None, env: Mapping[str, str]
) -> dict[argparse.Action, Any]:
    """Each layered action's value from the file, then the environment (which wins)."""
    values: dict[argparse.Action, Any] = {}
    if path:
        data = read_config_file(path)
        _check_sections(data, path)
        for section in sections.actions:
            values.update(_file_values(sections, section, data.get(section, {}), path))
    for actions in sections.actions.values():
        for action in actions:
            name = ENV_PREFIX + flag_key(action).upper()
            if name in env:
                values[action] = convert(action, env[name], name)
    return values


def _check_sections(data: Mapping[str, Any], path: str) -> None:
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"config file {path}: unknown section [{name}]{_nearest(name, SECTIONS)} "
                              f"(sections: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [{name}] must be a table of key = value")


def _file_values(
    sections: FlagSections, section: str, table: Mapping[str, Any], path: str
) -> dict[argparse.Action, Any]:
    keys = sections.lookup(section)
    out = {}
    for key, value in table.items():
        action = keys.get(key.replace("-", "_"))
        if action is None and key.replace("-", "_") in sections.tolerated.get(section, ()):
            continue
        if action is None:
            raise ConfigError(f"config file {path}: unknown key {key!r} in [{section}]"
                              f"{_nearest(key, list(keys))}")
        out[action] = convert(action, value, f"[{section}] {key} in {path}")
    return out


def _nearest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def convert(action: argparse.Action, raw: Any, where: str) -> Any:
    """A file or environment value as the flag would have parsed it; bad values name `where`."""
    try:
        value = _convert(action, raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value {raw!r} for --{flag_key(action).replace('_', '-')}"
                          f" ({exc})") from None
    choices = action.choices
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}"
                          f"{_nearest(str(value), [str(c) for c in choices])}")
    return value


def _convert(action: argparse.Action, raw: Any) -> Any:
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                           argparse._StoreFalseAction)):
        value = _bool(raw)
        return (not value) if isinstance(action, argparse._StoreFalseAction) else value
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s]
        return [action.type(x) if action.type else x for x in items]
    if raw is None or (raw == "" and action.type not in (None, str)):
        return None
    if action.type is not None and not isinstance(raw, bool):
        return action.type(raw if isinstance(raw, str) else str(raw))
    return raw


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")
