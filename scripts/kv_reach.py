"""Which latent slots does a trained student reach? Its latent values against their compressed target, slot by
slot and layer by layer, over a content-free floor.

    python scripts/kv_reach.py runs/exp/s47-kava-combo-4800 [runs/exp/OTHER ...] --limit 300 \
        --out results/probes/kv-reach-s47.json [--merge]

For each run, on its task's validation problems: the run's own compressor builds the target from the teacher
pass (the same model reading the gold CoT), the student's latent loop writes its values, and
:func:`kava_lab.probe.value_reach` gives distance / floor per layer and slot (slots in CoT time order: slot j
holds the j-th kept entry, so later slots come from later CoT steps). A ratio rising with the slot index says
the student reaches the early steps of the walk and not the later ones (serial depth); a flat ratio says the
limit is elsewhere. Values only: keys carry RoPE positions, so their distance mixes position with content.
It also reports how often a target slot holds one CoT token in every KV head of a layer, and in every layer
and head (``compress.scope``: per-head R-KV keeps different tokens in each head).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab import probe  # noqa: E402
from kava_lab.loaders import load_examples  # noqa: E402
from kava_lab.probe.records import probe_main  # noqa: E402
from kava_lab.runs import load_run, target_teacher  # noqa: E402


def reach(run_dir: str, split: str, limit: int) -> dict:
    t0 = time.perf_counter()
    student, backbone, cfg = load_run(run_dir)
    examples = load_examples(cfg.data.eval, split=split, trace=cfg.data.trace, limit=limit)
    data = probe.collect(student, backbone, cfg, examples, batch_size=64, teacher=target_teacher(cfg, student))
    r = probe.value_reach(data.student_values, data.teacher_values, data.slot_mask, kind=cfg.loss.kv_loss)
    idx, valid = data.kept_indices, data.slot_mask[:, None, :]  # [B, L, H, M], [B, 1, M]
    same_heads = float(((idx == idx[:, :, :1]).all(2) & valid).sum() / (valid.sum() * idx.shape[1]).clamp(min=1))
    same_layers = float(((idx == idx[:, :1, :1]).flatten(1, 2).all(1) & data.slot_mask).sum()
                        / data.slot_mask.sum().clamp(min=1))
    return {"run": Path(run_dir).name, "split": split, "n": len(examples), "M": data.M,
            "compressor": data.compressor, "scope": cfg.compress.scope,
            "same_token_across_heads": same_heads, "same_token_across_cache": same_layers,
            **r.summary(), "ratio_by_layer_slot": r.ratio.tolist(),
            "seconds": round(time.perf_counter() - t0, 1)}


def show(row: dict, args) -> None:
    slots = " ".join(f"{x:.2f}" for x in row["ratio_by_slot"])
    layers = " ".join(f"{x:.2f}" for x in row["ratio_by_layer"])
    print(f"{row['run']}: value distance / floor {row['ratio']:.3f} (n={row['n']}, {row['seconds']} s)\n"
          f"  by slot (CoT time order): {slots}\n  valid examples per slot: {row['count']}\n"
          f"  by layer: {layers}\n  target slots holding one CoT token in every head of a layer: "
          f"{row['same_token_across_heads']:.1%}, in every layer and head: {row['same_token_across_cache']:.1%}")


def main(argv=None) -> list[dict]:
    return probe_main(argv, __doc__, 300, lambda run, a: reach(run, a.split, a.limit), show)


if __name__ == "__main__":
    main()
