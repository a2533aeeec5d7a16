"""Small random models in the official layouts, built with transformers (the independent reference).

Random weights are drawn with std 0.08 (not the default 0.02) and LayerNorms are perturbed, so that the bugs parity
tests exist for (tanh vs erf GELU, the wrong rotary half, swapped q/k, a missing bias) move the logits by far more
than the 1e-4 tolerance. Sizes keep the real head dims: Phi-2 80 (32 rotary), SigLIP 72.
"""
import json
import os

import torch
from safetensors.torch import save_file

transformers = __import__("pytest").importorskip("transformers")

PHI = dict(vocab_size=320, hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2,
           partial_rotary_factor=0.4, max_position_embeddings=512, layer_norm_eps=1e-5)
SIGLIP = dict(hidden_size=144, intermediate_size=200, num_hidden_layers=3, num_attention_heads=2, image_size=56,
              patch_size=14, layer_norm_eps=1e-6)  # 3 layers: Imp keeps 2; 56 px -> 16 patches
IMAGE_TOKEN, EOS, PAD = 319, 318, 0


def image_prompt(batch=2, length=12, seed=0):
    """Random token ids with an <image> at position 3, and random pictures in [-1, 1] to go with them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, EOS, (batch, length), generator=generator)
    ids[:, 3] = IMAGE_TOKEN
    pixels = torch.rand(batch, 3, 56, 56, generator=generator) * 2 - 1
    return ids, pixels


def scramble(model, seed, std=0.08):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(1.0 + noise if name.endswith("layernorm.weight") or ".layer_norm" in name
                            and name.endswith("weight") else noise)
    return model.eval()


def phi_model(seed=0):
    config = transformers.PhiConfig(**PHI, attn_implementation="eager")
    return scramble(transformers.PhiForCausalLM(config), seed)


def siglip_model(seed=1):
    config = transformers.SiglipVisionConfig(**SIGLIP, attn_implementation="eager")
    return scramble(transformers.SiglipVisionModel(config), seed)


def projector(seed=2):
    generator = torch.Generator().manual_seed(seed)
    h, v = PHI["hidden_size"], SIGLIP["hidden_size"]
    return {name: torch.randn(shape, generator=generator) * 0.08 for name, shape in
            (("0.weight", (h, v)), ("0.bias", (h,)), ("2.weight", (h, h)), ("2.bias", (h,)))}


def imp_config(legacy=False):
    vision = dict(SIGLIP, model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh")
    common = dict(architectures=["ImpForCausalLM"], model_type="imp", mm_hidden_size=SIGLIP["hidden_size"],
                  mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, vision_tower_config=vision,
                  image_token_index=IMAGE_TOKEN, eos_token_id=EOS, pad_token_id=PAD, image_aspect_ratio="square")
    if legacy:  # the MixFormer naming of the first Imp releases
        return dict(common, n_embd=PHI["hidden_size"], n_layer=PHI["num_hidden_layers"], n_head=PHI["num_attention_heads"],
                    n_inner=PHI["intermediate_size"], rotary_dim=32, vocab_size=PHI["vocab_size"], n_positions=3072,
                    layer_norm_epsilon=1e-5, activation_function="gelu_new")
    return dict(common, **PHI, hidden_act="gelu_new")


def legacy_phi_tensors(state):
    """PhiForCausalLM's state dict -> the MixFormer names of the first Imp releases (fused Wqkv rows [Q; K; V])."""
    layers = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("model.layers."))
    tensors = {"transformer.embd.wte.weight": state["model.embed_tokens.weight"]}
    for p in ("weight", "bias"):
        tensors[f"lm_head.ln.{p}"] = state[f"model.final_layernorm.{p}"]
        tensors[f"lm_head.linear.{p}"] = state[f"lm_head.{p}"]
        for i in range(layers):
            old, new = f"transformer.h.{i}", f"model.layers.{i}"
            tensors[f"{old}.ln.{p}"] = state[f"{new}.input_layernorm.{p}"]
            tensors[f"{old}.mixer.Wqkv.{p}"] = torch.cat([state[f"{new}.self_attn.{n}_proj.{p}"] for n in "qkv"])
            tensors[f"{old}.mixer.out_proj.{p}"] = state[f"{new}.self_attn.dense.{p}"]
            tensors[f"{old}.mlp.fc1.{p}"] = state[f"{new}.mlp.fc1.{p}"]
            tensors[f"{old}.mlp.fc2.{p}"] = state[f"{new}.mlp.fc2.{p}"]
    return tensors


