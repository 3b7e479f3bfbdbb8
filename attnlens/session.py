"""``attnlens.capture``: record attention during ordinary forward passes.

>>> import attnlens
>>> from attnlens.testing import tiny_flux_transformer, flux_inputs
>>> model = tiny_flux_transformer()
>>> with attnlens.capture(model, keep=("cross", "key_mass"), heads="mean") as cap:
...     _ = model(**flux_inputs(model, height=4, width=6))
>>> cap.result.cross.dims
('sample', 'step', 'layer', 'head', 'query', 'key_text')
>>> cap.result.sizes["query"], cap.result.sizes["head"]
(24, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr

from .capture import CaptureSpec, attention_slices
from .errors import CaptureTooLargeError, HookError, LayoutError
from .hooks import HookRegistry
from .models.base import AttentionLayer, CallLayout
from .models.registry import resolve
from .schema import CapturedStep, SampleGroup, assemble, config_hash
from .text import TokenLabels, label_tokens

__all__ = ["Capture", "capture"]


@dataclass
class _Run:
    """Forwards that belong together: one pass of a sampler (or one bare call) over a batch."""

    layout: CallLayout
    labels: list[TokenLabels]
    prompts: list[str]
    steps: list[CapturedStep] = field(default_factory=list)
    seen: set[tuple[float, str]] = field(default_factory=set)
    last_timestep: float = float("inf")
    denoise_step: int = -1


class Capture:
    """A capture session over one model; see :func:`capture`.

    Attributes:
        spec: what is kept.
        layers: the captured :class:`~attnlens.models.AttentionLayer` objects.
    """

    def __init__(self, model: Any, spec: CaptureSpec, *, labels: Sequence[TokenLabels] | None = None) -> None:
        self.adapter, self.transformer, self.pipeline = resolve(model)
        self.spec = spec
        every = self.adapter.layers(self.transformer)
        chosen = set(spec.select_layers([layer.name for layer in every]))
        self.layers: list[AttentionLayer] = [layer for layer in every if layer.name in chosen]
        heads = {layer.num_heads for layer in self.layers}
        for n in heads:
            spec.select_heads(n)  # raises early on a bad head index
        self._user_labels = list(labels) if labels is not None else None
        self._runs: list[_Run] = []
        self._step: CapturedStep | None = None
        self._pending_text: list[torch.Tensor] = []
        self._full_bytes = 0
        self._new_sample = False
        self._result: xr.Dataset | None = None
        self._registry = HookRegistry(
            self.adapter,
            self.transformer,
            self.layers,
            self,
            pipeline=self.pipeline,
            hidden_states="hidden_norm" in spec.keep,
        )

    # -- context management ----------------------------------------------------------------

    def __enter__(self) -> Capture:
        self._registry.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self._registry.detach()
        self._step = None

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._registry.attached

    def next_sample(self) -> None:
        """Start a new sample at the next forward, even if its timestep would continue a run."""
        self._new_sample = True

    @property
    def result(self) -> xr.Dataset:
        """Everything captured so far, as an in-memory ``xarray.Dataset`` (see :mod:`attnlens.schema`)."""
        if self._result is None:
            self._result = self._assemble()
        return self._result

    # -- Listener --------------------------------------------------------------------------

    def begin_forward(self, args: tuple, kwargs: dict[str, Any], branch: str) -> bool:
        layout = self.adapter.layout(self.transformer, args, kwargs)
        run = self._runs[-1] if self._runs else None
        key = (layout.timestep, branch)
        if (
            run is None
            or self._new_sample
            or run.layout.batch != layout.batch
            or not run.layout.same_tokens(layout)
            or layout.timestep > run.last_timestep
            or key in run.seen
        ):
            run = self._start_run(layout)
        if layout.timestep != run.last_timestep:
            run.denoise_step += 1
            run.last_timestep = layout.timestep
        run.seen.add(key)
        if not self.spec.wants_step(run.denoise_step, layout.timestep):
            return False
        if "full" in self.spec.keep:
            self._reserve_full(layout)
        self._step = CapturedStep(run.denoise_step, layout.timestep, branch, {})
        run.steps.append(self._step)
        self._result = None
        return True

    def end_forward(self) -> None:
        self._step = None

    def attention(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
    ) -> None:
        keeps = self.spec.attention_keeps
        if self._step is None or not keeps:
            return
        layout = self._runs[-1].layout
        heads, reduction = self.spec.select_heads(layer.num_heads)
        out = attention_slices(
            query,
            key,
            text=layout.text,
            image=layout.image,
            keep=keeps,
            scale=scale,
            attn_mask=attn_mask,
            heads=heads,
            reduction=reduction,
            chunk_bytes=self.spec.chunk_bytes,
        )
        for var, tensor in out.items():
            self._keep(var, layer.name, tensor)

    def block_output(self, layer: AttentionLayer, output: Any) -> None:
        if self._step is not None:
            hidden = self.adapter.block_hidden(output)
            self._keep("hidden_norm", layer.name, hidden.float().norm(dim=-1))

    def text_ids(self, input_ids: torch.Tensor) -> None:
        self._pending_text.append(input_ids)

    # -- internals -------------------------------------------------------------------------

    def _keep(self, var: str, layer: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(device=self.spec.device, dtype=self.spec.dtype, non_blocking=True)
        assert self._step is not None
        self._step.arrays.setdefault(var, {})[layer] = tensor

    def _start_run(self, layout: CallLayout) -> _Run:
        self._new_sample = False
        labels, prompts = self._labels_for(layout)
        run = _Run(layout=layout, labels=labels, prompts=prompts)
        self._runs.append(run)
        return run

    def _labels_for(self, layout: CallLayout) -> tuple[list[TokenLabels], list[str]]:
        n_text, batch = len(layout.text), layout.batch
        if self._user_labels is not None:
            labels = self._user_labels
            if len(labels) == 1:
                labels = labels * batch
            if len(labels) != batch or any(len(lab) != n_text for lab in labels):
                raise LayoutError(
                    f"labels describe {len(labels)} samples of {[len(lab) for lab in labels]} tokens, "
                    f"but the forward has {batch} samples of {n_text} text tokens"
                )
            return list(labels), [""] * batch
        pending, self._pending_text = self._pending_text, []
        tokenizer = self.adapter.text_encoder(self.pipeline)[1] if self.pipeline is not None else None
        if not pending or tokenizer is None:
            return [TokenLabels.unknown(n_text)] * batch, [""] * batch
        ids = pending[0]  # the prompt; a negative prompt, if any, is encoded after it
        if ids.shape[-1] != n_text or batch % ids.shape[0]:
            return [TokenLabels.unknown(n_text)] * batch, [""] * batch
        per_prompt = batch // ids.shape[0]
        rows = [ids[i // per_prompt] for i in range(batch)]
        texts = tokenizer.batch_decode(torch.stack(rows), skip_special_tokens=True)
        return [label_tokens(tokenizer, row.tolist()) for row in rows], list(texts)

    def _reserve_full(self, layout: CallLayout) -> None:
        heads, reduction = self.spec.select_heads(self.layers[0].num_heads)
        n_heads = 1 if reduction else len(heads) if heads else self.layers[0].num_heads
        itemsize = torch.empty((), dtype=self.spec.dtype).element_size()
        need = layout.batch * n_heads * layout.seq_len**2 * itemsize * len(self.layers)
        if self._full_bytes + need > self.spec.max_full_bytes:
            raise CaptureTooLargeError(
                f"keeping 'full' for this forward needs {need / 2**20:.1f} MiB ({layout.batch} samples × "
                f"{n_heads} heads × {layout.seq_len}² tokens × {len(self.layers)} layers), which would bring "
                f"the capture to {(self._full_bytes + need) / 2**20:.1f} MiB, above max_full_bytes="
                f"{self.spec.max_full_bytes / 2**20:.1f} MiB; select fewer layers/heads/steps, reduce heads "
                "with heads='mean', or raise max_full_bytes"
            )
        self._full_bytes += need

    def _assemble(self) -> xr.Dataset:
        runs = [r for r in self._runs if r.steps]
        if not runs:
            raise HookError("nothing was captured: run the model inside a `with attnlens.capture(...)` block")
        first = runs[0].layout
        for run in runs[1:]:
            if not run.layout.same_tokens(first):
                raise LayoutError(
                    f"samples differ in token layout ({first.seq_len} vs {run.layout.seq_len} tokens, or "
                    "another image grid) and cannot share one Dataset: capture them separately"
                )
        groups = [
            SampleGroup(
                steps=[
                    CapturedStep(
                        s.denoise_step,
                        s.timestep,
                        s.branch,
                        {v: {k: _numpy(t) for k, t in per.items()} for v, per in s.arrays.items()},
                    )
                    for s in run.steps
                ],
                labels=run.labels,
                prompts=run.prompts,
            )
            for run in runs
        ]
        layer_heads = self.layers[0].num_heads
        config = dict(getattr(self.transformer, "config", {}) or {})
        attrs = {
            "model_class": type(self.transformer).__name__,
            "model_id": str(config.get("_name_or_path", "")),
            "family": self.adapter.family,
            "config_hash": config_hash(config),
            "capture_spec": _describe(self.spec),
            "versions": _versions(),
        }
        return assemble(
            groups,
            layers=[layer.name for layer in self.layers],
            layer_kinds=[layer.kind for layer in self.layers],
            heads=self.spec.head_labels(layer_heads),
            grid=first.grid,
            n_text=len(first.text),
            seq_len=first.seq_len,
            text_positions=first.text.numpy(),
            attrs=attrs,
        )


def capture(
    model: Any,
    spec: CaptureSpec | None = None,
    *,
    labels: Sequence[TokenLabels] | None = None,
    **spec_fields: Any,
) -> Capture:
    """Capture attention from a diffusers pipeline or transformer during ordinary forwards.

    Use as a context manager: hooks attach on entry and detach on exit, also when the
    body raises. The model's outputs are unchanged.

    Args:
        model: a supported pipeline (e.g. ``FluxPipeline``) or transformer
            (e.g. ``FluxTransformer2DModel``); see :func:`attnlens.supported_models`.
        spec: a :class:`CaptureSpec`; or give its fields as keywords instead.
        labels: token labels per sample (or one for all) when calling a bare transformer;
            pipelines are labelled from their own tokenizer.

    Returns:
        a :class:`Capture`; after the block, ``cap.result`` is an ``xarray.Dataset``.

    Forwards are grouped into samples automatically: a forward starts a new sample when its
    timestep is higher than the last one's (a sampler restarted), when the same timestep and
    branch come again (repeated bare calls), or when the batch or token layout changes;
    :meth:`Capture.next_sample` forces one. Each row of a batch is a sample.
    """
    if spec is None:
        spec = CaptureSpec(**spec_fields)
    elif spec_fields:
        raise TypeError("give either a CaptureSpec or its fields as keywords, not both")
    return Capture(model, spec, labels=labels)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _describe(spec: CaptureSpec) -> dict[str, Any]:
    def plain(value: Any) -> Any:  # JSON-able, so that a store can keep the spec as an attribute
        if value is None or isinstance(value, str | int):
            return value
        return repr(value) if callable(value) else list(value)

    return {
        "layers": plain(spec.layers),
        "heads": plain(spec.heads),
        "timesteps": plain(spec.timesteps),
        "keep": list(spec.keep),
        "dtype": str(spec.dtype).removeprefix("torch."),
    }


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"attnlens": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}
