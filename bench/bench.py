#!/usr/bin/env python3
"""The benchmark behind the README's Performance section, runnable from this repository alone.

    apt-get install -y nginx-light wrk          # the mock upstream and the load generator (Debian/Ubuntu)
    python3 bench/bench.py                      # every lane, sequentially; tables on stdout
    python3 bench/bench.py --targets passthrough,translation --conc 10,50,100 --duration 15
    python3 bench/bench.py --pair passthrough,passthrough-team   # A/B interleaved: a drift-free ratio
    python3 bench/bench.py --pair passthrough@/tmp/old/tgw.py,passthrough   # another build, same lane
    python3 bench/bench.py --python /usr/bin/python3.11          # the interpreter for tgw and the proxy
    python3 bench/bench.py --litellm /path/to/venv              # add LiteLLM (pip install 'litellm[proxy]')
    python3 bench/bench.py --count --pair passthrough@/tmp/old/tgw.py,passthrough-pool   # instructions per
                                                # request under load, counted by callgrind: no drift at all

Layout on a 2-core machine: the gateway under test is pinned to core 0; nginx (one worker, the mock
upstream of bench/mock_upstream.py) and wrk (one thread) share core 1. Every target answers the same
requests: `nginx` is the mock directly (the floor), `minimal` is bench/minimal_proxy.py (the
ceiling of a Python proxy), then tgw's lanes. The stream targets relay the mock's long stream
(bench/mock_upstream.py LONG_EVENTS text deltas, like a coding agent's answer) and report events relayed per
second per core of the gateway and the time to first token each adds (bench/ttft.py).

Everything listens on 127.0.0.1 only; every process started here is stopped before it exits.
Results: one TSV per run under $TGW_BENCH_DIR (default /tmp/tgw-bench)/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import mock_upstream as mock  # noqa: E402

WORK = Path(os.environ.get("TGW_BENCH_DIR", "/tmp/tgw-bench"))
MOCK = f"http://127.0.0.1:{mock.PORT}"
HZ = os.sysconf("SC_CLK_TCK")
GATEWAY_CPU, LOAD_CPU = "0", "1"
BENCH_KEY = "tok_bench_0123456789abcdef0123456789abcdef"  # a team key for the *-team targets


@dataclass
class Target:
    name: str
    kind: str  # nginx | minimal | tgw | litellm
    path: str  # what the client calls
    body: str  # file in bench/bodies
    env: dict = field(default_factory=dict)  # TOKLIGENCE_* for tgw
    prefix: str = ""  # minimal proxy: upstream path prefix
    anthropic: bool = False
    stream: bool = False
    api_key: str = ""
    setup: list = field(default_factory=list)  # tgw CLI commands run before serve (users, keys)
    expect: str = "mock response"


OPENAI_UP = {"TOKLIGENCE_OPENAI_BASE_URL": f"{MOCK}/v1", "TOKLIGENCE_OPENAI_API_KEY": "dummy"}
ANTHROPIC_UP = {"TOKLIGENCE_ANTHROPIC_BASE_URL": MOCK, "TOKLIGENCE_ANTHROPIC_API_KEY": "dummy"}
TARGETS = {
    t.name: t
    for t in [
        Target("nginx", "nginx", f"{MOCK}/v1/chat/completions", "openai.json"),
        Target("minimal", "minimal", "/v1/chat/completions", "openai.json"),
        Target("passthrough", "tgw", "/v1/chat/completions", "openai.json", OPENAI_UP),
        Target(
            "translation",
            "tgw",
            "/v1/chat/completions",
            "openai.json",
            {**ANTHROPIC_UP, "TOKLIGENCE_MODEL_PROVIDER_ROUTES": "gpt*=>anthropic"},
        ),  # fmt: skip
        # Claude Code's lanes: a long Anthropic stream passed through, and translated from an OpenAI upstream
        Target(
            "nginx-stream", "nginx", f"{MOCK}/long/v1/messages", "anthropic_long.json", anthropic=True, stream=True
        ),  # fmt: skip
        Target(
            "minimal-stream",
            "minimal",
            "/v1/messages",
            "anthropic_long.json",
            prefix="/long",
            anthropic=True,
            stream=True,
        ),  # fmt: skip
        Target(
            "stream-passthrough",
            "tgw",
            "/v1/messages",
            "anthropic_long.json",
            {**ANTHROPIC_UP, "TOKLIGENCE_ANTHROPIC_BASE_URL": f"{MOCK}/long"},
            anthropic=True,
            stream=True,
        ),  # fmt: skip
        Target(
            "stream-translation",
            "tgw",
            "/v1/messages",
            "anthropic_long.json",
            {
                "TOKLIGENCE_OPENAI_BASE_URL": f"{MOCK}/long/v1",
                "TOKLIGENCE_OPENAI_API_KEY": "dummy",
                "TOKLIGENCE_MODEL_PROVIDER_ROUTES": "claude*=>openai",
            },
            anthropic=True,
            stream=True,
        ),  # fmt: skip
        # issue 13: a team key with a budget and rate limits (never reached, always checked)
        Target(
            "passthrough-team",
            "tgw",
            "/v1/chat/completions",
            "openai.json",
            OPENAI_UP,
            setup=[
                ["user", "add", "bench@example.com"],
                [
                    "key",
                    "create",
                    "--user",
                    "bench@example.com",
                    "--name",
                    "bench",
                    "--budget",
                    "1000000",
                    "--token-budget",
                    "1000000000000",
                    "--period",
                    "month",
                    "--rpm",
                    "100000000",
                    "--tpm",
                    "1000000000000",
                ],
            ],
        ),  # fmt: skip
        # issue 14: a two-account pool (metrics are always on)
        Target(
            "passthrough-pool",
            "tgw",
            "/v1/chat/completions",
            "openai.json",
            {**OPENAI_UP, "TOKLIGENCE_OPENAI_API_KEY": "dummy-a,dummy-b"},
        ),  # fmt: skip
        Target("litellm", "litellm", "/v1/chat/completions", "openai.json", api_key="sk-bench-local-7f3c9a1e5b2d8f40"),
    ]
}
DEFAULT_RUN = ["nginx", "minimal", "passthrough", "translation", "nginx-stream", "minimal-stream",
               "stream-passthrough", "stream-translation"]  # fmt: skip


# ---- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, data: bytes | None = None, headers=None) -> float:
    """Seconds until `url` answers 2xx."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            req = urllib.request.Request(url, data=data, headers=headers or {})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status < 300:
                    resp.read()
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"{url} did not answer within {timeout:g} s")


