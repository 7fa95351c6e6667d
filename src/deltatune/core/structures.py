"""Structure maps: canonical names (``attn.q``, ``ffn.down`` …) for known architectures.

A structure map gives, for one architecture family, the block-relative module paths behind each
canonical name. Canonical names are usable as ``targets`` entries, so one recipe
(``targets=["attn.q", "attn.v"]``) places a method on Llama, BERT or T5 alike. Architectures that
fuse q, k and v into one layer (GPT-2, GPT-NeoX) expose it as ``attn.qkv``; asking for ``attn.q``
there is an error that says so instead of silently adapting all three.

Block-level names — ``attn``, ``xattn`` (T5 cross-attention) and ``ffn`` — name a whole
sub-layer: they select its output projection (where sequential forms such as bottleneck adapters
sit, before the residual add) and carry a *tap* on the module whose input is the sub-layer's
input (what parallel forms read). On BERT, whose FFN spans two modules, ``ffn`` is the output
``dense`` layer tapped at ``intermediate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from .errors import TargetError

CANONICAL_NAMES = (
    "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv",
    "xattn.q", "xattn.k", "xattn.v", "xattn.o",
    "ffn.gate", "ffn.up", "ffn.down",
)
#: Sub-layer names: each maps to (tap path, output layer path) pairs.
BLOCK_NAMES = ("attn", "xattn", "ffn")


@dataclass(frozen=True)
class StructureMap:
    """Canonical name → block-relative module paths, for the ``model_types`` of one family.

    Args:
        family: human-readable family name.
        model_types: Hugging Face ``config.model_type`` values this map applies to.
        names: canonical name → tuple of alternative paths relative to a block
            (e.g. ``"self_attn.q_proj"``); a name mapped to ``()`` does not exist separately in
            this family.
        fused: canonical name → the canonical name that holds it in fused architectures.
        blocks: sub-layer name (``attn``, ``xattn``, ``ffn``) → alternative
            ``(tap path, output layer path)`` pairs relative to a block.
    """

    family: str
    model_types: tuple[str, ...]
    names: Mapping[str, tuple[str, ...]]
    fused: Mapping[str, str] = field(default_factory=dict)
    blocks: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def tap(self, canonical: str, relative: str) -> str | None:
        """Block-relative tap path of sub-layer ``canonical`` whose output layer is ``relative``."""
        for tap, out in self.blocks.get(canonical, ()):
            if out == relative:
                return tap
        return None

    def paths(self, canonical: str) -> tuple[str, ...]:
        """Block-relative paths for ``canonical``.

        Raises:
            TargetError: the name is not canonical, or not separate in this family.
        """
        if canonical in BLOCK_NAMES:
            pairs = self.blocks.get(canonical, ())
            if not pairs:
                have = sorted(k for k, v in self.blocks.items() if v)
                raise TargetError(f"{self.family} has no {canonical!r} sub-layer; its "
                                  f"sub-layers are {have}")
            return tuple(out for _, out in pairs)
        if canonical not in CANONICAL_NAMES:
            raise TargetError(f"{canonical!r} is not a canonical name; canonical names are "
                              f"{list(CANONICAL_NAMES) + list(BLOCK_NAMES)}")
        if canonical in self.fused:
            raise TargetError(f"{self.family} fuses q, k and v into one layer, so {canonical!r} "
                              f"cannot be adapted alone; target {self.fused[canonical]!r}")
        paths = self.names.get(canonical, ())
        if not paths:
            available = sorted(k for k, v in self.names.items() if v)
            raise TargetError(f"{self.family} has no {canonical!r}; "
                              f"its canonical names are {available}")
        return paths


def _llama_like(family: str, *model_types: str) -> StructureMap:
    return StructureMap(family, model_types, {
        "attn.q": ("self_attn.q_proj",), "attn.k": ("self_attn.k_proj",),
        "attn.v": ("self_attn.v_proj",), "attn.o": ("self_attn.o_proj",),
        "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "ffn.gate": ("mlp.gate_proj",), "ffn.up": ("mlp.up_proj",),
        "ffn.down": ("mlp.down_proj",),
    }, blocks={"attn": (("self_attn", "self_attn.o_proj"),),
               "ffn": (("mlp", "mlp.down_proj"),)})


def _bert_like(family: str, *model_types: str) -> StructureMap:
    attn = "attention.self"
    return StructureMap(family, model_types, {
        "attn.q": (f"{attn}.query",), "attn.k": (f"{attn}.key",), "attn.v": (f"{attn}.value",),
        "attn.o": ("attention.output.dense",),
        "attn.qkv": (f"{attn}.query", f"{attn}.key", f"{attn}.value"),
        "ffn.up": ("intermediate.dense",), "ffn.down": ("output.dense",),
    }, blocks={"attn": ((attn, "attention.output.dense"),),
               "ffn": (("intermediate", "output.dense"),)})


_FUSED_QKV = {"attn.q": "attn.qkv", "attn.k": "attn.qkv", "attn.v": "attn.qkv"}
_T5_FF = ("layer.1.DenseReluDense", "layer.2.DenseReluDense")

_MAPS: list[StructureMap] = [
    _llama_like("Llama", "llama"),
    _llama_like("Mistral", "mistral"),
    _llama_like("Qwen2", "qwen2"),
    StructureMap("GPT-2", ("gpt2",), {
        "attn.qkv": ("attn.c_attn",), "attn.o": ("attn.c_proj",),
        "ffn.up": ("mlp.c_fc",), "ffn.down": ("mlp.c_proj",),
    }, fused=_FUSED_QKV, blocks={"attn": (("attn", "attn.c_proj"),),
                                 "ffn": (("mlp", "mlp.c_proj"),)}),
    StructureMap("GPT-NeoX", ("gpt_neox",), {
        "attn.qkv": ("attention.query_key_value",), "attn.o": ("attention.dense",),
        "ffn.up": ("mlp.dense_h_to_4h",), "ffn.down": ("mlp.dense_4h_to_h",),
    }, fused=_FUSED_QKV, blocks={"attn": (("attention", "attention.dense"),),
                                 "ffn": (("mlp", "mlp.dense_4h_to_h"),)}),
    _bert_like("BERT", "bert"),
    _bert_like("RoBERTa", "roberta"),
    # ViT: transformers ≥ 5 names (first) and the 4.x names (second).
    StructureMap("ViT", ("vit",), {
        "attn.q": ("attention.q_proj", "attention.attention.query"),
        "attn.k": ("attention.k_proj", "attention.attention.key"),
        "attn.v": ("attention.v_proj", "attention.attention.value"),
        "attn.o": ("attention.o_proj", "attention.output.dense"),
        "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                     "attention.attention.query", "attention.attention.key",
                     "attention.attention.value"),
        "ffn.up": ("mlp.fc1", "intermediate.dense"), "ffn.down": ("mlp.fc2", "output.dense"),
    }, blocks={"attn": (("attention", "attention.o_proj"),
                        ("attention.attention", "attention.output.dense")),
               "ffn": (("mlp", "mlp.fc2"), ("intermediate", "output.dense"))}),
    StructureMap("T5", ("t5", "mt5"), {
        "attn.q": ("layer.0.SelfAttention.q",), "attn.k": ("layer.0.SelfAttention.k",),
        "attn.v": ("layer.0.SelfAttention.v",), "attn.o": ("layer.0.SelfAttention.o",),
        "attn.qkv": tuple(f"layer.0.SelfAttention.{p}" for p in "qkv"),
        "xattn.q": ("layer.1.EncDecAttention.q",), "xattn.k": ("layer.1.EncDecAttention.k",),
        "xattn.v": ("layer.1.EncDecAttention.v",), "xattn.o": ("layer.1.EncDecAttention.o",),
        # T5 v1.0 has one input projection `wi`; gated v1.1 / mT5 have wi_0 (gate) and wi_1.
        "ffn.gate": tuple(f"{p}.wi_0" for p in _T5_FF),
        "ffn.up": tuple(f"{p}.{w}" for p in _T5_FF for w in ("wi", "wi_1")),
        "ffn.down": tuple(f"{p}.wo" for p in _T5_FF),
    }, blocks={"attn": (("layer.0.SelfAttention", "layer.0.SelfAttention.o"),),
               "xattn": (("layer.1.EncDecAttention", "layer.1.EncDecAttention.o"),),
               "ffn": tuple((p, f"{p}.wo") for p in _T5_FF)}),
]


def register_structure(structure: StructureMap) -> None:
    """Add (or replace) the structure map for ``structure.model_types``."""
    _MAPS[:] = [m for m in _MAPS if not set(m.model_types) & set(structure.model_types)]
    _MAPS.append(structure)


def structure_for(model: nn.Module) -> StructureMap | None:
    """The structure map for ``model`` (found by its HF ``config.model_type``), or ``None``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for structure in _MAPS:
        if model_type in structure.model_types:
            return structure
    return None
