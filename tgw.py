#!/usr/bin/env python3
"""tgw: a local LLM gateway in one file, standard library only.

One endpoint that speaks the OpenAI, Anthropic and Gemini APIs, translates between them,
routes each model to its provider and records every token in a sqlite ledger.

    python3 tgw.py serve              # 127.0.0.1:8081, the offline `loopback` model by default
    python3 tgw.py usage              # token and cost totals from the ledger
    python3 tgw.py logs               # the most recent requests
    python3 tgw.py config list        # effective configuration (secrets masked)

Sections, in the order data flows:
    1. Utilities                 small helpers shared by everything below
    2. Config                    defaults < gateway.ini < TOKLIGENCE_* env < command-line flags
    3. HTTP/1.1 wire             server connections, upstream client with pool, SSE parsing
    4. Canonical model           the hub every protocol converts to and from
    5. Codecs                    one per wire protocol (OpenAI Chat, ...)
    6. Providers                 upstream endpoints, auth headers, the loopback model
    7. Router                    model routes, aliases, work modes
    8. Ledger                    sqlite schema, background writer, usage queries, prices
    9. Gateway                   endpoints wired into the pipeline, errors per protocol
   10. CLI                       serve, config, usage, logs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import sqlite3
import ssl
import struct
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

__version__ = "0.1.0"
log = logging.getLogger("tgw")

# ======================================================================================
# 1. Utilities
# ======================================================================================

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj) -> bytes:
    """Compact JSON as UTF-8 bytes (the one JSON encoder on the wire)."""
    return _dumps(obj).encode()


_ID_PREFIX = os.urandom(6).hex()
_id_counter = iter(range(1, 1 << 62))


def new_id(prefix: str) -> str:
    """Unique within this process and across restarts; cheap (no syscall per id)."""
    return f"{prefix}{_ID_PREFIX}{next(_id_counter):012x}"


def mask_secret(value: str) -> str:
    """Show enough of a secret to recognise it, never enough to use it."""
    if not value:
        return ""
    if len(value) <= 8:
        return "****"
    return value[:4] + "…" + value[-2:]


def key_fingerprint(key: str) -> str:
    """A stable, non-reversible id for an API key (what the ledger stores)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else ""


def glob_match(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())


def estimate_tokens(obj) -> int:
    """The one token estimator: about four characters a token over every string sent,
    a fixed cost for images, and a small overhead per message and tool."""
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            if item.get("type") in ("image", "image_url", "input_image") or "inlineData" in item:
                total += 6400  # ~1600 tokens, what a typical screenshot costs
                continue
            total += 12  # per-object structure (role markers, tool wrappers)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif item is not None:
            total += len(str(item))
    return max(1, math.ceil(total / 4))


class GatewayError(Exception):
    """The one error type. `kind` uses Anthropic's vocabulary (the richest of the four);
    each codec renders it in its own envelope."""

    KIND_BY_STATUS = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        408: "timeout_error",
        413: "request_too_large",
        422: "invalid_request_error",
        429: "rate_limit_error",
        499: "client_closed",
        500: "api_error",
        502: "api_error",
        503: "overloaded_error",
        504: "timeout_error",
        529: "overloaded_error",
    }

    def __init__(self, status: int, message: str, kind: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or self.KIND_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error")


def parse_json_body(body: bytes) -> dict:
    """Parse a request body that must be a JSON object, with errors a client can act on."""
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8") from None
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}")
    return data


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "an object"}


def field_of(body: dict, name: str, kind, required: bool = False, default=None):
    """Read one field and check its JSON type, naming the field when it is wrong."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        wanted = " or ".join(_TYPE_NAMES.get(k, "a number") for k in kinds)
        raise bad_request(f"'{name}' must be {wanted}, got {json.dumps(value)[:60]}")
    return value


# ======================================================================================
# 2. Config
# ======================================================================================
#
# Every key, its default and its meaning live in CONFIG_KEYS; gateway.ini.example is
# written from the same list. Named providers for OpenAI-compatible servers live in
# [provider.NAME] sections (or TOKLIGENCE_PROVIDER_<NAME>_<KEY> variables).

DEFAULT_ROUTES = (
    "gpt*=>openai,o1*=>openai,o3*=>openai,o4*=>openai,chatgpt*=>openai,text-embedding*=>openai,"
    "claude*=>anthropic,gemini*=>gemini,loopback*=>loopback"
)

# key: (default, kind, meaning). kind is "str", "secret", "int", "float", "bool", or a tuple of choices.
CONFIG_KEYS: dict[str, tuple] = {
    "host": ("127.0.0.1", "str", "address to listen on; a non-loopback address needs api_keys or allow_public_bind"),
    "facade_port": (8081, "int", "port of the gateway's one endpoint (all protocols)"),
    "allow_public_bind": (False, "bool", "allow a non-loopback host while no api_keys are set"),
    "api_keys": ("", "secret", "comma-separated keys clients must present; empty = no client auth"),
    "work_mode": ("auto", ("auto", "passthrough", "translation"), "auto: the model's provider decides"),
    "model_provider_routes": (DEFAULT_ROUTES, "str", "ordered model=>provider globs, first match wins"),
    "model_aliases": ("", "str", "alias=>model pairs, e.g. fast=>gpt-4o-mini,smart=>claude-sonnet-4-5"),
    "openai_api_key": ("", "secret", "key for the openai provider"),
    "openai_base_url": ("https://api.openai.com/v1", "url", "base URL of the openai provider"),
    "openai_org": ("", "str", "OpenAI-Organization header, if any"),
    "anthropic_api_key": ("", "secret", "key for the anthropic provider"),
    "anthropic_base_url": ("https://api.anthropic.com", "url", "base URL of the anthropic provider"),
    "anthropic_version": ("2023-06-01", "str", "anthropic-version sent when the client sent none"),
    "gemini_api_key": ("", "secret", "key for the gemini provider"),
    "gemini_base_url": ("https://generativelanguage.googleapis.com", "url", "base URL of the gemini provider"),
    "reasoning_models": (
        "o1*,o3*,o4*,gpt-5*,gpt-oss*,*deepseek-r*,*qwq*,*thinking*",
        "str",
        "globs of OpenAI-protocol models that accept reasoning_effort",
    ),
    "ledger_path": ("~/.tokligence/ledger.db", "str", "sqlite ledger file (WAL); ':memory:' keeps nothing"),
    "ledger_queue_size": (10000, "int", "rows buffered before requests wait for the ledger writer"),
    "log_level": ("info", ("debug", "info", "warning", "error"), "stderr log level"),
    "max_body_bytes": (33554432, "int", "largest request body accepted (413 above)"),
    "max_header_bytes": (65536, "int", "largest request head accepted (431 above)"),
    "max_request_line": (16384, "int", "longest request line accepted (414 above)"),
    "header_timeout": (30.0, "float", "seconds a client may take to send a request head"),
    "idle_timeout": (900.0, "float", "seconds an idle keep-alive connection stays open (>= 120)"),
    "upstream_connect_timeout": (15.0, "float", "seconds to connect to an upstream"),
    "upstream_read_timeout": (600.0, "float", "seconds an upstream may stay silent before 504"),
    "upstream_retries": (2, "int", "retries on 429/5xx/connect errors before any byte reached the client"),
    "stream_keepalive": (15.0, "float", "seconds of upstream silence before the gateway pings a stream"),
    "shutdown_grace": (30.0, "float", "seconds in-flight requests get to finish on SIGINT/SIGTERM"),
}

PROVIDER_KEYS = ("type", "base_url", "api_key", "models", "api_version", "headers")
PROVIDER_TYPES = ("openai", "azure", "anthropic", "gemini")


class ConfigError(Exception):
    pass


def find_config_file(explicit: str | None) -> Path | None:
    """--config, then TOKLIGENCE_CONFIG, then ./gateway.ini, then ~/.tokligence/gateway.ini."""
    for candidate in (explicit, os.environ.get("TOKLIGENCE_CONFIG")):
        if candidate:
            return Path(candidate).expanduser()
    for path in (Path("gateway.ini"), Path("~/.tokligence/gateway.ini").expanduser()):
        if path.is_file():
            return path
    return None


def read_ini(path: Path) -> dict[str, dict[str, str]]:
    """A forgiving ini reader: keys before any section (or in [gateway]) are top level."""
    sections: dict[str, dict[str, str]] = {"": {}}
    current = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            current = "" if current == "gateway" else current
            sections.setdefault(current, {})
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected 'key = value', got {raw!r}")
        key, value = line.split("=", 1)
        sections[current][key.strip().lower()] = value.strip()
    return sections


def convert_value(key: str, raw, kind, source: str):
    if not isinstance(raw, str):
        return raw
    where = f"{key} (from {source})"
    if isinstance(kind, tuple):
        value = raw.strip().lower()
        if value not in kind:
            raise ConfigError(f"invalid value {raw!r} for {where}: expected one of {', '.join(kind)}")
        return value
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"invalid value {raw!r} for {where}: expected a whole number") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"invalid value {raw!r} for {where}: expected a number of seconds") from None
    if kind == "bool":
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"invalid value {raw!r} for {where}: expected true or false")
    if kind == "url" and raw and not raw.startswith(("http://", "https://")):
        raise ConfigError(f"invalid value {raw!r} for {where}: expected an http:// or https:// URL")
    return raw.strip()


def parse_pairs(text: str, key: str) -> list[tuple[str, str]]:
    """'a=>b, c=>d' as ordered pairs (routes, aliases)."""
    pairs = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if "=>" not in item:
            raise ConfigError(f"invalid entry {item!r} in {key}: expected 'pattern=>target'")
        left, right = (s.strip() for s in item.split("=>", 1))
        if not left or not right:
            raise ConfigError(f"invalid entry {item!r} in {key}: both sides of '=>' are needed")
        pairs.append((left, right))
    return pairs


@dataclass
class ProviderConfig:
    name: str
    type: str
    base_url: str
    api_key: str = ""
    models: list = field(default_factory=list)
    api_version: str = ""
    headers: dict = field(default_factory=dict)


@dataclass
class Config:
    values: dict
    providers: dict  # name -> ProviderConfig (named [provider.*] sections)
    prices: dict  # model glob -> (input, output, cached input) USD per million tokens
    path: Path | None = None
    sources: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def load_config(config_path: str | None = None, overrides: dict | None = None, env=None) -> Config:
    """Defaults < gateway.ini < TOKLIGENCE_* environment < overrides (command-line flags)."""
    env = os.environ if env is None else env
    values = {key: spec[0] for key, spec in CONFIG_KEYS.items()}
    sources = {key: "default" for key in CONFIG_KEYS}
    path = find_config_file(config_path)
    sections: dict[str, dict[str, str]] = {"": {}}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        sections = read_ini(path)
    layers = [(sections.get("", {}), str(path))]
    layers.append(({k[11:].lower(): v for k, v in env.items() if k.startswith("TOKLIGENCE_")}, "environment"))
    layers.append(({k: v for k, v in (overrides or {}).items() if v is not None}, "command line"))
    for layer, source in layers:
        for key, raw in layer.items():
            if key not in CONFIG_KEYS:
                if source != "environment" and not key.startswith("provider_"):
                    log.warning("unknown config key %r in %s (ignored)", key, source)
                continue
            values[key] = convert_value(key, raw, CONFIG_KEYS[key][1], source)
            sources[key] = source
    validate_config(values)
    providers = load_named_providers(sections, env)
    prices = dict(DEFAULT_PRICES)
    for glob_, raw in sections.get("prices", {}).items():
        prices[glob_] = parse_price(glob_, raw)
    return Config(values, providers, prices, path, sources)


def validate_config(values: dict) -> None:
    for key in ("facade_port",):
        if not 0 <= values[key] <= 65535:
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected a port from 0 to 65535")
    for key in ("max_body_bytes", "max_header_bytes", "max_request_line", "ledger_queue_size"):
        if values[key] <= 0:
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected a positive number")
    if values["idle_timeout"] < 120:
        raise ConfigError(f"invalid value {values['idle_timeout']!r} for idle_timeout: expected at least 120 seconds")
    for key in ("model_provider_routes", "model_aliases"):
        parse_pairs(values[key], key)


def load_named_providers(sections: dict, env) -> dict[str, ProviderConfig]:
    raw: dict[str, dict[str, str]] = {}
    for section, items in sections.items():
        if section.startswith("provider."):
            raw[section[9:].strip().lower()] = dict(items)
    for key, value in env.items():
        m = re.fullmatch(r"TOKLIGENCE_PROVIDER_([A-Za-z0-9]+)_([A-Za-z_]+)", key)
        if m and m.group(2).lower() in PROVIDER_KEYS:
            raw.setdefault(m.group(1).lower(), {})[m.group(2).lower()] = value
    providers = {}
    for name, items in raw.items():
        where = f"[provider.{name}]"
        if name in ("openai", "anthropic", "gemini", "loopback"):
            raise ConfigError(f"{where}: '{name}' is a built-in provider; configure it with {name}_* keys")
        unknown = set(items) - set(PROVIDER_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; accepted: {', '.join(PROVIDER_KEYS)}"
            )
        ptype = convert_value("type", items.get("type", "openai"), PROVIDER_TYPES, where)
        base_url = convert_value("base_url", items.get("base_url", ""), "url", where)
        if not base_url:
            raise ConfigError(f"{where}: base_url is required (for example http://127.0.0.1:11434/v1 for Ollama)")
        headers = parse_header_list(items.get("headers", ""), where)
        models = [m.strip() for m in items.get("models", "").split(",") if m.strip()]
        providers[name] = ProviderConfig(
            name, ptype, base_url.rstrip("/"), items.get("api_key", ""), models, items.get("api_version", ""), headers
        )
    return providers


def parse_header_list(text: str, where: str) -> dict[str, str]:
    """'Name: value; Other: value' as a dict (extra headers for a named provider)."""
    headers = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"{where}: invalid header {item!r}; expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


SECRET_KEYS = {k for k, spec in CONFIG_KEYS.items() if spec[1] == "secret"}


def config_set_in_file(path: Path, key: str, value: str) -> None:
    """Set one top-level key in an ini file, keeping comments, order and other sections."""
    key = key.lower()
    if key not in CONFIG_KEYS:
        raise ConfigError(f"unknown key {key!r}; run 'tgw config list' for the accepted keys")
    convert_value(key, value, CONFIG_KEYS[key][1], "tgw config set")
    lines = path.read_text().splitlines() if path.exists() else []
    in_top = True
    first_section = len(lines)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            in_top = stripped[1:-1].strip() == "gateway"
            if not in_top:
                first_section = min(first_section, i)
            continue
        if in_top and "=" in stripped and stripped[0] not in "#;" and stripped.split("=", 1)[0].strip().lower() == key:
            lines[i] = f"{key} = {value}"
            break
    else:
        lines.insert(first_section, f"{key} = {value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_example_config() -> str:
    """The text of gateway.ini.example, from CONFIG_KEYS (one source of truth)."""
    out = [
        "# tgw / Tokligence Gateway configuration. Every key, its default, one line of meaning.",
        "# Precedence: defaults < this file < TOKLIGENCE_<KEY> environment < command-line flags.",
        "",
    ]
    for key, (default, kind, meaning) in CONFIG_KEYS.items():
        choices = f" ({'|'.join(kind)})" if isinstance(kind, tuple) else ""
        shown = str(default).lower() if isinstance(default, bool) else default
        out += [f"# {meaning}{choices}", f"{key} = {shown}", ""]
    out += [
        "# Named OpenAI-compatible (or azure/anthropic/gemini) providers: one section each.",
        "# type = openai|azure|anthropic|gemini, base_url, api_key, models (globs routed here),",
        "# api_version (azure), headers (Name: value). Env: TOKLIGENCE_PROVIDER_<NAME>_<KEY>.",
        "# [provider.ollama]",
        "# type = openai",
        "# base_url = http://127.0.0.1:11434/v1",
        "# models = llama3*,qwen*",
        "",
        "# Prices in USD per million tokens: input, output[, cached input]. Globs, first match wins.",
        "# [prices]",
        "# gpt-4o-mini* = 0.15, 0.60, 0.075",
        "",
    ]
    return "\n".join(out)


# ======================================================================================
# 3. HTTP/1.1 wire: server connections, upstream client, SSE
# ======================================================================================

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 413: "Content Too Large", 414: "URI Too Long", 422: "Unprocessable Content",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 499: "Client Closed Request",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported", 529: "Overloaded",
}  # fmt: skip


class Watchdog:
    """One periodic sweep enforces every timeout (idle and slow clients, silent upstreams),
    so the hot path only stores a deadline instead of arming a timer per request."""

    def __init__(self, tick: float = 1.0):
        self.tick = tick
        self.entries: set = set()  # objects with .deadline (0 = none) and .expire()
        self.handle = None

    def start(self) -> None:
        if self.handle is None:
            self.handle = asyncio.get_running_loop().call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for entry in list(self.entries):
            if entry.deadline and now >= entry.deadline:
                try:
                    entry.expire(now)
                except Exception:  # one bad entry must not stop every other timeout
                    log.exception("watchdog: expiring %r failed", entry)
                    self.entries.discard(entry)
        self.handle = asyncio.get_running_loop().call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class HttpError(Exception):
    """A protocol violation by the client: answered, then the connection is closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str
    path: str
    query: dict
    version: str
    headers: dict
    body: bytes = b""
    keep_alive: bool = True


