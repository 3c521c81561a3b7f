"""Configuration: the YAML schema, its defaults and its validation.

``load_config`` either returns a complete ``Config`` or raises ``ConfigError`` with
every problem found, each as ``path.to.field: what is wrong``. Nothing is started
from a configuration that has a problem.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml

from .errors import ConfigError

APIS = ("openai", "anthropic")
CACHE_BACKENDS = ("memory", "redis")
OPTIONAL_LABELS = ("tenant", "prompt_version")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})
_AUTH_HEADER = "x-llmproxy-key"
_MAX_DEPTH = 32  # a real configuration nests a handful of levels


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class Breaker:
    failures: int = 5
    window: float = 10.0
    reset_after: float = 30.0
    half_open_trials: int = 1


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 2
    backoff: float = 0.25
    max_retry_after: float = 5.0


@dataclass(frozen=True, slots=True)
class Health:
    path: str | None = None  # None: the dialect's model list; "" or off: no probe
    interval: float = 15.0
    timeout: float = 5.0
    degraded_latency: float = 2.0
    error_ratio: float = 0.25  # recent failures above this: DEGRADED
    min_headroom: float = 0.1  # rate-limit remaining/limit below this: DEGRADED
    window: float = 300.0  # how long passive signals count
    # The optional streaming probe (it costs tokens): a model to ask, or None.
    stream_model: str | None = None
    stream_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    api: str = "openai"
    provider: str = "openai"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    breaker: Breaker = field(default_factory=Breaker)
    retries: Retries = field(default_factory=Retries)
    max_concurrency: int = 512
    max_queue: int = 1024
    health: Health = field(default_factory=Health)
    # Ask OpenAI-dialect streams for usage when the client did not; some compatible
    # servers reject stream_options, so an operator can turn it off per upstream.
    inject_stream_usage: bool = True

    @property
    def sets_credentials(self) -> bool:
        return any(k.lower() in _CREDENTIAL_HEADERS for k in self.headers)


@dataclass(frozen=True, slots=True)
class RouteCache:
    """A route's response cache settings; a route without them caches nothing."""

    ttl: float = 3600.0
    max_entry_bytes: int = 1024 * 1024
    # Cache answers to temperature > 0 or n > 1 too (each repeat gets the same one).
    allow_nondeterministic: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    upstream: str
    name: str
    strip_prefix: bool = False
    models: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()
    capture: bool = False
    cache: RouteCache | None = None


@dataclass(frozen=True, slots=True)
class Auth:
    """Inbound authentication for the proxy port: off unless keys are given."""

    keys: tuple[str, ...] = ()
    header: str = _AUTH_HEADER


@dataclass(frozen=True, slots=True)
class Server:
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    admin_listen: tuple[str, int] = ("0.0.0.0", 9090)
    max_body_bytes: int = 16 * 1024 * 1024
    drain_grace: float = 30.0
    # A client must send a whole request (headers and body) within this long of
    # connecting or of its previous response; idle connections close after it.
    client_timeout: float = 75.0
    auth: Auth = field(default_factory=Auth)


@dataclass(frozen=True, slots=True)
class Telemetry:
    enabled: bool = True  # false: no metrics, logs, spans or captures per request
    max_models: int = 50
    log_requests: bool = True
    # Request headers an operator allows as metric labels: tenant, prompt_version.
    labels: tuple[str, ...] = ()
    capture_path: str | None = None
    capture_max_bytes: int = 8192
    redact: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None
    cache_creation_input: float | None = None
    reasoning: float | None = None


@dataclass(frozen=True, slots=True)
class Cache:
    """Where cached responses live, for the routes that enable caching."""

    backend: str = "memory"  # memory | redis
    max_bytes: int = 256 * 1024 * 1024  # the in-memory budget, per process
    redis_url: str | None = None
    timeout: float = 0.1  # per Redis command; slower means served uncached
    backoff: float = 5.0  # after a Redis failure, how long it is left alone


@dataclass(frozen=True, slots=True)
class Config:
    server: Server
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    pricing: Mapping[str, Price] = field(default_factory=dict)
    telemetry: Telemetry = field(default_factory=Telemetry)
    source: str = "<built-in>"
    cache: Cache = field(default_factory=Cache)


