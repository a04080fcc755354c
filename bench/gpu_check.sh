#!/usr/bin/env bash
# The one GPU check (issue 9): fits 8 minutes on one H100 / H200 and prints one table.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR default: $OUT, else ./gpu-check-out
#
# Runs unattended on a GPU machine WITHOUT network that has this working tree and a
# preinstalled torch (its Python may differ from ours). The few wheels it needs beyond torch
# come from a local folder prepared beforehand on a machine with network:
#
#   pip download --python-version 3.12 --only-binary=:all: --no-deps -d .gpu-wheels \
#       captum==0.9.0 duckdb==2.0.1 faiss-cpu==1.15.1
#
# (.gpu-wheels/ is git-ignored; the device tool carries it: carry=[".gpu-wheels"]). What is
# still missing is named at the start and the steps that need it are marked "missing: ...".
#
# Steps (each under its own time limit, its log in OUT_DIR):
#   1. bench/gpu_bench.py: reference-style pipeline (batch-1 NoiseTunnel DeepLift, scikit-learn
#      NMF, CPU cosine over a 1M x 2048 bank) vs ours, ResNet50 layer4.2 shapes, end to end;
#   2. bench/gpu_parity.py: CPU vs CUDA on the demo world (catalog rows, concept vectors
#      cosine >= 0.99, same top-8 crops);
#   3. precompute: `python -m explainer precompute --workspace demo --all --pairs all` on CUDA
#      (seconds per stage) and bench/bench_pairs.py --synthetic: all 999 pair classifiers of
#      one class in one batched training (2048 channels);
#   4. bench/bench_scale.py --device cuda: the GPU exact search (chunked fp16 matmul + top-k)
#      over a 3 M x 1280 store written through the real storage path;
#   then bench/gpu_summary.py prints the table (and OUT_DIR/gpu_check.json).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT_DIR"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 CONCEPT_EXPLORER_HOME="$OUT_DIR/home"
PY="${PYTHON:-python3}"
T0=$(date +%s)
echo "# gpu_check $(date -u +%FT%TZ) in $(pwd), out $OUT_DIR"
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/env.log"
import sys, platform
try:
    import torch
    print(f"python {platform.python_version()}, torch {torch.__version__}, cuda "
          f"{torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
except Exception as exc:
    print(f"missing: torch ({exc})")
EOF
if [ -d .gpu-wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .gpu-wheels captum duckdb faiss-cpu \
        > "$OUT_DIR/pip.log" 2>&1 || echo "pip install from .gpu-wheels failed: see pip.log"
else
    echo "no .gpu-wheels folder: using what is installed"
fi
MISSING=$("$PY" - <<'EOF'
import importlib
need = ["torch", "torchvision", "numpy", "scipy", "sklearn", "PIL", "captum", "duckdb", "faiss"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
[ -n "$MISSING" ] && echo "missing: $MISSING (steps that import them will fail; download their wheels into .gpu-wheels)"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t=$(date +%s)
    echo "## $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "$rc $(( $(date +%s) - t ))" > "$OUT_DIR/$name.rc"
    tail -n 12 "$OUT_DIR/$name.log"
    echo "## $name: exit $rc in $(( $(date +%s) - t ))s"
}

step gpu_bench 150 "$PY" bench/gpu_bench.py --images 500 --bank 1000000 --ref-images 40
step parity 120 "$PY" bench/gpu_parity.py --home "$OUT_DIR/home" --classes 5 \
    --json "$OUT_DIR/parity.json"
step precompute 90 "$PY" -m explainer precompute --workspace "$OUT_DIR/home/demo" --all \
    --pairs all --device cuda --n 4 --json "$OUT_DIR/precompute.json"
step pairs 45 "$PY" bench/bench_pairs.py --synthetic 100 --j 999 --device cuda --repeat 3 \
    --separate 5 --channels 2048
step scale 120 "$PY" bench/bench_scale.py --rows 3000000 --dim 1280 --device cuda \
    --stages write,cuda --workdir "$OUT_DIR/scale" --threads 16
rm -rf "$OUT_DIR/scale" "$OUT_DIR/home"  # big or rebuildable: only logs come back
"$PY" bench/gpu_summary.py "$OUT_DIR"
echo "# gpu_check done in $(( $(date +%s) - T0 ))s"
