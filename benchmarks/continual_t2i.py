"""Continual text-to-image customisation: sequential LoRA vs C-LoRA vs STAMINA over 10 and 30 held-out concepts.

    nice -n 5 python benchmarks/continual_t2i.py --threads 1                 # the grid on artifacts/t2i-emoji-shapes
    python benchmarks/continual_t2i.py --plan 10:clora@token_init=word 30:stamina@steps=150
    python benchmarks/continual_t2i.py --smoke                               # a tiny random base, end to end, < 3 min
    nice -n 5 python benchmarks/continual_t2i.py --validate                  # tune lambda and beta (validation rows)

Rows are ``SEQUENCE:METHOD[@field=value,...]`` (``SEQUENCE``: the number of held-out concepts, taken in the fixed
order, or ``val``: the validation sequence; fields of :class:`leanfm.adapt.t2i_continual.T2IContinualConfig`).

Validation (``--validate``, or ``val:`` rows): the methods' own settings are chosen on held-out emoji 31-40
(:data:`VALIDATION`), which neither test sequence (the first 10, the first 30) contains, never on a test sequence.
Rule: the highest mean recognised fraction after the whole sequence, ties broken by the lower final KID. The
default grids are C-LoRA's λ (:data:`REG_GRID`; λ = 0 is sequential LoRA with C-LoRA's token) and STAMINA's β
(:data:`SPARSITY_GRID`); the validation section also gives the raw penalty each unregularised (λ = 0) concept
update would have paid against the earlier ones, next to its diffusion loss, which places λ's grid, and the share
of each update STAMINA's hard masks let through. Test rows of a method that has a validation winner and no
override of that setting in the plan take the winner's setting (written in the section).

Each row is one ``leanfm continual t2i`` run under ``--runs`` (resumable: an interrupted row continues from its
checkpoint; a finished row is read back from ``results/continual_t2i.json`` or from its run folder when its
settings match, so rows can run in parallel processes). After every row: results/continual_t2i.json (validation
rows: results/continual_t2i_validation.json), the row's
sample grid (results/continual_t2i/<row>.png: rows concepts, columns noise seeds), the fidelity-vs-concept curves
(results/continual_t2i.png) and the BENCHMARKS.md section.

The judge is the concept classifier of :mod:`leanfm.eval.t2i` trained on real renders of every pretraining concept
and the 40 held-out emoji (``--classifier``; default the one benchmarks/t2i_pretrain.py trained and committed,
``artifacts/t2i-classifier``, else its run's copy, else rebuilt with the same recipe). ``--base`` must be a
pretrained model folder; a missing one is refused in one line.

Cost (measured on artifacts/t2i-emoji-shapes, one thread per row, two rows at once on a 2-core AVX-512 machine):
~0.47 s per training step (batch 16, MiniLM forward/backward of the token's caption included); a 10-concept row
is ~27 min (3000 steps, 1400 s, + 30 sample sets of 16), a 30-concept row ~1.4 h, the default plan ~6 CPU-hours
and the validation grid ~2 — run rows in parallel processes with ``--plan``, or where a GPU is available.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from leanfm.adapt.t2i_continual import (
    ADAPTER_FILE,
    GRID_FILE,
    RESULT_FILE,
    T2IContinualConfig,
    train_t2i_continual,
)
from leanfm.data.t2i import HELD_OUT, held_out_concepts, pretraining_concepts, render_concepts
from leanfm.errors import LeanfmError
from leanfm.eval.t2i import ClassifierConfig, load_classifier, save_classifier, train_classifier
from leanfm.models.t2i import T2IConfig, T2IModel, save_t2i
from leanfm.paths import atomic_write_bytes, atomic_write_json, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import figure_png, write_section
from t2i_pretrain import ARTIFACT, CLASSIFIER

REPO = Path(__file__).resolve().parents[1]
BASE = ARTIFACT  # what benchmarks/t2i_pretrain.py exports
PLAN = ("10:lora", "10:clora", "10:stamina", "10:ti", "10:clora@token_init=word", "30:lora", "30:clora",
        "30:stamina", "30:ti")
SMOKE_PLAN = ("2:lora", "2:clora", "2:stamina", "2:ti", "3:clora")
VALIDATION = ",".join(HELD_OUT[30:])  # held-out emoji 31-40: in neither test sequence
# C-LoRA's lambda: 0 first; the others placed around the measured scale, lambda ~ loss / raw penalty = 1.0-11.7
# (median 2.9) over concepts 2-10 of the lambda = 0 validation row on artifacts/t2i-emoji-shapes
REG_GRID = (0.0, 0.3, 3.0, 30.0)
# STAMINA's beta weighs the masks' mean density (1 when all open) against a diffusion loss of ~0.03-0.05: 0.1
# outweighs the loss 2-3x even fully open (its hard masks then kept 0.2-0.4% of each update on the 10-concept row),
# 0.01 is a fraction of it and still closed the soft masks to ~7% within one concept, 0.001 a few percent of it
SPARSITY_GRID = (0.001, 0.01, 0.1)
VALIDATION_FILE = "continual_t2i_validation.json"
SMOKE = {"shots": 2, "steps": 3, "batch_size": 4, "warmup": 1, "samples": 4, "sample_steps": 2, "real": 4}
log = logging.getLogger("continual_t2i")


def parse_row(text: str) -> tuple[str, str, dict[str, Any]]:
    """``SEQUENCE:METHOD[@k=v,...]`` -> (concept count, method, overrides)."""
    count, _, rest = text.partition(":")
    method, _, setting = rest.partition("@")
    if not (count.isdigit() or count == "val") or not method:
        raise SystemExit(f"bad --plan row {text}; accepted: N:METHOD[@field=value,...] or val:METHOD[@...], "
                         "e.g. 10:clora")
    overrides: dict[str, Any] = {}
    for pair in filter(None, setting.split(",")):
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return count, method, overrides


def _kv(key: str, value: Any) -> str:
    """A setting as names and sections show it (floats in their shortest form: 1e+06, 0.3)."""
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def sequence(settings: dict[str, Any]) -> str:
    """The row's sequence as shown: a count, or ``val`` for the validation sequence."""
    return "val" if settings["concepts"] == VALIDATION else str(settings["concepts"])


