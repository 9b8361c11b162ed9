"""Job options: one definition per option, and the checks every config uses.

An option is a dataclass field made with :func:`option`: its ``help`` (what it does), ``shown``
(its default as users read it) and ``group`` (where it is listed) make the command line
(``hubert-ray extract``), the config file's keys and the options tables (README: the primary
options; docs/operations.md: every option by group). :func:`option_specs` reads them back.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hubert_ray.core.errors import ConfigError

PRIMARY = "primary"

GROUPS: dict[str, str] = {
    PRIMARY: "what to read, what to compute and where to write it",
    "precision": "reduced-precision checks against FP32 (see Precision assurance)",
    "decode": "reading and decoding the audio, and what a rerun retries",
    "output": "how the output is written and reported",
    "tuning": "batching, model actors and threads: throughput and memory knobs, measured defaults",
}
"""Option groups in the order ``--help-all`` and docs/operations.md list them: the primary
options first (``--help``, the README), then the others."""


def option(default=dataclasses.MISSING, *, help: str, shown: str, group: str, **kwargs):
    """A job option: a dataclass field carrying its ``help``, ``shown`` default and ``group``
    (one of :data:`GROUPS`)."""
    if group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {list(GROUPS)}")
    meta = {"help": help, "shown": shown, "group": group}
    return field(default=default, metadata=meta, **kwargs)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the command line and the tables see it."""

    name: str
    # The command line's value type: str, int, float, bool (a flag), tuple (repeatable,
    # comma-separated) or dict (a JSON object).
    type: type
    help: str
    shown: str
    group: str
    default: Any = None  # the dataclass default (dataclasses.MISSING when required)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def option_specs(cls) -> dict[str, OptionSpec]:
    """``{name: OptionSpec}`` of every option field of the dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if typing.get_origin(typ) is tuple:
            typ = tuple
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        out[f.name] = OptionSpec(
            name=f.name,
            type=args[0] if args else typ,
            help=f.metadata["help"],
            shown=f.metadata["shown"],
            group=f.metadata["group"],
            default=f.default,
        )
    return out


def require(cond: bool, name: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` naming the option, the value and what is allowed."""
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid; allowed: {allowed}", field=name)


def require_storage_options(value: Any) -> None:
    # Names the type, not the value: storage options may hold credentials.
    require(
        isinstance(value, dict), "storage_options", type(value).__name__, "a JSON object (dict)"
    )


def require_int(name: str, value: Any, low: int, allowed: str = "") -> None:
    """An integer >= ``low`` (``allowed``: what the message says is allowed, if not that)."""
    require(isinstance(value, int) and value >= low, name, value, allowed or f"an integer >= {low}")


def require_positive(name: str, value: Any, allowed: str) -> None:
    """A number > 0."""
    require(isinstance(value, (int, float)) and value > 0, name, value, allowed)


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of ``choices`` (all listed in the message)."""
    require(value in choices, name, value, ", ".join(choices))
