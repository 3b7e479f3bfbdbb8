"""Attach and detach interception on a diffusion transformer without changing its outputs.

A :class:`HookRegistry` adds, for the lifetime of a capture:

- a forward pre-hook on the transformer that reads each call's timestep and token layout;
- a wrapper around the transformer's ``cache_context`` so that ``"cond"``/``"uncond"`` calls
  are labelled with their classifier-free-guidance branch;
- pre/post hooks on each attention module that scope the interception to that module;
- a ``TorchFunctionMode`` that shows each ``F.scaled_dot_product_attention`` call to the
  listener as an :class:`AttentionCall`, as diffusers' own ``hooks/layer_skip.py`` intercepts
  functions; the listener returns the call's output, computed by the very kernel SDPA would
  run (:mod:`attnlens.kernels`, which also gives the row normaliser) or by an intervention,
  or lets SDPA run. For processors that call SDPA directly (SD3, Mochi, CogVideoX) the mode
  covers the attention module's forward; for those that call a module-level attention
  function (``dispatch_attention_fn`` for FLUX), a reference-counted wrapper of that function
  enters the mode for the call alone, and shows the call itself to the listener when its
  backend never reaches SDPA (flash-attn, sage, xformers: no kernel normaliser then);
- a number for each attention call within one attention module's forward, from 0 (Mochi calls
  SDPA once per batch row; an IP-adapter call comes second): the adapter's ``call_rows`` says
  which calls hold which rows, and which are ignored;
- forward hooks on blocks (hidden-state norms), pre-hooks on the pipeline's text encoders
  (token ids, for word labels) and a wrapper around the pipeline's ``encode_prompt`` (the
  prompt strings, for character offsets).

Everything is removed on :meth:`HookRegistry.detach`, also when the forward raised.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .errors import HookError, UnsupportedModelError
from .kernels import _SDPA  # the function itself: a wrapper over it (a test's oracle) still leads here
from .models.base import AttentionLayer, ModelAdapter

__all__ = ["AttentionCall", "HookRegistry", "Listener"]

# The attention calls of the attention module whose forward is running, if it is being captured.
_CALLS: ContextVar[_Calls | None] = ContextVar("attnlens_calls", default=None)

_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass(frozen=True)
class AttentionCall:
    """One intercepted attention call, in SDPA's layout whatever function was called.

    Attributes:
        query: ``(batch, heads, query, head_dim)``, post-norm and post-RoPE.
        key: ``(batch, key_heads, key, head_dim)``.
        value: ``(batch, key_heads, key, value_dim)``.
        attn_mask: SDPA's mask (boolean, True = attend, or additive), or ``None``.
        dropout_p, is_causal, scale, enable_gqa: as SDPA takes them.
        fused: whether this is the ``F.scaled_dot_product_attention`` call itself, whose output
            the listener may compute with the kernel SDPA would run; ``False`` for an attention
            function whose backend never called SDPA (its output is the original's unless the
            listener replaces it).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    fused: bool = True

    @classmethod
    def of_sdpa(cls, args: tuple, kwargs: dict[str, Any]) -> AttentionCall | None:
        """The call ``F.scaled_dot_product_attention(*args, **kwargs)``; ``None`` unless it is 4-D."""
        bound = {**_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGUMENTS, args, strict=False)), **kwargs}
        if not all(
            isinstance(bound.get(n), torch.Tensor) and bound[n].ndim == 4 for n in _SDPA_ARGUMENTS[:3]
        ):
            return None
        return cls(**{n: bound[n] for n in _SDPA_ARGUMENTS})

    @classmethod
    def of_function(
        cls, args: tuple, kwargs: dict[str, Any], positions: dict[str, int]
    ) -> AttentionCall | None:
        """A call of a ``(batch, seq, heads, head_dim)`` attention function (``dispatch_attention_fn``)."""

        def arg(name: str) -> Any:
            pos = positions.get(name, len(args))
            return (
                kwargs[name]
                if name in kwargs
                else (args[pos] if len(args) > pos else _SDPA_DEFAULTS.get(name))
            )

        q, k, v = arg("query"), arg("key"), arg("value")
        if not all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in (q, k, v)):
            return None
        mask = arg("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape == (q.shape[0], k.shape[1]):
            mask = mask[:, None, None, :]  # a key-padding mask, as diffusers' native backend reads it
        return cls(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            mask,
            float(arg("dropout_p") or 0.0),
            bool(arg("is_causal")),
            arg("scale"),
            bool(arg("enable_gqa")),
            fused=False,
        )


class Listener(Protocol):
    """What a :class:`HookRegistry` reports to (the recorder of a :class:`~attnlens.Capture`)."""

    def begin_forward(self, args: tuple, kwargs: dict[str, Any], branch: str) -> bool: ...
    def end_forward(self) -> None: ...
    def attend(self, layer: AttentionLayer, call: AttentionCall, number: int) -> torch.Tensor | None:
        """The output ``(batch, heads, query, value_dim)`` of one attention call; ``None`` runs the original.

        ``number`` counts the calls of one forward of the layer's module from 0 (a call of
        the attention function and the SDPA call inside it are one call).
        """
        ...

    def block_output(self, layer: AttentionLayer, output: Any) -> None: ...
    def text_ids(self, input_ids: torch.Tensor, source: str = "text") -> None: ...


class _Calls:
    """The attention calls of one forward of one captured attention module, numbered from 0."""

    def __init__(self, layer: AttentionLayer, listener: Listener, mode: bool) -> None:
        self.layer = layer
        self.listener = listener
        self.mode = mode  # whether an SDPA mode covers the whole module forward
        self.count = itertools.count()
        self.outer: list | None = None  # [number, whether SDPA ran] of the attention-function call running

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """An SDPA call: part of the running attention-function call, or a call of its own."""
        if self.outer is not None:
            self.outer[1] = True
            number = self.outer[0]
        else:
            number = next(self.count)
        return self._ask(call, number)

    def function(self, original: Callable, positions: dict[str, int], args: tuple, kwargs: dict) -> Any:
        """A call of an attention function: its SDPA call is seen inside; without one, the call itself."""
        saved, self.outer = self.outer, [next(self.count), False]
        number = self.outer[0]
        try:
            if self.mode:
                out = original(*args, **kwargs)
            else:
                with _SDPAMode():
                    out = original(*args, **kwargs)
            fused = self.outer[1]
        finally:
            self.outer = saved
        if not fused:  # another backend (flash-attn, sage, xformers): the listener sees its q and k
            call = AttentionCall.of_function(args, kwargs, positions)
            replaced = self._ask(call, number) if call is not None else None
            if replaced is not None:
                out = replaced.transpose(1, 2)
        return out

    def _ask(self, call: AttentionCall, number: int) -> torch.Tensor | None:
        token = _CALLS.set(None)  # what the listener runs (kernels, SDPA) is not another call
        try:
            return self.listener.attend(self.layer, call, number)
        finally:
            _CALLS.reset(token)


class _Patch:
    """A module-level attention function replaced by a wrapper while any capture uses it."""

    _installed: ClassVar[dict[str, _Patch]] = {}

    def __init__(self, target: str, positions: dict[str, int]) -> None:
        module_name, _, attr = target.partition(":")
        try:
            self.module = importlib.import_module(module_name)
            self.original = getattr(self.module, attr)
        except (ImportError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"cannot intercept {target}: this diffusers version does not provide it "
                f"(attnlens supports diffusers >= 0.35)"
            ) from exc
        self.target = target
        self.attr = attr
        self.users = 0
        original = self.original

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls = _CALLS.get()
            if calls is None:
                return original(*args, **kwargs)
            return calls.function(original, positions, args, kwargs)

        self.wrapper = wrapper

    @classmethod
    def acquire(cls, target: str, positions: dict[str, int]) -> _Patch:
        patch = cls._installed.get(target)
        if patch is None:
            patch = cls._installed[target] = _Patch(target, positions)
            setattr(patch.module, patch.attr, patch.wrapper)
        patch.users += 1
        return patch

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            setattr(self.module, self.attr, self.original)
            type(self)._installed.pop(self.target, None)


class _SDPAMode(torch.overrides.TorchFunctionMode):
    """Hands ``F.scaled_dot_product_attention`` calls to the running attention module's listener.

    A tensor the listener returns is the call's output (the same kernel's, bit for bit, or an
    intervention's); ``None`` runs SDPA.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            calls = _CALLS.get()
            call = AttentionCall.of_sdpa(args, kwargs) if calls is not None else None
            if call is not None:
                out = calls.attend(call)
                if out is not None:
                    return out
        return func(*args, **kwargs)


class HookRegistry:
    """Interception on one transformer (and its pipeline), reported to a :class:`Listener`.

    Use as a context manager, or call :meth:`attach` and :meth:`detach`. A transformer can
    carry one registry at a time: attaching a second (nesting captures) raises
    :class:`~attnlens.errors.HookError`.
    """

    _hooked: ClassVar[weakref.WeakSet[nn.Module]] = weakref.WeakSet()

    def __init__(
        self,
        adapter: ModelAdapter,
        transformer: nn.Module,
        layers: list[AttentionLayer],
        listener: Listener,
        *,
        pipeline: Any | None = None,
        hidden_states: bool = False,
    ) -> None:
        self.adapter = adapter
        self.transformer = transformer
        self.layers = layers
        self.listener = listener
        self.pipeline = pipeline
        self.hidden_states = hidden_states
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._patches: list[_Patch] = []
        self._branch: list[str] = []
        self._tokens: list = []  # ContextVar tokens of the attention modules being run
        self._modes: list[_SDPAMode | None] = []  # SDPA modes entered, one per running attention module
        self._active = False  # whether the running forward is captured
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> HookRegistry:
        if self._attached:
            raise HookError("this HookRegistry is already attached")
        if self.transformer in self._hooked:
            raise HookError(
                f"a capture is already attached to this {type(self.transformer).__name__}; captures of one "
                "model cannot nest: leave the first `with attnlens.capture(...)` block before another"
            )
        try:
            self._attach()
        except BaseException:
            self._remove()
            raise
        self._hooked.add(self.transformer)
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove every hook and patch; safe to call twice."""
        if not self._attached:
            return
        self._remove()
        self._hooked.discard(self.transformer)
        self._attached = False

    def __enter__(self) -> HookRegistry:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- internals -------------------------------------------------------------------------

    def _attach(self) -> None:
        for target in self.adapter.interceptions(self.transformer):
            self._patches.append(_Patch.acquire(target, self.adapter.attention_arguments))
        t = self.transformer
        self._handles.append(t.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(t.register_forward_hook(self._end, always_call=True))
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_pre_hook(self._enter_layer(layer)))
            self._handles.append(layer.module.register_forward_hook(self._leave_layer, always_call=True))
            if self.hidden_states:
                self._handles.append(layer.block.register_forward_hook(self._block_hook(layer)))
        if callable(getattr(t, "cache_context", None)):
            t.cache_context = self._labelled_cache_context(t.cache_context)
        encoders = self.adapter.text_encoders(self.pipeline) if self.pipeline is not None else []
        for source, encoder, _ in encoders:
            hook = self._text_hook(source)
            self._handles.append(encoder.register_forward_pre_hook(hook, with_kwargs=True))
        encode_prompt = getattr(self.pipeline, "encode_prompt", None)
        if callable(encode_prompt) and hasattr(self.listener, "prompt_text"):
            self.pipeline.encode_prompt = self._recording_encode_prompt(encode_prompt)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for patch in self._patches:
            patch.release()
        self._patches.clear()
        if "cache_context" in vars(self.transformer):
            del self.transformer.cache_context
        if self.pipeline is not None and "encode_prompt" in vars(self.pipeline):
            del self.pipeline.encode_prompt
        while self._modes:
            mode = self._modes.pop()
            if mode is not None:
                mode.__exit__(None, None, None)
        self._branch.clear()
        self._tokens.clear()
        self._active = False

    def _labelled_cache_context(self, original: Callable) -> Callable:
        @contextlib.contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            self._branch.append(str(name))
            try:
                with original(name, **kwargs):
                    yield
            finally:
                self._branch.pop()

        return cache_context

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        branch = self._branch[-1] if self._branch else "cond"
        self._active = self.listener.begin_forward(args, kwargs, branch)

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._active:
            self._active = False
            self.listener.end_forward()

    def _enter_layer(self, layer: AttentionLayer) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if self._active:
                mode = _SDPAMode() if self.adapter.intercept_sdpa else None
                self._tokens.append(_CALLS.set(_Calls(layer, self.listener, mode=mode is not None)))
                if mode is not None:
                    mode.__enter__()
                self._modes.append(mode)

        return pre_hook

    def _leave_layer(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._modes:
            mode = self._modes.pop()
            if mode is not None:
                mode.__exit__(None, None, None)
        if self._tokens:
            _CALLS.reset(self._tokens.pop())

    def _block_hook(self, layer: AttentionLayer) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._active:
                with torch.no_grad():
                    self.listener.block_output(layer, output)

        return hook

    def _text_hook(self, source: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                self.listener.text_ids(ids.detach().cpu(), source)

        return hook

    def _recording_encode_prompt(self, original: Callable) -> Callable:
        # the prompt strings give words their character offsets; ids alone lose case and spacing
        @functools.wraps(original)
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            prompt = kwargs.get("prompt", args[0] if args else None)
            if isinstance(prompt, str):
                prompt = [prompt]
            if isinstance(prompt, list | tuple) and all(isinstance(p, str) for p in prompt):
                self.listener.prompt_text(list(prompt))  # type: ignore[attr-defined]
            return original(*args, **kwargs)

        return encode_prompt
