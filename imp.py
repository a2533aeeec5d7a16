"""
nanoImp: the whole Imp model in one file.

Imp (Shao et al., 2024, "Imp: Highly Capable Large Multimodal Models for Mobile Devices", arXiv 2405.12107)
is a LLaVA-style multimodal model. Imp-3B is

    image --> SigLIP-SO400M/14@384 (26 of its 27 layers) --> 2-layer MLP connector --> spliced into the prompt
          --> Phi-2 (2.7B) --> answer tokens

Read this file top to bottom, or in the order of README.md's "Reading order"; it is ordered leaves first, the whole
model last (like nanoGPT):
  1. configs           VisionConfig, PhiConfig, ImpConfig (official Imp-3B numbers as defaults)
  2. shared pieces     attention(), rotary embedding, KV cache
  3. SigLIP            the vision tower (paper section 4.1, "visual encoder")
  4. Connector         Linear -> GELU -> Linear (paper section 4.1)
  5. Phi-2             the language model (5b: the Llama-style decoder of Imp-2B, Qwen1.5, and Imp-4B, Phi-3-mini)
  6. LoRA              low-rank adapters for stage-2 training (paper section 4.2)
  7. Imp               splicing image features into the text, the training loss, prefill and decode steps
  8. preprocessing     image loading and the official image processor
  9. prompt, tokenizer the conversation templates (phi2, qwen2, phi3) and the tokenizers
 10. asking            a question and an image in, the answer out as text
 11. checkpoint I/O    one explicit key table per official layout, streamed tensor by tensor

This file is the readable path only: plain nn.Linear, F.gelu, one attention switch (the fused kernel or the
written-out softmax). The CPU speed paths (packed int8/int4 kernels, bfloat16 single-row products, in-place
activations) live in kernels.py, which the programs switch on with kernels.enable(model); every one of them is
pinned to this file's numbers by a test.

Numbers and behaviours cited as "official" come from the MILVLG/imp training code and the Hugging Face releases
(MILVLG/imp-v1-3b, MILVLG/Imp-v1.5-3B-Phi2); see README.md for the map from the paper's sections to this code.
"""

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

# ----------------------------------------------------------------------------------------------------------------
# 1. Configs: one dataclass per component, official Imp-3B numbers as defaults.


