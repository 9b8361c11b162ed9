"""The ``hubert-ray`` command: ``hubert-ray extract|prepare|plan|kmeans|demo ...``.

One module per subcommand, each with its own argparse and ``main(argv) -> exit code``;
:mod:`hubert_ray.cli.main` dispatches to them. ``python -m hubert_ray.cli`` is the same command
without the installed script; ``python -m jobs.<name>`` (the repository's old entry points)
calls the same ``main``. Importing a subcommand's module imports neither torch nor Ray.
"""
