"""Loaders for the on-disk layouts users have (docs/methods.md, Data layouts) and for in-memory arrays."""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.data.base import ArrayDataset, FileDataset
from engine.data.image import DICOM_SUFFIXES, IMAGE_SUFFIXES, SizeLike, fundus_crop, read_dicom, read_image
from engine.errors import UserError

log = logging.getLogger("engine.data")
APTOS_GRADES = ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
APTOS_BINARY = ["no DR", "DR"]
CXR_CLASSES = ["NORMAL", "PNEUMONIA"]
SPLITS = ("train", "val", "test")

UNLABELLED = "unlabelled"  # the one class of a dataset without labels (engine.data.with_labels labels it)

__all__ = [
    "aptos", "arrays", "chest_xray", "csv_table", "dicom", "image_csv", "image_folder", "medmnist", "source_files",
]


def _root(root: str | Path, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"{what}: root {str(path)!r} is not a directory")
    return path


def _parts(split: str | Sequence[str]) -> list[str]:
    parts = list(SPLITS) if split == "all" else [split] if isinstance(split, str) else list(split)
    bad = [s for s in parts if s not in SPLITS]
    if bad or not parts:
        raise UserError(f"split: expected 'all' or some of {SPLITS}, got {split!r}")
    return parts


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix or not path.is_file():
        return False
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _is_image(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(path))


def _class_files(folder: Path, recursive: bool = False) -> list[Path]:
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if _is_image(p))
    if not files:
        raise UserError(f"class folder {str(folder)!r} is empty (no image files)")
    return files


def image_folder(
    root: str | Path,
    classes: Sequence[str] | None = None,
    image_size: SizeLike = None,
    channels: int | None = 3,
    name: str | None = None,
    **kwargs: object,
) -> FileDataset:
    """``root/<class>/<image>`` (PNG/JPEG/TIFF/BMP/... or DICOM); classes = sorted folder names unless given."""
    root = _root(root, "image_folder")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:  # images directly in root: an unlabelled set
            files = _class_files(root)
            return FileDataset(files, [0] * len(files), [UNLABELLED], name or root.name, read_image, image_size,
                               channels, root, labelled=False, **kwargs)  # fmt: skip
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            raise UserError(f"image_folder: class folder {str(folder)!r} does not exist")
        files = sorted(p for p in folder.iterdir() if _is_image(p))
        if not files:
            log.warning("image_folder: class folder %s is empty: class %r has no images", folder, cls)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"image_folder: every class folder under {str(root)!r} is empty (no image files)")
    return FileDataset(paths, labels, classes, name or root.name, read_image, image_size, channels, root, **kwargs)


def image_csv(
    path: str | Path,
    path_column: str = "path",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
    image_size: SizeLike = None,
    channels: int | None = 3,
    name: str | None = None,
    **kwargs: object,
) -> FileDataset:
    """A CSV of image paths (relative to the CSV's folder, or absolute) and labels (class names or indices; sorted
    unless ``classes`` gives the order). Without a ``label_column`` the set is unlabelled."""
    table = Path(path).expanduser()
    paths, labels, classes = csv_table(table, path_column, label_column, classes)
    name = name or table.stem
    if labels is None:
        return FileDataset(paths, [0] * len(paths), [UNLABELLED], name, read_image, image_size, channels,
                           table.parent, labelled=False, **kwargs)  # fmt: skip
    return FileDataset(paths, labels, classes, name, read_image, image_size, channels, table.parent, **kwargs)


def csv_table(
    table: Path, path_column: str = "path", label_column: str = "label", classes: Sequence[str] | None = None
) -> tuple[list[Path], list[int] | None, list[str]]:
    """(image paths, label indices or None without a ``label_column``, classes) of an image CSV, checked without
    opening an image: UTF-8 text, the path column, at least one row, no empty label (which would become a class
    ``""``), labels among ``classes`` when given."""
    if not table.is_file():
        raise UserError(f"image_csv: {str(table)!r} is not a file")
    columns, rows = read_csv(table, "image_csv")
    if path_column not in columns:
        raise UserError(f"image_csv: {str(table)!r} has no column {path_column!r} (path_column); has {columns}")
    if not rows:
        raise UserError(f"image_csv: {str(table)!r} has no rows (empty dataset)")
    paths = [table.parent / (row[path_column] or "") for row in rows]
    if label_column not in columns:
        return paths, None, [UNLABELLED]
    values = [str(row[label_column] or "").strip() for row in rows]
    empty = [line for line, value in enumerate(values, start=2) if not value]
    if empty:
        raise UserError(
            f"image_csv: {str(table)!r}: {len(empty)} row(s) have an empty {label_column!r} (label_column), e.g. lines "
            f"{empty[:5]}: fill in their labels or drop the rows (an empty label is not a class)"
        )
    classes = list(classes) if classes is not None else sorted(set(values), key=_class_order)
    unknown = sorted(set(values) - set(classes))
    if unknown:
        raise UserError(f"image_csv: {str(table)!r}: labels {unknown} are not among classes {classes}")
    return paths, [classes.index(v) for v in values], classes


