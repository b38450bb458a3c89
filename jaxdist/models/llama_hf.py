"""Where each parameter of `jaxdist.models.llama.Llama` lives in a Hugging Face `LlamaForCausalLM`
checkpoint, and how their axes correspond: the one table that loading and saving
(`jaxdist.io.hf`) share.

HF stores every projection as torch's `Linear.weight`, (out features, in features), with heads
flattened into features; jaxdist keeps (in, heads, head dim) and a leading `layers` axis for the
blocks. So each tensor is a transpose and a reshape of one layer's slice of a parameter, which
`HFTensor.axes` records. Rotary features are in HF's "rotate half" order already: q and k need
no permutation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """A parameter (one layer of it, where `name` holds `{layer}`) as HF tensor `name`.

    `axes`: for each HF axis, the parameter's axes (counted without `layers`) it flattens,
    row-major. q_proj (H*D, E) holds wq's (E, H, D) as ((1, 2), (0,)): HF axis 0 flattens heads
    and head features, axis 1 is the embedding."""

    name: str
    axes: tuple[tuple[int, ...], ...]

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    def hf_name(self, layer: int | None = None) -> str:
        return self.name.format(layer=layer)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape for a parameter slice of `shape` (one layer's)."""
        return tuple(math.prod(shape[a] for a in group) for group in self.axes)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """One layer's parameter values as the HF tensor (contiguous, for writing)."""
        order = [a for group in self.axes for a in group]
        return np.ascontiguousarray(x.transpose(order).reshape(self.hf_shape(x.shape)))

    def window(self, index: tuple[slice, ...], shape: tuple[int, ...]
               ) -> tuple[tuple[slice, ...], Callable[[np.ndarray], np.ndarray]]:
        """What to read for `index` (step-1 slices) of a parameter slice of `shape`: one
        contiguous range per HF axis, and the function making the block read into the
        parameter's block.

        A range spans whole inner axes of its group (a head's every feature) and is exact when
        only a group's first axis is split, the case of every strategy's rules (heads split,
        head features whole); a split inner axis reads its outer axis' whole rows, then cuts."""
        ranges, inner_cuts, block_shape = [], [], []
        for group in self.axes:
            outer, inner = index[group[0]], [index[a] for a in group[1:]]
            row = math.prod(shape[a] for a in group[1:])
            ranges.append(slice(outer.start * row, outer.stop * row))
            block_shape += [outer.stop - outer.start, *(shape[a] for a in group[1:])]
            inner_cuts += [slice(None), *inner]
        order = [a for group in self.axes for a in group]

        def finish(block: np.ndarray) -> np.ndarray:
            return block.reshape(block_shape)[tuple(inner_cuts)].transpose(np.argsort(order))

        return tuple(ranges), finish


_LAYER = "model.layers.{layer}."
_PROJECTION_IN = ((1, 2), (0,))  # (heads * dim, embed) -> (embed, heads, dim)
_TRANSPOSED = ((1,), (0,))

# jaxdist's parameter paths (as `jaxdist.core.step.path_name` writes them) -> HF tensors
LLAMA_HF: dict[str, HFTensor] = {
    "embedding": HFTensor("model.embed_tokens.weight", ((0,), (1,))),
    "layers/attn_norm": HFTensor(_LAYER + "input_layernorm.weight", ((0,),)),
    "layers/wq": HFTensor(_LAYER + "self_attn.q_proj.weight", _PROJECTION_IN),
    "layers/wk": HFTensor(_LAYER + "self_attn.k_proj.weight", _PROJECTION_IN),
    "layers/wv": HFTensor(_LAYER + "self_attn.v_proj.weight", _PROJECTION_IN),
    "layers/wo": HFTensor(_LAYER + "self_attn.o_proj.weight", ((2,), (0, 1))),
    "layers/mlp_norm": HFTensor(_LAYER + "post_attention_layernorm.weight", ((0,),)),
    "layers/w_gate": HFTensor(_LAYER + "mlp.gate_proj.weight", _TRANSPOSED),
    "layers/w_up": HFTensor(_LAYER + "mlp.up_proj.weight", _TRANSPOSED),
    "layers/w_down": HFTensor(_LAYER + "mlp.down_proj.weight", _TRANSPOSED),
    "final_norm": HFTensor("model.norm.weight", ((0,),)),
    "unembed": HFTensor("lm_head.weight", _TRANSPOSED),  # untied only: HF may omit it when tied
}

# LlamaConfig fields that change what the model computes -> their HF config.json names
HF_FIELDS = {
    "vocab": "vocab_size", "embed": "hidden_size", "mlp": "intermediate_size",
    "depth": "num_hidden_layers", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "dim": "head_dim", "rope_theta": "rope_theta",
    "rope_scaling": "rope_parameters", "norm_eps": "rms_norm_eps",
    "tied": "tie_word_embeddings",
}
