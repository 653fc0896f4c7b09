"""Servers on loopback for tests and benchmarks of remote stores: an S3-compatible server (moto in
server mode, in its own process, with real credential checks) and an HTTP server that serves a
folder with ranged GETs and counts every request and byte it sends.

>>> with RangeHTTPServer("/data") as http:  # doctest: +SKIP
...     uwsfmt.open(http.url("family.uws")).state_dict(0)
...     http.requests, http.bytes_sent
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.request import urlopen

import boto3

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Handler(SimpleHTTPRequestHandler):
    """GET and HEAD of files under the served folder, with single ``Range: bytes=a-b`` / ``-n``
    requests answered 206; every request and body byte counted on the server."""

    server: _CountingServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "not found")
            return None
        size = os.path.getsize(path)
        start, end = 0, size - 1
        m = _RANGE.match(self.headers.get("Range", "").strip())
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            if start > end:
                self.send_error(416, "range not satisfiable")
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        f = open(path, "rb")  # noqa: SIM115 - the base class closes it after copyfile
        f.seek(start)
        self._left = end - start + 1
        with self.server.mutex:
            self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        return f

    def copyfile(self, source, outputfile) -> None:
        data = source.read(self._left)
        outputfile.write(data)
        with self.server.mutex:
            self.server.bytes_sent += len(data)


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mutex = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []
        self.bytes_sent = 0


class RangeHTTPServer:
    """Serve ``folder`` over HTTP on loopback (a context manager); :attr:`requests` lists
    ``(method, path, range)`` of every request, :attr:`bytes_sent` counts body bytes;
    :meth:`reset` zeroes both."""

    def __init__(self, folder: str):
        self.folder = folder
        self._srv = _CountingServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=folder))
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)

    def __enter__(self) -> RangeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self._srv.server_address[1]}/{name}"

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        return list(self._srv.requests)

    @property
    def bytes_sent(self) -> int:
        return self._srv.bytes_sent

    def reset(self) -> None:
        with self._srv.mutex:
            self._srv.requests.clear()
            self._srv.bytes_sent = 0


#: moto's server, with one fix: its signature check hands botocore the request's query decoded,
#: which botocore takes as already encoded, so every signed request whose query has a character
#: to encode (``prefix=a/b``: every listing s3fs makes) fails with SignatureDoesNotMatch
_MOTO_MAIN = """
import sys
from urllib.parse import quote, unquote
from moto.iam import access_control
from moto.server import main

make = access_control.IAMRequestBase._create_aws_request
def create(self):
    path, sep, query = self._path.partition("?")
    enc = lambda x: quote(unquote(x), safe="-_.~")
    self._path = path + sep + "&".join("=".join(enc(x) for x in pair.split("=", 1)) for pair in query.split("&") if pair)
    return make(self)
access_control.IAMRequestBase._create_aws_request = create
main(sys.argv[1:])
"""


class S3Server:
    """moto's S3 (and IAM) server in a subprocess on loopback, with credential checks on: every
    request but the three that make its user must be signed with :attr:`credentials`.

    ``options(**kw)``: fsspec ``storage_options`` for s3fs; ``env()``: the same as AWS_*
    environment variables (how the CLI and most programs get them)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.credentials: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
        self._proc = subprocess.Popen([sys.executable, "-c", _MOTO_MAIN, "-H", "127.0.0.1", "-p", str(self.port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=self.endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name="us-east-1")
        iam.create_user(UserName="uwsfmt")
        key = iam.create_access_key(UserName="uwsfmt")["AccessKey"]
        iam.put_user_policy(UserName="uwsfmt", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        self.credentials = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        return self

    def options(self, **kw: Any) -> dict:
        return {**self.credentials, "endpoint_url": self.endpoint, "client_kwargs": {"region_name": "us-east-1"}, **kw}

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.credentials["key"], "AWS_SECRET_ACCESS_KEY": self.credentials["secret"],
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.credentials["key"],
                            aws_secret_access_key=self.credentials["secret"], region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