def parse_request_head(head: bytes, max_request_line: int) -> HttpRequest:
    head = head.lstrip(b"\r\n")  # tolerate stray CRLFs between pipelined requests
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > max_request_line:
        raise HttpError(414, f"request line longer than {max_request_line} bytes")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    method, target, version = parts[0].decode("ascii"), parts[1].decode("latin-1"), parts[2]
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HttpError(505, f"HTTP version {version.decode('latin-1')} is not supported")
        raise HttpError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise HttpError(400, f"malformed header line {line[:60].decode('latin-1')!r}")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if target.startswith(("http://", "https://")):  # absolute-form: keep only the path
        target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
    if not target.startswith("/") and target != "*":
        raise HttpError(400, f"malformed request target {target[:60]!r}")
    path, _, query_text = target.partition("?")
    query = dict(parse_qsl(query_text, keep_blank_values=True)) if query_text else {}
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection
    return HttpRequest(method, target, path, query, version.decode("ascii"), headers, b"", keep_alive)


async def read_request_body(reader: asyncio.StreamReader, writer, request: HttpRequest, max_body: int) -> bytes:
    headers = request.headers
    te = headers.get("transfer-encoding", "").lower()
    cl = headers.get("content-length")
    if te and cl is not None:
        raise HttpError(400, "both Transfer-Encoding and Content-Length were sent")
    if te and te != "chunked":
        raise HttpError(501, f"Transfer-Encoding {te!r} is not supported")
    length = 0
    if cl is not None:
        if not cl.isdigit():
            raise HttpError(400, f"invalid Content-Length {cl[:40]!r}")
        length = int(cl)
        if length > max_body:
            raise HttpError(413, f"request body of {length} bytes exceeds the limit of {max_body} bytes")
    if headers.get("expect", "").lower() == "100-continue" and (length or te):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if te == "chunked":
        return await read_chunked_body(reader, max_body)
    return await reader.readexactly(length) if length else b""


async def read_chunked_body(reader: asyncio.StreamReader, max_body: int) -> bytes:
    chunks = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(400, f"malformed chunk size {size_text[:20]!r}") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        total += size
        if total > max_body:
            raise HttpError(413, f"request body exceeds the limit of {max_body} bytes")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "chunk not terminated by CRLF")


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Exchange:
    """One request's response side: a whole body, or a chunked stream (SSE)."""

    __slots__ = ("writer", "request", "request_id", "status", "started", "finished", "streaming", "bytes_out",
                 "first_byte_at", "last_write_at", "close_after")  # fmt: skip

    def __init__(self, writer: asyncio.StreamWriter, request: HttpRequest, request_id: str):
        self.writer = writer
        self.request = request
        self.request_id = request_id
        self.status = 0
        self.started = False
        self.finished = False
        self.streaming = False
        self.bytes_out = 0
        self.first_byte_at = 0.0
        self.last_write_at = 0.0
        self.close_after = not request.keep_alive

    def _base_headers(self, content_type: str) -> list[tuple[str, str]]:
        headers = [("Content-Type", content_type), ("x-request-id", self.request_id)]
        if self.close_after:
            headers.append(("Connection", "close"))
        return headers

    def send(self, status: int, body: bytes, content_type: str = "application/json", extra=()) -> None:
        headers = self._base_headers(content_type)
        headers.extend(extra)
        headers.append(("Content-Length", str(len(body))))
        self.status = status
        self.started = self.finished = True
        payload = response_head(status, headers)
        if self.request.method != "HEAD":
            payload += body
        self.first_byte_at = self.last_write_at = time.monotonic()
        self.writer.write(payload)

    def send_json(self, status: int, obj, extra=()) -> None:
        self.send(status, dumps(obj), "application/json", extra)

    def start_stream(self, status: int = 200, content_type: str = "text/event-stream", extra=()) -> None:
        headers = self._base_headers(content_type)
        headers += [("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked"), ("X-Accel-Buffering", "no")]
        headers.extend(extra)
        self.status = status
        self.started = self.streaming = True
        self.writer.write(response_head(status, headers))
        self.last_write_at = time.monotonic()

    def write(self, data: bytes) -> None:
        """Write one chunk of a stream (no await: callers drain at their own pace)."""
        if not data:
            return
        if not self.first_byte_at:
            self.first_byte_at = time.monotonic()
        self.last_write_at = time.monotonic()
        self.bytes_out += len(data)
        self.writer.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def drain(self) -> None:
        if self.writer.transport.is_closing():
            raise ConnectionResetError("client went away")
        await self.writer.drain()

    def end_stream(self) -> None:
        if self.streaming and not self.finished:
            self.writer.write(b"0\r\n\r\n")
        self.finished = True


class ClientProtocol(asyncio.StreamReaderProtocol):
    """StreamReaderProtocol that cancels the in-flight request when the client goes away,
    so the upstream request is cancelled too and its connection is not reused."""

    def __init__(self, server: HttpServer):
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader(limit=server.cfg.max_header_bytes, loop=loop)
        super().__init__(self.reader, server.serve_connection, loop=loop)
        self.handler_task: asyncio.Task | None = None
        self.busy = False
        self.writer_ref: asyncio.StreamWriter | None = None
        self.server = server
        self.deadline = 0.0  # while waiting for a request head: when to give up on the client
        self.partial_since = 0.0

    def expire(self, now: float) -> None:
        """Idle too long: close. Halfway through a head for too long (slow client): 408."""
        transport = self._transport
        if self.busy or transport is None:
            return
        if self.reader._buffer:  # noqa: SLF001 - the only way to see a partial head
            self.partial_since = self.partial_since or now
            if now - self.partial_since < self.server.cfg.header_timeout:
                self.deadline = now + self.server.watchdog.tick
                return
            transport.write(response_head(408, [("Content-Length", "0"), ("Connection", "close")]))
        self.deadline = 0.0
        transport.close()

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if self.busy and self.handler_task is not None and not self.handler_task.done():
            self.handler_task.cancel()


class HttpServer:
    """HTTP/1.1 on asyncio streams: keep-alive, pipelining (answered in order), chunked and
    Content-Length bodies, 100-continue, HEAD, limits and timeouts, graceful drain."""

    def __init__(self, cfg: Config, handler):
        self.cfg = cfg
        self.handler = handler  # async (request, exchange) -> None
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[ClientProtocol] = set()
        self.draining = False
        self.watchdog = Watchdog(min(1.0, cfg.header_timeout / 4))

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ClientProtocol(self), host, port, backlog=1024)
        self.watchdog.start()
        return self.server.sockets[0].getsockname()[1]

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol: ClientProtocol = writer.transport.get_protocol()
        protocol.handler_task = asyncio.current_task()
        protocol.writer_ref = writer
        self.connections.add(protocol)
        self.watchdog.entries.add(protocol)
        transport = writer.transport
        limit = self.cfg.header_timeout
        try:
            while not self.draining:
                protocol.deadline = time.monotonic() + limit
                protocol.partial_since = 0.0
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        self._reject(writer, HttpError(400, "connection closed in the middle of a request head"))
                    return
                except asyncio.LimitOverrunError:
                    self._reject(writer, HttpError(431, f"request head exceeds {self.cfg.max_header_bytes} bytes"))
                    return
                limit = self.cfg.idle_timeout
                protocol.deadline = 0.0
                protocol.busy = True
                try:
                    request = parse_request_head(head, self.cfg.max_request_line)
                    request.body = await read_request_body(reader, writer, request, self.cfg.max_body_bytes)
                except HttpError as exc:
                    self._reject(writer, exc)
                    return
                except asyncio.IncompleteReadError:
                    return  # the body was cut short: the client is gone, nobody to answer
                except asyncio.LimitOverrunError:
                    self._reject(writer, HttpError(400, "malformed chunked body"))
                    return
                exchange = Exchange(writer, request, new_id("req_"))
                if self.draining:
                    exchange.close_after = True
                await self.handler(request, exchange)
                protocol.busy = False
                if exchange.close_after or transport.is_closing():
                    break
                if writer.transport.get_write_buffer_size() > 65536:
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            protocol.busy = False
            self.connections.discard(protocol)
            self.watchdog.entries.discard(protocol)
            if not transport.is_closing():
                try:
                    await writer.drain()
                except (ConnectionError, asyncio.CancelledError):
                    pass
                transport.close()

    def _reject(self, writer, exc: HttpError) -> None:
        body = dumps({"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.status}})
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")]
        writer.write(response_head(exc.status, headers) + body)

    async def drain_and_close(self, grace: float) -> None:
        """Stop accepting, close idle keep-alive connections, let busy ones finish."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + grace
        while True:
            for protocol in list(self.connections):
                if not protocol.busy and protocol.writer_ref is not None:
                    protocol.writer_ref.transport.close()
            if not any(p.busy for p in self.connections) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for protocol in list(self.connections):
            if protocol.handler_task is not None:
                protocol.handler_task.cancel()
        self.watchdog.stop()


# ---- upstream client ------------------------------------------------------------------


@dataclass(slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    proxy: tuple | None  # (host, port, proxy-authorization or "") when a proxy applies

    @property
    def key(self):
        return (self.scheme, self.host, self.port, self.proxy)


def proxy_for(scheme: str, host: str, env=os.environ) -> tuple | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as curl and requests read them."""
    raw = env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY") or ""
    if not raw:
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))):
            return None
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    auth = ""
    if parts.username:
        creds = f"{parts.username}:{parts.password or ''}".encode()
        auth = "Basic " + base64.b64encode(creds).decode()
    return (parts.hostname, parts.port or 80, auth)


