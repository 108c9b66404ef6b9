"""A local HTTP server (127.0.0.1 only) that serves one archive, honours Range requests, and can misbehave on cue.

Used by the download tests: ``ArchiveServer(payload)`` serves ``payload`` at ``/file_downloaded``; ``drop_after``
makes the first ``drop_times`` responses announce the full length, send that many bytes and hang up;
``honour_range=False`` makes it answer every request with the whole file (200), as some servers do.
"""

from __future__ import annotations

import io
import socket
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ArchiveServer:
    """Context manager: ``with ArchiveServer(data) as server: server.url``; ``server.requests`` logs each GET."""

    def __init__(self, payload: bytes, *, drop_after: int | None = None, drop_times: int = 1,
                 honour_range: bool = True, status: int = 200, content_type: str = "application/octet-stream"
                 ) -> None:
        self.payload, self.drop_after, self.drop_times = payload, drop_after, drop_times
        self.honour_range, self.status, self.content_type = honour_range, status, content_type
        self.requests: list[dict[str, str | None]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/file_downloaded"

    def __enter__(self) -> ArchiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with server._lock:
                    server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                    drop = server.drop_after is not None and server.drop_times > 0
                    if drop:
                        server.drop_times -= 1
                if server.status != 200:
                    self.send_error(server.status)
                    return
                body, start = server.payload, 0
                requested = self.headers.get("Range")
                if requested and server.honour_range:
                    start = int(requested.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if drop:
                    self.wfile.write(body[start : start + server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # hang up mid-transfer
                    return
                self.wfile.write(body[start:])

        return Handler


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` as {relative posix path: content}."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def zip_tree(root: Path, prefix: str = "") -> bytes:
    """A ZIP of the files under ``root``, each stored under ``prefix`` + its relative path."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for relative, content in tree_files(root).items():
            archive.writestr(prefix + relative, content)
    return buffer.getvalue()


def tar_tree(root: Path, prefix: str = "") -> bytes:
    """A gzipped tar of the files under ``root``, each stored under ``prefix`` + its relative path."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for relative, content in tree_files(root).items():
            info = tarfile.TarInfo(prefix + relative)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@contextmanager
def closed_port_url() -> Iterator[str]:
    """``with closed_port_url() as url``: a 127.0.0.1 URL that refuses connections (like an unreachable host) for
    the whole ``with`` block.

    The port is held by a socket that is bound but never listens: the kernel answers a connection to it with a
    reset, and no other process can take the port while the test runs (a port probed and released could be).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}/file_downloaded"


def _rar_block(kind: int, flags: int, body: bytes, data: bytes = b"") -> bytes:
    """One RAR 1.5-4.x block: CRC16 (low half of CRC32 of the header after the CRC field), type, flags, size."""
    header = struct.pack("<BHH", kind, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(header) & 0xFFFF) + header + data


def rar_tree(root: Path, prefix: str = "", method: int = 0x30) -> bytes:
    """A RAR 4 archive of the files under ``root`` (no RAR writer is installable, so the format is written here).

    ``method=0x30`` stores files uncompressed, which ``rarfile`` reads by itself; any other method claims
    compression, which ``rarfile`` can only extract through an external tool (unrar, unar, 7z, bsdtar).
    """
    blocks = [b"Rar!\x1a\x07\x00", _rar_block(0x73, 0, b"\x00" * 6)]
    for relative, content in tree_files(root).items():
        name = (prefix + relative).encode()
        body = struct.pack(
            "<IIBIIBBHI", len(content), len(content), 3, zlib.crc32(content), 0x5A210000, 20, method, len(name),
            0o100644 << 16,
        ) + name
        blocks.append(_rar_block(0x74, 0x8000, body, content))  # 0x8000: a data area follows the header
    blocks.append(_rar_block(0x7B, 0x4000, b""))
    return b"".join(blocks)
