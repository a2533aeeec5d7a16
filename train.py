"""
Train Imp the way the paper does (Shao et al. 2024, arXiv 2405.12107, section 4 and the official scripts), in one
flat script shaped like nanoGPT's train.py: read the data, build the model, one visible loop.

  stage 1 (--stage 1, "plain" template)   vision tower and Phi-2 frozen, only the connector learns (lr 1e-3)
  stage 2 (--stage 2, "phi2" template)    LoRA (rank 256, alpha 256) on every Linear of Phi-2, lm_head included,
                                          at lr 2e-4; the connector keeps learning at 2e-5. --full: no LoRA, Phi-2
                                          itself is trained (the official finetune.sh, "not recommended" there).

The data is LLaVA's JSON (or JSON Lines): {"id", "image" (a path inside --image-folder, optional),
"conversations": [{"from": "human" | "gpt", "value": "..."}]}, with "<image>" marking where the picture goes.
Only the assistant's words are learned (stage 2: each answer and its "</s>"; stage 1: the caption). Imp-2B and
Imp-4B (a Qwen1.5 or Phi-3 model, or --llm a Qwen/Phi-3 folder) train in their own qwen2 / phi3 templates.

Distributed: `torchrun --nproc_per_node=N train.py ...` runs one process per GPU (nccl) or per CPU worker (gloo).
Every rank walks the same shuffled order and takes its own slice of each global batch; DistributedDataParallel
averages the gradients, so N processes compute exactly what one process would with the same --batch-size.

Also here: `--evaluate DIR` (exact-answer accuracy per question type) and `--merge ADAPTERS` (fold saved LoRA
adapters into a base model). Run `python train.py --help` for examples.
"""
import argparse
import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

import imp
import visualize
from imp import IGNORE_INDEX, CheckpointError, ImageError, Imp, ImpConfig, PhiConfig, VisionConfig

# Named small configs for training from scratch (--init-config). "demo" is the model in checkpoints/demo: 56-px
# images cut into 4 x 4 = 16 patches (shapes.IMAGE_SIZE; --image-size overrides it), a 4-layer ViT (5 layers, the
# last dropped by select_layer -2, as Imp drops SigLIP's) and a 4-layer Phi-2 whose two 64-wide heads rotate 32 dims
# (Phi-2 rotates 32 of 80). "tiny" is for tests.
NAMED_CONFIGS = {
    "demo": dict(vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
                             image_size=56, patch_size=14),
                 text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2,
                           rotary_dim=32, max_position_embeddings=256),
                 max_length=256),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                             image_size=28, patch_size=14),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           rotary_dim=8, max_position_embeddings=256),
                 max_length=256),
}

# The official recipe (MILVLG/imp scripts/pretrain.sh and finetune_lora.sh); None in the arguments means "these".
STAGE_DEFAULTS = {1: dict(lr=1e-3, connector_lr=1e-3, epochs=1, batch_size=256),
                  2: dict(lr=2e-4, connector_lr=2e-5, epochs=2, batch_size=128)}
FULL_FINETUNE_LR = 2e-5  # scripts/finetune.sh

ROLES = ("human", "gpt")


class DataError(ValueError):
    pass


def fail(message):
    """Bad input ends here: one line on stderr, exit status 2, no traceback."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Data: LLaVA records -> (token ids, labels, image path), with the official templates and label rule.


def read_records(path) -> list:
    """A JSON list of records, or JSON Lines (one record per line). Malformed JSON names its line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:  # a folder, no permission, not UTF-8, a NUL in the name
        raise DataError(f"{path}: not a readable JSON text file ({error})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: malformed JSON ({error.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to be a list of records") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of records, got {type(records).__name__}")
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {line_number}: malformed JSON ({error.msg})") from None
                except RecursionError:
                    raise DataError(f"{path}: line {line_number}: nested too deeply to be a record") from None
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    return records


def check_record(record, where):
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    conversations = record.get("conversations")
    if conversations is None:
        raise DataError(f"{where}: the record has no 'conversations'")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: every turn needs a 'from' and a string 'value'")
        if turn.get("from") not in ROLES:
            raise DataError(f"{where}: unknown role {turn.get('from')!r} (expected 'human' or 'gpt')")
    if "image" in record and record["image"] is not None and (not isinstance(record["image"], str)
                                                               or "\0" in record["image"]):
        raise DataError(f"{where}: 'image' must be one path (a string without NUL characters)")
    try:  # a \\udcff escape in JSON is a lone surrogate: not text the tokenizer can take
        "".join([turn["value"] for turn in conversations] + [record.get("image") or ""]).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: the text or image path is not valid UTF-8 (a lone surrogate escape)") from None


def resolve_image(relative, image_folder, where) -> str:
    """The image's real path. A path that leaves --image-folder (absolute, "..", or a symlink out) is refused:
    a data file must not make us read arbitrary files."""
    if image_folder is None:
        raise DataError(f"{where}: the record has an image but no --image-folder was given")
    root = os.path.realpath(image_folder)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath([root, path]) != root:
        raise DataError(f"{where}: image path {relative!r} leaves --image-folder; refused")
    return path


def image_problem(path):
    """None if the file looks like a readable image, else why not. verify() checks the file's structure (PNG chunk
    checksums, headers) without decoding all the pixels, so checking 600K images up front stays affordable."""
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except FileNotFoundError:
        return "image file not found"
    except Exception as error:  # PIL raises many types for damaged files
        return f"unreadable image ({type(error).__name__}: {error})"


def move_image_to_front(value):
    """LLaVA's preprocess_multimodal: the <image> tag moves to the start of its message, followed by a newline."""
    return imp.IMAGE_PLACEHOLDER + "\n" + value.replace(imp.IMAGE_PLACEHOLDER, "").strip()


