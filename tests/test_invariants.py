"""Invariants that small slips (a position off by one, a scale, a mask, a branch) break, each checked against an
independent computation rather than against the code itself: uncached forwards, transformers' reference models,
LoRA written out by hand, exact softmax probabilities, losses of rows computed alone. Tiny random models, float32."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

import imp
import reference as ref
import train

TOLERANCE = 1e-4  # max abs logit difference in float32 (observed: ~1e-6)


@pytest.fixture(scope="module")
def model(folders):
    return imp.Imp.from_pretrained(folders["current"])


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def text_ids(batch=2, length=14, seed=0):
    return torch.randint(1, ref.EOS, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- 1. cached decoding at the right positions ---------------------------------------------------------------------

def chunk_schedules(length, prompt_length):
    """Ways to feed `length` positions through the cache: the whole prompt then one token at a time; the prompt in
    chunks of 5, 3, 4 (and the rest) then one at a time; every position alone."""
    tail = [1] * (length - prompt_length)
    chunks = [5, 3, 4, prompt_length - 12]
    return {"prefill": [prompt_length] + tail, "chunks": [n for n in chunks if n > 0] + tail, "single": [1] * length}


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("schedule", ["prefill", "chunks", "single"])
@pytest.mark.parametrize("last_only", [False, True], ids=["all-rows", "last-only"])
def test_cached_logits_equal_uncached_forward_at_every_step(model, with_image, schedule, last_only):
    if with_image:
        ids, pixels = ref.image_prompt(seed=1)  # <image> at 3: 12 - 1 + 16 = 27 spliced positions
        embeddings, _ = model.splice(ids, model.encode_images(pixels).detach())
    else:
        embeddings = model.llm.embed_tokens(text_ids(length=20, seed=1)).detach()
    length = embeddings.shape[1]  # (B, T, C)
    steps = chunk_schedules(length, prompt_length=length - 6)[schedule]
    assert sum(steps) == length
    with torch.no_grad():
        full = model.llm(inputs_embeds=embeddings)  # (B, T, V): no cache
        cache = model.llm.make_cache(embeddings.shape[0], length + 5)  # longer than used, as in generate
        start = 0
        for n in steps:
            got = model.llm(inputs_embeds=embeddings[:, start:start + n], start=start, cache=cache,
                            last_only=last_only)
            expected = full[:, start + n - 1:start + n] if last_only else full[:, start:start + n]
            assert got.shape == expected.shape, (schedule, start, n)
            assert max_diff(got, expected) <= TOLERANCE, (schedule, start, n)
            start += n


def test_cached_decoding_by_token_ids_equals_uncached_forward(model):
    """The decode step of generate: token ids, not embeddings, at start = position, after an embedding prefill."""
    ids = text_ids(batch=1, length=16, seed=2)
    with torch.no_grad():
        full = model.llm(ids)
        cache = model.llm.make_cache(1, 20)
        prefill = model.llm(inputs_embeds=model.llm.embed_tokens(ids[:, :10]), cache=cache, last_only=True)
        assert max_diff(prefill[:, -1], full[:, 9]) <= TOLERANCE
        for t in range(10, 16):
            step = model.llm(input_ids=ids[:, t:t + 1], start=t, cache=cache, last_only=True)
            assert max_diff(step[:, -1], full[:, t]) <= TOLERANCE, t


def uncached_greedy(model, input_ids, pixel_values, steps, stop_ids=()):
    """Greedy tokens and their logits, each from a full forward over prompt + tokens so far (no cache)."""
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([input_ids, torch.tensor([tokens], dtype=torch.long)], dim=1)
            last = model(ids, pixel_values)[0, -1]  # (V,)
            token = int(last.argmax())
            if token in stop_ids:
                break
            tokens.append(token)
            logits.append(last)
    return tokens, logits


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_generate_yields_the_argmax_of_uncached_forwards(model, with_image):
    if with_image:
        input_ids, pixel_values = ref.image_prompt(batch=1, seed=3)
    else:
        input_ids, pixel_values = text_ids(batch=1, length=9, seed=3), None
    recorded = []  # the logits generate computes (prefill, then each decode step), seen by a hook on the LLM
    handle = model.llm.register_forward_hook(lambda module, args, output: recorded.append(output[0, -1].clone()))
    try:
        tokens = list(model.generate(input_ids, pixel_values, max_new_tokens=16, temperature=0.0, stop_ids=[]))
    finally:
        handle.remove()
    expected_tokens, expected_logits = uncached_greedy(model, input_ids, pixel_values, 16)
    assert tokens == expected_tokens
    assert len(recorded) == 16  # a prefill and 15 decode steps: none for a successor of the last token
    for step, (got, expected) in enumerate(zip(recorded, expected_logits)):
        assert max_diff(got, expected) <= TOLERANCE, step


# -- 2. the same numbers with autograd on and off ----------------------------------------------------------------

GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_phi2_matches_transformers_with_and_without_autograd(parts, folders, mode):
    phi = parts[0]
    ours = imp.Phi2.from_pretrained(folders["phi"])
    ids = torch.randint(0, ref.PHI["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = phi(ids).logits
    with GRAD_MODES[mode]():
        got = ours(ids)
    assert got.requires_grad == (mode == "grad")  # the parameters require grad: autograd really ran
    assert max_diff(got, expected) <= TOLERANCE


def test_phi2_gradients_match_transformers(parts, folders):
    """Autograd through the grad-enabled MLP path: d(sum of logits)/d(input embeddings) equals the reference's."""
    phi = parts[0]
    ours = imp.Phi2.from_pretrained(folders["phi"])
    embeddings = torch.randn(2, 11, ref.PHI["hidden_size"], generator=torch.Generator().manual_seed(5))
    theirs_in, ours_in = embeddings.clone().requires_grad_(True), embeddings.clone().requires_grad_(True)
    weights = torch.randn(2, 11, ref.PHI["vocab_size"], generator=torch.Generator().manual_seed(6))
    (phi(inputs_embeds=theirs_in).logits * weights).sum().backward()
    (ours(inputs_embeds=ours_in) * weights).sum().backward()
    assert theirs_in.grad.abs().max() > 0
    assert max_diff(ours_in.grad, theirs_in.grad) <= TOLERANCE * theirs_in.grad.abs().max().item()
    fc1_ours, fc1_theirs = ours.layers[1].mlp.fc1.weight.grad, phi.model.layers[1].mlp.fc1.weight.grad
    assert max_diff(fc1_ours, fc1_theirs) <= TOLERANCE * fc1_theirs.abs().max().item()
    phi.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_siglip_matches_transformers_with_and_without_autograd(parts, folders, mode):
    siglip = parts[1]
    ours = imp.SigLIP.from_pretrained(folders["siglip"])
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        expected = siglip(pixels, output_hidden_states=True).hidden_states[-2]
    with GRAD_MODES[mode]():
        got = ours(pixels.clone().requires_grad_(mode == "grad"))
    assert got.requires_grad == (mode == "grad")
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_imp_matches_reference_with_and_without_autograd(parts, folders, mode):
    model = imp.Imp.from_pretrained(folders["current"])
    ids, pixels = ref.image_prompt(seed=8)
    expected = ref.reference_imp_logits(*parts, ids, pixels)
    with GRAD_MODES[mode]():
        got = model(ids, pixels.clone().requires_grad_(mode == "grad"))
    assert got.requires_grad == (mode == "grad")
    assert max_diff(got, expected) <= TOLERANCE


