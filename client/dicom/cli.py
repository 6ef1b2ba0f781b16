"""``fedrad-node data index|preview|convert``: the DICOM commands of the node CLI.

Wire into the node's argparse tree with :func:`add_data_commands`; each sub-command sets
``args.handler`` (``handler(args) -> int`` exit code). Runnable on its own too:
``python -m fedrad.client.dicom.cli data index --root DIR --labels labels.csv``.

This is the only module of the package that writes to the terminal (through ``rich``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedrad.common.errors import ConfigError, FedradError

from .config import DicomDataConfig, load_dicom_config, parse_dicom_config

Handler = Callable[[argparse.Namespace], int]
console = Console(soft_wrap=True)
log = logging.getLogger(__name__)


def add_data_commands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Handler]:
    """Add ``data {index,preview,convert}``; returns the handlers by sub-command name."""
    data = subparsers.add_parser("data", help="index, preview or synthesise a hospital's DICOM data")
    sub = data.add_subparsers(dest="data_command", metavar="{index,preview,convert}", required=True)

    p = sub.add_parser("index", help="index a DICOM folder and report what is usable (and why not)")
    _add_config_args(p)
    p.add_argument("--build-cache", action="store_true", help="also decode into the preprocessed cache and split")
    p.set_defaults(handler=cmd_index)

    p = sub.add_parser("preview", help="write a PNG contact sheet of preprocessed images per class")
    _add_config_args(p)
    p.add_argument("--out", type=Path, default=Path("dicom-preview.png"), help="PNG to write")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    p.set_defaults(handler=cmd_preview)

    p = sub.add_parser("convert", help="write a labelled .npz image set as synthetic per-hospital DICOM folders")
    p.add_argument("npz", type=Path, nargs="?", default=None, help="MedMNIST-style .npz (default: bundled PneumoniaMNIST)")
    p.add_argument("--out", type=Path, required=True, help="folder for hospital-1, hospital-2, ...")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--images-per-patient", default="1,4", help="min,max images per patient (default 1,4)")
    p.add_argument("--max-per-hospital", type=int, default=None)
    p.add_argument("--rle-fraction", type=float, default=0.0, help="share of files stored RLE Lossless")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_convert)
    return {"index": cmd_index, "preview": cmd_preview, "convert": cmd_convert}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM settings (a YAML file, and/or flags that override it)")
    g.add_argument("--config", type=Path, help="YAML with DicomDataConfig fields (optionally under 'dicom:')")
    g.add_argument("--root", type=Path, help="folder of DICOM files")
    g.add_argument(
        "--labels", type=Path, dest="labels_csv",
        help="labels CSV; a relative path is taken from the current directory (in a YAML config: from the root)",
    )
    g.add_argument("--label-key", choices=["path", "sop_instance_uid", "study_instance_uid", "patient_id"])
    g.add_argument("--key-column")
    g.add_argument("--label-column")
    g.add_argument("--label-attribute", help="take labels from this DICOM attribute instead of a CSV")
    g.add_argument("--classes", help="comma-separated class names, in class-index order")
    g.add_argument("--image-size", type=int)
    g.add_argument("--channels", type=int, choices=[1, 3])
    g.add_argument("--cache-dir", type=Path, help="index, reports and cache (relative: from the current directory)")
    g.add_argument("--workers", type=int)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--verbose", "-v", action="store_true", dest="dicom_verbose",
        help="log progress, and let pydicom's and the decoders' own messages through to the terminal "
        "(also: fedrad-node -v data ...)",
    )


_FLAG_FIELDS = (
    "root",
    "labels_csv",
    "label_key",
    "key_column",
    "label_column",
    "label_attribute",
    "image_size",
    "channels",
    "cache_dir",
    "workers",
)


#: Path flags that, like any command-line path, are relative to the current directory.
_CWD_PATHS = ("labels_csv", "cache_dir")


def _from_cwd(value: Path, name: str, *, root: Any) -> Path:
    """``value`` made absolute from the current directory; a missing labels CSV is named with a hint."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if name == "labels_csv" and not path.exists() and root is not None and Path(root).is_dir():
        hint = ""
        if root is not None and not Path(value).is_absolute() and (Path(root) / value).is_file():
            hint = f" (there is one under the root: pass --labels {Path(root) / value})"
        raise ConfigError("command line", [f"command line: --labels: {path}: file not found{hint}; a relative "
                                           "--labels is taken from the current directory"])
    return path