def row_name(settings: dict[str, Any]) -> str:
    extra = {k: v for k, v in settings.items() if k not in ("concepts", "method", "base", "classifier", "device")}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    label = "-".join(_kv(k, v) for k, v in sorted(extra.items())
                     if k in ("token_init", "steps", "reg_weight", "sparsity"))
    return f"{sequence(settings)}-{settings['method']}{'-' + label if label else ''}-{tag}"


def build_classifier(folder: Path, smoke: bool) -> Path:
    """The judge: trained on real renders (seed 1) of every pretraining concept and the held-out emoji, as
    benchmarks/t2i_pretrain.py trains it (the smoke run: a tiny one on the held-out emoji only)."""
    if (folder / "classifier.json").is_file():
        return folder
    concepts = held_out_concepts() if smoke else pretraining_concepts("emoji,shapes", 200) + held_out_concepts()
    renders = render_concepts(concepts, 8 if smoke else 48, seed=1)
    config = ClassifierConfig(width=8, steps=30, batch_size=32, warmup_steps=5) if smoke else ClassifierConfig()
    classifier, summary = train_classifier(renders, [c.caption for c in concepts], config)
    save_classifier(classifier, folder, {"concepts": len(concepts), "steps": summary["steps"],
                                         "train_seconds": summary["train_seconds"], "built_by": "continual_t2i"})
    return folder


def smoke_base(folder: Path) -> Path:
    """A tiny random-init U-Net on the tiny random BERT: nothing it draws means anything, everything runs."""
    if not (folder / "t2i.json").is_file():
        torch.manual_seed(0)
        save_t2i(T2IModel(T2IConfig(width=8, heads=2, text_encoder="tiny-bert", cross_attention_dim=32)), folder)
    return folder


def run_row(settings: dict[str, Any], overrides: dict[str, Any], runs: Path) -> dict[str, Any]:
    """Train and judge one row, or read it back from its folder when a finished run of the same settings is there
    (another process of a parallel ``--plan`` finished it: its wall time and threads are then unknown)."""
    config = T2IContinualConfig(**settings)
    out = runs / row_name(settings)
    training = out.with_name(out.name + ".training")
    tick, threads = time.time(), torch.get_num_threads()
    done = out / RESULT_FILE
    summary = json.loads(done.read_text()) if done.is_file() else {}
    finished = summary.get("config") == json.loads(json.dumps(config.to_dict())) and "metrics" in summary
    if not finished:
        try:
            summary = train_t2i_continual(config, out, resume=training.is_dir(), overwrite=True)
        except LeanfmError as err:  # a checkpoint of other settings (older code): start that row over
            if "was trained with" not in str(err):
                raise
            summary = train_t2i_continual(config, out, resume=False, overwrite=True)
    return {"settings": settings, "overrides": overrides, "folder": str(out), "concepts": summary["concepts"],
            "metrics": summary["metrics"], "training": summary["training"],
            "train_seconds": sum(t["seconds"] for t in summary["training"]),
            "wall_seconds": None if finished else time.time() - tick, "threads": None if finished else threads}


