#!/usr/bin/env python3
"""Load-and-fault run against gpt2-server: loopback only, every phase bounded in count and time.

    tools/load_fault.py [--server PATH] [--model DIR] [--quick] [--output FILE.json]

Starts the built server itself on a free port of 127.0.0.1 with small, explicit settings, replays
what the robustness probe of issue 11 found (overload, malformed and hostile requests, extreme but
valid values, slow / idle / stalled clients, a flood of connections past the cap, 6 MiB bodies
held open, disconnects, SIGTERM under load, the KV budget, out-of-range flags), prints a table of
figures and checks, and writes them as JSON with --output. Exits 0 when every check passed, 1 when
one failed, 3 when the whole run overran --time-limit (the servers it started are killed then).

Python 3 standard library only. Every connection goes to 127.0.0.1; every loop stops by itself
(count and time). Defaults take under a minute on 2 cores (release build); --quick about 20 s (for CI,
with the test build). docs/reliability.md records the figures and what they show.
"""

import argparse
import collections
import errno
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

LOOPBACK = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BODY = 6 * 1024 * 1024  # the server's body limit (6 MiB)
OVERFLOW_POOL = 64  # serve.rs: connections past the cap that still answer /ping
OVERFLOW_HEADER_TIMEOUT = 2.0  # serve.rs: how long an overflow connection may take to send
LONG_BEAM = {  # keeps the demo model busy until cancelled or its deadline
    "input": "Hello", "mode": "beam", "num_beams": 16, "num_return_sequences": 1,
    "no_repeat_ngram_size": 0, "max_length": 1024,
}
SHORT = {"input": "Hi", "max_length": 4, "num_return_sequences": 1}

_children = []  # servers started by this script: killed (by their pid) on overrun


# ------------------------------------------------------------------------------------------------
# HTTP/1.1 over raw sockets


class Response:
    def __init__(self, status, headers, body, will_close):
        self.status = status
        self.headers = headers  # lowercase name -> value (last one wins)
        self.body = body
        self.will_close = will_close

    def header(self, name):
        return self.headers.get(name.lower())

    def error_shape(self):
        """(error_type, ok): whether the body is the documented {"error", "error_type"} object."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None, False
        ok = (isinstance(value, dict) and set(value) == {"error", "error_type"}
              and isinstance(value["error"], str) and isinstance(value["error_type"], str))
        return (value.get("error_type") if isinstance(value, dict) else None), ok


class Conn:
    """One client connection to the server, with a read buffer."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.interim = []  # 1xx statuses seen (100 Continue)

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError("closed by the server")
        self.buf += chunk

    def _take_line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            self._fill()

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_head(self):
        """Reads a status line and headers, skipping 1xx answers: (status, headers, http10)."""
        while True:
            while b"\r\n\r\n" not in self.buf:
                self._fill()
            end = self.buf.index(b"\r\n\r\n")
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[:end + 4]
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            status = int(parts[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:
                self.interim.append(status)
                continue
            return status, headers, parts[0] == "HTTP/1.0"

    def read_response(self, head_request=False):
        status, headers, http10 = self.read_head()
        will_close = headers.get("connection", "").lower() == "close" or http10
        if head_request or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int(self._take_line().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._take_line():  # trailers, then the blank line
                        pass
                    break
                parts.append(self._take(size))
                self._take(2)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        else:
            will_close = True
            try:
                while True:
                    self._fill()
            except EOFError:
                pass
            body = bytes(self.buf)
            self.buf.clear()
        return Response(status, headers, body, will_close)


def parse_response(data):
    """Parses one whole answer read until the server closed the connection."""
    conn = Conn.__new__(Conn)
    conn.sock = None
    conn.buf = bytearray(data)
    conn.interim = []

    def no_more():
        raise EOFError("end of the answer")

    conn._fill = no_more
    return conn.read_response()


def request_bytes(method, path, body=b"", content_type="application/json", headers=(),
                  close=False, content_length=None):
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if content_length is None:
        content_length = len(body)
    if method in ("POST", "PUT", "PATCH") or body:
        lines.append(f"Content-Length: {content_length}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def invoke_bytes(payload, close=True, path="/invocations", headers=()):
    return request_bytes("POST", path, json.dumps(payload).encode(), close=close, headers=headers)


def exchange(port, data, timeout=30.0, head_request=False):
    conn = Conn(port, timeout)
    try:
        conn.send(data)
        return conn.read_response(head_request)
    finally:
        conn.close()


def ping(port, timeout=2.0):
    """(status or None, milliseconds)."""
    started = time.monotonic()
    try:
        status = exchange(port, request_bytes("GET", "/ping", content_type=None, close=True),
                          timeout).status
    except (OSError, EOFError, ValueError, IndexError):
        status = None
    return status, (time.monotonic() - started) * 1000


def ping_alive(port, within=5.0):
    """Whether /ping answers 200 within `within` seconds (a few tries): (status, ms of the last)."""
    deadline = time.monotonic() + within
    while True:
        status, took = ping(port)
        if status == 200 or time.monotonic() >= deadline:
            return status, took
        time.sleep(0.1)


def metrics(port):
    """GET /metrics as {"name{labels}": value}, or None where the server has no /metrics."""
    try:
        response = exchange(port, request_bytes("GET", "/metrics", content_type=None, close=True), 10)
    except (OSError, EOFError, ValueError):
        return None
    if response.status != 200:
        return None
    out = {}
    for line in response.body.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def ms(seconds):
    return round(seconds * 1000, 1)


def pct(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))], 1)


def summary(values):
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": round(min(values), 1), "p50": pct(values, 50),
            "p99": pct(values, 99), "max": round(max(values), 1)}


# ------------------------------------------------------------------------------------------------
# The server under test and what watches it


def server_env():
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("GPT2_") and k not in ("GPT2_ISA",)) and not k.startswith("SAGEMAKER_")}
    env["RUST_LOG"] = "info"
    return env


