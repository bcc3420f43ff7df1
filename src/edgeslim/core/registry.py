"""Registries from config type to handler, and the one helper that makes every verb.

Each technique verb (``prune_``, ``share_``, ``lowrank_``, ``quantize_`` / ``quantize``) owns
one :class:`Registry`. A handler is registered under a recipe name (``method: magnitude``) and
a config class; the verb looks the handler up by the config's type, the recipe parser by the
name. Every handler has one signature::

    handler(model, cfg, ctx: Context) -> log          # ctx.calib, ctx.filter_fn, ctx.data ...

and declares, when it registers, which :class:`Context` fields it reads (``takes=``). Every
verb is made by :meth:`Registry.verb`, so they all check their keywords the same way (a
keyword the method does not take is a :class:`ConfigError`, never silently ignored) and
follow one rule:

- a verb ending in ``_`` changes ``model`` in place; the model is the result and the verb
  returns the handler's log (a dict);
- a verb without it (``quantize``) must build a new module: it works on a copy, returns the
  new model and leaves its argument untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from pydantic import BaseModel
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.selection import FilterFn

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Context:
    """What a verb hands its handler besides the model and the config.

    A handler reads only the fields it declared with ``takes=`` when it registered; a
    caller that passes any other keyword gets a ConfigError naming what the method takes.
    """

    filter_fn: FilterFn | None = None  # False for a (module, name) keeps that layer as it is
    calib: Any = None  # calibration inputs (a tensor, batches, mappings, a DataSplits ...)
    data: Any = None  # a DataSplits, for methods that measure or train
    example: Any = None  # an input batch, for methods that trace the model
    train: Any = None  # a TrainConfig, for methods that train
    teacher: nn.Module | None = None  # distil from it while training
    progress: bool | None = None  # show a progress bar (None: when the terminal is a TTY)
    seed: int = 0  # for methods that train
    batch_size: int = 64  # calibration batch size


CONTEXT_FIELDS = frozenset(f.name for f in fields(Context))


class Registry:
    """Config class -> handler, and recipe method name -> config class, for one verb."""

    def __init__(self, verb: str) -> None:
        self.verb_name = verb
        self.handlers: dict[type[BaseModel], Handler] = {}
        self.methods: dict[str, type[BaseModel]] = {}
        self.replays: dict[type[BaseModel], Handler] = {}
        self.takes: dict[type[BaseModel], frozenset[str]] = {}

    def register(
        self,
        name: str,
        config_type: type[BaseModel],
        handler: Handler,
        *,
        takes: Iterable[str] = (),
        replay: Handler | None = None,
    ) -> None:
        """Make ``verb(model, config_type(...))`` call ``handler`` and ``method: name`` valid.

        ``takes``: the :class:`Context` fields the handler reads (``"calib"``,
        ``"filter_fn"`` ...); the verb accepts exactly these keywords.
        ``replay(model, cfg, log, example)``, for methods that change the model's structure,
        redoes that change on a fresh model from the handler's ``log`` alone (a resumed run
        then loads the saved weights into it) and returns the model."""
        unknown = sorted(set(takes) - CONTEXT_FIELDS)
        if unknown:
            raise ValueError(f"{name}: takes= names no Context field(s) {unknown}")
        self.handlers[config_type] = handler
        self.methods[name] = config_type
        self.takes[config_type] = frozenset(takes)
        if replay is not None:
            self.replays[config_type] = replay

    def replay(self, model: nn.Module, cfg: BaseModel, log: Any, example: Any) -> nn.Module:
        """The structure ``cfg``'s handler left, rebuilt from its log (the model itself for
        methods that change no structure)."""
        found = self.replays.get(type(cfg))
        return model if found is None else found(model, cfg, log, example)

    def handler(self, cfg: BaseModel) -> Handler:
        """The handler for ``cfg``'s type, or a ConfigError listing the known configs."""
        found = self.handlers.get(type(cfg))
        if found is None:
            known = ", ".join(c.__name__ for c in self.handlers) or "(none registered)"
            raise ConfigError(
                f"{self.verb_name}: no handler for config {type(cfg).__name__}; known: {known}"
            )
        return found

    def call(self, model: nn.Module, cfg: BaseModel, **kwargs: Any) -> Any:
        """Run ``cfg``'s handler; a keyword argument it does not take is a ConfigError.

        Keywords given as ``None`` count as not given."""
        handler = self.handler(cfg)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        takes = self.takes[type(cfg)]
        unknown = sorted(set(kwargs) - takes)
        if unknown:
            raise ConfigError(
                f"{type(cfg).__name__} takes no argument(s) {unknown}; "
                f"it takes {sorted(takes) or 'none'}"
            )
        return handler(model, cfg, Context(**kwargs))

    def accepted(self, cfg: BaseModel, **context: Any) -> dict[str, Any]:
        """The items of ``context`` (``data=``, ``example=`` ...) that ``cfg``'s handler takes."""
        self.handler(cfg)
        return {k: v for k, v in context.items() if k in self.takes[type(cfg)]}

    def verb(self, doc: str, *, in_place: bool = True) -> Callable[..., Any]:
        """The public verb for this registry (see the module docstring for the rule)."""

        def in_place_verb(
            model: nn.Module, cfg: BaseModel, *, filter_fn: FilterFn | None = None, **kw: Any
        ) -> Any:
            return self.call(model, cfg, filter_fn=filter_fn, **kw)

        def building_verb(
            model: nn.Module, cfg: BaseModel, *, filter_fn: FilterFn | None = None, **kw: Any
        ) -> nn.Module:
            self.handler(cfg)  # an unknown config fails before the copy
            return self.call(copy.deepcopy(model), cfg, filter_fn=filter_fn, **kw)

        fn = in_place_verb if in_place else building_verb
        fn.__name__ = fn.__qualname__ = self.verb_name
        fn.__doc__ = doc
        return fn
