"""What every verb-backed stage (``prune``, ``quantize``, ``share``, ``lowrank``) shares:
a YAML body ``{method: NAME, ...the stage's own keys, ...the method's config keys}``, parsed
into the config registered under ``NAME``, and the context the verb receives from the
pipeline (example input, data, calibration inputs, teacher), chosen by what the config
declares (``needs_calib``, ``calib_count()``) and what its handler takes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.core.registry import Registry


class MethodStage(BaseModel):
    """A validated stage body: the method's name, its config and the stage's own keys."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    config: BaseModel
    extra: dict[str, Any] = Field(default_factory=dict)

    def to_recipe(self) -> dict[str, Any]:
        return {"method": self.method, **self.extra, **self.config.model_dump()}


def parse_method(
    body: Any,
    where: str,
    registry: Registry,
    what: str,
    own: type[BaseModel] | None = None,
) -> MethodStage:
    """Validate ``body``: its ``method`` names a config of ``registry`` (``what`` it is, for
    errors); the keys of ``own`` are the stage's own, the rest the config's."""
    methods = registry.methods
    own_keys = set(own.model_fields) - {"method"} if own is not None else set()
    extra: dict[str, Any] = {}
    if own is not None and isinstance(body, dict):  # names a missing 'method' by its path
        given = {k: v for k, v in body.items() if k in own_keys or k == "method"}
        extra = validate(own, given, where).model_dump(exclude={"method"}, exclude_none=True)
    if not isinstance(body, dict) or "method" not in body:
        raise ConfigError(
            f"{where}: must be a mapping with a 'method' key ({', '.join(sorted(methods))}), "
            f"got {body!r}"
        )
    method = body["method"]
    if method not in methods:
        raise ConfigError(f"{where}.method: unknown {what} {method!r}; known: {sorted(methods)}")
    rest = {k: v for k, v in body.items() if k not in own_keys and k != "method"}
    return MethodStage(method=method, config=validate(methods[method], rest, where), extra=extra)


def calibration(cfg: Any, ctx: Any, n: int | None = None) -> Any:
    """The calibration inputs ``cfg`` asks for: the recipe's calibration set for one-shot
    methods, else ``n`` (or ``cfg.calib_count()``) training inputs drawn with the stage's
    seed; None when it asks for none."""
    if cfg.needs_calib:
        return ctx.calibration()
    n = n if n is not None else cfg.calib_count()
    return None if n is None else ctx.data.calib(min(n, len(ctx.data.train)), seed=ctx.seed)


def verb_context(registry: Registry, cfg: Any, ctx: Any, names: tuple[str, ...]) -> dict:
    """The items ``names`` of the pipeline's context (``example``, ``data``, ``progress``,
    ``teacher``, ``seed``) that ``cfg``'s handler takes."""
    context = {name: getattr(ctx, name) for name in names}
    return registry.accepted(cfg, **context)
