"""Configuration: frozen dataclasses layered defaults < file < env (KVFLOW_*) < CLI.

This is the one module that reads the environment. Every component keeps its own
frozen dataclass; `load_config` fills it from the layers and `add_config_args`
derives argparse flags (defaults come from the dataclass) so names are checked
when arguments are parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from kvflow.runtime.errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "KVFLOW_"
CONFIG_FILE_ENV = "KVFLOW_CONFIG"


def default_discovery_path() -> str:
    return str(Path(tempfile.gettempdir()) / f"kvflow-{os.getuid()}" / "discovery")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """What a DistributedRuntime needs; one per process."""

    namespace: str = "kvflow"  # processes of one deployment share a namespace
    # Discovery backend: memory (one process), file (one host), etcd (cluster).
    discovery: str = "file"
    discovery_path: str = dataclasses.field(default_factory=default_discovery_path)  # file discovery's dir
    etcd_endpoints: str = "http://127.0.0.1:2379"  # comma-separated etcd URLs (discovery=etcd)
    # Request plane: tcp (default) or nats.
    request_plane: str = "tcp"
    # Event plane: zmq (brokerless, one host or many), inproc (one process), nats.
    event_plane: str = "zmq"
    nats_url: str = "nats://127.0.0.1:4222"  # NATS server (event or request plane nats)
    advertise_host: str = "127.0.0.1"  # address other machines use to reach this process
    bind_host: str = ""  # address the request plane binds (empty: advertise_host)
    tcp_port: int = 0  # request plane port (0 picks a free one)
    lease_ttl: float = 10.0  # seconds a dead process stays in discovery
    file_poll_interval: float = 0.1  # seconds between file-discovery scans
    max_frame_bytes: int = 64 * 1024 * 1024  # largest request-plane message
    graceful_shutdown_timeout: float = 30.0  # seconds in-flight requests get on SIGTERM
    stream_timeout: float = 0.0  # seconds a stream may wait for its next message (0 = forever)
    # System status server (/health, /live, /metrics); None = off.
    system_port: int | None = None
    system_host: str = "127.0.0.1"  # address of the system status server
    # TLS for the TCP request plane (both sides); empty = plain TCP.
    request_plane_tls_cert: str = ""
    request_plane_tls_key: str = ""
    request_plane_tls_ca: str = ""
    # OpenTelemetry traces over OTLP/HTTP (e.g. http://127.0.0.1:4318); empty = off unless
    # the standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables are set.
    otlp_endpoint: str = ""

    def __post_init__(self) -> None:
        from kvflow.runtime.discovery import DISCOVERY  # they import this module
        from kvflow.runtime.events import EVENT_PLANES

        if self.discovery not in DISCOVERY:
            check_choice("discovery", self.discovery, tuple(DISCOVERY.names()))
        check_choice("request_plane", self.request_plane, ("tcp", "nats"))
        if self.event_plane not in EVENT_PLANES:
            check_choice("event_plane", self.event_plane, tuple(EVENT_PLANES.names()))
        if self.lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {self.lease_ttl}")

    @classmethod
    def from_env(cls, **overrides: Any) -> RuntimeConfig:
        return load_config(cls, "runtime", overrides=overrides)


def otel_env_endpoint(env: typing.Mapping[str, str] | None = None) -> str:
    """The OTLP endpoint the standard OTEL_* variables name ("" when none, or disabled)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return ""
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return ""
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


