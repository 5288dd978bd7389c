#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/h200/run.sh installs on the H200: what the bench needs there that the device
# image lacks (cp312, manylinux x86_64 or pure Python). Run it here, before the device call, in the checkout the
# device tool sends (the session's own checkout, not a helper's worktree); `.whl/` is ignored by git and travels
# with carry [".whl"].
#
# The sets were found by importing and stepping each library in a Python 3.12 venv holding the image's packages
# (torch 2.11.0, transformers 5.17.0, numpy 2.5.2, pandas, pyarrow, ...; KINDS.md's list) and nothing else:
#   sae-kit: nothing. The bench's paths (steps, train(), train --activations, cache of a GPT-2-shaped model with
#            the hf backend, the CUDA tests) import only what the image has; no transformer-lens, datasets, plotly.
#   common:  sparsify 1.3.3 imports datasets, dill, multiprocess, natsort, schedulefree, simple_parsing and
#            docstring_parser at load time (its other requirements, accelerate etc., are in the image).
#   lens:    SAELens 6.54.12 adds transformer-lens 3.9.0 (it pins <4) and better-abc; it imports wandb at load
#            time only, for which run.sh writes an empty stand-in module. This folder is on the path of the SAELens
#            process alone, so no sae-kit process sees transformer-lens 3.9 or the stand-in.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

COMMON=(eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort==8.4.0 schedulefree==1.4.1
        simple-parsing==0.1.9 docstring-parser==0.18.0)
LENS=(sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

git check-ignore -q .whl/probe.whl || echo "/.whl/" >>"$(git rev-parse --git-path info/exclude)"
rm -rf .whl
mkdir -p .whl/common .whl/lens
get() {  # get DIR SPEC...
    local dir=$1
    shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$dir" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
get .whl/common "${COMMON[@]}"
get .whl/lens "${LENS[@]}"

# exactly one wheel per requested package, and nothing else
for dir in common lens; do
    [ "$dir" = common ] && want=("${COMMON[@]}") || want=("${LENS[@]}")
    n=$(find .whl/$dir -type f -name '*.whl' | wc -l)
    [ "$n" -eq "${#want[@]}" ] || { echo "expected ${#want[@]} wheels in .whl/$dir, found $n" >&2; exit 1; }
done
dupes=$(find .whl -type f -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "two versions of: $dupes" >&2; exit 1; }

find .whl -type f -name '*.whl' -printf '%s\t%P\n' | sort -k2 | awk -F'\t' '{printf "%9d  %s\n", $1, $2}'
size() { du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1; }
wheels=$(find .whl -type f -name '*.whl' -print0 | size)
tracked=$(git ls-files -z | size)
untracked=$(git ls-files -z --others --exclude-standard | size)
shared=0
[ -d shared ] && shared=$(find shared -type f -print0 | size)  # a shared/ inside the checkout travels too
awk -v w="$wheels" -v t="$tracked" -v u="${untracked:-0}" -v s="${shared:-0}" 'BEGIN {
    m = 1048576; total = (w + t + u + s) / m
    printf "wheels %.1f MiB + tracked %.1f MiB + untracked, not ignored %.1f MiB + shared/ %.1f MiB = %.1f MiB ", \
        w / m, t / m, u / m, s / m, total
    printf "of the 64 MiB that travel\n"
    if (total > 56) { print "over 56 MiB: too close to the device tool'"'"'s 64 MiB limit" > "/dev/stderr"; exit 1 }
}'
