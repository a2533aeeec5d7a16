"""Replicas of the published model folders, file for file, with tiny random weights.

Real folders hold more than a loader needs: a SiglipModel's text tower, logit_scale and logit_bias and its MAP head,
the Imp repos' remote-code .py files, generation_config.json, tokenizer_config.json, config fields nobody reads.
These builders write every file the published repos have, under the published names, with the published config
fields (sizes shrunk), the published dtypes, shards and tokenizer files, so that the tests run every program on what
a user really downloads:

  microsoft/phi-2                    PhiForCausalLM, 2 float16 shards + index, GPT-2/CodeGen tokenizer files
  google/siglip-so400m-patch14-384   a whole SiglipModel (text tower, logit_scale/bias, head), float32, one file
  MILVLG/imp-v1-3b                   7 float16 shards, current `model.*` naming or legacy `transformer.h.*` (Wqkv)
  MILVLG/Imp-v1.5-3B-Phi2            current naming
  MILVLG/Imp-v1.5-3B-196             legacy naming, 196 px (196 image tokens), a siglip-so400m-patch14-196 subfolder

Images keep the published sizes (384 px: 729 image tokens; 196 px: 196), widths are tiny and keep the real head
dims (Phi-2 80 with 32 rotary, SigLIP 72). Weights are random, std 0.08 as in tests/reference.py. Token ids keep
Phi-2's layout relative to a small vocabulary: the byte-level BPE's ids, then <|endoftext|> as the last base id
(Phi-2: 50256), 38 runs of spaces and tabs (50257..50294), then Imp's </s> (50295) and <image> (50296); the
embedding has spare rows up to a multiple of 64 (Phi-2: 51200).
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

import reference as ref

transformers = ref.transformers

# -- token ids, in Phi-2's layout ---------------------------------------------------------------------------------
ENDOFTEXT = 299                     # Phi-2: 50256, the last id of vocab.json (bos, unk, Phi-2's eos, Imp's pad)
WHITESPACE = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]  # Phi-2: 50257 .. 50294
EOS = ENDOFTEXT + 1 + len(WHITESPACE)  # "</s>": Imp's end of answer (50295)
IMAGE = EOS + 1                     # "<image>" (50296)
VOCAB_SIZE = 384                    # embedding rows: the tokenizer's 340 rounded up to a multiple of 64 (51200)

PHI = dict(hidden_size=160, intermediate_size=640, num_hidden_layers=2, num_attention_heads=2)  # head_dim 80
VISION = dict(hidden_size=144, intermediate_size=200, num_hidden_layers=3, num_attention_heads=2)  # head_dim 72
TEXT_TOWER = dict(hidden_size=144, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2,
                  vocab_size=64, max_position_embeddings=16)

RELEASES = {  # repo -> (image size, weight naming)
    "imp-v1-3b": (384, "current"),
    "imp-v1-3b-legacy": (384, "legacy"),   # the same repo before its "update phi-2 version" commit
    "Imp-v1.5-3B-Phi2": (384, "current"),
    "Imp-v1.5-3B-196": (196, "legacy"),
}

CORPUS = ["A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.", "USER: What is in the picture? ASSISTANT: "
          "A red circle and a blue square.", "What color is the bus? The bus is red and white.",
          "def f(x):\n    return x + 1\n"]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# -- tokenizer files ----------------------------------------------------------------------------------------------

def base_bpe():
    """vocab.json's content: a byte-level BPE trained on CORPUS (ids 0 .. 298), then <|endoftext|> = 299."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=ENDOFTEXT, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == ENDOFTEXT, len(vocab)
    vocab["<|endoftext|>"] = ENDOFTEXT
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return vocab, [m if isinstance(m, str) else " ".join(m) for m in merges]


def added_token_entry(content, special):
    return dict(content=content, lstrip=False, normalized=not special, rstrip=False, single_word=False,
                special=special)


