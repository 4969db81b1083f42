"""Labels and evaluation data for a model brought as an ONNX file.

Everything here ends in crossport's one data form (:class:`training.data.Dataset`: uint8
images [N, *shape] of the model's :class:`crossport.interface.ImageContract`: [N, 784] in
EMNIST orientation for a 28×28 grayscale model, [N, H, W, C] upright for any other), so
validate, calibration and the card treat an imported model exactly as a trained one:

- labels: the file's ``metadata_props`` (``crossport.labels`` or ``labels``, a JSON list),
  else ``--labels`` (one per line), else an ``--eval-data`` folder's sub-folder names in
  sorted order (torchvision's ImageFolder numbers its classes so), else the built-in EMNIST
  split with as many classes, else the class ids;
- ``--eval-data``: an ``.npz`` (``images`` and ``labels``, or crossport's own ``x_test`` /
  ``y_test`` with an optional ``x_train`` for calibration; images uint8 or float in
  [0, 1]; for a 28×28 grayscale model [N, 784] or [N, 28, 28], in EMNIST orientation like
  every crossport array unless ``--eval-orientation upright`` says they are as people see
  them; for any other [N, H, W, C], [N, C, H, W] or (grayscale) [N, H, W], upright), a
  folder of PNG/JPEG files in one sub-folder per label (the ImageFolder convention; files
  are upright, as people see them, and are converted to the model's channels and resized
  to its size as the servables' own image path does), or a built-in dataset name (its
  28×28 digits converted and resized the same way for a model of another size); by
  default the built-in dataset with as many classes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from crossport.errors import DataError
from crossport.interface import EMNIST_IMAGE, IMAGE_SIDE, INPUT_SIZE, ImageContract, transposed

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
    from torchvision.datasets import EMNIST

    split = name.removeprefix("emnist-")
    labels = [label for label in EMNIST.classes_split_dict[split] if label != "N/A"]
    return tuple(labels), name


def resolve_labels(metadata: dict[str, str], labels_file: str | None, classes: int,
                   eval_data: str | None = None) -> tuple[tuple[str, ...], str]:
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
            from crossport.files import not_a_file

            raise DataError(f"--labels {path} {not_a_file(path)}.", hint="Pass a text file with one label per line.")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"--labels {path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset "
                            f"{error.start}.", hint="Save the file as UTF-8, one label per line.") from None
        labels = tuple(line.strip() for line in text.splitlines() if line.strip())
        return _checked(labels, classes, f"--labels {path}"), f"--labels {path}"
    if eval_data and Path(eval_data).is_dir():
        folders = tuple(sorted(child.name for child in Path(eval_data).iterdir() if child.is_dir()))
        if len(folders) == classes:
            where = f"the sub-folders of --eval-data {eval_data} (sorted, as torchvision's ImageFolder numbers them)"
            return _checked(folders, classes, where), where
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


def load_eval_data(spec: str | None, *, labels: tuple[str, ...], data_dir, seed: int, orientation: str | None = None,
                   image: ImageContract = EMNIST_IMAGE):
    """The evaluation data as a :class:`training.data.Dataset` (its train part feeds calibration) of ``image``'s
    examples. ``orientation``: which way up an .npz holds 28×28 grayscale images (emnist, the default, or upright);
    a folder's files are upright, a built-in dataset is in EMNIST orientation, and any other image is upright."""
    from training.data import DATASETS, Dataset, load_dataset

    classes = len(labels)
    if orientation is not None and not (spec and Path(spec).is_file() and spec not in DATASETS):
        raise DataError(f"--eval-orientation {orientation} applies to an .npz, and --eval-data is "
                        f"{spec or 'the built-in dataset'}, whose orientation is known.",
                        hint="Drop --eval-orientation: image files are upright and built-in datasets in EMNIST "
                             "orientation.")
    if orientation is not None and not image.flat:
        raise DataError(f"--eval-orientation {orientation} applies to 28x28 grayscale images; the model takes "
                        f"{image.describe()} images, which are upright.", hint="Drop --eval-orientation.")
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
        x_train, x_test = (fitted(images, image) for images in (dataset.x_train, dataset.x_test))
        source = dataset.source + ("" if image.flat else f", converted to {image.describe()}")
        return Dataset(dataset.name, source, labels, x_train, dataset.y_train, x_test, dataset.y_test)
    path = Path(spec)
    if path.is_dir():
        images, targets = _read_folder(path, labels, image)
        source = f"image folder {path.resolve()}"
        calibration = images
    elif path.is_file():
        images, targets, calibration = _read_npz(path, classes, image)
        if orientation == "upright":  # crossport's arrays are in EMNIST orientation: transposed
            images, calibration = transposed(images), transposed(calibration)
        source = f"npz {path.resolve()}" + (" (upright)" if orientation == "upright" else "")
    else:
        raise DataError(f"--eval-data {spec!r} is neither a file, a folder nor a dataset ({', '.join(DATASETS)}).",
                        hint="Pass an .npz, a folder with one sub-folder of images per label, or a dataset name.")
    if len(images) == 0:
        raise DataError(f"--eval-data {spec} holds no images.", hint="Pass labelled images to validate against.")
    return Dataset(path.name, source, labels, calibration, np.zeros(len(calibration), np.int64), images, targets)


