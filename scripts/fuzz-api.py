#!/usr/bin/env python3
"""Bad input against a running dtm-rs: random and mutated requests to every HTTP route
and to JSON-RPC, with a branch simulator that answers at random. Passes when no request
got a 5xx or lost its connection, the server is still up, and its log has no panic.

Usage: fuzz-api.py --dtm PATH [--seed N] [--requests N]
It starts `dtm` itself on free ports with a fresh embedded store in a temporary
directory. Standard library only. Exit status 0 = passed, 1 = failed.
"""
import argparse
import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Branch(http.server.BaseHTTPRequestHandler):
    """A branch that answers SUCCESS, FAILURE, ONGOING, garbage or an error at random."""

    rng = random.Random(0)
    lock = threading.Lock()

    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        with Branch.lock:
            body = Branch.rng.choice([b'{"dtm_result":"SUCCESS"}', b'{"dtm_result":"FAILURE"}',
                                      b'{"dtm_result":"ONGOING"}', b"garbage", b""])
            code = Branch.rng.choice([200, 200, 200, 409, 425, 500])
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = answer

    def log_message(self, *args):
        pass


class Fuzz:
    def __init__(self, rng, busi):
        self.rng = rng
        self.busi = busi

    def weird(self):
        busi = self.busi
        return self.rng.choice([
            None, True, 0, -1, 2**63 - 1, -2**63, 2**63, 2**64, 1e308, 3.5, "", "10", "-5",
            "x" * self.rng.choice([1, 300, 70000]), [], {}, [1, "a"], {"a": {"b": [None]}},
            "\u0000", "é\u202e", "../../etc", "http://", "grpc://x", "127.0.0.1:1/x",
            busi + "/TransOut", {"bad\nname": "v"}, {"x-a": "v\r\nx-b: 1"},
        ])

    def mutate(self, v):
        if self.rng.random() < 0.15:
            return self.weird()
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if self.rng.random() >= 0.1:
                    out[k] = self.mutate(x)
            if self.rng.random() < 0.1:
                key = self.rng.choice(["gid", "trans_type", "steps", "branch_id", "op",
                                       "status", "branch_headers", "custom_data", "x"])
                out[key] = self.weird()
            return out
        if isinstance(v, list):
            out = [self.mutate(x) for x in v if self.rng.random() > 0.1]
            if self.rng.random() < 0.1:
                out.append(self.weird())
            return out
        return v

    def gid(self):
        return self.rng.choice(["g%d" % self.rng.randint(0, 50), "", "a b", "x" * 200,
                                "ü-gid", "g/1?x=2", "g%d" % self.rng.randint(0, 10**9)])

    def bodies(self):
        """(route, valid body) pairs for one gid."""
        b, g, r = self.busi, self.gid(), self.rng
        steps = [{"action": b + "/TransOut", "compensate": b + "/TransOutRevert"},
                 {"action": b + "/TransIn", "compensate": b + "/TransInRevert"}]
        saga = {
            "gid": g, "trans_type": "saga", "steps": steps, "payloads": ['{"a":1}', '{"a":2}'],
            "wait_result": r.choice([True, False]), "concurrent": r.choice([True, False]),
            "timeout_to_fail": r.choice([1, 100, 2**63 - 1]),
            "retry_interval": r.choice([1, 2**63 - 1, -2**63]),
            "request_timeout": r.choice([1, 0, -1, 2**63 - 1]),
            "retry_limit": r.choice([0, 1, -1, 2**63 - 1]),
            "custom_data": r.choice(["", '{"orders":{"1":[0]}}', "[1"]),
            "branch_headers": r.choice([{}, {"a": "b"}]),
            "passthrough_headers": r.choice([[], ["x-a"], ["bad header"]]),
        }
        msg = {"gid": g, "trans_type": "msg", "steps": steps[:1], "payloads": ["{}"],
               "query_prepared": b + "/QueryPrepared",
               "custom_data": r.choice(["", '{"delay":9223372036854775807}', '{"delay":-5}'])}
        return [
            ("submit", saga), ("prepare", msg), ("submit", msg),
            ("prepare", {"gid": g, "trans_type": r.choice(["tcc", "xa", "workflow"])}),
            ("registerBranch", {"gid": g, "branch_id": "01", "trans_type": "tcc",
                                "status": "prepared", "data": "{}", "confirm": b + "/C",
                                "cancel": b + "/X", "url": b + "/xa"}),
            ("abort", {"gid": g, "trans_type": r.choice(["tcc", "xa", "saga", "msg"])}),
            ("prepareWorkflow", {"gid": g, "trans_type": "workflow",
                                 "custom_data": '{"name":"wf","data":"e30="}'}),
            ("forceStop", {"gid": g}), ("resetNextCronTime", {"gid": g}),
            ("subscribe", {"topic": r.choice(["t", "", "t" * 300]), "url": b + "/sub",
                           "remark": "r"}),
            ("unsubscribe", {"topic": "t", "url": b + "/sub"}),
            ("submit", {"gid": g, "trans_type": "msg", "steps": [{"action": b + "/x"}],
                        "payloads": ["{}"], "topic": "t"}),
        ]

    def request(self):
        """(method, path, body bytes or None, content type or None)"""
        r = self.rng
        k = r.random()
        if k < 0.6:
            path, body = r.choice(self.bodies())
            if r.random() < 0.8:
                body = self.mutate(body)
            raw = json.dumps(body).encode()
            if r.random() < 0.05:
                raw = raw[: r.randint(0, len(raw))]
            if r.random() < 0.03:
                raw = b"\xff\xfe" + raw
            ctype = r.choice(["application/json"] * 8 + [None, "text/plain"])
            return "POST", "/api/dtmsvr/" + path, raw, ctype
        if k < 0.8:
            path = r.choice(["query", "all", "scanKV", "queryKV", "newGid", "version",
                             "resetCronTime", "subscribe", "unsubscribe"])
            params = r.choice(["", "?gid=" + self.gid(), "?limit=" + str(self.weird()),
                               "?status=submitted&limit=5", "?position=" + str(self.weird()),
                               "?cat=topics&limit=2", "?cat=&key=", "?limit=" + "9" * 25,
                               "?gid=%ff%fe", "?position=abc&limit=1",
                               "?timeout=" + str(2**63 - 1) + "&limit=3"])
            return "GET", "/api/dtmsvr/" + path + urllib.parse.quote(params, safe="?=&%"), None, None
        if k < 0.9:
            method = r.choice(["submit", "prepare", "abort", "newGid", "registerBranch",
                               "query", "nope", ""])
            params = self.mutate(r.choice(self.bodies())[1])
            call = {"jsonrpc": r.choice(["2.0", "1.0", None]), "id": self.weird(),
                    "method": method, "params": params}
            raw = json.dumps(call).encode()
            if r.random() < 0.1:
                raw = b"[" + raw + b"]"
            return "POST", "/api/json-rpc", raw, "application/json"
        return (r.choice(["DELETE", "PUT", "GET", "POST"]),
                r.choice(["/api/dtmsvr/topic/t", "/api/dtmsvr/topic/", "/api/dtmsvr/nope",
                          "/api/dtmsvr/submit", "/", "/api/metrics"]), b"{}", "application/json")