class Processes:
    """Everything started here, each in its own session, stopped (TERM, then KILL) at the end."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list, env=None, cpus: str | None = GATEWAY_CPU, log: Path | None = None) -> subprocess.Popen:
        if cpus is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", cpus, *argv]
        with open(log or os.devnull, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=WORK)  # fmt: skip
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.started):
            self.stop(proc)


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / HZ


def rss_mib(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# ---- targets -----------------------------------------------------------------------------


class Running:
    def __init__(self, target: Target, url: str, proc: subprocess.Popen | None, start_s: float | None = None):
        self.target, self.url, self.proc, self.start_s = target, url, proc, start_s

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def target_named(spec: str) -> tuple[Target, Path]:
    """'passthrough' or 'passthrough@/path/to/other/tgw.py' (another build of tgw, same lane)."""
    name, _, other = spec.partition("@")
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    if other and not Path(other).is_file():
        raise SystemExit(f"{spec}: no such tgw.py")
    target = TARGETS[name]
    if other:
        target = Target(**{**target.__dict__, "name": spec})
    return target, Path(other).resolve() if other else ROOT / "tgw.py"


def start_target(spec: str, procs: Processes, python: str, litellm: str | None, count: bool = False) -> Running:
    """`count`: run it under callgrind with instrumentation off until run_count turns it on."""
    target, tgw_py = target_named(spec)
    if target.kind == "nginx":
        return Running(target, target.path, None)
    port = free_port()
    url = f"http://127.0.0.1:{port}{target.path}"
    body = (HERE / "bodies" / target.body).read_bytes()
    headers = {"Content-Type": "application/json"}
    if target.anthropic:
        headers["anthropic-version"] = "2023-06-01"
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in target.name)
    log = WORK / f"{slug}.log"
    counted = [] if not count else [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
        f"--callgrind-out-file={WORK / 'callgrind' / slug}.%p",
    ]  # fmt: skip
    if target.kind == "minimal":
        proc = procs.start([*counted, python, str(HERE / "minimal_proxy.py"), str(port), target.prefix], log=log)
    elif target.kind == "litellm":
        if not litellm:
            raise SystemExit("the litellm target needs --litellm VENV (a venv with 'litellm[proxy]' installed)")
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR",
                   LITELLM_MODE="PRODUCTION", DISABLE_ADMIN_UI="True", NO_PROXY="127.0.0.1,localhost",
                   HF_HUB_OFFLINE="1", LITELLM_MASTER_KEY=target.api_key)  # fmt: skip
        for name in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL"):
            env.pop(name, None)
        argv = [f"{litellm}/bin/litellm", "--config", str(HERE / "litellm_config.yaml"), "--host", "127.0.0.1",
                "--port", str(port), "--num_workers", "1"]  # fmt: skip
        proc = procs.start(argv, env=env, log=log)
    else:
        home = Path(tempfile.mkdtemp(prefix=f"{slug}-", dir=WORK))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKLIGENCE_")}
        env.update(target.env, HOME=str(home), TOKLIGENCE_LEDGER_PATH=str(home / "ledger.db"))
        env["TOKLIGENCE_LOG_LEVEL"] = "warning"
        if count:
            env["TGW_REEXECUTED"] = "1"  # tgw re-executes itself once at start; callgrind would not follow
        for command in target.setup:
            done = subprocess.run([python, str(tgw_py), *command], env=env, cwd=home, check=True,
                                  capture_output=True, text=True)  # fmt: skip
            made = next((w for w in done.stdout.split() if w.startswith("tok_")), "")
            if made:  # `tgw key create` prints the key once: the load uses it
                target = Target(**{**target.__dict__, "api_key": made})
                headers["Authorization"] = f"Bearer {made}"
        proc = procs.start([*counted, python, str(tgw_py), "serve", "--port", str(port)], env=env, log=log)
    start_s = wait_http(url, 120 if target.kind == "litellm" or count else 30, body, headers)
    return Running(target, url, proc, start_s)


def wrk(run: Running, conc: int, seconds: float) -> dict:
    env = dict(os.environ, BENCH_BODY_FILE=str(HERE / "bodies" / run.target.body), BENCH_API_KEY=run.target.api_key,
               BENCH_ANTHROPIC="1" if run.target.anthropic else "0", BENCH_VALIDATE="0")  # fmt: skip
    argv = [
        "wrk",
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "wrk_post.lua"),
        run.url,
    ]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", LOAD_CPU, *argv]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    line = next((x for x in out.splitlines() if x.startswith("BENCH_RESULT")), None)
    if line is None:
        raise SystemExit(f"wrk gave no result for {run.target.name}:\n{out}")
    result = {}
    for item in line.split()[1:]:
        key, _, value = item.partition("=")
        result[key] = float(value)
    result["errors"] = sum(result[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return result


def measure(run: Running, conc: int, seconds: float, warmup: float) -> dict:
    if warmup:
        wrk(run, conc, warmup)
    cpu0, t0 = (cpu_seconds(run.pid), time.monotonic()) if run.pid else (0.0, 0.0)
    result = wrk(run, conc, seconds)
    if run.pid:
        cpu = cpu_seconds(run.pid) - cpu0
        result["cpu_pct"] = 100 * cpu / (time.monotonic() - t0)
        result["cpu_us_per_req"] = 1e6 * cpu / max(result["requests"], 1)
        result["rss_mib"] = rss_mib(run.pid)
    return result


def ttft(run: Running, n: int) -> dict:
    argv = [sys.executable, str(HERE / "ttft.py"), run.url, str(HERE / "bodies" / run.target.body), "--n", str(n)]
    if run.target.anthropic:
        argv.append("--anthropic")
    if run.target.api_key:
        argv += ["--api-key", run.target.api_key]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", LOAD_CPU, *argv]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


# ---- runs --------------------------------------------------------------------------------


def port_answer(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read()
    except OSError:
        return None


def start_mock(procs: Processes) -> None:
    answer = port_answer(f"{MOCK}/v1/models")
    if answer == mock.MODELS.encode():
        print(f"# the mock already answers on {MOCK}: using it", file=sys.stderr)
        return
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", mock.PORT)) == 0:
            raise SystemExit(f"port {mock.PORT} is taken by something that is not the mock: stop it first")
    if shutil.which("nginx"):
        conf = mock.write_nginx(WORK / "nginx")
        procs.start(["nginx", "-p", str(WORK / "nginx"), "-c", str(conf), "-g", "daemon off;"], cpus=LOAD_CPU)
    else:
        print("# nginx not found: using the much slower stdlib mock (figures are not comparable)", file=sys.stderr)
        procs.start([sys.executable, str(HERE / "mock_upstream.py"), "serve"], cpus=LOAD_CPU)
    wait_http(f"{MOCK}/health", 10)


def run_sequential(args, procs: Processes) -> list[dict]:
    rows = []
    for name in args.targets:
        run = start_target(name, procs, args.python, args.litellm)
        target = run.target
        idle = rss_mib(run.pid) if run.pid else None
        up = f"up in {run.start_s:.2f} s" if run.start_s is not None else "already up"
        print(f"# {name}: {up}" + (f", idle RSS {idle:.1f} MiB" if idle else ""), file=sys.stderr)
        for conc in args.conc:
            result = measure(run, conc, args.duration, args.warmup)
            row = {"target": name, "conc": conc, **result, "start_s": run.start_s, "rss_idle_mib": idle}
            if target.stream:
                row["events_per_s"] = result["rps"] * (mock.LONG_EVENTS + 6)
                if "cpu_pct" in result and result["cpu_pct"] > 0:
                    row["events_per_core_s"] = row["events_per_s"] / (result["cpu_pct"] / 100)
            rows.append(row)
            print(format_row(row), file=sys.stderr)
        if target.stream and args.ttft:
            t = ttft(run, args.ttft)
            rows.append({"target": name, "conc": 1, "ttft": t})
            print(f"#   {name}: ttft p50 {t['ttft_p50_ms']} ms, p90 {t['ttft_p90_ms']} ms, whole stream p50 "
                  f"{t['total_p50_ms']} ms ({t['events']} events)", file=sys.stderr)  # fmt: skip
        if run.proc:
            procs.stop(run.proc)
        time.sleep(args.pause)
    return rows


def run_pair(args, procs: Processes) -> list[dict]:
    """Both targets up at once on the gateway core, loaded in turn (A B A B ...): the machine's
    drift hits both alike, so their ratio holds even when absolute figures swing."""
    a, b = (start_target(n, procs, args.python, args.litellm) for n in args.pair)
    rows = []
    for conc in args.conc:
        totals = {r.target.name: {"requests": 0.0, "seconds": 0.0, "cpu": 0.0, "p50": []} for r in (a, b)}
        for run in (a, b):
            wrk(run, conc, args.warmup or 2)
        for _ in range(args.rounds):
            for run in (a, b):
                cpu0 = cpu_seconds(run.pid) if run.pid else 0.0
                result = wrk(run, conc, args.segment)
                t = totals[run.target.name]
                t["requests"] += result["requests"]
                t["seconds"] += result["duration_s"]
                t["cpu"] += (cpu_seconds(run.pid) - cpu0) if run.pid else 0.0
                t["p50"].append(result["p50_ms"])
        ra, rb = (totals[r.target.name] for r in (a, b))
        row = {"pair": f"{a.target.name} vs {b.target.name}", "conc": conc}
        for run, t in ((a, ra), (b, rb)):
            row[run.target.name] = {
                "rps": t["requests"] / t["seconds"], "p50_ms": sorted(t["p50"])[len(t["p50"]) // 2],
                "cpu_us_per_req": 1e6 * t["cpu"] / max(t["requests"], 1),
            }  # fmt: skip
        row["rps_ratio"] = row[b.target.name]["rps"] / row[a.target.name]["rps"]
        row["cpu_ratio"] = row[b.target.name]["cpu_us_per_req"] / max(row[a.target.name]["cpu_us_per_req"], 1e-9)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def run_count(args, procs: Processes) -> list[dict]:
    """Machine instructions per request under load, counted by callgrind (instrumentation on only
    while wrk runs): a figure the machine's drift cannot touch, though the gateway runs ~50x slower,
    so batches (the ledger's) are smaller than at full speed. One level: the first of --conc."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--count needs valgrind: apt-get install -y valgrind")
    (WORK / "callgrind").mkdir(parents=True, exist_ok=True)
    conc, rows = args.conc[0], []
    for name in args.pair or args.targets:
        if target_named(name)[0].kind not in ("tgw", "minimal"):
            raise SystemExit(f"--count counts tgw targets and minimal, not {name}")
        run = start_target(name, procs, args.python, args.litellm, count=True)
        wrk(run, conc, args.warmup or 3)
        subprocess.run(["callgrind_control", "-i", "on", str(run.pid)], capture_output=True, check=True)
        result = wrk(run, conc, args.duration)
        subprocess.run(["callgrind_control", "-i", "off", str(run.pid)], capture_output=True, check=True)
        procs.stop(run.proc)  # callgrind writes its counts as the process ends
        threads = sorted((WORK / "callgrind").glob(f"*.{run.pid}-*"))
        counts = [callgrind_total(path) for path in threads]
        requests = max(result["requests"], 1)
        row = {"target": name, "conc": conc, "requests": result["requests"],
               "instructions_per_request": sum(counts) / requests,
               "event_loop_per_request": (counts[0] if counts else 0) / requests}  # fmt: skip
        row["other_threads_per_request"] = row["instructions_per_request"] - row["event_loop_per_request"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    if args.pair:
        a, b = rows
        rows.append({"pair": f"{a['target']} vs {b['target']}", "conc": conc,
                     "instructions_ratio": b["instructions_per_request"] / a["instructions_per_request"]})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def callgrind_total(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return 0


def count_markdown(rows: list[dict]) -> str:
    out = ["| target | connections | requests counted | instructions per request | event loop | other threads |",
           "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "target" in r:
            out.append(f"| {r['target']} | {r['conc']} | {r['requests']:,.0f} | {r['instructions_per_request']:,.0f} | "
                       f"{r['event_loop_per_request']:,.0f} | {r['other_threads_per_request']:,.0f} |")  # fmt: skip
        else:
            out.append(f"\n{r['pair']}: {r['instructions_ratio']:.3f}x the instructions per request")
    return "\n".join(out)


def format_row(row: dict) -> str:
    text = (f"  {row['target']:<20} c={row['conc']:<4} {row['rps']:>9.0f} rps  p50 {row['p50_ms']:.2f} ms  "
            f"p99 {row['p99_ms']:.2f} ms  errors {row['errors']:.0f}")  # fmt: skip
    if "cpu_us_per_req" in row:
        text += f"  {row['cpu_us_per_req']:.0f} us/req  cpu {row['cpu_pct']:.0f}%  rss {row['rss_mib']:.1f} MiB"
    if "events_per_core_s" in row:
        text += f"  {row['events_per_core_s']:,.0f} events/s/core"
    return text


def markdown(rows: list[dict]) -> str:
    by_target: dict[str, dict] = {}
    for row in rows:
        if "rps" in row:
            by_target.setdefault(row["target"], {})[row["conc"]] = row
    concs = sorted({c for cells in by_target.values() for c in cells})
    out = ["| target | " + " | ".join(f"{c} connections" for c in concs) + " |", "|---|" + "---:|" * len(concs)]
    for name, cells in by_target.items():
        out.append(f"| {name} | " + " | ".join(
            f"{cells[c]['rps']:,.0f} ({cells[c]['p50_ms']:.2f} ms)" if c in cells else "-" for c in concs) + " |")  # fmt: skip
    ttfts = [r for r in rows if "ttft" in r]
    if ttfts:
        out += [
            "",
            "| stream target | time to first token p50 (p90) | whole stream p50 | events |",
            "|---|---:|---:|---:|",
        ]
        for r in ttfts:
            t = r["ttft"]
            out.append(f"| {r['target']} | {t['ttft_p50_ms']:.3f} ms ({t['ttft_p90_ms']:.3f}) | "
                       f"{t['total_p50_ms']:.2f} ms | {t['events']} |")  # fmt: skip
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(DEFAULT_RUN), help=f"comma list of: {', '.join(TARGETS)}")
    parser.add_argument("--pair", help="A,B: both up at once, loaded in turn; prints B/A ratios")
    parser.add_argument("--conc", default="10,50,100", help="connections per level (comma list)")
    parser.add_argument("--duration", type=float, default=15, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of discarded load before each level")
    parser.add_argument("--pause", type=float, default=2, help="seconds of rest between targets")
    parser.add_argument("--rounds", type=int, default=4, help="--pair: A/B rounds per level")
    parser.add_argument("--segment", type=float, default=8, help="--pair: seconds per turn")
    parser.add_argument("--ttft", type=int, default=300, help="stream targets: sequential requests timed (0 = skip)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for tgw and the minimal proxy")
    parser.add_argument("--litellm", help="a venv with litellm[proxy] (for the litellm target)")
    parser.add_argument("--count", action="store_true", help="instructions per request under callgrind (valgrind)")
    args = parser.parse_args()
    args.conc = [int(c) for c in args.conc.split(",")]
    args.targets = [t for t in args.targets.split(",") if t]
    if args.pair:
        args.pair = args.pair.split(",")
    for name in args.pair or args.targets:
        target_named(name)  # a typo fails before anything starts
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install -y wrk (and nginx-light for the mock)")
    WORK.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    try:
        start_mock(procs)
        if args.count:
            rows = run_count(args, procs)
        else:
            rows = run_pair(args, procs) if args.pair else run_sequential(args, procs)
    finally:
        procs.stop_all()
    results = WORK / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{stamp}.json"
    meta = {"python": args.python, "version": subprocess.run([args.python, "-VV"], capture_output=True,
            text=True).stdout.strip(), "args": {k: v for k, v in vars(args).items()}}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.count:
        print(count_markdown(rows))
    elif not args.pair:
        print(markdown(rows))
    print(f"# results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