# -- 3. LoRA: (alpha / rank) B A, by hand --------------------------------------------------------------------------

def random_lora(rank=4, alpha=12.0, seed=9):
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(24, 10)
    with torch.no_grad():
        base.weight.copy_(torch.randn(10, 24, generator=generator) * 0.3)
        base.bias.copy_(torch.randn(10, generator=generator))
    layer = imp.LoRALinear(base, rank=rank, alpha=alpha, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(10, rank, generator=generator))  # non-zero: the update shows
    return layer, torch.randn(3, 5, 24, generator=generator)  # layer, x (B, T, in)


def test_lora_output_is_base_plus_alpha_over_rank_times_BA():
    rank, alpha = 4, 12.0  # scale 3: neither 1 nor alpha
    layer, x = random_lora(rank, alpha)
    W, b, A, B = (t.detach().clone() for t in (layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B))
    expected = x @ W.T + b + (alpha / rank) * (x @ A.T @ B.T)
    for training in (True, False):  # dropout 0: train and eval modes give the same numbers
        layer.train(training)
        with torch.no_grad():
            assert max_diff(layer(x), expected) <= 1e-5
    assert max_diff(expected, x @ W.T + b) > 1.0  # the update is not negligible


def test_lora_merge_folds_the_hand_merged_weight_and_unmerge_restores_it():
    rank, alpha = 4, 12.0
    layer, x = random_lora(rank, alpha, seed=10)
    W, b, A, B = (t.detach().clone() for t in (layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B))
    merged_weight = W + (alpha / rank) * B @ A
    layer.merge()
    assert max_diff(layer.base.weight, merged_weight) <= 1e-5
    with torch.no_grad():
        assert max_diff(layer(x), x @ merged_weight.T + b) <= 1e-5
    layer.merge()  # idempotent
    assert max_diff(layer.base.weight, merged_weight) <= 1e-5
    layer.unmerge()
    eps = torch.finfo(torch.float32).eps * (W.abs().max() + (alpha / rank) * (B @ A).abs().max()).item() * 4
    assert max_diff(layer.base.weight, W) <= eps
    layer.unmerge()
    assert max_diff(layer.base.weight, W) <= eps


