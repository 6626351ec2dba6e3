#!/usr/bin/env bash
# The prepared GPU check for a lent machine (one run): build pysparse there against its own torch,
# run the CUDA correctness tests (CUDA vs CPU kernels and float64 references), then print the
# benchmark table against cuBLAS dense. Run from the repository root.
set -euo pipefail
python -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
cd /tmp  # import the installed package, not the source folder
python -c "import pysparse, json; print(json.dumps(pysparse.build_info(), indent=1))"
python -m pytest -q "$OLDPWD/tests/test_cuda.py" -p no:cacheprovider
python "$OLDPWD/bench/gpu_linear24.py"
python "$OLDPWD/bench/prox24.py" --device cuda --lams 0.1,1,10
python "$OLDPWD/bench/ffn.py" --device cuda --shapes 4096x11008 --dtypes bfloat16 --patterns independent --batches 1 4 --sparsities 0 90 --down-rows
