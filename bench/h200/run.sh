#!/usr/bin/env bash
# The one device command for issue #14: every figure bench/bench_gpu.py measures, on the H200, within 8 minutes.
#
#   device tool:  run  command "bash bench/h200/run.sh"  carry [".whl"]  timeout_s 570
#                 (first, here: bash bench/h200/fetch_wheels.sh, in the checkout the device tool sends)
#   CPU dry run:  SAE_KIT_H200_DRYRUN=1 PYTHON=/tmp/h200sim/bin/python OUT=/tmp/h200-out bash bench/h200/run.sh
#
# Installs .whl/common (sparsify and what it needs beyond the image) and .whl/lens (SAELens, transformer-lens 3.9)
# into two --target folders, prints the GPU and versions, runs the CUDA-only tests, then bench_gpu.py one part per
# process (each step shape, the pipeline, caching, SAELens last), each under `timeout` with a cap trimmed to what is
# left of H200_BUDGET_S (510 s), most important first. Every measurement is appended to $OUT/results.jsonl as it is
# made, so a run cut off still returns what finished; $OUT/log.txt has the whole output, $OUT/cuda_tests.xml the
# tests, $OUT/results.json everything grouped, $OUT/profile.json the largest step's phases and kernels. The last
# lines printed are the summary table (bench/h200/summary.py).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
export OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=${SAE_KIT_H200_DRYRUN:-0}
BUDGET=${H200_BUDGET_S:-510}
SITE=${H200_SITE:-/tmp/sae-kit-h200/site}
LENS=$SITE-lens
RES=$OUT/results.jsonl
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error  # no progress bars in the returned tail
START=$SECONDS

if [ "$DRY" = 1 ]; then  # CPU: tiny shapes, a 2-layer GPT-2 for the store and caching, caps 3× longer
    SHAPES=(64x256x4 96x384x8 128x512x8)
    Q=(--quick --threads 2 --model gpt2s)
    X=3
    BUDGET=${H200_BUDGET_S:-1500}
    export SPARSIFY_DISABLE_TRITON=1  # sparsify's Triton decoder needs a GPU; its eager one runs here
else
    SHAPES=(0 1 2)  # bench_gpu.GPU_SHAPES: 768 × 24576, 2304 × 65536, 4096 × 131072
    Q=(--model gpt2s)
    X=1
fi
# H200_CONTENDERS: section 1's contenders; H200_SKIP: comma-separated section names (or their first words) to skip,
# e.g. a second call that re-measures what changed: H200_SKIP="SAELens,traffic,profile batchtopk"
OURS=${H200_CONTENDERS:-ours,ours-bags,ours-grouped,ours-new,ours-triton,ours-fp32,ours-fp32-exact,loop,loop-new,bf16mm,fp32mm,sparsify}
SKIP=${H200_SKIP:-}
NEWENV=()  # set once the CUDA smoke check of the opt-in kernels passes: the later sections run them as well

note() {  # note NAME STATUS RC SECONDS: one status line in results.jsonl
    printf '{"section": "status", "name": "%s", "status": "%s", "rc": %d, "seconds": %d}\n' "$1" "$2" "$3" "$4" >>"$RES"
}

section() {  # section NAME CAP CMD...: CMD under `timeout`, its cap trimmed to the budget left (20 s kept back)
    local name=$1 cap=$(($2 * X)) left t0 rc status skip
    shift 2
    IFS=, read -ra skip <<<"$SKIP"
    for s in "${skip[@]}"; do
        if [ -n "$s" ] && { [ "$name" = "$s" ] || [ "${name#"$s "}" != "$name" ]; }; then
            echo "### $name: skipped (H200_SKIP)"
            note "$name" skipped 0 0
            return
        fi
    done
    left=$((BUDGET - (SECONDS - START) - 20))
    ((cap > left)) && cap=$left
    if ((cap < 15)); then
        echo "### $name: skipped (${left}s of the budget left)"
        note "$name" skipped 0 0
        return
    fi
    echo
    echo "### $name (cap ${cap}s; $((SECONDS - START))s used)"
    t0=$SECONDS
    timeout -k 10 "$cap" "$@"
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status=cut-off ;; *) status=failed ;; esac
    echo "### $name: $status (rc $rc) in $((SECONDS - t0))s"
    note "$name" "$status" "$rc" $((SECONDS - t0))
}

install() {  # run through `bash -c` (timeout runs programs, not functions): hence the exports
    rm -rf "$SITE" "$LENS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/common/*.whl &&
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$LENS" .whl/lens/*.whl &&
        mkdir -p "$LENS/wandb" &&
        echo '"""Stand-in: SAELens imports wandb at load time only; the bench never logs to it."""' >"$LENS/wandb/__init__.py"
}

export -f install
export PY SITE LENS
# one bench_gpu.py process: sae-kit and sparsify (KIT), or with SAELens' folder in front (LENS_KIT)
KIT=(env PYTHONPATH="$ROOT:$SITE" "$PY" bench/bench_gpu.py --json "$RES" "${Q[@]}")
LENS_KIT=(env PYTHONPATH="$ROOT:$LENS:$SITE" "$PY" bench/bench_gpu.py --json "$RES" "${Q[@]}")
STEP=(--skip-pipeline --skip-cache --shapes)