def imp_tensors(phi, siglip, mm, legacy=False, keep_post_layernorm=True):
    """The state dict of an Imp checkpoint as the official code would save it."""
    top = "transformer." if legacy else "model."
    tensors = {}
    kept = SIGLIP["num_hidden_layers"] - 1  # select layer -2: the last layer is deleted
    for key, value in siglip.state_dict().items():
        key = key if key.startswith("vision_model.") else "vision_model." + key  # transformers 5 drops the prefix
        if key.startswith(f"vision_model.encoder.layers.{kept}.") or key.startswith("vision_model.head."):
            continue
        if key.startswith("vision_model.post_layernorm.") and not keep_post_layernorm:
            continue
        tensors[f"{top}vision_tower.vision_tower.{key}"] = value
    for key, value in mm.items():
        tensors[f"{top}mm_projector.{key}"] = value
    state = phi.state_dict()
    if not legacy:
        tensors.update(state)
        return {k: v.contiguous() for k, v in tensors.items()}
    tensors.update(legacy_phi_tensors(state))
    return {k: v.contiguous() for k, v in tensors.items()}


def write_imp(folder, phi, siglip, mm, legacy=False, shards=1, tokenizer_from=None):
    os.makedirs(folder, exist_ok=True)
    tensors = imp_tensors(phi, siglip, mm, legacy)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(imp_config(legacy), f)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:  # the Hugging Face sharding convention, written independently of our writer
        keys = sorted(tensors)
        weight_map = {}
        for n in range(shards):
            name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[n::shards]}
            save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    write_tokenizer(folder)
    return folder


def write_tokenizer(folder):
    """A GPT-2-style byte-level BPE in the files the Imp releases ship: vocab.json + merges.txt + added_tokens.json.
    Base vocab 0..315 (id 0 = <|endoftext|>), then two whitespace runs (like Phi-2's), then </s> and <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=316, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["What is in the picture? A red circle and a blue square.", "USER: ASSISTANT: The answer is yes.",
            "A chat between a curious user and an artificial intelligence assistant."] * 20
    tokenizer.train_from_iterator(text, trainer)
    assert tokenizer.get_vocab_size() == 316, tokenizer.get_vocab_size()
    tokenizer.model.save(folder)
    added = {"    ": 316, "\t\t": 317, "</s>": EOS, "<image>": IMAGE_TOKEN}
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump(added, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": "</s>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "bos_token": "<|endoftext|>"}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False}, f)


def reference_embeddings(siglip, mm, embed, input_ids, pixel_values, image_token=IMAGE_TOKEN):
    """Imp's input embeddings composed from reference parts: SigLIP hidden_states[-2] -> Linear, erf GELU, Linear
    -> spliced in place of the <image> id among the decoder's token embeddings (embed) -> (B, T', C)."""
    with torch.no_grad():
        features = siglip(pixel_values, output_hidden_states=True).hidden_states[-2]
        features = torch.nn.functional.linear(features, mm["0.weight"], mm["0.bias"])
        features = torch.nn.functional.linear(torch.nn.functional.gelu(features), mm["2.weight"], mm["2.bias"])
        rows = []
        for b, ids in enumerate(input_ids):
            where = int((ids == image_token).nonzero()[0])
            rows.append(torch.cat([embed(ids[:where]), features[b], embed(ids[where + 1:])]))
        return torch.stack(rows)


def reference_imp_logits(phi, siglip, mm, input_ids, pixel_values):
    """Imp's forward composed from the reference parts: reference_embeddings -> PhiForCausalLM on them."""
    embeddings = reference_embeddings(siglip, mm, phi.model.embed_tokens, input_ids, pixel_values)
    with torch.no_grad():
        return phi(inputs_embeds=embeddings).logits.float()