def fitted(images: np.ndarray, image: ImageContract) -> np.ndarray:
    """Built-in uint8 [N, 784] EMNIST-orientation images as ``image``'s examples: unchanged for a 28×28 grayscale
    model; for any other upright, resized (bilinear, as :func:`serving.serverless_handler.resized_image`) and
    repeated over its channels."""
    if image.flat:
        return images
    from PIL import Image

    out = np.empty((len(images), *image.shape), np.uint8)
    for index, flat in enumerate(images):
        upright = Image.fromarray(flat.reshape(IMAGE_SIDE, IMAGE_SIDE).T)
        plane = np.asarray(upright.resize((image.width, image.height), Image.BILINEAR), np.uint8)
        out[index] = plane[:, :, np.newaxis]
    return out


def _as_uint8_images(array: np.ndarray, where: str, image: ImageContract = EMNIST_IMAGE) -> np.ndarray:
    if image.flat:
        if array.ndim == 3 and array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
            array = array.reshape(len(array), INPUT_SIZE)
        if array.ndim != 2 or array.shape[1] != INPUT_SIZE:
            raise DataError(f"{where} has shape {list(array.shape)}; expected [N, {INPUT_SIZE}] or [N, 28, 28].")
    else:
        height, width, channels = image.shape
        if array.ndim == 4 and array.shape[1:] == (channels, height, width) and array.shape[1:] != image.shape:
            array = array.transpose(0, 2, 3, 1)  # [N, C, H, W], as PyTorch holds images: channels last
        if array.ndim == 3 and channels == 1:
            array = array[..., np.newaxis]
        if array.shape[1:] != image.shape:
            expected = f"[N, {height}, {width}, {channels}] or [N, {channels}, {height}, {width}]" + (
                f" or [N, {height}, {width}]" if channels == 1 else "")
            raise DataError(f"{where} has shape {list(array.shape)}; the model takes {image.describe()} images: "
                            f"expected {expected}.")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)) or (array.size and (
            array.min() < 0 or array.max() > 1)):
        raise DataError(f"{where} holds {array.dtype} values outside [0, 1]; expected uint8, or floats in [0, 1].")
    # crossport's datasets are uint8 (crossport.interface.to_inputs scales them); every runtime sees the same values
    return np.round(array * 255.0).astype(np.uint8)


def _read_npz(path: Path, classes: int, image: ImageContract) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    images = _as_uint8_images(found[image_key], f"{path}[{image_key!r}]", image)
    targets = np.asarray(found[label_key])
    if targets.shape != (len(images),) or not np.issubdtype(targets.dtype, np.integer):
        raise DataError(f"{path}[{label_key!r}] must be {len(images)} integer class ids, found "
                        f"{targets.dtype} {list(targets.shape)}.")
    if len(targets) and (targets.min() < 0 or targets.max() >= classes):
        raise DataError(f"{path}[{label_key!r}] has class ids {int(targets.min())}..{int(targets.max())}; the model "
                        f"outputs {classes} classes (0..{classes - 1}).")
    calibration = _as_uint8_images(found["x_train"], f"{path}['x_train']", image) if "x_train" in found else images
    return images, targets.astype(np.int64), calibration


def _read_folder(root: Path, labels: tuple[str, ...], image: ImageContract) -> tuple[np.ndarray, np.ndarray]:
    from serving.serverless_handler import BadInput, image_to_input

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
            try:  # exactly what the servables do to an uploaded file (a 28×28 model's in EMNIST orientation)
                values = image_to_input(file.read_bytes(), image.shape)
            except BadInput as error:
                raise DataError(f"{file}: {error}") from error
            images.append(np.round(values * 255.0).astype(np.uint8))
            targets.append(labels.index(folder.name))
    return np.asarray(images, dtype=np.uint8).reshape(-1, *image.shape), np.asarray(targets, dtype=np.int64)
