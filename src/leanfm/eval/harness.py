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
    ratio: float | None = None
    threads: int = field(default_factory=torch.get_num_threads)
    versions: dict[str, str] = field(default_factory=versions)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; versions are flattened to ``<name>_version`` keys."""
        data = asdict(self)
        data.update({f"{k}_version": v for k, v in data.pop("versions").items()})
        return data


def _validate(seqlen: int, windows: int, batch_size: int, cloze: int) -> None:
    checks = (("seqlen", seqlen, 2), ("windows", windows, 1), ("batch_size", batch_size, 1), ("cloze", cloze, 0))
    for name, value, low in checks:
        if not isinstance(value, int) or value < low:
            raise LeanfmError(f"{name} {value!r} is invalid; accepted: an integer >= {low}")


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    name: str = "model",
    corpus_name: str = "austen",
    split: str = "eval",
    seqlen: int = 512,
    windows: int = 40,
    batch_size: int = 1,
    cloze: int = 100,
    speed: bool = True,
    decode_tokens: int = 32,
) -> EvalResult:
    """Score ``model`` on ``windows`` non-overlapping ``seqlen``-token windows of a corpus split.

    Also measures last-word cloze accuracy on ``cloze`` items of the same split (0 disables it) and, with
    ``speed``, prefill tokens/s (one ``batch_size x seqlen`` batch) and greedy decode tokens/s at batch 1.
    """
    _validate(seqlen, windows, batch_size, cloze)
    if not hasattr(model, "generate") or not hasattr(getattr(model, "config", None), "vocab_size"):
        raise LeanfmError(f"model '{name}' is not a causal language model; 'eval' needs one (e.g. smollm2-135m)")
    start = time.perf_counter()
    ids = split_token_ids(tokenizer, corpus_name, split)
    batch_windows = token_windows(ids, seqlen, windows)
    ppl = perplexity(model, batch_windows, batch_size=batch_size)
    accuracy, n_items = None, 0
    if cloze:
        items = cloze_items(corpus(corpus_name, split), count=cloze)
        n_items = len(items)
        accuracy = cloze_accuracy(model, tokenizer, items, batch_size=max(batch_size, 8)) if items else None
    prefill = decode = None
    if speed:
        prefill = prefill_tokens_per_s(model, batch_windows[:batch_size])
        decode = decode_tokens_per_s(model, batch_windows[:1, :32], new_tokens=decode_tokens)
    compression = getattr(model.config, "leanfm_compression", None) or {}
    return EvalResult(
        method=compression.get("method"), ratio=compression.get("ratio"),
        model=name, params=count_parameters(model), perplexity=ppl.perplexity, seqlen=seqlen, windows=ppl.windows,
        tokens=ppl.tokens, corpus=corpus_name, split=split,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        cloze_accuracy=accuracy, cloze_items=n_items, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode,
        peak_rss_mb=peak_rss_mb(), seconds=time.perf_counter() - start,
    )