def write_tokenizer_files(folder, imp_tokens=(), tokenizer_json=False, eos="<|endoftext|>", max_length=2048):
    """vocab.json, merges.txt, added_tokens.json (Phi-2's whitespace runs + imp_tokens), special_tokens_map.json,
    tokenizer_config.json (CodeGenTokenizer, with added_tokens_decoder), and tokenizer.json if asked."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    vocab, merges = base_bpe()
    write_json(os.path.join(folder, "vocab.json"), vocab)
    write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {token: ENDOFTEXT + 1 + i for i, token in enumerate(WHITESPACE)}
    added.update({token: {"</s>": EOS, "<image>": IMAGE}[token] for token in imp_tokens})
    write_json(os.path.join(folder, "added_tokens.json"), added)
    specials = {"<|endoftext|>", *imp_tokens}
    names = dict(bos_token="<|endoftext|>", eos_token=eos, unk_token="<|endoftext|>")
    if imp_tokens:
        names["pad_token"] = "<|endoftext|>"
    write_json(os.path.join(folder, "special_tokens_map.json"), names)
    decoder = {str(i): added_token_entry(t, t in specials)
               for t, i in sorted({"<|endoftext|>": ENDOFTEXT, **added}.items(), key=lambda item: item[1])}
    write_json(os.path.join(folder, "tokenizer_config.json"),
               dict(add_prefix_space=False, added_tokens_decoder=decoder, **names, clean_up_tokenization_spaces=True,
                    model_max_length=max_length, tokenizer_class="CodeGenTokenizer",
                    **(dict(padding_side="right", use_fast=False) if imp_tokens else {})))
    if tokenizer_json:
        tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        for token, token_id in added.items():
            tokenizer.add_tokens([AddedToken(token, special=token in specials, normalized=token not in specials)])
            assert tokenizer.token_to_id(token) == token_id
        tokenizer.save(os.path.join(folder, "tokenizer.json"))


# -- weights ------------------------------------------------------------------------------------------------------

def phi_model(seed=0, lm_head_bias=None):
    """A random PhiForCausalLM with Phi-2's config (sizes shrunk). lm_head_bias: {token id: added bias}."""
    config = transformers.PhiConfig(vocab_size=VOCAB_SIZE, **PHI, partial_rotary_factor=0.4,
                                    max_position_embeddings=2048, layer_norm_eps=1e-5, attn_implementation="eager")
    model = ref.scramble(transformers.PhiForCausalLM(config), seed)
    with torch.no_grad():
        for token, bias in (lm_head_bias or {}).items():
            model.lm_head.bias[token] += bias
    return model


def siglip_model(image_size=384, seed=1):
    """A random whole SiglipModel: vision tower with its MAP head, text tower, logit_scale, logit_bias."""
    config = transformers.SiglipConfig(text_config=dict(TEXT_TOWER),
                                       vision_config=dict(VISION, image_size=image_size, patch_size=14))
    return ref.scramble(transformers.SiglipModel(config), seed)


def projector(seed=2):
    generator = torch.Generator().manual_seed(seed)
    h, v = PHI["hidden_size"], VISION["hidden_size"]
    return {name: torch.randn(shape, generator=generator) * 0.08 for name, shape in
            (("0.weight", (h, v)), ("0.bias", (h,)), ("2.weight", (h, h)), ("2.bias", (h,)))}




def imp_tensors(phi, siglip, mm, layout, post_layernorm):
    """An Imp state dict as the official code saves it: SigLIP's vision part without its last layer and its head
    (post_layernorm kept or not: it differs between code versions), the projector, Phi-2."""
    top = "model." if layout == "current" else "transformer."
    tensors, last = {}, VISION["num_hidden_layers"] - 1  # select layer -2: the last layer is deleted
    for key, value in siglip.state_dict().items():
        if not key.startswith("vision_model.") or key.startswith((f"vision_model.encoder.layers.{last}.",
                                                                   "vision_model.head.")):
            continue
        if key.startswith("vision_model.post_layernorm.") and not post_layernorm:
            continue
        tensors[f"{top}vision_tower.vision_tower.{key}"] = value
    tensors.update({f"{top}mm_projector.{key}": value for key, value in mm.items()})
    state = phi.state_dict()
    tensors.update(state if layout == "current" else ref.legacy_phi_tensors(state))
    return tensors


def write_shards(folder, tensors, num_shards, dtype):
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json, the Hugging Face convention: tensors in
    order, cut into shards of about equal size, the index's weight_map sorted by key."""
    keys = list(tensors)
    tensors = {k: tensors[k].detach().to(dtype).contiguous() for k in keys}
    sizes = np.cumsum([tensors[k].numel() * tensors[k].element_size() for k in keys])
    shard_of = np.minimum((sizes - 1) * num_shards // sizes[-1], num_shards - 1)
    names = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: tensors[k] for k, s in zip(keys, shard_of) if s == i}
        assert part, "more shards than tensors"
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    write_json(os.path.join(folder, "model.safetensors.index.json"),
               {"metadata": {"total_size": int(sizes[-1])},
                "weight_map": dict(sorted(weight_map.items()))})


def write_repo_files(folder, title):
    write_text(os.path.join(folder, "README.md"), f"---\nlicense: apache-2.0\n---\n# {title} (tiny random replica)\n")
    write_text(os.path.join(folder, ".gitattributes"), "*.safetensors filter=lfs diff=lfs merge=lfs -text\n")


# -- the repos ----------------------------------------------------------------------------------------------------

