"""dtm's own Python client (the `dtmcli` package from PyPI) against a running dtm-rs.

Run by scripts/compat-python.sh. Every flow goes through dtmcli's public API; a small
business service in this file answers the branch calls and records them, and each flow
checks the final status the server reports and which branch URLs it called, with which
query parameters, in which order. The barrier flows use dtmcli's own barrier against
MariaDB (database dtm_barrier) when it is reachable.
"""
import contextlib
import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import requests
from dtmcli import barrier, msg, saga, tcc, utils

DTM = os.environ["DTM_URL"].rstrip("/") + "/api/dtmsvr"
CALLS = []
LOCK = threading.Lock()
MYSQL = None


def mysql_cursor():
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=False)
    return conn.cursor()


class Busi(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, code, result):
        body = json.dumps({"dtm_result": result}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        url = urlparse(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode() if n else ""
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        name = url.path.rsplit("/", 1)[-1]
        with LOCK:
            CALLS.append((name, q, body))
        if name == "QueryPreparedBarrier":
            bb = barrier.BranchBarrier(q["trans_type"], q["gid"], q["branch_id"], q["op"])
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # dtmcli prints its SQL
                    bb.query_prepared(mysql_cursor())
            except utils.DTMFailureError:
                return self.answer(409, "FAILURE")
            return self.answer(200, "SUCCESS")
        if name.endswith("Fail"):
            return self.answer(409, "FAILURE")
        return self.answer(200, "SUCCESS")

    do_GET = handle_any
    do_POST = handle_any


def calls_of(gid):
    with LOCK:
        return [(n, q.get("op"), q.get("branch_id")) for n, q, _ in CALLS if q.get("gid") == gid]


def params_of(gid):
    with LOCK:
        return [q for _, q, _ in CALLS if q.get("gid") == gid]


def query(gid):
    r = requests.get(DTM + "/query", params={"gid": gid}, timeout=5)
    r.raise_for_status()
    return r.json()


def wait_status(gid, want, seconds=30):
    deadline = time.time() + seconds
    got = None
    while time.time() < deadline:
        t = query(gid).get("transaction") or {}
        got = t.get("status")
        if got == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"{gid}: status {got!r}, wanted {want!r}")


def expect(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, wanted {want!r}")


FAILED = []


def flow(fn):
    try:
        fn()
        print(f"ok    {fn.__name__}")
    except Exception as e:  # report every flow, then fail
        FAILED.append(fn.__name__)
        print(f"FAIL  {fn.__name__}: {e!r}")
    return fn


def main():
    global B
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Busi)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    B = f"http://127.0.0.1:{srv.server_address[1]}/api/busi"

    @flow
    def saga_commits_in_order():
        gid = utils.gen_gid(DTM)
        s = saga.Saga(DTM, gid)
        s.add({"amount": 30}, B + "/TransOut", B + "/TransOutRevert")
        s.add({"amount": 30}, B + "/TransIn", B + "/TransInRevert")
        s.submit()
        wait_status(gid, "succeed")
        expect("calls", calls_of(gid), [("TransOut", "action", "01"), ("TransIn", "action", "02")])
        for q in params_of(gid):
            expect("trans_type", q.get("trans_type"), "saga")
        with LOCK:
            body = [b for n, q, b in CALLS if q.get("gid") == gid][0]
        expect("payload", json.loads(body), {"amount": 30})
        b = query(gid)["branches"]
        expect("stored branches", [(x["branch_id"], x["op"], x["status"]) for x in b], [
            ("01", "compensate", "prepared"), ("01", "action", "succeed"),
            ("02", "compensate", "prepared"), ("02", "action", "succeed")])

    @flow
    def saga_failure_compensates_in_reverse():
        gid = utils.gen_gid(DTM)
        s = saga.Saga(DTM, gid)
        s.add({}, B + "/TransOut", B + "/TransOutRevert")
        s.add({}, B + "/TransInFail", B + "/TransInRevert")
        s.submit()
        wait_status(gid, "failed")
        expect("calls", calls_of(gid), [
            ("TransOut", "action", "01"), ("TransInFail", "action", "02"),
            ("TransInRevert", "compensate", "02"), ("TransOutRevert", "compensate", "01")])

    @flow
    def saga_wait_result_is_final_on_return():
        gid = utils.gen_gid(DTM)
        s = saga.Saga(DTM, gid).add({}, B + "/TransOut", B + "/TransOutRevert")
        s.trans_base.wait_result = True
        s.submit()
        expect("status right after submit", query(gid)["transaction"]["status"], "succeed")

    @flow
    def tcc_confirms():
        gid = utils.gen_gid(DTM)

        def body(t):
            t.call_branch({"a": 1}, B + "/TransOutTry", B + "/TransOutConfirm", B + "/TransOutCancel")
            t.call_branch({"a": 1}, B + "/TransInTry", B + "/TransInConfirm", B + "/TransInCancel")

        expect("gid", tcc.tcc_global_transaction(DTM, gid, body), gid)
        wait_status(gid, "succeed")
        got = calls_of(gid)
        expect("tries", got[:2], [("TransOutTry", "try", "01"), ("TransInTry", "try", "02")])
        expect("confirms", sorted(got[2:]), [("TransInConfirm", "confirm", "02"), ("TransOutConfirm", "confirm", "01")])

    @flow
    def tcc_failed_try_cancels():
        gid = utils.gen_gid(DTM)

        def body(t):
            t.call_branch({}, B + "/TransOutTry", B + "/TransOutConfirm", B + "/TransOutCancel")
            t.call_branch({}, B + "/TransInTryFail", B + "/TransInConfirm", B + "/TransInCancel")

        with contextlib.redirect_stderr(io.StringIO()):  # dtmcli prints the try's failure
            expect("result", tcc.tcc_global_transaction(DTM, gid, body), "")
        wait_status(gid, "failed")
        got = calls_of(gid)
        expect("tries", got[:2], [("TransOutTry", "try", "01"), ("TransInTryFail", "try", "02")])
        expect("cancels", sorted(got[2:]), [("TransInCancel", "cancel", "02"), ("TransOutCancel", "cancel", "01")])

    @flow
    def msg_prepare_submit():
        gid = utils.gen_gid(DTM)
        m = msg.Msg(DTM, gid).add({"a": 1}, B + "/TransOut").add({"a": 1}, B + "/TransIn")
        m.prepare(B + "/QueryPrepared")
        expect("status after prepare", query(gid)["transaction"]["status"], "prepared")
        m.submit()
        wait_status(gid, "succeed")
        expect("calls", calls_of(gid), [("TransOut", "action", "01"), ("TransIn", "action", "02")])

    @flow
    def msg_do_and_submit():
        gid = utils.gen_gid(DTM)
        m = msg.Msg(DTM, gid).add({}, B + "/TransOut")
        m.do_and_submit(B + "/QueryPrepared", lambda bb: None)
        wait_status(gid, "succeed")
        expect("calls", calls_of(gid), [("TransOut", "action", "01")])

    if MYSQL:
        @flow
        def msg_back_check_finds_the_committed_barrier():
            # the local transaction committed (its msg barrier row is there), then the
            # process "crashed" before submit: the server asks QueryPrepared and goes on
            gid = utils.gen_gid(DTM)
            m = msg.Msg(DTM, gid).add({}, B + "/TransOut")
            m.trans_base.timeout_to_fail = 1
            m.prepare(B + "/QueryPreparedBarrier")
            bb = barrier.BranchBarrier("msg", gid, "00", "msg")
            with contextlib.redirect_stdout(io.StringIO()):
                bb.call(mysql_cursor(), lambda cur: None)
            wait_status(gid, "succeed")
            expect("calls", calls_of(gid), [("QueryPreparedBarrier", "msg", "00"), ("TransOut", "action", "01")])

        @flow
        def msg_back_check_rolls_back_without_the_barrier():
            # the local transaction never committed: the back-check inserts the rollback
            # barrier, answers FAILURE, and the msg fails without calling its action
            gid = utils.gen_gid(DTM)
            m = msg.Msg(DTM, gid).add({}, B + "/TransOut")
            m.trans_base.timeout_to_fail = 1
            m.prepare(B + "/QueryPreparedBarrier")
            wait_status(gid, "failed")
            expect("calls", calls_of(gid), [("QueryPreparedBarrier", "msg", "00")])
    else:
        print("skip  barrier flows: MariaDB on 127.0.0.1:3306 not reachable")

    if FAILED:
        print(f"{len(FAILED)} flow(s) failed: {', '.join(FAILED)}")
        return 1
    print("all flows passed")
    return 0


if __name__ == "__main__":
    try:
        c = mysql_cursor()
        c.execute("CREATE DATABASE IF NOT EXISTS dtm_barrier")
        c.execute(
            "CREATE TABLE IF NOT EXISTS dtm_barrier.barrier ("
            " id BIGINT AUTO_INCREMENT PRIMARY KEY, trans_type VARCHAR(45) DEFAULT '',"
            " gid VARCHAR(128) DEFAULT '', branch_id VARCHAR(128) DEFAULT '',"
            " op VARCHAR(45) DEFAULT '', barrier_id VARCHAR(45) DEFAULT '',"
            " reason VARCHAR(45) DEFAULT '', create_time DATETIME DEFAULT NOW(),"
            " update_time DATETIME DEFAULT NOW(), UNIQUE KEY (gid, branch_id, op, barrier_id))"
        )
        c.connection.commit()
        c.connection.close()
        MYSQL = True
    except Exception as e:  # no MariaDB: the barrier flows are skipped, and say so
        print(f"note  MariaDB not usable ({e})")
    sys.exit(main())
