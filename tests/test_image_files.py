"""Sites from image files: PNG folders, DICOM files and series, NIfTI volumes and masks, written by
the tests and shipped inside pydicom and nibabel; bad files are named, or skipped and listed."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from fedmi.core.site_loop import evaluate_site
from fedmi.data import load_federation
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.models import build_model

RNG = np.random.default_rng(0)


def _png_site(root: Path, n: int, brightness: float, masks: bool = False) -> Path:
    root.mkdir(parents=True)
    rows = ["file,label"]
    for i in range(n):
        label = i % 2
        image = RNG.normal(brightness + 40 * label, 10, (20, 24)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"img{i:02d}.png")
        rows.append(f"img{i:02d}.png,{'tumour' if label else 'normal'}")
        if masks:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray((image > brightness).astype(np.uint8) * 255).save(root / "masks" / f"img{i:02d}.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _images(folders, **options):
    return load_federation("images", folders=folders, **options)


def test_png_folders_become_classification_sites(tmp_path):
    a, b = _png_site(tmp_path / "a", 10, 80), _png_site(tmp_path / "b", 8, 120)
    fed = _images([{"name": "A", "path": str(a), "labels": "labels.csv"},
                   {"name": "B", "path": str(b), "labels": "labels.csv"}], positive_label="tumour")
    assert fed.site_names == ["A", "B"] and fed.input_shape == (1, 20, 24) and fed.task.name == "binary"
    assert fed.label_names == ("normal", "tumour")
    assert fed.sites[0].class_counts() == {0: 5, 1: 5}
    assert all(0.0 <= float(s.x.min()) and float(s.x.max()) <= 1.0 for s in fed.sites)  # min-max per image


def test_a_run_config_pointing_at_png_folders_trains_and_evaluates(tmp_path):
    a, b = _png_site(tmp_path / "a", 16, 80), _png_site(tmp_path / "b", 12, 120)
    cfg = parse_config({
        "data": {"dataset": "images", "size": [16, 16], "positive_label": "tumour",
                 "folders": [{"name": "A", "path": str(a), "labels": "labels.csv"},
                             {"name": "B", "path": str(b), "labels": "labels.csv"}]},
        "model": "cnn", "rounds": 3, "trainer": {"lr": 0.05, "local_steps": 2},
    }, "test")
    run = run_federated(cfg, tmp_path / "run")
    final = run.result.history[-1]["test"]
    assert set(final) == {"A", "B"} and all(m["auc"] is not None for m in final.values())
    assert "skipped_files" not in json.loads((tmp_path / "run" / "summary.json").read_text())


def test_a_patient_column_keeps_each_patients_images_together_and_can_make_patients_the_scored_cases(tmp_path):
    a = _png_site(tmp_path / "a", 20, 80)
    # Ten patients of two images each; a patient's images share its label (img k has label k % 2).
    rows = ["file,label,patient"] + [f"img{i:02d}.png,{'tumour' if i % 2 else 'normal'},p{i % 10}" for i in range(20)]
    (a / "labels.csv").write_text("\n".join(rows) + "\n")
    folders = [{"name": "A", "path": str(a), "labels": "labels.csv"}]
    fed = _images(folders, positive_label="tumour", score="patient", size=[16, 16])
    site = fed.sites[0]
    assert sorted(set(site.groups)) == [f"p{k}" for k in range(10)] and site.cases is site.groups
    for seed in range(3):
        data = fed.split_site("A", seed, 0.3)
        test_patients = set(data.test_cases)
        assert len(data.y_test) == 2 * len(test_patients)  # both images of each test patient, none of the rest
        model = build_model("cnn", fed.input_shape, 0, 1)
        assert evaluate_site(model, fed.task, model.state_dict(), data)["n"] == len(test_patients)
    assert _images(folders, positive_label="tumour").sites[0].cases is None  # scored per image by default
    (a / "labels.csv").write_text("file,label\n" + "".join(f"img{i:02d}.png,{i % 2}\n" for i in range(20)))
    with pytest.raises(FedmiError, match="score: patient needs a patient column in labels.csv"):
        _images(folders, score="patient")


def test_png_segmentation_with_masks(tmp_path):
    a = _png_site(tmp_path / "a", 6, 90, masks=True)
    fed = _images([{"name": "A", "path": str(a), "masks": "masks"}], task="segmentation", size=[16, 16])
    site = fed.sites[0]
    assert fed.task.name == "segmentation" and site.y.shape == (6, 16, 16) and set(np.unique(site.y)) == {0, 1}


def _dicom_series(folder: Path, slices: int, spacing: float = 2.5) -> Path:
    """A series of `slices` CT slices, written out of order, `spacing` mm apart."""
    folder.mkdir(parents=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = pydicom.uid.generate_uid()
    for k in reversed(range(slices)):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing]
        ds.InstanceNumber = k + 1
        pixels = np.full((ds.Rows, ds.Columns), 100 * k, dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def test_a_dicom_series_is_one_volume_ordered_by_position_with_its_spacing(tmp_path):
    from fedmi.data.image_files import read_dicom

    volume = read_dicom(_dicom_series(tmp_path / "patient1", 4))
    assert volume.array.shape == (1, 4, 128, 128)
    slope = float(pydicom.dcmread(get_testdata_file("CT_small.dcm")).get("RescaleSlope", 1))
    means = volume.array[0].mean(axis=(1, 2))
    assert np.all(np.diff(means) > 0) and means[1] - means[0] == pytest.approx(100 * slope)  # by position
    spacing = pydicom.dcmread(get_testdata_file("CT_small.dcm")).PixelSpacing
    assert volume.spacing == pytest.approx((2.5, float(spacing[0]), float(spacing[1])))


def test_dicom_sites_of_series_and_of_single_files(tmp_path):
    site = tmp_path / "dicom-site"
    _dicom_series(site / "p1", 4)
    _dicom_series(site / "p2", 4)
    (site / "labels.csv").write_text("file,label\np1,0\np2,1\n")
    fed = _images([{"name": "H", "path": str(site), "format": "dicom", "labels": "labels.csv"}], size=[4, 16, 16])
    assert fed.input_shape == (1, 4, 16, 16) and fed.sites[0].n == 2
    # The small real DICOM files pydicom ships: one image per file.
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (flat / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    (flat / "labels.csv").write_text("file,label\nCT_small.dcm,0\nMR_small.dcm,1\n")
    fed = _images([{"name": "F", "path": str(flat), "format": "dicom", "labels": "labels.csv"}], size=[32, 32])
    assert fed.input_shape == (1, 32, 32) and fed.sites[0].n == 2


def _nifti_site(root: Path, n: int, shape=(12, 10, 8), zooms=(1.0, 1.0, 2.0)) -> Path:
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        volume = RNG.normal(100, 5, shape).astype(np.float32)
        mask = np.zeros(shape, dtype=np.uint8)
        mask[3:7, 2:6, 2:5] = 1
        volume[mask == 1] += 50
        for array, path in ((volume, root / f"case{i}.nii.gz"), (mask, root / "masks" / f"case{i}.nii.gz")):
            img = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
            nib.save(img, str(path))
    return root


def test_nifti_volumes_and_masks_resampled_to_a_spacing(tmp_path):
    site = _nifti_site(tmp_path / "n", 3)
    fed = _images([{"name": "N", "path": str(site), "format": "nifti", "masks": "masks"}], task="segmentation",
                  spacing=[1.0, 1.0, 1.0])
    assert fed.input_shape == (1, 12, 10, 15)  # 8 slices of 2 mm become 15 of 1 mm
    y = fed.sites[0].y
    assert y.shape == (3, 12, 10, 15) and set(np.unique(y)) == {0, 1}


def test_the_nifti_files_nibabel_ships_load():
    import nibabel

    data = Path(nibabel.__file__).parent / "tests" / "data"
    from fedmi.data.image_files import read_nifti

    volume = read_nifti(data / "anatomical.nii")
    assert volume.array.shape == (1, 33, 41, 25) and volume.spacing == pytest.approx((2.0, 2.0, 2.0))  # 2 mm


def test_a_corrupt_file_is_named_or_skipped_and_listed(tmp_path):
    a = _png_site(tmp_path / "a", 6, 80)
    (a / "img03.png").write_bytes(b"not a png at all")
    folders = [{"name": "A", "path": str(a), "labels": "labels.csv"}]
    with pytest.raises(FedmiError, match=r"img03\.png: not a readable image"):
        _images(folders, positive_label="tumour")
    fed = _images(folders, on_error="skip", positive_label="tumour")
    assert fed.sites[0].n == 5 and len(fed.skipped) == 1 and fed.skipped[0][0].endswith("img03.png")
    assert fed.description == "1 site of image files, classification; 1 file skipped"
    cfg = parse_config({"data": {"dataset": "images", "folders": folders, "on_error": "skip", "positive_label": "tumour"},
                        "model": "logistic",
                        "rounds": 1}, "test")
    run_federated(cfg, tmp_path / "run")
    listed = json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"]
    assert len(listed) == 1 and listed[0]["file"].endswith("img03.png") and "not a readable image" in listed[0]["reason"]


def test_an_image_without_its_mask_or_with_a_wrong_shaped_mask_is_named(tmp_path):
    a = _png_site(tmp_path / "a", 4, 80, masks=True)
    os.remove(a / "masks" / "img01.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(a / "masks" / "img02.png")
    folders = [{"name": "A", "path": str(a), "masks": "masks"}]
    with pytest.raises(FedmiError, match=r"img01\.png: has no mask"):
        _images(folders, task="segmentation")
    fed = _images(folders, task="segmentation", on_error="skip")
    reasons = dict(fed.skipped)
    assert fed.sites[0].n == 2 and any("but its mask is (5, 5)" in r for r in reasons.values())


@pytest.mark.parametrize("change, message", [
    (lambda a: (a / "labels.csv").write_text("name,label\n"), "no column 'file'"),
    (lambda a: (a / "labels.csv").write_text("file,label\nimg00.png,1\n"), r"img01\.png: has no label"),
    (lambda a: (a / "labels.csv").write_text("file,label\nghost.png,1\n"), r"ghost\.png: is named in labels.csv"),
])
def test_label_problems_are_named(tmp_path, change, message):
    a = _png_site(tmp_path / "a", 3, 80)
    change(a)
    with pytest.raises(FedmiError, match=message):
        _images([{"name": "A", "path": str(a), "labels": "labels.csv"}])


def test_images_of_different_sizes_need_a_size(tmp_path, caplog):
    a = _png_site(tmp_path / "a", 3, 80)
    b = _png_site(tmp_path / "b", 3, 80)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(b / "img01.png")  # one RGB image of another size
    folders = [{"name": "A", "path": str(a), "labels": "labels.csv"}, {"name": "B", "path": str(b), "labels": "labels.csv"}]
    # the error names a file and its site for each shape
    with pytest.raises(FedmiError, match=r"img00\.png at site A is \(1, 20, 24\); img01\.png at site B is "
                                         r"\(1, 30, 30\)\); give `size`"):
        _images(folders, positive_label="tumour")
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedmi"):
        fed = _images(folders, size=[8, 8], positive_label="tumour")
    assert fed.input_shape == (1, 8, 8)
    said = [r.getMessage() for r in caplog.records]
    # one line per site says what reading changed: B's colour image turned grey, every image resized
    assert said == ["site A: 3 images resized from (20, 24)",
                    "site B: 1 image read from RGB as grey (channels: 3 keeps colour); 3 images resized from "
                    "(20, 24), (30, 30)"]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FedmiError, match="site A: no folder at"):
        _images([{"name": "A", "path": str(tmp_path / "nowhere"), "labels": "labels.csv"}])


def test_a_deployed_site_reads_its_own_folder_from_its_data_config(tmp_path):
    from fedmi.apps.site import _load_site

    a = _png_site(tmp_path / "a", 10, 80)
    config = tmp_path / "site.yaml"
    config.write_text(f"dataset: images\npositive_label: tumour\nfolders:\n"
                      f"  - {{name: hospital-a, path: '{a}', labels: labels.csv}}\n")
    data, task = _load_site(str(config), None, 0, 0.2, 3)
    assert data.name == "hospital-a" and task.name == "binary" and data.num_train + len(data.y_test) == 10


def test_medmnist_exported_to_png_folders_reads_back_as_the_embedded_arrays_with_intensity_scale(tmp_path):
    """intensity: scale divides by the format's maximum (255 for 8-bit PNG), as the embedded sets are scaled:
    a user who exports BreastMNIST's sites to files reproduces the embedded arrays exactly."""
    embedded = load_federation("breastmnist", num_sites=2, shift_strength=0.0, max_samples=60)
    folders = []
    for site in embedded.sites:
        root = tmp_path / site.name
        root.mkdir()
        rows = ["file,label"]
        for i, (image, label) in enumerate(zip(site.x, site.y)):
            Image.fromarray(np.rint(image[0] * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
            rows.append(f"{i:03d}.png,{embedded.label_names[label]}")
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
        folders.append({"name": site.name, "path": str(root), "labels": "labels.csv"})
    back = _images(folders, intensity="scale", positive_label=embedded.label_names[1])
    assert back.label_names == embedded.label_names
    for mine, theirs in zip(back.sites, embedded.sites):
        assert np.array_equal(mine.x, theirs.x) and np.array_equal(mine.y, theirs.y)
    per_image = _images(folders, positive_label=embedded.label_names[1])  # the default, minmax, rescales each image
    assert not np.array_equal(per_image.sites[0].x, embedded.sites[0].x)


def test_intensity_scale_keeps_16_bit_images_whole(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    values = [np.full((4, 4), v, np.uint16) for v in (0, 1000, 40000, 65535)]
    for i, v in enumerate(values):
        Image.fromarray(v).save(root / f"{i}.png")
    (root / "labels.csv").write_text("file,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4)))
    fed = _images([{"name": "A", "path": str(root), "labels": "labels.csv"}], intensity="scale")
    assert fed.sites[0].x[:, 0, 0, 0].tolist() == pytest.approx([0.0, 1000 / 65535, 40000 / 65535, 1.0])


def test_a_labels_csv_separated_by_semicolons_or_not_utf8_is_read_or_told(tmp_path):
    a = _png_site(tmp_path / "a", 4, 80)
    labels = a / "labels.csv"
    labels.write_text(labels.read_text().replace(",", ";"))
    assert _images([{"name": "A", "path": str(a), "labels": "labels.csv"}], positive_label="tumour").sites[0].n == 4
    labels.write_bytes(labels.read_text().replace("normal", "négatif").encode("latin-1"))
    with pytest.raises(FedmiError, match="labels.csv: not UTF-8 text .*save it as UTF-8"):
        _images([{"name": "A", "path": str(a), "labels": "labels.csv"}], positive_label="tumour")


def test_16_bit_images_read_as_three_channels_are_not_cut_to_8_bits(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    for i, v in enumerate((1000, 65535)):
        Image.fromarray(np.full((4, 4), v, np.uint16)).save(root / f"{i}.png")
    (root / "labels.csv").write_text("file,label\n0.png,0\n1.png,1\n")
    fed = _images([{"name": "A", "path": str(root), "labels": "labels.csv"}], channels=3, intensity="scale")
    assert fed.input_shape == (3, 4, 4)
    assert np.allclose(fed.sites[0].x[:, :, 0, 0], [[1000 / 65535] * 3, [1.0] * 3])
