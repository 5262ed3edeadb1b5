"""Sites from the image files a hospital holds: PNG/JPEG folders, DICOM files or series, NIfTI volumes.

Each site is a folder, read where it lies (nothing is copied). A config names the folders:

    data:
      dataset: images
      task: classification            # or segmentation
      size: [64, 64]                  # every image resized to this (h, w) or (d, h, w)
      on_error: skip                  # or stop (the default)
      folders:
        - {name: hospital-a, path: /data/a, format: image, labels: labels.csv}
        - {name: hospital-b, path: /data/b, format: dicom, labels: labels.csv}
        - {name: hospital-c, path: /data/c, format: nifti, masks: masks}   # segmentation

What a folder holds, by format:
  image  PNG, JPEG, BMP or TIFF files, one image each (grey, or RGB with `channels: 3`).
  dicom  .dcm files, one image each, and subfolders, one series (a volume) each: its slices are
         stacked in the order of their position along the slice normal, with the series' pixel
         spacing and the distance between slices as its spacing.
  nifti  .nii or .nii.gz files, one image or volume each, with the spacing of their header.

Classification labels come from a CSV in the folder (`labels`, columns `file` and `label`; `file`
is a file's or a series folder's name). An optional `patient` column keeps each patient's images
on one side of every train/test split (slices of one scan must not straddle it); with `score:
patient` a patient's test images are also scored as one case, by their mean probability. Labels
are text or numbers, read by the rules of `fedmi.data.labels` (two classes: binary, with
`positive_label` naming the positive one where they are text; more: a k-class task).
Segmentation masks are files of the same name in a subfolder (`masks`); a mask's non-zero voxels
are the foreground (class 1), or its values are the classes with `num_classes` > 2.

Each image passes through MONAI transforms, in this order: resampling to `spacing` (where given;
images that carry a spacing), resizing to `size` (area averaging; masks nearest-neighbour) and
intensity scaling (`intensity`: min-max per image to [0, 1], or its 0.5-99.5 percentiles,
clipped; or `scale`: divided by the largest value the format holds, 255 for 8-bit PNG, 65535 for
16-bit, 2^BitsStored - 1 for DICOM (after its rescale), the integer type's maximum for NIfTI, the
same for every image, as the embedded MedMNIST sets are scaled: unsigned data lands in [0, 1],
signed or offset data such as CT's Hounsfield units also below 0). A file that cannot be read, an image without its label or mask, or a mask whose shape
is not its image's, is an error naming the file; with `on_error: skip` it is left out instead,
counted and listed (`Federation.skipped`, and the run's summary.json).
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fedmi.core.schema import Settings
from fedmi.core.tasks import SegmentationTask
from fedmi.data.csv_features import decode_csv
from fedmi.data.federation import Federation, Site
from fedmi.data.labels import classes_of
from fedmi.data.registry import DATASETS, POSITIVE_LABEL_HELP, Dataset, DatasetOptions
from fedmi.errors import FedmiError, counted

log = logging.getLogger("fedmi")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


# Pillow's grey modes wider than 8 bits, and the largest value each holds (None: floating point)
WIDE_GREY = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I": 2.0**31 - 1, "F": None}


class FileProblem(Exception):
    """One file's problem: what is wrong with it (the loader adds where)."""


@dataclass
class Loaded:
    """One image: (channels, *spatial) float32, and its voxel spacing where the file gives one."""

    array: np.ndarray
    spacing: tuple[float, ...] | None = None
    converted_from: str | None = None  # the file's colour mode where it was converted (RGB read as grey)
    maximum: float | None = None  # the largest value the file's format can hold (255 for 8-bit), if it has one


# -- readers: one per format ------------------------------------------------------------------


def read_image(path: Path, channels: int = 1) -> Loaded:
    """A PNG/JPEG/BMP/TIFF file as (channels, h, w), grey or RGB."""
    from PIL import Image, UnidentifiedImageError

    target = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            mode = img.mode
            # 16-bit and float grey images are read as they are: converting them to 8-bit would clip them
            keep = mode in WIDE_GREY
            array = np.asarray(img if keep else img.convert(target), dtype=np.float32)
            # Pillow opened 16-bit PNGs as "I" before it had "I;16"; a PNG holds at most 16 bits
            maximum = (65535.0 if img.format == "PNG" and mode == "I" else WIDE_GREY[mode]) if keep else 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise FileProblem(f"not a readable image ({_short(e)})") from None
    if keep and channels == 3:  # grey repeated into three channels, not cut to 8 bits by RGB
        array = np.repeat(array[..., None], 3, axis=-1)
    return Loaded(array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0),
                  converted_from=None if mode == target or (keep and channels == 1) else mode, maximum=maximum)


