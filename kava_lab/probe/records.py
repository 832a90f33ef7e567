"""The command line and the JSON record shared by the probe scripts (scripts/kv_reach.py, hop_probe.py,
input_reach.py): one row per (run, split), merged into an existing file on request."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def probe_arguments(ap: argparse.ArgumentParser, limit: int) -> argparse.ArgumentParser:
    """Add the arguments every probe script takes: run folders, split, limit, threads, --out, --merge."""
    ap.add_argument("runs", nargs="+", help="trained latent run folders")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=limit)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in --out, replacing those of the same run and split")
    return ap


def write_rows(out: str | Path, rows: list[dict], merge: bool = False) -> None:
    """Write ``rows`` (each with ``run`` and ``split``) to ``out``; with ``merge``, keep the file's other rows."""
    out = Path(out)
    new = {(r["run"], r["split"]) for r in rows}
    kept = [r for r in json.loads(out.read_text()) if (r["run"], r["split"]) not in new] \
        if merge and out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept + rows, indent=1))
