"""Images and their labels for model.task image_classification: read, checked, run through the model folder's image
processor once, held in memory, and augmented per sample as training reads them.

Where the images come from (data.train, data.eval):
- a folder of class folders: `train/cat/*.png`, `train/dog/*.jpg`, ...; the class is the folder's name;
- a .jsonl/.json/.csv/.tsv/.parquet file of records with an image column (data.columns.image: a path relative to
  the file's folder, the file's bytes, or a {bytes, path} struct as datasets' Image feature writes parquet) and a
  label column (data.columns.label: a name or a class index);
- builtin:sklearn-digits: scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels, ten classes), read from the
  file the scikit-learn package installs (never by importing it).

Every problem with the data (a missing or unreadable image file, a label the training data does not have, an empty
class folder) is a DataError naming the file, the record and the field, raised before any process group starts.

Augmentations (data.augment: a shift of up to max_shift pixels, a left-right flip) are drawn from a generator seeded
by the run's seed and the sample's global position in the run (`augment`): there is no generator state to carry, so
the same position gets the same image on any number of ranks, and a resumed run reads exactly the batches the
uninterrupted run would have.

    from dist_ft.data.images import prepare_images
    data = prepare_images(recipe, load_image_processor(model_path))   # a PreparedData of ImageTables
"""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Recipe
from .formats import FormatStats, int_label
from .sources import FILE_SUFFIXES, DataError, resolve_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_FILE = "sklearn/datasets/data/digits.csv.gz"
BUILTIN_IMAGES = {"sklearn-digits": "scikit-learn's 8x8 handwritten digits (pip install 'dist-ft[vision]')"}


@dataclass
class ImageExample:
    """One image as the model reads it (the processor's pixel_values, float32 [C, H, W]) and its class index."""
    pixel_values: np.ndarray
    label: int
    is_classification = True  # (what evaluation asks of an example)
    seq2seq = False


class ImageTable(Sequence):
    """The processed images of a split, [N, C, H, W] float32, and their labels; a selection shares the arrays."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None):
        self.pixels, self.labels, self.rows = pixels, labels, rows

    def __len__(self) -> int:
        return len(self.labels) if self.rows is None else len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = i if self.rows is None else int(self.rows[i])
        return ImageExample(self.pixels[k], int(self.labels[k]))

    def select(self, indices) -> ImageTable:
        indices = np.asarray(indices, np.int64)
        return ImageTable(self.pixels, self.labels, indices if self.rows is None else self.rows[indices])

    def __repr__(self) -> str:
        return f"ImageTable({len(self)} images of {tuple(self.pixels.shape[1:])})"


# ------------------------------------------------------------------------------------------------ sources

def digits_path() -> Path:
    """scikit-learn's digits file, located through the installed package's metadata."""
    from importlib import metadata
    try:
        path = Path(metadata.distribution("scikit-learn").locate_file(DIGITS_FILE))
    except metadata.PackageNotFoundError:
        raise DataError("builtin:sklearn-digits needs the scikit-learn package: pip install 'dist-ft[vision]'") \
            from None
    if not path.is_file():
        raise DataError(f"{path}: not found in the installed scikit-learn; reinstall it (pip install "
                        "--force-reinstall scikit-learn)")
    return path


def _digits() -> list[dict]:
    """1,797 records {image: uint8 [8, 8] (16 grey levels stretched to 0-255), label: 0-9}."""
    rows = np.loadtxt(gzip.open(digits_path(), "rt"), delimiter=",", dtype=np.float64)
    return [{"image": np.round(r[:64].reshape(8, 8) * 255 / 16).astype(np.uint8), "label": int(r[64]),
             "_origin": f"builtin:sklearn-digits: digit {i}"} for i, r in enumerate(rows)]


def source_problem(spec: str) -> str | None:
    """Cheap check for `dist-ft check`: None when the source looks readable, else the problem and its fix."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_IMAGES:
            return f"unknown built-in image source {name!r}; choose one of " + \
                ", ".join("builtin:" + b for b in BUILTIN_IMAGES)
        try:
            digits_path()
        except DataError as e:
            return str(e)
        return None
    path = Path(spec)
    if path.is_dir():
        return None  # its class folders are checked when read
    if path.suffix not in FILE_SUFFIXES:
        return f"{spec}: give a folder of class folders or a {', '.join(FILE_SUFFIXES)} file of images and labels"
    if not path.is_file():
        return f"{spec}: no such file"
    return None