@dataclass
class VisionConfig:
    """SigLIP-SO400M/14@384, as Imp uses it."""
    hidden_size: int = 1152        # "SO400M": the shape-optimised ViT of Alabdulmohsin et al.
    intermediate_size: int = 4304  # MLP width (not 4x: another result of that shape search)
    num_hidden_layers: int = 27    # layers in the SigLIP checkpoint; Imp keeps 26 of them (see select_layer)
    num_attention_heads: int = 16  # head_dim = 1152 / 16 = 72
    image_size: int = 384          # 384 / 14 = 27 patches per side -> 729 image tokens (196 px -> 14 x 14 = 196)
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    select_layer: int = -2         # Imp (like LLaVA) feeds the output of the penultimate layer to the connector

    @property
    def num_layers_kept(self) -> int:
        # hidden_states[-2] is the output of layer num_hidden_layers - 2, so layers 0 .. num_hidden_layers - 2 run.
        return self.num_hidden_layers + self.select_layer + 1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, select_layer: int = -2) -> "VisionConfig":
        d = d.get("vision_config", d)  # a whole SiglipModel config nests the vision part
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and k != "select_layer"}, select_layer=select_layer)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "select_layer"}
        d.update(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", attention_dropout=0.0)
        return d


@dataclass
class PhiConfig:
    """Phi-2 (2.7B)."""
    vocab_size: int = 51200        # 50257 GPT-2/CodeGen tokens + added ones, padded to a multiple of 64
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # head_dim = 2560 / 32 = 80
    rotary_dim: int = 32           # partial rotary: only the first 32 of the 80 head dims rotate (factor 0.4)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048  # Phi-2's pretraining context; Imp trains at 3072 (ImpConfig.max_length)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "PhiConfig":
        """Reads both namings: current transformers (hidden_size, ...) and legacy phi-msft (n_embd, ...)."""
        if "n_embd" in d and "hidden_size" not in d:  # legacy "MixFormer" config of the first Imp releases
            hidden = d["n_embd"]
            return cls(vocab_size=d.get("vocab_size", 51200), hidden_size=hidden,
                       intermediate_size=d.get("n_inner") or 4 * hidden, num_hidden_layers=d["n_layer"],
                       num_attention_heads=d["n_head"], rotary_dim=d.get("rotary_dim", 32),
                       rope_theta=d.get("rope_theta", 10000.0), layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       max_position_embeddings=d.get("n_positions", 2048))
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        rope = {**d, **(d.get("rope_parameters") or {})}  # transformers >= 5 nests the rotary settings
        return cls(vocab_size=d.get("vocab_size", 51200), hidden_size=hidden,
                   intermediate_size=d.get("intermediate_size") or 4 * hidden,
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
                   rotary_dim=int(round(rope.get("partial_rotary_factor", 0.5) * (hidden // heads))),
                   rope_theta=rope.get("rope_theta", 10000.0), layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                   max_position_embeddings=d.get("max_position_embeddings", 2048))

    def to_dict(self) -> dict:
        """Current transformers naming (what microsoft/phi-2 and the current Imp releases use)."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                    num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
                    partial_rotary_factor=self.rotary_dim / self.head_dim, rope_theta=self.rope_theta,
                    layer_norm_eps=self.layer_norm_eps, max_position_embeddings=self.max_position_embeddings,
                    hidden_act="gelu_new", qk_layernorm=False, tie_word_embeddings=False,
                    resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0)


@dataclass
class LlamaConfig:
    """The pre-norm "Llama-style" decoders of the other two Imp members (paper section 4.1): Qwen1.5-1.8B (Imp-2B,
    family "qwen2", these defaults) and Phi-3-mini-4k (Imp-4B, family "phi3", LlamaConfig.phi3()). One block
    serves both; the fields below are where they differ."""
    family: str = "qwen2"            # "qwen2" or "phi3": the checkpoint naming, the tokenizer and the template
    vocab_size: int = 151936         # Qwen1.5: 151646 real ids padded to a multiple of 128; Phi-3: 32064
    hidden_size: int = 2048
    intermediate_size: int = 5504    # SwiGLU width (Phi-3: 8192)
    num_hidden_layers: int = 24
    num_attention_heads: int = 16    # head_dim = 2048 / 16 = 128 (Phi-3: 3072 / 32 = 96)
    num_key_value_heads: int = 16    # no grouped-query attention in either member
    attention_bias: bool = True      # Qwen's q, k, v projections have a bias (o_proj never); Phi-3's have none
    rms_norm_eps: float = 1e-6       # Phi-3: 1e-5
    rope_theta: float = 1e6          # Qwen1.5: 1,000,000; Phi-3: 10,000. Both rotate the whole head
    max_position_embeddings: int = 32768
    sliding_window: int | None = None  # Phi-3: 2047. A query sees itself and the sliding_window - 1 keys before it
                                       # (transformers' mask, kv > q - window); see LlamaAttention

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:  # full rotary, where Phi-2 rotates 32 of 80 dims
        return self.head_dim

    @classmethod
    def phi3(cls, **changes) -> "LlamaConfig":
        """Phi-3-mini-4k-instruct (Imp-4B's decoder)."""
        return cls(**dict(dict(family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               attention_bias=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                               max_position_embeddings=4096, sliding_window=2047), **changes))

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """A Qwen2 / Phi-3 config.json (transformers naming), or an Imp-2B / Imp-4B one (model_type imp_qwen2 /
        imp_phi3, the same fields). Qwen's sliding_window is only used with use_sliding_window (false in Imp-2B)."""
        family = config_family(d)
        rope = {**d, **(d.get("rope_parameters") or {})}  # transformers >= 5 nests the rotary settings
        if (d.get("rope_scaling") or {}).get("type", "default") not in ("default", None):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported (Phi-3-mini-4k has none)")
        window = d.get("sliding_window") if (family == "phi3" or d.get("use_sliding_window")) else None
        base = cls() if family == "qwen2" else cls.phi3()
        heads = d["num_attention_heads"]
        return cls(family=family, vocab_size=d.get("vocab_size", base.vocab_size), hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                   attention_bias=family == "qwen2", rms_norm_eps=d.get("rms_norm_eps", base.rms_norm_eps),
                   rope_theta=rope.get("rope_theta", base.rope_theta),
                   max_position_embeddings=d.get("max_position_embeddings", base.max_position_embeddings),
                   sliding_window=window)

    def to_dict(self) -> dict:
        """transformers naming (Qwen2Config / Phi3Config fields)."""
        d = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
                 rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
                 hidden_act="silu", tie_word_embeddings=False, attention_dropout=0.0)
        if self.family == "qwen2":
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window or 32768)
        else:
            d.update(sliding_window=self.sliding_window, rope_scaling=None, resid_pdrop=0.0, embd_pdrop=0.0,
                     original_max_position_embeddings=self.max_position_embeddings)
        return d


def config_family(d: dict) -> str:
    """"phi2", "qwen2" or "phi3" from a config.json: its model_type or architectures (imp_qwen2 / ImpQwen2ForCausalLM
    for Imp-2B, imp_phi3 / ImpPhi3ForCausalLM for Imp-4B; "imp", "phi", "phi-msft" are Phi-2)."""
    names = " ".join([str(d.get("model_type", ""))] + [str(a) for a in d.get("architectures") or []]).lower()
    if "qwen2" in names:
        return "qwen2"
    if "phi3" in names:
        return "phi3"
    return "phi2"


@dataclass
class ImpConfig:
    """The whole model: a vision tower, a connector, a language model, and the token ids that glue them."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: PhiConfig | LlamaConfig = field(default_factory=PhiConfig)  # Phi-2 (Imp-3B), or Qwen1.5 / Phi-3
    image_token_index: int = 50296   # id of "<image>"; that one position is replaced by the image features
    eos_token_id: int = 50295        # "</s>", added by Imp as the end of every assistant turn
    pad_token_id: int = 50256        # "<|endoftext|>", Phi-2's bos/unk, used as padding in training
    image_aspect_ratio: str = "square"  # "square": squash to size x size; "pad": pad to a square first
    max_length: int = 3072           # Imp's tokenizer_model_max_length: the longest spliced sequence it trains on

    @classmethod
    def from_dict(cls, d: dict) -> "ImpConfig":
        select = d.get("mm_vision_select_layer", -2)
        if "vision_tower_config" in d:
            vision = VisionConfig.from_dict(d["vision_tower_config"], select_layer=select)
        else:  # some legacy configs only name the tower; the 196-px variant says so in the name
            tower = str(d.get("mm_vision_tower", ""))
            vision = VisionConfig(image_size=196 if "196" in tower else 384, select_layer=select)
        if config_family(d) != "phi2":
            return cls.from_dict_llama(d, vision)
        text = PhiConfig.from_dict(d)
        return cls(vision=vision, text=text, image_token_index=d.get("image_token_index", 50296),
                   eos_token_id=d.get("eos_token_id", 50295), pad_token_id=d.get("pad_token_id", 50256),
                   image_aspect_ratio=d.get("image_aspect_ratio", "square"),
                   max_length=d.get("tokenizer_model_max_length", d.get("n_positions", 3072)))

    @classmethod
    def from_dict_llama(cls, d: dict, vision: VisionConfig) -> "ImpConfig":
        """Imp-2B / Imp-4B config.json. Missing ids take the releases' values (FAMILY_DEFAULTS): the 2B config has
        no pad_token_id, the 4B one may have no image_token_index."""
        text = LlamaConfig.from_dict(d)
        defaults = FAMILY_DEFAULTS[text.family]
        get = lambda key, name: d[key] if d.get(key) is not None else defaults[name]
        return cls(vision=vision, text=text, image_token_index=get("image_token_index", "image_token_index"),
                   eos_token_id=get("eos_token_id", "eos_token_id"), pad_token_id=get("pad_token_id", "pad_token_id"),
                   image_aspect_ratio=get("image_aspect_ratio", "image_aspect_ratio"),
                   max_length=get("tokenizer_model_max_length", "max_length"))

    @property
    def template(self) -> str:
        """The conversation template of this member: "phi2" (Imp-3B), "qwen2" (Imp-2B) or "phi3" (Imp-4B)."""
        return "phi2" if isinstance(self.text, PhiConfig) else self.text.family

    def to_dict(self) -> dict:
        """config.json in the current official Imp naming (MILVLG/imp-v1-3b main; Imp-v1.5-2B-Qwen1.5, -4B-Phi3)."""
        if self.template != "phi2":
            return self.to_dict_llama()
        d = dict(architectures=["ImpForCausalLM"], model_type="imp", **self.text.to_dict())
        d.update(mm_hidden_size=self.vision.hidden_size, mm_projector_type="mlp2x_gelu",
                 mm_vision_select_layer=self.vision.select_layer, mm_vision_select_feature="patch",
                 mm_vision_tower=f"google/siglip-so400m-patch14-{self.vision.image_size}",
                 vision_tower_config=self.vision.to_dict(), image_token_index=self.image_token_index,
                 image_token="<image>", eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                 bos_token_id=self.pad_token_id, image_aspect_ratio=self.image_aspect_ratio,
                 tokenizer_model_max_length=self.max_length, use_cache=True)
        return d

    def to_dict_llama(self) -> dict:
        architecture, model_type = {"qwen2": ("ImpQwen2ForCausalLM", "imp_qwen2"),
                                    "phi3": ("ImpPhi3ForCausalLM", "imp_phi3")}[self.text.family]
        d = dict(architectures=[architecture], model_type=model_type, **self.text.to_dict())
        d.update(mm_hidden_size=self.vision.hidden_size, mm_projector_type="mlp2x_gelu",
                 mm_vision_select_layer=self.vision.select_layer, mm_vision_select_feature="patch",
                 mm_vision_tower=f"google/siglip-so400m-patch14-{self.vision.image_size}",
                 vision_tower_config=self.vision.to_dict(), image_token_index=self.image_token_index,
                 image_token="<image>", eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                 bos_token_id=FAMILY_DEFAULTS[self.text.family]["bos_token_id"],
                 image_aspect_ratio=self.image_aspect_ratio, tokenizer_model_max_length=self.max_length,
                 tokenizer_padding_side="right", use_cache=True)
        return d


# What the Imp-2B / Imp-4B releases use where their config.json says nothing. bos: Qwen never adds one (its
# 151643 is <|endoftext|>); Phi-3's SentencePiece vocabulary starts every prompt with <s> = 1.
FAMILY_DEFAULTS = {
    "qwen2": dict(image_token_index=151646,  # the first id after Qwen's 151646 real ones (config.json says so)
                  eos_token_id=151645, pad_token_id=151643, bos_token_id=151643,  # <|im_end|>, <|endoftext|>
                  image_aspect_ratio="square", max_length=2560),
    "phi3": dict(image_token_index=32011,    # the first id after Phi-3's added tokens 32000 .. 32010
                 eos_token_id=32007, pad_token_id=32000, bos_token_id=1,  # <|end|>, <|endoftext|>, <s>
                 image_aspect_ratio="pad", max_length=2560),
}


# ----------------------------------------------------------------------------------------------------------------
# 2. Shared pieces: attention, rotary position embedding, KV cache.


# The fused kernel (scaled_dot_product_attention) is the fast path; `attention_reference` below is the readable one.
# tests/test_imp.py pins them equal. Set to False to run (and step through) the readable path everywhere.
USE_FUSED_ATTENTION = hasattr(F, "scaled_dot_product_attention")


def attention_reference(q, k, v, causal: bool, window: int | None = None):
    """softmax(q k^T / sqrt(d)) v, written out. q: (B, H, Tq, D); k, v: (B, H, Tk, D) -> (B, H, Tq, D).

    Like the official Phi-2 code, q and k are upcast to float32 before the product and the softmax runs in
    float32, so 16-bit models do not overflow; the probabilities are cast back to v's dtype for the product with v.
    """
    return attention_probabilities(q, k, causal, window).to(v.dtype) @ v


def attention_probabilities(q, k, causal: bool, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32: (B, H, Tq, Tk). Row i is how query i shares its attention among the
    keys (each row sums to 1); with `causal`, query i sees only keys up to its own position."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device, window), float("-inf"))
    return torch.softmax(scores, dim=-1)


def causal_mask(query_len: int, key_len: int, device, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) boolean, True where query i may look at key j. Queries are the *last* Tq positions of the keys
    (with a KV cache the keys include earlier tokens), so the diagonal is shifted by Tk - Tq. With a sliding
    `window` (Phi-3), a query also sees only the `window` most recent keys, itself included."""
    mask = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(diagonal=key_len - query_len)
    return mask if window is None else mask.triu(diagonal=key_len - query_len - window + 1)


def attention(q, k, v, causal: bool, window: int | None = None):
    query_len, key_len = q.shape[-2], k.shape[-2]
    if causal and window is not None and key_len > window:  # a sliding window that hides some keys
        if not USE_FUSED_ATTENTION:
            return attention_reference(q, k, v, causal, window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(query_len, key_len, q.device, window))
    if not USE_FUSED_ATTENTION:
        return attention_reference(q, k, v, causal)
    if not causal or query_len == 1:  # one new token may look at everything before it: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    if query_len == key_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # is_causal aligns the mask top-left; a prompt chunk after cached tokens needs it bottom-right.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(query_len, key_len, q.device))


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype):
    """cos and sin tables for rotary position embedding (Su et al., RoFormer), GPT-NeoX "rotate-half" layout.

    Pair j of the rotated dims turns by angle position * theta^(-2j / rotary_dim), j = 0 .. rotary_dim/2 - 1.
    positions: (T,) -> cos, sin: (T, rotary_dim). Computed in float32 like the official code, then cast.
    """
    inverse_frequency = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device).float() / rotary_dim))
    angles = positions.float()[:, None] * inverse_frequency[None, :]  # (T, rotary_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, rotary_dim): the two halves share one angle per pair
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin, rotary_dim: int):
    """Rotate the first `rotary_dim` dims of each head; the rest pass through (Phi-2's "partial rotary").

    x: (B, H, T, D). Dim i of the first half pairs with dim i + rotary_dim/2 ("rotate-half", not interleaved):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    """
    x_rotary, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rotary.chunk(2, dim=-1)
    rotate_half = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rotary * cos + rotate_half * sin, x_pass], dim=-1)


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    Preallocated to the full length (prompt + max new tokens), as in gpt-fast, rather than grown with torch.cat
    as in nanoVLM: growing copies the whole cache at every step (quadratic work over a long answer and a ~770-token
    Imp prompt) and fragments memory, while a preallocated buffer is written in place and its size is known up front.

    Its dtype may be narrower than the model's (Phi2.make_cache(dtype=...)): a float16 cache holds Imp-3B's 834
    positions in 0.27 GB instead of float32's 0.55 GB, and attention then runs in float16 (PhiAttention).
    float16 keeps 11 significant bits (bfloat16 8) but only values up to 65504: a key past that becomes inf, and
    generate() stops with a clear error when the logits stop being finite.
    """

    def __init__(self, batch_size, num_heads, max_length, head_dim, dtype, device):
        self.keys = torch.zeros(batch_size, num_heads, max_length, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    def update(self, start: int, keys, values):
        """Write (B, H, T, D) at positions start .. start+T-1; return everything up to there."""
        end = start + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions, asked to write up to {end}")
        self.keys[:, :, start:end] = keys  # cast to the cache's dtype on the way in
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


def run_layers(layers, x, gradient_checkpointing: bool, *args):
    """Run a stack of layers; with gradient checkpointing (a training flag) activations are recomputed in the
    backward pass instead of stored, trading ~30% more compute for much less memory (official: on for both stages)."""
    for layer in layers:
        if gradient_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
        else:
            x = layer(x, *args)
    return x


# ----------------------------------------------------------------------------------------------------------------
# 3. SigLIP vision tower. Mirrors transformers' modeling_siglip.py (SiglipVisionEmbeddings, SiglipEncoderLayer).


class SiglipAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):  # x: (B, N, D)
        B, N, D = x.shape
        split = lambda t: t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, head_dim)
        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), causal=False)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))  # every patch sees every patch: no mask


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's "gelu_pytorch_tanh"


class SiglipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SigLIP(nn.Module):
    """The vision tower: image (B, 3, 384, 384) -> one feature vector per 14x14 patch (B, 729, 1152).

    Imp runs only the first 26 of SigLIP's 27 layers (select_layer -2), takes that output as is (no
    post_layernorm: transformers applies it to last_hidden_state only, not to the hidden_states Imp reads) and
    drops the attention-pooling head: a language model wants one vector per patch, not one per image.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        # A 14x14 convolution with stride 14 is a linear map applied to each non-overlapping patch.
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)  # learned, no CLS token
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_layers_kept))
        self.gradient_checkpointing = False

    def forward(self, pixel_values):  # (B, 3, S, S), values in [-1, 1]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/14, S/14)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order: index = row * 27 + col
        x = x + self.position_embedding.weight  # (N, D) broadcast over the batch
        return run_layers(self.layers, x, self.gradient_checkpointing)  # (B, N, D)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "SigLIP":
        """A google/siglip-* folder (SiglipModel or SiglipVisionModel), or the vision tower of an Imp folder."""
        checkpoint = open_checkpoint(path)
        if checkpoint.layout in ("imp", "imp-legacy"):
            return Imp.from_pretrained(path, dtype, device, with_tokenizer=False).vision
        if checkpoint.layout != "siglip":
            raise CheckpointError(f"{path}: holds a {checkpoint.layout} checkpoint, not a SigLIP one")
        config = parse_config(checkpoint, VisionConfig)
        prefix = "vision_model." if any(key.startswith("vision_model.") for key in checkpoint.shapes) else ""
        table, unused = key_table_siglip(config, checkpoint=prefix, ours="")
        unused += [r"text_model\..*", r"logit_scale", r"logit_bias"]  # the text half of a SiglipModel
        return load_weights(build_on_meta(cls, config), checkpoint, table, unused, dtype, device)


