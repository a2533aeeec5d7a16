"""imp.py against transformers' PhiForCausalLM / SiglipVisionModel (the independent reference), in float32."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import imp
import reference as ref

TOLERANCE = 1e-4  # max abs logit difference in float32 (observed: ~1e-6)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# -- parity with the reference -----------------------------------------------------------------------------------

def test_phi2_matches_transformers(parts, folders):
    phi = parts[0]
    ours = imp.Phi2.from_pretrained(folders["phi"])
    ids = torch.randint(0, ref.PHI["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = phi(ids).logits
        got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 17, ref.PHI["vocab_size"])
    assert max_diff(got, expected) < TOLERANCE


def test_siglip_matches_transformers_penultimate_layer(parts, folders):
    siglip = parts[1]
    ours = imp.SigLIP.from_pretrained(folders["siglip"])
    assert len(ours.layers) == ref.SIGLIP["num_hidden_layers"] - 1
    pixels = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        expected = siglip(pixels, output_hidden_states=True).hidden_states[-2]  # no post_layernorm
        got = ours(pixels)
    assert got.shape == (2, 16, ref.SIGLIP["hidden_size"])
    assert max_diff(got, expected) < TOLERANCE


@pytest.mark.parametrize("layout", ["current", "legacy", "sharded"])
def test_imp_matches_reference_composition(parts, folders, layout):
    model = imp.Imp.from_pretrained(folders[layout])
    ids, pixels = ref.image_prompt()
    with torch.no_grad():
        got = model(ids, pixels)
    expected = ref.reference_imp_logits(*parts, ids, pixels)
    assert got.shape == (2, 12 - 1 + 16, ref.PHI["vocab_size"])
    assert max_diff(got, expected) < TOLERANCE


def test_legacy_and_current_layouts_give_identical_logits(folders):
    ids, pixels = ref.image_prompt(seed=5)
    with torch.no_grad():
        current = imp.Imp.from_pretrained(folders["current"])(ids, pixels)
        legacy = imp.Imp.from_pretrained(folders["legacy"])(ids, pixels)
    assert torch.equal(current, legacy)


def test_fused_attention_equals_readable_path(folders, monkeypatch):
    model = imp.Imp.from_pretrained(folders["current"])
    ids, pixels = ref.image_prompt(seed=6)
    with torch.no_grad():
        fused = model(ids, pixels)
        monkeypatch.setattr(imp, "USE_FUSED_ATTENTION", False)
        readable = model(ids, pixels)
    assert max_diff(fused, readable) < 1e-5


def test_from_components_builds_stage1_model(folders):
    model = imp.Imp.from_components(folders["phi"], folders["siglip"])
    assert model.config.image_token_index == model.tokenizer.token_to_id("<image>") == ref.IMAGE_TOKEN
    assert model.config.eos_token_id == ref.EOS
    ids, pixels = ref.image_prompt(batch=1)
    with torch.no_grad():
        assert model(ids, pixels).shape == (1, 27, ref.PHI["vocab_size"])


# -- splicing, loss, cache, generation ----------------------------------------------------------------------------

def test_splice_pads_rows_and_masks_image_labels(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    ids = torch.tensor([[5, ref.IMAGE_TOKEN, 6, 7], [5, 6, 7, 8]])
    labels = torch.tensor([[5, -100, 6, 7], [5, 6, 7, 8]])
    features = torch.randn(1, 16, ref.PHI["hidden_size"])
    embeddings, spliced = model.splice(ids, features, labels)
    assert embeddings.shape == (2, 19, ref.PHI["hidden_size"])
    assert spliced[0].tolist() == [5] + [-100] * 16 + [6, 7]
    assert spliced[1].tolist() == [5, 6, 7, 8] + [-100] * 15
    assert torch.equal(embeddings[0, 1:17], features[0]) and embeddings[1, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="1 <image> tokens but 0 images"):
        model.splice(ids)


def test_loss_is_cross_entropy_over_supervised_tokens(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    ids, pixels = ref.image_prompt(batch=1)
    labels = ids.clone()
    labels[0, :8] = -100
    loss = model.loss(ids, labels, pixels)
    logits = model(ids, pixels)[0]  # spliced: 27 positions; the text after the image starts at 3 + 16
    targets = ids[0, 8:]  # supervised ids; in the spliced sequence they sit at positions 8 + 15 ...
    predicted = logits[8 + 15 - 1: 27 - 1]
    expected = torch.nn.functional.cross_entropy(predicted, targets)
    assert abs(loss.item() - expected.item()) < 1e-5


def test_kv_cache_decoding_equals_uncached_forward(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    ids = torch.randint(1, 300, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model.llm(ids)
        cache = model.llm.make_cache(1, 20)
        steps = [model.llm(ids[:, :9], cache=cache)]  # prefill 9, then a chunk of 4, then one at a time
        steps.append(model.llm(ids[:, 9:13], start=9, cache=cache))
        steps += [model.llm(ids[:, t:t + 1], start=t, cache=cache) for t in range(13, 20)]
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_kv_cache_for_a_float32_model(folders, dtype):
    model = imp.Imp.from_pretrained(folders["current"])
    ids = torch.randint(1, 300, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model.llm(ids)
        cache = model.llm.make_cache(1, 20, dtype)
        assert cache[0].keys.dtype == cache[0].values.dtype == dtype
        steps = [model.llm(ids[:, :9], cache=cache)] + [model.llm(ids[:, t:t + 1], start=t, cache=cache)
                                                        for t in range(9, 20)]
    cached = torch.cat(steps, dim=1)
    assert cached.dtype == torch.float32
    # Rounding keys and values to 16 bits moves the logits a little (float16: 2^-11 relative, bfloat16: 2^-8),
    # but not nothing: the cache really is 16-bit.
    assert 0 < max_diff(cached, full) < (2e-3 if dtype == torch.float16 else 2e-2) * full.abs().max().item()
    input_ids, pixel_values = ref.image_prompt(batch=1)
    reference = list(model.generate(input_ids, pixel_values, max_new_tokens=10, stop_ids=[]))
    assert list(model.generate(input_ids, pixel_values, max_new_tokens=10, stop_ids=[], cache_dtype=dtype)) == reference


def test_generation_stops_with_a_clear_error_when_a_float16_cache_overflows(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    input_ids, pixel_values = ref.image_prompt(batch=1)
    assert len(list(model.generate(input_ids, pixel_values, max_new_tokens=3, stop_ids=[],
                                   cache_dtype=torch.float16))) == 3  # the keys fit float16 (max 65504) ...
    with torch.no_grad():
        model.llm.layers[0].self_attn.k_proj.bias.fill_(70000.0)  # ... and now they do not: inf keys, NaN logits
    with pytest.raises(imp.NotFiniteError, match="float16 KV cache"):
        list(model.generate(input_ids, pixel_values, max_new_tokens=3, stop_ids=[], cache_dtype=torch.float16))


def test_weights_that_are_not_finite_are_a_clear_error_not_an_empty_answer(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    with torch.no_grad():
        model.llm.lm_head.weight.fill_(float("nan"))
    for settings in (dict(), dict(temperature=1.0, seed=0)):  # greedy and sampled alike
        with pytest.raises(imp.NotFiniteError, match="not finite"):
            imp.answer(model, None, "Hello?", max_new_tokens=3, **settings)


def test_generation_greedy_is_deterministic_and_sampling_is_seeded(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    first = imp.answer(model, image, "What is in the picture?", max_new_tokens=12)
    assert first == imp.answer(model, image, "What is in the picture?", max_new_tokens=12)
    sampled = [imp.answer(model, image, "What is in the picture?", max_new_tokens=12, temperature=1.0, top_p=0.9,
                          top_k=50, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    # greedy equals the argmax of the reference logits, token by token
    input_ids, pixel_values = imp.prepare_inputs(model, image, "What is in the picture?")
    tokens = list(model.generate(input_ids, pixel_values, max_new_tokens=5, stop_ids=[]))
    with torch.no_grad():
        for n, token in enumerate(tokens):
            ids = torch.cat([input_ids, torch.tensor([tokens[:n]], dtype=torch.long)], dim=1)
            assert int(model(ids, pixel_values)[0, -1].argmax()) == token


def test_streamed_pieces_join_to_the_answer(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    pieces = list(imp.stream(model, None, "Tell me a story.", max_new_tokens=15))
    assert "".join(pieces).strip() == imp.answer(model, None, "Tell me a story.", max_new_tokens=15)


def test_text_only_and_history_prompts(folders):
    prompt = imp.build_prompt("And the second?", history=[("What is first?", "A circle.")])
    assert prompt == (imp.SYSTEM_PROMPT + " USER: <image>\nWhat is first? ASSISTANT: A circle.</s>"
                      "USER: And the second? ASSISTANT:")
    assert imp.build_prompt("Hi", with_image=False) == imp.SYSTEM_PROMPT + " USER: Hi ASSISTANT:"


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    assert imp.sample_next_token(logits) == 1
    draws = {imp.sample_next_token(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1, 2}
    draws = {imp.sample_next_token(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1}


def test_prompt_too_long_is_a_clear_error(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    model.config.max_length = 40
    with pytest.raises(imp.PromptTooLongError, match="context is 40 tokens"):
        imp.answer(model, Image.new("RGB", (20, 20)), "What is in the picture?")


def test_bfloat16_stays_close_to_float32(folders):
    ids, pixels = ref.image_prompt(seed=8)
    with torch.no_grad():
        full = imp.Imp.from_pretrained(folders["current"])(ids, pixels)
        half = imp.Imp.from_pretrained(folders["current"], dtype=torch.bfloat16)(ids, pixels)
    assert half.dtype == torch.float32  # logits are always float32
    # bf16 keeps 8 bits of mantissa: with these weights logits are O(1-10); stated tolerance 5% of their range
    assert max_diff(full, half) < 0.05 * full.abs().max().item()



# -- save / load ---------------------------------------------------------------------------------------------------

def test_save_pretrained_round_trip_in_official_layout(folders, tmp_path):
    model = imp.Imp.from_pretrained(folders["legacy"])
    model.save_pretrained(tmp_path / "out", max_shard_bytes=200_000)  # force sharding
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert "model.mm_projector.2.bias" in index["weight_map"]
    reloaded = imp.Imp.from_pretrained(str(tmp_path / "out"))
    ids, pixels = ref.image_prompt(seed=9)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels), reloaded(ids, pixels))
    assert reloaded.tokenizer.encode("USER: <image>\nHi</s>").ids == model.tokenizer.encode("USER: <image>\nHi</s>").ids
    # saving again unsharded removes the stale index and shards
    reloaded.save_pretrained(tmp_path / "out")
    assert sorted(f for f in os.listdir(tmp_path / "out") if "safetensors" in f) == ["model.safetensors"]


def test_lora_merge_equals_unmerged_and_is_idempotent(folders):
    model = imp.Imp.from_pretrained(folders["current"])
    wrapped = imp.add_lora(model.llm, rank=4, alpha=8, dropout=0.0)
    assert "lm_head" in wrapped and "layers.0.self_attn.q_proj" in wrapped
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    ids, pixels = ref.image_prompt(seed=10)
    with torch.no_grad():
        unmerged = model(ids, pixels)
        layer = model.llm.layers[0].self_attn.q_proj
        layer.merge(); layer.merge()  # twice: a no-op the second time
        assert max_diff(model(ids, pixels), unmerged) < 1e-5
        layer.unmerge(); layer.unmerge()
        imp.merge_lora(model)
        merged = model(ids, pixels)
    assert max_diff(merged, unmerged) < 1e-5
    assert not any("lora" in name for name in model.state_dict())


# -- broken checkpoints ----------------------------------------------------------------------------------------------

def copy(folders, tmp_path, layout="sharded"):
    target = tmp_path / layout
    shutil.copytree(folders[layout], target)
    return target


def test_missing_folder(tmp_path):
    with pytest.raises(imp.CheckpointError, match="no such model folder"):
        imp.Imp.from_pretrained(str(tmp_path / "nope"))


def test_missing_shard(folders, tmp_path):
    folder = copy(folders, tmp_path)
    os.remove(folder / "model-00002-of-00003.safetensors")
    with pytest.raises(imp.CheckpointError, match="missing shard.*00002"):
        imp.Imp.from_pretrained(str(folder))


def test_truncated_file(folders, tmp_path):
    folder = copy(folders, tmp_path, "current")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(imp.CheckpointError, match="not a readable safetensors file"):
        imp.Imp.from_pretrained(str(folder))


def test_wrong_shape_unknown_and_missing_tensors_are_named(parts, tmp_path):
    from safetensors.torch import save_file
    folder = ref.write_imp(str(tmp_path / "bad"), *parts)
    tensors = ref.imp_tensors(*parts)
    tensors["model.layers.1.mlp.fc1.weight"] = torch.zeros(7, 7)
    tensors["model.layers.0.surprise"] = torch.zeros(1)
    del tensors["model.final_layernorm.bias"]
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with pytest.raises(imp.CheckpointError) as error:
        imp.Imp.from_pretrained(folder)
    message = str(error.value)
    assert "model.layers.1.mlp.fc1.weight [7, 7] (expected [320, 160])" in message
    assert "unknown tensors: model.layers.0.surprise" in message
    assert "missing tensors: llm.final_layernorm.bias" in message


def test_unknown_layout_and_pickle_only(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text("{}")
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "odd" / "model.safetensors"))
    with pytest.raises(imp.CheckpointError, match="unknown checkpoint layout"):
        imp.Imp.from_pretrained(str(tmp_path / "odd"))
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text("{}")
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(imp.CheckpointError, match="safetensors only"):
        imp.Imp.from_pretrained(str(tmp_path / "pickle"))


def test_missing_tokenizer_and_bad_config(folders, tmp_path):
    folder = copy(folders, tmp_path, "current")
    for name in ("vocab.json", "merges.txt"):
        os.remove(folder / name)
    with pytest.raises(imp.CheckpointError, match="no tokenizer"):
        imp.Imp.from_pretrained(str(folder))
    (folder / "config.json").write_text("{}")
    with pytest.raises(imp.CheckpointError, match="config.json: not a valid imp config .KeyError: 'hidden_size'"):
        imp.Imp.from_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(imp.CheckpointError, match="config.json: not valid JSON"):
        imp.Imp.from_pretrained(str(folder))


def test_phi_folder_is_not_an_imp_folder(folders):
    with pytest.raises(imp.CheckpointError, match="phi-2 checkpoint, not an Imp one"):
        imp.Imp.from_pretrained(folders["phi"])


# -- configs -------------------------------------------------------------------------------------------------------

def test_config_reads_both_namings_with_official_defaults():
    current, legacy = imp.ImpConfig.from_dict(ref.imp_config()), imp.ImpConfig.from_dict(ref.imp_config(legacy=True))
    legacy.text.max_position_embeddings = current.text.max_position_embeddings  # legacy n_positions says 3072
    assert current.text == legacy.text
    assert current.text.rotary_dim == 32 and current.vision.num_layers_kept == 2
    default = imp.ImpConfig()
    assert (default.vision.num_patches, default.vision.num_layers_kept, default.text.head_dim) == (729, 26, 80)
    assert imp.VisionConfig(image_size=196).num_patches == 196
    round_trip = imp.ImpConfig.from_dict(json.loads(json.dumps(default.to_dict())))
    assert round_trip == default
