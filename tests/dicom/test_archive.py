"""No single entry of an archive aborts the index; every entry ends in exactly one report line."""

from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

import pytest
from dicom_testutil import pydicom_file

from fedrad.client.dicom import DicomDataConfig
from fedrad.client.dicom.index import build_index
from fedrad.client.dicom.walk import (
    CACHE_FOLDER,
    DANGLING_LINK,
    LABELS_FILE,
    LINK_LOOP,
    LINKED_FOLDER,
    NOT_REGULAR,
    UNREADABLE_FOLDER,
    walk_archive,
)


def _image(root: Path, rel: str, name: str = "MR_small.dcm") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pydicom_file(name), root / rel)


def _labels(path: Path, rels: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([rel, "a" if k % 2 else "b"] for k, rel in enumerate(rels))


def _hostile_archive(root: Path) -> dict[str, str]:
    """An archive with every kind of entry; returns rel -> expected reason ("" = a candidate file)."""
    _image(root, "ok/mr")
    _image(root, "ok/ct", "CT_small.dcm")
    os.symlink("loop", root / "loop")  # ln -s loop loop
    os.symlink("pong", root / "ping")
    os.symlink("ping", root / "pong")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("ok", root / "linked-folder")
    os.symlink("ok/mr", root / "link-to-file")  # same content as ok/mr: a duplicate, but read through the link
    os.mkfifo(root / "fifo")  # reading it would block for ever
    old_cache = root / ".fedrad-cache"  # an earlier default cache, while --cache-dir points elsewhere
    old_cache.mkdir()
    (old_cache / "images.npy").write_bytes(b"\x93NUMPY" + bytes(1000))
    renamed_cache = root / "old-cache"  # a cache folder under another name: recognised by its salt file
    renamed_cache.mkdir()
    (renamed_cache / "hash-salt").write_text("x")
    return {
        "ok/mr": "",
        "ok/ct": "",
        "link-to-file": "",
        "loop": LINK_LOOP,
        "ping": LINK_LOOP,
        "pong": LINK_LOOP,
        "dangling": DANGLING_LINK,
        "linked-folder": LINKED_FOLDER,
        "fifo": NOT_REGULAR,
        ".fedrad-cache/": CACHE_FOLDER,
        "old-cache/": CACHE_FOLDER,
    }


def test_walk_puts_every_entry_in_exactly_one_place(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    expected = _hostile_archive(root)

    walked = walk_archive(root)

    lines = [(f.rel, "") for f in walked.files] + [(p.rel, p.reason) for p in walked.problems]
    assert sorted(lines) == sorted(expected.items())
    assert walked.folders == 2  # the root and ok/ (links to folders are not followed)


def test_index_survives_the_hostile_archive_and_its_counts_add_up(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    expected = _hostile_archive(root)
    _labels(root / "labels.csv", ["ok/mr", "ok/ct", "link-to-file"])
    cfg = DicomDataConfig(root=root, labels_csv=Path("labels.csv"), class_names=("a", "b"),
                          cache_dir=tmp_path / "cache", workers=1)

    index = build_index(cfg, progress=False)

    lines = [r.path for r in index.records] + [s.path for s in index.skipped]
    assert sorted(lines) == sorted([*expected, "labels.csv"])  # each entry exactly once
    s = index.summary()
    assert s["indexed"] + s["skipped"] == s["files_seen"] == len(expected) + 1
    assert all(sk.reason for sk in index.skipped)
    reasons = {sk.path: sk.reason for sk in index.skipped}
    assert {p: reasons[p] for p in expected if expected[p]} == {p: r for p, r in expected.items() if r}
    assert reasons["labels.csv"] == LABELS_FILE
    assert sorted(r.path for r in index.records) == ["link-to-file", "ok/ct"]  # read through the link
    assert reasons["ok/mr"] == "duplicate content"  # same content as the link's target, found later in order
    assert not any(p.startswith((".fedrad-cache/", "old-cache/")) and p not in expected for p in lines)


def test_unreadable_folder_is_counted_via_a_failing_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing that fails with EACCES (what chmod 000 gives a non-root user) is one skipped line."""
    root = tmp_path / "archive"
    _image(root, "open/mr")
    _image(root, "locked/mr")
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    import fedrad.client.dicom.walk as walk_module

    monkeypatch.setattr(walk_module.os, "scandir", scandir)

    walked = walk_archive(root)

    assert [f.rel for f in walked.files] == ["open/mr"]
    assert [(p.rel, p.reason, p.detail) for p in walked.problems] == [("locked/", UNREADABLE_FOLDER, "EACCES")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode (chmod 000 blocks nothing)")
def test_chmod_000_folder_is_an_unreadable_folder(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    _image(root, "open/mr")
    _image(root, "locked/mr")
    (root / "locked").chmod(0)
    try:
        walked = walk_archive(root)
    finally:
        (root / "locked").chmod(0o755)

    assert [(p.rel, p.reason) for p in walked.problems] == [("locked/", UNREADABLE_FOLDER)]


def test_unreadable_file_is_counted_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "archive"
    _image(root, "a/mr")
    _image(root, "b/ct", "CT_small.dcm")
    real_open = open

    def failing_open(file: object, *args: object, **kw: object) -> object:
        if str(file).endswith("b/ct"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(file, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", failing_open)
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"),
                          cache_dir=tmp_path / "cache", workers=1)

    index = build_index(cfg, progress=False)

    assert [r.path for r in index.records] == ["a/mr"]
    assert [(s.path, s.reason, s.detail) for s in index.skipped] == [("b/ct", "unreadable", "PermissionError")]


def test_old_cache_inside_the_root_is_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "archive"
    _image(root, "mr")
    (root / ".fedrad-cache").mkdir()
    (root / ".fedrad-cache" / "images.npy").write_bytes(bytes(100))
    import fedrad.client.dicom.index as index_module

    read: list[str] = []
    real = index_module._read_one
    monkeypatch.setattr(index_module, "_read_one", lambda p, rel, *a: read.append(rel) or real(p, rel, *a))
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"),
                          cache_dir=tmp_path / "elsewhere", workers=1)

    index = build_index(cfg, progress=False)

    assert read == ["mr"]
    assert index.summary()["skipped_by_reason"] == {CACHE_FOLDER: 1}


def test_file_names_that_are_not_utf8_do_not_abort_the_index(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    raw = os.fsencode(root) + b"/M\xfcller\xff.dcm"  # Latin-1 name from an old export: not valid UTF-8
    with open(raw, "wb") as fh:
        fh.write(pydicom_file("MR_small.dcm").read_bytes())
    _image(root, "ct", "CT_small.dcm")
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"),
                          cache_dir=tmp_path / "cache", workers=1)

    index = build_index(cfg, progress=False)

    assert len(index.records) == 2
    assert (tmp_path / "cache" / "paths.phi.csv").read_bytes().count(b"M\xfcller\xff.dcm") == 1