def read_records(spec: str) -> list[dict]:
    """The records of one image source: {image, label, _origin}, `image` a path, bytes or a uint8 array."""
    problem = source_problem(spec)
    if problem:
        raise DataError(problem)
    if spec == "builtin:sklearn-digits":
        return _digits()
    path = Path(spec)
    if path.is_dir():
        return _folder_records(path)
    records = resolve_source(spec).load()
    out = []
    for k, r in enumerate(records):
        origin = getattr(r, "origin", None) or f"{path}: record {k + 1}"
        out.append({**r, "_origin": origin, "_base": path.parent})
    return out


def _folder_records(root: Path) -> list[dict]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; put each class's images in a folder named after it "
                        f"({root}/CLASS/IMAGE.png)")
    records = []
    for d in classes:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{d}: class folder {d.name!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); add its "
                            "images or remove the folder")
        records += [{"image": f, "label": d.name, "_origin": str(f)} for f in files]
    return records


# ------------------------------------------------------------------------------------------------ decoding

def _open(value, record: dict, column: str, mode: str):
    """The record's image as a PIL image in `mode` (RGB or L)."""
    from PIL import Image, UnidentifiedImageError

    where = record["_origin"]
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # datasets' Image feature
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, Path)) and str(value):
            path = Path(value)
            if not path.is_absolute() and "_base" in record:
                path = record["_base"] / path
            if not path.is_file():
                raise DataError(f"{where}: field {column!r}: image file {path} not found; fix the path (relative "
                                "to the data file's folder) or remove the record")
            image = Image.open(path)
        else:
            raise DataError(f"{where}: field {column!r} must be an image path or the image's bytes, got "
                            f"{type(value).__name__} {value!r:.60}")
        return image.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: field {column!r}: not a readable image ({e})") from None


def _check_columns(records: list[dict], image_col: str, label_col: str) -> None:
    for r in records:
        for col in (image_col, label_col):
            if col not in r or r[col] is None:
                have = ", ".join(sorted(k for k in r if not k.startswith("_"))) or "none"
                raise DataError(f"{r['_origin']}: no field {col!r} (the record has {have}); rename it or set "
                                f"data.columns.{'image' if col == image_col else 'label'}")


def label_names(records: list[dict], column: str, num_labels: int | None) -> list[str]:
    """The classes, by index: class indices 0..K-1 (integers, or integers written as text), else the sorted names."""
    values = [r[column] for r in records]
    ints = [int_label(v) for v in values]
    if ints and all(i is not None for i in ints):
        bad = next((r for r, i in zip(records, ints) if i < 0), None)
        if bad is not None:
            raise DataError(f"{bad['_origin']}: field {column!r}: class index {bad[column]!r} is negative; class "
                            "indices run from 0")
        if num_labels is not None and max(ints) >= num_labels:
            raise DataError(f"model.num_labels is {num_labels} but the training images have class index "
                            f"{max(ints)}; set model.num_labels: {max(ints) + 1} (or leave it unset)")
        return [str(i) for i in range(num_labels or max(ints) + 1)]
    names = sorted({str(v) for v in values})
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"model.num_labels is {num_labels} but the training images have {len(names)} classes "
                        f"({', '.join(names[:10])}); set model.num_labels: {len(names)} (or leave it unset)")
    return names


def _label_index(value, names: list[str], where: str, column: str) -> int:
    index = int_label(value)
    key = str(index) if index is not None and names[:1] == ["0"] else str(value)
    try:
        return names.index(key)
    except ValueError:
        shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise DataError(f"{where}: field {column!r}: label {value!r} is not a class of the training data "
                        f"({shown}); fix the label or add training images of that class") from None


