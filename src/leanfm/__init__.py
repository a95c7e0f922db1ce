"""leanfm: make foundation models small, fast and adaptable on the hardware you have.

Library entry points mirror the CLI::

    import leanfm
    model, tokenizer = leanfm.load_model("smollm2-135m")
    result = leanfm.evaluate(model, tokenizer, seqlen=512, windows=40)
    print(result.perplexity)
"""

from typing import TYPE_CHECKING, Any

from leanfm.config import MethodSpec
from leanfm.config import list_methods as _list_methods
from leanfm.errors import LeanfmError
from leanfm.models import compressed as _compressed  # noqa: F401  registers leanfm_* with transformers' Auto classes
from leanfm.models import list_models, load_model
from leanfm.version import __version__

if TYPE_CHECKING:
    from leanfm.eval.harness import EvalResult, evaluate

__all__ = ["EvalResult", "LeanfmError", "__version__", "evaluate", "list_methods", "list_models", "load_model"]


def __getattr__(name: str) -> Any:
    """``leanfm.evaluate`` / ``leanfm.EvalResult`` are imported on first use: the evaluation harness (speed,
    cloze, lm-eval glue) is half of ``import leanfm``'s time, and most importers never evaluate."""
    if name in ("EvalResult", "evaluate"):
        from leanfm.eval import harness

        return getattr(harness, name)
    raise AttributeError(f"module 'leanfm' has no attribute '{name}'")


def list_methods(family: str | None = None) -> list[MethodSpec]:
    """Every registered method (optionally of one family), after importing the method packages that register them.

    ``import leanfm`` stays light (no method is imported until asked for); this is the one place that loads them all.
    """
    import leanfm.adapt
    import leanfm.align
    import leanfm.audit
    import leanfm.compress
    import leanfm.decode
    import leanfm.vision  # noqa: F401  (each package registers its methods on import)

    return _list_methods(family)
