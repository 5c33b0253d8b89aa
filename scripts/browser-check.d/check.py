#!/usr/bin/env python3
"""A real browser behind real load balancers (scripts/browser-check runs this).

A 3-node herald cluster on loopback, HAProxy (HTTP :8080, TCP :6390) and nginx (:8090) in front
of it with deploy/proxy/*, a test page served from another origin (:9100) in headless Chromium
that opens native EventSources (one per channel and the multi-channel form) and a native
WebSocket through each proxy, and publishers (POST /api/publish through each proxy, HPUBLISH
through HAProxy's TCP port, all with message ids) at a steady rate. Faults: kill -9 of the
node holding most of the browser's streams (restarted later), SIGTERM of the next busiest,
a rolling restart; then edge cases (a node starting, a node not in the cluster, a malformed
cursor, ?lastEventId=, a long idle period through the proxies). Checks that every stream got
every event of its channels exactly once and in order, and prints a summary; exits 1 on any
violation.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
PAGE_ORIGIN = "http://127.0.0.1:9100"
HAPROXY = "127.0.0.1:8080"
NGINX = "127.0.0.1:8090"
HAPROXY_RESP = 6390
CHANNELS = ["bc-a", "bc-b", "bc-c"]
RATE = 10.0  # events per second per channel

failures = []
notes = []


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}", flush=True)


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http_get(url, timeout=2.0, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace"), dict(e.headers)


def raw_head(port, path, origin=PAGE_ORIGIN, read_for=1.5):
    """GET `path` on 127.0.0.1:`port` over a raw socket: the status line, some headers and the
    first bytes of the body (an SSE stream never ends, so no HTTP client library)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    data = b""
    deadline = time.time() + read_for
    s.settimeout(0.2)
    while time.time() < deadline and len(data) < 4096:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            if b"\r\n\r\n" in data:
                break
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    status = lines[0] if lines and lines[0] else "(no answer)"
    return status, hdrs, body.decode("utf-8", "replace")


