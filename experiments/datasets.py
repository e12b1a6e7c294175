"""Classification data for the MLP experiments: CIFAR-10 if it is on disk, else a synthetic offline task.

CIFAR-10 is read from the standard python-pickle batches (the folder `cifar-10-batches-py` of
https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: data_batch_1 … data_batch_5, test_batch),
passed with --cifar DIR; nothing is downloaded at run time. Without it the experiments use the
teacher task below, which needs nothing but torch and is the same on every machine.
"""

import argparse
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.report import int_list

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@dataclass(frozen=True)
class Classification:
    """Inputs x (n, d) float32 and integer labels y (n,), split into train and test."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def d_in(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def teacher_task(n_train: int = 8192, n_test: int = 2048, d_in: int = 256, hidden: int = 128,
                 n_classes: int = 10, seed: int = 0) -> Classification:
    """Gaussian inputs x ~ N(0, I_d_in) labelled by a random ReLU teacher: y = argmax_c z_c(x).

    z = B·relu(A·x) with A, B Gaussian of variance 1/fan-in; each class's logit is standardized
    over the data before the argmax, so the classes come out roughly balanced. A 3-layer student can
    represent the teacher, so the loss can go to 0 and the task measures optimization speed.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d_in, generator=gen)
    A = torch.randn(hidden, d_in, generator=gen) / d_in**0.5
    B = torch.randn(n_classes, hidden, generator=gen) / hidden**0.5
    z = F.relu(x @ A.T) @ B.T
    y = ((z - z.mean(0)) / z.std(0)).argmax(1)
    name = (f"teacher (synthetic: Gaussian inputs, d={d_in}, labels of a random {d_in}-{hidden}-{n_classes} "
            "ReLU net)")
    return Classification(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def cifar10(root: Path, n_train: int | None = None) -> Classification:
    """CIFAR-10 from the python-pickle batches in `root`, pixels standardized per channel (train stats)."""
    root = Path(root)
    missing = [name for name in (*CIFAR_TRAIN, CIFAR_TEST) if not (root / name).is_file()]
    if missing:
        raise SystemExit(f"--cifar {root}: no {missing[0]} there; give the cifar-10-batches-py folder "
                         f"unpacked from {CIFAR_URL}")
    x_train, y_train = zip(*(_cifar_batch(root / name) for name in CIFAR_TRAIN), strict=True)
    x_train, y_train = torch.cat(x_train)[:n_train], torch.cat(y_train)[:n_train]
    x_test, y_test = _cifar_batch(root / CIFAR_TEST)
    channels = x_train.view(len(x_train), 3, -1)
    mean, std = channels.mean((0, 2)), channels.std((0, 2))

    def standardize(x: torch.Tensor) -> torch.Tensor:
        return ((x.view(len(x), 3, -1) - mean[:, None]) / std[:, None]).view(len(x), -1)

    return Classification(f"CIFAR-10 ({len(x_train)} train images)", standardize(x_train), y_train,
                          standardize(x_test), y_test)


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = torch.as_tensor(batch[b"data"], dtype=torch.float32) / 255
    return x, torch.as_tensor(batch[b"labels"], dtype=torch.long)


def add_task_flags(parser: argparse.ArgumentParser, sizes: str, help: str) -> argparse.ArgumentParser:
    """The MLP experiments' flags: --cifar DIR and a comma-separated list of sizes (e.g. --widths)."""
    parser.add_argument("--cifar", default=None, help="folder of CIFAR-10 python-pickle batches")
    parser.add_argument(f"--{sizes}", type=int_list, default=None, help=help)
    return parser


def load_task(cifar: Path | None, n_train: int) -> Classification:
    """CIFAR-10 from `cifar` (its first n_train training images) if given, else the teacher task;
    its name goes to stdout."""
    task = cifar10(cifar, n_train) if cifar else teacher_task(n_train=n_train)
    print(f"data: {task.name}")
    return task
