"""Tile-consistent normalization statistics for sliding-window inference.

Per-sample norms (InstanceNorm, GroupNorm, adaptive layers in instance/group/layer mode) compute
their statistics over whatever they are given: in sliding-window inference, one tile. A volume
whose intensity drifts (bias field, contrast uptake, a scanner's z-gradient) then gets a different
exposure per tile and visible seams where the tiles meet (Buglakova et al. 2025, arXiv 2503.19545);
Tiled VAE decoders avoid the same artefact by gathering the statistics over every tile first.

``norm_statistics`` lets the caller choose where eval statistics come from, around their own tiled
inference (MONAI's ``sliding_window_inference`` or any other: this module does not import MONAI)::

    with adanorm.norm_statistics(model, "volume") as stats:
        stats.gather(lambda: sliding_window_inference(image, roi, 4, model, overlap=0))
        logits = sliding_window_inference(image, roi, 4, model, overlap=0.5, mode="gaussian")

``tile_report`` measures how far a tiled prediction is from the whole-volume one, and its seams;
``whole_volume_prediction`` computes that reference from the volume's own voxels, whatever its size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from adanorm.functional.running_stats import Moments
from adanorm.norm import AdaptiveNorm
from adanorm.rules import running_stats_learned

SOURCES = ("tile", "running", "volume")
"""Where eval statistics come from: each tile's own, the layers' running statistics, or the whole volume's."""
MISSING = ("error", "volume", "tile")
"""What ``source="running"`` does for a layer without learned running statistics."""
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _tile_independent(module: nn.Module) -> bool:
    """Whether the layer's eval normalizes with its running statistics whatever the input (so tiling cannot
    change it): an adaptive layer's eval rule, or a native layer that tracks them."""
    if isinstance(module, AdaptiveNorm):
        return module.eval_uses_running_stats()
    if isinstance(module, (_InstanceNorm, _BatchNorm)):
        return module.track_running_stats and module.running_mean is not None
    return False


def _may_normalize_per_tile(module: nn.Module) -> bool:
    """Layers whose eval statistics can depend on the tile: the ones this module takes over."""
    if isinstance(module, AdaptiveNorm):
        return module.mode != "identity" and not _tile_independent(module)
    return isinstance(module, (nn.GroupNorm, _InstanceNorm, _BatchNorm)) and not _tile_independent(module)