# ----------------------------------------------------------------------------------------------------------------
# 4. Connector ("mlp2x_gelu"): maps each 1152-d patch feature into Phi-2's 2560-d token-embedding space.


class Connector(nn.Module):
    def __init__(self, vision_size: int, text_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, x):  # (B, N, 1152) -> (B, N, 2560)
        return self.linear_2(F.gelu(self.linear_1(x)))  # nn.GELU() default: the exact erf GELU, not tanh


# ----------------------------------------------------------------------------------------------------------------
# 5. Phi-2. Mirrors transformers' modeling_phi.py and Imp's vendored copy of it.


class PhiAttention(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)  # the output projection

    def project(self, x, rotary):
        """x (B, T, C) -> queries, keys, values (B, H, T, 80), rotary applied to queries and keys (never values)."""
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, 80)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        cos, sin = rotary
        return apply_rotary(q, cos, sin, self.config.rotary_dim), apply_rotary(k, cos, sin, self.config.rotary_dim), v

    def forward(self, x, rotary, start: int, cache: KVCache | None):
        """x: (B, T, C), tokens at positions start .. start+T-1; rotary: their (cos, sin) tables."""
        B, T, C = x.shape
        q, k, v = self.project(x, rotary)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, H, start+T, 80): the new keys appended to the earlier ones
        out = self.attend(q, k, v).to(x.dtype)  # (B, H, T, 80)
        return self.dense(out.transpose(1, 2).reshape(B, T, C))

    def attend(self, q, k, v):
        """Causal attention of the queries over all keys so far. In the keys' dtype, which a 16-bit cache makes
        16-bit for a float32 model too: no float32 copy of the whole cache (the fused kernel multiplies and sums
        in float32 either way)."""
        return attention(q.to(k.dtype), k, v, causal=True)


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # Phi-2's "gelu_new" is the tanh approximation


class PhiBlock(nn.Module):
    """Phi's *parallel* block: attention and MLP both read the same LayerNorm output and are added to x together,
    x + Attn(LN(x)) + MLP(LN(x)), one LayerNorm per block (GPT-J style), instead of GPT-2's two in sequence."""

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config)
        self.mlp = PhiMLP(config)

    def forward(self, x, rotary, start: int = 0, cache: KVCache | None = None):
        h = self.input_layernorm(x)
        return x + self.self_attn(h, rotary, start, cache) + self.mlp(h)


