"""leanfm: make foundation models small, fast and adaptable on the hardware you have.

Library entry points mirror the CLI::

    import leanfm
    model, tokenizer = leanfm.load_model("smollm2-135m")
    result = leanfm.evaluate(model, tokenizer, seqlen=512, windows=40)
    print(result.perplexity)
"""

from leanfm.errors import LeanfmError
from leanfm.eval.harness import EvalResult, evaluate
from leanfm.models import compressed as _compressed  # noqa: F401  registers leanfm_* with transformers' Auto classes
from leanfm.models import list_models, load_model
from leanfm.version import __version__

__all__ = ["EvalResult", "LeanfmError", "__version__", "evaluate", "list_models", "load_model"]