def format_phi2(conversations, has_image, where):
    """The official conv_phi2 text and the character spans the loss learns.
    "{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    Official rule (preprocess_phi2): only each answer and its "</s>" are supervised. An answer span starts at the
    space after "ASSISTANT:", because byte-level BPE glues that space to the answer's first word (" The"); this is
    why the official code subtracts 1 from the instruction length."""
    turns = conversations if conversations[0]["from"] == "human" else conversations[1:]  # official: drop a lead gpt
    text, spans = imp.SYSTEM_PROMPT + " ", []
    for index, turn in enumerate(turns):
        if turn["from"] != ROLES[index % 2]:
            raise DataError(f"{where}: turns must alternate human, gpt, human, ... (turn {index} is {turn['from']})")
        value = turn["value"]
        if turn["from"] == "human":
            if has_image and imp.IMAGE_PLACEHOLDER in value:
                value = move_image_to_front(value)
            text += f"USER: {value} "
        else:
            text += "ASSISTANT:"
            start = len(text)
            text += f" {value}</s>"
            spans.append((start, len(text)))
    return text, spans


def format_plain(conversations, has_image, where):
    """Stage 1's "plain" template (preprocess_plain): "<image>" + caption + "\\n", everything but the image
    learned. No system prompt and no roles: the connector only has to learn to describe the picture."""
    if len(conversations) != 2 or [t["from"] for t in conversations] != list(ROLES):
        raise DataError(f"{where}: the plain template (stage 1) needs exactly one human and one gpt turn")
    prefix = imp.IMAGE_PLACEHOLDER if has_image else ""
    text = prefix + conversations[1]["value"] + "\n"
    return text, [(len(prefix), len(text))]


CHAT_ENDS = {"qwen2": ("<|im_end|>", "\n<|im_start|>assistant\n"), "phi3": ("<|end|>", "\n<|assistant|>\n")}


def format_chat(conversations, has_image, where, template):
    """Imp-2B / Imp-4B: the conversation in the qwen2 / phi3 template (imp.qwen2_prompt, imp.phi3_prompt)."""
    turns = conversations if conversations[0]["from"] == "human" else conversations[1:]  # official: drop a lead gpt
    for index, turn in enumerate(turns):
        if turn["from"] != ROLES[index % 2]:
            raise DataError(f"{where}: turns must alternate human, gpt, human, ... (turn {index} is {turn['from']})")
    values = [move_image_to_front(t["value"]) if has_image and t["from"] == "human" and imp.IMAGE_PLACEHOLDER in t["value"]
              else t["value"] for t in turns]
    pairs = [(values[i], values[i + 1] if i + 1 < len(values) else "") for i in range(0, len(values), 2)]
    return imp.PROMPTS[template](pairs)


def chat_labels(tokenizer, text, config: ImpConfig):
    """Token ids and labels by the official preprocess_qwen2 / preprocess_phi3 rule. The text is cut into rounds
    at the end token (<|im_end|> / <|end|>), the system part joining round 1, each round keeping its end tokens;
    in a round everything up to the assistant role is masked, so each answer and its end token are learned.
    Lengths are counted by tokenizing each piece alone, Phi-3's <s> taken off each count and masked once at the
    start; if the counts do not add up to the whole, nothing of the sample is learned (official)."""
    end, role = CHAT_ENDS[config.template]
    bos = int(config.template == "phi3")  # <s>: Phi-3's tokenizer starts every piece with it, Qwen has none
    count = lambda piece: len(imp.encode_prompt(tokenizer, piece, config)) - bos
    ids = imp.encode_prompt(tokenizer, text, config)
    labels = list(ids)
    pieces = text.split(end)  # [system, user 1, assistant 1, user 2, assistant 2, ..., ""]
    rounds = [end.join(pieces[:3]) + end] + [end.join(pieces[i:i + 2]) + end for i in range(3, len(pieces) - 1, 2)]
    labels[:bos] = [IGNORE_INDEX] * bos
    position = bos
    for round_text in rounds:
        parts = round_text.split(end + role)
        if len(parts) != 2:
            break
        instruction_length = count(parts[0] + end + role)
        labels[position:position + instruction_length] = [IGNORE_INDEX] * instruction_length
        position += count(round_text)
    labels[position:] = [IGNORE_INDEX] * (len(labels) - position)
    if position != len(ids):  # tokenization differs piece by piece: the official code masks the whole sample
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels


def plain_labels(tokenizer, text, config: ImpConfig):
    """Stage 1 for Imp-2B / Imp-4B (preprocess_plain): everything after "<image>" (and Phi-3's <s>) is learned."""
    ids = imp.encode_prompt(tokenizer, text, config)
    prefix = len(imp.encode_prompt(tokenizer, imp.IMAGE_PLACEHOLDER if imp.IMAGE_PLACEHOLDER in text else "", config))
    return ids, [IGNORE_INDEX] * prefix + ids[prefix:]


def tokenize(tokenizer, text, spans, image_token_id=None):
    """Token ids and labels: a token is learned when it starts inside a supervised span, else IGNORE_INDEX.
    As the official tokenizer_image_token, the text is split on the string "<image>" and image_token_id (default:
    the tokenizer's "<image>") put between the pieces, so the image sits where the text says with any tokenizer."""
    if image_token_id is None:
        image_token_id = tokenizer.token_to_id(imp.IMAGE_PLACEHOLDER)
    ids, offsets, start = [], [], 0
    for index, piece in enumerate(text.split(imp.IMAGE_PLACEHOLDER)):
        if index:
            ids.append(image_token_id)
            offsets.append(start)
            start += len(imp.IMAGE_PLACEHOLDER)
        encoding = tokenizer.encode(piece)
        ids += encoding.ids
        offsets += [start + offset for offset, _ in encoding.offsets]
        start += len(piece)
    labels = [token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
              for token, offset in zip(ids, offsets)]
    return ids, labels


