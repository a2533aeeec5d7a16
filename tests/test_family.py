"""Imp-2B (Qwen1.5) and Imp-4B (Phi-3-mini) against transformers' Qwen2ForCausalLM / Phi3ForCausalLM, in float32.

Small random models with the real head dims (Qwen 64 here, Phi-3 96), written in the official Imp layouts and
dtypes (2B float16, 4B bfloat16 with fused qkv_proj / gate_up_proj), then loaded by imp.py and compared with the
reference on the same (rounded) weights. Phi-3's sliding window is 16 here, so that short prompts cross it.
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import imp
import reference as ref

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
QWEN = dict(vocab_size=512, hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512,
            tie_word_embeddings=False, use_sliding_window=False)
PHI3 = dict(vocab_size=512, hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
            original_max_position_embeddings=512, rope_scaling=None, sliding_window=16, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = PHI3["sliding_window"]
IMAGE_TOKEN = 511  # past the small tokenizers' ids (the releases: the first free id)
RELEASE_DTYPE = {"qwen2": torch.float16, "phi3": torch.bfloat16}


def llm_model(family, seed=0, **changes):
    """A scrambled transformers model whose weights are exactly representable in the release's dtype."""
    if family == "qwen2":
        config = transformers.Qwen2Config(**dict(QWEN, **changes), attn_implementation="eager")
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.Phi3Config(**dict(PHI3, **changes), attn_implementation="eager")
        model = transformers.Phi3ForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.08  # biases too (Qwen's q, k, v)
            value = 1.0 + noise if name.endswith("norm.weight") else noise  # perturbed RMSNorm weights
            parameter.copy_(value.to(RELEASE_DTYPE[family]).float())
    return model.eval()


def projector(hidden, seed=2):
    generator = torch.Generator().manual_seed(seed)
    v = ref.SIGLIP["hidden_size"]
    return {name: (torch.randn(shape, generator=generator) * 0.08) for name, shape in
            (("0.weight", (hidden, v)), ("0.bias", (hidden,)), ("2.weight", (hidden, hidden)), ("2.bias", (hidden,)))}


