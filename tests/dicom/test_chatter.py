"""pydicom's and the decoders' chatter stays out of the user's terminal unless --verbose."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_testutil import pydicom_file

from fedrad.client.dicom.chatter import set_verbose
from fedrad.client.dicom.cli import main

#: GDCM fails on it first (pydicom logs an ERROR with a traceback), then pylibjpeg decodes it.
FALLS_BACK = "JPGExtended.dcm"
#: openjpeg prints "Invalid number of tiles ..." straight to file descriptor 2.
NATIVE_NOISE = "JPEG2000-embedded-sequence-delimiter.dcm"
OPENJPEG_LINE = "Invalid number of tiles"


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (capfd swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


@pytest.fixture()
def terminal_logging() -> Iterator[None]:
    """What the CLI's logging.basicConfig gives outside pytest: WARNING and up printed to stderr."""
    handler = _StderrHandler(logging.WARNING)
    logging.getLogger().addHandler(handler)
    yield
    logging.getLogger().removeHandler(handler)


@pytest.fixture()
def noisy_site(tmp_path: Path, terminal_logging: None) -> Iterator[tuple[Path, Path]]:
    root = tmp_path / "site"
    root.mkdir()
    names = [FALLS_BACK, NATIVE_NOISE, "MR_small.dcm", "CT_small.dcm", "MR_small_RLE.dcm"]
    for name in names:
        shutil.copyfile(pydicom_file(name), root / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{n},{'ab'[k % 2]}\n" for k, n in enumerate(names)))
    yield root, labels
    set_verbose(False)


def _run(root: Path, labels: Path, cache: Path, *extra: str) -> int:
    return main(["data", "index", "--root", str(root), "--labels", str(labels), "--cache-dir", str(cache),
                 "--build-cache", "--no-progress", "--workers", "1", *extra])


def test_decoder_chatter_is_kept_quiet(noisy_site: tuple[Path, Path], tmp_path: Path,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    root, labels = noisy_site

    code = _run(root, labels, tmp_path / "cache")

    out, err = capfd.readouterr()
    assert code == 0
    assert "5 of 5 files usable" in out
    terminal = out + err
    assert OPENJPEG_LINE not in terminal
    assert "Traceback" not in terminal and "GDCM does not support" not in terminal
    assert "pixel decoding failed: 1" in out  # the one file nothing decodes is still reported, by reason


def test_verbose_lets_the_decoders_speak(noisy_site: tuple[Path, Path], tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    root, labels = noisy_site

    code = _run(root, labels, tmp_path / "cache", "--verbose")

    out, err = capfd.readouterr()
    assert code == 0
    assert OPENJPEG_LINE in err
    assert "GDCM does not support" in err  # pydicom's own log record, through the terminal handler
