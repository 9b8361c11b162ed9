"""The old entry points, ``python -m jobs.<name>``: each calls ``hubert_ray.cli.<name>.main``
(the installed command is ``hubert-ray <name>``)."""
