"""Registries from config type to handler: what makes ``prune_(model, cfg)`` dispatch.

Each technique verb (``prune_``, ``quantize_``, ``share_``, ...) owns one :class:`Registry`.
A handler is registered under a recipe name (``method: magnitude``) and a config class; the
verb looks the handler up by the config's type, the recipe parser by the name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from edgeslim.core.errors import ConfigError


class Registry:
    """Config class -> handler, and recipe method name -> config class, for one verb."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.handlers: dict[type[BaseModel], Callable[..., Any]] = {}
        self.methods: dict[str, type[BaseModel]] = {}

    def register(
        self, name: str, config_type: type[BaseModel], handler: Callable[..., Any]
    ) -> None:
        """Make ``verb(model, config_type(...))`` call ``handler`` and ``method: name`` valid."""
        self.handlers[config_type] = handler
        self.methods[name] = config_type

    def handler(self, cfg: BaseModel) -> Callable[..., Any]:
        """The handler for ``cfg``'s type, or a ConfigError listing the known configs."""
        found = self.handlers.get(type(cfg))
        if found is None:
            known = ", ".join(c.__name__ for c in self.handlers) or "(none registered)"
            raise ConfigError(
                f"{self.verb}: no handler for config {type(cfg).__name__}; known: {known}"
            )
        return found

    def call(self, model: Any, cfg: BaseModel, **kwargs: Any) -> Any:
        """Run ``cfg``'s handler; a keyword argument it does not take is a ConfigError."""
        handler = self.handler(cfg)
        unknown = sorted(set(kwargs) - set(inspect.signature(handler).parameters))
        if unknown:
            raise ConfigError(f"{type(cfg).__name__} takes no argument(s) {unknown}")
        return handler(model, cfg, **kwargs)

    def accepted(self, cfg: BaseModel, **context: Any) -> dict[str, Any]:
        """The items of ``context`` (``data=``, ``example=`` ...) that ``cfg``'s handler takes."""
        params = inspect.signature(self.handler(cfg)).parameters
        return {k: v for k, v in context.items() if k in params}
