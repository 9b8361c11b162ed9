"""Pure unit tests for hubert_ray.dataset.output's accounting (no Ray, no torch)."""

from __future__ import annotations

import pyarrow as pa

from hubert_ray.dataset import output
from hubert_ray.dataset import summary as dataset_summary


def _features(ids):
    n = len(ids)
    return pa.table(
        {
            "segment_id": ids,
            "start_s": [0.0] * n,
            "end_s": [1.5] * n,
            "num_frames": pa.array([74] * n, pa.int32()),
            "compute_dtype": ["float16"] * (n - 1) + ["float32"],
            "fallback_reason": pa.array([None] * n, pa.string()),
        }
    )


def _errors(ids, reason):
    n = len(ids)
    return pa.table(
        {
            "segment_id": ids,
            "recording_id": ["r"] * n,
            "stage": ["decode"] * n,
            "reason": [reason] * n,
            "message": ["m"] * n,
        }
    )


def test_summarize_parts_counts_part_by_part(tmp_path):
    """Rows, errors by reason, dtypes, frames and audio, read part file by part file (the
    manifest-wide missing / duplicated checks are hubert_ray.dataset.resume's:
    tests/unit/test_segments.py)."""
    out = str(tmp_path)
    feats = f"{out}/{output.FEATURES_DIR}"
    output.write_part(_features(["a", "b", "c"]), feats, None)
    output.write_part(_features(["c", "x"]), feats, None)
    output.write_part(_errors(["d", "e"], "too_short"), f"{out}/{output.ERRORS_DIR}", None)
    output.write_part(_errors(["f"], "decode_failed"), f"{out}/{output.ERRORS_DIR}", None)
    s = dataset_summary.summarize_parts(out)
    assert (s["segments_ok"], s["segments_failed"]) == (5, 3)
    assert s["errors_by_reason"] == {"decode_failed": 1, "too_short": 2}
    assert s["compute_dtype_counts"] == {"float16": 3, "float32": 2}
    assert s["frames"] == 5 * 74 and s["audio_seconds"] == 7.5
    assert s["precision"]["self_test"] == [] and s["precision"]["suspect_segments"] == 0


def test_summarize_parts_of_an_empty_output(tmp_path):
    s = dataset_summary.summarize_parts(str(tmp_path))
    assert (s["segments_ok"], s["segments_failed"], s["audio_seconds"]) == (0, 0, 0.0)


def test_feature_columns_written_without_dictionary_or_statistics(tmp_path):
    """Parquet options of a part: the flat columns keep dictionary encoding and min/max
    statistics (resume and ``read_features`` filter on segment_id), the feature column's leaf
    values have neither (pure cost there), and the values read back unchanged."""
    import numpy as np
    import pyarrow.parquet as pq

    values = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float16)
    feats = pa.ListArray.from_arrays(
        pa.array([0, 3, 7], pa.int32()), pa.FixedSizeListArray.from_arrays(values.reshape(-1), 4)
    )
    table = _features(["a", "b"]).append_column("layer_12", feats)
    url = output.write_part(table, str(tmp_path), {"k": 1}, key="x")
    meta = pq.ParquetFile(url).metadata.row_group(0)
    chunks = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    seg, leaf = chunks["segment_id"], chunks["layer_12.list.element.list.element"]
    assert seg.is_stats_set and seg.statistics.min == "a"
    assert any("DICT" in e for e in seg.encodings)
    assert not leaf.is_stats_set
    assert not any("DICT" in e for e in leaf.encodings)
    assert pq.read_table(url).column("layer_12").combine_chunks().equals(feats)


def _model_block(failed: set[int], checked: set[int], n: int = 4) -> pa.Table:
    """A model-stage output block of ``n`` rows (4 frames of 2 values each)."""
    import numpy as np

    from hubert_ray.model.engine import Result
    from hubert_ray.stages.extractor import assemble, features_array

    values = np.arange(n * 8, dtype=np.float16).reshape(-1, 2)
    valid = [i not in failed for i in range(n)]
    layer = features_array(values, [4] * n, valid, "float16")
    batch = pa.table(
        {
            "segment_id": [f"s{i}" for i in range(n)],
            "recording_id": ["r"] * n,
            "start_s": [0.0] * n,
            "end_s": [0.1] * n,
            "error_stage": ["decode" if i in failed else None for i in range(n)],
            "error_reason": ["too_short" if i in failed else None for i in range(n)],
            "error_message": ["m" if i in failed else None for i in range(n)],
        }
    )
    check = {"layer": 1, "checked_dtype": "float16", "cos_mean": 1.0, "cos_min": 1.0}
    check.update({"rel_l2": 1e-3, "max_abs": 0.1, "action": "none"})
    res = Result(
        features={},
        frames=[0 if i in failed else 4 for i in range(n)],
        valid=valid,
        compute_dtype=[None if i in failed else "float16" for i in range(n)],
        fallback=[None] * n,
        precision=[[check] if i in checked else None for i in range(n)],
        errors={},
    )
    identity = {"model": "m", "model_revision": "r", "actor_id": "a"}
    return assemble(batch, {"layer_1": layer}, res.frames, res, identity)


def test_split_block_rows_and_no_copy_without_failures():
    block = _model_block(failed={1}, checked={2})
    ok, bad, checks = output.split_block(block)
    assert ok.column("segment_id").to_pylist() == ["s0", "s2", "s3"]
    assert "error_reason" not in ok.column_names and "precision" not in ok.column_names
    assert ok.column("layer_1").to_pylist()[1] == block.column("layer_1").to_pylist()[2]
    assert bad.column("segment_id").to_pylist() == ["s1"]
    assert bad.column("reason").to_pylist() == ["too_short"]
    assert checks.column("segment_id").to_pylist() == ["s2"]
    assert checks.column("rel_l2").to_pylist() == [1e-3]

    # Nothing failed (the usual block): the feature rows are the block's, not a copy.
    clean = _model_block(failed=set(), checked=set())
    ok, bad, checks = output.split_block(clean)
    assert ok.num_rows == 4 and bad.num_rows == 0 and checks.num_rows == 0
    leaf = ok.column("layer_1").chunk(0).values.values
    assert (
        leaf.buffers()[1].address
        == clean.column("layer_1").chunk(0).values.values.buffers()[1].address
    )


def test_part_slices_bound_rows_and_feature_bytes():
    import numpy as np

    from hubert_ray.stages.extractor import features_array

    frames = [10, 10, 40, 5, 5, 5]
    values = np.zeros((sum(frames), 4), dtype=np.float16)  # 8 bytes per frame and layer
    layer = features_array(values, frames, [True] * 6, "float16")
    table = pa.table(
        {"segment_id": [f"s{i}" for i in range(6)], "layer_1": layer, "layer_2": layer}
    )
    # 16 bytes per frame over both layers: rows of 160, 160, 640, 80, 80, 80 bytes
    assert output.part_slices(table, max_rows=100, max_bytes=400) == [(0, 2), (2, 1), (3, 3)]
    assert output.part_slices(table, max_rows=2, max_bytes=10**9) == [(0, 2), (2, 2), (4, 2)]
    # a single row larger than the bound still gets its own part
    assert output.part_slices(table, max_rows=100, max_bytes=100) == [(i, 1) for i in range(6)]
