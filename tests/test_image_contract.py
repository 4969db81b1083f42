"""The image contract a version declares, and what each serving path makes of a request for it."""

import io

import numpy as np
import pytest

from crossport.interface import EMNIST_IMAGE, INPUT_SIZE, ImageContract, signature_contracts


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_declared_shape_is_the_contract():
    rgb = ImageContract.of((32, 24, 3))
    assert (rgb.height, rgb.width, rgb.channels, rgb.size, rgb.orientation) == (32, 24, 3, 2304, "upright")
    assert (EMNIST_IMAGE.shape, EMNIST_IMAGE.flat, EMNIST_IMAGE.orientation) == ((INPUT_SIZE,), True, "emnist")
    assert ImageContract.for_image(28, 28, 1) == EMNIST_IMAGE  # today's contract, kept exactly
    assert ImageContract.for_image(28, 28, 3).shape == (28, 28, 3)
    assert signature_contracts(4, rgb)["serving_default"].inputs["images"].describe() == "DT_FLOAT [-1, 32, 24, 3]"
    for shape, fragment in (((32, 32, 2), "C 1 or 3"), ((100,), "found [N, 100]"), ((28, 28, 1), "not [N, 28, 28, 1]"),
                            ((0, 4, 3), "found [N, 0, 4, 3]")):
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            ImageContract.of(shape)


def test_an_upload_becomes_the_models_example_whatever_its_size_and_mode():
    """RGB 40×50 to a 16×12 RGB model: converted and resized as torchvision's loader and PIL do; to a grayscale model,
    the gray levels; to a 28×28 model, NIST's recipe in EMNIST orientation (unchanged)."""
    from PIL import Image

    from serving.serverless_handler import image_to_input, pixels_to_input

    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    data = png(rgb)
    example = image_to_input(data, (16, 12, 3))
    assert example.shape == (16, 12, 3) and example.dtype == np.float32
    assert np.allclose(example[..., 0], 1.0) and np.allclose(example[..., 1:], 0.0)
    gray = image_to_input(data, (16, 12, 1))
    expected = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)[0, 0] / 255  # ITU-R 601 luma of red
    assert gray.shape == (16, 12, 1) and np.allclose(gray, expected, atol=1 / 255)
    assert image_to_input(data, (INPUT_SIZE,)).shape == (INPUT_SIZE,)
    values = np.random.default_rng(0).random((16, 12, 3)).astype(np.float32)
    assert np.array_equal(pixels_to_input(values.tolist(), (16, 12, 3)), values)
    assert np.array_equal(pixels_to_input(values.reshape(-1).tolist(), (16, 12, 3)), values)


@pytest.mark.parametrize(("pixels", "fragment"), [
    (np.zeros((12, 16, 3)), "expected 576 pixels or 16×12×3, found shape [12, 16, 3]"),
    (np.zeros((28, 28)), "expected 576 pixels or 16×12×3, found shape [28, 28]"),
    (np.full((16, 12, 3), 2.0), "expected pixel values in [0, 1]"),
])
def test_pixels_of_another_shape_or_range_are_refused_in_one_line(pixels, fragment):
    from serving.serverless_handler import BadInput, pixels_to_input

    with pytest.raises(BadInput) as error:
        pixels_to_input(pixels.tolist(), (16, 12, 3))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_request_may_nest_as_deep_as_the_models_example_and_no_deeper():
    from serving.rest import max_depth as rest_depth
    from serving.serverless_handler import max_depth

    assert (max_depth((INPUT_SIZE,)), max_depth((32, 32, 3))) == (3, 4)  # {"pixels": [[..]]}, {"pixels": [[[..]]]}
    assert (rest_depth(EMNIST_IMAGE), rest_depth(ImageContract((32, 32, 3)))) == (4, 6)