class Phi2(nn.Module):
    """Token ids (or embeddings) -> next-token logits (B, T, vocab), float32."""

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PhiBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)  # untied from the embedding, with a bias
        self.gradient_checkpointing = False

    def make_cache(self, batch_size: int, max_length: int, dtype=None) -> list:
        """One KVCache per layer, in `dtype` (default: the model's float dtype; see KVCache for 16-bit ones)."""
        weight = self.final_layernorm.weight  # a plain float parameter in every variant, quantized ones included
        return [KVCache(batch_size, self.config.num_attention_heads, max_length, self.config.head_dim,
                        dtype or weight.dtype, weight.device) for _ in self.layers]

    def forward(self, input_ids=None, inputs_embeds=None, start: int = 0, cache: list | None = None,
                last_only: bool = False):
        """input_ids (B, T) or inputs_embeds (B, T, C), at positions start .. start+T-1.
        cache: from make_cache, for generation. last_only: compute logits for the last position only (generation
        needs no more, and the 51200-wide lm_head over a 770-token prompt would cost ~100 GFLOP)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        rotary = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta, x.dtype)  # once, for all
        if cache is None:
            x = run_layers(self.layers, x, self.gradient_checkpointing, rotary, start, None)
        else:
            for layer, layer_cache in zip(self.layers, cache):
                x = layer(x, rotary, start, layer_cache)
        x = self.final_layernorm(x if not last_only else x[:, -1:])
        return self.lm_head(x).float()  # (B, T, vocab): logits in float32, as the official code returns them

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Phi2":
        """A microsoft/phi-2 folder (current transformers format), or the language model of an Imp folder."""
        checkpoint = open_checkpoint(path)
        if checkpoint.layout in ("imp", "imp-legacy"):
            return Imp.from_pretrained(path, dtype, device, with_tokenizer=False).llm
        if checkpoint.layout != "phi-2":
            raise CheckpointError(f"{path}: holds a {checkpoint.layout} checkpoint, not a Phi-2 one")
        config = parse_config(checkpoint, PhiConfig)
        return load_weights(build_on_meta(cls, config), checkpoint, key_table_phi(config, "current", ours=""), [],
                            dtype, device)


# ----------------------------------------------------------------------------------------------------------------
# 5b. The Llama-style decoder of Imp-2B (Qwen1.5-1.8B) and Imp-4B (Phi-3-mini). Mirrors transformers'
#     modeling_qwen2.py / modeling_phi3.py. Read it beside Phi-2 above: the differences are in the comments.


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and without a bias (Phi-2 uses
    LayerNorm with both). Normalised in float32, cast back, then scaled in the input dtype, as the official code."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):  # (B, T, C)
        x32 = x.float()
        normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalised.to(x.dtype)


class LlamaAttention(nn.Module):
    """Like PhiAttention, except: every head dim rotates (Phi-2: 32 of 80), rope_theta differs (Qwen1.5 1e6),
    q/k/v have a bias only in Qwen and the output projection (o_proj, Phi-2's "dense") never has one, and Phi-3
    masks keys further back than its sliding window. Phi-3's checkpoint fuses q, k, v into one qkv_proj: the
    loader splits its rows (key_table_llama), so the module is the same for both."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        kv_size = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x, rotary):
        """x (B, T, C) -> queries (B, H, T, D), keys and values (B, kv heads, T, D), every dim of q and k rotated."""
        B, T, C = x.shape
        split = lambda t, heads: t.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)
        q = split(self.q_proj(x), self.num_heads)
        k, v = split(self.k_proj(x), self.num_kv_heads), split(self.v_proj(x), self.num_kv_heads)
        cos, sin = rotary
        return apply_rotary(q, cos, sin, self.head_dim), apply_rotary(k, cos, sin, self.head_dim), v

    def forward(self, x, rotary, start: int, cache: KVCache | None):
        """x: (B, T, C), tokens at positions start .. start+T-1; rotary: their (cos, sin) tables."""
        B, T, C = x.shape
        q, k, v = self.project(x, rotary)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, kv heads, start+T, D)
        out = self.attend(q, k, v).to(x.dtype)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def attend(self, q, k, v):
        """Causal attention of the queries over all keys so far (within the sliding window), in the keys' dtype
        (see PhiAttention.attend). Grouped-query attention (neither Imp member uses it) shares each key/value head
        among num_heads / num_kv_heads query heads."""
        if self.num_kv_heads != self.num_heads:
            k, v = (t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1) for t in (k, v))
        return attention(q.to(k.dtype), k, v, causal=True, window=self.config.sliding_window)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Shazeer, 2020), where Phi-2 has fc2(gelu(fc1(x))) with biases. A
    third matrix, but a narrower width (Qwen1.5-1.8B: 5504 = 2.7 x 2048; Phi-2: 4 x 2560). Phi-3's checkpoint
    fuses gate and up into one gate_up_proj, gate rows first; the loader splits it."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """The *sequential* pre-norm block (GPT-2, Llama), where Phi-2's block is parallel: the MLP reads the output of
    attention, and each has its own norm: x + Attn(RMSNorm1(x)), then x + MLP(RMSNorm2(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, rotary, start: int = 0, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rotary, start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token ids (or embeddings) -> next-token logits (B, T, vocab), float32; the interface of Phi2."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # Phi-2: final_layernorm, a LayerNorm
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied; Phi-2's has a bias
        self.gradient_checkpointing = False

    @property
    def final_layernorm(self):
        """The final norm under Phi-2's name, for code that serves every decoder (it reads its device and dtype)."""
        return self.norm

    def make_cache(self, batch_size: int, max_length: int, dtype=None) -> list:
        weight = self.norm.weight
        return [KVCache(batch_size, self.config.num_key_value_heads, max_length, self.config.head_dim,
                        dtype or weight.dtype, weight.device) for _ in self.layers]

    def forward(self, input_ids=None, inputs_embeds=None, start: int = 0, cache: list | None = None,
                last_only: bool = False):
        """As Phi2.forward."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        rotary = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if cache is None:
            x = run_layers(self.layers, x, self.gradient_checkpointing, rotary, start, None)
        else:
            for layer, layer_cache in zip(self.layers, cache):
                x = layer(x, rotary, start, layer_cache)
        x = self.norm(x if not last_only else x[:, -1:])
        return self.lm_head(x).float()  # (B, T, vocab)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "LlamaDecoder":
        """A Qwen/Qwen1.5-* or microsoft/Phi-3-mini-* folder, or the language model of an Imp-2B / Imp-4B folder."""
        checkpoint = open_checkpoint(path)
        if checkpoint.layout == "imp":
            return Imp.from_pretrained(path, dtype, device, with_tokenizer=False).llm
        if checkpoint.layout != "llama":
            raise CheckpointError(f"{path}: holds a {checkpoint.layout} checkpoint, not a Qwen2 / Phi-3 one")
        config = parse_config(checkpoint, LlamaConfig)
        return load_weights(build_on_meta(cls, config), checkpoint, key_table_llama(config, ours=""),
                            [r".*\.rotary_emb\.inv_freq"], dtype, device)


def decoder_class(config):
    """The language-model class for a text config: Phi2 for PhiConfig, LlamaDecoder for LlamaConfig."""
    return Phi2 if isinstance(config, PhiConfig) else LlamaDecoder


# ----------------------------------------------------------------------------------------------------------------
# 6. LoRA (Hu et al., 2021): train a low-rank update B @ A beside a frozen weight W. Imp's stage 2 puts it on every
#    Linear of the language model, lm_head included (paper section 4.2: rank 256 beats full finetuning).


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / rank) * B (A dropout(x)), with W and b frozen; A: (rank, in), B: (out, rank).

    B starts at zero, so training starts from exactly the base model. `merge()` folds the update into W
    (W += scale * B A) for inference at no extra cost; `unmerge()` takes it out again. Both are idempotent.
    """

    def __init__(self, base: nn.Linear, rank: int = 256, alpha: float = 256, dropout: float = 0.05):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init: A random, B zero
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if not self.merged:
            y = y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        return y

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += (self.lora_B @ self.lora_A).to(self.base.weight.dtype) * self.scale
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= (self.lora_B @ self.lora_A).to(self.base.weight.dtype) * self.scale
            self.merged = False


def add_lora(model: nn.Module, rank=256, alpha=256, dropout=0.05) -> list:
    """Wrap every nn.Linear inside `model` (pass imp_model.llm for the official recipe) in a LoRALinear.
    Returns the wrapped module names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back (the official release is merged)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, child_name, child.base)
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter weights: what stage 2 trains besides the connector, small enough to share separately."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_" in name}


# ----------------------------------------------------------------------------------------------------------------
# 7. Imp: the vision tower, the connector and Phi-2 put together.

IMAGE_SENTINEL = -200  # the official training code's stand-in id for <image>; accepted as well as the real id
IGNORE_INDEX = -100    # label of positions the loss skips (image features, prompt text, padding)


class PromptTooLongError(ValueError):
    pass


class NotFiniteError(ValueError):
    pass


class Imp(nn.Module):
    """The whole model. Its jobs: splice image features into the text (splice), score a sequence (forward), the
    training loss (loss), and generation in the two phases the paper's Table 4 times: prefill() reads the whole
    prompt at once, decode_step() adds one token at a time; generate() is built from the two."""

    def __init__(self, config: ImpConfig):
        super().__init__()
        self.config = config
        self.vision = SigLIP(config.vision)
        self.connector = Connector(config.vision.hidden_size, config.text.hidden_size)
        self.llm = decoder_class(config.text)(config.text)  # Phi-2 (Imp-3B), Qwen1.5 (2B) or Phi-3 (4B)
        self.tokenizer = None  # a tokenizers.Tokenizer, set by from_pretrained

    def encode_images(self, pixel_values):
        """(n, 3, S, S) -> (n, N, C): one language-model "token" per image patch."""
        return self.connector(self.vision(pixel_values))

    def is_image(self, input_ids):
        """(B, T) bool: where the <image> placeholders are (the real id, or the official code's sentinel -200)."""
        return (input_ids == self.config.image_token_index) | (input_ids == IMAGE_SENTINEL)

    def splice(self, input_ids, image_features=None, labels=None):
        """Replace each <image> id in input_ids (B, T) by its image's N feature vectors (paper section 3: the
        visual tokens are concatenated with the text tokens). Images are used in order of appearance. Rows whose
        spliced lengths differ are right-padded with zeros (and label IGNORE_INDEX), as in the official code.
        Returns embeddings (B, T', C) and labels (B, T') or None."""
        is_image = self.is_image(input_ids)
        token_embeddings = self.llm.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, C)
        num_images = int(is_image.sum())
        given = 0 if image_features is None else image_features.shape[0]
        if num_images == 0 and given == 0:
            return token_embeddings, labels
        if given != num_images:
            raise ValueError(f"the prompt has {num_images} <image> tokens but {given} images were given")
        # Per-row views (unbind): slicing the batched tensors instead would make every slice's backward fill a
        # whole-batch zero tensor, a cost that grows with the square of the batch size.
        images = iter(image_features.to(token_embeddings.dtype).unbind(0))  # (N, C) each
        rows = [splice_row(embeddings, is_image[b], images, None if labels is None else labels[b])
                for b, embeddings in enumerate(token_embeddings.unbind(0))]
        longest = max(len(row) for row, _ in rows)
        embeddings = torch.stack([F.pad(row, (0, 0, 0, longest - len(row))) for row, _ in rows])  # (B, T', C)
        if labels is not None:
            labels = torch.stack([F.pad(row, (0, longest - len(row)), value=IGNORE_INDEX) for _, row in rows])
        return embeddings, labels

    def embed(self, input_ids, pixel_values=None):
        """input_ids (B, T) with <image> ids, pixel_values (num_images, 3, S, S) -> the spliced (B, T', C)."""
        features = self.encode_images(pixel_values) if pixel_values is not None else None
        return self.splice(input_ids, features)[0]

    def forward(self, input_ids, pixel_values=None):
        """input_ids (B, T) with <image> ids, pixel_values (num_images, 3, S, S) -> logits (B, T', vocab)."""
        return self.llm(inputs_embeds=self.embed(input_ids, pixel_values))

    def loss(self, input_ids, labels, pixel_values=None):
        """Mean next-token cross-entropy over the supervised positions (labels != IGNORE_INDEX)."""
        features = self.encode_images(pixel_values) if pixel_values is not None else None
        embeddings, labels = self.splice(input_ids, features, labels)
        logits = self.llm(inputs_embeds=embeddings)  # (B, T', V) float32
        # Position t predicts token t+1: drop the last logit and the first label.
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    # -- generation: prefill, then one decode step per new token -------------------------------------------------

    def prefill(self, embeddings, cache) -> torch.Tensor:
        """Phase 1 (the paper's S_prompt): the whole spliced prompt (1, T', C) in one pass, its keys and values
        written to `cache` at positions 0 .. T'-1 -> the logits of the token that follows it (vocab,)."""
        return self.llm(inputs_embeds=embeddings, cache=cache, last_only=True)[0, -1]

    def decode_step(self, token: int, position: int, cache) -> torch.Tensor:
        """Phase 2 (the paper's S_gen): one new token at `position`, attending to the cached ones -> the logits of
        the token after it (vocab,)."""
        input_ids = torch.tensor([[token]], device=self.llm.final_layernorm.weight.device)
        return self.llm(input_ids=input_ids, start=position, cache=cache, last_only=True)[0, -1]

    def stop_ids(self) -> set:
        """Generation stops at the config's eos, at every end token of the model's template (Imp-2B, Imp-4B), and at
        "</s>" by the tokenizer's id for Imp-3B: Imp ends every answer with "</s>", but folders written by the
        official training code keep Phi-2's config (eos 50256, <|endoftext|>), and the official evaluation stops on
        the string "</s>"."""
        if self.tokenizer is None:
            return {self.config.eos_token_id}
        ends = [self.tokenizer.token_to_id(t) for t in STOP_TOKENS[self.config.template]]
        return {self.config.eos_token_id} | {token for token in ends if token is not None}

    @torch.inference_mode()
    def generate(self, input_ids=None, pixel_values=None, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
                 seed=None, stop_ids=None, cache_dtype=None, inputs_embeds=None):
        """Yield new token ids one by one for a single prompt (1, T) (or its spliced embeddings, inputs_embeds).
        Greedy by default (the official setting: temperature 0, num_beams 1); stops at eos ("</s>") or after
        max_new_tokens. cache_dtype: of the KV cache, default the model's (a float16 one halves a float32 model's)."""
        embeddings = self.embed(input_ids, pixel_values) if inputs_embeds is None else inputs_embeds  # (1, T', C)
        prompt_length = embeddings.shape[1]
        if prompt_length >= self.config.max_length:
            raise PromptTooLongError(f"the prompt is {prompt_length} tokens with the image, but the model's context "
                                     f"is {self.config.max_length} tokens: shorten the question or the history")
        end = min(prompt_length + max_new_tokens, self.config.max_length)  # the position after the last new token
        stop_ids = self.stop_ids() if stop_ids is None else set(stop_ids)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = self.llm.make_cache(1, end, cache_dtype)
        logits = self.prefill(embeddings, cache)
        for position in range(prompt_length, end):  # the position of the token about to be chosen
            if not torch.isfinite(logits).all():
                raise NotFiniteError("the model's next-token scores are not finite (NaN or inf): damaged weights, "
                                     "or a float16 KV cache past its range (65504; use a float32 or bfloat16 one)")
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if token in stop_ids:
                return
            yield token
            if position + 1 < end:  # no forward pass for a successor that may not be generated
                logits = self.decode_step(token, position, cache)

    # -- checkpoints -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", with_tokenizer=True, swap_modules=None) -> "Imp":
        """An Imp folder in either official layout (current `model.*` or legacy `transformer.h.*`), or one written
        by save_pretrained / train.py. Weights are streamed tensor by tensor into a model built on the meta device
        (no random init, no second copy), and cast to `dtype`. swap_modules(model, checkpoint): called before the
        weights stream in, to put other modules in place where the folder stores other tensors (quant.load uses
        it for the quantized folders quant.py writes)."""
        checkpoint = open_checkpoint(path)
        if checkpoint.layout not in ("imp", "imp-legacy"):
            raise CheckpointError(f"{path}: holds a {checkpoint.layout} checkpoint, not an Imp one (for official "
                                  "phi-2 + siglip folders use Imp.from_components(llm_folder, vision_folder))")
        config = parse_config(checkpoint, ImpConfig)
        model = build_on_meta(cls, config)
        if swap_modules is not None:
            swap_modules(model, checkpoint)
        elif "quantization" in checkpoint.config:
            raise CheckpointError(f"{path}: holds a quantized model; load it with quant.load (infer.py does)")
        table, unused = key_table_imp(config, checkpoint.layout)
        load_weights(model, checkpoint, table, unused, dtype, device)
        if with_tokenizer:
            model.tokenizer = load_tokenizer(path, config.template)
        return model

    @classmethod
    def from_components(cls, llm_path, vision_path, dtype=torch.float32, device="cpu") -> "Imp":
        """Stage-1 starting point: official microsoft/phi-2 + google/siglip folders and a new random connector.
        Adds Imp's two tokens to Phi-2's tokenizer ("</s>" = 50295, "<image>" = 50296 for the real Phi-2).
        A Qwen/Qwen1.5-* or microsoft/Phi-3-mini-* folder as llm_path starts Imp-2B / Imp-4B instead."""
        if open_checkpoint(llm_path).layout == "llama":
            return cls.from_components_llama(llm_path, vision_path, dtype, device)
        llm, vision = Phi2.from_pretrained(llm_path, dtype, device), SigLIP.from_pretrained(vision_path, dtype, device)
        tokenizer = load_tokenizer(llm_path)
        tokenizer.add_special_tokens(["</s>", "<image>"])
        config = ImpConfig(vision=vision.config, text=llm.config, image_token_index=tokenizer.token_to_id("<image>"),
                           eos_token_id=tokenizer.token_to_id("</s>"),
                           pad_token_id=tokenizer.token_to_id("<|endoftext|>") or 0)
        with torch.device("meta"):
            model = cls(config)
        model.vision, model.llm = vision, llm
        model.connector = Connector(config.vision.hidden_size, config.text.hidden_size).to(device, dtype)
        model.tokenizer = tokenizer
        return model

    @classmethod
    def from_components_llama(cls, llm_path, vision_path, dtype=torch.float32, device="cpu") -> "Imp":
        """from_components for Imp-2B / Imp-4B: the tokenizer stays as it is (<image> is cut out of the text, not
        a token); its id is the first free one (151646 for Qwen1.5, 32011 for Phi-3), as in the releases."""
        llm, vision = LlamaDecoder.from_pretrained(llm_path, dtype, device), SigLIP.from_pretrained(vision_path, dtype, device)
        family = llm.config.family
        tokenizer, defaults = load_tokenizer(llm_path, family), FAMILY_DEFAULTS[family]
        token = lambda name, default: default if tokenizer.token_to_id(name) is None else tokenizer.token_to_id(name)
        image_id = token(IMAGE_PLACEHOLDER, tokenizer.get_vocab_size(with_added_tokens=True))
        config = ImpConfig(vision=vision.config, text=llm.config, image_token_index=image_id,
                           eos_token_id=token(STOP_TOKENS[family][0], defaults["eos_token_id"]),
                           pad_token_id=token("<|endoftext|>", defaults["pad_token_id"]),
                           image_aspect_ratio=defaults["image_aspect_ratio"], max_length=defaults["max_length"])
        with torch.device("meta"):
            model = cls(config)
        model.vision, model.llm = vision, llm
        model.connector = Connector(config.vision.hidden_size, config.text.hidden_size).to(device, dtype)
        model.tokenizer = tokenizer
        return model

    def save_pretrained(self, path, max_shard_bytes=2 * 1024**3, extra_config=None):
        """Write config.json, safetensors weights (sharded with an index past max_shard_bytes) and the tokenizer,
        in the current official layout, each file atomically. LoRA adapters must be merged first."""
        state = self.state_dict()
        if any(".lora_" in name for name in state):
            raise ValueError("merge the LoRA adapters (imp.merge_lora(model)) before save_pretrained")
        tensors = official_tensors(self.config, state)
        os.makedirs(path, exist_ok=True)
        dtype = str(next(iter(state.values())).dtype).replace("torch.", "") if state else "float32"
        config = dict(self.config.to_dict(), torch_dtype=dtype, **(extra_config or {}))
        write_safetensors(path, tensors, max_shard_bytes)
        write_json(os.path.join(path, "config.json"), config)
        if self.tokenizer is not None:
            save_tokenizer(self.tokenizer, path, self.config)


def splice_row(token_embeddings, is_image, images, labels=None):
    """One row of Imp.splice: token_embeddings (T, C) with each position where is_image (T,) is True replaced by
    the next (N, C) of `images`; labels (T,) likewise by N IGNORE_INDEX. -> (embeddings (T', C), labels or None)."""
    pieces, label_pieces, previous = [], [], 0
    for position in is_image.nonzero().flatten().tolist():
        features = next(images)  # (N, C)
        pieces += [token_embeddings[previous:position], features]
        if labels is not None:
            label_pieces += [labels[previous:position], labels.new_full((features.shape[0],), IGNORE_INDEX)]
        previous = position + 1
    pieces.append(token_embeddings[previous:])
    return torch.cat(pieces), None if labels is None else torch.cat(label_pieces + [labels[previous:]])


def sample_next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None) -> int:
    """logits (vocab,) -> a token id. temperature 0: argmax (greedy). Otherwise softmax(logits / temperature),
    keeping only the top_k most likely tokens (0: all) and the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float() / temperature
    if torch.isinf(scaled.max()):  # a tiny temperature (1e-45) overflows to inf, NaN probabilities: its limit is
        return int(logits.argmax())  # greedy
    logits = scaled
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probabilities = torch.softmax(sorted_logits, dim=-1)
        before = probabilities.cumsum(-1) - probabilities  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the best token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


# ----------------------------------------------------------------------------------------------------------------
# 8. Images: loading, and the official preprocessing (Imp's ImpImageProcessor / LLaVA's expand2square).


class ImageError(ValueError):
    pass


def load_image(path, notes=None) -> Image.Image:
    """Open an image file, upright (EXIF orientation applied), first frame of an animation. Anything unreadable
    raises ImageError with one clear line. Remarks worth telling the user are appended to `notes`."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image")
    return open_image(path, path, notes)


