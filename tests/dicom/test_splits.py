"""Patient-level splits: disjoint, complete, stratified, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedrad.client.dicom import DicomDataConfig, SplitConfig, load_dicom_site
from fedrad.client.dicom.splits import patient_splits


def _data(n_patients: int = 120, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    patients, labels = [], []
    for p in range(n_patients):
        y = int(rng.random() < 0.3)
        for _ in range(int(rng.integers(1, 5))):
            patients.append(f"p{p}")
            labels.append(y)
    return patients, labels


def test_no_patient_in_two_splits_and_every_image_once() -> None:
    patients, labels = _data()

    parts = patient_splits(patients, labels, (0.7, 0.15, 0.15), seed=3)

    owners = {name: {patients[i] for i in idx} for name, idx in parts.items()}
    assert not owners["train"] & owners["val"]
    assert not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]
    everything = np.sort(np.concatenate(list(parts.values())))
    np.testing.assert_array_equal(everything, np.arange(len(patients)))


def test_fractions_and_label_balance_are_close_to_the_target() -> None:
    patients, labels = _data(400)
    y = np.asarray(labels)

    parts = patient_splits(patients, labels, (0.6, 0.2, 0.2), seed=1)

    n = len(patients)
    assert abs(len(parts["train"]) / n - 0.6) < 0.03
    assert abs(len(parts["val"]) / n - 0.2) < 0.03
    rates = [y[idx].mean() for idx in parts.values()]
    assert max(rates) - min(rates) < 0.06


def test_seeded_and_independent_of_file_order() -> None:
    patients, labels = _data()
    perm = np.random.default_rng(9).permutation(len(patients))

    a = patient_splits(patients, labels, (0.7, 0.15, 0.15), seed=5)
    b = patient_splits([patients[i] for i in perm], [labels[i] for i in perm], (0.7, 0.15, 0.15), seed=5)
    c = patient_splits(patients, labels, (0.7, 0.15, 0.15), seed=6)

    for name in a:
        assert {patients[i] for i in a[name]} == {patients[perm[i]] for i in b[name]}
    assert any(set(a[k].tolist()) != set(c[k].tolist()) for k in a)


def test_tiny_site_still_gets_a_validation_patient() -> None:
    parts = patient_splits(["a", "a", "b", "c"], [0, 0, 1, 1], (0.9, 0.1, 0.0), seed=0)

    assert len(parts["val"]) >= 1 and len(parts["test"]) == 0


def test_loaded_site_splits_are_patient_disjoint(hospital: Path) -> None:
    cfg = DicomDataConfig(root=hospital, labels_csv=Path("labels.csv"), split=SplitConfig(seed=4), workers=1)

    site = load_dicom_site(cfg, progress=False)

    cache = cfg.cache_path
    store = next(cache.glob("pixels-*"))
    row_sha = json.loads((store / "rows.json").read_text())["keys"]
    patient_of = {r["sha256"]: r["patient"] for r in json.loads((cache / "index.json").read_text())["records"]}
    bounds = np.cumsum([0, len(site.train), len(site.val), len(site.test)])
    owners = [{patient_of[s] for s in row_sha[bounds[k] : bounds[k + 1]]} for k in range(3)]
    assert all(owners) and not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert len(row_sha) == len(site.train) + len(site.val) + len(site.test) == 40