def log_levels_from_env(env: typing.Mapping[str, str] | None = None) -> dict[str, str]:
    """KVFLOW_LOG_LEVEL: "DEBUG" (the root logger) or "kvflow.frontend.timing=DEBUG,name=LEVEL"."""
    raw = (os.environ if env is None else env).get(ENV_PREFIX + "LOG_LEVEL", "")
    levels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, _, level = part.rpartition("=")
        levels[name] = level.upper()
    return levels


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _base_type(tp: Any) -> Any:
    """int | None -> int; str -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(raw: str, tp: Any, name: str) -> Any:
    base = _base_type(tp)
    if raw == "" and base is not str and _base_type(tp) is not tp:
        return None
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base in (int, float, str):
            return base(raw)
        if typing.get_origin(base) in (list, tuple):
            return [s for s in raw.split(",") if s]
    except ValueError as exc:
        raise ConfigError(f"bad value {raw!r} for {name}: expected {base.__name__}") from exc
    return raw


def environ() -> typing.Mapping[str, str]:
    """The process environment (this module is the one that reads it)."""
    return os.environ


def read_config_file(path: str) -> dict[str, Any]:
    """A TOML (`.toml`) or JSON config file as {section: {key: value}}; mistakes are ConfigErrors."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror}); check --config / "
                          f"${CONFIG_FILE_ENV}") from None
    try:
        data = _toml_loads(text) if path.endswith(".toml") else json.loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: "
                          f"{exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold [section] tables")
    return data


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli package (a dependency there)
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("TOML config files on Python 3.10 need tomli: pip install tomli "
                              "(or use a JSON config file)") from None
    return tomllib.loads(text)


def _read_file(path: str, section: str) -> dict[str, Any]:
    got = read_config_file(path).get(section, {})
    if not isinstance(got, dict):
        raise ConfigError(f"config file {path}: section [{section}] must be a table")
    return got


def build_config(cls: type[T], values: typing.Mapping[str, Any]) -> T:
    """`cls(**values)`; a value its checks refuse is a ConfigError (one line for the user)."""
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def load_config(
    cls: type[T],
    section: str,
    *,
    env: typing.Mapping[str, str] | None = None,
    file: str | None = None,
    overrides: typing.Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from defaults < file < KVFLOW_* env < overrides (CLI)."""
    env = os.environ if env is None else env
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    file = file or env.get(CONFIG_FILE_ENV)
    if file:
        for key, val in _read_file(file, section).items():
            if key not in names:
                close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"config file {file}: unknown key {key!r} in [{section}]{hint}")
            values[key] = val
    for name in names:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(raw, hints[name], ENV_PREFIX + name.upper())
    for key, val in (overrides or {}).items():
        if key not in names:
            raise ValueError(f"unknown {cls.__name__} option {key!r}")
        if val is not None:
            values[key] = val
    return build_config(cls, values)


def add_config_args(
    parser: argparse.ArgumentParser, cls: type, *, skip: typing.Iterable[str] = (), prefix: str = "",
) -> None:
    """Add --[prefix-]flag per dataclass field, with help from the field's comment and its default.

    Defaults are None so unset flags don't override the file and env layers of `load_config`.
    """
    hints, helps = _hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        text = f.metadata.get("help") or helps.get(f.name, "")
        shown = _default_of(f)
        help_text = f"{text} (default: {'unset' if shown in (None, '') else shown})".strip()
        base = _base_type(hints[f.name])
        if base is bool:
            parser.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            conv = base if base in (int, float, str) else str
            parser.add_argument(flag, dest=prefix + f.name, type=conv, default=None, help=help_text,
                                metavar=f.name.upper())


def field_help(cls: type) -> dict[str, str]:
    """Each field's help: the comment lines right above it, or its trailing comment."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    block = ""  # a comment above several fields (no blank line between) covers them all
    for i, line in enumerate(lines):
        name, sep, rest = line.strip().partition(":")
        if not line.strip():
            block = ""
        if not sep or name not in names or name in out:
            continue
        above = []
        for prev in reversed(lines[:i]):
            if not prev.strip().startswith("#"):
                break
            above.insert(0, prev.strip().lstrip("#").strip())
        block = " ".join(above) or block
        trailing = rest.split("  # ", 1)[1].strip() if "  # " in rest else ""
        out[name] = trailing or block
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_from_args(cls: type[T], section: str, args: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return load_config(cls, section, overrides=overrides)
