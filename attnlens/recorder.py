"""The recorder the hooks call: intercepted attention calls in, kept arrays out, forward by forward.

Private to :class:`attnlens.Capture`. For each forward the hooks report, the recorder asks
:class:`~attnlens.grouping.Grouping` which run (sample) and step it belongs to; for each
attention call, it computes the call's output with the kernel SDPA would run, which also
gives the row normaliser (:mod:`attnlens.kernels`), applies an intervention if one is
active, and turns the query and key tensors into the kept variables (:mod:`attnlens.probs`).
Each kept tensor is converted once, to the spec's dtype and device (an asynchronous copy into
pinned memory when it leaves a GPU), and stays in that form until the Dataset of its run is
assembled.

``full`` is not returned by the math but written, chunk of query rows by chunk, to a sink:
:meth:`Recorder.full_sink` returns one per layer and forward, an object with
``write(rows, cols, values)`` (:class:`attnlens.probs.FullSink`), where ``values`` ``(batch,
head, len(rows), len(cols))`` are the probabilities of the joint query rows ``rows`` and key
columns ``cols`` (each a slice or a 1-D index tensor) of the batch rows the call holds. The
default sink is a tensor preallocated (NaN where no call writes) in the spec's dtype and
device and kept when the forward ends. A store-backed sink, which writes each chunk to its
region of a store as it comes, plugs in by overriding :meth:`Recorder.full_sink`; what it
writes then never enters memory as a whole; :class:`attnlens.capture.Capture` does so when
given ``store=`` (``_StreamingRecorder``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import xarray as xr

from . import kernels
from .errors import CaptureTooLargeError, HookError, LayoutError
from .grouping import Grouping, Run, branch_groups, rows_of
from .hooks import AttentionCall
from .interventions import Intervener, intervened_inputs
from .models.base import AttentionLayer, CallLayout, ModelAdapter
from .probs import RECOMPUTE, FullSink, Redirect, TensorSink, attention_slices, placed_slices
from .schema import CapturedStep, SampleGroup, assemble, config_hash
from .spec import CaptureSpec
from .text import TokenLabels

__all__ = ["Recorder"]


class Recorder:
    """Listener of a :class:`~attnlens.hooks.HookRegistry`: what one capture keeps.

    Args:
        adapter: the model family's adapter.
        transformer: the transformer whose forwards are captured.
        pipeline: its pipeline, or ``None`` for a bare transformer.
        spec: what is kept.
        layers: the captured layers.
        labels: token labels given by the user (bare transformers).
        intervener: the active intervention, if any.
        members: the pipeline's transformers by name (Wan 2.2 has two).
        new_run: called when a run starts, with the one before (``None`` for the first), to
            stream it to a store.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        transformer: torch.nn.Module,
        pipeline: Any,
        spec: CaptureSpec,
        layers: list[AttentionLayer],
        *,
        labels: Sequence[TokenLabels] | None = None,
        intervener: Intervener | None = None,
        members: dict[str, torch.nn.Module] | None = None,
        new_run: Callable[[Run | None], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self.transformer = transformer
        self.pipeline = pipeline
        self.spec = spec
        self.layers = layers
        self.kept = {layer.name for layer in layers}
        self.intervener = intervener
        self.members = members or {"transformer": transformer}
        self.new_run = new_run
        self.open_ids: list[str] | None = None  # the ids of the running `with cap.sample(...)` block
        self.grouping = Grouping(
            self._start_run,
            timesteps_may_rise=adapter.timesteps_may_rise,
            sequential_branches=adapter.sequential_branches if pipeline is not None else (),
        )
        self.version = 0  # grows with every captured step, so that a cached Dataset knows it is stale
        self._user_labels = list(labels) if labels is not None else None
        self._layout: CallLayout | None = None  # the forward being run (all its rows)
        self._steps: list[tuple[CapturedStep, torch.Tensor | None]] = []  # kept steps, with their rows
        self._partial: dict[tuple[str, str], torch.Tensor] = {}  # variables filled by several calls
        self._pending_text: dict[str, list[torch.Tensor]] = {}
        self._pending_prompts: list[str] = []
        self._full_bytes = 0

    # -- the hooks' listener ------------------------------------------------------------------

    def begin_forward(
        self, args: tuple, kwargs: dict[str, Any], branch: str, source: str = "transformer"
    ) -> bool:
        layout = self.adapter.layout(self.members.get(source, self.transformer), args, kwargs)
        self._layout, self._steps = layout, []
        groups = branch_groups(self.adapter.branches(self.pipeline, layout, kwargs), branch, layout.batch)
        placed = self.grouping.forward(layout, groups)
        if placed is None or not self.spec.wants_step(placed[0].denoise_step, layout.timestep):
            return self.intervener is not None  # an intervention acts on every forward, kept or not
        run, groups = placed
        if "full" in self.spec.keep:
            self._reserve_full(layout)
        self._steps = [
            (CapturedStep(run.denoise_step, layout.timestep, name, {}, transformer=source), rows)
            for name, rows in groups
        ]
        run.steps.extend(step for step, _ in self._steps)
        self.version += 1
        return True

    def end_forward(self) -> None:
        for (var, name), tensor in self._partial.items():
            self._keep(var, name, tensor)
        for step, _ in self._steps:
            _fill_skipped(step, [layer.name for layer in self.layers])
        self._partial, self._steps, self._layout = {}, [], None

    def reset(self) -> None:
        """Forget the forward being run (it raised, or the capture ended inside it)."""
        self._partial, self._steps, self._layout = {}, [], None

    def attend(self, layer: AttentionLayer, call: AttentionCall, number: int) -> torch.Tensor | None:
        """The output of one attention call (SDPA's kernel's or an intervention's); keeps what is asked."""
        layout = self._layout
        if layout is None:
            return None
        rows = self.adapter.call_rows(layer, layout, number)
        captured = bool(self._steps) and layer.name in self.kept and bool(self.spec.attention_keeps)
        acted = self.intervener is not None and layer.name in self.intervener.layers
        if rows is None or not (captured or acted):
            return None
        row_index = None if rows == slice(None) else torch.arange(layout.batch)[rows]
        call_layout = layout if row_index is None else rows_of(layout, row_index, len(row_index))
        query, key = call.query, call.key
        positions = self.adapter.call_tokens(layer, call_layout, query.shape[2], key.shape[2])
        mask, value, plan = call.attn_mask, call.value, None
        if acted:
            assert self.intervener is not None
            keys = None if positions is None else positions[1].to(torch.long).cpu()
            plan = self.intervener.plan(layout, self.grouping.runs[-1].labels, row_index, keys)
            if plan is not None:
                mask, value = intervened_inputs(*plan, mask, value)
        out = lse = None
        kernel = RECOMPUTE
        if call.fused or plan is not None:  # SDPA's own output, through its kernel, with the normaliser
            args = (mask, call.dropout_p, call.is_causal, call.scale, call.enable_gqa)
            out, lse, kernel = kernels.attention(query, key, value, *args)
        if captured:
            with torch.no_grad():
                self._record(layer, call, call_layout, row_index, positions, mask, lse, kernel, plan)
        return out

    def block_output(self, layer: AttentionLayer, output: Any) -> None:
        if self._steps and layer.name in self.kept:
            norms = self.adapter.block_hidden(output).float().norm(dim=-1)
            layout = self.grouping.runs[-1].layout
            if norms.shape[1] != layout.seq_len:  # a block without text output: its image stream alone
                joint = norms.new_full((norms.shape[0], layout.seq_len), float("nan"))
                joint[:, layout.image.to(norms.device)] = norms
                norms = joint
            self._keep("hidden_norm", layer.name, norms)

    def text_ids(self, input_ids: torch.Tensor, source: str = "text") -> None:
        self._pending_text.setdefault(source, []).append(input_ids)

    def prompt_text(self, prompts: list[str]) -> None:
        """The prompt strings a pipeline's ``encode_prompt`` received (the first call is the prompt)."""
        if not self._pending_prompts:
            self._pending_prompts = list(prompts)

    def member(self, name: str) -> _Member:
        """The listener of a pipeline's further transformer (Wan 2.2's ``transformer_2``)."""
        return _Member(self, name)

    # -- full, chunk by chunk ------------------------------------------------------------------

    def full_sink(
        self, layer: str, rows: torch.Tensor | None, shape: tuple[int, ...], device: Any, whole: bool
    ) -> FullSink:
        """The sink of ``full`` for one call of ``layer`` in the running forward.

        Args:
            layer: the layer's name.
            rows: the forward's batch rows the call holds, consecutive (``None``: all).
            shape: ``(forward batch, head, query_all, key)`` of the layer's ``full`` in this forward.
            device: where the math runs.
            whole: whether the call writes every entry (all rows, the joint sequence); otherwise
                what no call writes stays NaN.
        """
        tensor = self._partial.get(("full", layer))
        if tensor is None:
            tensor = torch.empty(shape, dtype=self.spec.dtype, device=self.spec.device)
            if not whole:  # a pass over N² entries, spared where the call writes them all
                tensor.fill_(float("nan"))
            self._partial[("full", layer)] = tensor
        return TensorSink(tensor, slice(None) if rows is None else slice(int(rows[0]), int(rows[-1]) + 1))

    # -- runs and their Dataset ----------------------------------------------------------------

    def dataset(self, runs: list[Run] | None = None) -> xr.Dataset:
        """The runs captured so far (or ``runs``) as one Dataset of the :mod:`attnlens.schema`."""
        runs = [r for r in (self.grouping.runs if runs is None else runs) if r.steps]
        if not runs:
            raise HookError("nothing was captured: run the model inside a `with attnlens.capture(...)` block")
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # kept tensors were copied to the host asynchronously (`_keep`)
        first = runs[0].layout
        for run in runs[1:]:
            if not run.layout.same_tokens(first):
                raise LayoutError(
                    f"samples differ in token layout ({first.seq_len} vs {run.layout.seq_len} tokens, or "
                    "another image grid) and cannot share one Dataset: capture them separately"
                )
        groups = [SampleGroup(steps=run.steps, labels=run.labels, prompts=run.prompts) for run in runs]
        config = dict(getattr(self.transformer, "config", {}) or {})
        paths: dict[str, list[str]] = {}
        for var, path in sorted({p for run in runs for p in run.paths}):
            paths.setdefault(var, []).append(path)
        attrs = {
            "model_class": type(self.transformer).__name__,
            "model_id": str(config.get("_name_or_path", "")),
            "family": self.adapter.family,
            "config_hash": config_hash(config),
            "capture_spec": self.spec.describe(),
            "capture_paths": paths,
            "versions": _versions(),
            **self.adapter.dataset_attrs(self.transformer),
            **({"intervention": self.intervener.intervention.describe()} if self.intervener else {}),
        }
        return assemble(
            groups,
            layers=[layer.name for layer in self.layers],
            layer_kinds=[layer.kind for layer in self.layers],
            heads=self.spec.head_labels(self.layers[0].num_heads),
            grid=first.grid,
            n_text=len(first.text),
            seq_len=first.seq_len,
            text_positions=first.text.numpy(),
            attrs=attrs,
        )

    # -- internals ----------------------------------------------------------------------------

    def _record(
        self,
        layer: AttentionLayer,
        call: AttentionCall,
        layout: CallLayout,
        rows: torch.Tensor | None,
        positions: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        lse: torch.Tensor | None,
        kernel: str,
        plan: tuple[torch.Tensor, torch.Tensor | None] | None,
    ) -> None:
        query, key = call.query, call.key
        if key.shape[1] != query.shape[1]:  # grouped key heads: each query head's own key head
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        if call.is_causal:
            mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        heads, reduction = self.spec.select_heads(layer.num_heads)
        n_heads = 1 if reduction else len(heads) if heads is not None else query.shape[1]
        keeps = self.spec.attention_keeps
        redirect = None
        if plan is not None and plan[1] is not None:
            drop, onto = plan
            share = onto.float() / onto.float().sum(dim=1, keepdim=True).clamp_min(1)
            redirect = Redirect(keep=(~drop).float(), share=share)
        forward = self._layout
        assert forward is not None
        sink = None
        if "full" in keeps:
            shape = (forward.batch, n_heads, forward.seq_len, forward.seq_len)
            whole = rows is None and positions is None
            sink = self.full_sink(layer.name, rows, shape, query.device, whole)
        paths: dict[str, str] = {}
        options: dict[str, Any] = dict(
            scale=call.scale,
            attn_mask=mask,
            lse=lse,
            heads=heads,
            reduction=reduction,
            chunk_bytes=self.spec.chunk_bytes,
            redirect=redirect,
            paths=paths,
        )
        if positions is None:
            out = attention_slices(
                query, key, text=layout.text, image=layout.image, keep=keeps, full=sink, **options
            )
        else:
            out = placed_slices(
                query,
                key,
                positions,
                text=layout.text,
                image=layout.image,
                seq_len=layout.seq_len,
                keep=keeps,
                n_heads=n_heads,
                full=sink,
                **options,
            )
        run = self.grouping.runs[-1]
        for var, path in paths.items():
            run.paths.add((var, f"kernel:{kernel}" if path == "kernel" else path))
        for var, tensor in out.items():
            if rows is None:
                self._keep(var, layer.name, tensor)
                continue
            whole = self._partial.get((var, layer.name))
            if whole is None:
                whole = tensor.new_full((forward.batch, *tensor.shape[1:]), float("nan"))
                self._partial[(var, layer.name)] = whole
            whole[rows.to(whole.device)] = tensor

    def _keep(self, var: str, layer: str, tensor: torch.Tensor) -> None:
        """Convert a kept tensor once (dtype, device) and file it under each branch's step."""
        tensor = _converted(tensor, self.spec.dtype, torch.device(self.spec.device))
        for step, rows in self._steps:
            kept = tensor if rows is None else tensor.index_select(0, rows.to(tensor.device))
            step.arrays.setdefault(var, {})[layer] = kept

    def _start_run(self, layout: CallLayout) -> Run:
        if self.new_run is not None:
            self.new_run(self.grouping.runs[-1] if self.grouping.runs else None)
        labels, prompts = self._labels_for(layout)
        return Run(layout=layout, labels=labels, prompts=prompts, ids=self.open_ids)

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
        pending, self._pending_text = self._pending_text, {}
        prompts, self._pending_prompts = self._pending_prompts, []
        found = None
        if self.pipeline is not None and pending:
            found = self.adapter.text_labels(self.pipeline, pending, prompts, layout)
        if found is None or len(found) != batch or any(len(lab) != n_text for lab in found):
            return [_unknown(n_text, layout, i) for i in range(batch)], [""] * batch
        if prompts and batch % len(prompts) == 0:
            texts = [prompts[i // (batch // len(prompts))] for i in range(batch)]
        else:
            texts = [_joined_words(lab) for lab in found]
        return list(found), texts

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


class _Member:
    """Listener of a pipeline's further transformer (Wan 2.2's ``transformer_2``): reports under its name."""

    def __init__(self, recorder: Recorder, name: str) -> None:
        self.recorder = recorder
        self.name = name

    def begin_forward(self, args: tuple, kwargs: dict[str, Any], branch: str) -> bool:
        return self.recorder.begin_forward(args, kwargs, branch, source=self.name)

    def end_forward(self) -> None:
        self.recorder.end_forward()

    def attend(self, layer: AttentionLayer, call: AttentionCall, number: int) -> torch.Tensor | None:
        return self.recorder.attend(layer, call, number)

    def block_output(self, layer: AttentionLayer, output: Any) -> None:
        self.recorder.block_output(layer, output)

    def text_ids(self, input_ids: torch.Tensor, source: str = "text") -> None:
        self.recorder.text_ids(input_ids, source)


def _converted(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tensor`` in ``dtype`` on ``device``; from a GPU to the host, asynchronously into pinned memory."""
    tensor = tensor.to(dtype=dtype)
    if tensor.device.type == "cuda" and device.type == "cpu":
        host = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)
    return tensor.to(device=device)


def _fill_skipped(step: CapturedStep, layers: list[str]) -> None:
    """NaN for the layers a forward skipped (SD3's skip-layer guidance), shaped like the layers it ran."""
    for per_layer in step.arrays.values():
        template = next(iter(per_layer.values()), None)
        for name in layers:
            if template is not None and name not in per_layer:
                per_layer[name] = torch.full_like(template, float("nan"))


def _joined_words(labels: TokenLabels) -> str:
    """The words of a sample's labels, once each, in prompt order."""
    words = {int(i): w for i, w in zip(labels.word_index, labels.word, strict=True) if i >= 0}
    return " ".join(words[i] for i in sorted(words))


def _unknown(n_text: int, layout: CallLayout, row: int) -> TokenLabels:
    """Labels of text positions whose tokens were never seen; masked-out positions are padding."""
    labels = TokenLabels.unknown(n_text)
    if layout.text_mask is not None and row < layout.text_mask.shape[0]:
        labels.token_kind[~layout.text_mask[row].cpu().numpy().astype(bool)] = "pad"
    return labels


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"attnlens": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}