def test_add_lora_passes_rank_and_alpha_to_every_layer(model):
    llm = copy.deepcopy(model.llm)
    rank, alpha = 2, 10.0
    imp.add_lora(llm, rank=rank, alpha=alpha, dropout=0.0)
    layer = llm.layers[0].mlp.fc1
    assert isinstance(layer, imp.LoRALinear) and tuple(layer.lora_A.shape) == (rank, ref.PHI["hidden_size"])
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(11))
    x = torch.randn(2, 3, ref.PHI["hidden_size"], generator=torch.Generator().manual_seed(12))
    W, b = layer.base.weight, layer.base.bias
    with torch.no_grad():
        expected = x @ W.T + b + (alpha / rank) * (x @ layer.lora_A.T @ layer.lora_B.T)
        assert max_diff(layer(x), expected) <= 1e-4


# -- 4. sampling ---------------------------------------------------------------------------------------------------

def frequencies(logits, draws=2000, seed=0, **settings):
    generator = torch.Generator().manual_seed(seed)
    counts = np.bincount([imp.sample_next_token(logits, generator=generator, **settings) for _ in range(draws)],
                         minlength=logits.numel())
    return counts / draws


def test_temperature_shapes_the_draw_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0])
    # 2000 draws: a frequency's standard deviation is at most 0.011; 0.04 is ~3.5 of them
    observed = {T: frequencies(logits, temperature=T) for T in (0.5, 1.0, 2.0)}
    for T, frequency in observed.items():
        exact = torch.softmax(logits / T, dim=-1).numpy()
        assert np.abs(frequency - exact).max() < 0.04, (T, frequency, exact)
    # softmax(l / 0.5) = [0.87, 0.12, 0.02]; softmax(l / 2) = [0.51, 0.31, 0.19]
    assert np.abs(observed[0.5] - observed[2.0]).max() > 0.25


def test_temperature_zero_is_argmax_whatever_the_filters():
    generator = torch.Generator().manual_seed(13)
    for _ in range(20):
        logits = torch.randn(50, generator=generator)
        best = int(logits.argmax())
        assert imp.sample_next_token(logits) == best
        assert imp.sample_next_token(logits, 0.0, top_k=5, top_p=0.3, generator=torch.Generator()) == best


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.tensor([0.2, 1.0, -3.0, 0.5, 0.4])  # order 1, 3, 4, 0, 2; the 3rd (id 4) is as likely as the 2nd
    for k, allowed in ((1, {1}), (2, {1, 3}), (3, {1, 3, 4})):
        frequency = frequencies(logits, draws=600, temperature=1.0, top_k=k)
        assert set(np.flatnonzero(frequency)) == allowed, (k, frequency)