def process(records: list[dict], processor, names: list[str], *, image_col: str, label_col: str, mode: str,
            chunk: int = 256) -> ImageTable:
    """Every record decoded, its label checked, and the images run through the model's image processor."""
    _check_columns(records, image_col, label_col)
    labels = np.asarray([_label_index(r[label_col], names, r["_origin"], label_col) for r in records], np.int64)
    parts = []
    for a in range(0, len(records), chunk):
        images = [_open(r[image_col], r, image_col, mode) for r in records[a:a + chunk]]
        parts.append(np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32))
    pixels = np.concatenate(parts) if parts else np.zeros((0, 0, 0, 0), np.float32)
    return ImageTable(pixels, labels)


# ------------------------------------------------------------------------------------------------ augmentation

def augment(pixels: np.ndarray, *, seed: int, position: int, max_shift: int, flip: bool) -> np.ndarray:
    """The image at global sample `position` of a run, shifted by up to max_shift pixels each way (uncovered pixels
    0: the normalised mean) and mirrored left-right with probability 1/2 if `flip`. A pure function of the seed and
    the position."""
    if not max_shift and not flip:
        return pixels
    rng = np.random.default_rng([seed, 0x1A6E, position])
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=2) if max_shift else (0, 0)
    mirror = bool(rng.integers(0, 2)) if flip else False
    out = pixels[..., ::-1] if mirror else pixels
    if dy or dx:
        C, H, W = out.shape
        shifted = np.zeros_like(out)
        ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
        xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
        shifted[:, yd, xd] = out[:, ys, xs]
        out = shifted
    return np.ascontiguousarray(out)


# ------------------------------------------------------------------------------------------------ preparation

def channels_of(model_path: Path) -> int:
    """How many channels the model reads (config.json num_channels; 3 when the config does not say)."""
    import json
    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("num_channels", 3))


def prepare_images(recipe: Recipe, processor, *, channels: int = 3, log=print):
    """The recipe's images as a PreparedData (train and eval ImageTables, the label names), in memory."""
    from .dataset import PreparedData

    d = recipe.data
    image_col, label_col = d.columns.image, d.columns.label
    records = read_records(d.train)
    if d.shuffle:  # before the hold-out split, so that held-out images are not one class folder's tail
        random.Random(recipe.seed).shuffle(records)
    if d.eval is None:
        n_eval = int(round(len(records) * d.eval_fraction))
        n_eval = 1 if d.eval_fraction > 0 and n_eval == 0 else n_eval
        if n_eval >= len(records):
            raise DataError(f"{d.train}: {len(records)} image(s) are too few to hold out data.eval_fraction="
                            f"{d.eval_fraction}; add images or set data.eval")
        eval_records, records = records[:n_eval], records[n_eval:]
    else:
        eval_records = read_records(d.eval)
    if d.max_train_samples:
        records = records[:d.max_train_samples]
    if d.max_eval_samples:
        eval_records = eval_records[:d.max_eval_samples]
    _check_columns(records, image_col, label_col)
    names = label_names(records, label_col, recipe.model.num_labels)
    mode = "L" if channels == 1 else "RGB"
    train = process(records, processor, names, image_col=image_col, label_col=label_col, mode=mode)
    evals = process(eval_records, processor, names, image_col=image_col, label_col=label_col, mode=mode)
    log(f"[data] train {d.train}: {len(train)} images of {tuple(train.pixels.shape[1:])}, {len(names)} classes; "
        f"eval: {len(evals)} images")
    stats = lambda n: FormatStats(records=n, kept=n)  # noqa: E731 (nothing is dropped: a bad image is an error)
    class_weights = None
    if d.balance == "class_weights":  # inverse class frequency, as data.balance gives text classifiers
        counts = np.bincount(train.labels, minlength=len(names)).astype(np.float64)
        class_weights = [float(len(train) / (len(names) * c)) if c else 1.0 for c in counts]
    return PreparedData(train, evals, stats(len(train)), stats(len(evals)), names, len(names),
                        class_weights=class_weights, pad_token_id=None)
