"""The evaluation harness: perplexity, cloze accuracy and speed of a causal LM in one call.

Every method's benchmark goes through :func:`evaluate`, so dense and compressed models are always scored on
the same windows, the same cloze items and the same speed protocol.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from leanfm.config import MethodConfig, option
from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.data.corpus import corpus
from leanfm.errors import LeanfmError
from leanfm.eval.cloze import cloze_accuracy, cloze_items
from leanfm.eval.perplexity import perplexity
from leanfm.eval.speed import decode_tokens_per_s, peak_rss_mb, prefill_tokens_per_s
from leanfm.version import __version__


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def versions() -> dict[str, str]:
    """Versions of leanfm and the libraries a result depends on, recorded beside every result."""
    return {
        "leanfm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class EvalResult:
    """What ``leanfm eval`` reports; ``to_dict`` is the JSON schema (flat, one level)."""

    model: str
    params: int
    perplexity: float
    seqlen: int
    windows: int
    tokens: int
    corpus: str
    split: str
    dtype: str
    cloze_accuracy: float | None
    cloze_items: int
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    peak_rss_mb: float
    seconds: float
    method: str | None = None  # compression method recorded in a leanfm checkpoint's config
    ratio: float | None = None  # the requested fraction of block parameters
    achieved_ratio: float | None = None  # block parameters removed, as achieved (recorded at compression)
    whole_model_ratio: float | None = None  # all parameters removed, embedding and head included
    threads: int = field(default_factory=torch.get_num_threads)
    versions: dict[str, str] = field(default_factory=versions)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; versions are flattened to ``<name>_version`` keys."""
        data = asdict(self)
        data.update({f"{k}_version": v for k, v in data.pop("versions").items()})
        return data


@dataclass
class EvalConfig(MethodConfig):
    """What :func:`evaluate` measures; the defaults of ``leanfm eval``'s flags."""

    corpus: str = option("austen", "corpus name: austen or pydocs")
    split: str = option("eval", "corpus split: eval, calib, train, novel:<name>")
    seqlen: int = option(512, "tokens per window")
    windows: int = option(40, "non-overlapping windows scored")
    batch_size: int = option(1, "windows per forward pass")
    cloze: int = option(100, "cloze items to score, 0 to skip")
    speed: bool = option(True, "measure prefill/decode throughput")
    decode_tokens: int = option(32, "greedy tokens per decode-speed run", cli=False)
    fast_decode: bool = option(False, "decode speed through leanfm's fast path (fused, compiled) not generate()")

    def validate(self) -> None:
        super().validate()
        checks = (("seqlen", self.seqlen, 2), ("windows", self.windows, 1), ("batch_size", self.batch_size, 1),
                  ("cloze", self.cloze, 0), ("decode_tokens", self.decode_tokens, 1))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LeanfmError(f"{name} {value!r} is invalid; accepted: an integer >= {low}")


def evaluate(model: nn.Module, tokenizer: Any, config: EvalConfig | None = None, *, name: str = "model",
             corpus_name: str | None = None, **settings: Any) -> EvalResult:
    """Score ``model`` on ``windows`` non-overlapping ``seqlen``-token windows of a corpus split.

    Also measures last-word cloze accuracy on ``cloze`` items of the same split (0 disables it) and, with
    ``speed``, prefill tokens/s (one ``batch_size x seqlen`` batch, last-position logits as a server computes
    them) and greedy decode tokens/s at batch 1. A leanfm checkpoint also reports its requested ratio and the
    achieved block and whole-model ratios recorded when it was compressed.
    Settings come as an :class:`EvalConfig` or as its fields (``seqlen=256, windows=4``).
    """
    if corpus_name is not None:
        settings["corpus"] = corpus_name
    config = config or EvalConfig.from_dict(settings)
    if not hasattr(model, "generate") or not hasattr(getattr(model, "config", None), "vocab_size"):
        raise LeanfmError(f"model '{name}' is not a causal language model; 'eval' needs one (e.g. smollm2-135m)")
    start = time.perf_counter()
    ids = split_token_ids(tokenizer, config.corpus, config.split)
    batch_windows = token_windows(ids, config.seqlen, config.windows)
    ppl = perplexity(model, batch_windows, batch_size=config.batch_size)
    accuracy, n_items = None, 0
    if config.cloze:
        items = cloze_items(corpus(config.corpus, config.split), count=config.cloze)
        n_items = len(items)
        accuracy = cloze_accuracy(model, tokenizer, items, batch_size=max(config.batch_size, 8)) if items else None
    prefill = decode = None
    if config.speed:
        prefill = prefill_tokens_per_s(model, batch_windows[: config.batch_size])
        decode = decode_tokens_per_s(model, batch_windows[:1, :32], new_tokens=config.decode_tokens,
                                     fast=config.fast_decode)
    compression = getattr(model.config, "leanfm_compression", None) or {}
    return EvalResult(
        method=compression.get("method"), ratio=compression.get("ratio"),
        achieved_ratio=compression.get("achieved_ratio"), whole_model_ratio=compression.get("whole_model_ratio"),
        model=name, params=count_parameters(model), perplexity=ppl.perplexity, seqlen=config.seqlen,
        windows=ppl.windows, tokens=ppl.tokens, corpus=config.corpus, split=config.split,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        cloze_accuracy=accuracy, cloze_items=n_items, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode,
        peak_rss_mb=peak_rss_mb(), seconds=time.perf_counter() - start,
    )
