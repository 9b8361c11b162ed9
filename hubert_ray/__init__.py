"""hubert-ray: distributed HuBERT feature extraction on Ray Data.

Importing this package is cheap: it imports neither torch nor Ray.
"""

from hubert_ray.core.config import DecodeConfig, ExtractConfig, ModelConfig
from hubert_ray.core.errors import ConfigError, ManifestError

__all__ = [
    "ConfigError",
    "DecodeConfig",
    "ExtractConfig",
    "ManifestError",
    "ModelConfig",
    "read_features",
    "read_units",
]
__version__ = "0.1.0"


def read_features(uri, segment_ids=None, layer=None, storage_options=None):
    """Read features written by the job; see :func:`hubert_ray.dataset.output.read_features`."""
    from hubert_ray.dataset.output import read_features as _read

    return _read(uri, segment_ids=segment_ids, layer=layer, storage_options=storage_options)


def read_units(uri, layer=None, storage_options=None):
    """Units written by ``hubert-ray extract --units`` or ``hubert-ray kmeans assign`` as a table of
    ``segment_id, start_s, end_s, num_frames, units_<layer>``; see
    :func:`hubert_ray.units.export.read_units`."""
    from hubert_ray.units.kmeans import read_units as _read

    return _read(uri, layer=layer, storage_options=storage_options)