class Server:
    """A gpt2-server this script started on 127.0.0.1 and a free port; its JSON log lines."""

    def __init__(self, binary, args, model=None):
        self.binary = binary
        self.args = ["--host", LOOPBACK, "--port", "0", "--log-format", "json", *args]
        if model:
            self.args += ["--model", model]
        self.lines = []  # (monotonic time, parsed JSON or {"raw": line})
        self.lock = threading.Lock()
        self.listening = threading.Event()
        self.port = None
        self.info = {}
        self.proc = None

    def start(self, timeout=120.0):
        started = time.monotonic()
        self.proc = subprocess.Popen([self.binary, *self.args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=server_env())
        _children.append(self.proc)
        threading.Thread(target=self._read_logs, daemon=True).start()
        while not self.listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() - started > timeout:
                tail = [line.get("raw", line) for _, line in self.lines[-5:]]
                raise RuntimeError(f"the server did not start (exit {self.proc.poll()}): {tail}")
        addr = self.info["listening"]["addr"]
        if not addr.startswith(LOOPBACK + ":"):
            self.kill()
            raise RuntimeError(f"the server listens on {addr}, not on loopback")
        self.port = int(addr.rsplit(":", 1)[1])
        while ping(self.port)[0] != 200:
            if time.monotonic() - started > timeout:
                raise RuntimeError("the server never answered /ping")
            time.sleep(0.02)
        self.startup_s = time.monotonic() - started
        return self

    def _read_logs(self):
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                line = json.loads(text)
                if not isinstance(line, dict):
                    line = {"raw": text}
            except ValueError:
                line = {"raw": text}
            with self.lock:
                self.lines.append((time.monotonic(), line))
            message = line.get("message")
            if message in ("model loaded", "listening") or str(message).startswith("KV-cache budget"):
                self.info[message if message != "KV-cache budget (--kv-budget-mb)" else "kv"] = line
            if message == "listening":
                self.listening.set()

    def logs(self, since=0.0):
        with self.lock:
            return [line for t, line in self.lines if t >= since]

    def count_logs(self, since, predicate):
        return sum(1 for line in self.logs(since) if predicate(line))

    def rss(self):
        return proc_status(self.proc.pid)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def proc_status(pid):
    """{"rss_mib", "hwm_mib", "threads"} from /proc/PID/status, or {} once the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mib"] = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    out["hwm_mib"] = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except OSError:
        pass
    return out


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class ProcSampler(threading.Thread):
    """Samples the server's RSS every 50 ms and its open fds every 250 ms, until stopped."""

    def __init__(self, pid, interval=0.05):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = []  # (t, rss_mib, fds or None)
        self.stop_event = threading.Event()

    def run(self):
        n = 0
        while not self.stop_event.is_set():
            status = proc_status(self.pid)
            if not status:
                return
            fds = open_fds(self.pid) if n % 5 == 0 else None
            self.samples.append((time.monotonic(), status.get("rss_mib", 0.0), fds))
            n += 1
            self.stop_event.wait(self.interval)

    def between(self, start, end):
        rss = [r for t, r, _ in self.samples if start <= t <= end]
        fds = [f for t, _, f in self.samples if start <= t <= end and f is not None]
        return {"rss_peak_mib": round(max(rss), 1) if rss else None,
                "fds_peak": max(fds) if fds else None}


def pinger_main(port, interval, stop, out, hard_limit):
    """In its own process (its own GIL): GET /ping every `interval` on a kept-alive connection,
    and, in a second thread, every `interval` on a fresh connection (so that a slow connect of
    one never delays the other). Returns (monotonic time, kind, ms or None, status or error,
    connect ms)."""
    samples = []
    reconnects = [0]
    lock = threading.Lock()
    end = time.monotonic() + hard_limit
    parent = os.getppid()

    def loop(kind, offset):
        persistent = None
        ping_keep = request_bytes("GET", "/ping", content_type=None)
        ping_close = request_bytes("GET", "/ping", content_type=None, close=True)
        next_at = time.monotonic() + offset
        while not stop.is_set() and time.monotonic() < end and os.getppid() == parent:
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            next_at = max(next_at + interval, time.monotonic())
            started = time.monotonic()
            connect_ms = 0.0
            try:
                if kind == "persistent":
                    if persistent is None:
                        persistent = Conn(port, timeout=2.0)
                        reconnects[0] += 1
                    persistent.send(ping_keep)
                    response = persistent.read_response()
                    if response.will_close:
                        persistent.close()
                        persistent = None
                else:
                    conn = Conn(port, timeout=2.0)
                    connect_ms = (time.monotonic() - started) * 1000
                    try:
                        conn.send(ping_close)
                        response = conn.read_response()
                    finally:
                        conn.close()
                sample = (started, kind, (time.monotonic() - started) * 1000, response.status, connect_ms)
            except (OSError, EOFError, ValueError, IndexError) as e:
                sample = (started, kind, None, type(e).__name__, connect_ms)
                if kind == "persistent" and persistent is not None:
                    persistent.close()
                    persistent = None
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=loop, args=("persistent", 0.0)),
               threading.Thread(target=loop, args=("fresh", interval / 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({"samples": samples, "reconnects": reconnects[0]})


class Pinger:
    def __init__(self, port, interval, hard_limit):
        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        self.queue = ctx.Queue()
        self.proc = ctx.Process(target=pinger_main,
                                args=(port, interval, self.stop_event, self.queue, hard_limit),
                                daemon=True)
        self.proc.start()
        self.result = {"samples": [], "reconnects": 0}

    def stop(self):
        self.stop_event.set()
        try:
            self.result = self.queue.get(timeout=15)
        except Exception:  # noqa: BLE001 - the pinger died: no samples
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        return self.result


# ------------------------------------------------------------------------------------------------
# Bookkeeping


class Run:
    def __init__(self, cfg):
        self.cfg = cfg
        self.started = time.monotonic()
        self.phases = collections.OrderedDict()  # name -> {"start", "end", figures...}
        self.checks = []  # {"phase", "check", "ok", "detail"}: what docs/api.md promises
        self.findings = []  # {"phase", "finding", "detail"}: defects and limits seen beyond it
        self.current = None

    def begin(self, name):
        self.current = name
        self.phases[name] = {"start": time.monotonic()}
        print(f"== {name}", flush=True)
        return self.phases[name]

    def end(self, name):
        self.phases[name]["end"] = time.monotonic()
        self.phases[name]["duration_s"] = round(self.phases[name]["end"] - self.phases[name]["start"], 2)

    def check(self, name, ok, detail=""):
        ok = bool(ok)
        self.checks.append({"phase": self.current, "check": name, "ok": ok, "detail": str(detail)})
        print(f"   [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    def finding(self, name, detail=""):
        self.findings.append({"phase": self.current, "finding": name, "detail": str(detail)})
        print(f"   [FINDING] {name}: {detail}", flush=True)

    def time_left(self):
        return self.cfg.time_limit - (time.monotonic() - self.started)


def run_phase(run, name, fn, *args):
    figures = run.begin(name)
    try:
        fn(run, figures, *args)
    except Exception as e:  # noqa: BLE001 - a phase that raises is a failed check, not a crash
        import traceback
        traceback.print_exc()
        run.check("phase completed", False, f"{type(e).__name__}: {e}")
    finally:
        run.end(name)


# ------------------------------------------------------------------------------------------------
# Phases


def phase_flags(run, fig, cfg):
    """Out-of-range numeric flags and variables exit 2 with a message, before binding anything."""
    cases = [
        (["--queue-capacity", "18446744073709551616"], {}, "queue-capacity"),
        (["--queue-capacity", "0"], {}, "queue-capacity"),
        (["--max-connections", "0"], {}, "max-connections"),
        (["--header-timeout-secs", "99999999999999999999"], {}, "header-timeout-secs"),
        (["--body-timeout-secs", "0"], {}, "body-timeout-secs"),
        (["--deadline-secs", "86401"], {}, "deadline-secs"),
        (["--shutdown-grace-secs", "1e9"], {}, "shutdown-grace-secs"),
        (["--kv-budget-mb", "1073741825"], {}, "kv-budget-mb"),
        (["--max-num-beams", "4294967297"], {}, "max-num-beams"),
        ([], {"GPT2_QUEUE_CAPACITY": "1e30"}, "GPT2_QUEUE_CAPACITY"),
        ([], {"SAGEMAKER_MODEL_SERVER_TIMEOUT": "18446744073709551616"}, "SAGEMAKER_MODEL_SERVER_TIMEOUT"),
    ]
    results = []
    for args, env_extra, names in cases:
        env = server_env()
        env.update(env_extra)
        started = time.monotonic()
        try:
            out = subprocess.run([cfg.server, "--host", LOOPBACK, "--port", "0", *args],
                                 env=env, capture_output=True, timeout=30)
            code, stderr = out.returncode, out.stderr.decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            code, stderr = "timeout", ""
        results.append({"args": args, "env": env_extra, "exit": code,
                        "names_it": names in stderr, "ms": ms(time.monotonic() - started)})
    fig["cases"] = results
    bad = [r for r in results if r["exit"] != 2 or not r["names_it"]]
    run.check("out-of-range flags exit 2 naming the flag", not bad,
              f"{len(results) - len(bad)}/{len(results)}; max {max(r['ms'] for r in results)} ms"
              + (f"; bad: {bad}" if bad else ""))


def phase_overload(run, fig, srv, cfg):
    """10x the queue's capacity at once, in waves: only 200 and 503 (429), Retry-After on 503s."""
    n = cfg.overload_factor * cfg.queue_capacity
    request = invoke_bytes({"input": "The quick brown fox", "max_length": cfg.overload_length})
    statuses = collections.Counter()
    latency = collections.defaultdict(list)
    missing_retry_after, bad_error_bodies, bad_ok_bodies, errors = 0, 0, 0, collections.Counter()
    for _ in range(cfg.overload_waves):
        # Connect first, then send every request within a few ms; one thread reads them all.
        watcher = Watcher()
        tracked = [watcher.connect(srv.port, "overload") for _ in range(n)]
        watcher.wait_connected()
        for t in tracked:
            if t.opened is None or t.closed_at is not None:
                continue
            t.limit = 1 << 20
            t.sock.sendall(request)
            t.last_sent = time.monotonic()
        watcher.run_until(time.monotonic() + max(1.0, min(90.0, run.time_left())))
        watcher.close()
        results = []
        for t in tracked:
            if t.answered_at is None:
                results.append(None)
                continue
            try:
                results.append((parse_response(bytes(t.data)), t.answered_at - t.last_sent))
            except (EOFError, ValueError, IndexError) as e:
                results.append((e, t.answered_at - t.last_sent))
        for result in results:
            if result is None:
                errors["no answer in time"] += 1
                continue
            response, elapsed = result
            if not isinstance(response, Response):
                errors[type(response).__name__] += 1
                continue
            statuses[response.status] += 1
            latency[response.status].append(elapsed * 1000)
            if response.status in (429, 503):
                if response.header("retry-after") != "1":
                    missing_retry_after += 1
                if response.error_shape() != ("overloaded", True):
                    bad_error_bodies += 1
            elif response.status == 200:
                texts = json.loads(response.body)
                if not (isinstance(texts, list) and len(texts) == 3
                        and all(t.startswith("The quick brown fox") for t in texts)):
                    bad_ok_bodies += 1
    fig.update({
        "concurrent": n, "waves": cfg.overload_waves,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "latency_ms": {str(k): summary(v) for k, v in sorted(latency.items())},
        "errors": dict(errors),
    })
    others = {s: c for s, c in statuses.items() if s not in (200, 429, 503)}
    run.check("only 200 and 503/429", not others and not errors,
              f"{dict(statuses)}" + (f"; errors {dict(errors)}" if errors else ""))
    run.check("Retry-After: 1 and the overloaded error on every 503", missing_retry_after == 0
              and bad_error_bodies == 0, f"{missing_retry_after} without, {bad_error_bodies} bad bodies")
    run.check("the queue bound was exercised (some 503s, some 200s)",
              statuses[503] + statuses[429] > 0 and statuses[200] >= cfg.queue_capacity,
              f"{statuses[200]} x 200, {statuses[503]} x 503")
    run.check("200 answers are 3 strings starting with the prompt", bad_ok_bodies == 0,
              f"{bad_ok_bodies} bad")
    refused = latency.get(503, [])
    run.check("503s answered at once (p99 < 100 ms)", not refused or pct(refused, 99) < 100,
              f"p50 {pct(refused, 50)} ms, p99 {pct(refused, 99)} ms")
    alive_ping = ping(srv.port)[0]
    alive = exchange(srv.port, invoke_bytes(SHORT), 60).status
    fig["alive_after"] = {"ping": alive_ping, "invocation": alive}
    run.check("alive after (ping 200, invocation 200)", alive_ping == 200 and alive == 200,
              f"ping {alive_ping}, invocation {alive}")


# The exact status the contract gives some of the cases (the others: any 4xx).
EXPECTED = {
    "6 MiB prompt (input bytes cap)": 422, "6 MiB + 1 body, no Expect": 413,
    "Expect 100-continue, 7 MB Content-Length": 413, "Expect 100-continue, text/csv": 415,
    "duplicate keys": 400, "nested duplicate keys": 400, "duplicate max_length": 400, "deep nesting": 400,
    "bad UTF-8": 400, "truncated JSON": 400, "empty body": 400, "array body": 400,
    "max_length 2^64": 422, "seed 2^64": 422, "num_beams 2^64": 422, "top_p 1e-300 (0 as f32)": 422,
    "temperature 1e-50 (0 as f32)": 422, "temperature 1e39 (inf as f32)": 422, "input wrong type": 422,
    "too many tokens in few bytes": 422, "text/csv": 415, "form content type": 415,
    "GET /invocations": 405, "GET /nowhere": 404, "invalid chunked body": 400,
}


def malformed_cases(cfg):
    """(name, request bytes, fresh connection?, acceptable outcomes besides 4xx)."""
    light = []

    def body(name, data, content_type="application/json", method="POST", path="/invocations",
             headers=()):
        raw = data if isinstance(data, bytes) else data.encode()
        light.append((name, request_bytes(method, path, raw, content_type, headers), False, ()))

    for name, data in [
        ("truncated JSON", '{"input": "abc'), ("truncated JSON 2", '{"input": "abc", "max_length": 1'),
        ("empty body", ""), ("array body", "[1, 2]"), ("string body", '"input"'),
        ("null body", "null"), ("number body", "42"), ("trailing garbage", '{"input": "x"} x'),
        ("form body as JSON", "input=hello&max_length=5"), ("NaN literal", '{"input": "x", "top_p": NaN}'),
        ("duplicate keys", '{"input": "a", "input": "b"}'),
        ("nested duplicate keys", '{"input": "a", "extra": {"k": 1, "k": 2}}'),
        ("duplicate max_length", '{"input": "a", "max_length": 5, "max_length": 5000}'),
        ("number out of f64 range", '{"input": "x", "max_length": 1e400}'),
        ("deep nesting", "[" * 100_000), ("deep object nesting", '{"a":' * 5000),
        ("lone surrogate escape", '{"input": "\\ud800"}'),
        ("input wrong type", '{"input": 5}'), ("input list", '{"input": ["a"]}'),
        ("input object", '{"input": {}}'), ("input missing", '{"max_length": 5}'),
        ("input null", '{"input": null}'), ("input empty", '{"input": ""}'),
        ("max_length string", '{"input": "x", "max_length": "50"}'),
        ("max_length fraction", '{"input": "x", "max_length": 50.5}'),
        ("max_length zero", '{"input": "x", "max_length": 0}'),
        ("max_length 2^64", '{"input": "x", "max_length": 18446744073709551616}'),
        ("max_length 1e300", '{"input": "x", "max_length": 1e300}'),
        ("max_length over n_positions", '{"input": "x", "max_length": 5000}'),
        ("max_new_tokens negative", '{"input": "x", "max_new_tokens": -1}'),
        ("max_new_tokens 2^63", '{"input": "x", "max_new_tokens": 9223372036854775808}'),
        ("stream string", '{"input": "x", "stream": "yes"}'), ("stream number", '{"input": "x", "stream": 1}'),
        ("mode number", '{"input": "x", "mode": 3}'), ("mode unknown", '{"input": "x", "mode": "fast"}'),
        ("mode wrong case", '{"input": "x", "mode": "Greedy"}'),
        ("top_k bool", '{"input": "x", "top_k": true}'), ("top_k negative", '{"input": "x", "top_k": -3}'),
        ("top_k 1e308", '{"input": "x", "top_k": 1e308}'),
        ("top_p zero", '{"input": "x", "top_p": 0}'), ("top_p above one", '{"input": "x", "top_p": 1.0000001}'),
        ("top_p 1e-300 (0 as f32)", '{"input": "x", "top_p": 1e-300}'),
        ("top_p 5e-324", '{"input": "x", "top_p": 5e-324}'),
        ("temperature zero", '{"input": "x", "temperature": 0}'),
        ("temperature negative", '{"input": "x", "temperature": -1}'),
        ("temperature 1e-50 (0 as f32)", '{"input": "x", "temperature": 1e-50}'),
        ("temperature 1e39 (inf as f32)", '{"input": "x", "temperature": 1e39}'),
        ("temperature string", '{"input": "x", "temperature": "hot"}'),
        ("num_beams 2^64", '{"input": "x", "num_beams": 18446744073709551616}'),
        ("num_beams 99", '{"input": "x", "num_beams": 99}'),
        ("num_return_sequences 17", '{"input": "x", "num_return_sequences": 17}'),
        ("num_return_sequences > num_beams",
         '{"input": "x", "mode": "beam", "num_beams": 2, "num_return_sequences": 3}'),
        ("no_repeat_ngram_size negative", '{"input": "x", "no_repeat_ngram_size": -1}'),
        ("seed 2^64", '{"input": "x", "seed": 18446744073709551616}'),
        ("seed -2", '{"input": "x", "seed": -2}'), ("seed fraction", '{"input": "x", "seed": 1.5}'),
        ("invalid field while streaming", '{"input": "x", "stream": true, "top_p": 3}'),
        ("too many tokens in few bytes", '{"input": "' + "a " * 1100 + '", "max_length": 1024}'),
        ("prompt longer than max_length", '{"input": "' + "a " * 50 + '", "max_length": 10}'),
    ]:
        body(name, data)
    body("bad UTF-8", b'{"input": "\xff\xfe\xfd"}')
    body("overlong UTF-8", b'{"input": "\xc0\xaf"}')
    body("UTF-8 BOM", b'\xef\xbb\xbf{"input": "x"}')
    body("UTF-16 body", '{"input": "x"}'.encode("utf-16"))
    body("text/csv", '{"input": "x"}', "text/csv")
    body("form content type", "input=x", "application/x-www-form-urlencoded")
    body("application/jsonx", '{"input": "x"}', "application/jsonx")
    body("multipart", "--b\r\n\r\n--b--", "multipart/form-data; boundary=b")
    body("content type with bad UTF-8", '{"input": "x"}', "application/\xffjson")
    body("response-stream route, bad JSON", "{", path="/endpoints/e/invocations-response-stream")
    body("endpoints route, wrong type", '{"input": 1}', path="/endpoints/e/invocations")
    body("bad request id and bad JSON", "{", headers=(("X-Request-Id", "has spaces " * 20),))
    for method, path in [("GET", "/invocations"), ("PUT", "/invocations"), ("DELETE", "/ping"),
                         ("POST", "/ping"), ("GET", "/nowhere"), ("GET", "/invocations/"),
                         ("POST", "/endpoints/e/other"), ("GET", "/endpoints/e/invocations"),
                         ("PATCH", "/execution-parameters"), ("OPTIONS", "/invocations"),
                         ("GET", "/%2e%2e/etc/passwd"), ("GET", "/nowhere?x=" + "%ff" * 50)]:
        light.append((f"{method} {path[:24]}", request_bytes(method, path, b"", None), False, ()))

    def raw(name, data, also=()):
        light.append((name, data, True, also))

    expect = "Expect: 100-continue\r\n"
    raw("Expect 100-continue, 7 MB Content-Length",
        ("POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         f"{expect}Content-Length: 7000000\r\n\r\n").encode())
    raw("Expect 100-continue, 2^64 Content-Length",
        ("POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         f"{expect}Content-Length: 18446744073709551616\r\n\r\n").encode())
    raw("Expect 100-continue, text/csv",
        ("POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
         f"{expect}Content-Length: 10\r\n\r\n").encode())
    raw("invalid chunked body",
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    raw("Content-Length not a number", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    raw("two Content-Lengths",
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{}")
    raw("garbage request line", b"GARBAGE\r\n\r\n")
    raw("HTTP/9.9", b"GET /ping HTTP/9.9\r\nHost: x\r\n\r\n")
    raw("binary garbage", bytes(range(256)) + b"\r\n\r\n")
    raw("200 headers", b"GET /ping HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
    raw("100 kB URI", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    raw("header without colon", b"GET /ping HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n")
    raw("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", also=("closed",))

    heavy = []
    wrap = len(b'{"input": ""}')
    prompt = b'{"input": "' + b"x" * (MAX_BODY - wrap) + b'"}'  # 6 MiB exactly: the limit
    heavy.append(("6 MiB prompt (input bytes cap)",
                  request_bytes("POST", "/invocations", prompt), False, ()))
    over = b'{"input": "' + b"x" * (MAX_BODY + 1 - wrap) + b'"}'
    heavy.append(("6 MiB + 1 body, no Expect", request_bytes("POST", "/invocations", over), True, ()))
    return light, heavy


def phase_malformed(run, fig, srv, cfg):
    """cfg.malformed hostile requests over kept-alive connections: all 4xx, no 5xx."""
    light, heavy = malformed_cases(cfg)
    rng = random.Random(11)
    plan = [case for case in heavy for _ in range(cfg.malformed_heavy)]
    remaining = max(0, cfg.malformed - len(plan))
    plan += [light[i % len(light)] for i in range(remaining)]
    rng.shuffle(plan)
    lock = threading.Lock()
    next_index = [0]
    per_case = collections.defaultdict(collections.Counter)
    statuses = collections.Counter()
    problems = []
    counters = collections.Counter()
    slowest = {}
    deadline = time.monotonic() + min(cfg.malformed_time, max(5.0, run.time_left() - 60))

    def worker():
        conn = None
        while time.monotonic() < deadline:
            with lock:
                if next_index[0] >= len(plan):
                    break
                name, data, fresh, also = plan[next_index[0]]
                next_index[0] += 1
            outcome = None
            case_started = time.monotonic()
            for attempt in range(2):
                try:
                    if conn is None or fresh:
                        if conn is not None:
                            conn.close()
                        conn = Conn(srv.port, timeout=30)
                        counters["connections"] += 1
                    try:
                        conn.send(data)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # answered and closed early: the answer may still be readable
                    response = conn.read_response()
                    outcome = response
                    if name.startswith("Expect") and conn.interim:
                        with lock:
                            problems.append((name, response.status, "the body was invited (100 Continue)"))
                    if response.will_close or fresh:
                        conn.close()
                        conn = None
                    break
                except (OSError, EOFError, ValueError, IndexError) as e:
                    if conn is not None:
                        conn.close()
                        conn = None
                    if fresh or attempt == 1:
                        outcome = e
                    else:
                        counters["retried on a new connection"] += 1
            with lock:
                slowest[name] = max(slowest.get(name, 0.0), (time.monotonic() - case_started) * 1000)
                if isinstance(outcome, Response):
                    status = outcome.status
                    statuses[status] += 1
                    per_case[name][status] += 1
                    if outcome.header("content-type") == "application/json":
                        counters["JSON error bodies"] += 1
                        if not outcome.error_shape()[1] or not outcome.header("x-request-id"):
                            problems.append((name, status, "bad error body or no x-request-id"))
                    elif 400 <= status < 500:
                        counters["answered by hyper (no JSON body)"] += 1
                    if not 400 <= status < 500 or EXPECTED.get(name, status) != status:
                        problems.append((name, status, outcome.body[:200].decode("utf-8", "replace")))
                else:
                    closed = isinstance(outcome, (EOFError, ConnectionResetError))
                    label = "closed" if closed else type(outcome).__name__
                    per_case[name][label] += 1
                    statuses[label] += 1
                    if label not in also:
                        problems.append((name, label, str(outcome)))
        if conn is not None:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(cfg.malformed_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 35))
    elapsed = time.monotonic() - started
    done = sum(statuses.values())
    fig.update({
        "requests": done, "planned": len(plan), "distinct_cases": len(light) + len(heavy),
        "seconds": round(elapsed, 2), "rate_per_s": round(done / elapsed, 1) if elapsed else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "per_case": {name: {str(k): v for k, v in c.items()} for name, c in sorted(per_case.items())},
        "counters": dict(counters), "problems": problems[:20],
        "slowest_cases_ms": dict(sorted(((k, round(v, 1)) for k, v in slowest.items()),
                                        key=lambda kv: -kv[1])[:8]),
    })
    five = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500)
    run.check(f"{len(plan)} malformed requests sent", done == len(plan), f"{done} in {elapsed:.1f} s "
              f"({fig['rate_per_s']}/s) over {counters['connections']} connections")
    run.check("all 4xx, none 5xx", not problems and five == 0,
              f"{dict(statuses)}" + (f"; first problems: {problems[:5]}" if problems else ""))
    bare = counters["answered by hyper (no JSON body)"]
    run.check("every 4xx has a JSON body and an x-request-id (malformed heads included)", bare == 0,
              f"{bare} bare answers")
    alive = ping(srv.port)[0]
    run.check("alive after", alive == 200, f"ping {alive}")


def phase_edge(run, fig, srv, cfg):
    """Extreme but valid values (and the byte cap): answered, never 5xx, the documented shapes."""
    big_word = "x" * 131072  # exactly n_positions x 128 bytes: tokenized, then too many tokens
    cases = [
        ("top_p 1e-40 (subnormal f32)", {"input": "Hello", "mode": "sample", "top_p": 1e-40}, 200),
        ("top_p 1.4e-45 (smallest f32)", {"input": "Hello", "mode": "sample-top-p", "top_p": 1.4e-45}, 200),
        ("temperature 1e-30", {"input": "Hello", "mode": "sample", "temperature": 1e-30}, 200),
        ("temperature 1e-45 (subnormal f32)", {"input": "Hello", "mode": "sample", "temperature": 1e-45}, 200),
        ("temperature 3.4e38 (largest f32)", {"input": "Hello", "mode": "sample", "temperature": 3.4e38}, 200),
        ("top_k 2^32-1", {"input": "Hello", "top_k": 4294967295}, 200),
        ("top_k 0 top_p 1", {"input": "Hello", "mode": "sample", "top_k": 0, "top_p": 1}, 200),
        ("seed 2^64-1", {"input": "Hello", "seed": 18446744073709551615}, 200),
        ("seed 0", {"input": "Hello", "seed": 0}, 200),
        ("seed -1", {"input": "Hello", "seed": -1}, 200),
        ("max_length 50.0", {"input": "Hello", "max_length": 50.0}, 200),
        ("max_new_tokens 1", {"input": "Hello", "max_new_tokens": 1}, 200),
        ("no_repeat_ngram_size 2^32-1", {"input": "Hello", "mode": "beam", "no_repeat_ngram_size": 4294967295}, 200),
        ("16 beams, 16 sequences",
         {"input": "Hello", "mode": "beam", "num_beams": 16, "num_return_sequences": 16}, 200),
        ("16 sampled sequences", {"input": "Hello", "num_return_sequences": 16}, 200),
        ("emoji and CJK", {"input": "日本語 🎉 é"}, 200),
        ("NUL character", {"input": "a\u0000b"}, 200),
        ("<|endoftext|> text", {"input": "<|endoftext|>"}, 200),
        ("unknown fields and nulls", {"input": "Hello", "foo": [1, {"bar": None}], "top_p": None, "seed": None}, 200),
        ("greedy to n_positions", {"input": "Hello", "mode": "greedy", "max_length": 1024,
                                   "num_return_sequences": 1}, 200),
        ("131,072-byte word (the byte cap)", {"input": big_word}, 422),
        ("131,073-byte word", {"input": big_word + "x"}, 422),
    ]
    if cfg.quick:  # the probe's values only: the debug build generates slowly
        cases = [c for c in cases if c[0].split(" ")[0] in ("top_p", "temperature", "seed", "131,072-byte")]
    results = []
    problems = []
    for name, payload, expected in cases:
        payload = dict(payload)
        if expected == 200 and "max_length" not in payload:
            payload.setdefault("max_new_tokens", 8)
        started = time.monotonic()
        try:
            response = exchange(srv.port, invoke_bytes(payload), timeout=60)
            status = response.status
        except (OSError, EOFError, ValueError) as e:
            response, status = None, type(e).__name__
        elapsed = ms(time.monotonic() - started)
        results.append({"case": name, "status": status, "ms": elapsed})
        if status != expected:
            problems.append((name, status, response.body[:200].decode("utf-8", "replace") if response else ""))
        elif status == 200:
            texts = json.loads(response.body)
            n = payload.get("num_return_sequences", 3)
            if not (isinstance(texts, list) and len(texts) == n
                    and all(isinstance(t, str) and t.startswith(payload["input"]) for t in texts)):
                problems.append((name, status, "unexpected body"))
    streamed = {"input": "Hello", "mode": "sample", "top_p": 1e-40, "temperature": 1e-30,
                "max_new_tokens": 8, "num_return_sequences": 2, "stream": True}
    response = exchange(srv.port, invoke_bytes(streamed), timeout=60)
    stream_ok = response.status == 200 and response.body.rstrip().endswith(b"data: [DONE]")
    results.append({"case": "stream, tiny top_p and temperature", "status": response.status})
    if not stream_ok:
        problems.append(("stream", response.status, response.body[-200:].decode("utf-8", "replace")))
    fig["cases"] = results
    run.check("extreme valid values answered 200, the byte cap 422, no 5xx", not problems,
              f"{len(results) - len(problems)}/{len(results)}" + (f"; {problems}" if problems else ""))
    cap = [r for r in results if r["case"].startswith("131,072")][0]
    fig["byte_cap_tokenize_ms"] = cap["ms"]
    run.check("the longest prompt that gets tokenized is answered within 2 s", isinstance(cap["ms"], float)
              and cap["ms"] < 2000, f"{cap['ms']} ms")


class Tracked:
    __slots__ = ("sock", "kind", "opened", "last_sent", "closed_at", "answered_at", "data", "trickle",
                 "limit", "pending", "failed")

    def __init__(self, sock, kind, trickle=False):
        self.sock = sock
        self.kind = kind
        self.opened = time.monotonic()
        self.last_sent = self.opened
        self.closed_at = None
        self.answered_at = None
        self.data = bytearray()
        self.trickle = trickle
        self.limit = 4096  # bytes of the answer kept
        self.pending = None  # bytes to send once a non-blocking connect completes
        self.failed = None  # why the connect failed

    def status(self):
        match = re.match(rb"HTTP/1\.[01] (\d{3})", bytes(self.data[:16]))
        return int(match.group(1)) if match else None


def open_tracked(port, kind, first_bytes=b"", trickle=False, connect_timeout=5.0):
    try:
        sock = socket.create_connection((LOOPBACK, port), timeout=connect_timeout)
    except OSError:
        return None
    t = Tracked(sock, kind, trickle)
    if first_bytes:
        try:
            sock.sendall(first_bytes)
        except OSError:
            pass
        t.last_sent = time.monotonic()
    return t


class Watcher:
    """Watches client connections (epoll) and records when the server answered and closed each;
    trickles one header byte every `trickle_every` seconds to those marked so (slowloris)."""

    def __init__(self, trickle_every=None):
        self.sel = selectors.DefaultSelector()
        self.trickle_every = trickle_every
        self.next_trickle = time.monotonic() + (trickle_every or 1e9)
        self.connecting = 0

    def connect(self, port, kind, first=b"", trickle=False):
        """Opens a connection without blocking (a connect that needs a SYN retransmit must not
        hold up the others); sends `first` once connected. `opened` is when the handshake ended."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        t = Tracked(sock, kind, trickle)
        t.opened = None
        t.pending = first
        code = sock.connect_ex((LOOPBACK, port))
        if code not in (0, errno.EINPROGRESS):
            t.failed = errno.errorcode.get(code, str(code))
            t.closed_at = time.monotonic()
            sock.close()
            return t
        self.sel.register(sock, selectors.EVENT_WRITE, t)
        self.connecting += 1
        return t

    def add(self, t):
        if t is not None and t.closed_at is None:
            t.sock.setblocking(False)
            self.sel.register(t.sock, selectors.EVENT_READ, t)
        return t

    def open(self):
        return len(self.sel.get_map())

    def poll(self, timeout=0.0):
        for key, _ in self.sel.select(timeout=timeout):
            t = key.data
            if t.opened is None:  # a connect completed (or failed)
                self.connecting -= 1
                now = time.monotonic()
                code = t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    t.failed = errno.errorcode.get(code, str(code))
                    t.closed_at = now
                    self.sel.unregister(t.sock)
                    t.sock.close()
                    continue
                t.opened = t.last_sent = now
                if t.pending:
                    try:
                        t.sock.sendall(t.pending)  # small: fits the empty send buffer
                    except OSError:
                        pass
                    t.last_sent = time.monotonic()
                self.sel.modify(t.sock, selectors.EVENT_READ, t)
                continue
            try:
                chunk = t.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            now = time.monotonic()
            if chunk:
                if t.answered_at is None:
                    t.answered_at = now
                if len(t.data) < t.limit:
                    t.data += chunk
                continue
            t.closed_at = now
            self.sel.unregister(t.sock)
            t.sock.close()
        if time.monotonic() >= self.next_trickle:
            for key in list(self.sel.get_map().values()):
                t = key.data
                if t.trickle and t.opened is not None:
                    try:
                        t.sock.send(b"a")
                        t.last_sent = time.monotonic()
                    except OSError:
                        pass
            self.next_trickle = time.monotonic() + self.trickle_every

    def run_until(self, until, also=None):
        """Polls until every connection is closed (and `also()` is false) or `until`."""
        while (self.sel.get_map() or (also and also())) and time.monotonic() < until:
            self.poll(0.02)

    def wait_connected(self, within=10.0):
        until = time.monotonic() + within
        while self.connecting and time.monotonic() < until:
            self.poll(0.02)

    def close(self):
        for key in list(self.sel.get_map().values()):  # still open at the end: closed by us
            self.sel.unregister(key.fileobj)
            key.fileobj.close()
        self.sel.close()


def max_concurrent(intervals):
    """The largest number of [start, end) intervals open at once."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def held(tracked, kinds, since="opened"):
    """Seconds each connection of `kinds` was held by the server (None: never closed)."""
    out = []
    for t in tracked:
        if t.kind in kinds:
            out.append(None if t.closed_at is None else t.closed_at - getattr(t, since))
    return out


def slow_client(port, payload, header_pieces, header_gap, body_pieces, body_gap, result, key):
    """A slow but legitimate client: headers and body in pieces, each gap under its timeout."""
    body = json.dumps(payload).encode()
    head = request_bytes("POST", "/invocations", b"", close=True, content_length=len(body))
    started = time.monotonic()
    try:
        conn = Conn(port, timeout=60)
        for i in range(header_pieces):
            conn.send(head[i * len(head) // header_pieces:(i + 1) * len(head) // header_pieces])
            if i + 1 < header_pieces:
                time.sleep(header_gap)
        for i in range(body_pieces):
            time.sleep(body_gap)
            conn.send(body[i * len(body) // body_pieces:(i + 1) * len(body) // body_pieces])
        response = conn.read_response()
        conn.close()
        result[key] = (response.status, time.monotonic() - started)
    except (OSError, EOFError, ValueError) as e:
        result[key] = (type(e).__name__, time.monotonic() - started)


def paced_connect(watcher, srv, plan, batch=100, within=1.5):
    """Opens `plan`'s connections (kind, first bytes, trickle) in batches, each once the server has
    accepted the one before: its listen backlog is 128, and a faster burst overflows it (the
    kernel then completes those handshakes 1, 2, 4 s later), which would blur every timing."""
    out = []
    for start in range(0, len(plan), batch):
        fds_before = open_fds(srv.proc.pid) or 0
        closed_before = sum(1 for t in out if t.closed_at is not None)
        size = len(plan[start:start + batch])
        for kind, first, trickle in plan[start:start + batch]:
            out.append(watcher.connect(srv.port, kind, first, trickle))
        watcher.wait_connected()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            watcher.poll(0.005)
            closed = sum(1 for t in out if t.closed_at is not None) - closed_before
            if (open_fds(srv.proc.pid) or 0) - fds_before + closed >= size - 2:
                break
    return out


def big_bodies_round(srv, cfg, sampler):
    """cfg.big_bodies connections each send 6 MiB - 1 of a 6 MiB body, then stall: 408 each."""
    bt, margin = cfg.body_timeout, cfg.timeout_margin
    before = srv.rss().get("rss_mib")
    start = time.monotonic()
    payload = memoryview(b" " * (MAX_BODY - 1))
    head = request_bytes("POST", "/invocations", b"", content_length=MAX_BODY)
    ready = queue.Queue()
    failed = collections.Counter()

    def sender(count):
        for _ in range(count):
            try:
                conn = Conn(srv.port, timeout=30)
                conn.send(head)
                conn.send(payload)
            except OSError as e:
                failed[type(e).__name__] += 1
                continue
            ready.put(Tracked(conn.sock, "big_body"))  # opened = last byte sent

    per = [cfg.big_bodies // 4 + (1 if i < cfg.big_bodies % 4 else 0) for i in range(4)]
    senders = [threading.Thread(target=sender, args=(c,), daemon=True) for c in per if c]
    for t in senders:
        t.start()
    watcher = Watcher()
    big = []
    until = time.monotonic() + 120

    def sending():
        while not ready.empty():
            big.append(watcher.add(ready.get()))
        return any(t.is_alive() for t in senders) or not ready.empty()

    watcher.run_until(until, also=sending)
    sent_all = time.monotonic()
    watcher.run_until(min(until, time.monotonic() + bt + margin + 5))
    watcher.close()
    time.sleep(1.0)
    after = srv.rss().get("rss_mib")
    window = sampler.between(start, time.monotonic())
    answers = collections.Counter(t.status() for t in big)
    waits = [t.answered_at - t.last_sent for t in big if t.answered_at]
    return {"connections": cfg.big_bodies, "bytes_each": MAX_BODY - 1, "send_failed": dict(failed),
            "send_seconds": round(sent_all - start, 2), "answers": {str(k): v for k, v in answers.items()},
            "answered_after_last_byte_s": summary(waits) if waits else None,
            "rss_before_mib": round(before, 1), "rss_peak_mib": window["rss_peak_mib"],
            "rss_after_mib": round(after, 1), "fds_peak": window["fds_peak"],
            "_answers": answers, "_waits": waits}


def phase_slow_idle(run, fig, srv, cfg, sampler):
    """Idle, kept-alive, slowloris and stalled-body clients within the cap; slow legitimate
    clients; a body dripped slower in total than the body timeout; 6 MiB bodies held open; then a
    flood of connections past the cap and its overflow pool."""
    ht, bt = cfg.header_timeout, cfg.body_timeout
    margin = cfg.timeout_margin
    fig["baseline_fds"] = cfg.baseline_fds
    # --- within the cap -------------------------------------------------------------------------
    sub = fig.setdefault("within_cap", {})
    results = {}
    slow_threads = []
    small = {"input": "Hi", "max_length": 8, "num_return_sequences": 1}
    for i in range(cfg.slow_legit):  # gaps of 0.3 x each timeout: slow, but within them
        slow_threads.append(threading.Thread(
            target=slow_client, daemon=True,
            args=(srv.port, small, 3, 0.3 * ht, 3, 0.3 * bt, results, f"slow-{i}")))
    drip_pieces = 6  # gaps of 0.6 x the body timeout: 3.6 body timeouts in all
    slow_threads.append(threading.Thread(
        target=slow_client, daemon=True,
        args=(srv.port, small, 1, 0, drip_pieces, 0.6 * bt, results, "drip")))
    watcher = Watcher(trickle_every=0.25)
    t0 = time.monotonic()
    stalled_head = request_bytes("POST", "/invocations", b"", content_length=1000) + b'{"input": '
    plan = ([("idle", b"", False)] * cfg.idle
            + [("slowloris", b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Slow: ", True)] * cfg.slowloris
            + [("stalled_body", stalled_head, False)] * cfg.stalled)
    tracked = paced_connect(watcher, srv, plan)
    for t in slow_threads:
        t.start()
    failed_connects = sum(1 for t in tracked if t.failed or t.opened is None)
    tracked = [t for t in tracked if t.opened is not None]
    for i in range(cfg.kept_alive):
        t = open_tracked(srv.port, "kept_alive")
        if t is None:
            failed_connects += 1
            continue
        t.sock.sendall(request_bytes("GET", "/ping", content_type=None))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = t.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        t.last_sent = time.monotonic()  # answered: the keep-alive wait starts now
        tracked.append(watcher.add(t))
        watcher.poll(0)
    sub["opened"] = dict(collections.Counter(t.kind for t in tracked))
    sub["open_seconds"] = round(time.monotonic() - t0, 2)
    sub["failed_connects"] = failed_connects
    watcher.run_until(time.monotonic() + 0.3)
    sub["server_fds_with_all_open"] = open_fds(srv.proc.pid)
    watcher.run_until(time.monotonic() + max(ht, bt) + margin + 2)
    watcher.close()
    for t in slow_threads:
        t.join(max(1.0, 4 * bt + ht + 10))
    run.check("all connections opened", failed_connects == 0, f"{sub['opened']} in {sub['open_seconds']} s")
    sub["held_s"] = {}
    for kind, since in [("idle", "opened"), ("kept_alive", "last_sent"), ("slowloris", "opened")]:
        values = held(tracked, (kind,), since)
        never = sum(1 for v in values if v is None)
        done = [v for v in values if v is not None]
        sub["held_s"][kind] = {"n": len(values), "never_closed": never,
                               "min": round(min(done), 2) if done else None,
                               "max": round(max(done), 2) if done else None}
        run.check(f"{kind} connections closed after the header timeout ({ht:g} s)",
                  never == 0 and done and max(done) <= ht + margin and min(done) >= ht - 0.3,
                  f"{len(done)}/{len(values)} closed after {sub['held_s'][kind]['min']}-"
                  f"{sub['held_s'][kind]['max']} s")
    stalled = [t for t in tracked if t.kind == "stalled_body"]
    answers = collections.Counter(t.status() for t in stalled)
    waits = [t.answered_at - t.last_sent for t in stalled if t.answered_at]
    sub["stalled_body"] = {"n": len(stalled), "answers": {str(k): v for k, v in answers.items()},
                           "answered_after_s": summary(waits) if waits else None}
    run.check(f"stalled bodies answered 408 after the body timeout ({bt:g} s)",
              answers.get(408, 0) == len(stalled) and waits and max(waits) <= bt + margin
              and min(waits) >= bt - 0.3,
              f"{dict(answers)} after {round(min(waits), 2) if waits else None}-"
              f"{round(max(waits), 2) if waits else None} s")
    slow = {k: v for k, v in results.items() if k.startswith("slow-")}
    sub["slow_legit"] = {"n": len(slow), "statuses": dict(collections.Counter(v[0] for v in slow.values())),
                         "seconds": summary([v[1] for v in slow.values()])}
    run.check("slow clients within the timeouts are served (200)",
              len(slow) == cfg.slow_legit and all(v[0] == 200 for v in slow.values()),
              f"{sub['slow_legit']['statuses']} in up to {sub['slow_legit']['seconds'].get('max')} s")
    drip = results.get("drip")
    sub["drip"] = {"status": drip[0] if drip else None, "seconds": round(drip[1], 2) if drip else None,
                   "gap_s": round(0.6 * bt, 2), "pieces": drip_pieces}
    # Documented semantics, recorded: the body timeout bounds each gap, not the whole body.
    run.check("a body dripped with gaps under the body timeout is read to the end (per-gap timeout)",
              drip is not None and drip[0] == 200,
              f"{drip[0] if drip else None} after {round(drip[1], 2) if drip else None} s "
              f"(body timeout {bt:g} s)")

    # --- a burst of connections at once (no pacing) ----------------------------------------------
    if cfg.burst:
        sub = fig.setdefault("accept_burst", {})
        watcher = Watcher()
        fds_before = open_fds(srv.proc.pid) or 0
        kernel_before = tcp_counters()
        start = time.monotonic()
        burst = [watcher.connect(srv.port, "burst") for _ in range(cfg.burst)]
        connected = time.monotonic()
        probe = {}
        threading.Thread(target=lambda: probe.update(ping=ping(srv.port, timeout=10)), daemon=True).start()
        accepted_at = None
        most = 0
        while time.monotonic() - start < 10:
            watcher.poll(0.005)
            closed = sum(1 for t in burst if t.closed_at is not None)
            most = max(most, (open_fds(srv.proc.pid) or 0) - fds_before + closed)
            if most >= cfg.burst - 2:
                accepted_at = time.monotonic() - start
                break
        watcher.run_until(time.monotonic() + ht + 5)
        watcher.close()
        cfg.overflow_windows.append((start, time.monotonic()))
        time.sleep(0.1)
        ping_status, ping_ms = probe.get("ping", (None, None))
        when = f"{ms(accepted_at)} ms" if accepted_at is not None else "more than 10 s"
        sub.update({"connections": cfg.burst, "connect_loop_ms": ms(connected - start),
                    "all_accepted_after_ms": ms(accepted_at) if accepted_at else None,
                    "accepted_within_10s": most, "fresh_ping_behind_the_burst": [ping_status, round(ping_ms or 0, 1)]})
        kernel_after = tcp_counters()
        sub["kernel"] = {k: kernel_after[k] - kernel_before.get(k, 0) for k in kernel_after}
        backlog = listen_backlog(srv.port)
        after_ping = ping_alive(srv.port)
        after_call = exchange(srv.port, invoke_bytes(SHORT), 60).status
        sub["listen_backlog"] = backlog
        sub["handshakes_done_by_end"] = sum(1 for t in burst if t.opened is not None)
        sub["after"] = {"ping": after_ping[0], "invocation": after_call}
        run.check(f"alive after a burst of {cfg.burst} connections at once (ping 200, invocation 200)",
                  after_ping[0] == 200 and after_call == 200,
                  f"ping {after_ping[0]}, invocation {after_call}; accepted {most}/{cfg.burst} within 10 s, "
                  f"all after {when} (listen backlog {backlog})")
        if accepted_at is None or accepted_at > 1.0 or (backlog is not None and backlog < 1024):
            run.finding(f"the listen backlog is {backlog}: a burst of connections overflows it (handshakes "
                        "dropped or left to SYN cookies; some clients wait for retransmits, some hold a "
                        "connection the server never accepted)",
                        f"{cfg.burst} connects in {sub['connect_loop_ms']} ms: the server had accepted "
                        f"{most} within 10 s (all after {when}); kernel counters "
                        f"over the burst: {sub['kernel']}")

    # --- 6 MiB bodies held open, in rounds (is their memory reused, or does it grow?) -------------
    if cfg.big_bodies:
        rounds = fig.setdefault("big_bodies", [])
        for _ in range(cfg.big_rounds):
            rounds.append(big_bodies_round(srv, cfg, sampler))
            r = rounds[-1]
            answers, waits = r.pop("_answers"), r.pop("_waits")
            run.check(f"{cfg.big_bodies} x (6 MiB - 1) bodies held open all get 408",
                      answers.get(408, 0) == cfg.big_bodies and waits and max(waits) <= bt + margin,
                      f"{dict(answers)} within {round(min(waits), 2) if waits else None}-"
                      f"{round(max(waits), 2) if waits else None} s of the last byte; RSS "
                      f"{r['rss_before_mib']} -> peak {r['rss_peak_mib']} -> {r['rss_after_mib']} MiB")
        first, last = rounds[0], rounds[-1]
        growth = max(0.0, (first["rss_peak_mib"] or 0) - first["rss_before_mib"])
        if last["rss_after_mib"] > first["rss_before_mib"] + 0.1 * growth + 64:
            run.finding("memory of request bodies is not returned to the OS after they are dropped",
                        f"{len(rounds)} round(s) of {cfg.big_bodies} x 6 MiB bodies held open: RSS "
                        + ", ".join(f"{r['rss_before_mib']:.0f} -> peak {r['rss_peak_mib']:.0f} -> "
                                    f"{r['rss_after_mib']:.0f}" for r in rounds)
                        + " MiB (each time after all were answered 408 and closed)")

    # --- a flood past the cap --------------------------------------------------------------------
    sub = fig.setdefault("flood", {})
    cap = cfg.max_connections
    watcher = Watcher()
    flood = []
    start = time.monotonic()

    def open_flood(count):
        flood.extend(paced_connect(watcher, srv, [("flood", b"", False)] * count))

    # Step 1: the regular slots (the pinger's kept-alive connection holds one) and a few more, on
    # the overflow pool.
    open_flood(cap + 4)
    watcher.run_until(time.monotonic() + 0.2)
    # A fresh /ping of the pinger may have held a regular slot when they filled, and freed it
    # since: top up, so that every regular slot is held by an idle client.
    open_flood(4)
    step1 = time.monotonic()
    overflow_pings = []
    for _ in range(10):
        overflow_pings.append(ping(srv.port))
        watcher.poll(0)
    sub["fresh_pings_with_regular_slots_full"] = {
        "ok": sum(1 for s, _ in overflow_pings if s == 200), "n": len(overflow_pings),
        "max_ms": round(max(m for _, m in overflow_pings), 1)}
    run.check("regular slots full: fresh /ping answered by the overflow pool",
              all(s == 200 for s, _ in overflow_pings), f"{sub['fresh_pings_with_regular_slots_full']}")
    refused = exchange(srv.port, invoke_bytes(SHORT), 10)
    run.check("regular slots full: an invocation gets 503 overloaded with Retry-After",
              refused.status == 503 and refused.header("retry-after") == "1"
              and refused.error_shape() == ("overloaded", True), f"{refused.status}")
    step2_begin = time.monotonic()
    open_flood(cfg.flood - cap - 8)  # step 2: the overflow pool and past it
    step2 = time.monotonic()
    watcher.run_until(time.monotonic() + 0.3)
    fds_flooded = open_fds(srv.proc.pid)
    past = []
    for _ in range(5):
        past.append(ping(srv.port))
        watcher.poll(0)
    sub["fresh_pings_with_overflow_full"] = {"ok": sum(1 for s, _ in past if s == 200), "n": len(past),
                                             "max_ms": round(max(m for _, m in past), 1)}
    run.check("overflow pool full of idle clients: a fresh /ping still answered (the oldest is evicted)",
              sub["fresh_pings_with_overflow_full"]["ok"] == len(past),
              f"{sub['fresh_pings_with_overflow_full']}")
    watcher.run_until(time.monotonic() + max(ht, OVERFLOW_HEADER_TIMEOUT) + margin + 2)
    watcher.close()
    cfg.overflow_windows.append((step2_begin, time.monotonic()))
    window = sampler.between(start, time.monotonic())
    failed_connects = collections.Counter(t.failed for t in flood if t.failed or t.opened is None)
    flood = [t for t in flood if t.opened is not None]
    values = [t.closed_at - t.opened if t.closed_at else None for t in flood]
    at_once = sum(1 for v in values if v is not None and v < 0.25)
    held_values = [v for v in values if v is not None and v >= 0.25]
    never = sum(1 for v in values if v is None)
    concurrent = max_concurrent([(t.opened, t.closed_at) for t in flood
                                 if t.closed_at and t.closed_at - t.opened >= 0.25])
    sub.update({"opened": len(flood), "failed_connects": dict(failed_connects),
                "connect_seconds": round(step2 - start, 2),
                "closed_at_once": at_once, "held": len(held_values), "held_at_once_max": concurrent,
                "never_closed": never, "held_max_s": round(max(held_values), 2) if held_values else None,
                "server_fds_flooded": fds_flooded, "server_fds_peak": window["fds_peak"],
                "rss_peak_mib": window["rss_peak_mib"]})
    # Client-side, a close is seen up to one poll of thousands of sockets after the server made
    # it, by which time the connection that evicted it (from the overflow pool) is open: the count
    # runs over by the evictions in flight, at most the pool (runs on the 2-vCPU EPYC saw 1,091 to
    # 1,131 with either of two builds). The server-side fd bound checked next is exact.
    run.check(f"{len(flood)} connections: the server holds at most the cap + overflow ({cap} + {OVERFLOW_POOL})",
              concurrent <= cap + 2 * OVERFLOW_POOL and at_once > 0,
              f"{concurrent} held at once as the client saw them (a pool's worth of evictions in "
              f"flight allowed), {at_once} closed at once")
    run.check("server fds stay bounded by the cap",
              (window["fds_peak"] or 0) <= cap + OVERFLOW_POOL + (cfg.baseline_fds or 64) + 16,
              f"peak {window['fds_peak']} fds (baseline {cfg.baseline_fds})")
    run.check("every flood connection closed within the timeouts", never == 0 and held_values
              and max(held_values) <= max(ht, OVERFLOW_HEADER_TIMEOUT) + margin,
              f"max held {sub['held_max_s']} s")
    after_ping = ping_alive(srv.port)
    after_call = exchange(srv.port, invoke_bytes(SHORT), 60).status
    sub["after"] = {"ping": after_ping[0], "invocation": after_call}
    run.check("alive after the flood", after_ping[0] == 200 and after_call == 200,
              f"ping {after_ping[0]} ({after_ping[1]:.1f} ms), invocation {after_call}")
    fig["flood_step_times"] = {"step1": step1, "step2": step2}


def phase_disconnects(run, fig, srv, cfg):
    """Fill the queue with long requests, drop them: the places and the work are freed."""
    q = cfg.queue_capacity
    baseline = []
    for _ in range(3):
        started = time.monotonic()
        exchange(srv.port, invoke_bytes(SHORT), 60)
        baseline.append((time.monotonic() - started) * 1000)
    since = time.monotonic()
    conns, kinds = [], []
    long_stream = {"input": "Hello", "mode": "sample", "num_return_sequences": 16, "max_length": 1024,
                   "stream": True}
    # A half-closed client (shutdown of its write side after the request) is documented as gone:
    # its request is dropped at once, 499.
    half = Conn(srv.port, timeout=60)
    half.send(invoke_bytes(LONG_BEAM))
    time.sleep(0.05)  # the request is read before the FIN arrives (see the finding below)
    half.sock.shutdown(socket.SHUT_WR)
    half_sent = time.monotonic()
    half_logged = None
    while time.monotonic() - half_sent < 5:
        if srv.count_logs(since, lambda line: line.get("status") == 499):
            half_logged = time.monotonic() - half_sent
            break
        time.sleep(0.01)
    half.close()
    run.check("a half-closed client is treated as gone (499 logged)", half_logged is not None,
              f"after {ms(half_logged) if half_logged is not None else None} ms")
    fig["half_closed_499_after_ms"] = ms(half_logged) if half_logged is not None else None
    # The same with the FIN right behind the request: is every such request still logged?
    since = time.monotonic()
    answered = 0
    for _ in range(cfg.half_close_burst):
        conn = Conn(srv.port, timeout=5)
        conn.send(invoke_bytes(LONG_BEAM))
        conn.sock.shutdown(socket.SHUT_WR)
        try:
            answered += bool(conn.sock.recv(1))
        except OSError:
            pass
        conn.close()
    time.sleep(0.5)
    logged = srv.count_logs(since, lambda line: line.get("request_id") and line.get("status"))
    fig["request_then_fin_at_once"] = {"sent": cfg.half_close_burst, "logged": logged, "answered": answered}
    run.check("a request followed at once by the client's FIN is still logged (499)",
              logged >= cfg.half_close_burst,
              f"{logged} of {cfg.half_close_burst} requests sent then shut down (SHUT_WR) at once logged")
    since = time.monotonic()
    # The streamed one goes first and has started when its first event arrives. Only then do the
    # plain ones follow: the q requests' rows (16 each) exceed --max-batch-rows (48), so the last to
    # arrive waits for a running one to end, and a stream that lost that race to the plain requests
    # (the server reads the connections concurrently) would send nothing until their deadline.
    first_event = None
    conn = Conn(srv.port, timeout=60)
    conn.send(invoke_bytes(long_stream))
    kinds.append("streamed")
    conns.append(conn)
    try:
        status, headers, _ = conn.read_head()
        while b"data: " not in conn.buf:
            conn._fill()
        first_event = status
    except (OSError, EOFError, ValueError):
        pass
    for _ in range(q - 1):
        conn = Conn(srv.port, timeout=60)
        conn.send(invoke_bytes(LONG_BEAM))
        kinds.append("plain")
        conns.append(conn)
    # The server reads and tokenizes connections concurrently: a probe sent at once could take the
    # last place before the last plain request does. Probe once /metrics counts all q admitted.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        values = metrics(srv.port)
        if values is None:  # a server without /metrics: give the plain requests a moment
            time.sleep(0.5)
            break
        if values.get("gpt2_queue_depth", 0) >= q:
            break
        time.sleep(0.02)
    full = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = exchange(srv.port, invoke_bytes(SHORT), 30).status
        if probe == 503:
            full = time.monotonic()
            break
        time.sleep(0.05)
    ended = [{k: line.get(k) for k in ("status", "error_type", "mode", "elapsed_ms") if k in line}
             for line in srv.logs(since) if line.get("status")]
    run.check("the queue filled with long requests (503 for the next)", full is not None,
              f"first event of the stream: {first_event}; requests ended meanwhile: {ended[:8]}")
    dropped = time.monotonic()
    for conn in conns:
        conn.close()
    freed, short_ms = None, None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        started = time.monotonic()
        status = exchange(srv.port, invoke_bytes(SHORT), 30).status
        if status == 200:
            freed = time.monotonic() - dropped
            short_ms = (time.monotonic() - started) * 1000
            break
        time.sleep(0.02)
    time.sleep(0.5)
    abandoned = srv.count_logs(since, lambda line: line.get("status") == 499
                               and line.get("error_type") == "client_disconnected")
    # Work freed, as the server counts it: nothing admitted, no KV reserved (where /metrics exists).
    gauges = None
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        values = metrics(srv.port)
        if values is None:
            break
        gauges = {k: values.get(k) for k in ("gpt2_queue_depth", "gpt2_kv_cache_reserved_bytes",
                                             "gpt2_running_requests")}
        if not gauges["gpt2_queue_depth"] and not gauges["gpt2_kv_cache_reserved_bytes"]:
            break
        time.sleep(0.05)
    fig["metrics_after_drop"] = gauges
    if gauges is not None:
        run.check("/metrics after the drop: queue depth 0, no KV reserved",
                  not gauges["gpt2_queue_depth"] and not gauges["gpt2_kv_cache_reserved_bytes"], f"{gauges}")
    # Work freed: 10 short requests run alone again (no 16-beam, 1024-token searches in the batch).
    after = []
    for _ in range(10):
        started = time.monotonic()
        exchange(srv.port, invoke_bytes(SHORT), 60)
        after.append((time.monotonic() - started) * 1000)
    fig.update({"long_requests": q, "kinds": collections.Counter(kinds),
                "freed_after_ms": ms(freed) if freed is not None else None,
                "first_short_ms": round(short_ms, 1) if short_ms else None,
                "short_ms_before": summary(baseline), "short_ms_after": summary(after),
                "logged_499": abandoned})
    run.check(f"a place frees at once after the drop (200 within {cfg.freed_within:g} s)",
              freed is not None and freed < cfg.freed_within, f"{fig['freed_after_ms']} ms")
    run.check(f"every dropped request logged 499 client_disconnected ({q})", abandoned >= q,
              f"{abandoned} lines")
    run.check("the work stopped: short requests as fast as before (p50 within 3x + 20 ms)",
              pct(after, 50) <= 3 * pct(baseline, 50) + 20,
              f"p50 {pct(baseline, 50)} ms before, {pct(after, 50)} ms after")


def phase_sigterm(run, fig, srv, cfg):
    """SIGTERM with requests in flight, idle and half-sent connections: in-flight requests finish
    with 200, the rest close at once, exit 0 within the grace period."""
    # Calibrate a request that runs about cfg.sigterm_request_s.
    started = time.monotonic()
    exchange(srv.port, invoke_bytes({"input": "Hello", "mode": "greedy", "max_new_tokens": 30,
                                     "num_return_sequences": 1}), 60)
    per_token = max(1e-4, (time.monotonic() - started) / 30)
    tokens = int(max(20, min(500, cfg.sigterm_request_s / per_token)))
    k = max(2, cfg.queue_capacity - 2)
    in_flight = []
    for i in range(k):
        payload = {"input": "Hello", "mode": "greedy" if i % 2 == 0 else "sample",
                   "max_new_tokens": tokens, "num_return_sequences": 1, "stream": i == 1}
        conn = Conn(srv.port, timeout=cfg.grace + 30)
        conn.send(invoke_bytes(payload))
        in_flight.append((conn, payload["stream"]))
    # Headers complete, body still arriving: in flight, so it is answered (408 after the body
    # timeout) before the server exits.
    body_in_progress = Conn(srv.port, timeout=cfg.grace + 30)
    body_in_progress.send(request_bytes("POST", "/invocations", b"", content_length=1000) + b'{"input": ')
    watcher = Watcher()
    idle = [watcher.connect(srv.port, "idle") for _ in range(cfg.sigterm_idle)]
    idle += [watcher.connect(srv.port, "half_sent", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Len")
             for _ in range(cfg.sigterm_idle // 2)]
    watcher.wait_connected()
    watcher.run_until(time.monotonic() + 0.3, also=lambda: True)
    idle = [t for t in idle if t.opened is not None]
    pid = srv.proc.pid
    term_at = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    # New connections are refused soon after. A probe whose handshake goes unanswered counts as
    # not accepted, after a short wait: with a 1 s wait, one such probe (seen once in a
    # fresh-clone run on a 2-vCPU Xeon) made the refusal read 1001 ms, and the idle connections'
    # closing, which the watcher only looks at after this loop, 1.004 s.
    refused_after, refused_how = None, None
    while time.monotonic() - term_at < 3:
        try:
            probe = socket.create_connection((LOOPBACK, srv.port), timeout=0.25)
            probe.close()
            time.sleep(0.01)
        except OSError as e:
            refused_after, refused_how = time.monotonic() - term_at, type(e).__name__
            break
    results = [None] * k

    def collect(i):
        conn, streamed = in_flight[i]
        try:
            response = conn.read_response()
            ok = response.status == 200
            if streamed:
                ok = ok and response.body.rstrip().endswith(b"data: [DONE]")
            else:
                ok = ok and json.loads(response.body)[0].startswith("Hello")
            results[i] = (response.status, ok, time.monotonic() - term_at)
        except (OSError, EOFError, ValueError) as e:
            results[i] = (type(e).__name__, False, time.monotonic() - term_at)
        finally:
            conn.close()

    progress = {}

    def collect_stalled():
        try:
            progress["status"] = body_in_progress.read_response().status
        except (OSError, EOFError, ValueError) as e:
            progress["status"] = type(e).__name__
        progress["s"] = time.monotonic() - term_at
        body_in_progress.close()

    collectors = [threading.Thread(target=collect, args=(i,), daemon=True) for i in range(k)]
    collectors.append(threading.Thread(target=collect_stalled, daemon=True))
    for t in collectors:
        t.start()
    watcher.run_until(term_at + 3)
    watcher.close()
    for t in collectors:
        t.join(cfg.grace + 15)
    try:
        code = srv.proc.wait(timeout=max(1.0, cfg.grace + 10 - (time.monotonic() - term_at)))
    except subprocess.TimeoutExpired:
        code = None
    exit_s = time.monotonic() - term_at
    idle_closed = [t.closed_at - term_at for t in idle if t.closed_at]
    time.sleep(0.2)
    logs = srv.logs()
    fig.update({
        "in_flight": k, "tokens_each": tokens, "answers": [r[0] if r else None for r in results],
        "answered_by_s": round(max(r[2] for r in results if r), 2) if any(results) else None,
        "exit_code": code, "exit_s": round(exit_s, 2), "grace_s": cfg.grace,
        "new_connections_refused_after_ms": ms(refused_after) if refused_after is not None else None,
        "new_connections_refused_by": refused_how,
        "idle_and_half_sent": len(idle), "idle_closed_max_s": round(max(idle_closed), 3) if idle_closed else None,
        "dropped_lines": sum(1 for line in logs if "grace period ended" in str(line.get("message"))),
        "body_in_progress": [progress.get("status"), round(progress.get("s", 0), 2)],
    })
    run.check(f"{k} in-flight requests finish with 200 (one streamed to [DONE])",
              all(r and r[1] for r in results), f"{fig['answers']} by {fig['answered_by_s']} s")
    run.check("exit code 0 within the grace period", code == 0 and exit_s <= cfg.grace,
              f"exit {code} after {exit_s:.2f} s (grace {cfg.grace} s)")
    run.check("no new connections after SIGTERM", refused_after is not None and refused_after < 1.0,
              f"refused after {fig['new_connections_refused_after_ms']} ms ({refused_how})")
    run.check("idle and half-sent connections closed at once", len(idle_closed) == len(idle)
              and (not idle_closed or max(idle_closed) < 1.0), f"{len(idle_closed)}/{len(idle)}, "
              f"max {fig['idle_closed_max_s']} s")
    run.check("no request dropped", fig["dropped_lines"] == 0, f"{fig['dropped_lines']} dropped lines")
    run.check("a body still arriving at SIGTERM gets 408 after the body timeout, then the server exits",
              progress.get("status") == 408 and progress.get("s", 99) <= cfg.body_timeout + cfg.timeout_margin
              and exit_s >= progress.get("s", 0) - 0.05,
              f"{progress.get('status')} after {round(progress.get('s', 0), 2)} s; exit after {exit_s:.2f} s")


def phase_kv_budget(run, fig, cfg):
    """The 16 x 1024-token probe against a small KV budget: a request that can never fit is a 422
    at once; requests that fit one at a time run one at a time (the others wait); RSS bounded."""
    big = {"input": "Hi", "mode": "sample", "num_return_sequences": 16, "max_length": 1024}
    # 1. How much KV one 16 x 1024 request needs: a server with a 1 MiB budget says, refusing it.
    probe = Server(cfg.server, ["--kv-budget-mb", "1", "--queue-capacity", "4"], cfg.model).start()
    try:
        started = time.monotonic()
        response = exchange(probe.port, invoke_bytes(big), 30)
        never_ms = ms(time.monotonic() - started)
        match = re.search(r"need ([0-9.]+) MiB", response.body.decode("utf-8", "replace"))
        need = float(match.group(1)) if match else None
    finally:
        probe.kill()
    fig.update({"need_16x1024_mib": need, "never_fits_status": response.status, "never_fits_ms": never_ms})
    run.check("16 x 1024 tokens over the budget: 422 at once naming max_length and --kv-budget-mb",
              response.status == 422 and need is not None and b"--kv-budget-mb" in response.body
              and never_ms < 1000, f"{response.status} in {never_ms} ms, needs {need} MiB")
    if need is None or cfg.quick:
        return
    # 2. A budget that holds one 16 x L request but not two (L = 128: each reserves need x L / 1024).
    length = cfg.kv_length
    each = need * length / 1024
    budget = max(1, int(each * 1.5))
    srv = Server(cfg.server, ["--kv-budget-mb", str(budget), "--queue-capacity", "16",
                              "--deadline-secs", str(cfg.kv_deadline), "--max-connections", "64"],
                 cfg.model).start()
    sampler = ProcSampler(srv.proc.pid)
    sampler.start()
    try:
        before = srv.rss().get("rss_mib")
        n = cfg.kv_requests
        request = invoke_bytes({"input": "Hi", "mode": "sample", "num_return_sequences": 16,
                                "max_length": length, "stream": True})
        conns = [Conn(srv.port, timeout=cfg.kv_deadline + 10) for _ in range(n)]
        for conn in conns:
            conn.send(request)
        outcome = [None] * n

        def read(i):
            try:
                status, headers, _ = conns[i].read_head()
                first = time.monotonic()
                conns[i].buf[:0] = b""
                if status == 200:
                    while b"data: [DONE]" not in conns[i].buf and b'"error_type"' not in conns[i].buf:
                        conns[i]._fill()
                outcome[i] = (status, first, time.monotonic(), b"data: [DONE]" in conns[i].buf)
            except (OSError, EOFError, ValueError) as e:
                outcome[i] = (type(e).__name__, None, time.monotonic(), False)
            finally:
                conns[i].close()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(cfg.kv_deadline + 15)
        sampler.stop_event.set()
        done = [o for o in outcome if o and o[0] == 200 and o[3]]
        # A request starts once the one before it released its reservation (its [DONE]).
        concurrent = max_concurrent([(first + 0.02, end) for _, first, end, _ in done])
        after_call = exchange(srv.port, invoke_bytes(SHORT), 30).status
        window = sampler.between(0, time.monotonic())
        fig.update({"budget_mib": budget, "request": f"16 x {length} tokens", "reserves_mib": round(each, 2),
                    "concurrent_streams": n,
                    "statuses": dict(collections.Counter(str(o[0]) if o else "none" for o in outcome)),
                    "completed": len(done), "running_at_once_max": concurrent,
                    "stream_seconds": summary([end - first for _, first, end, _ in done]),
                    "rss_before_mib": round(before, 1), "rss_peak_mib": window["rss_peak_mib"],
                    "after": after_call})
        run.check(f"of {n} concurrent 16 x {length} streams ({each:.1f} MiB each) under a {budget} MiB "
                  "budget, one runs at a time", budget >= each and budget < 2 * each and len(done) >= 2
                  and concurrent == 1 and all(o and (o[0] == 200 and o[3] or o[0] == 504) for o in outcome),
                  f"{fig['statuses']}, at most {concurrent} at once")
        run.check("alive after", after_call == 200, f"{after_call}")
    finally:
        sampler.stop_event.set()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(15)
        except subprocess.TimeoutExpired:
            srv.kill()


# ------------------------------------------------------------------------------------------------


def ping_report(run, samples, windows):
    """Per phase: the kept-alive and the fresh-connection /ping latencies and failures; fresh
    ones started while idle clients held every regular and overflow slot (`windows`, where a new
    connection evicts the oldest overflow one, and a flood of new ones can evict it in turn) are
    counted apart."""
    out = collections.OrderedDict()
    for name, phase in run.phases.items():
        if "end" not in phase or name in ("flags", "sigterm", "kv_budget"):
            continue
        row = {}
        for kind in ("persistent", "fresh"):
            mine = [s for s in samples if s[1] == kind and phase["start"] <= s[0] <= phase["end"]]
            if kind == "fresh":
                inside = [s for s in mine if any(a <= s[0] <= b for a, b in windows)]
                mine = [s for s in mine if not any(a <= s[0] <= b for a, b in windows)]
                row["fresh_while_cap_and_overflow_full"] = {
                    "n": len(inside), "ok": sum(1 for s in inside if s[3] == 200)}
            ok = [s[2] for s in mine if s[3] == 200]
            failed = collections.Counter(str(s[3]) for s in mine if s[3] != 200)
            row[kind] = {**summary(ok), "failed": dict(failed)}
            if kind == "fresh":  # a SYN retransmit: loopback port reuse against a TIME_WAIT, client-side
                row[kind]["connect_over_900ms"] = sum(1 for s in mine if s[4] >= 900)
        out[name] = row
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=os.path.join(REPO, "target", "release", "gpt2-server"),
                   help="the gpt2-server binary (default: target/release/gpt2-server)")
    p.add_argument("--model", help="model directory (default: the server's demo model)")
    p.add_argument("--quick", action="store_true", help="small counts and 1 s timeouts (about 20 s; what CI runs)")
    p.add_argument("--output", help="write the figures as JSON here")
    p.add_argument("--server-log", help="write the main server's log lines (JSON) here")
    p.add_argument("--time-limit", type=float, help="overall limit in seconds (default 300; quick 120)")
    p.add_argument("--ping-p99-ms", type=float,
                   help="limit for the kept-alive /ping p99 in every load phase (default 100; quick 500, "
                        "for the debug build on a busy CI machine)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: flags, overload, malformed, "
                   "edge, slow_idle, disconnects, sigterm, kv_budget")
    for name, what in [("malformed", "malformed requests"), ("idle", "idle connections within the cap"),
                       ("flood", "connections of the flood past the cap"), ("burst", "connections opened at once"),
                       ("big-bodies", "connections holding a 6 MiB body (0: none)")]:
        p.add_argument(f"--{name}", type=int, help=f"how many {what} (overrides the mode's default)")
    return p.parse_args(argv)


def config(args):
    quick = args.quick
    cfg = argparse.Namespace(
        server=os.path.abspath(args.server), model=args.model, quick=quick,
        queue_capacity=4 if quick else 8,
        header_timeout=1 if quick else 2, body_timeout=1 if quick else 2,
        max_connections=200 if quick else 1024, grace=10, deadline=30,
        overload_factor=10, overload_waves=1 if quick else 3, overload_length=10 if quick else 30,
        malformed=1000 if quick else 10_000, malformed_heavy=1 if quick else 10,
        malformed_workers=4, malformed_time=30 if quick else 90,
        idle=100 if quick else 800, kept_alive=10 if quick else 50,
        slowloris=10 if quick else 50, stalled=10 if quick else 50, slow_legit=2 if quick else 6,
        burst=400 if quick else 3000, half_close_burst=10 if quick else 20, big_bodies=3 if quick else 300,
        big_rounds=1 if quick else 2,
        flood=400 if quick else 5000,
        sigterm_idle=10 if quick else 50, sigterm_request_s=1.0 if quick else 2.0,
        kv_requests=4, kv_deadline=30, kv_length=128,
        timeout_margin=1.5 if quick else 1.0, freed_within=5.0 if quick else 1.0,
        time_limit=args.time_limit or (120.0 if quick else 300.0),
        ping_p99_ms=args.ping_p99_ms or (500.0 if quick else 100.0), skip=set(filter(None, args.skip.split(","))),
    )
    for name in ("malformed", "idle", "flood", "burst", "big_bodies"):
        if getattr(args, name) is not None:
            setattr(cfg, name, max(0, getattr(args, name)))
    cfg.flood = max(cfg.flood, cfg.max_connections + OVERFLOW_POOL + 16)
    return cfg


def raise_fd_limit(cfg):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(cfg.flood, cfg.burst, cfg.idle + cfg.slowloris + cfg.stalled + cfg.kept_alive) + 512
    target = need if hard == resource.RLIM_INFINITY else min(hard, max(soft, need))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:  # scale the connection counts to what this process may open
        scale = (target - 512) / (need - 512)
        cfg.flood = max(cfg.max_connections + OVERFLOW_POOL + 10, int(cfg.flood * scale))
        cfg.burst = int(cfg.burst * scale)
        cfg.idle = int(cfg.idle * scale)
    return {"soft_before": soft, "hard": hard, "now": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def tcp_counters():
    """The kernel's ListenOverflows, ListenDrops and SyncookiesSent (network-namespace wide)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(table[k]) for k in ("ListenOverflows", "ListenDrops", "SyncookiesSent")
                    if k in table}
    return {}


def listen_backlog(port):
    """The listen backlog of 127.0.0.1:port, from `ss -lnt` (its Send-Q), when ss is there."""
    try:
        out = subprocess.run(["ss", "-lntH", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=5).stdout.split()
        return int(out[2]) if len(out) > 2 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(run, report):
    print("\nphase         seconds  figures")
    for name, phase in run.phases.items():
        hidden = ("start", "end", "duration_s", "cases", "per_case", "flood_step_times")
        figures = {k: v for k, v in phase.items() if k not in hidden}
        text = json.dumps(figures, default=str)
        print(f"{name:<13} {phase.get('duration_s', 0):>7}  {text[:600]}{'...' if len(text) > 600 else ''}")
    print("\n/ping latency (ms) per phase: kept-alive connection | fresh connection")
    for name, row in report["ping"].items():
        p, f, full = row["persistent"], row["fresh"], row["fresh_while_cap_and_overflow_full"]
        print(f"  {name:<13} n={p['n']:<4} p50={p.get('p50')} p99={p.get('p99')} max={p.get('max')} "
              f"failed={p['failed']} | n={f['n']:<4} p50={f.get('p50')} p99={f.get('p99')} "
              f"max={f.get('max')} failed={f['failed']}"
              + (f" (+{full['n']} while every slot was held: {full['ok']} answered)" if full["n"] else ""))
    mem = report["memory"]
    print(f"\nmemory (RSS, MiB): before {mem.get('before_mib')}, peak {mem.get('peak_mib')}, "
          f"after {mem.get('after_mib')}")
    failed = [c for c in run.checks if not c["ok"]]
    print(f"\nchecks: {len(run.checks) - len(failed)}/{len(run.checks)} passed"
          + "".join(f"\n  FAIL [{c['phase']}] {c['check']}: {c['detail']}" for c in failed))
    print(f"findings (beyond the documented contract; they do not fail the run): {len(run.findings)}"
          + "".join(f"\n  [{f['phase']}] {f['finding']}: {f['detail']}" for f in run.findings))


def main(argv=None):
    try:
        return run_all(argv)
    except RuntimeError as e:  # the server did not start
        print(f"load_fault: {e}", file=sys.stderr)
        return 1
    finally:
        for child in _children:  # only the servers this script started, by their handles
            if child.poll() is None:
                child.kill()
                child.wait(10)


def run_all(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    cfg = config(args)
    if not os.access(cfg.server, os.X_OK):
        print(f"no server binary at {cfg.server}: build it with cargo build --release -p gpt2-server",
              file=sys.stderr)
        return 2
    fd_limits = raise_fd_limit(cfg)
    run = Run(cfg)

    def overrun():
        print(f"\nOVERRUN: the run exceeded --time-limit {cfg.time_limit:g} s; killing the servers",
              file=sys.stderr, flush=True)
        for child in _children:
            if child.poll() is None:
                child.kill()
        os._exit(3)

    watchdog = threading.Timer(cfg.time_limit, overrun)
    watchdog.daemon = True
    watchdog.start()
    kernel_start = tcp_counters()
    report = {"settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(cfg).items()},
              "environment": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                              "loadavg_at_start": os.getloadavg(), "fd_limits": fd_limits}}

    if "flags" not in cfg.skip:
        run_phase(run, "flags", phase_flags, cfg)

    server_args = ["--queue-capacity", str(cfg.queue_capacity), "--header-timeout-secs", str(cfg.header_timeout),
                   "--body-timeout-secs", str(cfg.body_timeout), "--max-connections", str(cfg.max_connections),
                   "--shutdown-grace-secs", str(cfg.grace), "--deadline-secs", str(cfg.deadline)]
    srv = Server(cfg.server, server_args, cfg.model).start()
    report["server"] = {"binary": cfg.server, "args": srv.args, "startup_s": round(srv.startup_s, 2),
                        "model_loaded": srv.info.get("model loaded"), "listening": srv.info.get("listening"),
                        "kv": srv.info.get("kv")}
    print(f"server pid {srv.proc.pid} on 127.0.0.1:{srv.port}, started in {srv.startup_s:.2f} s", flush=True)
    time.sleep(0.3)
    sampler = ProcSampler(srv.proc.pid)
    sampler.start()
    memory = {"before_mib": round(srv.rss().get("rss_mib", 0), 1)}
    cfg.baseline_fds = open_fds(srv.proc.pid)
    cfg.overflow_windows = []
    pinger = Pinger(srv.port, 0.05, cfg.time_limit)
    time.sleep(0.5)
    try:
        phases = [("overload", phase_overload, (srv, cfg)), ("malformed", phase_malformed, (srv, cfg)),
                  ("edge", phase_edge, (srv, cfg)), ("slow_idle", phase_slow_idle, (srv, cfg, sampler)),
                  ("disconnects", phase_disconnects, (srv, cfg))]
        for name, fn, fn_args in phases:
            if name not in cfg.skip:
                run_phase(run, name, fn, *fn_args)
        time.sleep(1.0)  # settle, then "after"
        status = srv.rss()
        memory["after_mib"] = round(status.get("rss_mib", 0), 1)
        memory["hwm_mib"] = round(status.get("hwm_mib", 0), 1)
        memory["peak_mib"] = round(max([memory["hwm_mib"]] + [r for _, r, _ in sampler.samples]), 1)
        memory["peak_fds"] = max([f for _, _, f in sampler.samples if f is not None] or [None])
        memory["threads"] = status.get("threads")
    finally:
        pings = pinger.stop()
    report["memory"] = memory
    report["ping"] = ping_report(run, pings["samples"], cfg.overflow_windows)
    report["ping_failures"] = [
        {"t": round(t - run.started, 3), "kind": kind, "error": str(status),
         "phase": next((n for n, p in run.phases.items() if p["start"] <= t <= p.get("end", 1e18)), None)}
        for t, kind, _, status, _ in pings["samples"] if status != 200][:50]
    report["ping_reconnects"] = pings["reconnects"]
    run.current = "memory"
    if memory["after_mib"] > memory["before_mib"] + 64:
        run.finding("RSS after the whole load stays above its start",
                    f"before {memory['before_mib']}, peak {memory['peak_mib']}, after {memory['after_mib']} MiB")
    run.current = "ping"
    for name, row in report["ping"].items():
        p = row["persistent"]
        run.check(f"/ping on a kept-alive connection during {name}: all 200, p99 < {cfg.ping_p99_ms:g} ms",
                  p["n"] > 0 and not p["failed"] and (p.get("p99") or 0) < cfg.ping_p99_ms,
                  f"n={p['n']} p50={p.get('p50')} p99={p.get('p99')} max={p.get('max')} failed={p['failed']}")
        f = row["fresh"]
        run.check(f"/ping on fresh connections during {name}: all 200, p99 < {cfg.ping_p99_ms:g} ms "
                  "(outside the spans where idle clients hold every regular and overflow slot)",
                  f["n"] > 0 and not f["failed"] and (f.get("p99") or 0) < cfg.ping_p99_ms,
                  f"n={f['n']} p50={f.get('p50')} p99={f.get('p99')} max={f.get('max')} failed={f['failed']}")
    if "sigterm" not in cfg.skip:
        run_phase(run, "sigterm", phase_sigterm, srv, cfg)
    sampler.stop_event.set()
    srv.kill()
    if args.server_log:
        with open(args.server_log, "w") as f:
            for line in srv.logs():
                f.write(json.dumps(line) + "\n")
    if "kv_budget" not in cfg.skip:
        run_phase(run, "kv_budget", phase_kv_budget, cfg)
    watchdog.cancel()

    report["phases"] = {name: {k: v for k, v in phase.items() if k not in ("start", "end")}
                        for name, phase in run.phases.items()}
    kernel_end = tcp_counters()
    report["kernel_tcp_counters_delta"] = {k: kernel_end[k] - kernel_start.get(k, 0) for k in kernel_end}
    report["checks"] = run.checks
    report["findings"] = run.findings
    report["ok"] = all(c["ok"] for c in run.checks)
    report["total_seconds"] = round(time.monotonic() - run.started, 1)
    print_table(run, report)
    print(f"\ntotal {report['total_seconds']} s: {'OK' if report['ok'] else 'FAILED'}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1, default=str)
            f.write("\n")
        print(f"figures written to {args.output}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
