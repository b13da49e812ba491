"""A finished GoatCounter CSV export, made up deterministically, and the files a static upstream serves for it.

The rows look like what GoatCounter v2.7.0 writes (format version 2, 14 columns): a few thousand paths with a
long-tailed popularity, titles (some with commas and quotes, a very few with a line break), events, browsers and
systems as GoatCounter names them, visitors' sessions of one to several pageviews, 2 % bots, referrers and their
scheme, screen sizes, locations, the first-visit flag and RFC 3339 times in hit order. The same `rows` and `seed`
always give the same bytes: the gzip file (compression level 6, as Go's default) and its SHA-256 with it.

Besides export `EXPORT_ID` (the CSV export itself), two larger files are made for the memory check of REST
downloads: `BIG_IDS` are the same gzip file repeated (still one valid gzip stream: gzip allows several members)
to about 100 MB and 1 GB. Nothing here imports the project.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

HEADER = [
    "2Path",
    "Title",
    "Event",
    "UserAgent",
    "Browser",
    "System",
    "Session",
    "Bot",
    "Referrer",
    "Referrer scheme",
    "Screen size",
    "Location",
    "FirstVisit",
    "Date",
]
EXPORT_ID = 7
BIG_IDS = {8: 100 * 10**6, 9: 10**9}  # export id -> least size in bytes of the repeated file
START = datetime(2025, 11, 1, tzinfo=UTC)
FORMAT_VERSION = 2  # of this generator: bump when the bytes it makes change

WORDS = [
    "go",
    "sqlite",
    "python",
    "rust",
    "notes",
    "release",
    "guide",
    "faster",
    "export",
    "static",
    "server",
    "counter",
    "privacy",
    "analytics",
    "cache",
    "index",
    "query",
    "stream",
    "async",
    "thread",
    "memory",
    "disk",
    "benchmark",
    "profile",
    "design",
    "review",
    "debug",
    "deploy",
    "docker",
    "linux",
    "weekend",
    "garden",
    "travel",
    "recipe",
    "bread",
    "coffee",
    "bike",
    "camera",
    "music",
    "books",
    "photos",
    "winter",
    "summer",
    "letters",
]
BROWSERS = [
    ("Chrome 120", 30),
    ("Chrome 119", 10),
    ("Firefox 120", 12),
    ("Firefox 115", 4),
    ("Safari 17.1", 14),
    ("Safari 16.6", 5),
    ("Edge 120", 8),
    ("Samsung Internet 23", 2),
    ("Opera 105", 2),
    (" ", 3),
]
SYSTEMS = [
    ("Windows 10", 28),
    ("Windows 11", 10),
    ("macOS 14.1", 14),
    ("macOS 13.6", 6),
    ("Linux ", 8),
    ("iOS 17.1", 16),
    ("Android 14", 12),
    ("Android 13", 5),
    (" ", 1),
]
REFERRERS = [
    ("", "o", 50),
    ("https://www.google.com/", "g", 20),
    ("https://duckduckgo.com/", "g", 4),
    ("https://www.bing.com/", "g", 3),
    ("https://news.ycombinator.com/item?id={n}", "h", 6),
    ("https://lobste.rs/s/{h}", "h", 3),
    ("https://www.reddit.com/r/programming/comments/{h}/", "h", 4),
    ("https://t.co/{h}", "h", 3),
    ("https://github.com/{w}/{w2}", "h", 4),
    ("newsletter-{w}", "c", 3),
]
LOCATIONS = [
    ("US-CA", 10),
    ("US-NY", 6),
    ("US-TX", 4),
    ("US", 6),
    ("GB-ENG", 7),
    ("DE-BE", 4),
    ("DE", 5),
    ("NL-NH", 4),
    ("NL", 3),
    ("FR-IDF", 4),
    ("IN-KA", 5),
    ("BR-SP", 3),
    ("JP-13", 3),
    ("CA-ON", 3),
    ("AU-NSW", 2),
    ("", 4),
]
WIDTHS = [("1920", 20), ("1440", 8), ("1536", 6), ("1280", 5), ("2560", 5), ("390", 14), ("414", 8), ("360", 9)]
SCALES = [("1", 60), ("2", 30), ("1.5", 7), ("3", 3)]


def _weighted(rng: random.Random, table: list[tuple[str, int]], count: int) -> list[str]:
    values = [v for v, _ in table]
    weights = [w for _, w in table]
    return rng.choices(values, weights, k=count)


@dataclass(frozen=True)
class Site:
    paths: list[str]
    titles: list[str]
    weights: list[float]


def make_site(rng: random.Random, count: int = 3000) -> Site:
    paths: list[str] = ["/", "/about", "/blog", "/contact", "/feed.xml"]
    titles: list[str] = ["Home", "About me", "Blog", "Contact", ""]
    seen = set(paths)
    while len(paths) < count:
        kind = rng.random()
        words = "-".join(rng.sample(WORDS, rng.randint(2, 6)))
        if kind < 0.55:
            path = f"/blog/{rng.randint(2014, 2025)}/{rng.randint(1, 12):02d}/{words}"
            title = " ".join(words.split("-")).capitalize()
            if rng.random() < 0.15:
                title += f', part {rng.randint(1, 9)}: "{rng.choice(WORDS)}"'  # quoted and with a comma
            title += " | My blog"
        elif kind < 0.8:
            path = f"/docs/{rng.choice(WORDS)}/{words}"
            title = f"{words.replace('-', ' ').title()} - Documentation"
        elif kind < 0.9:
            path = f"/tags/{rng.choice(WORDS)}"
            title = f"Posts tagged {path.rsplit('/', 1)[1]}"
        else:  # an event: GoatCounter writes it without the leading slash
            path = f"click-{words}"
            title = f"Clicked {words.replace('-', ' ')}"
        if path in seen:
            continue
        seen.add(path)
        paths.append(path)
        titles.append(title)
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(count)]  # Zipf-like: a few pages get most views
    return Site(paths, titles, weights)


def rows(count: int, seed: int) -> Iterator[list[str]]:
    """`count` rows, as GoatCounter writes them (without the header)."""
    rng = random.Random(seed)  # noqa: S311 - made-up data, not secrets
    site = make_site(rng)
    when = START
    made = 0
    block = 4096
    while made < count:
        n = min(block, count - made)
        picks = rng.choices(range(len(site.paths)), site.weights, k=n)
        browsers, systems = _weighted(rng, BROWSERS, n), _weighted(rng, SYSTEMS, n)
        locations, widths, scales = _weighted(rng, LOCATIONS, n), _weighted(rng, WIDTHS, n), _weighted(rng, SCALES, n)
        refs = rng.choices(REFERRERS, [w for _, _, w in REFERRERS], k=n)
        session, left, first = "", 0, "1"
        for i in range(n):
            if left == 0:
                session = f"{rng.getrandbits(64):016x}-{rng.getrandbits(64):016x}"
                left, first = rng.choice((1, 1, 1, 2, 2, 3, 4, 6)), "1"
            else:
                first = "0"
            left -= 1
            index = picks[i]
            path, title = site.paths[index], site.titles[index]
            if made + i > 0 and (made + i) % 997 == 0:
                title = title + "\n(continued)"  # a field with a line break: one record over two lines
            template, scheme, _ = refs[i]
            referrer = template.format(
                n=rng.randint(30_000_000, 39_999_999),
                h=f"{rng.getrandbits(32):08x}",
                w=rng.choice(WORDS),
                w2=rng.choice(WORDS),
            )
            bot = "0" if rng.random() < 0.98 else rng.choice(("3", "4", "5", "6", "7", "8"))
            when += timedelta(seconds=rng.randint(0, 62))
            yield [
                path,
                title,
                "1" if not path.startswith("/") else "0",
                "",
                browsers[i],
                systems[i],
                session,
                bot,
                referrer,
                scheme,
                f"{widths[i]},0,{scales[i]}",
                locations[i],
                first,
                when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            ]
        made += n


@dataclass(frozen=True)
class Dataset:
    """The files of one made-up export, in `folder`."""

    folder: Path
    rows: int
    seed: int

    @property
    def gzip_path(self) -> Path:
        return self.folder / f"export-{EXPORT_ID}.csv.gz"

    def object_path(self, export_id: int) -> Path:
        return self.folder / f"export-{export_id}.json"

    def file_path(self, export_id: int) -> Path:
        return self.folder / f"export-{export_id}.csv.gz"

    def export_object(self, export_id: int = EXPORT_ID) -> dict[str, object]:
        document: dict[str, object] = json.loads(self.object_path(export_id).read_text())
        return document

    @property
    def csv_bytes(self) -> int:
        """The size of the CSV (export EXPORT_ID's, decompressed)."""
        return int(json.loads((self.folder / "meta.json").read_text())["csv_bytes"])


def export_document(export_id: int, path: Path, num_rows: int, digest: str) -> dict[str, object]:
    """GoatCounter v2.7.0's Export object (no `format` field), finished."""
    size_mb = path.stat().st_size / 1024 / 1024
    finished = START + timedelta(days=400)
    return {
        "id": export_id,
        "site_id": 1,
        "start_from_hit_id": 0,
        "last_hit_id": num_rows,
        "path": f"/var/tmp/goatcounter-export-bench-{export_id}.csv.gz",
        "created_at": finished.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "finished_at": finished.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "num_rows": num_rows,
        "size": f"{size_mb:.1f}",
        "hash": f"sha256-{digest}",
        "error": None,
    }


def build(folder: Path, count: int, seed: int = 1, *, big: bool = True) -> Dataset:
    """Make (or reuse, when its stamp matches) the export of `count` rows in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    stamp = folder / "STAMP"
    wanted = json.dumps({"rows": count, "seed": seed, "version": FORMAT_VERSION, "big": big})
    dataset = Dataset(folder, count, seed)
    if stamp.exists() and stamp.read_text() == wanted:
        return dataset
    stamp.unlink(missing_ok=True)
    digest = hashlib.sha256()
    compress = zlib.compressobj(6, zlib.DEFLATED, 31)
    csv_size = 0
    handle, name = tempfile.mkstemp(prefix=".export-", suffix=".partial", dir=folder)  # two builds may race
    partial = Path(name)
    with os.fdopen(handle, "wb") as out:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(HEADER)
        for index, row in enumerate(rows(count, seed), 1):
            writer.writerow(row)
            if index % 20_000 == 0:
                data = buffer.getvalue().encode()
                csv_size += len(data)
                piece = compress.compress(data)
                digest.update(piece)
                out.write(piece)
                buffer.seek(0)
                buffer.truncate()
        data = buffer.getvalue().encode()
        csv_size += len(data)
        piece = compress.compress(data) + compress.flush()
        digest.update(piece)
        out.write(piece)
    os.chmod(partial, 0o644)
    os.replace(partial, dataset.gzip_path)
    document = export_document(EXPORT_ID, dataset.gzip_path, count, digest.hexdigest())
    _write(dataset.object_path(EXPORT_ID), json.dumps(document).encode())
    _write(folder / "meta.json", json.dumps({"csv_bytes": csv_size}).encode())
    if big:
        one = dataset.gzip_path.read_bytes()
        for export_id, least in BIG_IDS.items():
            copies = -(-least // len(one))
            digest = hashlib.sha256()
            path = dataset.file_path(export_id)
            handle, name = tempfile.mkstemp(prefix=".export-", suffix=".partial", dir=folder)
            with os.fdopen(handle, "wb") as out:
                for _ in range(copies):
                    out.write(one)
                    digest.update(one)
            os.chmod(name, 0o644)
            os.replace(name, path)
            document = export_document(export_id, path, count * copies, digest.hexdigest())
            _write(dataset.object_path(export_id), json.dumps(document).encode())
    _write(stamp, wanted.encode())
    return dataset


def _write(path: Path, data: bytes) -> None:
    """Atomically, readable by anyone (a static nginx's workers run as another user)."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.chmod(name, 0o644)
    os.replace(name, path)
