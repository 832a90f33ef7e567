"""Print the README's results table from run folders: python scripts/results_table.py runs/results"""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results")
methods = ["cot", "nocot", "codi", "pccot", "kava"]
print("| method | trace | accuracy | forward passes / question | CPU latency ms / question | KV bytes / question | n | train time |")
print("|---|---|---|---|---|---|---|---|")
for trace in ("equation", "nl"):
    for m in methods:
        run = root / f"{m}-{trace}"
        if not (run / "eval.json").exists():
            print(f"| {m} | {trace} | (missing) | | | | | |")
            continue
        e = json.loads((run / "eval.json").read_text())
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        train_s = sum(r["step_time_s"] for r in metrics)
        print(f"| {m} | {trace} | {100 * e['accuracy']:.1f}% | {e['forward_passes']:.1f} | {e['latency_ms']:.2f} | "
              f"{e['kv_bytes'] / 1024:.0f} KiB | {e['n']} | {train_s / 60:.1f} min |")
