"""Fixtures shared by the test files: the small random reference models (tests/reference.py), written to disk in
every official layout once per test module."""
import json

import pytest

import reference as ref
import shapes


@pytest.fixture(scope="module")
def parts():
    return ref.phi_model(), ref.siglip_model(), ref.projector()


@pytest.fixture(scope="module")
def folders(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    phi, siglip, mm = parts
    phi.save_pretrained(root / "phi-2")            # microsoft/phi-2 layout, written by transformers itself
    siglip.save_pretrained(root / "siglip")        # google/siglip layout (SiglipVisionModel)
    ref.write_tokenizer(str(root / "phi-2"))
    return dict(current=ref.write_imp(str(root / "imp"), phi, siglip, mm),
                legacy=ref.write_imp(str(root / "imp-legacy"), phi, siglip, mm, legacy=True),
                sharded=ref.write_imp(str(root / "imp-sharded"), phi, siglip, mm, shards=3),
                phi=str(root / "phi-2"), siglip=str(root / "siglip"), root=root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small shapes data set (24 training and 8 test pictures, 56 px) with its own tokenizer, for training."""
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_dataset(str(root), 24, 8, seed=0, image_size=56, progress=False)
    records = json.load(open(root / "captions.json")) + json.load(open(root / "train.json"))
    shapes.train_tokenizer(shapes.corpus_texts(records), 512, str(root))
    return root


@pytest.fixture
def torch_int4_kernel(monkeypatch):
    """No kernels.c: decode through torch's packed kernels even with int8 activations, over torch's attention;
    for the tests of torch's kernels and of the layouts kernels.py keeps for them."""
    import kernels
    monkeypatch.setattr(kernels, "compiled_kernels", lambda: None)