def write_phi2(folder, phi=None):
    """microsoft/phi-2: config.json, generation_config.json, 2 float16 shards + index, tokenizer.json, vocab.json,
    merges.txt, added_tokens.json, tokenizer_config.json, special_tokens_map.json, and the repo's documents."""
    phi = phi or phi_model()
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), dict(
        _name_or_path="microsoft/phi-2", architectures=["PhiForCausalLM"], attention_dropout=0.0,
        bos_token_id=ENDOFTEXT, embd_pdrop=0.0, eos_token_id=ENDOFTEXT, hidden_act="gelu_new",
        hidden_size=PHI["hidden_size"], initializer_range=0.02, intermediate_size=PHI["intermediate_size"],
        layer_norm_eps=1e-05, max_position_embeddings=2048, model_type="phi",
        num_attention_heads=PHI["num_attention_heads"], num_hidden_layers=PHI["num_hidden_layers"],
        num_key_value_heads=PHI["num_attention_heads"], partial_rotary_factor=0.4, qk_layernorm=False,
        resid_pdrop=0.1, rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float16",
        transformers_version="4.37.0", use_cache=True, vocab_size=VOCAB_SIZE))
    write_json(os.path.join(folder, "generation_config.json"), dict(
        _from_model_config=True, bos_token_id=ENDOFTEXT, eos_token_id=ENDOFTEXT, transformers_version="4.37.0"))
    write_shards(folder, phi.state_dict(), 2, torch.float16)
    write_tokenizer_files(folder, tokenizer_json=True)
    write_repo_files(folder, "microsoft/phi-2")
    for name in ("CODE_OF_CONDUCT.md", "LICENSE", "NOTICE.md", "SECURITY.md"):
        write_text(os.path.join(folder, name), f"{name}\n")
    return folder


def preprocessor_config(image_size):
    return dict(do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.5, 0.5, 0.5],
                image_processor_type="SiglipImageProcessor", image_std=[0.5, 0.5, 0.5],
                processor_class="SiglipProcessor", resample=3, rescale_factor=0.00392156862745098,  # 1 / 255
                size=dict(height=image_size, width=image_size))


def siglip_config(image_size):
    return dict(architectures=["SiglipModel"], initializer_factor=1.0, model_type="siglip",
                text_config=dict(TEXT_TOWER, model_type="siglip_text_model"), torch_dtype="float32",
                transformers_version="4.37.0.dev0",
                vision_config=dict(VISION, image_size=image_size, model_type="siglip_vision_model", patch_size=14))


def write_siglip(folder, siglip=None, image_size=384):
    """google/siglip-so400m-patch14-384: a whole SiglipModel in one float32 model.safetensors (vision_model.*,
    text_model.*, logit_scale, logit_bias), config.json, preprocessor_config.json, and the text tower's tokenizer
    files (spiece.model is SentencePiece's binary format; here a stand-in of the same name: nothing reads it)."""
    siglip = siglip or siglip_model(image_size)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), siglip_config(image_size))
    write_json(os.path.join(folder, "preprocessor_config.json"), preprocessor_config(image_size))
    state = {k: v.detach().float().contiguous() for k, v in siglip.state_dict().items()}
    assert {"logit_scale", "logit_bias"} <= set(state) and any(k.startswith("text_model.") for k in state)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(folder, "special_tokens_map.json"),
               dict(eos_token="</s>", pad_token="</s>", unk_token="<unk>"))
    write_json(os.path.join(folder, "tokenizer_config.json"),
               dict(additional_special_tokens=[], eos_token="</s>", model_max_length=64, pad_token="</s>",
                    processor_class="SiglipProcessor", sp_model_kwargs={}, tokenizer_class="SiglipTokenizer",
                    unk_token="<unk>"))
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # a SentencePiece-like protobuf stand-in
    write_repo_files(folder, "google/siglip-so400m-patch14-384")
    return folder


