"""``fedrad report RUN_DIR``: a self-contained report.html (and report.md) with every section."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedrad.common.config import parse_study
from fedrad.common.errors import FederationError
from fedrad.server.checkpoints import save_checkpoint
from fedrad.server.cmd_report import main
from fedrad.server.governance import write_report
from fedrad.server.history import StudyHistory
from fedrad.server.report_html import NR, SECTIONS, build_report

from .conftest import CLASSES, MODEL, Trained

SECTION_IDS = {"study", "hospitals", "privacy", "training", "validation", "final-model", "learning-rate",
               "coordinator-saw", "events"}


class _Doc(HTMLParser):
    """Collects what the checks need; fails on unbalanced structural tags."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.ids.append(str(a["id"]))
        if tag == "img":
            self.imgs.append(str(a.get("src")))
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(str(a[key]))
        if tag in ("html", "head", "body", "section", "table", "tr", "td", "th", "figure", "p", "nav"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("html", "head", "body", "section", "table", "tr", "td", "th", "figure", "p", "nav"):
            assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Doc:
    doc = _Doc()
    doc.feed(path.read_text(encoding="utf-8"))
    doc.close()
    assert not doc.stack
    return doc


@pytest.fixture(scope="module")
def run_dir(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder written by the coordinator's own code (history, checkpoint, governance report)."""
    out = tmp_path_factory.mktemp("run")
    study = parse_study({"federation": {"name": "report-test", "num_hospitals": 2, "rounds": 2, "seed": 3},
                         "model": MODEL, "data": {"class_names": CLASSES, "max_test": 64}})
    (out / "config.yaml").write_text(yaml.safe_dump(study.to_dict()), encoding="utf-8")
    hist = StudyHistory(out / "metrics.json", study=study.to_dict(), study_id=study.fingerprint()[:16])
    for n in (1, 2):
        rec = hist.round(n)
        for k, name in enumerate(("hospital-1", "hospital-2")):
            site = rec.site(name)
            site.update({"num_examples": 300 + 10 * k, "epsilon": 1.5 * n, "epsilon_budget": 8.0, "delta": 1e-5,
                         "study_epsilon": 1.25 * n, "study_epsilon_budget": 4.0, "val_epsilon": 0.5 * n,
                         "noise_multiplier": 1.1, "steps": 5, "val_examples": 60,
                         "receipt": {"audit-head": f"{n}{k}" * 32, "audit-count": 2 * n}})
        rec.pooled = {"auc": 0.8 + 0.05 * n, "sensitivity": 0.9, "specificity": 0.5 + 0.1 * n, "num_examples": 120}
        rec.global_test = {"loss": 0.7 - 0.1 * n, "auc": 0.85, "sensitivity": 0.9, "specificity": 0.6}
        rec.aggregated = True
    hist.status = "completed"
    hist.event("round 2: a note for the report")
    hist.save()
    save_checkpoint(out / "model.pt", state_dict=trained.model.state_dict(), study=study.to_dict(), round=2,
                    class_names=CLASSES)
    write_report(history=hist, run_dir=out, study=study)
    return out


def test_report_is_valid_self_contained_html_with_every_section(run_dir: Path) -> None:
    rc = main([str(run_dir)])

    assert rc == 0
    doc = _parse(run_dir / "report.html")
    assert set(doc.ids) == SECTION_IDS and len(SECTIONS) == len(SECTION_IDS)
    assert len(doc.imgs) >= 4 and all(src.startswith("data:image/png;base64,") for src in doc.imgs)
    assert not [u for u in doc.links if u.startswith(("http:", "https:", "//", "file:"))]
    text = " ".join(" ".join(doc.text).split())
    assert "report-test" in text and "hospital-1" in text and "hospital-2" in text
    assert "64 test images" in text  # recomputed from model.pt on the coordinator's test subset
    assert "a note for the report" in text
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    for heading in ("## Study", "## Hospitals", "## Privacy", "## Loss", "## AUC", "## The final model",
                    "## Learning rate", "## What the coordinator saw", "## Events"):
        assert heading in md
    refs = re.findall(r"\]\((report-files/[^)]+\.png)\)", md)
    assert len(refs) >= 4 and all((run_dir / ref).is_file() for ref in refs)


def test_final_models_confusion_counts_the_test_split(run_dir: Path) -> None:
    build_report(run_dir)
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if line.startswith(("| normal |", "| pneumonia |"))]
    counts = np.array([[int(c) for c in row.strip("|").split("|")[1:]] for row in rows])
    assert counts.shape == (2, 2) and counts.sum() == 64


def test_what_the_coordinator_saw_lists_each_hospitals_statistics(run_dir: Path) -> None:
    build_report(run_dir)
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    part = md.split("## What the coordinator saw", 1)[1].split("## Events", 1)[0]
    assert "| hospital-1 | train |" in part and "| hospital-2 | evaluate |" in part
    assert "noise_multiplier" in part and "val_examples" in part
    assert "receipt" not in part.split("| hospital | reply |", 1)[1].split("\n\n", 1)[0]  # not a statistic
    assert "| hospital-2 | " + "21" * 32 + " | 4 |" in part  # the last receipt per hospital


def test_privacy_shows_both_budgets_and_the_validation_account(run_dir: Path) -> None:
    build_report(run_dir)
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    part = md.split("## Privacy", 1)[1].split("## Loss", 1)[0]
    assert "| hospital-1 | 3.000 | 8.000 | 2.500 | 4.000 | 1.000 |" in part


def test_a_sparse_metrics_file_reads_not_recorded_everywhere(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"rounds": [{"round": 1, "hospitals": {"h": {"status": "ok"}}}]}')

    html_path, md_path = build_report(tmp_path)

    doc = _parse(html_path)
    assert set(doc.ids) == SECTION_IDS
    assert NR in " ".join(doc.text)
    assert "could not be built" not in md_path.read_text(encoding="utf-8")


def test_a_folder_without_metrics_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FederationError, match="no metrics.json"):
        build_report(tmp_path)
    assert main([str(tmp_path)]) == FederationError.exit_code
    out, err = capfd.readouterr()
    assert "no metrics.json" in " ".join((out + err).split()) and "Traceback" not in out + err