def send(base, method, path, data, ctype):
    req = urllib.request.Request(base + path, data=data, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError) as e:
        return -1, str(e).encode()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtm", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args()

    branch = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Branch)
    threading.Thread(target=branch.serve_forever, daemon=True).start()
    busi = "http://127.0.0.1:%d/api/busi" % branch.server_address[1]

    work = tempfile.mkdtemp(prefix="dtm-fuzz-")
    http_port, grpc_port = free_port(), free_port()
    env = dict(os.environ, HTTP_PORT=str(http_port), GRPC_PORT=str(grpc_port),
               STORE_DRIVER="sqlite", STORE_FILE=os.path.join(work, "dtm.sqlite"),
               LOG_LEVEL="warn", RETRY_INTERVAL="1", TRANS_CRON_INTERVAL="1")
    log_path = os.path.join(work, "dtm.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen([os.path.abspath(a.dtm)], env=env, cwd=work,
                                  stdout=log, stderr=subprocess.STDOUT)
    base = "http://127.0.0.1:%d" % http_port
    for _ in range(100):
        if send(base, "GET", "/api/ping", None, None)[0] == 200:
            break
        time.sleep(0.1)

    fuzz = Fuzz(random.Random(a.seed), busi)
    counts, bad, died = {}, [], False
    for _ in range(a.requests):
        method, path, data, ctype = fuzz.request()
        status, body = send(base, method, path, data, ctype)
        counts[status] = counts.get(status, 0) + 1
        if status >= 500 or status < 0:
            bad.append("%s %s -> %s %s" % (method, path[:80], status, body[:160]))
        if server.poll() is not None:
            died = True
            break
    time.sleep(2)  # let the retries of what was accepted run into the simulator
    alive = server.poll() is None
    server.terminate()
    server.wait(timeout=15)
    with open(log_path, errors="replace") as f:
        panics = [line.strip() for line in f if "panicked" in line]

    print("fuzz-api: seed %d, %d requests, statuses %s" % (a.seed, sum(counts.values()),
                                                         dict(sorted(counts.items()))))
    ok = not bad and alive and not died and not panics
    for line in sorted(set(bad))[:10]:
        print("FAIL 5xx or lost connection: " + line)
    if not alive or died:
        print("FAIL the server exited (log: %s)" % log_path)
    for line in panics[:5]:
        print("FAIL panic: " + line)
    if ok:
        print("ok fuzz-api: no 5xx, no panic, server up")
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
