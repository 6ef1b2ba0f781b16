"""Benchmark of the hospital-side DICOM pipeline (not a test).

1. Generates ``--images`` DICOM files from the bundled PneumoniaMNIST with the converter
   (one hospital, 12-bit CR/DX, some MONOCHROME1, ``--rle-fraction`` RLE Lossless) in a temp dir.
2. Times, in files per second: indexing (walk + headers + hashing + labels), decode +
   preprocess into the cache (all cores), and a second load served from the cache.
3. Times one training epoch (forward + backward + SGD step of the ``cnn`` model, batch 64,
   shuffled DataLoader) over the training split read from the memmap cache versus the same
   images as an in-memory tensor.

Run: ``python benchmarks/dicom_bench.py [--images 3000] [--epochs 3]``
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedrad import bundled_path
from fedrad.client.dicom import DicomDataConfig, load_dicom_site
from fedrad.client.dicom.convert import convert_npz_to_dicom
from fedrad.client.dicom.index import build_index
from fedrad.common.datasets import ImageSplit
from fedrad.common.models import build_model

try:  # the loader fedrad trains with
    from fedrad.client.train import ArrayDataset
except ImportError:  # pragma: no cover - keep the benchmark usable on its own

    class ArrayDataset(Dataset):  # type: ignore[no-redef]
        def __init__(self, split: ImageSplit) -> None:
            self.images, self.labels = split.images, split.labels

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.from_numpy(np.array(self.images[i])), torch.tensor(int(self.labels[i]))


def _epoch(loader: DataLoader, model: nn.Module, opt: torch.optim.Optimizer) -> float:
    loss_fn = nn.CrossEntropyLoss()
    t = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t


def _epoch_times(dataset: Dataset, epochs: int, batch_size: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    _epoch(loader, model, opt)  # warm-up
    return [_epoch(loader, model, opt) for _ in range(epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rle-fraction", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the epoch timings (default 1)")
    parser.add_argument("--keep", type=Path, default=None, help="write the DICOM files here and keep them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    torch.set_num_threads(args.threads)
    console.print(f"load average before start: {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} cores")

    tmp = Path(tempfile.mkdtemp(prefix="dicom-bench-")) if args.keep is None else args.keep
    try:
        t = time.perf_counter()
        (root,) = convert_npz_to_dicom(
            bundled_path("data", "pneumoniamnist.npz"),
            tmp,
            num_hospitals=1,
            seed=0,
            max_images_per_hospital=args.images,
            rle_fraction=args.rle_fraction,
        )
        t_convert = time.perf_counter() - t
        n = sum(1 for _ in root.rglob("IM*"))
        cfg = DicomDataConfig(root=root, labels_csv=Path("labels.csv"), image_size=28, channels=1, workers=args.workers)

        t = time.perf_counter()
        build_index(cfg, progress=False, reuse=False)
        t_index = time.perf_counter() - t
        # First load: the index is reused (files unchanged), so this is decode + preprocess into the
        # cache (all cores) + patient split + cache layout.
        t = time.perf_counter()
        load_dicom_site(cfg, progress=False)
        t_decode = time.perf_counter() - t
        t = time.perf_counter()
        site = load_dicom_site(cfg, progress=False)
        t_cached = time.perf_counter() - t

        workers = args.workers or len(os.sched_getaffinity(0))
        table = Table(title=f"DICOM pipeline, {n} files (28x28, {workers} worker processes)")
        for col in ("stage", "seconds", "files/s"):
            table.add_column(col, justify="right" if col != "stage" else "left")
        table.add_row("convert (generate, not part of the pipeline)", f"{t_convert:.2f}", f"{n / t_convert:,.0f}")
        table.add_row("index (walk, headers, sha256, labels)", f"{t_index:.2f}", f"{n / t_index:,.0f}")
        table.add_row("decode + preprocess + split into cache (1st load)", f"{t_decode:.2f}", f"{n / t_decode:,.0f}")
        table.add_row("index + decode + preprocess (cold)", f"{t_index + t_decode:.2f}", f"{n / (t_index + t_decode):,.0f}")
        table.add_row("later load (everything cached)", f"{t_cached:.2f}", f"{n / t_cached:,.0f}")
        console.print(table)

        train = site.train
        in_memory = ImageSplit(images=np.array(train.images), labels=np.array(train.labels))
        tensor_ds = TensorDataset(torch.from_numpy(in_memory.images), torch.from_numpy(in_memory.labels))
        runs = {
            "memmap cache (ArrayDataset)": _epoch_times(ArrayDataset(train), args.epochs, args.batch_size, 0),
            "in-memory array (ArrayDataset)": _epoch_times(ArrayDataset(in_memory), args.epochs, args.batch_size, 0),
            "in-memory tensor (TensorDataset)": _epoch_times(tensor_ds, args.epochs, args.batch_size, 0),
        }
        base = statistics.median(runs["in-memory tensor (TensorDataset)"])
        table = Table(title=f"epoch time, cnn, {len(train)} training images, batch {args.batch_size}, median of {args.epochs}")
        for col in ("source", "seconds/epoch", "vs in-memory tensor"):
            table.add_column(col, justify="right" if col != "source" else "left")
        for name, times in runs.items():
            med = statistics.median(times)
            table.add_row(name, f"{med:.3f}", f"{100 * (med / base - 1):+.1f}%")
        console.print(table)
        console.print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