def config_from_args(args: argparse.Namespace) -> DicomDataConfig:
    """The YAML (if any) with the flags given on the command line applied on top."""
    data: dict[str, Any] = {}
    if args.config is not None:
        data = load_dicom_config(args.config).model_dump(exclude_unset=True)
        if "hash_salt" in data and data["hash_salt"] is not None:
            data["hash_salt"] = data["hash_salt"].get_secret_value()
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            if name in _CWD_PATHS:
                value = _from_cwd(value, name, root=getattr(args, "root", None) or data.get("root"))
            data[name] = value
    if args.classes:
        data["class_names"] = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    if "label_attribute" in data and getattr(args, "labels_csv", None) is None and args.label_attribute is not None:
        data.pop("labels_csv", None)
    if "root" not in data:
        raise ConfigError("command line", ["command line: --root or --config is required"])
    return parse_dicom_config(data, source=str(args.config) if args.config else "command line")


def _fail(exc: FedradError) -> int:
    console.print(f"[bold red]error:[/] {exc}")
    return exc.exit_code


def _setup_output(args: argparse.Namespace) -> None:
    from .chatter import set_verbose

    verbose = bool(getattr(args, "dicom_verbose", False)) or int(getattr(args, "verbose", 0) or 0) > 0
    set_verbose(verbose)
    if verbose:
        logging.getLogger("fedrad").setLevel(logging.INFO)


def cmd_index(args: argparse.Namespace) -> int:
    _setup_output(args)
    try:
        cfg = config_from_args(args)
        from .index import build_index

        index = build_index(cfg, progress=not args.no_progress)
        _print_summary(index.summary(), cfg)
        if args.build_cache:
            from .dataset import load_dicom_site

            site = load_dicom_site(cfg, progress=not args.no_progress)
            _print_load_report(site.extra["report"])
    except FedradError as exc:
        return _fail(exc)
    return 0 if index.records else 3


def cmd_preview(args: argparse.Namespace) -> int:
    _setup_output(args)
    try:
        cfg = config_from_args(args)
        from .dataset import load_dicom_site
        from .preview import write_preview

        site = load_dicom_site(cfg, progress=not args.no_progress)
        out = write_preview(site, args.out, per_class=args.per_class)
    except FedradError as exc:
        return _fail(exc)
    console.print(f"wrote [bold]{out}[/] ({len(site.train)} training images, {site.num_classes} classes)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from fedrad import bundled_path

    from .convert import convert_npz_to_dicom

    try:
        lo, hi = (int(v) for v in str(args.images_per_patient).split(","))
    except ValueError:
        return _fail(ConfigError("command line", [f"--images-per-patient: expected MIN,MAX (got {args.images_per_patient!r})"]))
    npz = args.npz or bundled_path("data", "pneumoniamnist.npz")
    try:
        folders = convert_npz_to_dicom(
            npz,
            args.out,
            num_hospitals=args.hospitals,
            images_per_patient=(lo, hi),
            seed=args.seed,
            max_images_per_hospital=args.max_per_hospital,
            rle_fraction=args.rle_fraction,
        )
    except FedradError as exc:
        return _fail(exc)
    for f in folders:
        console.print(f"wrote [bold]{f}[/] (labels.csv inside)")
    return 0


def _print_summary(s: dict[str, Any], cfg: DicomDataConfig) -> None:
    console.print(
        f"[bold]{s['indexed']}[/] of {s['files_seen']} files usable, {s['patients']} patients; "
        f"index and report in {cfg.cache_path}"
    )
    console.print(
        f"file-by-file reasons: {cfg.cache_path / 'paths.phi.csv'} (holds file paths: PHI, keep it on this node)"
    )
    if s["skipped_by_reason"]:
        t = Table(title="skipped files", show_header=True)
        t.add_column("reason")
        t.add_column("files", justify="right")
        for reason, n in s["skipped_by_reason"].items():
            t.add_row(reason, str(n))
        console.print(t)
    t = Table(title="usable images per class", show_header=True)
    t.add_column("class")
    t.add_column("images", justify="right")
    for name, n in s["images_per_class"].items():
        t.add_row(name, str(n))
    console.print(t)


def _print_load_report(r: dict[str, Any]) -> None:
    console.print(f"decoded {r['decoded_now']}, reused {r['reused_from_cache']} from the cache")
    for reason, n in r["unusable_after_decoding"].items():
        console.print(f"  unusable after decoding: {reason}: {n}")
    for note, n in r.get("used_with_notes", {}).items():
        console.print(f"  used with a note: {note}: {n}")
    t = Table(title="patient-level splits", show_header=True)
    for col in ("split", "images", "patients", "per class"):
        t.add_column(col)
    for name, v in r["splits"].items():
        t.add_row(name, str(v["images"]), str(v["patients"]), str(v["per_class"]))
    console.print(t)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (the node CLI wires :func:`add_data_commands` instead)."""
    parser = argparse.ArgumentParser(prog="fedrad-node")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
