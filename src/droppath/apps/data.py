"""Data sets for ``droppath train``: bundled digits, CIFAR-10 on disk, a folder of images.

Files are data, never code: CIFAR-10's python format is a pickle, read here with an unpickler
that accepts only the few types that format holds, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from droppath._checks import check_choice

__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset", "restricted_load"]

DATASETS = ("digits", "cifar10", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DataError(Exception):
    """What a run reads or writes is not usable: a data set missing, incomplete or not in the
    expected format, or an output folder that cannot be written. The command line reports it in
    one line."""


@dataclass
class Dataset:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


# (module, name) pairs that CIFAR-10's python pickles need: numpy arrays and their dtypes.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                "lists, bytes and numbers"
            )
        return super().find_class(module, name)


def restricted_load(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays and plain Python containers."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, ...]:
    """A stratified split: the same fraction of every class goes to the test set."""
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in torch.unique(y):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: max(1, round(len(idx) * test_fraction))])
    test = torch.cat(test_idx)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test] = False
    return x[mask], y[mask], x[test], y[test]


def load_digits() -> Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes, a fixed split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError(
            "data='digits' needs scikit-learn, which droppath's train extra installs: "
            "pip install 'droppath[train]'"
        ) from None

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    x_train, y_train, x_test, y_test = _split(x, y, 0.2, seed=0)
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset("digits", x_train, y_train, x_test, y_test, [str(i) for i in range(10)])


def _cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file missing: {path}")
    try:
        batch = restricted_load(path.read_bytes())
        data = batch[b"data"]
        labels = batch[b"labels"]
        x = torch.as_tensor(data).reshape(-1, 3, 32, 32).float() / 255.0
        y = torch.as_tensor(list(labels), dtype=torch.long)
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # a truncated or foreign file: report it, not a traceback
        raise DataError(
            f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})"
        ) from None
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def load_cifar10(root: str | Path) -> Dataset:
    """CIFAR-10 in its python format: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``.

    ``root`` may be the ``cifar-10-batches-py`` folder itself or the folder that contains it.
    """
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DataError(f"data_dir must be a folder, got {str(root)!r} (not found)")
    parts = [_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _cifar_batch(root / "test_batch")
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    x_train, x_test = _standardize(x_train, x_test)
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    return Dataset("cifar10", x_train, y_train, x_test, y_test, classes)


def load_image_folder(root: str | Path, image_size: int = 32, seed: int = 0) -> Dataset:
    """Images in one sub-folder per class, resized to ``image_size``; 20% of each class is test."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data_dir must be a folder, got {str(root)!r} (not found)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if len(class_dirs) < 2:
        raise DataError(f"{root} needs at least two class sub-folders, found {len(class_dirs)}")
    images, labels = [], []
    for label, d in enumerate(class_dirs):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {d} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB").resize((image_size, image_size))
                    images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8))
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"cannot read image {f}: {e}") from None
            labels.append(label)
    x = torch.stack(images).reshape(-1, image_size, image_size, 3).permute(0, 3, 1, 2)
    x = x.float() / 255.0
    y = torch.tensor(labels)
    x_train, y_train, x_test, y_test = _split(x, y, 0.2, seed=seed)
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset(root.name, x_train, y_train, x_test, y_test, [d.name for d in class_dirs])


def load_dataset(name: str, data_dir: str | None = None, image_size: int = 32) -> Dataset:
    """Load ``"digits"`` (bundled), ``"cifar10"`` or ``"folder"`` (both need ``data_dir``)."""
    if check_choice(name, "data", DATASETS) == "digits":
        return load_digits()
    if not data_dir:
        raise DataError(f"data={name!r} needs data_dir, the folder that holds it")
    if name == "cifar10":
        return load_cifar10(data_dir)
    return load_image_folder(data_dir, image_size)
