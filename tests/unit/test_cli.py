"""The command line: `hubert-ray` and its subcommands (installed, `python -m hubert_ray.cli`,
the old `python -m jobs.<name>`), option errors (exit 2, naming the option), option groups and
the tables made from them, config files, a real CLI run.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_cli.py`` and ``tests/ray/test_cli.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from hubert_ray.cli import extract

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--layers", "x"], "--layers"),
        (["--layers", "7"], "--layers"),  # the tiny model has 2 layers
        (["--dtype", "fp8"], "--dtype"),
        (["--chunk-seconds", "0"], "--chunk-seconds"),
        (["--batch-size", "0"], "--batch-size"),
        (["--torch-threads", "-1"], "--torch-threads"),
        (["--micro-batch-cost-seconds", "-1"], "--micro-batch-cost-seconds"),
        (["--calls-per-actor", "0"], "--calls-per-actor"),
        (["--pad-multiple-seconds", "-1"], "--pad-multiple-seconds"),
        (["--compile", "fast"], "--compile"),
        (["--num-gpus", "-1"], "--num-gpus"),
        (["--storage-options", "{not json"], "--storage-options"),
        (["--storage-dtype", "int4"], "--storage-dtype"),
        (["--no-such-option", "1"], "unrecognized arguments"),
    ],
)
def test_bad_option_exits_2_naming_it(args, needle, corpus, tiny_model, tmp_path, capsys):
    base = ["--manifest", corpus, "--model", tiny_model, "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        code = extract.main(base + args)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert not (tmp_path / "o").exists()  # nothing ran


def test_missing_required_option(tmp_path, capsys):
    assert extract.main(["--manifest", "m.jsonl", "--output", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err


def test_bad_manifest_exits_2_before_ray(tmp_path, tiny_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "audio": "a.wav"}\n{"id": "a", "audio": "b.wav"}\nnot json\n')
    code = extract.main(
        ["--manifest", str(bad), "--model", tiny_model, "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl:2" in err and "bad.jsonl:3" in err


def test_model_without_safetensors_refused(tmp_path, corpus, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\0")
    code = extract.main(
        ["--manifest", corpus, "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert "safetensors" in capsys.readouterr().err


def test_config_file_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("manifest: m.jsonl\nmodel: m\noutput: o\nlayerz: 3\n")
    assert extract.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "layerz" in err and "--config" in err


def test_retry_transient_option(tmp_path, capsys):
    parser = extract.build_parser()
    base = ["--manifest", "m.jsonl", "--model", "m", "--output", "o"]
    cfg, _ = extract.config_from_args(parser.parse_args(base))
    assert cfg.retry_transient is True
    cfg, _ = extract.config_from_args(parser.parse_args([*base, "--no-retry-transient"]))
    assert cfg.retry_transient is False
    job = tmp_path / "job.yaml"
    job.write_text("manifest: m.jsonl\nmodel: m\noutput: o\nretry_transient: false\n")
    cfg, _ = extract.config_from_args(parser.parse_args(["--config", str(job)]))
    assert cfg.retry_transient is False
    job.write_text("manifest: m.jsonl\nmodel: m\noutput: o\nretry_transient: maybe\n")
    assert extract.main(["--config", str(job)]) == 2
    assert "retry_transient" in capsys.readouterr().err


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_weights_refused_before_ray(corpus, tiny_model, tmp_path, capsys, keep):
    """A safetensors file cut short (a partial copy or upload), in its header or in its data:
    exit 2 naming the file, before any Ray work."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: header_end // 2 if keep == "header" else header_end + 100])
    out = tmp_path / "out"
    code = extract.main(["--manifest", corpus, "--model", str(model), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert err.startswith("error: --model: ") and "model.safetensors" in err, err
    assert ("truncated" if keep == "data" else "not a readable safetensors file") in err, err
    assert not out.exists()


def test_readme_options_table_is_the_generated_one():
    """One definition per option: the README's table (the primary options) and
    docs/operations.md's (every other option, by group) are what the CLI generates from the
    config's fields (regenerate them with ``hubert-ray extract --options-table`` and
    ``hubert-ray extract --options-table groups``)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert extract.options_table() in readme
    with open(os.path.join(ROOT, "docs", "operations.md")) as f:
        assert extract.options_table("groups") in f.read()


def test_every_config_field_is_a_cli_option():
    import dataclasses

    from hubert_ray.core.config import ExtractConfig

    parser = extract.build_parser()
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(ExtractConfig)} <= flags


# -- the command, its groups of options and its help ---------------------------------------------


def test_every_option_has_one_group_and_the_primary_ones_are_few():
    from hubert_ray.core.options import GROUPS, PRIMARY

    by_group = extract._by_group()
    assert list(by_group) == list(GROUPS) and all(by_group.values())
    flags = [s.flag for specs in by_group.values() for s in specs]
    assert len(flags) == len(set(flags)) == len(extract.options()) + len(extract.CLI_ONLY)
    primary = {s.name for s in by_group[PRIMARY]}
    assert 12 <= len(primary) <= 15, sorted(primary)
    assert {"manifest", "model", "output", "layers", "dtype", "units", "config"} <= primary
    assert {"storage_options", "overwrite", "num_gpus"} <= primary


def test_help_shows_the_primary_options_and_names_every_other(capsys):
    """`--help`: what each primary option does, every other flag by group; `--help-all`: what
    every option does. Both parsers accept every option."""
    from hubert_ray.core.options import PRIMARY

    with pytest.raises(SystemExit) as exc:
        extract.main(["--help"])
    assert exc.value.code == 0
    short = capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        extract.main(["--help-all"])
    assert exc.value.code == 0
    full = capsys.readouterr().out
    assert short.startswith("usage: hubert-ray extract") and full.startswith("usage: hubert-ray")
    flat_short, flat_full = " ".join(short.split()), " ".join(full.split())
    for group, specs in extract._by_group().items():
        for s in specs:
            assert s.flag in short and s.flag in full, s.flag
            help_ = " ".join(extract._cli_help(s.help).split())[:40]
            assert (help_ in flat_short) == (group == PRIMARY), s.flag
            assert help_ in flat_full, s.flag
        if group != PRIMARY:
            assert f"{group} options:" in short and f"{group} options:" in full
    assert len(short.splitlines()) < 80 < len(full.splitlines())
    for show_all in (False, True):  # the same options and meanings either way
        parser = extract.build_parser(show_all=show_all)
        args = parser.parse_args(["--queue-depth", "3", "--no-retry-transient", "--quiet"])
        assert (args.queue_depth, args.retry_transient, args.quiet) == (3, False, True)


def test_options_tables_split_by_group():
    from hubert_ray.core.options import PRIMARY

    primary = extract.options_table()
    groups = extract.options_table("groups")
    for s in [*extract.options().values(), *extract.CLI_ONLY.values()]:
        assert (f"`{s.flag}`" in primary) == (s.group == PRIMARY), s.flag
        assert (f"`{s.flag}`" in groups) == (s.group != PRIMARY), s.flag


def test_subcommand_parsers_are_named_after_the_command():
    from hubert_ray.cli import kmeans, plan, prepare

    assert extract.build_parser().prog == "hubert-ray extract"
    assert plan.build_parser().prog == "hubert-ray plan"
    assert prepare._parser().prog == "hubert-ray prepare"
    assert kmeans.build_parser().prog == "hubert-ray kmeans"


def test_main_dispatches_to_the_subcommand(capsys):
    from hubert_ray.cli.main import main

    assert main(["plan", "--hours", "10", "--gpus", "1", "--decode-cores", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hours"] == 10
    for argv in ([], ["nope"], ["--hours", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    assert "usage: hubert-ray" in capsys.readouterr().err
    assert main(["extract", "--layers", "2"]) == 2  # the subcommand's own errors and exit codes
    assert "--manifest" in capsys.readouterr().err