DEFAULT_CONFIG: dict[str, Any] = {
    "server": {"listen": "0.0.0.0:8080", "admin_listen": "0.0.0.0:9090"},
    "upstreams": {
        "openai": {"url": "https://api.openai.com", "api": "openai"},
        "anthropic": {"url": "https://api.anthropic.com", "api": "anthropic"},
    },
    "routes": [
        {"prefix": "/anthropic", "upstream": "anthropic", "strip_prefix": True},
        {"prefix": "/v1", "upstream": "openai"},
    ],
}


def parse_duration(value: object) -> float:
    """Seconds from ``250ms``, ``5s``, ``10m``, ``1h`` or a plain number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 5s or 10m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 250ms, 5s or 10m, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be a finite, non-negative number")
    return seconds


def parse_address(value: object) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6) into a host and a port."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected host:port, got {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid port in {value!r}")
    return host, int(port)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a file, ``$LLMPROXY_CONFIG``, or the built-in default."""
    path = path or os.environ.get("LLMPROXY_CONFIG") or None
    if path is None:
        return build_config(DEFAULT_CONFIG)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{path}: nested too deeply"]) from exc
    return build_config(raw, source=str(path))


def build_config(raw: object, source: str = "<built-in>") -> Config:
    """Validate a parsed YAML document; raise ``ConfigError`` listing every problem."""
    if _too_deep(raw):
        raise ConfigError(["(top level): nested too deeply"])
    v = _Validator()
    raw = v.expand_env(raw, "")
    if not isinstance(raw, dict):
        raise ConfigError(
            ["(top level): expected a mapping with server, upstreams, routes"]
        )
    v.unknown(
        raw, "", {"server", "upstreams", "routes", "pricing", "telemetry", "cache"}
    )

    server = v.server(raw.get("server") or {}, "server")
    upstreams = v.upstreams(raw.get("upstreams"), "upstreams")
    routes = v.routes(raw.get("routes"), "routes", upstreams)
    pricing = v.pricing(raw.get("pricing") or {}, "pricing")
    telemetry = v.telemetry(raw.get("telemetry") or {}, "telemetry")
    cache = v.cache(raw.get("cache") or {}, "cache")

    header = server.auth.header
    if server.auth.keys and header in _CREDENTIAL_HEADERS:
        for name, upstream in upstreams.items():
            if not upstream.sets_credentials:
                v.fail(
                    f"upstreams.{name}.headers",
                    f"must set the upstream's credentials when server.auth.header "
                    f"is {header} (the client's {header} is the proxy's key)",
                )
    if telemetry.capture_path is None:
        for i, route in enumerate(routes):
            if route.capture:
                v.fail(f"routes[{i}].capture", "needs telemetry.capture_path")
    if v.problems:
        raise ConfigError(v.problems)
    return Config(server, upstreams, routes, pricing, telemetry, source, cache)