def _tile_groups(module: nn.Module, input: Tensor) -> Optional[int]:
    """How many statistics per sample the layer's eval computes for ``input``: C for instance
    statistics (and for batch statistics without running ones, which pool the tiles of a batch),
    the group count for group norm, 1 for layer norm; None for identity (an adaptive layer's
    fallback on too small a tile), which has no statistics to share."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups
    channels = input.shape[1]  # not num_features, which nn.InstanceNorm3d(None) leaves None
    if not isinstance(module, AdaptiveNorm):
        return channels
    statistics = module.eval_statistics(input.shape)  # first: it resolves num_features=None, as forward would
    return {"batch": channels, "instance": channels, "group": module.num_groups, "layer": 1}.get(statistics)


def _learned_running_stats(module: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """Running statistics that describe training data (not the initial 0/1 of a layer that never
    updated them, which are no normalization), or None."""
    if not isinstance(module, AdaptiveNorm) or module.running_mean is None or module.running_var is None:
        return None  # GroupNorm has none; untracked InstanceNorm/BatchNorm have none; tracked ones already use theirs
    learned = running_stats_learned(module.policy.native_eval_rule, module.running_mean, module.running_var,
                                    module.num_batches_tracked)
    return (module.running_mean, module.running_var) if learned else None


def _tile_moments(input: Tensor, groups: int) -> Moments:
    """Count, mean and M2 per group, pooled over the tiles of the batch (each tile's own moments in the
    input's precision, at least float32, then merged exactly in float64: no float64 copy of the tile)."""
    tiles = input.shape[0]
    values = input.detach().reshape(tiles, groups, -1)
    if values.dtype in _LOW_PRECISION:
        values = values.float()
    variance, mean = torch.var_mean(values, dim=2, unbiased=False)
    count = values.shape[2]
    mean, m2 = mean.double(), variance.double() * count
    pooled_mean = mean.mean(0)  # equal counts per tile: Chan's merge reduces to these sums
    return Moments(float(tiles * count), pooled_mean, m2.sum(0) + count * (mean - pooled_mean).square().sum(0))


def _change(new: Moments, old: Moments, eps: float) -> float:
    """The largest change of a normalized activation a statistic moved by: |Δmean| in units of the new
    standard deviation, and the relative change of the standard deviation."""
    new_std = (new.m2 / new.count + eps).sqrt()
    old_std = (old.m2 / old.count + eps).sqrt()
    return max(float(((new.mean - old.mean).abs() / new_std).max()), float((new_std / old_std - 1).abs().max()))


def _normalize(module: nn.Module, input: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """The layer's own affine transform over given per-channel statistics (one fused eval batch_norm)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    dtype = weight.dtype if weight is not None else input.dtype
    return F.batch_norm(input, mean.to(input.device, dtype), var.to(input.device, dtype), weight, bias,
                        False, 0.0, module.eps)


class NormStatistics:
    """Eval statistics of every per-sample norm layer of a model, taken from ``source``.

    Use it as a context manager (``adanorm.norm_statistics``): on entry it wraps the ``forward`` of each
    layer whose eval statistics can depend on the tile (``nn.InstanceNorm1d/2d/3d`` and ``nn.BatchNorm*``
    without running statistics, ``nn.GroupNorm``, adaptive layers in a per-sample mode); on exit, even on
    an exception, every layer gets its own ``forward`` back and the model is exactly as before. Layers
    whose eval already uses running statistics are tile-independent and left alone; so is training.

    Sources:

    * ``"tile"``: each tile's own statistics (what the layers do anyway): a no-op, for code that takes
      the source as an option.
    * ``"running"``: each layer's learned running statistics, which do not depend on the tile. A layer
      without them (``nn.GroupNorm``, ``track_running_stats=False``, an adaptive layer that never updated
      its buffers) raises ``ValueError`` naming it, unless ``missing`` says to use ``"volume"`` or
      ``"tile"`` statistics for such layers: silently changing what those layers compute would hide
      that the model has no population statistics.
    * ``"volume"``: the statistics each layer would compute over the whole volume, gathered by
      ``gather(run)`` over every tile of the caller's tiled inference and merged exactly
      (count/mean/M2 per group, Chan's formula in float64), then applied to every later call.

    Args:
        model (nn.Module): the network, in eval mode; its layers are taken over until exit.
        source (str): ``"tile"``, ``"running"`` or ``"volume"``, as above. Default: ``"volume"``.
        missing (str): under ``"running"``, what layers without learned running statistics use:
            ``"error"`` (raise, naming them), ``"volume"`` or ``"tile"``. Default: ``"error"``.
        tolerance (float): ``gather`` stops once no statistic moved by more than this many standard
            deviations in a pass; 0 runs until every layer is exact. Default: ``1e-4``.
        max_passes (int, optional): at most this many gathering passes; ``None`` runs up to one per
            taken-over layer, which makes every layer exact. Default: ``None``.
        progress (bool): show a progress bar over the gathering passes (needs tqdm). Default: ``False``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import adanorm
        >>> model = nn.Sequential(nn.Conv3d(1, 4, 1), nn.InstanceNorm3d(4), nn.Conv3d(4, 1, 1)).eval()
        >>> volume = torch.randn(1, 1, 8, 8, 8)
        >>> tiles = lambda: torch.cat([model(volume[..., :4]), model(volume[..., 4:])], dim=-1)
        >>> with adanorm.norm_statistics(model, "volume") as stats:
        ...     passes = stats.gather(tiles)
        ...     tiled = tiles()
        >>> torch.allclose(tiled, model(volume), atol=1e-5)
        True
    """

    def __init__(self, model: nn.Module, source: str = "volume", *, missing: str = "error", tolerance: float = 1e-4,
                 max_passes: Optional[int] = None, progress: bool = False) -> None:
        if source not in SOURCES:
            raise ValueError(f"norm_statistics: source={source!r} is unknown; choose one of {SOURCES}.")
        if missing not in MISSING:
            raise ValueError(f"norm_statistics: missing={missing!r} is unknown; choose one of {MISSING}.")
        if not tolerance >= 0:
            raise ValueError(f"norm_statistics: tolerance={tolerance!r} must be >= 0 (0: run until every layer is exact).")
        if max_passes is not None and max_passes < 1:
            raise ValueError(f"norm_statistics: max_passes={max_passes!r} must be at least 1 (or None: no limit).")
        self.tolerance = float(tolerance)
        self.max_passes = max_passes
        self.progress = progress
        self.passes = 0
        """Sliding-window passes the last ``gather`` ran."""
        self.changes: List[float] = []
        """The largest statistic change of each of those passes (inf for the first), in standard deviations."""
        self.layer_sources: Dict[str, str] = {}
        """Each taken-over layer's qualified name and the statistics it uses (``"running"`` or ``"volume"``)."""
        self._layers: Dict[nn.Module, str] = {}
        self._running: Dict[nn.Module, Tuple[Tensor, Tensor]] = {}
        self._originals: Dict[nn.Module, Optional[Callable[..., Any]]] = {}
        self._estimates: Dict[nn.Module, Moments] = {}
        self._pass: Dict[nn.Module, Moments] = {}
        self._order: List[nn.Module] = []
        self._fixed: Set[nn.Module] = set()
        self._gathering = False
        self._open = False
        if source == "tile":
            return
        names = {module: name or type(model).__name__ for name, module in model.named_modules()}
        without: List[str] = []
        for module, name in names.items():
            if not _may_normalize_per_tile(module):
                continue
            running = _learned_running_stats(module) if source == "running" else None
            uses = "volume" if source == "volume" else "running" if running is not None else missing
            if uses == "error":
                without.append(f"{name} ({type(module).__name__})")
            elif uses != "tile":
                self._layers[module] = uses
                self.layer_sources[name] = uses
                if running is not None:
                    self._running[module] = running
        if without:
            raise ValueError(
                f"norm_statistics(source='running'): {len(without)} layer(s) normalize per tile in eval and have no learned "
                f"running statistics: {', '.join(without)}. Use source='volume' (adanorm-predict --norm-stats volume), or "
                f"missing='volume' / missing='tile' to give just these layers whole-volume or per-tile statistics.")
        if model.training and self._layers:
            raise ValueError("norm_statistics sets eval statistics, but the model is in training mode: call model.eval() first.")

    def __enter__(self) -> "NormStatistics":
        if self._open:
            raise RuntimeError("norm_statistics: this context is already entered; make a new one per `with`.")
        for module in self._layers:
            self._originals[module] = module.__dict__.get("forward")  # an instance-level forward someone set before
            module.forward = self._wrapped_forward(module, module.forward)
        self._open = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for module, original in self._originals.items():
            if original is None:
                del module.forward
            else:
                module.forward = original
        self._originals.clear()
        self._estimates.clear()
        self._pass.clear()
        self._open = False

    @property
    def needs_gathering(self) -> bool:
        """Whether some layer uses whole-volume statistics, which ``gather`` must collect before inference."""
        return "volume" in self._layers.values()

    def gather(self, run: Callable[[], Any]) -> int:
        """Collect whole-volume statistics by calling ``run`` (the tiled inference of one volume) in passes,
        and return the number of passes.

        A layer's input depends on how every earlier layer normalized, so exact statistics need the
        earlier layers' statistics first. Pass p normalizes with pass p−1's estimates (pass 1 with each
        tile's own) and gathers new ones; the first p layers in execution order are then exact. It
        stops when every layer is exact (K passes for K per-sample layers), when no statistic moved by
        more than ``tolerance`` (in standard deviations of that statistic) since the previous pass, or
        after ``max_passes``; the prediction is one more pass. The changes shrink by about 2–5× a pass
        (a 6-norm MONAI UNet: 0.5, 0.4, 0.1, 0.04, 0.007), so the default tolerance mostly runs all K
        passes and 1e-2 saves a pass or two; ``changes`` keeps them. Passes run without autograd. A
        non-overlapping tiling (``overlap=0``) counts each voxel once and has about 2^d times fewer
        windows than overlap 0.5, so K passes cost about K/8 of a 3D prediction at overlap 0.5; gathering
        with the prediction's own overlap was also less accurate in tests (voxels near window borders
        count once per window). The statistics are exactly the whole volume's when the tiles partition
        the volume and the network sees nothing across tile borders (1×1×1 convolutions); otherwise
        padding added to reach the window size counts, and features near tile borders (zero padding
        instead of context) differ from those of a whole-volume forward.

        ``run`` must infer one volume: per-sample statistics of a batch of volumes would be pooled, so a
        tensor result with a batch dimension above one is refused.
        """
        if not self._open:
            raise RuntimeError("NormStatistics.gather runs inside the context: `with adanorm.norm_statistics(...) as stats:`.")
        self._estimates.clear()
        self._order.clear()
        self._fixed.clear()
        self.passes = 0
        self.changes = []
        if not self.needs_gathering:
            return 0
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="volume statistics", unit="pass", leave=False)
        try:
            with torch.no_grad():
                while True:
                    self._pass = {}
                    self._gathering = True
                    output = run()
                    self._gathering = False
                    if isinstance(output, Tensor) and output.dim() > 0 and output.shape[0] > 1:
                        raise ValueError(f"NormStatistics.gather: run() returned a batch of {output.shape[0]} volumes; "
                                         f"whole-volume statistics are per volume: gather and infer one volume at a time.")
                    self.passes += 1
                    change = self._update_estimates()
                    self.changes.append(change)
                    self._fixed.update(self._order[:self.passes])
                    if bar is not None:
                        bar.total = len(self._order)
                        bar.update()
                        bar.set_postfix(exact=f"{len(self._fixed)}/{len(self._order)}", change=f"{change:.2g}")
                    if len(self._fixed) >= len(self._order) or (self.passes > 1 and change <= self.tolerance) or \
                            (self.max_passes is not None and self.passes >= self.max_passes):
                        return self.passes
        finally:
            self._gathering = False
            self._pass = {}
            if bar is not None:
                bar.close()

    def _update_estimates(self) -> float:
        """Replace each layer's estimate by this pass's statistics; the largest change (inf on the first pass)."""
        change = 0.0
        for module, gathered in self._pass.items():
            previous = self._estimates.get(module)
            change = max(change, math.inf if previous is None else _change(gathered, previous, module.eps))
            self._estimates[module] = gathered
        return change

    def _wrapped_forward(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        source = self._layers[module]

        def tile_consistent_forward(input: Tensor) -> Tensor:
            groups = None if module.training else _tile_groups(module, input)
            if groups is None:
                return forward(input)
            if source == "running":
                return _normalize(module, input, *self._running[module])
            if self._gathering and module not in self._fixed:
                gathered = _tile_moments(input, groups)
                if module not in self._estimates and module not in self._pass:
                    self._order.append(module)  # first call in this pass: execution order
                self._pass[module] = self._pass[module].merge(gathered) if module in self._pass else gathered
                if module not in self._estimates:
                    return forward(input)  # pass 1: the tile's own statistics, as the layer computes them
            estimate = self._estimates.get(module)
            if estimate is None:
                raise RuntimeError(
                    f"{type(module).__name__}: no whole-volume statistics yet; call stats.gather(run) with the tiled "
                    f"inference of this volume inside `with adanorm.norm_statistics(model, 'volume') as stats:` first.")
            if estimate.mean.numel() != groups:
                raise RuntimeError(
                    f"{type(module).__name__}: gathered {estimate.mean.numel()} statistics per sample but this input of "
                    f"shape {tuple(input.shape)} needs {groups}; gather with tiles of the shape inference uses.")
            per_channel = input.shape[1] // groups
            variance = estimate.m2 / estimate.count  # biased, as instance and group norm use
            return _normalize(module, input, estimate.mean.repeat_interleave(per_channel),
                              variance.repeat_interleave(per_channel))

        return tile_consistent_forward


def norm_statistics(model: nn.Module, source: str = "volume", *, missing: str = "error", tolerance: float = 1e-4,
                    max_passes: Optional[int] = None, progress: bool = False) -> NormStatistics:
    """A context manager under which ``model``'s per-sample norm layers take their eval statistics from
    ``source`` (``"tile"``, ``"running"`` or ``"volume"``): see ``NormStatistics``. With ``"volume"``,
    call ``stats.gather(run)`` with the tiled inference of the volume, then infer::

        with adanorm.norm_statistics(model, "volume", progress=True) as stats:
            stats.gather(lambda: sliding_window_inference(image, roi, 4, model, overlap=0))
            logits = sliding_window_inference(image, roi, 4, model, overlap=0.5, mode="gaussian")

    Args:
        model (nn.Module): the network, in eval mode.
        source (str): ``"tile"``, ``"running"`` or ``"volume"``. Default: ``"volume"``.
        missing (str): under ``"running"``, what layers without learned running statistics use:
            ``"error"``, ``"volume"`` or ``"tile"``. Default: ``"error"``.
        tolerance (float): stop gathering once no statistic moves by more than this many standard
            deviations in a pass. Default: ``1e-4``.
        max_passes (int, optional): at most this many gathering passes. Default: ``None`` (one per layer).
        progress (bool): a progress bar over the passes (needs tqdm). Default: ``False``.

    Returns:
        NormStatistics: the context manager.
    """
    return NormStatistics(model, source, missing=missing, tolerance=tolerance, max_passes=max_passes, progress=progress)


@dataclass(frozen=True)
class TileReport:
    """How much tiling changed a prediction, in units of the whole-volume prediction's standard deviation,
    and how sharp its window borders are (``tile_report`` computes it).

    Args:
        mean_difference (float): mean |tiled − whole| over every output value, divided by the
            whole-volume output's standard deviation.
        max_difference (float): largest |tiled − whole|, divided by the same deviation.
        seam (float): mean |step between neighbouring voxels| across window borders divided by the same
            inside windows, for the tiled prediction: about 1 without seams (NaN with a single window).
        reference_seam (float): the same ratio for the whole-volume prediction at the same planes: what
            the image itself puts there.
    """

    mean_difference: float
    """Mean |tiled − whole| over every output value, divided by the whole-volume output's std."""
    max_difference: float
    """Largest |tiled − whole|, divided by the same std."""
    seam: float
    """Mean |difference between neighbouring voxels| across window borders divided by the same inside
    windows, for the tiled prediction: about 1 without seams (NaN with a single window)."""
    reference_seam: float
    """The same ratio for the whole-volume prediction at the same planes: what the image itself puts there."""

    def __str__(self) -> str:
        return (f"tile mismatch {self.mean_difference:.3g} mean, {self.max_difference:.3g} max (x whole-volume std); "
                f"seams {self.seam:.3g} (whole volume {self.reference_seam:.3g})")


def window_starts(size: int, roi: int, overlap: float) -> List[int]:
    """Where sliding windows start along one axis, as MONAI's ``sliding_window_inference`` places them
    (``_get_scan_interval`` and ``dense_patch_slices``): every ``int(roi·(1−overlap))`` voxels (at least
    one), the last one moved back to end at the border. A volume no larger than the window is one window."""
    if roi >= size:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    starts = []
    for index in range(math.ceil(size / interval)):
        starts.append(min(index * interval, size - roi))
        if index * interval + roi >= size:
            break
    return starts


def _seam_ratio(prediction: Tensor, borders: Sequence[Sequence[int]]) -> float:
    border_sum = inside_sum = 0.0
    border_count = inside_count = 0
    for axis, planes in enumerate(borders):
        if not planes:
            continue  # an axis without borders says nothing about them: its steps stay out of both means
        steps = prediction.diff(dim=2 + axis).abs()
        across = torch.zeros(steps.shape[2 + axis], dtype=torch.bool, device=steps.device)
        across[[plane - 1 for plane in planes]] = True  # the step from plane−1 to plane crosses the border
        shape = [1] * steps.dim()
        shape[2 + axis] = -1
        mask = across.view(shape).expand_as(steps)
        border_sum += float(steps[mask].sum())
        border_count += int(mask.sum())
        inside_sum += float(steps[~mask].sum())
        inside_count += int((~mask).sum())
    if not border_count or not inside_count:
        return math.nan
    return (border_sum / border_count) / (inside_sum / inside_count)


def tile_report(tiled: Tensor, whole: Tensor, roi_size: Union[int, Sequence[int]],
                overlap: Union[float, Sequence[float]] = 0.25) -> TileReport:
    """Compare a tiled prediction with the whole-volume prediction of the same volume, both (N, C, *spatial)
    outputs (logits or probabilities) of the window size and overlap given to ``sliding_window_inference``.

    The difference measures what tiling costs; the seam ratio, where it shows: per-tile statistics
    shift each tile's output as a whole, so the steps across window borders grow while those inside
    stay, even where Gaussian blending hides most of the difference.

    Args:
        tiled (Tensor): the sliding-window prediction, (N, C, *spatial).
        whole (Tensor): the prediction of the whole volume in one window, of the same shape.
        roi_size (int or sequence of int): the window size given to ``sliding_window_inference``.
        overlap (float or sequence of float): its overlap. Default: ``0.25`` (MONAI's default).

    Returns:
        TileReport: the mismatch and seam ratios.

    Raises:
        ValueError: if the predictions differ in shape, or ``roi_size``/``overlap`` do not give one
            value per spatial dimension.
    """
    if tiled.shape != whole.shape:
        raise ValueError(f"tile_report: tiled {tuple(tiled.shape)} and whole-volume {tuple(whole.shape)} predictions "
                         f"differ in shape.")
    spatial = tiled.shape[2:]
    rois = [roi_size] * len(spatial) if isinstance(roi_size, int) else list(roi_size)
    overlaps = [overlap] * len(spatial) if isinstance(overlap, (int, float)) else list(overlap)
    if len(rois) != len(spatial) or len(overlaps) != len(spatial):
        raise ValueError(f"tile_report: roi_size {roi_size!r} and overlap {overlap!r} need one value per spatial "
                         f"dimension of {tuple(spatial)}.")
    tiled, whole = tiled.detach().double(), whole.detach().double()
    difference = (tiled - whole).abs()
    scale = float(whole.std()) if whole.numel() > 1 else 0.0
    scale = scale if scale > 0 else 1.0
    borders = []
    for size, roi, axis_overlap in zip(spatial, rois, overlaps):
        starts = window_starts(size, roi, axis_overlap)
        planes = {start for start in starts if start > 0} | {start + roi for start in starts if start + roi < size}
        borders.append(sorted(planes))
    return TileReport(float(difference.mean()) / scale, float(difference.max()) / scale,
                      _seam_ratio(tiled, borders), _seam_ratio(whole, borders))


_RESAMPLING = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)


def downsampling_factors(model: nn.Module, example: Tensor) -> Tuple[int, ...]:
    """The size multiple a strided network needs, per spatial axis: ``example``'s size over the smallest size any
    convolution or pooling layer outputs for it (MONAI's ``UNet`` with strides (2, 2, 2): 8; ``BasicUNet``: 16).

    Sizes that are multiples of it divide evenly at every downsampling step, so the upsampled features meet their
    skip connections; ``whole_volume_prediction`` pads other sizes to it. Measured by one forward of ``example``,
    an input the network accepts (the training patch; its values do not matter), without autograd.

    Raises:
        ValueError: if the model is in training mode, where the forward would update running statistics.
    """
    if model.training:
        raise ValueError("downsampling_factors runs the model once to measure it: call model.eval() first.")
    smallest = list(example.shape[2:])

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == example.dim():
            smallest[:] = [min(size, out) for size, out in zip(smallest, output.shape[2:])]

    handles = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, _RESAMPLING)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(max(1, round(size / small)) for size, small in zip(example.shape[2:], smallest))


def whole_volume_prediction(model: nn.Module, volume: Tensor, multiple: Sequence[int]) -> Tensor:
    """The model's output for one whole volume in one forward: the reference ``tile_report`` compares a tiled
    prediction with, computed from the volume's own voxels only.

    Where every spatial size is a multiple of ``multiple`` (``downsampling_factors``), this is ``model(volume)``:
    nothing is padded. Otherwise the network cannot run on the volume as it is (a strided convolution rounds an odd
    size up, and the upsampled map no longer fits its skip connection), so the volume is zero-padded at its far end
    to the next multiple and the padding is kept out of every number:

    * each per-sample norm layer (instance, group, layer, batch without running statistics; adaptive layers in
      those modes) takes its statistics from the part of its input that covers real voxels: the first
      ceil(real · size / padded) positions along each axis, ``size`` being that input's own size;
    * every layer's output is zero beyond that part, as a convolution's own zero padding is at a border;
    * the output is cropped back to the volume's size.

    For a network of convolutions with "same" zero padding (any stride), transposed-convolution upsampling, norms,
    pointwise activations and skip concatenations or sums (MONAI's UNet and DynUNet), this equals the forward of
    the unpadded volume in which each upsampled map is cropped to the size of its skip connection: what the
    network computes wherever its size arithmetic allows it. Interpolating upsamplers and poolings see zeros beyond
    the border where the unpadded forward would clamp or drop it. A layer whose ``forward`` a ``norm_statistics``
    context took over keeps that context's statistics (running ones do not depend on the padding).

    Args:
        model (nn.Module): the network, in eval mode.
        volume (Tensor): one volume, (1, C, *spatial).
        multiple (sequence of int): the size multiple the network needs, per spatial axis.

    Returns:
        Tensor: the output, (1, C_out, *spatial), computed without autograd.

    Raises:
        ValueError: if ``volume`` holds more than one volume: per-sample statistics are per volume.
    """
    if volume.shape[0] != 1:
        raise ValueError(f"whole_volume_prediction: {volume.shape[0]} volumes given; its statistics are per volume: pass one.")
    real = tuple(volume.shape[2:])
    padded = tuple(math.ceil(size / step) * step for size, step in zip(real, multiple))
    with torch.no_grad():
        if real == padded:
            return model(volume)
        own_statistics = {module for module in model.modules()
                          if _may_normalize_per_tile(module) and "forward" not in vars(module)}

        def inside(shape: Sequence[int]) -> List[int]:
            """How many leading positions along each spatial axis of a tensor of ``shape`` cover real voxels."""
            return [math.ceil(n * size / p) for n, size, p in zip(real, shape[2:], padded)]

        def real_voxels_only(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, Tensor) or output.dim() != volume.dim():
                return None
            if module in own_statistics:
                input = args[0]
                covered = input[(slice(None), slice(None), *(slice(0, stop) for stop in inside(input.shape)))]
                groups = _tile_groups(module, covered)
                if groups is not None:
                    moments = _tile_moments(covered, groups)
                    per_channel = input.shape[1] // groups
                    output = _normalize(module, input, moments.mean.repeat_interleave(per_channel),
                                        (moments.m2 / moments.count).repeat_interleave(per_channel))
            for axis, stop in enumerate(inside(output.shape)):
                output.narrow(2 + axis, stop, output.shape[2 + axis] - stop).zero_()
            return output

        handles = [module.register_forward_hook(real_voxels_only) for module in model.modules()]
        try:
            output = model(F.pad(volume, [side for size, p in reversed(list(zip(real, padded))) for side in (0, p - size)]))
        finally:
            for handle in handles:
                handle.remove()
    return output[(slice(None), slice(None), *(slice(0, size) for size in real))]
