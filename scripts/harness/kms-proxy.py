#!/usr/bin/env python3
"""HTTP proxy between an AWS SDK and moto_server for KMS tests (stdlib only).

Why: moto 5.x does not enforce key state (a disabled or pending-deletion key
still decrypts), and it cannot inject faults. This proxy forwards every
request to moto and

  * tracks key state from DisableKey / EnableKey / ScheduleKeyDeletion /
    CancelKeyDeletion and answers cryptographic calls on such keys with the
    errors real KMS gives (DisabledException, KMSInvalidStateException);
  * offers a control API under /__proxy/ (GET or POST, query parameters):

      GET  /__proxy/health                      -> {"ok": true}
      POST /__proxy/latency?ms=N                added delay before every KMS call
      POST /__proxy/throttle?count=N[&op=OP][&key=ID]
                                                next N matching calls get HTTP 400
                                                ThrottlingException (not forwarded)
      POST /__proxy/error5xx?count=N[&status=500][&op=OP][&key=ID]
                                                next N matching calls get HTTP 5xx
                                                KMSInternalException (not forwarded)
      GET  /__proxy/counts[?key=ID]             per-operation call counts (JSON),
                                                all calls or those on one key
      POST /__proxy/reset-counts                zero the counts
      POST /__proxy/down?on=1|0[&key=ID]        outage: while on, every KMS call (on
                                                key ID only, if given; a Decrypt that
                                                names no key by the key moto finds) is
                                                read, counted and answered by a
                                                connection reset (no response), as when
                                                KMS is unreachable; on=0 without key
                                                ends every outage
      POST /__proxy/clear-faults                latency 0, pending faults dropped, up
      POST /__proxy/reset                       both of the above
      GET  /__proxy/keys                        tracked key states

    OP is the operation name from X-Amz-Target (TrentService.Decrypt ->
    Decrypt); ID is a key ID or key ARN. Counts include injected responses,
    so a call retried twice counts three times.

Usage: kms-proxy.py --upstream http://127.0.0.1:PORT [--port N] [--port-file F]
"""

import argparse
import http.client
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JSON_TYPE = "application/x-amz-json-1.1"
CRYPTO_OPS = {
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "Decrypt",
    "Encrypt",
    "ReEncrypt",
}
STATE_OPS = {"DisableKey", "EnableKey", "ScheduleKeyDeletion", "CancelKeyDeletion"}
# Headers that describe one hop, not the message; never forwarded.
HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


class State:
    def __init__(self, upstream):
        u = urllib.parse.urlsplit(upstream)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.lock = threading.Lock()
        self.key_state = {}  # raw key id -> "Disabled" | "PendingDeletion"
        self.arns = {}  # raw key id -> key ARN, learned from traffic
        self.clear_faults()
        self.reset_counts()

    def clear_faults(self):
        self.latency_ms = 0
        self.faults = []  # dicts: kind, count, op, key, status
        self.down = False
        self.down_keys = set()  # raw key ids whose calls fail as if KMS were down

    def reset_counts(self):
        self.counts = {}
        self.counts_by_key = {}


