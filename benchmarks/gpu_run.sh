#!/usr/bin/env bash
# The GPU device check, as run on the lent H200 (results in benchmarks/RESULTS.md):
#   bash ../shared/gpu/prepare-wheels.sh   # here, once: fills .whl/ (ray, soundfile, soxr)
#   run: source .whl/bootstrap.sh && bash benchmarks/gpu_run.sh   (carry .whl)
# Each step has its own time limit so a slow one still leaves the others' results in $OUT.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -4 "$OUT/gpu_tests.log"
timeout 70 python3 -m jobs.precision_study --device cuda --arch base --batch 64 --seconds 10 \
  --iters 10 --out "$OUT/prec" 2>&1 | grep -v "Loading weights"
# Fixed 10 s and WenetSpeech-like mixed lengths; batch sweep (rows per call, <= 64 = that many
# chunks per micro-batch); micro-batch cost sweep (the GPU default, 16 s, is not yet measured);
# actor rows with serial micro-batches (vs the overlapped default) and with no model (the host's
# ceiling: the `_nullmodel` ratio); the pipeline on 4 h of
# FLAC per distribution (end to end vs the plain loop and the actor), with the default 2 calls
# in flight per model actor and with 1; micro-batches padded to the longest item (0) vs the GPU
# default of whole 0.25 s (none of these GPU defaults is measured yet).
timeout 330 python3 -m jobs.benchmark --device cuda --arch base --utt-seconds 10,mixed \
  --seconds 640 --batch-sizes 1,16,64 --micro-batch-costs 4,64 --pipeline-seconds 14400 \
  --pad-multiples 0 --pipeline-calls 1 --max-row-seconds 10 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
grep "^\[bench\]" "$OUT/bench.log" | tail -40
