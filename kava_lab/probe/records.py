"""The command line and the JSON record shared by the probe scripts (scripts/kv_reach.py, hop_probe.py,
input_reach.py, step_decode.py): one row per (run, split), merged into an existing file on request."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


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


def probe_main(argv, doc: str, limit: int, one: Callable[[str, argparse.Namespace], dict],
               show: Callable[[dict, argparse.Namespace], None],
               extend: Callable[[argparse.ArgumentParser], None] | None = None) -> list[dict]:
    """A probe script's command line: parse (the shared arguments, then ``extend``'s), set torch's threads, compute
    ``one(run, args)`` for every run folder, ``show`` each row, write them to ``--out``; returns the rows."""
    import torch

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    probe_arguments(ap, limit)
    if extend is not None:
        extend(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        rows.append(one(run, args))
        show(rows[-1], args)
    if args.out:
        write_rows(args.out, rows, args.merge)
    return rows
