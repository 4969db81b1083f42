"""Labels and evaluation data for a model brought as an ONNX file.

Everything here ends in crossport's one data form (:class:`training.data.Dataset`: uint8
images [N, 784] in EMNIST orientation), so validate, calibration and the card treat an
imported model exactly as a trained one:

- labels: the file's ``metadata_props`` (``crossport.labels`` or ``labels``, a JSON list),
  else ``--labels`` (one per line), else the built-in EMNIST split with as many classes,
  else the class ids;
- ``--eval-data``: an ``.npz`` (``images`` and ``labels``, or crossport's own ``x_test`` /
  ``y_test`` with an optional ``x_train`` for calibration; images uint8 or float in
  [0, 1], [N, 784] or [N, 28, 28], in EMNIST orientation like every crossport array unless
  ``--eval-orientation upright`` says they are as people see them), a
  folder of PNG/JPEG files in one sub-folder per label (the ImageFolder convention;
  files are upright, as people see them, and are transposed here), or a built-in dataset
  name; by default the built-in dataset with as many classes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from crossport.errors import DataError
from crossport.interface import IMAGE_SIDE, INPUT_SIZE

log = logging.getLogger(__name__)

META_LABEL_KEYS = ("crossport.labels", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Built-in datasets by class count (EMNIST bymerge has balanced's 47 classes; balanced is the smaller one).
BUILTIN_BY_CLASSES = {10: "digits", 26: "emnist-letters", 47: "emnist-balanced", 62: "emnist-byclass"}


def builtin_labels(classes: int) -> tuple[tuple[str, ...], str] | None:
    """The label map of the built-in split with ``classes`` classes, without loading its data."""
    name = BUILTIN_BY_CLASSES.get(classes)
    if name is None:
        return None
    if name == "digits":
        return tuple(str(d) for d in range(10)), name
    from crossport.frameworks import keep_triton_away_from_tensorflow

    keep_triton_away_from_tensorflow()  # torchvision imports torch's compiler stack, which loads triton
    from torchvision.datasets import EMNIST

    split = name.removeprefix("emnist-")
    labels = [label for label in EMNIST.classes_split_dict[split] if label != "N/A"]
    return tuple(labels), name


def resolve_labels(metadata: dict[str, str], labels_file: str | None, classes: int) -> tuple[tuple[str, ...], str]:
    """(labels, where they came from), each checked where it enters (:func:`crossport.interface.label_problem`)."""
    for key in META_LABEL_KEYS:
        if key in metadata:
            try:
                labels = json.loads(metadata[key])
            except ValueError as error:
                raise DataError(f"the ONNX file's metadata {key!r} is not a JSON list of labels: {error}.",
                                hint="Pass --labels FILE (one label per line) instead.") from error
            if not isinstance(labels, list):
                raise DataError(f"the ONNX file's metadata {key!r} is not a JSON list of labels: found "
                                f"{type(labels).__name__}.", hint="Pass --labels FILE (one label per line) instead.")
            where = f"the ONNX file's metadata_props {key!r}"
            numbered = (str(label) if isinstance(label, int) and not isinstance(label, bool) else label
                        for label in labels)  # [0, 1, ...] names classes as well as ["0", "1", ...]
            return _checked(tuple(numbered), classes, where), where
    if labels_file:
        path = Path(labels_file)
        if not path.is_file():
            raise DataError(f"--labels {path} does not exist.", hint="Pass a text file with one label per line.")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"--labels {path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset "
                            f"{error.start}.", hint="Save the file as UTF-8, one label per line.") from None
        labels = tuple(line.strip() for line in text.splitlines() if line.strip())
        return _checked(labels, classes, f"--labels {path}"), f"--labels {path}"
    builtin = builtin_labels(classes)
    if builtin is not None:
        return builtin[0], f"the built-in {builtin[1]} label map ({classes} classes)"
    return tuple(str(i) for i in range(classes)), f"class ids 0..{classes - 1} (no label map given)"


def _checked(labels: tuple, classes: int, where: str) -> tuple[str, ...]:
    from crossport.interface import label_problem

    problem = label_problem(labels, classes)
    if problem:
        raise DataError(f"{where} {problem}.", hint="Give one label per class in class-id order, each a line of "
                                                    "printable text, none twice.")
    return labels


def load_eval_data(spec: str | None, *, labels: tuple[str, ...], data_dir, seed: int, orientation: str | None = None):
    """The evaluation data as a :class:`training.data.Dataset` (its train part feeds calibration). ``orientation``:
    which way up an .npz holds its images (emnist, the default, or upright); a folder's files are upright and a
    built-in dataset is in EMNIST orientation, whatever it says."""
    from training.data import DATASETS, Dataset, load_dataset

    classes = len(labels)
    if orientation is not None and not (spec and Path(spec).is_file() and spec not in DATASETS):
        raise DataError(f"--eval-orientation {orientation} applies to an .npz, and --eval-data is "
                        f"{spec or 'the built-in dataset'}, whose orientation is known.",
                        hint="Drop --eval-orientation: image files are upright and built-in datasets in EMNIST "
                             "orientation.")
    if spec is None:
        spec = BUILTIN_BY_CLASSES.get(classes)
        if spec is None:
            raise DataError(f"the model has {classes} classes and no built-in dataset has as many: there is no "
                            "evaluation data for validate.",
                            hint="Pass --eval-data with an .npz or a folder of images per label.")
    if spec in DATASETS:
        dataset = load_dataset(spec, data_dir, seed=seed)
        if len(dataset.labels) != classes:
            raise DataError(f"--eval-data {spec} has {len(dataset.labels)} classes; the model outputs {classes}.",
                            hint="Pass evaluation data with the model's classes.")
        return Dataset(dataset.name, dataset.source, labels, dataset.x_train, dataset.y_train, dataset.x_test,
                       dataset.y_test)
    path = Path(spec)
    if path.is_dir():
        images, targets = _read_folder(path, labels)
        source = f"image folder {path.resolve()}"
        calibration = images
    elif path.is_file():
        images, targets, calibration = _read_npz(path, classes)
        if orientation == "upright":  # crossport's arrays are in EMNIST orientation: transposed
            images, calibration = _transposed(images), _transposed(calibration)
        source = f"npz {path.resolve()}" + (" (upright)" if orientation == "upright" else "")
    else:
        raise DataError(f"--eval-data {spec!r} is neither a file, a folder nor a dataset ({', '.join(DATASETS)}).",
                        hint="Pass an .npz, a folder with one sub-folder of images per label, or a dataset name.")
    if len(images) == 0:
        raise DataError(f"--eval-data {spec} holds no images.", hint="Pass labelled images to validate against.")
    return Dataset(path.name, source, labels, calibration, np.zeros(len(calibration), np.int64), images, targets)


def _transposed(images: np.ndarray) -> np.ndarray:
    return images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 1).reshape(-1, INPUT_SIZE)


def _as_uint8_images(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
        array = array.reshape(len(array), INPUT_SIZE)
    if array.ndim != 2 or array.shape[1] != INPUT_SIZE:
        raise DataError(f"{where} has shape {list(array.shape)}; expected [N, {INPUT_SIZE}] or [N, 28, 28].")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)) or (array.size and (
            array.min() < 0 or array.max() > 1)):
        raise DataError(f"{where} holds {array.dtype} values outside [0, 1]; expected uint8, or floats in [0, 1].")
    # crossport's datasets are uint8 (crossport.interface.to_inputs scales them); every runtime sees the same values
    return np.round(array * 255.0).astype(np.uint8)


def _read_npz(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise DataError(f"--eval-data {path} is not a readable .npz: {error}.") from error
    for image_key, label_key in (("images", "labels"), ("x_test", "y_test")):
        if image_key in found and label_key in found:
            break
    else:
        raise DataError(f"--eval-data {path} holds {sorted(found)}; expected 'images' and 'labels' "
                        "(or 'x_test' and 'y_test').")
    images = _as_uint8_images(found[image_key], f"{path}[{image_key!r}]")
    targets = np.asarray(found[label_key])
    if targets.shape != (len(images),) or not np.issubdtype(targets.dtype, np.integer):
        raise DataError(f"{path}[{label_key!r}] must be {len(images)} integer class ids, found "
                        f"{targets.dtype} {list(targets.shape)}.")
    if len(targets) and (targets.min() < 0 or targets.max() >= classes):
        raise DataError(f"{path}[{label_key!r}] has class ids {int(targets.min())}..{int(targets.max())}; the model "
                        f"outputs {classes} classes (0..{classes - 1}).")
    calibration = _as_uint8_images(found["x_train"], f"{path}['x_train']") if "x_train" in found else images
    return images, targets.astype(np.int64), calibration


def _read_folder(root: Path, labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    from serving.serverless_handler import BadInput, image_to_pixels

    folders = sorted(child for child in root.iterdir() if child.is_dir())
    unknown = [folder.name for folder in folders if folder.name not in labels]
    if not folders or unknown:
        raise DataError(f"--eval-data {root} must hold one sub-folder per label named as the labels "
                        f"({', '.join(labels[:12])}{', ...' if len(labels) > 12 else ''}); "
                        f"{'found none' if not folders else 'unknown: ' + ', '.join(unknown[:5])}.",
                        hint="Name each sub-folder after its label, or pass --labels.")
    images, targets = [], []
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                pixels = image_to_pixels(file.read_bytes())
            except BadInput as error:
                raise DataError(f"{file}: {error}") from error
            # files are upright, as people see them; crossport's arrays are in EMNIST orientation
            images.append(np.round(pixels.T.reshape(INPUT_SIZE) * 255.0).astype(np.uint8))
            targets.append(labels.index(folder.name))
    return np.asarray(images, dtype=np.uint8).reshape(-1, INPUT_SIZE), np.asarray(targets, dtype=np.int64)
