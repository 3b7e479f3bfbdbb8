"""Attach and detach interception on a diffusion transformer without changing its outputs.

A :class:`HookRegistry` adds, for the lifetime of a capture:

- a forward pre-hook on the transformer that reads each call's timestep and token layout;
- a wrapper around the transformer's ``cache_context`` so that ``"cond"``/``"uncond"`` calls
  are labelled with their classifier-free-guidance branch;
- pre/post hooks on each attention module that scope the interception to that module;
- a reference-counted replacement of the module-level attention function the adapter names
  (``dispatch_attention_fn`` for FLUX), which shows the post-RoPE query and key to the
  listener and then calls the original function with the very same arguments, unless the
  listener's optional ``intervene`` returns a replacement output (``attnlens.suppress`` /
  ``redirect``: the model's output then changes, by design);
- for adapters whose processors call ``F.scaled_dot_product_attention`` directly (SD3), a
  ``TorchFunctionMode`` entered for the duration of each attention module's forward, as
  diffusers' own ``hooks/layer_skip.py`` does, which shows the same to the listener;
- a number for each such call within one attention module's forward, from 0 (Mochi calls SDPA
  once per batch row; an IP-adapter call comes second): the adapter's ``call_rows`` says which
  calls hold which rows, and which are ignored;
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
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .errors import HookError, UnsupportedModelError
from .models.base import AttentionLayer, ModelAdapter

__all__ = ["HookRegistry", "Listener"]

# The handler of the attention module whose forward is running, if it is being captured.
_HANDLER: ContextVar[Callable[[tuple, dict], torch.Tensor | None] | None] = ContextVar(
    "attnlens_handler", default=None
)


class Listener(Protocol):
    """What a :class:`HookRegistry` reports to (a :class:`~attnlens.Capture` implements it).

    A listener may also define ``intervene(layer, call_args, call=0) -> Tensor | None``, asked
    before ``attention`` with the call's named arguments: a tensor returned replaces the
    intercepted call's output, ``None`` lets the original run.
    """

    def begin_forward(self, args: tuple, kwargs: dict[str, Any], branch: str) -> bool: ...
    def end_forward(self) -> None: ...
    def attention(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        call: int = 0,
    ) -> None: ...
    def block_output(self, layer: AttentionLayer, output: Any) -> None: ...
    def text_ids(self, input_ids: torch.Tensor, source: str = "text") -> None: ...


class _Patch:
    """A module-level function replaced by a pass-through wrapper while any capture uses it."""

    _installed: ClassVar[dict[str, _Patch]] = {}

    def __init__(self, target: str) -> None:
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
        def passthrough(*args: Any, **kwargs: Any) -> Any:
            handler = _HANDLER.get()
            if handler is None:
                return original(*args, **kwargs)
            replaced = handler(args, kwargs)  # numbers the module's calls; the adapter says which to keep
            if replaced is not None:  # an intervention (attnlens.suppress / redirect) computed the output
                return replaced
            token = _HANDLER.set(None)  # calls nested inside this one (SDPA in dispatch) are part of it
            try:
                return original(*args, **kwargs)
            finally:
                _HANDLER.reset(token)

        self.wrapper = passthrough

    @classmethod
    def acquire(cls, target: str) -> _Patch:
        patch = cls._installed.get(target)
        if patch is None:
            patch = cls._installed[target] = _Patch(target)
            setattr(patch.module, patch.attr, patch.wrapper)
        patch.users += 1
        return patch

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            setattr(self.module, self.attr, self.original)
            type(self)._installed.pop(self.target, None)


# the function itself, so that a wrapper installed over ``F.scaled_dot_product_attention`` (an eager
# reference in a test, another tool) still leads here when it calls the original
_SDPA = torch.nn.functional.scaled_dot_product_attention


class _SDPAMode(torch.overrides.TorchFunctionMode):
    """Shows ``F.scaled_dot_product_attention`` calls to the handler of the running attention module.

    SDPA takes ``(batch, heads, seq, head_dim)``; the handler receives ``(batch, seq, heads,
    head_dim)`` views like every other interception, with grouped key heads repeated.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            handler = _HANDLER.get()
            if handler is not None:
                query = kwargs.get("query", args[0] if args else None)
                key = kwargs.get("key", args[1] if len(args) > 1 else None)
                if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.ndim == 4:
                    if key.shape[1] != query.shape[1] and query.shape[1] % key.shape[1] == 0:
                        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
                    rest = {k: v for k, v in kwargs.items() if k not in ("query", "key")}
                    handler((query.transpose(1, 2), key.transpose(1, 2), *args[2:]), rest)
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
            self._patches.append(_Patch.acquire(target))
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
        args_at = self.adapter.attention_arguments

        def handler(args: tuple, kwargs: dict, call: int) -> torch.Tensor | None:
            def arg(name: str) -> Any:
                pos = args_at[name]
                return kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)

            replaced = None
            intervene = getattr(self.listener, "intervene", None)
            if intervene is not None:  # first: the capture then keeps what the intervened call attends to
                replaced = intervene(layer, {**{name: arg(name) for name in args_at}, **kwargs}, call=call)
            with torch.no_grad():
                q, k, mask, scale = arg("query"), arg("key"), arg("attn_mask"), arg("scale")
                self.listener.attention(layer, q, k, mask, scale, call=call)
            return replaced

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if self._active:
                calls = itertools.count()  # attention calls of this module forward, from 0

                def numbered(args: tuple, kwargs: dict) -> torch.Tensor | None:
                    return handler(args, kwargs, next(calls))

                self._tokens.append(_HANDLER.set(numbered))
                mode = _SDPAMode() if self.adapter.intercept_sdpa else None
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
            _HANDLER.reset(self._tokens.pop())

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
