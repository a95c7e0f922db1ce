"""Pretrain the small text-to-image model (``leanfm t2i pretrain``) and watch a classifier recognise its samples.

    nice -n 5 python benchmarks/t2i_pretrain.py --threads 1 >> /work/logs/t2i-pretrain.log 2>&1   # resumable
    python benchmarks/t2i_pretrain.py --export-only     # write artifacts/t2i-emoji-shapes from the finished run
    nice -n 5 python benchmarks/t2i_pretrain.py --hours 2   # a session's share; then, to carry it on:
    python benchmarks/t2i_pretrain.py --commit-checkpoint  # artifacts/t2i-emoji-shapes.training (exact resume)

Across machines: the classifier is committed once trained (``artifacts/t2i-classifier``) and an unfinished run's
training checkpoint with ``--commit-checkpoint``; a fresh machine starts from both (results/t2i_pretrain.json
holds the curve so far), so the run continues where the last session stopped, not from step 0.

Stages, each resumable (run folders under ``--runs``, default ``$LEANFM_HOME/t2i-pretrain``):

1. the concept classifier (:mod:`leanfm.eval.t2i`) on real renders of every concept — the pretraining emoji, the
   180 shapes and the 40 held-out emoji — with render seed 1 (pretraining renders use seed 0); its accuracy on
   fresh renders (seed 2) is recorded, and KID(real, real') on its features between two render sets of the
   monitored captions: the floor that KID(real, samples) is compared with;
2. pretraining (:func:`leanfm.adapt.t2i.train_t2i`) in stretches of ``--eval-every`` steps; after each one the
   saved (EMA) model draws ``--eval-n`` samples for each of ``--eval-captions`` seen captions (a fixed seeded
   subset, emoji and shapes in proportion; DDIM ``--sample-steps``, guidance ``--guidance``) and the record gets
   the fraction recognised as their concept (all, emoji, shapes), KID and MMD of the samples against real
   renders of the same captions, the mean loss of the stretch and the seconds trained;
3. stop when the recognised fraction reaches ``--target`` or the schedule (``--steps``) ends; then (and with
   ``--export-only``) export ``artifacts/t2i-emoji-shapes`` in bf16 with its manifest, the fraction measured
   again on the bf16 weights as saved.

Threads: one by default. On the shared 2-core machine, two torch threads ran a training step about 5x slower
than one (OpenMP threads spinning against other jobs); use ``--threads 2`` only when nothing else runs.

Writes results/t2i_pretrain.json after every stretch, results/t2i_pretrain.png (samples of the last one: one
row per caption, the first 8 monitored captions), the curve results/t2i_pretrain_curve.png and the BENCHMARKS.md
section ``t2i_pretrain``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leanfm.adapt.t2i import T2IPretrainConfig, train_t2i
from leanfm.data.t2i import Concept, held_out_concepts, image_grid, pretraining_concepts, render_concepts, write_png
from leanfm.errors import LeanfmError
from leanfm.eval.t2i import (
    ClassifierConfig,
    ConceptClassifier,
    image_features,
    kid,
    load_classifier,
    mmd,
    predict_concepts,
    save_classifier,
    train_classifier,
)
from leanfm.models.t2i import T2IModel, load_t2i, sample, write_t2i_artifact
from leanfm.paths import atomic_write_bytes, atomic_write_json, copy_directory, leanfm_home
from leanfm.progress import set_quiet
from leanfm.report.report import figure_png, write_section
from leanfm.training import checkpoint_path, commit_checkpoint, restore_committed

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "t2i_pretrain.json"
ARTIFACT = ROOT / "artifacts" / "t2i-emoji-shapes"
CHECKPOINT = ARTIFACT.with_name(ARTIFACT.name + ".training")  # an unfinished run, carried to the next machine
CLASSIFIER = ROOT / "artifacts" / "t2i-classifier"  # the judge of this script and benchmarks/continual_t2i.py
COMMAND = "nice -n 5 python benchmarks/t2i_pretrain.py --threads 1"
log = logging.getLogger("t2i_pretrain")


def build_classifier(config: T2IPretrainConfig, folder: Path, args: argparse.Namespace) -> tuple[ConceptClassifier,
                                                                                                   dict]:
    """Train (or reload: the run's own, else the committed one) the classifier on every concept; returns it and its
    record. A classifier trained here is committed too, so a later machine judges with the same weights."""
    if not (folder / "classifier.json").is_file() and (CLASSIFIER / "classifier.json").is_file():
        copy_directory(CLASSIFIER, folder)
    if (folder / "classifier.json").is_file():
        return load_classifier(folder)
    concepts = pretraining_concepts(config.captions, config.emoji_concepts) + held_out_concepts()
    captions = [c.caption for c in concepts]
    renders = render_concepts(concepts, args.classifier_renders, seed=1, font=config.font)
    classifier, summary = train_classifier(renders, captions, ClassifierConfig(steps=args.classifier_steps))
    accuracy = fresh_accuracy(classifier, concepts, config)
    record = {"concepts": len(concepts), "renders": args.classifier_renders, "steps": summary["steps"],
              "train_seconds": summary["train_seconds"], "accuracy_fresh_renders": accuracy,
              "final_loss": summary["history"][-1]["loss"]}
    save_classifier(classifier, folder, record)
    copy_directory(folder, CLASSIFIER)
    log.info("classifier: %d concepts, accuracy on fresh renders %.3f", len(concepts), accuracy)
    return load_classifier(folder)


def fresh_accuracy(classifier: ConceptClassifier, concepts: list[Concept], config: T2IPretrainConfig,
                   per_concept: int = 8) -> float:
    """The judge's accuracy on fresh real renders (seed 2) of ``concepts``."""
    fresh = render_concepts(concepts, per_concept, seed=2, font=config.font)
    predicted = predict_concepts(classifier, fresh.flatten(0, 1).float() / 255)
    return sum(p == concepts[i // per_concept].caption for i, p in enumerate(predicted)) / len(predicted)


def accuracy_by_kind(classifier: ConceptClassifier, config: T2IPretrainConfig) -> dict[str, float]:
    """:func:`fresh_accuracy` per kind of concept: the ceiling that the recognised fraction of samples is read
    against (a shape caption names size, fill, colour and shape at once)."""
    pretraining = pretraining_concepts(config.captions, config.emoji_concepts)
    kinds = {"emoji": [c for c in pretraining if c.source == "emoji"],
             "shapes": [c for c in pretraining if c.source != "emoji"], "held_out": held_out_concepts()}
    return {kind: fresh_accuracy(classifier, concepts, config) for kind, concepts in kinds.items()}


def monitored(config: T2IPretrainConfig, count: int) -> list[str]:
    """A fixed, seeded subset of ``count`` seen captions (emoji and shapes in proportion to their numbers)."""
    captions = [c.caption for c in pretraining_concepts(config.captions, config.emoji_concepts)]
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))[:count]
    return [captions[i] for i in sorted(order.tolist())]


def real_renders(config: T2IPretrainConfig, captions: list[str], per: int, seed: int) -> torch.Tensor:
    """``per`` real renders of each monitored caption, ``[len(captions) * per, 3, 32, 32]`` in [0, 1]."""
    concepts = [c for c in pretraining_concepts(config.captions, config.emoji_concepts) if c.caption in captions]
    renders = render_concepts(concepts, per, seed=seed, font=config.font)
    return renders.flatten(0, 1).float() / 255


def judge(model: T2IModel, classifier: ConceptClassifier, captions: list[str], real: torch.Tensor,
          args: argparse.Namespace) -> tuple[dict[str, float], torch.Tensor]:
    """Recognised fractions, KID and MMD of ``--eval-n`` samples per caption; returns them and the samples."""
    wanted = [c for c in captions for _ in range(args.eval_n)]
    tick = time.time()
    images = sample(model, wanted, steps=args.sample_steps, guidance=args.guidance, seed=0)
    hits = [p == w for p, w in zip(predict_concepts(classifier, images), wanted, strict=True)]
    emoji = [h for h, w in zip(hits, wanted, strict=True) if w.startswith("a picture of ")]
    shapes = [h for h, w in zip(hits, wanted, strict=True) if not w.startswith("a picture of ")]
    fake, true = image_features(classifier, images), image_features(classifier, real)
    return {"recognised": sum(hits) / len(hits), "recognised_emoji": sum(emoji) / max(1, len(emoji)),
            "recognised_shapes": sum(shapes) / max(1, len(shapes)), "kid": kid(true, fake), "mmd": mmd(true, fake),
            "sample_seconds": time.time() - tick}, images


def curve_plot(results: dict[str, Any]) -> bytes:
    """Recognised fraction (all / emoji / shapes, with the judge's own accuracy on real renders dashed) and KID
    against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["curve"]
    steps = [c["step"] for c in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    ceiling = results.get("classifier_accuracy_by_kind", {})
    for key, kind in (("recognised", "all"), ("recognised_emoji", "emoji"), ("recognised_shapes", "shapes")):
        line = left.plot(steps, [c[key] for c in curve], marker="o", ms=3, label=f"samples, {kind}")
        if kind in ceiling:
            left.axhline(ceiling[kind], ls="--", lw=1, color=line[0].get_color(), label=f"real renders, {kind}")
    left.axhline(results["eval"]["target"], ls=":", color="grey", label="target")
    left.set_xlabel("step", fontsize=8)
    left.set_ylabel("recognised by the classifier", fontsize=8)
    left.set_ylim(-0.02, 1.02)
    left.legend(fontsize=6)
    right.plot(steps, [c["kid"] for c in curve], marker="o", ms=3, label="KID(real, samples)")
    right.axhline(results["kid_real_real"], ls="--", color="grey", label="KID(real, real')")
    right.set_xlabel("step", fontsize=8)
    right.set_ylabel("KID on the classifier's features", fontsize=8)
    right.legend(fontsize=6)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    return figure_png(fig, dpi=110)


def section(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: the curve, the judge's ceiling, the floor and the artifact as saved."""
    curve, ceiling = results["curve"], results.get("classifier_accuracy_by_kind", {})
    last, target = curve[-1], results["eval"]["target"]
    reached = last["recognised"] >= target
    config = results["config"]
    lines = [
        "## Small text-to-image base: pretraining (adapt, t2i)", "",
        f"**Target** (stated by us; the issue asks for a stated fraction): {target:.0%} of samples for seen captions "
        f"recognised as their concept by the classifier trained here. **{'Reached' if reached else 'Not reached'}** "
        f"at step {last['step']} of {config['steps']}: {last['recognised']:.1%} (emoji "
        f"{last['recognised_emoji']:.1%}, shapes {last['recognised_shapes']:.1%}) after "
        f"{last['train_seconds'] / 3600:.1f} h of training.", "",
        f"Setting: diffusers `UNet2DConditionModel` (width {config['width']}, 32x32) on frozen "
        f"{config['text_encoder']} token states, {config['emoji_concepts']} Noto emoji + 180 shapes, "
        f"{config['renders']} renders each, batch {config['batch_size']}, lr {config['lr']}, EMA {config['ema']}, "
        "bf16 autocast. Monitor: " f"{len(results['eval']['captions'])} seen captions x {results['eval']['n']} "
        f"samples (DDIM {results['eval']['sample_steps']} steps, guidance {results['eval']['guidance']}).", "",
        "| step | loss | recognised (all / emoji / shapes) | KID | MMD | train s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {c['step']} | {c['loss']:.4f} | {c['recognised']:.3f} / {c['recognised_emoji']:.3f} / "
          f"{c['recognised_shapes']:.3f} | {c['kid']:.3f} | {c['mmd']:.4f} | {c['train_seconds']:.0f} |"
          for c in curve), "",
        "The judge and the floor: the classifier (`artifacts/t2i-classifier`, "
        f"{results['classifier']['concepts']} concepts) recognises fresh real renders "
        + (", ".join(f"{k.replace('_', '-')} {v:.1%}" for k, v in ceiling.items()) or
           f"{results['classifier']['accuracy_fresh_renders']:.1%}")
        + " (a shape caption names size, fill, colour and shape at once: the shapes' ceiling is low); "
        f"KID(real, real') = {results['kid_real_real']:.3f} against KID(real, samples) {last['kid']:.3f}, so the "
        "metric separates them.",
    ]
    if "artifact" in results:
        art = results["artifact"]
        lines += ["", f"Saved as `artifacts/{Path(art['folder']).name}` in bf16 and judged as saved: recognised "
                  f"{art['recognised']:.1%} (emoji {art['recognised_emoji']:.1%}, shapes "
                  f"{art['recognised_shapes']:.1%}), KID {art['kid']:.3f}."]
    lines += ["", "![curve](results/t2i_pretrain_curve.png) ![last samples](results/t2i_pretrain.png)", "",
              f"Regenerate (resumable; one thread): `{COMMAND}`."]
    return "\n".join(lines)


