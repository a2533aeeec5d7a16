"""Image preprocessing and tokenizer against the transformers reference implementations."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import imp
import reference as ref

transformers = pytest.importorskip("transformers")


def official_processor(size):
    """SigLIP's processor with Imp's settings: squash-resize to size x size with PIL bicubic, /255, mean=std=0.5."""
    processor_class = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return processor_class(size={"height": size, "width": size}, resample=Image.BICUBIC, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def llava_expand2square(image, background):
    """LLaVA's expand2square, copied in spirit from the official mm_utils.py (an independent reference)."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def random_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height,size", [(37, 23, 28), (23, 37, 56), (384, 384, 384), (500, 333, 384),
                                               (1, 1, 14), (640, 480, 196)])
@pytest.mark.parametrize("mode", ["square", "pad"])
def test_preprocess_equals_official_processor_bit_for_bit(width, height, size, mode):
    image = random_image(width, height, seed=width * height)
    reference_input = llava_expand2square(image, (127, 127, 127)) if mode == "pad" else image
    expected = official_processor(size)(reference_input, return_tensors="np")["pixel_values"][0]
    got = imp.preprocess_image(image, size, mode)
    assert got.dtype == torch.float32 and got.shape == (3, size, size)
    assert np.array_equal(got.numpy(), expected)


def test_pad_mode_pads_with_grey_before_resizing():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels = imp.preprocess_image(image, 40, "pad")
    assert torch.allclose(pixels[:, 0, 20], torch.tensor([127 / 255 * 2 - 1] * 3), atol=1e-6)  # top band: grey
    assert torch.allclose(pixels[:, 20, 20], torch.tensor([1.0, -1.0, -1.0]))                 # middle: red
    with pytest.raises(ValueError, match="'square' or 'pad'"):
        imp.preprocess_image(image, 40, "crop")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16", "I"])
def test_every_image_mode_becomes_rgb(mode):
    base = random_image(30, 20, seed=3)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype("<u2"))
        assert image.mode == "I;16"
    elif mode == "I":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 257)
    else:
        image = base.convert(mode)
    pixels = imp.preprocess_image(image, 28)
    assert pixels.shape == (3, 28, 28) and pixels.min() >= -1 and pixels.max() <= 1
    if mode in ("I;16", "I"):  # 16-bit values are scaled to 8 bits, not clipped to white
        assert torch.equal(pixels, imp.preprocess_image(base.convert("L"), 28))
    if mode in ("RGBA", "LA", "L", "P", "CMYK"):  # the official convert("RGB")
        assert torch.equal(pixels, imp.preprocess_image(image.convert("RGB"), 28))


def test_load_image_applies_exif_rotation_and_takes_first_gif_frame(tmp_path):
    upright = Image.new("RGB", (20, 10), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes: pixels sideways + the tag
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    loaded = imp.load_image(str(tmp_path / "photo.jpg"))
    assert loaded.size == (20, 10) and loaded.getpixel((2, 5))[0] > 200  # upright again: red on the left
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    notes = []
    first = imp.load_image(str(tmp_path / "anim.gif"), notes)
    assert first.convert("RGB").getpixel((4, 4))[0] > 200 and "first" in notes[0]


def test_load_image_errors_are_one_clear_line(tmp_path):
    (tmp_path / "text.jpg").write_text("not really a picture")
    png = io.BytesIO()
    random_image(64, 64).save(png, format="PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[:200])
    cases = {str(tmp_path / "none.png"): "no such file", str(tmp_path): "is a folder",
             str(tmp_path / "text.jpg"): "not an image file", str(tmp_path / "cut.png"): "damaged"}
    for path, message in cases.items():
        with pytest.raises(imp.ImageError, match=message) as error:
            imp.load_image(path)
        assert "\n" not in str(error.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    random_image(64, 64).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 pixels is now "too many"
    with pytest.raises(imp.ImageError, match="too large"):
        imp.load_image(str(tmp_path / "big.png"))


# -- tokenizer ---------------------------------------------------------------------------------------------------

TEXTS = ["A chat between a curious user and an artificial intelligence assistant. USER: <image>\nWhat is it? "
         "ASSISTANT: A red circle.</s>USER: And?", "tabs\t\tand    four spaces,   three", "naïve café 東京 🙂",
         "<image><image></s></s>", " leading space", "What is in the picture?</s><|endoftext|>"]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    ref.write_tokenizer(folder)
    return folder


@pytest.mark.parametrize("fast", [False, True])
def test_tokenizer_from_vocab_and_merges_equals_transformers(tokenizer_folder, fast):
    ours = imp.load_tokenizer(tokenizer_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_folder, use_fast=fast)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    ids = ours.encode(TEXTS[0]).ids
    assert ids.count(ref.IMAGE_TOKEN) == 1 and ids.count(ref.EOS) == 1  # single special tokens
    assert ours.decode(ours.encode(TEXTS[2]).ids) == TEXTS[2]
    ids = ours.encode(TEXTS[5]).ids  # an answer as generated: "</s>" and "<|endoftext|>" are dropped when decoding
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=True) == "What is in the picture?"


def test_tokenizer_json_round_trip_and_bad_added_ids(tokenizer_folder, tmp_path):
    ours = imp.load_tokenizer(tokenizer_folder)
    imp.save_tokenizer(ours, str(tmp_path), imp.ImpConfig())
    again = imp.load_tokenizer(str(tmp_path))  # now from tokenizer.json
    for text in TEXTS:
        assert again.encode(text).ids == ours.encode(text).ids
    os.remove(tmp_path / "tokenizer.json")  # and from the vocab/merges/added_tokens we wrote
    assert imp.load_tokenizer(str(tmp_path)).encode(TEXTS[0]).ids == ours.encode(TEXTS[0]).ids
    json.dump({"</s>": 400}, open(tmp_path / "added_tokens.json", "w"))
    with pytest.raises(imp.CheckpointError, match="should have id 400"):
        imp.load_tokenizer(str(tmp_path))
