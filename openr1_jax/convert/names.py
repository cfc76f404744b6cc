"""Declarative name tables: our parameter paths <-> Hugging Face tensor names, with the layout change.

Our paths are the dotted paths of the NNX state (`layers.3.attn.q_b_proj.kernel`). A rule maps a regex over
our path to an HF name template and a `Layout` that says how the tensor is stored on each side. HF linear
weights are [out, in]; ours keep the einsum shape with the inputs first (e.g. [Q, N, H] for `q_b_proj`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """How our array relates to the HF tensor(s).

    kind: "same" (identical); "flat" (HF keeps it 1-D, e.g. per-head biases [N*H]); "linear" (HF [out, in] =
    ours reshaped to [in, out] and transposed, `n_in` of our leading dims being inputs); "experts" (HF has one
    linear per expert; ours stacks them on a leading E).
    """

    kind: str = "same"
    n_in: int = 1

    def to_ours(self, hf: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        if self.kind in ("same", "flat"):
            return hf[0].reshape(shape)
        if self.kind == "linear":
            return np.ascontiguousarray(hf[0].T).reshape(shape)
        stacked = np.empty(shape, hf[0].dtype)
        for e, w in enumerate(hf):
            stacked[e] = w.T.reshape(shape[1:])
        return stacked

    def hf_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        if self.kind == "same":
            return [shape]
        if self.kind == "flat":
            return [(_prod(shape),)]
        if self.kind == "linear":
            return [(_prod(shape[self.n_in :]), _prod(shape[: self.n_in]))]
        return [(_prod(shape[2:]), shape[1])] * shape[0]

    def to_hf(self, ours: np.ndarray) -> list[np.ndarray]:
        if self.kind == "same":
            return [ours]
        if self.kind == "flat":
            return [ours.reshape(-1)]
        if self.kind == "linear":
            n_in = _prod(ours.shape[: self.n_in])
            return [np.ascontiguousarray(ours.reshape(n_in, -1).T)]
        return [np.ascontiguousarray(ours[e].reshape(ours.shape[1], -1).T) for e in range(ours.shape[0])]


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64))


SAME, FLAT, LINEAR, LINEAR_2IN, EXPERTS = (
    Layout("same"),
    Layout("flat"),
    Layout("linear", 1),
    Layout("linear", 2),
    Layout("experts"),
)

# (our path regex, HF name template, layout). First match wins. `{i}` is the HF layer index.
_BLOCK_RULES: list[tuple[str, str, Layout]] = [
    (r"input_norm\.scale", "input_layernorm.weight", SAME),
    (r"post_attention_norm\.scale", "post_attention_layernorm.weight", SAME),
    # MLA
    (r"attn\.q_a_norm\.scale", "self_attn.q_a_layernorm.weight", SAME),
    (r"attn\.kv_a_norm\.scale", "self_attn.kv_a_layernorm.weight", SAME),
    (r"attn\.kv_a_proj\.kernel", "self_attn.kv_a_proj_with_mqa.weight", LINEAR),
    (r"attn\.kv_a_proj\.bias", "self_attn.kv_a_proj_with_mqa.bias", SAME),
    # MLA and GQA
    (r"attn\.o_proj\.kernel", "self_attn.o_proj.weight", LINEAR_2IN),
    (r"attn\.(\w+)\.kernel", "self_attn.{0}.weight", LINEAR),
    (r"attn\.(\w+)\.bias", "self_attn.{0}.bias", FLAT),
    # DeepSeekMoE
    (r"mlp\.router\.kernel", "mlp.gate.weight", LINEAR),
    (r"mlp\.router\.e_score_correction_bias", "mlp.gate.e_score_correction_bias", SAME),
    (r"mlp\.experts\.(\w+)", "mlp.experts.{e}.{0}.weight", EXPERTS),
    (r"mlp\.shared_experts\.(\w+)\.kernel", "mlp.shared_experts.{0}.weight", LINEAR),
    # dense MLP
    (r"mlp\.(\w+)\.kernel", "mlp.{0}.weight", LINEAR),
    (r"mlp\.(\w+)\.bias", "mlp.{0}.bias", SAME),
]
_MTP_RULES: list[tuple[str, str, Layout]] = [
    (r"enorm\.scale", "enorm.weight", SAME),
    (r"hnorm\.scale", "hnorm.weight", SAME),
    (r"eh_proj\.kernel", "eh_proj.weight", LINEAR),
    (r"norm\.scale", "shared_head.norm.weight", SAME),
]
_TOP_RULES: list[tuple[str, str, Layout]] = [
    (r"embed\.embedding", "model.embed_tokens.weight", SAME),
    (r"norm\.scale", "model.norm.weight", SAME),
    (r"lm_head\.kernel", "lm_head.weight", LINEAR),
]

# The MTP layer of official checkpoints repeats the main embedding and output head.
MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def _match(rules, path: str) -> tuple[str, Layout] | None:
    for pattern, template, layout in rules:
        m = re.fullmatch(pattern, path)
        if m:
            return template.replace("{0}", m.group(1) if m.groups() else ""), layout
    return None


def hf_names(path: str, shape: tuple[int, ...], num_hidden_layers: int) -> tuple[list[str], Layout]:
    """The HF tensor name(s) holding our parameter `path` (several for stacked experts), and the layout."""
    m = re.fullmatch(r"(layers|mtp)\.(\d+)\.(.*)", path)
    if m is None:
        found = _match(_TOP_RULES, path)
        prefix = ""
    else:
        group, index, rest = m.group(1), int(m.group(2)), m.group(3)
        hf_layer = index if group == "layers" else num_hidden_layers + index
        prefix = f"model.layers.{hf_layer}."
        if group == "mtp" and rest.startswith("block."):
            rest = rest[len("block.") :]
            found = _match(_BLOCK_RULES, rest)
        else:
            found = _match(_MTP_RULES if group == "mtp" else _BLOCK_RULES, rest)
    if found is None:
        raise KeyError(f"no Hugging Face name rule for parameter '{path}'")
    template, layout = found
    if layout.kind == "experts":
        return [prefix + template.replace("{e}", str(e)) for e in range(shape[0])], layout
    return [prefix + template], layout
