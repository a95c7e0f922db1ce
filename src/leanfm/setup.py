"""``leanfm setup``: prepare every offline cache once, so the first real job does not pay for it.

Converts SmolLM2's GGUF and Whisper tiny.en's CTranslate2 file to float checkpoints, extracts the Austen corpus
and checks the other offline resources (MiniLM, espeak-ng, Fashion-MNIST, Python docs). Gemma-3-270M is optional
(its five weight packages are not in ``make setup``): converted when its packages are installed, else reported as
missing with the pip command. Missing optional resources are reported, not fatal.
"""

from __future__ import annotations

import shutil

from leanfm.data.corpus import corpus
from leanfm.data.images import FASHION_MNIST_DIR, fashion_mnist
from leanfm.errors import LeanfmError
from leanfm.models import gemma, smollm2, whisper
from leanfm.models.registry import minilm_folder


def _status(check: object) -> str:
    try:
        result = check() if callable(check) else check
    except LeanfmError as err:
        return f"missing ({err})"
    return f"ok ({result})"


def prepare_caches() -> dict[str, str]:
    """Build the caches and return a ``{resource: status}`` table."""
    return {
        "smollm2-135m": _status(smollm2.ensure_checkpoint),
        "gemma3-270m": _gemma_status(),
        "austen corpus": _status(lambda: f"{len(corpus('austen', 'train')) + len(corpus('austen', 'eval')):,} chars"),
        "minilm-l6": _status(minilm_folder),
        "whisper-tiny-en": _status(whisper.ensure_checkpoint),
        "python docs": _status(lambda: f"{len(corpus('pydocs', 'eval')):,} chars in eval"),
        "espeak-ng": _status(lambda: shutil.which("espeak-ng") or _missing("espeak-ng", "espeak-ng")),
        "fashion-mnist": _status(
            lambda: f"{len(fashion_mnist('test')[1]):,} test images" if FASHION_MNIST_DIR.is_dir()
            else _missing("fashion-mnist", "dataset-fashion-mnist")
        ),
    }


def _gemma_status() -> str:
    """Gemma-3-270M is optional: converted once when its packages are installed; never fails setup."""
    if not gemma.installed() and not (gemma.checkpoint_dir() / "model.safetensors").is_file():
        return f"missing (optional: {gemma.INSTALL_COMMAND})"
    try:
        return f"ok ({gemma.ensure_checkpoint()})"
    except Exception as err:  # optional resource: report any failure (bad chunk, OOM, transformers) and go on
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"failed (optional; {type(err).__name__}: {first})"


def _missing(what: str, package: str) -> str:
    raise LeanfmError(f"{what} not found; install with 'apt-get install {package}'")
