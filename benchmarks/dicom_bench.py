"""Benchmark of the hospital-side DICOM pipeline (not a test).

1. Generates ``--images`` DICOM files from the bundled PneumoniaMNIST with the converter
   (one hospital, 12-bit CR/DX, some MONOCHROME1, ``--rle-fraction`` RLE Lossless) in a temp dir.
2. Times, in files per second: indexing (walk + sha256 of every file + headers + labels), a
   re-index (every file hashed again, headers of known content reused), decode + preprocess
   into the cache (all cores), and a later load served from the cache.
3. The same on the public test files (pydicom's bundled data folder: many transfer syntaxes,
   photometric interpretations, broken and non-image files).
4. The command's start-up (``python -m fedrad.client.dicom.cli data index --help``: interpreter,
   imports, argument parsing), shown separately from the in-process stage times, and the whole
   ``data index --build-cache`` command on a cache hit, wall clock.
5. Optionally (``--epochs N``, default 0) one training epoch (``cnn``, batch 64) over the memmap
   cache versus the same images in memory.

Run: ``python benchmarks/dicom_bench.py [--images 3000] [--epochs 0]``
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
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
from fedrad.client.dicom.cache import PixelCache
from fedrad.client.dicom.convert import convert_npz_to_dicom
from fedrad.client.dicom.decode import Preprocess
from fedrad.client.dicom.index import build_index
from fedrad.common.datasets import ImageSplit
from fedrad.common.models import build_model

try:  # the loader fedrad trains with
    from fedrad.client.training.train import ArrayDataset
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


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "-"


def _command_seconds(argv: list[str], repeats: int = 3) -> float:
    """Median wall time of ``python -m fedrad.client.dicom.cli ARGV`` (exit code checked)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fedrad.client.dicom.cli", *argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _public_corpus(tmp: Path, workers: int | None) -> tuple[int, float, float, float, int]:
    """(files, index s, decode s, cached load s, usable) on pydicom's bundled data folder."""
    import pydicom.data

    root = tmp / "public"
    shutil.copytree(Path(pydicom.data.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    n = sum(1 for p in root.rglob("*") if p.is_file())
    cfg = DicomDataConfig(root=root, label_attribute="Modality", cache_dir=tmp / "public-cache", workers=workers)
    t = time.perf_counter()
    index = build_index(cfg, progress=False, reuse=False)
    t_index = time.perf_counter() - t
    settings = Preprocess.from_config(cfg)

    def decode() -> int:
        cache = PixelCache(cfg.cache_path, settings, cfg.preprocess_hash())
        with cache.locked():
            done = cache.update([(r.sha256, root / r.path) for r in index.records], workers=workers, progress=False)
            good = [r.sha256 for r in index.records if r.sha256 not in done.failed]
            cache.arrange(good)
        return len(good)

    t = time.perf_counter()
    usable = decode()
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    build_index(cfg, progress=False)
    decode()
    t_cached = time.perf_counter() - t
    return n, t_index, t_decode, t_cached, usable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=0, help="epoch timings (0 = skip)")
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
        t = time.perf_counter()
        build_index(cfg, progress=False)
        t_reindex = time.perf_counter() - t
        # First load: decode + preprocess into the cache (all cores) + patient split + cache layout
        # (the index inside it is a re-index: every file hashed again).
        t = time.perf_counter()
        load_dicom_site(cfg, progress=False)
        t_decode = time.perf_counter() - t
        t = time.perf_counter()
        site = load_dicom_site(cfg, progress=False)
        t_cached = time.perf_counter() - t

        startup = _command_seconds(["data", "index", "--help"])
        whole = _command_seconds(["data", "index", "--root", str(root), "--labels", str(root / "labels.csv"),
                                  "--build-cache", "--no-progress"])
        pub_n, pub_index, pub_decode, pub_cached, pub_usable = _public_corpus(tmp, args.workers)

        workers = args.workers or len(os.sched_getaffinity(0))
        table = Table(title=f"DICOM pipeline (28x28, {workers} worker processes)")
        for col in ("files", "stage", "seconds", "files/s"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        table.add_row(f"{n}", "convert (generate, not part of the pipeline)", f"{t_convert:.2f}", _rate(n, t_convert))
        table.add_row(f"{n}", "index, cold (walk, sha256, headers, labels)", f"{t_index:.2f}", _rate(n, t_index))
        table.add_row(f"{n}", "re-index (sha256 of every file, headers reused)", f"{t_reindex:.2f}", _rate(n, t_reindex))
        table.add_row(f"{n}", "1st load: re-index + decode + preprocess + split", f"{t_decode:.2f}", _rate(n, t_decode))
        table.add_row(f"{n}", "later load (cache hit: re-index + memmap)", f"{t_cached:.2f}", _rate(n, t_cached))
        table.add_row(f"{n}", "`data index --build-cache` command, cache hit", f"{whole:.2f}", _rate(n, whole))
        table.add_row("-", "  of which command start-up (`data index --help`)", f"{startup:.2f}", "-")
        table.add_row(f"{pub_n}", f"public test files: index, cold ({pub_usable} usable)", f"{pub_index:.2f}",
                      _rate(pub_n, pub_index))
        table.add_row(f"{pub_n}", "public test files: decode + preprocess into the cache", f"{pub_decode:.2f}",
                      _rate(pub_n, pub_decode))
        table.add_row(f"{pub_n}", "public test files: later load (cache hit)", f"{pub_cached:.2f}",
                      _rate(pub_n, pub_cached))
        console.print(table)

        if args.epochs > 0:
            _epoch_table(console, site.train, args.epochs, args.batch_size)
        console.print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _epoch_table(console: Console, train: ImageSplit, epochs: int, batch_size: int) -> None:
    in_memory = ImageSplit(images=np.array(train.images), labels=np.array(train.labels))
    tensor_ds = TensorDataset(torch.from_numpy(in_memory.images), torch.from_numpy(in_memory.labels))
    runs = {
        "memmap cache (ArrayDataset)": _epoch_times(ArrayDataset(train), epochs, batch_size, 0),
        "in-memory array (ArrayDataset)": _epoch_times(ArrayDataset(in_memory), epochs, batch_size, 0),
        "in-memory tensor (TensorDataset)": _epoch_times(tensor_ds, epochs, batch_size, 0),
    }
    base = statistics.median(runs["in-memory tensor (TensorDataset)"])
    table = Table(title=f"epoch time, cnn, {len(train)} training images, batch {batch_size}, median of {epochs}")
    for col in ("source", "seconds/epoch", "vs in-memory tensor"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for name, times in runs.items():
        med = statistics.median(times)
        table.add_row(name, f"{med:.3f}", f"{100 * (med / base - 1):+.1f}%")
    console.print(table)


if __name__ == "__main__":
    main()