def raw_key_id(ref):
    """Key ID from a key ID or key ARN; None for aliases and junk."""
    if not isinstance(ref, str) or not ref:
        return None
    if ref.startswith("arn:"):
        return ref.split(":key/", 1)[1] if ":key/" in ref else None
    if ref.startswith("alias/"):
        return None
    return ref


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kms-proxy"
    verbose = False
    state = None  # set in main()

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("kms-proxy: " + (fmt % args) + "\n")

    # -- plumbing -------------------------------------------------------

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status, body, ctype=JSON_TYPE, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status, obj, ctype="application/json"):
        self._send(status, json.dumps(obj, sort_keys=True).encode(), ctype)

    def _kms_error(self, status, type_, message):
        self._send(status, json.dumps({"__type": type_, "message": message}).encode(),
                   extra=[("x-amzn-ErrorType", type_)])

    def _upstream(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.state.host, self.state.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _fwd_headers(self, body):
        # Host is kept as sent: it is part of the SigV4 signature.
        h = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        h["Content-Length"] = str(len(body))
        return h

    def _kms_call(self, op, payload):
        """A side call to moto (not counted), signed-looking like the request."""
        body = json.dumps(payload).encode()
        h = self._fwd_headers(body)
        for k in list(h):
            if k.lower() == "x-amz-target":
                del h[k]
        h["X-Amz-Target"] = "TrentService." + op
        status, _, data = self._upstream("POST", "/", h, body)
        if status != 200:
            return None
        try:
            return json.loads(data or b"null")
        except ValueError:
            return None

    def _resolve(self, ref):
        """Raw key ID for any reference; aliases are asked of moto."""
        kid = raw_key_id(ref)
        if kid is not None or not isinstance(ref, str) or not ref:
            return kid
        out = self._kms_call("DescribeKey", {"KeyId": ref})
        meta = (out or {}).get("KeyMetadata") or {}
        kid = meta.get("KeyId")
        if kid and meta.get("Arn"):
            with self.state.lock:
                self.state.arns[kid] = meta["Arn"]
        return kid

    def _arn(self, kid):
        with self.state.lock:
            arn = self.state.arns.get(kid)
        if arn:
            return arn
        out = self._kms_call("DescribeKey", {"KeyId": kid})
        arn = ((out or {}).get("KeyMetadata") or {}).get("Arn") or kid
        with self.state.lock:
            self.state.arns[kid] = arn
        return arn

    def _learn_arns(self, obj):
        if not isinstance(obj, dict):
            return
        found = [obj.get("KeyId"), obj.get("SourceKeyId"),
                 (obj.get("KeyMetadata") or {}).get("Arn")]
        with self.state.lock:
            for a in found:
                kid = raw_key_id(a)
                if kid and isinstance(a, str) and a.startswith("arn:"):
                    self.state.arns[kid] = a

    # -- control API ----------------------------------------------------

    def _control(self):
        u = urllib.parse.urlsplit(self.path)
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}
        what = u.path[len("/__proxy/"):].strip("/")
        st = self.state
        self._body()  # drain, so keep-alive stays in sync
        try:
            if what == "health":
                return self._send_json(200, {"ok": True})
            if what == "latency":
                with st.lock:
                    if "ms" in q:
                        st.latency_ms = max(0, int(q["ms"]))
                    return self._send_json(200, {"latency_ms": st.latency_ms})
            if what in ("throttle", "error5xx"):
                fault = {
                    "kind": what,
                    "count": max(0, int(q.get("count", "1"))),
                    "op": q.get("op"),
                    "key": raw_key_id(q["key"]) if q.get("key") else None,
                    "status": int(q.get("status", "500")),
                }
                if what == "error5xx" and not 500 <= fault["status"] <= 599:
                    return self._send_json(400, {"error": "status must be 5xx"})
                with st.lock:
                    st.faults.append(fault)
                    return self._send_json(200, {"pending": st.faults})
            if what == "down":
                on = q.get("on", "1") not in ("0", "false", "")
                kid = raw_key_id(q["key"]) if q.get("key") else None
                with st.lock:
                    if kid:
                        (st.down_keys.add if on else st.down_keys.discard)(kid)
                    else:
                        st.down = on
                        if not on:
                            st.down_keys.clear()
                    return self._send_json(200, {"down": st.down, "down_keys": sorted(st.down_keys)})
            if what == "counts":
                with st.lock:
                    if q.get("key"):
                        kid = raw_key_id(q["key"])
                        return self._send_json(200, dict(st.counts_by_key.get(kid, {})))
                    return self._send_json(200, dict(st.counts))
            if what in ("reset", "reset-counts", "clear-faults"):
                with st.lock:
                    if what != "clear-faults":
                        st.reset_counts()
                    if what != "reset-counts":
                        st.clear_faults()
                return self._send_json(200, {"ok": True})
            if what == "keys":
                with st.lock:
                    return self._send_json(200, dict(st.key_state))
        except ValueError as e:
            return self._send_json(400, {"error": str(e)})
        return self._send_json(404, {"error": "unknown control endpoint " + u.path})

    # -- KMS traffic ----------------------------------------------------

    def _count(self, op, kid):
        with self.state.lock:
            self.state.counts[op] = self.state.counts.get(op, 0) + 1
            if kid:
                per = self.state.counts_by_key.setdefault(kid, {})
                per[op] = per.get(op, 0) + 1

    def _take_fault(self, op, req_kid):
        with self.state.lock:
            for f in self.state.faults:
                if f["count"] <= 0:
                    continue
                if f["op"] and f["op"] != op:
                    continue
                if f["key"] and f["key"] != req_kid:
                    continue
                f["count"] -= 1
                self.state.faults = [g for g in self.state.faults if g["count"] > 0]
                return f
        return None

    def _refusal(self, kid):
        """The error real KMS gives for a key in a non-usable state, if any."""
        with self.state.lock:
            s = self.state.key_state.get(kid)
        if s == "Disabled":
            return ("DisabledException", f"{self._arn(kid)} is disabled.")
        if s == "PendingDeletion":
            return ("KMSInvalidStateException", f"{self._arn(kid)} is pending deletion.")
        return None

    def _forward(self):
        if self.path.startswith("/__proxy/"):
            return self._control()
        body = self._body()
        target = self.headers.get("X-Amz-Target") or ""
        op = target.rsplit(".", 1)[-1] if target else None
        if op is None:
            # Not a JSON-protocol KMS call: pass through untouched.
            status, headers, data = self._upstream(self.command, self.path, self._fwd_headers(body), body)
            return self._reply(status, headers, data)

        try:
            req = json.loads(body or b"{}")
        except ValueError:
            req = {}
        if not isinstance(req, dict):
            req = {}
        req_ref = req.get("KeyId") or req.get("DestinationKeyId")

        with self.state.lock:
            delay = self.state.latency_ms
            need_key = any(f["key"] for f in self.state.faults) or bool(self.state.down_keys)
        if delay:
            time.sleep(delay / 1000.0)

        req_kid = raw_key_id(req_ref)
        if req_kid is None and req_ref and (need_key or op in CRYPTO_OPS | STATE_OPS):
            req_kid = self._resolve(req_ref)

        with self.state.lock:
            down = self.state.down or req_kid in self.state.down_keys
        if down:
            self._count(op, req_kid)
            return self._unreachable()

        fault = self._take_fault(op, req_kid)
        if fault is not None:
            self._count(op, req_kid)
            if fault["kind"] == "throttle":
                return self._kms_error(400, "ThrottlingException", "Rate exceeded (injected by kms-proxy)")
            return self._kms_error(fault["status"], "KMSInternalException",
                                   "internal error (injected by kms-proxy)")

        # Real KMS refuses state changes on a key pending deletion.
        if op in ("EnableKey", "DisableKey") and req_kid:
            with self.state.lock:
                pending = self.state.key_state.get(req_kid) == "PendingDeletion"
            if pending:
                self._count(op, req_kid)
                return self._kms_error(400, "KMSInvalidStateException",
                                       f"{self._arn(req_kid)} is pending deletion.")

        status, headers, data = self._upstream("POST", self.path, self._fwd_headers(body), body)
        resp = None
        if status == 200:
            try:
                resp = json.loads(data or b"null")
            except ValueError:
                resp = None
            self._learn_arns(resp)

        resp_kids = []
        if isinstance(resp, dict):
            resp_kids = [k for k in (raw_key_id(resp.get("SourceKeyId")),
                                     raw_key_id(resp.get("KeyId"))) if k]
        self._count(op, (resp_kids[-1] if resp_kids else None) or req_kid)

        # A Decrypt that names no key is known to be on a key that is down
        # only from moto's answer: refused all the same.
        with self.state.lock:
            down = any(k in self.state.down_keys for k in resp_kids)
        if down:
            return self._unreachable()

        if op in STATE_OPS and status == 200 and req_kid:
            new = {"DisableKey": "Disabled", "EnableKey": None,
                   "ScheduleKeyDeletion": "PendingDeletion",
                   "CancelKeyDeletion": "Disabled"}[op]
            with self.state.lock:
                if new is None:
                    self.state.key_state.pop(req_kid, None)
                else:
                    self.state.key_state[req_kid] = new

        if op in CRYPTO_OPS:
            if status == 200:
                kids = resp_kids
            else:
                # moto failed (e.g. bad context): real KMS checks key state first.
                kids = [k for k in (self._resolve(req.get("SourceKeyId")), req_kid) if k]
            for kid in kids:
                refusal = self._refusal(kid)
                if refusal:
                    return self._kms_error(400, *refusal)

        return self._reply(status, headers, data)

    def _unreachable(self):
        """As when KMS is unreachable: the connection is reset (RST, no
        answer), which the SDK sees as an I/O error."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Closed here: the server's own shutdown would send a FIN first.
        self.connection.close()

    def _reply(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_HEADERS and k.lower() not in ("server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _safe_forward(self):
        try:
            self._forward()
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            # moto down or slow: a 502 the SDK will retry, and a clear body.
            try:
                self._kms_error(502, "ServiceUnavailable", f"kms-proxy cannot reach moto: {e}")
            except OSError:
                pass

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _safe_forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="moto_server URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    Handler.state = State(args.upstream)
    Handler.verbose = args.verbose
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer((args.host, args.port), Handler)
    port = srv.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    sys.stderr.write(f"kms-proxy: listening on {args.host}:{port}, upstream {args.upstream}\n")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