def label(row: dict[str, Any]) -> str:
    """The method, the row's own overrides from the plan and what it took from validation
    (``clora (token_init=word; reg_weight=3 from validation)``)."""
    own = ", ".join(_kv(k, v) for k, v in sorted(row["overrides"].items()))
    tuned = ", ".join(f"{_kv(k, v)} from validation" for k, v in row.get("tuned", {}).items())
    extras = "; ".join(filter(None, [own, tuned]))
    return row["settings"]["method"] + (f" ({extras})" if extras else "")


def plan_text(row: dict[str, Any]) -> str:
    """The ``--plan`` entry that reproduces ``row``."""
    extras = ",".join(f"{k}={v}" for k, v in sorted(row["overrides"].items()))
    return f"{sequence(row['settings'])}:{row['settings']['method']}{'@' + extras if extras else ''}"


def shown(path: Path | str) -> str:
    """A path as the section shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())) if path.is_file() else []


def winners(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the plan overrides of its best validation row: the highest mean recognised fraction after the
    whole sequence, ties broken by the lower final KID."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        final = row["metrics"]["mean"]["final"]
        key = (final["recognised"], -final["kid"])
        method = row["settings"]["method"]
        if method not in best or key > best[method]["key"]:
            best[method] = {"key": key, "overrides": row["overrides"]}
    return {m: b["overrides"] for m, b in best.items()}


def penalty_scale(row: dict[str, Any]) -> list[dict[str, float]]:
    r"""For an unregularised row (λ = 0): per concept t >= 2, C-LoRA's raw penalty
    :math:`\sum_{layers} \| |\sum_{t'<t}\Delta_{t'}| \odot \Delta_t \|_F^2` of the update it actually learned,
    its final diffusion loss, and their ratio: the λ at which the penalty would have matched the loss."""
    tensors = load_file(str(Path(row["folder"]) / ADAPTER_FILE))
    tasks = len(row["training"])
    layers = sorted({k.split(".", 2)[2][:-2] for k in tensors if k.startswith("history.0.") and k.endswith(".A")})
    past = {name: torch.zeros(()) for name in layers}
    scale = []
    for t in range(tasks):
        deltas = {name: tensors[f"history.{t}.{name}.B"] @ tensors[f"history.{t}.{name}.A"] for name in layers}
        if t:
            reg = float(sum(((past[n].abs() * deltas[n]) ** 2).sum() for n in layers))
            mse = row["training"][t]["final_mse"]
            scale.append({"concept": t + 1, "reg": reg, "mse": mse, "lambda_matching": mse / reg})
        past = {n: past[n] + deltas[n] for n in layers}
    return scale


def mask_density(row: dict[str, Any]) -> list[float]:
    """For a STAMINA row: per concept, the share of entries its folded hard masks kept, averaged over the adapted
    layers (read from the run's adapter record: the mask behind each folded update)."""
    tensors = load_file(str(Path(row["folder"]) / ADAPTER_FILE))
    kept: dict[int, list[float]] = {}
    for key, mask in tensors.items():
        if key.startswith("history.") and key.endswith(".mask"):
            kept.setdefault(int(key.split(".")[1]), []).append(float(mask.float().mean()))
    return [sum(v) / len(v) for _, v in sorted(kept.items())]


def masks_kept(rows: list[dict[str, Any]]) -> list[str]:
    """One line per STAMINA row whose run folder is here: how much of each update its hard masks let through."""
    lines = []
    for row in rows:
        if row["settings"]["method"] == "stamina" and (Path(row["folder"]) / ADAPTER_FILE).is_file():
            kept = mask_density(row)
            lines.append(f"- {sequence(row['settings'])} {label(row)}: hard masks keep "
                         f"{100 * sum(kept) / len(kept):.2f}% of each update's entries on average over "
                         f"{len(kept)} concepts (per concept {100 * min(kept):.2f}-{100 * max(kept):.2f}%).")
    return lines


def _f(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| concepts | method | recognised after → final | forgetting (recognised) | KID after → final | "
             "forgetting (KID) | MMD final | KID floor / base | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        m = row["metrics"]["mean"]
        lines.append(f"| {row['settings']['concepts']} | {label(row)} | {_f(m['after']['recognised'], 2)} → "
                     f"{_f(m['final']['recognised'], 2)} | {_f(m['forgetting']['recognised'], 2)} | "
                     f"{_f(m['after']['kid'])} → {_f(m['final']['kid'])} | {_f(m['forgetting']['kid'])} | "
                     f"{_f(m['final']['mmd'])} | {_f(m['floor']['kid'])} / {_f(m['base']['kid'])} | "
                     f"{row['train_seconds']:.0f} |")
    return lines


def _noise(*pairs: tuple[float, int]) -> float:
    """Binomial sd of a sum or difference of independent recognised fractions (p, draws): the yardstick of a claim."""
    return sum(p * (1 - p) / n for p, n in pairs) ** 0.5


def _call(delta: float, sd: float) -> str:
    return f"Δ {delta:+.2f}, noise sd ~{sd:.2f}" + (": within noise" if abs(delta) < 2 * sd else "")


def _final_gap(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float, float]:
    """Rows ``a`` and ``b`` of one sequence: their recognised fractions at the end, ``a`` − ``b`` and its binomial sd
    (draws: concepts x samples)."""
    n = len(a["metrics"]["per_concept"]) * T2IContinualConfig(**a["settings"]).samples
    p, q = (r["metrics"]["mean"]["final"]["recognised"] for r in (a, b))
    return p, q, p - q, _noise((p, n), (q, n))


def saturation(rows: list[dict[str, Any]], block: int = 10) -> list[str]:
    """Saturation, read as the papers mean it (a method stops learning new concepts late in a long sequence): per row
    of >= 2 * ``block`` concepts, the recognised fraction just after learning on its first ``block`` concepts vs its
    last ``block``. The two blocks are different concepts, so a drop is read against the other methods' drops on the
    same concepts, not alone."""
    lines = []
    for row in rows:
        per = row["metrics"]["per_concept"]
        if len(per) < 2 * block:
            continue
        samples = T2IContinualConfig(**row["settings"]).samples
        first, last = (sum(p["after"]["recognised"] for p in part) / block for part in (per[:block], per[-block:]))
        sd = _noise((first, block * samples), (last, block * samples))
        lines.append(f"- {len(per)} concepts — {label(row)} learns new concepts late in the sequence "
                     f"{'less' if last < first else 'no less'}: recognised just after learning, concepts 1-{block} "
                     f"{_f(first, 2)} vs {len(per) - block + 1}-{len(per)} {_f(last, 2)} ({_call(last - first, sd)}).")
    return lines


def fewer_steps(clora: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """STAMINA's "fewer training steps" claim, per STAMINA row of the sequence whose only plan override is fewer steps
    per concept (s) than the plain C-LoRA row (S). The claim is read off C-LoRA at the same s (a row overriding only
    ``steps``): STAMINA must keep more than it at the end. Both are also set against C-LoRA at S, which says what the
    short budget costs; without a C-LoRA row at s the claim is not read."""
    def steps(row: dict[str, Any]) -> int:
        return T2IContinualConfig(**row["settings"]).steps

    def versus(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, str]:
        """:func:`_final_gap`'s difference and sd, and the figures as shown."""
        p, q, delta, sd = _final_gap(a, b)
        return delta, sd, f"{_f(p, 2)} vs {_f(q, 2)}, {_call(delta, sd)}"

    full = steps(clora)
    short = {steps(r): r for r in rows if r["settings"]["method"] == "clora" and set(r["overrides"]) == {"steps"}}
    lines = []
    for row in sorted(rows, key=steps, reverse=True):
        if row["settings"]["method"] != "stamina" or set(row["overrides"]) != {"steps"} or steps(row) >= full:
            continue
        s, count = steps(row), len(row["metrics"]["per_concept"])
        line = (f"- {count} concepts, {s} steps per concept (plain rows: {full}) — final recognised, STAMINA at {s} "
                f"vs C-LoRA at {full}: {versus(row, clora)[2]}")
        if s not in short:
            lines.append(line + f"; C-LoRA at {s} not run, so the claim is not read.")
            continue
        delta, sd, same = versus(row, short[s])
        reading = ("STAMINA keeps more at the same budget: the claim holds here" if delta > 2 * sd
                   else "STAMINA keeps less at the same budget: the claim fails here" if delta < -2 * sd
                   else "STAMINA and C-LoRA are not told apart at the same budget: the claim is not supported here")
        lines.append(line + f"; C-LoRA at {s} vs at {full}: {versus(short[s], clora)[2]}; STAMINA vs C-LoRA, both at "
                     f"{s}: {same}. {reading}.")
    return lines


def against_tokens(ti: dict[str, Any], adapted: list[dict[str, Any]]) -> str:
    """The papers' token-only comparator: Textual Inversion never changes the U-Net, so it forgets nothing; the
    adapter methods earn their place only by keeping more of each concept at the end than it does."""
    base = ti["metrics"]["mean"]["final"]["recognised"]
    parts, better = [], []
    for row in adapted:
        p, _, delta, sd = _final_gap(row, ti)
        parts.append(f"{row['settings']['method']} {_f(p, 2)} ({_call(delta, sd)})")
        better += [row["settings"]["method"]] if delta > 2 * sd else []
    verdict = (f"{', '.join(better)} keep{'s' if len(better) == 1 else ''} more than the token alone" if better
               else "no adapter method keeps more than the token alone by more than the noise")
    after = ", ".join(f"{r['settings']['method']} {_f(r['metrics']['mean']['after']['recognised'], 2)}"
                      for r in adapted)
    return (f"- {len(ti['metrics']['per_concept'])} concepts — against Textual Inversion (the token only; the U-Net "
            f"never changes: forgetting {_f(ti['metrics']['mean']['forgetting']['recognised'], 2)}, final recognised "
            f"{_f(base, 2)}): final recognised {'; '.join(parts)}: {verdict}. Just after learning: {after} vs "
            f"{_f(ti['metrics']['mean']['after']['recognised'], 2)} for the token alone.")


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The claims of METHODS.md sections 8-9, read off plain rows (no plan override) of each sequence, each with the
    binomial noise of its difference (draws: concepts x samples per row; forgetting counts both of its terms)."""
    lines = []
    plain: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:  # rows without a plan override; one that took validation's setting over one that ran a default
        key = (r["settings"]["concepts"], r["settings"]["method"])
        if not r["overrides"] and (key not in plain or (r.get("tuned") and not plain[key].get("tuned"))):
            plain[key] = r
    for count in sorted({c for c, _ in plain}, key=int):
        lora, clora, stamina = (plain.get((count, m)) for m in ("lora", "clora", "stamina"))
        if lora and clora:
            a, b = clora["metrics"]["mean"], lora["metrics"]["mean"]
            n = int(count) * T2IContinualConfig(**clora["settings"]).samples
            delta = a["forgetting"]["recognised"] - b["forgetting"]["recognised"]
            sd = _noise(*((m[k]["recognised"], n) for m in (a, b) for k in ("after", "final")))
            final_call = _call(*_final_gap(clora, lora)[2:])
            call = "forgets less than" if delta < -2 * sd else "does not clearly forget less than"
            lines.append(f"- {count} concepts — C-LoRA {call} sequential LoRA (recognised after − final: "
                         f"{_f(a['forgetting']['recognised'], 2)} vs {_f(b['forgetting']['recognised'], 2)}, "
                         f"{_call(delta, sd)}; KID final − after: "
                         f"{_f(a['forgetting']['kid'])} vs {_f(b['forgetting']['kid'])}; final recognised "
                         f"{_f(a['final']['recognised'], 2)} vs {_f(b['final']['recognised'], 2)}, {final_call}).")
        if clora and stamina:
            p, q, delta, sd = _final_gap(stamina, clora)
            call = ("as much fidelity as" if abs(delta) < 2 * sd
                    else "more fidelity than" if delta > 0 else "less fidelity than")
            lines.append(f"- {count} concepts — STAMINA keeps {call} C-LoRA at the end (recognised {_f(p, 2)} vs "
                         f"{_f(q, 2)}, {_call(delta, sd)}; KID {_f(stamina['metrics']['mean']['final']['kid'])} vs "
                         f"{_f(clora['metrics']['mean']['final']['kid'])}).")
        if clora:
            lines += fewer_steps(clora, [r for r in rows if r["settings"]["concepts"] == count])
        if ti := plain.get((count, "ti")):
            lines.append(against_tokens(ti, [r for r in (lora, clora, stamina) if r]))
    lines += saturation(list(plain.values()))
    floors = [(r["metrics"]["mean"]["floor"]["kid"], r["metrics"]["mean"]["base"]["kid"]) for r in rows]
    if floors:
        tells = all(f < 0.5 * b for f, b in floors)
        lines.append(f"- The metric {'can' if tells else 'cannot clearly'} tell: KID(real, real') "
                     f"{_f(max(f for f, _ in floors))} at most vs KID(real, base samples) "
                     f"{_f(min(b for _, b in floors))} at least.")
    return lines


def plot(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["settings"]["concepts"] for r in rows}, key=int)
    fig, axes = plt.subplots(2, len(counts), figsize=(4.2 * len(counts), 6.0), squeeze=False)
    for col, count in enumerate(counts):
        for row in (r for r in rows if r["settings"]["concepts"] == count):
            per = row["metrics"]["per_concept"]
            x = list(range(1, len(per) + 1))
            for line, kind, style in ((0, "recognised", "-"), (1, "kid", "-")):
                shown = axes[line][col].plot(x, [p["final"][kind] for p in per], style, marker="o", ms=3,
                                             label=f"{label(row)} final")
                axes[line][col].plot(x, [p["after"][kind] for p in per], ":", color=shown[0].get_color(), lw=1)
        axes[0][col].set_title(f"{count} concepts (dotted: just after learning)", fontsize=8)
        axes[0][col].set_ylim(-0.02, 1.02)
        axes[0][col].set_ylabel("recognised by the classifier", fontsize=8)
        axes[1][col].set_ylabel("KID to real renders (lower: closer)", fontsize=8)
        axes[1][col].set_xlabel("concept (order learned)", fontsize=8)
        axes[0][col].legend(fontsize=6)
        for ax in axes[:, col]:
            ax.tick_params(labelsize=7)
    return figure_png(fig, dpi=110)


def _setting(rows: list[dict[str, Any]], method: str, field: str) -> str:
    """The value(s) of ``field`` that ``method``'s rows ran with unless their plan set it, and where they came from."""
    mine = [r for r in rows if r["settings"]["method"] == method and field not in r["overrides"]]
    tuned = sorted({r["tuned"][field] for r in mine if field in r.get("tuned", {})})
    untuned = sorted({getattr(T2IContinualConfig(**r["settings"]), field) for r in mine
                      if field not in r.get("tuned", {})})
    defaults = " / ".join(f"{x:g}" for x in untuned or [getattr(T2IContinualConfig(), field)])
    if not tuned:
        return f"{defaults} (the default, not tuned on validation)"
    earlier = f"; rows without 'from validation' ran the earlier default {defaults}" if untuned else ""
    return f"{' / '.join(f'{x:g}' for x in tuned)} (chosen on the validation sequence, section below{earlier})"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    first = rows[0]
    shared = {k: v for k, v in first["settings"].items() if k not in first["overrides"] and k not in
              first.get("tuned", {})}
    config = T2IContinualConfig(**shared)  # the settings every row shares unless its plan entry overrides them
    lam, beta = _setting(rows, "clora", "reg_weight"), _setting(rows, "stamina", "sparsity")
    plans = dict.fromkeys(map(plan_text, rows))  # a plain row run before validation and its tuned rerun share one
    lines = [
        "## Continual text-to-image customisation: LoRA, C-LoRA, STAMINA (adapt)" + (" — SMOKE RUN" if args.smoke
                                                                                    else ""), "",
        "**Claims tested** (METHODS.md sections 8-9): C-LoRA forgets less than sequential LoRA; STAMINA keeps "
        "fidelity where C-LoRA saturates over a longer sequence, with fewer training steps. Setting: the small "
        "diffusion U-Net "
        f"(`{shown(args.base)}`) learns the first "
        f"{' / '.join(sorted({sequence(r['settings']) for r in rows}, key=int))} "
        "held-out emoji (never seen in pretraining) one at a time, each "
        f"from {config.shots} renders under its own token (`a picture of <cN>`), {config.steps} steps per concept; "
        f"LoRA r = {config.rank}, α = {config.alpha} on `attn2.to_k` / `attn2.to_v` (cross-attention), folded after "
        f"each concept; C-LoRA λ = {lam}; STAMINA β = {beta}, MLP token "
        f"({config.token_hidden} hidden); ti: Textual Inversion, the papers' token-only comparator (the token "
        "learns at the same rate, the U-Net never changes). Tokens: random input embeddings at the word embeddings' "
        "scale (`token_init=word`: from the embedding of 'object').", "",
        *table(rows), "",
        f"Judge: the concept classifier of `leanfm.eval.t2i` (`{shown(args.classifier)}`), trained on real renders "
        "of every pretraining concept and the 40 held-out emoji; KID (cubic kernel) and MMD (Gaussian, median "
        f"bandwidth) on its penultimate features, {config.samples} samples per concept against {config.real} real "
        "renders; recognised: share of samples it classifies as the concept. After: sampled right after the concept "
        "was learned; final: after the whole sequence (same noise); forgetting: after − final (recognised), final − "
        "after (KID); floor: a second set of real renders; base: the base model under the concept's real name. "
        "Noise: a row's mean recognised fraction is over concepts x samples draws (160 for 10 concepts: a binomial "
        "sd of ~3 points at 15%). train s: seconds of the training steps while 1-4 rows shared the 2 cores, not a "
        "speed comparison.", "",
        "### The claims, read off these rows", "", *verdicts(rows), "",
        "Mechanism: STAMINA's update is ΔW = M ⊙ (B A) with a hard mask M, so how much of it the masks let "
        "through says whether its adapters or its MLP token carry a concept:", "", *masks_kept(rows), "",
        "![fidelity per concept](results/continual_t2i.png)", "",
        "Sample grids (rows: concepts in order; columns: noise seeds): "
        + ", ".join(f"[{r['settings']['concepts']} {label(r)}](results/continual_t2i/{row_name(r['settings'])}.png)"
                    for r in rows) + ".", "",
        "Regenerate (rows cached in results/continual_t2i.json, runs resumable): "
        f"`nice -n 5 python benchmarks/continual_t2i.py --threads 1 --plan {' '.join(plans)}` "
        "(after `--validate`, whose winners the plain rows take; a plain row run before validation, labelled without "
        "a setting from validation, is not rerun by it).",
    ]
    return "\n".join(lines)


def validation_markdown(rows: list[dict[str, Any]]) -> str:
    chosen = winners(rows)
    lines = ["### Settings chosen on validation (continual t2i)", "",
             f"Validation sequence: held-out emoji 31-40 ({VALIDATION.replace(',', ', ')}), in neither test sequence; "
             "same base, judge, shots, steps and sampling as the test rows. Rule: the highest mean recognised "
             "fraction after the whole sequence, ties broken by the lower final KID.", "",
             "| method | setting | recognised after → final | forgetting (recognised) | KID after → final | "
             "train s | chosen |", "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = sorted(rows, key=lambda r: (r["settings"]["method"], sorted((k, str(v)) if isinstance(v, str) else
                                                                      (k, v) for k, v in r["overrides"].items())))
    for row in rows:
        m = row["metrics"]["mean"]
        setting = ", ".join(_kv(k, v) for k, v in sorted(row["overrides"].items())) or "defaults"
        mark = "**yes**" if chosen.get(row["settings"]["method"]) == row["overrides"] else ""
        lines.append(f"| {row['settings']['method']} | {setting} | {_f(m['after']['recognised'], 2)} → "
                     f"{_f(m['final']['recognised'], 2)} | {_f(m['forgetting']['recognised'], 2)} | "
                     f"{_f(m['after']['kid'])} → {_f(m['final']['kid'])} | {row['train_seconds']:.0f} | {mark} |")
    if any(r["settings"]["method"] == "stamina" for r in rows):
        lines += ["", "STAMINA's hard masks (share of each update they let through):", "", *masks_kept(rows)]
    free = [r for r in rows if r["settings"]["method"] == "clora"
            and not T2IContinualConfig(**r["settings"]).reg_weight]
    if free:
        scale = penalty_scale(free[0])
        ratios = sorted(x["lambda_matching"] for x in scale)
        lines += ["", "Where λ acts (from the λ = 0 row, no training): the raw penalty ‖|Σ earlier Δ| ⊙ Δ_t‖² of each "
                  "concept's unregularised update against the earlier ones, beside its final diffusion loss; λ = "
                  "loss / penalty is where the two would be equal — median "
                  f"{ratios[len(ratios) // 2]:.3g} (range {ratios[0]:.3g} to {ratios[-1]:.3g}) over concepts 2-"
                  f"{len(scale) + 1}."]
    return "\n".join(lines)


def render(args: argparse.Namespace) -> None:
    """The curves and the section from every row in the results files (so parallel ``--plan`` processes each
    render all finished rows, not only their own); the validation rows are its last subsection."""
    rows = load_rows(args.results / "continual_t2i.json")
    validation = load_rows(args.results / VALIDATION_FILE)
    parts = []
    if rows:
        order = {m: i for i, m in enumerate(("lora", "clora", "stamina", "ti"))}
        rows.sort(key=lambda r: (int(r["settings"]["concepts"]), order.get(r["settings"]["method"], 9),
                                 len(r["overrides"]), json.dumps(r["overrides"], sort_keys=True),
                                 len(r.get("tuned", {}))))
        atomic_write_bytes(args.results / "continual_t2i.png", plot(rows))
        parts.append(markdown(rows, args))
    else:
        parts.append("## Continual text-to-image customisation: LoRA, C-LoRA, STAMINA (adapt)\n\n"
                     "No test row has run yet; the validation rows so far are below.")
    if validation:
        parts.append(validation_markdown(validation))
    write_section(args.benchmarks_md, "continual_t2i", "\n\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=BASE, help="the pretrained t2i model folder")
    parser.add_argument("--plan", nargs="+", default=None, help="rows N:METHOD[@field=value,...]")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="concept classifier folder [default: artifacts/t2i-classifier, else "
                             "$LEANFM_HOME/t2i-pretrain/classifier]")
    parser.add_argument("--runs", type=Path, default=None, help="run folders [$LEANFM_HOME/bench/continual_t2i]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random base and classifier made on the fly, tiny rows; writes under --runs")
    parser.add_argument("--validate", action="store_true",
                        help="run the validation rows (default: C-LoRA's lambda over REG_GRID and STAMINA's beta "
                             "over SPARSITY_GRID on held-out emoji 31-40) instead of the test plan")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = leanfm_home()
    args.runs = args.runs or home / "bench" / ("continual_t2i-smoke" if args.smoke else "continual_t2i")
    if args.validate and not args.plan:
        args.plan = ([f"val:clora@reg_weight={x:g}" for x in REG_GRID]
                     + [f"val:stamina@sparsity={x:g}" for x in SPARSITY_GRID])
    args.plan = args.plan or list(SMOKE_PLAN if args.smoke else PLAN)
    if args.smoke:  # never the repository's results: a smoke row means nothing
        args.base = smoke_base(args.runs / "base")
        args.results, args.benchmarks_md = args.runs / "results", args.runs / "BENCHMARKS.md"
    elif not (args.base / "t2i.json").is_file():
        sys.exit(f"continual_t2i: base model '{args.base}' is missing (no t2i.json); pretrain it with "
                 "benchmarks/t2i_pretrain.py, pass --base DIR, or try --smoke")
    default = (args.runs / "classifier" if args.smoke else CLASSIFIER if (CLASSIFIER / "classifier.json").is_file()
               else home / "t2i-pretrain" / "classifier")
    args.classifier = build_classifier(args.classifier or default, args.smoke)
    load_classifier(args.classifier)
    (args.results / "continual_t2i").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for text in args.plan:
        count, method, overrides = parse_row(text)
        validating = count == "val"
        chosen = {} if validating else winners(load_rows(args.results / VALIDATION_FILE)).get(method, {})
        tuned = {k: v for k, v in chosen.items() if k not in overrides}
        settings = {"base": str(args.base), "classifier": str(args.classifier),
                    "concepts": VALIDATION if validating else count, "method": method, "device": args.device,
                    **(SMOKE if args.smoke else {}), **tuned, **overrides}
        path = args.results / (VALIDATION_FILE if validating else "continual_t2i.json")
        row = next((r for r in load_rows(path) if r["settings"] == settings), None)
        if row is None:
            row = {**run_row(settings, overrides, args.runs), "tuned": tuned}
            log.info("%s: recognised final %.3f, forgetting %.3f, %.0f s", text,
                     row["metrics"]["mean"]["final"]["recognised"], row["metrics"]["mean"]["forgetting"]["recognised"],
                     row["train_seconds"])
        rows.append(row)
        grid = Path(row["folder"]) / GRID_FILE
        if grid.is_file():
            shutil.copyfile(grid, args.results / "continual_t2i" / f"{row_name(settings)}.png")
        # read again just before writing: a parallel process may have added its rows meanwhile
        atomic_write_json(path, [r for r in load_rows(path) if r["settings"] != settings] + [row])
        render(args)
    print(json.dumps([{"row": label(r), "concepts": sequence(r["settings"]), **r["metrics"]["mean"]["final"],
                       "forgetting": r["metrics"]["mean"]["forgetting"]["recognised"]} for r in rows]))
    assert all((Path(r["folder"]) / RESULT_FILE).is_file() for r in rows)


if __name__ == "__main__":
    main()