class UpstreamResponse:
    """An upstream answer whose body is read as it arrives (de-chunked, gunzipped)."""

    def __init__(self, pool, origin, reader, writer, status, headers, method):
        self.pool = pool
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.status = status
        self.headers = headers
        self.done = method == "HEAD" or status in (204, 304)
        self.reusable = "close" not in headers.get("connection", "").lower()
        te = headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        cl = headers.get("content-length")
        self.remaining = int(cl) if cl and cl.isdigit() and not self.chunked else -1
        if self.remaining == 0:
            self.done = True
        if not self.chunked and self.remaining < 0:
            self.reusable = False  # body runs until the connection closes
        encoding = headers.get("content-encoding", "").lower()
        self.decoder = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        if encoding == "deflate":
            self.decoder = zlib.decompressobj()
        self.deadline = 0.0
        self.timed_out = False

    def expire(self, now: float) -> None:
        self.timed_out = True
        self.deadline = 0.0
        if self.writer is not None:
            self.writer.transport.abort()

    async def _raw_chunk(self) -> bytes:
        reader = self.reader
        if self.chunked:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                self.done = True
                return b""
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            return data
        if self.remaining >= 0:
            data = await reader.read(min(self.remaining, 262144))
            if not data:
                raise asyncio.IncompleteReadError(b"", self.remaining)
            self.remaining -= len(data)
            if self.remaining == 0:
                self.done = True
            return data
        data = await reader.read(262144)
        if not data:
            self.done = True
        return data

    async def next_chunk(self) -> bytes:
        """The next piece of the decoded body; b"" at the end."""
        watchdog = self.pool.watchdog
        while not self.done:
            self.deadline = time.monotonic() + self.pool.read_timeout
            watchdog.entries.add(self)
            try:
                data = await self._raw_chunk()
            except asyncio.CancelledError:
                self.close()  # the client went away: never reuse a half-read connection
                raise
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, OSError) as exc:
                self.close()
                if self.timed_out:
                    raise GatewayError(
                        504, f"upstream {self.origin.host} sent nothing for {self.pool.read_timeout:g} s"
                    ) from None
                raise GatewayError(
                    502, f"upstream {self.origin.host} closed the connection mid-response ({type(exc).__name__})"
                ) from None
            finally:
                watchdog.entries.discard(self)
            if self.decoder is not None and data:
                try:
                    data = self.decoder.decompress(data)
                except zlib.error:
                    self.close()
                    raise GatewayError(502, f"upstream {self.origin.host} sent a corrupt compressed body") from None
            if data:
                return data
        self.release()
        return b""

    async def read(self, limit: int = 256 * 1024 * 1024) -> bytes:
        parts = []
        total = 0
        while data := await self.next_chunk():
            parts.append(data)
            total += len(data)
            if total > limit:
                self.close()
                raise GatewayError(502, "upstream response too large")
        return b"".join(parts)

    def release(self):
        """Give the connection back to the pool if the body was read to its end."""
        if self.writer is None:
            return
        if self.done and self.reusable and not self.writer.transport.is_closing():
            self.pool.idle.setdefault(self.origin.key, []).append((self.reader, self.writer))
        else:
            self.writer.transport.abort()
        self.writer = None

    def close(self):
        """Abandon the response: the connection is closed, never reused."""
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = None


