"""train.py: the official label rule, both stages, resume, LoRA merge, DDP over gloo, and bad input.

Everything runs on a "tiny" Imp (28-px images, 2 + 2 layers, width 32) and a 24-image shapes dataset, in-process
through train.main() where possible (a Python start costs seconds on a busy 2-core machine).
"""
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import imp
import shapes
import train

IMAGE_TAG = "<image>"


def run(*argv, threads=1):
    """train.main in this process; returns nothing, raises SystemExit on errors."""
    return train.main([str(a) for a in argv] + ["--threads", str(threads)])


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def scratch_args(data, out, *extra):
    """Stage 2, full training of everything, from scratch: the demo recipe, scaled down."""
    return ["--stage", 2, "--full", "--train-vision", "--init-config", "tiny", "--tokenizer", data,
            "--data", data / "train.json", "--image-folder", data, "--out", out, "--lr", 3e-3, "--connector-lr", 3e-3,
            "--batch-size", 8, "--micro-batch-size", 4, "--max-length", 256, *extra]


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A tiny model trained for a few steps from scratch: the starting point of the stage 1 / stage 2 tests."""
    out = tmp_path_factory.mktemp("base")
    run(*scratch_args(data, out, "--max-steps", 8, "--warmup-ratio", 0))
    return out


# -- the official label rule -------------------------------------------------------------------------------------

def official_phi2_labels(tokenizer, conversation_text):
    """MILVLG/imp train.py preprocess_phi2, line for line (tokenizer_image_token == encode with <image> special)."""
    tokenize = lambda text: tokenizer.encode(text).ids
    target = list(tokenize(conversation_text))
    total_len = len(target) + conversation_text.count("</s>") - conversation_text.count("</s>")  # no pads here
    sep = " " + "ASSISTANT" + ": "
    rounds = conversation_text.split("</s>")
    cur_len = 0
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenize(rou)) + 1
        instruction_len = len(tokenize(parts[0])) - 1
        target[cur_len:cur_len + instruction_len] = [imp.IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [imp.IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == total_len  # the official code masks the whole sample otherwise
    return target


CONVERSATIONS = [
    [("human", "<image>\nWhat color is the circle?"), ("gpt", "The circle is red.")],
    [("human", "How many shapes are there? <image>"), ("gpt", "There are 2 shapes."),
     ("human", "Is there a blue circle?"), ("gpt", "Yes, there is."),
     ("human", "Zebra quokka, 12345 ünïcödé?"), ("gpt", "Unknown words: xylophone 7.")],
    [("human", "Hello there."), ("gpt", "Hi!"), ("human", "Which shape is on the left?"), ("gpt", "The square.")],
]


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_label_masking_equals_official_rule(data, turns):
    tokenizer = imp.load_tokenizer(str(data))
    conversations = [{"from": role, "value": value} for role, value in turns]
    has_image = any(IMAGE_TAG in value for _, value in turns)
    text, spans = train.format_phi2(conversations, has_image, "test")
    ids, labels = train.tokenize(tokenizer, text, spans)
    assert labels == official_phi2_labels(tokenizer, text)
    # and in words: exactly the answers and their </s> are learned
    learned = tokenizer.decode([t for t in labels if t != imp.IGNORE_INDEX], skip_special_tokens=False)
    assert learned == "".join(f" {value}</s>" for role, value in turns if role == "gpt")
    if has_image:
        assert text.count("USER: <image>\n") == 1 and ids.count(tokenizer.token_to_id(IMAGE_TAG)) == 1


def test_plain_template_learns_the_caption_only(data):
    tokenizer = imp.load_tokenizer(str(data))
    conversations = [{"from": "human", "value": "Describe. <image>"}, {"from": "gpt", "value": "A small red circle."}]
    text, spans = train.format_plain(conversations, True, "test")
    assert text == "<image>A small red circle.\n"
    ids, labels = train.tokenize(tokenizer, text, spans)
    assert labels[0] == imp.IGNORE_INDEX and labels[1:] == ids[1:]


def test_get_lr_warmup_then_cosine():
    lrs = [train.get_lr(step, 100, 10, 1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.001


# -- the stages --------------------------------------------------------------------------------------------------

def test_training_from_scratch_reduces_loss(base):
    history = losses(base)
    assert len(history) == 8 and history[-1] < history[0] - 0.5
    model = imp.Imp.from_pretrained(str(base))  # the output folder is a model folder
    assert model.config.vision.image_size == 28 and model.tokenizer is not None


def test_training_ends_by_drawing_its_loss_curve(base):
    assert Image.open(base / "loss.png").size == (900, 620)  # visualize.plot_log of the run's own log.jsonl


def test_stage1_trains_only_the_connector(data, base, tmp_path):
    out = tmp_path / "stage1"
    run("--stage", 1, "--model", base, "--data", data / "captions.json", "--image-folder", data, "--out", out,
        "--batch-size", 8, "--micro-batch-size", 8, "--max-steps", 6, "--warmup-ratio", 0, "--lr", 1e-2)
    history = losses(out)
    assert history[-1] < history[0]
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.mm_projector.") for name in changed)
    assert os.path.exists(out / "connector.safetensors")


@pytest.fixture(scope="module")
def stage2(data, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    run("--stage", 2, "--model", base, "--data", data / "train.json", "--image-folder", data, "--out", out,
        "--batch-size", 8, "--micro-batch-size", 4, "--max-steps", 6, "--warmup-ratio", 0, "--lora-rank", 8,
        "--lora-alpha", 16, "--lr", 1e-2)
    return out


def test_stage2_lora_reduces_loss_and_saves_adapters(stage2):
    history = losses(stage2)
    assert history[-1] < history[0]
    adapters = load_file(stage2 / "adapters" / "adapter_model.safetensors")
    lora = [name for name in adapters if ".lora_" in name]
    assert any("lm_head" in name for name in lora)  # official: every Linear of the LLM, lm_head included
    assert len(lora) == 2 * (2 * 6 + 1)  # 2 layers x (q, k, v, dense, fc1, fc2) + lm_head, A and B each
    assert not any(name.startswith("vision") for name in adapters)


def test_lora_merge_gives_the_same_logits(data, base, stage2, tmp_path):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 100, (2, 9), generator=generator)
    input_ids[:, 2] = imp.load_tokenizer(str(data)).token_to_id(IMAGE_TAG)
    pixels = torch.rand(2, 3, 28, 28, generator=generator) * 2 - 1
    unmerged = imp.Imp.from_pretrained(str(base))  # base + adapters, the adapters still separate
    imp.add_lora(unmerged.llm, 8, 16, 0.05)
    unmerged.load_state_dict(load_file(stage2 / "adapters" / "adapter_model.safetensors"), strict=False)
    merged = imp.Imp.from_pretrained(str(stage2))
    run("--merge", stage2 / "adapters", "--model", base, "--out", tmp_path / "merged")
    remerged = imp.Imp.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        expected = unmerged.eval()(input_ids, pixels)
        assert (merged(input_ids, pixels) - expected).abs().max() < 1e-5
        assert (remerged(input_ids, pixels) - expected).abs().max() < 1e-5
    assert (expected - imp.Imp.from_pretrained(str(base))(input_ids, pixels)).abs().max() > 1e-3  # LoRA did move it


def test_group_by_length_pads_less_and_still_takes_every_sample_once_per_epoch():
    generator = torch.Generator().manual_seed(0)
    lengths = (80 + 120 * torch.rand(1003, generator=generator)).int().tolist()
    num_steps = 1003 // 8  # one epoch; the last 3 samples are dropped

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    plain = [train.batch_indices(step, 1003, 8, 5) for step in range(num_steps)]
    grouped = [train.batch_indices(step, 1003, 8, 5, lengths, group=10) for step in range(num_steps)]
    taken = sorted(i for batch in grouped for i in batch)
    assert len(taken) == len(set(taken)) == num_steps * 8
    assert set(taken) == set(i for batch in plain for i in batch)  # the same samples as the plain epoch
    assert padding(grouped) < padding(plain) / 5  # ~1/9 here
    for start in range(0, num_steps - 10, 10):  # within a megabatch the batches come in a random order
        longest = [max(lengths[i] for i in batch) for batch in grouped[start:start + 10]]
        assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert train.batch_indices(17, 1003, 8, 5, lengths, group=10) == grouped[17]  # pure: the same batch again
    assert train.batch_indices(num_steps + 17, 1003, 8, 5, lengths, group=10) != grouped[17]  # next epoch: another


# -- resume and distributed --------------------------------------------------------------------------------------

@pytest.mark.parametrize("grouping", [[], ["--group-by-length"]], ids=["random-batches", "grouped-by-length"])
def test_resume_gives_the_same_losses(data, base, tmp_path, monkeypatch, grouping):
    args = ["--stage", 2, "--model", base, "--data", data / "train.json", "--image-folder", data, "--batch-size", 8,
            "--micro-batch-size", 4, "--max-steps", 6, "--lora-rank", 4, "--save-every", 3, "--lr", 1e-2, *grouping]
    run(*args, "--out", tmp_path / "straight")  # LoRA dropout is on: resume must restore the RNG too
    real_batch_indices = train.batch_indices

    def crash_at_step_4(step, *rest):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_batch_indices(step, *rest)
    monkeypatch.setattr(train, "batch_indices", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--out", tmp_path / "resumed")
    monkeypatch.setattr(train, "batch_indices", real_batch_indices)
    assert len(losses(tmp_path / "resumed")) == 4  # steps 1-4 logged; the checkpoint holds step 3
    run(*args, "--out", tmp_path / "resumed", "--resume")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_ddp_two_processes_equal_one(data, tmp_path):
    # --device cpu: gloo, also on a GPU machine (2 ranks would need 2 GPUs there)
    common = scratch_args(data, "OUT", "--max-steps", 3, "--micro-batch-size", 2, "--threads", 1, "--device", "cpu")
    single = [str(a) for a in common]
    single[single.index("OUT")] = str(tmp_path / "single")
    train.main(single)
    one = load_file(tmp_path / "single" / "model.safetensors")
    # 2 processes: each takes half of every global batch. 1 process under torchrun: the same DDP code path (what
    # `--nproc_per_node=1` runs on a one-GPU machine), which a plain run skips.
    for processes in (2, 1):
        out = tmp_path / f"ddp{processes}"
        launched = [str(a) for a in common]
        launched[launched.index("OUT")] = str(out)
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={processes}", "train.py", *launched],
                                capture_output=True, text=True, timeout=300,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"parameters identical on all {processes} ranks: True" in result.stdout
        assert losses(out) == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
        other = load_file(out / "model.safetensors")
        assert max((one[name] - other[name]).abs().max().item() for name in one) < 1e-5


# -- bad input ---------------------------------------------------------------------------------------------------

def fails(capsys, *argv, match):
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("train.py: error:") and "\n" not in error and match in error, error
    return error


def write(path, text):
    path.write_text(text)
    return path


def records_with(data, change):
    records = json.load(open(data / "train.json"))[:8]
    change(records)
    return records


def test_malformed_json_names_the_line(data, tmp_path, capsys):
    bad = write(tmp_path / "bad.json", '[\n{"id": 1,\n "conversations": [}\n]')
    fails(capsys, *scratch_args(data, tmp_path / "o", "--data", bad), match="line 3")
    bad_lines = write(tmp_path / "bad.jsonl", '{"id": 1, "conversations": []}\n{oops\n')
    fails(capsys, *scratch_args(data, tmp_path / "o", "--data", bad_lines), match="line 2")


@pytest.mark.parametrize("change, match", [
    (lambda r: r[3].pop("conversations"), "record 3 (id train_000003): the record has no 'conversations'"),
    (lambda r: r[2]["conversations"][1].update({"from": "bot"}), "unknown role 'bot'"),
    (lambda r: r[1].update({"image": "../../../etc/passwd"}), "leaves --image-folder; refused"),
    (lambda r: r[1].update({"image": "/etc/passwd"}), "leaves --image-folder; refused"),
    (lambda r: r.clear(), "the dataset is empty"),
])
def test_bad_records_fail_clearly(data, tmp_path, capsys, change, match):
    path = write(tmp_path / "d.json", json.dumps(records_with(data, change)))
    fails(capsys, *scratch_args(data, tmp_path / "o", "--data", path), match=match)


def test_missing_and_corrupt_images_are_skipped_or_fail_with_strict(data, tmp_path, capsys):
    shutil.copytree(data / "images", tmp_path / "images")  # (symlinks out of the folder would be refused)
    write(tmp_path / "images" / "corrupt.png", "not a png at all")
    png = (data / "images" / "train_000000.png").read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(png[:len(png) // 2])

    def damage(records):
        records[0]["image"] = "images/missing.png"
        records[1]["image"] = "images/corrupt.png"
        records[2]["image"] = "images/truncated.png"
        records += json.load(open(data / "train.json"))[8:16]
    path = write(tmp_path / "d.json", json.dumps(records_with(data, damage)))
    args = scratch_args(data, tmp_path / "o", "--data", path, "--image-folder", tmp_path, "--max-steps", 1)
    run(*args)
    assert "skipped 3 of 16 samples" in capsys.readouterr().out
    fails(capsys, *args[:-2], "--out", tmp_path / "o2", "--strict", match="images/missing.png: image file not found")


def test_max_length_never_cuts_an_image(data, tmp_path):
    tokenizer = imp.load_tokenizer(str(data))
    config = train.build_model(train.parse_args(map(str, scratch_args(data, tmp_path)))).config  # 4 image positions
    records = json.load(open(data / "train.json"))[:4]
    image_at = tokenizer.encode(train.format_phi2(records[0]["conversations"], True, "")[0]).ids.index(
        config.image_token_index)  # the same in every record: the system prompt and "USER: " come first
    path = write(tmp_path / "d.json", json.dumps(records))
    with pytest.raises(train.DataError, match=r"no usable samples \(skipped: \{'longer than --max-length': 4\}"):
        train.load_dataset(str(path), str(data), tokenizer, config, "phi2", image_at + 3, False, log=print)
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello " * 30}]}
    path = write(tmp_path / "t.json", json.dumps([text_only]))
    [(ids, labels, image)], _ = train.load_dataset(str(path), str(data), tokenizer, config, "phi2", 40, False)
    assert image is None and len(ids) == 40 and labels[-1] != imp.IGNORE_INDEX  # text may be cut


def test_position_embedding_std_redraws_only_the_position_embeddings(data, tmp_path, capsys):
    build = lambda *extra: train.build_model(train.parse_args(map(str, scratch_args(data, tmp_path, *extra))))
    plain, loud = build(), build("--position-embedding-std", 1.0)
    assert plain.vision.position_embedding.weight.std() < 0.05
    assert 0.7 < loud.vision.position_embedding.weight.std() < 1.3  # tiny config: 4 positions x 32 values
    assert loud.vision.patch_embedding.weight.std() < 0.05  # everything else keeps the default init
    for argv in (["--stage", 2, "--model", tmp_path, "--data", data / "train.json", "--out", tmp_path / "o",
                  "--position-embedding-std", 1.0],                  # not from scratch
                 scratch_args(data, tmp_path / "o2", "--position-embedding-std", 0)):  # not positive
        with pytest.raises(SystemExit) as exit_info:
            run(*argv)
        assert exit_info.value.code == 2
        assert "--position-embedding-std needs --init-config and a positive number" in capsys.readouterr().err


def test_image_size_sets_the_from_scratch_grid(data, tmp_path, capsys):
    build = lambda *extra: train.build_model(train.parse_args(map(str, scratch_args(data, tmp_path, *extra))))
    assert build().config.vision.image_size == train.NAMED_CONFIGS["tiny"]["vision"]["image_size"]  # 28: 2 x 2
    wider = build("--image-size", 42)  # 3 x 3 patches of 14
    assert wider.config.vision.image_size == 42 and wider.vision.position_embedding.weight.shape[0] == 9
    assert train.NAMED_CONFIGS["demo"]["vision"]["image_size"] == shapes.IMAGE_SIZE  # the demo's data and model agree
    for argv in (["--stage", 2, "--model", tmp_path, "--data", data / "train.json", "--out", tmp_path / "o",
                  "--image-size", 56],                               # not from scratch
                 scratch_args(data, tmp_path / "o2", "--image-size", 50)):  # not whole patches
        with pytest.raises(SystemExit) as exit_info:
            run(*argv)
        assert exit_info.value.code == 2
        assert "--image-size needs --init-config and a multiple of its patch size" in capsys.readouterr().err


def test_out_of_disk_keeps_the_previous_checkpoint(data, tmp_path, capsys, monkeypatch):
    real_save_file, calls = train.save_file, []

    def disk_full_on_second_checkpoint(tensors, path, *rest, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save_file(tensors, path, *rest, **kw)
    monkeypatch.setattr(train, "save_file", disk_full_on_second_checkpoint)
    out = tmp_path / "o"
    fails(capsys, *scratch_args(data, out, "--max-steps", 4, "--save-every", 2), match="out of disk space")
    folder, step = train.latest_checkpoint(str(out))
    assert step == 2 and sorted(os.listdir(out / "checkpoints")) == ["latest.json", "step-0000002"]  # no debris
    assert load_file(os.path.join(folder, "trainable.safetensors"))  # complete and readable


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    real_loss, calls = imp.Imp.loss, []

    def loss_turning_nan(self, *args):
        calls.append(1)
        value = real_loss(self, *args)
        return value * float("nan") if len(calls) > 6 else value  # 2 micro-batches per step: NaN in step 4
    monkeypatch.setattr(imp.Imp, "loss", loss_turning_nan)
    out = tmp_path / "o"
    fails(capsys, *scratch_args(data, out, "--max-steps", 6, "--save-every", 2), match="the loss became nan at step 4")
    assert train.latest_checkpoint(str(out))[1] == 2 and len(losses(out)) == 3
    assert not os.path.exists(out / "model.safetensors")


def test_more_torchrun_processes_than_gpus_is_refused(data, tmp_path, capsys, monkeypatch):
    # what torchrun --nproc_per_node=2 sets for its second process, on a machine with one GPU
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fails(capsys, *scratch_args(data, tmp_path / "o", "--device", "cuda"),
          match="torchrun started more processes per node than this machine has GPUs (1)")
    assert not os.path.exists(tmp_path / "o")


def test_bad_input_from_the_command_line_is_one_line(data, tmp_path):
    result = subprocess.run([sys.executable, "train.py", *map(str, scratch_args(data, tmp_path / "o", "--data",
                             tmp_path / "nothing.json"))], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"train.py: error: {tmp_path / 'nothing.json'}: no such file"


# -- evaluation, and the shipped demo model ----------------------------------------------------------------------

def test_evaluate_prints_a_table(base, data, capsys):
    run("--evaluate", base, "--data", data / "test.json", "--image-folder", data, "--limit", 4)
    out = capsys.readouterr().out
    assert "overall" in out and out.splitlines()[0].split() == ["type", "correct", "total", "accuracy"]


DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "demo")


ANSWER_FORMS = {  # shapes.py's one answer template per question type
    "color": r"The (circle|square|triangle) is (red|green|blue|yellow)\.", "shape": r"It is a (circle|square|triangle)\.",
    "count": r"There (is 1 shape|are [23] shapes)\.", "exists": r"(Yes, there is|No, there is not)\.",
    "position": r"The (circle|square|triangle) is on the (left|right)\.",
    "size": r"The (circle|square|triangle) is (large|small)\."}
DEMO_FLOOR = 0.80  # shipped checkpoint: 96.8% on the 500-question test set (README.md); 40 questions are noisy


@pytest.mark.skipif(not os.path.exists(os.path.join(DEMO, "config.json")), reason="no demo checkpoint")
def test_demo_model_answers_fresh_questions(tmp_path):
    """The shipped model on 40 freshly drawn scenes (a seed it never saw): every answer has its type's form, and
    accuracy stays above a floor. A regression guard; the benchmark is the 500-question table in the README."""
    shapes.generate_dataset(str(tmp_path), 0, 40, seed=12345, progress=False)
    records = json.load(open(tmp_path / "test.json"))
    model = imp.Imp.from_pretrained(DEMO)
    for record in records[:10]:
        image = imp.load_image(str(tmp_path / record["image"]))
        question = record["conversations"][0]["value"].replace(IMAGE_TAG, "").strip()
        assert re.fullmatch(ANSWER_FORMS[record["type"]], imp.answer(model, image, question)), question
    results = train.evaluate(model, records, str(tmp_path), log=lambda *a: None)
    correct, total = results["overall"]
    assert total == 40 and correct / total >= DEMO_FLOOR


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch():
    """Four micro-batches of one row each, accumulated, give the same gradient as the four rows in one batch (every
    row with the same number of supervised tokens, so the mean of the micro-batch means is the big batch's mean)."""
    torch.manual_seed(0)
    config = imp.ImpConfig(vision=imp.VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                   num_attention_heads=2, image_size=28, patch_size=14),
                           text=imp.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, rotary_dim=8),
                           image_token_index=63, eos_token_id=62, pad_token_id=0, max_length=64)
    model = imp.Imp(config)
    train.init_weights(model, std=0.08)
    generator = torch.Generator().manual_seed(1)
    samples = []
    for row in range(4):
        ids = torch.randint(1, 60, (10,), generator=generator).tolist()
        ids[2] = config.image_token_index
        labels = [imp.IGNORE_INDEX] * 4 + ids[4:]  # the prompt unsupervised, 6 answer tokens
        samples.append((ids, labels, torch.rand(3, 28, 28, generator=generator) * 2 - 1))

    def batch(rows):  # collate() reads image files; here the pictures are tensors already
        ids = torch.tensor([ids for ids, _, _ in rows])
        return ids, torch.tensor([labels for _, labels, _ in rows]), torch.stack([p for _, _, p in rows]), 0

    gradients = []
    for micro_batches in ([batch(samples)], [batch([sample]) for sample in samples]):
        model.zero_grad()
        loss, _ = train.accumulate_gradients(train.TrainingLoss(model), iter(micro_batches), len(micro_batches))
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    big, accumulated = gradients
    assert big.abs().max() > 1e-3  # a real gradient
    torch.testing.assert_close(accumulated, big, rtol=1e-4, atol=1e-6)


def test_stage_defaults_come_from_argparse_and_a_zero_is_never_replaced(capsys):
    start = ["--data", "d.json", "--out", "o", "--model", "m"]
    one, two = train.parse_args(["--stage", "1"] + start), train.parse_args(["--stage", "2"] + start)
    assert (one.lr, one.connector_lr, one.epochs, one.batch_size) == (1e-3, 1e-3, 1, 256)
    assert (two.lr, two.connector_lr, two.epochs, two.batch_size) == (2e-4, 2e-5, 2, 128)
    assert train.parse_args(["--stage", "2", "--full"] + start).lr == 2e-5
    assert train.parse_args(["--stage", "1", "--lr", "5e-4"] + start).connector_lr == 5e-4
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--stage", "1", "--batch-size", "0"] + start)  # not silently the default 256
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "--batch-size must be at least 1" in err