def test_top_p_boundary_is_the_mass_of_strictly_more_likely_tokens():
    """A token stays while the probability of the tokens more likely than it is below top_p: the smallest set whose
    mass reaches top_p. Probabilities 0.5, 0.3, 0.2 (exact in float32: the masses before are 0, 0.5, 0.8)."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    probabilities = torch.softmax(logits, dim=-1)
    assert (probabilities.cumsum(-1) - probabilities)[1].item() == 0.5
    cases = {0.3: {0}, 0.5: {0}, 0.51: {0, 1}, 0.6: {0, 1}, 0.8: {0, 1}, 0.81: {0, 1, 2}, 1.0: {0, 1, 2}}
    for top_p, allowed in cases.items():
        frequency = frequencies(logits, draws=600, temperature=1.0, top_p=top_p)
        assert set(np.flatnonzero(frequency)) == allowed, (top_p, frequency)
    # inside the nucleus the kept tokens are renormalised: 0.5 : 0.3 -> 0.625, 0.375
    frequency = frequencies(logits, draws=2000, temperature=1.0, top_p=0.6)
    assert np.abs(frequency - np.array([0.625, 0.375, 0.0])).max() < 0.04
    # the same in another vocabulary order: the filter works by probability, and maps back to the token ids
    shuffled = logits[[2, 0, 1]]  # ids 0, 1, 2 now have 0.2, 0.5, 0.3
    for top_p, allowed in ((0.5, {1}), (0.6, {1, 2}), (0.81, {0, 1, 2})):
        frequency = frequencies(shuffled, draws=600, temperature=1.0, top_p=top_p)
        assert set(np.flatnonzero(frequency)) == allowed, (top_p, frequency)


def test_top_p_with_equal_probabilities_keeps_exactly_the_nucleus():
    logits = torch.zeros(4)  # 0.25 each, exact: masses before are 0, 0.25, 0.5, 0.75
    for top_p, size in ((0.25, 1), (0.5, 2), (0.50001, 3), (0.75, 3), (0.9, 4)):
        frequency = frequencies(logits, draws=400, temperature=1.0, top_p=top_p)
        assert np.count_nonzero(frequency) == size, (top_p, frequency)


def test_a_seed_reproduces_the_draws_and_another_seed_changes_them():
    logits = torch.zeros(10)  # uniform: 40 draws from two seeds agree by chance with probability 1e-40
    draw = lambda seed: [imp.sample_next_token(logits, 1.0, generator=generator)
                         for generator in [torch.Generator().manual_seed(seed)] for _ in range(40)]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert len(set(draw(1))) > 3


def test_generate_with_a_seed_reproduces_and_another_seed_differs(model):
    input_ids = text_ids(batch=1, length=8, seed=14)
    run = lambda seed: list(model.generate(input_ids, max_new_tokens=12, temperature=2.0, seed=seed, stop_ids=[]))
    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert first != uncached_greedy(model, input_ids, None, 12)[0]  # temperature 2 is not greedy


# -- 5. a padded batch is the weighted mean of its rows -----------------------------------------------------------

@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """(ids, labels, image path or None) rows as train.load_dataset makes them: different lengths, the prompt
    (and the <image>) masked with IGNORE_INDEX."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(15)
    rows = []
    for n, (length, prompt, with_image) in enumerate(((9, 3, True), (15, 5, False), (6, 2, True), (12, 4, False))):
        ids = [int(t) for t in rng.integers(1, ref.EOS, length)]
        image = None
        if with_image:
            ids[1] = ref.IMAGE_TOKEN
            image = str(folder / f"image{n}.png")
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
        labels = [imp.IGNORE_INDEX] * prompt + ids[prompt:]
        rows.append((ids, labels, image))
    return rows


def supervised_positions(sample):
    """The label positions a row's loss averages over: every label but the first (nothing predicts it)."""
    return sum(label != imp.IGNORE_INDEX for label in sample[1][1:])


