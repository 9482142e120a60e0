"""fetch_lfw against a local HTTP server with Range support; the real internet is never touched."""

import hashlib
import importlib.util
import io
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from pdsn_cli.data.fetch import DEFAULT_CHECKSUMS, DEFAULT_URLS, MARKER, fetch_lfw
from pdsn_cli.data.lfw import read_pairs
from pdsn_cli.errors import BadInputError, JobFailed

PAIRS = b"1\t1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\n"


class FileServer:
    """Serves in-memory files; honours ``Range: bytes=N-[M]``; logs what each request got."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.log: list[dict] = []
        self.honour_range = True
        self.cut_after: dict[str, int] = {}  # path -> bytes to send before dropping the connection
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = server.files.get(self.path)
                entry = {"path": self.path, "range": self.headers.get("Range"), "sent": 0}
                server.log.append(entry)
                if data is None:
                    entry["status"] = 404
                    self.send_error(404)
                    return
                start, end = 0, len(data) - 1
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", entry["range"] or "")
                if server.honour_range and match:
                    start = int(match[1])
                    end = int(match[2]) if match[2] else end
                    if start >= len(data):
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                entry["status"] = 206 if server.honour_range and match else 200
                body = data[start : end + 1]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                if cut is not None:
                    body = body[:cut]
                self.wfile.write(body)
                entry["sent"] = len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def urls(self):
        return {"lfw.tgz": f"{self.base}/lfw/lfw.tgz", "pairs.txt": f"{self.base}/lfw/pairs.txt"}

    def requests_for(self, name):
        return [e for e in self.log if e["path"].endswith(name)]


def _jpeg(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def _tgz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _entry(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


IMAGES = {f"lfw/{p}/{p}_{i:04d}.jpg": _jpeg(k) for k, (p, i) in enumerate([("Ann_A", 1), ("Ann_A", 2), ("Bob_B", 1)])}


def _lfw_tgz(extra=()):
    members = [(_entry("lfw", tarfile.DIRTYPE), None)]
    members += [(_entry(d, tarfile.DIRTYPE), None) for d in ("lfw/Ann_A", "lfw/Bob_B")]
    members += [(_entry(name), data) for name, data in IMAGES.items()]
    return _tgz(members + list(extra))


def _md5s(server):
    return {name: hashlib.md5(server.files[f"/lfw/{name}"]).hexdigest() for name in ("lfw.tgz", "pairs.txt")}


@pytest.fixture
def server():
    s = FileServer({"/lfw/lfw.tgz": _lfw_tgz(), "/lfw/pairs.txt": PAIRS})
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _assert_complete(dest):
    root = dest / "lfw"
    for name, data in IMAGES.items():
        assert (dest / name).read_bytes() == data
    assert (root / "pairs.txt").read_bytes() == PAIRS
    assert (root / MARKER).is_file()
    # only the finished tree is left behind
    assert sorted(p.name for p in dest.iterdir()) == ["lfw"]


def test_download_verify_extract_then_noop(server, tmp_path):
    seen = []
    dest = tmp_path / "data"
    root = fetch_lfw(
        dest, progress=lambda done, total: seen.append((done, total)), urls=server.urls(), checksums=_md5s(server)
    )
    assert root == dest / "lfw"
    _assert_complete(dest)
    size = len(server.files["/lfw/lfw.tgz"])
    assert seen[-1] == (size, size) and (len(PAIRS), len(PAIRS)) in seen
    assert [e["range"] for e in server.log] == [None, None]

    # the pairs parser accepts what was fetched
    assert len(read_pairs(root / "pairs.txt", root)) == 2

    requests = len(server.log)
    assert fetch_lfw(dest, urls=server.urls(), checksums=_md5s(server)) == root
    assert len(server.log) == requests  # already complete: nothing downloaded


def test_resume_requests_only_the_missing_bytes(server, tmp_path):
    data = server.files["/lfw/lfw.tgz"]
    half = len(data) // 2
    tmp_path.joinpath("lfw.tgz.part").write_bytes(data[:half])
    fetch_lfw(tmp_path, urls=server.urls(), checksums=_md5s(server))
    _assert_complete(tmp_path)
    (request,) = server.requests_for("lfw.tgz")
    assert request["range"] == f"bytes={half}-"
    assert request["status"] == 206 and request["sent"] == len(data) - half


def test_interrupted_download_continues_on_the_next_run(server, tmp_path):
    data = server.files["/lfw/lfw.tgz"]
    server.cut_after["/lfw/lfw.tgz"] = 1000
    with pytest.raises(JobFailed, match=r"stopped after 1000 of \d+ bytes \(run again to resume\)"):
        fetch_lfw(tmp_path, urls=server.urls(), checksums=_md5s(server))
    assert tmp_path.joinpath("lfw.tgz.part").stat().st_size == 1000
    assert not (tmp_path / "lfw").exists()
    fetch_lfw(tmp_path, urls=server.urls(), checksums=_md5s(server))
    _assert_complete(tmp_path)
    assert server.requests_for("lfw.tgz")[-1]["range"] == "bytes=1000-"
    assert server.requests_for("lfw.tgz")[-1]["sent"] == len(data) - 1000
    assert len(server.requests_for("pairs.txt")) == 1  # verified on the first run, kept


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.honour_range = False
    tmp_path.joinpath("lfw.tgz.part").write_bytes(b"garbage from an older attempt")
    fetch_lfw(tmp_path, urls=server.urls(), checksums=_md5s(server))
    _assert_complete(tmp_path)
    assert server.requests_for("lfw.tgz")[0]["status"] == 200


def test_part_file_already_whole(server, tmp_path):
    tmp_path.joinpath("lfw.tgz.part").write_bytes(server.files["/lfw/lfw.tgz"])
    fetch_lfw(tmp_path, urls=server.urls(), checksums=_md5s(server))
    _assert_complete(tmp_path)
    assert server.requests_for("lfw.tgz")[0]["status"] == 416


def test_checksum_mismatch_is_refused_and_cleaned_up(server, tmp_path):
    wrong = dict(_md5s(server), **{"lfw.tgz": "0" * 32})
    with pytest.raises(JobFailed, match=r"checksum mismatch for lfw.tgz: md5 [0-9a-f]{32}, expected 0{32}"):
        fetch_lfw(tmp_path, urls=server.urls(), checksums=wrong)
    assert not (tmp_path / "lfw.tgz.part").exists() and not (tmp_path / "lfw.tgz").exists()
    assert not (tmp_path / "lfw").exists()


EVIL = {
    "parent": (_entry("../evil"), b"pwned"),
    "absolute": (_entry("/tmp/pdsn-evil-absolute"), b"pwned"),
    "nested parent": (_entry("lfw/Ann_A/../../../evil"), b"pwned"),
    "symlink out": (_entry("lfw/escape", tarfile.SYMTYPE, "../../evil"), None),
    "absolute symlink": (_entry("lfw/escape", tarfile.SYMTYPE, "/etc/passwd"), None),
    "hard link out": (_entry("lfw/hard", tarfile.LNKTYPE, "../evil"), None),
    "device": (_entry("lfw/dev", tarfile.CHRTYPE), None),
    "fifo": (_entry("lfw/fifo", tarfile.FIFOTYPE), None),
}


@pytest.mark.parametrize("case", list(EVIL))
def test_malicious_archive_is_refused(server, tmp_path, case):
    server.files["/lfw/lfw.tgz"] = _lfw_tgz([EVIL[case]])
    dest = tmp_path / "a" / "b"
    with pytest.raises(JobFailed, match="refusing archive"):
        fetch_lfw(dest, urls=server.urls(), checksums=_md5s(server))
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (dest / "lfw").exists() and not (dest / ".lfw.extract.partial").exists()


def test_archive_without_lfw_folder(server, tmp_path):
    server.files["/lfw/lfw.tgz"] = _tgz([(_entry("other/x.jpg"), b"x")])
    with pytest.raises(JobFailed, match="no top-level lfw/ folder"):
        fetch_lfw(tmp_path, urls=server.urls(), checksums=_md5s(server))
    server.files["/lfw/lfw.tgz"] = b"not a tar archive at all"
    (tmp_path / "lfw.tgz").unlink()
    with pytest.raises(JobFailed, match="not a readable tar archive"):
        fetch_lfw(tmp_path, urls=server.urls(), checksums=_md5s(server))
    assert not (tmp_path / "lfw").exists()


def test_network_errors_are_one_line(server, tmp_path):
    urls = dict(server.urls(), **{"lfw.tgz": f"{server.base}/missing.tgz"})
    with pytest.raises(JobFailed, match=r"missing.tgz failed: HTTP 404"):
        fetch_lfw(tmp_path, urls=urls, checksums=_md5s(server))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    urls = {k: f"http://127.0.0.1:{closed_port}/{k}" for k in ("lfw.tgz", "pairs.txt")}
    with pytest.raises(JobFailed, match=r"download of http://127.0.0.1:\d+/pairs.txt failed: .*refused") as e:
        fetch_lfw(tmp_path / "x", urls=urls, checksums=_md5s(server))
    assert "\n" not in str(e.value)


def test_bad_destinations_and_arguments(server, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="not a folder"):
        fetch_lfw(tmp_path / "file", urls=server.urls(), checksums=_md5s(server))
    (tmp_path / "mine" / "lfw").mkdir(parents=True)
    with pytest.raises(BadInputError, match="not a finished download"):
        fetch_lfw(tmp_path / "mine", urls=server.urls(), checksums=_md5s(server))
    with pytest.raises(BadInputError, match="http"):
        fetch_lfw(tmp_path, urls={"lfw.tgz": "file:///etc/passwd", "pairs.txt": "ftp://x"}, checksums=_md5s(server))
    assert server.log == []


def test_defaults_are_the_original_lfw_files():
    # torchvision lists the original files' URLs and md5s; read its source rather than import it (slow)
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        pytest.skip("torchvision not installed")
    source = (Path(spec.origin).parent / "datasets" / "lfw.py").read_text()
    assert '"http://vis-www.cs.umass.edu/lfw/"' in source
    assert DEFAULT_URLS == {
        "lfw.tgz": "http://vis-www.cs.umass.edu/lfw/lfw.tgz",
        "pairs.txt": "http://vis-www.cs.umass.edu/lfw/pairs.txt",
    }
    assert f'("lfw", "lfw.tgz", "{DEFAULT_CHECKSUMS["lfw.tgz"]}")' in source
    assert f'"pairs.txt": "{DEFAULT_CHECKSUMS["pairs.txt"]}"' in source
