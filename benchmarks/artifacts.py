"""Rebuild the committed artifacts under ``artifacts/`` (models that take too long to retrain for every run).

    python benchmarks/artifacts.py vit                  # the benchmark ViT: train (resumable) and export both stages
    python benchmarks/artifacts.py vit --export-only    # export the stages already trained under --runs
    python benchmarks/artifacts.py vit8 --device cuda   # the 8-layer ViT of ToFu's late-layer question
    python benchmarks/artifacts.py vit8 --hours 2       # a session's share on CPU, then carry it on:
    python benchmarks/artifacts.py vit8 --commit-checkpoint   # artifacts/vit8-fmnist.training (exact resume)

The ViT of the token-reduction benchmarks is trained in two stages, each a plain ``leanfm vision train`` run:
5 epochs at lr 2e-3 (``vit-fmnist-e5``, ~65 min on one core), then 6 more from those weights at lr 1e-3
(``vit-fmnist-e11``, ~70 min). Each finished stage is exported as bf16 safetensors with a manifest; its accuracy
is measured on the bf16 weights as saved (upcast to float32, as :func:`leanfm.vision.train.load_vit` loads them).
The 8-layer ViT (``vit8-fmnist``) exists because in 4 layers reduction in the last layer cannot change the class
token, so ToFu's "merge late" had almost no late layers to act in. From scratch it would cost ~19 CPU-hours here
(~9 s a step on one contended thread of this AVX2 machine, float32, ~7500 steps for 16 epochs), so it is grown
from the committed 4-layer ``vit-fmnist-e11``: each layer is followed by a copy whose residual output projections
are zero (the same function at step 0, :func:`leanfm.vision.train.grow_layers`), then all 8 layers train for 5
epochs at lr 5e-4 (2345 steps, ~9.5 s each here beside another job: ~6 CPU-hours) — our recipe, not tuned.

A later session continues from a committed stage instead of starting over — or, when a stage could not finish
within one session, from its committed training checkpoint ``artifacts/<stage>.training/state.pt`` (model,
optimizer, step and RNG in the one training loop's layout), which is copied into ``--runs`` and resumed exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch

from leanfm.data.images import fashion_mnist
from leanfm.models.artifacts import write_artifact
from leanfm.paths import leanfm_home
from leanfm.progress import set_quiet
from leanfm.training import TrainingInterrupted, checkpoint_path, commit_checkpoint, restore_committed
from leanfm.vision.train import ViTTrainConfig, accuracy_and_throughput, load_vit, train_vit

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
Stages = dict[str, tuple[ViTTrainConfig, str | None, str]]  # name -> (config, the stage it continues, command)
STAGES: Stages = {
    "vit-fmnist-e5": (ViTTrainConfig(), None, "leanfm vision train --out RUNS/vit-fmnist-e5 --resume"),
    "vit-fmnist-e11": (ViTTrainConfig(epochs=6, lr=1e-3), "vit-fmnist-e5",
                       "leanfm vision train --out RUNS/vit-fmnist-e11 --init-from RUNS/vit-fmnist-e5 --epochs 6 "
                       "--lr 1e-3 --resume"),
}
DEEP: Stages = {
    "vit8-fmnist": (ViTTrainConfig(layers=8, epochs=5, lr=5e-4), "vit-fmnist-e11",
                    "leanfm vision train --out RUNS/vit8-fmnist --layers 8 --init-from RUNS/vit-fmnist-e11 "
                    "--epochs 5 --lr 5e-4 --resume"),
}
FAMILIES: dict[str, Stages] = {"vit": STAGES, "vit8": DEEP}


def export(name: str, run: Path) -> Path:
    """Write ``artifacts/<name>`` from the finished run folder ``run`` (its model and metrics.json)."""
    model = load_vit(run)
    bf16 = load_vit(run).to(torch.bfloat16).float()  # what the artifact will hold, upcast as load_vit does
    images, labels = fashion_mnist("test")
    quality = accuracy_and_throughput(bf16, images, labels)
    metrics = json.loads((run / "metrics.json").read_text())
    config, parent, command = next(family[name] for family in FAMILIES.values() if name in family)
    manifest = {
        "name": name, "command": command, "steps": metrics["steps"], "seed": config.seed,
        "data": "Fashion-MNIST train (60000 images, flips and 2-pixel shifts), test (10000) for the metric",
        "continues": parent, "config": metrics.get("config", config.to_dict()),
        "accuracy": quality["accuracy"],  # of the weights as committed (bf16)
        "metrics": {"accuracy_bf16": quality["accuracy"], "accuracy_float32": metrics["accuracy"]},
        "stages": metrics.get("stages"), "train_seconds": metrics.get("train_seconds"),
    }
    return write_artifact(model, ARTIFACTS / name, manifest)


def stop_after(hours: float) -> None:
    """Ctrl-C ourselves after ``hours``: the training loop then saves its checkpoint (after the optimizer update
    in flight, never half of one) and raises :class:`TrainingInterrupted`. Python leaves SIGINT ignored in a
    background job, so its default handler is put back first."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, lambda _signum, _frame: os.kill(os.getpid(), signal.SIGINT))
    signal.alarm(max(1, int(3600 * hours)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", choices=list(FAMILIES))
    parser.add_argument("--runs", type=Path, default=leanfm_home() / "vision", help="training run folders")
    parser.add_argument("--export-only", action="store_true", help="do not train; export finished stages")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="training device (a resumed run may change it)")
    parser.add_argument("--hours", type=float, default=None,
                        help="stop a stage after about this many hours, checkpointed (resume with the same command)")
    parser.add_argument("--commit-checkpoint", action="store_true",
                        help="train nothing; copy each unfinished stage's checkpoint to artifacts/<stage>.training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    for name, (config, parent, _) in FAMILIES[args.artifact].items():
        run = args.runs / name
        training = checkpoint_path(run)
        if args.commit_checkpoint:
            if training.is_dir() and not (run / "metrics.json").is_file():
                print(f"committed {commit_checkpoint(run, ARTIFACTS / f'{name}.training')}", flush=True)
            continue
        if not (run / "metrics.json").is_file():  # continue an interrupted stage from its committed checkpoint
            restore_committed(ARTIFACTS / f"{name}.training", run)
        if not args.export_only and not (run / "metrics.json").is_file():
            settings = {**config.to_dict(), "device": args.device}
            if parent is not None:
                start = args.runs / parent if (args.runs / parent / "metrics.json").is_file() else ARTIFACTS / parent
                settings["init_from"] = str(start)
            if args.hours is not None:
                stop_after(args.hours)
            try:
                train_vit(ViTTrainConfig.from_dict(settings), run, resume=training.is_dir())
            except TrainingInterrupted as stopped:
                print(f"{name}: stopped at step {stopped.step}, checkpointed; run again to continue", flush=True)
                return
            finally:
                signal.alarm(0)  # a stage that finished in time: no Ctrl-C during its export
        if (run / "metrics.json").is_file():
            print(f"exported {export(name, run)}", flush=True)


if __name__ == "__main__":
    main()
