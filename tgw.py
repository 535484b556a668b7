#!/usr/bin/env python3
"""tgw: a local LLM gateway in one file, standard library only.

One endpoint that speaks the OpenAI, Anthropic and Gemini APIs, translates between them,
routes each model to its provider and records every token in a sqlite ledger.

    python3 tgw.py serve              # 127.0.0.1:8081, the offline `loopback` model by default
    python3 tgw.py usage              # token and cost totals from the ledger
    python3 tgw.py logs               # the most recent requests
    python3 tgw.py config list        # effective configuration (secrets masked)
    python3 tgw.py user add a@b.c     # a team member; `tgw key create --user a@b.c` gives them a key
    python3 tgw.py chat               # an assistant that configures and troubleshoots it, online or offline
    python3 tgw.py start | status | stop   # the gateway in the background

Sections, in the order data flows:
    1. Utilities                 small helpers shared by everything below
    2. Config                    defaults < gateway.ini < TOKLIGENCE_* env < command-line flags,
                                 unknown-key warnings, live reload (SIGHUP, file changes)
    3. HTTP/1.1 wire             connections (one asyncio Protocol for both sides), the server,
                                 the upstream client with its pool, SSE parsing
    4. Canonical model           the hub every protocol converts to and from
    5. Codecs                    one per wire protocol: OpenAI Chat (+ legacy Completions),
                                 Anthropic Messages, OpenAI Responses, Gemini (+ JSON Schema
                                 cleaning for Gemini and for Anthropic's structured outputs)
    6. Providers                 upstream endpoints, auth headers, the loopback model
    7. Router                    model routes, aliases, work modes, model lists fetched from providers
    8. Pools and breakers        upstream accounts (keys), weights, circuit breakers, failover chains
    9. Ledger                    sqlite schema, background writer (rows sanitised, never lost),
                                 usage queries, prices, stored Responses (previous_response_id)
   10. Identity                  users, API keys, budgets, rate limits (in the ledger's database)
   11. Gateway                   endpoints and lanes (passthrough, translation, loopback), the
                                 attempt loop (retries, failover), auth, errors per protocol, loop
                                 guard, endpoint bundles and multiport listeners, serve()
   12. Observability             logs (queue thread, rotation, JSON, request ids) and
                                 Prometheus metrics (registry, GET /metrics)
   13. Admin API                 Tokligence Gateway's /api/v1/admin/* and /api/v1/usage/*
   14. CLI                       serve, config, usage, logs, user, key (chat, start, stop, status: 15 and 16)
   15. Gateway control           tgw start / stop / status: the daemon, its pid file and log, /health
   16. The chat assistant        model selection, tools, the offline assistant, the terminal loop

Find a thing by its protocol: `AnthropicCodec.encode_request`, `ResponsesStreamEncoder`,
`GeminiStreamDecoder`, ... Every codec converts to and from the canonical Request / Response /
stream events of section 4; see that section's comment for the event vocabulary.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import bisect
import calendar
import contextlib
import contextvars
import datetime
import difflib
import errno
import fnmatch
import functools
import gc
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

if sys.version_info < (3, 10):  # noqa: UP036 - before anything that needs 3.10 runs: one line, not a traceback
    sys.exit(f"tgw needs Python 3.10 or newer; this is Python {sys.version.split()[0]} ({sys.executable})")

__version__ = "0.1.0"
log = logging.getLogger("tgw")

# ======================================================================================
# 1. Utilities
# ======================================================================================


def _unserializable(value):
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps builds a new encoder for every call; this one is built once (compact, UTF-8 as is,
# no circular check: every body here is a fresh tree)
if json.encoder.c_make_encoder is not None:
    _encode = json.encoder.c_make_encoder(None, _unserializable, json.encoder.encode_basestring, None, ":", ",",
                                          False, False, True)  # fmt: skip

    def _dumps(obj) -> str:
        return "".join(_encode(obj, 0))
else:  # pragma: no cover - CPython without its C accelerator
    _dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def dumps(obj) -> bytes:
    """Compact JSON as UTF-8 bytes (the one JSON encoder on the wire)."""
    try:
        return _dumps(obj).encode()
    except UnicodeEncodeError:  # a lone surrogate from a client: keep it escaped
        return json.dumps(obj, separators=(",", ":")).encode()


def json_string(text: str) -> bytes:
    """dumps(text) for one string, with no tree built around it (the deltas of a stream)."""
    try:
        return json.encoder.encode_basestring(text).encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped, as dumps does
        return json.dumps(text).encode()


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN and Infinity; no peer does


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value == 0.0:  # false for inf (1e400 overflows to it) and nan
        return value
    raise ValueError(f"number {text[:40]} is out of range")


# NaN/Infinity literals and numbers that overflow to infinity are refused: they would be sent on
# as invalid JSON. The hooks cost nothing per document, only per literal (and per float).
_JSON_OPTIONS = {"parse_constant": _refuse_constant, "parse_float": _finite_float}
_scan_json = json.JSONDecoder(**_JSON_OPTIONS).scan_once


def loads(data):
    """JSON text (UTF-8 bytes or str) to Python (the one JSON decoder on the wire). A UTF-8
    document with no leading whitespace, the usual case, skips json.loads's encoding detection
    and whitespace handling; anything else goes to json.loads, so errors and edge cases are
    exactly its own. Every failure, too deep a document included, is a ValueError."""
    try:
        text = data.decode() if type(data) is bytes else data
        value, end = _scan_json(text, 0)
        if end == len(text) or not text[end:].strip(" \t\n\r"):  # JSON's whitespace, as curl -d @file sends
            return value
    except (StopIteration, ValueError, TypeError):
        pass
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    try:
        return json.loads(data, **_JSON_OPTIONS)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def string_or(value, default: str = "") -> str:
    """A field read from an upstream's answer that must be a string (an id, a text)."""
    return value if type(value) is str else default


def as_text(value) -> str:
    """Any JSON value as text for a message: a string as it is, anything else previewed (str()
    of a deep object would recurse without bound)."""
    return value if type(value) is str else json_preview(value, 200)


def object_or_empty(value) -> dict:
    """A field read from an upstream's answer that must be an object."""
    return value if type(value) is dict else {}


def json_preview(value, limit: int = 60) -> str:
    """A short, safe picture of a JSON value for an error message: never a walk of a big or
    deep tree (a container is named by its type and size)."""
    if isinstance(value, dict):
        return f"an object with {len(value)} keys" if value else "{}"
    if isinstance(value, list):
        return f"an array of {len(value)} items" if value else "[]"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit] + "…"
    return json.dumps(value)[: limit + 10]


def top_level_value(data: bytes, key: str):
    """The value of `key` in a compact JSON object, read from the end of the text: an answer's
    usage follows its content, so the content (a long completion, an embedding) is not parsed
    just to count tokens. None when that cannot be done; the caller then parses it all."""
    try:
        text = data.decode()
        at = text.rfind(f'"{key}":')
        if at < 0:
            return None
        value, end = _scan_json(text, at + len(key) + 3)
        # `"key":` outside a string is always a key; it is a top-level one when what follows
        # its value closes the object that ends the document
        rest = text[end:].rstrip(" \t\n\r")
        if rest == "}" or (rest[:1] == "," and _scan_json("{" + rest[1:], 0)[1] == len(rest)):
            return value
    except (StopIteration, ValueError):
        pass
    return None


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


class SecretRedactor:
    """Every secret this process knows (provider keys, client keys, userinfo in URLs), taken out
    of any text that leaves it. The one place, applied once per exit: error messages (every
    GatewayError, so every lane's JSON errors and stream error events), log records (a record
    factory, so every handler), ledger rows (the writer's sanitiser), CLI output (main() wraps
    stdout and stderr), and upstream error events relayed on passthrough. With no secret
    configured it costs one attribute test; the success hot path never calls it."""

    def __init__(self):
        self.secrets: set[str] = set()
        self.pattern: re.Pattern | None = None
        self.byte_pattern: re.Pattern | None = None
        self.lock = threading.Lock()  # config reloads run on a worker thread

    def add(self, *values: str) -> None:
        candidates = set()
        for value in values:
            if isinstance(value, str) and len(value.strip()) >= 6:
                candidates |= {value.strip(), unquote(value.strip())}  # as written in a URL, and as sent
        with self.lock:
            fresh = {v for v in candidates if len(v) >= 6} - self.secrets
            if fresh:
                self.secrets |= fresh
                longest_first = sorted(self.secrets, key=len, reverse=True)
                self.byte_pattern = re.compile(b"|".join(re.escape(s.encode()) for s in longest_first))
                self.pattern = re.compile("|".join(map(re.escape, longest_first)))

    def __call__(self, text: str) -> str:
        if self.pattern is None or not text:
            return text
        return self.pattern.sub(lambda m: f"[redacted {mask_secret(m.group())}]", text)

    def found_in(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(text) is not None

    def raw(self, data: bytes) -> bytes:
        """The same for raw bytes relayed as they are (an upstream's error event on passthrough)."""
        if self.byte_pattern is None or not data:
            return data
        return self.byte_pattern.sub(lambda m: f"[redacted {mask_secret(m.group().decode())}]".encode(), data)


redact = SecretRedactor()


def public_url(url: str) -> str:
    """A URL fit to show: any user:password@ replaced by ****@."""
    scheme, sep, rest = (url or "").partition("://")
    host, slash, path = rest.partition("/")
    if not sep or "@" not in host:
        return url
    return f"{scheme}://****@{host.rpartition('@')[2]}{slash}{path}"


_make_log_record = logging.getLogRecordFactory()


def redacting_log_record(*args, **kwargs) -> logging.LogRecord:
    """Every log record, of any logger for any handler, with the secrets taken out of its
    message and traceback (formatters use exc_text when it is set)."""
    record = _make_log_record(*args, **kwargs)
    if redact.pattern is None:
        return record
    if isinstance(record.args, dict):  # structured fields (the access line): each one, keeping the structure
        record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
    else:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it, as logging always does
            return record
        if redact.found_in(message):
            record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


logging.setLogRecordFactory(redacting_log_record)


# Caches keyed by a name a client chose (a model, a path, a key) remember it only up to this many characters:
# a longer one (model names may have 8192) is answered each time, so a cache holds kilobytes, not megabytes.
CACHED_NAME_MAX = 256


def key_fingerprint(key: str) -> str:
    """A stable, non-reversible id for an API key (what the ledger stores). Clients send the same
    key with every request, so short ones are remembered."""
    return _remembered_fingerprint(key) if len(key) <= CACHED_NAME_MAX else _fingerprint(key)


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12] if key else ""


def glob_match(pattern: str, name: str) -> bool:
    """Routes, prices and model limits ask the same questions per request: short names' answers are remembered."""
    return _remembered_match(pattern, name) if len(name) <= CACHED_NAME_MAX else _glob_match(pattern, name)


def _glob_match(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())


_remembered_fingerprint = functools.lru_cache(maxsize=1024)(_fingerprint)
_remembered_match = functools.lru_cache(maxsize=8192)(_glob_match)


def estimate_tokens(obj) -> int:
    """The one token estimator: about four characters a token over every string sent,
    a fixed cost for images, and a small overhead per message and tool. Given a raw body
    (bytes), four bytes a token over all of it, at no cost (what budgets reserve per call)."""
    if type(obj) is bytes:
        return max(1, math.ceil(len(obj) / 4))
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            if (
                item.get("type") in ("image", "image_url", "input_image")
                or "inlineData" in item
                or "inline_data" in item
            ):
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
        402: "billing_error",
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

    headers: tuple = ()  # extra response headers (rate-limit state, x-should-retry)

    def __init__(self, status: int, message: str, kind: str = "", retry_after: float | None = None):
        message = message if type(message) is str else json_preview(message, 200)  # an upstream's "message": {}
        message = redact(message)  # every error any lane sends or records passes here
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or self.KIND_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after


# What a walk over JSON of a shape nobody checked for raises: a wrong type, a missing key, a tree
# too deep, a number too big. The gateway answers these 400 (client) or 502 (upstream), never 500.
MALFORMED_INPUT = (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError, OverflowError)


class InvalidInput(GatewayError):
    """A 400 from a check on input. The codecs read requests and answers with the same helpers,
    so met while reading an upstream's answer it becomes a 502 (the upstream's fault)."""


def bad_request(message: str) -> GatewayError:
    return InvalidInput(400, message, "invalid_request_error")


def malformed_answer(what: str) -> GatewayError:
    return GatewayError(502, f"upstream sent a malformed answer: {what}")


def parse_json_body(body: bytes) -> dict:
    """Parse a request body that must be a JSON object, with errors a client can act on."""
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        data = loads(body)
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
    if type(value) is kind:  # the usual case, checked first
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        wanted = " or ".join(_TYPE_NAMES.get(k, "a number") for k in kinds)
        raise bad_request(f"'{name}' must be {wanted}, got {json_preview(value)}")
    return value


def field_at(obj: dict, name: str, kind, where: str, required: bool = False, default=None):
    """field_of for a nested field, naming it by its path ('messages[2].content[0].text')."""
    value = obj.get(name)
    if type(value) is kind:  # the usual case, checked first
        return value
    path = f"{where}.{name}" if where else name
    return field_of({path: value}, path, kind, required, default)


def string_list(value, where: str) -> list:
    """A JSON array of strings (stop sequences, allowed names), or the 400 naming the field."""
    if not isinstance(value, list) or not all(type(s) is str for s in value):
        raise bad_request(f"'{where}' must be an array of strings, got {json_preview(value)}")
    return value


def check_fields(body: dict, kinds: dict, required: tuple = ()) -> None:
    """Check the JSON type of every field in `kinds` at once, with field_of's errors: one pass
    over what the client sent, so a request pays for the fields it has, not for all it could."""
    for name in required:
        if body.get(name) is None:
            raise bad_request(f"'{name}' is required")
    for name, value in body.items():
        kind = kinds.get(name)
        if kind is not None and type(value) is not kind and value is not None:
            if kind is float and type(value) is int:  # an int where a number goes
                continue
            field_of(body, name, kind)  # the error naming the field


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
    "facade_port": (8081, "int", "port of the gateway's one endpoint (every protocol in facade_endpoints)"),
    "multiport_mode": (False, "bool", "also listen on admin_port, openai_port, anthropic_port, gemini_port (0 = off)"),
    "admin_port": (8079, "int", "multiport: port serving admin_endpoints"),
    "openai_port": (8082, "int", "multiport: port serving openai_endpoints"),
    "anthropic_port": (8083, "int", "multiport: port serving anthropic_endpoints"),
    "gemini_port": (8084, "int", "multiport: port serving gemini_endpoints"),
    "facade_endpoints": (
        "openai_core,openai_responses,anthropic,gemini_native,admin,health",
        "str",
        "bundles the facade port serves: openai_core, openai_responses, anthropic, gemini_native, admin, health",
    ),
    "openai_endpoints": ("openai_core,health", "str", "multiport: endpoint bundles of openai_port"),
    "anthropic_endpoints": ("anthropic,health", "str", "multiport: endpoint bundles of anthropic_port"),
    "gemini_endpoints": ("gemini_native,health", "str", "multiport: endpoint bundles of gemini_port"),
    "admin_endpoints": ("admin,health", "str", "multiport: endpoint bundles of admin_port"),
    "allow_public_bind": (False, "bool", "allow a non-loopback host while no api_keys are set"),
    "api_keys": ("", "secret", "comma-separated keys clients must present; empty = no client auth"),
    "auth": (
        "auto",
        ("auto", "on", "off"),
        "client keys: auto = required once api_keys or any 'tgw key create' key exists; on = always; off = never",
    ),
    "auth_disabled": (False, "bool", "Tokligence Gateway's switch: true means auth = off"),
    "default_rpm": (0, "int", "requests per minute for a key that sets none (0 = no limit)"),
    "default_tpm": (0, "int", "tokens per minute for a key that sets none (0 = no limit)"),
    "work_mode": ("auto", ("auto", "passthrough", "translation"), "auto: the model's provider decides"),
    "model_provider_routes": (DEFAULT_ROUTES, "str", "ordered model=>provider globs, first match wins"),
    "routes": ("", "str", "Tokligence's legacy pattern=>provider list; checked before model_provider_routes"),
    "model_aliases": (
        "",
        "str",
        "alias=>model pairs (= works too; globs allowed: claude*=>gpt-4o-mini), e.g. fast=>gpt-4o-mini",
    ),
    "model_aliases_file": ("", "str", "file of alias=>model lines (# comments), read after model_aliases"),
    "chat_to_anthropic": (False, "bool", "accepted from Tokligence; tgw always routes by model (claude* -> anthropic)"),
    "openai_api_key": ("", "secret", "key for the openai provider"),
    "openai_base_url": ("https://api.openai.com/v1", "url", "base URL of the openai provider"),
    "openai_org": ("", "str", "OpenAI-Organization header, if any"),
    "openai_responses_api": (
        "auto",
        ("auto", "on", "off"),
        "does the openai provider have /v1/responses (auto: only api.openai.com)",
    ),
    "anthropic_api_key": ("", "secret", "key for the anthropic provider"),
    "anthropic_base_url": ("https://api.anthropic.com", "url", "base URL of the anthropic provider"),
    "anthropic_version": ("2023-06-01", "str", "anthropic-version sent when the client sent none"),
    "gemini_api_key": ("", "secret", "key for the gemini provider"),
    "gemini_base_url": ("https://generativelanguage.googleapis.com", "url", "base URL of the gemini provider"),
    "anthropic_max_tokens": (16384, "int", "max_tokens sent to Anthropic when a translated request set none"),
    "openai_completion_max_tokens": (
        0,
        "int",
        "most max_tokens a translated request sends to an OpenAI-protocol provider (0: the model's own limit)",
    ),
    "reasoning_models": (
        "o1*,o3*,o4*,gpt-5*,gpt-oss*,*deepseek-r*,*qwq*,*thinking*",
        "str",
        "globs of OpenAI-protocol models that accept reasoning_effort",
    ),
    "chat_model": ("", "str", "model tgw chat talks to (a routed name or PROVIDER/MODEL); empty: the first one found"),
    "ledger_path": ("~/.tokligence/ledger.db", "str", "sqlite ledger file (WAL); ':memory:' keeps nothing"),
    "ledger_queue_size": (10000, "int", "rows buffered before requests wait for the ledger writer"),
    "log_level": ("info", ("debug", "info", "warning", "error"), "log level (stderr, and log_file when set)"),
    "log_format": ("text", ("text", "json"), "text lines, or one JSON object per line"),
    "log_file": ("", "str", "also log to this file, rotated daily (UTC) and by size: NAME-YYYY-MM-DD[-N].EXT"),
    "log_max_mb": (
        100.0,
        "float",
        "megabytes a log file may reach before the next one of the day starts "
        "(and the daemon's tgw.log before it becomes tgw.log.1)",
    ),
    "log_max_files": (14, "int", "rotated log files kept; older ones are deleted"),
    "access_log": (
        "errors",
        ("off", "errors", "all"),
        "one log line per request: none, answers >= 400 only, or all (log_level = debug logs all)",
    ),
    "max_body_bytes": (33554432, "int", "largest request body accepted (413 above)"),
    "max_header_bytes": (65536, "int", "largest request head accepted (431 above)"),
    "max_request_line": (16384, "int", "longest request line accepted (414 above)"),
    "header_timeout": (30.0, "float", "seconds a client may take to send a request head"),
    "idle_timeout": (900.0, "float", "seconds an idle keep-alive connection stays open (>= 120)"),
    "upstream_connect_timeout": (15.0, "float", "seconds to connect to an upstream (TCP, TLS, proxy)"),
    "upstream_first_byte_timeout": (600.0, "float", "seconds from a request sent to its answer's head"),
    "upstream_read_timeout": (600.0, "float", "seconds an upstream may stay silent between chunks of an answer"),
    "upstream_total_timeout": (3600.0, "float", "seconds a request may take upstream in all (attempts, waits, stream)"),
    "upstream_retries": (2, "int", "extra attempts on accounts already tried (a failed connect, a 429/5xx)"),
    "model_fallbacks": ("", "str", "pattern=>model pairs tried when a model's accounts fail; repeats chain in order"),
    "breaker_failures": (5, "int", "consecutive failures (connect, timeout, 5xx, 529) that open an account's breaker"),
    "breaker_cooldown": (5.0, "float", "seconds an open breaker keeps an account out; doubles each time it reopens"),
    "breaker_cooldown_max": (300.0, "float", "longest cooldown of an account"),
    "upstream_max_idle_per_origin": (128, "int", "idle keep-alive connections kept per upstream origin"),
    "upstream_max_idle": (512, "int", "idle keep-alive connections kept to all upstreams together"),
    "upstream_idle_expiry": (30.0, "float", "seconds an idle upstream connection is kept before it is closed"),
    "stream_keepalive": (15.0, "float", "seconds of upstream silence before the gateway pings a stream"),
    "shutdown_grace": (30.0, "float", "seconds in-flight requests (then the ledger) get to finish on SIGINT/SIGTERM"),
    "config_reload_interval": (
        2.0,
        "float",
        "seconds between checks of gateway.ini for changes, applied live (0: only on SIGHUP)",
    ),
    "responses_retention_days": (30.0, "float", "days stored Responses stay available to previous_response_id"),
    "loop_guard": (True, "bool", "stop a model that repeats the same tool call with the same result"),
    "loop_guard_window": (20, "int", "how many recent tool round trips the loop guard looks at"),
    "loop_guard_warn": (3, "int", "identical round trips in a row before the model is warned"),
    "loop_guard_stop": (5, "int", "identical round trips in a row before the request is refused"),
}

PROVIDER_KEYS = ("type", "base_url", "api_key", "models", "api_version", "headers", "responses_api")
# how a provider serves in a pool; accepted for the built-in providers too ([provider.openai] weight = 2),
# with `models` (globs it serves, sharing their pool with the named providers that serve them too)
POOL_KEYS = ("weight", "connect_timeout", "first_byte_timeout", "read_timeout", "total_timeout")
TIMEOUT_KINDS = ("connect", "first_byte", "read", "total")
PROVIDER_TYPES = ("openai", "azure", "anthropic", "gemini")


class ConfigError(Exception):
    pass


class StartupError(ConfigError):
    """The gateway cannot start (its port is taken, say): one line, exit code 1."""


def find_config_file(explicit: str | None, env=None) -> Path | None:
    """--config, then TOKLIGENCE_CONFIG, then ./gateway.ini, then ~/.tokligence/gateway.ini."""
    env = os.environ if env is None else env
    for candidate in (explicit, env.get("TOKLIGENCE_CONFIG")):
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
            unit = " of seconds" if key.endswith("_timeout") or "second" in CONFIG_KEYS.get(key, (0, 0, ""))[2] else ""
            raise ConfigError(f"invalid value {raw!r} for {where}: expected a number{unit}") from None
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
    """'a=>b, c=>d' (or 'a=b', as Tokligence accepts) as ordered pairs (routes, aliases); one
    or more per line, lines starting with # or ; are comments."""
    pairs = []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip()[:1] in ("#", ";"):
            continue
        where = f"{key} (line {number})" if len(lines) > 1 else key
        for item in line.split(","):
            item = item.strip()
            if not item:
                continue
            sep = "=>" if "=>" in item else "="
            if sep not in item:
                raise ConfigError(f"invalid entry {item!r} in {where}: expected 'pattern=>target'")
            left, right = (s.strip() for s in item.split(sep, 1))
            if not left or not right:
                raise ConfigError(f"invalid entry {item!r} in {where}: both sides of {sep!r} are needed")
            pairs.append((left, right))
    return pairs


def read_alias_file(name: str) -> list[tuple[str, str]]:
    """model_aliases_file: alias=>model lines, as Tokligence's model_aliases files have them."""
    if not name:
        return []
    path = Path(name).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"model_aliases_file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"model_aliases_file {path}: not UTF-8 text") from None
    return parse_pairs(text, f"model_aliases_file {path}")


# Tokligence Gateway settings tgw deliberately lacks, and what to do instead. A key in
# CONFIG_KEYS is never reported here, so a branch that adds one makes it known at once.
TOKLIGENCE_UNSUPPORTED = dict.fromkeys(
    ("environment", "base_url", "email", "display_name", "enable_provider", "marketplace_enabled",
     "telemetry_enabled", "publish_name", "model_family"),
    "Token Marketplace and telemetry settings; tgw has no marketplace and sends no telemetry",
) | dict.fromkeys(
    ("hooks_enabled", "hooks_script_path", "hooks_script_args", "hooks_script_env", "hooks_timeout", "hook_script",
     "hook_script_args", "hook_script_env", "hook_timeout"),
    "tgw runs no hook scripts; the ledger (tgw logs, tgw usage) records every request",
) | dict.fromkeys(
    ("anthropic_web_search", "anthropic_computer_use", "anthropic_mcp", "anthropic_prompt_caching",
     "anthropic_json_mode", "anthropic_reasoning", "anthropic_beta_header"),
    "nothing to switch on: the client's own tools, cache_control, thinking and anthropic-beta header go through",
) | dict.fromkeys(
    ("bridge_session_enabled", "bridge_session_ttl", "bridge_session_max_count"),
    "tgw keeps no bridge sessions; the loop guard (loop_guard, loop_guard_warn, loop_guard_stop) stops repeated "
    "tool calls",
) | dict.fromkeys(
    ("ledger_async_batch_size", "ledger_async_flush_ms", "ledger_async_buffer_size", "ledger_async_num_workers"),
    "tgw's ledger writer batches by itself; ledger_queue_size is how many rows it may hold",
) | dict.fromkeys(
    ("model_metadata_file", "model_metadata_url", "model_metadata_refresh"),
    "tgw knows each model family's output limit itself",
) | dict.fromkeys(
    ("sidecar_model_map", "sidecar_model_map_file"),
    "use model_aliases (globs allowed: claude*=gpt-4o-mini) and model_aliases_file",
) | dict.fromkeys(
    ("firewall_config", "prompt_firewall_config", "prompt_firewall_enabled", "prompt_firewall_mode",
     "prompt_firewall_sse_max_buffer_length", "prompt_firewall_sse_buffer_timeout_ms"),
    "tgw has no prompt firewall",
) | {
    "fallback_adapter": "a model that matches no route gets a 404 naming the routes; end model_provider_routes "
    "with *=>loopback (or another provider) for a fallback",
    "price_per_1k": "prices are per model, in [prices] (USD per million tokens)",
    "duplicate_tool_detection": "the loop guard does this (loop_guard, loop_guard_warn, loop_guard_stop)",
    "anthropic_native_enabled": "the Anthropic endpoints are always served",
    "anthropic_force_sse": "tgw streams when the client asks to",
    "anthropic_token_check_enabled": "max_tokens is fitted to each model's limit",
    "openai_tool_bridge_stream": "tool calls stream when the client asks to",
    "model_aliases_dir": "use model_aliases_file",
    "model_aliases_reload_sec": "tgw reloads gateway.ini and model_aliases_file when they change "
    "(config_reload_interval) and on SIGHUP",
    "model_aliases_verbose": "log_level = debug shows each request's model and provider",
    "responses_stream_mode": "Responses streams as the client asks",
    "responses_sse_ping_ms": "stream_keepalive sets the keep-alive interval (seconds)",
}  # fmt: skip
ENVIRONMENT_ONLY = {"config"}  # TOKLIGENCE_CONFIG names the file; it is no key of it


def warn_unknown_key(key: str, source: str, known=None) -> None:
    """An ignored key is never silent: Tokligence's unsupported ones say why, others name the
    closest known key (computed from CONFIG_KEYS now, so keys added anywhere are known)."""
    env = source == "environment"
    name = f"TOKLIGENCE_{key.upper()}" if env else key
    reason = TOKLIGENCE_UNSUPPORTED.get(key) if known is None else None
    if reason:
        log.warning(
            "%s (in %s) is a Tokligence Gateway setting tgw does not support, ignored: %s", name, source, reason
        )
        return
    close = difflib.get_close_matches(key, list(known or CONFIG_KEYS), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {('TOKLIGENCE_' + close[0].upper()) if env else close[0]!r}?"
    else:
        hint = "'tgw config example' lists every key"
    log.warning("unknown config key %s in %s, ignored; %s", name, source, hint)


@dataclass
class ProviderConfig:
    name: str
    type: str
    base_url: str
    api_key: str = ""
    models: list = field(default_factory=list)
    api_version: str = ""
    headers: dict = field(default_factory=dict)
    responses_api: bool = False
    weight: float = 1.0  # its share of a pool's requests
    timeouts: dict = field(default_factory=dict)  # connect/first_byte/read/total overrides, seconds


@dataclass
class Config:
    values: dict
    providers: dict  # name -> ProviderConfig (named [provider.*] sections)
    prices: dict  # model glob -> (input, output, cached input) USD per million tokens
    path: Path | None = None
    sources: dict = field(default_factory=dict)
    file_aliases: list = field(default_factory=list)  # (alias, model) pairs read from model_aliases_file
    loaded_with: tuple = (None, None, None)  # load_config's arguments, so a reload reads the same way
    # a built-in provider's pool settings from its [provider.NAME] section: {"weight", "timeouts", "models"}
    tuning: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, value in self.values.items():  # cfg.work_mode etc. as plain attributes (read per request)
            setattr(self, key, value)


def load_config(config_path: str | None = None, overrides: dict | None = None, env=None) -> Config:
    """Defaults < gateway.ini < TOKLIGENCE_* environment < overrides (command-line flags)."""
    env = os.environ if env is None else env
    values = {key: spec[0] for key, spec in CONFIG_KEYS.items()}
    sources = {key: "default" for key in CONFIG_KEYS}
    path = find_config_file(config_path, env)
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
                if not key.startswith("provider_") and not (source == "environment" and key in ENVIRONMENT_ONLY):
                    warn_unknown_key(key, source)
                continue
            values[key] = convert_value(key, raw, CONFIG_KEYS[key][1], source)
            sources[key] = source
    validate_config(values)
    file_aliases = read_alias_file(values["model_aliases_file"])
    tuning: dict[str, dict] = {}
    providers = load_named_providers(sections, env, tuning)
    register_secrets(values, providers, env)
    prices = dict(DEFAULT_PRICES)
    for glob_, raw in sections.get("prices", {}).items():
        prices[glob_] = parse_price(glob_, raw)
    return Config(values, providers, prices, path, sources, file_aliases, (config_path, overrides, env), tuning)


def split_keys(text: str) -> list[str]:
    """'k1, k2' as keys: a provider with several keys is a pool of accounts."""
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def register_secrets(values: dict, providers: dict, env=None) -> None:
    """Tell the redactor every secret this configuration holds."""
    found = [key for k in SECRET_KEYS for key in split_keys(values.get(k, ""))]  # comma lists are pools
    proxies = [v for k, v in (env or {}).items() if k.lower() in ("http_proxy", "https_proxy", "all_proxy")]
    for url in (
        [values[k] for k, spec in CONFIG_KEYS.items() if spec[1] == "url"]
        + proxies
        + [p.base_url for p in providers.values()]
    ):
        parts = urlsplit(url or "")
        found.append(parts.password or parts.username or "")  # a token may stand alone as the username
    for pc in providers.values():
        found += split_keys(pc.api_key)
        found += [v for k, v in pc.headers.items() if re.search(r"auth|key|token|secret", k, re.I)]
    redact.add(*found)


def validate_config(values: dict) -> None:
    for key in PORT_KEYS:
        if not 0 <= values[key] <= 65535:
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected a port from 0 to 65535")
    validate_multiport(values)
    for key in ("max_body_bytes", "max_header_bytes", "max_request_line", "ledger_queue_size", "log_max_mb",
                "log_max_files"):  # fmt: skip
        if not 0 < values[key] < math.inf:  # (nan and inf too: a size is a finite number)
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected a positive number")
    for key in ("default_rpm", "default_tpm"):
        if values[key] < 0:
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected 0 (no limit) or more")
    if values["idle_timeout"] < 120:
        raise ConfigError(f"invalid value {values['idle_timeout']!r} for idle_timeout: expected at least 120 seconds")
    for key in ("model_provider_routes", "routes", "model_aliases", "model_fallbacks"):
        parse_pairs(values[key], key)
    if values["anthropic_max_tokens"] < 1:
        raise ConfigError(
            f"invalid value {values['anthropic_max_tokens']!r} for anthropic_max_tokens: expected 1 or more"
        )
    for key in ("openai_completion_max_tokens", "config_reload_interval"):
        if values[key] < 0:
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected 0 or more")
    for key in ("breaker_failures", "upstream_max_idle_per_origin", "upstream_max_idle"):
        if values[key] <= 0:
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected a positive number")
    if not 0 <= values["upstream_retries"] <= 100:
        raise ConfigError(f"invalid value {values['upstream_retries']!r} for upstream_retries: expected 0 to 100")
    for key in ("upstream_connect_timeout", "upstream_first_byte_timeout", "upstream_read_timeout",
                "upstream_total_timeout", "breaker_cooldown", "breaker_cooldown_max", "upstream_idle_expiry"):  # fmt: skip
        if not values[key] > 0:
            raise ConfigError(f"invalid value {values[key]!r} for {key}: expected a positive number of seconds")


def pool_settings(items: dict, where: str) -> dict:
    """A [provider.NAME] section's weight and timeouts: {"weight": w, "timeouts": {kind: seconds}}."""
    weight = convert_value("weight", items.get("weight", "1"), "float", where)
    if not 0 < weight < 1e6:
        raise ConfigError(f"{where}: invalid weight {weight!r}; expected a positive number")
    timeouts = {}
    for kind in TIMEOUT_KINDS:
        if f"{kind}_timeout" in items:
            seconds = convert_value(f"{kind}_timeout", items[f"{kind}_timeout"], "float", where)
            if not seconds > 0:
                raise ConfigError(f"{where}: invalid {kind}_timeout {seconds!r}; expected a positive number of seconds")
            timeouts[kind] = seconds
    return {"weight": weight, "timeouts": timeouts}


def load_named_providers(sections: dict, env, tuning: dict | None = None) -> dict[str, ProviderConfig]:
    """Named providers from [provider.NAME] sections and TOKLIGENCE_PROVIDER_<NAME>_<KEY>; a section
    named after a built-in provider may only tune its pool settings (into `tuning`)."""
    raw: dict[str, dict[str, str]] = {}
    for section, items in sections.items():
        if section.startswith("provider."):
            raw[section[9:].strip().lower()] = dict(items)
    for key, value in env.items():
        m = re.fullmatch(r"TOKLIGENCE_PROVIDER_([A-Za-z0-9]+)_([A-Za-z_]+)", key)
        if m and m.group(2).lower() in PROVIDER_KEYS + POOL_KEYS + ("api_keys",):
            raw.setdefault(m.group(1).lower(), {})[m.group(2).lower()] = value
        elif m:
            warn_unknown_key(m.group(2).lower(), f"{key} in the environment", PROVIDER_KEYS)
    providers = {}
    for name, items in raw.items():
        where = f"[provider.{name}]"
        if name in ("openai", "anthropic", "gemini", "loopback"):
            if set(items) - {"models", *POOL_KEYS} or name == "loopback":
                raise ConfigError(
                    f"{where}: '{name}' is a built-in provider; configure it with {name}_* keys "
                    f"(this section may only set models, {', '.join(POOL_KEYS)})"
                )
            if tuning is not None:
                tuning[name] = pool_settings(items, where)
                tuning[name]["models"] = [m.strip() for m in items.get("models", "").split(",") if m.strip()]
            continue
        accepted = PROVIDER_KEYS + ("api_keys",) + POOL_KEYS
        unknown = set(items) - set(accepted)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; accepted: {', '.join(accepted)}")
        ptype = convert_value("type", items.get("type", "openai"), PROVIDER_TYPES, where)
        base_url = convert_value("base_url", items.get("base_url", ""), "url", where)
        if not base_url:
            raise ConfigError(f"{where}: base_url is required (for example http://127.0.0.1:11434/v1 for Ollama)")
        headers = parse_header_list(items.get("headers", ""), where)
        models = [m.strip() for m in items.get("models", "").split(",") if m.strip()]
        responses_api = convert_value("responses_api", items.get("responses_api", "false"), "bool", where)
        keys = ", ".join(split_keys(items.get("api_key", "")) + split_keys(items.get("api_keys", "")))
        pool = pool_settings(items, where)
        providers[name] = ProviderConfig(
            name, ptype, base_url.rstrip("/"), keys, models, items.get("api_version", ""), headers, responses_api,
            pool["weight"], pool["timeouts"],
        )  # fmt: skip
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
        "# Pools: several keys (api_keys = k1, k2, or a comma list in openai_api_key) are accounts",
        "# served in turn; providers whose models globs match the same model share its pool.",
        "# Each provider section (the built-in ones too: [provider.anthropic]) may set weight and",
        "# connect_timeout, first_byte_timeout, read_timeout, total_timeout (seconds); a built-in",
        "# one's section may also set models (to share a pool with named providers).",
        "# [provider.anthropic]",
        "# first_byte_timeout = 900",
        "",
        "# Prices in USD per million tokens: input, output[, cached input]. Globs, first match wins.",
        "# [prices]",
        "# gpt-4o-mini* = 0.15, 0.60, 0.075",
        "",
    ]
    return "\n".join(out)


# ---- live reload ------------------------------------------------------------------------
#
# A running gateway takes a changed gateway.ini (or model_aliases_file) without a restart: on
# SIGHUP, and when a check every config_reload_interval seconds sees a file's modification
# time, size or inode change. The file is read off the event loop; a file that does not load
# is refused with a logged error and the running configuration stays. Gateway.apply_config
# swaps in what can change live and names the changed keys that need a restart.

RESTART_KEYS = {"host", "allow_public_bind", "ledger_path", "multiport_mode"} | {  # read once, at start
    key
    for key in CONFIG_KEYS
    if key.endswith(("_port", "_endpoints"))  # the listeners
}


def changed_settings(old: Config, new: Config) -> list[str]:
    """The keys (and sections) whose effective value differs between two configurations."""
    changed = [key for key, value in new.values.items() if old.values.get(key) != value]
    for name, mine, theirs in (("[provider.*]", old.providers, new.providers), ("[prices]", old.prices, new.prices),
                               ("model_aliases_file contents", old.file_aliases, new.file_aliases)):  # fmt: skip
        if mine != theirs:
            changed.append(name)
    return changed


class ConfigWatcher:
    """Reloads the configuration of a running gateway (see above)."""

    SETTLE = 0.25  # seconds a changed file must stay unchanged before it is read

    def __init__(self, gateway, servers=()):
        self.gateway = gateway
        self.servers = servers  # the HttpServers (one per listener), whose limits and timeouts apply live
        self.lock = asyncio.Lock()
        self.seen = self.signature()

    def watched_files(self) -> list[Path]:
        cfg = self.gateway.cfg
        explicit, _, env = cfg.loaded_with
        files = [find_config_file(explicit, os.environ if env is None else env)]
        if cfg.model_aliases_file:
            files.append(Path(cfg.model_aliases_file).expanduser())
        return [f for f in files if f is not None]

    def signature(self) -> tuple:
        out = []
        for path in self.watched_files():
            try:
                st = path.stat()
                out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(path), None))
        return tuple(out)

    async def watch(self) -> None:
        """The periodic check: a few stat() calls off the event loop, every config_reload_interval.
        A change is read once the file holds still (one written in place is empty for a moment)."""
        while True:
            interval = self.gateway.cfg.config_reload_interval
            await asyncio.sleep(interval or 5.0)
            if not interval:
                continue
            changed = await asyncio.to_thread(self.signature)
            if changed == self.seen:
                continue
            await asyncio.sleep(self.SETTLE)
            if await asyncio.to_thread(self.signature) == changed:
                await self.reload("a file changed")

    async def reload(self, why: str) -> bool:
        async with self.lock:
            self.seen = await asyncio.to_thread(self.signature)
            try:
                cfg = await asyncio.to_thread(load_config, *self.gateway.cfg.loaded_with)
                changed, restart = self.gateway.apply_config(cfg)
            except ConfigError as exc:
                log.error("configuration reload (%s) refused, the running configuration stays: %s", why, exc)
                return False
            except Exception:  # a bug: the same, with its traceback
                log.exception("configuration reload (%s) failed, the running configuration stays", why)
                return False
            for server in self.servers:
                server.cfg = cfg
            live = [key for key in changed if key not in restart]
            if not changed:
                log.info("configuration reloaded (%s): nothing changed", why)
            else:
                log.warning("configuration reloaded (%s) from %s: applied %s%s", why, cfg.path or "the environment",
                            ", ".join(live) or "nothing",
                            f"; needs a restart (running with the old value until then): {', '.join(restart)}"
                            if restart else "")  # fmt: skip
            return True


# ======================================================================================
# 3. HTTP/1.1 wire: server connections, upstream client, SSE
# ======================================================================================

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    402: "Payment Required", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    409: "Conflict", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long", 422: "Unprocessable Content",
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


class Connection(asyncio.Protocol):
    """One TCP or TLS connection, read and written by one task: a client's to the server, or the
    upstream client's to a provider. It keeps the names and errors of asyncio's StreamReader and
    StreamWriter (readuntil, readexactly, read, write, drain; IncompleteReadError,
    LimitOverrunError, the connection's own error once it is lost), which take a dozen Python calls
    per read where this takes two. While more than twice `limit` bytes wait unread it stops reading
    from the socket, as theirs does; a read waiting for more starts it again. Every 64th readuntil
    lets the loop run other tasks first: reads answered from the buffer never wait, so a burst of
    tiny chunks (a chunked body, an upstream's stream; one line each) or of pipelined requests would
    otherwise hold the loop while it lasts."""

    def __init__(self, limit: int = 1 << 16):
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.high_water = 2 * limit
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False  # the peer sent its last byte (what is buffered can still be read)
        self.error: BaseException | None = None  # what ended the connection, raised instead of IncompleteReadError
        self.lost = False
        self.waiter: asyncio.Future | None = None  # the read waiting for bytes
        self.reading_paused = False
        self.writing_paused = False
        self.drained: asyncio.Future | None = None  # the drain waiting for the socket to take our bytes
        self.reads = 0  # readuntil calls, for the turns it gives other tasks

    # -- the event loop's calls
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        waiter = self.waiter
        if waiter is not None:  # (_wake, inline: this runs for every read from the socket)
            self.waiter = None
            if not waiter.done():  # (a cancelled read)
                waiter.set_result(None)
        if len(buffer) > self.high_water and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return self.transport.get_extra_info("sslcontext") is None  # TLS has no half-closed state

    def connection_lost(self, exc) -> None:
        self.eof = self.lost = True
        self.error = exc
        self._wake()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)  # the drain then raises

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _more(self) -> asyncio.Future:
        """What a read awaits for more bytes (or the end): a plain future, no coroutine."""
        if self.reading_paused:  # a read longer than the buffer's limit: the socket must be read
            self._resume()
        waiter = self.waiter = self.loop.create_future()
        return waiter

    def _resume(self) -> None:
        self.reading_paused = False
        self.transport.resume_reading()

    def _ended(self, expected: int | None) -> BaseException:
        """What a read that cannot be satisfied raises: the connection's error, or what came."""
        if self.error is not None:
            return self.error
        partial = bytes(self.buffer)
        self.buffer.clear()
        return asyncio.IncompleteReadError(partial, expected)

    # -- the task's calls (each takes its bytes in place: these run for every request)
    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        self.reads += 1
        if not self.reads & 63:  # others' turn (see above)
            await asyncio.sleep(0)
        buffer = self.buffer
        start = 0
        while (at := buffer.find(separator, start)) < 0:
            start = max(len(buffer) + 1 - len(separator), 0)  # (never search the same bytes twice)
            if start > self.limit:
                raise asyncio.LimitOverrunError("the separator is not found within the limit", start)
            if self.eof:
                raise self._ended(None)
            await self._more()
        if at > self.limit:
            raise asyncio.LimitOverrunError("the separator is found, but the chunk is longer than the limit", at)
        end = at + len(separator)  # (take's work, inline: two of these run for every request)
        data = bytes(buffer[:end])
        del buffer[:end]
        if self.reading_paused and len(buffer) <= self.limit:
            self._resume()
        return data

    def take(self, n: int) -> bytes | None:
        """`n` bytes if they are here already (the usual body came with its head), else None:
        no coroutine made, no await."""
        buffer = self.buffer
        if len(buffer) == n:  # all that came: one copy, not two
            data = bytes(buffer)
            buffer.clear()
        elif len(buffer) > n:
            data = bytes(buffer[:n])
            del buffer[:n]
        else:
            return None
        if self.reading_paused and len(buffer) <= self.limit:
            self._resume()
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if self.eof:
                raise self._ended(n)
            await self._more()
        return self.take(n)

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes, as soon as there are any; b"" at the end."""
        buffer = self.buffer
        while not buffer:
            if self.eof:
                if self.error is not None:
                    raise self.error
                return b""
            await self._more()
        return self.take(min(n, len(buffer)))

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the socket is behind (the peer reads slower than we write)."""
        if self.writing_paused and not self.lost:
            if self.drained is None or self.drained.done():
                self.drained = self.loop.create_future()
            await self.drained
        if self.lost:
            raise ConnectionResetError("connection lost")

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        self.transport.close()

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """TLS from here on (a proxy's tunnel): the loop gives the connection a new transport."""
        self.transport = await self.loop.start_tls(self.transport, self, context, server_hostname=server_hostname)


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


def has_bare_cr_lf_or_nul(lines: list) -> bool:
    """Does a head (split at its CRLFs) hold a CR or LF outside a CRLF pair, or a NUL? (Joining
    the lines it was split into is a third of the time of taking the CRLFs out of the text.)"""
    bare = "".join(lines)
    return "\r" in bare or "\n" in bare or "\0" in bare


COLONS = itertools.repeat(":")


def repeated_or_malformed_fields(fields: list[str]) -> dict[str, str]:
    """Header fields one by one: a repeated name's values joined (RFC 9110 5.3), a line that is
    not `name: value` a 400."""
    headers: dict[str, str] = {}
    for line in fields:
        name, sep, value = line.partition(":")
        if not sep or not name:
            raise HttpError(400, f"malformed header line {line[:60]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


def parse_request_head(head: bytes, max_request_line: int) -> HttpRequest:
    text = head.decode("latin-1").lstrip("\r\n")  # tolerate stray CRLFs between pipelined requests
    lines = text.split("\r\n")
    request_line = lines[0]
    if len(request_line) > max_request_line:
        raise HttpError(414, f"request line longer than {max_request_line} bytes")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isascii() or not parts[1]:
        raise HttpError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    method, target, version = parts
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if version.startswith("HTTP/"):
            raise HttpError(505, f"HTTP version {version} is not supported")
        raise HttpError(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    fields = lines[1:-2]  # (the head ends in CRLF CRLF: two empty strings after the last field)
    headers = {name.lower(): value.strip() for name, _, value in map(str.partition, fields, COLONS)}
    if len(headers) != len(fields) or "" in headers or not all(map(str.__contains__, fields, COLONS)):
        headers = repeated_or_malformed_fields(fields)  # (C-level checks above: the usual head has neither)
    names = "".join(headers)
    if " " in names or "\t" in names:  # a field name is a token: no whitespace in it, nor before its colon
        line = next(line for line in fields if " " in line.partition(":")[0] or "\t" in line.partition(":")[0])
        raise HttpError(400, f"malformed header line {line[:60]!r}")
    if has_bare_cr_lf_or_nul(lines):  # one could smuggle a header upstream
        raise HttpError(400, "malformed header line: a bare CR, LF or NUL")
    if target.startswith(("http://", "https://")):  # absolute-form: keep only the path
        target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
    if not target.startswith("/") and target != "*":
        raise HttpError(400, f"malformed request target {target[:60]!r}")
    path, _, query_text = target.partition("?")
    query = dict(parse_qsl(query_text, keep_blank_values=True)) if query_text else {}
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return HttpRequest(method, target, path, query, version, headers, b"", keep_alive)


async def read_request_body(conn: Connection, request: HttpRequest, max_body: int) -> bytes:
    headers = request.headers
    te = headers.get("transfer-encoding", "").lower()
    cl = headers.get("content-length")
    if te and cl is not None:
        raise HttpError(400, "both Transfer-Encoding and Content-Length were sent")
    if te and te != "chunked":
        raise HttpError(501, f"Transfer-Encoding {te!r} is not supported")
    length = 0
    if cl is not None:
        if not (cl.isascii() and cl.isdigit()):
            raise HttpError(400, f"invalid Content-Length {cl[:40]!r}")
        length = int(cl)
        if length > max_body:
            raise HttpError(413, f"request body of {length} bytes exceeds the limit of {max_body} bytes")
    if headers.get("expect", "").lower() == "100-continue" and (length or te):
        conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if te == "chunked":
        return await read_chunked_body(conn, max_body)
    return await conn.readexactly(length) if length else b""


async def read_chunked_body(conn: Connection, max_body: int) -> bytes:
    body = bytearray()  # one buffer, not a list: a list of 1-byte chunks costs ~50 bytes per byte of body
    while True:
        line = await conn.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF") or len(size_text) > 16:
            raise HttpError(400, f"malformed chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            while (await conn.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        if len(body) + size > max_body:
            raise HttpError(413, f"request body exceeds the limit of {max_body} bytes")
        body += await conn.readexactly(size)
        if await conn.readexactly(2) != b"\r\n":
            raise HttpError(400, "chunk not terminated by CRLF")


def response_head(status: int, headers: list[tuple[str, str]], lines_after: str = "") -> bytes:
    """A response head; `lines_after` is already formatted header lines, each ending in CRLF."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n" + lines_after + "\r\n").encode("latin-1")


class Exchange:
    """One request's response side: a whole body, or a chunked stream (SSE)."""

    __slots__ = ("writer", "request", "request_id", "status", "started", "finished", "streaming", "bytes_out",
                 "first_byte_at", "last_write_at", "close_after", "tags", "chunked")  # fmt: skip

    def __init__(self, writer: Connection, request: HttpRequest, request_id: str):
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
        self.tags = ""  # header lines saying which upstream answered (x-tgw-provider, ...), CRLF-ended
        self.chunked = True  # a stream's framing; an HTTP/1.0 client's stream ends at the close instead

    def _base_headers(self, content_type: str) -> list[tuple[str, str]]:
        headers = [("Content-Type", content_type), ("x-request-id", self.request_id)]
        if self.close_after:
            headers.append(("Connection", "close"))
        return headers

    def send(self, status: int, body: bytes, content_type: str = "application/json", extra=()) -> None:
        self.status = status
        self.started = self.finished = True
        if extra or self.close_after:
            headers = self._base_headers(content_type)
            headers.extend(extra)
            headers.append(("Content-Length", str(len(body))))
            payload = response_head(status, headers, self.tags)
        else:  # the common answer, formatted in one step
            reason = REASONS.get(status, "Status")
            payload = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nx-request-id: {self.request_id}\r\n"
                f"{self.tags}Content-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1")
        if self.request.method != "HEAD":
            payload += body
        self.first_byte_at = self.last_write_at = time.monotonic()
        self.writer.write(payload)

    def send_json(self, status: int, obj, extra=()) -> None:
        self.send(status, dumps(obj), "application/json", extra)

    def start_stream(self, status: int = 200, content_type: str = "text/event-stream", extra=()) -> None:
        if self.request.version == "HTTP/1.0":  # it cannot read chunked (RFC 9112 6.1): the close ends the body
            self.chunked = False
            self.close_after = True
        headers = self._base_headers(content_type)
        headers.append(("Cache-Control", "no-cache"))
        if self.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        headers.append(("X-Accel-Buffering", "no"))
        headers.extend(extra)
        self.status = status
        self.started = self.streaming = True
        self.writer.write(response_head(status, headers, self.tags))
        self.last_write_at = time.monotonic()

    def write(self, data: bytes) -> None:
        """Write one chunk of a stream (no await: callers drain at their own pace)."""
        if not data:
            return
        if not self.first_byte_at:
            self.first_byte_at = time.monotonic()
        self.last_write_at = time.monotonic()
        self.bytes_out += len(data)
        self.writer.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def keep_alive(self, payload: bytes) -> None:
        """A keep-alive in a stream: written like any chunk, but not the answer's first byte (the
        ledger's and the metrics' time to first token)."""
        first = self.first_byte_at
        self.write(payload)
        self.first_byte_at = first

    async def drain(self) -> None:
        if self.writer.transport.is_closing():
            raise ConnectionResetError("client went away")
        await self.writer.drain()

    def end_stream(self) -> None:
        if self.streaming and not self.finished and self.chunked:
            self.writer.write(b"0\r\n\r\n")
        self.finished = True


class ClientProtocol(Connection):
    """A client's connection: its task serves its requests in turn (HttpServer.serve_connection),
    and is cancelled when the client goes away mid-request, so the upstream request is cancelled
    too and its connection is not reused."""

    def __init__(self, server: HttpServer):
        super().__init__(server.cfg.max_header_bytes)
        self.handler_task: asyncio.Task | None = None
        self.busy = False
        self.server = server
        self.deadline = 0.0  # while waiting for a request head or body: when to give up on the client
        self.partial_since = 0.0
        self.reading_body = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.handler_task = self.loop.create_task(self.server.serve_connection(self))

    def expire(self, now: float) -> None:
        """Idle too long: close. Halfway through a head or body for too long (slow client): 408."""
        transport = self.transport
        if self.lost or (self.busy and not self.reading_body):
            return
        if self.buffer and not self.reading_body:  # a partial head
            since = self.partial_since or self.deadline - self.server.cfg.header_timeout
            if now - since < self.server.cfg.header_timeout:  # its first bytes came later than the deadline's start
                self.deadline = since + self.server.cfg.header_timeout
                return
        if self.reading_body or self.buffer:
            request_id = new_id("req_")
            transport.write(response_head(408, [("x-request-id", request_id), ("Content-Length", "0"),
                                                ("Connection", "close")]))  # fmt: skip
            self.server.count_refusal("", "", 408, request_id)
        self.deadline = 0.0
        transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.busy and not self.partial_since:  # the first bytes of a request head: its clock starts
            self.partial_since = now = time.monotonic()
            if not self.deadline or self.deadline > now + self.server.cfg.header_timeout:
                self.deadline = now + self.server.cfg.header_timeout
        Connection.data_received(self, data)

    def connection_lost(self, exc) -> None:
        Connection.connection_lost(self, exc)
        if self.busy and self.handler_task is not None and not self.handler_task.done():
            self.handler_task.cancel()

    def eof_received(self) -> bool:
        """The client closed its side while its request is in flight: it is gone, so stop
        (and stop paying for) the upstream call too."""
        keep_open = Connection.eof_received(self)
        return keep_open and not self.busy


class HttpServer:
    """HTTP/1.1 on asyncio, a Connection per client: keep-alive, pipelining (answered in order),
    chunked and Content-Length bodies, 100-continue, HEAD, limits and timeouts, graceful drain."""

    def __init__(self, cfg: Config, handler, error_body=None):
        self.cfg = cfg
        self.handler = handler  # async (request, exchange) -> None
        self.error_body = error_body  # (path, GatewayError) -> bytes, the error in the client's envelope
        self.refused = None  # (method, path, status, request id) of a request refused here (Telemetry.request_refused)
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[ClientProtocol] = set()
        self.draining = False
        self.watchdog = Watchdog(min(1.0, cfg.header_timeout / 4))

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: ClientProtocol(self), host, port, backlog=1024)
        self.watchdog.start()
        return self.server.sockets[0].getsockname()[1]

    async def serve_connection(self, conn: ClientProtocol) -> None:
        self.connections.add(conn)
        self.watchdog.entries.add(conn)
        transport = conn.transport
        limit = self.cfg.header_timeout
        try:
            while not self.draining:
                conn.deadline = time.monotonic() + limit
                conn.partial_since = 0.0
                try:
                    head = await conn.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        self._reject(conn, HttpError(400, "connection closed in the middle of a request head"))
                    return
                except asyncio.LimitOverrunError:
                    self._reject(conn, HttpError(431, f"request head exceeds {self.cfg.max_header_bytes} bytes"))
                    return
                limit = self.cfg.idle_timeout
                conn.busy = True
                request = None
                try:
                    request = parse_request_head(head, self.cfg.max_request_line)
                    headers = request.headers
                    length = headers.get("content-length", "")
                    size = int(length) if length.isascii() and length.isdigit() else -1
                    # a body gets header_timeout plus a second per MB before the client counts as stuck
                    if 0 <= size <= self.cfg.max_body_bytes and not (
                        "transfer-encoding" in headers or "expect" in headers
                    ):
                        body = conn.take(size)  # the usual request: its body came with its head
                        if body is None:
                            conn.reading_body = True
                            conn.deadline = time.monotonic() + self.cfg.header_timeout + size / 1e6
                            body = await conn.readexactly(size)
                        request.body = body
                    else:  # chunked, 100-continue, or an error to answer
                        conn.reading_body = True
                        conn.deadline = time.monotonic() + self.cfg.header_timeout + self.cfg.max_body_bytes / 1e6
                        request.body = await read_request_body(conn, request, self.cfg.max_body_bytes)
                    conn.reading_body = False
                    conn.deadline = 0.0
                except HttpError as exc:
                    self._reject(conn, exc, request)
                    return
                except asyncio.IncompleteReadError:
                    return  # the body was cut short: the client is gone, nobody to answer
                except asyncio.LimitOverrunError:
                    self._reject(conn, HttpError(400, "malformed chunked body"))
                    return
                exchange = Exchange(conn, request, request_id_of(request))
                if self.draining:
                    exchange.close_after = True
                await self.handler(request, exchange)
                conn.busy = False
                if exchange.close_after or transport.is_closing():
                    break
                if transport.get_write_buffer_size() > 65536:
                    await conn.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            conn.busy = False
            self.connections.discard(conn)
            self.watchdog.entries.discard(conn)
            if not transport.is_closing():
                try:
                    await conn.drain()
                except (ConnectionError, asyncio.CancelledError):
                    pass
                transport.close()

    def _reject(self, conn: Connection, exc: HttpError, request: HttpRequest | None = None) -> None:
        """Answer a broken request (in the protocol its path speaks, when known) and close. It
        has a request id like any, and the metrics and the access log count it (`refused`)."""
        path = request.path if request is not None else ""
        request_id = request_id_of(request) if request is not None else new_id("req_")
        if self.error_body is not None:
            body = self.error_body(path, GatewayError(exc.status, exc.message))
        else:
            body = dumps({"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.status}})
        headers = [("Content-Type", "application/json"), ("x-request-id", request_id), ("Content-Length", str(len(body))),
                   ("Connection", "close")]  # fmt: skip
        conn.write(response_head(exc.status, headers) + body)
        self.count_refusal(request.method if request is not None else "", path, exc.status, request_id)

    def count_refusal(self, method: str, path: str, status: int, request_id: str) -> None:
        if self.refused is not None:
            self.refused(method, path, status, request_id)

    async def drain_and_close(self, grace: float, on_cut=None) -> None:
        """Stop accepting, close idle keep-alive connections, let busy ones finish; at the
        deadline call `on_cut` and cancel what is still running."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + grace
        while True:
            for protocol in list(self.connections):
                if not protocol.busy:
                    protocol.transport.close()
            if not any(p.busy for p in self.connections) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        tasks = [p.handler_task for p in self.connections if p.handler_task is not None and not p.handler_task.done()]
        if tasks and on_cut is not None:
            on_cut()
        for task in tasks:
            task.cancel()
        if tasks:  # let them record their ledger rows before the ledger closes
            await asyncio.wait(tasks, timeout=5)
        self.watchdog.stop()


# ---- upstream client ------------------------------------------------------------------


@dataclass(slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    proxy: tuple | None  # (host, port, proxy-authorization or "") when a proxy applies
    key: tuple = field(init=False, compare=False)  # the pool's key for its idle connections: all of the above

    def __post_init__(self):
        self.key = (self.scheme, self.host, self.port, self.proxy)


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


UPSTREAM_MAX_CHUNK = 64 << 20  # one chunk of a chunked upstream body is buffered whole
WHOLE_FROM_STREAM_MAX = 16 << 20  # bytes of stream folded into one answer for a client that asked for no stream
UPSTREAM_INFLATE_STEP = 1 << 20  # a compressed body is inflated a MB a turn: 64 MB at once held the loop 0.3 s


@dataclass(frozen=True, slots=True)
class Timeouts:
    """An upstream's four timeouts in seconds. Each one names itself in the error it causes."""

    connect: float = 15.0  # TCP, TLS and a proxy's CONNECT
    first_byte: float = 600.0  # from the request written to the answer's head
    read: float = 600.0  # silence between chunks of the answer's body
    total: float = 3600.0  # the whole request: every attempt, every wait, the whole stream


def upstream_timeout(which: str, host: str, seconds: float) -> GatewayError:
    """The 504 of one timeout, saying which fired (connect, first-byte, read or total)."""
    what = {
        "connect": f"timed out connecting to upstream {host} after {seconds:g} s",
        "first-byte": f"upstream {host} did not answer within {seconds:g} s",
        "read": f"upstream {host} sent nothing for {seconds:g} s mid-answer",
        "total": f"upstream {host} had not finished when the total timeout of {seconds:g} s ran out",
    }[which]
    return (UpstreamUnreached if which == "connect" else GatewayError)(504, f"{what} ({which} timeout)")


class Unanswered(Exception):
    """An upstream's stream opened with an error before any content: it said no, and nothing
    has reached the client, so the request may still go elsewhere."""

    def __init__(self, error: GatewayError):
        super().__init__(error.message)
        self.error = error


class UpstreamUnreached(GatewayError):
    """No connection to the upstream could be made: the request never left, so sending it again
    (or elsewhere) cannot run it twice."""


def body_decoder(encoding: str):
    """The decompressor of a Content-Encoding (gzip, deflate), or None for any other."""
    encoding = encoding.lower()
    if encoding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    return zlib.decompressobj() if encoding == "deflate" else None


class UpstreamResponse:
    """An upstream answer whose body is read as it arrives (de-chunked, gunzipped)."""

    __slots__ = ("pool", "timeouts", "end_by", "origin", "conn", "status", "headers", "event_stream", "chunked",
                 "remaining", "done", "reusable", "decoder", "deadline", "timed_out")  # fmt: skip

    def __init__(self, pool, origin, conn: Connection, status, headers, method, timeouts: Timeouts, end_by: float):
        self.pool = pool
        self.timeouts = timeouts
        self.end_by = end_by  # the request's total deadline (monotonic)
        self.origin = origin
        self.conn: Connection | None = conn  # None once given back to the pool or closed
        self.status = status
        self.headers = headers
        get = headers.get
        self.event_stream = "text/event-stream" in get("content-type", "")
        self.chunked = chunked = "chunked" in get("transfer-encoding", "").lower()
        cl = get("content-length", "")
        self.remaining = remaining = int(cl) if cl.isdigit() and cl.isascii() and not chunked else -1
        self.done = remaining == 0 or method == "HEAD" or status in (204, 304)
        # a body that runs until the connection closes leaves no connection to reuse
        self.reusable = (chunked or remaining >= 0) and "close" not in get("connection", "").lower()
        self.decoder = body_decoder(headers["content-encoding"]) if "content-encoding" in headers else None
        self.deadline = 0.0
        self.timed_out = ""  # which timeout cut the body: "read" or "total"

    def expire(self, now: float) -> None:
        self.timed_out = "total" if now >= self.end_by else "read"
        self.deadline = 0.0
        if self.conn is not None:
            self.conn.transport.abort()

    def _arm(self) -> None:
        """Wait for the next piece of body: for the read timeout, or what is left of the total."""
        deadline = time.monotonic() + self.timeouts.read
        self.deadline = deadline if deadline < self.end_by else self.end_by
        self.pool.watchdog.entries.add(self)

    async def _raw_chunk(self) -> bytes:
        conn = self.conn
        if self.chunked:
            line = await conn.readuntil(b"\r\n")
            size_text = line.split(b";", 1)[0].strip()
            if size_text.strip(b"0123456789abcdefABCDEF") or len(size_text) > 16:  # int() takes -5, 0x10, 1_0
                self.close()
                raise GatewayError(502, f"upstream {self.origin.host} sent a malformed chunk size {size_text[:20]!r}")
            size = int(size_text or b"0", 16)
            if size > UPSTREAM_MAX_CHUNK:  # read whole before anything is checked: bound it
                self.close()
                raise GatewayError(502, f"upstream {self.origin.host} sent a chunk of {size} bytes")
            if size == 0:
                while (await conn.readuntil(b"\r\n")) != b"\r\n":
                    pass
                self.done = True
                return b""
            data = await conn.readexactly(size)
            await conn.readexactly(2)
            return data
        if self.remaining >= 0:
            # the usual JSON answer is read whole in one step; a stream goes on as it arrives, even
            # one sent with a Content-Length (some servers and caching proxies do)
            if self.remaining <= 1 << 20 and not self.event_stream:
                data = await conn.readexactly(self.remaining)
            else:
                data = await conn.read(min(self.remaining, 1 << 18))
            if not data:
                raise asyncio.IncompleteReadError(b"", self.remaining)
            self.remaining -= len(data)
            if self.remaining == 0:
                self.done = True
            return data
        data = await conn.read(262144)
        if not data:
            if self.timed_out:  # the watchdog cut it: not a complete body
                raise asyncio.IncompleteReadError(b"", None)
            self.done = True
        return data

    async def next_chunk(self) -> bytes:
        """The next piece of the decoded body; b"" at the end."""
        watchdog = self.pool.watchdog
        while self.decoder is not None and self.decoder.unconsumed_tail:  # the rest of a piece that inflates large
            await asyncio.sleep(0)  # others' turn between slices
            if data := self._inflate(self.decoder.unconsumed_tail):
                return data
        while not self.done:
            self._arm()
            try:
                data = await self._raw_chunk()
            except asyncio.CancelledError:
                self.close()  # the client went away: never reuse a half-read connection
                raise
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, OSError) as exc:
                raise self._broken(exc) from None
            except asyncio.LimitOverrunError:  # a chunk-size or trailer line past the buffer's limit
                self.close()
                raise GatewayError(502, f"upstream {self.origin.host} sent a malformed chunked body") from None
            finally:
                watchdog.entries.discard(self)
            if self.decoder is not None and data:
                data = self._inflate(data)
            if data:
                return data
        self.release()
        return b""

    def _inflate(self, data: bytes) -> bytes:
        """At most UPSTREAM_INFLATE_STEP bytes of decoded body; the rest waits in unconsumed_tail
        (a compression bomb is never inflated all at once; read()'s limit bounds the whole)."""
        try:
            return self.decoder.decompress(data, UPSTREAM_INFLATE_STEP)
        except zlib.error:
            self.close()
            raise GatewayError(502, f"upstream {self.origin.host} sent a corrupt compressed body") from None

    async def read(self, limit: int = 256 * 1024 * 1024) -> bytes:
        remaining = self.remaining
        if 0 < remaining <= limit and remaining <= 1 << 20 and self.decoder is None and not self.done:
            data = self.conn.take(remaining)  # the usual answer: its body came with its head
            return self._read_to_end(data) if data is not None else await self._read_whole()
        body = bytearray()  # one buffer: a list of an upstream's 1-byte chunks costs ~50 bytes per byte
        while data := await self.next_chunk():
            body += data
            if len(body) > limit:
                self.close()
                raise GatewayError(502, "upstream response too large")
        return bytes(body)

    async def _read_whole(self) -> bytes:
        """The usual JSON answer: one Content-Length body, read in one step."""
        watchdog = self.pool.watchdog
        self._arm()
        try:
            data = await self.conn.readexactly(self.remaining)
        except asyncio.CancelledError:
            self.close()
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise self._broken(exc) from None
        finally:
            watchdog.entries.discard(self)
        return self._read_to_end(data)

    def _read_to_end(self, data: bytes) -> bytes:
        """The whole body has been read: the connection goes back to the pool."""
        self.remaining = 0
        self.done = True
        self.release()
        return data

    def _broken(self, exc: Exception) -> GatewayError:
        """The body could not be read: close the connection and say why."""
        self.close()
        if self.timed_out:
            seconds = self.timeouts.total if self.timed_out == "total" else self.timeouts.read
            return upstream_timeout(self.timed_out, self.origin.host, seconds)
        return GatewayError(
            502, f"upstream {self.origin.host} closed the connection mid-response ({type(exc).__name__})"
        )

    def release(self):
        """Give the connection back to the pool if the body was read to its end."""
        conn = self.conn
        if conn is None:
            return
        # bytes past the body's end: its framing was off, and the next answer would be read from them
        if self.done and self.reusable and not conn.buffer and not conn.transport.is_closing():
            self.pool.keep(self.origin.key, conn)
        else:
            conn.transport.abort()
        self.conn = None

    def close(self):
        """Abandon the response: the connection is closed, never reused."""
        if self.conn is not None:
            self.conn.transport.abort()
            self.conn = None


class UpstreamPool:
    """One HTTP/1.1 client: keep-alive pool per origin, TLS with verification, proxies. Idle
    connections are capped per origin and in total, and closed when they expire or the
    upstream closes them (no CLOSE_WAIT pile-up); one watchdog enforces every timeout."""

    def __init__(self, connect_timeout: float = 15.0, read_timeout: float = 600.0, first_byte_timeout: float = 0.0,
                 total_timeout: float = 3600.0, max_idle_per_origin: int = 128, max_idle: int = 512,
                 idle_expiry: float = 30.0):  # fmt: skip
        self.timeouts = Timeouts(connect_timeout, first_byte_timeout or read_timeout, read_timeout, total_timeout)
        self.watchdog = Watchdog(min(1.0, min(self.timeouts.first_byte, read_timeout) / 4))
        self.idle: dict[tuple, list] = {}  # origin key -> [(connection, idle since)], most recent last
        self.idle_count = 0
        self.max_idle_per_origin = max_idle_per_origin
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self.sweeper = _IdleSweep(self)
        self.watchdog.entries.add(self.sweeper)
        self._ssl: ssl.SSLContext | None = None
        self._origins: dict[str, tuple[Origin, str]] = {}
        self._heads: dict[tuple, tuple[dict, bytes]] = {}

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

    async def _connect(self, origin: Origin, timeouts: Timeouts, end_by: float):
        """A new connection, or UpstreamUnreached: within the connect timeout (and what is left
        of the total)."""
        host, port = (origin.proxy[0], origin.proxy[1]) if origin.proxy else (origin.host, origin.port)
        tls = origin.scheme == "https"
        left = end_by - time.monotonic()
        limit = min(timeouts.connect, max(left, 0.001))
        loop = asyncio.get_running_loop()
        try:
            if origin.proxy and tls:
                _, conn = await asyncio.wait_for(loop.create_connection(Connection, host, port), limit)
                try:
                    await self._tunnel(origin, conn, limit)
                    await asyncio.wait_for(conn.start_tls(self.ssl_context, origin.host), limit)
                except BaseException:
                    conn.transport.abort()  # never leak the proxy connection
                    raise
            else:
                ctx = self.ssl_context if tls else None
                opener = loop.create_connection(Connection, host, port, ssl=ctx,
                                                server_hostname=origin.host if tls else None)  # fmt: skip
                _, conn = await asyncio.wait_for(opener, limit)
        except asyncio.TimeoutError:
            which = "connect" if timeouts.connect <= left else "total"
            err = upstream_timeout(which, f"{origin.host}:{origin.port}", getattr(timeouts, which))
            raise UpstreamUnreached(err.status, err.message) from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamUnreached(
                502, f"TLS certificate of upstream {origin.host} failed verification: {exc.verify_message}"
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UpstreamUnreached(502, f"cannot connect to upstream {origin.host}:{origin.port}: {reason}") from None
        sock = conn.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def _tunnel(self, origin: Origin, conn: Connection, limit: float):
        auth = f"Proxy-Authorization: {origin.proxy[2]}\r\n" if origin.proxy[2] else ""
        conn.write(
            f"CONNECT {origin.host}:{origin.port} HTTP/1.1\r\nHost: {origin.host}:{origin.port}\r\n{auth}\r\n".encode()
        )
        try:
            head = await asyncio.wait_for(conn.readuntil(b"\r\n\r\n"), limit)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            conn.close()
            raise OSError(0, "the proxy closed the connection during CONNECT") from None
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
        if status != b"200":
            conn.close()
            first_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            raise OSError(0, f"proxy refused CONNECT ({first_line})")

    async def request(self, method: str, url: str, headers: dict, body: bytes = b"", timeouts: Timeouts | None = None,
                      end_by: float = 0.0) -> UpstreamResponse:  # fmt: skip
        """Send one request and read its answer's head. A connection that could not be made is
        UpstreamUnreached; `end_by` (monotonic) is the request's total deadline."""
        timeouts = timeouts or self.timeouts
        end_by = end_by or time.monotonic() + timeouts.total
        origin, _ = self.parse_url(url)
        # keyed by the headers' identity (callers pass shared dicts they never change); the entry
        # holds the dict, so its id cannot be reused while cached
        key = (method, url, id(headers))
        cached = self._heads.get(key)
        if cached is not None and cached[0] is headers:
            head = cached[1]
        else:
            head = self._request_head(method, url, headers)
            if len(self._heads) >= 1024:
                self._heads.clear()
            self._heads[key] = (headers, head)
        if body or method in ("POST", "PUT", "PATCH"):
            payload = b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)
        else:
            payload = head + b"\r\n"
        idle = self.idle.get(origin.key)
        while idle:
            conn, _ = idle.pop()
            self.idle_count -= 1
            if conn.transport.is_closing() or conn.eof or conn.buffer:  # (bytes sent while idle answer nothing)
                conn.transport.abort()
                continue
            try:
                return await self._exchange(origin, conn, payload, method, timeouts, end_by)
            except _StaleConnection:
                continue  # the server closed a pooled connection; nothing was processed
        conn = await self._connect(origin, timeouts, end_by)
        try:
            return await self._exchange(origin, conn, payload, method, timeouts, end_by)
        except _StaleConnection:
            raise GatewayError(502, f"upstream {origin.host} closed the connection without answering") from None

    def _request_head(self, method: str, url: str, headers: dict) -> bytes:
        """A request's head without Content-Length (the same for every request with these
        headers, so it is built once and cached)."""
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
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def _exchange(
        self, origin, conn: Connection, payload, method, timeouts, end_by, interim: int = 0
    ) -> UpstreamResponse:
        self.watchdog.start()
        first_byte_by = time.monotonic() + timeouts.first_byte
        waiting = _HeadWait(conn, first_byte_by if first_byte_by < end_by else end_by)  # (min() costs more)
        timed_out = waiting.fired
        self.watchdog.entries.add(waiting)
        try:
            conn.transport.write(payload)
            head = await conn.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            conn.transport.abort()
            if timed_out:
                raise self._head_timeout(origin, timeouts, first_byte_by, end_by) from None
            if not exc.partial:
                raise _StaleConnection() from None
            raise GatewayError(502, f"upstream {origin.host} sent a truncated response head") from None
        except (ConnectionError, OSError):
            conn.transport.abort()
            if timed_out:
                raise self._head_timeout(origin, timeouts, first_byte_by, end_by) from None
            raise _StaleConnection() from None
        except asyncio.LimitOverrunError:
            conn.transport.abort()
            raise GatewayError(502, f"upstream {origin.host} sent an oversized response head") from None
        except asyncio.CancelledError:
            conn.transport.abort()
            raise
        finally:
            self.watchdog.entries.discard(waiting)
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        if has_bare_cr_lf_or_nul(lines):  # never let one reach a client's response head
            if "\r" in "".join(lines) or "\0" in text:
                conn.transport.abort()
                raise GatewayError(502, f"upstream {origin.host} sent a malformed response head (a bare CR or NUL)")
            lines = [line.removesuffix("\r") for line in text.split("\n")]  # a bare LF ends a line (RFC 9112 2.2)
        status_parts = lines[0].split(" ", 2)
        code = status_parts[1] if len(status_parts) > 1 else ""
        if not (len(code) == 3 and code.isascii() and code.isdigit() and "100" <= code < "600") or not (
            status_parts[0].startswith("HTTP/1.")
        ):
            conn.transport.abort()
            raise GatewayError(502, f"upstream {origin.host} did not speak HTTP/1.1")
        # lenient with what an upstream sends: a line that is no field is skipped, a repeated name's last value kept
        headers = {name.strip().lower(): value.strip() for name, sep, value in map(str.partition, lines[1:], COLONS)
                   if sep}  # fmt: skip
        status = int(code)
        if status < 200 and status != 101 and interim < 8:  # 100 Continue, 103 Early Hints: the real head follows
            return await self._exchange(origin, conn, b"", method, timeouts, end_by, interim + 1)
        if status < 200:
            conn.transport.abort()
            raise GatewayError(502, f"upstream {origin.host} answered {status} and no final response")
        return UpstreamResponse(self, origin, conn, status, headers, method, timeouts, end_by)

    @staticmethod
    def _head_timeout(origin, timeouts: Timeouts, first_byte_by: float, end_by: float) -> GatewayError:
        if first_byte_by <= end_by:
            return upstream_timeout("first-byte", origin.host, timeouts.first_byte)
        return upstream_timeout("total", origin.host, timeouts.total)

    def keep(self, key: tuple, conn: Connection) -> None:
        """Pool a connection whose answer was read to its end, within the idle caps."""
        conns = self.idle.get(key)
        if conns is None:
            conns = self.idle[key] = []
        if len(conns) >= self.max_idle_per_origin or self.idle_count >= self.max_idle:
            conn.transport.abort()
            return
        conns.append((conn, time.monotonic()))
        self.idle_count += 1
        if not self.sweeper.deadline:
            self.sweeper.deadline = time.monotonic() + self.sweeper.interval()

    def sweep_idle(self, now: float) -> None:
        """Close idle connections that expired or that the upstream closed (their reader saw EOF:
        left alone they would sit in CLOSE_WAIT)."""
        oldest = now - self.idle_expiry
        for key, conns in list(self.idle.items()):
            kept = []
            for entry in conns:
                conn, since = entry
                if since < oldest or conn.eof or conn.transport.is_closing():
                    conn.transport.abort()
                else:
                    kept.append(entry)
            self.idle_count -= len(conns) - len(kept)
            conns[:] = kept  # in place: a request popping from this list meanwhile sees the same one
            if not kept:
                del self.idle[key]

    def close(self):
        self.watchdog.stop()
        for conns in self.idle.values():
            for conn, _ in conns:
                conn.transport.abort()
        self.idle.clear()
        self.idle_count = 0


class _IdleSweep:
    """The watchdog entry that sweeps the idle connections (about once a second while any are idle)."""

    __slots__ = ("pool", "deadline")

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.deadline = 0.0

    def interval(self) -> float:
        return min(1.0, self.pool.idle_expiry / 2)

    def expire(self, now: float) -> None:
        self.pool.sweep_idle(now)
        self.deadline = now + self.interval() if self.pool.idle_count else 0.0


class _StaleConnection(Exception):
    pass


class _HeadWait:
    """A request waiting for its response head: aborted by the watchdog when too late."""

    __slots__ = ("conn", "deadline", "fired")

    def __init__(self, conn: Connection, deadline: float):
        self.conn = conn
        self.deadline = deadline
        self.fired: list = []

    def expire(self, now: float) -> None:
        self.fired.append(now)
        self.deadline = 0.0
        self.conn.transport.abort()


# ---- SSE ------------------------------------------------------------------------------


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str
    raw: bytes  # the event's bytes, normalised to LF, with its blank-line terminator


SSE_MAX_EVENT_BYTES = 16 << 20  # an upstream event larger than this ends the stream with a 502


class SSEParser:
    """Incremental text/event-stream parser: CRLF/CR/LF line ends, multi-line data,
    comments, and UTF-8 characters split across network reads (bytes are decoded only
    once an event is complete). Linear in what it is fed: each read is normalised and
    searched once (never the whole buffer again), and an event may not outgrow max_event."""

    __slots__ = ("buffer", "max_event")

    def __init__(self, max_event: int = SSE_MAX_EVENT_BYTES):
        self.buffer = bytearray()  # the unfinished event, LF line ends (a last CR held back)
        self.max_event = max_event

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        return [event for raw in self.feed_raw(chunk) if (event := self.parse(raw)) is not None]

    def feed_lazily(self, chunk: bytes):
        """The events `chunk` completes, each parsed when the caller gets to it (a translated
        stream sends its first event before it has read the rest of a burst)."""
        for raw in self.feed_raw(chunk):
            if (event := self.parse(raw)) is not None:
                yield event

    def feed_raw(self, chunk: bytes) -> list[bytes]:
        """The events `chunk` completes, as their bytes (LF line ends, with the blank line), not yet
        parsed: a relay parses each as it gets to it, or not at all when its bytes tell enough."""
        buffer = self.buffer
        if buffer and buffer[-1] == 13:  # a CR held back last time: maybe the first half of a CRLF
            del buffer[-1]
            chunk = b"\r" + chunk
        hold_cr = False
        if b"\r" in chunk:
            hold_cr = chunk.endswith(b"\r")
            if hold_cr:
                chunk = chunk[:-1]
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if buffer:  # what is buffered holds no blank line, but one may straddle reads
            scan_from = len(buffer) - 1
            buffer += chunk
            data = buffer
        else:  # the usual read: whole events, sliced from the bytes as they came
            scan_from = 0
            data = chunk
        end = data.find(b"\n\n", scan_from)
        events = []
        start = 0
        limit = self.max_event
        while end >= 0:
            if end - start > limit:
                raise self._too_large()
            events.append(data[start : end + 2] if data is chunk else bytes(data[start : end + 2]))
            start = end + 2
            end = data.find(b"\n\n", start)
        if data is buffer:
            del buffer[:start]
        elif start < len(chunk):
            buffer += memoryview(chunk)[start:]
        if len(buffer) > limit:
            raise self._too_large()
        if hold_cr:
            buffer.append(13)
        return events

    def _too_large(self) -> GatewayError:
        self.buffer = bytearray()
        return GatewayError(502, f"upstream sent a stream event larger than {self.max_event / (1 << 20):g} MB")

    def finish(self) -> list[SSEEvent]:
        """An unterminated last event, if the stream ended without a blank line."""
        if not self.buffer:
            return []
        rest, self.buffer = bytes(self.buffer).rstrip(b"\r"), bytearray()
        if rest.strip():
            event = self.parse(rest + b"\n\n")
            return [event] if event is not None else []
        return []

    @staticmethod
    def parse(raw: bytes) -> SSEEvent | None:
        """One event's bytes (from feed_raw) as an SSEEvent; None for one of comments only."""
        end = len(raw) - 2
        if raw.startswith(b"data: ") and raw.find(b"\n") == end:  # the usual shapes, read without a split:
            return SSEEvent("", raw[6:end].decode("utf-8", "replace"), raw)  # one data line,
        if raw.startswith(b"event: "):  # or an event line and one data line
            line = raw.find(b"\n")
            if raw.startswith(b"data: ", line + 1) and raw.find(b"\n", line + 1) == end:
                return SSEEvent(
                    raw[7:line].decode("utf-8", "replace"), raw[line + 7 : end].decode("utf-8", "replace"), raw
                )
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
#   document           a file (PDF, text...) as media_type + data (base64) or url, name (file name or title)
#   tool_call          id, name, arguments (JSON text; a custom tool's free text is {"input": text})
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
    kind: str = "function"  # function | custom (free-form text, sent as {"input": text}) | builtin
    # (provider-defined, e.g. web_search: the definition is kept in extra[protocol] and only that protocol sends it)
    extra: dict | None = None


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0


TOKEN_COUNT_MAX = (1 << 63) - 1  # what sqlite's INTEGER holds


def token_count(value) -> int:
    """A token count from an upstream as a sane int: never negative, below 2^63; a float is
    truncated, a string of digits read, anything else (null, an object, true) counts 0. Every
    codec's usage decoder passes its numbers through here, so nothing odd reaches the ledger."""
    if type(value) is int and 0 <= value <= TOKEN_COUNT_MAX:  # the usual cases
        return value
    if value is None:
        return 0
    if type(value) is float:  # finite: loads refuses the rest
        value = int(value)
    elif type(value) is str and value.isascii() and value.isdigit():
        value = int(value) if len(value) < 20 else TOKEN_COUNT_MAX
    elif type(value) is not int:
        return 0
    return value if 0 <= value <= TOKEN_COUNT_MAX else 0 if value < 0 else TOKEN_COUNT_MAX


def token_sum(total: int) -> int:
    """A sum of token counts, clamped like each of them."""
    return total if total <= TOKEN_COUNT_MAX else TOKEN_COUNT_MAX


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


def stream_cut_short(where: str) -> list:
    """What a stream decoder's finish() says of a stream that ended before its answer did."""
    return [StreamError(GatewayError(502, f"upstream stream ended {where}; the answer is incomplete"))]


def fold_events(events) -> Response:
    """Fold a canonical event stream into one Response (what a JSON answer holds)."""
    response = Response(id="", model="", parts=[])
    blocks: dict[int, tuple[Part, dict]] = {}  # index -> (part, its delta pieces by field)
    for ev in events:
        if isinstance(ev, MessageStart):
            response.id, response.model = ev.id, ev.model
            if ev.usage is not None:
                response.usage = ev.usage
        elif isinstance(ev, BlockStart):
            part = Part(ev.part.type, ev.part.text, ev.part.id, ev.part.name, ev.part.arguments, data=ev.part.data,
                        signature=ev.part.signature, extra=ev.part.extra)  # fmt: skip
            blocks[ev.index] = (part, {})
            response.parts.append(part)
        elif isinstance(ev, BlockDelta) and ev.index in blocks:
            name = ev.kind if ev.kind in ("arguments", "signature") else "text"
            blocks[ev.index][1].setdefault(name, []).append(ev.value)  # joined once: += on a field is quadratic
        elif isinstance(ev, MessageDelta):
            response.stop_reason, response.stop_sequence = ev.stop_reason, ev.stop_sequence
            if ev.usage is not None:
                response.usage = ev.usage
        elif isinstance(ev, StreamError):
            raise ev.error
    for part, pieces in blocks.values():
        for name, values in pieces.items():
            setattr(part, name, getattr(part, name) + "".join(values))
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
               "content_filter": "content_filter", "eos": "end_turn", "eos_token": "end_turn", "tool_call": "tool_use",
               "max_tokens": "max_tokens", "model_length": "max_tokens"},  # the last five: compatible servers'

    "anthropic": {v: v for v in ("end_turn", "stop_sequence", "max_tokens", "tool_use", "refusal", "pause_turn")}
    | {"model_context_window_exceeded": "max_tokens"},
    "gemini": {"STOP": "end_turn", "MAX_TOKENS": "max_tokens", "SAFETY": "content_filter", "RECITATION": "content_filter",
               "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
               "IMAGE_SAFETY": "content_filter", "IMAGE_PROHIBITED_CONTENT": "content_filter", "IMAGE_RECITATION": "content_filter", "MALFORMED_FUNCTION_CALL": "end_turn", "OTHER": "end_turn"},
}  # fmt: skip


def stop_reason_out(protocol: str, reason: str) -> str:
    return STOP_REASONS[protocol].get(reason, STOP_REASONS[protocol]["end_turn"])


def stop_reason_in(protocol: str, reason) -> str:
    return STOP_REASONS_IN[protocol].get(reason if type(reason) is str else "", "end_turn")


def parse_data_uri(url: str) -> tuple[str, str] | None:
    """'data:image/png;base64,AAAA' -> ('image/png', 'AAAA')."""
    if not url.startswith("data:"):
        return None
    meta, _, data = url[5:].partition(",")
    media_type = meta.split(";", 1)[0] or "application/octet-stream"
    return media_type, data


def image_url_of(part: Part) -> str:
    return part.url or f"data:{part.media_type or 'image/png'};base64,{part.data}"


DOCUMENT_TYPES = {"pdf": "application/pdf", "txt": "text/plain", "md": "text/markdown", "csv": "text/csv",
                  "html": "text/html", "json": "application/json"}  # fmt: skip


def document_part(data_or_uri: str, url: str = "", name: str = "", media_type: str = "") -> Part:
    """A document from base64 data (or a data: URI holding it) or a URL. Its type, when not given,
    comes from the data URI or the file name; PDF, what every protocol's file input takes, otherwise."""
    data_uri = parse_data_uri(data_or_uri or url)
    if data_uri:
        return Part("document", media_type=media_type or data_uri[0], data=data_uri[1], name=name)
    suffix = (name or url).split("?", 1)[0].rsplit(".", 1)[-1].lower()
    media_type = media_type or DOCUMENT_TYPES.get(suffix, "application/pdf")
    return Part("document", media_type=media_type, data=data_or_uri, url="" if data_or_uri else url, name=name)


def document_text(part: Part) -> str | None:
    """The text of a text/* document given as data, for upstreams that take no such file; None otherwise."""
    if not part.media_type.startswith("text/") or not part.data:
        return None
    try:
        return base64.b64decode(part.data, validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def document_as_text(part: Part) -> str:
    """A document an upstream cannot take as a file: its text when it is text, else a note saying what it was."""
    text = document_text(part)
    label = f"document {part.name}" if part.name else "document"
    if text is not None:
        return f"[{label}]\n{text}"
    where = f" at {part.url}" if part.url else ""
    return f"[{label} ({part.media_type}){where} omitted by the gateway: this upstream takes no such file]"


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
    usage_key = "usage"  # where a JSON answer carries its token counts

    def response_json(self, resp: Response, req: Request) -> tuple[bytes, dict | None]:
        """A whole answer as JSON bytes, and the object when one was built (the Responses lane
        stores it)."""
        body = self.encode_response(resp, req)
        return dumps(body), body

    def usage_of(self, body: bytes) -> Usage:
        """Usage from a passthrough JSON answer (for the ledger)."""
        usage = top_level_value(body, self.usage_key)
        if isinstance(usage, dict):
            return self.decode_usage(usage)
        try:
            return self.usage_of_whole(loads(body))
        except (*MALFORMED_INPUT, GatewayError):
            return Usage()

    def usage_of_whole(self, data) -> Usage:
        """Usage from a whole parsed answer, when it could not be read from the end."""
        return self.decode_response(data).usage

    def encode_stream_error(self, err: GatewayError) -> bytes:
        return b"data: " + dumps(self.encode_error(err)) + b"\n\n"

    @staticmethod
    def skippable(raw: bytes) -> bool:
        """May a passthrough stream's observer leave this event undecoded once content flows:
        do its bytes alone show that it carries no usage and no error? (Its bytes go to the
        client either way; a coding agent's answer is hundreds of such events.)"""
        return False

    def decode_error(self, status: int, body: bytes) -> GatewayError:
        """Read an upstream's error, in any of the four envelopes, keeping its status."""
        message, kind = "", ""
        try:
            data = loads(body)
        except ValueError:
            data = None
        if isinstance(data, list) and data:  # Gemini sometimes wraps the error in a list
            data = data[0]
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict):
                message = as_text(err.get("message") or "")
                kind = err.get("type") if isinstance(err.get("type"), str) else ""
                if not message and isinstance(err.get("detail"), str):  # FastAPI-based servers
                    message = err["detail"]
            elif isinstance(err, str):
                message = err
        if not message:
            message = body[:500].decode("utf-8", "replace").strip() or f"upstream answered HTTP {status}"
        if kind not in GatewayError.KIND_BY_STATUS.values():
            kind = ""
        return GatewayError(status, message, kind)


def check_response_format(fmt: dict, where: str) -> None:
    """The canonical response_format ({"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", ...}}) with the shapes every encoder relies on."""
    kind = field_at(fmt, "type", str, where, required=True)
    if kind == "json_schema":
        spec = field_at(fmt, "json_schema", dict, where, required=True)
        field_at(spec, "name", str, f"{where}.json_schema")
        field_at(spec, "schema", dict, f"{where}.json_schema")


def json_object_arguments(text: str) -> dict:
    """Tool arguments as an object, for protocols that carry them as JSON (never lost)."""
    if not text:
        return {}
    try:
        value = loads(text)
    except ValueError:
        return {"_raw_arguments": text}
    return value if isinstance(value, dict) else {"_value": value}


# ---- OpenAI Chat Completions -----------------------------------------------------------

OPENAI_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error", "authentication_error": "authentication_error",
    "permission_error": "permission_error", "not_found_error": "not_found_error",
    "request_too_large": "invalid_request_error", "rate_limit_error": "rate_limit_error",
    "api_error": "server_error", "overloaded_error": "server_error", "timeout_error": "timeout_error",
    "client_closed": "invalid_request_error", "billing_error": "insufficient_quota",
}  # fmt: skip


class OpenAIChatCodec(Codec):
    name = "openai"

    @staticmethod
    def skippable(raw: bytes) -> bool:  # content chunks: usage, errors and the finish name themselves
        return (
            b'"usage"' not in raw and b'"error"' not in raw and b"[DONE]" not in raw
            and (b'"finish_reason"' not in raw or b'"finish_reason":null' in raw or b'"finish_reason": null' in raw)
        )  # fmt: skip

    # -- requests
    REQUEST_FIELDS = {
        "model": str, "messages": list, "tools": list, "parallel_tool_calls": bool, "max_completion_tokens": int,
        "max_tokens": int, "temperature": float, "top_p": float, "stream": bool, "reasoning_effort": str,
        "response_format": dict, "metadata": dict, "user": str, "stream_options": dict, "stop": (str, list),
        "tool_choice": (str, dict), "n": int,
    }  # fmt: skip

    def decode_request(self, body: dict) -> Request:
        check_fields(body, self.REQUEST_FIELDS, ("model", "messages"))
        get = body.get
        if (get("n") or 1) != 1:  # the canonical answer is one choice: n choices would come back as one, silently
            raise bad_request("'n' other than 1 needs the model's own OpenAI-compatible provider: this model is "
                              "answered through another protocol, one choice per request; send n requests")  # fmt: skip
        stop = get("stop")
        options = get("stream_options")
        req = Request(
            model=body["model"], messages=[], parallel_tool_calls=get("parallel_tool_calls"),
            max_tokens=get("max_completion_tokens") or get("max_tokens"), temperature=get("temperature"),
            top_p=get("top_p"), stop=[stop] if type(stop) is str else string_list(stop, "stop") if stop else [],
            stream=bool(get("stream")), include_usage=bool(options and options.get("include_usage")),
            reasoning_effort=get("reasoning_effort") or "", response_format=get("response_format"),
            metadata=get("metadata") or {}, user=get("user") or "", raw=body, protocol="openai",
        )  # fmt: skip
        if req.response_format:
            check_response_format(req.response_format, "response_format")
        for i, msg in enumerate(body["messages"]):
            if type(msg) is not dict:
                raise bad_request(f"messages[{i}] must be an object")
            self._decode_message(req, msg, i)
        for i, tool in enumerate(get("tools") or ()):
            req.tools.append(self._decode_tool(tool, i))
        choice = get("tool_choice")
        if type(choice) is str:
            req.tool_choice = choice
        elif choice and choice.get("type") == "allowed_tools":
            self._decode_allowed_tools(req, choice)
        elif choice:
            req.tool_choice = "tool"
            named = choice.get("function") or choice.get("custom") or {}
            if type(named) is not dict:
                raise bad_request("'tool_choice.function' must be an object with a 'name'")
            req.tool_name = field_at(named, "name", str, "tool_choice.function", required=True)
        return req

    @staticmethod
    def _decode_allowed_tools(req: Request, choice: dict) -> None:
        """tool_choice {"type": "allowed_tools", "allowed_tools": {"mode": "auto" | "required", "tools":
        [...]}}: the model may call only those tools; as `auto` or `required` over the tools named."""
        allowed = field_at(choice, "allowed_tools", dict, "tool_choice", required=True)
        mode = field_at(allowed, "mode", str, "tool_choice.allowed_tools", default="auto")
        req.tool_choice = "required" if mode == "required" else "auto"
        names = set()
        for i, tool in enumerate(field_at(allowed, "tools", list, "tool_choice.allowed_tools", default=[]) or ()):
            where = f"tool_choice.allowed_tools.tools[{i}]"
            if type(tool) is not dict:
                raise bad_request(f"'{where}' must be an object")
            named = tool.get("function") or tool.get("custom") or tool
            names.add(field_at(named, "name", str, where, required=True) if type(named) is dict else "")
        if names:
            req.tools = [tool for tool in req.tools if tool.name in names]

    def _decode_message(self, req: Request, msg: dict, i: int) -> None:
        role = msg.get("role")
        content = msg.get("content")
        if role == "user":
            req.messages.append(Message("user", self._decode_content(content, i)))
        elif role == "system" or role == "developer":
            parts = self._decode_content(content, i)
            if not req.messages:
                req.system.extend(parts)
            else:
                req.messages.append(Message("system", parts))
        elif role == "assistant":
            req.messages.append(Message("assistant", self._decode_assistant(msg, content, i)))
        elif role == "tool" or role == "function":
            where = f"messages[{i}]"
            call_id = field_at(msg, "tool_call_id", str, where) or field_at(msg, "name", str, where) or ""
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
            raise bad_request(
                f"messages[{i}].role must be system, developer, user, assistant or tool, got {json_preview(role)}"
            )

    def _decode_assistant(self, msg: dict, content, i: int) -> list:
        where = f"messages[{i}]"
        parts = []
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            parts.append(Part("thinking", text=reasoning))
        parts.extend(self._decode_content(content, i))
        refusal = field_at(msg, "refusal", str, where)
        if refusal:
            parts.append(Part("text", text=refusal))
        for j, call in enumerate(field_at(msg, "tool_calls", list, where) or ()):
            parts.append(self._decode_call(call, f"{where}.tool_calls[{j}]"))
        legacy = field_at(msg, "function_call", dict, where)
        if legacy:  # the single function call of the old API
            name = field_at(legacy, "name", str, f"{where}.function_call", default="")
            arguments = field_at(legacy, "arguments", str, f"{where}.function_call", default="")
            parts.append(Part("tool_call", id=name, name=name, arguments=arguments))
        return parts

    @staticmethod
    def _decode_call(call, where: str) -> Part:
        if type(call) is not dict:
            raise bad_request(f"{where} must be an object")
        call_id = field_at(call, "id", str, where) or new_id("call_")
        if call.get("type") == "custom":  # free-form input travels as {"input": text}
            custom = field_at(call, "custom", dict, where, default={})
            text = field_at(custom, "input", str, f"{where}.custom", default="")
            name = field_at(custom, "name", str, f"{where}.custom", default="")
            return Part("tool_call", id=call_id, name=name, arguments=json.dumps({"input": text}))
        fn = field_at(call, "function", dict, where, default={})
        args = fn.get("arguments", "")
        if type(args) is not str:  # some clients send the object itself
            args = json.dumps(args) if args is not None else ""
        return Part("tool_call", id=call_id, name=field_at(fn, "name", str, f"{where}.function", default=""),
                    arguments=args)  # fmt: skip

    def _decode_content(self, content, i: int) -> list:
        if content is None:
            return []
        if type(content) is str:
            return [Part("text", text=content)] if content else []
        if type(content) is not list:
            raise bad_request(f"messages[{i}].content must be a string or an array of content parts")
        parts = []
        for j, item in enumerate(content):
            if type(item) is str:
                parts.append(Part("text", text=item))
                continue
            where = f"messages[{i}].content[{j}]"
            if type(item) is not dict:
                raise bad_request(f"{where} must be an object such as {{'type': 'text', 'text': ...}}")
            kind = item.get("type")
            if kind == "text":
                parts.append(Part("text", text=field_at(item, "text", str, where, default="")))
            elif kind == "image_url":
                image = item.get("image_url")
                if type(image) is dict:
                    url = field_at(image, "url", str, f"{where}.image_url", required=True)
                elif type(image) is str:
                    url = image
                else:
                    raise bad_request(f"'{where}.image_url' must be an object {{'url': ...}} or a URL string")
                data_uri = parse_data_uri(url)
                if data_uri:
                    parts.append(Part("image", media_type=data_uri[0], data=data_uri[1]))
                else:
                    parts.append(Part("image", url=url))
            elif kind == "refusal":
                parts.append(Part("text", text=field_at(item, "refusal", str, where, default="")))
            elif kind == "file" and isinstance(item.get("file"), dict) and item["file"].get("file_data"):
                spec = item["file"]
                name = spec.get("filename") if isinstance(spec.get("filename"), str) else ""
                parts.append(document_part(field_at(spec, "file_data", str, f"{where}.file"), name=name))
            elif (
                kind == "input_audio" or kind == "file"
            ):  # a file id only OpenAI can read, audio no other upstream takes
                parts.append(Part("text", text=f"[{kind} content omitted by the gateway]"))
            else:
                raise bad_request(f"{where} has an unknown part type {json_preview(kind)}")
        return parts

    def _decode_tool(self, tool, i: int) -> Tool:
        where = f"tools[{i}]"
        if type(tool) is not dict:
            raise bad_request(f"{where} must be an object")
        if tool.get("type") == "custom":
            spec = field_at(tool, "custom", dict, where, default={})
            fmt = spec.get("format")
            return Tool(
                field_at(spec, "name", str, f"{where}.custom", default=""),
                field_at(spec, "description", str, f"{where}.custom", default=""),
                custom_tool_parameters(fmt),
                "custom",
                {"format": fmt},
            )
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or type(fn) is not dict or not fn.get("name"):
            raise bad_request(f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = field_at(fn, "name", str, f"{where}.function")
        description = field_at(fn, "description", str, f"{where}.function", default="")
        parameters = field_at(fn, "parameters", dict, f"{where}.function", default={})
        extra = {"strict": fn["strict"]} if "strict" in fn else None
        return Tool(name, description, parameters, "function", extra)

    def encode_request(self, req: Request, model: str, provider=None) -> dict:
        messages = []
        system = system_text(req)
        in_place = provider is None or provider.official  # many local chat templates want one system message, first
        if not in_place:
            later = [text_of(m.parts) for m in req.messages if m.role == "system"]
            system = "\n\n".join(t for t in [system, *later] if t)
        if system:
            messages.append({"role": "system", "content": system})
        reasoning_back = wants_reasoning_back(provider)
        for msg in req.messages:
            if in_place or msg.role != "system":
                messages.extend(self._encode_message(msg, reasoning_back))
        body: dict = {"model": model, "messages": messages}
        tools = [t for t in req.tools if t.kind != "builtin"]  # provider-defined tools of other protocols
        if tools:
            body["tools"] = [self._encode_tool(t) for t in tools]
            if req.tool_choice:
                body["tool_choice"] = (
                    {"type": "function", "function": {"name": req.tool_name}}
                    if req.tool_choice == "tool"
                    else req.tool_choice
                )
            if req.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = req.parallel_tool_calls
        if req.max_tokens is not None:
            limit = openai_max_output(model)
            cap = getattr(provider, "max_tokens_cap", 0)  # openai_completion_max_tokens
            limit = min(limit, cap) if limit and cap else limit or cap
            max_tokens = min(req.max_tokens, limit) if limit else req.max_tokens
            body["max_completion_tokens" if provider is None or provider.official else "max_tokens"] = max_tokens
        for name in ("temperature", "top_p"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.stop:
            body["stop"] = req.stop[:4]
        effort = req.reasoning_effort or effort_from_budget(req.thinking_budget)
        if effort and (provider is None or provider.accepts_reasoning(model)):
            body["reasoning_effort"] = effort
        if req.response_format:
            body["response_format"] = self._encode_response_format(req.response_format)
        if req.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}  # the ledger needs real numbers
        return body

    @staticmethod
    def _encode_response_format(fmt: dict) -> dict:
        spec = fmt.get("json_schema")
        if fmt.get("type") != "json_schema" or not isinstance(spec, dict) or spec.get("name"):
            return fmt
        return {**fmt, "json_schema": {**spec, "name": "response"}}  # OpenAI requires a name

    def _encode_message(self, msg: Message, reasoning_back: bool = False) -> list:
        """`reasoning_back`: a server whose thinking models want the reasoning of an assistant turn
        that called tools back as `reasoning_content`, and refuse the turn without it
        (wants_reasoning_back)."""
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
            if calls and reasoning_back:  # (a signed thinking block is another provider's: meaningless to these)
                reasoning = "".join(p.text for p in msg.parts if p.type == "thinking" and not p.signature)
                if reasoning:
                    out["reasoning_content"] = reasoning
            return [out]
        out = []
        shown: list = []  # images tool results returned: a tool message holds text only
        for p in msg.parts:
            if p.type == "tool_result":
                out.append({"role": "tool", "tool_call_id": p.id, "content": tool_result_text(p)})
                if p.content and any(c.type == "image" for c in p.content):
                    shown.append(Part("text", text=f"[the image(s) that tool call {p.id} returned]"))
                    shown.extend(c for c in p.content if c.type == "image")
        rest = shown + [p for p in msg.parts if p.type in ("text", "image", "document")]
        if rest:
            out.append({"role": "user", "content": self._encode_content(rest)})
        return out

    def _encode_content(self, parts):
        if all(p.type == "text" for p in parts):
            return "".join(p.text for p in parts) if len(parts) == 1 else "\n\n".join(p.text for p in parts)
        return [self._encode_content_part(p) for p in parts]

    @staticmethod
    def _encode_content_part(part: Part) -> dict:
        if part.type == "image":
            return {"type": "image_url", "image_url": {"url": image_url_of(part)}}
        if part.type == "document" and part.media_type == "application/pdf" and part.data:  # Chat takes PDFs as data
            return {"type": "file", "file": {"filename": part.name or "document.pdf", "file_data": image_url_of(part)}}
        return {"type": "text", "text": document_as_text(part) if part.type == "document" else part.text}

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
        choices = body.get("choices")
        choice = choices[0] if type(choices) is list and choices else {}
        if "error" in body or (type(choice) is dict and "error" in choice):  # OpenRouter: an error met while generating
            self._raise_answer_error(body, object_or_empty(choice))
        if type(choices) is not list:
            raise malformed_answer(f"'choices' must be an array, got {json_preview(choices)}")
        message = (choice.get("message") or {}) if type(choice) is dict else None
        if type(message) is not dict:
            raise malformed_answer(f"'choices[0].message' must be an object, got {json_preview(message)}")
        parts = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            parts.append(Part("thinking", text=reasoning))
        content = message.get("content")
        if isinstance(content, list):  # some compatible servers (Mistral's) answer with text parts
            content = compatible_content_text(content)
        elif content is not None and type(content) is not str:
            raise malformed_answer(f"'choices[0].message.content' must be a string, got {json_preview(content)}")
        if content:
            parts.append(Part("text", text=content))
        refusal = string_or(message.get("refusal"))
        if refusal:
            parts.append(Part("text", text=refusal))
        calls = message.get("tool_calls") or []
        if type(calls) is not list:
            raise malformed_answer(f"'choices[0].message.tool_calls' must be an array, got {json_preview(calls)}")
        for call in calls:
            fn = call.get("function") if type(call) is dict else None
            if type(fn) is not dict:
                raise malformed_answer("each of 'choices[0].message.tool_calls' must be an object with a 'function'")
            arguments = fn.get("arguments") or ""
            arguments = arguments if type(arguments) is str else dumps(arguments).decode()  # Ollama: an object
            parts.append(Part("tool_call", id=string_or(call.get("id")) or new_id("call_"),
                              name=string_or(fn.get("name")), arguments=arguments))  # fmt: skip
        stop = stop_reason_in("openai", choice.get("finish_reason"))
        if refusal and not content:
            stop = "refusal"
        if stop == "end_turn" and any(p.type == "tool_call" for p in parts):
            stop = "tool_use"
        created = body.get("created")
        return Response(string_or(body.get("id")) or new_id("chatcmpl-"), string_or(body.get("model")), parts, stop,
                        usage=self.decode_usage(body.get("usage")),
                        created=created if type(created) is int and 0 < created < 1 << 40 else 0)  # fmt: skip

    @staticmethod
    def _raise_answer_error(body: dict, choice: dict) -> None:
        err = body.get("error") or choice.get("error")
        if not err:
            return
        message = err.get("message") if isinstance(err, dict) else err
        raise GatewayError(502, f"upstream error while generating: {as_text(message or err)[:500]}")

    @staticmethod
    def decode_usage(usage) -> Usage:
        if not isinstance(usage, dict):
            return Usage()
        prompt_details = usage.get("prompt_tokens_details")
        completion_details = usage.get("completion_tokens_details")
        return Usage(
            input_tokens=token_count(usage.get("prompt_tokens")),
            output_tokens=token_count(usage.get("completion_tokens")),
            cached_tokens=token_count(prompt_details.get("cached_tokens")) if type(prompt_details) is dict else 0,
            reasoning_tokens=(
                token_count(completion_details.get("reasoning_tokens")) if type(completion_details) is dict else 0
            ),
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

    # encode_response + dumps of a text-only answer, filled in directly: the translation lane's
    # most common answer, where building and encoding the nested dict cost as much as the rest
    PLAIN_ANSWER = (
        '{"id":%s,"object":"chat.completion","created":%s,"model":%s,"choices":[{"index":0,"message":{"role":'
        '"assistant","content":%s,"refusal":null},"logprobs":null,"finish_reason":%s}],"usage":{"prompt_tokens":%s,'
        '"completion_tokens":%s,"total_tokens":%s,"prompt_tokens_details":{"cached_tokens":%s},'
        '"completion_tokens_details":{"reasoning_tokens":%s}}}'
    )

    def response_json(self, resp: Response, req: Request) -> tuple[bytes, dict | None]:
        usage = resp.usage
        created = resp.created or int(time.time())
        numbers = (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens, created)
        texts = [p.text for p in resp.parts if p.type == "text"]
        if len(texts) != len(resp.parts) or set(map(type, numbers)) != {int}:
            return super().response_json(resp, req)
        text = "".join(texts)
        quote = json.encoder.encode_basestring
        prompt, completion, cached, reasoning, _ = numbers
        data = self.PLAIN_ANSWER % (
            quote(openai_id(resp.id)), created, quote(req.model), quote(text) if text else "null",
            quote(self._finish_reason(resp.stop_reason, False)), prompt, completion, prompt + completion, cached,
            reasoning,
        )  # fmt: skip
        try:
            return data.encode(), None
        except UnicodeEncodeError:  # a lone surrogate: the general path escapes it
            return super().response_json(resp, req)

    @staticmethod
    def _finish_reason(stop_reason: str, has_calls: bool) -> str:
        if has_calls and stop_reason in ("tool_use", "end_turn"):
            return "tool_calls"  # a turn with text and tools must make the client run the tools
        finish = stop_reason_out("openai", stop_reason)
        return "stop" if finish == "tool_calls" and not has_calls else finish

    def usage_of_whole(self, data) -> Usage:
        """Chat answers and embeddings alike: only the usage object matters."""
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


# The most output tokens OpenAI models accept (Claude Code asks for 64000; gpt-4o refuses that).
OPENAI_MAX_OUTPUT = (
    ("gpt-4o*", 16384), ("chatgpt-4o*", 16384), ("gpt-4.1*", 32768), ("gpt-4-turbo*", 4096), ("gpt-4", 8192),
    ("gpt-3.5*", 4096), ("gpt-5*", 128000), ("o1-mini*", 65536), ("o1*", 100000), ("o3*", 100000), ("o4*", 100000),
)  # fmt: skip


# Hosts whose thinking models want an assistant tool call turn's reasoning back as `reasoning_content`
# (DeepSeek, Moonshot's Kimi, Zhipu's GLM): others (api.openai.com, Groq, Cerebras) refuse the field.
REASONING_BACK_HOSTS = ("deepseek.com", "moonshot.cn", "moonshot.ai", "bigmodel.cn", "z.ai")


def wants_reasoning_back(provider) -> bool:
    host = url_hostname(provider.base_url) if provider is not None else ""
    return any(host == h or host.endswith("." + h) for h in REASONING_BACK_HOSTS)


def compatible_content_text(content) -> str:
    """An answer's content some compatible servers (Mistral's) send as an array of text parts."""
    if not isinstance(content, list):
        return as_text(content)
    return "".join(
        t for c in content if isinstance(c, dict) and c.get("type") == "text" and isinstance(t := c.get("text"), str)
    )


@functools.lru_cache(maxsize=1024)
def openai_max_output(model: str) -> int | None:
    return next((limit for pattern, limit in OPENAI_MAX_OUTPUT if glob_match(pattern, model)), None)


def openai_id(resp_id: str) -> str:
    return resp_id if resp_id.startswith("chatcmpl") else "chatcmpl-" + (resp_id.split("_", 1)[-1] or uuid.uuid4().hex)


def tool_result_text(part: Part) -> str:
    """A tool result as plain text, keeping the error marker protocols without is_error need."""
    text = "\n".join(
        p.text if p.type == "text" else document_as_text(p) if p.type == "document" else "[image]"
        for p in part.content or []
    )
    return f"[tool error] {text}" if part.is_error else text


def effort_from_budget(budget: int | None) -> str:
    if not budget:
        return ""
    return "low" if budget <= 2048 else "medium" if budget <= 16384 else "high"


OPENAI_ERROR_WORDS = (("rate_limit", 429), ("overloaded", 503), ("unavailable", 503), ("server_error", 500))


def openai_stream_error_status(err: dict) -> int:
    """The status an OpenAI-style stream's error event stands for: its `code` when that is an
    HTTP status (OpenRouter, vLLM), else what its type or code names (rate_limit_exceeded,
    server_error...), else 502. A stream that opens with a rate limit or an overload can then
    fail over like an answer with that status (STREAM_FAILOVER_STATUSES)."""
    code = err.get("code")
    if type(code) is str and code.isascii() and code.isdigit() and len(code) == 3:
        code = int(code)
    if type(code) is int and 400 <= code <= 599:
        return code
    words = f"{string_or(err.get('type'))} {string_or(code)}".lower()
    return next((status for word, status in OPENAI_ERROR_WORDS if word in words), 502)


class OpenAIStreamDecoder:
    """chat.completion.chunk events -> canonical events. One block open at a time: text,
    reasoning and each tool_calls[i] get their own index, in the order they appear."""

    def __init__(self):
        self.started = False
        self.next_index = 0
        self.open_index: int | None = None
        self.open_key = None
        self.tool_index: dict = {}  # tool call key (OpenAICallKeys) -> block index
        self.open_calls: dict[int, tuple] = {}  # block index -> its call key, of tool blocks not stopped
        self.call_keys: OpenAICallKeys | None = None  # made at the first tool call (it keeps the arguments)
        self.stop_reason = ""
        self.usage: Usage | None = None
        self.finished = False
        self.done = False  # [DONE] came

    def _switch(self, key, part: Part, out: list) -> int:
        if self.open_key == key:
            return self.open_index
        if self.open_index is not None and not self._unfinished_tool(self.open_index):
            out.append(BlockStop(self.open_index))
            self.open_calls.pop(self.open_index, None)
        self.open_index, self.open_key = self.next_index, key
        self.next_index += 1
        out.append(BlockStart(self.open_index, part))
        return self.open_index

    def _unfinished_tool(self, index: int) -> bool:
        """A tool call whose arguments are not yet whole JSON may get more (some servers
        interleave parallel calls): it stays open, and encoders hold later blocks back."""
        key = self.open_calls.get(index)
        return key is not None and not OpenAICallKeys.whole(self.call_keys.arguments_of(key))

    def feed(self, event: SSEEvent) -> list:
        data = event.data
        if data == "[DONE]":
            self.done = True
            return self.finish()
        try:
            chunk = loads(data)
        except ValueError:
            return [StreamError(GatewayError(502, f"upstream sent malformed stream data: {data[:120]!r}"))]
        if not isinstance(chunk, dict):
            return [StreamError(malformed_answer(f"a stream chunk that is not an object: {json_preview(chunk)}"))]
        out: list = []
        if chunk.get("error") or chunk.get("object") == "error":  # OpenRouter sends it with choices; vLLM bare
            err = chunk["error"] if isinstance(chunk.get("error"), dict) else chunk
            err = err if isinstance(err.get("message"), str) else {"message": as_text(chunk.get("error"))}
            self.finished = True
            kind = err.get("type") if err.get("type") in GatewayError.KIND_BY_STATUS.values() else ""  # server_error..
            return [StreamError(GatewayError(openai_stream_error_status(err), err.get("message") or "upstream stream error",
                                             kind))]  # fmt: skip
        if not self.started:
            self.started = True
            out.append(MessageStart(string_or(chunk.get("id")) or new_id("chatcmpl-"), string_or(chunk.get("model"))))
        if chunk.get("usage"):
            self.usage = OpenAIChatCodec.decode_usage(chunk["usage"])
        choices = chunk.get("choices")
        if choices is not None and type(choices) is not list:
            return out + [StreamError(malformed_answer(f"'choices' must be an array, got {json_preview(choices)}"))]
        for choice in choices or ():
            if type(choice) is not dict or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if type(delta) is dict:
                self._feed_delta(delta, out)
            if choice.get("finish_reason"):
                self.stop_reason = stop_reason_in("openai", choice["finish_reason"])
        return out

    def _feed_delta(self, delta: dict, out: list) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            index = self._switch("thinking", Part("thinking"), out)
            out.append(BlockDelta(index, "thinking", reasoning))
        content = delta.get("content") or delta.get("refusal")
        if content and not isinstance(content, str):
            content = compatible_content_text(content)
        if content:
            index = self._switch("text", Part("text"), out)
            out.append(BlockDelta(index, "text", content))
        calls = delta.get("tool_calls")
        for call in calls if type(calls) is list else ():
            if type(call) is not dict:
                continue
            if self.call_keys is None:
                self.call_keys = OpenAICallKeys()
            position = self.call_keys.key_of(call)
            fn = call.get("function") if type(call.get("function")) is dict else {}
            key = ("tool", position)
            if position not in self.tool_index or self.open_key != key:
                if position in self.tool_index:  # interleaved parallel calls: its block is still open
                    index = self.tool_index[position]
                else:
                    part = Part("tool_call", id=string_or(call.get("id")) or new_id("call_"),
                                name=string_or(fn.get("name")))  # fmt: skip
                    index = self._switch(key, part, out)
                    self.tool_index[position] = index
                    self.open_calls[index] = position
            else:
                index = self.tool_index[position]
            arguments = self.call_keys.new_arguments(position, fn.get("arguments"))
            if arguments:
                out.append(BlockDelta(index, "arguments", arguments))

    def finish(self) -> list:
        if self.finished:
            return []
        self.finished = True
        if not self.done and not self.stop_reason:  # the stream ended with neither: cut short (a crash, a proxy)
            return stream_cut_short("before its finish_reason")
        out: list = []
        if not self.started:
            out.append(MessageStart(new_id("chatcmpl-"), ""))
        still_open = set(self.open_calls) | ({self.open_index} if self.open_index is not None else set())
        out.extend(BlockStop(index) for index in sorted(still_open))
        stop = self.stop_reason or "end_turn"
        if stop == "end_turn" and self.tool_index:
            stop = "tool_use"
        out.append(MessageDelta(stop, None, self.usage or Usage()))
        out.append(MessageStop())
        return out


class OpenAICallKeys:
    """Which call a streamed tool_calls delta belongs to, and what of its arguments is new, as
    OpenAI-compatible servers really send them: Ollama numbers every parallel call index 0 and
    older builds (and Gemini's compatible endpoint) give no index, so a new id is a new call; ids
    repeated on every chunk name their call; a delta with neither continues the last call. Some
    servers send the whole arguments again at the end (or as an object): a repeat is dropped."""

    def __init__(self):
        self.by_id: dict[str, tuple] = {}
        self.id_of: dict[tuple, str] = {}
        self.latest: dict[int, tuple] = {}  # wire index -> the newest call that used it
        self.last: tuple | None = None
        # call -> its arguments so far, as pieces joined only when read: a long call streamed in
        # thousands of small deltas (a whole file written by a tool) stays linear
        self.arguments: dict[tuple, list[str]] = {}
        self.sizes: dict[tuple, int] = {}

    def key_of(self, call: dict) -> tuple:
        index = call.get("index")
        index = index if type(index) is int else None
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id:
            key = self.by_id.get(call_id)
            if key is None:
                key = (index, 0) if index is not None else (None, len(self.by_id))
                if key in self.id_of:  # that index is taken by another call: a server that reuses it
                    key = (index, len(self.by_id))
                self.by_id[call_id], self.id_of[key] = key, call_id
        elif index is not None:
            key = self.latest.get(index, (index, 0))
        else:
            key = self.last or (None, 0)
        if index is not None:
            self.latest[index] = key
        self.last = key
        return key

    def new_arguments(self, key: tuple, piece) -> str:
        if isinstance(piece, (dict, list)):
            piece = dumps(piece).decode()
        if not isinstance(piece, str) or not piece:
            return ""
        size = self.sizes.get(key, 0)
        # the whole arguments again, after they were complete (the length test keeps this linear)
        if (
            size
            and piece[:1] in "{["
            and 2 * len(piece) >= size
            and self.whole(self.arguments_of(key))
            and self.whole(piece)
        ):
            return ""
        self.arguments.setdefault(key, []).append(piece)
        self.sizes[key] = size + len(piece)
        return piece

    def arguments_of(self, key: tuple) -> str:
        pieces = self.arguments.get(key)
        if not pieces:
            return ""
        if len(pieces) > 1:
            pieces[:] = ["".join(pieces)]
        return pieces[0]

    @staticmethod
    def whole(text: str) -> bool:
        """Complete JSON (an upstream's arguments nested too deep to parse are not)."""
        try:
            loads(text)
        except (ValueError, RecursionError):
            return False
        return True


class OpenAIStreamEncoder:
    """Canonical events -> chat.completion.chunk SSE, ending in data: [DONE]."""

    OBJECT = "chat.completion.chunk"

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
                obj = {"id": self.id, "object": self.OBJECT, "created": self.created, "model": self.req.model,
                       "choices": [], "usage": usage}  # fmt: skip
                out += b"data: " + dumps(obj) + b"\n\n"
            return out
        if isinstance(ev, MessageStop):
            return b"data: [DONE]\n\n"
        if isinstance(ev, StreamError):
            return b"data: " + dumps(OPENAI_CODEC.encode_error(ev.error)) + b"\n\n"
        return b""


OPENAI_CODEC = OpenAIChatCodec()


# ---- OpenAI legacy Completions (POST /v1/completions) -------------------------------------
#
# Passthrough to OpenAI-compatible servers, which have the endpoint. For every other provider a
# prompt becomes one chat turn with an instruction to continue it (or, with `suffix`, to fill the
# gap), and the answer comes back as text_completion choices; several prompts or n > 1 are asked
# one after another (not streamed). Token-id prompts, logprobs and best_of need a real completions
# server and are refused when translated. Errors, usage and the ledger row are OpenAI Chat's.

COMPLETIONS_MAX_CHOICES = 8  # prompts x n a translated request may ask for
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy API's own default
COMPLETION_INSTRUCTION = (
    "You are a text completion engine. Continue the user's text exactly where it stops. Reply with the "
    "continuation only: do not repeat the text and do not comment on it."
)
INFILL_INSTRUCTION = (
    "You are a text completion engine. The user gives a text and its ending. Reply with only the text that "
    "belongs between them: do not repeat either part and do not comment."
)


class CompletionsCodec(OpenAIChatCodec):
    """text_completion bodies and chunks <-> the canonical model (see the section comment)."""

    REQUEST_FIELDS = {"model": str, "max_tokens": int, "temperature": float, "top_p": float, "n": int, "stream": bool,
                      "suffix": str, "echo": bool, "user": str, "best_of": int, "stream_options": dict}  # fmt: skip

    def decode_request(self, body: dict) -> list:
        """One canonical Request per choice asked for (each prompt, n times)."""
        check_fields(body, self.REQUEST_FIELDS, ("model",))
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise bad_request("'prompt' must be a string or an array of strings when the model is not served by an "
                              "OpenAI-compatible completions server (token-id prompts need one)")  # fmt: skip
        if body.get("logprobs") not in (None, False) or (body.get("best_of") or 1) > 1:
            raise bad_request("'logprobs' and 'best_of' need an OpenAI-compatible completions server; this model is "
                              "answered through a chat model")  # fmt: skip
        n = body.get("n") or 1
        if n < 1 or len(prompts) * n > COMPLETIONS_MAX_CHOICES:
            raise bad_request(f"prompts x n must be between 1 and {COMPLETIONS_MAX_CHOICES} when translated")
        stream = bool(body.get("stream"))
        if stream and len(prompts) * n > 1:
            raise bad_request("a translated completion streams one prompt with n = 1; send the others separately")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request(f"'stop' must be a string or an array of strings, got {json.dumps(body['stop'])[:60]}")
        suffix = body.get("suffix") or ""
        reqs = []
        for text in prompts:
            if not text.strip():
                raise bad_request("'prompt' is empty")
            turn = f"Text:\n{text}\n\nEnding:\n{suffix}" if suffix else text
            instruction = INFILL_INSTRUCTION if suffix else COMPLETION_INSTRUCTION
            for _ in range(n):
                reqs.append(Request(
                    model=body["model"], messages=[Message("user", [Part("text", text=turn)])],
                    system=[Part("text", text=instruction)], stop=stop,
                    max_tokens=body.get("max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS,
                    temperature=body.get("temperature"), top_p=body.get("top_p"), stream=stream,
                    include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
                    user=body.get("user") or "", raw={**body, "prompt": text}, protocol="completions",
                ))  # fmt: skip
        return reqs

    def encode_choices(self, results: list, reqs: list) -> dict:
        """The text_completion answer holding one choice per (Response, Request) asked."""
        usage = Usage()
        choices = []
        for index, (resp, req) in enumerate(zip(results, reqs, strict=True)):
            echo = req.raw["prompt"] if req.raw.get("echo") else ""
            choices.append({"text": echo + text_of(resp.parts), "index": index, "logprobs": None,
                            "finish_reason": self._finish_reason(resp.stop_reason, False)})  # fmt: skip
            usage = Usage(usage.input_tokens + resp.usage.input_tokens, usage.output_tokens + resp.usage.output_tokens,
                          usage.cached_tokens + resp.usage.cached_tokens)  # fmt: skip
        first = results[0]
        return {"id": "cmpl-" + openai_id(first.id).split("-", 1)[-1], "object": "text_completion",
                "created": first.created or int(time.time()), "model": reqs[0].model, "choices": choices,
                "usage": self.encode_usage(usage)}  # fmt: skip

    def encode_response(self, resp: Response, req: Request) -> dict:
        return self.encode_choices([resp], [req])

    response_json = Codec.response_json  # not Chat's template

    def stream_encoder(self, req: Request):
        return CompletionsStreamEncoder(req)


class CompletionsStreamEncoder(OpenAIStreamEncoder):
    """Canonical events -> text_completion chunks, ending in data: [DONE]; thinking is never text."""

    OBJECT = "text_completion"

    def __init__(self, req: Request):
        super().__init__(req)
        self.id = "cmpl-" + self.id.split("-", 1)[1]

    def _chunk(self, delta: dict, finish=None) -> bytes:
        choice = {"text": delta.get("content", ""), "index": 0, "logprobs": None, "finish_reason": finish}
        obj = {"id": self.id, "object": self.OBJECT, "created": self.created, "model": self.req.model,
               "choices": [choice]}  # fmt: skip
        return b"data: " + dumps(obj) + b"\n\n"

    def encode(self, ev) -> bytes:
        if isinstance(ev, BlockDelta):
            return self._chunk({"content": ev.value}) if ev.kind == "text" and ev.value else b""
        if isinstance(ev, (BlockStart, BlockStop)):
            return b""
        if isinstance(ev, MessageStart):
            return self._chunk({"content": self.req.raw["prompt"]}) if self.req.raw.get("echo") else b""
        return super().encode(ev)  # the finish, the usage chunk, [DONE] and errors as Chat's


COMPLETIONS_CODEC = CompletionsCodec()


# ---- Anthropic Messages ----------------------------------------------------------------
#
# CANONICAL-MODEL NOTE (the one change this codec needs; merge it into section 4):
#   Tool.kind gains a third value, "builtin": a tool the provider defines and runs or knows by
#   type (Anthropic web_search_*, code_execution_*, bash_*, text_editor_*...). Its original
#   definition is kept whole in Tool.extra[<protocol name>] (extra["anthropic"] here); each
#   encoder sends only the builtins of its own protocol and skips every other builtin.
#   Section 4's Tool comment becomes:
#       kind: str = "function"  # function | custom (free-form text, sent as {"input": text}) | builtin
# (provider-defined, e.g. web_search: the definition is kept in extra[protocol] and only that protocol sends it)
#                               # | "builtin" (provider-defined; definition in extra[protocol])
#   and OpenAIChatCodec.encode_request must skip them (see the report).
#
# Blocks only Anthropic knows (document, search_result, server_tool_use, web_search_tool_result,
# container_upload..., and Claude Code's per-request billing-header system block) become text Parts
# with the whole block in extra["anthropic_block"]: this codec sends the block back unchanged, the
# others see a short text (or nothing: assistant turns, the billing header), so no protocol chokes.
# Custom (free-form) tools become a function with one string "input"; a call's input is {"input": raw}.

ANTHROPIC_ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}  # fmt: skip

# Max output tokens per Claude model, first match wins (globs, so dated and prefixed names match).
ANTHROPIC_MAX_OUTPUT = (
    ("*claude-3-haiku*", 4096), ("*claude-3-opus*", 4096), ("*claude-3-sonnet*", 4096),
    ("*claude-3-5-*", 8192), ("*claude-3-7-sonnet*", 64000),
    ("*claude-opus-4-1*", 32000), ("*claude-opus-4-0*", 32000), ("*claude-opus-4-2025*", 32000),
    ("*claude-opus-4", 32000), ("*claude-opus-4-6*", 128000),
    ("*claude*", 64000),
)  # fmt: skip
ANTHROPIC_DEFAULT_MAX_OUTPUT = 32000  # an unknown model behind an Anthropic-compatible endpoint
ANTHROPIC_DEFAULT_ANSWER_TOKENS = 16384  # max_tokens when the client set none (Anthropic requires one)
ANTHROPIC_MIN_THINKING_BUDGET = 1024  # Anthropic rejects smaller budgets
ANTHROPIC_EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576, "xhigh": 32768, "max": 32768}
ANTHROPIC_EFFORT_IN = {"max": "high"}  # Anthropic efforts the canonical vocabulary lacks

# Top-level fields only Anthropic understands, kept when an Anthropic request is re-encoded.
ANTHROPIC_ONLY_FIELDS = ("cache_control", "context_management", "output_config", "service_tier", "container",
                         "mcp_servers")  # fmt: skip
CLAUDE_CODE_BILLING_PREFIX = "x-anthropic-billing-header:"  # Claude Code's first system block
ANTHROPIC_MEDIA_TYPES = {"image/jpg": "image/jpeg"}  # a common misspelling Anthropic rejects
_TOOL_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")  # Anthropic's tool_use.id pattern is ^[a-zA-Z0-9_-]+$


def anthropic_block_extra(block: dict, known: tuple) -> dict | None:
    """The fields of a block this codec does not model (cache_control, citations...)."""
    extra = {k: v for k, v in block.items() if k not in known}
    return extra or None


def anthropic_opaque_text(block: dict) -> str:
    """What another protocol sees of a block only Anthropic knows: its text if it has one."""
    kind = block.get("type", "block")
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    texts = []
    items = block.get("content") or source.get("content")
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        texts.append(source["data"])
    if not texts:
        return f"[{kind} omitted by the gateway]"
    title = block.get("title")
    return (f"[{kind}: {title}]\n" if isinstance(title, str) and title else f"[{kind}]\n") + "\n".join(texts)


def anthropic_id(resp_id: str) -> str:
    if resp_id.startswith("msg_"):
        return resp_id
    tail = resp_id.split("-", 1)[-1] if "-" in resp_id else resp_id.split("_", 1)[-1]
    return "msg_" + (tail or uuid.uuid4().hex[:24])


def anthropic_tool_id(call_id: str) -> str:
    return _TOOL_ID_UNSAFE.sub("_", call_id)


def anthropic_stop_reason(reason: str, has_tool_use: bool) -> str:
    if has_tool_use and reason in ("end_turn", "tool_use"):
        return "tool_use"  # a turn with text and tools must make the client run the tools
    out = stop_reason_out("anthropic", reason)
    return "end_turn" if out == "tool_use" else out


@functools.lru_cache(maxsize=1024)
def anthropic_max_output(model: str) -> int:
    for pattern, limit in ANTHROPIC_MAX_OUTPUT:
        if glob_match(pattern, model):
            return limit
    return ANTHROPIC_DEFAULT_MAX_OUTPUT


def anthropic_image_source(part: Part) -> dict:
    data_uri = parse_data_uri(part.url) if part.url else None
    if data_uri:
        return {
            "type": "base64",
            "media_type": ANTHROPIC_MEDIA_TYPES.get(data_uri[0], data_uri[0]),
            "data": data_uri[1],
        }
    if part.url:
        return {"type": "url", "url": part.url}
    media_type = part.media_type or "image/png"
    return {"type": "base64", "media_type": ANTHROPIC_MEDIA_TYPES.get(media_type, media_type), "data": part.data}


def anthropic_document(part: Part) -> dict:
    """A document block: PDFs as base64 or URL sources, text as a text source, anything else in words."""
    text = document_text(part)
    if part.media_type == "application/pdf":
        source = {"type": "base64", "media_type": "application/pdf", "data": part.data} if part.data else {
            "type": "url", "url": part.url}  # fmt: skip
    elif text is not None:
        source = {"type": "text", "media_type": "text/plain", "data": text}
    else:
        return {"type": "text", "text": document_as_text(part)}
    block = {"type": "document", "source": source}
    if part.name:
        block["title"] = part.name
    return block


def anthropic_orphan_result(block: dict) -> dict:
    """A tool_result whose tool_use is not in the turn before, as text Anthropic accepts."""
    content = block.get("content")
    if isinstance(content, list):
        content = "\n".join(c.get("text", "[image]") for c in content if isinstance(c, dict))
    marker = " (error)" if block.get("is_error") else ""
    return {"type": "text", "text": f"[result of tool call {block['tool_use_id']}{marker}]\n{content or ''}".rstrip()}


class AnthropicCodec(Codec):
    name = "anthropic"
    keepalive = b'event: ping\ndata: {"type": "ping"}\n\n'

    @staticmethod
    def skippable(raw: bytes) -> bool:  # content blocks and pings: usage comes in message_start/_delta
        return raw.startswith((b"event: content_block_", b"event: ping\n")) and b'"error"' not in raw

    # -- requests
    REQUEST_FIELDS = {
        "model": str, "messages": list, "tools": list, "tool_choice": dict, "max_tokens": int, "temperature": float,
        "top_p": float, "top_k": int, "stop_sequences": list, "stream": bool, "thinking": dict, "output_config": dict,
        "metadata": dict, "output_format": dict,
    }  # fmt: skip

    def decode_request(self, body: dict) -> Request:
        check_fields(body, self.REQUEST_FIELDS, ("model", "messages"))
        get = body.get
        metadata = get("metadata") or {}
        user_id = metadata.get("user_id")
        req = Request(
            model=body["model"], messages=[], system=self._decode_system(get("system")), max_tokens=get("max_tokens"),
            temperature=get("temperature"), top_p=get("top_p"), top_k=get("top_k"), stop=get("stop_sequences") or [],
            stream=bool(get("stream")), metadata=metadata, user=user_id if isinstance(user_id, str) else "", raw=body,
            protocol="anthropic",
        )  # fmt: skip
        if not all(isinstance(s, str) for s in req.stop):
            raise bad_request("'stop_sequences' must be an array of strings")
        for i, msg in enumerate(body["messages"]):
            req.messages.append(self._decode_message(msg, f"messages[{i}]"))
        for i, tool in enumerate(get("tools") or ()):
            req.tools.append(self._decode_tool(tool, f"tools[{i}]"))
        self._decode_tool_choice(req, get("tool_choice"))
        self._decode_thinking(req, get("thinking"))
        self._decode_output_config(req, get("output_config") or {}, get("output_format"))
        return req

    def _decode_system(self, system) -> list:
        if system is None or isinstance(system, str):
            return [Part("text", text=system)] if system else []
        if not isinstance(system, list):
            raise bad_request(f"'system' must be a string or an array of text blocks, got {json_preview(system)}")
        parts = []
        for j, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise bad_request(f"system[{j}] must be a text block {{'type': 'text', 'text': ...}}")
            text = field_at(block, "text", str, f"system[{j}]", required=True)
            if text.startswith(CLAUDE_CODE_BILLING_PREFIX):  # changes per request: would void other providers' caches
                parts.append(Part("text", extra={"anthropic_block": block}))
            else:
                parts.append(Part("text", text=text, extra=anthropic_block_extra(block, ("type", "text"))))
        return parts

    def _decode_message(self, msg, where: str) -> Message:
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object")
        role = msg.get("role")
        if role not in ("user", "assistant", "system"):
            raise bad_request(f"{where}.role must be user, assistant or system, got {json_preview(role)}")
        if msg.get("content") is None:
            raise bad_request(f"{where}.content is required")
        return Message(role, self._decode_blocks(msg["content"], f"{where}.content", role))

    def _decode_blocks(self, content, where: str, role: str) -> list:
        if isinstance(content, str):
            return [Part("text", text=content)] if content else []
        if not isinstance(content, list):
            raise bad_request(f"{where} must be a string or an array of content blocks")
        parts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise bad_request(f"{where}[{j}] must be an object with a 'type'")
            parts.append(self._decode_block(block, f"{where}[{j}]", role))
        return parts

    def _decode_block(self, block: dict, where: str, role: str) -> Part:
        kind = block["type"]
        if kind == "text":
            text = field_at(block, "text", str, where, default="")
            return Part("text", text=text, extra=anthropic_block_extra(block, ("type", "text")))
        if kind == "image":
            return self._decode_image(block, where, role)
        if kind == "document":
            return self._decode_document(block, where, role)
        if kind == "tool_use":
            call_id = field_at(block, "id", str, where, required=True)
            name = field_at(block, "name", str, where, required=True)
            arguments = json.dumps(field_at(block, "input", dict, where, default={}), ensure_ascii=False)
            return Part("tool_call", id=call_id, name=name, arguments=arguments,
                        extra=anthropic_block_extra(block, ("type", "id", "name", "input")))  # fmt: skip
        if kind == "tool_result":
            call_id = field_at(block, "tool_use_id", str, where, required=True)
            content = block.get("content")
            parts = [] if content is None else self._decode_blocks(content, f"{where}.content", "user")
            is_error = bool(field_at(block, "is_error", bool, where, default=False))
            return Part("tool_result", id=call_id, content=parts, is_error=is_error,
                        extra=anthropic_block_extra(block, ("type", "tool_use_id", "content", "is_error")))  # fmt: skip
        if kind == "thinking":
            text = field_at(block, "thinking", str, where, default="")
            return Part("thinking", text=text, signature=field_at(block, "signature", str, where, default=""))
        if kind == "redacted_thinking":
            return Part("redacted_thinking", data=field_at(block, "data", str, where, default=""))
        return self._opaque(block, role)

    def _decode_image(self, block: dict, where: str, role: str) -> Part:
        source = field_at(block, "source", dict, where, required=True)
        extra = anthropic_block_extra(block, ("type", "source"))
        if source.get("type") == "base64":
            data = field_at(source, "data", str, f"{where}.source", required=True)
            media_type = field_at(source, "media_type", str, f"{where}.source", default="") or "image/png"
            return Part("image", media_type=media_type, data=data, extra=extra)
        if source.get("type") == "url":
            return Part("image", url=field_at(source, "url", str, f"{where}.source", required=True), extra=extra)
        return self._opaque(block, role)  # file ids and future source types: Anthropic only

    def _decode_document(self, block: dict, where: str, role: str) -> Part:
        source = field_at(block, "source", dict, where, required=True)
        kind = source.get("type")
        if kind not in ("base64", "url") or role != "user":
            return self._opaque(block, role)  # text and content sources: their text for others, the block for us
        title = block.get("title") if isinstance(block.get("title"), str) else ""
        if kind == "base64":
            data = field_at(source, "data", str, f"{where}.source", required=True)
            part = document_part(
                data, name=title, media_type=field_at(source, "media_type", str, f"{where}.source") or ""
            )
        else:
            part = document_part("", url=field_at(source, "url", str, f"{where}.source", required=True), name=title)
        part.extra = anthropic_block_extra(block, ("type", "source", "title"))  # context, citations, cache_control
        return part

    @staticmethod
    def _opaque(block: dict, role: str) -> Part:
        # In assistant turns (server tool calls and results) other protocols see nothing.
        text = "" if role == "assistant" else anthropic_opaque_text(block)
        return Part("text", text=text, extra={"anthropic_block": block})

    def _decode_tool(self, tool, where: str) -> Tool:
        if not isinstance(tool, dict):
            raise bad_request(f"{where} must be an object")
        kind = field_at(tool, "type", str, where)
        if kind not in (None, "custom"):  # web_search_20250305, bash_20250124...
            return Tool(field_at(tool, "name", str, where) or kind, kind="builtin", extra={"anthropic": tool})
        name = field_at(tool, "name", str, where, required=True)
        description = field_at(tool, "description", str, where, default="")
        schema = field_at(tool, "input_schema", dict, where, default={})
        extra = anthropic_block_extra(tool, ("type", "name", "description", "input_schema"))  # cache_control, strict...
        return Tool(name, description, schema, "function", extra)

    @staticmethod
    def _decode_tool_choice(req: Request, choice: dict | None) -> None:
        if choice is None:
            return
        kinds = {"auto": "auto", "any": "required", "tool": "tool", "none": "none"}
        if field_at(choice, "type", str, "tool_choice") not in kinds:
            raise bad_request(f"tool_choice.type must be auto, any, tool or none, got {json_preview(choice['type'])}")
        req.tool_choice = kinds[choice["type"]]
        if choice["type"] == "tool":
            req.tool_name = field_at(choice, "name", str, "tool_choice", required=True)
        if field_at(choice, "disable_parallel_tool_use", bool, "tool_choice"):
            req.parallel_tool_calls = False

    @staticmethod
    def _decode_thinking(req: Request, thinking: dict | None) -> None:
        if thinking is None:
            return
        if field_at(thinking, "type", str, "thinking") not in ("enabled", "adaptive", "disabled"):
            raise bad_request(
                f"thinking.type must be enabled, adaptive or disabled, got {json_preview(thinking.get('type'))}"
            )
        req.thinking = thinking["type"]
        req.thinking_budget = field_at(thinking, "budget_tokens", int, "thinking")

    @staticmethod
    def _decode_output_config(req: Request, config: dict, legacy_format: dict | None) -> None:
        effort = field_at(config, "effort", str, "output_config", default="")
        req.reasoning_effort = ANTHROPIC_EFFORT_IN.get(effort, effort)
        fmt = field_at(config, "format", dict, "output_config") or legacy_format  # output_format: the beta's spelling
        if fmt and fmt.get("type") == "json_schema":
            schema = field_at(fmt, "schema", dict, "output_config.format") or {}
            req.response_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}

    def encode_request(self, req: Request, model: str, provider=None) -> dict:
        from_anthropic = req.protocol == "anthropic"  # only then do parts carry Anthropic extras
        body: dict = {"model": model}
        messages = self._encode_messages(req, from_anthropic)
        tools = self._encode_tools(req, from_anthropic)
        tool_choice = self._encode_tool_choice(req) if tools else None
        budget = self._wanted_thinking_budget(req, from_anthropic)
        body["max_tokens"] = self._max_tokens(req, model, budget, provider)
        system = self._encode_system(req, from_anthropic)
        if system:
            body["system"] = system
        body["messages"] = messages
        if tools:
            body["tools"] = tools
        if tool_choice:
            body["tool_choice"] = tool_choice
        stop = [s for s in req.stop if s]
        if stop:
            body["stop_sequences"] = stop
        thinking = self._encode_thinking(req, budget, body["max_tokens"], tool_choice, messages)
        if thinking:
            body["thinking"] = thinking
        if not thinking or thinking["type"] == "disabled":  # Anthropic rejects sampling knobs with thinking
            self._encode_sampling(req, body)
        user_id = req.user or req.metadata.get("user_id")
        if isinstance(user_id, str) and user_id:
            body["metadata"] = {"user_id": user_id}  # the only metadata key Anthropic accepts
        if req.stream:
            body["stream"] = True
        if from_anthropic:
            body.update({k: req.raw[k] for k in ANTHROPIC_ONLY_FIELDS if k in req.raw})
        if req.response_format is not None and req.response_format.get("type") in ("json_schema", "json_object"):
            self._encode_output_format(req, model, body, from_anthropic)
        return body

    @staticmethod
    def _encode_output_format(req: Request, model: str, body: dict, from_anthropic: bool) -> None:
        """A JSON answer as Anthropic asks for one: output_config.format with the schema cleaned to what
        it accepts; a JSON object without a schema, or a model without structured outputs, by instruction."""
        config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
        if "format" in config:
            return  # an Anthropic client's own, as sent
        legacy = req.raw.get("output_format") if from_anthropic else None
        fmt = legacy if isinstance(legacy, dict) else anthropic_output_format(req.response_format, model)
        if fmt is not None:
            body["output_config"] = {**config, "format": fmt}
            return
        instruction = json_answer_instruction(req.response_format)
        system = body.get("system")
        if isinstance(system, list):
            body["system"] = [*system, {"type": "text", "text": instruction}]
        else:
            body["system"] = f"{system}\n\n{instruction}" if system else instruction

    def _encode_system(self, req: Request, from_anthropic: bool):
        parts = list(req.system)
        for msg in req.messages:  # Anthropic takes system text only at the top
            if msg.role == "system":
                parts.extend(p for p in msg.parts if p.type == "text")
        if from_anthropic and isinstance(req.raw.get("system"), list):
            return [b for p in parts if (b := self._encode_part(p, "system", True))]
        return "\n\n".join(p.text for p in parts if p.text.strip())

    def _encode_messages(self, req: Request, from_anthropic: bool) -> list:
        turns: list = []
        for msg in req.messages:
            if msg.role == "system":
                continue
            blocks = [b for p in msg.parts if (b := self._encode_part(p, msg.role, from_anthropic))]
            if not blocks:
                continue  # never an empty content
            if turns and turns[-1]["role"] == msg.role:
                turns[-1]["content"].extend(blocks)  # Anthropic wants alternating turns
            else:
                turns.append({"role": msg.role, "content": blocks})
        for i, turn in enumerate(turns):
            if turn["role"] == "user":
                self._place_tool_results(turn, turns[i - 1] if i else None)
        self._strip_final_assistant_whitespace(turns)
        if not turns:
            raise bad_request("an Anthropic model needs at least one user or assistant message with content")
        for turn in turns:  # a lone plain text block goes as a string, the shape clients write
            content = turn["content"]
            if len(content) == 1 and len(content[0]) == 2 and content[0]["type"] == "text":
                turn["content"] = content[0]["text"]
        return turns

    def _encode_part(self, part: Part, role: str, from_anthropic: bool) -> dict | None:
        if part.extra and "anthropic_block" in part.extra:
            return part.extra["anthropic_block"]
        kind = part.type
        if kind == "text":
            block = {"type": "text", "text": part.text} if part.text.strip() else None  # Anthropic rejects blank text
        elif kind == "image" and role == "user":
            block = {"type": "image", "source": anthropic_image_source(part)}
        elif kind == "document" and role == "user":
            block = anthropic_document(part)
        elif kind == "tool_call" and role == "assistant":
            arguments = json_object_arguments(part.arguments)
            block = {"type": "tool_use", "id": anthropic_tool_id(part.id), "name": part.name, "input": arguments}
        elif kind == "tool_result" and role == "user":
            block = self._encode_tool_result(part, from_anthropic)
        elif kind == "thinking" and role == "assistant" and part.signature:  # unsigned thinking is dropped
            return {"type": "thinking", "thinking": part.text, "signature": part.signature}
        elif kind == "redacted_thinking" and role == "assistant" and part.data:
            return {"type": "redacted_thinking", "data": part.data}
        else:
            block = None
        return self._with_extra(block, part, from_anthropic) if block else None

    def _encode_tool_result(self, part: Part, from_anthropic: bool) -> dict:
        content = [b for p in part.content or [] if (b := self._encode_part(p, "user", from_anthropic))]
        block: dict = {"type": "tool_result", "tool_use_id": anthropic_tool_id(part.id)}
        if len(content) == 1 and content[0].keys() == {"type", "text"}:
            block["content"] = content[0]["text"]
        elif content:
            block["content"] = content
        if part.is_error:
            block["is_error"] = True
        return block

    @staticmethod
    def _with_extra(block: dict, part: Part, from_anthropic: bool) -> dict:
        if from_anthropic and part.extra:
            block.update(part.extra)  # cache_control, citations: other codecs never set extra keys Anthropic reads
        return block

    @staticmethod
    def _place_tool_results(turn: dict, previous: dict | None) -> None:
        """tool_result blocks first, each answering a tool_use of the assistant turn right before;
        any other result becomes text (Anthropic rejects a result without its call)."""
        calls = {b.get("id") for b in previous["content"] if b.get("type") == "tool_use"} if previous else set()
        results, rest = [], []
        for block in turn["content"]:
            if block.get("type") != "tool_result":
                rest.append(block)
            elif block.get("tool_use_id") in calls:
                results.append(block)
            else:
                rest.append(anthropic_orphan_result(block))
        turn["content"] = results + rest

    @staticmethod
    def _strip_final_assistant_whitespace(turns: list) -> None:
        if not turns or turns[-1]["role"] != "assistant":
            return
        last = turns[-1]["content"][-1]
        if last.get("type") == "text":  # a prefill may not end in whitespace
            turns[-1]["content"][-1] = {**last, "text": last["text"].rstrip()}

    def _encode_tools(self, req: Request, from_anthropic: bool) -> list:
        tools = []
        for tool in req.tools:
            if tool.kind == "builtin":
                if tool.extra and "anthropic" in tool.extra:
                    tools.append(tool.extra["anthropic"])
                continue  # another protocol's builtin tool means nothing here
            schema = tool.parameters or {"type": "object", "properties": {}}
            out = {"name": tool.name, "description": tool.description, "input_schema": schema}
            if not tool.description:
                del out["description"]
            if from_anthropic and tool.extra:
                out.update(tool.extra)
            tools.append(out)
        return tools

    @staticmethod
    def _encode_tool_choice(req: Request) -> dict | None:
        choice = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(req.tool_choice)
        if req.tool_choice == "tool":
            choice = {"type": "tool", "name": req.tool_name}
        if req.parallel_tool_calls is False and (choice is None or choice["type"] != "none"):
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        return choice

    @staticmethod
    def _wanted_thinking_budget(req: Request, from_anthropic: bool) -> int | None:
        """The thinking budget the client asked for, before it is fitted to max_tokens."""
        if req.thinking == "enabled":
            return (
                req.thinking_budget
                or ANTHROPIC_EFFORT_BUDGETS.get(req.reasoning_effort)
                or ANTHROPIC_MIN_THINKING_BUDGET
            )
        if req.thinking or from_anthropic:  # an Anthropic effort alone is sent as output_config, not as thinking
            return None
        return req.thinking_budget or ANTHROPIC_EFFORT_BUDGETS.get(req.reasoning_effort)

    @staticmethod
    def _max_tokens(req: Request, model: str, budget: int | None, provider=None) -> int:
        default = getattr(provider, "default_max_tokens", 0) or ANTHROPIC_DEFAULT_ANSWER_TOKENS
        wanted = req.max_tokens or (default + (budget or 0))
        return max(1, min(wanted, anthropic_max_output(model)))

    def _encode_thinking(self, req: Request, budget, max_tokens: int, tool_choice, messages: list) -> dict | None:
        forced_tool = bool(tool_choice) and tool_choice["type"] in ("any", "tool")  # Anthropic rejects thinking then
        if req.thinking == "disabled":
            return {"type": "disabled"}
        if req.thinking == "adaptive":
            return None if forced_tool else {"type": "adaptive"}
        if budget is None or forced_tool or self._unthought_tool_turn(messages):
            return None
        budget = min(budget, max_tokens - 1)  # the budget must stay below max_tokens
        if budget < ANTHROPIC_MIN_THINKING_BUDGET:
            return None
        return {"type": "enabled", "budget_tokens": budget}

    @staticmethod
    def _unthought_tool_turn(messages: list) -> bool:
        """With thinking enabled Anthropic wants the last assistant turn that called tools to
        open with a signed thinking block; history from other protocols has none."""
        for turn in reversed(messages):
            if turn["role"] == "assistant":
                blocks = turn["content"] if isinstance(turn["content"], list) else []
                calls = any(b.get("type") == "tool_use" for b in blocks)
                return calls and blocks[0].get("type") not in ("thinking", "redacted_thinking")
        return False

    @staticmethod
    def _encode_sampling(req: Request, body: dict) -> None:
        if req.temperature is not None:
            body["temperature"] = min(req.temperature, 1.0)  # OpenAI allows up to 2, Anthropic up to 1
        if req.top_p is not None and req.temperature is None:  # recent Claude models reject both at once
            body["top_p"] = req.top_p
        if req.top_k is not None:
            body["top_k"] = req.top_k

    # -- responses
    def decode_response(self, body: dict) -> Response:
        parts = []
        content = body.get("content") or []
        if type(content) is not list:
            raise malformed_answer(f"'content' must be an array, got {json_preview(content)}")
        for block in content:
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                continue
            try:
                parts.append(self._decode_block(block, "content", "assistant"))
            except GatewayError as exc:  # the upstream's fault, not the client's
                raise malformed_answer(exc.message) from None
        stop_sequence = body.get("stop_sequence")
        return Response(string_or(body.get("id")) or new_id("msg_"), string_or(body.get("model")), parts,
                        stop_reason_in("anthropic", body.get("stop_reason")),
                        stop_sequence if type(stop_sequence) is str else None,
                        self.decode_usage(body.get("usage")))  # fmt: skip

    @staticmethod
    def decode_usage(usage) -> Usage:
        if not isinstance(usage, dict):
            return Usage()
        read = token_count(usage.get("cache_read_input_tokens"))
        created = token_count(usage.get("cache_creation_input_tokens"))
        return Usage(input_tokens=token_sum(token_count(usage.get("input_tokens")) + read + created),
                     output_tokens=token_count(usage.get("output_tokens")), cached_tokens=read,
                     cache_creation_tokens=created)  # fmt: skip

    @staticmethod
    def encode_usage(usage: Usage) -> dict:
        uncached = usage.input_tokens - usage.cached_tokens - usage.cache_creation_tokens
        return {
            "input_tokens": max(0, uncached),
            "cache_creation_input_tokens": usage.cache_creation_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.output_tokens,
        }

    def encode_response(self, resp: Response, req: Request) -> dict:
        content = [b for p in resp.parts if (b := self._response_block(p))]
        has_tool_use = any(b["type"] == "tool_use" for b in content)
        return {
            "id": anthropic_id(resp.id),
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": content,
            "stop_reason": anthropic_stop_reason(resp.stop_reason, has_tool_use),
            "stop_sequence": resp.stop_sequence,
            "usage": self.encode_usage(resp.usage),
        }

    @staticmethod
    def _response_block(part: Part) -> dict | None:
        extra = part.extra or {}
        if "anthropic_block" in extra:
            return extra["anthropic_block"]
        if part.type == "text":
            block = {"type": "text", "text": part.text} if part.text else None
            if block and "citations" in extra:
                block["citations"] = extra["citations"]
            return block
        if part.type == "thinking" and (part.text or part.signature):
            return {"type": "thinking", "thinking": part.text, "signature": part.signature}
        if part.type == "redacted_thinking":
            return {"type": "redacted_thinking", "data": part.data}
        if part.type == "tool_call":
            return {"type": "tool_use", "id": part.id or new_id("toolu_"), "name": part.name,
                    "input": json_object_arguments(part.arguments)}  # fmt: skip
        return None

    # -- streams
    def stream_decoder(self):
        return AnthropicStreamDecoder()

    def stream_encoder(self, req: Request):
        return AnthropicStreamEncoder(req)

    # -- errors
    def encode_stream_error(self, err: GatewayError) -> bytes:
        return sse_event("error", self.encode_error(err))  # SDKs raise only on `event: error`

    def encode_error(self, err: GatewayError) -> dict:
        kind = err.kind
        if kind not in ANTHROPIC_ERROR_STATUS:  # client_closed, OpenAI's server_error...: the closest by status
            kind = "api_error" if err.status >= 500 else "invalid_request_error"
        return {"type": "error", "error": {"type": kind, "message": err.message}}


class AnthropicStreamDecoder:
    """Anthropic Messages SSE -> canonical events. Block indices are the upstream's. Usage is
    Anthropic's running total: message_delta fields replace message_start's, never add to them.
    MessageDelta and MessageStop go out at message_stop, so each comes exactly once. Blocks only
    Anthropic knows (server_tool_use, web_search_tool_result...) are held until their stop and
    passed on whole as opaque text parts (see the section note)."""

    BLOCK_DELTAS = {"text_delta": ("text", "text"), "input_json_delta": ("arguments", "partial_json"),
                    "thinking_delta": ("thinking", "thinking"), "signature_delta": ("signature", "signature")}  # fmt: skip
    DELTAS_OF = {"text": ("text",), "tool_call": ("arguments",), "thinking": ("thinking", "signature")}

    def __init__(self):
        self.started = False
        self.open: dict[int, str] = {}  # index -> canonical part type, for blocks started and not stopped
        self.opaque: dict[int, tuple[dict, list]] = {}  # index -> (block, its input_json pieces)
        self.usage: dict = {}  # Anthropic's usage fields, latest value of each
        self.stop_reason = ""
        self.stop_sequence = None
        self.saw_message_delta = False
        self.finished = False

    def feed(self, event: SSEEvent) -> list:
        if self.finished or not event.data:
            return []
        if event.data == "[DONE]":  # some Anthropic-compatible servers end like OpenAI
            return self.finish()
        try:
            data = loads(event.data)
        except ValueError:
            return [StreamError(GatewayError(502, f"upstream sent malformed stream data: {event.data[:120]!r}"))]
        if not isinstance(data, dict):
            return []
        kind = data.get("type") or event.event
        if kind == "message_start":
            return self._message_start(object_or_empty(data.get("message")))
        if kind == "error":
            return self._error(object_or_empty(data.get("error")))
        if kind not in (
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ):
            return []  # ping and event types newer than this code
        out = self._ensure_started()
        index = data.get("index")
        if type(index) is not int and kind.startswith("content_block"):
            self.finished = True
            return out + [StreamError(malformed_answer(f"a {kind} event with the index {json_preview(index)}"))]
        if kind == "content_block_delta":
            delta = data.get("delta")
            out += self._block_delta(index, delta if type(delta) is dict else {})
        elif kind == "content_block_start":
            out += self._block_start(index, object_or_empty(data.get("content_block")))
        elif kind == "content_block_stop":
            out += self._block_stop(index)
        elif kind == "message_delta":
            self._message_delta(data)
        else:
            out += self._close()
        return out

    def _ensure_started(self) -> list:
        if self.started:
            return []
        self.started = True
        return [MessageStart(new_id("msg_"), "", Usage())]

    def _message_start(self, message: dict) -> list:
        if self.started:
            return []
        self.started = True
        if isinstance(message.get("usage"), dict):
            self.usage.update(message["usage"])
        return [
            MessageStart(
                string_or(message.get("id")) or new_id("msg_"),
                string_or(message.get("model")),
                AnthropicCodec.decode_usage(self.usage),
            )
        ]

    def _block_start(self, index, block: dict) -> list:
        if index in self.open or index in self.opaque:
            return []
        kind = block.get("type")
        if kind == "text":
            return self._open(index, Part("text"), [("text", block.get("text"))])
        if kind == "thinking":
            return self._open(
                index, Part("thinking"), [("thinking", block.get("thinking")), ("signature", block.get("signature"))]
            )
        if kind == "redacted_thinking":
            return self._open(index, Part("redacted_thinking", data=string_or(block.get("data"))), [])
        if kind == "tool_use":
            part = Part(
                "tool_call", id=string_or(block.get("id")) or new_id("toolu_"), name=string_or(block.get("name"))
            )
            given = block.get("input")  # some compatible servers send the whole input here, with no deltas
            return self._open(index, part, [("arguments", json.dumps(given, ensure_ascii=False) if given else "")])
        self.opaque[index] = (dict(block), [])
        return []

    def _open(self, index, part: Part, initial: list) -> list:
        self.open[index] = part.type
        return [BlockStart(index, part)] + [BlockDelta(index, k, v) for k, v in initial if isinstance(v, str) and v]

    def _block_delta(self, index, delta: dict) -> list:
        kind = delta.get("type")
        kind, key = self.BLOCK_DELTAS.get(kind, ("", "")) if type(kind) is str else ("", "")  # citations...: ignored
        value = delta.get(key) if key else None
        if not isinstance(value, str) or not value:
            return []
        if index in self.opaque:
            if kind == "arguments":
                self.opaque[index][1].append(value)
            return []
        if kind not in self.DELTAS_OF.get(self.open.get(index), ()):
            return []  # never a delta without its start, nor one its block cannot hold
        return [BlockDelta(index, kind, value)]

    def _block_stop(self, index) -> list:
        if index in self.opaque:
            block, pieces = self.opaque.pop(index)
            if pieces:
                block["input"] = json_object_arguments("".join(pieces))
            return [BlockStart(index, Part("text", extra={"anthropic_block": block})), BlockStop(index)]
        if self.open.pop(index, None) is None:
            return []
        return [BlockStop(index)]

    def _message_delta(self, data: dict) -> None:
        delta = object_or_empty(data.get("delta"))
        if delta.get("stop_reason"):
            self.stop_reason = stop_reason_in("anthropic", delta["stop_reason"])
        if "stop_sequence" in delta:
            self.stop_sequence = delta["stop_sequence"] if type(delta["stop_sequence"]) is str else None
        if isinstance(data.get("usage"), dict):
            self.usage.update({k: v for k, v in data["usage"].items() if v is not None})
        self.saw_message_delta = True

    def _close(self) -> list:
        self.finished = True
        out: list = [BlockStop(index) for index in self.open]
        self.open.clear()
        usage = AnthropicCodec.decode_usage(self.usage)
        return out + [MessageDelta(self.stop_reason or "end_turn", self.stop_sequence, usage), MessageStop()]

    def _error(self, error: dict) -> list:
        self.finished = True
        kind = string_or(error.get("type"))
        kind = kind if kind in ANTHROPIC_ERROR_STATUS else ""
        status = ANTHROPIC_ERROR_STATUS.get(kind, 502)
        return [StreamError(GatewayError(status, as_text(error.get("message") or "upstream stream error"), kind))]

    def finish(self) -> list:
        """The upstream closed the stream. Without message_stop the answer is complete only if
        message_delta came and no block is open; otherwise say it was cut short, never end_turn."""
        if self.finished:
            return []
        if self.started and self.saw_message_delta and not self.open and not self.opaque:
            return self._close()
        self.finished = True
        return stream_cut_short(
            "in the middle of a content block" if self.open or self.opaque else "before message_delta"
        )


class AnthropicStreamEncoder:
    """Canonical events -> Anthropic SSE. Text and thinking blocks start at their first
    non-empty delta (an empty block never reaches the client) and wire indices run 0, 1, 2...
    with no gaps; tool_use blocks start at once and forward argument deltas as they come,
    once they begin as a JSON object does (`{"` or `{}`): arguments that do not (a local
    model's `ls -la` or `{'a': 1}`) are held and sent at the block's stop as the JSON answer
    has them (json_object_arguments), since the SDKs parse the joined deltas as JSON.
    One block is open at a time and every start gets its stop: should the canonical stream
    interleave blocks, a later block's events are held until the earlier one stops."""

    DELTAS = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking"),
              "signature": ("signature_delta", "signature"), "arguments": ("input_json_delta", "partial_json")}  # fmt: skip
    FITS = {"text": ("text",), "thinking": ("thinking", "signature"), "tool_use": ("arguments",)}
    # each delta's event with its index and value still to fill in: sse_event of the dict, byte for byte
    DELTA_EVENTS = {
        kind: b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"'
        + name.encode() + b'","' + key.encode() + b'":%b}}\n\n'
        for kind, (name, key) in DELTAS.items()
    }  # fmt: skip

    def __init__(self, req: Request):
        self.req = req
        self.id = new_id("msg_")
        self.started = False
        self.done = False
        self.next_index = 0
        self.pending: dict[int, str] = {}  # canonical index -> "text"/"thinking" not started yet
        self.wire: dict[int, tuple[int, str]] = {}  # canonical index -> (wire index, block type)
        self.open: int | None = None  # canonical index of the open block
        self.sent_tool_use = False
        self.sent_message_delta = False
        self.owner: int | None = None  # canonical index of the block started and not yet stopped
        # events of blocks that came while another one was open, per block in order of arrival (one
        # queue per block: rescanning one shared list at every stop was quadratic in the blocks)
        self.backlog: dict[int, list] = {}
        self.releasing = False
        self.unsure: dict[int, list] = {}  # tool block -> its arguments held while they may not be JSON
        self.not_json: set[int] = set()  # tool blocks whose arguments did not begin as JSON

    def encode(self, ev) -> bytes:
        if self.done:
            return b""
        if isinstance(ev, (BlockStart, BlockDelta, BlockStop)) and self.owner not in (None, ev.index):
            self.backlog.setdefault(ev.index, []).append(
                ev
            )  # another block holds the wire: Anthropic cannot interleave
            return b""
        if isinstance(ev, MessageStart):
            return self._message_start(ev.id, ev.usage)
        if isinstance(ev, BlockDelta):
            return self._block_delta(ev)
        if isinstance(ev, BlockStart):
            self.owner = ev.index
            return self._block_start(ev)
        if isinstance(ev, BlockStop):
            return self._block_stop(ev.index)
        if isinstance(ev, MessageDelta):
            return self._release_all() + self._message_delta(ev)
        if isinstance(ev, MessageStop):
            out = self._release_all() + self._message_start("", None) + self._stop_open()
            if not self.sent_message_delta:
                out += self._message_delta(MessageDelta("end_turn"))
            self.done = True
            return out + sse_event("message_stop", {"type": "message_stop"})
        if isinstance(ev, StreamError):
            self.done = True
            return sse_event("error", ANTHROPIC_CODEC.encode_error(ev.error))
        return b""

    def _block_stop(self, index: int) -> bytes:
        self.pending.pop(index, None)  # never got content: the client never sees it
        out = self._stop_open() if self.open == index else b""
        if self.owner != index:
            return out
        self.owner = None
        return out if self.releasing else out + self._release_held()

    def _release_held(self) -> bytes:
        """The wire is free: the held blocks go out, first come first, until one stays open."""
        out = []
        self.releasing = True
        try:
            while self.owner is None and self.backlog:
                events = self.backlog.pop(next(iter(self.backlog)))
                out.extend(self.encode(ev) for ev in events)
        finally:
            self.releasing = False
        return b"".join(out)

    def _release_all(self) -> bytes:
        """The message ends: blocks the upstream never stopped are closed, held ones sent."""
        out = []
        while self.owner is not None:
            out.append(self._block_stop(self.owner))
        return b"".join(out)

    def _message_start(self, msg_id: str, usage: Usage | None) -> bytes:
        if self.started:
            return b""
        self.started = True
        if msg_id:
            self.id = anthropic_id(msg_id)
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.req.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": AnthropicCodec.encode_usage(usage or Usage())}  # fmt: skip
        return sse_event("message_start", {"type": "message_start", "message": message})

    def _block_start(self, ev: BlockStart) -> bytes:
        out = self._message_start("", None)
        part = ev.part
        opaque = (part.extra or {}).get("anthropic_block")
        if opaque:
            return out + self._start(ev.index, opaque)
        if part.type in ("text", "thinking"):
            self.pending[ev.index] = part.type
            return out
        if part.type == "tool_call":
            self.sent_tool_use = True
            block = {"type": "tool_use", "id": part.id or new_id("toolu_"), "name": part.name, "input": {}}
            out += self._start(ev.index, block)
            self.unsure[ev.index] = []
            return out
        if part.type == "redacted_thinking":
            return out + self._start(ev.index, {"type": "redacted_thinking", "data": part.data})
        return out

    def _block_delta(self, ev: BlockDelta) -> bytes:
        if not ev.value:
            return b""
        out = self._message_start("", None)
        kind = self.pending.get(ev.index)
        if kind and ev.kind in self.FITS[kind]:
            del self.pending[ev.index]
            block = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            out += self._start(ev.index, block)
        if self.open != ev.index or ev.kind not in self.FITS.get(self.wire[ev.index][1], ()):
            return out  # a delta outside its open block cannot be said in Anthropic's stream
        value = ev.value
        held = self.unsure.get(ev.index)
        if held is not None:  # the first characters of a call's arguments: do they begin a JSON object?
            held.append(value)
            if ev.index in self.not_json:
                return out  # kept whole until the block stops (_stop_open)
            start = "".join(held).lstrip()  # (a few pieces: what it takes to see two characters)
            after = start[1:].lstrip()[:1]
            if not after and start.rstrip() in ("", "{") and len(held) < 64:
                return out  # too few to tell
            if start[:1] != "{" or after not in ('"', "}"):
                self.not_json.add(ev.index)
                return out
            del self.unsure[ev.index]
            value = "".join(held)
        return out + self.DELTA_EVENTS[ev.kind] % (self.wire[ev.index][0], json_string(value))

    def _start(self, index: int, block: dict) -> bytes:
        out = self._stop_open()
        self.wire[index] = (self.next_index, block.get("type", ""))
        self.open = index
        self.next_index += 1
        start = {"type": "content_block_start", "index": self.wire[index][0], "content_block": block}
        return out + sse_event("content_block_start", start)

    def _stop_open(self) -> bytes:
        if self.open is None:
            return b""
        wire_index = self.wire[self.open][0]
        held = self.unsure.pop(self.open, None)
        self.open = None
        out = b""
        if held:  # arguments that never began as JSON: as the whole answer has them
            value = dumps(json_object_arguments("".join(held)))
            out = self.DELTA_EVENTS["arguments"] % (wire_index, json_string(value.decode()))
        return out + sse_event("content_block_stop", {"type": "content_block_stop", "index": wire_index})

    def _message_delta(self, ev: MessageDelta) -> bytes:
        if self.sent_message_delta:
            return b""
        self.sent_message_delta = True
        out = self._message_start("", None) + self._stop_open()
        self.pending.clear()
        delta = {
            "stop_reason": anthropic_stop_reason(ev.stop_reason, self.sent_tool_use),
            "stop_sequence": ev.stop_sequence,
        }
        usage = AnthropicCodec.encode_usage(ev.usage or Usage())
        return out + sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})


ANTHROPIC_CODEC = AnthropicCodec()


def anthropic_count_tokens_estimate(body: dict) -> int:
    """count_tokens for a model Anthropic does not serve: everything the request sends
    (system, messages, tool definitions, images), through the one estimator."""
    return estimate_tokens([body.get("system"), body.get("messages"), body.get("tools"), body.get("tool_choice")])


# ---- OpenAI Responses --------------------------------------------------------------------
#
# Responses bodies <-> the canonical model, so Codex (which speaks only this API) reaches Chat-only
# and Anthropic upstreams, and Chat/Anthropic/Gemini clients reach a Responses-only upstream.
#   input items  message -> Message (developer/system before the first turn -> req.system);
#                reasoning -> thinking Part (extra: id, encrypted_content); function_call and
#                custom_tool_call -> tool_call Parts of one assistant turn; *_output -> tool_result.
#   tools        function as is; custom -> a function with one string parameter "input" whose
#                call arguments are {"input": raw}; namespace -> flattened "<namespace>__<name>";
#                hosted tools (web_search, tool_search, ...) are dropped with a log line.
#   output       the encoders turn a call of a custom tool back into a custom_tool_call with the raw
#                input, and restore name + namespace of namespaced tools, so no other codec needs
#                to know about either.
# Signed Anthropic thinking reaches a Responses client as a reasoning item whose encrypted_content
# is "tgw1." + base64(JSON); the client echoes it and the signature comes back byte-exact.

RESPONSES_HOSTED_TOOLS = ("web_search", "tool_search", "file_search", "computer_use", "code_interpreter",
                          "image_generation", "local_shell", "shell", "mcp", "apply_patch")  # fmt: skip
# Canonical stop reasons that end a Responses turn "incomplete", with the reason the API names.
RESPONSES_INCOMPLETE_REASONS = {"max_tokens": "max_output_tokens", "content_filter": "content_filter"}
RESPONSES_INCOMPLETE_IN = {"max_output_tokens": "max_tokens", "content_filter": "content_filter"}
# GatewayError kinds -> the error codes Codex acts on (retry after a delay, give up, overloaded).
RESPONSES_ERROR_CODES = {"rate_limit_error": "rate_limit_exceeded", "overloaded_error": "server_is_overloaded",
                         "invalid_request_error": "invalid_prompt", "request_too_large": "invalid_prompt",
                         "billing_error": "insufficient_quota"}  # fmt: skip
RESPONSES_ERROR_STATUS = {"rate_limit_exceeded": 429, "insufficient_quota": 429, "server_is_overloaded": 503,
                          "slow_down": 503, "invalid_prompt": 400, "context_length_exceeded": 400}  # fmt: skip
_CONTEXT_OVERFLOW = re.compile(
    r"context (length|window)|prompt is too long|maximum context|too many (input )?tokens", re.I
)
_UNSAFE_TOOL_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SIGNED_THINKING_PREFIX = "tgw1."
CUSTOM_GRAMMAR_MAX_CHARS = 4000  # longer grammars stay out of the schema (the tool description explains them)


def flat_tool_name(namespace, name: str) -> str:
    """A namespaced Responses tool as one name every upstream accepts (^[a-zA-Z0-9_-]{1,64}$)."""
    if not namespace:
        return name
    flat = _UNSAFE_TOOL_NAME_CHARS.sub("_", f"{namespace}__{name}")
    if len(flat) > 64:
        flat = flat[:55] + "_" + hashlib.sha1(flat.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return flat


def custom_tool_parameters(fmt) -> dict:
    """The schema a custom (free-form) tool gets upstream: one string, the tool's raw input."""
    about = "The complete raw input of this free-form tool, passed to it verbatim (plain text, not JSON)."
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        definition = as_text(fmt.get("definition") or "")
        syntax = as_text(fmt.get("syntax") or "")
        if len(definition) <= CUSTOM_GRAMMAR_MAX_CHARS:
            about += f" It must match this {syntax} grammar:\n{definition}"
        else:
            about += f" It must match the {syntax} grammar the tool description explains."
    prop = {"type": "string", "description": about}
    return {"type": "object", "properties": {"input": prop}, "required": ["input"], "additionalProperties": False}


def custom_input_of(arguments: str) -> str:
    """The raw input of a custom tool call from the canonical JSON arguments {"input": raw}; a model
    that wrote something else still gets its text through rather than an empty input."""
    try:
        value = loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict):
        strings = [v for v in value.values() if isinstance(v, str)]
        if isinstance(value.get("input"), str):
            value = value["input"]
        elif len(value) == 1 and strings:
            value = strings[0]
    if not isinstance(value, str):
        return arguments
    return _LONE_SURROGATE.sub("\ufffd", value)  # a lone \ud800 cannot be encoded as UTF-8


def pack_thinking(part: Part) -> str:
    """Signed (or redacted) thinking as a reasoning item's encrypted_content, so it comes back intact."""
    if part.type == "redacted_thinking":
        blob = {"type": "redacted_thinking", "data": part.data}
    else:
        blob = {"type": "thinking", "text": part.text, "signature": part.signature}
    return SIGNED_THINKING_PREFIX + base64.urlsafe_b64encode(dumps(blob)).decode()


def unpack_thinking(encrypted) -> Part | None:
    if not isinstance(encrypted, str) or not encrypted.startswith(SIGNED_THINKING_PREFIX):
        return None
    try:
        blob = loads(base64.urlsafe_b64decode(encrypted[len(SIGNED_THINKING_PREFIX) :]))
    except ValueError:
        return None
    if not isinstance(blob, dict):
        return None
    if blob.get("type") == "redacted_thinking":
        return Part("redacted_thinking", data=string_or(blob.get("data")))
    return Part("thinking", text=string_or(blob.get("text")), signature=string_or(blob.get("signature")))


def wire_tool_name(name: str, tool: Tool | None, extra: dict | None) -> tuple[str, str | None]:
    """(name, namespace) of a canonical tool name as the Responses client or upstream knows it."""
    origin = (tool.extra if tool is not None else extra) or {}
    if origin.get("namespace"):
        return origin.get("name") or name, origin["namespace"]
    return name, None


def is_custom_call(part: Part, tool: Tool | None) -> bool:
    if tool is not None:
        return tool.kind == "custom"
    return (part.extra or {}).get("type") == "custom_tool_call"


def item_texts(items) -> list:
    """The strings under "text" in a list of objects (reasoning summaries, content parts)."""
    if not isinstance(items, list):
        return []
    return [text for item in items if isinstance(item, dict) and isinstance(text := item.get("text"), str)]


def responses_error_code(err: GatewayError) -> str:
    if err.kind == "invalid_request_error" and _CONTEXT_OVERFLOW.search(err.message):
        return "context_length_exceeded"
    return RESPONSES_ERROR_CODES.get(err.kind, "server_error" if err.status >= 500 else err.kind)


def responses_error(err: GatewayError) -> dict:
    message = err.message
    if err.retry_after and "try again" not in message.lower():
        stop = "" if message.endswith((".", "!", "?")) else "."
        message += f"{stop} Please try again in {err.retry_after:g}s."  # Codex reads its retry delay from here
    return {"code": responses_error_code(err), "message": message}


class JsonStringFieldReader:
    """Decodes the string value of one top-level field ({"input": "..."}) while its JSON text arrives
    in pieces: each feed returns only the newly decoded text. Escapes and \\uXXXX surrogate pairs
    may be split anywhere across pieces."""

    ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}

    def __init__(self, key: str):
        self.key = key
        self.state = "scan"  # scan (before the value) | await (after its colon) | value | done
        self.depth = 0
        self.in_string = False
        self.string_escape = False
        self.token: list[str] = []
        self.last_string: str | None = None
        self.escape: str | None = None  # the escape being read inside the value ("" right after "\")
        self.high_surrogate = 0

    def feed(self, piece: str) -> str:
        out: list[str] = []
        for ch in piece:
            if self.state == "value":
                self._value_char(ch, out)
            elif self.state == "done":
                break
            else:
                self._scan_char(ch)
        return "".join(out)

    def _scan_char(self, ch: str) -> None:
        if self.in_string:
            if self.string_escape:
                self.string_escape = False
            elif ch == "\\":
                self.string_escape = True
            elif ch == '"':
                self.in_string = False
                self.last_string = "".join(self.token)
                return
            self.token.append(ch)
        elif self.state == "await":
            if ch not in " \t\r\n":
                self.state = "value" if ch == '"' else "done"  # a non-string value: the caller falls back
        elif ch == '"':
            self.in_string, self.token = True, []
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        elif (
            ch == ":"
            and self.depth == 1
            and self.last_string is not None
            and self._decoded(self.last_string) == self.key
        ):
            self.state = "await"
        elif ch == ",":
            self.last_string = None

    @staticmethod
    def _decoded(raw: str) -> str:
        try:
            return loads(f'"{raw}"')
        except ValueError:
            return raw

    def _value_char(self, ch: str, out: list) -> None:
        if self.escape is None:
            if ch == "\\":
                self.escape = ""
                return
            self._flush_surrogate(out)
            if ch == '"':
                self.state = "done"
            else:
                out.append(ch)
            return
        self.escape += ch
        if self.escape[0] != "u":
            self._flush_surrogate(out)
            out.append(self.ESCAPES.get(ch, ch))
            self.escape = None
        elif len(self.escape) == 5:
            try:
                code = int(self.escape[1:], 16)
            except ValueError:
                code = 0xFFFD
            self.escape = None
            self._code_point(code, out)

    def _code_point(self, code: int, out: list) -> None:
        if 0xD800 <= code < 0xDC00:
            self._flush_surrogate(out)
            self.high_surrogate = code  # wait for its low half, maybe in the next piece
        elif 0xDC00 <= code < 0xE000:
            if self.high_surrogate:
                out.append(chr(0x10000 + ((self.high_surrogate - 0xD800) << 10) + (code - 0xDC00)))
                self.high_surrogate = 0
            else:
                out.append("\ufffd")
        else:
            self._flush_surrogate(out)
            out.append(chr(code))

    def _flush_surrogate(self, out: list) -> None:
        if self.high_surrogate:
            out.append("\ufffd")
            self.high_surrogate = 0


class ResponsesCodec(Codec):
    name = "responses"

    # -- requests
    def decode_request(self, body: dict) -> Request:
        model = field_of(body, "model", str, required=True)
        raw_input = field_of(body, "input", (str, list), required=True)
        req = Request(model=model, messages=[], raw=body, protocol="responses")
        instructions = field_of(body, "instructions", str)
        if instructions:
            req.system.append(Part("text", text=instructions))
        items = [{"type": "message", "role": "user", "content": raw_input}] if isinstance(raw_input, str) else raw_input
        self._decode_all_tools(req, field_of(body, "tools", list, default=[]), items)
        self._decode_input(req, items)
        self._decode_tool_choice(req, body.get("tool_choice"))
        req.parallel_tool_calls = field_of(body, "parallel_tool_calls", bool)
        req.max_tokens = field_of(body, "max_output_tokens", int)
        req.temperature = field_of(body, "temperature", float)
        req.top_p = field_of(body, "top_p", float)
        req.stream = bool(field_of(body, "stream", bool, default=False))
        self._decode_reasoning_options(req, field_of(body, "reasoning", dict, default={}))
        req.response_format = self._decode_text_format(field_of(body, "text", dict, default={}).get("format"))
        req.metadata = field_of(body, "metadata", dict, default={})
        req.user = field_of(body, "user", str, default="") or field_of(body, "safety_identifier", str, default="")
        return req

    def _decode_all_tools(self, req: Request, tools: list, items: list) -> None:
        specs = list(tools)
        for item in items:  # Codex "responses-lite" sends its tools as an input item
            if isinstance(item, dict) and item.get("type") == "additional_tools":
                specs.extend(field_at(item, "tools", list, "input[].additional_tools", default=[]))
        dropped: list[str] = []
        self._decode_tools(req, specs, dropped)
        hosted = [d for d in dropped if d.startswith(RESPONSES_HOSTED_TOOLS)]
        unknown = [d for d in dropped if d not in hosted]
        if hosted:
            log.info("responses: dropped hosted tools the upstream cannot run: %s", ", ".join(hosted))
        if unknown:
            log.info("responses: dropped tools of unknown type: %s", ", ".join(unknown))

    def _decode_tools(self, req: Request, specs: list, dropped: list, namespace: dict | None = None) -> None:
        seen = {t.name for t in req.tools}
        for spec in specs:
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind == "namespace" and namespace is None:
                field_at(spec, "name", str, "tools[].namespace")
                self._decode_tools(req, field_at(spec, "tools", list, "tools[].namespace", default=[]), dropped, spec)
                seen = {t.name for t in req.tools}
            elif kind in ("function", "custom") and isinstance(spec.get("name"), str) and spec["name"]:
                tool = self._decode_tool(spec, namespace)
                if tool.name in seen:
                    log.info("responses: dropped a second tool named %s", tool.name)
                    continue
                seen.add(tool.name)
                req.tools.append(tool)
            else:
                dropped.append(kind if isinstance(kind, str) else json_preview(kind))

    @staticmethod
    def _decode_tool(spec: dict, namespace: dict | None) -> Tool:
        extra: dict = {}
        if namespace is not None:
            extra.update(namespace=namespace.get("name") or "", name=spec["name"],
                         namespace_description=field_at(namespace, "description", str, "tools[].namespace") or "")  # fmt: skip
        name = flat_tool_name(extra.get("namespace"), spec["name"])
        description = field_at(spec, "description", str, f"tools[{name}]", default="")
        if spec["type"] == "custom":
            extra["format"] = spec.get("format")
            return Tool(name, description, custom_tool_parameters(spec.get("format")), "custom", extra)
        if "strict" in spec:
            extra["strict"] = spec["strict"]
        parameters = field_at(spec, "parameters", dict, f"tools[{name}]") or {"type": "object", "properties": {}}
        return Tool(name, description, parameters, "function", extra or None)

    def _decode_input(self, req: Request, items: list) -> None:
        call_ids: set[str] = set()
        skipped: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad_request(f"input[{i}] must be an object")
            kind = field_at(item, "type", str, f"input[{i}]") or ("message" if "role" in item else None)
            if kind == "message":
                self._decode_message(req, item, i)
            elif kind == "reasoning":
                self._assistant_parts(req).append(self._decode_reasoning(item))
            elif kind in ("function_call", "custom_tool_call"):
                part = self._decode_call(item, f"input[{i}]")
                call_ids.add(part.id)
                self._assistant_parts(req).append(part)
            elif kind in ("function_call_output", "custom_tool_call_output"):
                call_id = field_at(item, "call_id", str, f"input[{i}]")
                if call_id not in call_ids:
                    raise bad_request(
                        f"input[{i}]: no function_call or custom_tool_call found for {kind} with call_id {call_id!r}"
                    )
                content = self._decode_content(item.get("output"), f"input[{i}].output")
                self._tool_results(req).append(Part("tool_result", id=call_id, content=content))
            elif kind != "additional_tools":  # those tools were read with the request's tools
                skipped.append(str(kind))
        if skipped:
            log.info("responses: dropped input items of unsupported type: %s", ", ".join(skipped))

    def _decode_message(self, req: Request, item: dict, i: int) -> None:
        role = item.get("role")
        parts = self._decode_content(item.get("content"), f"input[{i}].content")
        if role in ("system", "developer"):
            if not req.messages:
                req.system.extend(p for p in parts if p.type == "text")
            elif parts:
                req.messages.append(Message("system", parts))
        elif role == "assistant":
            if parts:
                self._assistant_parts(req).extend(parts)
        elif role == "user":
            if parts:
                req.messages.append(Message("user", parts))
        else:
            raise bad_request(f"input[{i}].role must be user, assistant, system or developer, got {json_preview(role)}")

    @staticmethod
    def _assistant_parts(req: Request) -> list:
        """The parts of the assistant turn in progress: reasoning, text and calls of one turn stay together."""
        if not req.messages or req.messages[-1].role != "assistant":
            req.messages.append(Message("assistant", []))
        return req.messages[-1].parts

    @staticmethod
    def _tool_results(req: Request) -> list:
        last = req.messages[-1] if req.messages else None
        if last is None or last.role != "user" or not all(p.type == "tool_result" for p in last.parts):
            req.messages.append(Message("user", []))
        return req.messages[-1].parts

    @staticmethod
    def _decode_reasoning(item: dict) -> Part:
        signed = unpack_thinking(item.get("encrypted_content"))
        if signed is not None:
            return signed
        texts = item_texts(item.get("summary"))
        if not any(texts):
            texts = item_texts(item.get("content"))
        extra = {"id": item.get("id"), "encrypted_content": item.get("encrypted_content")}
        extra = {k: v for k, v in extra.items() if isinstance(v, str)}  # ids and blobs are strings, or nothing
        return Part("thinking", text="\n\n".join(t for t in texts if t), extra=extra)

    @staticmethod
    def _decode_call(item: dict, where: str = "output[]") -> Part:
        namespace = field_at(item, "namespace", str, where)
        name = field_at(item, "name", str, where) or ""
        item_id = field_at(item, "id", str, where)
        extra = {"id": item_id, "type": item.get("type")}
        if namespace:
            extra.update(namespace=namespace, name=name)
        if item.get("type") == "custom_tool_call":
            arguments = json.dumps({"input": field_at(item, "input", str, where) or ""}, ensure_ascii=False)
        else:
            arguments = item.get("arguments") or ""
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = field_at(item, "call_id", str, where) or item_id or new_id("call_")
        return Part("tool_call", id=call_id, name=flat_tool_name(namespace, name), arguments=arguments, extra=extra)

    def _decode_content(self, content, where: str) -> list:
        if content is None:
            return []
        if isinstance(content, str):
            return [Part("text", text=content)] if content else []
        if not isinstance(content, list):
            raise bad_request(f"{where} must be a string or an array of content parts")
        parts = []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in ("input_text", "output_text", "text"):
                text = field_at(item, "text", str, f"{where}[{j}]")
                if text:
                    parts.append(Part("text", text=text))
            elif kind == "refusal":
                parts.append(Part("text", text=field_at(item, "refusal", str, f"{where}[{j}]") or ""))
            elif kind == "input_image":
                parts.append(self._decode_image(item, f"{where}[{j}]"))
            elif kind == "input_file" and (item.get("file_data") or item.get("file_url")):
                data = field_at(item, "file_data", str, f"{where}[{j}]") or ""
                name = item.get("filename") if isinstance(item.get("filename"), str) else ""
                parts.append(document_part(data, url=field_at(item, "file_url", str, f"{where}[{j}]") or "", name=name))
            elif kind in ("input_file", "input_audio"):  # a file id only OpenAI can read, audio
                parts.append(Part("text", text=f"[{kind} content omitted by the gateway]"))
            else:
                log.info("responses: dropped a content part of unsupported type %s in %s", json_preview(kind), where)
        return parts

    @staticmethod
    def _decode_image(item: dict, where: str) -> Part:
        url = item.get("image_url")
        url = field_at(url, "url", str, f"{where}.image_url") if isinstance(url, dict) else url
        if url is not None and not isinstance(url, str):
            raise bad_request(f"'{where}.image_url' must be a URL string, got {json_preview(url)}")
        if not url:
            file_id = field_at(item, "file_id", str, where) or ""
            return Part("text", text=f"[image file {file_id} omitted by the gateway]")
        data_uri = parse_data_uri(url)
        return Part("image", media_type=data_uri[0], data=data_uri[1]) if data_uri else Part("image", url=url)

    @staticmethod
    def _decode_tool_choice(req: Request, choice) -> None:
        if isinstance(choice, str):
            req.tool_choice = choice
        elif isinstance(choice, dict):
            kind = choice.get("type")
            name = field_at(choice, "name", str, "tool_choice")
            if kind in ("function", "custom") and name:
                namespace = field_at(choice, "namespace", str, "tool_choice")
                req.tool_choice, req.tool_name = "tool", flat_tool_name(namespace, name)
            elif kind == "allowed_tools":
                req.tool_choice = "required" if choice.get("mode") == "required" else "auto"
            else:
                log.info("responses: tool_choice %s names a tool the upstream cannot run; using auto",
                         json_preview(kind))  # fmt: skip
                req.tool_choice = "auto"

    @staticmethod
    def _decode_reasoning_options(req: Request, reasoning: dict) -> None:
        effort = reasoning.get("effort")
        if effort == "none":
            req.thinking = "disabled"
        elif isinstance(effort, str) and effort:
            req.reasoning_effort = "high" if effort == "xhigh" else effort

    @staticmethod
    def _decode_text_format(fmt) -> dict | None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
            check_response_format({"type": "json_schema", "json_schema": schema}, "text.format")
            return {"type": "json_schema", "json_schema": schema}
        return None

    def encode_request(self, req: Request, model: str, provider=None) -> dict:
        own = req.raw if req.protocol == "responses" else {}  # fields only a Responses client sends
        body: dict = {"model": model, "input": self._encode_input(req)}
        if req.system:
            body["instructions"] = system_text(req)
        if req.tools:
            body["tools"] = self._encode_tools(req.tools)
            if req.tool_choice:
                body["tool_choice"] = self._encode_tool_choice(req)
            if req.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = req.parallel_tool_calls
        if req.max_tokens is not None:
            body["max_output_tokens"] = req.max_tokens
        for name in ("temperature", "top_p"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        reasoning = {}
        effort = req.reasoning_effort or effort_from_budget(req.thinking_budget)
        if effort:
            reasoning["effort"] = effort
        if isinstance(own.get("reasoning"), dict) and own["reasoning"].get("summary"):
            reasoning["summary"] = own["reasoning"]["summary"]
        if reasoning and (provider is None or provider.accepts_reasoning(model)):
            body["reasoning"] = reasoning
        text = {k: v for k, v in (own.get("text") or {}).items() if k == "verbosity"}
        if req.response_format:
            text["format"] = self._encode_text_format(req.response_format)
        if text:
            body["text"] = text
        if req.metadata and all(isinstance(v, str) for v in req.metadata.values()):
            body["metadata"] = req.metadata
        if req.user:
            body["user"] = req.user
        body["store"] = own.get("store") is True  # the gateway keeps conversation state itself
        for name in ("include", "prompt_cache_key", "service_tier", "truncation"):
            if own.get(name):
                body[name] = own[name]
        if req.stream:
            body["stream"] = True
        return body

    def _encode_input(self, req: Request) -> list:
        tools = {t.name: t for t in req.tools}
        custom_calls: set[str] = set()  # their results go back as custom_tool_call_output
        items: list = []
        for msg in req.messages:
            if msg.role == "system":
                content = [{"type": "input_text", "text": p.text} for p in msg.parts if p.type == "text"]
                items.append({"type": "message", "role": "developer", "content": content})
            elif msg.role == "assistant":
                items.extend(self._encode_assistant(msg.parts, tools, custom_calls))
            else:
                items.extend(self._encode_user(msg.parts, custom_calls))
        return items

    def _encode_assistant(self, parts: list, tools: dict, custom_calls: set) -> list:
        items: list = []
        texts: list = []
        for p in parts + [None]:  # None flushes the last run of text
            if p is not None and p.type == "text":
                if p.text:
                    texts.append({"type": "output_text", "text": p.text})
                continue
            if texts:
                items.append({"type": "message", "role": "assistant", "content": texts})
                texts = []
            if p is None:
                break
            if p.type == "thinking" and (p.extra or {}).get("encrypted_content"):
                summary = [{"type": "summary_text", "text": p.text}] if p.text else []
                items.append({"type": "reasoning", "id": p.extra.get("id") or new_id("rs_"), "summary": summary,
                              "encrypted_content": p.extra["encrypted_content"]})  # fmt: skip
            elif p.type == "tool_call":
                items.append(self._encode_call(p, tools.get(p.name), custom_calls))
        return items

    @staticmethod
    def _encode_call(part: Part, tool: Tool | None, custom_calls: set) -> dict:
        name, namespace = wire_tool_name(part.name, tool, part.extra)
        if is_custom_call(part, tool):
            custom_calls.add(part.id)
            item = {
                "type": "custom_tool_call",
                "call_id": part.id,
                "name": name,
                "input": custom_input_of(part.arguments),
            }
        else:
            item = {"type": "function_call", "call_id": part.id, "name": name, "arguments": part.arguments or "{}"}
        if namespace:
            item["namespace"] = namespace
        return item

    def _encode_user(self, parts: list, custom_calls: set) -> list:
        items = [
            {"type": "custom_tool_call_output" if p.id in custom_calls else "function_call_output", "call_id": p.id,
             "output": self._encode_tool_output(p)}
            for p in parts
            if p.type == "tool_result"
        ]  # fmt: skip
        content = [self._encode_content_part(p) for p in parts if p.type in ("text", "image", "document")]
        if content:
            items.append({"type": "message", "role": "user", "content": content})
        return items

    def _encode_tool_output(self, part: Part):
        if not any(p.type == "image" for p in part.content or []):
            return tool_result_text(part)
        content = [self._encode_content_part(p) for p in part.content or [] if p.type in ("text", "image")]
        if part.is_error:
            content.insert(0, {"type": "input_text", "text": "[tool error]"})
        return content

    @staticmethod
    def _encode_content_part(part: Part) -> dict:
        if part.type == "image":
            return {"type": "input_image", "image_url": image_url_of(part)}
        if part.type == "document" and part.media_type == "application/pdf":
            item = {"type": "input_file", "filename": part.name or "document.pdf"}
            item.update({"file_data": image_url_of(part)} if part.data else {"file_url": part.url})
            return item
        return {"type": "input_text", "text": document_as_text(part) if part.type == "document" else part.text}

    def _encode_tools(self, tools: list) -> list:
        out: list = []
        namespaces: dict[str, dict] = {}
        for tool in tools:
            spec = self._encode_tool(tool)
            extra = tool.extra or {}
            if not extra.get("namespace"):
                out.append(spec)
                continue
            group = namespaces.get(extra["namespace"])
            if group is None:
                group = namespaces[extra["namespace"]] = {"type": "namespace", "name": extra["namespace"],
                                                          "description": extra.get("namespace_description") or "",
                                                          "tools": []}  # fmt: skip
                out.append(group)
            group["tools"].append(spec)
        return out

    @staticmethod
    def _encode_tool(tool: Tool) -> dict:
        extra = tool.extra or {}
        name = extra.get("name") or tool.name
        if tool.kind == "custom":
            spec = {"type": "custom", "name": name, "description": tool.description}
            if isinstance(extra.get("format"), dict):
                spec["format"] = extra["format"]
            return spec
        parameters = tool.parameters or {"type": "object", "properties": {}}
        # The Responses API assumes strict schemas unless told otherwise; other clients' schemas rarely are.
        return {"type": "function", "name": name, "description": tool.description, "parameters": parameters,
                "strict": bool(extra.get("strict", False))}  # fmt: skip

    @staticmethod
    def _encode_tool_choice(req: Request):
        if req.tool_choice != "tool":
            return req.tool_choice
        tool = next((t for t in req.tools if t.name == req.tool_name), None)
        name, _ = wire_tool_name(req.tool_name, tool, None)
        return {"type": "custom" if tool is not None and tool.kind == "custom" else "function", "name": name}

    @staticmethod
    def _encode_text_format(response_format: dict) -> dict:
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            fmt = {"type": "json_schema", "name": spec.get("name") or "response", "schema": spec.get("schema") or {}}
            fmt.update({k: spec[k] for k in ("description", "strict") if k in spec})
            return fmt
        return {"type": "json_object"} if kind == "json_object" else {"type": "text"}

    # -- responses
    def decode_response(self, body: dict) -> Response:
        if body.get("status") == "failed":
            raise self._upstream_error(body.get("error"))
        parts: list = []
        output = body.get("output") or []
        if type(output) is not list:
            raise malformed_answer(f"'output' must be an array, got {json_preview(output)}")
        for item in output:
            if isinstance(item, dict):
                parts.extend(self.decode_output_item(item))
        stop = self.stop_reason_of(body, any(p.type == "tool_call" for p in parts))
        created = body.get("created_at")
        return Response(string_or(body.get("id")) or new_id("resp_"), string_or(body.get("model")), parts, stop,
                        usage=self.decode_usage(body.get("usage")),
                        created=created if type(created) is int and 0 < created < 1 << 40 else 0)  # fmt: skip

    @staticmethod
    def decode_output_item(item: dict) -> list:
        kind = item.get("type")
        if kind == "message":
            content = item.get("content") if isinstance(item.get("content"), list) else []
            texts = [c.get("text") or c.get("refusal") for c in content if isinstance(c, dict)]
            return [Part("text", text=t) for t in texts if isinstance(t, str) and t]
        if kind == "reasoning":
            return [ResponsesCodec._decode_reasoning(item)]
        if kind in ("function_call", "custom_tool_call"):
            return [ResponsesCodec._decode_call(item)]
        return []  # hosted tool calls the upstream ran itself leave nothing for the client to do

    @staticmethod
    def stop_reason_of(response: dict, has_calls: bool) -> str:
        if response.get("status") == "incomplete":
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            return RESPONSES_INCOMPLETE_IN.get(string_or(reason), "max_tokens")
        return "tool_use" if has_calls else "end_turn"

    @staticmethod
    def _upstream_error(error) -> GatewayError:
        error = error if isinstance(error, dict) else {"message": as_text(error or "")}
        code = string_or(error.get("code"))
        message = as_text(error.get("message") or "") or "upstream response failed"
        return GatewayError(RESPONSES_ERROR_STATUS.get(code, 502), message)

    @staticmethod
    def decode_usage(usage) -> Usage:
        if not isinstance(usage, dict):
            return Usage()
        input_details = usage.get("input_tokens_details")
        output_details = usage.get("output_tokens_details")
        return Usage(
            input_tokens=token_count(usage.get("input_tokens")),
            output_tokens=token_count(usage.get("output_tokens")),
            cached_tokens=token_count(input_details.get("cached_tokens")) if type(input_details) is dict else 0,
            reasoning_tokens=(
                token_count(output_details.get("reasoning_tokens")) if type(output_details) is dict else 0
            ),
        )

    @staticmethod
    def encode_usage(usage: Usage) -> dict:
        return {
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.input_tokens + usage.output_tokens,
        }

    def encode_response(self, resp: Response, req: Request) -> dict:
        """The response object, built by the stream encoder run silently over the unfolded Response,
        so a JSON answer and a stream always carry the same items."""
        encoder = ResponsesStreamEncoder(req, emit=False)
        for event in unfold_response(resp):
            encoder.encode(event)
        body = encoder.response
        if resp.created:
            body["created_at"] = resp.created
        return body

    def output_items(self, resp: Response, req: Request) -> list:
        """The output array the gateway stores for previous_response_id (a stream's is encoder.output)."""
        return self.encode_response(resp, req)["output"]

    # -- streams
    def stream_decoder(self):
        return ResponsesStreamDecoder()

    def stream_encoder(self, req: Request):
        return ResponsesStreamEncoder(req)

    # -- errors
    def encode_stream_error(self, err: GatewayError) -> bytes:
        """An error in a passthrough stream (no encoder state to send response.failed with)."""
        error = responses_error(err)
        return sse_event(
            "error", {"type": "error", "code": error.get("code"), "message": error.get("message"), "param": None}
        )

    def encode_error(self, err: GatewayError) -> dict:
        body = OPENAI_CODEC.encode_error(err)
        body["error"]["code"] = responses_error(err)["code"]  # the codes Codex acts on
        return body


class ResponsesStreamDecoder:
    """Responses SSE (response.* events) -> canonical events. Each reasoning, function_call and
    custom_tool_call item is one block, and so is each content part of a message; a custom tool's
    raw input is wrapped into {"input": ...} JSON as it streams."""

    def __init__(self):
        self.started = False
        self.finished = False
        self.next_index = 0
        self.blocks: dict[tuple, int] = {}  # (output_index, content_index; -1 for a whole item) -> block
        self.parts: dict[int, Part] = {}
        self.filled: set[int] = set()  # blocks that received deltas (a done item adds only what is missing)
        self.custom: dict[int, bool] = {}  # custom tool blocks -> whether the JSON wrapper was opened
        self.items_with_blocks: set[int] = set()
        self.has_calls = False

    def feed(self, event: SSEEvent) -> list:
        if self.finished:
            return []
        if event.data == "[DONE]":
            return self.finish()
        try:
            data = loads(event.data)
        except ValueError:
            self.finished = True
            return [StreamError(GatewayError(502, f"upstream sent malformed stream data: {event.data[:120]!r}"))]
        if not isinstance(data, dict):
            return []
        handler = self.HANDLERS.get(string_or(data.get("type")) or event.event)
        out: list = []
        if handler is not None:
            self._check_shapes(data)
            getattr(self, handler)(data, out)
        return out

    SHAPES = (("output_index", int), ("content_index", int), ("summary_index", int), ("delta", str),
              ("item", dict), ("part", dict), ("response", dict))  # fmt: skip

    def _check_shapes(self, data: dict) -> None:
        """The fields the handlers key blocks by or pass on, checked once per event."""
        for name, kind in self.SHAPES:
            if name in data and type(data[name]) is not kind and data[name] is not None:
                self.finished = True
                raise malformed_answer(f"'{name}' of a {data.get('type')} event is {json_preview(data[name])}")

    HANDLERS = {
        "response.created": "_on_created", "response.in_progress": "_on_created",
        "response.output_item.added": "_on_item_added", "response.output_item.done": "_on_item_done",
        "response.content_part.added": "_on_part_added", "response.content_part.done": "_on_part_done",
        "response.output_text.delta": "_on_text_delta", "response.refusal.delta": "_on_text_delta",
        "response.reasoning_summary_part.added": "_on_summary_part_added",
        "response.reasoning_summary_text.delta": "_on_thinking_delta",
        "response.reasoning_text.delta": "_on_thinking_delta",
        "response.function_call_arguments.delta": "_on_arguments_delta",
        "response.custom_tool_call_input.delta": "_on_custom_input_delta",
        "response.completed": "_on_finished", "response.incomplete": "_on_finished",
        "response.failed": "_on_failed", "error": "_on_error",
    }  # fmt: skip

    def _start(self, out: list, response: dict | None = None) -> None:
        if not self.started:
            self.started = True
            response = response or {}
            out.append(MessageStart(string_or(response.get("id")) or new_id("resp_"), string_or(response.get("model"))))

    def _open(self, key: tuple, part: Part, out: list) -> int:
        self._start(out)
        index = self.blocks[key] = self.next_index
        self.next_index += 1
        self.parts[index] = part
        self.items_with_blocks.add(key[0])
        out.append(BlockStart(index, part))
        return index

    def _close(self, key: tuple, out: list) -> None:
        index = self.blocks.pop(key, None)
        if index is not None:
            out.append(BlockStop(index))

    def _on_created(self, data: dict, out: list) -> None:
        self._start(out, data.get("response"))

    def _open_item(self, output_index: int, item: dict, out: list) -> int | None:
        kind = item.get("type")
        key = (output_index, -1)
        if kind == "reasoning":
            extra = {"id": string_or(item.get("id")), "encrypted_content": string_or(item.get("encrypted_content"))}
            return self._open(key, Part("thinking", extra=extra), out)
        if kind in ("function_call", "custom_tool_call"):
            self.has_calls = True
            call = ResponsesCodec._decode_call(item)
            index = self._open(key, Part("tool_call", id=call.id, name=call.name, extra=call.extra), out)
            if kind == "custom_tool_call":
                self.custom[index] = False
            return index
        return None

    def _on_item_added(self, data: dict, out: list) -> None:
        item = data.get("item") or {}
        index = self._open_item(data.get("output_index", 0), item, out)
        if index is not None:
            self._fill_from_item(index, item, out)

    def _fill_from_item(self, index: int, item: dict, out: list) -> None:
        """Content a server put in the item itself rather than in deltas (or in the done item only)."""
        if index in self.filled:
            return
        kind = item.get("type")
        if kind == "reasoning":
            text = ResponsesCodec._decode_reasoning(item).text
            if text:
                out.append(BlockDelta(index, "thinking", text))
        elif kind == "function_call" and item.get("arguments"):
            out.append(BlockDelta(index, "arguments", ResponsesCodec._decode_call(item).arguments))
        elif kind == "custom_tool_call" and item.get("input"):
            self._custom_piece(index, field_at(item, "input", str, "output_item"), out)
        else:
            return
        self.filled.add(index)

    def _custom_piece(self, index: int, raw: str, out: list) -> None:
        piece = json.dumps(raw, ensure_ascii=False)[1:-1]
        if not self.custom[index]:
            self.custom[index] = True
            piece = '{"input":"' + piece
        out.append(BlockDelta(index, "arguments", piece))

    def _on_item_done(self, data: dict, out: list) -> None:
        output_index = data.get("output_index", 0)
        item = data.get("item") or {}
        if item.get("type") == "message":
            if output_index not in self.items_with_blocks:  # a server that sent only the done item
                for content_index, text in enumerate(p.text for p in ResponsesCodec.decode_output_item(item)):
                    index = self._open((output_index, content_index), Part("text"), out)
                    out.append(BlockDelta(index, "text", text))
            for key in sorted(k for k in self.blocks if k[0] == output_index):
                self._close(key, out)
            return
        key = (output_index, -1)
        index = self.blocks.get(key)
        if index is None:
            if output_index in self.items_with_blocks:
                return
            index = self._open_item(output_index, item, out)
            if index is None:
                return
        self._fill_from_item(index, item, out)
        part = self.parts[index]
        if part.type == "thinking" and string_or(item.get("encrypted_content")):
            part.extra["encrypted_content"] = item["encrypted_content"]  # arrives only now; the Part is shared
        self._close_item(key, out)

    def _close_item(self, key: tuple, out: list) -> None:
        index = self.blocks.get(key)
        if index in self.custom:  # end the {"input":"..."} wrapper
            if not self.custom[index]:
                self._custom_piece(index, "", out)
            out.append(BlockDelta(index, "arguments", '"}'))
        self._close(key, out)

    def _on_part_added(self, data: dict, out: list) -> None:
        key = (data.get("output_index", 0), data.get("content_index", 0))
        if key not in self.blocks and (data.get("part") or {}).get("type") in ("output_text", "refusal"):
            self._open(key, Part("text"), out)

    def _on_part_done(self, data: dict, out: list) -> None:
        key = (data.get("output_index", 0), data.get("content_index", 0))
        part = data.get("part") or {}
        text = string_or(part.get("text")) or string_or(part.get("refusal"))
        index = self.blocks.get(key)
        if index is None and text:
            index = self._open(key, Part("text"), out)
        if index is not None and index not in self.filled and text:  # a server that skipped the deltas
            out.append(BlockDelta(index, "text", text))
        self._close(key, out)

    def _on_text_delta(self, data: dict, out: list) -> None:
        key = (data.get("output_index", 0), data.get("content_index", 0))
        index = self.blocks.get(key)
        if index is None:
            index = self._open(key, Part("text"), out)
        if data.get("delta"):
            self.filled.add(index)
            out.append(BlockDelta(index, "text", data["delta"]))

    def _item_block(self, data: dict, out: list, part_type: str) -> int:
        key = (data.get("output_index", 0), -1)
        index = self.blocks.get(key)
        if index is None:  # a delta without its output_item.added
            index = self._open(
                key, Part(part_type, id=new_id("call_")) if part_type == "tool_call" else Part(part_type), out
            )
        self.filled.add(index)
        return index

    def _on_summary_part_added(self, data: dict, out: list) -> None:
        if (data.get("summary_index") or 0) > 0:
            out.append(BlockDelta(self._item_block(data, out, "thinking"), "thinking", "\n\n"))

    def _on_thinking_delta(self, data: dict, out: list) -> None:
        if data.get("delta"):
            out.append(BlockDelta(self._item_block(data, out, "thinking"), "thinking", data["delta"]))

    def _on_arguments_delta(self, data: dict, out: list) -> None:
        if data.get("delta"):
            out.append(BlockDelta(self._item_block(data, out, "tool_call"), "arguments", data["delta"]))

    def _on_custom_input_delta(self, data: dict, out: list) -> None:
        index = self._item_block(data, out, "tool_call")
        self.custom.setdefault(index, False)
        if data.get("delta"):
            self._custom_piece(index, data["delta"], out)

    def _on_finished(self, data: dict, out: list) -> None:
        response = data.get("response") or {}
        self._start(out, response)
        for key in sorted(self.blocks, key=self.blocks.get):
            self._close_item(key, out)
        stop = ResponsesCodec.stop_reason_of(response, self.has_calls)
        out.append(MessageDelta(stop, None, ResponsesCodec.decode_usage(response.get("usage"))))
        out.append(MessageStop())
        self.finished = True

    def _on_failed(self, data: dict, out: list) -> None:
        self.finished = True
        out.append(StreamError(ResponsesCodec._upstream_error((data.get("response") or {}).get("error"))))

    def _on_error(self, data: dict, out: list) -> None:
        self.finished = True
        out.append(StreamError(ResponsesCodec._upstream_error(data.get("error") if "error" in data else data)))

    def finish(self) -> list:
        if self.finished:
            return []
        self.finished = True
        out: list = []
        self._start(out)
        out.append(StreamError(GatewayError(502, "upstream Responses stream ended before response.completed")))
        return out


@dataclass(slots=True)
class ResponsesItemState:
    """One output item being streamed (for text blocks: the message item they share)."""

    item: dict
    output_index: int
    content_index: int = 0
    # pieces so far, joined once when the block stops (+= on a field would be quadratic in deltas)
    text: list = field(default_factory=list)  # text, summary, or a custom tool's raw input
    arguments: list = field(default_factory=list)
    signature: list = field(default_factory=list)
    summary_open: bool = False
    reader: JsonStringFieldReader | None = None
    extra: dict | None = None  # the started Part's extra (a reasoning item's encrypted_content)


class ResponsesStreamEncoder:
    """Canonical events -> Responses SSE (event: <type> / data: {...}), sequence_number from 0.
    Output items are built as the blocks arrive; consecutive text blocks are content parts of one
    message item. `output` and, after the last event, `response` hold what the client was sent
    (what the gateway stores for previous_response_id)."""

    def __init__(self, req: Request, emit: bool = True):
        self.req = req
        self.emit = emit  # False: build the response object only (encode_response)
        self.tools = {t.name: t for t in req.tools}
        self.sequence = 0
        self.id = new_id("resp_")
        self.created_at = int(time.time())
        self.started = False
        self.ended = False
        self.output: list[dict] = []
        self.blocks: dict[int, ResponsesItemState] = {}
        self.message: ResponsesItemState | None = None  # the message item open for text blocks
        self.start_usage: Usage | None = None
        self.usage: Usage | None = None  # from MessageDelta
        self.stop_reason = "end_turn"
        self.response: dict | None = None

    def _event(self, kind: str, **fields) -> bytes:
        obj = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(kind, obj) if self.emit else b""

    def response_object(self, status: str, error: dict | None = None) -> dict:
        req, raw = self.req, self.req.raw if self.req.protocol == "responses" else {}
        reason = RESPONSES_INCOMPLETE_REASONS.get(self.stop_reason) if status == "incomplete" else None
        reasoning = {"effort": req.reasoning_effort or None, "summary": None}
        reasoning.update(raw.get("reasoning") if isinstance(raw.get("reasoning"), dict) else {})
        text = {"format": {"type": "text"}}
        text.update(raw.get("text") if isinstance(raw.get("text"), dict) else {})
        usage = self.usage or self.start_usage or Usage()
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": error, "incomplete_details": {"reason": reason} if reason else None,
            "instructions": raw.get("instructions"), "max_output_tokens": req.max_tokens, "model": req.model,
            "output": self.output if status != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": raw.get("previous_response_id"), "reasoning": reasoning,
            "service_tier": raw.get("service_tier") or "default", "store": raw.get("store", True),
            "temperature": req.temperature if req.temperature is not None else 1.0, "text": text,
            "tool_choice": raw.get("tool_choice") or "auto", "tools": raw.get("tools") or [],
            "top_p": req.top_p if req.top_p is not None else 1.0, "truncation": raw.get("truncation") or "disabled",
            "usage": None if status == "in_progress" else ResponsesCodec.encode_usage(usage),
            "user": raw.get("user"), "metadata": req.metadata or {},
        }  # fmt: skip

    def encode(self, ev) -> bytes:
        if self.ended:
            return b""
        if isinstance(ev, StreamError):
            self.ended = True
            self.response = self.response_object("failed", responses_error(ev.error))
            return self._begin(None) + self._event("response.failed", response=self.response)
        out = self._begin(ev if isinstance(ev, MessageStart) else None)
        if isinstance(ev, BlockStart):
            return out + self._block_start(ev)
        if isinstance(ev, BlockDelta):
            return out + self._block_delta(ev)
        if isinstance(ev, BlockStop):
            return out + self._block_stop(ev.index)
        if isinstance(ev, MessageDelta):
            self.stop_reason = ev.stop_reason
            self._take_usage(ev.usage)
            return out + self._close_message()
        if isinstance(ev, MessageStop):
            return out + self._close_message() + self._finish()
        return out

    def _begin(self, start: MessageStart | None) -> bytes:
        if self.started:
            return b""
        self.started = True
        if start is not None:
            self.id = start.id if start.id.startswith("resp_") else new_id("resp_")  # upstream ids may repeat
            self.start_usage = start.usage
        pending = self.response_object("in_progress")
        return self._event("response.created", response=pending) + self._event("response.in_progress", response=pending)

    def _take_usage(self, usage: Usage | None) -> None:
        if usage is None:
            usage = self.start_usage or Usage()
        elif not usage.input_tokens and self.start_usage is not None:  # some upstreams count input only at the start
            start = self.start_usage
            usage = Usage(start.input_tokens, usage.output_tokens, usage.cached_tokens or start.cached_tokens,
                          usage.cache_creation_tokens or start.cache_creation_tokens,
                          usage.reasoning_tokens)  # fmt: skip
        self.usage = usage

    def _add_item(self, item: dict) -> tuple[int, bytes]:
        output_index = len(self.output)
        self.output.append(item)
        return output_index, self._event("response.output_item.added", output_index=output_index, item=item)

    def _item_done(self, state: ResponsesItemState) -> bytes:
        if "status" in state.item:  # reasoning items have none
            state.item["status"] = "completed"
        return self._event("response.output_item.done", output_index=state.output_index, item=state.item)

    # -- block starts
    def _block_start(self, ev: BlockStart) -> bytes:
        part = ev.part
        if part.type == "text":
            return self._text_start(ev.index)
        out = self._close_message()
        if part.type in ("thinking", "redacted_thinking"):
            item = {"id": (part.extra or {}).get("id") or new_id("rs_"), "type": "reasoning", "summary": []}
        elif part.type == "tool_call":
            item = self._call_item(part)
        else:
            return out  # nothing a Responses client could show
        output_index, added = self._add_item(item)
        state = self.blocks[ev.index] = ResponsesItemState(item, output_index, extra=part.extra)
        if item["type"] == "custom_tool_call":
            state.reader = JsonStringFieldReader("input")
        if part.type == "redacted_thinking":
            state.signature = [pack_thinking(part)]
        return out + added

    def _call_item(self, part: Part) -> dict:
        tool = self.tools.get(part.name)
        name, namespace = wire_tool_name(part.name, tool, part.extra)
        if is_custom_call(part, tool):
            item = {"id": new_id("ctc_"), "type": "custom_tool_call", "status": "in_progress", "call_id": part.id,
                    "name": name, "input": ""}  # fmt: skip
        else:
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress", "call_id": part.id,
                    "name": name, "arguments": ""}  # fmt: skip
        if namespace:
            item["namespace"] = namespace
        return item

    def _text_start(self, index: int) -> bytes:
        out = b""
        if self.message is None:
            item = {
                "id": new_id("msg_"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            output_index, out = self._add_item(item)
            self.message = ResponsesItemState(item, output_index)
        content = self.message.item["content"]
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        state = self.blocks[index] = ResponsesItemState(self.message.item, self.message.output_index, len(content))
        content.append(part)
        where = {"item_id": state.item["id"], "output_index": state.output_index}
        return out + self._event("response.content_part.added", **where, content_index=state.content_index, part=part)

    def _close_message(self) -> bytes:
        if self.message is None:
            return b""
        message, self.message = self.message, None
        return self._item_done(message)

    # -- deltas
    def _block_delta(self, ev: BlockDelta) -> bytes:
        state = self.blocks.get(ev.index)
        if state is None or not ev.value:
            return b""
        kind = state.item["type"]
        where = {"item_id": state.item["id"], "output_index": state.output_index}
        if kind == "message" and ev.kind == "text":
            state.text.append(ev.value)
            return self._event("response.output_text.delta", **where, content_index=state.content_index, delta=ev.value,
                               logprobs=[])  # fmt: skip
        if kind == "reasoning":
            return self._reasoning_delta(state, ev, where)
        if kind == "function_call" and ev.kind == "arguments":
            state.arguments.append(ev.value)
            return self._event("response.function_call_arguments.delta", **where, delta=ev.value)
        if kind == "custom_tool_call" and ev.kind == "arguments":
            state.arguments.append(ev.value)
            piece = state.reader.feed(ev.value)
            state.text.append(piece)
            return self._event("response.custom_tool_call_input.delta", **where, delta=piece) if piece else b""
        return b""

    def _reasoning_delta(self, state: ResponsesItemState, ev: BlockDelta, where: dict) -> bytes:
        if ev.kind == "signature":
            state.signature.append(ev.value)
            return b""
        if ev.kind != "thinking":
            return b""
        out = b""
        if not state.summary_open:
            state.summary_open = True
            out = self._event("response.reasoning_summary_part.added", **where, summary_index=0,
                              part={"type": "summary_text", "text": ""})  # fmt: skip
        state.text.append(ev.value)
        return out + self._event("response.reasoning_summary_text.delta", **where, summary_index=0, delta=ev.value)

    # -- block stops
    def _block_stop(self, index: int) -> bytes:
        state = self.blocks.pop(index, None)
        if state is None:
            return b""
        where = {"item_id": state.item["id"], "output_index": state.output_index}
        kind = state.item["type"]
        if kind == "message":
            part = state.item["content"][state.content_index]
            part["text"] = text = "".join(state.text)
            return self._event("response.output_text.done", **where, content_index=state.content_index, text=text,
                               logprobs=[]) + self._event("response.content_part.done", **where,
                                                          content_index=state.content_index, part=part)  # fmt: skip
        if kind == "reasoning":
            return self._reasoning_stop(state, where)
        if kind == "function_call":
            state.item["arguments"] = "".join(state.arguments) or "{}"
            done = self._event("response.function_call_arguments.done", **where, arguments=state.item["arguments"])
            return done + self._item_done(state)
        return self._custom_stop(state, where)

    def _reasoning_stop(self, state: ResponsesItemState, where: dict) -> bytes:
        out = b""
        if state.summary_open:
            summary = {"type": "summary_text", "text": "".join(state.text)}
            out = self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=summary["text"])
            out += self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=summary)
            state.item["summary"] = [summary]
        encrypted = self._encrypted_content(state)
        if encrypted:
            state.item["encrypted_content"] = encrypted
        return out + self._item_done(state)

    @staticmethod
    def _encrypted_content(state: ResponsesItemState) -> str:
        signature = "".join(state.signature)
        if signature.startswith(SIGNED_THINKING_PREFIX):
            return signature  # redacted thinking, packed at its start
        if signature:
            return pack_thinking(Part("thinking", text="".join(state.text), signature=signature))
        # A Responses upstream's own blob; its decoder may fill it in only when the item is done.
        return (state.extra or {}).get("encrypted_content") or ""

    def _custom_stop(self, state: ResponsesItemState, where: dict) -> bytes:
        final, sent = custom_input_of("".join(state.arguments)), "".join(state.text)
        out = b""
        if final != sent and final.startswith(sent):  # arguments that were not {"input": "..."}
            out = self._event("response.custom_tool_call_input.delta", **where, delta=final[len(sent) :])
        state.item["input"] = final
        out += self._event("response.custom_tool_call_input.done", **where, input=final)
        return out + self._item_done(state)

    def _finish(self) -> bytes:
        self.ended = True
        status = "incomplete" if self.stop_reason in RESPONSES_INCOMPLETE_REASONS else "completed"
        self.response = self.response_object(status)
        return self._event(f"response.{status}", response=self.response)


RESPONSES_CODEC = ResponsesCodec()


# ---- Gemini generateContent -------------------------------------------------------------
#
# Gemini's wire facts this codec relies on:
# - Protobuf JSON: every field may arrive camelCase or snake_case (google-genai sends both);
#   gemini_field reads either. We always write camelCase.
# - Function calls carry no ids (or optional ones): requests get deterministic ids
#   (call_<name>_<n>) and each functionResponse answers the earliest open call of its name.
# - Thought signatures (opaque, Gemini's own) live in Part.extra["thought_signature"], never in
#   Part.signature, so they never reach Anthropic as a thinking signature. A functionCall going
#   to Gemini without one gets Google's documented dummy, or Gemini 3 rejects the history.
# - Signed Anthropic thinking reaches a Gemini client inside the thoughtSignature of the part that
#   follows it (a functionCall or text part, which every client echoes; a signature-only part when
#   nothing follows): base64 of "tgw1" + JSON of the blocks (pack_gemini_thinking). The client sends
#   it back and the blocks are restored byte-exact before that part (restore_signed_thinking).
# - Tool schemas go to Gemini as the OpenAPI subset it accepts (clean_schema_for_gemini).

GEMINI_DUMMY_SIGNATURE = "skip_thought_signature_validator"  # documented by Google for foreign histories
GEMINI_MAX_THINKING_BUDGET = 24576  # the largest budget every 2.5/3 model accepts
GEMINI_EFFORT_BUDGETS = {"minimal": 512, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 24576}
GEMINI_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "FAILED_PRECONDITION", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED", 500: "INTERNAL", 502: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
    529: "UNAVAILABLE",
}  # fmt: skip
GEMINI_TOOL_CHOICE = {"auto": "AUTO", "none": "NONE", "required": "ANY", "tool": "ANY"}
# generationConfig fields the canonical model has no place for: kept when Gemini talks to Gemini.
GEMINI_ONLY_CONFIG = ("seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
                      "responseModalities", "mediaResolution", "speechConfig", "imageConfig")  # fmt: skip


def _snake_case(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def gemini_field(obj: dict, name: str, default=None):
    """A Gemini field by its camelCase name, or its snake_case twin (the SDKs send both)."""
    value = obj.get(name)
    if value is None:
        value = obj.get(_snake_case(name))
    return default if value is None else value


def _typed_field(obj: dict, name: str, kind, where: str):
    """gemini_field with field_of's type check, the error naming the full path."""
    value = gemini_field(obj, name)
    if value is None:
        return None
    label = f"{where}.{name}" if where else name
    return field_of({label: value}, label, kind)


def _object_field(obj: dict, name: str, where: str = "") -> dict:
    return _typed_field(obj, name, dict, where) or {}


def _safe_id_part(name: str) -> str:
    # Anthropic tool_use ids must match [a-zA-Z0-9_-]+; Gemini names may hold '.' and ':'
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "fn"


class GeminiCallIds:
    """Ids for one request's function calls: Gemini's own when given, else call_<name>_<n>;
    each response answers the earliest unanswered call of the same name."""

    def __init__(self):
        self.count = 0
        self.open: dict[str, list[str]] = {}

    def _new(self, name: str) -> str:
        call_id = f"call_{_safe_id_part(name)}_{self.count}"
        self.count += 1
        return call_id

    def call(self, name: str, given_id) -> str:
        call_id = given_id if isinstance(given_id, str) and given_id else self._new(name)
        self.open.setdefault(name, []).append(call_id)
        return call_id

    def answer(self, name: str, given_id) -> str:
        pending = self.open.get(name) or []
        if isinstance(given_id, str) and given_id in pending:
            pending.remove(given_id)
            return given_id
        if pending:
            return pending.pop(0)
        return given_id if isinstance(given_id, str) and given_id else self._new(name)


def gemini_signature(part: Part) -> str:
    return (part.extra or {}).get("thought_signature") or ""


def _signed(obj: dict, signature: str) -> dict:
    if signature:
        obj["thoughtSignature"] = signature
    return obj


GEMINI_THINKING_MAGIC = b"tgw1"  # begins the decoded thoughtSignature that carries signed Anthropic thinking
# A client sends these back and may forge them: one carries at most this many blocks (Anthropic puts one,
# or a few redacted ones, between two parts)
GEMINI_THINKING_MAX_BLOCKS = 64


def is_signed_thinking(part: Part) -> bool:
    """Thinking only Anthropic can read back: signed (or redacted) by it."""
    return (part.type == "thinking" and bool(part.signature)) or (part.type == "redacted_thinking" and bool(part.data))


def pack_gemini_thinking(parts: list) -> str:
    """Signed thinking blocks as a thoughtSignature (base64, which Gemini clients hold as bytes)."""
    blocks = [
        {"type": "redacted_thinking", "data": p.data}
        if p.type == "redacted_thinking"
        else {"type": "thinking", "thinking": p.text, "signature": p.signature}
        for p in parts
    ]
    return base64.b64encode(GEMINI_THINKING_MAGIC + dumps(blocks)).decode()


def unpack_gemini_thinking(signature: str) -> list | None:
    """The thinking parts a thoughtSignature from pack_gemini_thinking carries, whichever base64
    alphabet and padding the client re-encoded it with; None for any other signature, and for
    one that is not what pack_gemini_thinking makes (only thinking blocks, a flat list of at most
    GEMINI_THINKING_MAX_BLOCKS): a forged one restores nothing else."""
    if not signature.startswith("dGd3M"):  # base64 of "tgw1", in both alphabets
        return None
    text = signature.replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4))
        blocks = loads(raw[len(GEMINI_THINKING_MAGIC) :]) if raw.startswith(GEMINI_THINKING_MAGIC) else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than any JSON pack_gemini_thinking makes
        return None
    if not isinstance(blocks, list) or len(blocks) > GEMINI_THINKING_MAX_BLOCKS:
        return None
    parts = []
    for block in blocks:
        block = block if isinstance(block, dict) else {}
        kind, data, text, signature = (block.get(k) for k in ("type", "data", "thinking", "signature"))
        if kind == "redacted_thinking" and isinstance(data, str) and data:
            parts.append(Part("redacted_thinking", data=data))
        elif kind == "thinking" and isinstance(text, str) and isinstance(signature, str) and signature:
            parts.append(Part("thinking", text=text, signature=signature))
        else:
            return None  # not a block pack_gemini_thinking writes
    return parts


def restore_signed_thinking(parts: list) -> list:
    """A model turn from a Gemini client: signed thinking carried in signatures goes back before
    the part that carried it; text parts with nothing to say are dropped."""
    out = []
    for part in parts:
        signature = gemini_signature(part)
        restored = unpack_gemini_thinking(signature) if signature else None
        if restored is not None:
            out.extend(restored)
            part.extra = {k: v for k, v in part.extra.items() if k != "thought_signature"} or None
        if part.type != "text" or part.text:
            out.append(part)
    return out


def gemini_wants_thoughts(req: Request) -> bool:
    """Gemini returns thought summaries only with includeThoughts; other clients asked for
    reasoning by asking at all."""
    if req.protocol != "gemini":
        return True
    config = gemini_field(req.raw, "generationConfig")
    thinking = gemini_field(config, "thinkingConfig") if isinstance(config, dict) else None
    return isinstance(thinking, dict) and gemini_field(thinking, "includeThoughts") is True


def decode_gemini_usage(meta) -> Usage:
    if not isinstance(meta, dict):
        return Usage()

    def count(name: str) -> int:
        return token_count(gemini_field(meta, name))

    thoughts = count("thoughtsTokenCount")
    return Usage(
        input_tokens=token_sum(count("promptTokenCount") + count("toolUsePromptTokenCount")),
        output_tokens=token_sum(count("candidatesTokenCount") + thoughts),
        cached_tokens=count("cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


def encode_gemini_usage(usage: Usage) -> dict:
    meta = {
        "promptTokenCount": usage.input_tokens,
        "candidatesTokenCount": max(0, usage.output_tokens - usage.reasoning_tokens),
        "totalTokenCount": usage.input_tokens + usage.output_tokens,
    }
    if usage.reasoning_tokens:
        meta["thoughtsTokenCount"] = usage.reasoning_tokens
    if usage.cached_tokens:
        meta["cachedContentTokenCount"] = usage.cached_tokens
    return meta


class GeminiCodec(Codec):
    name = "gemini"
    usage_key = "usageMetadata"
    decode_usage = staticmethod(decode_gemini_usage)

    # -- requests
    def decode_request(self, body: dict, model: str, stream: bool) -> Request:
        raw_contents = _typed_field(body, "contents", list, "")
        if not raw_contents:
            raise bad_request("'contents' is required and must be a non-empty array of {role, parts}")
        req = Request(model=model.removeprefix("models/"), messages=[], raw=body, protocol="gemini", stream=stream,
                      include_usage=stream)  # fmt: skip
        req.system = self._decode_system(gemini_field(body, "systemInstruction"))
        ids = GeminiCallIds()
        for i, content in enumerate(raw_contents):
            message = self._decode_content(content, i, ids)
            if message.parts:
                req.messages.append(message)
        self._decode_tools(req, _typed_field(body, "tools", list, "") or [])
        self._decode_tool_config(req, _object_field(body, "toolConfig"))
        self._decode_generation_config(req, _object_field(body, "generationConfig"))
        return req

    @staticmethod
    def _decode_system(value) -> list:
        if value is None:
            return []
        if isinstance(value, str):
            return [Part("text", text=value)] if value else []
        parts = value.get("parts") if isinstance(value, dict) else value
        if not isinstance(parts, list):
            raise bad_request("'systemInstruction' must be a string, a Content {parts: [...]} or an array of parts")
        texts = [p.get("text") for p in parts if isinstance(p, dict)]
        if len(texts) != len(parts) or not all(isinstance(t, str) for t in texts):
            raise bad_request('\'systemInstruction\' parts must be text parts ({"text": "..."})')
        return [Part("text", text=t) for t in texts if t]

    def _decode_content(self, content, i: int, ids: GeminiCallIds) -> Message:
        where = f"contents[{i}]"
        if not isinstance(content, dict):
            raise bad_request(f"{where} must be an object {{role, parts}}, got {json_preview(content)}")
        role = content.get("role") or "user"
        if role not in ("user", "model", "function", "tool"):
            raise bad_request(f"{where}.role must be 'user' or 'model', got {json_preview(role)}")
        raw_parts = content.get("parts")
        if not isinstance(raw_parts, list):
            raise bad_request(f"{where}.parts must be an array of parts")
        from_model = role == "model"
        parts = [self._decode_part(p, f"{where}.parts[{j}]", from_model, ids) for j, p in enumerate(raw_parts)]
        parts = [p for p in parts if p is not None]
        if from_model:
            return Message("assistant", restore_signed_thinking(parts))
        return Message("user", [p for p in parts if p.type != "text" or p.text])  # signature-only parts: nothing to say

    def _decode_part(self, part, where: str, from_model: bool, ids: GeminiCallIds) -> Part | None:
        if not isinstance(part, dict):
            raise bad_request(f'{where} must be an object such as {{"text": "..."}}')
        signature = _typed_field(part, "thoughtSignature", str, where)
        extra = {"thought_signature": signature} if signature else None
        if "text" in part:
            text = _typed_field(part, "text", str, where) or ""
            if not text:  # nothing to say: a signature-only part is optional context, or tgw's signed thinking
                return Part("text", extra=extra) if extra else None
            return Part("thinking" if part.get("thought") is True else "text", text=text, extra=extra)
        for name, decode in (("inlineData", self._decode_inline_data), ("fileData", self._decode_file_data),
                             ("executableCode", self._decode_code), ("codeExecutionResult", self._decode_code_result)):  # fmt: skip
            value = _typed_field(part, name, dict, where)
            if value is not None:
                return decode(value, f"{where}.{name}")
        call = _typed_field(part, "functionCall", dict, where)
        if call is not None:
            if not from_model:
                raise bad_request(f"{where}.functionCall belongs in a 'model' turn")
            return self._decode_function_call(call, f"{where}.functionCall", extra, ids)
        response = _typed_field(part, "functionResponse", dict, where)
        if response is not None:
            if from_model:
                raise bad_request(f"{where}.functionResponse belongs in a 'user' turn")
            return self._decode_function_response(response, f"{where}.functionResponse", ids)
        raise bad_request(f"{where} has no known field (expected text, inlineData, fileData, functionCall or "
                          f"functionResponse), got keys {sorted(part)}")  # fmt: skip

    @staticmethod
    def _decode_inline_data(blob: dict, where: str) -> Part:
        mime = _typed_field(blob, "mimeType", str, where) or ""
        data = _typed_field(blob, "data", str, where)
        if data is None:
            raise bad_request(f"'{where}.data' is required (base64)")
        if mime.startswith("image/"):
            return Part("image", media_type=mime, data=data)
        return Part("document", media_type=mime or "application/octet-stream", data=data)

    @staticmethod
    def _decode_file_data(file: dict, where: str) -> Part:
        mime = _typed_field(file, "mimeType", str, where) or ""
        uri = _typed_field(file, "fileUri", str, where)
        if not uri:
            raise bad_request(f"'{where}.fileUri' is required")
        if mime.startswith("image/"):
            return Part("image", media_type=mime, url=uri)
        return document_part("", url=uri, media_type=mime)

    @staticmethod
    def _decode_code(code: dict, where: str) -> Part:
        language = as_text(code.get("language") or "").lower().replace("language_unspecified", "")
        return Part("text", text=f"```{language}\n{as_text(code.get('code') or '')}\n```")

    @staticmethod
    def _decode_code_result(result: dict, where: str) -> Part:
        outcome, output = as_text(result.get("outcome") or "result"), as_text(result.get("output") or "")
        return Part("text", text=f"[code execution {outcome}]\n{output}")

    @staticmethod
    def _decode_function_call(call: dict, where: str, extra, ids: GeminiCallIds) -> Part:
        name = _typed_field(call, "name", str, where)
        if not name:
            raise bad_request(f"'{where}.name' is required")
        args = _typed_field(call, "args", dict, where) or {}
        call_id = ids.call(name, call.get("id"))
        return Part("tool_call", id=call_id, name=name, arguments=dumps(args).decode(), extra=extra)

    @staticmethod
    def _decode_function_response(response: dict, where: str, ids: GeminiCallIds) -> Part:
        name = _typed_field(response, "name", str, where)
        if not name:
            raise bad_request(f"'{where}.name' is required")
        value = _typed_field(response, "response", dict, where) or {}
        content = [Part("text", text=dumps(value).decode())]
        for j, media in enumerate(_typed_field(response, "parts", list, where) or []):  # multimodal results
            blob = gemini_field(media, "inlineData") if isinstance(media, dict) else None
            if isinstance(blob, dict):
                content.append(GeminiCodec._decode_inline_data(blob, f"{where}.parts[{j}].inlineData"))
        is_error = "error" in value and "output" not in value  # Gemini's convention: {"output"} or {"error"}
        return Part(
            "tool_result", id=ids.answer(name, response.get("id")), name=name, content=content, is_error=is_error
        )

    @staticmethod
    def _decode_tools(req: Request, tools: list) -> None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise bad_request(f"tools[{i}] must be an object")
            for key in tool:
                if key not in ("functionDeclarations", "function_declarations"):
                    log.info("gemini tool %r has no translation to other protocols: dropped", key)
            for j, decl in enumerate(_typed_field(tool, "functionDeclarations", list, f"tools[{i}]") or []):
                req.tools.append(GeminiCodec._decode_declaration(decl, f"tools[{i}].functionDeclarations[{j}]"))

    @staticmethod
    def _decode_declaration(decl, where: str) -> Tool:
        if not isinstance(decl, dict) or not isinstance(decl.get("name"), str) or not decl["name"]:
            raise bad_request(f"{where} must be an object with a 'name'")
        description = _typed_field(decl, "description", str, where) or ""
        schema = _typed_field(decl, "parametersJsonSchema", dict, where)
        if schema is None:
            schema = json_schema_from_gemini(_typed_field(decl, "parameters", dict, where) or {})
        return Tool(decl["name"], description, schema)

    @staticmethod
    def _decode_tool_config(req: Request, config: dict) -> None:
        calling = _object_field(config, "functionCallingConfig", "toolConfig")
        mode = (_typed_field(calling, "mode", str, "toolConfig.functionCallingConfig") or "").upper()
        allowed = _typed_field(calling, "allowedFunctionNames", list, "toolConfig.functionCallingConfig") or []
        string_list(allowed, "toolConfig.functionCallingConfig.allowedFunctionNames")
        if mode in ("AUTO", "VALIDATED"):
            req.tool_choice = "auto"
        elif mode == "NONE":
            req.tool_choice = "none"
        elif mode == "ANY" and len(allowed) == 1:
            req.tool_choice, req.tool_name = "tool", allowed[0]
        elif mode == "ANY":
            req.tool_choice = "required"
            if allowed:  # "one of these": offer only these
                req.tools = [t for t in req.tools if t.name in allowed]

    def _decode_generation_config(self, req: Request, config: dict) -> None:
        where = "generationConfig"
        req.max_tokens = _typed_field(config, "maxOutputTokens", int, where)
        req.temperature = _typed_field(config, "temperature", float, where)
        req.top_p = _typed_field(config, "topP", float, where)
        top_k = _typed_field(config, "topK", float, where)
        req.top_k = int(top_k) if top_k is not None else None
        stop = _typed_field(config, "stopSequences", (list, str), where) or []
        req.stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) for s in req.stop):
            raise bad_request("'generationConfig.stopSequences' must be an array of strings")
        candidates = _typed_field(config, "candidateCount", int, where)
        if candidates and candidates > 1:
            log.warning("gemini candidateCount=%d: a translated request answers with one candidate", candidates)
        req.response_format = self._decode_response_format(config)
        self._decode_thinking(req, _object_field(config, "thinkingConfig", where))

    @staticmethod
    def _decode_response_format(config: dict) -> dict | None:
        where = "generationConfig"
        schema = _typed_field(config, "responseJsonSchema", dict, where)
        if schema is None:
            schema = _typed_field(config, "responseSchema", dict, where)
            schema = json_schema_from_gemini(schema) if schema is not None else None
        if schema is not None:
            return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
        if _typed_field(config, "responseMimeType", str, where) == "application/json":
            return {"type": "json_object"}
        return None

    @staticmethod
    def _decode_thinking(req: Request, config: dict) -> None:
        where = "generationConfig.thinkingConfig"
        budget = _typed_field(config, "thinkingBudget", int, where)
        level = _typed_field(config, "thinkingLevel", str, where) or ""
        if level and level.upper() != "THINKING_LEVEL_UNSPECIFIED":
            req.reasoning_effort = level.lower()
        if budget == 0:
            req.thinking = "disabled"
        elif budget is not None and budget < 0:
            req.thinking = "adaptive"  # -1: the model decides how much to think
        elif budget is not None:
            req.thinking, req.thinking_budget = "enabled", budget
        elif _typed_field(config, "includeThoughts", bool, where):
            req.thinking = "adaptive"

    def encode_request(self, req: Request, model: str, provider=None) -> dict:
        call_names = {p.id: p.name for m in req.messages for p in m.parts if p.type == "tool_call"}
        tools = [t for t in req.tools if t.kind != "builtin"]  # another provider's own tools mean nothing here
        system = [p.text for p in req.system if p.text]
        contents: list[dict] = []
        for msg in req.messages:
            if msg.role == "system":  # Gemini has one place for instructions
                system.extend(p.text for p in msg.parts if p.type == "text" and p.text)
                continue
            role = "model" if msg.role == "assistant" else "user"
            parts = self._encode_parts(msg.parts, call_names)
            if not parts:
                continue
            if contents and contents[-1]["role"] == role:
                contents[-1]["parts"].extend(parts)
            else:
                contents.append({"role": role, "parts": parts})
        sign_function_calls(contents)
        body: dict = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
        if tools:
            budget = SchemaBudget()  # one for the request: many small exploding schemas add up
            body["tools"] = [{"functionDeclarations": [self._encode_tool(t, budget) for t in tools]}]
            mode = GEMINI_TOOL_CHOICE.get(req.tool_choice)
            if mode:
                calling: dict = {"mode": mode}
                if req.tool_choice == "tool":
                    calling["allowedFunctionNames"] = [req.tool_name]
                body["toolConfig"] = {"functionCallingConfig": calling}
        config = self._generation_config(req, model)
        if config:
            body["generationConfig"] = config
        if req.protocol == "gemini":
            self._keep_gemini_only_fields(req.raw, body)
        return body

    def _encode_parts(self, parts: list, call_names: dict) -> list:
        out, media = [], []
        for p in parts:
            if p.type == "text":
                if p.text:
                    out.append(_signed({"text": p.text}, gemini_signature(p)))
            elif p.type in ("image", "document"):  # Gemini takes any file type inline or by URI
                out.append(gemini_media_part(p))
            elif p.type == "thinking":
                if gemini_signature(p):
                    out.append({"text": p.text, "thought": True, "thoughtSignature": gemini_signature(p)})
                else:  # another model's reasoning means nothing to Gemini; its state travels in signatures
                    log.debug("thinking without a Gemini signature not sent to Gemini")
            elif p.type == "tool_call":
                args = json_object_arguments(p.arguments)
                out.append(_signed({"functionCall": {"name": p.name, "args": args}}, gemini_signature(p)))
            elif p.type == "tool_result":
                name = call_names.get(p.id) or p.name
                if not name:
                    log.warning("tool result %r answers no known call; sent to Gemini as 'unknown'", p.id)
                response = {"name": name or "unknown", "response": gemini_function_response(p)}
                out.append({"functionResponse": response})
                media.extend(gemini_media_part(c) for c in p.content or [] if c.type == "image")
            else:
                log.debug("%s part not sent to Gemini", p.type)
        return out + media  # a turn's function responses first, then what they showed

    @staticmethod
    def _encode_tool(tool: Tool, budget: SchemaBudget | None = None) -> dict:
        decl: dict = {"name": tool.name}
        if tool.description:
            decl["description"] = tool.description
        schema = tool.parameters or {}
        params = clean_schema_for_gemini(schema, budget)
        if params.get("type") == "OBJECT" and params.get("properties"):
            decl["parameters"] = params
        elif params and params.get("type") != "OBJECT":
            log.warning("tool %s: Gemini needs an object parameter schema; parameters dropped", tool.name)
        return decl  # no arguments: Gemini rejects an OBJECT with empty properties

    @staticmethod
    def _generation_config(req: Request, model: str) -> dict:
        config: dict = {}
        for key, value in (("maxOutputTokens", req.max_tokens), ("temperature", req.temperature),
                           ("topP", req.top_p), ("topK", req.top_k)):  # fmt: skip
            if value is not None:
                config[key] = value
        if req.stop:
            config["stopSequences"] = req.stop[:5]  # Gemini's limit
        fmt = req.response_format or {}
        if fmt.get("type") in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
            spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else fmt
            if isinstance(spec.get("schema"), dict):
                config["responseSchema"] = clean_schema_for_gemini(spec["schema"])
        thinking = gemini_thinking_config(req, model)
        if thinking:
            config["thinkingConfig"] = thinking
        return config

    @staticmethod
    def _keep_gemini_only_fields(raw: dict, body: dict) -> None:
        """Gemini to Gemini: what the canonical model cannot hold goes through as sent."""
        for key in ("safetySettings", "cachedContent", "labels"):
            if gemini_field(raw, key) is not None:
                body[key] = gemini_field(raw, key)
        native = [
            t
            for t in gemini_field(raw, "tools", [])
            if isinstance(t, dict) and not gemini_field(t, "functionDeclarations")
        ]
        if native:
            body.setdefault("tools", []).extend(native)
        sent = gemini_field(raw, "generationConfig")
        if isinstance(sent, dict):
            kept = {key: gemini_field(sent, key) for key in GEMINI_ONLY_CONFIG + ("thinkingConfig",)}
            kept = {key: value for key, value in kept.items() if value is not None}
            for key in ("responseJsonSchema", "responseSchema"):  # the client's own schema, not a round trip
                schema = gemini_field(sent, key)
                if isinstance(schema, dict):
                    body.get("generationConfig", {}).pop("responseSchema", None)
                    kept[key] = schema
                    break
            if kept:
                body["generationConfig"] = {**body.get("generationConfig", {}), **kept}

    # -- responses
    def decode_response(self, body: dict) -> Response:
        # one chunk holding everything, folded: JSON and streamed answers decode alike
        decoder = GeminiStreamDecoder()
        response = fold_events(decoder.feed_chunk(body) + decoder.finish())
        block = gemini_field(_object_field(body, "promptFeedback"), "blockReason")
        if block and not body.get("candidates"):
            response.extra = {"prompt_block_reason": block}
        return response

    def encode_response(self, resp: Response, req: Request) -> dict:
        parts = gemini_response_parts(resp.parts, gemini_wants_thoughts(req))
        body: dict = {}
        block = (resp.extra or {}).get("prompt_block_reason")
        if block:  # the prompt itself was blocked: Gemini answers no candidate at all
            body["promptFeedback"] = {"blockReason": block}
        else:
            candidate: dict = {"content": {"parts": parts, "role": "model"}} if parts else {}
            candidate["finishReason"] = stop_reason_out("gemini", resp.stop_reason)
            candidate["index"] = 0
            body["candidates"] = [candidate]
        body["usageMetadata"] = encode_gemini_usage(resp.usage)
        body["modelVersion"] = req.model
        body["responseId"] = resp.id
        return body

    # -- streams
    def stream_decoder(self):
        return GeminiStreamDecoder(streaming=True)

    def stream_encoder(self, req: Request, sse: bool = True):
        return GeminiStreamEncoder(req, sse)

    # -- errors
    def encode_error(self, err: GatewayError) -> dict:
        status = GEMINI_STATUS.get(err.status) or ("INTERNAL" if err.status >= 500 else "INVALID_ARGUMENT")
        return {"error": {"code": err.status, "message": err.message, "status": status}}


def sign_function_calls(contents: list) -> None:
    """Gemini 3 rejects a model turn whose first functionCall has no thought signature. Calls
    that came from another protocol never had one: give them Google's documented dummy."""
    for content in contents:
        if content["role"] != "model":
            continue
        first_call = next((p for p in content["parts"] if "functionCall" in p), None)
        if first_call is not None and "thoughtSignature" not in first_call:
            first_call["thoughtSignature"] = GEMINI_DUMMY_SIGNATURE


def gemini_media_part(part: Part) -> dict:
    data_uri = parse_data_uri(part.url) if part.url else None
    if part.data or data_uri:
        media_type, data = (part.media_type or "image/png", part.data) if part.data else data_uri
        return {"inlineData": {"mimeType": media_type, "data": data}}
    return {"fileData": {"mimeType": part.media_type or image_type_of_url(part.url), "fileUri": part.url}}


def image_type_of_url(url: str) -> str:
    suffix = url.split("?", 1)[0].rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "gif": "image/gif", "webp": "image/webp", "heic": "image/heic"}.get(
        suffix, "image/jpeg"
    )


def gemini_function_response(part: Part) -> dict:
    """A tool result as Gemini's response object: JSON objects as they are, other text under
    "output" (or "error"), Gemini's documented keys."""
    text = "\n".join(c.text for c in part.content or [] if c.type == "text")
    try:
        value = loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    return {"error": text} if part.is_error else {"output": text}


def gemini_thinking_config(req: Request, model: str) -> dict | None:
    """thinking/budget/effort -> thinkingConfig. Budgets, not thinkingLevel: every 2.5 and 3
    model accepts a budget, while levels exist on 3 only."""
    if req.thinking == "disabled" or req.reasoning_effort == "none":
        if "pro" in model.lower():  # Pro models cannot stop thinking: leave them their default
            return None
        return {"thinkingBudget": 0}
    budget = req.thinking_budget
    if budget is None and req.reasoning_effort:
        budget = GEMINI_EFFORT_BUDGETS.get(req.reasoning_effort, GEMINI_EFFORT_BUDGETS["medium"])
    if budget is None and req.thinking in ("enabled", "adaptive"):
        budget = -1  # dynamic
    if budget is None:
        return None
    return {"thinkingBudget": min(budget, GEMINI_MAX_THINKING_BUDGET), "includeThoughts": True}


def gemini_response_parts(parts: list, with_thoughts: bool) -> list:
    out = []
    signed: list = []  # signed Anthropic thinking waiting for the part that will carry it
    for p in parts:
        if is_signed_thinking(p):
            signed.append(p)
        if p.type == "text" and (p.text or gemini_signature(p)):
            out.append({"text": p.text})
        elif p.type == "thinking" and with_thoughts and p.text:
            out.append(_signed({"text": p.text, "thought": True}, gemini_signature(p)))
            continue
        elif p.type == "tool_call":
            out.append({"functionCall": {"name": p.name, "args": json_object_arguments(p.arguments)}})
        elif p.type == "image":
            out.append(gemini_media_part(p))
        else:
            continue
        signature = gemini_signature(p)
        if not signature and signed:
            signature, signed = pack_gemini_thinking(signed), []
        _signed(out[-1], signature)
    if signed:
        out.append({"text": "", "thoughtSignature": pack_gemini_thinking(signed)})
    return out


class GeminiStreamDecoder:
    """streamGenerateContent chunks -> canonical events. Text and thoughts arrive as deltas
    (one block open at a time); each functionCall arrives whole and becomes its own block:
    start, one arguments delta, stop. The last usageMetadata wins: Gemini repeats, not adds.
    `streaming`: a stream that ends without a finishReason was cut short (a whole answer may
    have none: a blocked prompt)."""

    def __init__(self, streaming: bool = False):
        self.started = False
        self.next_index = 0
        self.open_index: int | None = None
        self.open_kind = ""
        self.has_calls = False
        self.stop_reason = ""
        self.usage: Usage | None = None
        self.finished = False
        self.streaming = streaming

    def feed(self, event: SSEEvent) -> list:
        data = event.data.strip()
        if not data:
            return []
        try:
            chunk = loads(data)
        except ValueError:
            return [StreamError(GatewayError(502, f"upstream sent malformed stream data: {data[:120]!r}"))]
        chunks = chunk if isinstance(chunk, list) else [chunk]  # an error may come wrapped in a list
        return [ev for item in chunks for ev in self.feed_chunk(item)]

    def feed_chunk(self, chunk) -> list:
        """One GenerateContentResponse (a stream chunk, or a whole JSON answer)."""
        if not isinstance(chunk, dict):
            return [StreamError(GatewayError(502, f"upstream sent an unexpected stream chunk: {json_preview(chunk)}"))]
        if "error" in chunk and not chunk.get("candidates"):
            self.finished = True
            return [StreamError(gemini_stream_error(chunk["error"]))]
        out: list = []
        meta = gemini_field(chunk, "usageMetadata")
        if isinstance(meta, dict):
            self.usage = decode_gemini_usage(meta)
        if not self.started:
            self.started = True
            start_usage = Usage(input_tokens=self.usage.input_tokens) if self.usage else None
            out.append(
                MessageStart(
                    string_or(gemini_field(chunk, "responseId")) or new_id(""),
                    string_or(gemini_field(chunk, "modelVersion")),
                    start_usage,
                )
            )
        if gemini_field(_object_field(chunk, "promptFeedback"), "blockReason"):
            self.stop_reason = "content_filter"
        candidate = next(
            (c for c in chunk.get("candidates") or [] if isinstance(c, dict) and c.get("index", 0) == 0), {}
        )
        content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
        parts = content.get("parts")
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                self._feed_part(part, out)
        reason = gemini_field(candidate, "finishReason")
        if reason:
            self.stop_reason = stop_reason_in("gemini", reason)
        return out

    def _feed_part(self, part: dict, out: list) -> None:
        signature = string_or(gemini_field(part, "thoughtSignature"))
        extra = {"thought_signature": signature} if signature else None
        call = gemini_field(part, "functionCall")
        if isinstance(part.get("text"), str):
            kind = "thinking" if part.get("thought") is True else "text"
            if not part["text"]:
                return  # a signature-only part: optional context, and no block may stay empty
            if self.open_kind != kind:
                self._close(out)
                self.open_index, self.open_kind = self._next(), kind
                out.append(BlockStart(self.open_index, Part(kind, extra=extra)))
            elif signature:  # the block already started: Gemini validates signatures on calls only
                log.debug("gemini signature arriving mid-block not kept")
            out.append(BlockDelta(self.open_index, kind, part["text"]))
        elif isinstance(call, dict):
            self._close(out)
            index = self._next()
            call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else new_id("call_")
            out.append(BlockStart(index, Part("tool_call", id=call_id, name=str(call.get("name") or ""), extra=extra)))
            args = call.get("args") if isinstance(call.get("args"), dict) else {}
            out.append(BlockDelta(index, "arguments", dumps(args).decode()))
            out.append(BlockStop(index))
            self.has_calls = True
        else:
            log.debug("gemini stream part not translated: %s", sorted(part))

    def _next(self) -> int:
        self.next_index += 1
        return self.next_index - 1

    def _close(self, out: list) -> None:
        if self.open_index is not None:
            out.append(BlockStop(self.open_index))
        self.open_index, self.open_kind = None, ""

    def finish(self) -> list:
        if self.finished:
            return []
        self.finished = True
        if self.streaming and not self.stop_reason:
            return stream_cut_short("before its finishReason")
        out: list = []
        if not self.started:
            out.append(MessageStart(new_id(""), ""))
        self._close(out)
        stop = self.stop_reason or "end_turn"
        if stop == "end_turn" and self.has_calls:
            stop = "tool_use"  # Gemini says STOP after calls; clients must be told to run them
        out.append(MessageDelta(stop, None, self.usage or Usage()))
        out.append(MessageStop())
        return out


def gemini_stream_error(err) -> GatewayError:
    err = err if isinstance(err, dict) else {"message": as_text(err)}
    code = err.get("code") if type(err.get("code")) is int and 400 <= err.get("code") <= 599 else 502
    return GatewayError(code, as_text(err.get("message") or "upstream stream error"))


# Deltas a Gemini stream keeps until their block stops (a call goes out whole; signed thinking rides
# on the next part), by the Part field they fill. Kept as pieces: str += would be quadratic.
GEMINI_HELD_DELTAS = {"arguments": "arguments", "signature": "signature", "thinking": "text"}


class GeminiStreamEncoder:
    """Canonical events -> streamGenerateContent chunks, each a whole GenerateContentResponse:
    SSE frames (alt=sse) or, with sse=False, one JSON array. Text and thoughts go out as they
    arrive; a tool call goes out whole (Gemini never splits a call), held until the next chunk so
    that a turn's calls travel with its finishReason and usageMetadata, as Gemini sends them; the
    last chunk always has content (an empty text part at least), as Gemini's has."""

    def __init__(self, req: Request, sse: bool = True):
        self.req = req
        self.sse = sse
        self.keepalive = b": keep-alive\n\n" if sse else b"\n"  # whitespace is all a JSON array may carry
        self.content_type = "text/event-stream" if sse else "application/json"
        self.id = ""
        self.with_thoughts = gemini_wants_thoughts(req)
        self.blocks: dict[int, Part] = {}
        self.unsigned: set[int] = set()  # blocks whose signature has not gone out yet
        self.signed: list = []  # signed Anthropic thinking for the next part to carry (pack_gemini_thinking)
        self.pieces: dict[int, dict[str, list]] = {}  # block -> delta kind -> pieces, joined when it stops
        self.calls: list = []  # functionCall parts not sent yet: they go with the next chunk
        self.opened = False  # the JSON array's "[" is out

    def _frame(self, obj: dict) -> bytes:
        data = dumps(obj)
        if self.sse:
            return b"data: " + data + b"\r\n\r\n"
        prefix = b",\r\n" if self.opened else b"["
        self.opened = True
        return prefix + data

    def _chunk(self, parts: list, finish: str = "", usage: Usage | None = None) -> bytes:
        if self.calls:
            parts, self.calls = [*self.calls, *parts], []
        candidate: dict = {"content": {"parts": parts, "role": "model"}} if parts else {}
        if finish:
            candidate["finishReason"] = finish
        candidate["index"] = 0
        obj: dict = {"candidates": [candidate]}
        if usage is not None:
            obj["usageMetadata"] = encode_gemini_usage(usage)
        obj["modelVersion"] = self.req.model
        obj["responseId"] = self.id
        return self._frame(obj)

    def _text_part(self, index: int, text: str, thought: bool) -> dict:
        part: dict = {"text": text, "thought": True} if thought else {"text": text}
        if index in self.unsigned:
            self.unsigned.discard(index)
            part["thoughtSignature"] = gemini_signature(self.blocks[index])
        elif not thought:
            self._carry_thinking(part)
        return part

    def _carry_thinking(self, part: dict) -> dict:
        if self.signed and "thoughtSignature" not in part:
            part["thoughtSignature"] = pack_gemini_thinking(self.signed)
            self.signed = []
        return part

    def encode(self, ev) -> bytes:
        if isinstance(ev, BlockDelta):
            block = self.blocks.get(ev.index)
            if block is None:
                return b""
            if ev.kind in GEMINI_HELD_DELTAS:  # a signature is Anthropic's: it comes back inside a thoughtSignature
                self.pieces.setdefault(ev.index, {}).setdefault(ev.kind, []).append(ev.value)
                if ev.kind == "thinking" and self.with_thoughts:
                    return self._chunk([self._text_part(ev.index, ev.value, True)])
            elif ev.kind == "text":
                return self._chunk([self._text_part(ev.index, ev.value, False)])
            return b""
        if isinstance(ev, BlockStart):
            self.blocks[ev.index] = Part(ev.part.type, id=ev.part.id, name=ev.part.name, data=ev.part.data,
                                         extra=ev.part.extra)  # fmt: skip
            if gemini_signature(ev.part):
                self.unsigned.add(ev.index)
            return b""
        if isinstance(ev, BlockStop):
            return self._stop_block(ev.index)
        if isinstance(ev, MessageStart):
            self.id = ev.id or new_id("")
            return b""
        if isinstance(ev, MessageDelta):
            # thinking with nothing after it rides on an empty text part; so does a finish with nothing to carry
            # (clients read candidates[0].content.parts of every chunk: Gemini's last one always has some)
            parts = [self._carry_thinking({"text": ""})] if self.signed or not self.calls else []
            return self._chunk(parts, stop_reason_out("gemini", ev.stop_reason), ev.usage or Usage())
        if isinstance(ev, MessageStop):
            return b"" if self.sse else (b"]" if self.opened else b"[]")
        if isinstance(ev, StreamError):
            frame = self._chunk([]) if self.calls else b""  # whole calls made before the failure still go out
            frame += self._frame(GEMINI_CODEC.encode_error(ev.error))
            return frame if self.sse else frame + b"]"
        return b""

    def _stop_block(self, index: int) -> bytes:
        block = self.blocks.pop(index, None)
        if block is None:
            return b""
        for kind, pieces in self.pieces.pop(index, {}).items():
            setattr(block, GEMINI_HELD_DELTAS[kind], "".join(pieces))
        if is_signed_thinking(block):
            self.signed.append(block)
            return b""
        if block.type == "tool_call":
            call = {"functionCall": {"name": block.name, "args": json_object_arguments(block.arguments)}}
            self.calls.append(self._carry_thinking(_signed(call, gemini_signature(block))))
            return b""
        if index in self.unsigned and block.type == "text":  # a signed block that never said anything
            self.unsigned.discard(index)
            return self._chunk([{"text": "", "thoughtSignature": gemini_signature(block)}])
        return b""


GEMINI_CODEC = GeminiCodec()


def gemini_count_tokens_estimate(body: dict) -> int:
    """countTokens without an upstream: the one estimator over what the request sends
    (contents, systemInstruction, tools), also in the {generateContentRequest: ...} form."""
    inner = gemini_field(body, "generateContentRequest")
    if isinstance(inner, dict):
        body = inner
    contents = gemini_field(body, "contents", [])
    return estimate_tokens(
        [_with_camel_inline_data(contents), gemini_field(body, "systemInstruction"), gemini_field(body, "tools")]
    )


def _with_camel_inline_data(contents):
    """estimate_tokens prices images by the inlineData key: rename the snake_case form."""
    if not isinstance(contents, list):
        return contents
    out = []
    for content in contents:
        parts = content.get("parts") if isinstance(content, dict) else None
        if isinstance(parts, list):
            parts = [
                {"inlineData": p["inline_data"]} if isinstance(p, dict) and "inline_data" in p else p for p in parts
            ]
            content = {**content, "parts": parts}
        out.append(content)
    return out


# ---- JSON Schema <-> Gemini's OpenAPI schema subset --------------------------------------

GEMINI_FORMATS = {"string": ("enum", "date-time"), "number": ("float", "double"), "integer": ("int32", "int64")}
GEMINI_TYPES = ("string", "number", "integer", "boolean", "array", "object")
_GEMINI_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
# Keywords whose meaning survives without them (or that only steer validators): dropped quietly.
# Everything else Gemini lacks is told in the description, so the model still reads it.
_SCHEMA_QUIET_DROPS = frozenset({"$schema", "$id", "$comment", "$anchor", "$defs", "definitions", "additionalProperties",
                                 "propertyNames", "patternProperties", "unevaluatedProperties", "readOnly", "writeOnly",
                                 "contentEncoding", "contentMediaType", "strict"})  # fmt: skip
_SCHEMA_HANDLED = frozenset({"type", "description", "title", "default", "nullable", "enum", "const", "format",
                             "properties", "required", "items", "prefixItems", "anyOf", "oneOf", "allOf", "$ref",
                             "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "pattern",
                             "uniqueItems", "examples", "example", "deprecated"} | set(_GEMINI_COUNTS))  # fmt: skip


def json_schema_from_gemini(schema, depth: int = 0):
    """Gemini's OpenAPI-style schema (uppercase types, nullable, int64 counts as strings,
    either key case) -> JSON Schema."""
    if not isinstance(schema, dict):
        return schema
    if depth > SCHEMA_MAX_DEPTH:
        raise bad_request(f"a schema is nested deeper than {SCHEMA_MAX_DEPTH} levels")
    depth += 1
    out: dict = {}
    for key, value in schema.items():
        key = key if key in ("properties", "required") else _camel_case(key)
        if key == "type" and isinstance(value, str):
            if value.upper() != "TYPE_UNSPECIFIED":
                out["type"] = value.lower()
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {name: json_schema_from_gemini(s, depth) for name, s in value.items()}
        elif key == "items":
            out["items"] = json_schema_from_gemini(value, depth)
        elif key == "anyOf" and isinstance(value, list):
            out["anyOf"] = [json_schema_from_gemini(s, depth) for s in value]
        elif key in _GEMINI_COUNTS and isinstance(value, str) and value.isdigit():
            out[key] = int(value)
        elif key == "format" and value == "enum" or key in ("nullable", "propertyOrdering"):
            continue  # enum is said by "enum"; nullable below; ordering is Gemini's own
        else:
            out[key] = value
    if schema.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"].append({"type": "null"})
    return out


def _camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


SCHEMA_MAX_DEPTH = 64  # levels a schema may nest (references followed included): Gemini's are far fewer
SCHEMA_MAX_INLINED = 4000  # keys $ref inlining may add to one request's schemas (a DAG of refs is 2^N)


class SchemaBudget:
    """How much $ref inlining may still add to the schemas of one request. A tree schema costs
    what its text costs; only the copies references make are counted, so a 2 KB schema of
    definitions that each reference the next twice cannot grow to 2^N nodes."""

    __slots__ = ("left",)

    def __init__(self, keys: int = SCHEMA_MAX_INLINED):
        self.left = keys


class _SchemaCleaning:
    __slots__ = ("defs", "budget", "depth")

    def __init__(self, defs: dict, budget: SchemaBudget):
        self.defs = defs
        self.budget = budget
        self.depth = 0


def clean_schema_for_gemini(schema, budget: SchemaBudget | None = None) -> dict:
    """A JSON Schema -> the OpenAPI subset Gemini accepts for parameters and responseSchema:
    $ref/$defs inlined, allOf merged, const -> enum, type arrays -> type + nullable,
    exclusive bounds -> inclusive ones, untyped values -> an explicit "any" union, required
    limited to declared properties, and whatever has no Gemini keyword (default, unsupported
    formats, multipleOf...) told in the description instead of lost. Inlining stops when the
    budget (shared by a request's schemas) is spent: the rest becomes a described any-value;
    a schema nested deeper than SCHEMA_MAX_DEPTH is a 400."""
    if not isinstance(schema, dict):
        return {}
    defs: dict = {}
    for key in ("definitions", "$defs"):
        if isinstance(schema.get(key), dict):
            defs.update(schema[key])
    return _gemini_schema(schema, _SchemaCleaning(defs, budget or SchemaBudget()), ())


def any_value_schema(depth: int = 1) -> dict:
    """Gemini needs a type on every node: "any JSON value" spelled out."""
    branches = [{"type": "STRING"}, {"type": "NUMBER"}, {"type": "BOOLEAN"}, {"type": "OBJECT"}]
    if depth:
        branches.append({"type": "ARRAY", "items": any_value_schema(0)})
    return {"anyOf": branches}


def _gemini_schema(node, ctx: _SchemaCleaning, refs: tuple) -> dict:
    if not isinstance(node, dict) or not node:  # true / {}: any value
        return any_value_schema()
    if ctx.depth >= SCHEMA_MAX_DEPTH:
        raise bad_request(f"a JSON schema is nested deeper than {SCHEMA_MAX_DEPTH} levels (references included)")
    node, refs = _inline_refs(node, ctx, refs)
    if refs:  # inside an inlined definition: a copy the request's size does not bound
        if ctx.budget.left <= 0:
            return _cut_short(node, refs)
        ctx.budget.left -= len(node)
    ctx.depth += 1
    try:
        return _gemini_node(node, ctx, refs)
    finally:
        ctx.depth -= 1


def _gemini_node(node: dict, ctx: _SchemaCleaning, refs: tuple) -> dict:
    if isinstance(node.get("allOf"), list):
        node = _merge_all_of(node, ctx, refs)
    for key in node:
        if key not in _SCHEMA_HANDLED and key not in _SCHEMA_QUIET_DROPS:
            log.debug("schema keyword %r has no Gemini equivalent: dropped", key)
    notes: list[str] = []
    types, nullable = _schema_types(node)
    union = node.get("anyOf") if isinstance(node.get("anyOf"), list) else node.get("oneOf")
    if isinstance(union, list) and any(_is_shape(b) for b in union):
        out = _gemini_union(union, ctx, refs)
    elif len(types) > 1:
        shared = {k: v for k, v in node.items() if k not in ("type", "nullable", "description", "title", "default")}
        out = {"anyOf": [_gemini_schema({**shared, "type": t}, ctx, refs) for t in types]}
    elif types:
        out = _gemini_typed(node, types[0], ctx, refs, notes)
    else:
        out = any_value_schema()
    if nullable:
        out["nullable"] = True
    description = _described(node, notes)
    if description:
        out["description"] = description
    return out


def _cut_short(node: dict, refs: tuple) -> dict:
    """Where the inlining budget ran out: any value, with a description that says what it was."""
    name = refs[-1].rsplit("/", 1)[-1]
    own = node.get("description") if isinstance(node.get("description"), str) else ""
    note = f"a {name} value (its definition was too large to repeat here)"
    return {**any_value_schema(), "description": f"{own} ({note})" if own else note}


def _inline_refs(node: dict, ctx: _SchemaCleaning, refs: tuple) -> tuple[dict, tuple]:
    """Replace a local $ref by its definition (sibling keys win); a recursive one becomes a
    plain object, since Gemini schemas cannot loop."""
    while isinstance(node.get("$ref"), str) and ctx.budget.left > 0:
        ref = node["$ref"]
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        name = ref.rsplit("/", 1)[-1]
        target = ctx.defs.get(name) if ref.startswith("#/") else None
        if ref in refs or not isinstance(target, dict):
            what = "recursive" if ref in refs else "unresolved"
            return {"type": "object", "description": f"({what} reference to {name})", **siblings}, refs
        ctx.budget.left -= len(target)
        node, refs = {**target, **siblings}, refs + (ref,)
    return node, refs


def _merge_all_of(node: dict, ctx: _SchemaCleaning, refs: tuple) -> dict:
    """allOf folded into one schema: the node's own keys win, then those of earlier branches."""
    merged = {k: v for k, v in node.items() if k != "allOf"}
    props = dict(merged["properties"]) if isinstance(merged.get("properties"), dict) else None
    own = merged.get("required")
    required = dict.fromkeys(r for r in own if isinstance(r, str)) if isinstance(own, list) else None
    for sub in node["allOf"]:
        if not isinstance(sub, dict):
            continue
        sub, _ = _inline_refs(sub, ctx, refs)
        for key, value in sub.items():
            if key == "properties" and isinstance(value, dict):
                props = props if props is not None else {}
                for name, schema in value.items():
                    props.setdefault(name, schema)
            elif key == "required" and isinstance(value, list):
                required = required if required is not None else {}
                required.update((r, None) for r in value if isinstance(r, str))
            else:
                merged.setdefault(key, value)
    if props is not None:
        merged["properties"] = props
    if required is not None:
        merged["required"] = list(required)
    return merged


def _is_shape(branch) -> bool:
    """A union branch that says what a value is (not just one more constraint on the parent)."""
    return isinstance(branch, dict) and any(
        k in branch for k in ("type", "properties", "items", "$ref", "enum", "const", "anyOf", "oneOf")
    )


def _schema_types(node: dict) -> tuple[list, bool]:
    raw = node.get("type")
    names = [raw] if isinstance(raw, str) else [t for t in raw if isinstance(t, str)] if isinstance(raw, list) else []
    names = [t.lower() for t in names]
    nullable = "null" in names or node.get("nullable") is True
    names = [t for t in names if t in GEMINI_TYPES]
    if not names:
        inferred = _inferred_type(node)
        names = [inferred] if inferred else []
    return names, nullable


def _inferred_type(node: dict) -> str:
    if any(k in node for k in ("properties", "additionalProperties", "required")):
        return "object"
    if "items" in node or "prefixItems" in node:
        return "array"
    values = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]] if "const" in node else []
    values = [v for v in values if v is not None]
    if values:
        kinds = {_json_type(v) for v in values}
        return kinds.pop() if len(kinds) == 1 else "string"
    if any(k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        return "number"
    if any(k in node for k in ("minLength", "maxLength", "pattern", "format")):
        return "string"
    return ""


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {dict: "object", list: "array"}.get(type(value), "string")


def _gemini_union(branches: list, ctx: _SchemaCleaning, refs: tuple) -> dict:
    nullable = False
    kept = []
    for branch in branches:
        if isinstance(branch, dict) and (
            branch.get("type") == "null" or ("const" in branch and branch["const"] is None)
        ):
            nullable = True
            continue
        kept.append(_gemini_schema(branch, ctx, refs))
    if kept and all(
        k.get("type") == "STRING" and "enum" in k and set(k) <= {"type", "enum", "description"} for k in kept
    ):
        out = {"type": "STRING", "enum": list(dict.fromkeys(v for k in kept for v in k["enum"]))}  # string choices
    elif len(kept) == 1:
        out = kept[0]
    else:
        out = {"anyOf": kept} if kept else any_value_schema()
    if nullable:
        out["nullable"] = True
    return out


def _gemini_typed(node: dict, kind: str, ctx: _SchemaCleaning, refs: tuple, notes: list) -> dict:
    out: dict = {"type": kind.upper()}
    _add_enum(node, kind, out, notes)
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt:
        if fmt in GEMINI_FORMATS.get(kind, ()):
            out["format"] = fmt
        else:
            notes.append(f"format: {fmt}")
    if kind == "object":
        _add_object_fields(node, out, ctx, refs)
    elif kind == "array":
        _add_array_fields(node, out, ctx, refs, notes)
    elif kind == "string":
        out.update({k: node[k] for k in ("minLength", "maxLength", "pattern") if k in node})
    elif kind in ("number", "integer"):
        _add_bounds(node, kind, out, notes)
    return out


def _add_enum(node: dict, kind: str, out: dict, notes: list) -> None:
    if isinstance(node.get("enum"), list):
        values = list(node["enum"])
    elif "const" in node:
        values = [node["const"]]
    else:
        return
    if None in values:
        out["nullable"] = True
        values = [v for v in values if v is not None]
    if values and kind == "string" and all(isinstance(v, str) for v in values):
        out["enum"] = values
    elif len(values) == 1:
        notes.append(f"must be {json.dumps(values[0])}")  # Gemini enums hold strings only
    elif values:
        notes.append("one of: " + ", ".join(json.dumps(v) for v in values))


def _add_object_fields(node: dict, out: dict, ctx: _SchemaCleaning, refs: tuple) -> None:
    props = node.get("properties")
    if isinstance(props, dict) and props:  # Gemini rejects empty properties: a bare OBJECT means any object
        out["properties"] = {name: _gemini_schema(s, ctx, refs) for name, s in props.items()}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        required = [r for r in required if isinstance(r, str) and r in props]  # Gemini rejects undeclared names
        if required:
            out["required"] = required
    out.update({k: node[k] for k in ("minProperties", "maxProperties") if k in node})


def _add_array_fields(node: dict, out: dict, ctx: _SchemaCleaning, refs: tuple, notes: list) -> None:
    items = node.get("items")
    if isinstance(node.get("prefixItems"), list) or isinstance(items, list):  # tuples: Gemini has none
        tuple_items = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else items
        notes.append("a tuple: " + ", ".join(as_text(s.get("type", "any")) for s in tuple_items if isinstance(s, dict)))
        items = tuple_items[0] if tuple_items else None
    out["items"] = _gemini_schema(items, ctx, refs) if isinstance(items, dict) and items else any_value_schema(0)
    out.update({k: node[k] for k in ("minItems", "maxItems") if k in node})
    if node.get("uniqueItems") is True:
        notes.append("items must be unique")


def _add_bounds(node: dict, kind: str, out: dict, notes: list) -> None:
    for key in ("minimum", "maximum"):
        if _is_number(node.get(key)):
            out[key] = node[key]
    for key, bound, sign in (("exclusiveMinimum", "minimum", ">"), ("exclusiveMaximum", "maximum", "<")):
        value = node.get(key)
        if value is True:  # draft-4 form: the bound itself is exclusive
            value = out.pop(bound, None)
        if not _is_number(value):
            continue
        if kind == "integer" and float(value).is_integer():
            out[bound] = int(value) + (1 if sign == ">" else -1)  # same set of integers, inclusive
        else:
            out[bound] = value
            notes.append(f"must be {sign} {value}")
    if _is_number(node.get("multipleOf")):
        notes.append(f"a multiple of {node['multipleOf']}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _described(node: dict, notes: list) -> str:
    text = node.get("description") if isinstance(node.get("description"), str) else ""
    if not text and isinstance(node.get("title"), str):
        text = node["title"]
    notes = list(notes)
    if "default" in node:
        notes.append(f"default: {json.dumps(node['default'])}")
    examples = (
        node.get("examples")
        if isinstance(node.get("examples"), list)
        else [node["example"]]
        if "example" in node
        else []
    )
    if examples:
        notes.append("e.g. " + ", ".join(json.dumps(e) for e in examples[:3]))
    if node.get("deprecated") is True:
        notes.append("deprecated")
    if not notes:
        return text
    return f"{text} ({'; '.join(notes)})" if text else "; ".join(notes)


# ---- JSON Schema -> Anthropic's structured-output subset ----------------------------------
#
# What output_config.format accepts (Anthropic's structured-outputs docs, and the transform_schema of
# its SDKs): every object closed (additionalProperties: false), enums of primitive values, anyOf
# (oneOf is read as anyOf), local $ref/$defs that do not recurse, a short list of string formats,
# minItems 0 or 1. Whatever else a schema says (bounds, lengths, patterns, defaults, other formats) is
# told in the description, so the model still reads it.

ANTHROPIC_STRING_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4",
                                      "ipv6", "uuid"})  # fmt: skip
# Claude models older than structured outputs (Opus 4.1, Sonnet 4.5 and Haiku 4.5 were the first)
ANTHROPIC_NO_JSON_OUTPUT = ("*claude-3*", "*claude-2*", "*claude-instant*", "*claude-sonnet-4-2025*",
                            "*claude-sonnet-4-0*", "*claude-sonnet-4", "*claude-opus-4-2025*", "*claude-opus-4-0*",
                            "*claude-opus-4")  # fmt: skip
ANTHROPIC_SCHEMA_MAX_NODES = 4000  # a response schema larger than this is refused, not cleaned
_ANTHROPIC_NOTED = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
_ANTHROPIC_COUNT_NOTES = {"minLength": "at least {} characters", "maxLength": "at most {} characters",
                          "minItems": "at least {} items", "maxItems": "at most {} items",
                          "minProperties": "at least {} keys", "maxProperties": "at most {} keys"}  # fmt: skip
JSON_ANSWER_INSTRUCTION = (
    "Answer with one JSON value and nothing else: no text before or after it and no Markdown code fence."
)


@functools.lru_cache(maxsize=256)
def anthropic_has_json_output(model: str) -> bool:
    """Whether a model takes output_config.format: Claude 4.5 and later (unknown models behind an
    Anthropic-compatible endpoint are asked by instruction instead)."""
    return glob_match("*claude*", model) and not any(glob_match(g, model) for g in ANTHROPIC_NO_JSON_OUTPUT)


def anthropic_output_format(response_format: dict, model: str) -> dict | None:
    """The canonical response_format as output_config.format; None when it must be asked for in words."""
    if response_format.get("type") != "json_schema" or not anthropic_has_json_output(model):
        return None
    spec = response_format.get("json_schema") if isinstance(response_format.get("json_schema"), dict) else {}
    schema = clean_schema_for_anthropic(spec.get("schema") if isinstance(spec.get("schema"), dict) else {})
    about = spec.get("description")
    if isinstance(about, str) and about and "description" not in schema:
        schema["description"] = about  # Anthropic's format has no place of its own for it
    return {"type": "json_schema", "schema": schema}


def json_answer_instruction(response_format: dict) -> str:
    """What a model without structured outputs is told: JSON only, and the schema when there is one."""
    spec = response_format.get("json_schema") if isinstance(response_format.get("json_schema"), dict) else {}
    schema = spec.get("schema")
    if response_format.get("type") == "json_schema" and isinstance(schema, dict):
        return f"{JSON_ANSWER_INSTRUCTION} It must conform to this JSON Schema:\n{dumps(schema).decode()}"
    return JSON_ANSWER_INSTRUCTION.replace("one JSON value", "one JSON object")


def clean_schema_for_anthropic(schema: dict) -> dict:
    """A JSON Schema -> the subset Anthropic's structured outputs accept (see the section comment):
    objects closed, allOf merged, oneOf -> anyOf, const -> enum, type arrays -> anyOf, local refs kept
    as $defs with recursion cut, and the rest told in descriptions. Linear in the schema's size."""
    cleaner = _AnthropicSchema(schema)
    out = cleaner.clean(schema, 0)
    if cleaner.done:
        out["$defs"] = {name: value for name, value in cleaner.done.items() if value is not None}
    return out


class _AnthropicSchema:
    def __init__(self, root: dict):
        self.defs: dict = {}
        for key in ("definitions", "$defs"):
            if isinstance(root.get(key), dict):
                self.defs.update(root[key])
        self.done: dict[str, dict | None] = {}  # definition name -> cleaned (None while being cleaned)
        self.nodes = 0

    def spend(self, nodes: int, depth: int = 0) -> None:
        self.nodes += nodes
        if self.nodes > ANTHROPIC_SCHEMA_MAX_NODES or depth > 64:
            raise bad_request(f"the response schema is too large or too deep (over {ANTHROPIC_SCHEMA_MAX_NODES} "
                              "nodes or 64 levels) for structured output")  # fmt: skip

    def clean(self, node, depth: int) -> dict:
        self.spend(1, depth)
        if not isinstance(node, dict) or not node:
            return self.any_value("any JSON value")
        if isinstance(node.get("$ref"), str):
            return self.ref(node["$ref"], depth)
        if isinstance(node.get("allOf"), list):
            node = self.merge_all_of(node)
        notes: list[str] = []
        types, nullable = _schema_types(node)
        union = node.get("anyOf") if isinstance(node.get("anyOf"), list) else node.get("oneOf")
        if isinstance(union, list) and union:
            out = {"anyOf": [self.clean(branch, depth + 1) for branch in union]}
        elif isinstance(node.get("enum"), list) or "const" in node:
            out = self.enum(node, notes)
        elif len(types) > 1:
            shared = {k: v for k, v in node.items() if k not in ("type", "nullable", "description", "title")}
            out = {"anyOf": [self.typed({**shared, "type": t}, t, depth, notes) for t in types]}
        elif types:
            out = self.typed(node, types[0], depth, notes)
        elif nullable:  # "type": "null"
            out, nullable = {"type": "null"}, False
        else:
            out = self.any_value("")
        if nullable and "enum" not in out:
            out = (
                {"anyOf": [*out["anyOf"], {"type": "null"}]}
                if set(out) == {"anyOf"}
                else {"anyOf": [out, {"type": "null"}]}
            )
        description = _described(node, notes)
        if description:
            out["description"] = description
        return out

    def merge_all_of(self, node: dict) -> dict:
        """allOf as one schema (closing each branch would reject the others' keys); each branch and
        property merged counts against the size bound, and the merge is linear."""
        merged = {k: v for k, v in node.items() if k != "allOf"}
        props = dict(merged["properties"]) if isinstance(merged.get("properties"), dict) else {}
        required = list(merged["required"]) if isinstance(merged.get("required"), list) else []
        for sub in node["allOf"]:
            if not isinstance(sub, dict):
                continue
            sub = self.follow_refs(sub)
            self.spend(1 + len(sub.get("properties") or ()))
            for key, value in sub.items():
                if key == "properties" and isinstance(value, dict):
                    for name, schema in value.items():
                        props.setdefault(name, schema)
                elif key == "required" and isinstance(value, list):
                    required.extend(value)
                else:
                    merged.setdefault(key, value)
        if props:
            merged["properties"] = props
        if required:
            merged["required"] = list(dict.fromkeys(r for r in required if isinstance(r, str)))
        return merged

    def follow_refs(self, node: dict) -> dict:
        """An allOf branch with its local $ref chain followed (nearer keys win); each hop counts
        against the size bound and each definition is read once, so a long chain stays linear."""
        merged: dict = {}
        seen: set = set()
        while True:
            for key, value in node.items():
                if key != "$ref":
                    merged.setdefault(key, value)
            ref = node.get("$ref")
            head, _, name = ref.rpartition("/") if isinstance(ref, str) else ("", "", "")
            target = self.defs.get(name) if head in ("#/$defs", "#/definitions") else None
            if not isinstance(target, dict) or ref in seen:  # none, unresolved or recursive: what was merged
                return merged
            seen.add(ref)
            self.spend(1)
            node = target

    def ref(self, ref: str, depth: int) -> dict:
        head, _, name = ref.rpartition("/")
        if head not in ("#/$defs", "#/definitions") or not isinstance(self.defs.get(name), dict):
            return self.any_value(f"(unresolved reference {ref})")
        if name in self.done and self.done[name] is None:  # recursion: Anthropic's grammar cannot loop
            return {"type": "object", "properties": {}, "additionalProperties": False,
                    "description": f"(a nested {name}, left empty: recursive schemas are not supported)"}  # fmt: skip
        if name not in self.done:
            self.done[name] = None
            self.done[name] = self.clean(self.defs[name], depth + 1)
        return {"$ref": f"#/$defs/{name}"}

    @staticmethod
    def any_value(description: str) -> dict:
        scalars = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
        out: dict = {"anyOf": [*scalars, {"type": "array", "items": {"anyOf": scalars}}]}
        if description:
            out["description"] = description
        return out

    @staticmethod
    def enum(node: dict, notes: list) -> dict:
        values = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]]
        primitive = [v for v in values if v is None or isinstance(v, (str, int, float, bool))]
        if len(primitive) < len(values):  # objects and arrays cannot be enum values here
            notes.append("one of: " + ", ".join(json.dumps(v) for v in values))
            return _AnthropicSchema.any_value("")
        return {"enum": primitive}

    def typed(self, node: dict, kind: str, depth: int, notes: list) -> dict:
        out: dict = {"type": kind}
        if kind == "object":
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            out["properties"] = {name: self.clean(s, depth + 1) for name, s in props.items()}
            out["additionalProperties"] = False  # the only value Anthropic accepts
            required = [r for r in node.get("required") or () if isinstance(r, str) and r in props]
            if required:
                out["required"] = required
        elif kind == "array":
            items = node.get("items")
            tuple_items = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else items
            if isinstance(tuple_items, list):  # a tuple: Anthropic has none
                notes.append(
                    "a tuple of: " + ", ".join(str(s.get("type", "any")) for s in tuple_items if isinstance(s, dict))
                )
                items = tuple_items[0] if tuple_items else None
            if isinstance(items, dict) and items:
                out["items"] = self.clean(items, depth + 1)
            if node.get("minItems") in (0, 1):
                out["minItems"] = node["minItems"]
            if node.get("uniqueItems") is True:
                notes.append("items must be unique")
        elif kind == "string":
            fmt = node.get("format")
            if fmt in ANTHROPIC_STRING_FORMATS:
                out["format"] = fmt
            elif isinstance(fmt, str) and fmt:
                notes.append(f"format: {fmt}")
            if isinstance(node.get("pattern"), str):
                notes.append(f"pattern: {node['pattern']}")
        elif kind in ("number", "integer"):
            notes.extend(f"{sign} {node[key]}" for key, sign in _ANTHROPIC_NOTED.items() if _is_number(node.get(key)))
            if _is_number(node.get("multipleOf")):
                notes.append(f"a multiple of {node['multipleOf']}")
        for key, text in _ANTHROPIC_COUNT_NOTES.items():
            if _is_number(node.get(key)) and key not in out:
                notes.append(text.format(node[key]))
        return out


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
    responses_api: bool = False  # has /v1/responses (OpenAI itself; OpenAI-compatible servers mostly not)
    default_max_tokens: int = 0  # anthropic: max_tokens when a translated request set none (anthropic_max_tokens)
    max_tokens_cap: int = 0  # openai: most max_tokens a translated request sends (openai_completion_max_tokens)
    keys: tuple = ()  # every key it was given: each is an account of its pool (api_key is the first)
    weight: float = 1.0  # each account's share of a pool's requests
    timeouts: Timeouts = field(default_factory=Timeouts)
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
        return self.responses_api

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
        """The upstream URL of one operation: chat, completions, embeddings, responses, messages,
        count_tokens, generate, count_gemini, models."""
        key = (operation, model, stream)
        url = self._urls.get(key)
        if url is None:
            url = self._build_url(operation, model, stream)
            if len(self._urls) < 4096 and len(model) <= CACHED_NAME_MAX:
                self._urls[key] = url
        return url

    def _build_url(self, operation: str, model: str, stream: bool) -> str:
        base = self.base_url.rstrip("/")
        if self.flavor == "azure":
            version = self.api_version or "2024-10-21"
            path = {"chat": "chat/completions", "embeddings": "embeddings", "responses": "responses",
                    "completions": "completions"}[operation]  # fmt: skip
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
                "embeddings": "batchEmbedContents",
            }
            return f"{root}/models/{quote(model, safe='.-_')}:{method[operation]}"
        path = {"chat": "chat/completions", "embeddings": "embeddings", "responses": "responses", "models": "models",
                "completions": "completions"}  # fmt: skip
        return f"{base}/{path[operation]}"


def provider_timeouts(cfg: Config, overrides: dict) -> Timeouts:
    """The global upstream_*_timeout values, with a provider's own overrides."""
    return Timeouts(*(overrides.get(kind, getattr(cfg, f"upstream_{kind}_timeout")) for kind in TIMEOUT_KINDS))


def build_providers(cfg: Config) -> dict[str, Provider]:
    reasoning = tuple(g.strip() for g in cfg.reasoning_models.split(",") if g.strip())
    org = {"OpenAI-Organization": cfg.openai_org} if cfg.openai_org else {}
    base = cfg.openai_base_url.rstrip("/")
    official = "api.openai.com" in base
    responses_api = cfg.openai_responses_api == "on" or (cfg.openai_responses_api == "auto" and official)
    providers = {
        "openai": Provider("openai", "openai", base, cfg.openai_api_key, "openai" if official else "compatible",
                           headers=org, key_setting="openai_api_key", reasoning_globs=reasoning,
                           responses_api=responses_api),
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
                                   dict(pc.headers), "", reasoning, pc.responses_api)  # fmt: skip
    for name, provider in providers.items():  # pools: the keys, weight and timeouts of each
        pc = cfg.providers.get(name)
        tuned = cfg.tuning.get(name, {}) if pc is None else {"weight": pc.weight, "timeouts": pc.timeouts}
        provider.models = provider.models or tuned.get("models", [])
        provider.keys = tuple(split_keys(provider.api_key))
        provider.api_key = provider.keys[0] if provider.keys else ""
        provider.weight = tuned.get("weight", 1.0)
        provider.timeouts = provider_timeouts(cfg, tuned.get("timeouts", {}))
        provider.default_max_tokens = cfg.anthropic_max_tokens if provider.protocol == "anthropic" else 0
        provider.max_tokens_cap = cfg.openai_completion_max_tokens if provider.protocol == "openai" else 0
    return providers


def schema_example(schema, budget: int = 2000):
    """A deterministic JSON value valid for a JSON Schema's usual keywords (types, required
    properties, enum/const, local $refs, anyOf/oneOf/allOf, item, length and number bounds,
    common formats): what the loopback model answers for structured output and forced tool
    calls. Every node and property visited spends `budget`, depth stops at 32: a hostile schema
    costs little, and past the bounds the value is null."""
    left = [budget]
    defs = (schema.get("$defs") or schema.get("definitions")) if isinstance(schema, dict) else None
    defs = defs if isinstance(defs, dict) else {}

    def resolved(node):
        ref = node.get("$ref") if isinstance(node, dict) else None
        return defs.get(ref.rsplit("/", 1)[-1]) if isinstance(ref, str) else node

    def value(node, depth: int, refs: tuple):
        left[0] -= 1
        if not isinstance(node, dict) or depth > 32 or left[0] < 0:
            return None
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            return None if name in refs else value(defs.get(name), depth + 1, (*refs, name))
        if isinstance(node.get("enum"), list) and node["enum"]:
            return node["enum"][0]
        if "const" in node:
            return node["const"]
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and branches:
                typed = [b for b in branches[:64] if not (isinstance(b, dict) and b.get("type") in ("null", "NULL"))]
                return value((typed or branches)[0], depth + 1, refs)
        if isinstance(node.get("allOf"), list):
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for branch in map(resolved, node["allOf"][:16]):
                props = branch.get("properties") if isinstance(branch, dict) else None
                if isinstance(props, dict):
                    left[0] -= len(props)
                    merged["properties"] = {**_dict_or_empty(merged.get("properties")), **props}
                    merged["required"] = [
                        *_list_or_empty(merged.get("required")),
                        *_list_or_empty(branch.get("required")),
                    ]
                    merged.setdefault("type", branch.get("type"))
            return value(merged, depth + 1, refs) if left[0] >= 0 else None
        kind = node.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k not in ("null", "NULL")), "null")
        kind = kind.lower() if isinstance(kind, str) else "object" if "properties" in node else "string"
        if kind == "object":
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            names = node.get("required") if isinstance(node.get("required"), list) else list(props)
            return {
                n: value(props[n], depth + 1, refs) for n in names[: max(left[0], 0)] if type(n) is str and n in props
            }
        if kind == "array":
            count = node.get("minItems") if isinstance(node.get("minItems"), int) else 1
            return [value(node.get("items"), depth + 1, refs) for _ in range(max(0, min(count, 8, left[0])))]
        if kind in ("integer", "number"):
            return _example_number(node, kind)
        if kind == "boolean":
            return False
        if kind == "null":
            return None
        text = LOOPBACK_FORMATS.get(node["format"], "loopback") if type(node.get("format")) is str else "loopback"
        length = node.get("minLength") if isinstance(node.get("minLength"), int) else 0
        return text + "x" * max(0, min(length, 1000) - len(text))

    return value(schema, 0, ())


def _example_number(node: dict, kind: str):
    """1, or the smallest whole number the schema's bounds allow (bounds past 1e15 are ignored)."""
    low, high, above = (node.get(k) for k in ("minimum", "maximum", "exclusiveMinimum"))
    number = 1
    if _plain_number(low):
        number = math.ceil(low)
    elif _plain_number(high) and high < 1:
        number = math.floor(high)
    if _plain_number(above) and number <= above:
        number = math.floor(above) + 1
    return number if kind == "integer" else float(number)


def _plain_number(value) -> bool:
    return _is_number(value) and -1e15 < value < 1e15  # NaN fails both comparisons


def _dict_or_empty(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list_or_empty(value) -> list:
    return value if isinstance(value, list) else []


LOOPBACK_FORMATS = {"date-time": "2025-01-01T00:00:00Z", "date": "2025-01-01", "time": "00:00:00",
                    "email": "loopback@example.com", "uri": "https://example.com/", "url": "https://example.com/",
                    "uuid": "00000000-0000-4000-8000-000000000000", "ipv4": "127.0.0.1", "ipv6": "::1"}  # fmt: skip


LOOPBACK_EMBEDDING_DIMENSIONS = 256  # when the client names none
LOOPBACK_MAX_DIMENSIONS = 3072  # text-embedding-3-large's, the most any OpenAI model has
LOOPBACK_MAX_EMBEDDING_VALUES = 65536  # per request: a few milliseconds of hashing, never seconds


class LoopbackModel:
    """The built-in offline model. Deterministic: the same request gives the same answer.

    It echoes the last user text. To make it call a tool (for testing tool flows offline),
    put `[[tool:NAME {"json": "arguments"}]]` in the last user message (arguments optional);
    once a tool result comes back it answers with the result's text. A forced tool choice
    (required, or a named tool) is obeyed with arguments made from the tool's schema, and a
    JSON response format is answered with JSON (a value valid for the schema, when there is
    one), so structured-output clients work offline. Embeddings are a deterministic unit
    vector derived from a hash of each input."""

    TOOL_OPENING = re.compile(r"\[\[tool:([A-Za-z0-9_.:-]{1,128})\s*(\]\]|\{)")
    TOOL_BARE = re.compile(r"\[\[tool:([A-Za-z0-9_.:-]{1,128})\s*\]\]")

    @classmethod
    def tool_directive(cls, text: str) -> tuple[str, str | None] | None:
        """The first `[[tool:NAME {json}]]` (JSON optional) in the text, as (name, json), in linear
        time (one regex with a lazy `.*?` took quadratic time on many unclosed directives)."""
        found = cls.TOOL_OPENING.search(text)
        if found is None:
            return None
        if found.group(2) == "]]":
            return found.group(1), None
        brace = found.end() - 1
        close = text.find("}]]", brace + 1)
        if close >= 0:
            return found.group(1), text[brace : close + 1]
        bare = cls.TOOL_BARE.search(text, found.end())  # no "}]]" after it: only a bare directive can match
        return (bare.group(1), None) if bare else None

    def complete(self, req: Request) -> Response:
        # the latest user turn (clients such as Claude Code put system notes after it)
        last = next((m for m in reversed(req.messages) if m.role == "user"), Message("user", []))
        results = [p for p in last.parts if p.type == "tool_result"]
        user_text = text_of(last.parts)
        directive = self.tool_directive(user_text) if not results else None
        forced = self.forced_tool(req) if not results and not directive else None
        parts: list = []
        stop = "end_turn"
        if (directive or forced) and req.tool_choice != "none":
            if directive:
                name, arguments = directive[0], directive[1] or "{}"
            else:
                name, arguments = forced.name, dumps(schema_example(forced.parameters)).decode()
            digest = hashlib.sha256(user_text.encode("utf-8", "surrogatepass")).hexdigest()[:24]
            parts.append(Part("tool_call", id="call_" + digest, name=name, arguments=arguments))
            stop = "tool_use"
        elif results:
            parts.append(Part("text", text="Tool result received: " + tool_result_text(results[0])[:500]))
        else:
            said = next((p.text for p in reversed(last.parts) if p.type == "text" and p.text.strip()), "")
            shown = said.strip()[:500] or "(no text)"  # the prompt itself, not the notes clients prepend
            text = f"Hello from the tgw loopback model. You said: {shown}"
            parts.append(Part("text", text=self.json_answer(req.response_format, text)))
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
    def forced_tool(req: Request) -> Tool | None:
        """The tool a forced tool_choice names (the first one for 'required'), if the request has it."""
        if req.tool_choice == "required":
            return next((t for t in req.tools if t.kind == "function"), None)
        if req.tool_choice == "tool":
            return next((t for t in req.tools if t.name == req.tool_name), None)
        return None

    @staticmethod
    def json_answer(response_format: dict | None, text: str) -> str:
        """The answer as the response format asks: JSON valid for the schema, a JSON object, or the text."""
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            return dumps(schema_example(schema if isinstance(schema, dict) else {})).decode()
        return dumps({"reply": text}).decode() if kind == "json_object" else text

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
        seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()  # the text is hashed once
        values = []
        counter = 0
        while len(values) < dimensions:
            block = hashlib.sha256(b"%d:%b" % (counter, seed)).digest()
            values.extend((b - 127.5) / 127.5 for b in block)
            counter += 1
        values = values[:dimensions]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [round(v / norm, 6) for v in values]


# ======================================================================================
# 7. Router: model -> (provider, upstream model), aliases, work modes
# ======================================================================================


MODEL_NAME_MAX = 8192  # characters (only names up to CACHED_NAME_MAX are remembered by the caches)


@dataclass(slots=True)
class Route:
    provider: Provider
    model: str  # the model name the upstream sees
    requested: str
    pool: tuple = ()  # every configured provider serving the model (provider first): see section 8


class Router:
    """First matching rule wins. Named providers' `models` globs come first, and every named
    provider whose globs match serves in the model's pool; a route may name a pool itself
    (`gpt-4o=>openai|azure`)."""

    def __init__(self, cfg: Config, providers: dict[str, Provider]):
        self.cfg = cfg
        self.providers = providers
        self.aliases: dict[str, str] = {}  # exact names (later entries win, as in Tokligence)
        self.alias_globs: list[tuple[str, str]] = []  # claude*=>gpt-4o-mini: first match wins
        for alias, target in parse_pairs(cfg.model_aliases, "model_aliases") + cfg.file_aliases:
            if any(c in alias for c in "*?["):
                self.alias_globs.append((alias, target))
            else:
                self.aliases[alias] = target
        # Tokligence's legacy `routes` are its explicit overrides, exact names first; then named
        # providers' own model lists; then model_provider_routes
        legacy = parse_pairs(cfg.routes, "routes")
        legacy.sort(key=lambda rule: any(c in rule[0] for c in "*?["))  # stable: keeps their order otherwise
        self.rules: list[tuple[str, str]] = list(legacy)
        named_start = len(self.rules)
        for provider in providers.values():
            self.rules.extend((glob_, provider.name) for glob_ in provider.models)
        self.named_rules = (named_start, len(self.rules))  # the providers' own globs: all that match share a pool
        main_rules = parse_pairs(cfg.model_provider_routes, "model_provider_routes")
        self.rules.extend(main_rules)
        for key, rules in (("routes", legacy), ("model_provider_routes", main_rules)):
            for pattern, target in rules:
                if any(name.strip() not in providers for name in target.split("|")):
                    raise ConfigError(
                        f"{key}: {pattern}=>{target} names an unknown provider; known: {', '.join(providers)}"
                    )
        # with no provider configured at all, every model is answered by loopback (works offline)
        self.offline = not any(p.configured for p in providers.values() if p.protocol != "loopback")
        self._cache: dict[str, Route] = {}

    def resolve(self, model: str) -> Route:
        route = self._cache.get(model)
        if route is not None:
            return route
        if len(model) > MODEL_NAME_MAX:  # it keys the routing caches
            raise bad_request(f"a model name has at most {MODEL_NAME_MAX} characters, got {len(model)}")
        target = self.aliases.get(model)
        if target is None:
            target = next((t for glob_, t in self.alias_globs if glob_match(glob_, model)), model)
        names = ["loopback"] if self.offline else self._pool_of(target)
        if not names:
            raise GatewayError(
                404, f"model {model!r} matches no route; routes: {self.describe_routes()}", "not_found_error"
            )
        pool = tuple(self.providers[n] for n in names if self.providers[n].configured)
        provider = pool[0] if pool else self.providers[names[0]]
        if not provider.configured:
            setting = provider.key_setting
            raise GatewayError(
                400,
                f"model {model!r} routes to provider {provider.name!r}, which is not configured: "
                f"set {setting} (or TOKLIGENCE_{setting.upper()}) in gateway.ini or the environment",
                "invalid_request_error",
            )
        route = Route(provider, target, model, pool)
        if len(self._cache) < 10000 and len(model) <= CACHED_NAME_MAX:
            self._cache[model] = route
        return route

    def _pool_of(self, target: str) -> list[str]:
        """The names of the providers the first matching rule gives `target` (none: no route)."""
        start, end = self.named_rules
        for i, (pattern, name) in enumerate(self.rules):
            if glob_match(pattern, target):
                if start <= i < end:
                    return list(dict.fromkeys(n for g, n in self.rules[start:end] if glob_match(g, target)))
                return list(dict.fromkeys(n.strip() for n in name.split("|")))
        return []

    def describe_routes(self) -> str:
        return ", ".join(f"{g}=>{p}" for g, p in self.rules)

    def listed_models(self) -> list[tuple[str, str]]:
        """Concrete model names the gateway can serve: (model, provider). Routes written without
        the loopback model (or an alias to a model no route serves) list none of it."""
        seen: dict[str, str] = {"loopback": "loopback"} if self.provider_of("loopback") == "loopback" else {}
        for alias, target in self.aliases.items():
            if (provider := self.provider_of(target)) != "unknown":
                seen.setdefault(alias, provider)
        if not self.offline:
            for pattern, provider in self.rules:
                provider = provider.split("|")[0].strip()
                if not any(c in pattern for c in "*?[") and self.providers[provider].configured:
                    seen.setdefault(pattern, provider)
        return list(seen.items())

    def provider_of(self, model: str) -> str:
        try:
            return self.resolve(model).provider.name
        except GatewayError:
            return "unknown"


# ---- model lists: what each configured provider really serves ------------------------------

MODEL_LIST_TTL = 600.0  # seconds a provider's list is served before it is fetched again (in the background)
MODEL_LIST_RETRY = 60.0  # after a failed fetch
MODEL_LIST_TIMEOUT = 5.0  # one provider's fetch, connection and body
MODEL_LIST_FIRST_WAIT = 2.0  # the most a model-list call waits for a provider never fetched yet
MODEL_LIST_MAX = 2000  # models kept per provider
MODEL_LIST_MAX_BYTES = 8 * 1024 * 1024
MODEL_LIST_PARSE_INLINE = 64 * 1024  # a longer answer is parsed in a thread
MODEL_ID_MAX = 256  # characters of a listed model id (longer ones are skipped) and of a display name (cut)
MODEL_LIST_QUERY = {"anthropic": "?limit=1000", "gemini": "?pageSize=1000"}  # one page holds them all


@dataclass(slots=True)
class ListedModel:
    id: str
    provider: str
    display_name: str = ""
    created: int = 0
    created_at: str = ""  # Anthropic's (an ISO date)
    gemini: dict | None = None  # the limits and methods a Gemini provider gave for it


class ModelCatalog:
    """The models /v1/models (and the Anthropic and Gemini lists) show: loopback, aliases and the
    routes' concrete names, then what each configured provider's own models endpoint lists and
    the routes would send back to it. Fetched through the UpstreamPool, bounded in time and size,
    cached for MODEL_LIST_TTL and refreshed in the background: a list call never waits, except
    the first one, at most MODEL_LIST_FIRST_WAIT. A provider that fails is logged and skipped."""

    def __init__(self, router: Router, pool, anthropic_version: str):
        self.router = router
        self.pool = pool
        self.anthropic_version = anthropic_version
        self.lists: dict[str, list[ListedModel]] = {}
        self.next_fetch: dict[str, float] = {}  # provider -> when its list is due again
        self.refreshing: asyncio.Task | None = None
        self._headers: dict[tuple, dict] = {}  # (provider, key index) -> headers

    def sources(self) -> list[Provider]:
        if self.router.offline:
            return []
        return [p for p in self.router.providers.values()
                if p.protocol != "loopback" and p.flavor != "azure" and p.configured]  # fmt: skip

    async def models(self) -> list[ListedModel]:
        sources = self.sources()
        now = time.monotonic()
        due = [p for p in sources if self.next_fetch.get(p.name, 0.0) <= now]
        if due and (self.refreshing is None or self.refreshing.done()):
            self.refreshing = asyncio.get_running_loop().create_task(self.refresh(due))
        if self.refreshing is not None and any(p.name not in self.next_fetch for p in sources):
            await asyncio.wait({self.refreshing}, timeout=MODEL_LIST_FIRST_WAIT)  # only the very first time
        listed = {m: ListedModel(m, p) for m, p in self.router.listed_models()}
        for provider in sources:
            for model in self.lists.get(provider.name, ()):
                listed.setdefault(model.id, model)
        return list(listed.values())

    async def refresh(self, providers: list) -> None:
        await asyncio.gather(*(self.fetch(p) for p in providers))

    async def fetch(self, provider: Provider) -> None:
        try:
            models = await asyncio.wait_for(self._fetch(provider), MODEL_LIST_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: logged, the list stays as it was
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
            log.warning("model list of provider %s not fetched: %s", provider.name, redact(reason)[:300])
            self.next_fetch[provider.name] = time.monotonic() + MODEL_LIST_RETRY
            return
        self.lists[provider.name] = models
        self.next_fetch[provider.name] = time.monotonic() + MODEL_LIST_TTL

    async def _fetch(self, provider: Provider) -> list[ListedModel]:
        url = provider.url("models") + MODEL_LIST_QUERY.get(provider.protocol, "")
        for index in range(max(len(provider.keys), 1)):  # each key of its pool in turn: one revoked is not all
            try:
                resp = await self.pool.request("GET", url, self.headers(provider, index))
                data = await resp.read(MODEL_LIST_MAX_BYTES)
            except GatewayError:
                if index + 1 >= len(provider.keys):
                    raise
                continue
            if resp.status < 400:
                break
            if resp.status not in FAILOVER_STATUSES or index + 1 >= len(provider.keys):
                raise OPENAI_CODEC.decode_error(resp.status, data)
        # a long list (OpenRouter's is megabytes) is parsed off the event loop
        body = loads(data) if len(data) < MODEL_LIST_PARSE_INLINE else await asyncio.to_thread(loads, data)
        items = body.get("models" if provider.protocol == "gemini" else "data") if isinstance(body, dict) else None
        models = []
        for item in items[:MODEL_LIST_MAX] if isinstance(items, list) else ():
            model = self._listed(provider, item) if isinstance(item, dict) else None
            if model is not None and self.router.provider_of(model.id) == provider.name:  # only what routes here
                models.append(model)
        return models

    def headers(self, provider: Provider, index: int = 0) -> dict:
        """The headers of a model list request with the provider's key number `index`."""
        headers = self._headers.get((provider.name, index))
        if headers is None:
            keyed = provider if index == 0 else replace(provider, api_key=provider.keys[index], _urls={}, _auth=None)
            headers = dict(keyed.auth_headers())
            if provider.protocol == "anthropic":
                headers["anthropic-version"] = self.anthropic_version
            self._headers[(provider.name, index)] = headers
        return headers

    @staticmethod
    def _listed(provider: Provider, item: dict) -> ListedModel | None:
        if provider.protocol == "gemini":
            name = item.get("name")
            methods = item.get("supportedGenerationMethods")
            if not isinstance(name, str) or (isinstance(methods, list) and "generateContent" not in methods):
                return None  # embedding and other models a chat client cannot use
            model_id, display = name.removeprefix("models/"), item.get("displayName")
        else:
            model_id, display = item.get("id"), item.get("display_name")
        if not isinstance(model_id, str) or not model_id or len(model_id) > MODEL_ID_MAX:
            return None
        display = display[:MODEL_ID_MAX] if isinstance(display, str) else ""
        if provider.protocol == "gemini":
            info = {k: item[k] for k in ("inputTokenLimit", "outputTokenLimit") if type(item.get(k)) is int}
            return ListedModel(model_id, provider.name, display, gemini=info)
        created, created_at = item.get("created"), item.get("created_at")
        return ListedModel(model_id, provider.name, display, created if type(created) is int else 0,
                           created_at[:40] if isinstance(created_at, str) else "")  # fmt: skip

    def close(self) -> None:
        if self.refreshing is not None:
            self.refreshing.cancel()


# ======================================================================================
# 8. Pools and breakers: upstream accounts, weights, health, circuit breakers, failover chains
# ======================================================================================
#
# An account is one key of one provider (`openai_api_key = k1, k2` makes openai#1 and openai#2).
# A model's pool is every account of every provider serving it (Route.pool); its chain is that
# pool, then the pools of its model_fallbacks in the order listed. Gateway.send_upstream walks
# the chain for every lane, and is the one place that decides retries and failover:
#   - the next account not tried yet and not cooling down, pool by pool: by weight (smooth
#     weighted round robin), an account with fewer requests in flight per weight first;
#   - then, while upstream_retries last, an account already tried whose failure allows asking
#     it again (a failed connection, a 408/429/5xx/529), after a backoff or its Retry-After.
# Breaker per account:
#   closed --breaker_failures in a row--> open --cooldown--> half-open (one trial request)
#   half-open --success--> closed;  half-open --failure--> open, the cooldown doubled (up to
#   breaker_cooldown_max). A 429 cools the account for its Retry-After instead (without one the
#   request just moves on) and counts no failure. Failures: connect errors, timeouts, 5xx, 529,
#   401/403. A request that finds every account of its chain cooling down is answered at once
#   (429 or 503 with Retry-After): a breaker exists not to hammer an upstream that is down.

# answers that count against the account: every 5xx (a proxy's 520-530 too) but the request's own (501 not
# implemented, 505 HTTP version), a timeout, and 401/403 (the key this gateway holds)
BREAKER_STATUSES = frozenset((401, 403, 408, *range(500, 600))) - {501, 505}
FAILOVER_STATUSES = BREAKER_STATUSES | {429}  # answers after which the next account is tried
ASK_AGAIN_STATUSES = FAILOVER_STATUSES - {401, 403}  # answers after which the same account may be asked again
# errors a stream may open with, before any content, that still fail over (overloaded, rate limited, api
# error): the upstream said no. A broken or garbled stream is no such answer.
STREAM_FAILOVER_STATUSES = frozenset((429, 500, 503, 529))
HOLD_LIMIT = 256 * 1024  # bytes of a passthrough stream's opening held back, at most
MAX_RETRY_WAIT = 30.0  # longest a request waits for a backoff or a Retry-After before giving up


@dataclass(slots=True)
class BreakerSettings:
    failures: int = 5
    cooldown: float = 5.0
    cooldown_max: float = 300.0


class Account:
    """One upstream key: its breaker, what it has in flight and its counters (for /health and
    the metrics). `provider` is a Provider holding this one key."""

    __slots__ = ("name", "provider", "weight", "settings", "in_flight", "credit", "state", "until", "failures",
                 "opens", "trial", "requests", "errors", "last_status", "last_error", "_tags")  # fmt: skip

    def __init__(self, name: str, provider: Provider, settings: BreakerSettings):
        self.name = name
        self.provider = provider
        self.weight = provider.weight
        self.settings = settings
        self.in_flight = 0
        self.credit = 0.0  # smooth weighted round robin
        self.state = "closed"  # closed | open | cooling (a 429's Retry-After)
        self.until = 0.0  # monotonic end of the cooldown; 0 while closed
        self.failures = 0  # consecutive
        self.opens = 0  # times opened in a row (the cooldown doubles each time)
        self.trial = False  # a half-open breaker's one trial request is in flight
        self.requests = 0
        self.errors = 0
        self.last_status = 0
        self.last_error = ""
        self._tags: dict[str, str] = {}

    def ready(self, now: float) -> bool:
        """May a request go to this account now?"""
        until = self.until
        return not until or (now >= until and not self.trial)

    def begin(self, now: float) -> bool:
        """A request goes out; True when it is a half-open breaker's trial."""
        self.in_flight += 1
        self.requests += 1
        if self.until:  # a cooldown is over: a 429's simply ends; an open breaker lets this one through
            if self.state == "cooling":
                self.state, self.until = "closed", 0.0
            else:
                self.trial = True
                return True
        return False

    def end(self, trial: bool) -> None:
        """The upstream exchange is over (its answer read, or abandoned)."""
        self.in_flight -= 1
        if trial:
            self.trial = False

    def succeeded(self) -> None:
        if self.failures or self.until:
            self.failures = self.opens = 0
            self.state, self.until = "closed", 0.0

    def failed(self, status: int, message: str, now: float, trial: bool) -> None:
        self._count_error(status, message)
        self.failures += 1
        if trial:  # the half-open trial failed: open again, for longer
            self._open(now, self.opens + 1)
        elif self.state != "open" and self.failures >= self.settings.failures:
            self._open(now, 1)

    def rate_limited(self, retry_after: float | None, message: str, now: float, trial: bool) -> None:
        self._count_error(429, message)
        if retry_after is None or (self.state == "open" and not trial):
            return  # no time given: only this request moves on; or an older request's answer: the breaker stays
        self.state, self.until = "cooling", now + min(retry_after, self.settings.cooldown_max)

    def _open(self, now: float, opens: int) -> None:
        self.opens = min(opens, 32)
        cooldown = min(self.settings.cooldown * 2 ** (self.opens - 1), self.settings.cooldown_max)
        self.state, self.until = "open", now + cooldown
        log.warning("account %s: breaker open for %gs after %d failures (%s)", self.name, cooldown, self.failures,
                    self.last_error[:200])  # fmt: skip

    def _count_error(self, status: int, message: str) -> None:
        self.errors += 1
        self.last_status, self.last_error = status, redact(message[:300])

    def status(self, now: float) -> str:
        if not self.until:
            return "closed"
        if self.state == "cooling":
            return "cooling" if now < self.until else "closed"
        return "open" if now < self.until else "half_open"

    def tags(self, model: str, attempts: int) -> str:
        """The x-tgw-provider, x-tgw-model and x-tgw-attempts header lines of an answer from this
        account (the usual first attempt's made once per model)."""
        lines = self._tags.get(model)
        if lines is None:
            if len(self._tags) >= 256:  # model names are the client's to choose
                self._tags.clear()
            lines = self._tags[model] = (
                f"x-tgw-provider: {header_safe(self.provider.name)}\r\nx-tgw-model: {header_safe(model[:200])}\r\n"
                "x-tgw-attempts: 1\r\n"
            )
        return lines if attempts == 1 else f"{lines[:-3]}{attempts}\r\n"

    def describe(self, now: float) -> dict:
        """This account in /health (and `tgw status`)."""
        return {
            "provider": self.provider.name, "state": self.status(now), "weight": self.weight,
            "in_flight": self.in_flight, "consecutive_failures": self.failures,
            "cooldown_left_s": round(max(self.until - now, 0.0), 1), "requests": self.requests, "errors": self.errors,
            "last_status": self.last_status, "last_error": self.last_error,
        }  # fmt: skip


def header_safe(text: str) -> str:
    """A value fit for a response header: printable ASCII as is, anything else percent-encoded
    (a model name is the client's and could carry CR LF)."""
    return text if text.isascii() and text.isprintable() else quote(text, safe=" /:@+")


@dataclass(slots=True)
class Pool:
    """The accounts serving one model, tried in weighted turn."""

    model: str  # the model name these accounts are sent
    accounts: tuple

    def pick(self, now: float, tried: list) -> Account | None:
        """The account to ask next for this model, of those not `tried` ((account, model) pairs)."""
        accounts = self.accounts
        if len(accounts) == 1:  # the usual pool: no arithmetic, and a closed breaker asks nothing more
            account = accounts[0]
            if (account.until and not account.ready(now)) or (tried and (account, self.model) in tried):
                return None
            return account
        best = None
        best_load = total = 0.0
        for account in accounts:
            if (account.until and not account.ready(now)) or (tried and (account, self.model) in tried):
                continue
            weight = account.weight
            account.credit += weight
            total += weight
            load = account.in_flight / weight
            if best is None or load < best_load or (load == best_load and account.credit > best.credit):
                best, best_load = account, load
        if best is not None:
            best.credit -= total
        return best


class Walk:
    """One request's way through its chain: what it tried, what may be asked again, what is left."""

    __slots__ = ("chain", "tried", "again", "retries", "asked", "wait", "end_by", "_last_error", "previous", "skipped",
                 "unable")  # fmt: skip

    def __init__(self, chain: tuple, retries: int):
        self.chain = chain
        self.tried: list = []  # (account, model): a fallback model may go to an account tried already
        self.again: list = []  # [account, model, not before (monotonic)] that may be asked again
        self.retries = retries
        self.asked = 0  # accounts asked again so far (the backoff doubles each time)
        self.wait = 0.0  # when next() found nothing: seconds until something may be ready (0: nothing will)
        self.end_by = 0.0  # the request's deadline, set by its first attempt
        self._last_error: GatewayError | None = None
        self.previous = ""  # the provider of the last attempt
        self.skipped: GatewayError | None = None  # why the first account that could not take the request could not
        self.unable: list = []  # the accounts that could not take it (another protocol, work_mode)

    @property
    def last_error(self) -> GatewayError | None:
        """The error the client gets if nothing answers. Kept without its traceback: raised
        in the attempt loop, it would hold that loop's frame (and the request) in a cycle that
        outlives a request which then succeeds (see release_frames)."""
        return self._last_error

    @last_error.setter
    def last_error(self, err: GatewayError | None) -> None:
        self._last_error = err if err is None else err.with_traceback(None)

    def next(self, now: float) -> tuple | None:
        """(account, model, asked again?) to try now, or None (then `wait` says how long until
        one may be, 0 when none will)."""
        for pool in self.chain:
            account = pool.pick(now, self.tried)
            if account is not None:
                self.tried.append((account, pool.model))
                return account, pool.model, False
        self.wait = 0.0
        if self.retries <= 0 or not self.again:
            return None
        best = None
        for entry in self.again:
            account = entry[0]
            if account.trial:  # another request's half-open trial
                continue
            at = max(entry[2], account.until)
            if best is None or at < best[1]:
                best = (entry, at)
        if best is None:
            return None
        entry, at = best
        if at > now:
            self.wait = at - now
            return None
        self.retries -= 1
        self.asked += 1
        self.again.remove(entry)
        return entry[0], entry[1], True

    def failed(self, account: Account, model: str, now: float, ask_again: bool, retry_after: float | None = None):
        """An attempt failed; the account may be asked again after a backoff (or the answer's Retry-After)."""
        if ask_again and self.retries > 0:
            self.again.append([account, model, now + max(0.25 * 2 ** min(self.asked, 5), retry_after or 0.0)])

    def answered(self, account: Account, model: str, err: GatewayError, trial: bool) -> bool:
        """An upstream answered `err` (its status, or an error a stream opened with): count it
        against the account, and say whether another attempt may follow."""
        now = time.monotonic()
        if err.status == 429:
            account.rate_limited(err.retry_after, err.message, now, trial)
        elif err.status in BREAKER_STATUSES:
            account.failed(err.status, err.message, now, trial)
        else:
            account.succeeded()  # it answered: the request is what failed, and is not tried elsewhere
            return False
        self.failed(account, model, now, err.status in ASK_AGAIN_STATUSES, err.retry_after)
        self.last_error = err
        return True

    def cannot_take(self, account: Account, err: GatewayError) -> None:
        """`account` cannot take this request at all (its provider speaks another protocol and
        translation is not allowed or not possible): the next one may."""
        self.skipped = self.skipped or err.with_traceback(None)
        self.unable.append(account)

    def refusal(self, now: float) -> GatewayError:
        """The error when nothing answered and no upstream error was met: a 429/503 while an
        account that could take the request cools down, else why none could take it."""
        cooling = any(a.until > now and a not in self.unable for pool in self.chain for a in pool.accounts)
        return self.unavailable(now) if cooling or self.skipped is None else self.skipped

    def unavailable(self, now: float) -> GatewayError:
        """The error when no account of the chain could be asked: every one cooling down."""
        accounts = [a for pool in self.chain for a in pool.accounts]
        waits = [a.until - now for a in accounts if a.until > now]
        retry_after = math.ceil(min(waits)) if waits else 1
        limited = all(a.state == "cooling" for a in accounts if a.until)
        last = next((a for a in accounts if a.last_error), None)
        words = f"{last.last_error} " if last is not None else ""
        if last is not None and last.last_status == 401:  # its words are about the gateway's own key
            words = "the upstream refused the API key this gateway holds for it (HTTP 401) "
        model = self.chain[0].model if self.chain else "this model"
        return GatewayError(
            429 if limited else 503,
            f"{words}(tgw: every upstream account for {model} is cooling down; retry in {retry_after} s)",
            retry_after=retry_after,
        )


class Pools:
    """Every account, and every model's chain of pools. Built from a configuration; `rebuild`
    takes a new one (live reload) and keeps the state of the accounts it still has."""

    def __init__(self, cfg: Config, providers: dict[str, Provider], router: Router):
        self.accounts: dict[str, Account] = {}
        self.settings = BreakerSettings()
        self.attempts = 0  # upstream requests sent, all accounts
        self.retries = 0  # ... of which to an account this request had tried already
        self.failovers = 0  # ... of which to another account or fallback model than the last attempt's
        self.retired_attempts: dict[str, int] = {}  # provider -> requests of accounts a reload dropped
        self.rebuild(cfg, providers, router)

    @staticmethod
    def fallbacks_of(cfg: Config, router: Router) -> list:
        """model_fallbacks as (pattern, model) pairs, each model checked to route somewhere real."""
        fallbacks = [] if router.offline else parse_pairs(cfg.model_fallbacks, "model_fallbacks")
        for pattern, model in fallbacks:
            try:
                route = router.resolve(model)
            except GatewayError as err:
                raise ConfigError(f"model_fallbacks: {pattern}=>{model}: {err.message}") from None
            if route.provider.protocol == "loopback":
                raise ConfigError(f"model_fallbacks: {pattern}=>{model}: the loopback model cannot be a fallback")
        return fallbacks

    def rebuild(self, cfg: Config, providers: dict[str, Provider], router: Router) -> None:
        fallbacks = self.fallbacks_of(cfg, router)  # (a ConfigError changes nothing)
        self.settings.failures = cfg.breaker_failures
        self.settings.cooldown = cfg.breaker_cooldown
        self.settings.cooldown_max = cfg.breaker_cooldown_max
        self.router, self.fallbacks = router, fallbacks
        old = {(a.provider.name, a.provider.base_url, a.provider.api_key): a for a in self.accounts.values()}
        self.accounts = {}
        self.of_provider: dict[str, tuple] = {}
        for provider in providers.values():
            if provider.protocol == "loopback" or not provider.configured:
                continue
            keys = provider.keys or ("",)
            members = []
            for number, key in enumerate(keys, 1):
                name = provider.name if len(keys) == 1 else f"{provider.name}#{number}"
                one = provider if len(keys) == 1 else replace(provider, api_key=key, keys=(key,), _urls={}, _auth=None)
                account = old.get((provider.name, provider.base_url, key))
                if account is None:
                    account = Account(name, one, self.settings)
                account.name, account.provider, account.weight = name, one, provider.weight
                account._tags.clear()
                self.accounts[name] = account
                members.append(account)
            self.of_provider[provider.name] = tuple(members)
        kept = {id(account) for account in self.accounts.values()}
        for account in old.values():  # what they sent still counts in the metrics
            if id(account) not in kept:
                name = account.provider.name
                self.retired_attempts[name] = self.retired_attempts.get(name, 0) + account.requests
        self._chains: dict[tuple, tuple] = {}

    def chain(self, route: Route, fallbacks: bool = True) -> tuple:
        """The pools a request for `route` may try, in order: its own, then its fallbacks'."""
        key = (route.requested, fallbacks)
        chain = self._chains.get(key)
        if chain is None:
            chain = [Pool(route.model, self.pool_accounts(route))]
            if fallbacks:
                seen = {route.model}
                for pattern, model in self.fallbacks:
                    if model not in seen and (glob_match(pattern, route.requested) or glob_match(pattern, route.model)):
                        seen.add(model)
                        fallback = self.router.resolve(model)
                        chain.append(Pool(fallback.model, self.pool_accounts(fallback)))
            chain = tuple(pool for pool in chain if pool.accounts)
            if len(self._chains) >= 10000:
                self._chains.clear()
            if len(route.requested) <= CACHED_NAME_MAX:
                self._chains[key] = chain
        return chain

    def pool_accounts(self, route: Route) -> tuple:
        return tuple(a for provider in route.pool or (route.provider,) for a in self.of_provider.get(provider.name, ()))

    def describe(self) -> dict:
        now = time.monotonic()
        return {name: account.describe(now) for name, account in self.accounts.items()}

    BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2, "cooling": 2}

    def attempts_by_provider(self) -> list:
        """((provider,), upstream requests made, retries included) for /metrics: the accounts count them."""
        totals = dict(self.retired_attempts)
        for account in list(self.accounts.values()):
            name = account.provider.name
            totals[name] = totals.get(name, 0) + account.requests
        return [((name,), count) for name, count in totals.items() if count]

    def breaker_states(self) -> list:
        """((provider, account), 0 closed | 1 half-open | 2 open or cooling down) per account: /metrics."""
        now = time.monotonic()
        gauge = self.BREAKER_GAUGE
        return [((a.provider.name, name), gauge[a.status(now)]) for name, a in self.accounts.items()]


# ======================================================================================
# 9. Ledger: one row per request, written by one background thread
# ======================================================================================

LEDGER_COLUMNS = (
    "ts", "request_id", "api_key_id", "user", "client_protocol", "endpoint", "lane", "provider", "model_requested",
    "model_upstream", "stream", "status", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "cost_usd", "latency_ms", "ttft_ms", "error", "attempts", "account", "key_id", "user_id",
)  # fmt: skip
LEDGER_MIGRATIONS = [
    # version 1
    """CREATE TABLE IF NOT EXISTS requests (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL, api_key_id TEXT, user TEXT,
        client_protocol TEXT, endpoint TEXT, lane TEXT, provider TEXT, model_requested TEXT, model_upstream TEXT,
        stream INTEGER, status INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, cached_tokens INTEGER,
        reasoning_tokens INTEGER, cost_usd REAL, latency_ms REAL, ttft_ms REAL, error TEXT);
    CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);""",
    # version 2: Responses API state, for previous_response_id across restarts
    """CREATE TABLE IF NOT EXISTS responses (
        id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT, input TEXT NOT NULL, response TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS responses_created ON responses(created);""",
    # version 3: failover (section 8): upstream requests made, and the account that answered (or failed last)
    """ALTER TABLE requests ADD COLUMN attempts INTEGER;
    ALTER TABLE requests ADD COLUMN account TEXT;""",
    # version 4: users and API keys (section 10), who made each request, who owns each stored response.
    # One transaction, so a file is either at version 3 or wholly at version 4.
    """BEGIN;
    CREATE TABLE users (
        id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL, display_name TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL DEFAULT 'user', status TEXT NOT NULL DEFAULT 'active', budget_usd REAL, budget_tokens INTEGER,
        budget_period TEXT NOT NULL DEFAULT 'month', rpm INTEGER, tpm INTEGER, created_at REAL NOT NULL,
        updated_at REAL NOT NULL, deleted_at REAL);
    CREATE UNIQUE INDEX users_email ON users(email) WHERE deleted_at IS NULL;
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL REFERENCES users(id), name TEXT NOT NULL DEFAULT '',
        key_hash TEXT NOT NULL UNIQUE, key_prefix TEXT NOT NULL, models TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'active', expires_at REAL, budget_usd REAL, budget_tokens INTEGER,
        budget_period TEXT NOT NULL DEFAULT 'month', rpm INTEGER, tpm INTEGER, created_at REAL NOT NULL,
        updated_at REAL NOT NULL, last_used_at REAL, deleted_at REAL);
    CREATE INDEX api_keys_user ON api_keys(user_id);
    CREATE TABLE identity_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
    INSERT INTO identity_version VALUES (1, 0);
    CREATE TRIGGER users_inserted AFTER INSERT ON users BEGIN UPDATE identity_version SET version = version + 1; END;
    CREATE TRIGGER users_updated AFTER UPDATE ON users BEGIN UPDATE identity_version SET version = version + 1; END;
    CREATE TRIGGER users_deleted AFTER DELETE ON users BEGIN UPDATE identity_version SET version = version + 1; END;
    CREATE TRIGGER api_keys_inserted AFTER INSERT ON api_keys
        BEGIN UPDATE identity_version SET version = version + 1; END;
    CREATE TRIGGER api_keys_updated AFTER UPDATE OF user_id, name, key_hash, key_prefix, models, status, expires_at,
        budget_usd, budget_tokens, budget_period, rpm, tpm, deleted_at ON api_keys
        BEGIN UPDATE identity_version SET version = version + 1; END;
    CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys
        BEGIN UPDATE identity_version SET version = version + 1; END;
    ALTER TABLE requests ADD COLUMN key_id INTEGER;
    ALTER TABLE requests ADD COLUMN user_id INTEGER;
    CREATE INDEX requests_key ON requests(key_id, ts) WHERE key_id IS NOT NULL;
    ALTER TABLE responses ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    PRAGMA user_version = 4;
    COMMIT;""",
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
    CACHE_MAX = 4096  # distinct models priced before the cache starts over

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
            if len(self._cache) >= self.CACHE_MAX:  # model names are the clients' to choose
                self._cache.clear()
            if len(model) <= CACHED_NAME_MAX:
                self._cache[model] = price
        if price is None:
            return 0.0
        fresh = max(usage.input_tokens - usage.cached_tokens, 0)
        total = fresh * price[0] + usage.cached_tokens * price[2] + usage.output_tokens * price[1]
        return round(total * 1e6) / 1e12  # USD to 12 decimals (round(x, 12) costs ~15x more per call)


# sqlite3 binds int, float and str directly but looks any other value up as an adapter, and for
# None (a NULL: the ttft of a whole answer, the key of a keyless call) finds none only after two
# formatted AttributeErrors: a few microseconds per NULL per row on the writer thread, which holds
# the GIL meanwhile. An adapter that returns None itself binds it at once.
sqlite3.register_adapter(type(None), {}.get)  # (a C function that answers None for None: no Python frame per NULL)


def open_ledger_db(path: str, busy_timeout: float = 30.0) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(LEDGER_MIGRATIONS[version:], version + 1):
        db.executescript(script)
        db.execute(f"PRAGMA user_version={number}")
    db.commit()
    return db


# ---- what sqlite may be given -----------------------------------------------------------
#
# A row holds numbers and text an upstream or a client chose. Before sqlite sees a batch, each
# column is checked in a few C-level passes (types, range, encodability, secrets); only a column
# that fails is repaired value by value: counts to int64, reals finite, text encodable, bounded
# and redacted. What still cannot be written is stored as a dropped-row error, never lost quietly.

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
LEDGER_TEXT_LIMIT = 4096  # characters kept of one text value (model names and errors are far shorter)
# sqlite's primary result codes that are the file's fault, not the row's (busy, locked, nomem,
# readonly, ioerr, full, cantopen, protocol): the rows stay queued and the write is retried
LEDGER_TRANSIENT_CODES = {5, 6, 7, 8, 10, 13, 14, 15}
LEDGER_TRANSIENT_WORDS = ("locked", "busy", "disk", "full", "readonly", "unable to open", "i/o")


def ledger_int(value):
    if type(value) is not int:
        if isinstance(value, float):
            value = int(value) if math.isfinite(value) else None
        elif isinstance(value, int):  # bool
            value = int(value)
        elif isinstance(value, str) and len(value) < 40:
            try:
                value = int(float(value.strip()))
            except (ValueError, OverflowError):
                return None
        else:
            return None
    return None if value is None else min(max(value, INT64_MIN), INT64_MAX)


def ledger_real(value):
    if type(value) is not float:
        if value is None or (isinstance(value, str) and len(value) > 40):
            return None
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            return None
    return value if math.isfinite(value) else None


def ledger_text(value):
    if value is None:
        return None
    if not isinstance(value, str):
        value = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    return redact(encodable(value[:LEDGER_TEXT_LIMIT]))


def encodable(text: str) -> str:
    """Text sqlite can store: lone surrogates (which UTF-8 cannot encode) kept visible as \\udxxx."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def ledger_any(value):
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, int):
        return ledger_int(value)
    if isinstance(value, float):
        return ledger_real(value)
    return ledger_text(value)


LEDGER_REPAIRS = {"INTEGER": ledger_int, "REAL": ledger_real, "TEXT": ledger_text, "ANY": ledger_any}


def column_kind(declared: str) -> str:
    """sqlite's type affinity of a declared column type."""
    declared = declared.upper()
    if "INT" in declared:
        return "INTEGER"
    if any(word in declared for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if any(word in declared for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "ANY"


def column_fits(values, kind: str) -> bool:
    """Every value of one column (or of several of one kind) can go to sqlite as it is: one or two
    C-level passes over the values (sums for numbers; the distinct texts joined once), no Python
    code per value."""
    if kind == "INTEGER":  # the sum of magnitudes stays an int within int64 only if every value does
        try:
            total = sum(map(abs, filter(None, values)))
        except TypeError:
            return False
        return type(total) is int and total <= INT64_MAX
    if kind == "REAL":
        try:
            return math.isfinite(sum(filter(None, values), 0.0))
        except (TypeError, OverflowError):
            return False
    if kind == "TEXT":  # a column repeats a few texts (provider, model, lane): each is checked once
        distinct = set(values)
        distinct.discard(None)
        if not set(map(type, distinct)) <= {str}:
            return False
        joined = "\0".join(distinct)
        if not joined.isascii():
            try:
                joined.encode()
            except UnicodeEncodeError:  # a lone surrogate
                return False
        if len(joined) > LEDGER_TEXT_LIMIT and max(map(len, distinct)) > LEDGER_TEXT_LIMIT:
            return False
        return not redact.found_in(joined)
    return all(ledger_any(v) is v for v in values)


def sanitise_rows(rows: list, kinds: tuple) -> list:
    """The rows with every value fit for its column (see above); the same list when all fit."""
    if not rows:
        return rows
    if set(map(len, rows)) != {len(kinds)}:  # a bug upstream of here: that row fails alone
        return [sanitise_rows([row], kinds)[0] if len(row) == len(kinds) else row for row in rows]
    columns = list(zip(*rows, strict=True))
    repaired = False
    for kind, indices in column_groups(kinds):
        if column_fits(itertools.chain.from_iterable([columns[i] for i in indices]), kind):
            continue  # the usual batch: one check per kind of column (a batch of one row costs that much less)
        for index in indices:
            if not column_fits(columns[index], kind):
                columns[index] = tuple(map(LEDGER_REPAIRS[kind], columns[index]))
                repaired = True
    return list(zip(*columns, strict=True)) if repaired else rows


@functools.lru_cache(maxsize=8)
def column_groups(kinds: tuple) -> tuple:
    """((kind, the indices of the columns of that kind), ...)."""
    return tuple((kind, tuple(i for i, k in enumerate(kinds) if k == kind)) for kind in dict.fromkeys(kinds))


def is_transient_db_error(exc: BaseException) -> bool:
    """A failure of the file (locked, full, unwritable) rather than of the rows being written."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return (code & 0xFF) in LEDGER_TRANSIENT_CODES
    return any(word in str(exc).lower() for word in LEDGER_TRANSIENT_WORDS)


class Ledger:
    """Rows go into an in-memory deque; one writer thread inserts them in batches, one commit
    per batch. The event loop never touches sqlite.

    The writer cannot die or stick on what it is given: rows are sanitised first; a batch that
    still fails is split until the bad row is alone, and that row is stored as a dropped-row
    error (counted in `failed`, logged at most once a minute). A failure of the file itself
    (locked, disk full) keeps every row queued and retries with a growing pause; requests then
    wait for room (`wait_for_room`, backpressure without blocking the event loop). Should the
    thread end anyway, `record()` starts a new one. close() drains, within a deadline."""

    LINGER = 0.05  # seconds the writer lets a batch gather
    CHUNK = 256  # most rows per INSERT statement (22 columns x 256 rows stays under sqlite's variable limit)
    BUSY_TIMEOUT = 5.0  # seconds sqlite waits on a lock before the writer backs off (and sees a shutdown)
    RETRY_MAX = 5.0  # longest pause between retries of a failing write
    LOG_EVERY = 60.0  # seconds between repeated log lines about the same trouble
    ROOM_WAIT = 30.0  # seconds a request waits for room in a full queue before a 503

    def __init__(self, path: str, queue_size: int = 10000):
        self.path = str(Path(path).expanduser()) if path != ":memory:" else path
        self.db = open_ledger_db(self.path, self.BUSY_TIMEOUT)
        declared = {row[1]: row[2] for row in self.db.execute("PRAGMA table_info(requests)")}
        self.kinds = tuple(column_kind(declared.get(name, "")) for name in LEDGER_COLUMNS)
        self.pending: deque = deque()  # request rows (tuples) and other writes ((sql, params) lists)
        self.queue_size = queue_size
        self._insert_sql: dict[int, str] = {}
        self.written = 0
        self.failed = 0  # rows whose content could not be stored (each kept as a dropped-row error)
        self.restarts = 0
        self.failing_since = 0.0  # when the current run of failed writes began (0: writing fine)
        self.last_error = ""
        self.busy = False
        self.inflight = 0  # items of the batch being written
        self.stopping = False
        self.closed = False
        self.stop_deadline = 0.0
        self.wake = threading.Event()
        self._next_log = {"drop": 0.0, "fail": 0.0}
        self._unlogged_drops = 0
        self._revived_at = 0.0
        self.alive = False
        self._start_writer()

    # -- the event loop's side
    def record(self, row: tuple) -> None:
        """Queue one request row (called on the event loop: no I/O here). Never refuses a row:
        callers wait for room before they start (see wait_for_room)."""
        self.pending.append(row)
        if not self.alive:
            self._revive()

    def write_later(self, sql: str, params: tuple) -> None:
        """Queue any other write (stored responses), in order with the request rows."""
        self.pending.append([sql, params])
        if not self.alive:
            self._revive()

    @property
    def queued(self) -> int:
        """Rows and writes not yet committed: waiting, and in the batch being written."""
        return len(self.pending) + self.inflight

    @property
    def full(self) -> bool:
        return len(self.pending) + self.inflight >= self.queue_size

    async def wait_for_room(self) -> None:
        """Backpressure: a request waits while `queue_size` rows are waiting (the writer is slow
        or the file is failing), without blocking the event loop; after ROOM_WAIT seconds it is
        refused with a 503 instead (it never reached a model: no row is owed for it)."""
        if self.full:
            log.warning("ledger queue full (%d rows): requests wait for the writer", self.queued)
        deadline = time.monotonic() + self.ROOM_WAIT
        pause = 0.005
        while self.full and not self.closed:
            if not self.alive:
                self._revive()
            if time.monotonic() >= deadline:
                raise GatewayError(503, f"the gateway's ledger is not keeping up ({self.state}: "
                                   f"{self.last_error or 'busy'}); retry shortly", retry_after=5)  # fmt: skip
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    @property
    def state(self) -> str:
        """running (writing), failing (its last write failed; rows are kept and retried) or stopped."""
        if self.closed or not self.alive:
            return "stopped"
        return "failing" if self.failing_since else "running"

    def status(self) -> dict:
        info = {"state": self.state, "queued": self.queued, "written": self.written, "failed": self.failed}
        if self.failing_since:
            info["failing_for_s"] = round(time.monotonic() - self.failing_since, 1)
        if self.last_error:
            info["last_error"] = self.last_error
        if self.restarts:
            info["restarts"] = self.restarts
        return info

    def _start_writer(self) -> None:
        self.alive = True
        self.thread = threading.Thread(target=self._run, name="tgw-ledger", daemon=True)
        self.thread.start()

    def _revive(self) -> None:
        """The writer thread ended although nothing stopped it: start another (at most once a second)."""
        if self.stopping or self.closed or self.thread.is_alive() or time.monotonic() - self._revived_at < 1.0:
            return
        self._revived_at = time.monotonic()
        self.restarts += 1
        log.error("ledger writer thread had stopped (%s); restarted it, %d rows queued",
                  self.last_error or "no error seen", len(self.pending))  # fmt: skip
        self._start_writer()

    # -- the writer thread
    def _run(self) -> None:
        try:
            while True:
                stopping = self.stopping
                if self.pending:
                    try:
                        self._write_pending()
                    except Exception as exc:  # a bug in the writer itself: reported, the rows kept
                        self._note_failure(exc)
                elif stopping:
                    return
                if self.failing_since:
                    if not stopping:
                        self.wake.wait(self._retry_pause())  # close() wakes it
                    elif time.monotonic() < self.stop_deadline:
                        time.sleep(0.1)
                    else:
                        return
                elif not stopping and len(self.pending) < self.queue_size // 2:
                    # let the next batch gather: a commit costs file locks and WAL page writes,
                    # so a busy gateway pays for them once per LINGER, not once per few rows
                    time.sleep(self.LINGER)
        finally:
            self.alive = False

    def _retry_pause(self) -> float:
        failing_for = time.monotonic() - self.failing_since
        return min(max(0.1, failing_for / 2), self.RETRY_MAX)

    def _write_pending(self) -> None:
        self.busy = True
        batch = []
        while self.pending:
            batch.append(self.pending.popleft())
        self.inflight = len(batch)
        pieces = deque([batch])  # what is left to write, in order; a piece that fails is halved
        try:
            while pieces:
                items = pieces[0]
                try:
                    self._store(items)
                except Exception as exc:
                    self._rollback()
                    if is_transient_db_error(exc):  # the file's fault: keep everything, retry later
                        self._note_failure(exc)
                        return
                    pieces.popleft()
                    if len(items) > 1:
                        half = len(items) // 2
                        pieces.extendleft((items[half:], items[:half]))
                    else:
                        self._drop(items[0], exc)
                    continue
                pieces.popleft()
                self.written += sum(1 for item in items if isinstance(item, tuple))
                if self.failing_since:
                    log.warning("ledger writes recovered after %.1fs", time.monotonic() - self.failing_since)
                    self.failing_since = 0.0
        finally:  # a failure (or the thread's end) leaves these unwritten: back to the front, in order
            for items in reversed(pieces):
                self.pending.extendleft(reversed(items))
            self.inflight = 0
            self.busy = False

    def _store(self, items: list) -> None:
        writes = [item for item in items if type(item) is list]  # stored Responses, last-used times: usually none
        rows = sanitise_rows([item for item in items if type(item) is tuple] if writes else items, self.kinds)
        start = 0
        while start < len(rows):  # chunks of 256, 128, ... 1 rows: a handful of cached statements
            size = min(self.CHUNK, 1 << ((len(rows) - start).bit_length() - 1))
            self._insert_rows(rows[start : start + size])
            start += size
        for item in writes:
            self.db.execute(item[0], item[1])
        self.db.commit()

    def _insert_rows(self, rows: list) -> None:
        """One multi-row INSERT: sqlite runs it in one step, so the writer lets go of the GIL
        once per batch instead of once per row (executemany), which the event loop feels."""
        sql = self._insert_sql.get(len(rows))
        if sql is None:
            one = "(" + ", ".join("?" * len(LEDGER_COLUMNS)) + ")"
            sql = f"INSERT INTO requests ({', '.join(LEDGER_COLUMNS)}) VALUES " + ", ".join([one] * len(rows))
            self._insert_sql[len(rows)] = sql
        self.db.execute(sql, list(itertools.chain.from_iterable(rows)))  # (C-level: this thread holds the GIL less)

    def _rollback(self) -> None:
        try:
            self.db.rollback()
        except Exception:  # nothing to roll back, or the file is gone: the next write says which
            pass

    def _note_failure(self, exc: BaseException) -> None:
        self.last_error = redact(f"{type(exc).__name__}: {exc}")[:300]
        now = time.monotonic()
        if not self.failing_since:
            self.failing_since = now
        if now >= self._next_log["fail"]:
            self._next_log["fail"] = now + self.LOG_EVERY
            log.error("ledger write failed (%s); %d rows kept in memory, retrying", self.last_error, self.queued)

    def _drop(self, item, exc: BaseException) -> None:
        """One row (or other write) that cannot be stored even repaired: kept as a row that says
        so, with what could be saved (time, id, status), counted and logged."""
        self.failed += 1
        self._unlogged_drops += 1
        reason = redact(f"{type(exc).__name__}: {exc}")[:300]
        if isinstance(item, tuple):
            stub = [None] * len(LEDGER_COLUMNS)
            for name in ("ts", "request_id", "status", "endpoint", "client_protocol"):
                at = LEDGER_COLUMNS.index(name)
                if at < len(item):
                    stub[at] = LEDGER_REPAIRS[self.kinds[at]](item[at])
            stub[0] = stub[0] or time.time()
            stub[1] = stub[1] or "unknown"
            stub[LEDGER_COLUMNS.index("error")] = (
                f"ledger: this row could not be stored ({reason}); kept: time, id, status"
            )
            try:
                self._insert_rows([tuple(stub)])
                self.db.commit()
            except Exception:  # even the stub failed: the count and the log line remain
                self._rollback()
        elif isinstance(item, list):  # a stored Response: once more with unencodable text escaped
            try:
                self.db.execute(item[0], [encodable(v) if isinstance(v, str) else v for v in item[1]])
                self.db.commit()
                self.failed -= 1
                self._unlogged_drops -= 1
                return
            except Exception:
                self._rollback()
        now = time.monotonic()
        if now >= self._next_log["drop"]:
            self._next_log["drop"] = now + self.LOG_EVERY
            log.error("ledger: %d row(s) could not be stored as sent and were recorded as dropped-row errors "
                      "(latest: %s)", self._unlogged_drops, reason)  # fmt: skip
            self._unlogged_drops = 0

    # -- both
    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (or the writer is failing)."""
        deadline = time.monotonic() + timeout
        while (self.pending or self.busy) and time.monotonic() < deadline and not self.failing_since:
            if not self.alive:
                self._revive()
            time.sleep(0.005)

    def close(self, timeout: float = 10.0) -> None:
        """Drain and close. A writer that cannot write gets `timeout` seconds, then what it
        still holds is reported as lost, loudly; shutdown never waits longer than that."""
        self.stopping = True
        self.stop_deadline = time.monotonic() + timeout
        self.wake.set()
        if not self.thread.is_alive() and self.pending:
            self._run()  # the writer is gone: drain on this thread
        self.thread.join(timeout + self.BUSY_TIMEOUT + 1)
        self.closed = True
        if self.pending:
            log.error("ledger: %d rows could not be written before shutdown (%s)", len(self.pending),
                      self.last_error or "writer stuck")  # fmt: skip
        if self._unlogged_drops:
            log.error("ledger: %d more row(s) were recorded as dropped-row errors", self._unlogged_drops)
        if not self.thread.is_alive():
            self.db.close()


class ResponseStore:
    """Responses kept for previous_response_id and GET /v1/responses/{id}: the latest in
    memory (a continuation often arrives before the writer has committed), all in sqlite
    through the ledger's writer, read back off the event loop."""

    RECENT = 256

    def __init__(self, ledger: Ledger, retention_days: float):
        self.ledger = ledger
        self.recent: dict[str, dict] = {}
        self.deleted: set[str] = set()  # until the writer has committed the DELETE
        self.lock = threading.Lock()
        self.db = open_ledger_db(ledger.path) if ledger.path != ":memory:" else None
        self.retention = retention_days * 86400
        self.saves = 0
        self.purge()

    def purge(self) -> None:
        """Forget responses older than the retention (at start, then every 1000 saves)."""
        self.ledger.write_later("DELETE FROM responses WHERE created < ?", (time.time() - self.retention,))

    def save(self, response: dict, input_items: list, owner: str = "") -> None:
        """`owner` is the principal that made it (Principal.owner; "" while the gateway needs no key)."""
        self.saves += 1
        if self.saves % 1000 == 0:
            self.purge()
        entry = {"input": input_items, "response": response, "owner": owner, "created": time.time()}
        self.recent[response["id"]] = entry
        while len(self.recent) > self.RECENT:
            self.recent.pop(next(iter(self.recent)))
        params = (
            response["id"],
            entry["created"],
            response.get("model"),
            dumps(input_items).decode(),
            dumps(response).decode(),
            owner,
        )
        self.ledger.write_later(
            "INSERT OR REPLACE INTO responses (id, created, model, input, response, owner) VALUES (?, ?, ?, ?, ?, ?)",
            params,
        )

    async def load(self, response_id: str, owner: str | None = None) -> dict | None:
        """A stored response, if `owner` may see it: a key sees only its own (None: anyone may)."""
        if response_id in self.deleted:
            return None
        entry = self.recent.get(response_id)
        if entry is None and self.db is not None:
            entry = await asyncio.to_thread(self._load_from_db, response_id)
        if entry is not None and owner is not None and entry["owner"] != owner:
            return None
        if entry is not None and entry["created"] < time.time() - self.retention:
            return None  # expired, though purge (at start, every 1000 saves) has not deleted it yet
        return entry

    def _load_from_db(self, response_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute(
                "SELECT input, response, owner, created FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return {"input": loads(row[0]), "response": loads(row[1]), "owner": row[2], "created": row[3]} if row else None

    def delete(self, response_id: str) -> None:
        self.recent.pop(response_id, None)
        if len(self.deleted) > 10000:  # long committed by now
            self.deleted.clear()
        self.deleted.add(response_id)
        self.ledger.write_later("DELETE FROM responses WHERE id = ?", (response_id,))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def query_usage(db: sqlite3.Connection, group: str, since: float) -> list[tuple]:
    column = {"model": "model_requested", "provider": "provider", "day": "date(ts, 'unixepoch')", "key": "api_key_id",
              "user": "user"}[group]  # fmt: skip
    return db.execute(
        f"""SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
                   SUM(reasoning_tokens), SUM(cost_usd), SUM(status >= 400)
            FROM requests WHERE ts >= ? GROUP BY 1 ORDER BY 1""",
        (since,),
    ).fetchall()


def query_logs(db: sqlite3.Connection, limit: int, user_ids: list | None = None) -> list[dict]:
    """The latest rows, optionally only those of some users (section 10's ids)."""
    db.row_factory = sqlite3.Row
    where = ""
    if user_ids is not None:  # through the index on key_id (a user's rows are its keys' rows)
        where = f"WHERE key_id IN (SELECT id FROM api_keys WHERE user_id IN ({', '.join('?' * len(user_ids))}))"
    limit = min(limit, INT64_MAX)  # (sqlite's LIMIT is an int64; a negative one means no limit)
    rows = db.execute(f"SELECT * FROM requests {where} ORDER BY id DESC LIMIT ?", (*(user_ids or ()), limit)).fetchall()
    return [dict(r) for r in rows]


# ======================================================================================
# 10. Identity: users, keys, budgets, rate limits
# ======================================================================================
#
# Users and their API keys live in the ledger's database (migration 4), so one sqlite file says
# who exists and what each spent. A key is `tok_` + 32 random bytes (base64url, 47 characters);
# only its SHA-256 and a 12-character display prefix are stored, and the key is shown once.
#
# The CLI and the admin API write through IdentityStore. Triggers bump a change counter on
# every change; the gateway's identity thread checks it every IDENTITY_POLL seconds, reloads
# users and keys off the event loop and hands the snapshot to the loop (Identity.apply). Per
# request everything is in memory: the key's SHA-256 (cached for keys that matched), one dict
# lookup, then O(1) budget and rate-limit counters. Spend is persisted by the ledger rows
# themselves (key_id, user_id, cost, tokens): a budget's spend in its period is summed from them
# when the gateway first sees that budget.
#
# A budget admits a call while what was spent plus what calls in flight reserved is under its
# limit. A call reserves its estimate (estimate_tokens of the body plus its max output tokens,
# priced as the dearest model of its failover chain) and settles to its real usage when it ends,
# however it ends, so parallel calls cannot overspend together: only the last one admitted can
# run past the limit, by at most its own size. A fallback outside a key's allow-list is skipped.

KEY_PREFIX = "tok_"
KEY_DISPLAY_CHARS = 12  # "tok_" + 8 characters: all that lists, logs and ledger rows show of a key
IDENTITY_POLL = 0.25  # seconds between checks of the change counter by a running gateway
LAST_USED_EVERY = 5.0  # seconds between writes of the keys' last-used times
RESERVED_OUTPUT_DEFAULT = 4096  # output tokens a call reserves when it sets no limit of its own
ROLES = ("admin", "user")
ROLE_ALIASES = {"root_admin": "admin", "gateway_admin": "admin", "gateway_user": "user"}  # Tokligence's names
STATUSES = ("active", "disabled")
STATUS_ALIASES = {"inactive": "disabled"}  # Tokligence's name
PERIODS = ("day", "week", "month", "total")
PERIOD_WORDS = {"day": "daily", "week": "weekly", "month": "monthly", "total": "total"}


def iso_time(ts) -> str | None:
    """Epoch seconds as ISO 8601 UTC (what the admin API and the CLI show)."""
    if ts is None or not math.isfinite(ts):
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):  # years before 1 or past 9999 (days=1e12, expires_days=1e9)
        return None


def parse_iso_time(text: str, name: str) -> float:
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise bad_request(f"'{name}' must be an RFC 3339 time like 2026-01-31T00:00:00Z, got {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The UTC day, week (from Monday), month or all time that holds `now`, as (start, end)."""
    if period == "total":
        return 0.0, math.inf
    t = time.gmtime(now)
    day = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    if period == "day":
        return day, day + 86400
    if period == "week":
        start = day - t.tm_wday * 86400
        return start, start + 7 * 86400
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)), calendar.timegm((year, month, 1, 0, 0, 0))


def duration_text(seconds: float) -> str:
    """A wait as OpenAI's x-ratelimit-reset-* headers write it: 250ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    tenths = math.ceil(seconds * 10) / 10
    if tenths < 60:
        return f"{tenths:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def money(usd: float) -> str:
    return f"${usd:.2f}" if usd >= 10 else f"${usd:.4f}"


def is_row_id(ref: str) -> bool:
    """A reference that is a row id: ASCII digits ('²' is a digit to str.isdigit, not to int())."""
    return ref.isascii() and ref.isdigit() and len(ref) < 19


def new_key_secret() -> tuple[str, str, str]:
    """A fresh client key: (the key, its SHA-256 hex, its display prefix)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest(), key[:KEY_DISPLAY_CHARS]


# ---- validation: one set of checks for the CLI and the admin API (GatewayError 400s) ----------


def check_email(value) -> str:
    if not isinstance(value, str):
        raise bad_request(f"'email' must be a string, got {json.dumps(value)[:60]}")
    email = value.strip().lower()
    local, _, domain = email.partition("@")
    if not local or not domain or "@" in domain or len(email) > 254 or not email.isprintable() or " " in email:
        raise bad_request(f"'email' must be an address like name@example.com, got {value[:80]!r}")
    return email


def check_choice(name: str, value, choices: tuple, aliases: dict | None = None) -> str:
    if isinstance(value, str):
        value = value.strip().lower()
        value = (aliases or {}).get(value, value)
        if value in choices:
            return value
    raise bad_request(f"'{name}' must be one of {', '.join(choices)}, got {json.dumps(value)[:60]}")


def check_text(name: str, value, limit: int = 200) -> str:
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {json.dumps(value)[:60]}")
    if len(value) > limit or not value.isprintable():
        raise bad_request(f"'{name}' must be printable text of at most {limit} characters")
    return value.strip()


def check_amount(name: str, value, kind=float, minimum=0):
    """A non-negative number (None stays None: not set). Booleans, NaN and infinities are refused."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and minimum <= value <= 1e15
    if ok and kind is int and not float(value).is_integer():  # (bounded first: a huge int overflows a float)
        ok = False
    if not ok:
        wanted = "a whole number" if kind is int else "a number"
        raise bad_request(f"'{name}' must be {wanted} from {minimum} up, got {json.dumps(value)[:60]}")
    return kind(value)


def check_models(value) -> str:
    """Model allow-list globs, as a list or a comma-separated string; stored comma-separated."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 100:
        raise bad_request("'models' must be a list of at most 100 model globs (or a comma-separated string)")
    globs = []
    for item in items:
        if not isinstance(item, str) or len(item) > 200 or "," in item or not item.isprintable():
            raise bad_request(
                f"'models' entries must be model names or globs like gpt-4o*, got {json.dumps(item)[:60]}"
            )
        if item.strip():
            globs.append(item.strip())
    return ",".join(globs)


# What each may change, and how it is checked (the admin API's PATCH and POST bodies, the CLI's flags)
USER_CHANGES = {
    "display_name": lambda v: check_text("display_name", v),
    "role": lambda v: check_choice("role", v, ROLES, ROLE_ALIASES),
    "status": lambda v: check_choice("status", v, STATUSES, STATUS_ALIASES),
    "budget_usd": lambda v: check_amount("budget_usd", v),
    "budget_tokens": lambda v: check_amount("budget_tokens", v, int),
    "budget_period": lambda v: check_choice("budget_period", v, PERIODS),
    "rpm": lambda v: check_amount("rpm", v, int),
    "tpm": lambda v: check_amount("tpm", v, int),
}
KEY_CHANGES = {
    "name": lambda v: check_text("name", v),
    "models": check_models,
    "status": lambda v: check_choice("status", v, STATUSES, STATUS_ALIASES),
    "expires_at": lambda v: None if v is None else check_amount("expires_at", v),
    "budget_usd": lambda v: check_amount("budget_usd", v),
    "budget_tokens": lambda v: check_amount("budget_tokens", v, int),
    "budget_period": lambda v: check_choice("budget_period", v, PERIODS),
    "rpm": lambda v: check_amount("rpm", v, int),
    "tpm": lambda v: check_amount("tpm", v, int),
}


def checked_changes(changes: dict, checks: dict) -> dict:
    unknown = sorted(set(changes) - set(checks))
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(unknown)[:200]}; accepted: {', '.join(checks)}")
    return {name: checks[name](value) for name, value in changes.items()}


def key_state(row: dict, now: float) -> str:
    if row.get("deleted_at") is not None:
        return "deleted"
    if row["status"] != "active":
        return "disabled"
    if row["expires_at"] is not None and now >= row["expires_at"]:
        return "expired"
    return "active"


def budget_payload(row: dict) -> dict | None:
    if row["budget_usd"] is None and row["budget_tokens"] is None:
        return None
    return {"usd": row["budget_usd"], "tokens": row["budget_tokens"], "period": row["budget_period"]}


def user_payload(row: dict) -> dict:
    """A user as Tokligence Gateway's admin API shows one, plus its budget (and key count in lists)."""
    out = {"id": row["id"], "email": row["email"], "role": row["role"], "display_name": row["display_name"],
           "status": row["status"], "budget": budget_payload(row), "rpm": row["rpm"], "tpm": row["tpm"],
           "created_at": iso_time(row["created_at"]), "updated_at": iso_time(row["updated_at"])}  # fmt: skip
    if "keys" in row:
        out["keys"] = row["keys"]
    return out


def key_payload(row: dict, now: float | None = None) -> dict:
    """An API key as Tokligence Gateway's admin API shows one (never its hash), plus tgw's settings."""
    return {
        "id": row["id"], "user_id": row["user_id"], "user_email": row.get("email"), "name": row["name"],
        "prefix": row["key_prefix"], "scopes": [], "models": [m for m in row["models"].split(",") if m],
        "status": key_state(row, time.time() if now is None else now), "expires_at": iso_time(row["expires_at"]),
        "budget": budget_payload(row), "rpm": row["rpm"], "tpm": row["tpm"], "created_at": iso_time(row["created_at"]),
        "updated_at": iso_time(row["updated_at"]), "last_used_at": iso_time(row["last_used_at"]),
    }  # fmt: skip


class IdentityStore:
    """Users and API keys in sqlite: what the CLI, the admin API (through asyncio.to_thread) and
    the gateway's identity thread read and write; never called on the event loop. Errors are the
    gateway's own (400 bad input, 404 not found, 409 conflict), so the CLI and the API agree."""

    KEY_COLUMNS = "k.*, u.email, u.role, u.status AS user_status"

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.lock = threading.RLock()

    def rows(self, sql: str, params=()) -> list[dict]:
        with self.lock:
            cursor = self.db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def write(self, sql: str, params=()) -> sqlite3.Cursor:
        with self.lock:
            try:
                cursor = self.db.execute(sql, params)
                self.db.commit()
            except sqlite3.IntegrityError as exc:
                self.db.rollback()
                raise GatewayError(409, f"conflicts with an existing entry ({exc})") from None
            except BaseException:
                self.db.rollback()
                raise
            return cursor

    def insert(self, table: str, fields: dict) -> int:
        now = time.time()
        names = [*fields, "created_at", "updated_at"]
        sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        return self.write(sql, (*fields.values(), now, now)).lastrowid

    def update(self, table: str, row_id: int, fields: dict) -> None:
        if fields:
            sets = ", ".join(f"{name} = ?" for name in fields)
            self.write(
                f"UPDATE {table} SET {sets}, updated_at = ? WHERE id = ?", (*fields.values(), time.time(), row_id)
            )

    def version(self) -> int:
        return self.rows("SELECT version FROM identity_version")[0]["version"]

    # -- users
    def add_user(self, email, fields: dict | None = None) -> dict:
        """A new user; `fields` as USER_CHANGES names them (display_name, role, budget_*...)."""
        email = check_email(email)
        fields = checked_changes(fields or {}, USER_CHANGES)
        if self.rows("SELECT id FROM users WHERE email = ? AND deleted_at IS NULL", (email,)):
            raise GatewayError(409, f"user {email} already exists")
        return self.user(self.insert("users", {"email": email, **fields}))

    def user(self, ref) -> dict:
        """A live user by id or email (404 when there is none)."""
        if isinstance(ref, int) or (isinstance(ref, str) and is_row_id(ref)):
            found = self.rows("SELECT * FROM users WHERE id = ? AND deleted_at IS NULL", (int(ref),))
        else:  # (an email that is no UTF-8, from a command line's bytes, is no user's)
            email = encodable(str(ref).strip().lower())
            found = self.rows("SELECT * FROM users WHERE email = ? AND deleted_at IS NULL", (email,))
        if not found:
            raise GatewayError(404, f"no user {str(ref)[:80]!r}", "not_found_error")
        return found[0]

    def users(self) -> list[dict]:
        return self.rows(
            """SELECT u.*, (SELECT COUNT(*) FROM api_keys k WHERE k.user_id = u.id AND k.deleted_at IS NULL) AS keys
               FROM users u WHERE u.deleted_at IS NULL ORDER BY u.id"""
        )

    def update_user(self, ref, changes: dict) -> dict:
        user = self.user(ref)
        self.update("users", user["id"], checked_changes(changes, USER_CHANGES))
        return self.user(user["id"])

    def delete_user(self, ref) -> dict:
        """Soft delete: the user and its keys stop working; their ledger rows stay."""
        user = self.user(ref)
        now = time.time()
        with self.lock:
            self.db.execute(
                "UPDATE api_keys SET deleted_at = ? WHERE user_id = ? AND deleted_at IS NULL", (now, user["id"])
            )
            self.update("users", user["id"], {"deleted_at": now})
        return user

    # -- keys
    def create_key(self, user_ref, fields: dict | None = None) -> tuple[str, dict]:
        """A new key for a live user, `fields` as KEY_CHANGES names them: (the key, shown this once; its row)."""
        user = self.user(user_ref)
        fields = checked_changes(fields or {}, KEY_CHANGES)
        key, secret = self.new_secret()
        return key, self.key(self.insert("api_keys", {"user_id": user["id"], **secret, **fields}))

    def new_secret(self) -> tuple[str, dict]:
        """A fresh key and the columns that store it (a display prefix names one key: draw again on a collision)."""
        for _ in range(8):
            key, digest, prefix = new_key_secret()
            if not self.rows("SELECT id FROM api_keys WHERE key_prefix = ?", (prefix,)):
                break
        return key, {"key_hash": digest, "key_prefix": prefix}

    def key(self, ref) -> dict:
        """A live key by id, display prefix or the key itself (404 when there is none)."""
        ref = str(ref).strip()
        if is_row_id(ref):
            where, param = "k.id = ?", int(ref)
        elif ref.startswith(KEY_PREFIX) and len(ref) <= KEY_DISPLAY_CHARS:
            where, param = "k.key_prefix = ?", encodable(ref)
        else:
            where, param = "k.key_hash = ?", hashlib.sha256(ref.encode("utf-8", "surrogatepass")).hexdigest()
        found = self.rows(
            f"SELECT {self.KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id "
            f"WHERE {where} AND k.deleted_at IS NULL",
            (param,),
        )
        if not found:
            shown = ref if ref.isdigit() or len(ref) <= KEY_DISPLAY_CHARS else ref[:KEY_DISPLAY_CHARS] + "…"
            raise GatewayError(404, f"no API key {shown[:40]!r} (give its id or its prefix)", "not_found_error")
        return found[0]

    def keys(self, user_ref=None) -> list[dict]:
        where, params = "k.deleted_at IS NULL", ()
        if user_ref is not None:
            where, params = "k.deleted_at IS NULL AND k.user_id = ?", (self.user(user_ref)["id"],)
        return self.rows(
            f"SELECT {self.KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id WHERE {where} ORDER BY k.id",
            params,
        )

    def update_key(self, ref, changes: dict) -> dict:
        row = self.key(ref)
        self.update("api_keys", row["id"], checked_changes(changes, KEY_CHANGES))
        return self.key(row["id"])

    def delete_key(self, ref) -> dict:
        row = self.key(ref)
        self.update("api_keys", row["id"], {"deleted_at": time.time()})
        return row

    def rotate_key(self, ref) -> tuple[str, dict]:
        """A new secret for the same key (id, name, settings, budget and ledger rows): the old one stops working."""
        row = self.key(ref)
        key, secret = self.new_secret()
        self.update("api_keys", row["id"], secret)
        return key, self.key(row["id"])

    # -- what the gateway loads, and spend
    def snapshot(self) -> tuple[list[dict], list[dict]]:
        """Live users and live keys of live users (the keys with their hashes)."""
        users = self.rows("SELECT * FROM users WHERE deleted_at IS NULL")
        keys = self.rows(
            f"SELECT {self.KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id "
            "WHERE k.deleted_at IS NULL AND u.deleted_at IS NULL"
        )
        return users, keys

    def spent(self, holder: str, holder_id: int, since: float) -> tuple[float, int]:
        """USD and tokens a key or user spent since `since`, from the ledger rows."""
        # by key, through the one index the writer keeps up (a user's rows are its keys' rows)
        keys = "= ?" if holder == "key" else "IN (SELECT id FROM api_keys WHERE user_id = ?)"
        row = self.db_row(
            f"SELECT COALESCE(SUM(cost_usd), 0), COALESCE(SUM(prompt_tokens), 0) + COALESCE(SUM(completion_tokens), 0) "
            f"FROM requests WHERE key_id {keys} AND ts >= ?",
            (holder_id, since),
        )
        return float(row[0]), int(row[1])

    def db_row(self, sql: str, params=()) -> tuple:
        with self.lock:
            return self.db.execute(sql, params).fetchone()

    def budget_status(self, holder: str, row: dict, now: float) -> dict | None:
        """A budget with what its period has spent so far and what is left (the CLI's view)."""
        budget = budget_payload(row)
        if budget is None:
            return None
        start, end = period_bounds(row["budget_period"], now)
        usd, tokens = self.spent(holder, row["id"], start)
        return budget_view(budget, usd, tokens, 0.0, 0, end)


def budget_view(budget: dict, usd: float, tokens: int, reserved_usd: float, reserved_tokens: int, end: float) -> dict:
    out = dict(budget, spent_usd=round(usd, 6), spent_tokens=tokens, resets_at=iso_time(end))
    if reserved_usd or reserved_tokens:
        out.update(reserved_usd=round(reserved_usd, 6), reserved_tokens=reserved_tokens)
    if budget["usd"] is not None:
        out["left_usd"] = round(max(budget["usd"] - usd - reserved_usd, 0.0), 6)
    if budget["tokens"] is not None:
        out["left_tokens"] = max(budget["tokens"] - tokens - reserved_tokens, 0)
    return out


# ---- the gateway's side: in memory, read and updated on the event loop -------------------------


class Budget:
    """One spending limit (USD and/or tokens) of a key or a user over a period. `spent` is what
    finished calls cost in this period; `reserved` is what calls in flight may still cost."""

    __slots__ = ("holder", "usd", "tokens", "period", "start", "end", "spent_usd", "spent_tokens", "reserved_usd",
                 "reserved_tokens", "in_flight")  # fmt: skip

    def __init__(self, holder: str, period: str, now: float, spent: tuple = (0.0, 0)):
        self.holder = holder
        self.usd = self.tokens = None
        self.period = period
        self.start, self.end = period_bounds(period, now)
        self.spent_usd, self.spent_tokens = spent
        self.reserved_usd, self.reserved_tokens, self.in_flight = 0.0, 0, 0

    def has_room(self, now: float) -> bool:
        """Whether what was spent plus what calls in flight reserved is under every limit."""
        if now >= self.end:  # a new period starts from nothing
            self.start, self.end = period_bounds(self.period, now)
            self.spent_usd, self.spent_tokens = 0.0, 0
            self.reserved_usd, self.reserved_tokens, self.in_flight = 0.0, 0, 0
        usd, tokens = self.usd, self.tokens
        return (usd is None or self.spent_usd + self.reserved_usd < usd) and (
            tokens is None or self.spent_tokens + self.reserved_tokens < tokens
        )

    def refusal(self, now: float) -> GatewayError | None:
        """None while the budget has room, else the error that says which budget, spent/limit and the reset."""
        if self.has_room(now):
            return None
        if self.usd is not None and self.spent_usd + self.reserved_usd >= self.usd:
            used = f"spent {money(self.spent_usd)} (+{money(self.reserved_usd)} reserved by calls in flight) of its {money(self.usd)}"
        else:
            used = f"used {self.spent_tokens} tokens (+{self.reserved_tokens} reserved by calls in flight) of its {self.tokens}-token"
        resets = (
            f"it resets at {iso_time(self.end)}"
            if math.isfinite(self.end)
            else "it does not reset; an admin can raise it"
        )
        # 402 (Anthropic's billing_error), not 429: the OpenAI and Anthropic SDKs retry 408, 409, 429 and
        # 5xx (and agents on top of them retry 429 for minutes), but no client retries a 402
        err = GatewayError(402, f"budget exhausted: {self.holder} has {used} {PERIOD_WORDS[self.period]} budget; {resets}",
                           "billing_error")  # fmt: skip
        err.headers = (("x-should-retry", "false"),)
        return err

    def release(self, start: float, usd: float, tokens: int, cost: float, used: int) -> None:
        """A call ends: its reservation goes, its real cost counts (unless its period has ended since:
        the ledger counts it where it started)."""
        if start != self.start:
            return
        self.in_flight -= 1
        if self.in_flight <= 0:  # no float residue left behind
            self.reserved_usd, self.reserved_tokens, self.in_flight = 0.0, 0, 0
        else:
            self.reserved_usd -= usd
            self.reserved_tokens -= tokens
        self.spent_usd += cost
        self.spent_tokens += used

    def view(self) -> dict:
        budget = {"usd": self.usd, "tokens": self.tokens, "period": self.period}
        return budget_view(budget, self.spent_usd, self.spent_tokens, self.reserved_usd, self.reserved_tokens, self.end)


class RateLimit:
    """Requests and tokens per minute for a key or a user: two buckets that refill continuously,
    each holding one minute's allowance (so O(1) per call and no window to sweep). A call takes one
    request and its token estimate; when it ends, the estimate is corrected to the real usage."""

    __slots__ = ("holder", "rpm", "tpm", "requests", "tokens", "at")

    def __init__(self, rpm: int, tpm: int, now: float, holder: str = "this key"):
        self.holder = holder
        self.rpm, self.tpm = rpm, tpm
        self.requests, self.tokens = float(rpm), float(tpm)
        self.at = now

    def refill(self, now: float) -> None:
        elapsed = now - self.at
        if elapsed > 0:
            self.at = now
            rpm, tpm = self.rpm, self.tpm
            if rpm:
                left = self.requests + elapsed * rpm / 60
                self.requests = left if left < rpm else rpm
            if tpm:
                left = self.tokens + elapsed * tpm / 60
                self.tokens = left if left < tpm else tpm

    def take(self, now: float, tokens: int) -> None:
        """Take one request and `tokens`, or raise the 429 (with Retry-After and x-ratelimit-*)."""
        self.refill(now)
        if (self.rpm and self.requests < 1) or (self.tpm and self.tokens <= 0):
            self.refuse()
        if self.rpm:
            self.requests -= 1
        if self.tpm:
            self.tokens -= tokens

    def give_back(self, tokens: int) -> None:
        """Undo a take (another limit of the same call refused it)."""
        if self.rpm:
            self.requests += 1
        self.refund(tokens)

    def refuse(self) -> None:
        """The 429 for the allowance that runs out last, with Retry-After and the x-ratelimit-* headers."""
        wait, what = 0.0, ""
        if self.rpm and self.requests < 1:
            wait, what = (1 - self.requests) * 60 / self.rpm, f"{self.rpm} requests"
        if self.tpm and self.tokens <= 0 and (1 - self.tokens) * 60 / self.tpm > wait:
            wait, what = (1 - self.tokens) * 60 / self.tpm, f"{self.tpm} tokens"
        err = GatewayError(429, f"rate limit reached: {self.holder} may send {what} per minute; "
                           f"try again in {duration_text(wait)}", "rate_limit_error", retry_after=math.ceil(wait))  # fmt: skip
        err.headers = tuple(self.headers())
        raise err

    def refund(self, tokens: int) -> None:
        if self.tpm:
            left = self.tokens + tokens
            self.tokens = left if left < self.tpm else self.tpm

    def view(self, now: float) -> dict:
        """What is left right now (the usage summary)."""
        self.refill(now)
        return {"holder": self.holder, "rpm": self.rpm or None, "tpm": self.tpm or None,
                "remaining_requests": max(int(self.requests), 0) if self.rpm else None,
                "remaining_tokens": max(int(self.tokens), 0) if self.tpm else None}  # fmt: skip

    def headers(self) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-* headers: limit, remaining and time to a full allowance."""
        out = []
        for name, limit, left in (("requests", self.rpm, self.requests), ("tokens", self.tpm, self.tokens)):
            if limit:
                out += [(f"x-ratelimit-limit-{name}", str(limit)), (f"x-ratelimit-remaining-{name}", str(max(int(left), 0))),
                        (f"x-ratelimit-reset-{name}", duration_text((limit - left) * 60 / limit))]  # fmt: skip
        return out


class Principal:
    """Who a request is: an identity key (its user, allow-list, budgets, limits) or a static
    `api_keys` key. Built by Identity.apply; read per request."""

    __slots__ = ("digest", "key_id", "user_id", "label", "email", "name", "role", "models", "refusal", "expires_at",
                 "budgets", "limits", "owner", "guarded", "estimates", "priced", "last_used", "written_used")  # fmt: skip

    def __init__(self, digest: str, label: str, owner: str):
        self.digest, self.label, self.owner = digest, label, owner
        self.key_id = self.user_id = self.expires_at = self.refusal = None
        self.email = self.name = self.role = ""
        self.models: tuple = ()
        self.budgets: tuple = ()  # the key's and its user's
        self.limits: tuple = ()  # RateLimits: the key's and its user's
        self.guarded = False  # an allow-list, a budget or a rate limit to check per call
        self.estimates = False  # a budget or a token rate: each call's tokens are estimated
        self.priced = False  # a USD budget: each call's cost is estimated
        self.last_used = self.written_used = 0.0

    def seal(self) -> Principal:
        self.guarded = bool(self.models or self.budgets or self.limits)
        self.estimates = bool(self.budgets or any(limit.tpm for limit in self.limits))
        self.priced = any(b.usd is not None for b in self.budgets)
        return self


# What one admitted call holds until it ends (a tuple: made per call): (budget, the period start it
# reserved in) pairs, the USD and tokens it reserved, and its rate limits.
Reservation = tuple


def requested_output_tokens(body: dict, default: int | None = None) -> int | None:
    """The output limit a request sets, in whichever protocol's field (`default` when it sets none); the
    largest when it sets several (a small max_tokens beside a large max_completion_tokens reserves
    the large one: which of them an upstream obeys is the upstream's choice), times the answers it
    asks for (`n`, Gemini's candidateCount, a legacy completion's list of prompts)."""
    found = None
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if type(value) is int and (found is None or value > found):
            found = value
    answers = body.get("n")
    config = body.get("generationConfig", body.get("generation_config"))
    if isinstance(config, dict):
        for value in (config.get("maxOutputTokens"), config.get("max_output_tokens")):
            if type(value) is int and (found is None or value > found):
                found = value
        answers = config.get("candidateCount", answers)
    found = default if found is None else found
    if found is None:
        return None
    answers = answers if type(answers) is int and answers > 1 else 1
    prompts = body.get("prompt")
    if type(prompts) is list and len(prompts) > 1 and type(prompts[0]) is not int:  # several prompts, not token ids
        answers *= len(prompts)
    return min(max(found, 0) * min(answers, 10_000), 10_000_000)


class Identity:
    """The gateway's view of users and keys: who a request is (authenticate), whether it may
    make this call (admit: allow-list, budgets, rate limits) and what it cost (settle)."""

    def __init__(self, cfg: Config, ledger: Ledger, prices: PriceTable):
        self.ledger = ledger
        self.prices = prices
        self.always = False  # a public bind: auth = auto stays on
        self.has_keys = False  # any live key in the database
        self.version: tuple = (0, -1)  # (settings generation, database version) of the snapshot in force
        self.seen: tuple | None = None  # ... of the last snapshot built
        self.configure(cfg)
        self.by_hash: dict[str, Principal] = dict(self.static)  # SHA-256 hex -> principal
        self.by_id: dict[int, Principal] = {}
        self.retired: tuple | None = None  # the principals swapped out, until a build frees them off the loop
        self.digests: dict[str, str] = {}  # key -> SHA-256 hex, for keys that matched
        self.budgets: dict[tuple, Budget] = {}  # ("key"|"user", id, period) -> Budget
        self.limits: dict[tuple, RateLimit] = {}  # ("key"|"user", id) -> RateLimit
        self.usd_rates: dict[str, tuple] = {}  # model requested -> USD per input and per output token (rates_of)
        self.chain_models = lambda route: (route.model,)  # the models that may answer (the gateway's chains)
        self.store = IdentityStore(open_ledger_db(ledger.path))
        self.building = threading.Lock()  # one build at a time (the identity thread, the admin API's refresh)
        self.apply(self.load())
        self.last_used_at = time.monotonic()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="tgw-identity", daemon=True)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:  # built outside a running gateway: no live reload
            self.loop = None
        else:
            self.thread.start()

    def configure(self, cfg: Config, prices: PriceTable | None = None) -> None:
        """The config's part: auth mode, static api_keys, default rate limits (and a new price table).
        At start, and on a live config reload (on the loop, no I/O); the keys are rebuilt with them at
        the next poll."""
        if prices is not None:
            self.prices = prices
            self.usd_rates = {}
        mode = "off" if cfg.auth_disabled else cfg.auth
        self.mode = "on" if self.always and mode == "auto" else mode
        self.default_rpm, self.default_tpm = cfg.default_rpm, cfg.default_tpm
        before, self.static = getattr(self, "static", {}), {}
        for key in {k.strip() for k in cfg.api_keys.split(",") if k.strip()}:
            digest = hashlib.sha256(key.encode()).hexdigest()
            principal = Principal(digest, key_fingerprint(key), "static:" + key_fingerprint(key))
            if self.default_rpm or self.default_tpm:
                kept = before[digest].limits if digest in before else ()
                if kept and (kept[0].rpm, kept[0].tpm) == (self.default_rpm, self.default_tpm):
                    principal.limits = kept  # a reload of anything else does not refill a key's allowance
                else:
                    holder = f"API key {principal.label}"
                    principal.limits = (RateLimit(self.default_rpm, self.default_tpm, time.monotonic(), holder),)
            self.static[digest] = principal.seal()
        # a new generation: the next build applies these settings whatever the database's version (and
        # a build begun before this call, with the settings it replaces, is superseded by it)
        self.generation = getattr(self, "generation", 0) + 1
        self.required = self.mode == "on" or (self.mode == "auto" and bool(self.static or self.has_keys))

    def require_always(self) -> None:
        """A public bind that refused to start open stays closed, even if every key is deleted later."""
        self.always = True
        if self.mode == "auto":
            self.mode = "on"
            self.required = True

    # -- loading and building (a thread), swapping in (the loop)
    def load(self, only_if_changed: bool = False) -> tuple | None:
        """Read users and keys and build their principals, off the event loop (a thousand keys
        take milliseconds to build: the loop only swaps them in, see apply). Builds run one at a
        time, each keeping the counters of the budgets and rate limits of the build before it, so
        calls in flight settle into the objects that the next snapshot holds."""
        with self.building:
            self.retired = None
            version = self.store.version()
            generation = self.generation  # (read first: a configure() during the build makes it stale)
            if only_if_changed and (generation, version) == self.seen:
                return None
            users, keys = self.store.snapshot()
            now = time.time()
            spends = {}
            for holder, rows in (("user", users), ("key", keys)):
                for row in rows:
                    ident = (holder, row["id"], row["budget_period"])
                    if budget_payload(row) is not None and ident not in self.budgets:
                        spends[ident] = self.store.spent(holder, row["id"], period_bounds(row["budget_period"], now)[0])
            built = self.build((generation, version), users, keys, spends)
            self.seen = (generation, version)
            return built

    def build(self, version: tuple, users: list, keys: list, spends: dict) -> tuple:
        """The principals of a snapshot, keeping the counters of budgets and limits that carry over."""
        now, clock = time.time(), time.monotonic()
        budgets: dict[tuple, Budget] = {}

        def budget_of(holder: str, row: dict, label: str) -> Budget | None:
            if budget_payload(row) is None:
                return None
            ident = (holder, row["id"], row["budget_period"])
            budget = self.budgets.get(ident) or Budget(label, row["budget_period"], now, spends.get(ident, (0.0, 0)))
            budget.holder, budget.usd, budget.tokens = label, row["budget_usd"], row["budget_tokens"]
            budgets[ident] = budget
            return budget

        limits: dict[tuple, RateLimit] = {}

        def limit_of(holder: str, row: dict, rpm, tpm, label: str) -> RateLimit | None:
            rpm, tpm = rpm or 0, tpm or 0
            if not (rpm or tpm):
                return None
            limit = self.limits.get((holder, row["id"]))
            if limit is None or (limit.rpm, limit.tpm) != (rpm, tpm):
                limit = RateLimit(rpm, tpm, clock, label)
            limit.holder = label
            limits[holder, row["id"]] = limit
            return limit

        user_budgets = {u["id"]: budget_of("user", u, f"user {u['email']}") for u in users}
        user_limits = {u["id"]: limit_of("user", u, u["rpm"], u["tpm"], f"user {u['email']}") for u in users}
        by_hash, by_id, in_use = dict(self.static), {}, self.by_id
        for row in keys:
            prefix = row["key_prefix"]
            named = f"{prefix} ({row['name']!r})" if row["name"] else prefix
            principal = Principal(row["key_hash"], prefix, f"key:{row['id']}")
            principal.key_id, principal.user_id, principal.email = row["id"], row["user_id"], row["email"]
            principal.name, principal.role, principal.expires_at = row["name"], row["role"], row["expires_at"]
            principal.models = tuple(m for m in row["models"].split(",") if m)
            if row["status"] != "active":
                principal.refusal = f"API key {named} is disabled"
            elif row["user_status"] != "active":
                principal.refusal = f"API key {named} belongs to {row['email']}, whose account is disabled"
            key_budget = budget_of("key", row, f"API key {named}")
            principal.budgets = tuple(b for b in (key_budget, user_budgets.get(row["user_id"])) if b is not None)
            rpm = row["rpm"] if row["rpm"] is not None else self.default_rpm
            tpm = row["tpm"] if row["tpm"] is not None else self.default_tpm
            key_limit = limit_of("key", row, rpm, tpm, f"API key {named}")
            principal.limits = tuple(x for x in (key_limit, user_limits.get(row["user_id"])) if x is not None)
            old = in_use.get(row["id"])  # the principal requests use now (the loop stamps its last use)
            if old is not None:
                principal.last_used, principal.written_used = old.last_used, old.written_used
            by_hash[row["key_hash"]] = by_id[row["id"]] = principal.seal()
        self.budgets, self.limits = budgets, limits  # what the next build carries over
        return version, by_hash, by_id, bool(keys)

    def apply(self, built: tuple) -> None:
        """Swap in a built snapshot (on the loop: no work proportional to the keys)."""
        version, by_hash, by_id, has_keys = built
        if version <= self.version:
            return
        # the old principals are freed by the next build, on its thread (ten thousand take milliseconds);
        # a use stamped since this build is stamped again at the key's next
        self.retired = (self.by_hash, self.by_id)
        self.by_hash, self.by_id = by_hash, by_id
        if len(self.digests) > 4096:
            self.digests = {}
        self.version = version
        self.has_keys = has_keys
        self.required = self.mode == "on" or (self.mode == "auto" and bool(self.static or self.has_keys))

    async def refresh(self) -> None:
        """Apply a change made through this gateway (the admin API) now, not at the next poll."""
        loaded = await asyncio.to_thread(self.load)
        self.apply(loaded)

    def _watch(self) -> None:
        while not self.stopping.wait(IDENTITY_POLL):
            try:
                loaded = self.load(only_if_changed=True)
                if loaded is not None:
                    self.loop.call_soon_threadsafe(self.apply, loaded)
                if time.monotonic() - self.last_used_at >= LAST_USED_EVERY:
                    self.save_last_used()
            except Exception as exc:  # a locked or damaged file, a closed loop: keep watching
                log.warning("identity reload failed (%s); the keys loaded before stay in force", exc)

    def save_last_used(self) -> None:
        """Keys' last-used times go to the database every few seconds, through the ledger's writer."""
        self.last_used_at = time.monotonic()
        for principal in list(self.by_id.values()):
            used = principal.last_used
            if used > principal.written_used:
                principal.written_used = used
                self.ledger.write_later("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (used, principal.key_id))

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.save_last_used()
        self.store.db.close()

    # -- per request
    def authenticate(self, key: str, now: float) -> tuple[Principal | None, GatewayError | None]:
        """(the principal of a key, None) or, for a key that may not be used, (its principal when the
        key is known, the 401 that says what is wrong with it)."""
        digest = self.digests.get(key)
        if digest is None:
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        principal = self.by_hash.get(digest)
        if principal is None or not hmac.compare_digest(principal.digest, digest):
            return None, GatewayError(401, "invalid API key: this gateway never issued it, or it was deleted or "
                                      "rotated", "authentication_error")  # fmt: skip
        self.digests[key] = digest
        if principal.refusal is not None:
            return principal, GatewayError(401, principal.refusal, "authentication_error")
        if principal.expires_at is not None and now >= principal.expires_at:
            return principal, GatewayError(401, f"API key {principal.label} expired at "
                                           f"{iso_time(principal.expires_at)}", "authentication_error")  # fmt: skip
        principal.last_used = now
        return principal, None

    def check_model(self, principal: Principal, model: str, upstream_model: str) -> None:
        if principal.models and not any(
            glob_match(g, model) or glob_match(g, upstream_model) for g in principal.models
        ):
            raise GatewayError(403, f"API key {principal.label} may not use model {model[:200]!r}; its allowed models: "
                               f"{', '.join(principal.models)}", "permission_error")  # fmt: skip

    def admit(self, call, route: Route, body: dict | None, more: int = 0) -> Reservation | None:
        """Before a model call: its allow-list, budgets and rate limit, then its reservation
        (`more`: tokens sent besides the body)."""
        principal = call.principal
        if principal.models:
            self.check_model(principal, call.model_requested, route.model)
        limits = principal.limits
        budgets = principal.budgets
        if not budgets and not limits:
            return None
        now = call.ts
        for budget in budgets:
            if not budget.has_room(now):
                raise budget.refusal(now)
        tokens = usd = sent = 0
        if principal.estimates:
            # the body as sent, four bytes a token (walking a long agent request costs more than parsing it;
            # an image counts at its size, which only makes calls in flight beside it reserve more)
            sent = estimate_tokens(call.exchange.request.body) + more
            output = 0
            if not call.endpoint.endswith("embeddings"):
                if body is None:  # an endpoint that did not hand its body over: read it once more
                    body = parse_json_body(call.exchange.request.body)
                output = requested_output_tokens(body, RESERVED_OUTPUT_DEFAULT)
            tokens = sent + output
            if principal.priced:
                rates = self.usd_rates.get(route.requested) or self.rates_of(route)
                usd = sent * rates[0] + output * rates[1]
        if limits:
            try:
                for limit in limits:
                    limit.take(call.started, tokens)
            except GatewayError:
                for taken in limits[: limits.index(limit)]:  # the key's allowance when the user's ran out
                    taken.give_back(tokens)
                raise
        holds = []
        for budget in budgets:
            budget.reserved_usd += usd
            budget.reserved_tokens += tokens
            budget.in_flight += 1
            holds.append((budget, budget.start))
        return holds, usd, tokens, limits, sent

    @staticmethod
    def allows(principal: Principal, model: str) -> bool:
        """Does the key's allow-list admit `model`? Asked of a fallback before an admitted call's next
        attempt goes to it, and of each model a model list shows."""
        return not principal.models or any(glob_match(g, model) for g in principal.models)

    def rates_of(self, route: Route) -> tuple:
        """USD per input and per output token of the dearest model that may answer a call for `route`
        (its own, or a fallback's: parallel calls that fail over to a pricier model reserved that
        price, so together they cannot overspend either)."""
        if len(self.usd_rates) >= 4096:
            self.usd_rates.clear()
        models = self.chain_models(route) or (route.model,)
        rates = self.usd_rates[route.requested] = (
            max(self.prices.cost(model, Usage(1_000_000, 0)) for model in models) / 1e6,
            max(self.prices.cost(model, Usage(0, 1_000_000)) for model in models) / 1e6,
        )
        return rates

    @staticmethod
    def settle(reservation: Reservation, cost: float, used: int) -> None:
        holds, usd, tokens, limits, _ = reservation
        for budget, start in holds:
            budget.release(start, usd, tokens, cost, used)
        for limit in limits:
            limit.refund(tokens - used)


# ======================================================================================
# 11. Gateway: endpoints wired into the pipeline
# ======================================================================================
#
# Every model call takes one of three lanes:
#   passthrough  client protocol == provider protocol: body and stream bytes go through
#                untouched (model renamed at most) while a decoder observes usage;
#   translation  client codec -> canonical Request -> provider codec, and back;
#   loopback     the built-in model answers the canonical Request.


def release_frames(exc: BaseException) -> None:
    """Let go of what a handled request error's finished frames hold. An error kept where one of
    them can reach it (raised from a local, as send_upstream does) forms a cycle with its
    traceback, which would keep the request's body, answer and objects alive until the cyclic
    collector ran (rarely, by design: settle_collector); cleared, reference counting frees them
    as the request ends. Its causes and contexts are cleared too. (An error a request keeps to
    raise later, Walk.last_error, is kept without its traceback, since a request that then
    succeeds never comes here.) Only for errors raised in the request's own task: clearing
    the frame of a coroutine still suspended elsewhere would end that coroutine."""
    for _ in range(8):  # (a chain is a handful long; a loop in it ends here)
        if exc is None:
            return
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


CALL_OPERATIONS = {"openai": "chat", "anthropic": "messages", "gemini": "generate"}  # a model call, per protocol
MALFORMED_PLACES_SEEN: set[str] = set()  # where the last-resort guard caught something (Gateway.malformed)


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
    encoder: object = None  # the client's stream encoder, once a canonical lane streams
    prices: object = None  # the PriceTable in force when the model call began
    cost: float = 0.0  # USD, as its ledger row has it (record() prices the call once; metrics reuse it)
    attempts: int = 0  # upstream requests made (section 8)
    account: str = ""  # the account that answered, or failed last
    status: int = 0  # a failure after the 200 (a stream's error event): the ledger's status
    unconfirmed: tuple | None = None  # (account, trial, excused from) of an answer not shown yet (answer_broke)
    principal: Principal | None = None  # the key that authenticated the request (section 10)
    reservation: Reservation | None = None  # its hold on budgets and the token rate, until record()
    allow_listed: str = ""  # the model its key's allow-list admitted: a fallback's attempt is checked too
    upstream_answered: bool = False  # from here on, input nobody foresaw is the upstream's fault
    response_id: str = ""  # a passthrough Responses answer's id, kept while keys are required (Gateway.responses)

    def start_stream(self) -> None:
        if not self.exchange.started:
            self.exchange.start_stream(200, getattr(self.encoder, "content_type", "text/event-stream"))


# does a provider take a client's body in this protocol as it is (passthrough)?
SPEAKS = {
    "openai": lambda provider: provider.protocol == "openai",
    "anthropic": lambda provider: provider.protocol == "anthropic",
    "gemini": lambda provider: provider.protocol == "gemini",
    "responses": lambda provider: provider.speaks_responses,
    "none": lambda provider: False,
}


@dataclass(slots=True)
class Outbound:
    """What a model call sends upstream, whichever lane each attempt takes (Gateway.forward)."""

    body: dict | None  # the client's JSON body for passthrough; None: translation only
    operation: str  # its upstream operation: chat, messages, responses, generate, embeddings, count_tokens...
    native: object  # SPEAKS[...]: does a provider take `body` as it is?
    decode: object = None  # () -> (Request, stream encoder or None, event filter or None); None: no translation
    fallbacks: bool = True  # may the model's fallbacks answer?
    req: Request | None = None  # the canonical request, once decoded
    encoder: object = None
    event_filter: object = None
    hide_usage: bool = False  # usage was asked for the ledger: keep it from the client
    client_model: str | None = None  # the model the client's body names
    through: str = ""  # the name of the route's provider when it takes the body as it is (decided once)


class Heartbeat:
    """Keeps a stream audible while the upstream is silent: after `interval` seconds
    without a write, the client gets its protocol's keep-alive (committing the SSE
    response first if nothing was sent yet)."""

    def __init__(self, call: Call, interval: float, payload: bytes | None = None):
        self.call = call
        self.interval = interval
        self.payload = payload or call.codec.keepalive
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
            self.call.start_stream()
            ex.keep_alive(self.payload)
            idle = 0.0
        self.handle = self.loop.call_later(max(self.interval - idle, 0.05), self._tick)

    def cancel(self):
        self.handle.cancel()


REFUSED_ROWS_PER_SECOND = 20  # ledger rows for requests refused for their key (unauthenticated: bounded)


class RowThrottle:
    """At most `per_second` rows a second; counts what it held back."""

    __slots__ = ("per_second", "second", "taken", "skipped")

    def __init__(self, per_second: int):
        self.per_second, self.second, self.taken, self.skipped = per_second, -1, 0, 0

    def take(self, now: float) -> int | None:
        """None: no row this time; else a row, and how many were held back before it."""
        second = int(now)
        if second != self.second:
            self.second, self.taken = second, 0
        if self.taken >= self.per_second:
            self.skipped += 1
            return None
        self.taken += 1
        skipped, self.skipped = self.skipped, 0
        return skipped


def client_key_of(request: HttpRequest) -> str:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.headers.get("x-goog-api-key") or request.query.get("key", "")


class Gateway:
    def __init__(self, cfg: Config, ledger: Ledger | None = None):
        self.cfg = cfg
        self.pool = UpstreamPool(cfg.upstream_connect_timeout, cfg.upstream_read_timeout, cfg.upstream_first_byte_timeout,
                                 cfg.upstream_total_timeout, cfg.upstream_max_idle_per_origin, cfg.upstream_max_idle,
                                 cfg.upstream_idle_expiry)  # fmt: skip
        self.providers = build_providers(cfg)
        self.router = Router(cfg, self.providers)
        self.pools = Pools(cfg, self.providers, self.router)
        self.pool.watchdog.tick = watchdog_tick(self.providers.values())
        self.ledger = ledger or Ledger(cfg.ledger_path, cfg.ledger_queue_size)
        self.prices = PriceTable(cfg.prices)
        self.loopback = LoopbackModel()
        self.identity = Identity(cfg, self.ledger, self.prices)
        self.identity.chain_models = lambda route: tuple(pool.model for pool in self.pools.chain(route))
        self.admin = AdminApi(self)
        self.codecs: dict[str, Codec] = {
            "openai": OPENAI_CODEC, "anthropic": ANTHROPIC_CODEC, "responses": RESPONSES_CODEC, "gemini": GEMINI_CODEC,
        }  # fmt: skip
        self.responses_store = ResponseStore(self.ledger, cfg.responses_retention_days)
        self.catalog = ModelCatalog(self.router, self.pool, cfg.anthropic_version)
        self._upstream_headers: dict[tuple, dict] = {}
        self.started_at = time.time()
        self.cutting = False  # set at the shutdown deadline, when calls still running are cut
        self.listening_on = cfg.host  # host is read once (a changed one needs a restart)
        chat_completions = functools.partial(self.model_call, "openai", "chat")
        messages = functools.partial(self.model_call, "anthropic", "messages")
        self.routes = {
            ("GET", "/"): self.root,
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.list_models,
            ("POST", "/v1/chat/completions"): chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/v1/messages"): messages,
            ("POST", "/v1/messages/count_tokens"): self.count_tokens,
            ("GET", "/anthropic/v1/models"): self.list_models,
            ("POST", "/anthropic/v1/messages"): messages,
            ("POST", "/anthropic/v1/messages/count_tokens"): self.count_tokens,
            ("POST", "/v1/responses"): self.responses,
            ("POST", "/v1/responses/input_tokens"): self.responses_input_tokens,
            ("GET", "/v1beta/models"): self.gemini_list_models,
            ("POST", "/v1beta/openai/chat/completions"): chat_completions,
            ("GET", "/metrics"): self.metrics_text,
            ("GET", "/api/v1/usage/summary"): self.admin.usage_summary,
            ("GET", "/api/v1/usage/logs"): self.admin.usage_logs,
        }
        # (method, path) -> (the client's codec, the handler) of every fixed endpoint, as client_codec and find_handler say
        self.endpoints = {(method, path): (self.client_codec(path, method), handler)
                          for (method, path), handler in self.routes.items()}  # fmt: skip
        self.public = {"/", "/health"}  # every other path, present or future, needs a key once auth is required
        self.refused_rows = RowThrottle(REFUSED_ROWS_PER_SECOND)  # ledger rows of requests refused for their key
        self.listeners: dict[str, Listener] = {}  # name -> Listener, filled by start_listeners
        self.servers: dict[str, HttpServer] = {}
        self.telemetry = Telemetry(self)
        self.metrics = self.telemetry.metrics  # the registry: metrics.counter(name, help, labels).inc(values), ...
        self.telemetry.breakers.callback = self.pools.breaker_states

    def rebuild_pools(self) -> None:
        """After self.cfg, self.providers and self.router were made anew (live reload): the upstream
        accounts, chains and breaker settings follow (an account whose provider, URL and key stay
        keeps its breaker and counters), and so do the idle-connection caps and the watchdog's tick."""
        cfg = self.cfg
        self.pools.rebuild(cfg, self.providers, self.router)
        self.pool.timeouts = provider_timeouts(cfg, {})  # for requests of no provider's (model lists, the chat)
        self.pool.max_idle_per_origin, self.pool.max_idle = cfg.upstream_max_idle_per_origin, cfg.upstream_max_idle
        self.pool.idle_expiry = cfg.upstream_idle_expiry
        self.pool.watchdog.tick = watchdog_tick(self.providers.values())

    def close(self) -> None:
        self.catalog.close()
        self.pool.close()
        self.identity.close()  # first: its last-used times go through the ledger's writer
        self.ledger.close(self.cfg.shutdown_grace)
        self.responses_store.close()

    def apply_config(self, cfg: Config) -> tuple[list[str], list[str]]:
        """Take a new configuration while serving: (changed keys, those of them that need a
        restart). Everything is built first, so a configuration that fails (ConfigError) changes
        nothing; then it is swapped in one step with no await in between, so a request sees the
        old state or the new, never a mix, and keeps what it resolved at its start (its route,
        provider and key, its prices). Code that reads self.cfg after an await sees the new
        values: read what a request needs before its first await, or keep it on the Call.
        Extend this for state of your own that a configuration builds."""
        if not is_loopback_host(self.listening_on) and not cfg.allow_public_bind:
            if cfg.auth == "off" or cfg.auth_disabled:
                raise ConfigError(
                    f"the gateway listens on {self.listening_on}: auth cannot be turned off while it runs"
                )
            if not cfg.api_keys and not self.identity.has_keys:
                raise ConfigError(
                    f"the gateway listens on {self.listening_on}: api_keys cannot be removed while it runs"
                )
        providers = build_providers(cfg)
        router = Router(cfg, providers)
        prices = PriceTable(cfg.prices)
        Pools.fallbacks_of(cfg, router)  # model_fallbacks checked before anything changes
        if cfg.log_file:
            RotatingLogFile.check(cfg.log_file)  # as at startup: a log_file that cannot be written changes nothing
        catalog = ModelCatalog(router, self.pool, cfg.anthropic_version)
        changed = changed_settings(self.cfg, cfg)
        restart = [key for key in changed if key in RESTART_KEYS]
        old_catalog = self.catalog
        self.cfg, self.providers, self.router, self.prices = cfg, providers, router, prices
        self.catalog = catalog  # model lists fetched again, with the new providers and keys
        old_catalog.close()
        self._upstream_headers = {}
        self.rebuild_pools()  # accounts, breakers, chains, timeouts, idle-connection caps (section 8)
        self.ledger.queue_size = cfg.ledger_queue_size
        self.responses_store.retention = cfg.responses_retention_days * 86400
        self.telemetry.apply_config(cfg)  # log level, format and file, the access log
        self.identity.configure(cfg, prices)  # auth mode, static keys, default rate limits, prices
        return changed, restart

    # -- dispatch
    def error_body(self, path: str, err: GatewayError, listener: Listener | None = None) -> bytes:
        if listener is not None and listener.codec is not None and (not path or not listener.serves(path)):
            return dumps(listener.codec.encode_error(err))
        return dumps(self.client_codec(path).encode_error(err))

    def client_codec(self, path: str, method: str = "POST") -> Codec:
        """The protocol a client speaks, from the path it called (errors answer in it)."""
        if path.startswith(("/v1/messages", "/anthropic/")):
            return self.codecs["anthropic"]
        if path.startswith("/v1/responses"):
            return self.codecs["responses"]
        if path.startswith("/v1beta/models") or is_gemini_call_path(path, method):
            return self.codecs["gemini"]
        return self.codecs["openai"]

    def find_handler(self, request: HttpRequest):
        path = request.path.rstrip("/") or "/"
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler
        if is_gemini_call_path(path, request.method):
            if method != "POST":
                raise GatewayError(405, f"method {request.method} is not allowed on {path}; use POST")
            return self.gemini_call  # Gemini's /models/{model}:{method}
        if method == "GET" and path.startswith("/v1beta/models/"):
            return self.gemini_get_model
        if method == "GET" and path.startswith("/v1/models/"):
            return self.gemini_get_model if is_gemini_client(request) else self.get_model
        if path.startswith("/v1/responses/") and path.endswith("/input_items") and method == "GET":
            return self.response_input_items
        if path.startswith("/v1/responses/") and method in ("GET", "DELETE"):
            return self.get_response if method == "GET" else self.delete_response
        if path.startswith("/api/v1/admin/"):
            return self.admin.find(method, path)
        allowed = sorted({m for (m, p) in self.routes if p == path})
        if allowed:
            raise GatewayError(405, f"method {request.method} is not allowed on {path}; use {', '.join(allowed)}")
        raise GatewayError(404, f"no endpoint {request.method} {path}", "not_found_error")

    async def handle(self, request: HttpRequest, exchange: Exchange, listener: Listener | None = None) -> None:
        known = self.endpoints.get((request.method, request.path))  # the usual call: its protocol and handler at once
        codec = known[0] if known is not None else self.client_codec(request.path, request.method)
        call = Call(exchange, codec, request.path)
        CURRENT_REQUEST_ID.set(exchange.request_id)  # log lines of this request carry its id
        try:
            if listener is not None:
                listener.admit(request, call)
            handler = known[1] if known is not None else self.find_handler(request)
            if request.path not in self.public:
                self.authenticate(request, call)
                if self.ledger.full:  # backpressure: the writer is behind or failing
                    await self.ledger.wait_for_room()
            await handler(request, call)
        except GatewayError as err:
            if call.upstream_answered and isinstance(err, InvalidInput):  # a check failed on the answer
                err = malformed_answer(err.message)
            self.fail(call, err)
            release_frames(err)
        except (asyncio.CancelledError, ConnectionError):
            if self.cutting and not exchange.writer.transport.is_closing():
                self.cut_by_shutdown(call)
            else:
                call.error = "client disconnected"
                exchange.status = 499
            exchange.close_after = True
            raise
        except MALFORMED_INPUT as exc:  # input of a shape no check foresaw: its sender's fault, never a 500
            self.fail(call, self.malformed(call, request, exc))
            release_frames(exc)
        except Exception as exc:  # a bug: answer in the client's protocol, keep serving
            log.exception("internal error on %s %s", request.method, request.path)
            self.fail(call, GatewayError(500, f"internal gateway error ({type(exc).__name__}); see the gateway log"))
            release_frames(exc)
        finally:
            if call.ledgered:
                self.record(call)
            self.telemetry.request_ended(call)  # metrics and the access log line

    @staticmethod
    def malformed(call: Call, request: HttpRequest, exc: Exception) -> GatewayError:
        """The last resort behind the decoders' explicit checks: an error raised while reading a
        client's body is a 400, one raised while reading an upstream's answer a 502."""
        what = "JSON nested too deeply" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
        what = what[:200]
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_name}:{tb.tb_lineno}" if tb is not None else "?"
        # a gateway bug can land here too, as a 400 or 502: the first time each place is seen, its
        # traceback is logged (the places are the code's own: a bounded set, whatever clients send)
        shown = exc if where not in MALFORMED_PLACES_SEEN and len(MALFORMED_PLACES_SEEN) < 1024 else None
        MALFORMED_PLACES_SEEN.add(where)
        if call.upstream_answered:
            log.warning("upstream %s sent an answer of unexpected shape on %s (%s, at %s)", call.provider,
                        request.path, what, where, exc_info=shown)  # fmt: skip
            return GatewayError(502, f"upstream {call.provider} sent a malformed answer ({what})")
        log.warning("malformed request on %s %s (%s, at %s)", request.method, request.path, what, where, exc_info=shown)
        return bad_request(f"malformed request: a field has an unexpected type or shape ({what})")

    def authenticate(self, request: HttpRequest, call: Call) -> None:
        """Every path but the public ones: once keys are required (section 10), the key the client
        sent in its own protocol's place names its principal, or the request gets a 401."""
        key = client_key_of(request)
        if not self.identity.required:
            call.api_key_id = key_fingerprint(key) if key else ""
            return
        if not key:
            self.refuse_key(call, GatewayError(401, "missing API key: send it as 'Authorization: Bearer KEY', "
                                               "'x-api-key', 'x-goog-api-key' or '?key='", "authentication_error"))  # fmt: skip
        principal, refusal = self.identity.authenticate(key, call.ts)
        if principal is not None:
            call.principal = principal
            call.api_key_id = principal.label
            call.user = principal.email
        if refusal is not None:
            self.refuse_key(call, refusal)

    def refuse_key(self, call: Call, err: GatewayError) -> None:
        """A request refused for its key gets a ledger row (someone trying keys shows in `tgw logs`):
        its known key's id and user, or nothing of a key it does not know, and where it came from.
        Anyone can send such requests, so at most REFUSED_ROWS_PER_SECOND of them are rows; the next
        row says how many were not (the metrics and the access log count every one)."""
        skipped = self.refused_rows.take(call.started)
        if skipped is not None:
            call.ledgered = True
            peer = call.exchange.writer.get_extra_info("peername")
            more = f"; {skipped} more requests refused for their key since the last such row" if skipped else ""
            call.error = f"{err.message} (client {peer[0] if isinstance(peer, tuple) else 'unknown'}{more})"
        raise err

    def fail(self, call: Call, err: GatewayError) -> None:
        ex = call.exchange
        call.error = call.error or err.message
        if not ex.started:
            extra = [("Retry-After", str(int(err.retry_after)))] if err.retry_after else []
            ex.send_json(err.status, call.codec.encode_error(err), extra + list(err.headers))
        elif ex.streaming and not ex.finished:
            call.status = err.status  # the 200 went out (keep-alives): the ledger records the failure
            encoder = call.encoder
            ex.write(encoder.encode(StreamError(err)) if encoder is not None else call.codec.encode_stream_error(err))
            ex.end_stream()
            ex.close_after = True

    def cut_by_shutdown(self, call: Call) -> None:
        """A call still running at the shutdown deadline: a 503, or an error event in its stream,
        and a ledger row that says it was cut (not that the client left)."""
        ex = call.exchange
        err = GatewayError(
            503, f"the gateway is shutting down: this request was cut at the end of shutdown_grace "
            f"({self.cfg.shutdown_grace:g} s); retry it", "overloaded_error",
        )  # fmt: skip
        if ex.streaming and not ex.finished and call.encoder is None:
            ex.write(b"\n\n")  # a passthrough stream may be in the middle of an event: end it first
        self.fail(call, err)
        call.error = "cut by shutdown: " + err.message
        ex.status = 503

    def record(self, call: Call) -> None:
        ex = call.exchange
        usage = call.usage
        model = call.model_upstream or call.model_requested
        # milliseconds to 3 decimals; round(x) is cheap where round(x, 3) goes through dtoa
        latency = round((time.monotonic() - call.started) * 1e6) / 1000
        ttft = round((ex.first_byte_at - call.started) * 1e6) / 1000 if ex.first_byte_at else None
        if (
            call.reservation
            and call.reservation[2]
            and call.upstream_answered
            and not (usage.input_tokens or usage.output_tokens)
        ):
            usage = call.usage = self.estimated_usage(call)  # the model ran, its usage never came: estimated
        if call.lane == "loopback":
            cost = 0.0  # the built-in model is free, whatever model name it answered to
        else:
            try:
                cost = (call.prices or self.prices).cost(model, usage)
            except (TypeError, ValueError, OverflowError):  # counts an upstream got wrong: priced as sane numbers
                usage = Usage(*(max(ledger_int(getattr(usage, name)) or 0, 0) for name in Usage.__dataclass_fields__))
                cost = (call.prices or self.prices).cost(model, usage)
        call.cost = cost
        if call.reservation is not None:  # the call's budgets and token rate learn what it really cost
            self.settle(call, cost, usage)
        principal = call.principal
        row = (
            call.ts, ex.request_id, call.api_key_id, call.user, call.codec.name, call.endpoint, call.lane, call.provider,
            call.model_requested, model, int(call.stream), call.status or ex.status or 499, usage.input_tokens,
            usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens, cost, latency, ttft, str(call.error)[:1000],
            call.attempts, call.account, principal.key_id if principal else None, principal.user_id if principal else None,
        )  # fmt: skip
        self.ledger.record(row)

    @staticmethod
    def estimated_usage(call: Call) -> Usage:
        """A call whose upstream answered but reported no usage (the client left a stream before
        its usage chunk, or a server that never sends one): what its reservation estimated, so a
        budget or token rate cannot be had for free. The ledger row says it was estimated."""
        _, _, tokens, _, sent = call.reservation
        call.error = f"{call.error}; " if call.error else ""
        call.error += "usage not reported by the upstream: estimated from the request"
        return Usage(input_tokens=sent, output_tokens=max(tokens - sent, 0))

    def settle(self, call: Call, cost: float, usage: Usage) -> None:
        """A call's budgets and token rate learn what it really cost (never at the expense of its row)."""
        reservation, call.reservation = call.reservation, None
        try:
            used = usage.input_tokens + usage.output_tokens
        except TypeError:
            used = None
        if type(used) is not int:  # counts an upstream got wrong (an unpriced model is not sanitised above)
            used = max(ledger_int(usage.input_tokens) or 0, 0) + max(ledger_int(usage.output_tokens) or 0, 0)
        self.identity.settle(reservation, cost, used)

    # -- simple endpoints
    async def root(self, request: HttpRequest, call: Call) -> None:
        call.exchange.send_json(200, {"name": "tgw", "version": __version__, "status": "ok"})

    async def metrics_text(self, request: HttpRequest, call: Call) -> None:
        pieces = []
        for piece in self.metrics.pieces():
            pieces.append(piece)
            await asyncio.sleep(0)  # (the worst case, 10,000 series of each metric, is ~50,000 lines)
        call.exchange.send(200, b"".join(pieces), PROMETHEUS_CONTENT_TYPE)

    async def health(self, request: HttpRequest, call: Call) -> None:
        providers = {
            name: {
                "protocol": p.protocol,
                "configured": p.configured,
                **({"base_url": public_url(p.base_url)} if p.base_url else {}),
            }
            for name, p in self.providers.items()
        }
        ledger = self.ledger.status()
        healthy = ledger["state"] == "running"  # a gateway that cannot record what it serves is not ok
        accounts = self.pools.describe()
        if local_caller(request, call.exchange):  # an upstream's words (which may quote part of a key) stay local
            for account in accounts.values():
                account.pop("last_error")
        call.exchange.send_json(200 if healthy else 503, {
            "status": "ok" if healthy else "degraded", "version": __version__, "work_mode": self.cfg.work_mode,
            "offline": self.router.offline, "routes": [f"{g}=>{p}" for g, p in self.router.rules],
            "aliases": {**self.router.aliases, **dict(self.router.alias_globs)}, "providers": providers,
            "accounts": accounts,
            "upstream": {"attempts": self.pools.attempts, "retries": self.pools.retries,
                         "failovers": self.pools.failovers, "idle_connections": self.pool.idle_count},
            "uptime_s": round(time.time() - self.started_at, 1), "ledger_rows_written": self.ledger.written,
            "ledger": ledger,
        })  # fmt: skip

    async def list_models(self, request: HttpRequest, call: Call) -> None:
        if is_gemini_client(request):
            await self.gemini_list_models(request, call)
            return
        models = await self.listed_models(call)
        if "anthropic-version" in request.headers or "x-api-key" in request.headers:
            data = [{"type": "model", "id": m.id, "display_name": m.display_name or m.id,
                     "created_at": m.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created or 1735689600))}
                    for m in models]  # fmt: skip
            first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
            body = {"data": data, "has_more": False, "first_id": first, "last_id": last}
        else:
            body = {
                "object": "list",
                "data": [{"id": m.id, "object": "model", "created": m.created, "owned_by": m.provider} for m in models],
            }
        call.exchange.send_json(200, body)

    async def listed_models(self, call: Call) -> list:
        """The catalog as the caller's key may use it: model pickers offer only what its allow-list admits."""
        models = await self.catalog.models()
        principal = call.principal
        if principal is None or not principal.models:
            return models
        return [m for m in models if Identity.allows(principal, m.id) or self.admits_alias(principal, m.id)]

    def admits_alias(self, principal: Principal, model: str) -> bool:
        """An alias of an allowed model may be called (Identity.check_model), so it is listed too."""
        try:
            return Identity.allows(principal, self.router.resolve(model).model)
        except GatewayError:  # a listed name this config no longer routes
            return False

    async def get_model(self, request: HttpRequest, call: Call) -> None:
        model = request.path[len("/v1/models/") :]
        route = self.router.resolve(model)
        if call.principal is not None:  # a model outside the key's allow-list is not described to it
            self.identity.check_model(call.principal, model, route.model)
        call.exchange.send_json(200, {"id": model, "object": "model", "created": 0, "owned_by": route.provider.name})

    # -- model calls
    @staticmethod
    def model_call_body(call: Call, request: HttpRequest) -> dict:
        """A model call's JSON body. From here on the call has its ledger row however it ends: one
        refused for its body (not JSON, no model) shows in `tgw logs` like one refused for its budget."""
        call.ledgered = True
        return parse_json_body(request.body)

    def begin_model_call(self, call: Call, model: str, stream: bool, body: dict | None = None, more: int = 0) -> Route:
        """Every model call starts here, once model_call_body has read its body (and so given it its
        ledger row): its route, and (for a key with an allow-list, a budget or a rate limit) its
        admission, which may refuse it. `body` is the parsed request; `more` tokens go with it
        besides its body (a stored conversation)."""
        call.prices = self.prices  # the prices of the config this call started with (see apply_config)
        call.model_requested = model
        call.stream = stream
        route = self.router.resolve(model)
        call.provider = route.provider.name
        call.model_upstream = route.model
        if call.principal is not None and call.principal.guarded:
            call.reservation = self.identity.admit(call, route, body, more)
            if call.principal.models:
                call.allow_listed = route.model
        return route

    async def model_call(self, native_protocol: str, operation: str, request: HttpRequest, call: Call) -> None:
        """A Chat Completions or Messages call (their endpoints' handlers are this, given the protocol
        and operation): passthrough to a provider that speaks the client's protocol, the canonical
        lanes otherwise."""
        body = self.model_call_body(call, request)
        model = field_of(body, "model", str, required=True)
        stream = bool(field_of(body, "stream", bool, default=False))
        route = self.begin_model_call(call, model, stream, body)
        codec = call.codec
        await self.forward(request, call, route, Outbound(body, operation, SPEAKS[native_protocol],
                                                          lambda: (codec.decode_request(body), None, None)))  # fmt: skip

    async def count_tokens(self, request: HttpRequest, call: Call) -> None:
        """Anthropic's own count on passthrough; otherwise an estimate of everything sent."""
        body = parse_json_body(request.body)
        model = field_of(body, "model", str, required=True)
        call.codec.decode_request(body)  # the same validation as a real call
        route = self.router.resolve(model)
        if call.principal is not None:
            self.identity.check_model(call.principal, model, route.model)
        if route.provider.protocol == "anthropic" and self.cfg.work_mode != "translation":
            await self.forward(
                request, call, route, Outbound(body, "count_tokens", SPEAKS["anthropic"], fallbacks=False)
            )
            return
        call.exchange.send_json(200, {"input_tokens": anthropic_count_tokens_estimate(body)})

    async def forward(self, request: HttpRequest, call: Call, route: Route, out: Outbound) -> dict | None:
        """Answer a model call. Loopback answers it here; otherwise each attempt goes to the next
        account of the route's chain (section 8): by passthrough when that account's provider
        speaks the client's protocol, by translation when it speaks another. Returns the response
        object a translated answer gave the client (the Responses lane stores it)."""
        lane = self.lane_of(call, route, out)
        if lane != "passthrough":
            req = self.canonical(call, out)  # decoded now: a bad request is a 400 before anything is sent
            if lane == "loopback":
                result = self.loopback.complete(req)
                return self.answer(
                    call, req, result, out.encoder, self.loopback.stream_events(result), out.event_filter
                )
        if out.body is not None:
            out.client_model = out.body.get("model")
            if call.stream and call.codec.name == "openai":
                options = out.body.get("stream_options")
                options = options if isinstance(options, dict) else {}
                if not options.get("include_usage"):  # ask anyway, for the ledger; the client will not see it
                    out.body["stream_options"] = {**options, "include_usage": True}
                    out.hide_usage = True
        heartbeat = (
            Heartbeat(call, self.cfg.stream_keepalive, getattr(out.encoder, "keepalive", None)) if call.stream else None
        )
        try:
            walk = Walk(self.pools.chain(route, out.fallbacks), self.cfg.upstream_retries)
            while True:
                resp, account, trial = await self.send_upstream(call, walk, request, out)
                try:
                    if call.lane != "passthrough":
                        response = await self.relay_translated(call, resp, account.provider, out)
                    elif resp.event_stream:
                        response = await self.relay_passthrough_stream(call, resp, heartbeat, out.hide_usage)
                    else:
                        response = self.relay_passthrough(call, resp, await resp.read())
                    self.answer_shown(call)  # (a stream's was at its first content)
                    return response
                except Unanswered as unanswered:  # the stream opened with an error: the client saw none of it
                    call.unconfirmed = None
                    call.usage = Usage()  # what its opening reported was not billed (the next answer's is)
                    call.upstream_answered = False  # what the next attempt meets first is the request again
                    walk.answered(account, call.model_upstream, unanswered.error, trial)
                except GatewayError as err:  # a whole answer cut, timed out or not JSON: the account failed
                    self.answer_broke(call, err)
                    raise
                finally:
                    account.end(trial)
        finally:
            if heartbeat:
                heartbeat.cancel()

    def lane_of(self, call: Call, route: Route, out: Outbound) -> str:
        """The lane of the route's own provider (a fallback's attempt may take another one), or
        the 400 of a request that cannot be answered as work_mode says."""
        provider = route.provider
        if self.passes_through(out, provider):
            call.lane = "passthrough"
            out.through = provider.name  # (each account of its pool is a Provider of this name)
        elif out.decode is None:
            raise bad_request(
                f"model {call.model_requested!r} is served by {provider.name!r}, which cannot answer this"
            )
        elif provider.protocol == "loopback":
            call.lane = "loopback"
        elif self.cfg.work_mode == "passthrough":
            raise bad_request(
                f"work_mode=passthrough refuses translation: this endpoint speaks {call.codec.name} but model "
                f"{call.model_requested!r} is served by {provider.name!r}, which speaks {provider.protocol}"
            )
        else:
            call.lane = "translation"
        return call.lane

    def passes_through(self, out: Outbound, provider: Provider) -> bool:
        """Does `provider` take the client's body as it is (the passthrough lane)?"""
        return (
            out.body is not None
            and out.native(provider)
            and (self.cfg.work_mode != "translation" or out.decode is None)
        )

    def canonical(self, call: Call, out: Outbound) -> Request:
        """The call's canonical request, decoded once (when a lane first needs it), with the
        loop guard applied and the client's stream encoder made."""
        if out.req is None:
            req, encoder, event_filter = out.decode()
            if out.hide_usage:  # forward asked a passthrough upstream for usage in the client's body, not the client
                req.include_usage = False
            call.user = call.user or req.user
            if self.cfg.loop_guard:
                guard_tool_loops(req, self.cfg.loop_guard_window, self.cfg.loop_guard_warn, self.cfg.loop_guard_stop)
            if req.stream and encoder is None:
                encoder = call.codec.stream_encoder(req)
            if event_filter is not None and encoder is not None:
                encoder = FilteredEncoder(encoder, event_filter)
            out.req, out.encoder, out.event_filter = req, encoder, event_filter
            call.encoder = encoder
        return out.req

    def outbound_request(self, call: Call, request: HttpRequest, out: Outbound, provider: Provider, model: str):
        """What one attempt sends `provider` for `model`: (url, body, upstream codec, lane). A
        provider of another protocol gets the request by translation; GatewayError when that
        is not allowed or not possible (the attempt loop then skips the provider)."""
        if provider.name == out.through or self.passes_through(out, provider):
            body = request.body
            if out.hide_usage or (out.client_model is not None and out.client_model != model):
                out.body["model"] = model  # Gemini names it in the URL instead
                body = dumps(out.body)
            return provider.url(out.operation, model, call.stream), body, call.codec, "passthrough"
        if out.decode is None or self.cfg.work_mode == "passthrough":
            raise GatewayError(
                400, f"provider {provider.name!r} does not speak {call.codec.name} and cannot translate this"
            )
        req = self.canonical(call, out)
        codec = self.codecs[provider.protocol]
        body = dumps(codec.encode_request(req, model, provider))
        return provider.url(CALL_OPERATIONS[provider.protocol], model, req.stream), body, codec, "translation"

    def answer(
        self, call: Call, req: Request, result: Response, encoder, events=None, event_filter=None
    ) -> dict | None:
        """Send a whole canonical Response: as a stream (`events`, by default the unfolded
        result) or as one JSON body."""
        call.usage = result.usage
        if encoder is None and event_filter is not None:  # the same filter a stream would pass through
            result = fold_events(e for ev in unfold_response(result) for e in event_filter(ev))
        if encoder is not None:
            self.emit_events(call, encoder, events if events is not None else unfold_response(result))
            call.exchange.end_stream()
            return getattr(encoder, "response", None)
        data, body = call.codec.response_json(result, req)
        call.exchange.send(200, data)
        return body

    def emit_events(self, call: Call, encoder, events) -> None:
        """A whole answer streamed: every event encoded, then one write."""
        call.start_stream()
        out = []
        for ev in events:
            self.observe(call, ev)
            out.append(encoder.encode(ev))
        call.exchange.write(b"".join(out))

    @staticmethod
    def observe(call: Call, ev) -> None:
        if isinstance(ev, (MessageStart, MessageDelta)):
            if ev.usage is not None:
                call.usage = ev.usage
            if type(ev) is MessageStart and call.principal is not None:
                call.response_id = ev.id
        elif isinstance(ev, StreamError):
            call.error = ev.error.message
            call.status = ev.error.status  # the stream failed after its 200: the ledger says so

    async def relay_translated(self, call: Call, resp: UpstreamResponse, provider: Provider, out: Outbound):
        """An upstream's answer in another protocol, converted for the client."""
        codec = self.codecs[provider.protocol]
        if resp.event_stream and out.encoder is not None:
            await self.relay_translated_stream(call, resp, codec, out.req, out.encoder)
            return getattr(out.encoder, "response", None)
        if resp.event_stream:  # asked for a whole answer, it streamed (some compatible servers always do)
            result = await self.whole_from_stream(resp, codec, provider)
        else:
            result = codec.decode_response(json_or_502(await resp.read(), provider.name))
        return self.answer(call, out.req, result, out.encoder, None, out.event_filter)

    @staticmethod
    async def whole_from_stream(resp: UpstreamResponse, codec: Codec, provider: Provider) -> Response:
        """The whole answer of an upstream that streamed it: its events folded into one Response
        (at most WHOLE_FROM_STREAM_MAX bytes of stream; an error event in it is the answer's error)."""
        decoder, parser, events, size = codec.stream_decoder(), SSEParser(), [], 0
        try:
            while chunk := await resp.next_chunk():
                size += len(chunk)
                if size > WHOLE_FROM_STREAM_MAX:
                    raise GatewayError(502, f"upstream {provider.name} streamed more than "
                                       f"{WHOLE_FROM_STREAM_MAX >> 20} MB for a whole answer")  # fmt: skip
                for sse in parser.feed_lazily(chunk):
                    events += upstream_events(decoder.feed, sse)
            for sse in parser.finish():
                events += upstream_events(decoder.feed, sse)
            events += upstream_events(decoder.finish)
        finally:
            resp.close() if not resp.done else resp.release()
        error = next((ev.error for ev in events if type(ev) is StreamError), None)
        if error is not None:
            raise error
        return fold_events(events)

    async def relay_translated_stream(
        self, call: Call, resp: UpstreamResponse, upstream_codec: Codec, req: Request, encoder
    ) -> None:
        ex = call.exchange
        decoder = upstream_codec.stream_decoder()
        parser = SSEParser()
        held: list = []  # the stream's opening (MessageStart), kept until its first content
        batch: list = []  # the client's bytes for the upstream read at hand: one write per read, not per event

        def emit(events, opening: bool = True) -> bool:
            """Encode events for the client; False once an error has ended the stream."""
            for ev in events:
                if held is not None:
                    if opening and len(held) < 64 and self.still_opening(ev):
                        held.append(ev)  # (bounded: an upstream that only ever opens gets no more chances)
                        continue
                    self.opening_failed(call, ev)
                    release()
                if type(ev) is not BlockDelta:  # deltas carry no usage and no error
                    self.observe(call, ev)
                batch.append(encoder.encode(ev))
                if type(ev) is StreamError:
                    return False
            return True

        def release() -> None:
            nonlocal held
            if held is not None:
                self.stream_shows_content(call)
                opening, held = held, None
                emit(opening, False)

        def send() -> None:
            if batch:
                ex.write(b"".join(batch))
                batch.clear()

        try:
            going = True
            first_sent = False
            while going and (chunk := await resp.next_chunk()):
                for sse in parser.feed_lazily(chunk):
                    going = emit(upstream_events(decoder.feed, sse))
                    if not going:
                        break
                    if not first_sent and held is None:  # the first content goes at once, not after the burst
                        send()
                        first_sent = True
                send()
                await ex.drain()
            if going:
                going = all(emit(upstream_events(decoder.feed, sse)) for sse in parser.finish())
                going = going and emit(upstream_events(decoder.finish))
            release()
        except GatewayError as err:  # the upstream broke mid-stream: tell the client in-stream
            if held is not None:
                self.answer_broke(call, err)
            emit([StreamError(err)], False)
        finally:
            resp.close() if not resp.done else resp.release()
        send()
        ex.end_stream()

    @staticmethod
    def still_opening(ev) -> bool:
        """Is this event part of a stream's opening, before any content? An error the upstream
        opens its stream with (overloaded, rate limited) is raised as Unanswered: nothing has
        reached the client, so the attempt loop can still go to another account."""
        if type(ev) is MessageStart:
            return True
        if type(ev) is StreamError and ev.error.status in STREAM_FAILOVER_STATUSES:
            raise Unanswered(ev.error)
        return False

    @staticmethod
    def stream_shows_content(call: Call) -> None:
        """The first content (or the end) of a stream: its head goes out, and its account succeeded."""
        call.start_stream()
        Gateway.answer_shown(call)

    @staticmethod
    def answer_shown(call: Call) -> None:
        """An answer (or a stream's first content) reached the client: its account succeeded."""
        if call.unconfirmed is not None:
            call.unconfirmed[0].succeeded()  # (a healthy account has nothing to reset)
            call.unconfirmed = None

    @staticmethod
    def opening_failed(call: Call, ev) -> None:
        """The first event after a stream's opening: an error (a cut stream, an upstream's own
        error event of a status that does not fail over) is its account's failure."""
        if type(ev) is StreamError:
            Gateway.answer_broke(call, ev.error)

    @staticmethod
    def answer_broke(call: Call, err: GatewayError) -> None:
        """An answer (whole, or a stream before any content) cut, timed out or broken before it
        reached the client: a failure of its account (not asked again for this request: the
        upstream may have run it), unless the request's own deadline cut a later attempt short."""
        if call.unconfirmed is None or err.status not in BREAKER_STATUSES:
            return
        account, trial, excused_from = call.unconfirmed
        call.unconfirmed = None
        now = time.monotonic()
        if now < excused_from:
            account.failed(err.status, err.message, now, trial)

    @staticmethod
    def relay_passthrough(call: Call, resp: UpstreamResponse, data: bytes) -> None:
        """Same protocol on both sides, a whole answer: its bytes go to the client as they are,
        usage observed (streams: relay_passthrough_stream)."""
        json_passthrough(data, call.provider)
        call.usage = call.codec.usage_of(data)
        if call.principal is not None and call.codec is RESPONSES_CODEC:  # whose it is (Gateway.responses)
            call.response_id = responses_answer_id(data)
        if call.exchange.started:  # a keep-alive already opened a stream: finish it with the body
            call.exchange.write(data)
            call.exchange.end_stream()
        else:
            call.exchange.send(resp.status, data, relayed_content_type(resp.headers))

    async def relay_passthrough_stream(self, call: Call, resp: UpstreamResponse, heartbeat, hide_usage: bool) -> None:
        ex = call.exchange
        observer = call.codec.stream_decoder()
        parser = SSEParser()
        held: list | None = []  # the stream's opening bytes, kept until its first content (still_opening)
        skippable = call.codec.skippable
        try:
            while chunk := await resp.next_chunk():
                # once content flows, whole events with no error in them go out before they are
                # read, so a burst's first token waits for nobody
                sent = held is None and not hide_usage and not parser.buffer and b"error" not in chunk
                if sent:
                    ex.write(chunk)
                kept = []  # hide_usage: the events the client gets
                for raw in parser.feed_raw(chunk):
                    if held is None and skippable(raw):
                        kept.append(raw)
                        continue
                    sse = SSEParser.parse(raw)
                    if sse is None:
                        continue
                    for ev in upstream_events(observer.feed, sse):  # bytes go on as sent; usage is read
                        if held is not None and not self.still_opening(ev):
                            self.opening_failed(call, ev)
                            held = self.release_opening(call, held)
                        self.observe(call, ev)
                    if not (hide_usage and is_usage_only_chunk(sse)):
                        kept.append(raw)
                if not sent:
                    data = b"".join(kept) if hide_usage else chunk
                    if call.error:
                        data = redact.raw(data)  # an upstream error event may quote a key
                    if held is None:
                        ex.write(data)
                    else:
                        held.append(data)
                        if len(held) < 256 and sum(map(len, held)) < HOLD_LIMIT:
                            continue
                        held = self.release_opening(call, held)  # an opening that never ends is sent as it is
                if heartbeat is not None and not hide_usage:
                    heartbeat.mid_event = bool(parser.buffer)
                await ex.drain()
            tail = list(parser.finish())  # an unterminated last event (its bytes went out already, unless held)
            last = [ev for sse in tail for ev in upstream_events(observer.feed, sse)]
            last += upstream_events(observer.finish)  # streams without an end event (Gemini) settle usage here
            if held is not None:
                self.opening_failed(call, next((ev for ev in last if type(ev) is not MessageStart), None))
                held = self.release_opening(call, held)
            for sse in tail:  # (its bytes went out as they came, but for hide_usage: then all but a usage chunk)
                ex.write(b"\n\n" if not hide_usage else b"" if is_usage_only_chunk(sse) else sse.raw)
            for ev in last:
                self.observe(call, ev)
        except GatewayError as err:
            if held is not None:
                self.answer_broke(call, err)
                held = self.release_opening(call, held)
            call.error, call.status = err.message, err.status
            cut = b"\n\n" if parser.buffer and not hide_usage else b""  # end the half-sent event first
            ex.write(cut + call.codec.encode_stream_error(err))
        finally:
            resp.close() if not resp.done else resp.release()
        ex.end_stream()

    def release_opening(self, call: Call, held: list) -> None:
        """A passthrough stream's first content: what it opened with goes out first."""
        self.stream_shows_content(call)
        for data in held:
            call.exchange.write(data)

    async def send_upstream(self, call: Call, walk: Walk, request: HttpRequest, out: Outbound) -> tuple:
        """The attempt loop: the one place that decides retries and failover, for every lane
        (section 8 says how the next account is chosen). Nothing but keep-alive pings can have
        reached the client while it runs, so after each failure it may move on:
          - a connection that could not be made never reached the model: that account may be
            asked again (upstream_retries) once the others were;
          - a 429/5xx/529 (or 401/403) answer: the next account or fallback model, the same
            account again after a backoff (or its Retry-After) when none is left;
          - a request sent but not answered (a timeout, a dropped connection) may be running
            upstream, so it is never sent again: the client gets that error.
        All within one deadline: the first account's total timeout. Returns (response, account,
        trial) for the first answer below 400, and the caller ends the account's exchange when
        it has relayed it (and calls again, with the same walk, when a stream opened with an
        error: Unanswered). When every attempt fails the client gets the last upstream's status
        and words."""
        pools = self.pools
        now = time.monotonic()
        while True:
            target = walk.next(now)
            if target is None:
                wait = walk.wait
                if wait and wait <= MAX_RETRY_WAIT and now + wait < walk.end_by:
                    await asyncio.sleep(wait)
                    now = time.monotonic()
                    continue
                raise gateway_key_refused(call, walk.last_error or walk.refusal(now))
            account, model, again = target
            if walk.last_error is not None and now >= walk.end_by:  # no time left to ask anyone else
                raise gateway_key_refused(call, walk.last_error)
            if call.allow_listed and model != call.allow_listed and not Identity.allows(call.principal, model):
                continue  # a fallback outside the key's allow-list
            provider = account.provider
            try:
                url, body, codec, lane = self.outbound_request(call, request, out, provider, model)
            except GatewayError as err:  # this provider cannot take the request: the next one may
                walk.cannot_take(account, err)
                continue
            timeouts = provider.timeouts
            first = not call.attempts  # (each prompt of a multi-prompt completion has a walk of its own)
            end_by = walk.end_by = walk.end_by or call.started + timeouts.total  # the first account's bounds all
            call.attempts += 1
            call.provider, call.model_upstream, call.account, call.lane = provider.name, model, account.name, lane
            call.exchange.tags = account.tags(model, call.attempts)
            pools.attempts += 1
            if again:
                pools.retries += 1
                self.telemetry.retries.inc((provider.name,))
            elif call.attempts > 1:
                pools.failovers += 1
                self.telemetry.failovers.inc((walk.previous, provider.name))
            walk.previous = provider.name
            trial = account.begin(now)
            until = now + timeouts.total  # this account's own total, within the request's
            try:
                headers = self.upstream_headers(provider, request)
                resp = await self.pool.request(
                    "POST", url, headers, body, timeouts, until if until < end_by else end_by
                )
            except UpstreamUnreached as err:
                account.end(trial)
                now = time.monotonic()
                if first or until <= end_by or now < end_by:  # (a later attempt cut by the request's deadline: no)
                    account.failed(err.status, err.message, now, trial)
                walk.failed(account, model, now, True)
                walk.last_error = err
                continue
            except GatewayError as err:
                account.end(trial)
                now = time.monotonic()
                if first or until <= end_by or now < end_by:
                    account.failed(err.status, err.message, now, trial)
                raise
            except BaseException:
                account.end(trial)
                raise
            if resp.status < 400:
                # a success once its answer shows content (it may fail first; see answer_broke)
                call.unconfirmed = (account, trial, end_by if not first and until > end_by else math.inf)
                call.upstream_answered = True
                return resp, account, trial
            try:
                error_body = await resp.read(4 * 1024 * 1024)
            except GatewayError:
                error_body = b""
            finally:
                account.end(trial)
            err = codec.decode_error(resp.status, error_body)
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            # what the client is told to wait, too: never longer than a breaker would (not an upstream's day)
            err.retry_after = retry_after if retry_after is None else min(retry_after, pools.settings.cooldown_max)
            if not walk.answered(account, model, err, trial):
                raise err
            now = time.monotonic()

    def upstream_headers(self, provider: Provider, request: HttpRequest) -> dict:
        """The provider's headers plus the API version and beta flags the client chose: built once
        per combination and shared, never changed (the pool caches request heads by them)."""
        sent = request.headers
        if provider.protocol == "anthropic":
            version, beta = sent.get("anthropic-version") or self.cfg.anthropic_version, sent.get("anthropic-beta")
        elif provider.protocol == "openai":
            version, beta = None, sent.get("openai-beta")
        else:
            return provider.auth_headers()
        # keyed by the provider object (each account of a pool is one, with its own key); the
        # entry holds it, so its id cannot be reused while cached
        key = (id(provider), version, beta)
        cached = self._upstream_headers.get(key)
        if cached is not None and cached[0] is provider:
            return cached[1]
        headers = dict(provider.auth_headers())
        if version is not None:
            headers["anthropic-version"] = version
        if beta is not None:
            headers["anthropic-beta" if provider.protocol == "anthropic" else "OpenAI-Beta"] = beta
        if len(self._upstream_headers) >= 1024:  # beta flags are the client's to choose
            self._upstream_headers.clear()
        self._upstream_headers[key] = (provider, headers)
        return headers

    # -- legacy Completions
    async def completions(self, request: HttpRequest, call: Call) -> None:
        """POST /v1/completions: passthrough to OpenAI-compatible servers, translated for the rest
        (see CompletionsCodec)."""
        body = self.model_call_body(call, request)
        model = field_of(body, "model", str, required=True)
        stream = bool(field_of(body, "stream", bool, default=False))
        call.codec = COMPLETIONS_CODEC
        route = self.begin_model_call(call, model, stream, body)

        def one_request():
            reqs = COMPLETIONS_CODEC.decode_request(body)
            if len(reqs) > 1:  # several prompts (or n) are asked one after another, below: not as one request
                raise bad_request("several prompts or choices can only be translated from the model's own provider")
            return reqs[0], None, None

        out = Outbound(body, "completions", SPEAKS["openai"], one_request)
        reqs = [] if self.lane_of(call, route, out) == "passthrough" else COMPLETIONS_CODEC.decode_request(body)
        if len(reqs) <= 1:
            await self.forward(request, call, route, out)
            return
        results = [await self.complete_unsent(request, call, route, req) for req in reqs]
        answer = COMPLETIONS_CODEC.encode_choices(results, reqs)
        call.usage = OPENAI_CODEC.decode_usage(answer["usage"])
        call.exchange.send_json(200, answer)

    async def complete_unsent(self, request: HttpRequest, call: Call, route: Route, req: Request) -> Response:
        """One whole canonical answer, not sent to the client (choices asked one after another),
        through the attempt loop like any other."""
        if route.provider.protocol == "loopback":
            return self.loopback.complete(req)
        out = Outbound(None, "chat", SPEAKS["none"], lambda: (req, None, None))
        walk = Walk(self.pools.chain(route), self.cfg.upstream_retries)
        resp, account, trial = await self.send_upstream(call, walk, request, out)
        try:
            codec = self.codecs[account.provider.protocol]
            answer = codec.decode_response(json_or_502(await resp.read(), account.provider.name))
        except GatewayError as err:
            self.answer_broke(call, err)
            raise
        finally:
            account.end(trial)
        self.answer_shown(call)
        return answer

    # -- Responses API
    async def responses(self, request: HttpRequest, call: Call) -> None:
        body = self.model_call_body(call, request)
        model = call.model_requested = field_of(body, "model", str, required=True)
        stream = bool(field_of(body, "stream", bool, default=False))
        previous = field_of(body, "previous_response_id", str)
        history: list = []
        full_input: list = []
        owner = call.principal.owner if call.principal is not None else None  # a key sees only its own
        out = Outbound(body, "responses", SPEAKS["responses"])
        stored = await self.responses_store.load(previous, owner) if previous else None
        # the provider goes on only from what it keeps: a conversation this gateway stored (answered
        # by translation, or by a fallback) goes on by translation, whichever provider the model has now
        through = (
            bool(previous)
            and self.passes_through(out, self.router.resolve(model).provider)
            and (stored is None or bool(stored["response"].get(PASSTHROUGH_MARK)))
        )
        if previous:
            if (through and owner is not None and stored is None) or (
                not through and (stored is None or stored["response"].get(PASSTHROUGH_MARK))
            ):
                raise response_not_found("previous_response_id", previous)  # unknown, or another key's
            if not through:
                history = stored["input"] + stored["response"].get("output", [])
        # a budget reserves the stored history too: it goes with the call (the provider's own, unseen, does not)
        route = self.begin_model_call(call, model, stream, body, estimate_tokens(dumps(history)) if history else 0)
        if through:
            out.fallbacks = False  # OpenAI keeps the state of previous_response_id: only it can go on
        else:
            if previous:
                out.body = None  # the stored history goes with every attempt: translation only

            def decode():
                full_input[:] = history + responses_input_items(body.get("input"))
                req = call.codec.decode_request({**body, "input": full_input})
                fixer = ShellArgumentsFixer(req)  # Codex `shell` arguments from models that send a string
                return req, None, fixer if fixer.tools else None

            out.decode = decode
        result = await self.forward(request, call, route, out)
        if result and body.get("store") is not False and result.get("status") in ("completed", "incomplete"):
            self.responses_store.save(result, full_input, owner or "")
        elif call.lane == "passthrough" and owner is not None and call.response_id:
            # the provider keeps it; the gateway remembers whose it is, so only that key may read or continue it
            self.responses_store.save({"id": call.response_id, PASSTHROUGH_MARK: True}, [], owner)

    async def get_response(self, request: HttpRequest, call: Call) -> None:
        response_id = request.path.rstrip("/").rsplit("/", 1)[-1]
        stored = await self.stored_response(call, response_id)
        if stored is None or stored["response"].get(PASSTHROUGH_MARK):
            await self.forward_response_request(request, call, response_id)
            return
        call.exchange.send_json(200, stored["response"])

    async def delete_response(self, request: HttpRequest, call: Call) -> None:
        response_id = request.path.rstrip("/").rsplit("/", 1)[-1]
        stored = await self.stored_response(call, response_id)
        if stored is None or stored["response"].get(PASSTHROUGH_MARK):
            await self.forward_response_request(request, call, response_id)
        else:
            call.exchange.send_json(200, {"id": response_id, "object": "response.deleted", "deleted": True})
        if stored is not None:
            self.responses_store.delete(response_id)

    async def response_input_items(self, request: HttpRequest, call: Call) -> None:
        """GET /v1/responses/{id}/input_items: what a stored response was given (its conversation
        so far), a page at a time as OpenAI lists them; one the provider keeps is asked of it."""
        response_id = request.path[len("/v1/responses/") : -len("/input_items")].strip("/")
        stored = await self.stored_response(call, response_id)
        if stored is None or stored["response"].get(PASSTHROUGH_MARK):
            query = request.target.partition("?")[2]
            await self.forward_response_request(
                request, call, response_id, "/input_items" + ("?" + query if query else "")
            )
            return
        call.exchange.send_json(200, input_items_page(response_id, stored["input"], request.query))

    async def stored_response(self, call: Call, response_id: str) -> dict | None:
        """The stored response `response_id`, if the caller's key may see it. While keys are
        required, one this gateway knows nothing of is a 404: the provider's shared key would
        show any key's answers made on the passthrough lane (those are remembered by owner)."""
        owner = call.principal.owner if call.principal is not None else None
        stored = await self.responses_store.load(response_id, owner)
        if stored is None and owner is not None:
            raise response_not_found("response", response_id)
        return stored

    async def forward_response_request(self, request: HttpRequest, call: Call, response_id: str, tail: str = ""):
        """A response this gateway did not store was made on the passthrough lane: the
        provider with a Responses API keeps it (`tail`: a sub-resource and its query)."""
        provider = self.providers["openai"]
        if not (provider.speaks_responses and provider.configured):
            raise response_not_found("response", response_id)
        url = f"{provider.url('responses')}/{quote(response_id, safe='')}{tail}"
        resp = await self.pool.request(request.method, url, provider.auth_headers())
        call.upstream_answered = True
        data = await resp.read()
        if resp.status >= 400:
            call.provider = call.account = provider.name
            raise gateway_key_refused(call, call.codec.decode_error(resp.status, data))
        json_passthrough(data, provider.name)
        call.exchange.send(resp.status, data, relayed_content_type(resp.headers))

    async def responses_input_tokens(self, request: HttpRequest, call: Call) -> None:
        body = parse_json_body(request.body)
        counted = {k: body.get(k) for k in ("input", "instructions", "tools")}
        call.exchange.send_json(200, {"object": "response.input_tokens", "input_tokens": estimate_tokens(counted)})

    # -- Gemini
    async def gemini_call(self, request: HttpRequest, call: Call) -> None:
        """POST /v1beta/models/{model}:generateContent | :streamGenerateContent | :countTokens."""
        model, _, method = request.path.split("/models/", 1)[1].rpartition(":")  # model ids may hold ':' too
        if method not in GEMINI_METHODS:
            raise GatewayError(
                404,
                f"unknown method {method!r}; tgw serves generateContent, streamGenerateContent and countTokens",
                "not_found_error",
            )
        if method == "countTokens":
            await self.gemini_count_tokens(request, call, model, parse_json_body(request.body))
            return
        body = self.model_call_body(call, request)
        stream = method == "streamGenerateContent"
        sse = request.query.get("alt") == "sse"
        route = self.begin_model_call(call, model, stream, body)
        codec = call.codec

        def decode():
            req = codec.decode_request(body, model, stream)
            return req, codec.stream_encoder(req, sse=sse) if stream else None, None

        # a JSON-array stream is re-framed from the upstream's SSE: translation even from Gemini
        native = SPEAKS["gemini"] if sse or not stream else SPEAKS["none"]
        await self.forward(request, call, route, Outbound(body, "generate", native, decode))

    async def gemini_count_tokens(self, request: HttpRequest, call: Call, model: str, body: dict) -> None:
        route = self.router.resolve(model)
        if call.principal is not None:
            self.identity.check_model(call.principal, model, route.model)
        if route.provider.protocol == "gemini" and self.cfg.work_mode != "translation":
            await self.forward(request, call, route, Outbound(body, "count_gemini", SPEAKS["gemini"], fallbacks=False))
            return
        call.exchange.send_json(200, {"totalTokens": gemini_count_tokens_estimate(body)})

    def gemini_model_info(self, model: str, listed: ListedModel | None = None) -> dict:
        info = {"name": f"models/{model}", "displayName": (listed and listed.display_name) or model,
                "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens"]}  # fmt: skip
        info.update((listed and listed.gemini) or {})
        return info

    async def gemini_list_models(self, request: HttpRequest, call: Call) -> None:
        models = await self.listed_models(call)
        call.exchange.send_json(200, {"models": [self.gemini_model_info(m.id, m) for m in models]})

    async def gemini_get_model(self, request: HttpRequest, call: Call) -> None:
        model = request.path.split("/models/", 1)[1]
        route = self.router.resolve(model)
        if call.principal is not None:
            self.identity.check_model(call.principal, model, route.model)
        call.exchange.send_json(200, self.gemini_model_info(model))

    # -- embeddings
    async def embeddings(self, request: HttpRequest, call: Call) -> None:
        body = self.model_call_body(call, request)
        model = field_of(body, "model", str, required=True)
        inputs = embedding_inputs(body.get("input"))
        encoding = field_of(body, "encoding_format", str, default="float")
        if encoding not in ("float", "base64"):
            raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {json_preview(encoding)}")
        dimensions = field_of(body, "dimensions", int, default=None)
        if dimensions is not None and dimensions < 1:
            raise bad_request(f"'dimensions' must be a positive integer, got {dimensions}")
        route = self.begin_model_call(call, model, False, body)
        call.lane = "passthrough" if route.provider.protocol == "openai" else route.provider.protocol
        if route.provider.protocol == "openai":  # vectors of another model would not compare: no fallbacks
            await self.forward(request, call, route, Outbound(body, "embeddings", SPEAKS["openai"], fallbacks=False))
            return
        if route.provider.protocol == "gemini":
            await self.gemini_embeddings(call, route, inputs, encoding, dimensions)
            return
        if route.provider.protocol != "loopback":
            raise bad_request(
                f"model {model!r} is served by {route.provider.name!r}, which has no embeddings endpoint in tgw"
            )
        dimensions = dimensions or LOOPBACK_EMBEDDING_DIMENSIONS
        if dimensions > LOOPBACK_MAX_DIMENSIONS or dimensions * len(inputs) > LOOPBACK_MAX_EMBEDDING_VALUES:
            raise bad_request(
                f"the loopback model embeds up to {LOOPBACK_MAX_DIMENSIONS} dimensions and "
                f"{LOOPBACK_MAX_EMBEDDING_VALUES} values per request; asked for {len(inputs)} x {dimensions}"
            )
        vectors = [
            self.loopback.embed(item if isinstance(item, str) else json.dumps(item), dimensions) for item in inputs
        ]
        await send_embeddings(call, model, vectors, encoding, estimate_tokens(inputs))

    async def gemini_embeddings(self, call: Call, route: Route, inputs: list, encoding: str, dimensions) -> None:
        """/v1/embeddings on a Gemini model: one batchEmbedContents call to an account of its pool
        (its breaker counts it; no fallback: another model's vectors would not compare), the
        vectors in OpenAI's shape. Gemini reports no tokens for embeddings: they are estimated."""
        if not all(type(item) is str for item in inputs):
            raise bad_request("token arrays can be embedded only by an OpenAI upstream; send the texts")
        if len(inputs) > GEMINI_MAX_EMBEDDINGS:
            raise bad_request(f"Gemini embeds at most {GEMINI_MAX_EMBEDDINGS} inputs a request; got {len(inputs)}")
        now = time.monotonic()
        walk = Walk(self.pools.chain(route, False), 0)
        target = walk.next(now)
        if target is None:
            raise walk.refusal(now)
        account, name, _ = target
        provider = account.provider
        extra = {"outputDimensionality": dimensions} if dimensions else {}
        body = dumps({"requests": [{"model": f"models/{name}", "content": {"parts": [{"text": text}]}, **extra}
                                   for text in inputs]})  # fmt: skip
        call.lane, call.attempts, call.account, call.model_upstream = "translation", 1, account.name, name
        trial = account.begin(now)
        call.unconfirmed = (account, trial, math.inf)  # its breaker learns the outcome as any answer's does
        try:
            resp = await self.pool.request("POST", provider.url("embeddings", name), provider.auth_headers(), body,
                                           provider.timeouts)  # fmt: skip
            data = await resp.read(UPSTREAM_MAX_EMBEDDINGS_BYTES)
            if resp.status >= 400:
                raise GEMINI_CODEC.decode_error(resp.status, data)
            call.upstream_answered = True
            # (megabytes of numbers: parsed and checked beside the event loop, which gets turns meanwhile)
            vectors = await asyncio.to_thread(gemini_embedding_vectors, data, len(inputs), provider.name)
        except GatewayError as err:
            self.answer_broke(call, err)
            raise
        finally:
            account.end(trial)
        self.answer_shown(call)
        await send_embeddings(call, call.model_requested, vectors, encoding, estimate_tokens(inputs))


GEMINI_MAX_EMBEDDINGS = 100  # inputs of one batchEmbedContents call (Gemini's own limit)
UPSTREAM_MAX_EMBEDDINGS_BYTES = 64 * 1024 * 1024  # such a batch of vectors, as JSON text
EMBEDDINGS_INLINE_VALUES = 20_000  # numbers an answer may hold to be encoded on the event loop itself


def gemini_embedding_vectors(data: bytes, count: int, provider: str) -> list:
    """batchEmbedContents' {"embeddings": [{"values": [...]}, ...]}: one vector of float32
    numbers per input (checked in C: struct.pack refuses what is no number or too big)."""
    answer = json_or_502(data, provider)
    items = answer.get("embeddings") if type(answer) is dict else None
    if type(items) is not list or len(items) != count:
        raise GatewayError(502, f"upstream {provider} answered {json_preview(items)} for {count} embeddings")
    vectors = [item.get("values") if type(item) is dict else None for item in items]
    for vector in vectors:
        try:
            if type(vector) is not list:
                raise TypeError
            struct.pack(f"<{len(vector)}f", *vector)
        except (TypeError, OverflowError, struct.error):
            raise GatewayError(502, f"upstream {provider} sent an embedding that is no list of numbers") from None
    return vectors


async def send_embeddings(call: Call, model: str, vectors: list, encoding: str, tokens: int) -> None:
    """Embeddings in OpenAI's shape: float lists, or base64 of little-endian float32 (the SDK's
    default). A large answer is encoded beside the event loop."""
    data = [
        {"object": "embedding", "index": index,
         "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding == "base64" else v}
        for index, v in enumerate(vectors)
    ]  # fmt: skip
    call.usage = Usage(input_tokens=tokens)
    answer = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    inline = encoding == "base64" or sum(map(len, vectors)) <= EMBEDDINGS_INLINE_VALUES
    call.exchange.send(200, dumps(answer) if inline else await asyncio.to_thread(dumps, answer))


def watchdog_tick(providers) -> float:
    """How often the upstream watchdog sweeps: a quarter of the shortest timeout, at most a second."""
    shortest = min((min(p.timeouts.first_byte, p.timeouts.read, p.timeouts.total) for p in providers), default=4.0)
    return max(0.01, min(1.0, shortest / 4))


_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_.:-]{1,256})"').match


def responses_answer_id(data: bytes) -> str:
    """A Responses answer's id: its first field, as OpenAI sends it (a small answer that puts it
    elsewhere is parsed; a large one is not parsed on the event loop just for this: no id)."""
    found = _LEADING_ID(data)
    if found:
        return found.group(1).decode()
    if len(data) > 1 << 20:
        return ""
    try:
        answer = loads(data)
    except ValueError:
        return ""
    return string_or(answer.get("id")) if type(answer) is dict else ""


PASSTHROUGH_MARK = "tgw_passthrough"  # a stored response that is only its owner: the provider keeps the answer


def response_not_found(what: str, response_id: str) -> GatewayError:
    return GatewayError(
        404, f"{what} {response_id!r} was not found: it was never stored by this gateway, was deleted, is older than "
        "responses_retention_days, or belongs to another key", "not_found_error",
    )  # fmt: skip


def gateway_key_refused(call: Call, err: GatewayError) -> GatewayError:
    """An upstream's 401 refused the gateway's own key for that provider, not the client's: the client
    gets a 502 (a 401 would tell it that its key is wrong, and the upstream's words may quote part of
    the gateway's), the ledger row keeps the upstream's words and the account."""
    if err.status != 401:
        return err
    call.error = call.error or f"{call.account}: {err.message}"
    return GatewayError(502, f"upstream {call.provider} refused the API key this gateway holds for it (HTTP 401); "
                        "the gateway's operator must check that key (see 'tgw logs')")  # fmt: skip


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """An upstream's Retry-After in seconds (within a day), or None: seconds, or an HTTP date
    (RFC 9110 10.2.3: what proxies and some servers send), else NaN or garbage: no usable time."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = http_date_seconds(value[:64], time.time() if now is None else now)
        if seconds is None:
            return None
    return min(max(seconds, 0.0), 86400.0) if math.isfinite(seconds) else None


def http_date_seconds(text: str, now: float) -> float | None:
    """Seconds from `now` until an HTTP date ("Wed, 21 Oct 2015 07:28:00 GMT"), or None."""
    import email.utils  # (rarely needed: not imported at startup)

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # (an HTTP date is GMT; one without a zone is taken as such)
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp() - now


def json_or_502(data: bytes, provider: str) -> dict:
    """An upstream's JSON answer, which must be an object."""
    try:
        value = loads(data)
    except ValueError as exc:
        raise GatewayError(502, f"upstream {provider} answered with invalid JSON ({exc}): {data[:200]!r}") from None
    if not isinstance(value, dict):
        raise GatewayError(502, f"upstream {provider} answered with JSON that is not an object: {json_preview(value)}")
    return value


def upstream_events(step, *args) -> list:
    """A stream decoder's step (feed(sse) or finish()), with an event it cannot read turned into
    a stream error: whatever an upstream streams, the client gets a 502 event, never a 500."""
    try:
        return step(*args)
    except InvalidInput as err:
        return [StreamError(malformed_answer(err.message))]
    except GatewayError as err:
        return [StreamError(err)]
    except MALFORMED_INPUT as exc:
        what = "JSON nested too deeply" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
        return [StreamError(GatewayError(502, f"upstream sent a malformed stream event ({what[:200]})"))]


JSON_OPENERS, JSON_CLOSERS = (b"{", b"["), (b"}", b"]")


def json_passthrough(data: bytes, provider: str) -> bytes:
    """A successful answer relayed untouched must be JSON: its first and last non-blank bytes are
    checked (an HTML page from a proxy, a truncated body, plain text), never a parse on this lane."""
    if data[:1] in JSON_OPENERS and data[-1:] in JSON_CLOSERS:  # the usual answer: no copies made
        return data
    head = data[:64].lstrip() or data.lstrip()
    tail = data[-64:].rstrip() or data.rstrip()
    if head[:1] in JSON_OPENERS and tail[-1:] in JSON_CLOSERS:
        return data
    raise GatewayError(502, f"upstream {provider} answered with a body that is not JSON: {data[:200]!r}")


def relayed_content_type(headers: dict) -> str:
    """An upstream's Content-Type as the client gets it: one printable ASCII line or the JSON
    default (a CR or LF in it would let an upstream write headers into the client's response)."""
    value = headers.get("content-type") or "application/json"
    return value if value.isascii() and value.isprintable() else "application/json"


def is_usage_only_chunk(sse: SSEEvent) -> bool:
    """The usage chunk an OpenAI stream sends last when include_usage is on (choices: [])."""
    if '"usage"' not in sse.data:
        return False
    try:
        chunk = loads(sse.data)
    except ValueError:
        return False
    return isinstance(chunk, dict) and not chunk.get("choices") and bool(chunk.get("usage"))


GEMINI_METHODS = ("generateContent", "streamGenerateContent", "countTokens")


def is_gemini_call_path(path: str, method: str = "POST") -> bool:
    """/v1beta/models/{model}:{method}, or the same under /v1/models/ when POSTed or named
    like a Gemini method (so `GET /v1/models/llama3:8b` or `ft:gpt-4o:org::id` stays OpenAI's)."""
    tail = path.rsplit("/models/", 1)[-1]
    if ":" not in tail:
        return False
    if path.startswith("/v1beta/models/"):
        return True
    return path.startswith("/v1/models/") and (method == "POST" or tail.rpartition(":")[2] in GEMINI_METHODS)


def is_gemini_client(request: HttpRequest) -> bool:
    """GET /v1/models/{id} is OpenAI's, unless the caller authenticates the way Gemini clients do."""
    return "x-goog-api-key" in request.headers or "key" in request.query


EMBEDDING_MAX_INPUTS = 2048  # OpenAI's own limit


def embedding_inputs(value) -> list:
    """An embeddings `input` as a list of items, each a string or an array of token ids."""
    if isinstance(value, str) or (isinstance(value, list) and value and type(value[0]) is int):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a non-empty string or array of strings (or token arrays)")
    if len(value) > EMBEDDING_MAX_INPUTS:
        raise bad_request(f"'input' holds {len(value)} items; at most {EMBEDDING_MAX_INPUTS} are accepted")
    for i, item in enumerate(value):
        if type(item) is not str and not (type(item) is list and all(type(t) is int for t in item)):
            raise bad_request(f"'input[{i}]' must be a string or an array of token ids, got {json_preview(item)}")
    return value


INPUT_ITEMS_LIMITS = (1, 100, 20)  # GET .../input_items: the least, the most and the default page size


def input_items_page(response_id: str, items: list, query: dict) -> dict:
    """A page of a stored response's input items as OpenAI lists them: newest first unless
    order=asc, `limit` of them after the item whose id is `after`. An item sent without an id
    gets one made from the response's id and its place, the same at every call."""
    low, high, default = INPUT_ITEMS_LIMITS
    limit_text, order, after = query.get("limit", str(default)), query.get("order", "desc"), query.get("after")
    if not (limit_text.isascii() and limit_text.isdigit() and low <= int(limit_text) <= high):
        raise bad_request(f"'limit' must be an integer from {low} to {high}, got {limit_text[:20]!r}")
    if order not in ("asc", "desc"):
        raise bad_request(f"'order' must be 'asc' or 'desc', got {order[:20]!r}")
    listed = [item if isinstance(item.get("id"), str) else {**item, "id": f"item_{response_id}_{place}"}
              for place, item in enumerate(items) if isinstance(item, dict)]  # fmt: skip
    if order == "desc":
        listed.reverse()
    start = next((i + 1 for i, item in enumerate(listed) if item["id"] == after), None) if after else 0
    if start is None:
        raise bad_request(f"'after' names no input item of response {response_id!r}: {after[:100]!r}")
    page = listed[start : start + int(limit_text)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < len(listed)}  # fmt: skip


def responses_input_items(value) -> list:
    """A Responses `input` (a string or a list of items) as a list of items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return list(value)
    raise bad_request(f"'input' must be a string or an array of items, got {json_preview(value)}")


def guard_tool_loops(req: Request, window: int, warn_after: int, stop_after: int) -> None:
    """A model that keeps making the same tool call and getting the same result is stuck:
    first tell it so (a note in its context), then refuse with a clear error."""
    calls: dict[str, Part] = {}
    results: list[Part] = []
    for message in req.messages:
        for part in message.parts:
            if part.type == "tool_call":
                calls[part.id] = part
            elif part.type == "tool_result" and part.id in calls:
                results.append(part)
    if not results:
        return
    # only the last `window` rounds are compared (a long agent session has hundreds)
    rounds = [(calls[r.id].name, canonical_json(calls[r.id].arguments), tool_result_text(r)) for r in results[-window:]]
    repeats = 0
    for item in reversed(rounds):
        if item != rounds[-1]:
            break
        repeats += 1
    name = rounds[-1][0]
    if repeats >= stop_after:
        raise bad_request(
            f"tgw loop guard: the model called {name!r} {repeats} times in a row with the same arguments and got the "
            "same result each time; the request was stopped. Change the instructions or the tool, or raise "
            "loop_guard_stop (loop_guard = false turns the guard off)."
        )
    if repeats >= warn_after and req.messages and req.messages[-1].role == "user":
        log.warning("loop guard: %r repeated %d times; warning the model", name, repeats)
        note = (
            f"[tgw loop guard] You have called {name} {repeats} times in a row with identical arguments and received "
            "the identical result each time. Do not call it that way again: try a different approach, or answer."
        )
        req.messages[-1].parts.append(Part("text", text=note))


def canonical_json(text: str) -> str:
    try:
        return json.dumps(loads(text), sort_keys=True)
    except (ValueError, RecursionError):
        return text


class ShellArgumentsFixer:
    """Codex's classic `shell` tool takes `command` as an array; other models often send a
    string. Such a call's arguments are held until its block ends, then sent whole as
    ["bash", "-lc", command] (what Tokligence Gateway does for non-OpenAI models)."""

    def __init__(self, req: Request):
        self.tools = {
            t.name for t in req.tools
            if t.name in ("shell", "container.exec", "local_shell")
            and ((t.parameters or {}).get("properties") or {}).get("command", {}).get("type") == "array"
        }  # fmt: skip
        self.held: dict[int, list] = {}  # block -> argument pieces

    def __call__(self, ev) -> list:
        if isinstance(ev, BlockStart) and ev.part.type == "tool_call" and ev.part.name in self.tools:
            self.held[ev.index] = []
        elif isinstance(ev, BlockDelta) and ev.index in self.held:
            self.held[ev.index].append(ev.value)
            return []
        elif isinstance(ev, BlockStop) and ev.index in self.held:
            return [BlockDelta(ev.index, "arguments", self.fix("".join(self.held.pop(ev.index)))), ev]
        return [ev]

    @staticmethod
    def fix(arguments: str) -> str:
        try:
            value = loads(arguments)
        except ValueError:
            return arguments
        if isinstance(value, dict) and isinstance(value.get("command"), str):
            value["command"] = ["bash", "-lc", value["command"]]
            return json.dumps(value)
        return arguments


class FilteredEncoder:
    """A stream encoder behind an event filter (keeps the encoder's other attributes)."""

    def __init__(self, encoder, event_filter):
        self.encoder = encoder
        self.event_filter = event_filter

    def encode(self, ev) -> bytes:
        return b"".join(self.encoder.encode(e) for e in self.event_filter(ev))

    def __getattr__(self, name):
        return getattr(self.encoder, name)


# ---- ports: endpoint bundles, multiport mode ----------------------------------------------
#
# Tokligence Gateway's endpoint bundles and multiport mode. Every listener serves a set of
# bundles; the facade (facade_port) serves facade_endpoints, all of them by default, in both
# modes. multiport_mode = true adds one listener per dedicated port (admin, openai, anthropic,
# gemini), each serving only its *_endpoints; port 0 turns one off (the facade's 0 picks a free
# port). All listeners share one Gateway: one ledger, one upstream pool, one metrics registry.
# A path outside a port's bundles gets a 404 in that port's protocol.

# Tokligence Gateway's bundle names, and the other spellings it accepts for them
ENDPOINT_BUNDLES = ("openai_core", "openai_responses", "anthropic", "gemini_native", "admin", "health")
BUNDLE_ALIASES = {"openai": "openai_core", "openai-chat": "openai_core", "openai_default": "openai_core",
                  "responses": "openai_responses", "gemini": "gemini_native", "status": "health"}  # fmt: skip
# listener name -> (port key, bundles key, protocol its 404s speak; None: the protocol of the path)
LISTENERS = {
    "facade": ("facade_port", "facade_endpoints", None),
    "admin": ("admin_port", "admin_endpoints", "openai"),
    "openai": ("openai_port", "openai_endpoints", "openai"),
    "anthropic": ("anthropic_port", "anthropic_endpoints", "anthropic"),
    "gemini": ("gemini_port", "gemini_endpoints", "gemini"),
}
PORT_KEYS = tuple(port_key for port_key, _, _ in LISTENERS.values())
# Paths of each bundle: exact ones, then prefixes. /metrics sits with the admin API; the
# facade serves it too (where Tokligence Gateway documents it, on the main port).
BUNDLE_PATHS = {"/v1/chat/completions": "openai_core", "/v1/embeddings": "openai_core", "/v1/models": "openai_core",
                "/v1/completions": "openai_core", "/health": "health", "/": "health", "/metrics": "admin"}  # fmt: skip
BUNDLE_PREFIXES = (
    ("/v1/models/", "openai_core"), ("/v1/responses", "openai_responses"), ("/v1/messages", "anthropic"),
    ("/anthropic/", "anthropic"), ("/v1beta/", "gemini_native"), ("/api/v1/admin", "admin"), ("/api/v1/usage", "admin"),
)  # fmt: skip


def parse_bundles(text: str, key: str) -> frozenset:
    """'openai_core, health' as a set of bundle names; empty means the key's default (as in Tokligence)."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()] or CONFIG_KEYS[key][0].split(",")
    bundles = set()
    for name in names:
        name = BUNDLE_ALIASES.get(name, name)
        if name not in ENDPOINT_BUNDLES:
            raise ConfigError(
                f"unknown endpoint bundle {name!r} in {key}: expected some of {', '.join(ENDPOINT_BUNDLES)}"
            )
        bundles.add(name)
    return frozenset(bundles)


def validate_multiport(values: dict) -> None:
    for _, bundles_key, _ in LISTENERS.values():
        parse_bundles(values[bundles_key], bundles_key)
    if values["multiport_mode"]:
        taken: dict[int, str] = {}
        for port_key in PORT_KEYS:
            port = values[port_key]
            if port and port in taken:
                raise ConfigError(f"{port_key} and {taken[port]} are both {port}: each listener needs its own port")
            taken[port] = port_key


def endpoint_bundle(path: str, method: str = "POST", request: HttpRequest | None = None) -> str:
    """The bundle a path belongs to ('' for none). GET /v1/models belongs to the protocol its
    caller speaks, told the way list_models tells it."""
    path = path.rstrip("/") or "/"
    bundle = BUNDLE_PATHS.get(path) or next((b for prefix, b in BUNDLE_PREFIXES if path.startswith(prefix)), "")
    if bundle == "openai_core" and path.startswith("/v1/models"):
        if is_gemini_call_path(path, method) or (request is not None and is_gemini_client(request)):
            return "gemini_native"
        if (
            path == "/v1/models"
            and request is not None
            and ("anthropic-version" in request.headers or "x-api-key" in request.headers)
        ):
            return "anthropic"
    return bundle


@dataclass
class Listener:
    """One port: the bundles it serves (None: every one, so nothing is checked) and the codec
    its 404s speak (None: the protocol of the path)."""

    name: str
    port: int
    bundles: frozenset | None
    codec: Codec | None = None

    def serves(self, path: str, method: str = "POST", request: HttpRequest | None = None) -> bool:
        return self.bundles is None or endpoint_bundle(path, method, request) in self.bundles

    def bundle_list(self) -> str:
        return ", ".join(b for b in ENDPOINT_BUNDLES if self.bundles is None or b in self.bundles)

    def admit(self, request: HttpRequest, call: Call) -> None:
        """A path outside this port's bundles: 404 in the port's protocol."""
        if not self.serves(request.path, request.method, request):
            call.codec = self.codec or call.codec
            raise GatewayError(
                404, f"no endpoint {request.method} {request.path} on the {self.name} port (it serves "
                f"{self.bundle_list()})", "not_found_error",
            )  # fmt: skip


def listener_serving(cfg: Config, bundle: str) -> str:
    """The listener a local client asks for `bundle` (`tgw status` for health, `tgw chat` for
    openai_core): the facade, or in multiport mode the first whose bundles include it."""
    for name in LISTENERS if cfg.multiport_mode else ():
        port_key, bundles_key, _ = LISTENERS[name]
        if (name == "facade" or getattr(cfg, port_key)) and bundle in parse_bundles(
            getattr(cfg, bundles_key), bundles_key
        ):
            return name
    return "facade"


def listener_url(cfg: Config, bundle: str) -> str:
    """Where the listener serving `bundle` answers, by the configuration (a daemon's pid file
    says where it really listens: see announce_daemon)."""
    return gateway_url(cfg, getattr(cfg, LISTENERS[listener_serving(cfg, bundle)][0]))


def listeners_of(cfg: Config, codecs: dict) -> list[Listener]:
    listeners = []
    for name in LISTENERS if cfg.multiport_mode else ("facade",):
        port_key, bundles_key, protocol = LISTENERS[name]
        port = getattr(cfg, port_key)
        if name != "facade" and not port:
            continue
        bundles = parse_bundles(getattr(cfg, bundles_key), bundles_key)
        everything = bundles == frozenset(ENDPOINT_BUNDLES)
        listeners.append(Listener(name, port, None if everything else bundles, codecs[protocol] if protocol else None))
    return listeners


async def start_listeners(cfg: Config, gateway: Gateway) -> dict[str, HttpServer]:
    """One HttpServer per listener, all handing requests to `gateway`; on a failure the ones
    started are closed and the failure is told as a ConfigError naming the port."""
    servers: dict[str, HttpServer] = {}
    try:
        for listener in listeners_of(cfg, gateway.codecs):
            handle = (
                gateway.handle if listener.bundles is None else functools.partial(gateway.handle, listener=listener)
            )
            server = HttpServer(cfg, handle, functools.partial(gateway.error_body, listener=listener))
            server.refused = gateway.telemetry.request_refused
            try:
                listener.port = await server.start(cfg.host, listener.port)
            except OSError as exc:
                raise StartupError(listen_error(cfg.host, listener.port, LISTENERS[listener.name][0], exc)) from None
            servers[listener.name] = server
            gateway.listeners[listener.name] = listener
    except BaseException:
        for server in servers.values():
            await server.drain_and_close(0)
        raise
    return servers


# ---- running it -----------------------------------------------------------------------


def release_startup_memory() -> None:
    """Compiling this one big file leaves ~15 MB of freed heap behind; hand it back to the
    OS so an idle gateway stays small (glibc only; elsewhere a no-op)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


GC_YOUNG_THRESHOLD = 10000  # tracked objects allocated (net) before a young collection; Python's default is 700


def settle_collector() -> None:
    """The cyclic collector, tuned for a server: under load the objects of the requests in
    flight rise and fall by thousands, and with Python's default threshold each rise ran a young
    collection that found nothing (a request's objects are freed by reference counting, error
    paths included: release_frames), and every few seconds a full one that walked everything
    startup made, holding the loop 10-17 ms: ~3% of a busy gateway's CPU in all. What startup
    made is frozen out of collections, and a young one waits for GC_YOUNG_THRESHOLD objects
    (what it still finds, such as the few objects a closed connection leaves in a cycle, is
    collected as before). serve() has just collected (release_startup_memory) when it calls this."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1, ::ffff:127.x): not any name that starts with 127."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def url_hostname(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:  # "[::1" and the like
        return ""


# headers a reverse proxy adds to what it relays (nginx's proxy_pass adds none by default: see local_caller)
RELAY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "via")


def local_caller(request: HttpRequest, exchange: Exchange) -> str:
    """Why a request does not come straight from a program on this machine (empty when it does):
    another machine, a proxy that relayed it (its forwarding headers), a web page (its Origin,
    Sec-Fetch-Site), or a name in Host that is not this machine (DNS rebinding: a page's name
    resolving to 127.0.0.1)."""
    peer = exchange.writer.get_extra_info("peername")
    if not (isinstance(peer, tuple) and is_loopback_host(str(peer[0]))):
        return "it comes from another machine"
    headers = request.headers
    relayed = next((name for name in RELAY_HEADERS if name in headers), None)
    if relayed is not None:
        return f"a proxy relayed it (its {relayed} header)"
    host = headers.get("host")
    if host is not None and not is_loopback_host(url_hostname("//" + host)):
        return f"its Host header names {host[:80]!r}, not this machine"
    origin = headers.get("origin")
    if origin is not None and not is_loopback_host(url_hostname(origin)):
        return "a web page sent it"
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return "a web page sent it"
    return ""


async def serve(cfg: Config, ready=None, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or `stop` is set), then drain and flush the ledger."""
    gateway = Gateway(cfg)
    if not is_loopback_host(cfg.host) and not cfg.allow_public_bind:
        if not gateway.identity.required:
            gateway.close()
            raise ConfigError(
                f"refusing to listen on {cfg.host} while clients need no key (no api_keys, no key made by 'tgw key "
                "create', or auth = off): anyone on the network could spend your provider keys. Set api_keys or "
                "create a key, or pass --allow-public-bind if you mean it."
            )
        gateway.identity.require_always()  # deleting the last key later must not open it to the network
    try:
        servers = await start_listeners(cfg, gateway)
    except BaseException:
        gateway.close()
        raise
    gateway.servers = servers
    port = gateway.listeners["facade"].port
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    watcher = ConfigWatcher(gateway, list(servers.values()))
    signals = [(signal.SIGINT, stop.set), (signal.SIGTERM, stop.set)]
    if hasattr(signal, "SIGHUP"):
        signals.append((signal.SIGHUP, lambda: loop.create_task(watcher.reload("SIGHUP"))))
    for sig, action in signals:
        try:
            loop.add_signal_handler(sig, action)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests) or not supported
    watching = loop.create_task(watcher.watch())
    mode = (
        "offline: every model is answered by loopback"
        if gateway.router.offline
        else f"routes: {gateway.router.describe_routes()}"
    )
    release_startup_memory()
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 address, as a URL writes it
    print(f"tgw {__version__} listening on http://{host}:{port} (work_mode={cfg.work_mode}; {mode})", flush=True)
    for listener in list(gateway.listeners.values())[1:]:
        print(f"  {listener.name} port: http://{host}:{listener.port} ({listener.bundle_list()})", flush=True)
    if ready is not None:
        ready(port, gateway)
    try:
        await stop.wait()
    finally:
        watching.cancel()
        grace = gateway.cfg.shutdown_grace
        log.info("shutting down: finishing in-flight requests (up to %gs)", grace)
        cut = functools.partial(setattr, gateway, "cutting", True)
        await asyncio.gather(*(server.drain_and_close(grace, on_cut=cut) for server in servers.values()))
        gateway.close()
        log.info("ledger flushed (%d rows written this run)", gateway.ledger.written)


def listen_error(host: str, port: int, port_key: str, exc: OSError) -> str:
    """Why the gateway cannot listen, in one line with what to do."""
    where = f"{host}:{port} ({port_key})"
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: address already in use (another tgw?); stop it, or choose "
                f"another port with {'--port or ' if port_key == 'facade_port' else ''}{port_key}")  # fmt: skip
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); choose another"
    return f"cannot listen on {where}: {exc.strerror or exc}"


# ======================================================================================
# 12. Observability: logs, metrics
# ======================================================================================
#
# Logs. Every record goes through one queue to one thread (tgw-log), which formats it (text or
# JSON, every known secret redacted) and writes it to stderr and to log_file, so the event loop
# never waits on a disk or a pipe. Records made while a request runs carry its request id (the
# client's X-Request-Id when it is a safe one, else a fresh id; returned in the response and
# written to the ledger row). log_file rotates each UTC day and at log_max_mb, the way Tokligence
# Gateway names its files: gateway.log -> gateway-2026-01-05.log, gateway-2026-01-05-2.log, ...,
# with gateway.log a symlink to the current one; log_max_files of them are kept.
#
# Metrics. A small in-process registry, rendered at GET /metrics in Prometheus's text format
# 0.0.4. Its API, for any part of the gateway that wants a metric:
#
#     hits = gateway.metrics.counter("tgw_things_total", "Things done, by kind", ("kind",))
#     hits.inc(("big",))                    # label values in the order the labels were named
#     hits.inc(("small",), 3)
#     gateway.metrics.gauge("tgw_open_things", "Things open now", callback=lambda: len(things))
#     gateway.metrics.gauge("tgw_thing_state", "...", ("name",), callback=lambda: [(("a",), 1), (("b",), 0)])
#     gateway.metrics.histogram("tgw_thing_seconds", "...", ("kind",), buckets=(0.1, 1, 10)).observe(("big",), 0.4)
#
# A callback runs at scrape time and returns a number, or (label values, number) pairs. Each
# metric keeps at most MAX_SERIES label combinations (more fold into one "other" series), and
# model names, which clients choose, are capped at MAX_MODEL_LABELS distinct values. The
# gateway's own metrics live in Telemetry and are updated from the one place a request ends
# (Gateway.handle -> Telemetry.request_ended): one dict lookup finds the request's RequestTally, which
# holds its series' own lists, updated in place; no label tuple is built and no series looked up.

CURRENT_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("tgw_request_id", default="")
_safe_request_id = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}").fullmatch


def request_id_of(request: HttpRequest) -> str:
    """The client's X-Request-Id when it is short and made of safe characters (and holds no secret
    this gateway knows: it goes into every log line of the request), else a new id."""
    given = request.headers.get("x-request-id")
    if given and _safe_request_id(given) and not redact.found_in(given):
        return given
    return new_id("req_")


# ---- logs -----------------------------------------------------------------------------

ACCESS_LINE = (
    "%(method)s %(path)s %(status)s %(latency_ms).1fms lane=%(lane)s provider=%(provider)s model=%(model)s "
    "tokens=%(prompt_tokens)s+%(completion_tokens)s"
)  # one line per request; log_format = json writes its fields instead


class RedactingFormatter(logging.Formatter):
    """Log lines with every known secret taken out (see SecretRedactor)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# Control characters a client put in a path or a model name, shown as escapes: a text log line stays
# one line (no forged lines) and sends no escape sequence to the terminal reading it
_LOG_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)] if c != 9} | {10: "\\n", 13: "\\r"}


_LOG_TOKEN_ESCAPES = {ord(c): f"%{ord(c):02X}" for c in ' ="%'}


def log_token(value):
    """A value of a text access line as one token: a space, '=', '"' or '%' in a string (a model
    name is the client's) percent-encoded, so no value can pass for another field."""
    if type(value) is str and (" " in value or "=" in value or '"' in value or "%" in value):
        return value.translate(_LOG_TOKEN_ESCAPES)
    return value


class TextLogFormatter(RedactingFormatter):
    """`time LEVEL logger: message request_id=...`, secrets redacted, control characters escaped."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # the line; a traceback follows it as it is
        return super().formatMessage(record).translate(_LOG_CONTROL_ESCAPES)

    def format(self, record: logging.LogRecord) -> str:
        if record.msg is ACCESS_LINE and isinstance(record.args, dict):  # a client chose the path and the model
            record = logging.makeLogRecord(
                {**record.__dict__, "args": {k: log_token(v) for k, v in record.args.items()}}
            )
        line = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{line} request_id={request_id}" if request_id else line


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (or a request's fields), request_id."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id
        if record.msg is ACCESS_LINE and isinstance(record.args, dict):
            entry["event"] = "request"
            entry.update(record.args)
        else:
            entry["msg"] = redact(record.getMessage())
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return redact(json.dumps(entry, separators=(",", ":"), default=str))


class RotatingLogFile(logging.Handler):
    """log_file, rotated each UTC day and when the next line would take it past `max_bytes`.
    Writes are buffered; the log thread flushes after each batch. `clock` is injectable."""

    MAX_INDEX = 10000  # files of one day

    def __init__(self, path: str, max_bytes: int, keep: int, clock=time.time):
        super().__init__()
        self.base = Path(path).expanduser()
        self.stem, self.ext = self.base.stem, self.base.suffix or ".log"
        self.name_pattern = re.compile(
            re.escape(self.stem) + r"-(\d{4}-\d{2}-\d{2})(?:-(\d+))?" + re.escape(self.ext)
        ).fullmatch
        self.max_bytes = max(int(max_bytes), 1)
        self.keep = max(keep, 1)
        self.clock = clock
        self.stream = None
        self.path: Path | None = None
        self.day = ""
        self.index = 1
        self.size = 0
        self.next_day_at = 0.0
        self.failing = False  # the last write failed (said once on stderr until one succeeds)
        self.dropped = 0  # lines lost to failed writes
        self.next_check_at = 0.0  # when to look again whether the file is still where it was opened

    @staticmethod
    def check(path: str) -> None:
        """Fail early (at startup) when the log directory cannot be written."""
        directory = Path(path).expanduser().parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(f"{directory} is not writable")
        except OSError as exc:
            raise ConfigError(f"invalid value {path!r} for log_file: {exc}") from None

    def file_for(self, day: str, index: int) -> Path:
        suffix = f"-{index}" if index > 1 else ""
        return self.base.with_name(f"{self.stem}-{day}{suffix}{self.ext}")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            now = self.clock()
            if self.stream is None or now >= self.next_day_at:
                self.next_day_at = now - now % 86400 + 86400  # the next UTC midnight
                self.open(time.strftime("%Y-%m-%d", time.gmtime(now)), 1, len(data))
            elif now >= self.next_check_at and not self.still_there(now):  # removed (or its directory): again
                self.open(self.day, self.index, len(data))
            elif self.size + len(data) > self.max_bytes:
                self.open(self.day, self.index + 1, len(data))
            self.stream.write(data)
            self.size += len(data)
        except Exception:
            self.handleError(record)

    def still_there(self, now: float) -> bool:
        """Is the open file still the one at its path? (Someone may remove the file or the log
        directory while the gateway runs; lines written to a removed file are lost.) Asked at
        most once a second."""
        self.next_check_at = now + 1.0
        try:
            at_path, opened = os.stat(self.path), os.fstat(self.stream.fileno())
        except (OSError, ValueError):
            return False
        return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)

    def open(self, day: str, index: int, incoming: int) -> None:
        """The day's file number `index`, or the first after it with room (a restart resumes)."""
        self.close_stream()
        self.base.parent.mkdir(parents=True, exist_ok=True)
        path = self.file_for(day, index)
        while path.exists() and path.stat().st_size + incoming > self.max_bytes and index < self.MAX_INDEX:
            index += 1
            path = self.file_for(day, index)
        # private to its user; a symlink planted at the name is not followed (ELOOP, told by handleError)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        self.stream = os.fdopen(fd, "ab", buffering=1 << 16)
        self.path, self.day, self.index, self.size = path, day, index, self.stream.tell()
        self.point_to(path)
        self.prune()

    def point_to(self, path: Path) -> None:
        """log_file itself: a symlink to the current file (a real file there is left alone)."""
        if self.base.exists() and not self.base.is_symlink():
            return
        temporary = self.base.with_name(f".{self.base.name}.{os.getpid()}")
        try:
            temporary.unlink(missing_ok=True)
            os.symlink(path.name, temporary)
            os.replace(temporary, self.base)
        except OSError:  # no symlinks here (some filesystems, Windows without the privilege)
            pass

    def prune(self) -> None:
        """Keep the newest `keep` files of this log."""
        found = []
        for entry in self.base.parent.iterdir():
            match = self.name_pattern(entry.name)
            if match and entry != self.path:
                found.append((match.group(1), int(match.group(2) or 1), entry))
        found.sort()
        for _, _, entry in found[: max(len(found) - (self.keep - 1), 0)]:
            try:
                entry.unlink()
            except OSError:
                pass

    def flush(self) -> None:
        if self.stream is None:
            return
        try:
            self.stream.flush()
        except OSError:  # disk full, I/O error: the buffered lines are lost, the next line reopens the file
            self.handleError(None)
        else:
            self.failing = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        """A write that failed (disk full, the directory gone or unwritable): said once on stderr
        rather than a traceback per line; the file is opened again for the next line."""
        self.dropped += 1
        if not self.failing:
            self.failing = True
            with contextlib.suppress(Exception):
                sys.stderr.write(f"tgw: cannot write the log file {self.base}: {sys.exc_info()[1]}; log lines are "
                                 "dropped until it can be written\n")  # fmt: skip
        with contextlib.suppress(OSError):
            self.close_stream()
        self.stream = None

    def close_stream(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.close()

    def close(self) -> None:
        self.close_stream()
        super().close()


class DaemonOutput(logging.StreamHandler):
    """stderr when it is the daemon's tgw.log (`tgw start` points the daemon's stdout and stderr
    there): once the file passes `max_bytes` it becomes tgw.log.1 (the one before goes) and a new
    tgw.log takes its place on both descriptors, so a daemon that runs for months keeps two
    files, not one that grows for ever. Runs on the log thread."""

    CHECK_EVERY = 64  # lines between looks at the file's size

    def __init__(self, path: Path, max_bytes: int):
        super().__init__(sys.stderr)
        self.path, self.max_bytes, self.lines = path, max_bytes, 0
        self.output = self.identity(os.fstat(2)) if self.is_path(os.fstat(2)) else None  # None: stderr is elsewhere

    @staticmethod
    def identity(stat: os.stat_result) -> tuple:
        return stat.st_dev, stat.st_ino

    def is_path(self, stat: os.stat_result) -> bool:
        try:
            return self.identity(os.stat(self.path)) == self.identity(stat)
        except OSError:
            return False

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.lines += 1
        if self.output is not None and not self.lines % self.CHECK_EVERY:
            self.rotate_if_full()

    def rotate_if_full(self) -> None:
        try:
            output = os.fstat(2)
            if output.st_size < self.max_bytes or self.identity(output) != self.output:
                return
            self.flush()
            if self.is_path(output):  # (removed meanwhile: only a new one is made)
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                for target in (1, 2):
                    os.dup2(fd, target)
            finally:
                os.close(fd)
            self.output = self.identity(os.fstat(2))
        except OSError as exc:  # a full or read-only disk: keep writing where it is
            self.output = None
            sys.stderr.write(f"tgw: could not rotate {self.path} ({exc}); it is no longer rotated\n")


class LogQueueHandler(logging.Handler):
    """The only handler on the event loop's side: stamps the record with the current request's
    id and hands it to the log thread (formatting and writing happen there)."""

    def __init__(self, setup: LogSetup):
        super().__init__()
        self.setup = setup

    def handle(self, record: logging.LogRecord) -> bool:  # no lock, no filters: a queue put
        record.request_id = CURRENT_REQUEST_ID.get()
        self.setup.put(record)
        return True

    emit = handle


class LogSetup:
    """The process's logging: one LogQueueHandler on the root logger, one thread writing to
    stderr and log_file. apply(cfg) may be called again with a new config (live reload)."""

    QUEUE_LIMIT = 100_000  # records waiting; beyond it new ones are counted and dropped (never the ledger)
    BATCH = 512

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.handlers: list[logging.Handler] = []  # touched by the log thread only
        self.handler: LogQueueHandler | None = None
        self.thread: threading.Thread | None = None
        self.dropped = 0  # records the queue had no room for
        self.file: RotatingLogFile | None = None
        self.file_dropped = 0  # lines lost to failed writes by log files replaced since (a reload)
        self.daemon_output: Path | None = None  # the daemon's tgw.log, rotated as it grows (DaemonOutput)

    @property
    def active(self) -> bool:
        return self.thread is not None

    @property
    def lines_dropped(self) -> int:
        """Log lines lost: no room in the queue, or the log file could not be written."""
        return self.dropped + self.file_dropped + (self.file.dropped if self.file is not None else 0)

    def put(self, item) -> None:
        if self.queue.qsize() >= self.QUEUE_LIMIT:
            self.dropped += 1
            return
        self.queue.put(item)

    def apply(self, cfg: Config | None = None, level: str = "info", clock=time.time) -> None:
        """Level, format and log_file from `cfg` (or stderr text at `level` without one)."""
        level = cfg.log_level if cfg is not None else level
        formatter = JsonLogFormatter() if cfg is not None and cfg.log_format == "json" else TextLogFormatter()
        if self.daemon_output is not None:
            max_bytes = int((cfg.log_max_mb if cfg is not None else CONFIG_KEYS["log_max_mb"][0]) * (1 << 20))
            stderr = DaemonOutput(self.daemon_output, max_bytes)
        else:
            stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(formatter)
        handlers: list[logging.Handler] = [stderr]
        log_file = cfg.log_file if cfg is not None else ""
        if log_file:
            stderr.setLevel(logging.WARNING)  # the file has everything; the terminal keeps the problems
            settings = (str(Path(log_file).expanduser()), int(cfg.log_max_mb * (1 << 20)), cfg.log_max_files)
            old = self.file
            if old is None or (str(old.base), old.max_bytes, old.keep) != settings:  # else keep writing where it is
                self.file_dropped += old.dropped if old is not None else 0
                self.file = RotatingLogFile(*settings, clock)
            self.file.setFormatter(formatter)
            handlers.append(self.file)
        else:
            self.file_dropped += self.file.dropped if self.file is not None else 0
            self.file = None
        root = logging.getLogger()
        root.setLevel(getattr(logging, level.upper()))
        if self.thread is None:
            self.handler = LogQueueHandler(self)
            root.addHandler(self.handler)
            self.thread = threading.Thread(target=self._run, name="tgw-log", daemon=True)
            self.thread.start()
            atexit.register(self.close)
        self.queue.put(functools.partial(self._swap, handlers))  # control messages are never dropped

    def _swap(self, handlers: list) -> None:  # on the log thread
        for handler in self.handlers:
            if handler not in handlers:
                handler.close()
        self.handlers = handlers

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                if item is None:
                    self._swap([])
                    return
                if callable(item):  # a control message (new handlers, a flush marker)
                    try:
                        item()
                    except Exception:  # the thread must outlive a bad handler
                        traceback.print_exc(file=sys.stderr)
                    continue
                for handler in self.handlers:
                    if item.levelno >= handler.level:
                        handler.handle(item)
            self._flush_handlers()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every record logged so far is written."""
        if self.thread is not None:
            done = threading.Event()
            self.queue.put(lambda: (self._flush_handlers(), done.set()))
            done.wait(timeout)

    def _flush_handlers(self) -> None:  # on the log thread, which must outlive a failing flush
        for handler in self.handlers:
            try:
                handler.flush()
            except Exception:  # stderr a closed pipe, say: nothing to tell it to
                pass

    def close(self) -> None:
        """Write what is queued, close the files, take the handler off the root logger."""
        if self.thread is None:
            return
        logging.getLogger().removeHandler(self.handler)
        self.queue.put(None)
        self.thread.join(10)
        self.thread = self.handler = self.file = None
        atexit.unregister(self.close)


LOGS = LogSetup()


def setup_logging(level: str, cfg: Config | None = None) -> None:
    """The process's logging: stderr text at `level`, or everything `cfg` says (log_* keys)."""
    if cfg is not None and cfg.log_file:
        RotatingLogFile.check(cfg.log_file)
    LOGS.apply(cfg, level)


# ---- metrics ----------------------------------------------------------------------------

ENDPOINT_FAMILIES = (  # path prefix -> its endpoint label (paths that hold ids or model names)
    ("/v1/models/", "/v1/models/{id}"), ("/v1beta/models/", "/v1beta/models/{id}"),
    ("/v1/responses/", "/v1/responses/{id}"), ("/api/v1/admin/", "/api/v1/admin/*"),
    ("/api/v1/usage/", "/api/v1/usage/*"),
)  # fmt: skip
MAX_SERIES = 10000  # label combinations per metric
MAX_MODEL_LABELS = 200  # distinct model names; the rest are "other"
MAX_LABEL_LENGTH = 200  # characters of a label value a client chose
MAX_TOKENS = 1e9  # a usage number (or cost) beyond this in one answer is an upstream's nonsense: not counted
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
_metric_name = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*").fullmatch
_label_name = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*").fullmatch


def prometheus_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_HELP_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n"})


def label_pairs(names: tuple, values: tuple) -> str:
    """a="x",b="y": the inside of a series' braces."""
    return ",".join([f'{name}="{label_value(value)}"' for name, value in zip(names, values, strict=True)])


def label_value(value) -> str:
    text = str(value)  # (translate is slow: escape only the rare value that needs it)
    return text.translate(_LABEL_ESCAPES) if "\\" in text or '"' in text or "\n" in text else text


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple = (), callback=None):
        if not _metric_name(name) or not all(_label_name(label) and label != "le" for label in labels):
            raise ValueError(f"invalid metric or label name in {name}{labels}")
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self.callback = callback  # at scrape time: a number, or an iterable of (label values, number)
        self.values: dict[tuple, object] = {}
        self.other = ("other",) * len(self.labels)
        self._pairs: dict[tuple, str] = {}  # label values -> their a="x",b="y" (a series renders alike each scrape)

    def pairs(self, labels: tuple) -> str:
        text = self._pairs.get(labels)
        if text is None:
            text = self._pairs[labels] = label_pairs(self.labels, labels)
        return text

    def forget_pairs(self, series: int) -> None:
        """At the start of a scrape of `series` series: a callback's labels may come and go, so
        the memo starts over once it holds twice as many as a scrape needs."""
        if len(self._pairs) > 2 * max(series, MAX_SERIES):
            self._pairs.clear()

    def head(self) -> str:
        return f"# HELP {self.name} {self.help.translate(_HELP_ESCAPES)}\n# TYPE {self.name} {self.kind}\n"

    def key_for(self, labels: tuple) -> tuple:
        """A new series' key: checked once, then folded into "other" past MAX_SERIES."""
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {labels!r}")
        return labels if len(self.values) < MAX_SERIES else self.other

    def series(self):
        if self.callback is None:
            return list(self.values.items())
        result = self.callback()
        if isinstance(result, (int, float)):
            return [((), result)]
        return [(tuple(labels), value) for labels, value in result]

    def lines(self):
        """The metric's exposition text, a line (its head: two) at a time."""
        yield self.head()
        name = self.name
        series = self.series()
        self.forget_pairs(len(series))
        for labels, value in series:
            pairs = self.pairs(labels)
            yield f"{name}{{{pairs}}} {prometheus_value(value)}\n" if pairs else f"{name} {prometheus_value(value)}\n"


class Counter(Metric):
    kind = "counter"

    def inc(self, labels: tuple = (), amount: float = 1) -> None:
        try:
            self.values[labels] += amount
        except KeyError:
            key = self.key_for(labels)
            self.values[key] = self.values.get(key, 0) + amount


class Gauge(Counter):
    """A counter that may also go down, or be set."""

    kind = "gauge"

    def set(self, labels: tuple, value: float) -> None:
        self.values[labels if labels in self.values else self.key_for(labels)] = value

    def dec(self, labels: tuple = (), amount: float = 1) -> None:
        self.inc(labels, -amount)


class Histogram(Metric):
    """Fixed buckets; per series a list of counts per bucket (the last one +Inf) and the sum."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple = (), buckets=LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.bounds = [prometheus_value(b) for b in self.buckets] + ["+Inf"]

    def observe(self, labels: tuple, value: float) -> None:
        counts = self.counts(labels)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def counts(self, labels: tuple) -> list:
        """One series' counts per bucket (the last +Inf), then its sum: a caller may add to them directly."""
        counts = self.values.get(labels)
        if counts is None:
            counts = self.values.setdefault(self.key_for(labels), [0] * (len(self.buckets) + 1) + [0.0])
        return counts

    def lines(self):
        yield self.head()
        name = self.name
        series = list(self.values.items())
        self.forget_pairs(len(series))
        for labels, counts in series:
            counts = counts[:]  # as it is now: requests may end while earlier pieces are sent
            pairs = self.pairs(labels)
            bucket = f"{name}_bucket{{{pairs},le=" if pairs else f"{name}_bucket{{le="
            cumulative = 0
            for bound, count in zip(self.bounds, counts, strict=False):
                cumulative += count
                yield f'{bucket}"{bound}"}} {cumulative}\n'
            text = "{" + pairs + "}" if pairs else ""
            yield f"{name}_sum{text} {prometheus_value(counts[-1])}\n{name}_count{text} {cumulative}\n"


class Metrics:
    """The registry: metrics by name, rendered in the order they were made."""

    def __init__(self):
        self.metrics: dict[str, Metric] = {}

    def _add(self, metric: Metric) -> Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: tuple = (), callback=None) -> Counter:
        return self._add(Counter(name, help, labels, callback))

    def gauge(self, name: str, help: str, labels: tuple = (), callback=None) -> Gauge:
        return self._add(Gauge(name, help, labels, callback))

    def histogram(self, name: str, help: str, labels: tuple = (), buckets=LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))

    PIECE_LINES = 1000  # lines of one piece: a scrape of tens of thousands of series lets requests run between

    def render(self) -> bytes:
        return b"".join(self.pieces())

    def pieces(self):
        """The exposition text in pieces of PIECE_LINES lines (GET /metrics awaits between them)."""
        out: list[str] = []
        for metric in list(self.metrics.values()):
            try:
                for line in metric.lines():
                    out.append(line)
                    if len(out) >= self.PIECE_LINES:
                        yield self.finish(out)
                        out = []
            except Exception:  # one broken callback must not hide every other metric
                log.exception("metrics: rendering %s failed", metric.name)
        yield self.finish(out)

    @staticmethod
    def finish(lines: list) -> bytes:
        # label values a client or an upstream chose may hold a secret or a lone surrogate (a line
        # holds whole values: no secret spans two pieces)
        return redact("".join(lines)).encode("utf-8", "replace")


class LabelCap:
    """Label values a client chooses (model names): the first `limit` distinct ones, then "other"."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        value = value[:MAX_LABEL_LENGTH].encode("utf-8", "replace").decode()  # JSON's "\ud800" is no UTF-8
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return "other"


TOKEN_KINDS = ("prompt", "completion", "cached", "reasoning")  # tgw_tokens_total's kinds, in RequestTally.usage
RAW_TALLIES = 4096  # (path, lane, provider, model, status) combinations remembered as a request names them


# the access line's fields of a request refused before an endpoint saw it (Telemetry.request_refused)
REFUSED_ACCESS_FIELDS = {
    "protocol": "", "lane": "", "provider": "", "model": "", "model_upstream": "", "stream": False,
    "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "latency_ms": 0.0, "ttft_ms": None,
    "api_key_id": "", "error": "refused by the HTTP layer",
}  # fmt: skip


class RequestTally:
    """The series one (endpoint, lane, provider, model, status) of requests adds to: its own count,
    and the lists it shares with others of its latency histogram (endpoint, lane, provider), time to
    first token histogram (lane, provider) and usage (provider, model: the TOKEN_KINDS, then USD).
    A request updates them in place; a scrape only reads them."""

    __slots__ = ("labels", "count", "latency", "ttft", "usage")

    def __init__(self, labels: tuple, latency: list, usage: list):
        self.labels, self.count, self.latency, self.usage = labels, 0, latency, usage
        self.ttft: list | None = None  # made by the first streamed call (whole answers have no such series)


class Telemetry:
    """The gateway's metrics and its access log line, both fed when a request ends.

    The upstream side (section 8) feeds it from Gateway.send_upstream: `retries.inc((provider,))`,
    `failovers.inc((from_provider, to_provider))`; attempts are the accounts' own counts
    (Pools.attempts_by_provider) and `breakers.callback` = Pools.breaker_states, ((provider, account),
    state) pairs: 0 closed, 1 half-open, 2 open."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        m = self.metrics = Metrics()
        self.tallies: dict[tuple, RequestTally] = {}  # by what a request names: (path, lane, provider, model, status)
        self.labelled: dict[tuple, RequestTally] = {}  # by their label values (see tally_for)
        m.counter(
            "tgw_requests_total", "Requests answered, by endpoint, lane, provider, model and HTTP status",
            ("endpoint", "lane", "provider", "model", "status"),
            callback=lambda: [(tally.labels, tally.count) for tally in list(self.labelled.values())],
        )  # fmt: skip
        self.latency = m.histogram(
            "tgw_request_duration_seconds", "Seconds from a request's head to its answer's end",
            ("endpoint", "lane", "provider"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttft = m.histogram(
            "tgw_time_to_first_token_seconds", "Streamed model calls: seconds until the first byte reached the client",
            ("lane", "provider"), TTFT_BUCKETS,
        )  # fmt: skip
        self.usage: dict[tuple, list] = {}  # (provider, model) -> [tokens of each TOKEN_KINDS, USD]
        m.counter(
            "tgw_tokens_total", "Tokens by provider, model and kind (cached is part of prompt, reasoning of completion)",
            ("provider", "model", "kind"), callback=lambda: [
                ((*key, kind), count) for key, usage in list(self.usage.items())
                for kind, count in zip(TOKEN_KINDS, usage[: len(TOKEN_KINDS)], strict=True) if count
            ],
        )  # fmt: skip
        m.counter("tgw_cost_usd_total", "Cost in USD from the price table", ("provider", "model"),
                  callback=lambda: [(key, usage[-1]) for key, usage in list(self.usage.items()) if usage[-1]])  # fmt: skip
        m.counter("tgw_upstream_attempts_total", "Upstream requests, retries included", ("provider",),
                  callback=lambda: gateway.pools.attempts_by_provider())  # fmt: skip
        self.retries = m.counter("tgw_upstream_retries_total", "Upstream requests that were retries", ("provider",))
        self.failovers = m.counter(
            "tgw_upstream_failovers_total", "Requests moved to another upstream account or fallback model",
            ("from_provider", "to_provider"),
        )  # fmt: skip
        self.breakers = m.gauge(
            "tgw_upstream_breaker_state",
            "Circuit breaker per upstream account: 0 closed, 1 half-open, 2 open (or cooling down after a 429)",
            ("provider", "account"), callback=lambda: (),
        )  # fmt: skip
        ledger = gateway.ledger
        m.gauge("tgw_requests_in_flight", "Requests being answered, by port", ("port",), callback=self.in_flight)
        m.gauge("tgw_ledger_queue_depth", "Ledger rows waiting for the writer", callback=lambda: len(ledger.pending))
        m.counter("tgw_ledger_rows_written_total", "Ledger rows written", callback=lambda: ledger.written)
        m.counter("tgw_log_lines_dropped_total", "Log lines dropped: the log thread was behind or log_file unwritable",
                  callback=lambda: LOGS.lines_dropped)  # fmt: skip
        m.gauge("tgw_uptime_seconds", "Seconds since the gateway started",
                callback=lambda: time.time() - gateway.started_at)  # fmt: skip
        m.gauge("tgw_build_info", "tgw's version", ("version",), callback=lambda: [((__version__,), 1)])
        self.models = LabelCap(MAX_MODEL_LABELS)
        self.route_paths = {path for _, path in gateway.routes}
        self.endpoint_labels: dict[str, str] = {}
        self.access_from = self.access_threshold(gateway.cfg)

    @staticmethod
    def access_threshold(cfg: Config) -> int:
        """The lowest status that gets an access line (1000: none)."""
        if cfg.access_log == "all" or (cfg.log_level == "debug" and cfg.access_log != "off"):
            return 0
        return 400 if cfg.access_log == "errors" else 1000

    def apply_config(self, cfg: Config) -> None:
        """The log settings that may change while running (log_level, log_format, log_file,
        log_max_mb, log_max_files, access_log). Gateway.apply_config (live reload) calls this."""
        self.access_from = self.access_threshold(cfg)
        if LOGS.active:  # this process's logging is tgw's own (tgw serve), not a host program's
            LOGS.apply(cfg)

    def in_flight(self):
        return [((name,), sum(p.busy for p in server.connections)) for name, server in self.gateway.servers.items()]

    def endpoint_label(self, path: str) -> str:
        """A bounded label for a path: a route's own path, its family, or "other"."""
        label = self.endpoint_labels.get(path)
        if label is None:
            bare = path.rstrip("/") or "/"
            if bare in self.route_paths:
                label = bare
            elif is_gemini_call_path(bare):
                method = bare.rpartition(":")[2]
                method = method if method in GEMINI_METHODS else "other"
                label = bare.split("/models/", 1)[0] + "/models/{model}:" + method
            else:
                label = next((family for prefix, family in ENDPOINT_FAMILIES if bare.startswith(prefix)), "other")
            if len(self.endpoint_labels) < 4096 and len(path) <= CACHED_NAME_MAX:
                self.endpoint_labels[path] = label
        return label

    def request_ended(self, call: Call) -> None:
        ex = call.exchange
        status = call.status or ex.status or 499  # a stream that failed after its 200 counts as its failure
        elapsed = time.monotonic() - call.started
        key = (call.endpoint, call.lane, call.provider, call.model_upstream or call.model_requested, status)
        tally = self.tallies.get(key) or self.tally_for(key)
        tally.count += 1
        latency = tally.latency
        latency[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        latency[-1] += elapsed
        if call.ledgered:
            usage = call.usage  # numbers by now (record() has priced it); bounded, as an upstream sent them
            sums = tally.usage
            if 0 < usage.input_tokens < MAX_TOKENS:
                sums[0] += usage.input_tokens
            if 0 < usage.output_tokens < MAX_TOKENS:
                sums[1] += usage.output_tokens
            if 0 < usage.cached_tokens < MAX_TOKENS:
                sums[2] += usage.cached_tokens
            if 0 < usage.reasoning_tokens < MAX_TOKENS:
                sums[3] += usage.reasoning_tokens
            if 0 < call.cost < MAX_TOKENS:
                sums[4] += call.cost
            if call.stream and ex.first_byte_at:
                ttft = tally.ttft or self.first_token_counts(tally)
                seconds = ex.first_byte_at - call.started
                ttft[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
                ttft[-1] += seconds
        if status >= self.access_from and log.isEnabledFor(logging.INFO):
            self.access_line(call, status, elapsed)

    def tally_for(self, key: tuple) -> RequestTally:
        """The tally of a request's (path, lane, provider, model, status), by bounded label values:
        past MAX_SERIES combinations they are folded into one "other" tally. Paths and model names
        are the clients' to choose, so at most RAW_TALLIES of them are remembered as sent."""
        path, lane, provider, model, status = key
        labels = (self.endpoint_label(path), lane, provider, self.models(model) if model else "", status)
        tally = self.labelled.get(labels)
        if tally is None:
            if len(self.labelled) >= MAX_SERIES:
                labels = ("other",) * len(labels)
                tally = self.labelled.get(labels)
            if tally is None:
                tally = self.labelled[labels] = self.new_tally(labels)
        if len(self.tallies) < RAW_TALLIES and len(path) <= CACHED_NAME_MAX and len(model) <= CACHED_NAME_MAX:
            self.tallies[key] = tally
        return tally

    def first_token_counts(self, tally: RequestTally) -> list:
        tally.ttft = self.ttft.counts(tally.labels[1:3])  # (lane, provider)
        return tally.ttft

    def new_tally(self, labels: tuple) -> RequestTally:
        """A tally bound to its series, each by the tally's own labels (a folded tally's are "other")."""
        endpoint, lane, provider, model, _ = labels
        usage = self.usage.get((provider, model))
        if usage is None:
            key = (provider, model) if len(self.usage) < MAX_SERIES else ("other", "other")
            usage = self.usage.setdefault(key, [0] * len(TOKEN_KINDS) + [0.0])
        return RequestTally(labels, self.latency.counts((endpoint, lane, provider)), usage)

    def request_refused(self, method: str, path: str, status: int, request_id: str) -> None:
        """A request the HTTP layer refused before any endpoint saw it (malformed, too large, too
        slow: HttpServer.refused): counted under its path (one not read: "other"), and its access line."""
        key = (path or "(unread)", "", "", "", status)
        tally = self.tallies.get(key) or self.tally_for(key)
        tally.count += 1
        if status >= self.access_from and log.isEnabledFor(logging.INFO):
            token = CURRENT_REQUEST_ID.set(request_id)
            try:
                log.info(ACCESS_LINE, {**REFUSED_ACCESS_FIELDS, "method": method or "-", "path": path[:1000] or "-",
                                       "status": status})  # fmt: skip
            finally:
                CURRENT_REQUEST_ID.reset(token)

    @staticmethod
    def access_line(call: Call, status: int, elapsed: float) -> None:
        ex = call.exchange
        usage = call.usage
        ttft = round((ex.first_byte_at - call.started) * 1e6) / 1000 if ex.first_byte_at else None
        log.info(ACCESS_LINE, {
            "method": ex.request.method, "path": call.endpoint[:1000], "status": status, "protocol": call.codec.name,
            "lane": call.lane, "provider": call.provider, "model": call.model_requested[:MAX_LABEL_LENGTH],
            "model_upstream": call.model_upstream[:MAX_LABEL_LENGTH], "stream": call.stream,
            "prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "cached_tokens": usage.cached_tokens,
            "latency_ms": round(elapsed * 1e6) / 1000, "ttft_ms": ttft, "api_key_id": call.api_key_id,
            "error": call.error[:500],
        })  # fmt: skip


# ======================================================================================
# 13. Admin API
# ======================================================================================
#
# Tokligence Gateway's paths and JSON shapes: {"users": [...]}, {"user": {...}}, {"api_keys": [...]},
# {"token": KEY, "api_key": {...}} (the key shown this once), 201 on create, 204 on delete; for any
# key its own {"summary": {...}} and {"entries": [...]}. Errors come in the gateway's envelope
# (OpenAI's). /api/v1/admin/* needs the key of an admin user; while the gateway requires no key at
# all, it answers only callers on this machine. Writes go through IdentityStore in a thread and
# take effect before the answer.

ADMIN_BODY_LIMIT = 65536  # bytes: an admin request is a handful of fields
USAGE_LOG_LIMIT = 1000


class AdminApi:
    def __init__(self, gateway: Gateway):
        self.identity = gateway.identity
        self.store = gateway.identity.store
        # /api/v1/admin/ + path shape ('*' = a numeric id) -> method -> handler
        self.paths = {
            ("users",): {"GET": self.list_users, "POST": self.create_user},
            ("users", "*"): {"PATCH": self.update_user, "DELETE": self.delete_user},
            ("users", "*", "api-keys"): {"GET": self.list_keys, "POST": self.create_key},
            ("api-keys", "*"): {"DELETE": self.delete_key},
        }

    def find(self, method: str, path: str):
        tail = path[len("/api/v1/admin/") :].split("/")
        methods = self.paths.get(tuple("*" if i == 1 else part for i, part in enumerate(tail)))
        if methods is None:
            raise GatewayError(404, f"no admin endpoint {method} {path[:200]}", "not_found_error")
        handler = methods.get(method)
        if handler is None:
            raise GatewayError(405, f"method {method} is not allowed on {path[:200]}; use {', '.join(methods)}")
        return functools.partial(self.as_admin, handler)

    async def as_admin(self, handler, request: HttpRequest, call: Call) -> None:
        principal = call.principal
        if principal is None:
            why = local_caller(request, call.exchange)
            if why:
                raise GatewayError(403, f"this gateway requires no client key, so its admin API answers only programs "
                                   f"on this machine, and {why}; create an admin with 'tgw user add EMAIL --role admin' "
                                   "and 'tgw key create --user EMAIL'", "permission_error")  # fmt: skip
        elif principal.role != "admin":
            whose = f"belongs to {principal.email}, whose role is {principal.role}" if principal.email else "is static"
            raise GatewayError(403, f"the admin API needs the key of an admin user; API key {principal.label} "
                               f"{whose}", "permission_error")  # fmt: skip
        await handler(request, call)

    @staticmethod
    def body_of(request: HttpRequest) -> dict:
        if len(request.body) > ADMIN_BODY_LIMIT:
            raise GatewayError(413, f"admin request bodies are limited to {ADMIN_BODY_LIMIT} bytes")
        return parse_json_body(request.body) if request.body.strip() else {}

    @staticmethod
    def id_in(path: str, position: int, what: str) -> int:
        text = path.split("/")[position]
        if not (text.isascii() and text.isdigit() and len(text) < 19):
            raise bad_request(f"invalid {what} id {text[:40]!r}: expected a number")
        return int(text)

    async def write(self, fn, *args):
        """One change through the store (off the loop), in force before the answer."""
        result = await asyncio.to_thread(fn, *args)
        await self.identity.refresh()
        return result

    # -- users
    async def list_users(self, request: HttpRequest, call: Call) -> None:
        users = await asyncio.to_thread(self.store.users)
        call.exchange.send_json(200, {"users": [user_payload(u) for u in users]})

    async def create_user(self, request: HttpRequest, call: Call) -> None:
        body = self.body_of(request)
        if "email" not in body:
            raise bad_request("'email' is required")
        email = body.pop("email")
        user = await self.write(self.store.add_user, email, body)
        call.exchange.send_json(201, {"user": user_payload(user)})

    async def update_user(self, request: HttpRequest, call: Call) -> None:
        user_id = self.id_in(request.path, 5, "user")
        # as in Tokligence Gateway, an empty role or status leaves it as it is
        body = {k: v for k, v in self.body_of(request).items() if not (k in ("role", "status") and v == "")}
        user = await self.write(self.store.update_user, user_id, body)
        call.exchange.send_json(200, {"user": user_payload(user)})

    async def delete_user(self, request: HttpRequest, call: Call) -> None:
        await self.write(self.store.delete_user, self.id_in(request.path, 5, "user"))
        call.exchange.send(204, b"")

    # -- keys
    async def list_keys(self, request: HttpRequest, call: Call) -> None:
        keys = await asyncio.to_thread(self.store.keys, self.id_in(request.path, 5, "user"))
        call.exchange.send_json(200, {"api_keys": [key_payload(k) for k in keys]})

    async def create_key(self, request: HttpRequest, call: Call) -> None:
        user_id = self.id_in(request.path, 5, "user")
        body = self.body_of(request)
        scopes = body.pop("scopes", None)
        if scopes not in (None, []):
            raise bad_request("'scopes' are not supported by tgw; limit a key's models with 'models' (globs)")
        if "expires_days" in body:
            days = check_amount("expires_days", body.pop("expires_days"))
            body["expires_at"] = None if days is None else time.time() + days * 86400
        elif isinstance(body.get("expires_at"), str):
            body["expires_at"] = parse_iso_time(body["expires_at"], "expires_at")
        elif body.get("expires_at") is not None:
            raise bad_request("'expires_at' must be an RFC 3339 time like 2026-01-31T00:00:00Z, or null")
        key, row = await self.write(self.store.create_key, user_id, body)
        call.exchange.send_json(201, {"token": key, "api_key": key_payload(row)})

    async def delete_key(self, request: HttpRequest, call: Call) -> None:
        await self.write(self.store.delete_key, self.id_in(request.path, 5, "api key"))
        call.exchange.send(204, b"")

    # -- a key's own usage
    def scope_of(self, principal: Principal | None) -> tuple[str, tuple]:
        """The ledger rows a caller may read: its key's (all of them while no key is required)."""
        if principal is None:
            return "1", ()
        if principal.key_id is not None:
            return "key_id = ?", (principal.key_id,)
        return "api_key_id = ? AND key_id IS NULL", (principal.label,)

    async def usage_summary(self, request: HttpRequest, call: Call) -> None:
        days = request.query.get("days")
        since = 0.0
        if days is not None:
            try:
                since = max(time.time() - check_amount("days", float(days)) * 86400, 0.0)  # (all of it, at most)
            except (ValueError, OverflowError):
                raise bad_request(f"'days' must be a number, got {days[:40]!r}") from None
        principal = call.principal
        where, params = self.scope_of(principal)
        count, prompt, completion, cost, errors = await asyncio.to_thread(
            self.store.db_row,
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            f"COALESCE(SUM(cost_usd), 0), COALESCE(SUM(status >= 400), 0) FROM requests WHERE {where} AND ts >= ?",
            (*params, since),
        )
        summary = {
            "consumed_tokens": prompt + completion, "supplied_tokens": 0, "net_tokens": prompt + completion,
            "requests": count, "prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": round(cost, 6),
            "errors": errors, "since": iso_time(since) if since else None, "key": None, "user": None, "budgets": [],
            "rate_limits": [],
        }  # fmt: skip
        if principal is not None:
            if principal.key_id is not None:
                row = await asyncio.to_thread(self.store.key, principal.key_id)
                summary["key"] = key_payload(row)
                summary["user"] = {"id": principal.user_id, "email": principal.email, "role": principal.role}
            else:
                summary["key"] = {"fingerprint": principal.label, "static": True}
            summary["budgets"] = [b.view() | {"holder": b.holder} for b in principal.budgets]
            summary["rate_limits"] = [limit.view(time.monotonic()) for limit in principal.limits]
        call.exchange.send_json(200, {"summary": summary})

    async def usage_logs(self, request: HttpRequest, call: Call) -> None:
        text = request.query.get("limit", "20")
        if not (text.isascii() and text.isdigit() and len(text) <= 4 and 0 < int(text) <= USAGE_LOG_LIMIT):
            raise bad_request(f"'limit' must be a whole number from 1 to {USAGE_LOG_LIMIT}, got {text[:40]!r}")
        where, params = self.scope_of(call.principal)
        rows = await asyncio.to_thread(
            self.store.rows, f"SELECT * FROM requests WHERE {where} ORDER BY id DESC LIMIT ?", (*params, int(text))
        )
        call.exchange.send_json(200, {"entries": [dict(row, created_at=iso_time(row["ts"])) for row in rows]})


# ======================================================================================
# 14. CLI
# ======================================================================================


def add_config_flag(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """--config on a command, and again after an action (`config list --config X`): there it
    only sets the value when given, so it never hides the command's own."""
    parser.add_argument(
        "--config", default=argparse.SUPPRESS if nested else None,
        help="gateway.ini to read (default: $TOKLIGENCE_CONFIG, ./gateway.ini, ~/.tokligence/gateway.ini)",
    )  # fmt: skip


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
    serve_p.add_argument("--pid-file", help=argparse.SUPPRESS)  # tgw start's daemon says here where it listens

    config_p = commands.add_parser("config", help="read and edit gateway.ini")
    add_config_flag(config_p)
    config_sub = config_p.add_subparsers(dest="action", required=True)
    list_p = config_sub.add_parser("list", help="every key with its effective value and where it came from")
    get_p = config_sub.add_parser("get", help="one key's effective value")
    get_p.add_argument("key")
    set_p = config_sub.add_parser("set", help="set a key in the ini file (created if missing), keeping its comments")
    set_p.add_argument("key")
    set_p.add_argument("value")
    example_p = config_sub.add_parser("example", help="print a gateway.ini with every key and its default")
    for action_p in (list_p, get_p, set_p, example_p):
        add_config_flag(action_p, nested=True)

    usage_p = commands.add_parser("usage", help="token and cost totals from the ledger")
    add_config_flag(usage_p)
    usage_p.add_argument(
        "--by",
        choices=("model", "provider", "day", "key", "user"),
        action="append",
        help="grouping (repeatable; default model, provider and day); key and user show budgets and what is left",
    )
    usage_p.add_argument("--days", type=float, default=30, help="look back this many days (default 30)")
    usage_p.add_argument("--json", action="store_true", help="print JSON")
    usage_p.add_argument("--ledger-path", help="sqlite ledger file (default: the configured ledger_path)")

    logs_p = commands.add_parser("logs", help="the most recent requests in the ledger")
    add_config_flag(logs_p)
    logs_p.add_argument("-n", "--limit", type=int, default=20)
    logs_p.add_argument("--json", action="store_true", help="print JSON lines")
    logs_p.add_argument("--ledger-path", help="sqlite ledger file (default: the configured ledger_path)")
    logs_p.add_argument("--user", metavar="EMAIL", help="only this user's requests")
    add_identity_commands(commands)
    add_gateway_commands(commands)
    return parser


def add_identity_commands(commands) -> None:
    """`tgw user ...` and `tgw key ...`: they write the ledger's database, running gateway or not;
    a running one applies each change within a second."""

    def leaf(sub, name: str, help_text: str, *positional: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--config", default=argparse.SUPPRESS, help="gateway.ini to read")
        for arg in positional:
            parser.add_argument(arg)
        return parser

    def budget_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--budget", type=float, metavar="USD", help="spending limit in USD per period")
        parser.add_argument("--token-budget", type=int, metavar="N", help="limit in tokens (input + output) per period")
        parser.add_argument("--period", choices=PERIODS, help="budget period, UTC (default month)")

    user_p = commands.add_parser("user", help="team members: add, list, show, disable, enable, delete")
    add_config_flag(user_p)
    user_sub = user_p.add_subparsers(dest="action", required=True)
    add_p = leaf(user_sub, "add", "add a user", "email")
    add_p.add_argument("--name", default="", help="display name")
    add_p.add_argument("--role", choices=ROLES, default="user")
    budget_flags(add_p)
    add_p.add_argument("--rpm", type=int, help="requests per minute for all the user's keys together")
    add_p.add_argument("--tpm", type=int, help="tokens per minute for all the user's keys together")
    leaf(user_sub, "list", "every user").add_argument("--json", action="store_true", help="print JSON")
    leaf(user_sub, "show", "one user, its keys and budget", "user").add_argument("--json", action="store_true")
    for action, text in (("disable", "refuse the user's keys"), ("enable", "accept the user's keys again"),
                         ("delete", "delete the user and its keys (their ledger rows stay)")):  # fmt: skip
        leaf(user_sub, action, text, "user")

    key_p = commands.add_parser("key", help="API keys: create, list, show, disable, enable, delete, rotate")
    add_config_flag(key_p)
    key_sub = key_p.add_subparsers(dest="action", required=True)
    create_p = leaf(key_sub, "create", "a new key for a user (printed once)")
    create_p.add_argument("--user", required=True, metavar="EMAIL")
    create_p.add_argument("--name", default="", help="what the key is for (e.g. laptop, ci)")
    create_p.add_argument("--models", default="", metavar="GLOBS", help="models it may use, comma-separated globs")
    budget_flags(create_p)
    create_p.add_argument("--rpm", type=int, help="requests per minute (default: default_rpm)")
    create_p.add_argument("--tpm", type=int, help="tokens per minute (default: default_tpm)")
    create_p.add_argument("--expires", type=float, metavar="DAYS", help="stop working after this many days")
    list_p = leaf(key_sub, "list", "every key (or one user's)")
    list_p.add_argument("--user", metavar="EMAIL")
    list_p.add_argument("--json", action="store_true", help="print JSON")
    leaf(key_sub, "show", "one key (by id or prefix)", "key").add_argument("--json", action="store_true")
    for action, text in (("disable", "refuse the key"), ("enable", "accept the key again"), ("delete", "delete the key"),
                         ("rotate", "a new secret for the key, same settings (printed once)")):  # fmt: skip
        leaf(key_sub, action, text, "key")


def open_identity(args) -> IdentityStore:
    cfg = load_config(getattr(args, "config", None))
    path = cfg.ledger_path if cfg.ledger_path == ":memory:" else str(Path(cfg.ledger_path).expanduser())
    return IdentityStore(open_ledger_db(path))


def budget_fields(args) -> dict:
    fields = {"budget_usd": args.budget, "budget_tokens": args.token_budget, "budget_period": args.period}
    return {name: value for name, value in fields.items() if value is not None}


def budget_text(budget: dict | None) -> str:
    if budget is None:
        return "-"
    limits = [
        money(budget["usd"]) if budget["usd"] is not None else "",
        f"{budget['tokens']} tok" if budget["tokens"] is not None else "",
    ]
    return " + ".join(x for x in limits if x) + f"/{budget['period']}"


def left_text(status: dict | None) -> str:
    if status is None:
        return "-"
    left = [
        money(status["left_usd"]) if "left_usd" in status else "",
        f"{status['left_tokens']} tok" if "left_tokens" in status else "",
    ]
    return " + ".join(x for x in left if x) + f" left (resets {status['resets_at'] or 'never'})"


def one_line(text: str) -> str:
    """A line of the CLI's text output made of what clients and upstreams sent (model names, users,
    error words): control characters shown escaped, so none moves the cursor or starts a new line."""
    return text.translate(_LOG_CONTROL_ESCAPES)


def print_table(header: tuple, rows: list) -> None:
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print(one_line("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()))


def cmd_user(args) -> int:
    store = open_identity(args)
    now = time.time()
    if args.action == "add":
        fields = {"display_name": args.name, "role": args.role, "rpm": args.rpm, "tpm": args.tpm, **budget_fields(args)}
        user = store.add_user(args.email, {k: v for k, v in fields.items() if v is not None})
        print(
            f"user {user['id']} {user['email']} added (role {user['role']}; budget {budget_text(budget_payload(user))})"
        )
    elif args.action == "list":
        users = store.users()
        if args.json:
            print(json.dumps([user_payload(u) for u in users], indent=2))
            return 0
        print_table(("id", "email", "name", "role", "status", "keys", "budget", "left"),
                    [(u["id"], u["email"], u["display_name"] or "-", u["role"], u["status"], u["keys"],
                      budget_text(budget_payload(u)), left_text(store.budget_status("user", u, now))) for u in users])  # fmt: skip
        if not users:
            print("(no users: add one with 'tgw user add EMAIL')")
    elif args.action == "show":
        user = store.user(args.user)
        payload = user_payload(user) | {"budget_status": store.budget_status("user", user, now),
                                        "api_keys": [key_payload(k, now) for k in store.keys(user["id"])]}  # fmt: skip
        if args.json:
            print(json.dumps(payload, indent=2))
            return 0
        print(f"user {user['id']}: {user['email']} ({user['display_name'] or 'no name'}), role {user['role']}, "
              f"{user['status']}; created {iso_time(user['created_at'])}")  # fmt: skip
        if payload["budget_status"]:
            print(f"budget: {budget_text(payload['budget_status'])}; {left_text(payload['budget_status'])}")
        for key in payload["api_keys"]:
            print(f"  key {key['id']} {key['prefix']} {key['name'] or '-'} {key['status']}")
    elif args.action in ("disable", "enable"):
        user = store.update_user(args.user, {"status": "disabled" if args.action == "disable" else "active"})
        print(f"user {user['email']} is {user['status']}")
    else:
        user = store.delete_user(args.user)
        print(f"user {user['email']} deleted; its keys no longer work (its ledger rows stay)")
    return 0


def cmd_key(args) -> int:
    store = open_identity(args)
    now = time.time()
    if args.action in ("create", "rotate"):
        if args.action == "create":
            fields = {"name": args.name, "models": args.models, "rpm": args.rpm, "tpm": args.tpm, **budget_fields(args)}
            if args.expires is not None:
                fields["expires_at"] = now + check_amount("--expires", args.expires) * 86400
            key, row = store.create_key(args.user, {k: v for k, v in fields.items() if v is not None})
        else:
            key, row = store.rotate_key(args.key)
        print(key)
        print(f"key {row['id']} ({row['key_prefix']}) for {row['email']}: this is the only time it is shown; store "
              "it now (a running gateway accepts it within a second)", file=sys.stderr)  # fmt: skip
        return 0
    if args.action == "list":
        keys = store.keys(args.user)
        if args.json:
            print(json.dumps([key_payload(k, now) for k in keys], indent=2))
            return 0
        print_table(("id", "prefix", "name", "user", "models", "status", "budget", "rpm", "tpm", "expires", "last used"),
                    [(k["id"], k["key_prefix"], k["name"] or "-", k["email"], k["models"] or "*", key_state(k, now),
                      budget_text(budget_payload(k)), k["rpm"] if k["rpm"] is not None else "-",
                      k["tpm"] if k["tpm"] is not None else "-", iso_time(k["expires_at"]) or "never",
                      iso_time(k["last_used_at"]) or "never") for k in keys])  # fmt: skip
        if not keys:
            print("(no keys: create one with 'tgw key create --user EMAIL')")
        return 0
    if args.action == "show":
        row = store.key(args.key)
        payload = key_payload(row, now) | {"budget_status": store.budget_status("key", row, now)}
        if args.json:
            print(json.dumps(payload, indent=2))
            return 0
        for name in ("id", "prefix", "name", "user_email", "models", "status", "expires_at", "rpm", "tpm", "created_at",
                     "last_used_at"):  # fmt: skip
            value = payload[name]
            print(
                f"{name:<13} {', '.join(value) if isinstance(value, list) else value if value not in (None, '') else '-'}"
            )
        budget = payload["budget_status"]
        print(f"{'budget':<13} {budget_text(budget)}; {left_text(budget)}" if budget else f"{'budget':<13} -")
        return 0
    if args.action == "delete":
        row = store.delete_key(args.key)
        print(f"key {row['id']} ({row['key_prefix']}) deleted")
        return 0
    row = store.update_key(args.key, {"status": "disabled" if args.action == "disable" else "active"})
    print(f"key {row['id']} ({row['key_prefix']}) is {key_state(row, now)}")
    return 0


def set_flags(items: list[str]) -> dict:
    """--set KEY=VALUE flags as config overrides."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().lower()] = value
    return overrides


def cmd_serve(args) -> int:
    overrides = {"host": args.host, "facade_port": args.port, "work_mode": args.work_mode, "ledger_path": args.ledger_path,
                 "log_level": args.log_level, "allow_public_bind": args.allow_public_bind}  # fmt: skip
    overrides.update(set_flags(args.set))
    cfg = load_config(args.config, overrides)
    pid_path = Path(args.pid_file) if args.pid_file else None
    if pid_path is not None:  # a daemon (tgw start): its output file is rotated as it grows
        LOGS.daemon_output = daemon_paths()[1]
    setup_logging(cfg.log_level, cfg)

    def serving(port: int, gateway: Gateway) -> None:
        settle_collector()  # this process is the gateway's alone (tests share theirs: serve() leaves it be)
        if pid_path is not None:
            announce_daemon(pid_path, cfg, port, gateway)

    try:
        asyncio.run(serve(cfg, serving))
    finally:
        if pid_path:
            remove_pid_file(pid_path, os.getpid())
        LOGS.close()
    return 0


def cmd_config(args) -> int:
    if args.action == "example":
        print(write_example_config())
        return 0
    if args.action == "set":
        return cmd_config_set(args)
    cfg = load_config(args.config)
    if args.action == "get":
        key = args.key.lower()
        if key not in cfg.values:
            raise ConfigError(f"unknown key {key!r}; run 'tgw config list' for the accepted keys")
        print(cli_value(key, cfg.values[key]))
        return 0
    print(f"# config file: {cfg.path or '(none found)'}")
    for key, value in cfg.values.items():
        print(f"{key} = {cli_value(key, value)}    # {cfg.sources[key]}")
    for name, pc in cfg.providers.items():
        print(f"[provider.{name}] type={pc.type} base_url={public_url(pc.base_url)} api_key={mask_secret(pc.api_key)} "
              f"models={','.join(pc.models)}")  # fmt: skip
    return 0


def cli_value(key: str, value) -> str:
    """A value as the CLI shows it: secrets masked, URLs without their userinfo."""
    if key in SECRET_KEYS:
        return mask_secret(value)
    if CONFIG_KEYS[key][1] == "url":
        return public_url(value)
    return value


def cmd_config_set(args) -> int:
    """Write one key to the file tgw would read (./gateway.ini when there is none, said so), then
    say if something of higher precedence (an environment variable) hides the value written."""
    path = find_config_file(args.config) or config_path_for_writing(args.config, None)
    created = not path.exists()
    key = args.key.lower()
    config_set_in_file(path, key, args.value)
    where = f"created {path.resolve()}" if created else f"written to {path}"
    print(f"{key} = {cli_value(key, args.value)}  ({where})")
    if created and not args.config and not os.environ.get("TOKLIGENCE_CONFIG"):
        print(f"tgw: note: {path} is read by a gateway started in {Path.cwd()}; "
              "--config or TOKLIGENCE_CONFIG choose another file", file=sys.stderr)  # fmt: skip
    try:
        cfg = load_config(str(path))
    except ConfigError as exc:
        print(f"tgw: note: the value is written, but the configuration has another problem: {exc}", file=sys.stderr)
        return 2
    source = cfg.sources.get(key)
    if source != str(path):
        by = f"TOKLIGENCE_{key.upper()} in the environment" if source == "environment" else source
        print(f"tgw: note: {key} is overridden by {by}, which takes precedence over {path}: "
              f"the effective value is {cli_value(key, cfg.values[key])}", file=sys.stderr)  # fmt: skip
    return 0


def open_ledger_for_reading(args) -> sqlite3.Connection:
    cfg = load_config(args.config)  # also registers the configured secrets, so what is printed is redacted
    path = str(Path(args.ledger_path or cfg.ledger_path).expanduser())
    if path != ":memory:" and not Path(path).exists():
        raise ConfigError(f"no ledger at {path} yet: start the gateway with 'tgw serve' and send a request")
    return open_ledger_db(path)


def format_usd(value) -> str:
    """Dollars as the CLI shows them: cents, or two significant digits below a cent, so the
    cost of a few tokens shows ($0.0000042) instead of rounding to zero."""
    value = value or 0.0
    if value == 0:
        return "0.00"
    if abs(value) >= 0.01:
        return f"{value:.2f}"
    return f"{value:.{min(12, 1 - math.floor(math.log10(abs(value))))}f}"


def cmd_usage(args) -> int:
    db = open_ledger_for_reading(args)
    since = time.time() - args.days * 86400
    report = {group: query_usage(db, group, since) for group in (args.by or ["model", "provider", "day"])}
    budgets = usage_budgets(IdentityStore(db), report)
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
        out = {g: [dict(zip(names, row, strict=True)) for row in rows] for g, rows in report.items()}
        for group, rows in out.items():
            for row in rows:
                if (group, row["name"]) in budgets:
                    row["budget"] = budgets[group, row["name"]]
        print(json.dumps(out, indent=2))
        return 0
    for group, rows in report.items():
        print(f"\nby {group} (last {args.days:g} days)")
        print(
            f"  {group:<32} {'requests':>9} {'prompt':>11} {'completion':>11} {'cached':>9} {'cost $':>11} {'errors':>7}"
        )
        for name, count, prompt, completion, cached, _reasoning, cost, errors in rows:
            budget = budgets.get((group, name))
            shown = f"  budget {budget_text(budget)}: {left_text(budget)}" if budget else ""
            print(
                one_line(  # names are what clients sent (models, users): no terminal escapes
                    f"  {str(name or '-'):<32} {count:>9} {prompt or 0:>11} {completion or 0:>11} {cached or 0:>9} {format_usd(cost):>11} {errors or 0:>7}{shown}"
                )
            )
        if not rows:
            print("  (no requests)")
    return 0


def usage_budgets(store: IdentityStore, report: dict) -> dict:
    """(group, name) -> budget with spend and what is left, for the key and user groups of a usage report."""
    found, now = {}, time.time()
    for group in ("key", "user"):
        for name, *_ in report.get(group, []):
            try:
                if group == "key" and isinstance(name, str) and name.startswith(KEY_PREFIX):
                    row = store.key(name)
                elif group == "user" and isinstance(name, str) and "@" in name:
                    row = store.user(name)
                else:
                    continue
            except GatewayError:  # deleted since
                continue
            status = store.budget_status(group, row, now)
            if status is not None:
                found[group, name] = status
    return found


def cmd_logs(args) -> int:
    db = open_ledger_for_reading(args)
    user_ids = None
    if args.user:
        email = check_email(args.user)
        user_ids = [row[0] for row in db.execute("SELECT id FROM users WHERE email = ?", (email,))]
        if not user_ids:
            raise GatewayError(404, f"no user {email} in this ledger")
    rows = query_logs(db, args.limit, user_ids)
    for row in reversed(rows):
        if args.json:
            print(json.dumps(row))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ts"]))
        tokens = f"{row['prompt_tokens'] or 0}+{row['completion_tokens'] or 0} tok"
        who = f"{row['user']} " if row["key_id"] is not None else ""
        failover = f"({row['attempts']} attempts, {row['account']}: {row['model_upstream']}) " if (
            row.get("attempts") or 0) > 1 else ""  # fmt: skip
        # what clients and upstreams chose (model names, error words) reaches a terminal: no escape sequences
        print(one_line(f"{when} {row['status']} {who}{row['client_protocol']}->{row['provider'] or '-'} "
                        f"{row['lane'] or '-'} {row['model_requested'] or '-'} {failover}{'stream ' if row['stream'] else ''}"
                        f"{tokens} ${format_usd(row['cost_usd'])} {row['latency_ms'] or 0:.0f}ms {row['error'] or ''}".rstrip()))  # fmt: skip
    return 0


def main(argv=None) -> int:
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactedStream(stdout), RedactedStream(stderr)  # the CLI's one exit
    try:
        try:
            return run_command(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
    except StartupError as exc:
        print(f"tgw: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"tgw: configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:  # a user or key command refused (unknown user, bad value, duplicate)
        print(f"tgw: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tgw logs | head`: the reader has all it wanted
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())  # the final flush goes nowhere
        except (OSError, ValueError):
            pass
        return 141  # what a shell reports for a command ended by SIGPIPE
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def run_command(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"serve": cmd_serve, "config": cmd_config, "usage": cmd_usage, "logs": cmd_logs, "user": cmd_user,
                "key": cmd_key, "chat": cmd_chat, "start": cmd_start, "stop": cmd_stop, "status": cmd_status}  # fmt: skip
    return handlers[args.command](args)


class RedactedStream:
    """sys.stdout or sys.stderr while a command runs: everything printed passes redact()."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(redact(text))

    def __getattr__(self, name):
        return getattr(self.stream, name)


def reexec_as_import() -> None:
    """Run as a script, Python keeps this whole file's syntax tree alive for the life of the
    process (~15 MB). A long-running `serve` re-executes itself as an import instead, which
    frees the tree and caches the bytecode, so the next start is faster too."""
    if os.name != "posix" or os.environ.get("TGW_REEXECUTED"):
        return
    os.environ["TGW_REEXECUTED"] = "1"
    # the file's own path rides along as an argument, so `ps` and `pgrep -f tgw.py` find the gateway
    bootstrap = (
        "import os, sys; sys.dont_write_bytecode = False; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); "
        "import tgw; sys.exit(tgw.main())"
    )
    os.execv(sys.executable, [sys.executable, "-S", "-c", bootstrap, str(Path(__file__).resolve()), *sys.argv[1:]])


# ======================================================================================
# 15. Gateway control: tgw start, stop and status
# ======================================================================================
#
# `tgw start` runs `tgw serve --pid-file …` in a session of its own, its output appended to
# the log file. The daemon writes the pid file (JSON: pid, url, config, log, started) once it
# listens and removes it when it exits, so the file says where a running daemon listens, even
# on port 0. `tgw stop` sends SIGTERM (the gateway finishes in-flight requests and drains the
# ledger) and waits. `tgw status` reads the pid file and asks the gateway's /health. The chat
# assistant's start_gateway, stop_gateway and get_status tools call these same functions.

DAEMON_START_TIMEOUT = 20.0  # seconds `tgw start` waits for the daemon to listen
GET_JSON_HEADERS = {"User-Agent": f"tgw/{__version__}", "Accept": "application/json"}
HEALTH_KEYS_SHOWN = ("status", "version", "work_mode", "offline", "routes", "aliases", "providers", "uptime_s",
                     "ledger_rows_written")  # fmt: skip


UNPRINTABLE = dict.fromkeys([c for c in range(32) if c not in (9, 10)] + list(range(127, 160)))  # ESC, CSI...


def printable(text: str) -> str:
    """Text from a model or an upstream, safe for a terminal (no escape sequences)."""
    return text.translate(UNPRINTABLE)


@dataclass
class Outcome:
    """What an action did, in words for a person or a model."""

    ok: bool
    text: str
    changed: bool = False


def tokligence_dir() -> Path:
    return Path("~/.tokligence").expanduser()


def open_private(path: Path, mode: str = "ab"):
    """A file under ~/.tokligence that holds what its user would not show others (the daemon's
    log, the chat history): created 0600, in a directory created 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


def daemon_paths() -> tuple[Path, Path]:
    """The daemon's pid file and log file."""
    home = tokligence_dir()
    return home / "tgw.pid", home / "tgw.log"


def read_pid_file(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if type(data) is int:  # a bare pid, as other tools write them
        data = {"pid": data}
    if not isinstance(data, dict) or type(data.get("pid")) is not int or not 1 < data["pid"] < 1 << 31:
        return None
    for key in ("url", "health_url", "openai_url"):
        if not (isinstance(data.get(key), str) and data[key].startswith("http://")):
            data.pop(key, None)
    return data


def write_pid_file(path: Path, info: dict) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(info) + "\n")
    os.replace(staged, path)


def remove_pid_file(path: Path, pid: int) -> None:
    """Remove the pid file if it still names `pid` (a newer daemon may have replaced it)."""
    info = read_pid_file(path)
    if info is not None and info["pid"] == pid:
        path.unlink(missing_ok=True)


_daemon_children: dict[int, subprocess.Popen] = {}  # daemons this process started, reaped here


def process_alive(pid: int) -> bool:
    child = _daemon_children.get(pid)
    if child is not None:
        return child.poll() is None
    if os.name != "posix":  # signal 0 means CTRL_C_EVENT on Windows: trust the pid file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    try:  # a zombie (exited, its parent has not reaped it) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True


def is_tgw_daemon(pid: int, pid_path: Path) -> bool:
    """Whether `pid` runs `tgw serve --pid-file PID_PATH`, the gateway that file is for: a stale
    pid file's pid may belong to any other program by now (an editor open on tgw.py, say), and
    only the gateway is ever signalled."""
    wanted = ["--pid-file", str(pid_path)]
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # gone
        try:  # no /proc (macOS): ps tells the command line, spaces between the arguments
            shown = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return os.name != "posix"  # Windows: trust the pid file
        return "serve" in shown.stdout.split() and " ".join(wanted) in shown.stdout
    except OSError:
        return False  # another user's process, unreadable: not ours to stop
    return "serve" in args and any(args[i : i + 2] == wanted for i in range(len(args) - 1))


def running_daemon() -> dict | None:
    """The pid file's contents when the daemon it names is alive."""
    pid_path = daemon_paths()[0]
    info = read_pid_file(pid_path)
    if info is not None and process_alive(info["pid"]) and is_tgw_daemon(info["pid"], pid_path):
        return info
    return None


def gateway_url(cfg: Config, port: int | None = None) -> str:
    """Where a gateway with this configuration (listening on `port`) is reached from this machine."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(cfg.host, cfg.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.facade_port if port is None else port}"


def load_config_or_defaults(config_arg: str | None, env=None) -> tuple[Config, str]:
    """The configuration, or the defaults and the error when it does not load (status and
    the chat assistant keep working, to help fix it)."""
    try:
        return load_config(config_arg, env=env), ""
    except (ConfigError, OSError, ValueError) as exc:  # a bad value; an unreadable or binary file
        values = {key: spec[0] for key, spec in CONFIG_KEYS.items()}
        path = find_config_file(config_arg, env)
        return Config(values, {}, dict(DEFAULT_PRICES), path, dict.fromkeys(values, "default")), str(exc)


def config_path_for_writing(config_arg: str | None, cfg: Config | None, env=None) -> Path:
    """Where `tgw config set` and the chat's set_config write: the file in use, else --config,
    $TOKLIGENCE_CONFIG, ./gateway.ini."""
    env = os.environ if env is None else env
    if cfg is not None and cfg.path is not None:
        return cfg.path
    return Path(config_arg or env.get("TOKLIGENCE_CONFIG") or "gateway.ini").expanduser()


def log_tail(path: Path, offset: int, lines: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(offset, path.stat().st_size - 4096))
            text = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return redact("\n".join(text.strip().splitlines()[-lines:])) or "(the log is empty)"


def start_daemon(config_arg: str | None, overrides: dict | None = None, env=None) -> Outcome:
    """`tgw serve` in the background, with environment `env`; waits until it listens (or says
    why it did not)."""
    env = os.environ if env is None else env
    pid_path, log_path = daemon_paths()
    info = running_daemon()
    if info is not None:
        return Outcome(True, f"tgw is already running (pid {info['pid']}, {info.get('url', 'address unknown')})")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        cfg = load_config(config_arg, overrides, env)
    except ConfigError as exc:
        return Outcome(False, f"not started: configuration error: {redact(str(exc))}")
    pid_path.unlink(missing_ok=True)  # stale: its process is gone
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--pid-file", str(pid_path)]
    if cfg.path is not None:
        command += ["--config", str(cfg.path.resolve())]
    # a secret goes to the daemon in its environment: its command line is every user's to read (ps)
    secrets = {f"TOKLIGENCE_{key.upper()}": value for key, value in overrides.items() if key in SECRET_KEYS}
    command += [f"--set={key}={value}" for key, value in overrides.items() if key not in SECRET_KEYS]
    with open_private(log_path) as log_file:
        log_file.write(f"--- tgw start {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        log_file.flush()
        offset = log_file.tell()
        detach = {"start_new_session": True} if os.name == "posix" else {"creationflags": 0x00000008}
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**env, **secrets}, **detach)  # fmt: skip
    _daemon_children[proc.pid] = proc
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        info = read_pid_file(pid_path)
        if info is not None and info["pid"] == proc.pid:
            url = info.get("url", gateway_url(cfg))
            return Outcome(True, f"started tgw in the background: pid {proc.pid}, {url}, log {log_path}", True)
        if proc.poll() is not None:
            return Outcome(
                False, f"tgw exited at start (status {proc.returncode}); the log says:\n{log_tail(log_path, offset)}"
            )
        time.sleep(0.05)
    proc.terminate()
    return Outcome(False, f"tgw did not listen within {DAEMON_START_TIMEOUT:g} s, so it was stopped; the log says:\n"
                          f"{log_tail(log_path, offset)}")  # fmt: skip


def stop_daemon(grace: float = 30.0) -> Outcome:
    """SIGTERM to the daemon, then wait while it finishes in-flight requests."""
    pid_path, _ = daemon_paths()
    info = read_pid_file(pid_path)
    if info is None:
        return Outcome(True, "no tgw daemon is running (no pid file; a gateway run with `tgw serve` stops with Ctrl-C)")
    pid = info["pid"]
    if not (process_alive(pid) and is_tgw_daemon(pid, pid_path)):
        pid_path.unlink(missing_ok=True)
        return Outcome(True, f"no tgw daemon is running (removed a stale pid file naming pid {pid})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        return Outcome(False, f"not allowed to stop pid {pid} (another user's process)")
    deadline = time.monotonic() + grace + 5
    while process_alive(pid):
        if time.monotonic() > deadline:
            return Outcome(False, f"tgw (pid {pid}) is still finishing requests after {grace + 5:g} s")
        time.sleep(0.05)
    remove_pid_file(pid_path, pid)
    _daemon_children.pop(pid, None)
    return Outcome(True, f"stopped tgw (pid {pid})", True)


async def fetch_json(pool: UpstreamPool, url: str, headers: dict | None = None, limit: int = 1 << 20):
    """GET a JSON document with the one HTTP client; errors as GatewayError."""
    resp = await pool.request("GET", url, headers or GET_JSON_HEADERS)
    data = await resp.read(limit)
    if resp.status >= 400:
        raise OPENAI_CODEC.decode_error(resp.status, data)  # reads any of the four envelopes
    try:
        return loads(data)
    except (ValueError, RecursionError):
        raise GatewayError(502, f"{url} did not answer JSON") from None


def run_with_pool(work, connect_timeout: float = 1.0, read_timeout: float = 3.0):
    """Run `work(pool)` (a coroutine function) to its end, for CLI commands."""

    async def main():
        pool = UpstreamPool(connect_timeout, read_timeout)
        try:
            return await work(pool)
        finally:
            pool.close()

    return asyncio.run(main())


def config_view(cfg: Config) -> dict:
    """What the configuration says, in /health's shape (to show side by side with it)."""
    providers = build_providers(cfg)
    try:
        router = Router(cfg, providers)
        routes, aliases, offline = [f"{g}=>{p}" for g, p in router.rules], router.aliases, router.offline
    except ConfigError as exc:
        routes, aliases, offline = [f"(invalid: {exc})"], {}, False
    shown = {name: {"protocol": p.protocol, "configured": p.configured, **({"base_url": p.base_url} if p.base_url else {})}
             for name, p in providers.items()}  # fmt: skip
    return {"work_mode": cfg.work_mode, "offline": offline, "routes": routes, "aliases": aliases, "providers": shown}


async def gateway_status(cfg: Config, pool: UpstreamPool, config_error: str = "") -> dict:
    """Is a gateway running where the config (or the daemon's pid file) says, and what its
    /health reports, beside what the configuration says."""
    pid_path, log_path = daemon_paths()
    info = read_pid_file(pid_path)
    daemon = None
    if info is not None:
        alive = process_alive(info["pid"]) and is_tgw_daemon(info["pid"], pid_path)
        daemon = {"pid": info["pid"], "alive": alive, "url": info.get("url"), "pid_file": str(pid_path),
                  "log": str(log_path)}  # fmt: skip
    if daemon and daemon["alive"] and daemon["url"]:
        url, health_url = daemon["url"], info.get("health_url") or daemon["url"]
    else:
        url, health_url = gateway_url(cfg), listener_url(cfg, "health")
    status = {"url": url, "running": False, "daemon": daemon, "health": None, "error": "",
              "config_file": str(cfg.path) if cfg.path else None, "config_error": config_error,
              "config": config_view(cfg)}  # fmt: skip
    try:
        health = await fetch_json(pool, health_url + "/health")
        if isinstance(health, dict) and health.get("status") == "ok":
            status["running"], status["health"] = True, health
        else:
            status["error"] = "something answers there, but not a tgw /health"
    except GatewayError as err:
        status["error"] = err.message
    return status


def format_status(status: dict) -> str:
    """`tgw status` in words. Sections of /health this code does not know are shown as they come."""
    lines = []
    daemon, health = status.get("daemon"), status.get("health")
    if status["running"] and daemon and daemon["alive"]:
        lines.append(
            f"gateway: running at {status['url']} (pid {daemon['pid']}, started by tgw start; log {daemon['log']})"
        )
    elif status["running"]:
        lines.append(f"gateway: running at {status['url']} (not started by tgw start)")
    else:
        lines.append(f"gateway: not running at {status['url']} ({status['error']})")
    if daemon and not daemon["alive"]:
        lines.append(f"  stale pid file {daemon['pid_file']}: pid {daemon['pid']} is gone")
    elif daemon and not status["running"]:
        lines.append(
            f"  the daemon (pid {daemon['pid']}) is alive but its /health does not answer: see {daemon['log']}"
        )
    lines.append(f"config file: {status['config_file'] or '(none: defaults and TOKLIGENCE_* variables)'}")
    if status.get("config_error"):
        lines.append(f"config error: {status['config_error']}")
    config = status["config"]
    view = health if isinstance(health, dict) else config
    if health:
        lines.append(f"health: {health.get('status')}, version {health.get('version')}, up {health.get('uptime_s')} s, "
                     f"{health.get('ledger_rows_written')} ledger rows written this run")  # fmt: skip
    lines.append(f"work_mode: {view.get('work_mode')}" + ("  (offline: every model is answered by loopback)"
                                                          if view.get("offline") else ""))  # fmt: skip
    providers = view.get("providers") if isinstance(view.get("providers"), dict) else {}
    lines.append("providers:")
    for name, p in list(providers.items())[:50]:
        p = p if isinstance(p, dict) else {}
        state = "configured" if p.get("configured") else "not configured"
        lines.append(
            f"  {str(name):<14} {str(p.get('protocol', '?')):<10} {state:<15} {p.get('base_url', '')}".rstrip()
        )
    routes = view.get("routes") if isinstance(view.get("routes"), list) else []
    lines.append("routes: " + (", ".join(map(str, routes[:100])) or "(none)"))
    aliases = view.get("aliases") if isinstance(view.get("aliases"), dict) else {}
    if aliases:
        lines.append("aliases: " + ", ".join(f"{a}=>{m}" for a, m in list(aliases.items())[:100]))
    if health:
        for key in ("work_mode", "routes"):
            if health.get(key) != config.get(key):
                lines.append(
                    f"note: the configuration now says {key} = {config.get(key)}; restart the gateway to apply it"
                )
        for key, value in health.items():
            if key not in HEALTH_KEYS_SHOWN:
                lines.extend(format_section(str(key), value))
    return printable(redact("\n".join(lines)))  # /health's words could hold terminal escapes


def format_section(name: str, value, depth: int = 0) -> list[str]:
    """Any JSON value as indented lines (bounded in depth, items and length)."""
    pad = "  " * depth
    if isinstance(value, dict) and value and depth < 3:
        out = [f"{pad}{name}:"]
        for key, item in list(value.items())[:50]:
            out += format_section(str(key), item, depth + 1)
        return out
    if isinstance(value, list) and value and depth < 3:
        return [f"{pad}{name}:"] + [f"{pad}  - {json.dumps(item, default=str)[:200]}" for item in value[:50]]
    shown = value if isinstance(value, str) else json.dumps(value, default=str)
    return [f"{pad}{name}: {shown[:200]}"]


def announce_daemon(pid_path: Path, cfg: Config, port: int, gateway) -> None:
    """The daemon's serve(ready=...): say in the pid file where it listens, where its /health
    answers and where its OpenAI endpoints do (in multiport mode the facade may serve neither)."""

    def url_of(bundle: str) -> str:
        listener = gateway.listeners.get(listener_serving(cfg, bundle))
        return gateway_url(cfg, listener.port if listener is not None else port)

    write_pid_file(pid_path, {"pid": os.getpid(), "url": gateway_url(cfg, port), "health_url": url_of("health"),
                              "openai_url": url_of("openai_core"), "config": str(cfg.path) if cfg.path else None,
                              "log": str(daemon_paths()[1]), "started": time.time()})  # fmt: skip


def cmd_start(args) -> int:
    outcome = start_daemon(args.config, {"host": args.host, "facade_port": args.port, **set_flags(args.set)})
    print(outcome.text, file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def cmd_stop(args) -> int:
    cfg, _ = load_config_or_defaults(args.config)
    outcome = stop_daemon(cfg.shutdown_grace)
    print(outcome.text, file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def cmd_status(args) -> int:
    """Exit status 0 when a gateway answers, 3 when none does (as LSB init scripts say)."""
    cfg, error = load_config_or_defaults(args.config)
    status = run_with_pool(lambda pool: gateway_status(cfg, pool, error))
    print(redact(json.dumps(status, indent=2)) if args.json else format_status(status))
    return 0 if status["running"] else 3


# ======================================================================================
# 16. The chat assistant: model selection, tools, the offline assistant, the terminal loop
# ======================================================================================
#
# `tgw chat` talks to a model through tgw's own providers and codecs, in-process: the
# conversation is a canonical Request with Tools, encoded by the provider's codec, sent with
# UpstreamPool, its stream decoded into canonical events. So it runs on any provider and
# protocol. With no model reachable (or --offline) a rule-based helper drives the same tools.
#
# Secrets never reach the model: configured ones come back from get_config masked (and every
# text sent passes through redact()); a key the user types becomes a placeholder ([secret_1])
# before anything is sent or written to the history file, and set_config turns a placeholder
# back into the real value locally. The placeholder map lives only in this process's memory.

CHAT_TOOL_ROUNDS = 8  # model calls with tool results per user turn, at most
CHAT_CALLS_PER_ROUND = 16  # tool calls run per model answer; more are refused
CHAT_MAX_TOKENS = 4096
CHAT_ANSWER_LIMIT = 4 << 20  # bytes of one streamed answer
CHAT_TOOL_RESULT_LIMIT = 16000  # characters of a tool result sent to the model
CHAT_HISTORY_TURNS = 24  # user turns kept in the conversation
CHAT_MAX_INPUT = 1 << 20  # characters of a prompt (a line, -p or standard input)
CHAT_PROBE_TIMEOUT = 0.5  # seconds to connect to a local server or gateway while looking for a model
CHAT_DEFAULT_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
CHAT_CODECS = {"openai": OPENAI_CODEC, "anthropic": ANTHROPIC_CODEC, "gemini": GEMINI_CODEC}
CHAT_ENV_KEYS = (("openai", ("OPENAI_API_KEY",), "OPENAI_BASE_URL"), ("anthropic", ("ANTHROPIC_API_KEY",), "ANTHROPIC_BASE_URL"),
                 ("gemini", ("GEMINI_API_KEY", "GOOGLE_API_KEY"), ""))  # fmt: skip
CHAT_LOCAL_SERVERS = (("ollama", "OLLAMA_BASE_URL", "http://127.0.0.1:11434"),
                      ("vllm", "VLLM_BASE_URL", "http://127.0.0.1:8000"),
                      ("lmstudio", "LMSTUDIO_BASE_URL", "http://127.0.0.1:1234"))  # fmt: skip

# Keys people paste: known prefixes, or long random-looking tokens (checked by looks_random).
KNOWN_SECRET = (r"(?:sk-ant-|sk-proj-|sk-or-|sk-)[\w-]{16,}|AIza[\w-]{20,}|tok_[\w-]{12,}"
                r"|(?:gsk_|hf_|xai-|gh[pousr]_|github_pat_|glpat-|pplx-|r8_)[\w-]{16,}|AKIA[0-9A-Z]{16}")  # fmt: skip
TYPED_SECRET = re.compile(rf"(?<![\w-])(?:(?P<known>{KNOWN_SECRET})|(?P<long>[\w+/.-]{{32,}}={{0,2}}))(?![\w-])")
KNOWN_SECRET_INSIDE = re.compile(rf"(?<![A-Za-z0-9])(?:{KNOWN_SECRET})(?![\w-])")
SECRET_KINDS = (("sk-ant-", "anthropic"), ("sk-", "openai"), ("AIza", "gemini"), ("tok_", "client"))


def looks_random(token: str) -> bool:
    """A long unbroken run of letters and digits, mixed: a key, not a path or a model name."""
    run = max(re.findall(r"[A-Za-z0-9]+", token), key=len, default="")
    return len(run) >= 24 and sum(c.isdigit() for c in run) >= 2 and sum(c.isalpha() for c in run) >= 2


class ChatSecrets:
    """Typed keys <-> placeholders, in this process's memory only."""

    PLACEHOLDER = re.compile(r"\[secret_(\d{1,4})\]")

    def __init__(self):
        self.values: list[str] = []

    def placeholder(self, value: str) -> str:
        if value not in self.values:
            if len(self.values) >= 1000:
                return "[secret]"
            self.values.append(value)
            redact.add(value)  # nor in logs or tool results
        return f"[secret_{self.values.index(value) + 1}]"

    def hide(self, text: str) -> str:
        """`text` as it may be sent or stored: typed keys as placeholders, configured ones redacted."""

        def swap(m: re.Match) -> str:
            value = m.group(0)
            if m.group("known") or looks_random(value):
                return self.placeholder(value)
            return KNOWN_SECRET_INSIDE.sub(lambda k: self.placeholder(k.group()), value)  # a path holding a key

        text = TYPED_SECRET.sub(swap, text)
        for value in self.values:  # seen again inside other text
            if value in text:
                text = text.replace(value, self.placeholder(value))
        return redact(text)

    def reveal(self, text: str) -> str:
        """Placeholders back to the values the user typed (for set_config, locally)."""

        def real(m: re.Match) -> str:
            number = int(m.group(1))
            if not 1 <= number <= len(self.values):
                raise ConfigError(f"{m.group()} is not a key typed in this chat session: type the key again")
            return self.values[number - 1]

        return self.PLACEHOLDER.sub(real, text)

    def kind(self, placeholder: str) -> str:
        """Which provider a typed key looks like it belongs to, from its prefix ('' if unknown)."""
        try:
            value = self.reveal(placeholder)
        except ConfigError:
            return ""
        return next((kind for prefix, kind in SECRET_KINDS if value.startswith(prefix)), "")


def shown_value(key: str, value) -> str:
    """A config value as the assistant (and the model) may see it: secrets masked."""
    if key in SECRET_KEYS:
        if not value:
            return "(not set)"
        if key == "api_keys":
            return f"(set: {len([k for k in value.split(',') if k.strip()])} key(s))"
        return f"{mask_secret(value)} (set, {len(value)} characters)"
    shown = str(value).lower() if isinstance(value, bool) else str(value)
    return redact(shown) if shown else "(empty)"


def provider_headers(provider: Provider, cfg: Config) -> dict:
    """The provider's request headers, plus the anthropic-version every Messages call needs."""
    headers = dict(provider.auth_headers())
    if provider.protocol == "anthropic":
        headers.setdefault("anthropic-version", cfg.anthropic_version)
    return headers


async def call_model(pool: UpstreamPool, provider: Provider, headers: dict, req: Request, on_text=None) -> Response:
    """One canonical Request to a provider, with its codec; the answer folded, text passed to
    `on_text` as it streams. The same path the gateway's translation lane takes."""
    codec = CHAT_CODECS[provider.protocol]
    body = codec.encode_request(req, req.model, provider)
    url = provider.url(CALL_OPERATIONS[provider.protocol], req.model, req.stream)
    resp = await pool.request("POST", url, headers, dumps(body))
    try:
        if resp.status >= 400:
            raise codec.decode_error(resp.status, await resp.read(1 << 20))
        if "text/event-stream" not in resp.headers.get("content-type", ""):
            result = codec.decode_response(json_or_502(await resp.read(CHAT_ANSWER_LIMIT), provider.name))
            if on_text is not None and text_of(result.parts):
                on_text(text_of(result.parts))
            return result
        decoder, parser, events, size = codec.stream_decoder(), SSEParser(), [], 0

        def take(new_events) -> None:
            for ev in new_events:
                if isinstance(ev, StreamError):
                    raise ev.error
                events.append(ev)
                if on_text is not None and isinstance(ev, BlockDelta) and ev.kind == "text":
                    on_text(ev.value)

        while chunk := await resp.next_chunk():
            size += len(chunk)
            if size > CHAT_ANSWER_LIMIT:
                raise GatewayError(502, f"the answer of {provider.name} is longer than {CHAT_ANSWER_LIMIT} bytes")
            for sse in parser.feed(chunk):
                take(decoder.feed(sse))
        for sse in parser.finish():
            take(decoder.feed(sse))
        take(decoder.finish())
        return fold_events(events)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, RecursionError) as exc:  # a malformed answer
        raise GatewayError(502, f"{provider.name} sent an answer tgw cannot read ({type(exc).__name__})") from None
    finally:
        resp.close() if not resp.done else resp.release()


# ---- model selection -------------------------------------------------------------------


@dataclass
class ChatCandidate:
    """One place a chat model may come from, and why it can or cannot be used."""

    name: str  # the provider's name: openai, anthropic, a named provider, ollama, vllm, lmstudio, tgw
    source: str  # what was looked at, as --detect shows it
    reason: str  # why it can or cannot be used, in a few words
    provider: Provider | None = None
    model: str = ""

    @property
    def available(self) -> bool:
        return self.provider is not None and bool(self.model)


def is_concrete(pattern: str) -> bool:
    return not any(c in pattern for c in "*?[")


async def list_models(pool: UpstreamPool, provider: Provider) -> tuple[list[str], str]:
    """An OpenAI-compatible server's model ids (chat models first), or the error."""
    try:
        data = await fetch_json(pool, provider.url("models"), provider.auth_headers())
    except GatewayError as err:
        return [], err.message
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return [], "its /models answer has no list of models"
    ids = [
        m["id"] for m in items[:1000] if isinstance(m, dict) and isinstance(m.get("id"), str) and 0 < len(m["id"]) < 200
    ]
    chat = [m for m in ids if "embed" not in m.lower() and not m.startswith("loopback")]
    return chat, ""


async def configured_candidate(provider: Provider, cfg: Config, router, pool: UpstreamPool) -> ChatCandidate:
    where = f"[provider.{provider.name}] in {cfg.path or 'TOKLIGENCE_PROVIDER_* variables'}"
    if provider.key_setting:
        setting = provider.key_setting if provider.api_key else f"{provider.name}_base_url"
        origin = cfg.sources.get(setting, "default")
        origin = f"TOKLIGENCE_{setting.upper()}" if origin == "environment" else origin
        where = f"{setting} from {origin}"
        if not provider.configured:
            return ChatCandidate(provider.name, provider.name, f"not configured (no {provider.key_setting})")
    model = next((g for g in provider.models if is_concrete(g)), "")
    if not model and router is not None:
        model = next((g for g, p in router.rules if p == provider.name and is_concrete(g)), "")
    if not model and (provider.protocol != "openai" or provider.official):
        model = CHAT_DEFAULT_MODELS[provider.protocol]
    if not model:
        models, error = await list_models(pool, provider)
        if not models:
            reason = f"lists no model ({error})" if error else "lists no model"
            return ChatCandidate(provider.name, provider.name, f"{reason}; {where}", provider)
        model = models[0]
    return ChatCandidate(provider.name, provider.name, where, provider, model)


async def environment_candidates(cfg: Config, env, tgw_url: str, pool: UpstreamPool) -> list[ChatCandidate]:
    reasoning = tuple(g.strip() for g in cfg.reasoning_models.split(",") if g.strip())
    out = []
    for name, key_names, base_variable in CHAT_ENV_KEYS:
        source = "/".join(key_names)
        key_name = next((k for k in key_names if env.get(k)), "")
        if not key_name:
            out.append(ChatCandidate(name, source, "not set"))
            continue
        key = env[key_name]
        base = (env.get(base_variable) if base_variable else "") or CONFIG_KEYS[f"{name}_base_url"][0]
        parts = urlsplit(base)
        redact.add(key, parts.password or parts.username or "")  # never printed, logged or sent
        if not base.startswith(("http://", "https://")):
            out.append(ChatCandidate(name, key_name, f"{base_variable}={base!r} is not an http(s) URL"))
            continue
        if base.rstrip("/").removesuffix("/v1") == tgw_url:
            out.append(ChatCandidate(name, key_name, f"{base_variable} points at tgw itself (see the tgw line)"))
            continue
        official = name == "openai" and "api.openai.com" in base
        flavor = "openai" if official else ("compatible" if name == "openai" else name)
        provider = Provider(name, name, base.rstrip("/"), key, flavor, key_setting=key_name, reasoning_globs=reasoning)
        model, why = CHAT_DEFAULT_MODELS[name], f"set in the environment; {base}"
        if flavor == "compatible":  # not OpenAI itself: ask which models it has
            models, error = await list_models(pool, provider)
            model, why = (models[0], why) if models else ("", f"{why} lists no model ({error or 'none'})")
        out.append(ChatCandidate(name, key_name, why, provider, model))
    return out


async def local_candidate(name: str, variable: str, default: str, env, pool: UpstreamPool) -> ChatCandidate:
    root = (env.get(variable) or default).rstrip("/")
    parts = urlsplit(root)
    redact.add(parts.password or parts.username or "")
    source = f"{name} ({variable})" if env.get(variable) else name
    if not root.startswith(("http://", "https://")):
        return ChatCandidate(name, source, f"{variable}={root!r} is not an http(s) URL")
    base = root if root.endswith("/v1") else root + "/v1"
    provider = Provider(name, "openai", base, "", "compatible")
    models, error = await list_models(pool, provider)
    if error:
        return ChatCandidate(name, source, f"nothing answers at {root} ({error})")
    if not models:
        return ChatCandidate(name, source, f"answers at {root} but lists no chat model", provider)
    return ChatCandidate(name, source, f"answers at {root}", provider, models[0])


async def gateway_candidate(cfg: Config, pool: UpstreamPool, url: str, health_url: str) -> ChatCandidate:
    """A running tgw with real providers behind it (its loopback model is no assistant): its
    /health at `health_url`, its OpenAI endpoints at `url` (one port unless multiport)."""
    try:
        health = await fetch_json(pool, health_url + "/health")
    except GatewayError as err:
        return ChatCandidate("tgw", "tgw", f"no gateway answers at {health_url} ({err.message})")
    if not isinstance(health, dict) or health.get("status") != "ok":
        return ChatCandidate("tgw", "tgw", f"something answers at {health_url}, but not a tgw /health")
    if health.get("offline"):
        return ChatCandidate("tgw", "tgw", f"a gateway runs at {url} with no provider configured (only loopback)")
    client_key = next((k.strip() for k in cfg.api_keys.split(",") if k.strip()), "")
    provider = Provider("tgw", "openai", url + "/v1", client_key, "compatible")
    models, error = await list_models(pool, provider)
    if not models:
        return ChatCandidate(
            "tgw", "tgw", f"the gateway at {url} lists no model ({error or 'only loopback'})", provider
        )
    return ChatCandidate("tgw", "tgw", f"the gateway answers at {url}", provider, models[0])


def explicit_candidate(spec: str, source: str, found: list[ChatCandidate], router) -> ChatCandidate:
    """--model / chat_model: 'model' (routed like the gateway routes it) or 'provider/model'."""
    names = {c.name for c in found} | {n for n, _, _ in CHAT_LOCAL_SERVERS} | {"tgw"}
    prefix, sep, rest = spec.partition("/")
    if sep and prefix.lower() in names and rest:
        wanted, model = prefix.lower(), rest
    elif router is not None:
        model = router.aliases.get(spec, spec)
        wanted = next((p for g, p in router.rules if glob_match(g, model)), "")
    else:
        wanted, model = "", spec
    if not wanted:
        return ChatCandidate("", source, f"{spec}: matches no route and names no provider")
    for c in found:
        if c.name == wanted and c.provider is not None:
            return ChatCandidate(c.name, source, f"{c.source}: {c.reason}", c.provider, model)
    why = next((c.reason for c in found if c.name == wanted), "not found")
    return ChatCandidate(wanted, source, f"{spec}: provider {wanted} is not available: {why}")


async def detect_chat_models(cfg: Config, env, spec: str = "", spec_source: str = "--model",
                             everything: bool = False) -> tuple[list[ChatCandidate], ChatCandidate | None]:  # fmt: skip
    """Every place a chat model may come from, in order, and the one to use. Places are
    looked at in stages (configured providers, environment keys, local servers and a
    running tgw, probed in parallel and briefly); the first stage that yields a model ends the
    search unless `everything` is asked for (--detect)."""
    pool = UpstreamPool(CHAT_PROBE_TIMEOUT, CHAT_PROBE_TIMEOUT * 4)
    providers = build_providers(cfg)
    try:
        router = Router(cfg, providers)
    except ConfigError:
        router = None
    daemon = running_daemon() or {}
    tgw_url = daemon.get("openai_url") or daemon.get("url") or listener_url(cfg, "openai_core")  # its chat endpoint
    health_url = daemon.get("health_url") or daemon.get("url") or listener_url(cfg, "health")

    stages = (
        lambda: [configured_candidate(p, cfg, router, pool) for p in providers.values() if p.protocol != "loopback"],
        lambda: [environment_candidates(cfg, env, tgw_url, pool)],
        lambda: (
            [local_candidate(n, v, d, env, pool) for n, v, d in CHAT_LOCAL_SERVERS]
            + [gateway_candidate(cfg, pool, tgw_url, health_url)]
        ),
    )
    found: list[ChatCandidate] = []
    chosen = None
    try:
        for stage in stages:
            for result in await asyncio.gather(*stage()):
                found += result if isinstance(result, list) else [result]
            chosen = explicit_candidate(spec, spec_source, found, router) if spec else next(
                (c for c in found if c.available), None)  # fmt: skip
            if chosen is not None and chosen.available and not everything:
                break
    finally:
        pool.close()
    if spec:
        found.insert(0, chosen)
    return found, chosen if chosen is not None and chosen.available else None


# ---- documentation built in (search_docs) -----------------------------------------------

CHAT_DOCS = (
    ("endpoint POST /v1/chat/completions", "OpenAI Chat Completions, JSON and SSE streams (also at "
     "/v1beta/openai/chat/completions); any model: the route decides the provider"),
    ("endpoint POST /v1/responses", "the OpenAI Responses API, what Codex speaks; GET and DELETE /v1/responses/{{id}}, GET /v1/responses/{{id}}/input_items; "
     "previous_response_id works across restarts (responses_retention_days)"),
    ("endpoint POST /v1/messages", "Anthropic Messages, what Claude Code speaks (also /anthropic/v1/messages); "
     "token counting at /v1/messages/count_tokens"),
    ("endpoint Gemini /v1beta/models/MODEL:generateContent", "Gemini generateContent, :streamGenerateContent and "
     ":countTokens, what google-genai speaks"),
    ("endpoint POST /v1/embeddings", "OpenAI embeddings, float or base64"),
    ("endpoint GET /v1/models", "the models the gateway serves, in OpenAI's, Anthropic's or Gemini's shape"),
    ("endpoint GET /health", "status, version, work mode, routes, providers and which are configured; needs no key"),
    ("client Claude Code", "ANTHROPIC_BASE_URL={url} ANTHROPIC_API_KEY=anything claude   (to run Claude Code on GPT "
     "or a local model, route claude* to that provider in model_provider_routes)"),
    ("client Codex", 'in ~/.codex/config.toml: model_provider = "tgw" and a [model_providers.tgw] table with '
     'base_url = "{url}/v1", wire_api = "responses", env_key = "TGW_API_KEY" (any value unless api_keys is set)'),
    ("client OpenAI SDK and LangChain", 'OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY=anything, or '
     'OpenAI(base_url="{url}/v1"); LangChain: ChatOpenAI(base_url="{url}/v1", model="claude-sonnet-4-5")'),
    ("client Anthropic SDK", 'Anthropic(base_url="{url}", api_key="anything")'),
    ("client google-genai Gemini SDK", 'genai.Client(api_key="anything", '
     'http_options=types.HttpOptions(base_url="{url}/"))'),
    ("topic work modes", "work_mode auto: passthrough when the client's protocol is the provider's, translation "
     "otherwise; passthrough: refuse translation; translation: always through the canonical model"),
    ("topic routes and aliases", "model_provider_routes: ordered glob=>provider pairs, the first match wins, e.g. "
     "claude*=>openai,gpt*=>openai; model_aliases: alias=>model pairs, e.g. fast=>gpt-4o-mini"),
    ("topic named providers vLLM Ollama LM Studio Azure", "[provider.NAME] sections in gateway.ini: type "
     "(openai|azure|anthropic|gemini), base_url, api_key, models (globs routed there), api_version, headers, "
     "responses_api; e.g. [provider.ollama] type = openai, base_url = http://127.0.0.1:11434/v1, models = llama3*"),
    ("topic client keys and auth", "api_keys: keys clients must present (Authorization: Bearer, x-api-key, "
     "x-goog-api-key or ?key=); empty: any key is accepted; needed for a non-loopback host"),
    ("topic offline loopback model", "with no provider configured every model is answered by the built-in loopback "
     "model, which echoes; [[tool:NAME {{...}}]] in a prompt makes it call a tool"),
    ("command tgw start stop status", "tgw start runs the gateway in the background (pid file "
     "~/.tokligence/tgw.pid, log ~/.tokligence/tgw.log); tgw stop stops it; tgw status shows whether it runs, its "
     "/health, providers, routes and work mode"),
    ("command tgw serve", "runs the gateway in the foreground: --port, --host, --work-mode, --set key=value"),
    ("command tgw config", "tgw config list | get KEY | set KEY VALUE | example: read and edit gateway.ini, "
     "keeping its comments"),
    ("command tgw usage logs ledger", "every request is a row in the sqlite ledger (ledger_path): tokens, cost, "
     "latency, lane, status, error; tgw usage totals it by model, provider and day; tgw logs lists the latest"),
    ("command tgw chat", "this assistant: tgw chat [--model M] [--offline] [--detect] [-p PROMPT] [--yes]; it picks "
     "chat_model, then configured providers, OPENAI_API_KEY / ANTHROPIC_API_KEY / GEMINI_API_KEY, local Ollama, vLLM, "
     "LM Studio, then a running tgw"),
)  # fmt: skip
DOC_STOPWORDS = frozenset(re.findall(r"\w+", "a an and are at be can do does for from how i in is it me my of on or "
                                    "the to use what when where which who why with you"))  # fmt: skip


def chat_docs(cfg: Config) -> list[tuple[str, str]]:
    """The built-in documentation: every config key (read from CONFIG_KEYS now, so keys added
    anywhere appear), the endpoints, the clients, the commands."""
    entries = []
    for key, (default, kind, meaning) in CONFIG_KEYS.items():
        shown = "(empty)" if default == "" else (str(default).lower() if isinstance(default, bool) else default)
        choices = f" One of: {', '.join(kind)}." if isinstance(kind, tuple) else ""
        entries.append((f"config key {key}", f"{meaning}. Default: {shown}.{choices} "
                                             f"Environment variable: TOKLIGENCE_{key.upper()}."))  # fmt: skip
    url = gateway_url(cfg)
    return entries + [(title, body.format(url=url)) for title, body in CHAT_DOCS]


def search_docs(entries: list[tuple[str, str]], query: str, limit: int = 5) -> list[tuple[str, str]]:
    words = [w for w in re.findall(r"[a-z0-9_*./-]+", query.lower()[:500]) if w not in DOC_STOPWORDS][:30]
    scored = []
    for position, (title, body) in enumerate(entries):
        low_title, low_body = title.lower(), body.lower()
        title_words = set(re.split(r"[\s_/.:-]+", low_title)) | set(low_title.split())
        score = sum(10 if low_title == f"config key {w}" else 3 if w in title_words else 2 if w in low_title
                    else 1 if w in low_body else 0 for w in words)  # fmt: skip
        if score:
            scored.append((-score, position, title, body))
    return [(title, body) for _, _, title, body in sorted(scored)[:limit]]


# ---- the tools --------------------------------------------------------------------------

_NO_PARAMETERS = {"type": "object", "properties": {}}
CHAT_TOOLS = (
    Tool("get_config", "Read tgw's configuration: one key (its value, where it comes from, default and meaning) or, "
         "without a key, every key. Secret values come back masked.",
         {"type": "object", "properties": {"key": {"type": "string", "description": "e.g. work_mode; omit for all"}}}),
    Tool("set_config", "Set one top-level key of gateway.ini, validated with the gateway's startup rules, comments "
         "kept; the user confirms. For a key the user typed, pass its placeholder (e.g. [secret_1]) as the value.",
         {"type": "object", "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
          "required": ["key", "value"]}),
    Tool("get_status", "Is a gateway running where the config says; its /health, providers and which are "
         "configured, routes, work mode.", _NO_PARAMETERS),
    Tool("test_model", "How a model name resolves (provider, lane, upstream model), then a tiny real request to it: "
         "its latency or the exact error.",
         {"type": "object", "properties": {"model": {"type": "string"}}, "required": ["model"]}),
    Tool("recent_errors", "The latest failed requests in the ledger.",
         {"type": "object", "properties": {"n": {"type": "integer", "description": "how many (default 10)"}}}),
    Tool("usage_summary", "Requests, tokens and cost by model and provider over the last days, from the ledger.",
         {"type": "object", "properties": {"days": {"type": "number", "description": "default 7"}}}),
    Tool("search_docs", "Search tgw's built-in documentation: every config key with meaning and default, the "
         "endpoints, how to point Claude Code, Codex and the SDKs at the gateway, the commands.",
         {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
    Tool("start_gateway", "Start the gateway in the background (tgw start); the user confirms.", _NO_PARAMETERS),
    Tool("stop_gateway", "Stop the background gateway (tgw stop); the user confirms.", _NO_PARAMETERS),
)  # fmt: skip
CHANGING_TOOLS = frozenset({"set_config", "start_gateway", "stop_gateway"})


class ToolArgumentError(Exception):
    pass


def text_argument(args: dict, name: str, required: bool = True, limit: int = 8192) -> str:
    value = args.get(name)
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = str(value)
    if value is None or value == "":
        if required:
            raise ToolArgumentError(f"'{name}' is required")
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ToolArgumentError(f"'{name}' must be a string of at most {limit} characters")
    return value.strip()


def number_argument(args: dict, name: str, default: float, low: float, high: float) -> float:
    value = args.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ToolArgumentError(f"'{name}' must be a number")
    return min(max(number, low), high)


def stage_config_change(path: Path, key: str, value: str, env=None) -> tuple[Path, Config, bool]:
    """gateway.ini with one key set, written beside the real file and loaded with the startup
    rules (values, and routes that name known providers). Returns the staged file, the
    configuration it gives and whether the text changed; the caller renames the staged file
    into place, or removes it."""
    original = path.read_text() if path.exists() else ""
    staged = path.with_name(f".{path.name}.{os.getpid()}.staged")
    path.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text(original)
    try:
        os.chmod(staged, path.stat().st_mode & 0o7777 if path.exists() else 0o600)
        config_set_in_file(staged, key, value)
        cfg = load_config(str(staged), env=env)
        Router(cfg, build_providers(cfg))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged, cfg, staged.read_text() != original


class ChatTools:
    """The tools, run locally for the model or the offline assistant. Each returns an Outcome
    whose text is what the model sees (after ChatSecrets.hide)."""

    def __init__(self, app: ChatApp):
        self.app = app
        self.handlers = {
            "get_config": self.get_config, "set_config": self.set_config, "get_status": self.get_status,
            "test_model": self.test_model, "recent_errors": self.recent_errors, "usage_summary": self.usage_summary,
            "search_docs": self.search_docs, "start_gateway": self.start_gateway, "stop_gateway": self.stop_gateway,
        }  # fmt: skip

    def call(self, name: str, args: dict) -> Outcome:
        """Run one tool: shown as it happens; a change that fails (or is not confirmed) counts."""
        shown = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items())
        self.app.ui.action(f"{name}({shown[:300]})")
        handler = self.handlers.get(name)
        try:
            if handler is None:
                raise ToolArgumentError(f"there is no tool {name!r}; the tools are {', '.join(self.handlers)}")
            if "_raw_arguments" in args or "_value" in args:
                raise ToolArgumentError("the arguments must be a JSON object")
            outcome = handler(args)
        except ToolArgumentError as exc:
            outcome = Outcome(False, str(exc))
        except (OSError, sqlite3.Error, ConfigError, GatewayError) as exc:  # the machine's, not the model's, fault
            outcome = Outcome(False, f"{name} failed: {getattr(exc, 'message', None) or exc}")
        outcome.text = self.app.secrets.hide(outcome.text)
        if name in CHANGING_TOOLS:
            self.app.ui.result(outcome.text)
            if not outcome.ok:
                self.app.failed_changes += 1
        return outcome

    def get_config(self, args: dict) -> Outcome:
        key = text_argument(args, "key", required=False).lower()
        cfg, error = self.app.load_config()
        if key:
            if key not in CONFIG_KEYS:
                return Outcome(False, unknown_key_message(key))
            default, kind, meaning = CONFIG_KEYS[key]
            text = (f"{key} = {self.shown(key, cfg.values[key])}  (from {cfg.sources.get(key, 'default')}; default "
                    f"{shown_value(key, default)}; {meaning})")  # fmt: skip
            return Outcome(True, text + (f"\nthe configuration does not load: {error}" if error else ""))
        lines = [f"config file: {cfg.path or '(none yet: set_config creates ' + str(self.app.config_path()) + ')'}"]
        if error:
            lines.append(f"the configuration does not load: {error} (defaults shown)")
        for key, value in cfg.values.items():
            source = cfg.sources.get(key, "default")
            lines.append(f"{key} = {self.shown(key, value)}" + ("" if source == "default" else f"  [{source}]"))
        for name, pc in cfg.providers.items():
            lines.append(f"[provider.{name}] type={pc.type} base_url={redact(pc.base_url)} "
                         f"api_key={shown_value('openai_api_key', pc.api_key)} models={','.join(pc.models)}")  # fmt: skip
        return Outcome(True, "\n".join(lines))

    def shown(self, key: str, value) -> str:
        """shown_value, but client keys as placeholders: a key can then be added keeping the others."""
        keys = [k.strip() for k in value.split(",") if k.strip()] if key == "api_keys" else []
        if not keys:
            return shown_value(key, value)
        return f"{', '.join(map(self.app.secrets.placeholder, keys))} ({len(keys)} key(s); keep them to add one)"

    def set_config(self, args: dict) -> Outcome:
        key = text_argument(args, "key").lower()
        if key not in CONFIG_KEYS:
            return Outcome(False, unknown_key_message(key))
        try:
            value = self.app.secrets.reveal(text_argument(args, "value", limit=65536))
        except ConfigError as exc:
            return Outcome(False, str(exc))
        if "\n" in value or "\r" in value:
            return Outcome(False, "a config value is one line")
        before, _ = self.app.load_config()
        path = self.app.config_path(before)
        try:
            real = path.resolve()  # a symlinked gateway.ini is edited where it points, the link kept
            staged, after, changed = stage_config_change(real, key, value, self.app.env)
        except (ConfigError, OSError) as exc:
            return Outcome(False, f"not changed: {redact(str(exc))}")
        if not changed:
            staged.unlink(missing_ok=True)
            return Outcome(True, f"{key} is already {shown_value(key, after.values[key])} in {path}; nothing to change")
        if key in SECRET_KEYS:
            redact.add(value)
        new = shown_value(key, after.values[key] if after.sources[key] != "environment" else value)
        try:
            if not self.app.ui.confirm(f"set {key} = {new} in {path}?"):
                return Outcome(False, f"not changed: the user did not confirm setting {key}")
            os.replace(staged, real)
        except OSError as exc:
            return Outcome(False, f"not changed: cannot write {path}: {exc.strerror}")
        finally:
            staged.unlink(missing_ok=True)  # gone once renamed into place; else not wanted (even on Ctrl-C)
        lines = [f"{path}: {key}: {shown_value(key, before.values[key])} -> {new}"]
        variable = f"TOKLIGENCE_{key.upper()}"
        if variable in self.app.env:
            lines.append(f"note: {variable} is set in the environment and overrides gateway.ini")
        daemon = running_daemon()
        if daemon is not None:
            lines.append(f"note: the gateway running as pid {daemon['pid']} reads its configuration at start: "
                         "restart it (stop_gateway, then start_gateway) to apply this")  # fmt: skip
        return Outcome(True, "\n".join(lines), True)

    def get_status(self, args: dict) -> Outcome:
        cfg, error = self.app.load_config()
        status = self.app.run(gateway_status(cfg, self.app.probe_pool, error))
        return Outcome(True, format_status(status))

    def test_model(self, args: dict) -> Outcome:
        model = text_argument(args, "model", limit=300)
        cfg, error = self.app.load_config()
        if error:
            return Outcome(False, f"the configuration does not load: {error}")
        try:
            route = Router(cfg, build_providers(cfg)).resolve(model)
        except (ConfigError, GatewayError) as exc:
            return Outcome(False, f"{model}: {getattr(exc, 'message', exc)}")
        provider = route.provider
        where = f" at {provider.base_url}" if provider.base_url else ""
        lines = [f"{model} goes to provider {provider.name} ({provider.protocol}{where}) as model {route.model}",
                 f"lane: {describe_lanes(provider, cfg.work_mode)}"]  # fmt: skip
        if provider.protocol == "loopback":
            lines.append(
                "the built-in loopback model answers it (no provider is configured): nothing leaves the machine"
            )
            return Outcome(True, "\n".join(lines))
        req = Request(model=route.model, messages=[Message("user", [Part("text", text="Reply with the word OK.")])],
                      max_tokens=32)  # fmt: skip
        started = time.monotonic()
        try:
            result = self.app.run(asyncio.wait_for(call_model(self.app.pool, provider, provider_headers(provider, cfg),
                                                              req), 60))  # fmt: skip
        except GatewayError as err:
            lines.append(f"test request failed after {(time.monotonic() - started) * 1000:.0f} ms: HTTP {err.status} "
                         f"from {provider.name}: {err.message}")  # fmt: skip
            return Outcome(False, "\n".join(lines))
        except asyncio.TimeoutError:
            lines.append(f"test request failed: no answer from {provider.name} within 60 s")
            return Outcome(False, "\n".join(lines))
        answer = printable(text_of(result.parts).strip())[:200]
        lines.append(f"test request answered in {(time.monotonic() - started) * 1000:.0f} ms: {answer!r}")
        return Outcome(True, "\n".join(lines))

    def recent_errors(self, args: dict) -> Outcome:
        n = int(number_argument(args, "n", 10, 1, 50))
        model = text_argument(args, "model", required=False, limit=300)
        db, problem = self.app.open_ledger()
        if db is None:
            return Outcome(True, problem)
        where, params = ("status >= 400", [])
        if model:
            where, params = "status >= 400 AND (model_requested = ? OR model_upstream = ?)", [model, model]
        try:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute(f"SELECT * FROM requests WHERE {where} ORDER BY id DESC LIMIT ?",
                                                  (*params, n))]  # fmt: skip
        except sqlite3.Error as exc:
            return Outcome(False, f"cannot read the ledger: {exc}")
        finally:
            db.close()
        if not rows:
            return Outcome(True, "no failed requests in the ledger" + (f" for {model}" if model else ""))
        lines = []
        for row in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.get("ts") or 0))
            lines.append(f"{when} HTTP {row.get('status')} {row.get('client_protocol')}->{row.get('provider') or '-'} "
                         f"{row.get('lane') or '-'} {row.get('model_requested')}: {str(row.get('error') or '')[:400]}")  # fmt: skip
        return Outcome(True, redact("\n".join(lines)))

    def usage_summary(self, args: dict) -> Outcome:
        days = number_argument(args, "days", 7, 0.01, 3650)
        db, problem = self.app.open_ledger()
        if db is None:
            return Outcome(True, problem)
        since = time.time() - days * 86400
        try:
            report = {group: query_usage(db, group, since) for group in ("model", "provider")}
        except sqlite3.Error as exc:
            return Outcome(False, f"cannot read the ledger: {exc}")
        finally:
            db.close()
        lines = [f"usage over the last {days:g} days"]
        for group, rows in report.items():
            lines.append(f"by {group}:")
            for name, count, prompt, completion, cached, _reasoning, cost, errors in rows[:100]:
                lines.append(f"  {name or '-'}: {count} requests, {prompt or 0} prompt + {completion or 0} completion "
                             f"tokens ({cached or 0} cached), ${cost or 0:.4f}, {errors or 0} errors")  # fmt: skip
            if not rows:
                lines.append("  (no requests)")
        return Outcome(True, "\n".join(lines))

    def search_docs(self, args: dict) -> Outcome:
        query = text_argument(args, "query", limit=500)
        cfg, _ = self.app.load_config()
        hits = search_docs(chat_docs(cfg), query)
        if not hits:
            return Outcome(
                True, f"nothing in the docs matches {query!r}; the config keys are: {', '.join(CONFIG_KEYS)}"
            )
        return Outcome(True, "\n".join(f"{title}: {body}" for title, body in hits))

    def start_gateway(self, args: dict) -> Outcome:
        daemon = running_daemon()
        if daemon is not None:
            return Outcome(True, f"tgw is already running (pid {daemon['pid']}, {daemon.get('url', '')})")
        if not self.app.ui.confirm("start the gateway in the background?"):
            return Outcome(False, "not started: the user did not confirm")
        return start_daemon(self.app.config_arg, env=self.app.env)

    def stop_gateway(self, args: dict) -> Outcome:
        daemon = running_daemon()
        if daemon is None:
            return stop_daemon()  # says why nothing runs (and removes a stale pid file)
        if not self.app.ui.confirm(f"stop the gateway (pid {daemon['pid']})?"):
            return Outcome(False, "not stopped: the user did not confirm")
        cfg, _ = self.app.load_config()
        return stop_daemon(cfg.shutdown_grace)


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=3, cutoff=0.5)
    return f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                            "; search_docs lists every key")  # fmt: skip


def describe_lanes(provider: Provider, work_mode: str) -> str:
    if provider.protocol == "loopback":
        return "loopback"
    native = {"openai": "OpenAI Chat" + (" and Responses" if provider.speaks_responses else ""),
              "anthropic": "Anthropic Messages", "gemini": "Gemini"}[provider.protocol]  # fmt: skip
    if work_mode == "translation":
        return "translation for every client (work_mode = translation)"
    if work_mode == "passthrough":
        return f"passthrough for {native} clients; other protocols are refused (work_mode = passthrough)"
    return f"passthrough for {native} clients, translation for the others"


# ---- the offline assistant ---------------------------------------------------------------

OFFLINE_MAX_REQUEST = 2000  # characters of one request the offline assistant's rules read
PROVIDER_WORDS = {"openai": "openai", "gpt": "openai", "chatgpt": "openai", "anthropic": "anthropic",
                  "claude": "anthropic", "gemini": "gemini", "google": "gemini"}  # fmt: skip


class OfflineAssistant:
    """tgw chat without a model: rules for the common requests in plain words, driving the same
    tools. It says what it is and what it understood; it never poses as a model."""

    HELP = (
        "I am tgw's built-in offline helper: rules, not a language model. I understand requests like:\n"
        "  status                              is the gateway running; providers, routes, work mode\n"
        "  switch to translation mode          (or passthrough, auto)\n"
        "  route claude to openai              claude*=>openai first in model_provider_routes\n"
        "  use my OpenAI key sk-...            store a provider key in gateway.ini\n"
        "  set idle_timeout to 1200            any config key\n"
        "  why does claude-sonnet-4-5 fail?    how it resolves, a test request, its recent errors\n"
        "  start / stop / restart the gateway\n"
        "  show usage (for 30 days)            requests, tokens and cost from the ledger\n"
        "  show errors                         the latest failed requests\n"
        "  what is stream_keepalive?           a key's meaning, default and value\n"
        "  how do I use claude code?           search the built-in docs\n"
        "  show config"
    )
    IS_HELP = re.compile(r"^(help|\?|h|what can you do|commands|menu)$", re.I)
    ROUTE = re.compile(r"\b(?:route|send|map|point|direct)\s+(?:all\s+)?(?:the\s+)?(?:models?\s+)?[\"'`]?"
                       r"([\w.*?:/\[\]-]+?)[\"'`]?(?:\s+models?|\s+requests?)?\s+(?:to|=>|->|through|via|at|on)\s+"
                       r"(?:the\s+)?[\"'`]?([\w.-]+)", re.I)  # fmt: skip
    MODE = re.compile(r"\b(?:(?:switch|use|set|change|turn|go|make|enable|put|move)\b.*\b(translation|passthrough|auto)"
                      r"\b|^(translation|passthrough|auto)(?: mode)?$)", re.I)  # fmt: skip
    SET_KEY = re.compile(r"\b(?:set|change|make|put)\s+([a-z][a-z0-9_]*)\s+(?:to|=|as)\s+(.+?)\s*$"
                         r"|^\s*([a-z][a-z0-9_]*)\s*=\s*(.+?)\s*$", re.I)  # fmt: skip
    WHY = re.compile(r"\bwhy\b.*?\b(?:does|do|is|are|did|would|will|can't|cannot|won't|doesn't|isn't)\s+(?:the\s+)?"
                     r"(?:model\s+)?[\"'`]?([\w.:/*-]+)|(?<![\w.:/-])((?=[\w.:/-]*\d)[\w.:/-]+|[\w.:/]+-[\w.:/-]+)\s+(?:fails|failed|"
                     r"is failing|keeps failing|doesn't work|does not work|is broken|errors)", re.I)  # fmt: skip
    CONTROL = re.compile(r"\b(restart|reboot|start|launch|boot|run|bring up|stop|kill|shut ?down|halt)\b", re.I)
    CONTROL_TARGET = re.compile(r"\b(gateway|tgw|server|daemon|proxy|service|it)\b", re.I)
    USAGE = re.compile(r"\b(usage|spend|spent|spending|cost|costs|tokens|bill)\b", re.I)
    DAYS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(days?|d|weeks?|months?)\b|\b(today|week|month|year)\b", re.I)
    ERRORS = re.compile(r"\b(errors?|failures?|failed requests?|what failed|went wrong)\b", re.I)
    STATUS = re.compile(r"\b(status|running|health|healthy|alive|up|check)\b", re.I)
    CONFIG = re.compile(r"\b(config|configuration|settings)\b", re.I)
    DOCS = re.compile(r"\b(what|how|explain|describe|meaning|docs?|documentation|claude code|codex|sdk|endpoints?|"
                      r"clients?|langchain|connect|point)\b", re.I)  # fmt: skip
    CLAUSES = re.compile(r"\s*(?:;|,\s+|\band then\b|\bthen\b|\band\b)\s*", re.I)
    GENERAL = frozenset(re.findall(r"\w+", "it the gateway tgw this that my requests everything things calls"))

    def __init__(self, app: ChatApp):
        self.app = app
        self.pending_secret = ""  # a typed key whose provider was not said yet

    def respond(self, text: str) -> None:
        """A request, or several joined by 'and', 'then', ';' (each part that is understood is done)."""
        text = " ".join(text.split())
        if len(text) > OFFLINE_MAX_REQUEST:  # the rules are sentences: a pasted log would take them minutes
            self.app.ui.say(f"That is {len(text)} characters; the offline helper reads requests of up to "
                            f"{OFFLINE_MAX_REQUEST}, in plain words ('status', 'why does claude-sonnet-4-5 fail?'). "
                            "Say 'help' to see what it understands.")  # fmt: skip
            return
        parts = [p for p in self.CLAUSES.split(text) if p]
        plans = [(part, self.plan(part)) for part in parts] if len(parts) > 1 else []
        if sum(plan is not None for _, plan in plans) < 2:
            plan = self.plan(text)
            plans = [(text, plan or (lambda: f"I did not understand {text[:200]!r}.\n{self.HELP}"))]
        for part, plan in plans:
            reply = plan() if plan else f"(I did not understand {part[:200]!r})" if len(part.split()) > 3 else ""
            if reply:
                self.app.ui.say(reply)

    def tool(self, name: str, **args) -> Outcome:
        return self.app.tools.call(name, args)

    def plan(self, text: str):
        """What a request asks for, as a function that does it and returns the answer; None when
        it is not understood. Tool actions are shown as they run."""
        plain = text.rstrip("?!. ")
        secrets = ChatSecrets.PLACEHOLDER.findall(text)
        if not plain or self.IS_HELP.match(plain):
            return lambda: self.HELP
        if secrets or (self.pending_secret and self.provider_named(plain)):
            return lambda: self.store_key(f"[secret_{secrets[-1]}]" if secrets else self.pending_secret, plain)
        if m := self.ROUTE.search(plain):
            return lambda: self.route(m.group(1), m.group(2))
        if (m := self.SET_KEY.search(plain)) and (m.group(1) or m.group(3)).lower() in CONFIG_KEYS:
            key, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            return lambda: self.change(key.lower(), value.strip("\"'`"))
        if m := self.MODE.search(plain):
            return lambda: self.change("work_mode", (m.group(1) or m.group(2)).lower())
        if m := self.WHY.search(plain):
            return lambda: self.diagnose((m.group(1) or m.group(2)).strip("\"'`"))
        m = self.CONTROL.search(plain)
        if (
            m
            and not plain.lower().startswith("how")
            and (self.CONTROL_TARGET.search(plain) or plain.lower() == m[1].lower())
        ):
            return lambda: self.control(m.group(1).lower())
        if self.USAGE.search(plain):
            return lambda: self.tool("usage_summary", days=self.days(plain)).text
        if self.ERRORS.search(plain):
            return lambda: self.tool("recent_errors", n=10).text
        if key := self.key_named(plain):
            return lambda: self.explain_key(key)
        if self.CONFIG.search(plain):
            return lambda: self.tool("get_config").text
        if self.STATUS.search(plain):
            return lambda: self.tool("get_status").text
        if self.DOCS.search(plain) and search_docs(chat_docs(self.app.load_config()[0]), plain):
            return lambda: self.tool("search_docs", query=plain).text
        return None

    def change(self, key: str, value: str) -> str:
        self.tool("set_config", key=key, value=value)
        return ""  # the outcome is shown by the tool call itself

    @staticmethod
    def provider_named(text: str) -> str:
        return next((PROVIDER_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in PROVIDER_WORDS), "")

    def store_key(self, placeholder: str, text: str) -> str:
        provider = self.provider_named(text.replace(placeholder, " ")) or self.app.secrets.kind(placeholder)
        if re.search(r"\b(client|gateway key|api_keys)\b", text, re.I) or provider == "client":  # added to the others
            keys = [k.strip() for k in self.app.load_config()[0].api_keys.split(",") if k.strip()]
            held = [self.app.secrets.placeholder(k) for k in keys]
            return self.change("api_keys", ",".join(dict.fromkeys([*held, placeholder])))
        if provider not in ("openai", "anthropic", "gemini"):
            self.pending_secret = placeholder
            return f"Which provider is {placeholder} for? Say 'it is for openai' (or anthropic, gemini)."
        self.pending_secret = ""
        return self.change(f"{provider}_api_key", placeholder)

    def route(self, model: str, provider_word: str) -> str:
        cfg, error = self.app.load_config()
        if error:
            return f"The configuration does not load, so I will not change routes: {error}"
        providers = build_providers(cfg)
        name = provider_word.lower()
        name = name if name in providers else PROVIDER_WORDS.get(name, name)
        if name not in providers:
            return (f"There is no provider named {provider_word!r}; known: {', '.join(providers)}. Named providers are "
                    "[provider.NAME] sections in gateway.ini.")  # fmt: skip
        pattern = model if not is_concrete(model) or re.search(r"\d", model) else model + "*"
        rules = [(g, p) for g, p in parse_pairs(cfg.model_provider_routes, "model_provider_routes") if g != pattern]
        routes = ",".join(f"{g}=>{p}" for g, p in [(pattern, name), *rules])
        outcome = self.tool("set_config", key="model_provider_routes", value=routes)
        if outcome.changed:
            return (f"{pattern} now goes to {name}; the model name is sent as the client gives it (add model_aliases "
                    "if that provider knows it by another name).")  # fmt: skip
        return ""

    def diagnose(self, model: str) -> str:
        if model.lower() in self.GENERAL:
            return "\n".join([self.tool("get_status").text, "", "Recent failed requests:",
                              self.tool("recent_errors", n=5).text])  # fmt: skip
        test = self.tool("test_model", model=model)
        errors = self.tool("recent_errors", n=5, model=model)
        lines = [test.text, "", f"Recent failed requests for {model}:", errors.text]
        words = test.text.lower()
        if "not configured" in words:
            provider = next((p for p in ("openai", "anthropic", "gemini") if f"set {p}_api_key" in words), "the")
            lines.append(f"\nIt fails because that provider has no key. Tell me it ('use my {provider} key ...') and "
                         "I will store it in gateway.ini, or route the model elsewhere ('route claude to openai').")  # fmt: skip
        elif "matches no route" in words:
            lines.append(f"\nNo route matches it: add one, e.g. 'route {model} to openai'.")
        elif "http 401" in words or "http 403" in words:
            lines.append("\nThe provider refused the key: check it (show config) or give me a new one.")
        elif "cannot connect" in words or "timed out" in words:
            lines.append("\nThe provider's address does not answer: check its base_url, the network or a proxy.")
        elif test.ok:
            lines.append("\nThe test request worked: if clients still fail, the errors above say how.")
        return "\n".join(lines)

    def control(self, verb: str) -> str:
        if verb in ("restart", "reboot"):
            stopped = self.tool("stop_gateway")
            if not stopped.ok:
                return ""
            self.tool("start_gateway")
            return ""
        self.tool("stop_gateway" if verb in ("stop", "kill", "shutdown", "shut down", "halt") else "start_gateway")
        return ""

    def days(self, text: str) -> float:
        m = self.DAYS.search(text)
        if not m:
            return 7
        if m.group(3):
            return {"today": 1, "week": 7, "month": 30, "year": 365}[m.group(3).lower()]
        unit = m.group(2).lower()
        return float(m.group(1)) * (30 if unit.startswith("month") else 7 if unit.startswith("week") else 1)

    @staticmethod
    def key_named(text: str) -> str:
        """The config key a request names, written with '_' or spaces (the longest wins)."""
        low = text.lower()
        spaced = re.sub(r"[\s-]+", "_", low)
        for key in sorted(CONFIG_KEYS, key=len, reverse=True):
            pattern = rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])"
            if re.search(pattern, low) or ("_" in key and re.search(pattern, spaced)):
                return key
        return ""

    def explain_key(self, key: str) -> str:
        hits = self.tool("search_docs", query=key).text.split("\n", 1)[0]
        return hits + "\n" + self.tool("get_config", key=key).text.split("\n", 1)[0]


# ---- the model assistant -----------------------------------------------------------------

CHAT_SYSTEM_PROMPT = """You are the assistant built into tgw {version}, a local LLM gateway: one endpoint that speaks \
the OpenAI, Anthropic and Gemini APIs, routes each model to a provider and records every request in a ledger. You help \
the user configure and troubleshoot this gateway from a terminal, with your tools.
Config file: {config}. Gateway address: {url}.
- Look before answering: get_status, get_config, test_model, recent_errors, usage_summary, search_docs. search_docs \
knows every config key; do not guess keys or defaults.
- Change settings only with set_config, one key per call; the user confirms each change. A running gateway reads \
gateway.ini at start: after a change, offer to restart it (stop_gateway, then start_gateway).
- model_provider_routes is one ordered list: read it, put a new glob=>provider first and keep the rest.
- You never see API keys. A key the user typed reaches you as a placeholder such as [secret_1]: pass the placeholder \
unchanged as set_config's value and it is stored locally. Configured keys come back masked. Never ask for a key to be \
pasted anywhere else.
- Answer briefly, in plain text for a terminal (no tables, little markdown).
Config keys: {keys}."""


class ModelAssistant:
    """A conversation with a model through tgw's providers and codecs, with the tools."""

    def __init__(self, app: ChatApp, candidate: ChatCandidate, cfg: Config):
        self.app = app
        self.provider = candidate.provider
        self.model = candidate.model
        self.headers = provider_headers(self.provider, cfg)
        self.history: list[Message] = []
        self.partial: list[str] = []
        self.tools_ran = False
        self.system = CHAT_SYSTEM_PROMPT.format(version=__version__, config=app.config_path(cfg), url=gateway_url(cfg),
                                                keys=", ".join(CONFIG_KEYS))  # fmt: skip

    def respond(self, text: str) -> None:
        self.history.append(Message("user", [Part("text", text=text)]))
        self.trim_history()
        self.tools_ran = False
        try:
            self.run_rounds()
        except GatewayError as err:
            message = self.app.secrets.hide(err.message)
            self.app.ui.note(f"the model failed: HTTP {err.status}: {message}")
            if not self.tools_ran:  # nothing happened yet: the offline assistant takes this request
                self.history.pop()
                self.app.ui.note("the offline assistant answers this request instead:")
                self.app.offline.respond(text)
            else:
                self.history.append(Message("assistant", [Part("text", text=f"[the model failed: {message}]")]))
        except KeyboardInterrupt:
            said = "".join(self.partial).strip()
            self.history.append(Message("assistant", [Part("text", text=f"{said} [interrupted by the user]".strip())]))
            raise

    def trim_history(self) -> None:
        """Keep the latest CHAT_HISTORY_TURNS user turns (cut where a turn starts)."""
        starts = [i for i, m in enumerate(self.history) if m.role == "user" and any(p.type == "text" for p in m.parts)]
        if len(starts) > CHAT_HISTORY_TURNS:
            del self.history[: starts[-CHAT_HISTORY_TURNS]]

    def run_rounds(self) -> None:
        for _ in range(CHAT_TOOL_ROUNDS):
            self.partial = []
            answer = self.app.run_interruptible(self.ask())
            self.app.ui.end_line()
            parts = [p for p in answer.parts if p.type in ("text", "tool_call", "thinking", "redacted_thinking")]
            calls = [p for p in parts if p.type == "tool_call"]
            self.history.append(Message("assistant", parts or [Part("text", text="(no answer)")]))
            if not calls:
                return
            results: list[Part] = []
            try:
                for call in calls[:CHAT_CALLS_PER_ROUND]:
                    outcome = self.app.tools.call(call.name, tool_arguments(call.arguments))
                    self.tools_ran = True
                    results.append(tool_result(call, outcome.text[:CHAT_TOOL_RESULT_LIMIT], not outcome.ok))
            finally:  # every call gets its result, or the conversation is malformed for the next request
                for call in calls[len(results) :]:
                    why = "interrupted by the user" if len(results) < CHAT_CALLS_PER_ROUND else (
                        f"at most {CHAT_CALLS_PER_ROUND} tool calls per answer")  # fmt: skip
                    results.append(tool_result(call, f"not run: {why}", True))
                self.history.append(Message("user", results))
        self.app.ui.note(f"(stopped: {CHAT_TOOL_ROUNDS} rounds of tool calls for one request is the limit)")

    async def ask(self) -> Response:
        req = Request(model=self.model, messages=list(self.history), system=[Part("text", text=self.system)],
                      tools=list(CHAT_TOOLS), stream=True, max_tokens=CHAT_MAX_TOKENS)  # fmt: skip
        return await call_model(self.app.pool, self.provider, self.headers, req, self.on_text)

    def on_text(self, text: str) -> None:
        self.partial.append(text)
        self.app.ui.stream(text)


def tool_arguments(text: str) -> dict:
    """A tool call's arguments as an object; anything else becomes an error the tool reports."""
    if len(text) > 1 << 20:
        return {"_raw_arguments": ""}
    try:
        return json_object_arguments(text)
    except RecursionError:
        return {"_raw_arguments": ""}


def tool_result(call: Part, text: str, is_error: bool) -> Part:
    return Part("tool_result", id=call.id, name=call.name, content=[Part("text", text=text)], is_error=is_error)


# ---- the terminal ------------------------------------------------------------------------


class ChatTerminal:
    """Where the conversation shows: streamed answers, tool actions, notes, y/N questions."""

    def __init__(self, out, can_ask: bool, yes: bool, color: bool):
        self.out = out
        self.can_ask = can_ask  # standard input is a terminal a person answers at
        self.yes = yes
        self.color = color
        self.mid_line = False

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.mid_line = not text.endswith("\n")

    def stream(self, text: str) -> None:
        self.write(printable(text))

    def end_line(self) -> None:
        if self.mid_line:
            self.write("\n")

    def say(self, text: str) -> None:
        self.end_line()
        self.write(printable(text).rstrip("\n") + "\n")

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def note(self, text: str) -> None:
        self.end_line()
        self.write(self.dim(printable(text)) + "\n")

    def action(self, text: str) -> None:
        self.note(f"  * {text}")

    def result(self, text: str) -> None:
        self.say("\n".join("    " + line for line in text.splitlines()[:12]))

    def confirm(self, question: str) -> bool:
        if self.yes:
            self.note(f"    {question} yes (--yes)")
            return True
        if not self.can_ask:
            self.note(f"    {question} not confirmed: add --yes to allow changes without asking")
            return False
        self.end_line()
        try:
            answer = input(f"    {printable(question)} [y/N] ")
        except EOFError:
            answer = ""
        return answer.strip().lower() in ("y", "yes")


class ChatApp:
    """One `tgw chat` session: its event loop and HTTP pools, secrets, tools and assistant."""

    PROMPT = "tgw> "

    def __init__(self, config_arg: str | None = None, yes: bool = False, out=None, can_ask: bool | None = None,
                 env=None):  # fmt: skip
        self.config_arg = config_arg
        self.env = os.environ if env is None else env
        out = out or sys.stdout
        can_ask = sys.stdin.isatty() if can_ask is None else can_ask
        color = bool(getattr(out, "isatty", lambda: False)()) and "NO_COLOR" not in self.env
        self.ui = ChatTerminal(out, can_ask, yes, color)
        self.secrets = ChatSecrets()
        self.loop = asyncio.new_event_loop()
        self.pool = UpstreamPool(10.0, 120.0)  # the model and test requests
        self.probe_pool = UpstreamPool(1.0, 3.0)  # /health
        self.tools = ChatTools(self)
        self.offline = OfflineAssistant(self)
        self.assistant: ModelAssistant | OfflineAssistant = self.offline
        self.failed_changes = 0
        self.readline = None

    def close(self) -> None:
        self.pool.close()
        self.probe_pool.close()
        self.loop.run_until_complete(asyncio.sleep(0))  # let aborted connections close
        self.loop.close()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def run_interruptible(self, coro):
        """Run `coro` so that Ctrl-C cancels it (and only it) and raises KeyboardInterrupt."""
        task = self.loop.create_task(coro)
        try:
            self.loop.add_signal_handler(signal.SIGINT, task.cancel)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or not POSIX
            installed = False
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        except KeyboardInterrupt:
            task.cancel()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(task)
            raise
        finally:
            if installed:
                self.loop.remove_signal_handler(signal.SIGINT)

    def load_config(self) -> tuple[Config, str]:
        cfg, error = load_config_or_defaults(self.config_arg, self.env)
        return cfg, redact(error)

    def config_path(self, cfg: Config | None = None) -> Path:
        return config_path_for_writing(self.config_arg, cfg or self.load_config()[0], self.env)

    def open_ledger(self) -> tuple[sqlite3.Connection | None, str]:
        """The ledger, read-only, or why there is none."""
        cfg, _ = self.load_config()
        if cfg.ledger_path == ":memory:":
            return None, "the ledger is in memory (ledger_path = :memory:): nothing was kept"
        path = Path(cfg.ledger_path).expanduser().resolve()
        if not path.is_file():
            return None, f"no ledger at {path} yet: no request has gone through the gateway"
        try:
            return sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5), ""
        except sqlite3.Error as exc:
            return None, f"cannot open the ledger {path}: {exc}"

    # -- choosing who answers
    def choose(self, spec: str = "", offline: bool = False) -> str:
        """Pick the model (or the offline assistant) and say which, in one line."""
        offline_words = "the offline assistant answers (built-in rules, not a language model; say 'help')"
        if offline:
            return f"--offline: {offline_words}"
        cfg, _ = self.load_config()
        source = "--model" if spec else "chat_model"
        spec = spec or cfg.chat_model
        found, chosen = self.run(detect_chat_models(cfg, self.env, spec, source))
        if chosen is None:
            why = found[0].reason if spec else "no model is reachable (tgw chat --detect says why)"
            return printable(redact(f"{why}: {offline_words}"))
        self.assistant = ModelAssistant(self, chosen, cfg)
        said = f"model {chosen.model} on {chosen.provider.name} ({chosen.source}: {chosen.reason})"
        return printable(redact(said))  # a model id and a reason are a server's words

    def detect(self, spec: str = "") -> str:
        cfg, error = self.load_config()
        source = "--model" if spec else "chat_model"
        spec = spec or cfg.chat_model
        found, chosen = self.run(detect_chat_models(cfg, self.env, spec, source, everything=True))
        lines = ["tgw chat looks for a model in this order and uses the first one available:"]
        if error:
            lines.append(f"  (the configuration does not load: {error})")
        if not spec:
            found = [ChatCandidate("", "chat_model", "not set (--model, or chat_model in gateway.ini)"), *found]
        width = max([len(c.source) for c in found] + [10])
        for c in found:  # * the one used, + usable, - not usable
            mark = "*" if c is chosen else "+" if c.available else "-"
            lines.append(f"  {mark} {c.source:<{width}}  {c.model + ': ' if c.available else ''}{c.reason}")
        lines.append(f"using {chosen.model} on {chosen.provider.name}" if chosen else
                     "no model is available: tgw chat answers with its offline assistant")  # fmt: skip
        return printable(redact("\n".join(lines)))  # what local servers answered, safe for a terminal

    # -- turns
    def turn(self, text: str) -> None:
        """One request of the user's (secrets already hidden), answered; Ctrl-C stops it."""
        try:
            self.assistant.respond(text)
        except KeyboardInterrupt:
            self.ui.end_line()
            self.ui.note("(interrupted)")
        except Exception as exc:  # a bug: say so and keep the session (and the exit status says it failed)
            self.failed_changes += 1
            self.ui.note(redact(f"tgw chat: internal error ({type(exc).__name__}: {exc}); the session goes on"))

    def interactive(self, announcement: str) -> None:
        self.setup_readline()
        self.ui.say(f"tgw chat: {announcement}")
        self.ui.note("Ctrl-C stops an answer; exit, quit or Ctrl-D leaves.")
        try:
            while True:
                try:
                    line = input(self.PROMPT)
                except EOFError:
                    self.ui.write("\n")
                    return
                except KeyboardInterrupt:
                    self.ui.write("\n")
                    self.ui.note("(exit, quit or Ctrl-D leaves)")
                    continue
                line = line.strip()[:CHAT_MAX_INPUT]
                if line.lower() in ("exit", "quit", "/exit", "/quit", ":q"):
                    return
                if line:
                    hidden = self.secrets.hide(line)
                    if self.readline is not None:
                        self.readline.add_history(hidden)  # the history file never holds a typed key
                    self.turn(hidden)
        finally:
            self.save_history()

    def setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # not on every platform: plain input() then
            return
        self.readline = readline
        readline.set_auto_history(False)
        readline.set_history_length(1000)
        with contextlib.suppress(OSError):
            readline.read_history_file(tokligence_dir() / "chat_history")

    def save_history(self) -> None:
        if self.readline is None:
            return
        path = tokligence_dir() / "chat_history"
        with contextlib.suppress(OSError):
            open_private(path).close()  # 0600 before a line is in it
            self.readline.write_history_file(path)
            os.chmod(path, 0o600)  # a file from before this rule


def add_gateway_commands(commands) -> None:
    """`tgw chat`, `tgw start`, `tgw stop`, `tgw status` (build_parser calls this)."""
    chat_p = commands.add_parser("chat", help="a terminal assistant that configures and troubleshoots the gateway")
    add_config_flag(chat_p)
    chat_p.add_argument("--model", help="model to talk to: a name routed like the gateway routes it, or PROVIDER/MODEL")
    chat_p.add_argument("--offline", action="store_true", help="use the built-in rule-based assistant, no model")
    chat_p.add_argument("--detect", action="store_true", help="show where a model was looked for and why, then exit")
    chat_p.add_argument(
        "-p", "--prompt", help="answer this one request and exit (default: standard input if not a terminal)"
    )
    chat_p.add_argument("-y", "--yes", action="store_true", help="make changes without asking for confirmation")

    start_p = commands.add_parser("start", help="run the gateway in the background (pid and log in ~/.tokligence)")
    add_config_flag(start_p)
    start_p.add_argument("--host", help="address to listen on")
    start_p.add_argument("--port", type=int, help="port (0 picks a free one)")
    start_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")

    stop_p = commands.add_parser("stop", help="stop the background gateway")
    add_config_flag(stop_p)

    status_p = commands.add_parser("status", help="is the gateway running; its health, providers, routes, work mode")
    add_config_flag(status_p)
    status_p.add_argument("--json", action="store_true", help="print JSON")


def cmd_chat(args) -> int:
    """Exit status: 0, or 1 when a change the user asked for failed or was not confirmed (or tgw chat failed)."""
    for stream in (sys.stdin, sys.stdout):  # a model may answer in any script; a pipe may hold any bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    setup_logging("error")  # the configuration is read for every tool call: its warnings would repeat
    app = ChatApp(args.config, args.yes)
    try:
        if args.detect:
            print(app.detect(args.model or ""))
            return 0
        prompt = args.prompt
        interactive = prompt is None and sys.stdin.isatty()
        if prompt is None and not interactive:
            prompt = sys.stdin.read(CHAT_MAX_INPUT)
        announcement = app.choose(args.model or "", args.offline)
        if interactive:
            app.interactive(announcement)
        else:
            print(f"tgw chat: {announcement}", file=sys.stderr)
            if not prompt.strip():
                print("tgw chat: no request given (-p TEXT, or on standard input)", file=sys.stderr)
                return 2
            app.turn(app.secrets.hide(prompt.strip()[:CHAT_MAX_INPUT]))
        return 1 if app.failed_changes else 0
    finally:
        app.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        reexec_as_import()
    sys.exit(main())