class UpstreamPool:
    """One HTTP/1.1 client: keep-alive pool per origin, TLS with verification, proxies."""

    def __init__(self, connect_timeout: float = 15.0, read_timeout: float = 600.0):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.watchdog = Watchdog(min(1.0, read_timeout / 4))
        self.idle: dict[tuple, list] = {}
        self._ssl: ssl.SSLContext | None = None
        self._origins: dict[str, tuple[Origin, str]] = {}

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def parse_url(self, url: str) -> tuple[Origin, str]:
        cached = self._origins.get(url)
        if cached is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise GatewayError(500, f"invalid upstream URL {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            origin = Origin(parts.scheme, parts.hostname, port, proxy_for(parts.scheme, parts.hostname))
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            cached = (origin, target)
            if len(self._origins) < 4096:
                self._origins[url] = cached
        return cached

    async def _connect(self, origin: Origin):
        host, port = (origin.proxy[0], origin.proxy[1]) if origin.proxy else (origin.host, origin.port)
        tls = origin.scheme == "https"
        try:
            if origin.proxy and tls:
                if not hasattr(asyncio.StreamWriter, "start_tls"):
                    raise GatewayError(502, "HTTPS through a proxy needs Python 3.11 or newer")
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
                await self._tunnel(origin, reader, writer)
                await asyncio.wait_for(
                    writer.start_tls(self.ssl_context, server_hostname=origin.host), self.connect_timeout
                )
            else:
                ctx = self.ssl_context if tls else None
                opener = asyncio.open_connection(host, port, ssl=ctx, server_hostname=origin.host if tls else None)
                reader, writer = await asyncio.wait_for(opener, self.connect_timeout)
        except asyncio.TimeoutError:
            raise GatewayError(504, f"timed out connecting to upstream {origin.host}:{origin.port}") from None
        except ssl.SSLCertVerificationError as exc:
            raise GatewayError(
                502, f"TLS certificate of upstream {origin.host} failed verification: {exc.verify_message}"
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise GatewayError(502, f"cannot connect to upstream {origin.host}:{origin.port}: {reason}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _tunnel(self, origin: Origin, reader, writer):
        auth = f"Proxy-Authorization: {origin.proxy[2]}\r\n" if origin.proxy[2] else ""
        writer.write(
            f"CONNECT {origin.host}:{origin.port} HTTP/1.1\r\nHost: {origin.host}:{origin.port}\r\n{auth}\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.connect_timeout)
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
        if status != b"200":
            writer.close()
            first_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            raise OSError(0, f"proxy refused CONNECT ({first_line})")

    async def request(self, method: str, url: str, headers: dict, body: bytes = b"") -> UpstreamResponse:
        origin, target = self.parse_url(url)
        if origin.proxy and origin.scheme == "http":
            target = url  # absolute-form through a plain HTTP proxy
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {origin.host}" + ("" if origin.port in (80, 443) else f":{origin.port}"),
        ]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if origin.proxy and origin.scheme == "http" and origin.proxy[2]:
            lines.append(f"Proxy-Authorization: {origin.proxy[2]}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        idle = self.idle.get(origin.key)
        while idle:
            reader, writer = idle.pop()
            if writer.transport.is_closing() or reader.at_eof():
                writer.transport.abort()
                continue
            try:
                return await self._exchange(origin, reader, writer, payload, method)
            except _StaleConnection:
                continue  # the server closed a pooled connection; nothing was processed
        reader, writer = await self._connect(origin)
        try:
            return await self._exchange(origin, reader, writer, payload, method)
        except _StaleConnection:
            raise GatewayError(502, f"upstream {origin.host} closed the connection without answering") from None

    async def _exchange(self, origin, reader, writer, payload, method) -> UpstreamResponse:
        self.watchdog.start()
        waiting = _HeadWait(writer, time.monotonic() + self.read_timeout)
        timed_out = waiting.fired
        self.watchdog.entries.add(waiting)
        try:
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            writer.transport.abort()
            if timed_out:
                raise GatewayError(
                    504, f"upstream {origin.host} did not answer within {self.read_timeout:g} s"
                ) from None
            if not exc.partial:
                raise _StaleConnection() from None
            raise GatewayError(502, f"upstream {origin.host} sent a truncated response head") from None
        except (ConnectionError, OSError):
            writer.transport.abort()
            if timed_out:
                raise GatewayError(
                    504, f"upstream {origin.host} did not answer within {self.read_timeout:g} s"
                ) from None
            raise _StaleConnection() from None
        except asyncio.LimitOverrunError:
            writer.transport.abort()
            raise GatewayError(502, f"upstream {origin.host} sent an oversized response head") from None
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            self.watchdog.entries.discard(waiting)
        lines = head.split(b"\r\n")
        status_parts = lines[0].split(b" ", 2)
        if len(status_parts) < 2 or not status_parts[1].isdigit() or not status_parts[0].startswith(b"HTTP/1."):
            writer.transport.abort()
            raise GatewayError(502, f"upstream {origin.host} did not speak HTTP/1.1")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name:
                headers[name.decode("latin-1").strip().lower()] = value.strip().decode("latin-1")
        status = int(status_parts[1])
        if status == 100:  # an interim answer; the real head follows
            return await self._exchange(origin, reader, writer, b"", method)
        return UpstreamResponse(self, origin, reader, writer, status, headers, method)

    def close(self):
        self.watchdog.stop()
        for conns in self.idle.values():
            for _, writer in conns:
                writer.transport.abort()
        self.idle.clear()


class _StaleConnection(Exception):
    pass


class _HeadWait:
    """A request waiting for its response head: aborted by the watchdog when too late."""

    __slots__ = ("writer", "deadline", "fired")

    def __init__(self, writer, deadline: float):
        self.writer = writer
        self.deadline = deadline
        self.fired: list = []

    def expire(self, now: float) -> None:
        self.fired.append(now)
        self.deadline = 0.0
        self.writer.transport.abort()


# ---- SSE ------------------------------------------------------------------------------


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str
    raw: bytes  # the event's bytes, normalised to LF, with its blank-line terminator


class SSEParser:
    """Incremental text/event-stream parser: CRLF/CR/LF line ends, multi-line data,
    comments, and UTF-8 characters split across network reads (bytes are decoded only
    once an event is complete)."""

    __slots__ = ("buffer",)

    def __init__(self):
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self.buffer + chunk
        if b"\r" in buffer:
            hold_cr = buffer.endswith(b"\r")  # may be the first half of a CRLF
            if hold_cr:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if hold_cr:
                buffer += b"\r"
        events = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            raw = buffer[start : end + 2]
            start = end + 2
            event = self._parse(raw)
            if event is not None:
                events.append(event)
        self.buffer = buffer[start:]
        return events

    def finish(self) -> list[SSEEvent]:
        """An unterminated last event, if the stream ended without a blank line."""
        rest, self.buffer = self.buffer.rstrip(b"\r"), b""
        if rest.strip():
            event = self._parse(rest + b"\n\n")
            return [event] if event is not None else []
        return []

    @staticmethod
    def _parse(raw: bytes) -> SSEEvent | None:
        name = ""
        data = []
        for line in raw.decode("utf-8", "replace").split("\n"):
            if not line or line[0] == ":":
                continue
            key, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if key == "data":
                data.append(value)
            elif key == "event":
                name = value
        if not data and not name:
            return None
        return SSEEvent(name, "\n".join(data), raw)


def sse_event(name: str | None, obj) -> bytes:
    data = obj if isinstance(obj, (bytes, str)) else dumps(obj)
    if isinstance(data, str):
        data = data.encode()
    return (b"event: %b\ndata: %b\n\n" % (name.encode(), data)) if name else b"data: %b\n\n" % data


# ======================================================================================
# 4. Canonical model: the hub every codec converts to and from
# ======================================================================================
#
# Parts (message content), one dataclass with a `type` tag:
#   text               text
#   image              media_type + data (base64) or url
#   tool_call          id, name, arguments (JSON text, or free text for kind="custom" tools)
#   tool_result        id (of the call), content (list of text/image Parts), is_error
#   thinking           text, signature (kept byte-exact for Anthropic)
#   redacted_thinking  data (opaque, kept byte-exact for Anthropic)
# `extra` holds fields only the source protocol knows (cache_control, Responses item ids...).
#
# Stream events ("indexed content blocks"):
#   MessageStart(id, model, usage)           exactly once, first
#   BlockStart(index, part)                  part.type is text/thinking/redacted_thinking/tool_call,
#                                            with id/name set and no content yet
#   BlockDelta(index, kind, value)           kind: "text" | "arguments" | "thinking" | "signature"
#   BlockStop(index)                         every started block stops
#   MessageDelta(stop_reason, stop_sequence, usage)   once, after the last block
#   MessageStop()                            last
#   StreamError(error)                       may come at any point; ends the stream
# A non-streaming Response is the same events folded (fold_events); unfold_response goes
# the other way, so every codec writes its stream encoder once.
#
# Stop reasons (canonical): end_turn, max_tokens, stop_sequence, tool_use, refusal,
# content_filter, pause_turn, error.  Each codec maps them in STOP_REASONS, one table.
# Usage: input_tokens counts every prompt token, cached ones included (OpenAI's meaning);
# Anthropic's codec adds/subtracts its cache fields at the border.


@dataclass(slots=True)
class Part:
    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    arguments: str = ""
    media_type: str = ""
    data: str = ""
    url: str = ""
    content: list | None = None
    is_error: bool = False
    signature: str = ""
    extra: dict | None = None


@dataclass(slots=True)
class Message:
    role: str  # "user" | "assistant" | "system" (a system/developer turn mid-conversation)
    parts: list


@dataclass(slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)
    kind: str = "function"  # "function" (JSON arguments) | "custom" (free-form text input)
    extra: dict | None = None


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(slots=True)
class Request:
    model: str
    messages: list
    system: list = field(default_factory=list)  # text Parts
    tools: list = field(default_factory=list)
    tool_choice: str = ""  # "" (unset) | auto | none | required | tool
    tool_name: str = ""  # with tool_choice == "tool"
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # the streaming client asked for a usage chunk
    reasoning_effort: str = ""  # "" | minimal | low | medium | high
    thinking: str = ""  # "" (unset) | enabled | adaptive | disabled
    thinking_budget: int | None = None
    response_format: dict | None = None  # {"type": "json_object"} | {"type": "json_schema", ...}
    metadata: dict = field(default_factory=dict)
    user: str = ""
    raw: dict = field(default_factory=dict)  # the body as the client sent it
    protocol: str = ""


@dataclass(slots=True)
class Response:
    id: str
    model: str
    parts: list
    stop_reason: str = "end_turn"
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)
    created: int = 0
    extra: dict | None = None  # fields only one protocol knows


@dataclass(slots=True)
class MessageStart:
    id: str
    model: str
    usage: Usage | None = None


@dataclass(slots=True)
class BlockStart:
    index: int
    part: Part


@dataclass(slots=True)
class BlockDelta:
    index: int
    kind: str  # text | arguments | thinking | signature
    value: str


@dataclass(slots=True)
class BlockStop:
    index: int


@dataclass(slots=True)
class MessageDelta:
    stop_reason: str
    stop_sequence: str | None = None
    usage: Usage | None = None


@dataclass(slots=True)
class MessageStop:
    pass


@dataclass(slots=True)
class StreamError:
    error: GatewayError


def fold_events(events) -> Response:
    """Fold a canonical event stream into one Response (what a JSON answer holds)."""
    response = Response(id="", model="", parts=[])
    blocks: dict[int, Part] = {}
    for ev in events:
        if isinstance(ev, MessageStart):
            response.id, response.model = ev.id, ev.model
            if ev.usage is not None:
                response.usage = ev.usage
        elif isinstance(ev, BlockStart):
            part = Part(ev.part.type, ev.part.text, ev.part.id, ev.part.name, ev.part.arguments, data=ev.part.data,
                        signature=ev.part.signature, extra=ev.part.extra)  # fmt: skip
            blocks[ev.index] = part
            response.parts.append(part)
        elif isinstance(ev, BlockDelta):
            part = blocks[ev.index]
            if ev.kind == "arguments":
                part.arguments += ev.value
            elif ev.kind == "signature":
                part.signature += ev.value
            else:
                part.text += ev.value
        elif isinstance(ev, MessageDelta):
            response.stop_reason, response.stop_sequence = ev.stop_reason, ev.stop_sequence
            if ev.usage is not None:
                response.usage = ev.usage
        elif isinstance(ev, StreamError):
            raise ev.error
    return response


def unfold_response(response: Response) -> list:
    """The event stream that carries a whole Response (for streaming a JSON answer)."""
    events: list = [MessageStart(response.id, response.model, Usage(input_tokens=response.usage.input_tokens))]
    for index, part in enumerate(response.parts):
        head = Part(part.type, id=part.id, name=part.name, data=part.data, extra=part.extra)
        events.append(BlockStart(index, head))
        if part.type == "tool_call":
            if part.arguments:
                events.append(BlockDelta(index, "arguments", part.arguments))
        elif part.type in ("text", "thinking") and part.text:
            events.append(BlockDelta(index, part.type if part.type == "thinking" else "text", part.text))
        if part.signature:
            events.append(BlockDelta(index, "signature", part.signature))
        events.append(BlockStop(index))
    events.append(MessageDelta(response.stop_reason, response.stop_sequence, response.usage))
    events.append(MessageStop())
    return events


def text_of(parts) -> str:
    return "".join(p.text for p in parts if p.type == "text")


def system_text(req: Request) -> str:
    return "\n\n".join(p.text for p in req.system if p.text)


# Stop reasons: canonical -> each protocol, and back. The one place they are mapped.
STOP_REASONS = {
    "openai": {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
               "refusal": "content_filter", "content_filter": "content_filter", "pause_turn": "stop", "error": "stop"},
    "anthropic": {"end_turn": "end_turn", "stop_sequence": "stop_sequence", "max_tokens": "max_tokens",
                  "tool_use": "tool_use", "refusal": "refusal", "content_filter": "refusal",
                  "pause_turn": "pause_turn", "error": "end_turn"},
    "gemini": {"end_turn": "STOP", "stop_sequence": "STOP", "max_tokens": "MAX_TOKENS", "tool_use": "STOP",
               "refusal": "SAFETY", "content_filter": "SAFETY", "pause_turn": "STOP", "error": "OTHER"},
}  # fmt: skip
STOP_REASONS_IN = {
    "openai": {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
               "content_filter": "content_filter"},
    "anthropic": {v: v for v in ("end_turn", "stop_sequence", "max_tokens", "tool_use", "refusal", "pause_turn")}
    | {"model_context_window_exceeded": "max_tokens"},
    "gemini": {"STOP": "end_turn", "MAX_TOKENS": "max_tokens", "SAFETY": "content_filter", "RECITATION": "content_filter",
               "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
               "IMAGE_SAFETY": "content_filter", "MALFORMED_FUNCTION_CALL": "end_turn", "OTHER": "end_turn"},
}  # fmt: skip


def stop_reason_out(protocol: str, reason: str) -> str:
    return STOP_REASONS[protocol].get(reason, STOP_REASONS[protocol]["end_turn"])


def stop_reason_in(protocol: str, reason) -> str:
    return STOP_REASONS_IN[protocol].get(reason or "", "end_turn")


def parse_data_uri(url: str) -> tuple[str, str] | None:
    """'data:image/png;base64,AAAA' -> ('image/png', 'AAAA')."""
    if not url.startswith("data:"):
        return None
    meta, _, data = url[5:].partition(",")
    media_type = meta.split(";", 1)[0] or "application/octet-stream"
    return media_type, data


def image_url_of(part: Part) -> str:
    return part.url or f"data:{part.media_type or 'image/png'};base64,{part.data}"


# ======================================================================================
# 5. Codecs
# ======================================================================================
#
# A codec converts one wire protocol to and from the canonical model:
#   decode_request(body) -> Request          encode_request(req, model, provider) -> body
#   decode_response(body) -> Response        encode_response(resp, req) -> body
#   stream_decoder() .feed(SSEEvent) -> [events], .finish() -> [events]
#   stream_encoder(req) .encode(event) -> bytes
#   encode_error(GatewayError) -> body       decode_error(status, body) -> GatewayError
#   keepalive: bytes a stream may carry while the upstream is silent


class Codec:
    name = ""
    keepalive = b": keep-alive\n\n"

    def usage_of(self, body: bytes) -> Usage:
        """Usage from a passthrough JSON answer (for the ledger)."""
        try:
            return self.decode_response(json.loads(body)).usage
        except (ValueError, AttributeError, TypeError, KeyError, IndexError, GatewayError):
            return Usage()

    def encode_stream_error(self, err: GatewayError) -> bytes:
        return b"data: " + dumps(self.encode_error(err)) + b"\n\n"

    def decode_error(self, status: int, body: bytes) -> GatewayError:
        """Read an upstream's error, in any of the four envelopes, keeping its status."""
        message, kind = "", ""
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, list) and data:  # Gemini sometimes wraps the error in a list
            data = data[0]
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict):
                message = str(err.get("message") or "")
                kind = err.get("type") if isinstance(err.get("type"), str) else ""
            elif isinstance(err, str):
                message = err
        if not message:
            message = body[:500].decode("utf-8", "replace").strip() or f"upstream answered HTTP {status}"
        if kind not in GatewayError.KIND_BY_STATUS.values():
            kind = ""
        return GatewayError(status, message, kind)


def json_object_arguments(text: str) -> dict:
    """Tool arguments as an object, for protocols that carry them as JSON (never lost)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"_raw_arguments": text}
    return value if isinstance(value, dict) else {"_value": value}


# ---- OpenAI Chat Completions -----------------------------------------------------------

OPENAI_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error", "authentication_error": "authentication_error",
    "permission_error": "permission_error", "not_found_error": "not_found_error",
    "request_too_large": "invalid_request_error", "rate_limit_error": "rate_limit_error",
    "api_error": "server_error", "overloaded_error": "server_error", "timeout_error": "timeout_error",
    "client_closed": "invalid_request_error",
}  # fmt: skip


class OpenAIChatCodec(Codec):
    name = "openai"

    # -- requests
    def decode_request(self, body: dict) -> Request:
        model = field_of(body, "model", str, required=True)
        raw_messages = field_of(body, "messages", list, required=True)
        req = Request(model=model, messages=[], raw=body, protocol="openai")
        for i, msg in enumerate(raw_messages):
            if not isinstance(msg, dict):
                raise bad_request(f"messages[{i}] must be an object")
            self._decode_message(req, msg, i)
        for i, tool in enumerate(field_of(body, "tools", list, default=[])):
            req.tools.append(self._decode_tool(tool, i))
        choice = body.get("tool_choice")
        if isinstance(choice, str):
            req.tool_choice = choice
        elif isinstance(choice, dict):
            req.tool_choice = "tool"
            req.tool_name = (choice.get("function") or choice.get("custom") or {}).get("name", "")
        req.parallel_tool_calls = field_of(body, "parallel_tool_calls", bool)
        req.max_tokens = field_of(body, "max_completion_tokens", int) or field_of(body, "max_tokens", int)
        req.temperature = field_of(body, "temperature", float)
        req.top_p = field_of(body, "top_p", float)
        stop = body.get("stop")
        req.stop = [stop] if isinstance(stop, str) else list(stop or [])
        req.stream = bool(field_of(body, "stream", bool, default=False))
        req.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        req.reasoning_effort = field_of(body, "reasoning_effort", str, default="")
        req.response_format = field_of(body, "response_format", dict)
        req.metadata = field_of(body, "metadata", dict, default={})
        req.user = field_of(body, "user", str, default="")
        return req

    def _decode_message(self, req: Request, msg: dict, i: int) -> None:
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            parts = self._decode_content(content, i)
            if not req.messages:
                req.system.extend(parts)
            else:
                req.messages.append(Message("system", parts))
        elif role == "user":
            req.messages.append(Message("user", self._decode_content(content, i)))
        elif role == "assistant":
            parts = []
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                parts.append(Part("thinking", text=reasoning))
            parts.extend(self._decode_content(content, i))
            if msg.get("refusal"):
                parts.append(Part("text", text=msg["refusal"]))
            for call in msg.get("tool_calls") or []:
                fn = call.get("function") or call.get("custom") or {}
                args = fn.get("arguments", fn.get("input", ""))
                parts.append(Part("tool_call", id=call.get("id") or new_id("call_"), name=fn.get("name", ""),
                                  arguments=args if isinstance(args, str) else json.dumps(args)))  # fmt: skip
            if msg.get("function_call"):  # legacy single function call
                fn = msg["function_call"]
                parts.append(
                    Part("tool_call", id=fn.get("name", ""), name=fn.get("name", ""), arguments=fn.get("arguments", ""))
                )
            req.messages.append(Message("assistant", parts))
        elif role in ("tool", "function"):
            call_id = msg.get("tool_call_id") or msg.get("name") or ""
            result = Part("tool_result", id=call_id, content=self._decode_content(content, i))
            last = req.messages[-1] if req.messages else None
            if (
                last is not None
                and last.role == "user"
                and last.parts
                and all(p.type == "tool_result" for p in last.parts)
            ):
                last.parts.append(result)  # consecutive results form one user turn
            else:
                req.messages.append(Message("user", [result]))
        else:
            raise bad_request(f"messages[{i}].role must be system, developer, user, assistant or tool, got {role!r}")

    def _decode_content(self, content, i: int) -> list:
        if content is None:
            return []
        if isinstance(content, str):
            return [Part("text", text=content)] if content else []
        if not isinstance(content, list):
            raise bad_request(f"messages[{i}].content must be a string or an array of content parts")
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.append(Part("text", text=item))
                continue
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                parts.append(Part("text", text=item.get("text") or ""))
            elif kind == "image_url":
                image = item.get("image_url")
                url = image.get("url", "") if isinstance(image, dict) else str(image or "")
                data_uri = parse_data_uri(url)
                if data_uri:
                    parts.append(Part("image", media_type=data_uri[0], data=data_uri[1]))
                else:
                    parts.append(Part("image", url=url))
            elif kind == "refusal":
                parts.append(Part("text", text=item.get("refusal") or ""))
            elif kind in ("input_audio", "file"):
                parts.append(Part("text", text=f"[{kind} content omitted by the gateway]"))
            else:
                raise bad_request(f"messages[{i}].content has an unknown part type {kind!r}")
        return parts

    def _decode_tool(self, tool, i: int) -> Tool:
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{i}] must be an object")
        if tool.get("type") == "custom":
            spec = tool.get("custom") or {}
            return Tool(spec.get("name", ""), spec.get("description", ""), {}, "custom", {"format": spec.get("format")})
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        extra = {"strict": fn["strict"]} if "strict" in fn else None
        return Tool(fn["name"], fn.get("description", ""), fn.get("parameters") or {}, "function", extra)

    def encode_request(self, req: Request, model: str, provider=None) -> dict:
        messages = []
        if req.system:
            messages.append({"role": "system", "content": system_text(req)})
        for msg in req.messages:
            messages.extend(self._encode_message(msg))
        body: dict = {"model": model, "messages": messages}
        if req.tools:
            body["tools"] = [self._encode_tool(t) for t in req.tools]
            if req.tool_choice:
                body["tool_choice"] = (
                    {"type": "function", "function": {"name": req.tool_name}}
                    if req.tool_choice == "tool"
                    else req.tool_choice
                )
            if req.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = req.parallel_tool_calls
        if req.max_tokens is not None:
            body["max_completion_tokens" if provider is None or provider.official else "max_tokens"] = req.max_tokens
        for name in ("temperature", "top_p"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.stop:
            body["stop"] = req.stop[:4]
        effort = req.reasoning_effort or effort_from_budget(req.thinking_budget)
        if effort and (provider is None or provider.accepts_reasoning(model)):
            body["reasoning_effort"] = effort
        if req.response_format:
            body["response_format"] = req.response_format
        if req.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}  # the ledger needs real numbers
        return body

    def _encode_message(self, msg: Message) -> list:
        if msg.role == "system":
            return [{"role": "system", "content": text_of(msg.parts)}]
        if msg.role == "assistant":
            text = text_of(msg.parts)
            calls = [
                {"id": p.id, "type": "function", "function": {"name": p.name, "arguments": p.arguments or "{}"}}
                for p in msg.parts
                if p.type == "tool_call"
            ]
            out = {"role": "assistant", "content": text or None}
            if calls:
                out["tool_calls"] = calls
            elif not text:
                out["content"] = ""
            return [out]
        out = []
        for p in msg.parts:
            if p.type == "tool_result":
                out.append({"role": "tool", "tool_call_id": p.id, "content": tool_result_text(p)})
        rest = [p for p in msg.parts if p.type in ("text", "image")]
        if rest:
            out.append({"role": "user", "content": self._encode_content(rest)})
        return out

    def _encode_content(self, parts):
        if all(p.type == "text" for p in parts):
            return "".join(p.text for p in parts) if len(parts) == 1 else "\n\n".join(p.text for p in parts)
        return [
            {"type": "text", "text": p.text}
            if p.type == "text"
            else {"type": "image_url", "image_url": {"url": image_url_of(p)}}
            for p in parts
        ]

    def _encode_tool(self, tool: Tool) -> dict:
        fn = {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters or {"type": "object", "properties": {}},
        }
        if tool.extra and "strict" in tool.extra:
            fn["strict"] = tool.extra["strict"]
        return {"type": "function", "function": fn}

    # -- responses
    def decode_response(self, body: dict) -> Response:
        choices = body.get("choices") or [{}]
        choice = choices[0] or {}
        message = choice.get("message") or {}
        parts = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            parts.append(Part("thinking", text=reasoning))
        if message.get("content"):
            parts.append(Part("text", text=message["content"]))
        if message.get("refusal"):
            parts.append(Part("text", text=message["refusal"]))
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            parts.append(
                Part(
                    "tool_call",
                    id=call.get("id") or new_id("call_"),
                    name=fn.get("name", ""),
                    arguments=fn.get("arguments") or "",
                )
            )
        stop = stop_reason_in("openai", choice.get("finish_reason"))
        if message.get("refusal") and not message.get("content"):
            stop = "refusal"
        if stop == "end_turn" and any(p.type == "tool_call" for p in parts):
            stop = "tool_use"
        return Response(body.get("id") or new_id("chatcmpl-"), body.get("model", ""), parts, stop,
                        usage=self.decode_usage(body.get("usage")), created=body.get("created") or 0)  # fmt: skip

    @staticmethod
    def decode_usage(usage) -> Usage:
        if not isinstance(usage, dict):
            return Usage()
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return Usage(
            input_tokens=usage.get("prompt_tokens") or 0,
            output_tokens=usage.get("completion_tokens") or 0,
            cached_tokens=prompt_details.get("cached_tokens") or 0,
            reasoning_tokens=completion_details.get("reasoning_tokens") or 0,
        )

    @staticmethod
    def encode_usage(usage: Usage) -> dict:
        return {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        }

    def encode_response(self, resp: Response, req: Request) -> dict:
        text = text_of(resp.parts)
        calls = [
            {"id": p.id, "type": "function", "function": {"name": p.name, "arguments": p.arguments or "{}"}}
            for p in resp.parts
            if p.type == "tool_call"
        ]
        message: dict = {"role": "assistant", "content": text or None, "refusal": None}
        thinking = "".join(p.text for p in resp.parts if p.type == "thinking")
        if thinking:
            message["reasoning_content"] = thinking
        if calls:
            message["tool_calls"] = calls
        finish = self._finish_reason(resp.stop_reason, bool(calls))
        return {
            "id": openai_id(resp.id),
            "object": "chat.completion",
            "created": resp.created or int(time.time()),
            "model": req.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": self.encode_usage(resp.usage),
        }

    @staticmethod
    def _finish_reason(stop_reason: str, has_calls: bool) -> str:
        if has_calls and stop_reason in ("tool_use", "end_turn"):
            return "tool_calls"  # a turn with text and tools must make the client run the tools
        finish = stop_reason_out("openai", stop_reason)
        return "stop" if finish == "tool_calls" and not has_calls else finish

    def usage_of(self, body: bytes) -> Usage:
        try:
            data = json.loads(body)
        except ValueError:
            return Usage()
        return self.decode_usage(data.get("usage") if isinstance(data, dict) else None)

    # -- streams
    def stream_decoder(self):
        return OpenAIStreamDecoder()

    def stream_encoder(self, req: Request):
        return OpenAIStreamEncoder(req)

    # -- errors
    def encode_error(self, err: GatewayError) -> dict:
        kind = OPENAI_ERROR_TYPES.get(err.kind, "server_error" if err.status >= 500 else "invalid_request_error")
        return {"error": {"message": err.message, "type": kind, "param": None, "code": err.kind}}


def openai_id(resp_id: str) -> str:
    return resp_id if resp_id.startswith("chatcmpl") else "chatcmpl-" + (resp_id.split("_", 1)[-1] or uuid.uuid4().hex)


def tool_result_text(part: Part) -> str:
    """A tool result as plain text, keeping the error marker protocols without is_error need."""
    text = "\n".join(p.text if p.type == "text" else "[image]" for p in part.content or [])
    return f"[tool error] {text}" if part.is_error else text


def effort_from_budget(budget: int | None) -> str:
    if not budget:
        return ""
    return "low" if budget <= 2048 else "medium" if budget <= 16384 else "high"


class OpenAIStreamDecoder:
    """chat.completion.chunk events -> canonical events. One block open at a time: text,
    reasoning and each tool_calls[i] get their own index, in the order they appear."""

    def __init__(self):
        self.started = False
        self.next_index = 0
        self.open_index: int | None = None
        self.open_key = None
        self.tool_index: dict[int, int] = {}
        self.stop_reason = ""
        self.usage: Usage | None = None
        self.finished = False

    def _switch(self, key, part: Part, out: list) -> int:
        if self.open_key == key:
            return self.open_index
        if self.open_index is not None:
            out.append(BlockStop(self.open_index))
        self.open_index, self.open_key = self.next_index, key
        self.next_index += 1
        out.append(BlockStart(self.open_index, part))
        return self.open_index

    def feed(self, event: SSEEvent) -> list:
        data = event.data
        if data == "[DONE]":
            return self.finish()
        try:
            chunk = json.loads(data)
        except ValueError:
            return [StreamError(GatewayError(502, f"upstream sent malformed stream data: {data[:120]!r}"))]
        out: list = []
        if "error" in chunk and not chunk.get("choices"):
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            self.finished = True
            return [
                StreamError(GatewayError(502, err.get("message") or "upstream stream error", err.get("type") or ""))
            ]
        if not self.started:
            self.started = True
            out.append(MessageStart(chunk.get("id") or new_id("chatcmpl-"), chunk.get("model", "")))
        if chunk.get("usage"):
            self.usage = OpenAIChatCodec.decode_usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                index = self._switch("thinking", Part("thinking"), out)
                out.append(BlockDelta(index, "thinking", reasoning))
            content = delta.get("content") or delta.get("refusal")
            if content:
                index = self._switch("text", Part("text"), out)
                out.append(BlockDelta(index, "text", content))
            for call in delta.get("tool_calls") or []:
                position = call.get("index", 0)
                fn = call.get("function") or {}
                key = ("tool", position)
                if position not in self.tool_index or self.open_key != key:
                    if position in self.tool_index:  # late fragment of an earlier call: keep order
                        index = self.tool_index[position]
                    else:
                        part = Part("tool_call", id=call.get("id") or new_id("call_"), name=fn.get("name") or "")
                        index = self._switch(key, part, out)
                        self.tool_index[position] = index
                else:
                    index = self.tool_index[position]
                if fn.get("arguments"):
                    out.append(BlockDelta(index, "arguments", fn["arguments"]))
            if choice.get("finish_reason"):
                self.stop_reason = stop_reason_in("openai", choice["finish_reason"])
        return out

    def finish(self) -> list:
        if self.finished:
            return []
        self.finished = True
        out: list = []
        if not self.started:
            out.append(MessageStart(new_id("chatcmpl-"), ""))
        if self.open_index is not None:
            out.append(BlockStop(self.open_index))
        stop = self.stop_reason or "end_turn"
        if stop == "end_turn" and self.tool_index:
            stop = "tool_use"
        out.append(MessageDelta(stop, None, self.usage or Usage()))
        out.append(MessageStop())
        return out


class OpenAIStreamEncoder:
    """Canonical events -> chat.completion.chunk SSE, ending in data: [DONE]."""

    def __init__(self, req: Request):
        self.req = req
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.tool_position: dict[int, int] = {}
        self.has_calls = False

    def _chunk(self, delta: dict, finish=None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.req.model,
            "choices": [choice],
        }
        return b"data: " + dumps(obj) + b"\n\n"

    def encode(self, ev) -> bytes:
        if isinstance(ev, BlockDelta):
            if ev.kind == "text":
                return self._chunk({"content": ev.value})
            if ev.kind == "arguments":
                return self._chunk(
                    {"tool_calls": [{"index": self.tool_position[ev.index], "function": {"arguments": ev.value}}]}
                )
            if ev.kind == "thinking":
                return self._chunk({"reasoning_content": ev.value})
            return b""
        if isinstance(ev, BlockStart):
            if ev.part.type != "tool_call":
                return b""
            position = self.tool_position[ev.index] = len(self.tool_position)
            self.has_calls = True
            call = {
                "index": position,
                "id": ev.part.id,
                "type": "function",
                "function": {"name": ev.part.name, "arguments": ""},
            }
            return self._chunk({"tool_calls": [call]})
        if isinstance(ev, MessageStart):
            return self._chunk({"role": "assistant", "content": ""})
        if isinstance(ev, MessageDelta):
            out = self._chunk({}, OpenAIChatCodec._finish_reason(ev.stop_reason, self.has_calls))
            if self.req.include_usage:
                usage = OpenAIChatCodec.encode_usage(ev.usage or Usage())
                obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.req.model,
                       "choices": [], "usage": usage}  # fmt: skip
                out += b"data: " + dumps(obj) + b"\n\n"
            return out
        if isinstance(ev, MessageStop):
            return b"data: [DONE]\n\n"
        if isinstance(ev, StreamError):
            return b"data: " + dumps(OPENAI_CODEC.encode_error(ev.error)) + b"\n\n"
        return b""


OPENAI_CODEC = OpenAIChatCodec()


# ======================================================================================
# 6. Providers: where each model's requests go, and the built-in loopback model
# ======================================================================================

DEFAULT_BASE_URLS = {key[:-9]: CONFIG_KEYS[key][0] for key in CONFIG_KEYS if key.endswith("_base_url")}


@dataclass
class Provider:
    """An upstream. `protocol` is the wire protocol it speaks natively."""

    name: str
    protocol: str  # openai | anthropic | gemini | loopback
    base_url: str = ""
    api_key: str = ""
    flavor: str = ""  # openai (api.openai.com) | compatible | azure | anthropic | gemini | loopback
    models: list = field(default_factory=list)  # globs routed here (named providers)
    api_version: str = ""
    headers: dict = field(default_factory=dict)
    key_setting: str = ""  # the config key that holds its key, for error messages
    reasoning_globs: tuple = ()
    _urls: dict = field(default_factory=dict, repr=False)
    _auth: dict | None = field(default=None, repr=False)

    @property
    def configured(self) -> bool:
        if not self.key_setting:  # loopback and named providers are configured by being declared
            return True
        return bool(self.api_key) or self.base_url.rstrip("/") != DEFAULT_BASE_URLS.get(self.name, "").rstrip("/")

    @property
    def official(self) -> bool:
        return self.flavor == "openai" and "api.openai.com" in self.base_url

    @property
    def speaks_responses(self) -> bool:
        """OpenAI itself has /v1/responses; OpenAI-compatible servers (vLLM, Ollama) have only Chat."""
        return self.flavor == "openai"

    def accepts_reasoning(self, model: str) -> bool:
        return any(glob_match(g, model) for g in self.reasoning_globs)

    def auth_headers(self) -> dict:
        """The headers every request to this provider carries (shared: copy before changing)."""
        if self._auth is None:
            self._auth = self._build_auth_headers()
        return self._auth

    def _build_auth_headers(self) -> dict:
        headers = {"Content-Type": "application/json", "User-Agent": f"tgw/{__version__}"}
        if self.protocol == "anthropic":
            if self.api_key:
                headers["x-api-key"] = self.api_key
        elif self.protocol == "gemini":
            if self.api_key:
                headers["x-goog-api-key"] = self.api_key
        elif self.flavor == "azure":
            if self.api_key:
                headers["api-key"] = self.api_key
        elif self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.headers)
        return headers

    def url(self, operation: str, model: str = "", stream: bool = False) -> str:
        """The upstream URL of one operation: chat, embeddings, responses, messages,
        count_tokens, generate, count_gemini, models."""
        key = (operation, model, stream)
        url = self._urls.get(key)
        if url is None:
            url = self._build_url(operation, model, stream)
            if len(self._urls) < 4096:
                self._urls[key] = url
        return url

    def _build_url(self, operation: str, model: str, stream: bool) -> str:
        base = self.base_url.rstrip("/")
        if self.flavor == "azure":
            version = self.api_version or "2024-10-21"
            path = {"chat": "chat/completions", "embeddings": "embeddings", "responses": "responses"}[operation]
            return f"{base}/openai/deployments/{quote(model, safe='')}/{path}?api-version={version}"
        if self.protocol == "anthropic":
            root = base if base.endswith("/v1") else base + "/v1"
            return {
                "messages": f"{root}/messages",
                "count_tokens": f"{root}/messages/count_tokens",
                "models": f"{root}/models",
            }[operation]
        if self.protocol == "gemini":
            root = base if base.endswith(("/v1beta", "/v1")) else base + "/v1beta"
            if operation == "models":
                return f"{root}/models"
            method = {
                "generate": "streamGenerateContent?alt=sse" if stream else "generateContent",
                "count_gemini": "countTokens",
            }
            return f"{root}/models/{quote(model, safe='.-_')}:{method[operation]}"
        path = {"chat": "chat/completions", "embeddings": "embeddings", "responses": "responses", "models": "models"}
        return f"{base}/{path[operation]}"


def build_providers(cfg: Config) -> dict[str, Provider]:
    reasoning = tuple(g.strip() for g in cfg.reasoning_models.split(",") if g.strip())
    org = {"OpenAI-Organization": cfg.openai_org} if cfg.openai_org else {}
    base = cfg.openai_base_url.rstrip("/")
    providers = {
        "openai": Provider("openai", "openai", base, cfg.openai_api_key,
                           "openai" if "api.openai.com" in base else "compatible", headers=org,
                           key_setting="openai_api_key", reasoning_globs=reasoning),
        "anthropic": Provider("anthropic", "anthropic", cfg.anthropic_base_url.rstrip("/"), cfg.anthropic_api_key,
                              "anthropic", key_setting="anthropic_api_key"),
        "gemini": Provider("gemini", "gemini", cfg.gemini_base_url.rstrip("/"), cfg.gemini_api_key, "gemini",
                           key_setting="gemini_api_key"),
        "loopback": Provider("loopback", "loopback", flavor="loopback"),
    }  # fmt: skip
    for name, pc in cfg.providers.items():
        protocol = "openai" if pc.type in ("openai", "azure") else pc.type
        flavor = "azure" if pc.type == "azure" else ("compatible" if protocol == "openai" else protocol)
        providers[name] = Provider(name, protocol, pc.base_url, pc.api_key, flavor, pc.models, pc.api_version,
                                   dict(pc.headers), "", reasoning)  # fmt: skip
    return providers


class LoopbackModel:
    """The built-in offline model. Deterministic: the same request gives the same answer.

    It echoes the last user text. To make it call a tool (for testing tool flows offline),
    put `[[tool:NAME {"json": "arguments"}]]` in the last user message (arguments optional);
    once a tool result comes back it answers with the result's text. Embeddings are a
    deterministic unit vector derived from a hash of each input."""

    TOOL_DIRECTIVE = re.compile(r"\[\[tool:([A-Za-z0-9_.:-]+)\s*(\{.*?\})?\]\]", re.S)

    def complete(self, req: Request) -> Response:
        last = req.messages[-1] if req.messages else Message("user", [])
        results = [p for p in last.parts if p.type == "tool_result"]
        user_text = text_of(last.parts)
        directive = self.TOOL_DIRECTIVE.search(user_text) if not results else None
        parts: list = []
        stop = "end_turn"
        if directive and req.tool_choice != "none":
            name = directive.group(1)
            arguments = directive.group(2) or "{}"
            parts.append(Part("tool_call", id="call_" + hashlib.sha256(user_text.encode()).hexdigest()[:24], name=name,
                              arguments=arguments))  # fmt: skip
            stop = "tool_use"
        elif results:
            parts.append(Part("text", text="Tool result received: " + tool_result_text(results[0])[:500]))
        else:
            shown = user_text.strip()[:500] or "(no text)"
            parts.append(Part("text", text=f"Hello from the tgw loopback model. You said: {shown}"))
        output = estimate_tokens([p.text or p.arguments for p in parts])
        max_tokens = req.max_tokens or 0
        if max_tokens and output > max_tokens and parts[0].type == "text":
            parts[0].text = parts[0].text[: max_tokens * 4]
            output, stop = max_tokens, "max_tokens"
        prompt = estimate_tokens(
            [system_text(req), [[text_of(m.parts)] for m in req.messages], [t.name for t in req.tools]]
        )
        digest = hashlib.sha256(dumps([req.model, user_text])).hexdigest()[:24]
        return Response(
            "msg_loop" + digest, req.model, parts, stop, usage=Usage(prompt, output), created=int(time.time())
        )

    @staticmethod
    def stream_events(resp: Response) -> list:
        """unfold_response, with text split into word-sized deltas like a real model."""
        events = []
        for ev in unfold_response(resp):
            if isinstance(ev, BlockDelta) and ev.kind == "text":
                words = ev.value.split(" ")
                events.extend(BlockDelta(ev.index, "text", w if i == 0 else " " + w) for i, w in enumerate(words))
            else:
                events.append(ev)
        return events

    @staticmethod
    def embed(text: str, dimensions: int) -> list[float]:
        values = []
        counter = 0
        while len(values) < dimensions:
            block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
            values.extend((b - 127.5) / 127.5 for b in block)
            counter += 1
        values = values[:dimensions]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [round(v / norm, 6) for v in values]


# ======================================================================================
# 7. Router: model -> (provider, upstream model), aliases, work modes
# ======================================================================================


@dataclass(slots=True)
class Route:
    provider: Provider
    model: str  # the model name the upstream sees
    requested: str


class Router:
    def __init__(self, cfg: Config, providers: dict[str, Provider]):
        self.cfg = cfg
        self.providers = providers
        self.aliases = dict(parse_pairs(cfg.model_aliases, "model_aliases"))
        self.rules: list[tuple[str, str]] = []
        for provider in providers.values():  # named providers' own model lists are the most specific
            self.rules.extend((glob_, provider.name) for glob_ in provider.models)
        self.rules.extend(parse_pairs(cfg.model_provider_routes, "model_provider_routes"))
        for pattern, target in self.rules:
            if target not in providers:
                raise ConfigError(
                    f"model_provider_routes: {pattern}=>{target} names an unknown provider; known: {', '.join(providers)}"
                )
        # with no provider configured at all, every model is answered by loopback (works offline)
        self.offline = not any(p.configured for p in providers.values() if p.protocol != "loopback")
        self._cache: dict[str, Route] = {}

    def resolve(self, model: str) -> Route:
        route = self._cache.get(model)
        if route is not None:
            return route
        target = self.aliases.get(model, model)
        provider_name = "loopback" if self.offline else next((p for g, p in self.rules if glob_match(g, target)), None)
        if provider_name is None:
            raise GatewayError(
                404, f"model {model!r} matches no route; routes: {self.describe_routes()}", "not_found_error"
            )
        provider = self.providers[provider_name]
        if not provider.configured:
            setting = provider.key_setting
            raise GatewayError(
                400,
                f"model {model!r} routes to provider {provider.name!r}, which is not configured: "
                f"set {setting} (or TOKLIGENCE_{setting.upper()}) in gateway.ini or the environment",
                "invalid_request_error",
            )
        route = Route(provider, target, model)
        if len(self._cache) < 10000:
            self._cache[model] = route
        return route

    def describe_routes(self) -> str:
        return ", ".join(f"{g}=>{p}" for g, p in self.rules)

    def listed_models(self) -> list[tuple[str, str]]:
        """Concrete model names the gateway can serve: (model, provider)."""
        seen: dict[str, str] = {"loopback": "loopback"}
        for alias, target in self.aliases.items():
            seen.setdefault(alias, self._provider_of(target))
        if not self.offline:
            for pattern, provider in self.rules:
                if not any(c in pattern for c in "*?[") and self.providers[provider].configured:
                    seen.setdefault(pattern, provider)
        return list(seen.items())

    def _provider_of(self, model: str) -> str:
        try:
            return self.resolve(model).provider.name
        except GatewayError:
            return "unknown"


# ======================================================================================
# 8. Ledger: one row per request, written by one background thread
# ======================================================================================

LEDGER_COLUMNS = (
    "ts", "request_id", "api_key_id", "user", "client_protocol", "endpoint", "lane", "provider", "model_requested",
    "model_upstream", "stream", "status", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "cost_usd", "latency_ms", "ttft_ms", "error",
)  # fmt: skip
LEDGER_MIGRATIONS = [
    # version 1
    """CREATE TABLE IF NOT EXISTS requests (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL, api_key_id TEXT, user TEXT,
        client_protocol TEXT, endpoint TEXT, lane TEXT, provider TEXT, model_requested TEXT, model_upstream TEXT,
        stream INTEGER, status INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, cached_tokens INTEGER,
        reasoning_tokens INTEGER, cost_usd REAL, latency_ms REAL, ttft_ms REAL, error TEXT);
    CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);""",
]

# USD per million tokens: (input, output, cached input). Globs, first match wins; [prices] in
# gateway.ini adds to and overrides these.
DEFAULT_PRICES = {
    "loopback*": (0.0, 0.0, 0.0),
    "gpt-4o-mini*": (0.15, 0.60, 0.075),
    "gpt-4o*": (2.50, 10.0, 1.25),
    "gpt-4.1-nano*": (0.10, 0.40, 0.025),
    "gpt-4.1-mini*": (0.40, 1.60, 0.10),
    "gpt-4.1*": (2.0, 8.0, 0.50),
    "gpt-5-nano*": (0.05, 0.40, 0.005),
    "gpt-5-mini*": (0.25, 2.0, 0.025),
    "gpt-5*": (1.25, 10.0, 0.125),
    "o4-mini*": (1.10, 4.40, 0.275),
    "o3*": (2.0, 8.0, 0.50),
    "claude-opus-4-5*": (5.0, 25.0, 0.50),
    "claude-opus*": (15.0, 75.0, 1.50),
    "claude-sonnet*": (3.0, 15.0, 0.30),
    "claude-3-7-sonnet*": (3.0, 15.0, 0.30),
    "claude-3-5-sonnet*": (3.0, 15.0, 0.30),
    "claude-haiku-4*": (1.0, 5.0, 0.10),
    "claude-3-5-haiku*": (0.80, 4.0, 0.08),
    "gemini-2.5-pro*": (1.25, 10.0, 0.31),
    "gemini-2.5-flash-lite*": (0.10, 0.40, 0.025),
    "gemini-2.5-flash*": (0.30, 2.50, 0.075),
    "text-embedding-3-small*": (0.02, 0.0, 0.0),
    "text-embedding-3-large*": (0.13, 0.0, 0.0),
}


def parse_price(glob_: str, raw: str) -> tuple:
    try:
        numbers = [float(x) for x in raw.split(",")]
    except ValueError:
        raise ConfigError(
            f"[prices] {glob_}: expected 'input, output[, cached]' in USD per million tokens, got {raw!r}"
        ) from None
    if len(numbers) not in (2, 3):
        raise ConfigError(f"[prices] {glob_}: expected 2 or 3 numbers, got {raw!r}")
    return (numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else numbers[0])


class PriceTable:
    def __init__(self, prices: dict):
        # configured entries (added last to the dict) are checked before the built-in ones
        items = list(prices.items())
        builtin = [i for i in items if i[0] in DEFAULT_PRICES and DEFAULT_PRICES[i[0]] == i[1]]
        custom = [i for i in items if i not in builtin]
        self.entries = custom + builtin
        self._cache: dict[str, tuple | None] = {}

    def cost(self, model: str, usage: Usage) -> float:
        price = self._cache.get(model, False)
        if price is False:
            price = next((p for g, p in self.entries if glob_match(g, model)), None)
            self._cache[model] = price
        if price is None:
            return 0.0
        fresh = max(usage.input_tokens - usage.cached_tokens, 0)
        total = fresh * price[0] + usage.cached_tokens * price[2] + usage.output_tokens * price[1]
        return round(total / 1e6, 12)


def open_ledger_db(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(LEDGER_MIGRATIONS[version:], version + 1):
        db.executescript(script)
        db.execute(f"PRAGMA user_version={number}")
    db.commit()
    return db


class Ledger:
    """Rows go into a bounded queue; one writer thread inserts them in batches. The event
    loop never touches sqlite. A full queue makes the caller wait (never a dropped row);
    close() drains everything."""

    BATCH = 2048
    LINGER = 0.05

    def __init__(self, path: str, queue_size: int = 10000):
        self.path = str(Path(path).expanduser()) if path != ":memory:" else path
        self.db = open_ledger_db(self.path)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="tgw-ledger", daemon=True)
        self.thread.start()

    def record(self, row: tuple) -> None:
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            log.warning("ledger queue full: waiting for the writer (backpressure)")
            self.queue.put(row)

    def _run(self) -> None:
        sql = f"INSERT INTO requests ({', '.join(LEDGER_COLUMNS)}) VALUES ({', '.join('?' * len(LEDGER_COLUMNS))})"
        stopping = False
        while not stopping:
            batch = [self.queue.get()]
            time.sleep(self.LINGER)  # let a batch gather: one commit per batch, not per request
            while len(batch) < self.BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            rows = [r for r in batch if r is not None]
            stopping = len(rows) != len(batch)
            if rows:
                self._insert(sql, rows)
            for _ in batch:
                self.queue.task_done()

    def _insert(self, sql: str, rows: list) -> None:
        for attempt in range(5):
            try:
                self.db.executemany(sql, rows)
                self.db.commit()
                self.written += len(rows)
                return
            except sqlite3.OperationalError as exc:  # locked by a reader: wait and retry
                log.warning("ledger write failed (%s), retrying", exc)
                time.sleep(0.2 * (attempt + 1))
        log.error("ledger write failed 5 times; %d rows kept in memory were not written", len(rows))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (tests and `tgw usage` after serve)."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)
        self.db.close()


def query_usage(db: sqlite3.Connection, group: str, since: float) -> list[tuple]:
    column = {"model": "model_requested", "provider": "provider", "day": "date(ts, 'unixepoch')", "key": "api_key_id"}[
        group
    ]
    return db.execute(
        f"""SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
                   SUM(reasoning_tokens), SUM(cost_usd), SUM(status >= 400)
            FROM requests WHERE ts >= ? GROUP BY 1 ORDER BY 1""",
        (since,),
    ).fetchall()


def query_logs(db: sqlite3.Connection, limit: int) -> list[dict]:
    db.row_factory = sqlite3.Row
    rows = db.execute("SELECT * FROM requests ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [dict(r) for r in rows]


# ======================================================================================
# 9. Gateway: endpoints wired into the pipeline
# ======================================================================================
#
# Every model call takes one of three lanes:
#   passthrough  client protocol == provider protocol: body and stream bytes go through
#                untouched (model renamed at most) while a decoder observes usage;
#   translation  client codec -> canonical Request -> provider codec, and back;
#   loopback     the built-in model answers the canonical Request.


@dataclass(slots=True)
class Call:
    """What one request did, for its ledger row."""

    exchange: Exchange
    codec: Codec
    endpoint: str
    started: float = field(default_factory=time.monotonic)
    ts: float = field(default_factory=time.time)
    ledgered: bool = False
    lane: str = ""
    provider: str = ""
    model_requested: str = ""
    model_upstream: str = ""
    stream: bool = False
    usage: Usage = field(default_factory=Usage)
    error: str = ""
    api_key_id: str = ""
    user: str = ""


class Heartbeat:
    """Keeps a stream audible while the upstream is silent: after `interval` seconds
    without a write, the client gets its protocol's keep-alive (committing the SSE
    response first if nothing was sent yet)."""

    def __init__(self, call: Call, interval: float):
        self.call = call
        self.interval = interval
        self.mid_event = False  # a passthrough chunk ended inside an event: do not interleave
        self.loop = asyncio.get_running_loop()
        self.since = time.monotonic()
        self.handle = self.loop.call_later(interval, self._tick)

    def _tick(self):
        ex = self.call.exchange
        if ex.finished or ex.writer.transport.is_closing():
            return
        idle = time.monotonic() - max(ex.last_write_at, self.since)
        if idle >= self.interval - 0.05 and not self.mid_event:
            if not ex.started:
                ex.start_stream()
            ex.write(self.call.codec.keepalive)
            idle = 0.0
        self.handle = self.loop.call_later(max(self.interval - idle, 0.05), self._tick)

    def cancel(self):
        self.handle.cancel()


def client_key_of(request: HttpRequest) -> str:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.headers.get("x-goog-api-key") or request.query.get("key", "")


class Gateway:
    def __init__(self, cfg: Config, ledger: Ledger | None = None):
        self.cfg = cfg
        self.pool = UpstreamPool(cfg.upstream_connect_timeout, cfg.upstream_read_timeout)
        self.providers = build_providers(cfg)
        self.router = Router(cfg, self.providers)
        self.ledger = ledger or Ledger(cfg.ledger_path, cfg.ledger_queue_size)
        self.prices = PriceTable(cfg.prices)
        self.loopback = LoopbackModel()
        self.api_keys = [k.strip() for k in cfg.api_keys.split(",") if k.strip()]
        self.codecs: dict[str, Codec] = {"openai": OPENAI_CODEC}
        self.started_at = time.time()
        self.routes = {
            ("GET", "/"): self.root,
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.list_models,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/embeddings"): self.embeddings,
        }
        self.public = {"/", "/health"}

    def close(self) -> None:
        self.pool.close()
        self.ledger.close()

    # -- dispatch
    def client_codec(self, path: str) -> Codec:
        return self.codecs["openai"]

    def find_handler(self, request: HttpRequest):
        path = request.path.rstrip("/") or "/"
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler
        if method == "GET" and path.startswith("/v1/models/"):
            return self.get_model
        allowed = sorted({m for (m, p) in self.routes if p == path})
        if allowed:
            raise GatewayError(405, f"method {request.method} is not allowed on {path}; use {', '.join(allowed)}")
        raise GatewayError(404, f"no endpoint {request.method} {path}", "not_found_error")

    async def handle(self, request: HttpRequest, exchange: Exchange) -> None:
        call = Call(exchange, self.client_codec(request.path), request.path)
        try:
            handler = self.find_handler(request)
            if request.path not in self.public:
                self.authenticate(request, call)
            await handler(request, call)
        except GatewayError as err:
            self.fail(call, err)
        except (asyncio.CancelledError, ConnectionError):
            call.error = "client disconnected"
            exchange.status = 499
            exchange.close_after = True
            raise
        except Exception as exc:  # a bug: answer in the client's protocol, keep serving
            log.exception("internal error on %s %s", request.method, request.path)
            self.fail(call, GatewayError(500, f"internal gateway error ({type(exc).__name__}); see the gateway log"))
        finally:
            if call.ledgered:
                self.record(call)
            if log.isEnabledFor(logging.DEBUG) or exchange.status >= 400:
                log.info("%s %s %s %s %s %.1fms", request.method, request.path, exchange.status, call.model_requested,
                         call.provider, (time.monotonic() - call.started) * 1000)  # fmt: skip

    def authenticate(self, request: HttpRequest, call: Call) -> None:
        if not self.api_keys:
            key = client_key_of(request)
            call.api_key_id = key_fingerprint(key) if key else ""
            return
        key = client_key_of(request)
        if not key or not any(hmac_compare(key, k) for k in self.api_keys):
            raise GatewayError(401, "missing or invalid API key for this gateway", "authentication_error")
        call.api_key_id = key_fingerprint(key)

    def fail(self, call: Call, err: GatewayError) -> None:
        ex = call.exchange
        call.error = call.error or err.message
        if not ex.started:
            extra = [("Retry-After", str(int(err.retry_after)))] if err.retry_after else []
            ex.send_json(err.status, call.codec.encode_error(err), extra)
        elif ex.streaming and not ex.finished:
            ex.write(call.codec.encode_stream_error(err))
            ex.end_stream()
            ex.close_after = True

    def record(self, call: Call) -> None:
        ex = call.exchange
        usage = call.usage
        model = call.model_upstream or call.model_requested
        ttft = (ex.first_byte_at - call.started) * 1000 if ex.first_byte_at else None
        row = (
            call.ts, ex.request_id, call.api_key_id, call.user, call.codec.name, call.endpoint, call.lane, call.provider,
            call.model_requested, model, int(call.stream), ex.status or 499, usage.input_tokens, usage.output_tokens,
            usage.cached_tokens, usage.reasoning_tokens, self.prices.cost(model, usage),
            round((time.monotonic() - call.started) * 1000, 3), round(ttft, 3) if ttft is not None else None, call.error[:1000],
        )  # fmt: skip
        self.ledger.record(row)

    # -- simple endpoints
    async def root(self, request: HttpRequest, call: Call) -> None:
        call.exchange.send_json(200, {"name": "tgw", "version": __version__, "status": "ok"})

    async def health(self, request: HttpRequest, call: Call) -> None:
        providers = {
            name: {
                "protocol": p.protocol,
                "configured": p.configured,
                **({"base_url": p.base_url} if p.base_url else {}),
            }
            for name, p in self.providers.items()
        }
        call.exchange.send_json(200, {
            "status": "ok", "version": __version__, "work_mode": self.cfg.work_mode,
            "offline": self.router.offline, "routes": [f"{g}=>{p}" for g, p in self.router.rules],
            "aliases": self.router.aliases, "providers": providers,
            "uptime_s": round(time.time() - self.started_at, 1), "ledger_rows_written": self.ledger.written,
        })  # fmt: skip

    async def list_models(self, request: HttpRequest, call: Call) -> None:
        models = self.router.listed_models()
        if "anthropic-version" in request.headers or "x-api-key" in request.headers:
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m, _ in models
            ]
            body = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        else:
            body = {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": p} for m, p in models],
            }
        call.exchange.send_json(200, body)

    async def get_model(self, request: HttpRequest, call: Call) -> None:
        model = request.path[len("/v1/models/") :]
        route = self.router.resolve(model)
        call.exchange.send_json(200, {"id": model, "object": "model", "created": 0, "owned_by": route.provider.name})

    # -- model calls
    def begin_model_call(self, call: Call, model: str, stream: bool) -> Route:
        call.ledgered = True
        call.model_requested = model
        call.stream = stream
        route = self.router.resolve(model)
        call.provider = route.provider.name
        call.model_upstream = route.model
        return route

    def choose_lane(self, call: Call, route: Route, native: bool) -> str:
        provider = route.provider
        if provider.protocol == "loopback":
            lane = "loopback"
        elif native and self.cfg.work_mode != "translation":
            lane = "passthrough"
        elif self.cfg.work_mode == "passthrough":
            raise bad_request(
                f"work_mode=passthrough refuses translation: this endpoint speaks {call.codec.name} but model "
                f"{call.model_requested!r} is served by {provider.name!r}, which speaks {provider.protocol}"
            )
        else:
            lane = "translation"
        call.lane = lane
        return lane

    async def chat_completions(self, request: HttpRequest, call: Call) -> None:
        body = parse_json_body(request.body)
        model = field_of(body, "model", str, required=True)
        stream = bool(field_of(body, "stream", bool, default=False))
        route = self.begin_model_call(call, model, stream)
        lane = self.choose_lane(call, route, route.provider.protocol == "openai")
        if lane == "passthrough":
            await self.passthrough(request, call, route, body, "chat")
        else:
            await self.canonical_call(request, call, route, call.codec.decode_request(body), lane)

    async def canonical_call(self, request: HttpRequest, call: Call, route: Route, req: Request, lane: str) -> None:
        """Loopback and translation lanes: the client's canonical request, answered in its protocol."""
        call.user = call.user or req.user
        if lane == "loopback":
            await self.answer_from_loopback(call, req)
            return
        upstream_codec = self.codecs[route.provider.protocol]
        body = upstream_codec.encode_request(req, route.model, route.provider)
        operation = {"openai": "chat", "anthropic": "messages", "gemini": "generate"}[route.provider.protocol]
        heartbeat = Heartbeat(call, self.cfg.stream_keepalive) if req.stream else None
        try:
            url = route.provider.url(operation, route.model, req.stream)
            resp = await self.send_upstream(call, route.provider, url, dumps(body), request, upstream_codec)
            if "text/event-stream" in resp.headers.get("content-type", ""):
                await self.relay_translated_stream(call, resp, upstream_codec, req)
                return
            result = upstream_codec.decode_response(json_or_502(await resp.read(), route.provider.name))
            call.usage = result.usage
            if req.stream:  # the upstream answered whole: replay it as a stream
                self.emit_events(call, call.codec.stream_encoder(req), unfold_response(result))
                call.exchange.end_stream()
            else:
                call.exchange.send_json(200, call.codec.encode_response(result, req))
        finally:
            if heartbeat:
                heartbeat.cancel()

    async def answer_from_loopback(self, call: Call, req: Request) -> None:
        result = self.loopback.complete(req)
        call.usage = result.usage
        if req.stream:
            self.emit_events(call, call.codec.stream_encoder(req), self.loopback.stream_events(result))
            call.exchange.end_stream()
        else:
            call.exchange.send_json(200, call.codec.encode_response(result, req))

    def emit_events(self, call: Call, encoder, events) -> None:
        ex = call.exchange
        if not ex.started:
            ex.start_stream()
        for ev in events:
            self.observe(call, ev)
            ex.write(encoder.encode(ev))

    @staticmethod
    def observe(call: Call, ev) -> None:
        if isinstance(ev, (MessageStart, MessageDelta)) and ev.usage is not None:
            call.usage = ev.usage
        elif isinstance(ev, StreamError):
            call.error = ev.error.message

    async def relay_translated_stream(
        self, call: Call, resp: UpstreamResponse, upstream_codec: Codec, req: Request
    ) -> None:
        ex = call.exchange
        decoder = upstream_codec.stream_decoder()
        encoder = call.codec.stream_encoder(req)
        parser = SSEParser()
        if not ex.started:
            ex.start_stream()
        try:
            while chunk := await resp.next_chunk():
                for sse in parser.feed(chunk):
                    for ev in decoder.feed(sse):
                        self.observe(call, ev)
                        ex.write(encoder.encode(ev))
                await ex.drain()
            tail = [ev for sse in parser.finish() for ev in decoder.feed(sse)] + decoder.finish()
        except GatewayError as err:  # the upstream broke mid-stream: tell the client in-stream
            tail = [StreamError(err)]
        finally:
            resp.close() if not resp.done else resp.release()
        for ev in tail:
            self.observe(call, ev)
            ex.write(encoder.encode(ev))
        ex.end_stream()

    async def passthrough(self, request: HttpRequest, call: Call, route: Route, body: dict, operation: str) -> None:
        """Same protocol on both sides: forward bytes, observe usage."""
        provider = route.provider
        raw = request.body
        hide_usage = False
        if call.stream and call.codec.name == "openai":
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            if not options.get("include_usage"):  # ask anyway, for the ledger; the client will not see it
                body["stream_options"] = {**options, "include_usage": True}
                hide_usage = True
        if hide_usage or route.model != body.get("model"):
            body["model"] = route.model
            raw = dumps(body)
        heartbeat = Heartbeat(call, self.cfg.stream_keepalive) if call.stream else None
        try:
            url = provider.url(operation, route.model, call.stream)
            resp = await self.send_upstream(call, provider, url, raw, request, call.codec)
            if "text/event-stream" in resp.headers.get("content-type", ""):
                await self.relay_passthrough_stream(call, resp, heartbeat, hide_usage)
            else:
                data = await resp.read()
                call.usage = call.codec.usage_of(data)
                call.exchange.send(resp.status, data, resp.headers.get("content-type", "application/json"))
        finally:
            if heartbeat:
                heartbeat.cancel()

    async def relay_passthrough_stream(self, call: Call, resp: UpstreamResponse, heartbeat, hide_usage: bool) -> None:
        ex = call.exchange
        observer = call.codec.stream_decoder()
        parser = SSEParser()
        if not ex.started:
            ex.start_stream()
        try:
            while chunk := await resp.next_chunk():
                events = parser.feed(chunk)
                for sse in events:
                    for ev in observer.feed(sse):
                        self.observe(call, ev)
                if hide_usage:
                    ex.write(b"".join(sse.raw for sse in events if not is_usage_only_chunk(sse)))
                else:
                    ex.write(chunk)
                    heartbeat.mid_event = bool(parser.buffer)
                await ex.drain()
            for sse in parser.finish():
                ex.write(sse.raw)
        except GatewayError as err:
            call.error = err.message
            ex.write(call.codec.encode_stream_error(err))
        finally:
            resp.close() if not resp.done else resp.release()
        ex.end_stream()

    async def send_upstream(self, call: Call, provider: Provider, url: str, body: bytes, request: HttpRequest,
                            upstream_codec: Codec) -> UpstreamResponse:  # fmt: skip
        """POST to an upstream, retrying 429/5xx and connection failures (nothing has reached
        the client yet, so a retry is safe). Errors come back as GatewayError with the
        upstream's status and words."""
        headers = self.upstream_headers(provider, request)
        attempts = max(self.cfg.upstream_retries, 0) + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = await self.pool.request("POST", url, headers, body)
            except GatewayError as err:
                if last or err.status not in (502, 504) or call.exchange.started:
                    raise
                await asyncio.sleep(0.25 * 2**attempt)
                continue
            if resp.status < 400:
                return resp
            error_body = await resp.read(4 * 1024 * 1024)
            err = upstream_codec.decode_error(resp.status, error_body)
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            err.retry_after = retry_after
            if last or resp.status not in (408, 429, 500, 502, 503, 504, 529) or call.exchange.started:
                raise err
            await asyncio.sleep(min(retry_after if retry_after is not None else 0.5 * 2**attempt, 30.0))
        raise GatewayError(502, "upstream retries exhausted")  # not reached

    def upstream_headers(self, provider: Provider, request: HttpRequest) -> dict:
        headers = provider.auth_headers()
        if provider.protocol == "anthropic":
            headers = dict(headers)
            headers["anthropic-version"] = request.headers.get("anthropic-version") or self.cfg.anthropic_version
            if "anthropic-beta" in request.headers:
                headers["anthropic-beta"] = request.headers["anthropic-beta"]
        elif provider.protocol == "openai" and "openai-beta" in request.headers:
            headers = dict(headers)
            headers["OpenAI-Beta"] = request.headers["openai-beta"]
        return headers

    # -- embeddings
    async def embeddings(self, request: HttpRequest, call: Call) -> None:
        body = parse_json_body(request.body)
        model = field_of(body, "model", str, required=True)
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise bad_request("'input' must be a non-empty string or array of strings (or token arrays)")
        encoding = field_of(body, "encoding_format", str, default="float")
        if encoding not in ("float", "base64"):
            raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
        dimensions = field_of(body, "dimensions", int, default=None)
        route = self.begin_model_call(call, model, False)
        call.lane = "passthrough" if route.provider.protocol == "openai" else route.provider.protocol
        if route.provider.protocol == "openai":
            await self.passthrough(request, call, route, body, "embeddings")
            return
        if route.provider.protocol != "loopback":
            raise bad_request(
                f"model {model!r} is served by {route.provider.name!r}, which has no embeddings endpoint in tgw"
            )
        data = []
        for index, item in enumerate(inputs):
            vector = self.loopback.embed(item if isinstance(item, str) else json.dumps(item), dimensions or 256)
            packed = (
                base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if encoding == "base64" else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": packed})
        tokens = estimate_tokens(inputs)
        call.usage = Usage(input_tokens=tokens)
        call.exchange.send_json(200, {"object": "list", "data": data, "model": model,
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


def hmac_compare(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def json_or_502(data: bytes, provider: str):
    try:
        return json.loads(data)
    except ValueError:
        raise GatewayError(502, f"upstream {provider} answered with invalid JSON: {data[:200]!r}") from None


def is_usage_only_chunk(sse: SSEEvent) -> bool:
    """The usage chunk an OpenAI stream sends last when include_usage is on (choices: [])."""
    if '"usage"' not in sse.data:
        return False
    try:
        chunk = json.loads(sse.data)
    except ValueError:
        return False
    return isinstance(chunk, dict) and not chunk.get("choices") and bool(chunk.get("usage"))


# ---- running it -----------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


async def serve(cfg: Config, ready=None, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or `stop` is set), then drain and flush the ledger."""
    if not is_loopback_host(cfg.host) and not cfg.api_keys and not cfg.allow_public_bind:
        raise ConfigError(
            f"refusing to listen on {cfg.host} with no api_keys configured: anyone on the network could spend "
            "your provider keys. Set api_keys, or pass --allow-public-bind if you mean it."
        )
    gateway = Gateway(cfg)
    server = HttpServer(cfg, gateway.handle)
    port = await server.start(cfg.host, cfg.facade_port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests) or not supported
    mode = (
        "offline: every model is answered by loopback"
        if gateway.router.offline
        else f"routes: {gateway.router.describe_routes()}"
    )
    print(f"tgw {__version__} listening on http://{cfg.host}:{port} (work_mode={cfg.work_mode}; {mode})", flush=True)
    if ready is not None:
        ready(port, gateway)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: finishing in-flight requests (up to %gs)", cfg.shutdown_grace)
        await server.drain_and_close(cfg.shutdown_grace)
        gateway.close()
        log.info("ledger flushed (%d rows written this run)", gateway.ledger.written)


# ======================================================================================
# 10. CLI
# ======================================================================================


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="gateway.ini to read (default: $TOKLIGENCE_CONFIG, ./gateway.ini, ~/.tokligence/gateway.ini)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgw", description="A local LLM gateway: OpenAI, Anthropic and Gemini APIs in one endpoint."
    )
    parser.add_argument("--version", action="version", version=f"tgw {__version__}")
    commands = parser.add_subparsers(dest="command")

    serve_p = commands.add_parser("serve", help="run the gateway")
    add_config_flag(serve_p)
    serve_p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve_p.add_argument("--port", type=int, help="port (default 8081; 0 picks a free one)")
    serve_p.add_argument("--work-mode", choices=CONFIG_KEYS["work_mode"][1])
    serve_p.add_argument("--ledger-path", help="sqlite ledger file")
    serve_p.add_argument("--log-level", choices=CONFIG_KEYS["log_level"][1])
    serve_p.add_argument(
        "--allow-public-bind", action="store_true", default=None, help="allow a non-loopback --host without api_keys"
    )
    serve_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")

    config_p = commands.add_parser("config", help="read and edit gateway.ini")
    add_config_flag(config_p)
    config_sub = config_p.add_subparsers(dest="action", required=True)
    config_sub.add_parser("list", help="every key with its effective value and where it came from")
    get_p = config_sub.add_parser("get", help="one key's effective value")
    get_p.add_argument("key")
    set_p = config_sub.add_parser("set", help="set a key in the ini file, keeping its comments")
    set_p.add_argument("key")
    set_p.add_argument("value")
    config_sub.add_parser("example", help="print a gateway.ini with every key and its default")

    usage_p = commands.add_parser("usage", help="token and cost totals from the ledger")
    add_config_flag(usage_p)
    usage_p.add_argument(
        "--by", choices=("model", "provider", "day", "key"), action="append", help="grouping (repeatable; default all)"
    )
    usage_p.add_argument("--days", type=float, default=30, help="look back this many days (default 30)")
    usage_p.add_argument("--json", action="store_true", help="print JSON")

    logs_p = commands.add_parser("logs", help="the most recent requests in the ledger")
    add_config_flag(logs_p)
    logs_p.add_argument("-n", "--limit", type=int, default=20)
    logs_p.add_argument("--json", action="store_true", help="print JSON lines")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args) -> int:
    overrides = {"host": args.host, "facade_port": args.port, "work_mode": args.work_mode, "ledger_path": args.ledger_path,
                 "log_level": args.log_level, "allow_public_bind": args.allow_public_bind}  # fmt: skip
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().lower()] = value
    cfg = load_config(args.config, overrides)
    setup_logging(cfg.log_level)
    asyncio.run(serve(cfg))
    return 0


def cmd_config(args) -> int:
    if args.action == "example":
        print(write_example_config())
        return 0
    cfg = load_config(args.config)
    if args.action == "set":
        path = cfg.path or Path(args.config or os.environ.get("TOKLIGENCE_CONFIG") or "gateway.ini")
        config_set_in_file(path, args.key, args.value)
        shown = mask_secret(args.value) if args.key.lower() in SECRET_KEYS else args.value
        print(f"{args.key.lower()} = {shown}  (written to {path})")
        return 0
    if args.action == "get":
        key = args.key.lower()
        if key not in cfg.values:
            raise ConfigError(f"unknown key {key!r}; run 'tgw config list' for the accepted keys")
        value = cfg.values[key]
        print(mask_secret(value) if key in SECRET_KEYS else value)
        return 0
    print(f"# config file: {cfg.path or '(none found)'}")
    for key, value in cfg.values.items():
        shown = mask_secret(value) if key in SECRET_KEYS else value
        print(f"{key} = {shown}    # {cfg.sources[key]}")
    for name, pc in cfg.providers.items():
        print(
            f"[provider.{name}] type={pc.type} base_url={pc.base_url} api_key={mask_secret(pc.api_key)} models={','.join(pc.models)}"
        )
    return 0


def open_ledger_for_reading(args) -> sqlite3.Connection:
    cfg = load_config(args.config)
    path = str(Path(cfg.ledger_path).expanduser())
    if path != ":memory:" and not Path(path).exists():
        raise ConfigError(f"no ledger at {path} yet: start the gateway with 'tgw serve' and send a request")
    return open_ledger_db(path)


def cmd_usage(args) -> int:
    db = open_ledger_for_reading(args)
    since = time.time() - args.days * 86400
    report = {group: query_usage(db, group, since) for group in (args.by or ["model", "provider", "day"])}
    if args.json:
        names = (
            "name",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "reasoning_tokens",
            "cost_usd",
            "errors",
        )
        print(
            json.dumps(
                {g: [dict(zip(names, row, strict=True)) for row in rows] for g, rows in report.items()}, indent=2
            )
        )
        return 0
    for group, rows in report.items():
        print(f"\nby {group} (last {args.days:g} days)")
        print(
            f"  {group:<32} {'requests':>9} {'prompt':>11} {'completion':>11} {'cached':>9} {'cost $':>11} {'errors':>7}"
        )
        for name, count, prompt, completion, cached, _reasoning, cost, errors in rows:
            print(
                f"  {str(name or '-'):<32} {count:>9} {prompt or 0:>11} {completion or 0:>11} {cached or 0:>9} {cost or 0:>11.4f} {errors or 0:>7}"
            )
        if not rows:
            print("  (no requests)")
    return 0


def cmd_logs(args) -> int:
    db = open_ledger_for_reading(args)
    rows = query_logs(db, args.limit)
    for row in reversed(rows):
        if args.json:
            print(json.dumps(row))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ts"]))
        tokens = f"{row['prompt_tokens'] or 0}+{row['completion_tokens'] or 0} tok"
        print(f"{when} {row['status']} {row['client_protocol']}->{row['provider'] or '-'} {row['lane'] or '-'} "
              f"{row['model_requested'] or '-'} {'stream ' if row['stream'] else ''}{tokens} "
              f"${row['cost_usd'] or 0:.5f} {row['latency_ms'] or 0:.0f}ms {row['error'] or ''}".rstrip())  # fmt: skip
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"serve": cmd_serve, "config": cmd_config, "usage": cmd_usage, "logs": cmd_logs}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"tgw: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
