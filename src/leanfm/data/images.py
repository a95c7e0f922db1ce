"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files, read with numpy — no torchvision).

Where a network exists and the Debian files do not, :func:`fashion_mnist` falls back to torchvision's download
if torchvision is installed; otherwise the error says which package to install.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from leanfm.errors import LeanfmError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: big-endian magic ``0 0 dtype ndim``, then the dims, then the data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LeanfmError(f"'{path}' is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise LeanfmError(f"'{path}' is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(dims))


def _torchvision_fallback(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as err:
        raise LeanfmError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with 'apt-get install dataset-fashion-mnist'"
        ) from err
    data = FashionMNIST(str(Path.home() / ".cache" / "leanfm" / "torchvision"), train=split == "train", download=True)
    return data.data.clone(), data.targets.clone()


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64 of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in _FILES:
        raise LeanfmError(f"unknown Fashion-MNIST split '{split}'; accepted: train, test")
    images_file, labels_file = (root / name for name in _FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        return _torchvision_fallback(split)
    images = torch.from_numpy(read_idx(images_file).copy())
    labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise LeanfmError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 28, 28]`` normalised with the dataset's mean/std."""
    return ((images.float() / 255.0 - 0.2860) / 0.3530).unsqueeze(1)
