"""`sync --db postgresql://...` against `psql \\copy` of the same export, in the same run, on the same server.

    .venv/bin/python bench/postgres_sync.py                 # 1,000,000 rows, 3 rounds (~3 min)
    .venv/bin/python bench/postgres_sync.py --rows 200000 --rounds 1

The upstream is bench/_upstream.py's static GoatCounter (nginx, or the standard library's server) serving a finished
CSV export of `--rows` realistic rows (bench/_data.py). PostgreSQL is a throw-away cluster (tests/postgres.py: initdb
in a temporary directory, fsync off for both contenders alike). Each round, in rotated order, into a new database:

- ours: `goatcounter-exports sync --format csv --db postgresql://...`: the download, its SHA-256, gunzip, COPY into
  a staging table, the typed insert into `pageview_rows` with its index, and the cursor, in one transaction;
- baseline: `zcat F.csv.gz | psql URL -c "\\copy pageviews from stdin (format csv, header)"` into a table of text
  columns with no index: the fastest a user could load the same file by hand.

Each database's row count is checked. The ratio is the baseline's seconds over ours (higher is better; the target
is >= 0.5x); medians of the rounds. Prints a Markdown table; nothing is written unless --out names a file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _data import Dataset, build  # noqa: E402
from _upstream import LOOPBACK, PythonUpstream, nginx_available, nginx_upstream  # noqa: E402
from speed import REPO, ours, run_timed, service_env, shell  # noqa: E402
from tests.postgres import Cluster  # noqa: E402

COLUMNS = [
    "path", "title", "event", "user_agent", "browser", "system", "session", "bot", "referrer", "referrer_scheme",
    "screen_size", "location", "first_visit", "date",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    psql = shutil.which("psql")
    if psql is None:
        raise SystemExit("psql is not installed (scripts/install-postgres)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    dataset = build(Path(tempfile.gettempdir()) / f"goatcounter-bench-{args.rows}", args.rows, big=False)
    seconds: dict[str, list[float]] = {"ours": [], "psql": []}
    try:
        with Cluster() as cluster, static_upstream(dataset, workdir) as upstream_url:
            for round_no in range(args.rounds):
                order = ["ours", "psql"] if round_no % 2 == 0 else ["psql", "ours"]
                for who in order:
                    url = cluster.new_database()
                    if who == "ours":
                        env = service_env(REPO, upstream_url, workdir / f"state-{round_no}")
                        ran = run_timed(ours("sync", "--format", "csv", "--db", url), env, workdir)
                        table = "pageviews"
                    else:
                        with psycopg.connect(url, autocommit=True) as db:
                            db.execute(f"create table pageviews ({', '.join(c + ' text' for c in COLUMNS)})")
                        copy = r"\copy pageviews from stdin (format csv, header)"
                        source = f"zcat {shlex.quote(str(dataset.gzip_path))}"
                        script = f"{source} | {psql} -q {shlex.quote(url)} -c {shlex.quote(copy)}"
                        ran = run_timed(shell(script), dict(os.environ), workdir)
                        table = "pageviews"
                    if ran.returncode != 0:
                        raise RuntimeError(f"{who} failed ({ran.returncode}):\n{ran.stderr[-2000:]}")
                    with psycopg.connect(url) as db:
                        row = db.execute(f"select count(*) from {table}").fetchone()  # noqa: S608
                    if row is None or row[0] != dataset.rows:
                        raise RuntimeError(f"{who} left {row} rows, not {dataset.rows}")
                    seconds[who].append(ran.seconds)
                    print(f"round {round_no + 1} {who}: {ran.seconds:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ours_s, psql_s = statistics.median(seconds["ours"]), statistics.median(seconds["psql"])
    table = "\n".join(
        [
            "| rows | `sync --db postgresql://` | `zcat \\| psql \\copy` | ratio (psql / ours; target >= 0.5x) |",
            "|---|---|---|---|",
            f"| {dataset.rows:,} | {ours_s:.2f} s | {psql_s:.2f} s | **{psql_s / ours_s:.2f}x** |",
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


@contextlib.contextmanager
def static_upstream(dataset: Dataset, workdir: Path) -> Iterator[str]:
    """The static GoatCounter's URL: nginx when installed, else the standard library's server."""
    if nginx_available():
        with nginx_upstream(dataset, workdir) as server:
            yield f"http://{LOOPBACK}:{server.port}"
    else:
        with PythonUpstream(dataset) as python_server:
            yield python_server.url


if __name__ == "__main__":
    raise SystemExit(main())
