"""A WebHDFS **protocol emulator** for tests: not HDFS, no NameNode or DataNode inside.

No Hadoop can be installed on these machines, so the HDFS backend is tested against this
server, which follows the WebHDFS REST protocol as the `hdfs` package speaks it: the two-step
CREATE and OPEN (the "name node" answers 307 with a Location on a separate "data node" port),
RENAME, LISTSTATUS, GETFILESTATUS, DELETE, MKDIRS, and errors as RemoteException JSON. Files
live in a real folder. Faults can be injected: failing requests, denied paths, an outage.
A real NameNode and DataNode run in infra/docker-compose.yml.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

PREFIX = "/webhdfs/v1"
_JAVA = {
    "FileNotFoundException": "java.io.FileNotFoundException",
    "FileAlreadyExistsException": "org.apache.hadoop.fs.FileAlreadyExistsException",
    "AccessControlException": "org.apache.hadoop.security.AccessControlException",
    "StandbyException": "org.apache.hadoop.ipc.StandbyException",
    "IllegalArgumentException": "java.lang.IllegalArgumentException",
    "PathIsNotEmptyDirectoryException": "org.apache.hadoop.fs.PathIsNotEmptyDirectoryException",
    "ParentNotDirectoryException": "org.apache.hadoop.fs.ParentNotDirectoryException",
}


class _RemoteError(Exception):
    def __init__(self, status: int, exception: str, message: str) -> None:
        super().__init__(message)
        self.status, self.exception, self.message = status, exception, message


class WebHdfsEmulator:
    """Name node and data node endpoints on two loopback ports over one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.denied_prefixes: list[str] = []
        self._failures: list[tuple[int, str, str | None]] = []
        self.requests: list[tuple[str, str, str]] = []  # (node, method, op) for assertions
        self.namenode = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("namenode"))
        self.datanode = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("datanode"))
        self._threads = [
            threading.Thread(target=s.serve_forever, daemon=True, name=f"webhdfs-{n}")
            for n, s in (("nn", self.namenode), ("dn", self.datanode))
        ]

    # --- lifecycle and faults -----------------------------------------------------------

    def start(self) -> WebHdfsEmulator:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self.namenode, self.datanode):
            server.shutdown()
            server.server_close()

    @property
    def uri(self) -> str:
        """The `hdfs://host:port` of the name node."""
        return f"hdfs://127.0.0.1:{self.namenode.server_address[1]}"

    def fail_next(self, count: int, exception: str = "StandbyException", status: int = 503,
                  op: str | None = None) -> None:
        """The next `count` name-node requests (of operation `op`, or any) answer with this
        RemoteException."""
        with self.lock:
            self._failures.extend([(status, exception, op)] * count)

    def deny(self, path_prefix: str) -> None:
        """Requests under `path_prefix` get AccessControlException (403)."""
        self.denied_prefixes.append(path_prefix)

    # --- protocol -------------------------------------------------------------------------

    def _local(self, hdfs_path: str) -> Path:
        parts = [p for p in hdfs_path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise _RemoteError(400, "IllegalArgumentException", f"Invalid path: {hdfs_path}")
        return self.root.joinpath(*parts)

    @staticmethod
    def _status(path: Path, name: str) -> dict:
        stat = path.stat()
        is_dir = path.is_dir()
        return {
            "pathSuffix": name, "type": "DIRECTORY" if is_dir else "FILE",
            "length": 0 if is_dir else stat.st_size, "modificationTime": int(stat.st_mtime * 1000),
            "accessTime": int(stat.st_atime * 1000), "blockSize": 134217728,
            "replication": 0 if is_dir else 1, "permission": "755" if is_dir else "644",
            "owner": "hdfs", "group": "supergroup", "fileId": stat.st_ino, "childrenNum": 0,
        }

    def _namenode(self, method: str, path: str, query: dict[str, str], handler) -> tuple[int, dict]:
        op = query.get("op", "").upper()
        with self.lock:
            for i, (status, exception, only) in enumerate(self._failures):
                if only in (None, op):
                    del self._failures[i]
                    raise _RemoteError(status, exception, f"injected {exception}")
        if any(path.startswith(p) for p in self.denied_prefixes):
            raise _RemoteError(403, "AccessControlException", f"Permission denied: {path}")
        local = self._local(path)
        if method == "PUT" and op == "CREATE":
            return self._redirect(handler, path, query)
        if method == "GET" and op == "OPEN":
            if not local.is_file():
                raise _RemoteError(404, "FileNotFoundException", f"File does not exist: {path}")
            return self._redirect(handler, path, query)
        if method == "PUT" and op == "MKDIRS":
            if local.exists() and not local.is_dir():
                raise _RemoteError(403, "ParentNotDirectoryException", f"Not a directory: {path}")
            local.mkdir(parents=True, exist_ok=True)
            return 200, {"boolean": True}
        if method == "PUT" and op == "RENAME":
            target = self._local(query.get("destination", ""))
            ok = local.exists() and not target.exists() and target.parent.is_dir()
            if ok:
                local.rename(target)
            return 200, {"boolean": ok}
        if method == "GET" and op == "GETFILESTATUS":
            if not local.exists():
                raise _RemoteError(404, "FileNotFoundException", f"File does not exist: {path}")
            return 200, {"FileStatus": self._status(local, "")}
        if method == "GET" and op == "LISTSTATUS":
            if not local.exists():
                raise _RemoteError(404, "FileNotFoundException", f"File {path} does not exist.")
            entries = sorted(local.iterdir()) if local.is_dir() else [local]
            statuses = [self._status(p, p.name if local.is_dir() else "") for p in entries]
            return 200, {"FileStatuses": {"FileStatus": statuses}}
        if method == "DELETE" and op == "DELETE":
            if not local.exists():
                return 200, {"boolean": False}
            if local.is_dir():
                if any(local.iterdir()) and query.get("recursive", "false") != "true":
                    raise _RemoteError(403, "PathIsNotEmptyDirectoryException", f"{path} is non empty")
                shutil.rmtree(local)
            else:
                local.unlink()
            return 200, {"boolean": True}
        raise _RemoteError(400, "IllegalArgumentException", f"Invalid value for parameter op: {op}")

    def _redirect(self, handler, path: str, query: dict[str, str]) -> tuple[int, dict]:
        params = "&".join(f"{k}={quote(v)}" for k, v in query.items())
        location = (f"http://127.0.0.1:{self.datanode.server_address[1]}{PREFIX}{quote(path)}"
                    f"?{params}&namenoderpcaddress=127.0.0.1:8020")
        handler.extra_headers = {"Location": location}
        return 307, {}

    def _datanode(self, method: str, path: str, query: dict[str, str], body: bytes) -> tuple[int, object]:
        op = query.get("op", "").upper()
        local = self._local(path)
        if method == "PUT" and op == "CREATE":
            if local.exists() and query.get("overwrite", "false") != "true":
                raise _RemoteError(403, "FileAlreadyExistsException", f"{path} already exists")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(body)
            return 201, {}
        if method == "GET" and op == "OPEN":
            if not local.is_file():
                raise _RemoteError(404, "FileNotFoundException", f"File does not exist: {path}")
            data = local.read_bytes()
            offset = int(query.get("offset", 0) or 0)
            length = query.get("length")
            return 200, data[offset: offset + int(length)] if length else data[offset:]
        raise _RemoteError(400, "IllegalArgumentException", f"datanode cannot {method} {op}")

    def _handler(self, node: str):
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            extra_headers: dict[str, str] = {}

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _serve(self, method: str) -> None:
                self.extra_headers = {}
                parsed = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
                body = self._body() if method == "PUT" else b""
                emulator.requests.append((node, method, query.get("op", "")))
                try:
                    if not parsed.path.startswith(PREFIX):
                        raise _RemoteError(404, "FileNotFoundException", "not a WebHDFS path")
                    path = unquote(parsed.path[len(PREFIX):]) or "/"
                    if node == "namenode":
                        status, payload = emulator._namenode(method, path, query, self)
                    else:
                        status, payload = emulator._datanode(method, path, query, body)
                except _RemoteError as exc:
                    status = exc.status
                    payload = {"RemoteException": {
                        "exception": exc.exception, "javaClassName": _JAVA.get(exc.exception, ""),
                        "message": exc.message}}
                if isinstance(payload, bytes):
                    data, kind = payload, "application/octet-stream"
                else:
                    data, kind = (json.dumps(payload).encode() if payload else b""), "application/json"
                self.send_response(status)
                for name, value in self.extra_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler
