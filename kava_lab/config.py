"""Typed run configuration, the five methods as settings of one objective, and named presets.

A :class:`RunConfig` is saved as ``config.json`` in every run folder and can be rebuilt from it, so a run
folder says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .backbone import TinyConfig
from .encoding import EncodingConfig

METHODS = ("cot", "nocot", "codi", "pccot", "kava")


@dataclass(frozen=True)
class LatentConfig:
    mode: str = "jacobi"  # "jacobi" (PCCoT / KaVa), "sequential" (CODI), "none" (cot, nocot)
    M: int = 24  # latent slots
    T: int = 3  # Jacobi iterations (ignored in sequential mode)
    # training only: each step draws its Jacobi iterations uniformly from T_min..T (one draw per batch), so the
    # loop is trained as an iteration the answer can read after any pass; evaluation runs T. None: always T.
    T_min: int | None = None
    projection: bool = True  # Linear-GELU-Linear-LayerNorm on last-layer hidden states; False: identity
    # what a latent pass feeds the next: "projection" (Projection(h), the paper) or "soft_token" (the mixture of
    # token embeddings the model's own LM head predicts from h, softmax(logits(h) / tau) @ E: an input of the
    # kind the teacher's CoT positions get; kava_lab.student.SoftToken)
    input: str = "projection"
    tau: float = 1.0  # soft_token temperature


@dataclass(frozen=True)
class CompressConfig:
    method: str = "rkv"  # rkv, attention, redundancy, crop, stride, random, knorm
    lam: float = 0.1  # S = lam * importance + (1 - lam) * redundancy
    order: str = "time"  # slot j <- j-th kept entry in time order ("score": by score)
    seed: int = 0  # for "random"
    # what one kept set of CoT positions serves: "head" (each layer and KV head its own, R-KV and the paper),
    # "layer" (one set per layer, scores averaged over its KV heads), "all" (one set for the whole cache: slot j
    # is one CoT token in every layer and head, a target one latent's residual stream can write;
    # kava_lab.compress.scope_scores)
    scope: str = "head"


@dataclass(frozen=True)
class LossConfig:
    kv_loss: str = "smooth_l1"  # smooth_l1, l1, mse
    layer_std: bool = True  # divide each layer's KV residual by the std of that layer's teacher target
    a1: float = 10.0  # CODI hidden-state distillation weight
    a2: float = 1.0  # KV distillation weight
    # weight of teacher CE (the teacher is the same model); 0: the shared model is not trained on CoT during
    # distillation and the teacher pass runs without a graph (no teacher backward)
    teacher_weight: float = 1.0
    # which weights the teacher pass runs on: "shared" (the model being trained, the paper) or "frozen" (a copy
    # of the model as training starts, the stage-0 teacher for from-scratch presets, never updated: stable
    # targets and no teacher backward, at the cost of a second copy of the weights)
    teacher: str = "shared"
    # CODI residual scale per layer: "global" = std of the teacher's anchor states over batch and hidden dims
    # (CODI's own code); "examples" = their spread across examples (root mean over dims of the variance over
    # the batch), which measures the residual against what differs between problems
    codi_norm: str = "global"
    # keys compared by the KV loss: "post_rope" (as the cache holds them, the paper's default) or "pre_rope"
    # (both sides rotated back to position 0, so a latent slot need not reproduce its CoT token's position)
    kv_keys: str = "post_rope"
    # weight of each kept entry in the KV loss: "uniform" (the paper) or "importance" (the attention the
    # teacher's answer pays to that entry, normalised to mean 1 over each example's layer and head: the
    # entries the answer reads dominate the term; kava_lab.losses.importance_weights)
    kv_weight: str = "uniform"
    # step-level auxiliary loss (SIM-CoT-style, kava_lab.step_loss): each replaced CoT step decoded from one
    # latent alone; 0 = off (every preset)
    a_step: float = 0.0
    # optimizer steps at the start during which the student's answer CE is computed and logged but left out of
    # the loss: a warm-up in which only the teacher CE and the distillation terms (KV, CODI) train, so the
    # latents learn their target before the answer learns to use (or bypass) them; 0 = off (every preset)
    answer_after: int = 0
    # read-out loss: the answer CE computed a second time with the latent slots' K/V replaced by the (detached)
    # compressed KV target, placed as loss.kv_keys compares them (the `target` oracle's layout), so the answer
    # pass learns to read target-like latents; training only, never at evaluation. Not scaled by the
    # answer_after warm-up. 0 = off (every preset)
    a_target: float = 0.0
    # teacher-forced latent pass: the final latent inputs run once more over [question, <bot>, target in the M
    # slots] (detached), slot j reading the question, the target slots < j and itself, and the KV loss (same keys,
    # weights, normalisation) compares what they write with the target: each slot learns its target from the
    # true compressed past. Training only. 0 = off (every preset)
    a_tf: float = 0.0
    # direct-route loss: the answer CE computed a second time with the M latent slots masked out of the answer's
    # attention (it reads [question, <bot>] and its own tokens, as No-CoT reads its question), so the route that
    # answers without latents stays trained beside the one through them. Training only. 0 = off (every preset)
    a_direct: float = 0.0
    # first layer the KV loss (and its floor, and a_tf's term) compares: 0 = every layer (the paper). With
    # pre-RoPE keys a latent's layer-0 K/V are a linear map of its normalised input alone ([W_k; W_v] is square
    # on the tiny preset), so a layer-0 target prescribes the input itself; 1 leaves the input free to carry
    # the loop's state
    kv_from_layer: int = 0


@dataclass(frozen=True)
class CurriculumConfig:
    """Replace CoT steps by latents stage by stage (Coconut-style; off by default and in the paper presets).

    Optimizer step ``t`` is in stage ``s = t // stage_steps``. For ``s < stages`` the latents replace only the
    first ``s`` CoT steps: the rest of the CoT is written after ``<eot>`` and trained with CE, and the KV target
    covers only the replaced steps' tokens. From ``stages * stage_steps`` on the latents replace the whole CoT
    (the ordinary student). Evaluation always uses the ordinary student."""

    stages: int = 0  # 0: off
    stage_steps: int = 0

    def latent_steps(self, step: int) -> int | None:
        """CoT steps the latents replace at optimizer step ``step`` (0-based); None: all of them."""
        if self.stages <= 0 or self.stage_steps <= 0:
            return None
        stage = step // self.stage_steps
        return stage if stage < self.stages else None


@dataclass(frozen=True)
class LoraSettings:
    enabled: bool = False  # False: full fine-tuning (tiny preset)
    r: int = 128
    alpha: int = 32
    dropout: float = 0.1
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class DataConfig:
    train: str = "synthetic"
    train_split: str | None = "train"
    train_limit: int | None = 4000
    # problems the cached stage 0 trains on (None: train_limit): a run can see more problems than its stage 0
    stage0_train_limit: int | None = None
    eval: str = "synthetic"
    eval_split: str | None = "test"
    eval_limit: int | None = 300
    trace: str = "nl"  # "equation" (GSM8k-AUG style) or "nl" (GSM8k-AUG-NL style)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    steps: int = 600  # optimizer steps
    batch_size: int = 32  # per device, per micro-step
    effective_batch: int = 32  # batch_size * processes * accumulation
    grad_clip: float = 2.0
    bf16: bool = True  # autocast on CUDA only (on the 2-core CPU, bf16 autocast made a KaVa step 0.82x as fast)
    group_by_length: bool = False  # batches of similar length (train._grouped_epoch): less padding, other batches;
    # never applied to stage 0 (grouped, its two trace styles split into separate batches: CoT 28.0% vs 92.0%)
    compile: bool = False  # torch.compile each decoder layer's MLP and norms (backbone.compile_blocks); for long
    # runs: ~40 s of compilation (cold cache), then 1.05-1.18x per tiny KaVa step on CPU (bench_train / bench_vs_commit)


@dataclass(frozen=True)
class RunConfig:
    preset: str = "tiny"
    method: str = "kava"
    backbone: str = "tiny"
    tiny: TinyConfig = field(default_factory=TinyConfig)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage0_steps: int = 0  # >0: first train the from-scratch backbone with CoT (cached, shared by methods)
    stage0_lr: float | None = None  # stage-0 learning rate (None: optim.lr)
    log_every: int = 10
    save_every: int = 200
    max_new_tokens: int = 96  # generation budget at evaluation (CoT needs the most)

    @property
    def uses_latents(self) -> bool:
        return self.latent.mode != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return _build(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); the run "
                             "config is truncated or corrupt") from exc
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc


def non_default(obj) -> dict:
    """The fields of a (nested) config dataclass that differ from their defaults: a cache key that a new
    field with a default does not change."""
    default = type(obj)()
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sub = non_default(value)
            if sub or not isinstance(getattr(default, f.name), type(value)):
                out[f.name] = sub
        elif value != getattr(default, f.name):
            out[f.name] = value
    return out


def _build(cls, data: dict):
    """Rebuild nested frozen dataclasses from a dict, rejecting unknown fields by name."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}; expected {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def with_method(cfg: RunConfig, method: str) -> RunConfig:
    """The kava-method.md §4 table: every method is a setting of one objective."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    latent, loss = cfg.latent, cfg.loss
    if method in ("cot", "nocot"):
        latent = replace(latent, mode="none")
        loss = replace(loss, a1=0.0, a2=0.0)
    elif method == "codi":
        latent = replace(latent, mode="sequential", M=6)
        loss = replace(loss, a1=cfg.loss.a1 if cfg.loss.a1 else 10.0, a2=0.0)
    elif method == "pccot":
        latent = replace(latent, mode="jacobi")
        loss = replace(loss, a1=1.0, a2=0.0)
    else:  # kava
        latent = replace(latent, mode="jacobi")
    return replace(cfg, method=method, latent=latent, loss=loss)


# ---------------------------------------------------------------------------------------------- presets

def _tiny() -> RunConfig:
    return RunConfig(
        preset="tiny", backbone="tiny", stage0_steps=1200, stage0_lr=2e-3,
        data=DataConfig(train="synthetic", train_limit=20000, eval="synthetic", eval_limit=300, trace="nl"),
        latent=LatentConfig(M=12, T=3),
        loss=LossConfig(a1=10.0, a2=1.0),
        # 800 steps (was 400), chosen on the validation split (results/tiny-*.json, 3 seeds): at 400 steps KaVa
        # ignored its latents (donor swap -1.7 points) and trailed No-CoT (37.7% vs 41.3%); at 800 it reads them
        # (donor swap -12.7 +- 0.6) and is level with No-CoT (57.8 +- 1.7% vs 56.0 +- 0.3%). The KV settings
        # pre_rope + importance + a2=10 make it read them more (-25.1 +- 1.6) but answer less (50.7 +- 1.5%).
        optim=OptimConfig(lr=1e-3, steps=800, batch_size=32, effective_batch=32, warmup_ratio=0.03),
        max_new_tokens=160,  # a 6-step NL trace and its answer take up to ~105 tokens (96 truncated them)
    )


def _smollm2() -> RunConfig:
    return RunConfig(
        preset="smollm2-135m", backbone="smollm2-135m",
        data=DataConfig(train="gsm8k-aug", train_split="middletrain", train_limit=None, eval="gsm8k",
                        eval_split="test", eval_limit=None, trace="equation"),
        latent=LatentConfig(M=24, T=3),
        lora=LoraSettings(enabled=True, r=128, alpha=32, dropout=0.1),
        optim=OptimConfig(lr=8e-4, steps=3000, batch_size=32, effective_batch=128),
        loss=LossConfig(kv_loss="smooth_l1", a1=10.0, a2=1.0),
        max_new_tokens=256,
    )


def _paper(backbone: str, trace: str, lr: float, epochs_steps: int, kv_loss: str, a1: float, a2: float) -> RunConfig:
    data = DataConfig(train="whynlp/gsm8k-aug" if trace == "equation" else "whynlp/gsm8k-aug-nl",
                      train_split="train", train_limit=None, eval="gsm8k", eval_split="test", eval_limit=None,
                      trace=trace)
    return RunConfig(
        preset="paper", backbone=backbone, data=data, latent=LatentConfig(M=24, T=3),
        lora=LoraSettings(enabled=True, r=128, alpha=32, dropout=0.1),
        loss=LossConfig(kv_loss=kv_loss, layer_std=True, a1=a1, a2=a2),
        optim=OptimConfig(lr=lr, steps=epochs_steps, batch_size=16, effective_batch=128, grad_clip=2.0),
        max_new_tokens=256,
    )


# 385,620 training examples / 128 per step = 3,013 steps per epoch.
_EPOCH = 3013
PRESETS = {
    "tiny": _tiny,
    "smollm2-135m": _smollm2,
    "llama1b-aug": lambda: _paper("meta-llama/Llama-3.2-1B-Instruct", "equation", 8e-4, 10 * _EPOCH, "smooth_l1", 10, 1),
    "llama1b-aug-nl": lambda: _paper("meta-llama/Llama-3.2-1B-Instruct", "nl", 8e-4, 10 * _EPOCH, "mse", 10, 1),
    "qwen0.5b-aug": lambda: _paper("Qwen/Qwen2.5-0.5B-Instruct", "equation", 5e-4, 10 * _EPOCH, "mse", 10, 1),
    "qwen0.5b-aug-nl": lambda: _paper("Qwen/Qwen2.5-0.5B-Instruct", "nl", 8e-4, 10 * _EPOCH, "mse", 10, 1),
    "llama3b-aug": lambda: _paper("meta-llama/Llama-3.2-3B-Instruct", "equation", 2e-4, 5 * _EPOCH, "smooth_l1", 20, 2),
    "llama3b-aug-nl": lambda: _paper("meta-llama/Llama-3.2-3B-Instruct", "nl", 2e-4, 5 * _EPOCH, "mse", 20, 2),
}


def get_preset(name: str, method: str = "kava", trace: str | None = None, seed: int = 0,
               steps: int | None = None) -> RunConfig:
    """A named preset with the method's settings applied; ``trace`` and ``steps`` override when given."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    cfg = replace(PRESETS[name](), preset=name, seed=seed)
    if trace is not None:
        if trace not in ("equation", "nl"):
            raise ValueError(f"trace must be 'equation' or 'nl', found {trace!r}")
        cfg = replace(cfg, data=replace(cfg.data, trace=trace))
    if steps is not None:
        cfg = replace(cfg, optim=replace(cfg.optim, steps=steps))
    return with_method(cfg, method)


def _parse_value(text: str, current, where: str):
    """Parse ``text`` as the type of the field's current value (bool, int, float, str, tuple, None)."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    try:
        if isinstance(current, bool):
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            return tuple(json.loads(text))
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"override {where}: expected a {type(current).__name__}, found {text!r}") from None
    if current is None:  # optional fields: take numbers as numbers
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """``["latent.T=6", "data.train=synthetic:3-6", "optim.steps=1600"]`` -> a new config (unknown keys raise)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. latent.T=6")
        path = key.strip().split(".")

        def set_in(obj, names):
            names_known = {f.name for f in fields(obj)}
            if names[0] not in names_known:
                raise ValueError(f"override {item!r}: {type(obj).__name__} has no field {names[0]!r}; "
                                 f"expected one of {sorted(names_known)}")
            current = getattr(obj, names[0])
            if len(names) == 1:
                return replace(obj, **{names[0]: _parse_value(text, current, item)})
            if not dataclasses.is_dataclass(current):
                raise ValueError(f"override {item!r}: {names[0]!r} is not a section")
            return replace(obj, **{names[0]: set_in(current, names[1:])})

        cfg = set_in(cfg, path)
    return cfg