def imp_config(family, eos=None):
    """config.json as the releases write it (plus a vision_tower_config for the small tower)."""
    vision = dict(ref.SIGLIP, model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh")
    common = dict(mm_hidden_size=ref.SIGLIP["hidden_size"], mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", vision_tower_config=vision, tokenizer_model_max_length=2560,
                  hidden_act="silu", tie_word_embeddings=False)
    if family == "qwen2":  # no pad_token_id in the 2B config
        return dict(common, **QWEN, architectures=["ImpQwen2ForCausalLM"], model_type="imp_qwen2",
                    image_token_index=IMAGE_TOKEN, image_token="<image>", eos_token_id=eos, bos_token_id=eos,
                    image_aspect_ratio="square", sliding_window=32768, torch_dtype="float16")
    return dict(common, **dict(PHI3, eos_token_id=eos), architectures=["ImpPhi3ForCausalLM"], model_type="imp_phi3",
                image_token_index=IMAGE_TOKEN, image_aspect_ratio="pad", torch_dtype="bfloat16",
                activation_function="gelu_new")  # a leftover of the Phi-2 config in the real one


def write_imp(folder, family, llm, siglip, mm, eos=None):
    os.makedirs(folder, exist_ok=True)
    dtype = RELEASE_DTYPE[family]
    tensors = {k: v.to(dtype) for k, v in llm.state_dict().items()}  # Phi3: fused qkv_proj / gate_up_proj as is
    tensors.update({f"model.mm_projector.{k}": v.to(dtype) for k, v in mm.items()})
    for key, value in siglip.state_dict().items():
        key = key if key.startswith("vision_model.") else "vision_model." + key
        if not key.startswith((f"vision_model.encoder.layers.{ref.SIGLIP['num_hidden_layers'] - 1}.", "vision_model.head.")):
            tensors[f"model.vision_tower.vision_tower.{key}"] = value.to(dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(imp_config(family, eos), f)
    return folder


def rounded(module, dtype):
    """A copy of a reference module with its weights rounded to the release dtype (what the folder holds)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.to(dtype).float())
    return module


@pytest.fixture(scope="module")
def members(tmp_path_factory, tokenizer_folders):
    """Per family: the reference parts, an Imp folder in the release layout (2B: vocab.json + merges.txt, 4B:
    tokenizer.json), the base decoder folder (Qwen/Qwen1.5-*, microsoft/Phi-3-mini-* layout) and a SigLIP one."""
    import shutil
    root = tmp_path_factory.mktemp("family")
    out = {}
    for family in ("qwen2", "phi3"):
        llm, siglip = llm_model(family), ref.siglip_model()
        mm = projector(llm.config.hidden_size)
        tokenizer = tokenizer_folders["phi3"][(True, False)] if family == "phi3" else tokenizer_folders["qwen_files"]
        eos = imp.load_tokenizer(tokenizer, family).token_to_id(imp.STOP_TOKENS[family][0])  # <|im_end|>, <|end|>
        folder = write_imp(str(root / family), family, llm, siglip, mm, eos)
        base, vision = str(root / f"{family}-base"), str(root / "siglip")
        llm.save_pretrained(base)
        siglip.save_pretrained(vision)
        for name in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, name), folder)
        if family == "qwen2":
            shutil.copy(os.path.join(tokenizer_folders["qwen"], "tokenizer.json"), base)  # Qwen's own repos have it
        else:
            shutil.copy(os.path.join(tokenizer, "tokenizer.json"), base)
        rounded(siglip, RELEASE_DTYPE[family])
        mm = {k: v.to(RELEASE_DTYPE[family]).float() for k, v in mm.items()}
        out[family] = dict(llm=llm, siglip=siglip, mm=mm, folder=folder, base=base, vision=vision)
    return out


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def reference_logits(member, input_ids, pixel_values):
    """Imp's forward from reference parts: SigLIP hidden_states[-2] -> Linear, erf GELU, Linear -> spliced at the
    image id -> the transformers decoder on embeddings, positions 0 .. L-1."""
    siglip, mm, llm = member["siglip"], member["mm"], member["llm"]
    embeddings = ref.reference_embeddings(siglip, mm, llm.model.embed_tokens, input_ids, pixel_values, IMAGE_TOKEN)
    with torch.no_grad():
        positions = torch.arange(embeddings.shape[1])[None]
        return llm(inputs_embeds=embeddings, position_ids=positions).logits.float()


# -- the decoders and the whole model against the reference ----------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_decoder_matches_transformers(members, family):
    member = members[family]
    ours = imp.LlamaDecoder.from_pretrained(member["base"])
    assert ours.config.family == family
    ids = torch.randint(0, 512, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))  # past the window
    with torch.no_grad():
        expected, got = member["llm"](ids).logits, ours(ids)
    assert got.shape == expected.shape and max_diff(got, expected) < TOLERANCE


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_imp_release_layout_matches_reference(members, family):
    member = members[family]
    model = imp.Imp.from_pretrained(member["folder"], with_tokenizer=False)
    assert model.config.template == family and isinstance(model.llm, imp.LlamaDecoder)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, IMAGE_TOKEN, (2, 20), generator=generator)
    ids[:, 2] = IMAGE_TOKEN
    pixels = torch.rand(2, 3, 56, 56, generator=generator) * 2 - 1
    with torch.no_grad():
        got = model(ids, pixels)
    expected = reference_logits(member, ids, pixels)
    assert got.shape == (2, 20 - 1 + 16, 512) and got.shape[1] > 2 * WINDOW  # the window hides keys
    assert max_diff(got, expected) < TOLERANCE


@pytest.mark.parametrize("window", [WINDOW, WINDOW + 1])
def test_sliding_window_both_conventions(window):
    """transformers masks keys with q - k >= window; flash-attention (the official training) with q - k > window,
    i.e. transformers' window + 1. Reading sliding_window as window + 1 gives that one, so both are covered."""
    llm = llm_model("phi3", seed=4, sliding_window=window)
    config = imp.LlamaConfig.from_dict(llm.config.to_dict())
    assert config.sliding_window == window
    ours = imp.LlamaDecoder(config)
    ours.load_state_dict(imp_state_from_phi3(llm.state_dict(), config))
    ids = torch.randint(0, 512, (1, 2 * window + 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert max_diff(ours(ids), llm(ids).logits) < TOLERANCE


def imp_state_from_phi3(state, config):
    """transformers Phi3 state dict -> LlamaDecoder's, through imp's own key table (fused rows split)."""
    out = {}
    for key, targets in imp.key_table_llama(config, ours="").items():
        if key in state:
            for name, rows in targets:
                out[name] = state[key][rows] if rows else state[key]
    return out


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_kv_cache_decoding_equals_full_forward(members, family):
    model = imp.Imp.from_pretrained(members[family]["folder"], with_tokenizer=False)
    ids = torch.randint(3, IMAGE_TOKEN, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(7))
    prompt = 5
    with torch.no_grad():
        full = model.llm(ids)[0]  # (T, vocab)
        cache = model.llm.make_cache(1, ids.shape[1])
        logits = [model.prefill(model.llm.embed_tokens(ids[:, :prompt]), cache)]
        for position in range(prompt, ids.shape[1] - 1):
            logits.append(model.decode_step(int(ids[0, position]), position, cache))
    assert max_diff(torch.stack(logits), full[prompt - 1:-1]) < TOLERANCE



@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_fast_layer_decodes_a_16_bit_cache_past_the_window_like_full_forward(members, family):
    """kernels.enable: decode attention over a 16-bit cache in float32 (window and all) against the full forward."""
    import kernels
    model = imp.Imp.from_pretrained(members[family]["folder"], with_tokenizer=False)
    kernels.enable(model)
    assert all(type(layer.self_attn) is kernels.LlamaDecodeAttention for layer in model.llm.layers)
    ids = torch.randint(3, IMAGE_TOKEN, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(8))
    prompt = 5
    with torch.inference_mode():
        full = model.llm(ids)[0]  # (T, vocab): no cache, the readable attention
        cache = model.llm.make_cache(1, ids.shape[1], dtype=RELEASE_DTYPE[family])
        logits = [model.prefill(model.llm.embed_tokens(ids[:, :prompt]), cache)]
        for position in range(prompt, ids.shape[1] - 1):
            logits.append(model.decode_step(int(ids[0, position]), position, cache))
    # the cache rounds keys and values to 16 bits: float16 ~ 2e-3, bfloat16 ~ 2e-2 on logits of size ~4; a window
    # off by one key moves them by ~4
    assert max_diff(torch.stack(logits), full[prompt - 1:-1]) < (0.01 if family == "qwen2" else 0.05)

# -- configs ------------------------------------------------------------------------------------------------------

RELEASE_2B_CONFIG = dict(  # MILVLG/Imp-v1.5-2B-Qwen1.5 config.json (no vision_tower_config, no pad_token_id)
    architectures=["ImpQwen2ForCausalLM"], model_type="imp_qwen2", bos_token_id=151643, eos_token_id=151645,
    hidden_act="silu", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, rms_norm_eps=1e-06, rope_theta=1000000.0, max_position_embeddings=32768,
    sliding_window=32768, use_sliding_window=False, max_window_layers=21, tie_word_embeddings=False,
    vocab_size=151936, image_aspect_ratio="square", image_token="<image>", image_token_index=151646,
    mm_hidden_size=1152, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
    mm_vision_tower="google/siglip-so400m-patch14-384", tokenizer_model_max_length=2560, torch_dtype="float16")
RELEASE_4B_CONFIG = dict(  # MILVLG/Imp-v1.5-4B-Phi3 config.json (the part seen; Phi-2 leftovers included)
    architectures=["ImpPhi3ForCausalLM"], model_type="imp_phi3", activation_function="gelu_new", bos_token_id=1,
    eos_token_id=32007, pad_token_id=32000, hidden_act="silu", hidden_size=3072, intermediate_size=8192,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    original_max_position_embeddings=4096, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=10000.0,
    sliding_window=2047, tie_word_embeddings=False, image_aspect_ratio="pad", mm_hidden_size=1152,
    mm_vision_select_layer=-2, tokenizer_model_max_length=2560, torch_dtype="bfloat16", vocab_size=32064)


def test_release_configs():
    config = imp.ImpConfig.from_dict(RELEASE_2B_CONFIG)
    text = config.text
    assert (config.template, text.hidden_size, text.num_hidden_layers, text.head_dim, text.vocab_size) == \
        ("qwen2", 2048, 24, 128, 151936)
    assert (text.rope_theta, text.rms_norm_eps, text.attention_bias, text.sliding_window) == (1e6, 1e-6, True, None)
    assert (config.image_token_index, config.eos_token_id, config.pad_token_id, config.max_length) == \
        (151646, 151645, 151643, 2560)
    assert config.vision.num_patches == 729 and config.image_aspect_ratio == "square"
    config = imp.ImpConfig.from_dict(RELEASE_4B_CONFIG)
    text = config.text
    assert (config.template, text.hidden_size, text.head_dim, text.vocab_size, text.sliding_window) == \
        ("phi3", 3072, 96, 32064, 2047)
    assert (text.rope_theta, text.rms_norm_eps, text.attention_bias) == (10000.0, 1e-5, False)
    assert (config.image_token_index, config.eos_token_id, config.pad_token_id) == (32011, 32007, 32000)
    assert config.image_aspect_ratio == "pad"
    for release in (RELEASE_2B_CONFIG, RELEASE_4B_CONFIG):  # what we write reads back the same
        config = imp.ImpConfig.from_dict(release)
        assert imp.ImpConfig.from_dict(config.to_dict()) == config


def test_parameter_counts_match_the_releases():
    """Meta builds: the language models' sizes as transformers' Qwen2ForCausalLM / Phi3ForCausalLM count them
    (2B 1,836,828,672; 4B 3,821,079,552), and the connectors' (1152 -> H -> H)."""
    for release, llm_size, connector_size in ((RELEASE_2B_CONFIG, 1_836_828_672, 6_557_696),
                                              (RELEASE_4B_CONFIG, 3_821_079_552, 12_982_272)):
        model = imp.build_on_meta(imp.Imp, imp.ImpConfig.from_dict(release))
        assert sum(p.numel() for p in model.llm.parameters()) == llm_size
        assert sum(p.numel() for p in model.connector.parameters()) == connector_size


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_save_pretrained_writes_the_release_layout(members, family, tmp_path):
    model = imp.Imp.from_pretrained(members[family]["folder"], dtype=RELEASE_DTYPE[family], with_tokenizer=False)
    model.save_pretrained(str(tmp_path))
    checkpoint = imp.open_checkpoint(str(tmp_path))
    original = imp.open_checkpoint(members[family]["folder"])
    dropped = {k for k in original.shapes if "post_layernorm" in k}
    assert checkpoint.shapes == {k: v for k, v in original.shapes.items() if k not in dropped}
    from safetensors.torch import load_file
    saved, release = load_file(checkpoint.files[0]), load_file(original.files[0])
    assert all(torch.equal(saved[k], release[k]) for k in saved)  # fused rows stacked back in the same order
    config = json.load(open(tmp_path / "config.json"))
    assert config["model_type"] == {"qwen2": "imp_qwen2", "phi3": "imp_phi3"}[family]
    assert config["torch_dtype"] == {"qwen2": "float16", "phi3": "bfloat16"}[family]


# -- tokenizers: small ones in the published styles, against transformers --------------------------------------

CORPUS = ["What is in the picture? A red circle and a blue square.", "The answer is yes. Ça va, naïve café!",
          "A chat between a curious user and an artificial intelligence assistant. 12345 apples\n\n  indented",
          "The assistant gives helpful, detailed, and polite answers to the user's questions."] * 10
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PROMPT_TEXTS = ["What is this?", "cafe\u0301 decomposed (NFC composes it)", "Ça va? 42 naïve\n\nlines  and   spaces",
                "Describe it.<|im_end|> <|end|> tricky"]


def write_qwen_tokenizer(folder):
    """Qwen1.5's style: NFC, Qwen's regex, byte-level BPE without prefix space, three special tokens. Writes
    tokenizer.json (the Hugging Face Qwen repos) and vocab.json + merges.txt + added_tokens.json (Imp-2B's)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(imp.QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    base = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    tokenizer.model.save(folder)
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump({t: base + i for i, t in enumerate(QWEN_SPECIALS)}, f)
    return folder


def write_phi3_tokenizer(folder, bos_template=True, rstrip=False):
    """Phi-3's style (Llama's SentencePiece BPE as a tokenizer.json): "▁" prepended and for spaces, byte fallback
    pieces <0x00>..<0xFF>, <unk> <s> </s>, then the chat tokens; with or without a TemplateProcessing that adds <s>
    (unknown for the release), and with or without rstrip on the chat tokens (changed upstream in May 2024)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.normalizer = normalizer
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # pieces within words
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    trainer_tokenizer.train_from_iterator([line.replace("\n", " ") for line in CORPUS], trainer)
    vocab = trainer_tokenizer.get_vocab(with_added_tokens=True)
    merges = json.loads(trainer_tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip) for t in PHI3_ADDED])
    if bos_template:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                 special_tokens=[("<s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return folder


def official_image_tokens(tokenizer, prompt, image_index):
    """mm_utils.tokenizer_image_token, as the official code runs it on a transformers tokenizer."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids += [image_index]
        ids += chunk[offset:]
    return ids


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    qwen = write_qwen_tokenizer(str(root / "qwen"))
    qwen_files = str(root / "qwen-files")
    os.makedirs(qwen_files)
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        os.link(os.path.join(qwen, name), os.path.join(qwen_files, name))
    phi3 = {(bos, rstrip): write_phi3_tokenizer(str(root / f"phi3-{bos}-{rstrip}"), bos, rstrip)
            for bos in (True, False) for rstrip in (False, True)}
    return dict(qwen=qwen, qwen_files=qwen_files, phi3=phi3)


def prompts(template):
    history = [("What is first?", "A circle.")]
    return [imp.build_prompt(text, template=template) for text in PROMPT_TEXTS] + \
        [imp.build_prompt("And second?", history=history, template=template),
         imp.build_prompt("No image here", with_image=False, template=template)]


def test_qwen_tokenizer_matches_transformers(tokenizer_folders):
    config = imp.ImpConfig(text=imp.LlamaConfig(), image_token_index=500)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_folders["qwen"], "tokenizer.json"))
    files = tokenizer_folders["qwen_files"]
    rebuilt = transformers.Qwen2Tokenizer(vocab=os.path.join(files, "vocab.json"), merges=os.path.join(files, "merges.txt"))
    rebuilt.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    ours_json = imp.load_tokenizer(tokenizer_folders["qwen"], "qwen2")
    ours_files = imp.load_tokenizer(files, "qwen2")  # vocab.json + merges.txt, Qwen's regex and NFC rebuilt
    for prompt in prompts("qwen2") + CORPUS[:4]:
        expected = official_image_tokens(fast, prompt, 500)
        assert official_image_tokens(rebuilt, prompt, 500) == expected
        assert imp.encode_prompt(ours_json, prompt, config) == expected
        assert imp.encode_prompt(ours_files, prompt, config) == expected
    assert ours_files.token_to_id("<|im_end|>") == fast.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("rstrip", [False, True])
@pytest.mark.parametrize("bos_template", [True, False])
def test_phi3_tokenizer_matches_transformers(tokenizer_folders, bos_template, rstrip):
    """The reference adds <s> (LlamaTokenizerFast's add_bos_token); ours gives the same ids whether the
    tokenizer.json has the TemplateProcessing that adds it or not."""
    config = imp.ImpConfig(text=imp.LlamaConfig.phi3(), image_token_index=600)
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tokenizer_folders["phi3"][(True, rstrip)], "tokenizer.json"), bos_token="<s>")
    ours = imp.load_tokenizer(tokenizer_folders["phi3"][(bos_template, rstrip)], "phi3")
    for prompt in prompts("phi3"):
        expected = official_image_tokens(reference, prompt, 600)
        assert expected[0] == 1 and expected.count(600) == ("<image>" in prompt)
        assert imp.encode_prompt(ours, prompt, config) == expected
    assert ours.decode(ours.encode("Ça va? naïve", add_special_tokens=False).ids) == "Ça va? naïve"  # byte fallback


def test_templates_are_the_official_strings():
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    assert imp.build_prompt("WHAT?", template="qwen2") == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image>\nWHAT?<|im_end|>\n<|im_start|>assistant\n")
    assert imp.build_prompt("WHAT?", template="phi3") == (
        f"<|system|>\n{system}<|end|>\n<|user|>\n<image>\nWHAT?<|end|>\n<|assistant|>\n")
    assert imp.build_prompt("Q2", history=[("Q1", "A1")], with_image=False, template="qwen2").endswith(
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert imp.build_prompt("Q2", history=[("Q1", "A1")], with_image=False, template="phi3").endswith(
        "<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n")


# -- training labels: train.py's dataset code against the official preprocess_qwen2 / preprocess_phi3 ----------

RECORDS = [
    {"image": "a.png", "conversations": [{"from": "human", "value": "What is this?\n<image>"},
                                         {"from": "gpt", "value": "A red circle."}]},
    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."},
                                         {"from": "human", "value": "And the shape?"},
                                         {"from": "gpt", "value": "A circle, 12345 naïve."}]},
    {"conversations": [{"from": "human", "value": "No picture: say yes."}, {"from": "gpt", "value": "yes"},
                       {"from": "human", "value": "Again"}, {"from": "gpt", "value": "\nyes  twice"}]},
]
SEPARATORS = {"qwen2": ("<|im_end|>", "\n<|im_start|>assistant\n", 0), "phi3": ("<|end|>", "\n<|assistant|>\n", 1)}


def official_labels(tokenizer, conversation, template, image_index):
    """preprocess_qwen2 / preprocess_phi3 as the official train.py writes them (cur_len starts after Phi-3's BOS,
    every count of a piece drops its own BOS; a total that does not add up masks the whole sample)."""
    sep2, role, bos = SEPARATORS[template]
    tokenize = lambda text: official_image_tokens(tokenizer, text, image_index)
    input_ids = tokenize(conversation)
    target = list(input_ids)
    rounds = conversation.split(sep2)
    re_rounds = [sep2.join(rounds[:3])]
    for index in range(3, len(rounds), 2):
        re_rounds.append(sep2.join(rounds[index:index + 2]))
    cur_len = bos
    target[:cur_len] = [-100] * cur_len
    for rou in re_rounds:
        if rou == "":
            break
        parts = rou.split(sep2 + role)
        if len(parts) != 2:
            break
        parts[0] += sep2 + role
        round_len = len(tokenize(rou + sep2)) - bos
        instruction_len = len(tokenize(parts[0])) - bos
        target[cur_len:cur_len + instruction_len] = [-100] * instruction_len
        cur_len += round_len
    target[cur_len:] = [-100] * (len(target) - cur_len)
    if cur_len != len(input_ids):
        target = [-100] * len(target)
    return input_ids, target


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_training_labels_match_the_official_rule(tokenizer_folders, family, tmp_path):
    import train
    folder = tokenizer_folders["qwen"] if family == "qwen2" else tokenizer_folders["phi3"][(True, False)]
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                                     bos_token="<s>" if family == "phi3" else None)
    text = imp.LlamaConfig() if family == "qwen2" else imp.LlamaConfig.phi3()
    config = imp.ImpConfig(vision=imp.VisionConfig(image_size=28, patch_size=14), text=text, image_token_index=700)
    from PIL import Image
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    ours = imp.load_tokenizer(folder, family)
    samples, _ = train.load_dataset(str(data), str(tmp_path), ours, config, family, 10_000, strict=True, log=lambda *a: None)
    learned = 0
    for (ids, labels, _), record in zip(samples, RECORDS):
        conversation = train.format_chat(record["conversations"], "image" in record, "test", family)
        expected_ids, expected_labels = official_labels(reference, conversation, family, 700)
        assert ids == expected_ids and labels == expected_labels
        learned += sum(label != -100 for label in labels)
    assert learned > 10  # answers and their end tokens, not a sample masked whole
    end_id = ours.token_to_id(SEPARATORS[family][0])
    assert all(label in (-100,) or label == ids[i] for i, label in enumerate(labels))
    assert labels[-1] == end_id and labels.count(end_id) == 2  # each answer ends in its learned end token
    # stage 1 (preprocess_plain): "<image>" + caption + "\n", all but the image (and Phi-3's <s>) learned
    data.write_text(json.dumps(RECORDS[:1]))
    [(ids, labels, _)], _ = train.load_dataset(str(data), str(tmp_path), ours, config, "plain", 10_000, strict=True,
                                              log=lambda *a: None)
    expected_ids = official_image_tokens(reference, "<image>A red circle.\n", 700)
    masked = len(official_image_tokens(reference, "<image>", 700))
    assert ids == expected_ids and labels == [-100] * masked + expected_ids[masked:]


# -- the programs with Imp-2B / Imp-4B folders -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_release_folder_asks_in_its_template(members, family, tmp_path, capsys):
    import infer
    from PIL import Image
    folder = members[family]["folder"]
    model = imp.Imp.from_pretrained(folder)
    image = Image.new("RGB", (40, 20), (200, 30, 30))  # not square: the 4B pads it, the 2B squashes it
    input_ids, pixel_values = imp.prepare_inputs(model, image, "What is it?")
    prompt = imp.build_prompt("What is it?", template=family)
    assert input_ids[0].tolist() == imp.encode_prompt(model.tokenizer, prompt, model.config)
    assert int((input_ids == IMAGE_TOKEN).sum()) == 1 and (input_ids[0, 0] == 1) == (family == "phi3")
    aspect = "pad" if family == "phi3" else "square"
    assert model.config.image_aspect_ratio == aspect
    assert torch.equal(pixel_values[0], imp.preprocess_image(image, 56, aspect))
    ends = {model.tokenizer.token_to_id(name) for name in imp.STOP_TOKENS[family]}
    assert model.stop_ids() == ends and None not in ends
    image_path = tmp_path / "a.png"
    image.save(image_path)
    assert infer.main(["--model", folder, str(image_path), "What is it?", "--max-new-tokens", "3", "--dtype",
                       "float32", "--threads", "1"]) == 0
    expected = imp.answer(model, image, "What is it?", max_new_tokens=3)
    assert capsys.readouterr().out.strip() == expected


def write_data(folder):
    from PIL import Image
    Image.new("RGB", (56, 56), "red").save(os.path.join(folder, "a.png"))
    Image.new("RGB", (56, 56), "blue").save(os.path.join(folder, "b.png"))
    captions = [{"image": f"{c[0]}.png", "conversations": [{"from": "human", "value": "<image>"},
                                                           {"from": "gpt", "value": f"A {c} square."}]}
                for c in ("a", "b")]
    chats = [{"image": f"{c[0]}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                        {"from": "gpt", "value": f"It is {c}."}]}
             for c in ("a", "b")]
    for name, records in (("captions.json", captions), ("train.json", chats)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(records, f)


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_train_stage1_stage2_lora_and_merge(members, family, tmp_path):
    import train
    from safetensors.torch import load_file
    member = members[family]
    write_data(str(tmp_path))
    run = lambda *argv: train.main([str(a) for a in argv] + ["--threads", "1", "--image-folder", str(tmp_path),
                                                             "--max-steps", "2", "--warmup-ratio", "0"])
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    run("--stage", 1, "--llm", member["base"], "--vision", member["vision"], "--data", tmp_path / "captions.json",
        "--out", stage1, "--batch-size", 2, "--micro-batch-size", 2)
    model = imp.Imp.from_pretrained(str(stage1))
    assert model.config.template == family and model.config.image_aspect_ratio == ("pad" if family == "phi3" else "square")
    base = load_file(os.path.join(member["base"], "model.safetensors"))
    saved = load_file(str(stage1 / "model.safetensors"))
    assert all(torch.equal(saved[key], base[key]) for key in base)  # the frozen decoder, in its own (fused) names
    run("--stage", 2, "--model", stage1, "--data", tmp_path / "train.json", "--out", stage2, "--batch-size", 2,
        "--micro-batch-size", 2, "--lora-rank", 4, "--lora-alpha", 8, "--lr", 1e-2)
    adapters = load_file(str(stage2 / "adapters" / "adapter_model.safetensors"))
    wrapped = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters if ".lora_" in name}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert len([n for n in adapters if ".lora_" in n]) == 2 * (2 * 7 + 1)  # 2 layers x 7 Linears + lm_head, A and B
    run("--merge", stage2 / "adapters", "--model", stage1, "--out", tmp_path / "merged")
    ids = torch.tensor([[5, 6, model.config.image_token_index, 7, 8]])  # the id stage 1 gave <image>
    pixels = torch.rand(1, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        trained = imp.Imp.from_pretrained(str(stage2))(ids, pixels)
        assert max_diff(imp.Imp.from_pretrained(str(tmp_path / "merged"))(ids, pixels), trained) < 1e-5
        assert max_diff(model(ids, pixels), trained) > 1e-3  # LoRA moved it


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_quantized_folders(members, family, tmp_path):
    import quant
    folder = members[family]["folder"]
    model = imp.Imp.from_pretrained(folder)
    plan = quant.quantization_plan(model, quant.quantization_config(bits=4, group_size=32))
    kinds = {name.rsplit(".", 1)[-1] for name in plan}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                     "embed_tokens"}
    ids = torch.tensor([[5, 6, IMAGE_TOKEN, 7, 8]])
    pixels = torch.rand(1, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        expected = model(ids, pixels)
        for bits in (8, 4):
            out = str(tmp_path / f"int{bits}")
            quant.convert(folder, out, bits=bits, group_size=32, log=lambda *a: None)
            loaded = quant.load(out)
            assert loaded.config.template == family and loaded.tokenizer is not None
            in_memory = imp.Imp.from_pretrained(folder)
            quant.quantize_model(in_memory, bits=bits, group_size=32)  # the folder holds exactly these weights
            assert max_diff(loaded(ids, pixels), in_memory(ids, pixels)) < 1e-4
            error = max_diff(loaded(ids, pixels), expected) / expected.abs().max().item()
            assert error < (0.05 if bits == 8 else 0.3), error
    report = quant.evaluate(folder, bits=4, group_size=32, new_tokens=3, log=lambda *a: None,
                            samples=[(None, "Say something.")])
    assert {"o_proj", "gate_proj", "up_proj", "down_proj"} <= set(report["weight_error"])


def test_bench_times_every_member(tmp_path):
    import bench
    assert bench.member_config("2b", False, 384) == imp.ImpConfig.from_dict(RELEASE_2B_CONFIG)
    assert bench.member_config("4b", False, 384) == imp.ImpConfig.from_dict(RELEASE_4B_CONFIG)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--family", "2b", "4b", "--dtypes", "int4", "--new-tokens", "2", "--threads", "1",
                       "--json", str(out)]) == 0
    rows = json.load(open(out))["results"]
    assert [(r["family"], r["dtype"]) for r in rows] == [("2b", "int4"), ("4b", "int4")]
    assert all(r["weight_bytes"] > 0 and r["peak_rss_bytes"] > 0 and r["generated_tokens"] == 2 for r in rows)


def test_attention_maps_match_transformers_past_the_window(members):
    import visualize
    member = members["phi3"]
    model = imp.Imp.from_pretrained(member["folder"], with_tokenizer=False)
    ids = torch.randint(3, IMAGE_TOKEN, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ours = visualize.attention_maps(model, ids)  # (layers, heads, T, T)
        theirs = member["llm"](ids, output_attentions=True).attentions
    assert ours.shape == (2, 2, 30, 30) and float(ours[0, 0, -1, :30 - WINDOW].abs().max()) == 0.0
    assert max_diff(ours, torch.stack([a[0] for a in theirs])) < 1e-5
