"""Exact tiled decoding for diffusers' ``AutoencoderKL`` (the Flux VAE).

Why: the usual tiled decoders (diffusers' ``enable_tiling``, ComfyUI's ``VAEDecodeTiled``) run the whole
decoder per tile, so every GroupNorm normalises a tile with that tile's own statistics. Neighbouring tiles
then disagree, which shows as seams or colour shifts that blending can only hide.

How: a GroupNorm is the only non-local op of the decoder besides the mid-block attention, so the decoder is
cut at its GroupNorms ("barriers") into segments of local ops (pointwise ops, 3x3 convs, nearest 2x
upsampling). Each segment runs tile by tile; each tile reads its input with a halo wide enough for the
segment's convs, so its output equals the untiled one. The full-size activations at the barriers live in an
activation store (on the device while they fit ``memory_budget_bytes``, else in host memory), and the next
GroupNorm's per-group statistics are accumulated while the tiles are written, so every tile is normalised with
the statistics of the whole image. The mid block (with the global self-attention) runs untiled: it works at
1/8 of the image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ZImageError
from .inputs import check_tile_args

__all__ = ["decode_tiled", "estimate_decode_bytes", "free_memory"]


# --------------------------------------------------------------------------------------------- public API
@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, tile_size: int = 512, overlap: int = 64,
                 memory_budget_bytes: int | None = None, on_progress=None) -> torch.Tensor:
    """Decode ``z`` like ``vae.decode(z).sample``, tile by tile, with bounded device memory.

    z: VAE-space latents [B, C, h, w] (already ``z / scaling_factor + shift_factor``) on the VAE's device and in
    its dtype. Returns the decoded sample [B, 3, 8h, 8w] in [-1, 1]-ish.

    tile_size: tile side in output pixels (a multiple of 8, at least 64). It sets the working memory of a
    tile; at lower resolutions and fewer channels the tiles cover more of the image with the same memory.
    overlap: extra context (output pixels) read around each tile. The result is exact for any value, the
    exact minimum halo is always added, so 0 is the fastest; it exists for ComfyUI's tile widgets.
    memory_budget_bytes: device bytes the activation store may keep; activations beyond it go to host memory.
    None: half of the free device memory on CUDA, unlimited elsewhere.
    on_progress: called with no arguments between tiles and between decoder blocks; it may raise to cancel.
    """
    _check_tile_args(tile_size, overlap, memory_budget_bytes)
    _check_latents(vae, z)
    widest_full_res = _widest_full_res_channels(vae.decoder)
    per_tile_elements = tile_size * tile_size * widest_full_res
    out_height = z.shape[-2] * 2 ** (len(vae.decoder.up_blocks) - 1)

    def tile_side(channels: int, height: int) -> int:
        # The same activation memory per tile at every level: narrower layers get bigger tiles.
        return max(1, math.isqrt(per_tile_elements // channels))

    def extra_halo(height: int) -> int:
        return math.ceil(overlap * height / out_height)

    if memory_budget_bytes is None:
        memory_budget_bytes = _default_budget(z.device)
    return _TiledDecoder(vae, tile_side, extra_halo, memory_budget_bytes, on_progress).decode(z)


def estimate_decode_bytes(vae, latent_shape, dtype) -> int:
    """Rough peak extra device memory of an untiled ``vae.decode`` (to decide when to switch to tiling).

    The peak is at the full resolution, where three tensors as wide as the widest full-resolution activation are
    alive at once (a ResnetBlock's input, GroupNorm output and SiLU output; the last upsampling holds as much).
    The mid block at 1/8 resolution holds about eight of its own. CUDA and CPU attention kernels need no score
    matrix; other backends may materialise it.
    """
    batch, _, height, width = (int(s) for s in latent_shape)
    element = torch.empty((), dtype=dtype).element_size()
    decoder = vae.decoder
    scale = 2 ** (len(decoder.up_blocks) - 1)
    latent_pixels = batch * height * width
    full_res = 3 * _widest_full_res_channels(decoder) * latent_pixels * scale * scale
    mid = 8 * decoder.conv_in.out_channels * latent_pixels
    if next(vae.parameters()).device.type not in ("cuda", "cpu"):
        mid += batch * (height * width) ** 2
    return int(1.1 * max(full_res, mid) * element)  # allocator rounding and conv workspaces


# ------------------------------------------------------------------------------------------- validation
def _check_tile_args(tile_size, overlap, memory_budget_bytes) -> None:
    check_tile_args(tile_size, overlap)  # the one tile rule (zimage_core.inputs, ranges from options.py)
    if memory_budget_bytes is not None and (not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 0):
        raise ZImageError(f"memory_budget_bytes must be None or a number of bytes >= 0 (got {memory_budget_bytes!r})")


def _check_latents(vae, z: torch.Tensor) -> None:
    channels = vae.config.latent_channels
    if z.ndim != 4 or z.shape[1] != channels or z.shape[0] < 1 or z.shape[2] < 1 or z.shape[3] < 1:
        raise ZImageError(f"latents must have the shape [batch, {channels}, height, width] (got {list(z.shape)})")


def _check_decoder(decoder) -> None:
    """The tiler re-plays the decoder's forward; refuse layouts it does not know instead of decoding wrongly."""
    def fail(what):
        raise ZImageError(f"tiled decode supports the Flux/SD AutoencoderKL decoder only: {what}")

    if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        fail("conv_norm_out is not a GroupNorm (spatial norm decoders are not supported)")
    for block in decoder.up_blocks:
        if getattr(block, "attentions", None) or not hasattr(block, "resnets"):
            fail(f"{type(block).__name__} is not an UpDecoderBlock2D")
        for resnet in block.resnets:
            if not (isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm)) \
                    or resnet.upsample is not None or resnet.downsample is not None \
                    or resnet.time_emb_proj is not None:
                fail("a ResnetBlock2D has a non-GroupNorm norm, a resampler or a time embedding")
            for conv in (resnet.conv1, resnet.conv2):
                _check_same_conv(conv, fail)
            if resnet.conv_shortcut is not None and tuple(resnet.conv_shortcut.kernel_size) != (1, 1):
                fail("a ResnetBlock2D has a shortcut conv that is not 1x1")
        for upsampler in block.upsamplers or ():
            if upsampler.use_conv_transpose or not upsampler.interpolate or upsampler.norm is not None:
                fail("an Upsample2D is not 'nearest 2x + conv'")
            if upsampler.use_conv:
                _check_same_conv(_upsample_conv(upsampler), fail)
    _check_same_conv(decoder.conv_out, fail)


