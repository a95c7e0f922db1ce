"""Rebuild the committed artifacts under ``artifacts/`` (models that take too long to retrain for every run).

    python benchmarks/artifacts.py vit                  # the benchmark ViT: train (resumable) and export both stages
    python benchmarks/artifacts.py vit --export-only    # export the stages already trained under --runs

The ViT of the token-reduction benchmarks is trained in two stages, each a plain ``leanfm vision train`` run:
5 epochs at lr 2e-3 (``vit-fmnist-e5``, ~65 min on one core), then 6 more from those weights at lr 1e-3
(``vit-fmnist-e11``, ~70 min). Each finished stage is exported as bf16 safetensors with a manifest; its accuracy
is measured on the bf16 weights as saved (upcast to float32, as :func:`leanfm.vision.train.load_vit` loads them).
A later session continues from a committed stage instead of starting over — or, when a stage could not finish
within one session, from its committed training checkpoint ``artifacts/<stage>.training/state.pt`` (model,
optimizer, step and RNG in the one training loop's layout), which is copied into ``--runs`` and resumed exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from leanfm.data.images import fashion_mnist
from leanfm.models.artifacts import write_artifact
from leanfm.paths import leanfm_home
from leanfm.progress import set_quiet
from leanfm.training import checkpoint_path, restore_committed
from leanfm.vision.train import ViTTrainConfig, accuracy_and_throughput, load_vit, train_vit

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
STAGES = {  # name -> (config, the stage it continues, command)
    "vit-fmnist-e5": (ViTTrainConfig(), None, "leanfm vision train --out RUNS/vit-fmnist-e5 --resume"),
    "vit-fmnist-e11": (ViTTrainConfig(epochs=6, lr=1e-3), "vit-fmnist-e5",
                       "leanfm vision train --out RUNS/vit-fmnist-e11 --init-from RUNS/vit-fmnist-e5 --epochs 6 "
                       "--lr 1e-3 --resume"),
}


def export(name: str, run: Path) -> Path:
    """Write ``artifacts/<name>`` from the finished run folder ``run`` (its model and metrics.json)."""
    model = load_vit(run)
    bf16 = load_vit(run).to(torch.bfloat16).float()  # what the artifact will hold, upcast as load_vit does
    images, labels = fashion_mnist("test")
    quality = accuracy_and_throughput(bf16, images, labels)
    metrics = json.loads((run / "metrics.json").read_text())
    config, parent, command = STAGES[name]
    manifest = {
        "name": name, "command": command, "steps": metrics["steps"], "seed": config.seed,
        "data": "Fashion-MNIST train (60000 images, flips and 2-pixel shifts), test (10000) for the metric",
        "continues": parent, "config": metrics.get("config", config.to_dict()),
        "accuracy": quality["accuracy"],  # of the weights as committed (bf16)
        "metrics": {"accuracy_bf16": quality["accuracy"], "accuracy_float32": metrics["accuracy"]},
        "stages": metrics.get("stages"), "train_seconds": metrics.get("train_seconds"),
    }
    return write_artifact(model, ARTIFACTS / name, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", choices=["vit"])
    parser.add_argument("--runs", type=Path, default=leanfm_home() / "vision", help="training run folders")
    parser.add_argument("--export-only", action="store_true", help="do not train; export finished stages")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    for name, (config, parent, _) in STAGES.items():
        run = args.runs / name
        training = checkpoint_path(run)
        if not (run / "metrics.json").is_file():  # continue an interrupted stage from its committed checkpoint
            restore_committed(ARTIFACTS / f"{name}.training", run)
        if not args.export_only and not (run / "metrics.json").is_file():
            if parent is not None:
                start = args.runs / parent if (args.runs / parent / "metrics.json").is_file() else ARTIFACTS / parent
                config = ViTTrainConfig.from_dict({**config.to_dict(), "init_from": str(start)})
            train_vit(config, run, resume=training.is_dir())
        if (run / "metrics.json").is_file():
            print(f"exported {export(name, run)}", flush=True)


if __name__ == "__main__":
    main()
