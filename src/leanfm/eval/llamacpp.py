"""The llama.cpp evaluation path: perplexity and speed of a GGUF through llama-cpp-python (issue 22).

Why here and not by llama.cpp's own ``perplexity`` tool: a number that compares with ``leanfm eval`` must come
from the same windows and the same NLL. So the windows are ``leanfm eval``'s (the harness's tokenizer, split and
:func:`leanfm.data.calibration.token_windows`); each is fed to llama.cpp as token ids with a fresh context
(the KV cache cleared), logits of every position are read back (``logits_all=True``) and the NLL is
:func:`leanfm.eval.perplexity.summed_nll` of those logits, exactly as for a PyTorch model.

Speed follows :mod:`leanfm.eval.speed`: prefill = one window with logits of the last position only (a second
context without ``logits_all``); decode = greedy tokens after a prompt at batch 1, the time of ``n`` tokens minus
the time of 1 (the prompt's prefill cancels), medians of ``repeats`` runs after a warm-up. Greedy is an argmax
over the last logits in numpy (what llama.cpp's greedy sampler does). ``threads`` sets llama.cpp's threads for
both single tokens and batches (default: torch's thread count, so both runtimes get the same cores).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.errors import LeanfmError
from leanfm.eval.harness import EvalConfig, EvalResult
from leanfm.eval.perplexity import PerplexityResult, summed_nll
from leanfm.eval.speed import median_seconds, peak_rss_mb
from leanfm.progress import progress

log = logging.getLogger(__name__)


def llama_cpp_module() -> Any:
    """The ``llama_cpp`` binding, or a one-line error saying how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise LeanfmError("llama-cpp-python is not installed; run 'pip install llama-cpp-python==0.3.36' "
                          "(built from source: needs cmake and a C++ compiler)") from None
    return llama_cpp


@contextlib.contextmanager
def _model_params(lib: Any, extra_buffers: bool) -> Iterator[None]:
    """Inside: ``Llama`` loads models with ``use_extra_bufts = extra_buffers`` (``Llama`` has no argument for it; it
    reads ``llama_model_default_params()`` of the low-level module, which is swapped here for the duration)."""
    low = lib.llama_cpp
    original = low.llama_model_default_params

    def params() -> Any:
        found = original()
        found.use_extra_bufts = extra_buffers
        return found

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def amx_kernels() -> bool:
    """Whether the installed llama.cpp was built with its AMX kernels (``AMX_INT8`` in its system info)."""
    return "AMX" in llama_cpp_module().llama_print_system_info().decode()


def open_gguf(path: str | Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = False,
              extra_buffers: bool | None = None, **options: Any) -> Any:
    """A ``llama_cpp.Llama`` for the GGUF at ``path`` on the CPU (one-line error if it does not load).

    ``extra_buffers`` (llama.cpp's extra buffer types: weights repacked at load for the CPU's SIMD, e.g. q4_0 into
    8-row interleaved blocks; measured here ~1.3x faster q4_0 decode) defaults to on unless the build has AMX
    kernels: llama-cpp-python 0.3.36 built natively on this machine (a Xeon VM with amx_int8) moves quantized
    weights into its AMX buffer and segfaults in ``ggml_backend_amx_mul_mat`` on the first q8_0/q4_0/q4_1 product
    (the shipped SmolLM2 Q4_1 file too). ``make setup`` builds llama.cpp with ``GGML_NATIVE=OFF`` and AVX-512 but
    no AMX, so the default is on there; another build with AMX gets it off (plain CPU buffers, no repacking).
    ``options`` go to ``Llama`` as they are (e.g. ``type_k=0, type_v=0``: a float32 KV cache instead of f16).
    """
    lib = llama_cpp_module()
    path = Path(path).expanduser()
    if not path.is_file():
        raise LeanfmError(f"GGUF file '{path}' does not exist; accepted: a file written by 'leanfm export --gguf'")
    threads = threads or torch.get_num_threads()
    try:
        with _model_params(lib, not amx_kernels() if extra_buffers is None else extra_buffers):
            return lib.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                             n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False,
                             **options)
    except ValueError as err:
        raise LeanfmError(f"llama.cpp could not load '{path}': {err}") from None


def window_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Logits ``[T, V]`` (float32) of every position of ``ids``, from an empty KV cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> PerplexityResult:
    """Perplexity of the GGUF at ``path`` on ``windows`` ``[N, T]`` (the harness's protocol, llama.cpp logits)."""
    llm = open_gguf(path, n_ctx=windows.shape[1], threads=threads, logits_all=True)
    if int(windows.max()) >= llm.n_vocab():
        raise LeanfmError(f"'{path}' has a vocabulary of {llm.n_vocab()} tokens, the windows use id "
                          f"{int(windows.max())}; accepted: a GGUF with the tokenizer's vocabulary (SmolLM2's)")
    total, start = 0.0, time.perf_counter()
    for window in progress(windows, desc="perplexity (llama.cpp)", total=windows.shape[0]):
        logits = torch.from_numpy(window_logits(llm, window.tolist()))[None, :-1]  # [1, T-1, V]
        total += float(summed_nll(logits, window[None, 1:]).double().sum())
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    if not math.isfinite(total):
        raise FloatingPointError("non-finite NLL: llama.cpp produced NaN/inf logits")
    return PerplexityResult(math.exp(total / tokens), total, tokens, windows.shape[0], time.perf_counter() - start)