def open_image(source, name: str, notes=None) -> Image.Image:
    """load_image's checks for a path or a file-like object (e.g. io.BytesIO of uploaded bytes); `name` is what
    the messages call it."""
    import warnings
    path = name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, do not just warn
            image = Image.open(source)
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
                if notes is not None:
                    notes.append(f"{os.path.basename(path)} is animated ({image.n_frames} frames): using its first")
            image.load()
            image = ImageOps.exif_transpose(image)  # phone photos store "rotate 90" as a tag, not in the pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: too large to open safely ({error})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (or a format PIL cannot read)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot read the image, the file looks damaged ({error})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. For the usual modes (RGBA, LA, P, L, CMYK, ...) this is PIL's convert("RGB"),
    as the official code does (transparency is dropped, not composited). 16- and 32-bit integer images (16-bit PNG
    greyscale) are first scaled to 0..255, where convert() would clip them to white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        pixels = np.asarray(image).astype(np.float64)
        if pixels.max(initial=0) > 255:  # a 16-bit range
            pixels = pixels / 257.0   # 65535 / 257 = 255
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    import warnings
    with warnings.catch_warnings():  # PIL warns about palette transparency; dropping it is what we want
        warnings.simplefilter("ignore")
        return image.convert("RGB")


def expand_to_square(image: Image.Image, fill=(127, 127, 127)) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square of side max(W, H). The fill is the processor's
    mean 0.5 as int(0.5 * 255) = 127, so padding becomes ~0 after normalisation."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_image(image: Image.Image, size: int = 384, mode: str = "square") -> torch.Tensor:
    """PIL image -> (3, size, size) float32 in [-1, 1], bit for bit what the official processor computes:
    RGB -> ["pad": expand_to_square] -> PIL bicubic resize to size x size (aspect not kept) -> x / 255 (in float64,
    then float32, as transformers' rescale does) -> (x - 0.5) / 0.5 -> channels first."""
    if mode not in ("square", "pad"):
        raise ValueError(f"image aspect mode must be 'square' or 'pad', not {mode!r}")
    image = to_rgb(image)
    if mode == "pad":
        image = expand_to_square(image)
    image = image.resize((size, size), resample=Image.BICUBIC)
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # (S, S, 3)
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, S, S)


