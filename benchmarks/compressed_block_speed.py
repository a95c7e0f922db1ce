"""Old vs new forward of one SmolLM2-shaped compressed block (one thread, alternating rounds, median ms).

- DISP: a llama block at the mean per-mask keep fractions of the DISP 0.5 SmolLM2 checkpoint (random channels);
  old = per-Linear gathers + zeros/index_copy outputs in the stock llama layer, new = DispLlamaDecoderLayer.
- Rotary: a MoDeGPT-like CompressedAttention (qk_dim 40 of 64, 12 kept pairs per group); old = per-head gather
  of the host's cos/sin for q and for k; new = one KV-level gather per layer (what CompressedAttention does);
  angles = cos/sin computed per layer from the kept inverse frequencies (the alternative, measured and dropped).
Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/compressed_block_speed.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from leanfm.compress.disp import MASK_NAMES, prune_to_masks
from leanfm.models.compressed import ChannelLinear, CompressedAttention, LayerSpec, rotate_half

KEEP = {"attn_in": 0.75, "attn_out": 0.84, "mlp_in": 0.86, "mlp_mid": 0.46, "mlp_out": 0.93}  # DISP 0.5 means


def old_channel_forward(self: ChannelLinear, x: torch.Tensor) -> torch.Tensor:
    """ChannelLinear.forward before issue 14: gather per Linear, scatter with zeros + index_copy."""
    if self.in_index is not None:
        x = x.index_select(-1, self.index("in_index", x.device))
    y = torch.nn.functional.linear(x, self.weight, self.bias)
    if self.out_index is None:
        return y
    return y.new_zeros(*y.shape[:-1], self.out_features).index_copy(-1, self.index("out_index", y.device), y)


class OldChannelLinear(ChannelLinear):
    forward = old_channel_forward  # type: ignore[assignment]


def old_cos_sin(self: CompressedAttention, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> tuple:
    """CompressedAttention before issue 14: a per-head gather of the host's cos/sin, for q and again for k."""
    half = cos.shape[-1] // 2
    index = self._index(cos.device).repeat_interleave(heads // self.spec.num_kv_heads, dim=0)
    c = cos[..., :half][:, :, index].transpose(1, 2)
    s = sin[..., :half][:, :, index].transpose(1, 2)
    return torch.cat((c, c), -1), torch.cat((s, s), -1)


def old_attention_rotate(self: CompressedAttention, q: torch.Tensor, k: torch.Tensor, cos: Any, sin: Any) -> tuple:
    out = []
    for states, heads in ((q, self.spec.num_heads), (k, self.spec.num_kv_heads)):
        c, s = old_cos_sin(self, cos, sin, heads)
        p = self.spec.rope_pairs
        rot, rest = states[..., : 2 * p], states[..., 2 * p :]
        out.append(torch.cat((rot * c + rotate_half(rot) * s, rest), -1))
    return tuple(out)


def new_attention_rotate(self: CompressedAttention, q: torch.Tensor, k: torch.Tensor, cos: Any, sin: Any) -> tuple:
    c, s = self._cos_sin(cos, sin)
    return self._rotate(q, c, s), self._rotate(k, c, s)


def angles_attention_rotate(self: CompressedAttention, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor,
                            positions: torch.Tensor) -> tuple:
    """The alternative: ``cos(pos * inv_freq[rope_index])`` computed per layer (default rope: scaling 1)."""
    angles = positions[..., None].float() * inv_freq[self._index(q.device)].flatten()  # [B, T, KV*P]
    shape = (*angles.shape[:2], self.spec.num_kv_heads, 1, self.spec.rope_pairs)
    c, s = (f(angles).reshape(shape).permute(0, 2, 3, 1, 4) for f in (torch.cos, torch.sin))
    c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
    return self._rotate(q, c, s), self._rotate(k, c, s)


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def alternate(cases: dict[str, Any], rounds: int) -> dict[str, float]:
    for fn in cases.values():
        fn()  # warm up
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def smollm2_block_model() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=64, rope_parameters={"rope_type": "default",
                         "rope_theta": 100000.0})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def disp_blocks() -> tuple[Any, Any, Any]:
    model = smollm2_block_model()
    widths = {"attn_in": 576, "attn_out": 576, "mlp_in": 576, "mlp_mid": 1536, "mlp_out": 576}
    g = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(1, widths[n], generator=g) < KEEP[n]) for n in MASK_NAMES}
    prune_to_masks(model, masks)
    new = model.model.layers[0]
    old = copy.deepcopy(new)
    old.__class__ = LlamaDecoderLayer
    for module in old.modules():
        if isinstance(module, ChannelLinear):
            module.__class__ = OldChannelLinear
    return model, old, new


def bench_disp(rounds: int) -> None:
    model, old, new = disp_blocks()
    for length in (512, 1):
        h = torch.randn(1, length, 576)
        positions = torch.arange(length)[None]
        pe = model.model.rotary_emb(h, positions)
        kwargs = {"attention_mask": None, "position_ids": positions, "position_embeddings": pe}
        with torch.no_grad():
            torch.testing.assert_close(old(h, **kwargs), new(h, **kwargs), atol=1e-5, rtol=1e-5)
            ms = alternate({"old": functools.partial(old, h, **kwargs), "new": functools.partial(new, h, **kwargs)},
                           rounds)
        print(f"DISP block T={length}: old {ms['old']:.3f} ms, new {ms['new']:.3f} ms "
              f"({ms['old'] / ms['new']:.2f}x)")


def bench_rotary(rounds: int) -> None:
    model = smollm2_block_model()
    rope = [sorted(torch.randperm(32, generator=torch.Generator().manual_seed(g))[:12].tolist()) for g in range(3)]
    spec = LayerSpec(1000, 40, 48, rope, 9, 3, 64)
    bias = dict.fromkeys("qkvo", False)
    attention = CompressedAttention(spec, 576, bias, 0, model.config)
    inv_freq = model.model.rotary_emb.inv_freq
    for length in (512, 1):
        q, k = torch.randn(1, 9, length, 40), torch.randn(1, 3, length, 40)
        positions = torch.arange(100, 100 + length)[None]
        cos, sin = model.model.rotary_emb(q, positions)
        with torch.no_grad():
            reference = old_attention_rotate(attention, q, k, cos, sin)
            for new in (new_attention_rotate(attention, q, k, cos, sin),
                        angles_attention_rotate(attention, q, k, inv_freq, positions)):
                for a, b in zip(new, reference, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            ms = alternate({"old": functools.partial(old_attention_rotate, attention, q, k, cos, sin),
                            "new": functools.partial(new_attention_rotate, attention, q, k, cos, sin),
                            "angles": functools.partial(angles_attention_rotate, attention, q, k, inv_freq, positions)},
                           rounds)
        print(f"rotary q+k T={length}: old {ms['old']:.3f} ms, new (KV-level gather) {ms['new']:.3f} ms, "
              f"per-layer angles {ms['angles']:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_disp(args.rounds)
    bench_rotary(args.rounds)


if __name__ == "__main__":
    main()