def load_dataset(path, image_folder, tokenizer, config: ImpConfig, template, max_length, strict, log=print):
    """Every usable sample as (ids, labels, image path or None). Skipped samples are counted, never silent."""
    records = read_records(path)
    image_id = config.image_token_index
    extra_per_image = config.vision.num_patches - 1  # one <image> id becomes num_patches positions
    samples, skipped, checked = [], Counter(), {}
    for index, record in enumerate(records):
        where = f"{path}: record {index}" + (f" (id {record['id']})" if isinstance(record, dict) and "id" in record else "")
        check_record(record, where)
        image = None
        if record.get("image") is not None:
            image = resolve_image(record["image"], image_folder, where)
            if image not in checked:
                checked[image] = image_problem(image)
            if checked[image]:
                if strict:
                    raise DataError(f"{where}: {record['image']}: {checked[image]}")
                skipped["missing or unreadable image"] += 1
                continue
        text_has_image = any(imp.IMAGE_PLACEHOLDER in t["value"] for t in record["conversations"])
        if image is not None and not text_has_image and template != "plain":  # LLaVA data always has the tag
            conversations = [dict(turn) for turn in record["conversations"]]
            first_question = next((t for t in conversations if t["from"] == "human"), None)
            if first_question is not None:
                first_question["value"] = imp.IMAGE_PLACEHOLDER + "\n" + first_question["value"]
            record = dict(record, conversations=conversations)
        if image is None and text_has_image:
            raise DataError(f"{where}: the text has <image> but the record names no image")
        if config.template == "phi2":
            format_text = format_plain if template == "plain" else format_phi2
            ids, labels = tokenize(tokenizer, *format_text(record["conversations"], image is not None, where),
                                   image_id)
        elif template == "plain":  # Imp-2B / Imp-4B: the official token-count rules
            ids, labels = plain_labels(tokenizer, format_plain(record["conversations"], image is not None, where)[0], config)
        else:
            ids, labels = chat_labels(tokenizer, format_chat(record["conversations"], image is not None, where,
                                                             config.template), config)
        images_in_ids = ids.count(image_id)
        if images_in_ids != (image is not None):
            raise DataError(f"{where}: expected {int(image is not None)} <image> tag, found {images_in_ids}")
        if len(ids) + images_in_ids * extra_per_image > max_length:
            # Text past the last image may be cut (as the official truncation does), but never into an image.
            last_image_end = (ids.index(image_id) + 1 + extra_per_image) if images_in_ids else 0
            if last_image_end > max_length:
                skipped["longer than --max-length"] += 1
                continue
            keep = max_length - images_in_ids * extra_per_image
            ids, labels = ids[:keep], labels[:keep]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # nothing to learn (an empty loss would be NaN)
            skipped["nothing to learn"] += 1
            continue
        samples.append((ids, labels, image))
    for reason, count in skipped.items():
        log(f"skipped {count} of {len(records)} samples in {path}: {reason}")
    if not samples:
        raise DataError(f"{path}: no usable samples (skipped: {dict(skipped) or 'none'})")
    return samples, skipped


def batch_indices(step, num_samples, batch_size, seed, lengths=None, group=50) -> list:
    """The sample indices of global batch `step`, a pure function of the step: epoch e walks a permutation drawn
    from seed and e, the last incomplete batch of an epoch is dropped. Pure is what makes --resume and every
    rank agree without passing any state around.

    With `lengths` (--group-by-length, transformers' group_by_length): the permutation is cut into megabatches of
    `group` batches; each megabatch is sorted by length and cut into batches again, so that a batch holds samples
    of about one length and pads little (the demo's stage 2 pads 20% of its positions without this, 1% with it),
    and its batches are taken in a random order, so that lengths do not come in a trend."""
    steps_per_epoch = num_samples // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    if lengths is None:
        return order[position * batch_size:(position + 1) * batch_size].tolist()
    megabatch, inside = divmod(position, group)
    for m in range(megabatch + 1):  # the same draws in the same order on every call
        count = min(group, steps_per_epoch - m * group)  # batches in megabatch m (the epoch's last may be short)
        batch_order = torch.randperm(count, generator=generator)
    first = megabatch * group * batch_size
    chunk = sorted(order[first:first + count * batch_size].tolist(), key=lambda i: -lengths[i])  # longest first
    chosen = batch_order[inside].item()
    return chunk[chosen * batch_size:(chosen + 1) * batch_size]