# ----------------------------------------------------------------------------------------------------------------
# 9. The phi2 conversation template and the tokenizer.

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_PLACEHOLDER = "<image>"


def phi2_prompt(turns) -> str:
    """The official `conv_phi2` template (separator style TWO: " " after user turns, "</s>" after answers).
    turns: [(user message, assistant answer or None)]; None leaves the assistant turn open for generation:
    "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:" """
    text = SYSTEM_PROMPT + " "
    for question, answer in turns:
        text += f"USER: {question} "
        text += "ASSISTANT:" if answer is None else f"ASSISTANT: {answer}</s>"
    return text


def qwen2_prompt(turns) -> str:
    """Imp-2B's `qwen2` template: ChatML with the fixed system text (separator style QWEN2, <|im_end|> after every
    message): "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n"
    then "{a1}<|im_end|>" and the next "\n<|im_start|>user\n..."; None leaves the assistant turn open."""
    text = "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>"
    for question, answer in turns:
        text += f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        text += "" if answer is None else f"{answer}<|im_end|>"
    return text


def phi3_prompt(turns) -> str:
    """Imp-4B's `phi3` template (the official one since "fix imp-4b bug"), Phi-3's chat tokens with <|end|> after
    every message: "<|system|>\n{system}<|end|>\n<|user|>\n{q1}<|end|>\n<|assistant|>\n{a1}<|end|>..."; the
    tokenizer puts <s> in front (encode_prompt)."""
    text = "<|system|>\n" + SYSTEM_PROMPT + "<|end|>"
    for question, answer in turns:
        text += f"\n<|user|>\n{question}<|end|>\n<|assistant|>\n"
        text += "" if answer is None else f"{answer}<|end|>"
    return text


PROMPTS = {"phi2": phi2_prompt, "qwen2": qwen2_prompt, "phi3": phi3_prompt}
DECODER_NAMES = {"phi2": "Phi-2", "qwen2": "Qwen1.5", "phi3": "Phi-3-mini"}  # the language model of each template
# Tokens that end an answer, beside config.eos_token_id: every end token of the template (Imp-2B's
# generation_config stops at <|im_end|> and <|endoftext|>; Phi-3's at <|end|>, <|endoftext|> and <|assistant|>).
STOP_TOKENS = {"phi2": ("</s>",), "qwen2": ("<|im_end|>", "<|endoftext|>"), "phi3": ("<|end|>", "<|endoftext|>", "<|assistant|>")}


def build_prompt(question: str, history=(), with_image=True, template="phi2") -> str:
    """The inference prompt: <image> then a newline open the first user message (as in the official README)."""
    turns = [(q, a) for q, a in history] + [(question, None)]
    if with_image:
        turns[0] = (IMAGE_PLACEHOLDER + "\n" + turns[0][0], turns[0][1])
    return PROMPTS[template](turns)


def encode_prompt(tokenizer, prompt: str, config: ImpConfig, num_images: int | None = None) -> list:
    """Prompt text -> token ids, the official way (tokenizer_image_token): the text is cut at each "<image>", the
    pieces are tokenized apart and config.image_token_index goes between them, so the image sits where the prompt
    says with any tokenizer, whether it has "<image>" as a token or not. num_images: only the first num_images
    "<image>" are images (a template puts its placeholder before any user text); a user's later "<image>" is text.
    Phi-3 starts with <s> (once, whether or not its tokenizer.json adds it); Phi-2 and Qwen have no BOS."""
    pieces = prompt.split(IMAGE_PLACEHOLDER, -1 if num_images is None else num_images)
    if num_images is not None and len(pieces) - 1 < num_images:
        raise ValueError(f"{num_images} image(s) but only {len(pieces) - 1} {IMAGE_PLACEHOLDER} in the prompt")
    ids = []
    for index, piece in enumerate(pieces):
        if index:
            ids.append(config.image_token_index)
        ids += encode_text(tokenizer, piece)
    return ([tokenizer.token_to_id("<s>")] if config.template == "phi3" else []) + ids


SPECIAL_TOKENS = ("<|endoftext|>", "</s>", "<image>")  # skipped when decoding answers


def encode_text(tokenizer, text: str) -> list:
    """Token ids of text in which "<image>" is only text, also where the tokenizer has it as a special token."""
    ids = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index:  # the literal string, spelled by the BPE like any other text
            before, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
            try:
                ids += tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False).ids
            finally:
                tokenizer.encode_special_tokens = before
        ids += tokenizer.encode(piece, add_special_tokens=False).ids
    return ids


# Qwen's pre-tokenizer: GPT-4's pattern with single digits (\p{N}, not \p{N}{1,3}), from Qwen2Tokenizer.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def folder_family(path) -> str:
    """The family ("phi2", "qwen2", "phi3") a model folder's config.json names; "phi2" without one."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return config_family(json.load(f))
    except (OSError, ValueError, AttributeError):
        return "phi2"


def load_tokenizer(path, family=None):
    """A tokenizers.Tokenizer from a checkpoint folder: tokenizer.json when present, otherwise rebuilt from
    vocab.json + merges.txt (+ added_tokens.json): GPT-2/CodeGen style for Imp-3B, which is what its releases ship,
    or Qwen's (NFC, its regex) for Imp-2B. Phi-3 (Imp-4B) needs its tokenizer.json. family: read from config.json
    when not given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    family = family or folder_family(path)
    tokenizer_json = os.path.join(path, "tokenizer.json")
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    try:
        if os.path.exists(tokenizer_json):
            return Tokenizer.from_file(tokenizer_json)
        if family == "phi3":  # its repo's vocab.json + merges.txt are Phi-2 leftovers, not Phi-3's vocabulary
            raise CheckpointError(f"{path}: no tokenizer.json (Phi-3's SentencePiece vocabulary is read from it)")
        if not (os.path.exists(vocab) and os.path.exists(merges)):
            raise CheckpointError(f"{path}: no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)")
        if family == "qwen2":
            return qwen_tokenizer(path, vocab, merges)
        tokenizer = Tokenizer(models.BPE.from_file(vocab, merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2: no leading space added
        tokenizer.decoder = decoders.ByteLevel()
        added_path = os.path.join(path, "added_tokens.json")
        added = json.load(open(added_path, encoding="utf-8")) if os.path.exists(added_path) else {}
        for token, token_id in sorted(added.items(), key=lambda item: item[1]):  # ids must come out as listed
            if token in SPECIAL_TOKENS:
                tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            else:  # Phi-2's runs of spaces and tabs (ids 50257..50294): ordinary text
                tokenizer.add_tokens([AddedToken(token, normalized=False)])
            if tokenizer.token_to_id(token) != token_id:
                raise CheckpointError(f"{added_path}: {token!r} should have id {token_id} but got "
                                      f"{tokenizer.token_to_id(token)} (ids must follow vocab.json without gaps)")
        tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None])
        return tokenizer
    except CheckpointError:
        raise
    except Exception as error:  # tokenizers raises plain Exceptions on malformed files
        raise CheckpointError(f"{path}: cannot read the tokenizer files ({error})") from None