def _check_same_conv(conv, fail) -> None:
    k = tuple(conv.kernel_size)
    if not (isinstance(conv, nn.Conv2d) and k[0] == k[1] and k[0] % 2 == 1 and tuple(conv.stride) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and tuple(conv.padding) == (k[0] // 2,) * 2
            and conv.padding_mode == "zeros"):
        fail(f"a conv is not a stride-1, zero-padded 'same' conv ({conv})")


def _upsample_conv(upsampler) -> nn.Conv2d:
    return upsampler.conv if upsampler.name == "conv" else upsampler.Conv2d_0


def _widest_full_res_channels(decoder) -> int:
    """Widest activation at the output resolution (256 for Flux: the last upsampling's output)."""
    last = decoder.up_blocks[-1]
    return max(last.resnets[0].in_channels, decoder.conv_norm_out.num_channels)


def free_memory(device: torch.device) -> int | None:
    """Bytes a new tensor can take on a CUDA device (free plus what torch's cache holds unused); None elsewhere.
    The one free-memory probe of the decoders."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def host_free_memory() -> int | None:
    """Available host memory (psutil), or None when psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _default_budget(device: torch.device) -> int:
    free = free_memory(device)
    if free is None:
        return 1 << 62  # CPU and unified memory: the "host" is the same memory
    return free // 2


# ----------------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class _Window:
    """Rows [top, bottom) and columns [left, right) of a level whose full size is height x width."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    def grow(self, halo: int) -> _Window:
        return _Window(max(0, self.top - halo), min(self.height, self.bottom + halo),
                       max(0, self.left - halo), min(self.width, self.right + halo), self.height, self.width)

    def halved(self) -> _Window:
        """The pixels of the half-resolution level that nearest 2x upsampling maps onto this window."""
        return _Window(self.top // 2, -(-self.bottom // 2), self.left // 2, -(-self.right // 2),
                       self.height // 2, self.width // 2)

    def doubled(self) -> _Window:
        return _Window(2 * self.top, 2 * self.bottom, 2 * self.left, 2 * self.right, 2 * self.height, 2 * self.width)

    def shrink_inner(self, ring: int) -> _Window:
        """Drop ``ring`` pixels on the sides that are not the image border."""
        top = self.top + (ring if self.top > 0 else 0)
        bottom = self.bottom - (ring if self.bottom < self.height else 0)
        left = self.left + (ring if self.left > 0 else 0)
        right = self.right - (ring if self.right < self.width else 0)
        return _Window(top, bottom, left, right, self.height, self.width)

    def index(self, inner: _Window | None = None) -> tuple:
        """Index of ``inner`` in a tensor that holds this window (of this window in the full level if None)."""
        if inner is None:
            return (..., slice(self.top, self.bottom), slice(self.left, self.right))
        return (..., slice(inner.top - self.top, inner.bottom - self.top),
                slice(inner.left - self.left, inner.right - self.left))

    def overlaps(self, other: _Window) -> bool:
        return self.top < other.bottom and other.top < self.bottom and self.left < other.right and other.left < self.right


def _tiles(height: int, width: int, side: int) -> list[_Window]:
    """Balanced tiles of at most ``side`` pixels, so a tile that does not divide the image leaves no sliver."""
    rows, cols = -(-height // side), -(-width // side)
    tile_h, tile_w = -(-height // rows), -(-width // cols)
    return [_Window(y, min(y + tile_h, height), x, min(x + tile_w, width), height, width)
            for y in range(0, height, tile_h) for x in range(0, width, tile_w)]


def _same_conv(conv: nn.Conv2d, x: torch.Tensor, window: _Window) -> tuple[torch.Tensor, _Window]:
    """Run a zero-padded 'same' conv on a crop. Its padding is right on image borders only, so the ring on the
    other sides (which saw zeros instead of neighbours) is dropped."""
    ring = conv.padding[0]
    valid = window.shrink_inner(ring)
    return conv(x)[window.index(valid)], valid


# ------------------------------------------------------------------------------------ GroupNorm statistics
class _GroupStats:
    """Per (sample, group) mean and variance of a full activation, accumulated tile by tile.

    Each tile contributes its per-channel sums of x and x^2, reduced in float32 straight from the compute dtype
    (one fused read, no float32 copy of the tile); the sums are accumulated across tiles in float64. That is
    as precise as the bf16/fp16 activations themselves and ~1e-6 relative in fp32.
    """

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.sum = self.sum_sq = None
        self._affine = None  # (mean, var, weight, bias) per (sample, channel), made on first use

    def add(self, tile: torch.Tensor) -> None:
        batch, channels, height, width = tile.shape
        wide = torch.float64 if tile.device.type != "mps" else torch.float32
        sums = tile.sum(dim=(2, 3), dtype=torch.float32)
        squares = torch.linalg.vector_norm(tile, dim=(2, 3), dtype=torch.float32).square()
        sums = sums.to(wide).view(batch, self.groups, -1).sum(-1)
        squares = squares.to(wide).view(batch, self.groups, -1).sum(-1)
        self.count += channels // self.groups * height * width
        self.sum = sums if self.sum is None else self.sum + sums
        self.sum_sq = squares if self.sum_sq is None else self.sum_sq + squares

    def normalize(self, x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        """``norm(x)`` with these statistics: one fused per-channel affine, computed in float32."""
        if norm.num_groups != self.groups:
            raise RuntimeError("statistics were accumulated for another GroupNorm")
        batch, channels, height, width = x.shape
        if self._affine is None:
            per_group = channels // self.groups
            group_mean = self.sum / self.count
            group_var = (self.sum_sq / self.count - group_mean.square()).clamp_min(0)
            mean = group_mean.float().repeat_interleave(per_group, dim=1).reshape(-1)
            var = group_var.float().repeat_interleave(per_group, dim=1).reshape(-1)
            weight = norm.weight.float().repeat(batch) if norm.weight is not None else None
            bias = norm.bias.float().repeat(batch) if norm.bias is not None else None
            self._affine = (mean, var, weight, bias)
        mean, var, weight, bias = self._affine
        flat = x.reshape(1, batch * channels, height, width)
        if x.device.type not in ("cuda", "cpu"):  # no mixed-dtype batch_norm guaranteed: spell it out
            scale = torch.rsqrt(var + norm.eps) * (weight if weight is not None else 1)
            shift = (bias if bias is not None else 0) - mean * scale
            out = (flat.float() * scale[:, None, None] + shift[:, None, None]).to(x.dtype)
        else:
            # batch_norm in eval mode is exactly "(x - mean) / sqrt(var + eps) * weight + bias" per channel, in
            # float32 for any input dtype, in one pass; with the batch folded into the channels every
            # (sample, channel) gets its own group's statistics.
            out = F.batch_norm(flat, mean, var, weight, bias, training=False, momentum=0.0, eps=norm.eps)
        return out.view(batch, channels, height, width)


def _whole_stats(x: torch.Tensor, groups: int) -> _GroupStats:
    stats = _GroupStats(groups)
    stats.add(x)
    return stats


# ------------------------------------------------------------------------------------- activation store
class _Activation:
    data: torch.Tensor

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype


class _DeviceActivation(_Activation):
    """A full-size activation kept on the compute device."""

    def __init__(self, data: torch.Tensor, store: _ActivationStore):
        self.data, self.store = data, store

    def read(self, window: _Window) -> torch.Tensor:
        return self.data[window.index()]

    def write(self, window: _Window, tile: torch.Tensor) -> None:
        self.data[window.index()] = tile

    def flush(self) -> None:
        pass

    def release(self) -> None:
        self.store.device_bytes -= self.data.numel() * self.data.element_size()
        self.data = None


class _HostActivation(_Activation):
    """A full-size activation kept in host memory.

    The bulk is ordinary (pageable) memory: pinning tens of GiB is slow and can starve the host, and a tile
    window is strided anyway. Windows travel through small pinned staging tensors, so the device copies are
    asynchronous DMA; a written tile is copied into the bulk when the next write comes (or on ``flush``), which
    lets the device compute the next tile meanwhile.
    """

    def __init__(self, shape, dtype: torch.dtype, device: torch.device):
        self.data = torch.empty(shape, dtype=dtype)
        self.device = device
        self.pinned = device.type == "cuda"
        self._pending = None  # (window, pinned staging tensor, event)

    def read(self, window: _Window) -> torch.Tensor:
        if self._pending is not None and self._pending[0].overlaps(window):
            self.flush()
        part = self.data[window.index()]
        if not self.pinned:
            return part.to(self.device)
        staging = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
        staging.copy_(part)
        return staging.to(self.device, non_blocking=True)

    def write(self, window: _Window, tile: torch.Tensor) -> None:
        if not self.pinned:
            self.data[window.index()] = tile.to("cpu")
            return
        self.flush()
        staging = torch.empty(tile.shape, dtype=tile.dtype, pin_memory=True)
        staging.copy_(tile, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (window, staging, event)

    def flush(self) -> None:
        if self._pending is not None:
            window, staging, event = self._pending
            event.synchronize()
            self.data[window.index()] = staging
            self._pending = None

    def release(self) -> None:
        self.data = self._pending = None


class _ActivationStore:
    """Places each barrier activation on the device while the live ones fit the budget, else on the host."""

    def __init__(self, device: torch.device, budget_bytes: int):
        self.device, self.budget = device, budget_bytes
        self.device_bytes = 0

    def _fits(self, nbytes: int) -> bool:
        return self.device_bytes + nbytes <= self.budget

    def new(self, shape, dtype: torch.dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        if self._fits(nbytes):
            self.device_bytes += nbytes
            return _DeviceActivation(torch.empty(shape, dtype=dtype, device=self.device), self)
        return _HostActivation(shape, dtype, self.device)

    def adopt(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self._fits(nbytes):
            self.device_bytes += nbytes
            return _DeviceActivation(tensor, self)
        host = _HostActivation(tensor.shape, tensor.dtype, self.device)
        host.data.copy_(tensor)
        return host


# --------------------------------------------------------------------------------------------- the decoder
class _TiledDecoder:
    """Re-plays ``Decoder.forward`` segment by segment, tile by tile, with the decoder's own modules."""

    def __init__(self, vae, tile_side, extra_halo, budget_bytes: int, on_progress=None):
        self.vae, self.decoder = vae, vae.decoder
        self.on_progress = on_progress or (lambda: None)
        _check_decoder(self.decoder)
        self.tile_side = tile_side      # (channels, level height) -> tile side in that level's pixels
        self.extra_halo = extra_halo    # level height -> extra halo in that level's pixels
        self.budget = budget_bytes

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        self.store = _ActivationStore(z.device, self.budget)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        # conv_in and the mid block (global self-attention) run whole: they work at 1/8 of the image size.
        # Stored activations are plain NCHW (the attention leaves channels-last strides behind).
        sample = decoder.mid_block(decoder.conv_in(z)).contiguous()
        stats = _whole_stats(sample, decoder.up_blocks[0].resnets[0].norm1.num_groups)
        x = self.store.adopt(sample)
        del sample
        blocks = list(decoder.up_blocks)
        for b, block in enumerate(blocks):
            self.on_progress()
            # The GroupNorm that reads this block's output: the next block's first norm1, or conv_norm_out.
            next_norm = blocks[b + 1].resnets[0].norm1 if b + 1 < len(blocks) else decoder.conv_norm_out
            upsamplers = list(block.upsamplers or [])
            for i, resnet in enumerate(block.resnets):
                if i + 1 < len(block.resnets):
                    reader = block.resnets[i + 1].norm1
                else:
                    reader = None if upsamplers else next_norm
                x, stats = self._resnet(resnet, x, stats, reader)
            for j, upsampler in enumerate(upsamplers):
                x, stats = self._upsample(upsampler, x, next_norm if j + 1 == len(upsamplers) else None)
        return self._output(x, stats)

    # ---- segments
    def _run(self, out, tiles, compute, next_norm: nn.GroupNorm | None) -> _GroupStats | None:
        """Compute and store every output tile; accumulate the next GroupNorm's statistics on the way."""
        stats = _GroupStats(next_norm.num_groups) if next_norm is not None else None
        for window in tiles:
            self.on_progress()
            tile = compute(window)
            if stats is not None:
                stats.add(tile)
            out.write(window, tile)
            del tile  # free it before the next tile is computed
        out.flush()
        return stats

    def _tiles_for(self, shape, channels: int) -> list[_Window]:
        height, width = shape[-2:]
        return _tiles(height, width, self.tile_side(channels, height))

    def _halo(self, ring: int, height: int) -> int:
        return ring + self.extra_halo(height)

    def _resnet(self, resnet, x, x_stats: _GroupStats, next_norm: nn.GroupNorm | None):
        """ResnetBlock2D: norm1 -> act -> conv1 | norm2 -> act -> dropout -> conv2 (+ shortcut(x))."""
        batch, in_channels, height, width = x.shape
        mid_channels, out_channels = resnet.conv1.out_channels, resnet.conv2.out_channels

        def first_half(window):
            source = window.grow(self._halo(resnet.conv1.padding[0], height))
            h = resnet.nonlinearity(x_stats.normalize(x.read(source), resnet.norm1))
            h, valid = _same_conv(resnet.conv1, h, source)
            return h[valid.index(window)]

        h1 = self.store.new((batch, mid_channels, height, width), x.dtype)
        h1_stats = self._run(h1, self._tiles_for(x.shape, max(in_channels, mid_channels)), first_half,
                             resnet.norm2)

        def second_half(window):
            source = window.grow(self._halo(resnet.conv2.padding[0], height))
            h = resnet.nonlinearity(h1_stats.normalize(h1.read(source), resnet.norm2))
            h = resnet.dropout(h)
            h, valid = _same_conv(resnet.conv2, h, source)
            residual = x.read(window)
            if resnet.conv_shortcut is not None:
                residual = resnet.conv_shortcut(residual)
            return (residual + h[valid.index(window)]) / resnet.output_scale_factor

        # The residual is read only at the tile's own pixels, so the output may overwrite the input in place.
        in_place = resnet.conv_shortcut is None
        out = x if in_place else self.store.new((batch, out_channels, height, width), x.dtype)
        out_stats = self._run(out, self._tiles_for(x.shape, max(in_channels, mid_channels, out_channels)),
                              second_half, next_norm)
        h1.release()
        if not in_place:
            x.release()
        return out, out_stats

    def _upsample(self, upsampler, x, next_norm: nn.GroupNorm | None):
        """Upsample2D: nearest 2x, then its conv."""
        batch, channels, height, width = x.shape
        conv = _upsample_conv(upsampler) if upsampler.use_conv else None
        ring = conv.padding[0] if conv is not None else 0
        out_channels = conv.out_channels if conv is not None else channels

        def compute(window):
            source = window.halved().grow(self._halo(-(-ring // 2), height))
            h = upsampler(x.read(source))
            valid = source.doubled().shrink_inner(ring)
            return h[source.doubled().index(valid)][valid.index(window)]

        out = self.store.new((batch, out_channels, 2 * height, 2 * width), x.dtype)
        stats = self._run(out, self._tiles_for(out.shape, max(channels, out_channels)), compute, next_norm)
        x.release()
        return out, stats

    def _output(self, x, x_stats: _GroupStats) -> torch.Tensor:
        """conv_norm_out -> conv_act -> conv_out, written into the returned image."""
        decoder = self.decoder
        batch, channels, height, width = x.shape

        def compute(window):
            source = window.grow(self._halo(decoder.conv_out.padding[0], height))
            h = decoder.conv_act(x_stats.normalize(x.read(source), decoder.conv_norm_out))
            h, valid = _same_conv(decoder.conv_out, h, source)
            return h[valid.index(window)]

        image = torch.empty((batch, decoder.conv_out.out_channels, height, width), dtype=x.dtype,
                            device=self.store.device)
        self._run(_DeviceActivation(image, self.store), self._tiles_for(x.shape, channels), compute, None)
        x.release()
        return image