def greedy(llm: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt`` (fresh cache; no stop at end-of-text, as the speed runs)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for step in range(new_tokens):
        token = int(np.argmax(last_logits(llm)))
        out.append(token)
        if step + 1 < new_tokens:
            llm.eval([token])
    return out


def last_logits(llm: Any) -> np.ndarray:
    """The logits of the last evaluated position (works with and without ``logits_all``)."""
    lib = llama_cpp_module()
    pointer = lib.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def gguf_decode_tokens_per_s(path: str | Path, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3,
                             threads: int | None = None) -> float:
    """Greedy decode tokens/s at batch 1, ``(n - 1) / (t(n) - t(1))`` (as :mod:`leanfm.eval.speed` measures it)."""
    prompt = prompt_ids.reshape(-1).tolist()
    llm = open_gguf(path, n_ctx=len(prompt) + new_tokens + 1, threads=threads)
    full = median_seconds(lambda: greedy(llm, prompt, new_tokens), repeats=repeats)
    first = median_seconds(lambda: greedy(llm, prompt, 1), repeats=repeats)
    return (new_tokens - 1) / max(full - first, 1e-9)


def gguf_prefill_tokens_per_s(path: str | Path, ids: torch.Tensor, repeats: int = 3,
                              threads: int | None = None) -> float:
    """Tokens/s of one forward over ``ids`` (one window) with logits of the last position only."""
    window = ids.reshape(-1).tolist()
    llm = open_gguf(path, n_ctx=len(window), threads=threads)

    def run() -> None:
        llm.reset()
        llm.eval(window)

    return len(window) / median_seconds(run, repeats=repeats)


def alternating_speeds(paths: dict[str, Path], prompt_ids: torch.Tensor, window_ids: torch.Tensor,
                       new_tokens: int = 64, rounds: int = 3,
                       threads: int | None = None) -> dict[str, list[tuple[float, float]]]:
    """Decode and prefill tokens/s of several GGUFs measured in alternating rounds (every file once per round,
    all loaded at once): on a shared, noisy machine a slow minute hits every file of that round alike, so
    per-round ratios stay meaningful where separate runs do not. Per file: ``rounds`` pairs ``(decode, prefill)``;
    decode = ``(n - 1) / (t(n) - t(1))`` greedy at batch 1 after ``prompt_ids``, prefill = one forward over
    ``window_ids`` (last-position logits). One warm-up round is not counted."""
    prompt, window = prompt_ids.reshape(-1).tolist(), window_ids.reshape(-1).tolist()
    n_ctx = max(len(window), len(prompt) + new_tokens + 1)
    llms = {name: open_gguf(path, n_ctx=n_ctx, threads=threads) for name, path in paths.items()}

    def measure(llm: Any) -> tuple[float, float]:
        start = time.perf_counter()
        greedy(llm, prompt, 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        greedy(llm, prompt, new_tokens)
        full = time.perf_counter() - start
        start = time.perf_counter()
        llm.reset()
        llm.eval(window)
        prefill = time.perf_counter() - start
        return (new_tokens - 1) / max(full - first, 1e-9), len(window) / prefill

    for llm in llms.values():
        measure(llm)  # warm-up
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in llms}
    for _ in range(rounds):
        for name, llm in llms.items():
            out[name].append(measure(llm))
    for llm in llms.values():
        llm.close()
    return out


def gguf_parameters(path: str | Path) -> tuple[int, str]:
    """Parameters stored in the GGUF (a tied embedding counts once: it is one tensor) and its file type."""
    from gguf import GGUFReader

    reader = GGUFReader(Path(path))
    params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    kinds = {t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) > 1 and t.name != "token_embd.weight"}
    return params, "+".join(sorted(kinds))


def evaluate_gguf(path: str | Path, tokenizer: Any, config: EvalConfig | None = None, threads: int | None = None,
                  **settings: Any) -> EvalResult:
    """``leanfm eval`` of a GGUF through llama.cpp: same windows and schema as :func:`leanfm.eval.harness.evaluate`.

    Cloze accuracy is not measured (``cloze_accuracy`` None, ``cloze_items`` 0); ``dtype`` is the GGML type(s)
    of the block matrices (e.g. ``q4_0``); ``threads`` is llama.cpp's.
    """
    config = config or EvalConfig.from_dict(settings)
    start = time.perf_counter()
    threads = threads or torch.get_num_threads()
    ids = split_token_ids(tokenizer, config.corpus, config.split)
    windows = token_windows(ids, config.seqlen, config.windows)
    ppl = gguf_perplexity(path, windows, threads=threads)
    prefill = decode = None
    if config.speed:
        prefill = gguf_prefill_tokens_per_s(path, windows[0], threads=threads)
        decode = gguf_decode_tokens_per_s(path, windows[0, :32], new_tokens=config.decode_tokens, threads=threads)
    params, kind = gguf_parameters(path)
    return EvalResult(
        model=str(path), params=params, perplexity=ppl.perplexity, seqlen=config.seqlen, windows=ppl.windows,
        tokens=ppl.tokens, corpus=config.corpus, split=config.split, dtype=kind, cloze_accuracy=None,
        cloze_items=0, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode, peak_rss_mb=peak_rss_mb(),
        seconds=time.perf_counter() - start, threads=threads,
    )
