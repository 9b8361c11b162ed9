"""Run the extraction job.

    hubert-ray extract --manifest M --model DIR --output OUT [--layers 6,9,12]
        [--dtype float16] [--units km.safetensors] [--num-gpus N] [--config FILE]

``--help`` shows the primary options and names the others by group; ``--help-all`` shows what
every option does. Options may also come from a YAML/JSON file (``--config``; keys are the
option names with ``_`` or ``-``); command-line options override the file. Under ``ray job
submit`` the job joins the cluster named by ``RAY_ADDRESS``; otherwise it starts Ray locally.
Bad options exit with code 2 and a message naming the option and what is allowed; a precision
breach under ``--on-precision-breach fail`` exits 3; a worker process that keeps dying on the
same work (past the job's retries) exits 4; an output that cannot be written (no space,
permission denied, a missing bucket, a quota) exits 5; missing or duplicated segments at the
end exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap

from hubert_ray.core.config import ExtractConfig
from hubert_ray.core.errors import ConfigError, ManifestError, OutputError, WorkerDeathError
from hubert_ray.core.options import GROUPS, PRIMARY, OptionSpec, option_specs

PROG = "hubert-ray extract"

# Options of the command line only (not job settings); every other option is an ExtractConfig
# field (hubert_ray.core.options.option): its name, type, help, shown default and group.
CLI_ONLY = {
    spec.name: spec
    for spec in (
        OptionSpec(
            "overwrite",
            bool,
            "delete an existing dataset in `--output` and start over (otherwise a compatible "
            "one is resumed)",
            "off",
            PRIMARY,
        ),
        OptionSpec(
            "config",
            str,
            "YAML/JSON file with any of these (keys with `_` or `-`); the command line wins",
            "—",
            PRIMARY,
        ),
        OptionSpec("quiet", bool, "no progress lines", "off", "output"),
    )
}


def _json_option(text: str):
    """argparse type for JSON options; its error never echoes the value (it may hold secrets)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at column {exc.colno}); expected a JSON object"
        ) from None


def options() -> dict[str, OptionSpec]:
    """``{name: OptionSpec}`` of every job option (ExtractConfig's fields, in their order)."""
    return option_specs(ExtractConfig)


def _by_group() -> dict[str, list[OptionSpec]]:
    """Every option of the command line by group (GROUPS' order), job options first."""
    out: dict[str, list[OptionSpec]] = {group: [] for group in GROUPS}
    for spec in [*options().values(), *CLI_ONLY.values()]:
        out[spec.group].append(spec)
    return out


def options_table(which: str = PRIMARY) -> str:
    """An options table, made from the same definitions as the command line: the primary
    options (the README's) or, with ``which="groups"``, the others by group
    (docs/operations.md)."""
    if which == PRIMARY:
        rows = ["| option | default | meaning |", "|---|---|---|"]
        rows += [f"| `{s.flag}` | {s.shown} | {s.help} |" for s in _by_group()[PRIMARY]]
        return "\n".join(rows)
    rows = ["| group | option | default | meaning |", "|---|---|---|---|"]
    for group, specs in _by_group().items():
        if group == PRIMARY:
            continue
        for i, s in enumerate(specs):
            label = f"**{group}**" if i == 0 else ""
            rows.append(f"| {label} | `{s.flag}` | {s.shown} | {s.help} |")
    return "\n".join(rows)


def _cli_help(text: str) -> str:
    return text.replace("`", "").replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors already exit 2; keep its format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.HelpFormatter):
    """Wraps between words only, so a flag such as ``--on-precision-breach`` stays whole."""

    def _split_lines(self, text, width):
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(
            text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )


class _HelpAll(argparse.Action):
    """``--help-all``: every option with what it does, by group; then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(build_parser(show_all=True).format_help(), end="")
        parser.exit()


def _add_option(target, spec: OptionSpec, shown: bool) -> None:
    """One option's flag on ``target`` (the parser or an argument group)."""
    if not shown:
        help_ = argparse.SUPPRESS
    elif spec.name in CLI_ONLY:
        help_ = _cli_help(spec.help)
    else:
        help_ = _cli_help(f"{spec.help} (default: {spec.shown})")
    if spec.name in CLI_ONLY:  # the command line's own: --config FILE, --overwrite, --quiet
        if spec.type is bool:
            target.add_argument(spec.flag, action="store_true", help=help_)
        else:
            target.add_argument(spec.flag, help=help_)
    elif spec.type is bool:  # --flag, or --flag / --no-flag when it is on by default
        action = argparse.BooleanOptionalAction if spec.default is True else "store_true"
        target.add_argument(spec.flag, dest=spec.name, action=action, default=None, help=help_)
    elif spec.type is tuple:  # repeatable, values add up (e.g. --units a --units b,c)
        target.add_argument(
            spec.flag, dest=spec.name, type=str, action="append", default=None, help=help_
        )
    else:
        kind = _json_option if spec.type is dict else spec.type
        target.add_argument(spec.flag, dest=spec.name, type=kind, default=None, help=help_)


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
    """The command line: the primary options first, then the other groups (``show_all``: with
    what each option does; otherwise each group lists its flags, and ``--help-all`` shows
    them). Every option is accepted either way."""
    p = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        description=__doc__.split("\n\n")[0],
        epilog="Every option can also be set in the --config file (keys with _ or -)."
        + ("" if show_all else " --help-all: what every option does."),
    )
    p.add_argument("--help-all", action=_HelpAll, help="show what every option does, and exit")
    by_group = _by_group()
    primary = {s.name: s for s in by_group[PRIMARY]}
    for spec in [primary.pop("config"), *primary.values()]:  # --config first, as before
        _add_option(p, spec, shown=True)
    for group, specs in by_group.items():
        if group == PRIMARY:
            continue
        about = GROUPS[group]
        if not show_all:
            about += ": " + ", ".join(s.flag for s in specs)
        section = p.add_argument_group(f"{group} options", about)
        for spec in specs:
            _add_option(section, spec, shown=show_all)
    p.add_argument("--options-table", nargs="?", const=PRIMARY, choices=(PRIMARY, "groups"),
                   help=argparse.SUPPRESS)  # fmt: skip
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


def _run(args: argparse.Namespace) -> int:
    """The job, its errors as exit codes (2 options, 3 precision breach, 4 dying workers, 5 an
    output that cannot be written)."""
    try:
        cfg, overwrite = config_from_args(args)
        from hubert_ray.backend import extract

        if args.quiet:
            logging.getLogger("hubert_ray.progress").setLevel(logging.WARNING)
        summary = extract.run(cfg, overwrite=overwrite)
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
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    except Exception as e:
        breach = _precision_breach(e)
        if breach is None:
            raise
        print(f"error: {breach}", file=sys.stderr)
        return 3
    shown = {k: v for k, v in summary.items() if k != "config"}
    print(json.dumps(shown, indent=2))
    out = cfg.output.rstrip("/")
    print(
        f"features: {out}/features  errors: {out}/errors  summary: {out}/_summary.json"
        f"  report: {out}/report.html"
    )
    bad = summary["segments_missing"] + summary["segments_duplicated"]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    if "RAY_ADDRESS" not in os.environ and "ray" not in sys.modules:
        # A local cluster with token authentication, as Ray 2.60 starts one anyway; chosen
        # explicitly, before Ray reads its settings, so Ray does not warn that it chose it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    args = build_parser().parse_args(argv)
    if args.options_table:  # for the README and docs/operations.md
        print(options_table(args.options_table))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