def read_csv(table: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of a UTF-8 CSV (a byte-order mark is fine); UserError for another encoding or a file
    that is not CSV text."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what}: {str(table)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
            "save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise UserError(f"{what}: {str(table)!r} is not a readable CSV ({exc})") from None


def source_files(path: str | Path, path_column: str = "path") -> list[tuple[str, Path]]:
    """(name, file) of every file a loader reads at ``path``, in a stable order: a folder gives every image, DICOM and
    CSV file under it (hidden ones left out) named relative to it; a CSV gives itself and the files its
    ``path_column`` names; any other file itself. Missing files named by a CSV are left out (the loader skips them)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = (p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
        files = sorted(p for p in found if p.suffix.lower() == ".csv" or _is_image(p))
        return [(p.relative_to(path).as_posix(), p) for p in files]
    if not path.is_file():
        raise UserError(f"path {str(path)!r} does not exist")
    out = [(path.name, path)]
    if path.suffix.lower() == ".csv":
        columns, rows = read_csv(path, "image_csv")
        named = sorted({row[path_column] for row in rows if row.get(path_column)}) if path_column in columns else []
        out += [(name, path.parent / name) for name in named if (path.parent / name).is_file()]
    return out


def _class_order(value: str) -> tuple[int, float | str]:
    """Numeric labels in numeric order (2 before 10), then names alphabetically."""
    try:
        return 0, float(value)
    except ValueError:
        return 1, value


def chest_xray(
    root: str | Path,
    split: str | Sequence[str] = "all",
    image_size: SizeLike = None,
    channels: int | None = 1,
    **kwargs: object,
) -> FileDataset:
    """Kaggle chest-xray-pneumonia: ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. ``split`` picks folders
    ('all' by default: the official val split has 16 images, so re-split with ``split_dataset``)."""
    root = _root(root, "chest_xray")
    if not (root / "train").is_dir() and (root / "chest_xray" / "train").is_dir():
        root = root / "chest_xray"  # the Kaggle archive nests the folders once more
    paths, labels = [], []
    for part in _parts(split):
        for label, cls in enumerate(CXR_CLASSES):
            folder = root / part / cls
            if not folder.is_dir():
                raise UserError(f"chest_xray: missing folder {str(folder)!r} (expected {part}/{cls})")
            files = _class_files(folder)
            paths += files
            labels += [label] * len(files)
    name = "chest-xray" if split == "all" else f"chest-xray-{'+'.join(_parts(split))}"
    return FileDataset(paths, labels, CXR_CLASSES, name, read_image, image_size, channels, root, **kwargs)


def _read_aptos(path: str, threshold: int) -> np.ndarray:
    return fundus_crop(read_image(path), threshold=threshold)


def aptos(
    root: str | Path,
    task: str = "grade",
    crop: bool = True,
    image_size: SizeLike = None,
    channels: int | None = 3,
    csv_name: str = "train.csv",
    images_dir: str = "train_images",
    crop_threshold: int = 10,
    **kwargs: object,
) -> FileDataset:
    """APTOS 2019: ``train.csv`` (id_code, diagnosis 0-4) + ``train_images/<id_code>.png``.

    ``task='grade'`` gives 5 classes, ``'binary'`` gives diagnosis > 0. ``crop`` applies the fundus bounding-box
    crop. Rows whose image is missing are skipped like unreadable files."""
    if task not in ("grade", "binary"):
        raise UserError(f"task: expected 'grade' or 'binary', got {task!r}")
    root = _root(root, "aptos")
    table = root / csv_name
    if not table.is_file():
        raise UserError(f"aptos: {str(table)!r} not found")
    columns, rows = read_csv(table, "aptos")
    missing = [c for c in ("id_code", "diagnosis") if c not in columns]
    if missing:
        raise UserError(f"aptos: {str(table)!r} is missing column(s) {missing} (has {columns})")
    paths, grades = [], []
    for line, row in enumerate(rows, start=2):
        try:
            grade = int(row["diagnosis"])
        except (TypeError, ValueError):
            raise UserError(f"aptos: {table}:{line}: diagnosis {row['diagnosis']!r} is not an integer") from None
        if not 0 <= grade <= 4:
            raise UserError(f"aptos: {table}:{line}: diagnosis {grade} outside 0-4")
        paths.append(root / images_dir / f"{row['id_code']}.png")
        grades.append(grade)
    if not paths:
        raise UserError(f"aptos: {str(table)!r} has no rows (empty dataset)")
    grades = np.asarray(grades)
    labels, classes = (grades, APTOS_GRADES) if task == "grade" else ((grades > 0).astype(np.int64), APTOS_BINARY)
    decode = functools.partial(_read_aptos, threshold=crop_threshold) if crop else read_image
    name = f"aptos-{task}"
    return FileDataset(paths, labels, classes, name, decode, image_size, channels, root, **kwargs)


def dicom(
    root: str | Path | Sequence[str | Path],
    classes: Sequence[str] | None = None,
    image_size: SizeLike = None,
    channels: int | None = 1,
    name: str | None = None,
    **kwargs: object,
) -> FileDataset:
    """DICOM files: a folder searched recursively, a single file, or a list of files; label = parent folder name
    (classes = sorted folder names unless given). Windowed to 8 bits, MONOCHROME1 inverted (see ``read_dicom``)."""
    if isinstance(root, str | Path) and Path(root).is_dir():
        base = Path(root)
        files = sorted(p for p in base.rglob("*") if p.is_file() and _is_dicom(p))
    else:
        files = [Path(p) for p in ([root] if isinstance(root, str | Path) else root)]
        missing = [str(p) for p in files if not p.is_file()]
        if missing or not files:
            raise UserError(f"dicom: expected a folder or existing files, missing: {missing or 'no files given'}")
        base = Path(files[0]).parent
    if not files:
        raise UserError(f"dicom: no DICOM files under {str(root)!r}")
    folder_names = [p.parent.name for p in files]
    classes = sorted(set(folder_names)) if classes is None else list(classes)
    unknown = sorted(set(folder_names) - set(classes))
    if unknown:
        raise UserError(f"dicom: folders {unknown} are not among classes {classes}")
    labels = [classes.index(n) for n in folder_names]
    return FileDataset(files, labels, classes, name or base.name, read_dicom, image_size, channels, base, **kwargs)


def medmnist(
    path: str | Path,
    split: str | Sequence[str] = "train",
    classes: Sequence[str] | None = None,
    image_size: SizeLike = None,
    channels: int | None = None,
) -> ArrayDataset:
    """MedMNIST ``.npz`` (keys ``{train,val,test}_images`` / ``_labels``; any size; grey or RGB)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"medmnist: file {str(path)!r} not found")
    with np.load(path) as npz:
        images, labels = [], []
        for part in _parts(split):
            keys = [f"{part}_images", f"{part}_labels"]
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise UserError(f"medmnist: {str(path)!r} is missing key(s) {missing} (has {npz.files})")
            lab = npz[keys[1]]
            if lab.ndim == 2 and lab.shape[1] > 1:
                raise UserError(f"medmnist: {keys[1]} is multi-label {lab.shape}; only single-label tasks")
            images.append(npz[keys[0]])
            labels.append(lab.reshape(-1))
    name = f"{path.stem}-{split if isinstance(split, str) else '+'.join(split)}"
    return ArrayDataset(np.concatenate(images), np.concatenate(labels), classes, name, image_size, channels)


