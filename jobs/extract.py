"""Run the extraction job.

    python -m jobs.extract --manifest M --model DIR --output OUT [--layers 6,9,12]
        [--dtype float16] [--chunk-seconds 10] [--batch-size 64] [--num-gpus N] [--config FILE]

Options may also come from a YAML/JSON file (``--config``; keys are the option names with
``_`` or ``-``); command-line options override the file. Under ``ray job submit`` the job joins
the cluster named by ``RAY_ADDRESS``; otherwise it starts Ray locally. Bad options exit with
code 2 and a message naming the option and what is allowed; a precision breach under
``--on-precision-breach fail`` exits 3; a worker process that keeps dying on the same work
(past the job's retries) exits 4; missing or duplicated segments at the end exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from hubert_ray.core.config import ExtractConfig
from hubert_ray.core.errors import ConfigError, ManifestError, WorkerDeathError


def _json_option(text: str):
    """argparse type for JSON options; its error never echoes the value (it may hold secrets)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at column {exc.colno}); expected a JSON object"
        ) from None


# Options of the command line only (not job settings); every other option is an
# ExtractConfig field (hubert_ray.core.config.option): its name, type, help and shown default.
CLI_ONLY = {
    "overwrite": (
        "off",
        "delete an existing dataset in `--output` and start over (otherwise a compatible one "
        "is resumed)",
    ),
    "config": (
        "—",
        "YAML/JSON file with any of these (keys with `_` or `-`); the command line wins",
    ),
    "quiet": ("off", "no progress lines"),
}


def options() -> dict[str, tuple[object, dict]]:
    """``{name: (type, metadata)}`` of every job option, in ExtractConfig's order."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(ExtractConfig)
    out = {}
    for f in dataclasses.fields(ExtractConfig):
        typ = hints[f.name]
        if typing.get_origin(typ) is tuple:
            typ = tuple
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        out[f.name] = (args[0] if args else typ, f.metadata)
    return out


def options_table() -> str:
    """The README's options table, made from the same definitions as the command line."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name, (_, meta) in options().items():
        rows.append(f"| `--{name.replace('_', '-')}` | {meta['shown']} | {meta['help']} |")
    for name, (shown, help_) in CLI_ONLY.items():
        rows.append(f"| `--{name.replace('_', '-')}` | {shown} | {help_} |")
    return "\n".join(rows)


def _cli_help(text: str) -> str:
    return text.replace("`", "").replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors already exit 2; keep its format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jobs.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=_cli_help(CLI_ONLY["config"][1]))
    for name, (typ, meta) in options().items():
        flag = "--" + name.replace("_", "-")
        help_ = _cli_help(f"{meta['help']} (default: {meta['shown']})")
        if typ is bool:  # --flag, or --flag / --no-flag when it is on by default
            on = ExtractConfig.__dataclass_fields__[name].default is True
            action = argparse.BooleanOptionalAction if on else "store_true"
            p.add_argument(flag, dest=name, action=action, default=None, help=help_)
        elif typ is tuple:  # repeatable, values add up (e.g. --units a --units b,c)
            p.add_argument(flag, dest=name, type=str, action="append", default=None, help=help_)
        else:
            kind = _json_option if typ is dict else typ
            p.add_argument(flag, dest=name, type=kind, default=None, help=help_)
    p.add_argument("--overwrite", action="store_true", help=_cli_help(CLI_ONLY["overwrite"][1]))
    p.add_argument("--quiet", action="store_true", help=CLI_ONLY["quiet"][1])
    p.add_argument("--options-table", action="store_true", help=argparse.SUPPRESS)
    return p


def load_config_file(path: str) -> dict:
    import fsspec
    import yaml

    with fsspec.open(path, "r") as f:
        data = yaml.safe_load(f)  # YAML is a superset of JSON
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r} must hold a mapping of option: value", field="config"
        )
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = set(options())
    unknown = sorted(set(data) - known - {"overwrite"})
    if unknown:
        raise ConfigError(
            f"config file {path!r}: unknown option(s) {unknown}; allowed: {sorted(known)}",
            field="config",
        )
    return data


def config_from_args(args: argparse.Namespace) -> tuple[ExtractConfig, bool]:
    values = load_config_file(args.config) if args.config else {}
    overwrite = bool(values.pop("overwrite", False)) or args.overwrite
    values.update({k: getattr(args, k) for k in options() if getattr(args, k) is not None})
    missing = [k for k in ("manifest", "model", "output") if not values.get(k)]
    if missing:
        raise ConfigError(
            f"missing required option(s): {', '.join('--' + m for m in missing)}", field=missing[0]
        )
    return ExtractConfig(**values), overwrite


def _precision_breach(exc: BaseException) -> str | None:
    """The precision-breach message inside a (Ray-wrapped) exception chain, if any.

    Ray re-raises an actor's exception as ``RayTaskError(UserCodeException)``, which keeps the
    original message but not always its type, so the message marker is what is matched."""
    from hubert_ray.core.precision import BREACH_MARKER

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if BREACH_MARKER in text:
            return text[text.index(BREACH_MARKER) :].splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    if "RAY_ADDRESS" not in os.environ and "ray" not in sys.modules:
        # A local cluster with token authentication, as Ray 2.60 starts one anyway; chosen
        # explicitly, before Ray reads its settings, so Ray does not warn that it chose it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.options_table:  # for the README: python -m jobs.extract --options-table
        print(options_table())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg, overwrite = config_from_args(args)
        from hubert_ray.backend import pipeline

        if args.quiet:
            logging.getLogger("hubert_ray.backend.progress").setLevel(logging.WARNING)
        summary = pipeline.run(cfg, overwrite=overwrite)
    except ConfigError as e:
        option = f"--{e.field.replace('_', '-')}: " if e.field else ""
        print(f"error: {option}{e}", file=sys.stderr)
        return 2
    except ManifestError as e:
        print(f"error: --manifest: {e}", file=sys.stderr)
        return 2
    except WorkerDeathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except Exception as e:
        breach = _precision_breach(e)
        if breach is None:
            raise
        print(f"error: {breach}", file=sys.stderr)
        return 3
    shown = {k: v for k, v in summary.items() if k != "config"}
    print(json.dumps(shown, indent=2))
    print(
        f"features: {cfg.output.rstrip('/')}/features  errors: {cfg.output.rstrip('/')}/errors"
        f"  summary: {cfg.output.rstrip('/')}/_summary.json"
        f"  report: {cfg.output.rstrip('/')}/report.html"
    )
    bad = summary["segments_missing"] + summary["segments_duplicated"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