def write(results: dict[str, Any], images: torch.Tensor | None, args: argparse.Namespace) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / RESULTS.name, results)
    if images is not None:
        rows = min(8, len(images) // args.eval_n)
        write_png(image_grid(images[: rows * args.eval_n], columns=args.eval_n),
                  args.results / RESULTS.with_suffix(".png").name)
    if results.get("curve"):
        atomic_write_bytes(args.results / "t2i_pretrain_curve.png", curve_plot(results))
        write_section(args.benchmarks_md, "t2i_pretrain", section(results))


def export(run: Path, classifier: ConceptClassifier, captions: list[str], real: torch.Tensor,
           results: dict[str, Any], args: argparse.Namespace) -> None:
    """The committed artifact: bf16 weights, judged as saved."""
    model, info = load_t2i(run)
    bf16 = T2IModel(model.config)
    bf16.unet.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.unet.state_dict().items()})
    metrics, _ = judge(bf16.eval(), classifier, captions, real, args)
    training = info["training"]
    manifest = {"name": ARTIFACT.name, "command": COMMAND, "steps": training["steps"],
                "seed": training["config"]["seed"], "config": training["config"],
                "data": f"{training['concepts']} pretraining concepts of leanfm.data.t2i "
                        f"({training['config']['captions']}, {training['config']['emoji_concepts']} emoji), "
                        f"{training['config']['renders']} renders each",
                "metrics": {**metrics, "eval_captions": len(captions), "eval_n": args.eval_n,
                            "sample_steps": args.sample_steps, "guidance": args.guidance},
                "train_seconds": training["train_seconds"]}
    write_t2i_artifact(model, args.artifact, manifest)
    results["artifact"] = {"folder": str(args.artifact), **manifest["metrics"]}
    log.info("artifact written to %s (recognised %.3f on bf16 weights)", args.artifact, metrics["recognised"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=leanfm_home() / "t2i-pretrain", help="run folders")
    parser.add_argument("--steps", type=int, default=T2IPretrainConfig.steps, help="schedule length")
    parser.add_argument("--batch-size", type=int, default=T2IPretrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=T2IPretrainConfig.lr)
    parser.add_argument("--no-autocast", action="store_true", help="train in float32")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between evaluations")
    parser.add_argument("--eval-captions", type=int, default=32, help="monitored seen captions")
    parser.add_argument("--eval-n", type=int, default=4, help="samples per monitored caption")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the monitoring samples")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--target", type=float, default=0.6, help="stop at this recognised fraction")
    parser.add_argument("--classifier-renders", type=int, default=48)
    parser.add_argument("--classifier-steps", type=int, default=ClassifierConfig.steps)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: 2 only on an otherwise idle 2-core machine (oversubscribed OpenMP "
                             "threads ran a step 5x slower than one thread)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=RESULTS.parent)
    parser.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--artifact", type=Path, default=ARTIFACT)
    parser.add_argument("--export-only", action="store_true", help="train nothing; export the run as it is")
    parser.add_argument("--hours", type=float, default=None,
                        help="start no stretch after this many hours (an unfinished run is then neither exported nor "
                             "judged finished; `--commit-checkpoint` carries it to the next machine)")
    parser.add_argument("--commit-checkpoint", action="store_true",
                        help=f"train nothing; copy the run's training checkpoint to {CHECKPOINT.relative_to(ROOT)}, "
                             "from which a fresh machine continues exactly")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = T2IPretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               autocast=not args.no_autocast, device=args.device)
    run = args.runs / "t2i"
    if args.commit_checkpoint:
        try:
            print(f"committed {commit_checkpoint(run, CHECKPOINT)}", flush=True)
        except LeanfmError as err:
            sys.exit(f"t2i_pretrain: {err}")
        return
    if not (run / "t2i.json").is_file():
        restore_committed(CHECKPOINT, run)  # a fresh machine continues the committed run
    started = time.time()
    classifier, classifier_info = build_classifier(config, args.runs / "classifier", args)
    captions = monitored(config, args.eval_captions)
    real = real_renders(config, captions, args.eval_n, seed=3)
    path = args.results / RESULTS.name
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if "classifier_accuracy_by_kind" not in results:
        results["classifier_accuracy_by_kind"] = accuracy_by_kind(classifier, config)
    if "kid_real_real" not in results:
        again = real_renders(config, captions, args.eval_n, seed=4)
        results["kid_real_real"] = kid(image_features(classifier, real), image_features(classifier, again))
    results.update({"command": COMMAND, "config": config.to_dict(),
                    "classifier": {k: v for k, v in classifier_info.items() if k != "captions"},
                    "eval": {"captions": captions, "n": args.eval_n, "sample_steps": args.sample_steps,
                             "guidance": args.guidance, "target": args.target}})
    results.setdefault("curve", [])
    step = results["curve"][-1]["step"] if results["curve"] else 0
    finished = True
    while not args.export_only and step < args.steps:
        reached = bool(results["curve"]) and results["curve"][-1]["recognised"] >= args.target
        if reached:
            break
        if args.hours is not None and time.time() - started > 3600 * args.hours:
            log.info("stopping at step %d: --hours %g spent (not finished; resumable)", step, args.hours)
            finished = False
            break
        step = min(args.steps, step + args.eval_every)
        resume = checkpoint_path(run).is_dir()
        results.update({"argv": sys.argv[1:], "threads": args.threads})  # of the last stretch trained
        summary = train_t2i(config, run, resume=resume, overwrite=True, stop_at=step)
        model, _ = load_t2i(run)
        model.to(summary["device"])
        metrics, images = judge(model, classifier, captions, real, args)
        recent = [h["loss"] for h in summary["history"][-args.eval_every :]]
        step = summary["steps"]
        results["curve"].append({"step": step, "loss": sum(recent) / max(1, len(recent)),
                                 "train_seconds": summary["train_seconds"], **metrics})
        log.info("step %d: loss %.4f recognised %.3f (emoji %.3f, shapes %.3f) kid %.4f, %.0f s trained",
                 summary["steps"], results["curve"][-1]["loss"], metrics["recognised"], metrics["recognised_emoji"],
                 metrics["recognised_shapes"], metrics["kid"], summary["train_seconds"])
        write(results, images, args)
    manifest = args.artifact / "manifest.json"
    exported = manifest.is_file() and bool(results["curve"]) and \
        json.loads(manifest.read_text()).get("steps") == results["curve"][-1]["step"]
    if exported and not args.export_only:  # a finished run already saved: never overwrite it from another run folder
        log.info("%s already holds the run at step %d; --export-only writes it again", args.artifact, step)
    elif finished and (run / "t2i.json").is_file():
        export(run, classifier, captions, real, results, args)
    write(results, None, args)


if __name__ == "__main__":
    main()