def test_report_renders_in_a_headless_browser(run_dir: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium installed (shutil.which('chromium') is None): screenshot check not run")
    html_path, _ = build_report(run_dir)
    shot = tmp_path / "shot.png"

    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,2400", html_path.resolve().as_uri()], check=True, timeout=120,
                   capture_output=True)

    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 1000 and float(pixels[..., :3].std()) > 0.05


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_start_simulate_then_report_then_predict_on_converted_dicom(tmp_path: Path) -> None:
    """The README's quick start, shrunk: a simulated study, its report, then the model at a hospital."""
    from fedrad import bundled_path
    from fedrad.client.commands.predict import main as node_main
    from fedrad.client.dicom.convert import convert_npz_to_dicom
    from fedrad.server.cli import main as coordinator_main

    study = {"federation": {"name": "quick", "num_hospitals": 2, "rounds": 1, "min_hospitals": 1, "seed": 2},
             "model": MODEL, "data": {"class_names": CLASSES, "max_train_per_hospital": 128,
                                      "max_val_per_hospital": 32, "max_test": 64},
             "training": {"batch_size": 32, "device": "cpu", "num_threads": 1}}
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(study), encoding="utf-8")
    run = tmp_path / "run"
    assert coordinator_main(["simulate", "--config", str(cfg), "--out", str(run)]) in (0, 1)

    assert main([str(run)]) == 0
    doc = _parse(run / "report.html")
    assert set(doc.ids) == SECTION_IDS
    part = (run / "report.md").read_text(encoding="utf-8").split("## What the coordinator saw", 1)[1]
    assert "the hospital's audit log" in part

    convert_npz_to_dicom(bundled_path("data", "pneumoniamnist.npz"), tmp_path / "sites", num_hospitals=1,
                         max_images_per_hospital=40)
    assert node_main(["predict", "--model", str(run / "model.pt"), "--root", str(tmp_path / "sites" / "hospital-1"),
                      "--labels", str(tmp_path / "sites" / "hospital-1" / "labels.csv"), "--out", str(tmp_path / "pred"),
                      "--workers", "1"]) == 0
    assert (tmp_path / "pred" / "metrics.json").is_file() and (tmp_path / "pred" / "roc.png").is_file()
