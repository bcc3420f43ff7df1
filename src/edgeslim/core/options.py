"""Config objects: the base every technique config inherits from, and their validation.

Every technique takes a config (``MagnitudePrune(sparsity=0.9)``, ``Int8PTQ()`` ...) that is an
:class:`Options`: unknown keys are refused and a bad value is a :class:`ConfigError` naming the
class and the field. Recipes validate the same classes from YAML through :func:`validate`,
which names the YAML key path instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgeslim.core.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``path: what is wrong (got value)``."""
    lines = []
    for err in exc.errors():
        path = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part not in ("function-after", "function-before"):
                path += f".{part}" if path else str(part)
        where = path or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"{where}: {msg}{shown}")
    return "\n".join(lines)


class Options(BaseModel):
    """Base of every technique's config (``MagnitudePrune``, ``Int8PTQ``, ``KD`` ...).

    Unknown keys are refused, and a bad value raises :class:`ConfigError` that names the class
    and the field (``OBSPrune.sparsity: ...``) instead of pydantic's ``ValidationError``, so
    every mistake a user can make is an :class:`~edgeslim.core.errors.EdgeslimError`. (Recipe
    bodies are validated by :func:`validate`, which reports their YAML key path instead.)
    """

    model_config = ConfigDict(extra="forbid")

    # Capabilities, declared by each config class and read by verbs and pipeline stages
    # (never probed with getattr): see docs/architecture.md.
    needs_calib: ClassVar[bool] = False  # consumes the recipe's calibration set (one-shot LLM)
    trains: ClassVar[bool] = False  # trains the model itself: a stage's finetune is its schedule
    graded: ClassVar[bool] = False  # has a sparsity target that can be reached in steps (scaled)
    builds_graph: ClassVar[bool] = False  # may return a new module (graph mode), never in place

    def require_one_of(self, *fields: str) -> None:
        """Raise ValueError (a validator's error) unless exactly one of ``fields`` is set."""
        given = [k for k in fields if getattr(self, k) is not None]
        if len(given) != 1:
            quoted = [f"'{k}'" for k in fields]
            choices = ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
            got = f" (got {', '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of {choices}{got}")

    @classmethod
    def shared_with(cls, source: Any, **overrides: Any) -> Self:
        """This config built from the fields ``source`` (another config, or any object with
        attributes, such as parsed CLI arguments) has under the same names, then
        ``overrides``."""
        values = {k: getattr(source, k) for k in cls.model_fields if hasattr(source, k)}
        return cls(**{**values, **overrides})

    def in_place(self) -> bool:
        """Whether the verb changes the model in place (else it builds a new module)."""
        return not self.builds_graph

    def calib_count(self) -> int | None:
        """How many calibration inputs a pipeline stage draws for this config (None: none)."""
        return None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, type(self).__name__)) from None

    # Tell pydantic this is its own __init__, so that validating a *mapping* (a recipe body,
    # a nested config) keeps pydantic's path and goes through :func:`validate`, which names
    # the YAML key path; only direct construction in Python comes through here.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def validate(model_type: type[BaseModel], data: Any, prefix: str) -> BaseModel:
    """``model_type.model_validate(data)`` with errors re-raised as ConfigError at ``prefix``."""
    try:
        return model_type.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix)) from None