def qwen_tokenizer(path, vocab, merges):
    """Qwen1.5's byte-level BPE from vocab.json + merges.txt: NFC, then its regex, then GPT-2's byte mapping
    (no prefix space); its added tokens (<|endoftext|>, <|im_start|>, <|im_end|>) are all special."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    tokenizer = Tokenizer(models.BPE.from_file(vocab, merges))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    added_path = os.path.join(path, "added_tokens.json")
    added = json.load(open(added_path, encoding="utf-8")) if os.path.exists(added_path) else {}
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        if tokenizer.token_to_id(token) != token_id:
            raise CheckpointError(f"{added_path}: {token!r} should have id {token_id} but got "
                                  f"{tokenizer.token_to_id(token)} (ids must follow vocab.json without gaps)")
    return tokenizer


TOKENIZER_NAMES = {  # special_tokens_map.json and the tokenizer class of each member's release
    "phi2": (dict(bos_token="<|endoftext|>", eos_token="</s>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"),
             "CodeGenTokenizer"),
    "qwen2": (dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"), "Qwen2Tokenizer"),
    "phi3": (dict(bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"),
             "LlamaTokenizer"),
}


def save_tokenizer(tokenizer, path, config: ImpConfig):
    """tokenizer.json (what we load first) plus the GPT-2-style files official tooling reads."""
    with tempfile.TemporaryDirectory(dir=path, prefix=f".tokenizer.tmp{os.getpid()}-") as scratch:
        tokenizer.save(os.path.join(scratch, "tokenizer.json"))
        tokenizer.model.save(scratch)  # vocab.json, merges.txt
        base_size = tokenizer.get_vocab_size(with_added_tokens=False)
        added = {token: token_id for token, token_id in sorted(tokenizer.get_vocab(with_added_tokens=True).items(),
                                                               key=lambda item: item[1]) if token_id >= base_size}
        write_json(os.path.join(scratch, "added_tokens.json"), added)
        names, tokenizer_class = TOKENIZER_NAMES[config.template]
        write_json(os.path.join(scratch, "special_tokens_map.json"), names)
        write_json(os.path.join(scratch, "tokenizer_config.json"),
                   dict(names, tokenizer_class=tokenizer_class, add_prefix_space=False,
                        model_max_length=config.max_length, padding_side="right"))
        for name in os.listdir(scratch):
            os.replace(os.path.join(scratch, name), os.path.join(path, name))


# ----------------------------------------------------------------------------------------------------------------
# 10. Asking a question: an image and a question in, the answer out as text (what infer.py runs).


def prepare_inputs(model: Imp, image=None, question="", history=(), aspect=None):
    """PIL image (or None) + question (+ earlier (question, answer) turns) -> input_ids (1, T), pixel_values
    (1, 3, S, S) or None."""
    if model.tokenizer is None:
        raise CheckpointError("this model has no tokenizer: load it from a folder with tokenizer files")
    prompt = build_prompt(question, history, with_image=image is not None, template=model.config.template)
    device = model.llm.final_layernorm.weight.device
    ids = encode_prompt(model.tokenizer, prompt, model.config, num_images=int(image is not None))
    input_ids = torch.tensor([ids], device=device)
    pixel_values = None
    if image is not None:
        size, mode = model.config.vision.image_size, aspect or model.config.image_aspect_ratio
        pixel_values = preprocess_image(image, size, mode)[None].to(device)  # (1, 3, S, S)
    return input_ids, pixel_values


def text_pieces(tokenizer, token_ids):
    """Token ids as they come (an iterator) -> the answer's text, piece by piece. Decoding the whole answer so far
    at each step, not each token alone: a byte-level BPE token can be half of a multi-byte character."""
    tokens, shown = [], ""
    for token in token_ids:
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest of its bytes
            continue
        yield text[len(shown):]
        shown = text


def stream(model: Imp, image=None, question="", history=(), aspect=None, **settings):
    """Yield the answer as text pieces while it is generated (settings: see Imp.generate)."""
    input_ids, pixel_values = prepare_inputs(model, image, question, history, aspect)
    yield from text_pieces(model.tokenizer, model.generate(input_ids, pixel_values, **settings))


def answer(model: Imp, image=None, question="", history=(), aspect=None, **settings) -> str:
    """The whole answer as one string, stripped (the official README decodes and .strip()s)."""
    return "".join(stream(model, image, question, history, aspect, **settings)).strip()


# ----------------------------------------------------------------------------------------------------------------
# 11. Checkpoint I/O. One explicit key table per official layout: checkpoint key -> [(our parameter, rows)].
#     `rows` is None, or a slice of the checkpoint tensor's rows (the legacy fused Wqkv feeds three parameters).


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    path: str
    config: dict
    files: list          # safetensors files, in order
    shapes: dict         # key -> shape, read from the headers without loading any tensor
    layout: str          # "imp", "imp-legacy", "phi-2", "llama" (Qwen2 / Phi-3) or "siglip"


def open_checkpoint(path) -> Checkpoint:
    """Find and check a folder's config.json and safetensors files (single, or sharded with an index)."""
    from safetensors import safe_open
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model folder" if not os.path.exists(path) else f"{path}: not a folder")
    config = read_json_object(os.path.join(path, "config.json"), "so this is not a model folder")
    index_path, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    if os.path.exists(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and name == os.path.basename(name) and name.endswith(".safetensors")
                for name in weight_map.values()):  # a shard name may not lead out of the folder
            raise CheckpointError(f"{index_path}: not a valid index (its weight_map must name .safetensors files "
                                  "of this folder)")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        missing = [os.path.basename(f) for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{path}: missing shard(s) {', '.join(missing)} listed in the index")
    elif os.path.exists(single):
        files = [single]
    elif any(name.endswith(".bin") for name in os.listdir(path)):
        raise CheckpointError(f"{path}: only .bin weights (Python pickles) found; nanoImp loads safetensors only, because "
                              "unpickling can run arbitrary code (the current Imp releases ship safetensors)")
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{file}: not a readable safetensors file, maybe truncated ({error})") from None
    return Checkpoint(path, config, files, shapes, detect_layout(path, shapes))


def read_json_object(path, missing_hint="") -> dict:
    """A JSON object from a file of a model folder; anything else (missing, a folder, a symlink loop, not UTF-8, not
    JSON, not an object) is one CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.dirname(path)}: no {os.path.basename(path)}"
                              + (f", {missing_hint}" if missing_hint else "")) from None
    except OSError as error:  # a folder, a symlink loop, no permission
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_sizes(config) -> None:
    """Sizes a model can be built with: every size positive, heads that divide the width (a config with 0 heads
    or 2560 % 7 != 0 would fail deep inside torch, or divide by zero)."""
    for part in (config.vision, config.text) if isinstance(config, ImpConfig) else (config,):
        for name, value in asdict(part).items():
            if not name.endswith(("_size", "_layers", "_heads", "_dim", "_channels", "_embeddings")):
                continue
            # Bounds far above any real model (Imp-3B: 32 layers, width 2560), so that a damaged config cannot make
            # us build 2**40 layers on the meta device (hours) before the weights' shapes would refuse it.
            largest = 4096 if name.endswith(("_layers", "_heads")) else 2**24
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
                raise ValueError(f"{name} must be an integer in 1 .. {largest}, got {value!r}")
        if part.hidden_size % part.num_attention_heads:
            raise ValueError(f"hidden_size {part.hidden_size} is not a multiple of num_attention_heads "
                             f"{part.num_attention_heads}")


def parse_config(checkpoint: Checkpoint, config_class):
    """config.json -> VisionConfig / PhiConfig / ImpConfig; a field that is missing or of the wrong type is a
    CheckpointError that names it, not a KeyError from deep inside."""
    try:
        config = config_class.from_dict(checkpoint.config)
        check_sizes(config)
        return config
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise CheckpointError(f"{checkpoint.path}/config.json: not a valid {checkpoint.layout} config "
                              f"({type(error).__name__}: {error})") from None


def detect_layout(path, keys) -> str:
    if any(key.startswith(("transformer.h.", "transformer.embd.")) for key in keys):
        return "imp-legacy"   # the MixFormer naming of the first Imp releases (fused Wqkv)
    if any(key.startswith(("model.mm_projector.", "model.vision_tower.")) for key in keys):
        return "imp"          # current MILVLG/imp-v1-3b and Imp-v1.5-3B-Phi2 main
    if any(key.endswith((".mlp.gate_proj.weight", ".mlp.gate_up_proj.weight")) for key in keys):
        return "llama"        # Qwen/Qwen1.5-* or microsoft/Phi-3-mini-* (a SwiGLU decoder)
    if any(key.startswith("model.layers.") for key in keys):
        return "phi-2"        # microsoft/phi-2 in current transformers format
    if any(key.startswith(("vision_model.", "embeddings.patch_embedding.")) for key in keys):
        return "siglip"       # google/siglip-* (SiglipModel; or a SiglipVisionModel, saved with or without prefix)
    raise CheckpointError(f"{path}: unknown checkpoint layout (first keys: {', '.join(sorted(keys)[:3])})")


def key_table_siglip(config: VisionConfig, checkpoint: str, ours: str):
    """SigLIP vision keys (below `checkpoint`, e.g. "vision_model.") -> ours. Also returns the patterns of tensors
    Imp knowingly drops: the layers after the selected one, post_layernorm and the attention-pooling head."""
    table = {f"{checkpoint}embeddings.patch_embedding.{p}": [(f"{ours}patch_embedding.{p}", None)]
             for p in ("weight", "bias")}
    table[f"{checkpoint}embeddings.position_embedding.weight"] = [(f"{ours}position_embedding.weight", None)]
    for j in range(config.num_layers_kept):
        for name in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                table[f"{checkpoint}encoder.layers.{j}.{name}.{p}"] = [(f"{ours}layers.{j}.{name}.{p}", None)]
    kept = config.num_layers_kept
    later_layers = "|".join(str(j) for j in range(kept, max(kept, config.num_hidden_layers) + 1))
    escaped = re.escape(checkpoint)
    unused = [rf"{escaped}post_layernorm\..*", rf"{escaped}head\..*", rf"{escaped}encoder\.layers\.({later_layers})\..*"]
    return table, unused


def key_table_phi(config: PhiConfig, layout: str, ours: str) -> dict:
    """Phi-2 keys -> ours. layout "current": transformers naming (model.layers.{i}.self_attn.q_proj ...);
    "legacy": the MixFormer naming (transformer.h.{i}.mixer.Wqkv ...), whose fused Wqkv rows are [Q; K; V]."""
    table, hidden = {}, config.hidden_size
    current = layout == "current"
    embedding = "model.embed_tokens.weight" if current else "transformer.embd.wte.weight"
    table[embedding] = [(f"{ours}embed_tokens.weight", None)]
    for p in ("weight", "bias"):
        table[f"model.final_layernorm.{p}" if current else f"lm_head.ln.{p}"] = [(f"{ours}final_layernorm.{p}", None)]
        table[f"lm_head.{p}" if current else f"lm_head.linear.{p}"] = [(f"{ours}lm_head.{p}", None)]
        for i in range(config.num_hidden_layers):
            block, mine = (f"model.layers.{i}" if current else f"transformer.h.{i}"), f"{ours}layers.{i}"
            if current:
                for name in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.dense", "mlp.fc1", "mlp.fc2"):
                    table[f"{block}.{name}.{p}"] = [(f"{mine}.{name}.{p}", None)]
            else:
                table[f"{block}.ln.{p}"] = [(f"{mine}.input_layernorm.{p}", None)]
                table[f"{block}.mixer.Wqkv.{p}"] = [(f"{mine}.self_attn.{name}.{p}", slice(n * hidden, (n + 1) * hidden))
                                                    for n, name in enumerate(("q_proj", "k_proj", "v_proj"))]
                table[f"{block}.mixer.out_proj.{p}"] = [(f"{mine}.self_attn.dense.{p}", None)]
                table[f"{block}.mlp.fc1.{p}"] = [(f"{mine}.mlp.fc1.{p}", None)]
                table[f"{block}.mlp.fc2.{p}"] = [(f"{mine}.mlp.fc2.{p}", None)]
    return table


def key_table_llama(config: LlamaConfig, ours: str) -> dict:
    """Qwen2 / Phi-3 keys (model.layers.{i}...) -> ours. Qwen2 stores q, k, v, gate, up apart; Phi-3 fuses them:
    qkv_proj rows are [Q; K; V] and gate_up_proj rows [gate; up] (gate first: transformers' chunk(2) order). The
    split names are accepted for Phi-3 too: quant.py writes quantized layers under them."""
    table = {"model.embed_tokens.weight": [(f"{ours}embed_tokens.weight", None)],
             "model.norm.weight": [(f"{ours}norm.weight", None)], "lm_head.weight": [(f"{ours}lm_head.weight", None)]}
    q_size, kv_size = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    parameters = ("weight", "bias") if config.attention_bias else ("weight",)
    for i in range(config.num_hidden_layers):
        block, mine = f"model.layers.{i}", f"{ours}layers.{i}"
        names = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                 "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"]
        names += [f"self_attn.{n}_proj.{p}" for n in "qkv" for p in parameters]
        table.update({f"{block}.{name}": [(f"{mine}.{name}", None)] for name in names})
        if config.family == "phi3":
            table[f"{block}.self_attn.qkv_proj.weight"] = [
                (f"{mine}.self_attn.q_proj.weight", slice(0, q_size)),
                (f"{mine}.self_attn.k_proj.weight", slice(q_size, q_size + kv_size)),
                (f"{mine}.self_attn.v_proj.weight", slice(q_size + kv_size, q_size + 2 * kv_size))]
            width = config.intermediate_size
            table[f"{block}.mlp.gate_up_proj.weight"] = [(f"{mine}.mlp.gate_proj.weight", slice(0, width)),
                                                         (f"{mine}.mlp.up_proj.weight", slice(width, 2 * width))]
    return table


def key_table_imp(config: ImpConfig, layout: str):
    """The whole Imp checkpoint in the current ("imp") or legacy ("imp-legacy") layout -> our Imp module."""
    top = "model." if layout == "imp" else "transformer."
    if isinstance(config.text, LlamaConfig):  # Imp-2B / Imp-4B: only the current layout exists
        table = key_table_llama(config.text, ours="llm.")
    else:
        table = key_table_phi(config.text, "current" if layout == "imp" else "legacy", ours="llm.")
    vision_table, unused = key_table_siglip(config.vision, f"{top}vision_tower.vision_tower.vision_model.", "vision.")
    table.update(vision_table)
    for index, ours in ((0, "linear_1"), (2, "linear_2")):  # mm_projector = Sequential(Linear, GELU, Linear)
        for p in ("weight", "bias"):
            table[f"{top}mm_projector.{index}.{p}"] = [(f"connector.{ours}.{p}", None)]
    return table, unused


def official_names(config: ImpConfig):
    """A function: our parameter name -> its key in the current official layout (used to save)."""
    ours_to_official = {targets[0][0]: key for key, targets in key_table_imp(config, "imp")[0].items()
                        if targets[0][1] is None}  # Phi-3's fused rows: see official_tensors

    def rename(name):
        if name in ours_to_official:
            return ours_to_official[name]
        module, attribute = name.rsplit(".", 1)  # e.g. a quantized layer's "qweight": named after its "weight"
        if module + ".weight" in ours_to_official:
            return ours_to_official[module + ".weight"].rsplit(".", 1)[0] + "." + attribute
        raise KeyError(f"no official name for {name}")
    return rename


def official_tensors(config: ImpConfig, state: dict) -> dict:
    """Our state dict -> the official checkpoint's tensors: renamed, and Phi-3's q, k, v (gate, up) stacked back
    into the fused qkv_proj (gate_up_proj) of Imp-4B."""
    rename, tensors, fused = official_names(config), {}, set()
    if config.template == "phi3":
        for key, targets in key_table_imp(config, "imp")[0].items():
            if len(targets) > 1 and all(name in state for name, _ in targets):
                tensors[key] = torch.cat([state[name] for name, _ in targets]).contiguous()
                fused.update(name for name, _ in targets)
    tensors.update({rename(name): tensor.contiguous() for name, tensor in state.items() if name not in fused})
    return tensors


def build_on_meta(cls, config):
    """Build the module on the meta device: shapes only, no memory, no random init; load_weights fills it."""
    with torch.device("meta"):
        return cls(config)


def load_weights(model: nn.Module, checkpoint: Checkpoint, table: dict, unused: list, dtype, device):
    """Stream every tensor of the checkpoint into `model` through `table`, one at a time, so peak memory stays
    near the model's own size. Unknown, mis-shaped and missing tensors raise one CheckpointError naming them."""
    from safetensors import safe_open
    expected = dict(model.named_parameters()) | dict(model.named_buffers())  # name -> meta tensor (shape only)
    unused_pattern = re.compile("|".join(unused)) if unused else None

    def targets_of(key):
        if key in table:
            return table[key]
        # Quantized layers store e.g. "<layer>.qweight", "<layer>.scales"; SiglipModel's "logit_scale" has no dot.
        module_key, _, attribute = key.rpartition(".")
        if module_key + ".weight" in table and attribute not in ("weight", "bias"):
            return [(table[module_key + ".weight"][0][0].rsplit(".", 1)[0] + "." + attribute, None)]
        return None

    # Check everything from the headers first, so a bad checkpoint fails before any tensor is read.
    plan, unknown, mismatched = {}, [], []
    for key, shape in checkpoint.shapes.items():
        targets = targets_of(key)
        if targets is None or any(name not in expected for name, _ in targets):
            if not (unused_pattern and unused_pattern.fullmatch(key)):
                unknown.append(key)
            continue
        for name, rows in targets:
            piece_shape = ((rows.stop - rows.start),) + shape[1:] if rows else shape
            if tuple(expected[name].shape) != tuple(piece_shape):
                mismatched.append(f"{key} {list(piece_shape)} (expected {list(expected[name].shape)})")
        plan[key] = targets
    loaded = {name for targets in plan.values() for name, _ in targets}
    missing = [name for name in expected if name not in loaded]
    problems = [f"{len(items)} {what}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                for what, items in (("unknown tensors", unknown), ("mis-shaped tensors", mismatched),
                                    ("missing tensors", missing)) if items]
    if problems:
        raise CheckpointError(f"{checkpoint.path} ({checkpoint.layout} layout): " + "; ".join(problems))

    for file in checkpoint.files:
        with safe_open(file, framework="pt") as f:
            keys = [key for key in f.keys() if key in plan]
        for key in keys:
            # The file is opened again for each tensor: safetensors memory-maps it, and every page read stays in
            # our resident memory while the map is open, which would add a whole (2 GB) shard to the peak.
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(key)
            for name, rows in plan[key]:
                piece = tensor[rows].clone() if rows else tensor  # a slice of the fused Wqkv gets its own storage
                module_name, attribute = name.rsplit(".", 1)
                module = model.get_submodule(module_name)
                if attribute in module._parameters:  # weights take the requested dtype ...
                    module._parameters[attribute] = nn.Parameter(piece.to(device, dtype).contiguous(),
                                                                 requires_grad=piece.is_floating_point())
                else:  # ... buffers (quantized integers, their scales) keep the stored one
                    module._buffers[attribute] = piece.to(device).contiguous()
            del tensor
    return model.eval()


# Temporary names carry the writer's process id: "NAME.tmpPID", or "NAME.tmpPID-RANDOM" for a scratch folder; only
# hidden names and our file types match, so that no file of the user's is ever taken for one.
TEMPORARY_NAME = re.compile(r"(\..+|.+\.(json|jsonl|safetensors|pt))\.tmp(?P<pid>\d+)(-\w+)?")


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process (or not a real pid): leave its files alone
        return True
    return True


def remove_stale_temporaries(folder) -> list:
    """Remove what a killed save left in `folder`: temporaries (files or folders) named by TEMPORARY_NAME whose
    process is gone. Those of a live process (another save running now) are left alone. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = TEMPORARY_NAME.fullmatch(name)
        if not match or int(match["pid"]) == os.getpid() or process_is_alive(int(match["pid"])):
            continue
        stale = os.path.join(folder, name)
        if os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(stale)
        removed.append(name)
    return removed


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def write_json(path, obj):
    """Atomic JSON write: a crash leaves the old file or the new one, never half of one."""
    temporary = f"{path}.tmp{os.getpid()}"
    remove_stale_temporaries(os.path.dirname(path) or ".")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written temporary stays behind
        remove_quietly(temporary)
        raise


def save_safetensors_file(tensors: dict, path, metadata=None, save_file=None):
    """safetensors.torch.save_file (or the given one), with its I/O failures (a full disk) raised as the OSError
    they are, not as a SafetensorError whose errno is only in its message."""
    if save_file is None:
        from safetensors.torch import save_file
    try:
        save_file(tensors, path, metadata=metadata)
    except OSError:
        raise
    except Exception as error:  # SafetensorError("Error while serializing: I/O error: ... (os error 28)")
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found:
            raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), path) from None
        raise


def write_safetensors(path, tensors: dict, max_shard_bytes=2 * 1024**3, metadata=None):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past max_shard_bytes
    (the Hugging Face sharding convention). Every file goes through a temporary name and os.replace."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    metadata = dict(metadata or {}, format="pt")
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    remove_stale_temporaries(path)
    for name, shard in zip(names, shards):
        temporary = os.path.join(path, f".{name}.tmp{os.getpid()}")
        try:
            save_safetensors_file(shard, temporary, metadata=metadata)
            os.replace(temporary, os.path.join(path, name))
        except BaseException:  # a full disk, Ctrl-C: no half-written temporary stays behind
            remove_quietly(temporary)
            raise
    index_path = os.path.join(path, "model.safetensors.index.json")
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(index_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        if os.path.exists(index_path):  # a stale index would win over the new single file: remove it
            os.remove(index_path)
    for stale in os.listdir(path):  # shards of an earlier save with another shard count
        if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", stale) and stale not in names:
            os.remove(os.path.join(path, stale))
