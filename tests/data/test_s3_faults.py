"""Transient S3 errors: a fault-injecting proxy in front of moto answers 503 SlowDown to some GETs.

No Ray here: the stream and the resolver are exercised in this process.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from fmdist.data.prepare import prepare
from fmdist.data.sources import resolve
from fmdist.data.stream import ShardStream

SLOWDOWN = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>'


class FaultyProxy:
    """Forwards to the real endpoint; every `fail_every`-th GET gets a 503 SlowDown instead."""

    def __init__(self, upstream: str, fail_every: int):
        self.upstream = urlparse(upstream)
        self.fail_every = fail_every
        self.gets = 0
        self.injected = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET":
                    with proxy.lock:
                        proxy.gets += 1
                        fail = proxy.gets % proxy.fail_every == 0
                        proxy.injected += fail
                    if fail:
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOWDOWN)))
                        self.end_headers()
                        self.wfile.write(SLOWDOWN)
                        return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                # A HEAD answer has no body but must carry the object's length.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def prepared_on_s3(s3_bucket, tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"sentence": f"row {i}", "label": i % 2}) + "\n" for i in range(600)))
    prepare([str(src)], f"s3://{s3_bucket}/d", rows_per_shard=50)
    return f"s3://{s3_bucket}/d/train"


def test_transient_503s_are_retried_and_every_row_arrives_once(prepared_on_s3, s3_endpoint, monkeypatch):
    proxy = FaultyProxy(s3_endpoint, fail_every=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        source = resolve(prepared_on_s3)
        ids = [
            i
            for rank in (0, 1)
            for b in ShardStream(source, slot=rank, slots=2, epoch=0, seed=0, shuffle=True, window_rows=64).batches(16)
            for i in b["row_id"]
        ]
    finally:
        proxy.close()
    assert sorted(ids) == list(range(600))
    assert proxy.injected >= 4, proxy.injected


def test_past_the_retry_budget_the_read_fails_loudly_naming_the_shard(prepared_on_s3, s3_endpoint, monkeypatch):
    source = resolve(prepared_on_s3)  # manifest read before the store starts failing
    proxy = FaultyProxy(s3_endpoint, fail_every=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("FMDIST_S3_MAX_ATTEMPTS", "2")
    try:
        from fmdist.data.fs import s3_filesystem

        source = type(source)(source.uri, s3_filesystem(), source.files, source.format, source.manifest)
        stream = ShardStream(source, slot=0, slots=1, epoch=0, seed=0, shuffle=False, window_rows=0)
        # fmdist's own message (sources.read_shard), not pyarrow's alone: the first shard, its data set, the verdict.
        shard = f"{prepared_on_s3.removeprefix('s3://')}/part-00000.parquet"
        expected = f"shard '{shard}' of {prepared_on_s3} could not be read: "
        with pytest.raises(OSError, match=re.escape(expected)):
            list(stream.batches(16))
    finally:
        proxy.close()