def _dicom_pixels(ds, path: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for missing or undecodable pixels
        raise FileProblem(f"its pixels cannot be decoded ({_short(e)})") from None
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    return pixels * slope + intercept  # stored values to modality units (Hounsfield units for CT)


def _dicom_maximum(ds) -> float | None:
    """The largest stored value BitsStored allows, in modality units (after the rescale)."""
    bits = getattr(ds, "BitsStored", None)
    if bits is None:
        return None
    stored = 2.0 ** (int(bits) - (1 if int(getattr(ds, "PixelRepresentation", 0)) == 1 else 0)) - 1
    return stored * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def _read_dicom_file(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as e:
        raise FileProblem(f"not a readable DICOM file ({_short(e)})") from None


def read_dicom(path: Path) -> Loaded:
    """A DICOM file as one image (1, h, w), or a folder holding one series as a volume (1, d, h, w)."""
    if path.is_file():
        ds = _read_dicom_file(path)
        pixels = _dicom_pixels(ds, path)
        if pixels.ndim != 2:
            raise FileProblem(f"holds {pixels.ndim}-D pixel data (frames or colour); fedmi reads one grey image per file")
        spacing = getattr(ds, "PixelSpacing", None)
        return Loaded(pixels[None], tuple(float(s) for s in spacing) if spacing else None, maximum=_dicom_maximum(ds))
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileProblem("an empty series folder")
    slices = [(_read_dicom_file(f), f) for f in files]
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds, _ in slices}
    if len(series) > 1:
        raise FileProblem(f"holds {len(series)} series; put each series in a folder of its own")
    positions = []
    for ds, f in slices:
        orientation = np.asarray(getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
        position = getattr(ds, "ImagePositionPatient", None)
        if position is None:
            raise FileProblem(f"slice {f.name} has no ImagePositionPatient to order the series by")
        positions.append(float(np.dot(np.cross(orientation[:3], orientation[3:]), np.asarray(position, dtype=float))))
    order = np.argsort(positions)
    pixels = [_dicom_pixels(slices[i][0], slices[i][1]) for i in order]
    if len({p.shape for p in pixels}) > 1:
        raise FileProblem("its slices differ in size")
    gaps = np.diff(np.asarray(positions)[order])
    if len(gaps) and (gaps <= 0).any():
        raise FileProblem("two of its slices lie at the same position")
    in_plane = getattr(slices[0][0], "PixelSpacing", None)
    spacing = None
    if in_plane is not None:
        spacing = (float(np.median(gaps)) if len(gaps) else 1.0, float(in_plane[0]), float(in_plane[1]))
    return Loaded(np.stack(pixels)[None], spacing, maximum=_dicom_maximum(slices[0][0]))


def read_nifti(path: Path) -> Loaded:
    """A NIfTI file as (1, *spatial) in the file's voxel order, with the spacing of its header.

    A 2-D image (or a 3-D one with one slice) becomes (1, h, w); a 4-D file is refused."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (ImageFileError, OSError, EOFError, ValueError) as e:
        raise FileProblem(f"not a readable NIfTI file ({_short(e)})") from None
    stored = img.get_data_dtype()
    slope, intercept = img.header.get_slope_inter() if hasattr(img.header, "get_slope_inter") else (None, None)
    maximum = float(np.iinfo(stored).max) * (slope or 1.0) + (intercept or 0.0) if stored.kind in "ui" else None
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    if data.ndim == 3 and data.shape[2] == 1:
        data, zooms = data[:, :, 0], zooms[:2]
    if data.ndim not in (2, 3):
        raise FileProblem(f"holds a {data.ndim}-D array {data.shape}; fedmi reads 2-D images and 3-D volumes")
    return Loaded(data[None], zooms, maximum=maximum)


READERS = {"image": read_image, "dicom": read_dicom, "nifti": read_nifti}


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:160]


def _entries(folder: Path, fmt: str) -> list[Path]:
    """The images of a folder, by name: files of the format's suffixes (and DICOM series folders)."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        name = p.name.lower()
        if fmt == "image" and p.is_file() and name.endswith(IMAGE_SUFFIXES):
            found.append(p)
        elif fmt == "nifti" and p.is_file() and name.endswith(NIFTI_SUFFIXES):
            found.append(p)
        elif fmt == "dicom" and ((p.is_file() and name.endswith(".dcm")) or p.is_dir()):
            found.append(p)
    return found


# -- transforms ---------------------------------------------------------------------------------


def _transform(loaded: Loaded, size: list[int] | None, spacing: list[float] | None, mask: bool) -> np.ndarray:
    """Resample to `spacing`, resize to `size` (MONAI's Spacing and Resize)."""
    from monai.data import MetaTensor
    from monai.transforms import Resize, Spacing

    array = loaded.array
    dims = array.ndim - 1
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if spacing is not None and loaded.spacing is not None:
        if len(spacing) != dims:
            raise FileProblem(f"is {dims}-D, but spacing gives {len(spacing)} values")
        affine = torch.diag(torch.tensor([*loaded.spacing, 1.0], dtype=torch.float64))
        resample = Spacing(pixdim=spacing, mode="nearest" if mask else "bilinear")
        tensor = resample(MetaTensor(tensor, affine=affine)).as_tensor()
    if size is not None:
        if len(size) != dims:
            raise FileProblem(f"is {dims}-D {tuple(array.shape[1:])}, but size gives {len(size)} values")
        tensor = Resize(spatial_size=size, mode="nearest" if mask else "area")(tensor)
        tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return np.asarray(tensor, dtype=np.float32)


def _scaled(image: np.ndarray, how: str, maximum: float | None = None) -> np.ndarray:
    """Intensities to [0, 1] per image: min-max, or the 0.5-99.5 percentiles clipped (MONAI's
    transforms); or `scale`: divided by the format's maximum (255 for 8-bit), the same for every image."""
    from monai.transforms import ScaleIntensity, ScaleIntensityRangePercentiles

    if how == "none":
        return image
    if how == "scale":
        if maximum is None or maximum <= 0:
            raise FileProblem("has no fixed maximum (floating-point pixels); intensity: scale needs integer pixels "
                              "(use minmax or percentile)")
        return image / np.float32(maximum)
    scale = ScaleIntensity(0.0, 1.0) if how == "minmax" else \
        ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)
    with warnings.catch_warnings():  # a constant image: MONAI warns and returns it unscaled
        warnings.simplefilter("ignore")
        return np.asarray(scale(torch.from_numpy(image)), dtype=np.float32)


# -- options and the dataset ------------------------------------------------------------------


class SiteFolder(Settings):
    """One site's folder of files."""

    name: str = Field(min_length=1, description="the site's name in reports")
    path: str = Field(min_length=1, description="the folder of the site's images")
    format: Literal["image", "dicom", "nifti"] = Field("image", description="image (PNG/JPEG), dicom or nifti")
    labels: str | None = Field(None, description="classification: a CSV in the folder with columns file, label")
    masks: str | None = Field(None, description="segmentation: the subfolder of masks named as their images")


class ImageFilesOptions(DatasetOptions):
    folders: list[SiteFolder] = Field(min_length=1, description="the sites' folders",
                                      json_schema_extra={"cli": False})
    task: Literal["classification", "binary", "multiclass", "segmentation"] = Field(
        "classification", json_schema_extra={"cli": False},
        description="classification: binary for two classes, multi-class for more (binary or multiclass to say "
                    "which); segmentation: masks")
    size: list[int] | None = Field(None, min_length=2, max_length=3, json_schema_extra={"cli": False},
                                   description="every image resized to (h, w) or (d, h, w)")
    spacing: list[float] | None = Field(None, min_length=2, max_length=3, json_schema_extra={"cli": False},
                                        description="resample images that carry a spacing to this (mm)")
    channels: Literal[1, 3] = Field(1, json_schema_extra={"cli": False})
    intensity: Literal["minmax", "percentile", "scale", "none"] = Field(
        "minmax", json_schema_extra={"cli": False},
        description="minmax or percentile: per image; scale: divided by the format's maximum (255 for 8-bit), as "
                    "the embedded MedMNIST sets are; none: as stored")
    num_classes: int = Field(2, ge=2, le=255, json_schema_extra={"cli": False})
    on_error: Literal["stop", "skip"] = Field("stop", json_schema_extra={"cli": False})
    positive_label: str | None = Field(None, description=POSITIVE_LABEL_HELP)
    score: Literal["image", "patient"] = Field(
        "image", json_schema_extra={"cli": False},
        description="classification: score each test image, or each patient (the labels CSV's patient column)")


def _read_labels(folder: SiteFolder, root: Path) -> tuple[dict[str, str], dict[str, str] | None]:
    """{file: label} and, where the CSV has a `patient` column, {file: patient}."""
    path = root / folder.labels
    if not path.is_file():
        raise FedmiError(f"site {folder.name}: no labels file at {path}")
    text, delimiter = decode_csv(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    missing = [c for c in ("file", "label") if c not in (reader.fieldnames or [])]
    if missing:
        raise FedmiError(f"{path}: no column '{missing[0]}' (columns: {', '.join(reader.fieldnames or [])})")
    has_patients = "patient" in (reader.fieldnames or [])
    labels, patients = {}, {}
    for line, row in enumerate(reader, start=2):
        name, value = (row["file"] or "").strip(), (row["label"] or "").strip()
        if not name or not value:
            raise FedmiError(f"{path}, line {line}: empty file or label")
        labels[name] = value
        if has_patients:
            patients[name] = (row["patient"] or "").strip()
            if not patients[name]:
                raise FedmiError(f"{path}, line {line}: empty patient")
    return labels, patients if has_patients else None


def _read(fmt: str, path: Path, channels: int = 1) -> Loaded:
    return read_image(path, channels) if fmt == "image" else READERS[fmt](path)


def _load_entry(path: Path, folder: SiteFolder, root: Path, options: ImageFilesOptions,
                labels: dict[str, str], seen: "_SiteNotices") -> tuple[np.ndarray, object]:
    """One image, transformed and scaled, and its target (a label, or a mask of classes);
    FileProblem if either cannot be used. What was changed on the way goes to `seen`."""
    if options.task != "segmentation" and path.name not in labels:
        raise FileProblem(f"has no label in {folder.labels}")
    loaded = _read(folder.format, path, options.channels)
    image = _scaled(_transform(loaded, options.size, options.spacing, mask=False), options.intensity, loaded.maximum)
    seen.add(path, loaded, image)
    if options.task != "segmentation":
        return image, labels[path.name]
    mask_path = root / folder.masks / path.name
    if not mask_path.exists():
        raise FileProblem(f"has no mask (looked for {mask_path})")
    mask = _read(folder.format, mask_path)
    if mask.array.shape[1:] != loaded.array.shape[1:]:
        raise FileProblem(f"is {tuple(loaded.array.shape[1:])} but its mask is {tuple(mask.array.shape[1:])}")
    return image, _mask_classes(_transform(mask, options.size, options.spacing, mask=True)[0], options.num_classes)


class _SiteNotices:
    """What reading changed in one site's images (colour modes converted, shapes resized), told in one
    line, and one file of each shape, so that a shape error can name where each shape came from."""

    def __init__(self, site: str, channels: int):
        self.site, self.channels = site, channels
        self.converted: dict[str, int] = {}
        self.resized: dict[tuple[int, ...], int] = {}
        self.file_of_shape: dict[tuple[int, ...], str] = {}

    def add(self, path: Path, loaded: Loaded, image: np.ndarray) -> None:
        if loaded.converted_from is not None:
            self.converted[loaded.converted_from] = self.converted.get(loaded.converted_from, 0) + 1
        before = tuple(loaded.array.shape[1:])
        if before != tuple(image.shape[1:]):
            self.resized[before] = self.resized.get(before, 0) + 1
        self.file_of_shape.setdefault(tuple(image.shape), path.name)

    def tell(self) -> None:
        said = [f"{counted(n, 'image')} read from {mode} as {'grey' if self.channels == 1 else 'RGB'}"
                + (" (channels: 3 keeps colour)" if self.channels == 1 else "")
                for mode, n in self.converted.items()]
        if self.resized:
            n = sum(self.resized.values())
            shapes = ", ".join(str(s) for s in list(self.resized)[:3]) + (" ..." if len(self.resized) > 3 else "")
            said.append(f"{counted(n, 'image')} resized from {shapes}")
        if said:
            log.warning("site %s: %s", self.site, "; ".join(said))


def load_image_files(options: ImageFilesOptions) -> Federation:
    """The federation of `options.folders` (see the module's description)."""
    skipped: list[tuple[str, str]] = []
    raw: list[tuple[str, list[np.ndarray], list, np.ndarray | None]] = []  # site, images, labels or masks, patients
    notices: list[_SiteNotices] = []

    def problem(path: Path, reason: str) -> None:
        if options.on_error == "stop":
            raise FedmiError(f"{path}: {reason} (set on_error: skip to leave such files out)")
        skipped.append((str(path), reason))

    for folder in options.folders:
        root = Path(folder.path).expanduser()
        if not root.is_dir():
            raise FedmiError(f"site {folder.name}: no folder at {root}")
        if options.task != "segmentation" and folder.labels is None:
            raise FedmiError(f"site {folder.name}: classification needs `labels` (a CSV with columns file, label)")
        if options.task == "segmentation" and folder.masks is None:
            raise FedmiError(f"site {folder.name}: segmentation needs `masks` (the subfolder of masks)")
        labels, patient_of = _read_labels(folder, root) if folder.labels else ({}, None)
        if options.score == "patient" and patient_of is None:
            raise FedmiError(f"site {folder.name}: score: patient needs a patient column in {folder.labels}")
        entries = _entries(root, folder.format)
        present = {p.name for p in entries}
        for name in labels:
            if name not in present:
                problem(root / name, f"is named in {folder.labels}, but the folder has no such {folder.format} entry")
        images, targets, patients = [], [], []
        seen = _SiteNotices(folder.name, options.channels)
        notices.append(seen)
        for path in entries:
            try:
                image, target = _load_entry(path, folder, root, options, labels, seen)
            except FileProblem as e:
                problem(path, str(e))
                continue
            images.append(image)
            targets.append(target)
            if patient_of is not None:
                patients.append(patient_of[path.name])
        if not images:
            raise FedmiError(f"site {folder.name}: no readable {folder.format} images in {root}"
                             + (f" ({len(skipped)} skipped)" if skipped else ""))
        raw.append((folder.name, images, targets, np.array(patients) if patient_of is not None else None))

    for seen in notices:
        seen.tell()
    where = {}  # shape -> (site, file): the first of each shape
    for seen in notices:
        for shape, name in seen.file_of_shape.items():
            where.setdefault(shape, (seen.site, name))
    if len(where) > 1:
        shown = "; ".join(f"{name} at site {site} is {shape}" for shape, (site, name) in list(where.items())[:4])
        raise FedmiError(f"the images differ in shape ({shown}); give `size` to resize them all alike")
    if options.task == "segmentation":
        task = SegmentationTask(num_classes=options.num_classes)
        label_names = ("background", "foreground") if options.num_classes == 2 else \
            tuple(f"class {k}" for k in range(options.num_classes))
        sites = [Site(name, np.stack(images), np.stack(targets)) for name, images, targets, _ in raw]
    else:
        classes = classes_of({name: targets for name, _, targets, _ in raw}, options.positive_label,
                             "auto" if options.task == "classification" else options.task,
                             where="the images' labels")
        task, label_names = classes.task, classes.names
        sites = [Site(name, np.stack(images), classes.encode(targets), groups=patients,
                      cases=patients if options.score == "patient" else None)
                 for name, images, targets, patients in raw]
    formats = sorted({f.format for f in options.folders})
    return Federation("images", sites, kind="image", task=task, label_names=label_names, skipped=skipped,
                      description=f"{counted(len(sites), 'site')} of {'/'.join(formats)} files, {options.task}"
                                  + (f"; {counted(len(skipped), 'file')} skipped" if skipped else ""))


def _mask_classes(mask: np.ndarray, num_classes: int) -> np.ndarray:
    if num_classes == 2:
        return (mask != 0).astype(np.int64)
    classes = np.rint(mask).astype(np.int64)
    if classes.min() < 0 or classes.max() >= num_classes:
        raise FileProblem(f"mask values must be classes 0..{num_classes - 1}, found {classes.min()}..{classes.max()}")
    return classes


@DATASETS.register()
class ImageFiles(Dataset):
    """Sites from folders of PNG/JPEG, DICOM or NIfTI files (a config lists the folders)."""

    name = "images"
    Options = ImageFilesOptions

    def load(self, options: ImageFilesOptions, seed: int) -> Federation:
        return load_image_files(options)
