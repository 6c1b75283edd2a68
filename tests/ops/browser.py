"""Render a page in a real headless Chromium (Debian `chromium-headless-shell` or `chromium`).

The browser is driven through its command line (`--dump-dom`, `--screenshot`) with a virtual time
budget, so the page's JavaScript runs its timers and fetches before the DOM is dumped. It is kept
on loopback: no proxy, every host name except 127.0.0.1 unresolvable, no background services.
`make system-tools` installs it on CI (root + apt-get); elsewhere the tests that need it skip.
"""

from __future__ import annotations

import glob
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

# Headless shell first: it is the small package and needs no `--headless` mode switch.
_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser")


def find_browser() -> str | None:
    for name in _NAMES:
        if path := shutil.which(name):
            return path
    # Off PATH: Debian's real binary sits next to its resources; older builds call it headless_shell.
    for pattern in ("/usr/lib/chromium*/chromium-headless-shell", "/usr/lib/chromium*/headless_shell"):
        if found := sorted(glob.glob(pattern)):
            return found[0]
    return None


@dataclass
class Rendered:
    dom: str
    screenshot: Path
    stderr: str


def render(browser: str, url: str, workdir: Path, *, budget_ms: int = 5000, size: tuple[int, int] = (1280, 1000),
           timeout_s: float = 60) -> Rendered:
    """Load `url`, let `budget_ms` of virtual time pass, dump the DOM and take a screenshot (one run)."""
    shot = workdir / "screenshot.png"
    cmd = [
        browser, "--headless", "--no-sandbox",  # root in a container: the setuid sandbox cannot start
        "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--proxy-server=direct://", "--proxy-bypass-list=*",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={workdir / 'profile'}", f"--window-size={size[0]},{size[1]}",
        f"--virtual-time-budget={budget_ms}", f"--screenshot={shot}", "--dump-dom", url,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=workdir)
    if r.returncode != 0 or "<html" not in r.stdout:
        raise AssertionError(f"{browser} exited {r.returncode} without a DOM:\n{r.stderr[-3000:]}")
    return Rendered(dom=r.stdout, screenshot=shot, stderr=r.stderr)


@dataclass
class Dom:
    """Text of every element with an id, table bodies as rows of cell texts, and <body>'s attributes."""

    text: dict[str, str] = field(default_factory=dict)
    rows: dict[str, list[list[str]]] = field(default_factory=dict)
    body: dict[str, str] = field(default_factory=dict)


class _DomParser(HTMLParser):
    _VOID = {"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.dom = Dom()
        self.stack: list[tuple[str, str | None]] = []  # (tag, id)
        self.table: str | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.dom.body = a
        if tag == "table" and a.get("id"):
            self.table = a["id"]
            self.dom.rows[self.table] = []
        elif tag == "tr" and self.table and any(t == "tbody" for t, _ in self.stack):
            self.dom.rows[self.table].append([])
        elif tag == "td" and self.table and self.dom.rows[self.table]:
            self.cell = []
        if tag not in self._VOID:
            self.stack.append((tag, a.get("id")))
            if a.get("id"):
                self.dom.text.setdefault(a["id"], "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.cell is not None and self.table:
            self.dom.rows[self.table][-1].append("".join(self.cell).strip())
            self.cell = None
        if tag == "table":
            self.table = None
        while self.stack:  # tolerate unclosed children, as browsers do
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, ident in self.stack:
            if ident:
                self.dom.text[ident] += data
        if self.cell is not None:
            self.cell.append(data)


def parse_dom(html: str) -> Dom:
    p = _DomParser()
    p.feed(html)
    p.close()
    p.dom.text = {k: " ".join(v.split()) for k, v in p.dom.text.items()}
    return p.dom


def png_pixels(path: Path) -> tuple[int, int, set[tuple[int, ...]]]:
    """(width, height, distinct RGB colours) of an 8-bit, non-interlaced RGB/RGBA PNG: what Chromium writes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, bytearray(), None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert header is not None, f"{path}: no IHDR"
    width, height, depth, ctype, _, _, interlace = header
    assert depth == 8 and ctype in (2, 6) and interlace == 0, f"{path}: unexpected PNG format {header}"
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    img = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):  # undo the per-row filter (PNG spec, section 9)
        f, line = rows[y, 0], rows[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:  # sub: a running sum per channel, modulo 256
            cur = (np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint64) % 256).astype(np.uint8).ravel()
        elif f == 2:
            cur = line + prev
        else:  # average / Paeth depend on the byte just decoded: a plain loop (these rows are few)
            cur, up = bytearray(line.tobytes()), prev.tobytes()
            for i in range(bpp):  # no left neighbour: both filters reduce to "up" (halved for average)
                cur[i] = (cur[i] + (up[i] >> 1 if f == 3 else up[i])) & 0xFF
            for i in range(bpp, stride):
                a, b, c = cur[i - bpp], up[i], up[i - bpp]
                if f == 3:
                    cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
                    continue
                pa, pb, pc = b - c, a - c, a + b - c - c
                pa, pb, pc = (pa if pa >= 0 else -pa), (pb if pb >= 0 else -pb), (pc if pc >= 0 else -pc)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            cur = np.frombuffer(bytes(cur), dtype=np.uint8)
        img[y] = prev = cur
    px = img.reshape(height, width, bpp).astype(np.uint32)
    packed = np.unique((px[:, :, 0] << 16) | (px[:, :, 1] << 8) | px[:, :, 2])
    return width, height, {(int(v) >> 16, (int(v) >> 8) & 0xFF, int(v) & 0xFF) for v in packed}