class _Validator:
    """Collects problems while building typed sections, so all are reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '(top level)'}: {message}")

    def expand_env(self, value: object, path: str) -> object:
        if isinstance(value, str):
            return _ENV.sub(lambda m: self._env(m, path), value)
        if isinstance(value, dict):
            return {
                k: self.expand_env(x, _join(path, str(k))) for k, x in value.items()
            }
        if isinstance(value, list):
            return [self.expand_env(x, f"{path}[{i}]") for i, x in enumerate(value)]
        return value

    def _env(self, match: re.Match[str], path: str) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if not value and default is not None:
            return default  # as in the shell, :- also covers a set but empty variable
        if value is None:
            self.fail(path, f"environment variable {name} is not set")
            return ""
        return value

    def unknown(self, raw: Mapping[str, Any], path: str, known: set[str]) -> None:
        for key in raw:
            if key not in known:
                self.fail(
                    _join(path, str(key)),
                    f"unknown key (expected one of: {', '.join(sorted(known))})",
                )

    def mapping(self, raw: object, path: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(path, "expected a mapping")
            return {}
        return raw

    def duration(
        self, raw: Mapping[str, Any], key: str, path: str, default: float
    ) -> float:
        if key not in raw:
            return default
        try:
            return parse_duration(raw[key])
        except ValueError as exc:
            self.fail(_join(path, key), str(exc))
            return default

    def integer(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: str,
        default: int,
        minimum: int = 0,
    ) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(_join(path, key), f"expected an integer, got {value!r}")
            return default
        if value < minimum:
            self.fail(_join(path, key), f"must be at least {minimum}")
            return default
        return value

    def boolean(
        self, raw: Mapping[str, Any], key: str, path: str, default: bool
    ) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(_join(path, key), f"expected true or false, got {value!r}")
            return default
        return value

    def address(
        self, raw: Mapping[str, Any], key: str, path: str, default: tuple[str, int]
    ) -> tuple[str, int]:
        if key not in raw:
            return default
        try:
            return parse_address(raw[key])
        except ValueError as exc:
            self.fail(_join(path, key), str(exc))
            return default

    def server(self, raw: object, path: str) -> Server:
        raw = self.mapping(raw, path)
        self.unknown(
            raw,
            path,
            {
                "listen",
                "admin_listen",
                "max_body_bytes",
                "drain_grace",
                "client_timeout",
                "auth",
            },
        )
        d = Server()
        server = Server(
            listen=self.address(raw, "listen", path, d.listen),
            admin_listen=self.address(raw, "admin_listen", path, d.admin_listen),
            max_body_bytes=self.integer(
                raw, "max_body_bytes", path, d.max_body_bytes, 1
            ),
            drain_grace=self.duration(raw, "drain_grace", path, d.drain_grace),
            client_timeout=self.duration(raw, "client_timeout", path, d.client_timeout),
            auth=self.auth(raw.get("auth"), _join(path, "auth")),
        )
        if server.listen == server.admin_listen and server.listen[1] != 0:
            self.fail(_join(path, "admin_listen"), "must differ from server.listen")
        if server.client_timeout <= 0:
            self.fail(_join(path, "client_timeout"), "must be more than 0")
        return server

    def auth(self, raw: object, path: str) -> Auth:
        raw = self.mapping(raw, path)
        self.unknown(raw, path, {"keys", "keys_file", "header"})
        keys = [k for k in self.names(raw.get("keys"), _join(path, "keys")) if k]
        keys_file = raw.get("keys_file")
        if keys_file is not None:
            try:
                text = Path(str(keys_file)).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self.fail(_join(path, "keys_file"), f"cannot read: {exc}")
            else:
                keys += [
                    line.strip()
                    for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")
                ]
            if not keys:
                self.fail(_join(path, "keys_file"), "holds no key")
        header = raw.get("header", _AUTH_HEADER)
        if (
            not isinstance(header, str)
            or not header
            or any(c in header for c in ":\r\n ")
        ):
            self.fail(_join(path, "header"), "expected a header name")
            header = _AUTH_HEADER
        short = [k for k in keys if len(k) < 16]
        if short:
            self.fail(_join(path, "keys"), "keys must be at least 16 characters")
        return Auth(keys=tuple(dict.fromkeys(keys)), header=header.lower())

    def upstreams(self, raw: object, path: str) -> dict[str, Upstream]:
        if not isinstance(raw, dict) or not raw:
            self.fail(path, "expected a mapping of at least one upstream by name")
            return {}
        return {
            str(name): self.upstream(str(name), spec, _join(path, str(name)))
            for name, spec in raw.items()
        }

    def upstream(self, name: str, raw: object, path: str) -> Upstream:
        raw = self.mapping(raw, path)
        self.unknown(
            raw,
            path,
            {
                "url",
                "api",
                "provider",
                "headers",
                "timeouts",
                "breaker",
                "retries",
                "max_concurrency",
                "max_queue",
                "health",
                "inject_stream_usage",
            },
        )
        url = raw.get("url")
        parts = _split_url(url)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(
                _join(path, "url"), "expected an http:// or https:// URL with a host"
            )
            url = "http://invalid"
        elif parts.query or parts.fragment:
            self.fail(_join(path, "url"), "must not have a query or fragment")
        api = raw.get("api", "openai")
        if api not in APIS:
            self.fail(
                _join(path, "api"), f"expected one of {', '.join(APIS)}, got {api!r}"
            )
            api = "openai"
        provider = raw.get("provider", api)
        if not isinstance(provider, str) or not provider:
            self.fail(_join(path, "provider"), "expected a non-empty string")
            provider = api
        return Upstream(
            name=name,
            url=str(url).rstrip("/"),
            api=api,
            provider=provider,
            headers=self.headers(raw.get("headers"), _join(path, "headers")),
            timeouts=self.timeouts(raw.get("timeouts"), _join(path, "timeouts")),
            breaker=self.breaker(raw.get("breaker"), _join(path, "breaker")),
            retries=self.retries(raw.get("retries"), _join(path, "retries")),
            max_concurrency=self.integer(raw, "max_concurrency", path, 512, 1),
            max_queue=self.integer(raw, "max_queue", path, 1024, 0),
            health=self.health(raw.get("health"), _join(path, "health")),
            inject_stream_usage=self.boolean(raw, "inject_stream_usage", path, True),
        )

    def headers(self, raw: object, path: str) -> dict[str, str]:
        raw = self.mapping(raw, path)
        out: dict[str, str] = {}
        for key, value in raw.items():
            where = _join(path, str(key))
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                self.fail(where, "expected a string value")
            elif any(c in str(key) + str(value) for c in "\r\n\0"):
                self.fail(where, "must not contain CR, LF or NUL")
            else:
                out[str(key)] = str(value)
        return out

    def timeouts(self, raw: object, path: str) -> Timeouts:
        raw = self.mapping(raw, path)
        self.unknown(raw, path, {"connect", "first_byte", "idle", "total"})
        d = Timeouts()
        return Timeouts(
            connect=self.duration(raw, "connect", path, d.connect),
            first_byte=self.duration(raw, "first_byte", path, d.first_byte),
            idle=self.duration(raw, "idle", path, d.idle),
            total=self.duration(raw, "total", path, d.total),
        )

    def breaker(self, raw: object, path: str) -> Breaker:
        raw = self.mapping(raw, path)
        self.unknown(
            raw, path, {"failures", "window", "reset_after", "half_open_trials"}
        )
        d = Breaker()
        return Breaker(
            failures=self.integer(raw, "failures", path, d.failures, 1),
            window=self.duration(raw, "window", path, d.window),
            reset_after=self.duration(raw, "reset_after", path, d.reset_after),
            half_open_trials=self.integer(raw, "half_open_trials", path, 1, 1),
        )

    def retries(self, raw: object, path: str) -> Retries:
        raw = self.mapping(raw, path)
        self.unknown(raw, path, {"attempts", "backoff", "max_retry_after"})
        d = Retries()
        return Retries(
            attempts=self.integer(raw, "attempts", path, d.attempts, 1),
            backoff=self.duration(raw, "backoff", path, d.backoff),
            max_retry_after=self.duration(
                raw, "max_retry_after", path, d.max_retry_after
            ),
        )

    def health(self, raw: object, path: str) -> Health:
        raw = self.mapping(raw, path)
        self.unknown(raw, path, {
            "path", "interval", "timeout", "degraded_latency", "error_ratio",
            "min_headroom", "window", "stream_model", "stream_interval",
        })  # fmt: skip
        probe_path = raw.get("path")
        if probe_path is False or probe_path == "off":
            probe_path = ""
        elif probe_path is not None and (
            not isinstance(probe_path, str) or not probe_path.startswith("/")
        ):
            self.fail(_join(path, "path"), "expected a path starting with /, or off")
            probe_path = None
        model = raw.get("stream_model")
        if model is not None and (not isinstance(model, str) or not model):
            self.fail(_join(path, "stream_model"), "expected a model name")
            model = None
        d = Health()
        timeout = self.duration(raw, "timeout", path, d.timeout)
        if not timeout:
            # No limit would let hung probes pile up, one per interval.
            self.fail(_join(path, "timeout"), "expected a duration above 0")
            timeout = d.timeout
        return Health(
            path=probe_path,
            interval=self.duration(raw, "interval", path, d.interval) or d.interval,
            timeout=timeout,
            degraded_latency=self.duration(
                raw, "degraded_latency", path, d.degraded_latency
            ),
            error_ratio=self.fraction(raw, "error_ratio", path, d.error_ratio),
            min_headroom=self.fraction(raw, "min_headroom", path, d.min_headroom),
            window=self.duration(raw, "window", path, d.window) or d.window,
            stream_model=model,
            stream_interval=self.duration(
                raw, "stream_interval", path, d.stream_interval
            )
            or d.stream_interval,
        )

    def fraction(
        self, raw: Mapping[str, Any], key: str, path: str, default: float
    ) -> float:
        value = raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= 1
        ):
            self.fail(_join(path, key), "expected a number from 0 to 1")
            return default
        return float(value)

    def routes(
        self, raw: object, path: str, upstreams: Mapping[str, Upstream]
    ) -> tuple[Route, ...]:
        if not isinstance(raw, list) or not raw:
            self.fail(path, "expected a list of at least one route")
            return ()
        prefixes = [r.get("prefix") for r in raw if isinstance(r, dict)]
        routes = [
            self.route(spec, f"{path}[{i}]", upstreams, prefixes)
            for i, spec in enumerate(raw)
        ]
        names = [r.name for r in routes if r is not None]
        for i, r in enumerate(routes):
            if r is not None and names.count(r.name) > 1:
                self.fail(f"{path}[{i}].name", f"route name {r.name!r} is used twice")
        return tuple(r for r in routes if r is not None)

    def route(
        self,
        raw: object,
        path: str,
        upstreams: Mapping[str, Upstream],
        prefixes: list[object],
    ) -> Route | None:
        if not isinstance(raw, dict):
            self.fail(path, "expected a mapping with prefix and upstream")
            return None
        self.unknown(
            raw,
            path,
            {
                "prefix",
                "upstream",
                "name",
                "strip_prefix",
                "models",
                "fallbacks",
                "capture",
                "cache",
            },
        )
        prefix = raw.get("prefix")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            self.fail(_join(path, "prefix"), "expected a path starting with /")
            return None
        prefix = prefix.rstrip("/") or "/"
        upstream = raw.get("upstream")
        if not isinstance(upstream, str) or upstream not in upstreams:
            self.fail(_join(path, "upstream"), f"unknown upstream {upstream!r}")
        fallbacks = self.names(raw.get("fallbacks"), _join(path, "fallbacks"))
        primary = upstreams.get(upstream) if isinstance(upstream, str) else None
        for i, fallback in enumerate(fallbacks):
            if fallback not in upstreams:
                self.fail(f"{path}.fallbacks[{i}]", f"unknown upstream {fallback!r}")
            elif primary is not None and upstreams[fallback].api != primary.api:
                # The request would need translating, which the proxy never does.
                self.fail(
                    f"{path}.fallbacks[{i}]",
                    f"upstream {fallback!r} speaks {upstreams[fallback].api}, "
                    f"the route's upstream {primary.api}: it cannot serve the "
                    "request unchanged",
                )
        models = self.names(raw.get("models"), _join(path, "models"))
        name = raw.get("name")
        if name is None:
            shared = sum(
                1
                for p in prefixes
                if isinstance(p, str) and (p.rstrip("/") or "/") == prefix
            )
            name = prefix if shared <= 1 else f"{prefix}:{upstream}"
        elif not isinstance(name, str) or not name:
            self.fail(_join(path, "name"), "expected a non-empty string")
            name = prefix
        return Route(
            prefix=prefix,
            upstream=str(upstream),
            name=name,
            strip_prefix=self.boolean(raw, "strip_prefix", path, False),
            models=tuple(models),
            fallbacks=tuple(fallbacks),
            capture=self.boolean(raw, "capture", path, False),
            cache=self.route_cache(raw.get("cache"), _join(path, "cache")),
        )

    def route_cache(self, raw: object, path: str) -> RouteCache | None:
        """A route's ``cache`` block; a block without ``enabled: false`` turns it on."""
        if raw is None:
            return None
        raw = self.mapping(raw, path)
        self.unknown(
            raw, path, {"enabled", "ttl", "max_entry_bytes", "allow_nondeterministic"}
        )
        d = RouteCache()
        settings = RouteCache(
            ttl=self.duration(raw, "ttl", path, d.ttl),
            max_entry_bytes=self.integer(
                raw, "max_entry_bytes", path, d.max_entry_bytes, 1
            ),
            allow_nondeterministic=self.boolean(
                raw, "allow_nondeterministic", path, False
            ),
        )
        if settings.ttl <= 0:
            self.fail(_join(path, "ttl"), "must be more than 0")
        return settings if self.boolean(raw, "enabled", path, True) else None

    def cache(self, raw: object, path: str) -> Cache:
        raw = self.mapping(raw, path)
        self.unknown(
            raw, path, {"backend", "max_bytes", "redis_url", "timeout", "backoff"}
        )
        d = Cache()
        backend = raw.get("backend", d.backend)
        if backend not in CACHE_BACKENDS:
            self.fail(
                _join(path, "backend"),
                f"expected one of {', '.join(CACHE_BACKENDS)}, got {backend!r}",
            )
            backend = d.backend
        url = raw.get("redis_url")
        if url is not None and (
            not isinstance(url, str)
            or not url.startswith(("redis://", "rediss://", "unix://"))
        ):
            self.fail(
                _join(path, "redis_url"),
                "expected a redis://, rediss:// or unix:// URL",
            )
            url = None
        elif backend == "redis" and url is None:
            self.fail(_join(path, "redis_url"), "required when backend is redis")
        timeout = self.duration(raw, "timeout", path, d.timeout)
        if timeout <= 0:
            self.fail(_join(path, "timeout"), "must be more than 0")
        return Cache(
            backend=backend,
            max_bytes=self.integer(raw, "max_bytes", path, d.max_bytes, 1),
            redis_url=url,
            timeout=timeout,
            backoff=self.duration(raw, "backoff", path, d.backoff),
        )

    def names(self, raw: object, path: str) -> list[str]:
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            self.fail(path, "expected a list of strings")
            return []
        return list(raw)

    def pricing(self, raw: object, path: str) -> dict[str, Price]:
        raw = self.mapping(raw, path)
        out: dict[str, Price] = {}
        for model, spec in raw.items():
            where = _join(path, str(model))
            spec = self.mapping(spec, where)
            self.unknown(
                spec,
                where,
                {
                    "input",
                    "output",
                    "cached_input",
                    "cache_creation_input",
                    "reasoning",
                },
            )
            rates: dict[str, float | None] = {}
            for key in (
                "input",
                "output",
                "cached_input",
                "cache_creation_input",
                "reasoning",
            ):
                value = spec.get(key)
                if value is None:
                    if key in ("input", "output"):
                        self.fail(
                            _join(where, key), "required (USD per million tokens)"
                        )
                    rates[key] = None
                elif (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or value < 0
                ):
                    self.fail(_join(where, key), "expected a non-negative number")
                    rates[key] = None
                else:
                    rates[key] = float(value)
            out[str(model)] = Price(
                input=rates["input"] or 0.0,
                output=rates["output"] or 0.0,
                cached_input=rates["cached_input"],
                cache_creation_input=rates["cache_creation_input"],
                reasoning=rates["reasoning"],
            )
        return out

    def telemetry(self, raw: object, path: str) -> Telemetry:
        raw = self.mapping(raw, path)
        known = {"enabled", "max_models", "log_requests", "labels", "capture_path",
                 "capture_max_bytes", "redact"}  # fmt: skip
        self.unknown(raw, path, known)
        labels = self.names(raw.get("labels"), _join(path, "labels"))
        for i, label in enumerate(labels):
            if label not in OPTIONAL_LABELS:
                self.fail(
                    f"{path}.labels[{i}]",
                    f"expected one of {', '.join(OPTIONAL_LABELS)}, got {label!r}",
                )
        redact = self.names(raw.get("redact"), _join(path, "redact"))
        for i, pattern in enumerate(redact):
            try:
                re.compile(pattern)
            except re.error as exc:
                self.fail(f"{path}.redact[{i}]", f"not a regular expression: {exc}")
        capture_path = raw.get("capture_path")
        if capture_path is not None and not isinstance(capture_path, str):
            self.fail(_join(path, "capture_path"), "expected a file path")
            capture_path = None
        return Telemetry(
            enabled=self.boolean(raw, "enabled", path, True),
            max_models=self.integer(raw, "max_models", path, 50, 1),
            log_requests=self.boolean(raw, "log_requests", path, True),
            labels=tuple(dict.fromkeys(labels)),
            capture_path=capture_path,
            capture_max_bytes=self.integer(raw, "capture_max_bytes", path, 8192, 0),
            redact=tuple(redact),
        )


def _split_url(url: object) -> SplitResult | None:
    """``url`` split, or ``None`` if it is not a URL with a valid port."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return parts


def _too_deep(value: object, depth: int = 0, seen: set[int] | None = None) -> bool:
    """Whether ``value`` nests deeper than any configuration needs to.

    Checked first, so that the recursive walks that follow (and the ``repr`` of
    a value in a problem) cannot exhaust the stack. YAML aliases share one
    object: each is walked once.
    """
    if depth > _MAX_DEPTH:
        return True
    if not isinstance(value, dict | list):
        return False
    seen = set() if seen is None else seen
    if id(value) in seen:
        return False
    seen.add(id(value))
    items = value.values() if isinstance(value, dict) else value
    return any(_too_deep(item, depth + 1, seen) for item in items)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
