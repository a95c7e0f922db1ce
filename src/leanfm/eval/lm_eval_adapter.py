"""lm-evaluation-harness adapter (optional extra ``leanfm[lm-eval]``).

Why: users compare models with lm-evaluation-harness. Any model leanfm can load (registered names, compressed
checkpoints) becomes an ``HFLM`` instance, registered in lm-eval as ``--model leanfm``
(``model_args: pretrained=<leanfm name or folder>``), and :func:`write_cloze_task` exports leanfm's offline
Austen cloze items as a local-file lm-eval task (``austen_cloze``: loglikelihood, ``acc`` = greedy match), so
the harness runs without any dataset hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leanfm.data.corpus import corpus
from leanfm.errors import LeanfmError
from leanfm.eval.cloze import cloze_items
from leanfm.paths import atomic_write_text

CLOZE_TASK = "austen_cloze"
_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise LeanfmError("lm-evaluation-harness is not installed; run 'pip install leanfm[lm-eval]'") from err
    return lm_eval, register_model, HFLM


def write_cloze_task(folder: Path, count: int = 100, split: str = "eval") -> Path:
    """Write the ``austen_cloze`` task (JSONL data + YAML) into ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    items = cloze_items(corpus("austen", split), count=count)
    data = folder / f"{CLOZE_TASK}.jsonl"
    atomic_write_text(data, "".join(json.dumps({"context": i.context, "target": i.target}) + "\n" for i in items))
    atomic_write_text(folder / f"{CLOZE_TASK}.yaml", _TASK_YAML.format(task=CLOZE_TASK, data=data.resolve()))
    return folder


def make_lm(name: str, batch_size: int = 8, dtype: str = "float32") -> Any:
    """An lm-eval ``HFLM`` wrapping the leanfm model ``name`` (registry name, folder or hub id)."""
    from leanfm.models import load_model

    _, _, hflm = _lm_eval()
    model, tokenizer = load_model(name, dtype=dtype)
    return hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def register() -> None:
    """Register ``--model leanfm`` with lm-eval (idempotent)."""
    _, register_model, _ = _lm_eval()
    from lm_eval.api import registry
    from lm_eval.models.huggingface import HFLM  # installed: _lm_eval checked

    if "leanfm" in getattr(registry, "MODEL_REGISTRY", {}):
        return

    @register_model("leanfm")
    class LeanfmLM(HFLM):
        """``pretrained`` is any name ``leanfm.load_model`` accepts."""

        def __init__(self, pretrained: str, batch_size: int | str = 8, dtype: str = "float32", **_: Any) -> None:
            from leanfm.models import load_model

            model, tokenizer = load_model(pretrained, dtype=dtype)
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size))


def run_cloze(name: str, folder: Path, limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Evaluate ``name`` on the local ``austen_cloze`` task through lm-eval; returns its metrics dict."""
    lm_eval, _, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    write_cloze_task(folder)
    results = lm_eval.simple_evaluate(
        model=make_lm(name, batch_size=batch_size), tasks=[CLOZE_TASK], limit=limit,
        task_manager=TaskManager(include_path=str(folder)), log_samples=False,
    )
    return results["results"][CLOZE_TASK]