def imp_config(release, layout, image_size, dtype, aspect, eos_token_id, vision_tower_config=True):
    """config.json of an Imp release: LLaVA's training fields, the tower's config, and Phi-2's fields in the
    current transformers naming or the legacy phi-msft one (n_embd, n_layer, ..., n_inner null = 4 x n_embd)."""
    tower = f"google/siglip-so400m-patch14-{image_size}"
    vision = dict(VISION, image_size=image_size, patch_size=14, model_type="siglip_vision_model",
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-06, num_channels=3, attention_dropout=0.0)
    common = dict(
        _name_or_path=f"MILVLG/{release}", architectures=["ImpForCausalLM"],
        auto_map={"AutoConfig": "configuration_imp.ImpConfig", "AutoModelForCausalLM": "modeling_imp.ImpForCausalLM"},
        eos_token_id=eos_token_id, freeze_mm_mlp_adapter=False, image_aspect_ratio=aspect, image_token="<image>",
        image_token_index=IMAGE, mm_hidden_size=VISION["hidden_size"], mm_projector_lr=2e-05,
        mm_projector_type="mlp2x_gelu", mm_use_im_patch_token=False, mm_use_im_start_end=False,
        mm_vision_select_feature="patch", mm_vision_select_layer=-2, mm_vision_tower=tower, model_type="imp",
        pad_token_id=ENDOFTEXT, tokenizer_model_max_length=3072, tokenizer_padding_side="right",
        torch_dtype=str(dtype).replace("torch.", ""), transformers_version="4.31.0", tune_mm_mlp_adapter=False,
        use_cache=True, use_mm_proj=True, vocab_size=VOCAB_SIZE)
    if vision_tower_config:
        common["vision_tower_config"] = vision
    if layout == "legacy":
        return dict(common, activation_function="gelu_new", embd_pdrop=0.0, flash_attn=False, flash_rotary=False,
                    fused_dense=False, img_processor=None, initializer_range=0.02, layer_norm_epsilon=1e-05,
                    n_embd=PHI["hidden_size"], n_head=PHI["num_attention_heads"], n_head_kv=None, n_inner=None,
                    n_layer=PHI["num_hidden_layers"], n_positions=3072, resid_pdrop=0.1, rotary_dim=32,
                    tie_word_embeddings=False)
    return dict(common, attention_dropout=0.0, bos_token_id=ENDOFTEXT, embd_pdrop=0.0, hidden_act="gelu_new",
                hidden_size=PHI["hidden_size"], initializer_range=0.02, intermediate_size=PHI["intermediate_size"],
                layer_norm_eps=1e-05, max_position_embeddings=3072, num_attention_heads=PHI["num_attention_heads"],
                num_hidden_layers=PHI["num_hidden_layers"], num_key_value_heads=PHI["num_attention_heads"],
                partial_rotary_factor=0.4, qk_layernorm=False, resid_pdrop=0.1, rope_scaling=None, rope_theta=10000.0,
                tie_word_embeddings=False)


def write_imp(folder, release="imp-v1-3b", phi=None, siglip=None, mm=None, post_layernorm=True,
              dtype=torch.float16, aspect="square", eos_token_id=EOS, image_token_in_tokenizer=True,
              tokenizer_json=False):
    """A MILVLG Imp release (RELEASES): 7 shards + index, config.json, generation_config.json, the remote-code
    files, and the tokenizer files (vocab.json, merges.txt, added_tokens.json with </s> and <image>,
    special_tokens_map.json, tokenizer_config.json; no tokenizer.json).
    Left open by what is known of the real files, so settable: post_layernorm (in the tower's tensors or not),
    dtype (v1.5: float16 or bfloat16), aspect ("square" or "pad"), eos_token_id (a folder written by the official
    training code keeps Phi-2's, ENDOFTEXT), image_token_in_tokenizer (False: added_tokens.json lacks <image>),
    tokenizer_json (also a tokenizer.json, which the file lists seen do not show)."""
    image_size, layout = RELEASES[release]
    phi = phi or phi_model()
    siglip = siglip or siglip_model(image_size)
    mm = mm or projector()
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"),
               imp_config(release.replace("-legacy", ""), layout, image_size, dtype, aspect, eos_token_id))
    write_json(os.path.join(folder, "generation_config.json"), dict(
        _from_model_config=True, bos_token_id=ENDOFTEXT, eos_token_id=eos_token_id, pad_token_id=ENDOFTEXT,
        transformers_version="4.31.0"))
    write_shards(folder, imp_tensors(phi, siglip, mm, layout, post_layernorm), 7, dtype)
    write_tokenizer_files(folder, ("</s>", "<image>") if image_token_in_tokenizer else ("</s>",), tokenizer_json,
                          eos="</s>", max_length=3072)
    for name in ("configuration_imp.py", "modeling_imp.py", "vision_encoder.py"):  # trust_remote_code; never run
        write_text(os.path.join(folder, name), f'"""{name} of {release} (remote code; a loader must not run it)."""\n'
                                               "raise RuntimeError('remote code executed')\n")
    if image_size == 196:  # the 196-px repo carries its tower's config in a subfolder
        tower = os.path.join(folder, "siglip-so400m-patch14-196")
        os.makedirs(tower, exist_ok=True)
        write_json(os.path.join(tower, "config.json"), siglip_config(196))
        write_json(os.path.join(tower, "preprocessor_config.json"), preprocessor_config(196))
    write_repo_files(folder, f"MILVLG/{release}")
    return folder
