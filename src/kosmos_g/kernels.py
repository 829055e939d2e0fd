"""Which kernels the micro world's small models run on: the attention kernel of a diffusers
U-Net, and whether a CPU computes in bfloat16 natively.

PyTorch's fused ``scaled_dot_product_attention`` never builds the attention matrix, which is
what SD1.5's 4096-token maps need; on the micro world's 8x8 maps (64 tokens) its CPU kernels
cost more than two plain matmuls and a softmax (docs/micro-world.md: 28% of a
float32 generation call at batch 1; under bfloat16 autocast a U-Net pass takes 1.5x as long).
:func:`use_matmul_attention_if_small` picks the matmul path for U-Nets whose largest
attention map is small and leaves every other U-Net as diffusers built it.

bfloat16 halves the micro U-Net's training step on CPUs with bfloat16 instructions
(AVX512-BF16 or AMX) and slows it down elsewhere, where every product is emulated;
:func:`resolve_precision` turns ``"auto"`` into the right one for the machine.
"""

from __future__ import annotations

from typing import Any

MATMUL_ATTENTION_MAX_TOKENS = 256
"""Largest attention map (tokens) that gets the matmul path: a 16x16 map; the matrix of a
batch-16 call with 4 heads is then 16 MB."""

PRECISIONS = ("fp32", "bf16", "auto")
"""What :func:`resolve_precision` accepts."""


def largest_attention_map(unet: Any) -> int:
    """Tokens of the largest attention map in a ``UNet2DConditionModel`` (0: no attention),
    from its config: the first down block with attention sees ``sample_size / 2**level``
    squared positions; the mid block, when it attends, the smallest map."""
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else max(config.sample_size)
    levels = [i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind or "Attn" in kind]
    if not levels:
        mid = getattr(config, "mid_block_type", None)
        if mid is None or "Attn" not in str(mid):
            return 0
        levels = [len(config.down_block_types) - 1]
    side = max(1, size // 2 ** levels[0])
    return side * side


def use_matmul_attention_if_small(unet: Any, max_tokens: int = MATMUL_ATTENTION_MAX_TOKENS) -> bool:
    """Give ``unet`` diffusers' plain ``AttnProcessor`` when its largest attention map has at
    most ``max_tokens`` tokens (the micro world's U-Nets); returns whether it did. Results
    match the fused kernel's to float rounding.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1,
        ...                             norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4)
        >>> use_matmul_attention_if_small(unet)
        True
    """
    from diffusers.models.attention_processor import AttnProcessor

    tokens = largest_attention_map(unet)
    if not 0 < tokens <= max_tokens:
        return False
    unet.set_attn_processor(AttnProcessor())
    return True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX), as PyTorch's
    own CPU capability checks report it; False where they cannot tell (other architectures)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private checks: absent on other builds
        return False


def resolve_precision(precision: str, device: Any = "cpu") -> str:
    """``"fp32"`` or ``"bf16"`` for ``precision`` (one of :data:`PRECISIONS`) on ``device``:
    ``"auto"`` is bf16 on a CPU with native bfloat16 (:func:`cpu_has_native_bf16`) or a CUDA
    device that supports it, else fp32.

    Example:
        >>> resolve_precision("bf16"), resolve_precision("auto") in ("fp32", "bf16")
        ('bf16', True)
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "fp32"


__all__ = ["MATMUL_ATTENTION_MAX_TOKENS", "PRECISIONS", "cpu_has_native_bf16", "largest_attention_map",
           "resolve_precision", "use_matmul_attention_if_small"]