class Cluster:
    def __init__(self, binary, work):
        self.binary = binary
        self.work = work
        self.procs = {}
        self.tls = os.path.join(work, "tls")
        peers = ",".join(f"{i}@127.0.0.1:{7000 + i}" for i in (1, 2, 3))
        self.peers = peers

    def certs(self):
        subprocess.run([self.binary, "certs", "init", "--dir", self.tls], check=True,
                       stdout=subprocess.DEVNULL)
        for i in (1, 2, 3, 4):
            subprocess.run([self.binary, "certs", "issue", "--dir", self.tls, "--node-id", str(i)],
                           check=True, stdout=subprocess.DEVNULL)

    def start(self, i, peers=None):
        log = open(os.path.join(self.work, f"node-{i}.log"), "ab")
        args = [
            self.binary, "serve", "--node-id", str(i), "--tls-dir", self.tls,
            "--cluster-addr", f"127.0.0.1:{7000 + i}", "--peers", peers or self.peers,
            "--bootstrap-expect", "3",
            "--resp-addr", f"127.0.0.1:{6380 + i}", "--http-addr", f"127.0.0.1:{8000 + i}",
            "--data-dir", os.path.join(self.work, f"data-{i}"),
            "--cors-origins", PAGE_ORIGIN,
        ]
        self.procs[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[i]

    def ready(self, i):
        try:
            return http_get(f"http://127.0.0.1:{8000 + i}/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def wait_ready(self, nodes, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self.ready(i) for i in nodes):
                return True
            time.sleep(0.1)
        return False

    def signal(self, i, sig):
        p = self.procs[i]
        p.send_signal(sig)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            fail(f"node {i} did not exit within 20 s of signal {sig}")
            p.kill()
            p.wait()
        return p.returncode

    def stats(self, i):
        try:
            status, body, _ = http_get(f"http://127.0.0.1:{8000 + i}/api/realtime/stats", timeout=1)
            return json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return None

    def stop_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


class Publisher(threading.Thread):
    """Publishes `tick` events numbered 1, 2, ... on one channel at RATE per second, each with a
    message id, retrying a failed publish (same id) until it is acknowledged."""

    def __init__(self, channel, via, run):
        super().__init__(daemon=True)
        self.channel, self.via, self.run_id = channel, via, run
        self.acked = 0
        self.retries = 0
        self.errors = {}
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.resp = None
        self.sent_at = {}  # n -> ms, when the attempt that was acknowledged started

    def publish_once(self, n):
        payload = json.dumps({"type": "tick", "c": self.channel, "n": n}, separators=(",", ":"))
        mid = f"{self.run_id}-{self.channel}-{n}"
        if self.via.startswith("resp:"):
            if self.resp is None:
                port = int(self.via.split(":")[1])
                self.resp = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10,
                                        socket_connect_timeout=2)
            self.resp.execute_command("HPUBLISH", self.channel, payload, "ID", mid)
            return
        body = json.dumps({"channel": self.channel, "data": json.loads(payload), "messageId": mid})
        req = urllib.request.Request(f"http://{self.via}/api/publish", data=body.encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                raise RuntimeError(f"status {r.status}")

    def run(self):
        n = 0
        next_at = time.time()
        while not self.stopped.is_set():
            if self.paused.is_set():
                time.sleep(0.05)
                next_at = time.time()
                continue
            n += 1
            while True:
                try:
                    started = time.time() * 1000
                    self.publish_once(n)
                    self.sent_at[n] = started
                    break
                except Exception as e:  # noqa: BLE001 - any failure is retried with the same id
                    key = type(e).__name__ + ": " + str(e)[:80]
                    self.errors[key] = self.errors.get(key, 0) + 1
                    self.retries += 1
                    if self.resp is not None:
                        try:
                            self.resp.close()
                        except Exception:  # noqa: BLE001
                            pass
                        self.resp = None
                    time.sleep(0.2)
            self.acked = n
            next_at += 1.0 / RATE
            delay = next_at - time.time()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.time()


def start_proxies(work):
    """HAProxy and nginx with the configs of deploy/proxy/, paths made local."""
    procs = []
    hcfg = open(os.path.join(ROOT, "deploy", "proxy", "haproxy.cfg")).read()
    hcfg = hcfg.replace("/etc/haproxy/herald-sse-unavailable.http",
                        os.path.join(ROOT, "deploy", "proxy", "herald-sse-unavailable.http"))
    hpath = os.path.join(work, "haproxy.cfg")
    open(hpath, "w").write(hcfg)
    subprocess.run(["haproxy", "-c", "-q", "-f", hpath], check=True)
    hlog = open(os.path.join(work, "haproxy.log"), "ab")
    procs.append(subprocess.Popen(["haproxy", "-db", "-f", hpath], stdout=hlog,
                                  stderr=subprocess.STDOUT))
    ndir = os.path.join(work, "nginx")
    os.makedirs(os.path.join(ndir, "tmp"), exist_ok=True)
    include = os.path.join(ROOT, "deploy", "proxy", "nginx.conf")
    main = f"""
daemon off;
pid {ndir}/nginx.pid;
error_log {ndir}/error.log warn;
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    access_log {ndir}/access.log;
    client_body_temp_path {ndir}/tmp/body;
    proxy_temp_path {ndir}/tmp/proxy;
    fastcgi_temp_path {ndir}/tmp/fastcgi;
    uwsgi_temp_path {ndir}/tmp/uwsgi;
    scgi_temp_path {ndir}/tmp/scgi;
    include {include};
}}
"""
    npath = os.path.join(ndir, "nginx.conf")
    open(npath, "w").write(main)
    subprocess.run(["nginx", "-t", "-q", "-c", npath, "-p", ndir], check=True)
    procs.append(subprocess.Popen(["nginx", "-c", npath, "-p", ndir],
                                  stdout=open(os.path.join(ndir, "stdout.log"), "ab"),
                                  stderr=subprocess.STDOUT))
    deadline = time.time() + 10
    for port in (8080, 8090, HAPROXY_RESP):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"proxy port {port} not listening: see {work}/haproxy.log, "
                                       f"{ndir}/error.log")
                time.sleep(0.1)
    return procs


def start_browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--no-first-run", "--disable-background-networking"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=opts)


def streams_spec():
    specs = []
    for label, addr in (("haproxy", HAPROXY), ("nginx", NGINX)):
        for ch in CHANNELS:
            specs.append(("sse", f"{label}-{ch}", f"http://{addr}/api/stream/{ch}", [ch]))
        q = "&".join(f"channel={c}" for c in CHANNELS)
        specs.append(("sse", f"{label}-multi", f"http://{addr}/api/stream?{q}", CHANNELS))
        specs.append(("ws", f"{label}-ws", f"ws://{addr}/ws?userId=browser-{label}", CHANNELS))
    return specs


def browser_state(driver, since_events=0, since_log=0):
    return driver.execute_script(
        "return [hb.events.slice(arguments[0]), hb.log.slice(arguments[1])];",
        since_events, since_log)


class Recorder:
    """The page's events and log, read incrementally."""

    def __init__(self, driver):
        self.driver = driver
        self.events = []
        self.log = []

    def pull(self):
        ev, lg = browser_state(self.driver, len(self.events), len(self.log))
        self.events.extend(ev)
        self.log.extend(lg)


def busiest(cluster, nodes=(1, 2, 3)):
    """The node holding most of the browser's streams, from /api/realtime/stats."""
    counts = {}
    for i in nodes:
        s = cluster.stats(i)
        if s:
            counts[i] = s["sse"]["totalConnections"] + s["websocket"]["totalConnections"]
    if not counts:
        return nodes[0], counts
    return max(counts, key=lambda i: counts[i]), counts


def resume_times(rec, t0, t1, names):
    """Per stream that dropped between t0 (the fault) and t1: from the fault to its next
    `open`, and to the first event it received after the drop (what a user notices)."""
    out = {}
    for name in names:
        drop = next((e for e in rec.log if e["name"] == name and e["t"] >= t0 and e["t"] < t1
                     and e["what"] in ("error", "close", "reconnect")), None)
        if drop is None:
            continue
        op = next((e for e in rec.log if e["name"] == name and e["t"] > drop["t"]
                   and e["what"] == "open"), None)
        ev = next((e for e in rec.events if e["name"] == name and e["t"] > drop["t"]), None)
        out[name] = ((op["t"] - t0) if op else None, (ev["t"] - t0) if ev else None)
    return out


def check_delivery(rec, specs, publishers, extra_start=None):
    """Every stream got 1..acked of each of its channels, once each, in order."""
    results = {}
    acked = {p.channel: p.acked for p in publishers}
    for kind, name, _url, chans in specs:
        for ch in chans:
            got = [e["n"] for e in rec.events if e["name"] == name and e["ch"] == ch]
            first = (extra_start or {}).get(name, 1)
            want = acked[ch]
            seen = set()
            dups = 0
            disorder = 0
            prev = 0
            for n in got:
                if n in seen:
                    dups += 1
                seen.add(n)
                if n < prev:
                    disorder += 1
                prev = n
            lost = [n for n in range(first, want + 1) if n not in seen]
            early = [n for n in seen if n < first]
            results[(name, ch)] = dict(got=len(got), want=want - first + 1, lost=len(lost),
                                       dup=dups, disorder=disorder, early=len(early),
                                       lost_sample=lost[:5])
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--herald", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--idle", type=float, default=50.0,
                    help="seconds without events, longer than the proxies' read timeouts (45 s)")
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    run_id = f"bc{int(time.time())}"
    cluster = Cluster(os.path.abspath(args.herald), work)
    others = []
    driver = None
    publishers = []
    t_start = time.time()
    try:
        say("certificates, 3 nodes, proxies, page server")
        cluster.certs()
        for i in (1, 2, 3):
            cluster.start(i)
        others += start_proxies(work)
        others.append(subprocess.Popen(
            [sys.executable, "-m", "http.server", "9100", "--bind", "127.0.0.1",
             "--directory", HERE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if not cluster.wait_ready((1, 2, 3), 60):
            fail("cluster not ready within 60 s")
            return 1
        # The proxies' health checks take the nodes in (rise 2 x 1 s).
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                if http_get(f"http://{HAPROXY}/ready")[0] == 200 and \
                        http_get(f"http://{NGINX}/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        say(f"cluster ready in {time.time() - t_start:.1f} s; starting Chromium")
        driver = start_browser()
        driver.get(f"{PAGE_ORIGIN}/page.html")
        specs = streams_spec()
        for kind, name, url, chans in specs:
            if kind == "sse":
                driver.execute_script("hb.sse(arguments[0], arguments[1])", name, url)
            else:
                driver.execute_script("hb.ws(arguments[0], arguments[1], arguments[2])",
                                      name, url, chans)
        rec = Recorder(driver)
        deadline = time.time() + 20
        while time.time() < deadline:
            rec.pull()
            opened = {e["name"] for e in rec.log if e["what"] == "open"}
            if all(s[1] in opened for s in specs):
                break
            time.sleep(0.2)
        missing = [s[1] for s in specs if s[1] not in {e["name"] for e in rec.log
                                                      if e["what"] == "open"}]
        if missing:
            fail(f"streams never opened: {missing}")
        # WebSocket subscriptions are confirmed by a message; give them a moment.
        time.sleep(1.0)
        names = [s[1] for s in specs]

        vias = {"bc-a": HAPROXY, "bc-b": NGINX, "bc-c": f"resp:{HAPROXY_RESP}"}
        publishers = [Publisher(ch, vias[ch], run_id) for ch in CHANNELS]
        for p in publishers:
            p.start()
        say(f"publishing {RATE:.0f}/s on each of {CHANNELS} (bc-a POST via HAProxy, bc-b POST "
            "via nginx, bc-c HPUBLISH via HAProxy TCP), all with message ids")
        time.sleep(6)

        faults = []

        def fault(label, action):
            rec.pull()
            t0 = time.time() * 1000
            info = action()
            time.sleep(0.1)
            faults.append((label, t0, info))
            return t0

        # 1. kill -9 the node holding most streams; restart it 8 s later.
        victim, counts = busiest(cluster)
        say(f"kill -9 node {victim} (streams per node: {counts})")
        fault(f"kill -9 node {victim}", lambda: cluster.signal(victim, signal.SIGKILL))
        time.sleep(8)
        # While it starts: what a reconnect landing on it gets.
        cluster.start(victim)
        starting_answers = {}
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                st, hd, body = raw_head(8000 + victim, "/api/stream/bc-a", read_for=0.3)
            except OSError as e:
                st, hd, body = f"connect: {e.__class__.__name__}", {}, ""
            key = (st, hd.get("content-type"), hd.get("access-control-allow-origin"),
                   "reconnect" if "event: reconnect" in body else
                   ("a stream" if body else "no body"))
            starting_answers[key] = starting_answers.get(key, 0) + 1
            if cluster.ready(victim):
                break
            time.sleep(0.05)
        for (st, ct, acao, body), count in starting_answers.items():
            line = f"SSE on node {victim} while it restarts: {st} | {ct} | ACAO {acao} | {body} (x{count})"
            notes.append(line)
            print("  " + line)
            if st.startswith("HTTP/1.1 ") and not st.startswith("HTTP/1.1 200"):
                fail(f"a restarting node answered an SSE request {st}: EventSource gives up")
            if st.startswith("HTTP/1.1 200") and ct != "text/event-stream":
                fail(f"a restarting node answered SSE with content-type {ct}")
            if st.startswith("HTTP/1.1") and acao != PAGE_ORIGIN:
                fail(f"a restarting node's SSE answer {st} has no CORS header for the page")
        if not cluster.wait_ready((1, 2, 3), 60):
            fail(f"node {victim} not ready again within 60 s")
        time.sleep(5)

        # 2. SIGTERM (graceful: `event: reconnect`) the busiest node, restart it.
        victim, counts = busiest(cluster)
        say(f"SIGTERM node {victim} (streams per node: {counts})")
        fault(f"SIGTERM node {victim}", lambda: cluster.signal(victim, signal.SIGTERM))
        time.sleep(3)
        cluster.start(victim)
        if not cluster.wait_ready((1, 2, 3), 60):
            fail(f"node {victim} not ready again within 60 s")
        time.sleep(5)

        # 3. Rolling restart: each node SIGTERM, restart, ready, next.
        for i in (1, 2, 3):
            _, counts = busiest(cluster)
            say(f"rolling restart: node {i} (streams per node: {counts})")
            fault(f"rolling restart node {i}", lambda i=i: cluster.signal(i, signal.SIGTERM))
            cluster.start(i)
            if not cluster.wait_ready((1, 2, 3), 60):
                fail(f"node {i} not ready again within 60 s")
            time.sleep(4)
        rec.pull()

        # 4. Full outage: every node killed; the proxies answer SSE themselves ("reconnect"),
        # so no EventSource gives up; 6 s later all three come back.
        _, counts = busiest(cluster)
        say(f"full outage: kill -9 all three nodes for 6 s (streams per node: {counts})")

        def kill_all():
            for i in (1, 2, 3):
                cluster.procs[i].kill()
            for i in (1, 2, 3):
                cluster.procs[i].wait()

        fault("kill -9 all nodes", kill_all)
        time.sleep(6)
        for i in (1, 2, 3):
            cluster.start(i)
        if not cluster.wait_ready((1, 2, 3), 60):
            fail("the cluster was not ready again within 60 s of the outage")
        time.sleep(6)
        rec.pull()

        # 5. A node that is up but not in the cluster (node 4, never joined: /ready 503) and a
        # browser EventSource pointed straight at it: it must keep retrying, never give up.
        say("node 4, not a member: what an SSE request and a browser EventSource get")
        cluster.start(4, peers=cluster.peers + ",4@127.0.0.1:7004")
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if http_get("http://127.0.0.1:8004/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        time.sleep(1)
        st, hd, body = raw_head(8004, "/api/stream/bc-a")
        line = (f"SSE on a node not in the cluster: {st} | {hd.get('content-type')} | ACAO "
                f"{hd.get('access-control-allow-origin')} | {body.strip()[:160]!r}")
        notes.append(line)
        print("  " + line)
        driver.execute_script("hb.sse('node4', 'http://127.0.0.1:8004/api/stream/bc-a')")
        time.sleep(8)
        state4 = driver.execute_script("return hb.streams.node4.readyState")
        rec.pull()
        n4 = [e["what"] for e in rec.log if e["name"] == "node4"]
        line = (f"browser EventSource on node 4 for 8 s: {n4.count('open')} opens, "
                f"{n4.count('reconnect')} 'reconnect' events, {n4.count('error')} errors, "
                f"readyState {state4} (2 = gave up)")
        notes.append(line)
        print("  " + line)
        if state4 == 2:
            fail("a browser EventSource on a node that is not ready gave up for good")
        if n4.count("reconnect") == 0:
            fail("a browser EventSource on a node in no formed cluster sat there silently "
                 "(no event ever reaches that node; it must send the stream elsewhere)")
        driver.execute_script("hb.streams.node4.close()")
        cluster.signal(4, signal.SIGTERM)

        # 6. Edge cases from the page (CORS requests).
        say("edge cases: malformed Last-Event-ID, ?lastEventId=, CORS on errors")
        for addr in (HAPROXY, NGINX):
            r = driver.execute_async_script(
                "hb.probe(arguments[0]).then(arguments[arguments.length-1])",
                f"http://{addr}/api/stream/bc-a?lastEventId=not-a-cursor")
            line = f"fetch ?lastEventId=not-a-cursor via {addr}: {r}"
            notes.append(line)
            print("  " + line)
            if r.get("status") != 400:
                fail(f"malformed cursor via {addr}: expected a 400 the page can read, got {r}")
        driver.execute_script(
            "hb.sse('bad-cursor', 'http://127.0.0.1:8001/api/stream/bc-a?lastEventId=not-a-cursor')")
        # ?lastEventId= with the cursor of event k of bc-a: exactly k+1.. must follow.
        rec.pull()
        ref = [e for e in rec.events if e["name"] == "haproxy-bc-a"]
        if not ref:
            fail("haproxy-bc-a received nothing")
            return 1
        # 40 events back (4 s): within the default history_size of 100 per channel.
        k_event = ref[-40] if len(ref) > 40 else ref[0]
        resume_url = f"http://127.0.0.1:8002/api/stream/bc-a?lastEventId={k_event['id']}"
        driver.execute_script("hb.sse('query-resume', arguments[0])", resume_url)
        time.sleep(3)
        bad_state = driver.execute_script("return hb.streams['bad-cursor'].readyState")
        line = f"EventSource with a malformed ?lastEventId=: readyState {bad_state} (2: closed, as expected for a 400)"
        notes.append(line)
        print("  " + line)

        # 7. Idle longer than the proxies' read timeouts: the streams must stay up on keep-alives.
        say(f"idle {args.idle:.0f} s with no events (proxy read timeouts 45 s, keep-alive 15 s)")
        for p in publishers:
            p.paused.set()
        time.sleep(1.5)
        rec.pull()
        idle_t0 = time.time() * 1000
        time.sleep(args.idle)
        rec.pull()
        idle_drops = [e for e in rec.log if e["t"] >= idle_t0 and e["name"] in names
                      and e["what"] in ("error", "close", "reconnect")]
        line = f"idle {args.idle:.0f} s: {len(idle_drops)} stream drops"
        notes.append(line)
        print("  " + line)
        for e in idle_drops:
            fail(f"stream {e['name']} dropped during the idle period: {e}")
        for p in publishers:
            p.paused.clear()
        time.sleep(3)

        # Drain: stop publishing, wait until every stream has the last event of its channels.
        for p in publishers:
            p.stopped.set()
        for p in publishers:
            p.join(timeout=30)
        acked = {p.channel: p.acked for p in publishers}
        deadline = time.time() + 20
        while time.time() < deadline:
            rec.pull()
            done = True
            for _kind, name, _url, chans in specs:
                for ch in chans:
                    if not any(e["name"] == name and e["ch"] == ch and e["n"] == acked[ch]
                               for e in rec.events[-2000:]):
                        done = False
            if done:
                break
            time.sleep(0.5)
        rec.pull()

        # Verdict.
        say("results")
        all_specs = specs + [("sse", "query-resume", resume_url, ["bc-a"])]
        res = check_delivery(rec, all_specs, publishers,
                             extra_start={"query-resume": k_event["n"] + 1})
        total_got = sum(r["got"] for r in res.values())
        total_want = sum(r["want"] for r in res.values())
        print(f"  published (acknowledged): {acked}; publish retries: "
              f"{ {p.channel: p.retries for p in publishers} }")
        for p in publishers:
            if p.errors:
                print(f"    {p.channel} via {p.via} errors: {p.errors}")
        print(f"  {'stream':<22}{'channel':<8}{'want':>6}{'got':>6}{'lost':>6}{'dup':>5}{'order':>6}")
        for (name, ch), r in sorted(res.items()):
            print(f"  {name:<22}{ch:<8}{r['want']:>6}{r['got']:>6}{r['lost']:>6}{r['dup']:>5}"
                  f"{r['disorder']:>6}" + (f"  lost e.g. {r['lost_sample']}" if r["lost"] else ""))
            if r["lost"] or r["dup"] or r["disorder"] or r["early"]:
                fail(f"{name} {ch}: lost {r['lost']} dup {r['dup']} out of order "
                     f"{r['disorder']} before cursor {r['early']}")
        # Latency from the publish to the page, per proxy and kind: what a user sees when
        # nothing fails (events replayed after a fault, over 1 s late, are counted apart).
        sent = {p.channel: p.sent_at for p in publishers}
        print("  publish -> page latency (ms), events delivered live:")
        for group in ("haproxy SSE", "haproxy WebSocket", "nginx SSE", "nginx WebSocket"):
            proxy, kind = group.split()
            lat = sorted(e["t"] - sent[e["ch"]][e["n"]] for e in rec.events
                         if e["name"].startswith(proxy + "-") and (e["name"].endswith("-ws")
                                                                   == (kind == "WebSocket"))
                         and e["n"] in sent.get(e["ch"], {}))
            live = [x for x in lat if x < 1000]
            if live:
                print(f"    {group:<18} median {statistics.median(live):5.0f}  p99 "
                      f"{live[int(len(live) * 0.99) - 1]:5.0f}  ({len(lat) - len(live)} of "
                      f"{len(lat)} later than 1 s: replayed after a fault)")
        # Resume after each fault.
        print("  after each fault, for the streams that dropped (ms from the fault): open again;"
              " first event received again")
        for idx, (label, t0, _info) in enumerate(faults):
            t1 = faults[idx + 1][1] if idx + 1 < len(faults) else idle_t0
            rt = resume_times(rec, t0, t1, names)
            never = [n for n, v in rt.items() if v[1] is None]
            opens = sorted(v[0] for v in rt.values() if v[0] is not None)
            firsts = sorted(v[1] for v in rt.values() if v[1] is not None)
            line = f"    {label:<24} {len(rt):>2} dropped"
            if opens:
                line += f"; open median {statistics.median(opens):5.0f} max {max(opens):5.0f}"
            if firsts:
                line += f"; event median {statistics.median(firsts):5.0f} max {max(firsts):5.0f}"
            print(line + (f"; NEVER: {never}" if never else ""))
            for n in never:
                fail(f"{n} received nothing after {label}")
        # SSE reconnect delays: `error` to `open`, which the `retry:` field (3 s) sets.
        delays = []
        for name in names:
            evs = [e for e in rec.log if e["name"] == name]
            for a, b in zip(evs, evs[1:]):
                if a["what"] == "error" and b["what"] == "open" and "-ws" not in name:
                    delays.append(b["t"] - a["t"])
        if delays:
            delays.sort()
            print(f"  EventSource error -> open: n={len(delays)} min {delays[0]:.0f} median "
                  f"{statistics.median(delays):.0f} max {delays[-1]:.0f} ms (retry: 3000)")
        closed = driver.execute_script(
            "return Object.entries(hb.streams).filter(([k,v]) => v.readyState === 2)"
            ".map(([k]) => k)")
        gaveup = [n for n in closed if n in names]
        if gaveup:
            fail(f"EventSources that gave up for good (readyState CLOSED): {gaveup}")
        kinds = {}
        for e in rec.log:
            if e["name"] in names:
                kinds[e["what"]] = kinds.get(e["what"], 0) + 1
        print(f"  page log: {kinds}")
        for e in rec.log:
            if e["what"] in ("gap", "error") and e.get("data"):
                print(f"    {e['name']} {e['what']}: {e['data'][:200]}")
                if e["what"] == "gap":
                    fail(f"{e['name']} got a gap notice: {e['data'][:200]}")
        reasons = {}
        for e in rec.log:
            if e["what"] == "reconnect":
                r = json.loads(e["data"]).get("reason", "?")
                reasons[r] = reasons.get(r, 0) + 1
            if e["what"] == "close":
                r = f"WebSocket close {e.get('code')}: {e.get('reason') or '(no reason)'}"
                reasons[r] = reasons.get(r, 0) + 1
        print("  what the streams were told when they ended:")
        for r, c in sorted(reasons.items(), key=lambda x: -x[1]):
            print(f"    {c:>3} x {r[:150]}")
        console = driver.get_log("browser")
        cors = [c for c in console if "CORS" in c.get("message", "")
                or "Access-Control" in c.get("message", "")]
        print(f"  browser console: {len(console)} entries, {len(cors)} about CORS")
        for c in console[:15]:
            print(f"    {c['level']}: {c['message'][:220]}")
        for c in cors:
            if "not-a-cursor" not in c["message"]:
                fail(f"CORS error in the console: {c['message'][:200]}")
        print(f"  total: {total_got} events received of {total_want} expected, "
              f"{len(failures)} failures, {time.time() - t_start:.0f} s")
    finally:
        for p in publishers:
            p.stopped.set()
        if driver is not None:
            try:
                driver.quit()
            except Exception:  # noqa: BLE001
                pass
        cluster.stop_all()
        for p in others:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
    if failures:
        print(f"browser-check: FAILED ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("browser-check: PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