def arrays(
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    classes: Sequence[str] | None = None,
    name: str = "arrays",
    image_size: SizeLike = None,
    channels: int | None = None,
) -> ArrayDataset:
    """In-memory numpy/torch images (see ``ArrayDataset``)."""
    return ArrayDataset(images, labels, classes, name, image_size, channels)


def detect_kind(path: str | Path) -> str:
    """Guess the loader for a path: medmnist (.npz), image_csv (.csv), dicom (file), aptos, chest_xray, dicom
    folder, image_folder."""
    path = Path(path).expanduser()
    if path.is_file():
        kinds = {".npz": "medmnist", ".csv": "image_csv"}
        if path.suffix.lower() in kinds or _is_dicom(path):
            return kinds.get(path.suffix.lower(), "dicom")
        raise UserError(f"path {str(path)!r}: a single file must be a MedMNIST .npz, a CSV or a DICOM file")
    if not path.is_dir():
        raise UserError(f"path {str(path)!r} does not exist")
    if (path / "train.csv").is_file() and (path / "train_images").is_dir():
        return "aptos"
    if any((p / "train" / "NORMAL").is_dir() for p in (path, path / "chest_xray")):
        return "chest_xray"
    first = next((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES), None)
    return "dicom" if first is not None else "image_folder"
