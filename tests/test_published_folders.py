"""Every program on replicas of the published folders (tests/replicas.py): file for file as on the Hub, with the
files and tensors our loader does not need, tiny random weights. The real CLIs with small settings: as subprocesses
once per program (an interpreter start costs seconds on a 2-core machine), their main() in this process elsewhere.

Three groups: the program paths (infer, train stage 1 from phi-2 + siglip, stage 2 LoRA, merge, quant, bench);
behaving as the official code does (stop at "</s>", the image where the prompt's "<image>" is with any tokenizer, a
user's literal "<image>"); and bad input that must not lose data (quant.py --out naming the input folder).
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import imp
import infer as infer_program
import kernels
import quant as quant_program
import replicas as rep
import train as train_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = str(torch.get_num_threads())  # the subprocesses compute like this process: the same greedy answers
NEW_TOKENS = 6
QUESTION = "What is in the picture?"


def program(*argv, stdin=None, cwd=ROOT):
    """Run one of the CLIs (infer.py, train.py, quant.py, bench.py) as a user would."""
    return subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *map(str, argv[1:])], input=stdin,
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def succeeded(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def infer(folder, *argv, stdin=None):
    return succeeded(program("infer.py", "--model", folder, "--dtype", "float32", "--threads", THREADS,
                             "--max-new-tokens", NEW_TOKENS, *argv, stdin=stdin))


def exit_code(main, argv):
    """A CLI's main() in this process (no interpreter start), its exit code whether returned or raised."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def infer_here(capsys, folder, *argv):
    """infer.py's main in this process: (stdout, stderr); exit 0 asserted."""
    capsys.readouterr()
    code = exit_code(infer_program.main, ["--model", folder, "--dtype", "float32", "--max-new-tokens", NEW_TOKENS,
                                          *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


LOADED = {}


def in_process_answer(folder, image=None, question=QUESTION, history=()):
    """The library's greedy answer for a folder, loaded once as infer.py loads it (quant.load, kernels.enable)."""
    if str(folder) not in LOADED:
        LOADED[str(folder)] = quant_program.load(str(folder))  # float or quantized, loaded as infer.py loads it
        kernels.enable(LOADED[str(folder)])
    return imp.answer(LOADED[str(folder)], image, question, history, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The published folders, built once: phi-2, siglip, the Imp releases, and the variants of what is not known
    of the real files (post_layernorm in or out, bfloat16, "pad" aspect)."""
    root = tmp_path_factory.mktemp("hub")
    phi, siglip = rep.phi_model(), rep.siglip_model(384)
    folders = dict(phi2=rep.write_phi2(str(root / "phi-2"), phi),
                   siglip=rep.write_siglip(str(root / "siglip-so400m-patch14-384"), siglip))
    for release in rep.RELEASES:
        folders[release] = rep.write_imp(str(root / release), release, phi=phi,
                                         siglip=siglip if release != "Imp-v1.5-3B-196" else None)
    folders["no-post-layernorm"] = rep.write_imp(str(root / "no-post-layernorm"), phi=phi, siglip=siglip,
                                                 post_layernorm=False)
    folders["tokenizer-json"] = rep.write_imp(str(root / "tokenizer-json"), phi=phi, siglip=siglip,
                                              tokenizer_json=True)
    folders["bfloat16-pad"] = rep.write_imp(str(root / "bfloat16-pad"), "Imp-v1.5-3B-Phi2", phi=phi, siglip=siglip,
                                            dtype=torch.bfloat16, aspect="pad")
    folders["root"], folders["phi"], folders["vision"] = root, phi, siglip
    return folders


def record(identifier, image, *turns):
    """One LLaVA-format record: alternating human / gpt turns."""
    return dict(id=identifier, image=image, conversations=[{"from": ("human", "gpt")[i % 2], "value": value}
                                                           for i, value in enumerate(turns)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two pictures and LLaVA-format data: captions (stage 1, plain template) and conversations (stage 2)."""
    root = tmp_path_factory.mktemp("data")
    generator = np.random.default_rng(0)
    for name, (width, height) in (("photo.png", (64, 48)), ("wide.png", (80, 40))):
        Image.fromarray(generator.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name)
    captions = [record(str(i), name, "<image>\nDescribe the picture briefly.", caption) for i, (name, caption) in
                enumerate([("photo.png", "A red circle."), ("wide.png", "A blue square."), ("photo.png", "Noise."),
                           ("wide.png", "A wide picture.")])]
    conversations = [record(f"c{i}", name, f"<image>\n{question}", answer, "And the color?", "Red.")
                     for i, (name, question, answer) in enumerate([
                         ("photo.png", "What is it?", "A circle."), ("wide.png", "What shape?", "A square."),
                         ("photo.png", "How many?", "One."), ("wide.png", "Where is it?", "On the left.")])]
    json.dump(captions, open(root / "captions.json", "w"))
    json.dump(conversations, open(root / "train.json", "w"))
    return root


@pytest.fixture(scope="module")
def photo(data):
    return imp.load_image(str(data / "photo.png"))


# -- loading: every replica, every variant -------------------------------------------------------------------------

RELEASE_NAMES = list(rep.RELEASES) + ["no-post-layernorm", "bfloat16-pad"]


@pytest.mark.parametrize("release", RELEASE_NAMES)
def test_every_release_loads_with_the_published_weights(hub, release):
    model = imp.Imp.from_pretrained(hub[release])
    layer = model.llm.layers[1].self_attn
    dtype = torch.bfloat16 if release == "bfloat16-pad" else torch.float16
    source = hub["phi"].model.layers[1].self_attn
    for ours, theirs in ((layer.q_proj, source.q_proj), (layer.k_proj, source.k_proj), (layer.v_proj, source.v_proj)):
        assert torch.equal(ours.weight, theirs.weight.detach().to(dtype).float())  # the fused Wqkv split in q, k, v
    image_size = 196 if release == "Imp-v1.5-3B-196" else 384
    assert model.config.vision.image_size == image_size and model.config.vision.num_patches == (image_size // 14) ** 2
    assert len(model.vision.layers) == rep.VISION["num_hidden_layers"] - 1  # the last SigLIP layer is not in them
    assert model.config.image_aspect_ratio == ("pad" if release == "bfloat16-pad" else "square")
    assert (model.config.image_token_index, model.config.eos_token_id) == (rep.IMAGE, rep.EOS)


def test_tokenizer_json_or_not_the_same_ids(hub, photo):
    """The Imp file lists show vocab.json + merges.txt + added_tokens.json; with a tokenizer.json as well, the
    loader reads that one: both must give the same ids (Phi-2's whitespace runs, </s>, the image)."""
    prompt = imp.build_prompt("Two  spaces,\t\ttabs.", [("Hi.", "Hello.")], with_image=True)
    tokenizers = [imp.load_tokenizer(hub[name]) for name in ("imp-v1-3b", "tokenizer-json")]
    config = imp.ImpConfig(image_token_index=rep.IMAGE)
    ids = [imp.encode_prompt(t, prompt, config, num_images=1) for t in tokenizers]
    assert ids[0] == ids[1] and rep.EOS in ids[0] and rep.ENDOFTEXT + 1 + rep.WHITESPACE.index("\t\t") in ids[0]


def test_legacy_config_that_only_names_its_tower():
    """Whether the legacy config.json carries vision_tower_config is not known; without it, the tower's name
    decides the image size and the SO400M sizes apply (a config-only check: such a folder is full size)."""
    for release, size in (("imp-v1-3b", 384), ("Imp-v1.5-3B-196", 196)):
        fields = rep.imp_config(release, "legacy", size, torch.float16, "square", rep.EOS, vision_tower_config=False)
        config = imp.ImpConfig.from_dict(fields)
        assert (config.vision.image_size, config.vision.hidden_size, config.vision.num_layers_kept) == (size, 1152, 26)
        assert config.text.hidden_size == rep.PHI["hidden_size"] and config.text.intermediate_size == 4 * 160


def test_both_namings_of_imp_v1_3b_load_the_same_model(hub):
    current, legacy = (imp.Imp.from_pretrained(hub[name]).state_dict() for name in ("imp-v1-3b", "imp-v1-3b-legacy"))
    assert current.keys() == legacy.keys() and all(torch.equal(current[k], legacy[k]) for k in current)


def test_whole_siglip_model_loads_as_the_vision_tower(hub):
    """google/siglip-so400m-patch14-384 is a whole SiglipModel: text_model.*, the MAP head, and the top-level
    logit_scale and logit_bias (names without a dot) must be skipped, not crash the loader."""
    with safe_open(os.path.join(hub["siglip"], "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"logit_scale", "logit_bias"} <= keys and any(k.startswith("text_model.") for k in keys)
    tower = imp.SigLIP.from_pretrained(hub["siglip"])
    theirs = hub["vision"].vision_model.encoder.layers[1].mlp.fc2.weight
    assert torch.equal(tower.layers[1].mlp.fc2.weight, theirs.detach())


def test_stage1_starting_point_from_phi2_and_siglip(hub):
    model = imp.Imp.from_components(hub["phi2"], hub["siglip"])
    assert model.tokenizer.token_to_id("</s>") == rep.EOS and model.tokenizer.token_to_id("<image>") == rep.IMAGE
    assert model.config.eos_token_id == rep.EOS and model.config.pad_token_id == rep.ENDOFTEXT
    official = imp.load_tokenizer(hub["imp-v1-3b"])  # the Imp release's vocab.json + merges.txt + added_tokens.json
    prompt = imp.build_prompt("Describe  it.\tPlease.", with_image=True)
    assert model.tokenizer.encode(prompt).ids == official.encode(prompt).ids


# -- infer.py --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("release,process", [("imp-v1-3b", True), ("imp-v1-3b-legacy", False),
                                             ("Imp-v1.5-3B-Phi2", False), ("Imp-v1.5-3B-196", False)])
def test_infer_answers_as_the_library_does(hub, data, photo, capsys, release, process):
    argv = (data / "photo.png", QUESTION)
    answer = infer(hub[release], *argv).stdout if process else infer_here(capsys, hub[release], *argv)[0]
    expected = in_process_answer(hub[release], photo)
    assert expected and answer.strip() == expected


LITERAL = "What does <image> mean in a prompt?"


def test_infer_chat_with_a_users_literal_image_tag(hub, data, photo):
    """--chat through a pipe; the second question holds the text "<image>", which must stay text."""
    folder = hub["Imp-v1.5-3B-Phi2"]
    questions = ["What is it?", LITERAL, "And the color?"]
    chat = infer(folder, "--chat", data / "photo.png", stdin="".join(q + "\n" for q in questions)).stdout
    history = []
    for question in questions:
        history.append((question, in_process_answer(folder, photo, question, history)))
    assert [line.strip() for line in chat.splitlines()] == [answer for _, answer in history]


def test_infer_text_only_and_batch(hub, data, photo, capsys):
    folder = hub["Imp-v1.5-3B-Phi2"]
    out, _ = infer_here(capsys, folder, "--text", "Hello there.")
    assert out.strip() == in_process_answer(folder, None, "Hello there.")
    questions = data / "questions.jsonl"
    questions.write_text(json.dumps(dict(question_id=1, image="photo.png", text=QUESTION)) + "\n"
                         + json.dumps(dict(question_id="two", text="Hello there.")) + "\n")
    out = data / "answers.jsonl"
    infer_here(capsys, folder, "--batch", questions, "--out", out)
    answers = {r["question_id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert answers == {1: in_process_answer(folder, photo), "two": in_process_answer(folder, None, "Hello there.")}


# -- the training recipe: stage 1 from phi-2 + siglip, stage 2 LoRA, merge ------------------------------------------

def train(*argv):
    return succeeded(program("train.py", *argv, "--threads", THREADS, "--device", "cpu", "--seed", 0))


@pytest.fixture(scope="module")
def stage1(hub, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train("--stage", 1, "--llm", hub["phi2"], "--vision", hub["siglip"], "--data", data / "captions.json",
          "--image-folder", data, "--out", out, "--max-steps", 2, "--batch-size", 2, "--micro-batch-size", 2)
    return out


@pytest.fixture(scope="module")
def stage2(stage1, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    train("--stage", 2, "--model", stage1, "--data", data / "train.json", "--image-folder", data, "--out", out,
          "--max-steps", 2, "--batch-size", 2, "--micro-batch-size", 2, "--lora-rank", 4, "--lora-alpha", 8)
    return out


def test_stage1_from_the_published_phi2_and_siglip_trains_the_connector(hub, stage1, data, photo, capsys):
    model = imp.Imp.from_pretrained(str(stage1))
    phi, siglip = hub["phi"], hub["vision"]
    # The language model and the tower are frozen in stage 1 (float16 on disk -> what was loaded, unchanged).
    assert torch.equal(model.llm.lm_head.weight, phi.lm_head.weight.detach().half().float())
    assert torch.equal(model.vision.layers[0].self_attn.q_proj.weight,
                       siglip.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach())
    losses = [json.loads(line)["loss"] for line in open(stage1 / "log.jsonl")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert infer_here(capsys, stage1, data / "photo.png", QUESTION)[0].strip() == in_process_answer(stage1, photo)


def test_stage2_lora_and_merge(stage1, stage2, data, photo, tmp_path, capsys):
    assert (stage2 / "adapters" / "adapter_model.safetensors").exists()
    merged = tmp_path / "merged"
    train_program.main([str(a) for a in ("--merge", stage2 / "adapters", "--model", stage1, "--out", merged)])
    ours, theirs = imp.Imp.from_pretrained(str(merged)), imp.Imp.from_pretrained(str(stage2))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours.state_dict().values(),
                                                                theirs.state_dict().values()))
    base = imp.Imp.from_pretrained(str(stage1))
    assert not torch.equal(ours.llm.layers[0].mlp.fc1.weight, base.llm.layers[0].mlp.fc1.weight)  # LoRA did learn
    assert infer_here(capsys, merged, data / "photo.png", QUESTION)[0].strip() == in_process_answer(merged, photo)


# -- quant.py and bench.py -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "imp-int4"
    succeeded(program("quant.py", "--model", hub["imp-v1-3b-legacy"], "--bits", 4, "--vision", "--out", out))
    return out


def test_quantized_folder_loads_and_answers(quantized, data, photo, capsys):
    assert json.load(open(quantized / "config.json"))["quantization"]["bits"] == 4
    out, _ = infer_here(capsys, quantized, data / "photo.png", QUESTION)
    assert out.strip() == in_process_answer(quantized, photo)


def test_infer_quantizes_a_published_folder_while_loading(hub, data, photo, capsys):
    out, _ = infer_here(capsys, hub["imp-v1-3b"], "--quant", "int8", data / "photo.png", QUESTION)
    model = imp.Imp.from_pretrained(hub["imp-v1-3b"])
    quant_program.quantize_model(model, bits=8)
    kernels.enable(model)
    assert out.strip() == imp.answer(model, photo, QUESTION, max_new_tokens=NEW_TOKENS)


def test_bench_measures_a_published_folder(hub, tmp_path, capsys):
    """bench.py's parent in this process; it times the folder in a worker process of its own."""
    import bench
    out = tmp_path / "bench.json"
    try:
        code = exit_code(bench.main, ["--model", hub["Imp-v1.5-3B-196"], "--dtypes", "float32", "--new-tokens", 4,
                                      "--threads", 1, "--json", out])
    finally:
        torch.set_num_threads(int(THREADS))  # bench sets its own count; the other tests compare with THREADS
    assert code == 0, capsys.readouterr().err
    row, = json.load(open(out))["results"]
    assert "error" not in row and row["dtype"] == "float32"


# -- behave as the official code does -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def variants(hub):
    """Imp folders as the official training code leaves them (config eos = Phi-2's <|endoftext|>), one whose
    answers are "</s>" at once, and one whose tokenizer files lack "<image>"."""
    root = hub["root"]
    ends_at_once = rep.phi_model(lm_head_bias={rep.EOS: 100.0})
    return dict(
        phi2_eos=rep.write_imp(str(root / "phi2-eos"), phi=ends_at_once, siglip=hub["vision"],
                               eos_token_id=rep.ENDOFTEXT),
        no_image_token=rep.write_imp(str(root / "no-image-token"), phi=hub["phi"], siglip=hub["vision"],
                                     image_token_in_tokenizer=False))


def test_generation_stops_at_the_tokenizers_end_of_answer(variants, data, photo, capsys):
    """Config eos 50256-like, the model ends with "</s>": the official evaluation stops there; we must too."""
    model = imp.Imp.from_pretrained(variants["phi2_eos"])
    assert model.config.eos_token_id == rep.ENDOFTEXT
    input_ids, pixel_values = imp.prepare_inputs(model, photo, QUESTION)
    assert list(model.generate(input_ids, pixel_values, max_new_tokens=NEW_TOKENS)) == []
    out, err = infer_here(capsys, variants["phi2_eos"], "--stats", data / "photo.png", QUESTION)
    assert out.strip() == "" and [line.split() for line in err.splitlines() if line.startswith("generated tokens")
                                  ] == [["generated", "tokens", "0"]]


def test_image_goes_where_the_prompt_says_without_an_image_token(hub, variants, photo):
    """A tokenizer without "<image>": the prompt is split on the string, as the official tokenizer_image_token
    does, so the ids (and the answer) equal those of the folder whose tokenizer has it."""
    plain, usual = imp.Imp.from_pretrained(variants["no_image_token"]), imp.Imp.from_pretrained(hub["imp-v1-3b"])
    assert plain.tokenizer.token_to_id("<image>") is None
    ids, _ = imp.prepare_inputs(plain, photo, QUESTION)
    assert torch.equal(ids, imp.prepare_inputs(usual, photo, QUESTION)[0]) and int((ids == rep.IMAGE).sum()) == 1
    assert imp.answer(plain, photo, QUESTION, max_new_tokens=NEW_TOKENS) == imp.answer(usual, photo, QUESTION,
                                                                                    max_new_tokens=NEW_TOKENS)


def test_images_without_a_place_are_an_error_not_a_text_answer(hub, photo):
    model = imp.Imp.from_pretrained(hub["imp-v1-3b"])
    text_ids, _ = imp.prepare_inputs(model, None, QUESTION)
    _, pixel_values = imp.prepare_inputs(model, photo, QUESTION)
    with pytest.raises(ValueError, match="0 <image> tokens but 1 images"):
        list(model.generate(text_ids, pixel_values, max_new_tokens=2))
    with pytest.raises(ValueError, match="1 image"):
        imp.encode_prompt(model.tokenizer, "no place here", model.config, num_images=1)


def test_a_users_literal_image_tag_is_text(hub, photo):
    model = imp.Imp.from_pretrained(hub["imp-v1-3b"])
    for image, images in ((photo, 1), (None, 0)):
        ids, _ = imp.prepare_inputs(model, image, LITERAL)
        assert int((ids == rep.IMAGE).sum()) == images  # only the template's placeholder is an image
        assert LITERAL in model.tokenizer.decode(ids[0].tolist(), skip_special_tokens=False)
        assert isinstance(imp.answer(model, image, LITERAL, max_new_tokens=2), str)


def test_a_users_literal_image_tag_in_infer(hub, data, photo, capsys):
    folder = hub["imp-v1-3b"]
    assert infer_here(capsys, folder, "--text", LITERAL)[0].strip() == in_process_answer(folder, None, LITERAL)
    out, _ = infer_here(capsys, folder, data / "photo.png", LITERAL)
    assert out.strip() == in_process_answer(folder, photo, LITERAL)


def test_stage2_from_a_folder_whose_tokenizer_lacks_the_image_token(variants, data, tmp_path):
    out = tmp_path / "stage2"
    train_program.main([str(a) for a in ("--stage", 2, "--model", variants["no_image_token"], "--data",
                        data / "train.json", "--image-folder", data, "--out", out, "--max-steps", 1, "--batch-size",
                        2, "--micro-batch-size", 2, "--lora-rank", 4, "--device", "cpu", "--threads", THREADS)])
    assert np.isfinite(json.loads(open(out / "log.jsonl").readline())["loss"])


# -- bad input: quant.py --out naming the input folder must not overwrite it --------------------------------------

def fingerprint(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture
def victim(hub, tmp_path):
    """A copy of a published folder that quant.py is asked to overwrite."""
    import shutil
    folder = tmp_path / "models" / "imp-v1-3b"
    shutil.copytree(hub["imp-v1-3b"], folder)
    return folder


@pytest.mark.parametrize("how", ["symlink", "dotdot", "relative"])
def test_quant_refuses_to_write_over_its_input(victim, how, capsys, monkeypatch):
    before = fingerprint(victim)
    cwd = victim.parent
    if how == "symlink":
        (victim.parent / "link").symlink_to(victim, target_is_directory=True)
        out = victim.parent / "link"
    elif how == "dotdot":
        out = f"{victim}/../{victim.name}"
    else:  # the input by its absolute path, the output by a path relative to the working folder
        out = victim.name
    argv = ["--model", victim, "--bits", 4, "--out", out]
    if how == "symlink":  # a real process once: exit code, stderr, no traceback
        result = program("quant.py", *argv, cwd=cwd)
        code, err = result.returncode, result.stderr
    else:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code, err = exit_code(quant_program.main, argv), capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert fingerprint(victim) == before