main() {
    echo "### bench/h200/run.sh $(date -u +%FT%TZ) on ${HOSTNAME:-?}, dry run: $DRY, budget ${BUDGET}s, OUT=$OUT"
    : >"$RES"
    if ! ls .whl/common/*.whl .whl/lens/*.whl >/dev/null 2>&1; then
        echo "### no wheels in .whl/common and .whl/lens: run bench/h200/fetch_wheels.sh here first, carry [\".whl\"]"
    fi
    section "install wheels" 90 bash -c install
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
            --format=csv 2>&1 | head -5
    else
        echo "(no nvidia-smi)"
    fi
    section "env: sae-kit, sparsify" 60 env PYTHONPATH="$ROOT:$SITE" "$PY" bench/h200/env_check.py "$RES" common \
        sae_kit sae_kit.train activation_store.store bench.bench_gpu bench.bench_cache sparsify sparsify.xformers datasets
    section "env: SAELens" 60 env PYTHONPATH="$ROOT:$LENS:$SITE" "$PY" bench/h200/env_check.py "$RES" lens \
        sae_lens sae_lens.saes.sae transformer_lens
    # the CUDA-only tests: every test file with a `skipif(not torch.cuda.is_available())`, its tests named *cuda*
    mapfile -t files < <( (grep -rlE "skipif\(not torch\.cuda\.is_available\(\)" tests
                           echo tests/sae_kit/test_triton_kernels.py) | sort -u)
    section "CUDA tests" 75 env PYTHONPATH="$ROOT:$SITE" "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda \
        --continue-on-collection-errors --junitxml "$OUT/cuda_tests.xml" "${files[@]}"
    # the opt-in kernels (Triton segment sums, grouped top-k) on one small training run: if they work here, the
    # pipeline, caching and profile sections run with them too (their figures are then those of the new default)
    if [ "$DRY" != 1 ] && env PYTHONPATH="$ROOT:$SITE" SAE_KIT_TRITON_BAGS=1 SAE_KIT_GROUPED_TOPK=1 SAE_KIT_TRITON_ROWS=1 "$PY" -c "
import tempfile, torch
from sae_kit.train import TensorSource, TrainConfig, train
with tempfile.TemporaryDirectory() as d:
    train(TrainConfig(hook_points='h', k=8, d_sae=4096, batch_size=512, n_tokens=512 * 20, out=d + '/o', device='cuda'),
          TensorSource({'h': torch.randn(8192, 256)}), progress=False)
print('opt-in kernels: smoke check ok')"; then
        NEWENV=(SAE_KIT_TRITON_BAGS=1 SAE_KIT_GROUPED_TOPK=1 SAE_KIT_TRITON_ROWS=1)
    fi
    echo "### environment of the later sections: ${NEWENV[*]:-(defaults)}"
    # the first shape's process also times the steps' host side at a tiny shape (bench_gpu.bench_host, ~10 s)
    section "step ${SHAPES[0]}" 75 "${KIT[@]}" "${STEP[@]}" "${SHAPES[0]}" --contenders $OURS
    section "step ${SHAPES[1]}" 70 "${KIT[@]}" "${STEP[@]}" "${SHAPES[1]}" --contenders $OURS --skip-host
    section "step ${SHAPES[2]}" 90 "${KIT[@]}" "${STEP[@]}" "${SHAPES[2]}" --contenders $OURS --skip-host
    section "pipeline" 150 env "${NEWENV[@]}" "${KIT[@]}" --skip-step --skip-cache
    section "cache" 120 "${KIT[@]}" --skip-step --skip-pipeline
    # where the largest step's time goes (phases by device events, then kernels): guides the next change
    section "profile step" 60 env "${NEWENV[@]}" PYTHONPATH="$ROOT:$SITE" "$PY" bench/profile_step.py --rounds 5 --rows 30 \
        --json "$OUT/profile.json" $([ "$DRY" = 1 ] && echo "--shape 128,512,8")
    # the smallest shape: is the step bound by the host's launches (kernels' time well below the step's)?
    section "profile small" 30 env "${NEWENV[@]}" PYTHONPATH="$ROOT:$SITE" "$PY" bench/profile_step.py --rounds 20 --rows 15 \
        --json "$OUT/profile_small.json" --shape "$([ "$DRY" = 1 ] && echo 64,256,4 || echo 768,24576,32)"
    section "profile batchtopk" 45 env PYTHONPATH="$ROOT:$SITE" "$PY" bench/profile_step.py --rounds 5 --rows 20 \
        --arch batchtopk --json "$OUT/profile_batchtopk.json" --shape "$([ "$DRY" = 1 ] && echo 96,384,8 || echo 2304,65536,64)"
    # the CUDA path's op list with the bytes each op moves (the model behind the step's memory-bound part)
    section "traffic" 40 env PYTHONPATH="$ROOT:$SITE" "$PY" bench/param_traffic.py --device cuda --dtype bfloat16 --ops \
        $([ "$DRY" = 1 ] && echo "--device cpu --shape 512x4096x16 --scale 4")
    section "SAELens ${SHAPES[0]},${SHAPES[1]}" 60 "${LENS_KIT[@]}" "${STEP[@]}" "${SHAPES[0]},${SHAPES[1]}" --contenders saelens --rounds 10
    section "SAELens ${SHAPES[2]}" 50 "${LENS_KIT[@]}" "${STEP[@]}" "${SHAPES[2]}" --contenders saelens --rounds 5
    echo
    echo "### done in $((SECONDS - START))s"
    "$PY" bench/h200/summary.py "$RES" "$OUT/cuda_tests.xml" | tee "$OUT/summary.txt"
}

main 2>&1 | tee -a "$OUT/log.txt"