def collate(samples, config: ImpConfig, device):
    """Right-pad ids with the pad id and labels with IGNORE_INDEX (official: padding_side "right"); stack the
    images of the samples that have one, in order (Imp.splice consumes them in order of appearance)."""
    longest = max(len(ids) for ids, _, _ in samples)
    input_ids = torch.full((len(samples), longest), config.pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    images = []
    for row, (ids, row_labels, image) in enumerate(samples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(row_labels)
        if image is not None:
            images.append(imp.preprocess_image(imp.load_image(image), config.vision.image_size,
                                               config.image_aspect_ratio))
    pixel_values = torch.stack(images).to(device) if images else None
    positions = sum(spliced_length(sample, config) for sample in samples)
    return input_ids.to(device), labels.to(device), pixel_values, positions


def spliced_length(sample, config: ImpConfig) -> int:
    """Positions a sample takes in the language model: its <image> id becomes num_patches image tokens."""
    ids, _, image = sample
    return len(ids) + (image is not None) * (config.vision.num_patches - 1)


# ----------------------------------------------------------------------------------------------------------------
# Model: where it starts, and which of its parameters learn at which rate.


def init_weights(module: nn.Module, std: float = 0.02):
    """Initialisation for training from scratch (the demo model): transformers' PhiPreTrainedModel default, N(0, 0.02)
    for every Linear and Embedding, here applied to the vision tower too. (SiglipPreTrainedModel would draw the
    tower's position embeddings at std 1/sqrt(width), 0.088 at the demo's width: tried, no better; docs/demo-model.md.)"""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def build_model(args) -> Imp:
    if args.init_config:  # from scratch: a small named config sized to the given tokenizer
        if not args.tokenizer:
            raise DataError("--init-config needs --tokenizer DIR (a folder with tokenizer.json)")
        tokenizer = imp.load_tokenizer(args.tokenizer)
        ids = {name: tokenizer.token_to_id(name) for name in ("<|endoftext|>", "</s>", "<image>")}
        if None in ids.values():
            raise CheckpointError(f"{args.tokenizer}: the tokenizer lacks {[n for n, i in ids.items() if i is None]}")
        spec = NAMED_CONFIGS[args.init_config]
        vision = dict(spec["vision"])
        if args.image_size:  # --image-size: the same config on another grid
            vision["image_size"] = args.image_size
        config = ImpConfig(vision=VisionConfig(**vision),
                           text=PhiConfig(vocab_size=tokenizer.get_vocab_size(), **spec["text"]),
                           image_token_index=ids["<image>"], eos_token_id=ids["</s>"], pad_token_id=ids["<|endoftext|>"],
                           max_length=spec["max_length"])
        model = Imp(config)
        init_weights(model)
        if args.position_embedding_std:  # docs/demo-model.md: how loud "where" starts, next to "what"
            with torch.no_grad():
                model.vision.position_embedding.weight.normal_(std=args.position_embedding_std)
        model.tokenizer = tokenizer
        return model
    if args.llm or args.vision:  # stage 1 from the official microsoft/phi-2 and google/siglip folders
        if not (args.llm and args.vision):
            raise DataError("--llm and --vision go together")
        return Imp.from_components(args.llm, args.vision)
    return Imp.from_pretrained(args.model)  # a stage-1 output, an official Imp release, or any of our outputs


def parameter_groups(model: Imp, args):
    """Freeze what the stage freezes; return AdamW groups, each remembering its peak lr (official: the projector
    has its own rate in stage 2, llava_trainer.py's mm_projector_lr)."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    groups = [dict(name="connector", params=list(model.connector.parameters()), peak_lr=args.connector_lr)]
    if args.full:  # stage 2: official finetune.sh; stage 1: not official, for training from scratch
        model.llm.requires_grad_(True)
        groups.append(dict(name="llm", params=list(model.llm.parameters()), peak_lr=args.lr))
    elif args.stage == 2:
        imp.add_lora(model.llm, args.lora_rank, args.lora_alpha, args.lora_dropout)  # every Linear, lm_head too
        groups.append(dict(name="lora", params=[p for n, p in model.llm.named_parameters() if ".lora_" in n],
                           peak_lr=args.lr))
    if args.train_vision:  # not in the official recipe (the tower stays frozen); needed to train from scratch
        model.vision.requires_grad_(True)
        groups.append(dict(name="vision", params=list(model.vision.parameters()), peak_lr=args.lr))
    return groups


def get_lr(step, total_steps, warmup_steps, peak_lr):
    """Linear warmup, then cosine decay to 0 (transformers' cosine schedule, official warmup_ratio 0.03). Step s
    warms up to (s + 1) / warmup of the peak, so the first step already learns (transformers spends it at lr 0).
    A pure function of the step: nothing to save for --resume."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TrainingLoss(nn.Module):
    """DistributedDataParallel hooks forward(); Imp's loss is a method, so this wraps it as one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, pixel_values):
        return self.model.loss(input_ids, labels, pixel_values)


def trainable_state(model) -> dict:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step-NNNNNNN/ plus latest.json pointing at the newest complete one.


def save_checkpoint(out, step, model, optimizer, rng_states, meta):
    """Written into a temporary folder, renamed into place, and only then named in latest.json: a crash or a full
    disk at any moment leaves the previous checkpoint complete and pointed to. Holds what --resume needs: the
    trainable weights (frozen ones come back from --model), AdamW's moments, every rank's RNG, and the step (which
    fixes the data position and the learning rate, both pure functions of it)."""
    folder = os.path.join(out, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = f"step-{step:07d}"
    temporary = os.path.join(folder, f".{name}.tmp{os.getpid()}")  # one a killed run left is removed next time
    imp.remove_stale_temporaries(folder)
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        imp.save_safetensors_file(trainable_state(model), os.path.join(temporary, "trainable.safetensors"),
                                  save_file=save_file)
        # Optimizer and RNG state hold only tensors, numbers and dicts: loadable with torch.load(weights_only=True).
        save_torch(dict(optimizer=optimizer.state_dict(), rng=rng_states), os.path.join(temporary, "state.pt"))
        imp.write_json(os.path.join(temporary, "meta.json"), dict(meta, step=step))
        final = os.path.join(folder, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        imp.write_json(os.path.join(folder, "latest.json"), dict(step=step, folder=name))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in os.listdir(folder):  # only now is the older checkpoint no longer needed
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(folder, old), ignore_errors=True)


class RecordingFile(io.BufferedWriter):
    """A file that keeps the OSError of a failed write: torch.save reports a full disk only as a RuntimeError
    ("unexpected pos ..."), without the errno."""
    error = None

    def write(self, data):
        try:
            return super().write(data)
        except OSError as error:
            self.error = error
            raise


def save_torch(obj, path):
    """torch.save, with a full disk raised as the OSError (ENOSPC) it is."""
    file = RecordingFile(io.FileIO(path, "w"))
    try:
        with file:
            torch.save(obj, file)
    except RuntimeError:
        if file.error is not None:
            raise OSError(file.error.errno, file.error.strerror, path) from None
        raise


def latest_checkpoint(out):
    """-> (checkpoint folder, step) that latest.json names, or None without one. A latest.json that is damaged or
    names a checkpoint that is not there is a DataError: --resume cannot go on from it."""
    pointer = os.path.join(out, "checkpoints", "latest.json")
    if not os.path.lexists(pointer):
        return None
    try:
        latest = imp.read_json_object(pointer)
    except CheckpointError as error:
        raise DataError(f"{error}; the run cannot be resumed from it") from None
    name, step = latest.get("folder"), latest.get("step")
    if not (isinstance(name, str) and re.fullmatch(r"step-\d{7}", name) and isinstance(step, int)
            and not isinstance(step, bool) and step >= 0):
        raise DataError(f"{pointer}: expected {{\"step\": N, \"folder\": \"step-NNNNNNN\"}}, got {latest}")
    folder = os.path.join(out, "checkpoints", name)
    if not os.path.isdir(folder):
        raise DataError(f"{pointer}: names {name}, which is not in {os.path.dirname(pointer)}")
    return folder, step


def read_safetensors(path) -> dict:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as error:  # SafetensorError for a truncated or damaged file; IsADirectoryError
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def rng_state(device):
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def save_final(model: Imp, args, log):
    """The model folder Imp.from_pretrained(--out) loads: LoRA merged, official layout. Adapters (and the
    connector, which stage 2 also trains) go beside it in adapters/, like the official non_lora_trainables."""
    has_lora = any(isinstance(m, imp.LoRALinear) for m in model.modules())
    if has_lora:
        adapters = os.path.join(args.out, "adapters")
        os.makedirs(adapters, exist_ok=True)
        tensors = {n: t.contiguous() for n, t in imp.lora_state_dict(model).items()}
        tensors.update({f"connector.{n}": t.contiguous() for n, t in model.connector.state_dict().items()})
        temporary = os.path.join(adapters, f".adapter_model.safetensors.tmp{os.getpid()}")
        imp.save_safetensors_file(tensors, temporary, save_file=save_file)
        os.replace(temporary, os.path.join(adapters, "adapter_model.safetensors"))
        imp.write_json(os.path.join(adapters, "adapter_config.json"), dict(
            rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, target="every nn.Linear of the LLM",
            base_model=args.model or dict(llm=args.llm, vision=args.vision)))
        imp.merge_lora(model.llm)
    if args.stage == 1:  # what the official stage 1 keeps (mm_projector.bin), for a stage 2 on another base
        tensors = {n: t.contiguous() for n, t in model.connector.state_dict().items()}
        temporary = os.path.join(args.out, f".connector.safetensors.tmp{os.getpid()}")
        imp.save_safetensors_file(tensors, temporary, save_file=save_file)
        os.replace(temporary, os.path.join(args.out, "connector.safetensors"))
    model.save_pretrained(args.out, extra_config=dict(nanoimp_training=dict(stage=args.stage, full=args.full)))
    log(f"saved the model to {args.out}" + (" (LoRA merged; adapters in adapters/)" if has_lora else ""))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and merging (small side commands).


def evaluate(model: Imp, records, image_folder, limit=None, log=print) -> dict:
    """Exact-answer accuracy per question type with the model's own greedy Imp.answer, on the first question of
    each record (shapes' test.json has one). Returns {type: (correct, total)} and prints a table."""
    results = defaultdict(lambda: [0, 0])
    for index, record in enumerate(records[:limit]):
        where = f"record {index}"
        check_record(record, where)
        turns = record["conversations"]
        question = turns[0]["value"].replace(imp.IMAGE_PLACEHOLDER, "").strip()
        expected = next((t["value"].strip() for t in turns if t["from"] == "gpt"), "")
        image = imp.load_image(resolve_image(record["image"], image_folder, where)) if record.get("image") else None
        predicted = imp.answer(model, image, question, max_new_tokens=48)
        kind = record.get("type", "all")
        results[kind][0] += predicted == expected
        results[kind][1] += 1
    correct, total = sum(r[0] for r in results.values()), sum(r[1] for r in results.values())
    log(f"{'type':<10} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for kind in sorted(results):
        log(f"{kind:<10} {results[kind][0]:>8} {results[kind][1]:>6} {results[kind][0] / results[kind][1]:>9.1%}")
    log(f"{'overall':<10} {correct:>8} {total:>6} {correct / max(1, total):>9.1%}")
    return dict(results, overall=[correct, total])


def merge_adapters(args):
    """--merge ADAPTERS: base model (--model, or --llm/--vision) + saved adapters -> merged model in --out."""
    if not os.path.isdir(args.merge):
        raise DataError(f"--merge {args.merge}: no such folder (train.py writes the adapters to OUT/adapters)")
    adapter_config = imp.read_json_object(os.path.join(args.merge, "adapter_config.json"))
    rank, alpha = adapter_config.get("rank"), adapter_config.get("alpha")
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise CheckpointError(f"{args.merge}/adapter_config.json: needs a positive integer rank and a number alpha")
    tensors = read_safetensors(os.path.join(args.merge, "adapter_model.safetensors"))
    model = build_model(args)
    imp.add_lora(model.llm, rank, alpha, 0.0)
    expected = set(imp.lora_state_dict(model)) | {f"connector.{n}" for n in model.connector.state_dict()}
    if set(tensors) != expected:
        raise CheckpointError(f"{args.merge}: the adapters do not fit this base model "
                              f"({len(set(tensors) - expected)} unknown, {len(expected - set(tensors))} missing tensors)")
    model.load_state_dict(tensors, strict=False)
    imp.merge_lora(model.llm)
    model.save_pretrained(args.out)
    print(f"merged {args.merge} into {args.out}")


# ----------------------------------------------------------------------------------------------------------------
# The command line and the loop.


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every nanoImp program: not argparse's usage block
        fail(f"{message} (see --help)")


def stage_defaults(argv) -> dict:
    """The defaults that depend on --stage (and --full): the official recipe for that stage. Read from the command
    line before it is parsed whole, so that argparse fills them like any other default."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--stage", type=int, choices=(1, 2))
    early.add_argument("--full", action="store_true")
    early.add_argument("--lr", type=float)
    known, _ = early.parse_known_args(argv)
    if known.stage is None:
        return {}
    defaults = dict(STAGE_DEFAULTS[known.stage])
    if known.full and known.stage == 2:
        defaults["lr"] = FULL_FINETUNE_LR
    if known.stage == 1:  # stage 1 trains the connector alone: at --lr (given or default) unless told otherwise
        defaults["connector_lr"] = known.lr if known.lr is not None else defaults["lr"]
    return defaults


def parse_args(argv=None):
    parser = Parser(
        description="Train Imp: stage 1 (connector) and stage 2 (LoRA or full instruction tuning); evaluate; merge.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  # the official recipe: stage 1 from phi-2 + siglip, then stage 2 with LoRA (torchrun for several GPUs)
  torchrun --nproc_per_node=8 train.py --stage 1 --llm phi-2 --vision siglip-so400m-patch14-384 \\
      --data blip_laion_cc_sbu_558k.json --image-folder llava/pretrain --out runs/stage1 --micro-batch-size 32
  torchrun --nproc_per_node=8 train.py --stage 2 --model runs/stage1 --data llava_v1_5_mix665k.json \\
      --image-folder llava/finetune --out runs/stage2 --micro-batch-size 4
  # the demo model, from scratch on the synthetic shapes data (see docs/demo-model.md)
  python train.py --stage 1 --full --train-vision --init-config demo --tokenizer data/shapes \\
      --data data/shapes/captions.json --image-folder data/shapes --out runs/m1 --lr 1.5e-3 \\
      --batch-size 32 --micro-batch-size 32 --max-steps 800 --max-length 256
  python train.py --stage 2 --full --train-vision --model runs/m1 --data data/shapes/train.json \\
      --image-folder data/shapes --out runs/m2 --lr 1e-3 --connector-lr 1e-3 \\
      --batch-size 16 --micro-batch-size 16 --max-steps 1800 --max-length 256
  # continue an interrupted run; evaluate; fold adapters into a base model
  python train.py ... --resume
  python train.py --evaluate checkpoints/demo --data data/shapes/test.json --image-folder data/shapes
  python train.py --merge runs/stage2/adapters --model runs/stage1 --out runs/merged
  # draw a run's loss and learning rate (every run also does this itself when it ends)
  python train.py --plot-log runs/m2/log.jsonl                      (-> runs/m2/loss.png)""")
    add = parser.add_argument
    add("--stage", type=int, choices=(1, 2), help="1: connector alignment (plain template); 2: instruction tuning (phi2)")
    add("--model", help="start from an Imp folder (official release, stage-1 output, any train.py output)")
    add("--llm", help="start from an official microsoft/phi-2 folder (with --vision): stage 1's starting point")
    add("--vision", help="an official google/siglip folder (with --llm)")
    add("--init-config", choices=sorted(NAMED_CONFIGS), help="start from scratch with this small config (needs --tokenizer)")
    add("--position-embedding-std", type=float, help="with --init-config: draw the vision tower's position embeddings "
        "at this std instead of 0.02 (e.g. 1.0, so that where a patch is starts as loud as what it shows)")
    add("--image-size", type=int, help="with --init-config: the picture's side in pixels instead of the config's "
        "(a multiple of the patch size, 14; e.g. 56 for 4 x 4 = 16 image tokens)")
    add("--tokenizer", help="folder with tokenizer.json, for --init-config")
    add("--data", help="LLaVA-format .json or .jsonl")
    add("--image-folder", help="image paths in --data are relative to this folder and may not leave it")
    add("--out", help="output folder: log.jsonl, loss.png, checkpoints/, and the final model (with --plot-log: "
                      "the picture's file name)")
    add("--epochs", type=float, help="passes over the data (default: 1 in stage 1, 2 in stage 2)")
    add("--max-steps", type=int, help="optimizer steps in all (overrides --epochs)")
    add("--batch-size", type=int, help="global batch in samples, over all processes (default 256 / 128)")
    add("--micro-batch-size", type=int, default=4, help="samples per forward pass per process; the rest is accumulation")
    add("--lr", type=float, help="peak lr (default 1e-3 stage 1; 2e-4 LoRA; 2e-5 with --full)")
    add("--connector-lr", type=float, help="peak lr of the connector (default: --lr in stage 1, 2e-5 in stage 2)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (official: 0)")
    add("--warmup-ratio", type=float, default=0.03, help="fraction of the steps spent warming up (official: 0.03)")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off; transformers' default 1.0)")
    add("--lora-rank", type=int, default=256, help="LoRA rank (official: 256)")
    add("--lora-alpha", type=float, default=256, help="LoRA alpha; the update is scaled by alpha / rank (official: 256)")
    add("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (official: 0.05)")
    add("--full", action="store_true", help="stage 2 without LoRA: train all of Phi-2 (official finetune.sh); "
                                            "in stage 1 (not official): train Phi-2 too, for from-scratch models")
    add("--train-vision", action="store_true", help="also train the vision tower (not official; for from-scratch models)")
    add("--max-length", type=int, default=3072, help="longest spliced sequence (text + image tokens); longer samples "
                                                     "are cut after their image, or skipped (default 3072, official)")
    add("--strict", action="store_true", help="fail on a missing or unreadable image instead of skipping the sample")
    add("--group-by-length", action="store_true", help="batch samples of similar length together (less padding; "
        "transformers' group_by_length)")
    add("--seed", type=int, default=0, help="seeds the data order, the init and dropout")
    add("--save-every", type=int, default=0, help="save a checkpoint every N steps (0: only at the end)")
    add("--resume", action="store_true", help="continue from --out's latest checkpoint, exactly as if never stopped")
    add("--log-every", type=int, default=1, help="print a progress line every N steps (log.jsonl gets every step)")
    add("--device", help="cpu or cuda (default: cuda when available; torchrun ranks use cuda:LOCAL_RANK)")
    add("--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bfloat16 autocast (default: on CUDA; CPU trains in float32)")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute activations in the backward pass to save memory (default: on CUDA, as officially)")
    add("--threads", type=int, help="CPU threads per process (torch.set_num_threads)")
    add("--evaluate", metavar="MODEL", help="print exact-answer accuracy per question type of MODEL on --data")
    add("--limit", type=int, help="with --evaluate: only the first N records")
    add("--merge", metavar="ADAPTERS", help="merge an adapters/ folder into the base --model, write --out")
    add("--plot-log", metavar="LOG", help="draw the loss and lr curves of a log.jsonl into loss.png beside it "
                                          "(or --out FILE.png), e.g. --plot-log runs/m2/log.jsonl")
    argv = sys.argv[1:] if argv is None else list(argv)  # read twice: stage_defaults, then parse_args
    parser.set_defaults(**stage_defaults(argv))
    return check_args(parser, parser.parse_args(argv))


def check_args(parser, args):
    """What argparse cannot check alone: which options go together, for each of the program's modes."""
    if args.plot_log:
        return args
    if args.evaluate:
        if not args.data:
            parser.error("--evaluate needs --data")
        return args
    if args.out and os.path.lexists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: exists and is not a folder")
    if args.merge:
        if not args.out or not (args.model or args.llm):
            parser.error("--merge needs --model (or --llm/--vision) and --out")
        return args
    for name in ("stage", "data", "out"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required")
    if sum(bool(x) for x in (args.model, args.llm or args.vision, args.init_config)) != 1:
        parser.error("give exactly one starting point: --model DIR, --llm DIR --vision DIR, or --init-config NAME")
    if args.position_embedding_std is not None and not (args.init_config and args.position_embedding_std > 0):
        parser.error("--position-embedding-std needs --init-config and a positive number")
    if args.image_size is not None:
        patch = args.init_config and NAMED_CONFIGS[args.init_config]["vision"]["patch_size"]
        if not (patch and args.image_size >= patch and args.image_size % patch == 0):
            parser.error(f"--image-size needs --init-config and a multiple of its patch size ({patch or 14} px)")
    for name in ("batch_size", "micro_batch_size", "max_length", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.seed < 2**32:  # batch_indices seeds with seed * 1_000_003 + epoch, which must fit 64 bits
        parser.error("--seed must be in 0 .. 2**32 - 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.plot_log:
            print(f"wrote {visualize.plot_log(args.plot_log, args.out)}")
            return
        if args.evaluate:
            model = Imp.from_pretrained(args.evaluate)
            evaluate(model, read_records(args.data), args.image_folder, args.limit)
            return
        if args.merge:
            return merge_adapters(args)
        return train(args)
    except (DataError, CheckpointError, ImageError, visualize.PictureError, imp.NotFiniteError) as error:
        fail(str(error))
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"out of disk space ({error.filename or args.out}); earlier checkpoints are intact")
        raise


@dataclass
class Processes:
    """Where this process trains: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(args) -> Processes:
    """Under torchrun the DDP path runs even with one process (`--nproc_per_node=1`: nccl on a single GPU, a real
    check of the distributed code on a one-GPU machine); a plain `python train.py` skips it."""
    distributed = "WORLD_SIZE" in os.environ
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and distributed:
        if local_rank >= torch.cuda.device_count():
            raise DataError(f"torchrun started more processes per node than this machine has GPUs "
                            f"({torch.cuda.device_count()}): one process per GPU, --nproc_per_node at most that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if distributed:  # nccl moves GPU tensors directly between GPUs; gloo is the CPU implementation
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)  # binds this rank to its GPU (barrier() needs to know)
        else:
            dist.init_process_group("gloo")
    return Processes(device, rank, world_size, distributed)


def check_run_folder(args):
    """-> the checkpoint to resume from, or None. A finished or interrupted run is never overwritten by accident."""
    for folder in (args.out, os.path.join(args.out, "checkpoints")):  # what a killed save left behind
        imp.remove_stale_temporaries(folder)
    resume_from = latest_checkpoint(args.out) if os.path.isdir(args.out) else None
    if args.resume and resume_from is None:
        raise DataError(f"--resume: no checkpoint in {args.out}/checkpoints")
    if not args.resume and resume_from is not None:
        raise DataError(f"{args.out} already holds a training run; pass --resume to continue it, or use another --out")
    return resume_from


def resume(folder, model, optimizer, meta, processes) -> None:
    """Put back what save_checkpoint kept: the trainable weights, AdamW's moments and this rank's RNG."""
    saved = imp.read_json_object(os.path.join(folder, "meta.json"))
    saved.setdefault("group_by_length", False)  # checkpoints written before the option existed
    changed = [k for k in ("stage", "batch_size", "seed", "total_steps", "samples", "group_by_length")
               if saved.get(k) != meta[k]]
    if changed:
        raise DataError(f"--resume: {', '.join(changed)} differ from the interrupted run; resume with its arguments")
    weights = read_safetensors(os.path.join(folder, "trainable.safetensors"))
    missing = set(trainable_state(model)) ^ set(weights)
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint's trainable tensors do not match this model ({len(missing)})")
    model.load_state_dict({n: t.to(processes.device) for n, t in weights.items()}, strict=False)
    try:  # weights_only: a state.pt holding anything but tensors, numbers and dicts is refused, never unpickled
        state = torch.load(os.path.join(folder, "state.pt"), weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        mine = state["rng"][processes.rank] if processes.rank < len(state["rng"]) else state["rng"][0]
        torch.set_rng_state(mine["cpu"])
    except Exception as error:  # UnpicklingError, a truncated zip (RuntimeError), a wrong structure
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{folder}/state.pt: not a checkpoint state this program wrote ({message})") from None
    if processes.device.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], processes.device)


def start_log(args, start_step) -> str:
    """log.jsonl: one line per step. On --resume the lines of steps after the checkpoint are dropped (redone)."""
    log_path = os.path.join(args.out, "log.jsonl")
    os.makedirs(args.out, exist_ok=True)
    kept = []
    if args.resume and os.path.exists(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            kept = [line for line in f if logged_step(line) <= start_step]  # a line cut by a kill: dropped
    temporary = f"{log_path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(temporary, log_path)
    return log_path


def logged_step(line) -> float:
    """The step of a log.jsonl line, or infinity for a line that is not a whole record (so that it is dropped)."""
    try:
        step = json.loads(line)["step"]
        return step if isinstance(step, int) else math.inf
    except (ValueError, KeyError, TypeError, RecursionError):
        return math.inf


def accumulate_gradients(loss_module, micro_batches, count, autocast=contextlib.nullcontext, no_sync=None):
    """One optimizer step's gradients from `count` micro-batches (an iterable of collate()'s tuples, made one at a
    time): each loss is divided by `count` before its backward(), so the gradients add up to those of the mean over
    the micro-batches (like transformers' Trainer and nanoGPT). no_sync: DDP's context manager, which skips the
    gradient all-reduce on all but the last micro-batch. Returns (the mean loss, the positions trained on)."""
    total, positions = 0.0, 0
    for index, (input_ids, labels, pixel_values, batch_positions) in enumerate(micro_batches):
        last = index == count - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with autocast():
                loss = loss_module(input_ids, labels, pixel_values)
            (loss / count).backward()
        total, positions = total + loss.item(), positions + batch_positions
    return total / count, positions


def log_step(log_path, step, total_steps, loss, positions, optimizer, args, timing, steps_per_epoch):
    """One line in log.jsonl for every step; one progress line on stdout every --log-every steps."""
    seconds, elapsed, eta = timing
    record = dict(step=step, loss=round(loss, 6), lr=optimizer.param_groups[-1]["lr"],
                  samples_per_second=round(args.batch_size / seconds, 2),
                  tokens_per_second=round(positions / seconds, 1), elapsed=round(elapsed, 2),
                  epoch=round(step / steps_per_epoch, 4))
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if step % args.log_every == 0 or step == total_steps:
        print(f"step {step}/{total_steps} | loss {loss:.4f} | lr {record['lr']:.2e} | "
              f"{record['samples_per_second']:.1f} samples/s | {record['tokens_per_second']:.0f} tokens/s | "
              f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)


def model_and_data(args, device, checkpointing, log):
    """The model on its device, its AdamW groups (what this stage trains), and the tokenized samples."""
    torch.manual_seed(args.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(args)
    groups = parameter_groups(model, args)
    model.to(device).train()
    model.vision.gradient_checkpointing = model.llm.gradient_checkpointing = checkpointing
    samples, _ = load_dataset(args.data, args.image_folder, model.tokenizer, model.config,
                              "plain" if args.stage == 1 else model.config.template, args.max_length, args.strict, log)
    if len(samples) < args.batch_size:
        raise DataError(f"{args.data}: {len(samples)} usable samples, fewer than one --batch-size ({args.batch_size})")
    return model, groups, samples


def train(args):
    processes = start_processes(args)
    device, rank, world_size = processes.device, processes.rank, processes.world_size
    log = print if processes.is_main else (lambda *a, **k: None)
    use_bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    checkpointing = device.type == "cuda" if args.gradient_checkpointing is None else args.gradient_checkpointing
    accumulation, remainder = divmod(args.batch_size, args.micro_batch_size * world_size)
    if remainder or accumulation == 0:
        raise DataError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} x {world_size} processes")
    resume_from = check_run_folder(args)
    model, groups, samples = model_and_data(args, device, checkpointing, log)
    lengths = [spliced_length(sample, model.config) for sample in samples] if args.group_by_length else None
    steps_per_epoch = len(samples) // args.batch_size
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    trainable = [p for g in groups for p in g["params"]]
    log(f"{len(samples)} samples, {total_steps} steps of {args.batch_size} ({world_size} process(es) x "
        f"{accumulation} micro-batches of {args.micro_batch_size}), {sum(p.numel() for p in trainable) / 1e6:.2f}M of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters trained, device {device}"
        f"{', bf16 autocast' if use_bf16 else ''}{', gradient checkpointing' if checkpointing else ''}")

    # -- optimizer, distributed wrapper, resume
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["peak_lr"]} for g in groups],
                                  weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    loss_module = TrainingLoss(model)
    if processes.distributed:
        # find_unused_parameters: a micro-batch of text-only samples leaves the connector without gradients.
        text_only = any(image is None for _, _, image in samples)
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda"
                                                          else None, find_unused_parameters=text_only)
    torch.manual_seed(args.seed + rank)  # dropout masks differ per rank, as they would on separate GPUs
    meta = dict(stage=args.stage, batch_size=args.batch_size, seed=args.seed, total_steps=total_steps,
                samples=len(samples), data=os.path.abspath(args.data), group_by_length=args.group_by_length)
    start_step = resume_from[1] if args.resume else 0
    if args.resume:
        resume(resume_from[0], model, optimizer, meta, processes)
        log(f"resumed from {resume_from[0]} at step {start_step}")
    log_path = start_log(args, start_step) if processes.is_main else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 and device.type == "cuda" \
        else contextlib.nullcontext
    no_sync = loss_module.no_sync if processes.distributed else None
    per_rank = args.batch_size // world_size

    # -- the loop: one optimizer step per global batch
    last_saved, started = start_step if args.resume else None, time.time()
    for step in range(start_step, total_steps):
        step_started = time.time()
        for group, spec in zip(optimizer.param_groups, groups):
            group["lr"] = get_lr(step, total_steps, warmup_steps, spec["peak_lr"])
        mine = batch_indices(step, len(samples), args.batch_size, args.seed, lengths)[rank * per_rank:][:per_rank]
        micro_batches = (collate([samples[i] for i in mine[m:m + args.micro_batch_size]], model.config, device)
                         for m in range(0, per_rank, args.micro_batch_size))
        loss, positions = accumulate_gradients(loss_module, micro_batches, accumulation, autocast, no_sync)
        totals = torch.tensor([loss, positions], dtype=torch.float64, device=device)  # nccl reduces GPU tensors only
        if processes.distributed:
            dist.all_reduce(totals)  # every rank sees the same (global) loss, so all stop together on NaN
            totals[0] /= world_size
        step_loss = totals[0].item()
        if not math.isfinite(step_loss):
            where = f"step {last_saved}, in {args.out}/checkpoints" if last_saved else "none saved yet"
            raise DataError(f"the loss became {step_loss} at step {step + 1}; stopped without applying it "
                            f"(last good checkpoint: {where}). Try a lower --lr")
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done, now = step + 1, time.time()
        if processes.is_main:
            eta = (now - started) / (done - start_step) * (total_steps - done)
            log_step(log_path, done, total_steps, step_loss, totals[1].item(), optimizer, args,
                     (now - step_started, now - started, eta), steps_per_epoch)
        if (args.save_every and done % args.save_every == 0) or done == total_steps:
            save_everywhere(args.out, done, model, optimizer, meta, processes)
            last_saved = done
    finish(args, model, trainable, log_path, processes, log)
    return model


def save_everywhere(out, step, model, optimizer, meta, processes):
    """A checkpoint with every rank's RNG state; rank 0 writes it, the others wait until it is complete."""
    states = [rng_state(processes.device)]
    if processes.distributed:
        states = [None] * processes.world_size
        dist.all_gather_object(states, rng_state(processes.device))
    if processes.is_main:
        save_checkpoint(out, step, model, optimizer, states, meta)
    if processes.distributed:
        dist.barrier()


def finish(args, model, trainable, log_path, processes, log):
    device = processes.device
    if processes.distributed:  # DDP's promise, checked: every rank holds the very same weights (rank 0's get saved)
        checksum = torch.stack([p.detach().double().sum() for p in trainable]).to(device)
        gathered = [torch.zeros_like(checksum) for _ in range(processes.world_size)]
        dist.all_gather(gathered, checksum)
        log(f"parameters identical on all {processes.world_size} ranks: "
            f"{all(torch.equal(g, gathered[0]) for g in gathered)}")
    if device.type == "cuda":  # what a GPU needs for this model, micro-batch and checkpointing setting
        log(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB")
    if processes.is_main:
        save_final(model, args, log)
        try:  # the curves are a convenience: a run that trained and saved is never failed for want of a picture
            log(f"loss curve: {visualize.plot_log(log_path)}")
        except (visualize.PictureError, OSError) as error:
            log(f"note: no loss curve drawn ({error})")
    if processes.distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
