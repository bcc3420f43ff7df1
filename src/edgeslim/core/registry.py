"""Registries from config type to handler, and the one helper that makes every verb.

Each technique verb (``prune_``, ``share_``, ``lowrank_``, ``quantize_`` / ``quantize``) owns
one :class:`Registry`. A handler is registered under a recipe name (``method: magnitude``) and
a config class; the verb looks the handler up by the config's type, the recipe parser by the
name. Every handler has one signature::

    handler(model, cfg, *, filter_fn=None, **context) -> log        # context: calib=, data=, ...

and every verb is made by :meth:`Registry.verb`, so they all check their keywords the same way
(a keyword the method does not take is a :class:`ConfigError`) and follow one rule:

- a verb ending in ``_`` changes ``model`` in place; the model is the result and the verb
  returns the handler's log (a dict);
- a verb without it (``quantize``) must build a new module: it works on a copy, returns the
  new model and leaves its argument untouched.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.selection import FilterFn

Handler = Callable[..., Any]


class Registry:
    """Config class -> handler, and recipe method name -> config class, for one verb."""

    def __init__(self, verb: str) -> None:
        self.verb_name = verb
        self.handlers: dict[type[BaseModel], Handler] = {}
        self.methods: dict[str, type[BaseModel]] = {}
        self.replays: dict[type[BaseModel], Handler] = {}

    def register(
        self,
        name: str,
        config_type: type[BaseModel],
        handler: Handler,
        replay: Handler | None = None,
    ) -> None:
        """Make ``verb(model, config_type(...))`` call ``handler`` and ``method: name`` valid.

        ``replay(model, cfg, log, example)``, for methods that change the model's structure,
        redoes that change on a fresh model from the handler's ``log`` alone (a resumed run
        then loads the saved weights into it) and returns the model."""
        self.handlers[config_type] = handler
        self.methods[name] = config_type
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
        params = inspect.signature(handler).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = sorted(set(kwargs) - set(params)) if not takes_any else []
        if unknown:
            raise ConfigError(f"{type(cfg).__name__} takes no argument(s) {unknown}")
        return handler(model, cfg, **kwargs)

    def accepted(self, cfg: BaseModel, **context: Any) -> dict[str, Any]:
        """The items of ``context`` (``data=``, ``example=`` ...) that ``cfg``'s handler takes."""
        params = inspect.signature(self.handler(cfg)).parameters
        return {k: v for k, v in context.items() if k in params}

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