def row_loss(model, sample):
    input_ids, labels, pixel_values, _ = train.collate([sample], model.config, "cpu")
    with torch.no_grad():
        return model.loss(input_ids, labels, pixel_values).item()


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3], [0, 2], [1, 0]], ids=["mixed", "text", "images", "pair"])
def test_padded_batch_loss_is_the_token_weighted_mean_of_its_rows(model, samples, rows):
    batch = [samples[i] for i in rows]
    input_ids, labels, pixel_values, positions = train.collate(batch, model.config, "cpu")
    assert positions == sum(len(s[0]) + (s[2] is not None) * (16 - 1) for s in batch)  # 16 patches per image
    with torch.no_grad():
        loss = train.TrainingLoss(model)(input_ids, labels, pixel_values).item()
    weights = [supervised_positions(s) for s in batch]
    expected = sum(w * row_loss(model, s) for w, s in zip(weights, batch)) / sum(weights)
    assert abs(loss - expected) <= 1e-5 * max(1.0, expected)


def test_padding_content_and_pad_id_do_not_change_the_loss(model, samples):
    batch = [samples[i] for i in (0, 1, 2)]
    input_ids, labels, pixel_values, _ = train.collate(batch, model.config, "cpu")
    with torch.no_grad():
        loss = model.loss(input_ids, labels, pixel_values).item()
        other_pad = copy.deepcopy(model.config)
        other_pad.pad_token_id = 7
        ids_7, labels_7, _, _ = train.collate(batch, other_pad, "cpu")
        assert not torch.equal(ids_7, input_ids)  # the padding really changed
        assert abs(model.loss(ids_7, labels_7, pixel_values).item() - loss) <= 1e-6
        noisy = input_ids.clone()
        padded = torch.arange(input_ids.shape[1])[None] >= torch.tensor([[len(s[0])] for s in batch])  # (B, T)
        assert padded.any()
        noisy[padded] = torch.randint(1, ref.EOS, (int(padded.sum()),), generator=torch.Generator().manual_seed(16))
        assert abs(model.loss(noisy, labels, pixel_values).item() - loss) <= 1e-6
        changed = input_ids.clone()
        changed[1, 10] = (changed[1, 10] + 1) % ref.EOS  # a supervised position: the loss must move
        assert abs(model.loss(changed, labels, pixel_values).item() - loss) > 1e-4


def test_collate_masks_padding_labels_and_pads_ids_right(model, samples):
    batch = [samples[0], samples[1]]
    input_ids, labels, pixel_values, _ = train.collate(batch, model.config, "cpu")
    length = len(samples[0][0])
    assert input_ids[0, :length].tolist() == samples[0][0] and labels[0, :length].tolist() == samples[0][1]
    assert (input_ids[0, length:] == model.config.pad_token_id).all()
    assert (labels[0, length:] == imp.IGNORE_INDEX).all()
    assert pixel_values.shape == (1, 3, 56, 56)  # only the first row has an image


# -- 6. generated text against independent decoding -----------------------------------------------------------------

@pytest.fixture(scope="module")
def readable_model(model):
    """The random model with every token that does not decode to printable ASCII pushed out of reach (lm_head bias
    -100), so that its greedy answer is varied, readable text: a token lost or repeated changes the string."""
    readable = copy.deepcopy(model)
    with torch.no_grad():
        for token in range(ref.PHI["vocab_size"]):
            text = model.tokenizer.decode([token], skip_special_tokens=True)
            if not (text and text.isascii() and text.isprintable()):
                readable.llm.lm_head.bias[token] -= 100.0
    return readable


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_streamed_text_is_the_decoded_greedy_tokens_of_uncached_forwards(readable_model, with_image):
    model = readable_model
    image = Image.fromarray(np.random.default_rng(17).integers(0, 255, (40, 50, 3), dtype=np.uint8)) \
        if with_image else None
    question = "What is in the picture?"
    pieces = list(imp.stream(model, image, question, max_new_tokens=15))
    input_ids, pixel_values = imp.prepare_inputs(model, image, question)
    tokens, _ = uncached_greedy(model, input_ids, pixel_values, 15, stop_ids={model.config.eos_token_id})
    expected = model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(tokens) == 15 and len(set(tokens)) >= 3 and len(expected.strip()) >= 10  # varied text
    assert "".join(pieces) == expected.lstrip()
    assert imp.answer(model, image, question, max_new_tokens=15) == expected.strip()
