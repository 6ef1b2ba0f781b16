"""``fedrad-node predict`` and ``fedrad-node explain``: use a study's final model at the hospital.

Both read ``model.pt`` (weights and model card), load the hospital's images with the training's
preprocessing (a DICOM folder, or a MedMNIST-style ``.npz``) and write only into ``--out`` on this
machine; nothing is sent anywhere. Runnable on its own too:
``python -m fedrad.client.commands.predict predict --model model.pt --root DIR --out DIR``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrad.common.cli import console
from fedrad.common.errors import DataError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "predict", help="run a study's final model on this hospital's images (nothing leaves the node)",
        description="Predict every image under --root with the model in --model, using the preprocessing "
        "its model card records; writes predictions.csv and, with labels, metrics.json and roc.png into --out.",
    )
    _add_common(p)
    p.set_defaults(handler=run_predict_cmd)

    e = sub.add_parser(
        "explain", help="saliency maps (Grad-CAM, integrated gradients) for predictions, as PNG contact sheets",
        description="Explain the model's decision for chosen images (--ids from predictions.csv, else the "
        "first --limit): Grad-CAM on the last convolutional block and integrated gradients, overlaid on "
        "the preprocessed image with the probability and the true label when known. Written into --out only.",
    )
    _add_common(e)
    e.add_argument("--ids", help="comma-separated image ids as in predictions.csv (default: the first --limit)")
    e.add_argument("--limit", type=int, default=16, help="images to explain without --ids (default 16)")
    e.add_argument("--methods", default="gradcam,ig", help="comma-separated: gradcam, ig (default both)")
    e.set_defaults(handler=run_explain_cmd)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model.pt of a finished study")
    p.add_argument("--root", type=Path, required=True, help="folder of DICOM files, or a MedMNIST-style .npz")
    p.add_argument("--labels", type=Path, help="DICOM: labels CSV (a command-line path: relative to the current "
                   "directory, as for 'data index'); "
                   "with labels, local metrics are written (npz: labels come from the archive)")
    p.add_argument("--label-key", default="path", choices=["path", "sop_instance_uid", "study_instance_uid", "patient_id"])
    p.add_argument("--dicom-config", type=Path, help="this node's DICOM settings YAML (default: the model card's "
                   "preprocessing); a model whose preprocessing differs is refused")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="npz: which split (default test)")
    p.add_argument("--paths", default="hashed", choices=["hashed", "plain"],
                   help="DICOM image ids: salted sha256 of the relative path (default) or the relative path")
    p.add_argument("--out", type=Path, required=True, help="output folder (on this machine)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cache-dir", type=Path, help="DICOM pixel cache (default <root>/.fedrad-cache)")
    p.add_argument("--workers", type=int, help="DICOM decoding processes (default: all cores)")


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, card, inputs) for the arguments of either command."""
    from fedrad.client.training.predict import dicom_config, load_dicom_inputs, load_model, load_npz_inputs

    model, card = load_model(args.model)
    root: Path = args.root
    if root.is_file() and root.suffix == ".npz":
        if args.labels is not None:
            log.warning("--labels is ignored for an .npz archive (its labels are used)")
        inputs = load_npz_inputs(root, card=card, split=args.split)
    elif root.is_dir():
        labels = args.labels.resolve() if args.labels is not None else None  # relative to the current directory
        cfg = dicom_config(root, card=card, labels_csv=labels, settings_file=args.dicom_config,
                           cache_dir=args.cache_dir, workers=args.workers)
        if args.labels is not None and args.label_key != "path":
            cfg = cfg.model_copy(update={"label_key": args.label_key})
        inputs = load_dicom_inputs(cfg, paths=args.paths, progress=sys.stderr.isatty())
    else:
        raise DataError(f"{root}: neither a folder of DICOM files nor an .npz archive")
    return model, card, inputs


def run_predict_cmd(args: argparse.Namespace) -> int:
    from fedrad.client.training.predict import run_predict
    from fedrad.common.device import resolve_device

    model, card, inputs = load_inputs(args)
    res = run_predict(model, card, inputs, args.out, device=resolve_device(args.device), batch_size=args.batch_size)
    thr = "argmax" if card.threshold is None else f"{card.threshold:.3f} ({card.threshold_source})"
    console.print(f"predicted {res.images} images with model '{card.study_name}' at threshold {thr}")
    if res.metrics is not None:
        m = res.metrics
        console.print("  ".join(f"{k} {m[k]:.3f}" for k in ("auc", "sensitivity", "specificity", "accuracy")
                                if m.get(k) is not None))
    if inputs.skipped:
        console.print("skipped: " + ", ".join(f"{r}: {n}" for r, n in inputs.skipped.items()))
    console.print(f"outputs (this machine only): {', '.join(str(f) for f in res.files)}")
    return 0


def run_explain_cmd(args: argparse.Namespace) -> int:
    import numpy as np  # heavy imports only when the command runs (help starts at once)

    from fedrad.client.training.explain import METHODS, PER_PAGE, Explained, explain_images, write_contact_sheets
    from fedrad.client.training.predict import check_compatible, decide

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DataError(f"--methods: unknown {bad or methods} (known: {', '.join(METHODS)})")
    model, card, inputs = load_inputs(args)
    check_compatible(card, inputs)
    if args.ids:
        wanted = [i.strip() for i in args.ids.split(",") if i.strip()]
        where = {image_id: k for k, image_id in enumerate(inputs.ids)}
        missing = [i for i in wanted if i not in where]
        if missing:
            raise DataError(f"--ids: {len(missing)} id(s) not found under --root (e.g. {missing[0]!r}); "
                            "use ids from predictions.csv made with the same --paths")
        pick = np.asarray([where[i] for i in wanted], dtype=np.int64)
    else:
        pick = np.arange(min(max(args.limit, 1), len(inputs)))
    images = np.asarray(inputs.images[pick], dtype=np.float32)
    import torch

    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(images)), dim=1).numpy()
    target = decide(probs, card)
    maps, target, prob = explain_images(model, images, methods=methods, target=target)
    items = [Explained(image_id=inputs.ids[k], target=int(t), probability=float(p),
                       true_label=None if inputs.labels is None else int(inputs.labels[k]))
             for k, t, p in zip(pick, target, prob)]
    pages = write_contact_sheets(args.out, images, maps, items, card.class_names)
    with open(args.out / "explained.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "explained_class", "probability", "true_label", "sheet"])
        for n, it in enumerate(items):
            w.writerow([it.image_id, card.class_names[it.target], f"{it.probability:.6f}",
                        "" if it.true_label is None else card.class_names[it.true_label], pages[n // PER_PAGE].name])
    console.print(f"explained {len(items)} images ({', '.join(methods)}); sheets (this machine only): "
                  + ", ".join(str(p) for p in pages))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point with the same error handling as ``fedrad-node``."""
    from fedrad.common.cli import err_console, setup_logging
    from fedrad.common.errors import ConfigError, FedradError

    parser = argparse.ArgumentParser(prog="fedrad-node")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error[/] in {exc.source}:")
        for p in exc.problems:
            err_console.print(f"  - {p}", markup=False)
        return exc.exit_code
    except FedradError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
