#!/usr/bin/env bash
# The GPU benchmark on a lent device machine, which reaches no package registry and takes at
# most 64 MiB (working tree included) per call: the onnxruntime-gpu wheel (about 245 MiB)
# travels in parts over consecutive calls while the machine stays warm, is joined and
# installed there, then benchmarks/gpu_bench.py runs in one call.
#
# Here (a machine with pip and a registry):
#   bash benchmarks/gpu.sh prepare [--cache DIR] [--part-mib N] [--version V]
#       downloads onnxruntime-gpu==V (default: the installed onnxruntime's version), captum
#       and zennit (the installed versions) as cp312 manylinux wheels into DIR (default
#       ~/.cache/onnxplain-gpu, outside the repository), splits the onnxruntime wheel into
#       parts of N MiB (default: what fits beside the working tree in 64 MiB, at most 59)
#       under .gpu_carry/ (gitignored) with a manifest of sha256 sums, and prints the calls.
#   bash benchmarks/gpu.sh plan          the device calls again (carry lists and commands)
#   bash benchmarks/gpu.sh dry-run       checks prepare's parts end to end here: each part
#       received into a fresh copy as on the device, joined, verified, installed into a
#       scratch folder, and gpu_bench.py --dry-run on the CPU.
# There (device calls, from the repository root, in order, the machine kept warm):
#   bash benchmarks/gpu.sh receive       stores the parts this call carried (sha256 checked)
#       in $GPU_STAGE (default /tmp/onnxplain-gpu, which lives as long as the machine)
#   bash benchmarks/gpu.sh run [gpu_bench.py options]
#       receives, joins and verifies the wheel, installs it with captum and zennit into
#       $GPU_STAGE/site (pip --no-index), and runs gpu_bench.py --out $OUT
#   bash benchmarks/gpu.sh status        what the stage holds
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY_DIR="${GPU_CARRY:-$ROOT/.gpu_carry}"
STAGE="${GPU_STAGE:-/tmp/onnxplain-gpu}"
CACHE="${GPU_CACHE:-$HOME/.cache/onnxplain-gpu}"
LIMIT_MIB=64
MAX_PART_MIB=59
MARGIN_MIB=3

die() { echo "gpu.sh: $*" >&2; exit 2; }
py() { "${PYTHON:-python3}" "$@"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; }

# Bytes of what a device call carries besides the named paths: tracked files, untracked
# files git does not ignore, and shared/ where the checkout has one.
tree_bytes() {
    (cd "$ROOT" && { git ls-files -z -co --exclude-standard; if [ -d shared ]; then find shared -type f -print0; fi; } \
        | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s+=$1} END {print s+0}')
}

ensure_ignored() {
    (cd "$ROOT" && git check-ignore -q "$(basename "$CARRY_DIR")/x") \
        || die "$CARRY_DIR is not ignored by git: add '/$(basename "$CARRY_DIR")/' to .gitignore (a carried path must be ignored)"
}

# ----------------------------------------------------------------------------- here

cmd_prepare() {
    local part_mib="" version=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --cache) CACHE="$2"; shift 2 ;;
            --part-mib) part_mib="$2"; shift 2 ;;
            --version) version="$2"; shift 2 ;;
            *) die "prepare: unknown option $1 (--cache DIR, --part-mib N, --version V)" ;;
        esac
    done
    case "$CACHE" in "$ROOT"|"$ROOT"/*) die "the wheel cache must lie outside the repository, not $CACHE" ;; esac
    ensure_ignored
    [ -n "$version" ] || version="$(py -c 'import onnxruntime; print(onnxruntime.__version__)')" \
        || die "no onnxruntime here to read the version from; give --version"
    local captum zennit
    captum="$(py -c 'from importlib.metadata import version; print(version("captum"))')" || die "captum is not installed here"
    zennit="$(py -c 'from importlib.metadata import version; print(version("zennit"))')" || die "zennit is not installed here"
    mkdir -p "$CACHE"
    local wheel
    wheel="$(ls "$CACHE"/onnxruntime_gpu-"$version"-cp312-*.whl 2>/dev/null | head -1 || true)"
    if [ -z "$wheel" ] || [ ! -f "$CACHE/captum-$captum-py3-none-any.whl" ] || [ ! -f "$CACHE/zennit-$zennit-py3-none-any.whl" ]; then
        echo "downloading onnxruntime-gpu==$version, captum==$captum, zennit==$zennit (cp312, manylinux x86-64) into $CACHE"
        py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$CACHE" \
            "onnxruntime-gpu==$version" "captum==$captum" "zennit==$zennit"
        wheel="$(ls "$CACHE"/onnxruntime_gpu-"$version"-cp312-*.whl | head -1)"
    fi
    [ -f "$wheel" ] || die "no onnxruntime-gpu $version wheel in $CACHE"
    local tree small
    tree="$(tree_bytes)"
    small=$(( $(stat -c %s "$CACHE/captum-$captum-py3-none-any.whl") + $(stat -c %s "$CACHE/zennit-$zennit-py3-none-any.whl") ))
    if [ -z "$part_mib" ]; then
        # The last call carries a part and the small wheels beside the tree.
        part_mib=$(( (LIMIT_MIB * 1048576 - tree - small) / 1048576 - MARGIN_MIB ))
        [ "$part_mib" -le "$MAX_PART_MIB" ] || part_mib=$MAX_PART_MIB
    fi
    case "$part_mib" in ''|*[!0-9]*) die "--part-mib must be a whole number of MiB, got $part_mib" ;; esac
    [ "$part_mib" -ge 1 ] || die "the working tree ($((tree / 1048576)) MiB) leaves no room for a part in $LIMIT_MIB MiB; carry less"
    [ "$part_mib" -lt 60 ] || die "--part-mib must be under 60 MiB"
    if [ $(( tree + small + part_mib * 1048576 )) -gt $(( LIMIT_MIB * 1048576 )) ]; then
        die "a $part_mib MiB part beside the working tree ($((tree / 1048576)) MiB) exceeds $LIMIT_MIB MiB; use a smaller --part-mib"
    fi
    rm -rf "$CARRY_DIR"
    mkdir -p "$CARRY_DIR/small"
    split -d -a 2 -b "${part_mib}M" "$wheel" "$CARRY_DIR/ort.part"
    cp "$CACHE/captum-$captum-py3-none-any.whl" "$CACHE/zennit-$zennit-py3-none-any.whl" "$CARRY_DIR/small/"
    {
        echo "wheel $(basename "$wheel") $(sha "$wheel") $(stat -c %s "$wheel")"
        for p in "$CARRY_DIR"/ort.part*; do echo "part $(basename "$p") $(sha "$p")"; done
        for w in "$CARRY_DIR"/small/*.whl; do echo "small $(basename "$w") $(sha "$w")"; done
    } > "$CARRY_DIR/manifest"
    echo "split $(basename "$wheel") ($(( $(stat -c %s "$wheel") / 1048576 )) MiB) into $(ls "$CARRY_DIR"/ort.part* | wc -l) parts of at most $part_mib MiB (working tree $((tree / 1048576)) MiB)"
    cmd_plan
}

cmd_plan() {
    [ -f "$CARRY_DIR/manifest" ] || die "no $CARRY_DIR/manifest: run 'bash benchmarks/gpu.sh prepare' first"
    local rel parts n i p
    rel="${CARRY_DIR#"$ROOT"/}"
    mapfile -t parts < <(awk '$1 == "part" {print $2}' "$CARRY_DIR/manifest")
    n=${#parts[@]}
    local tree biggest
    tree="$(tree_bytes)"
    biggest="$(for p in "${parts[@]}"; do stat -c %s "$CARRY_DIR/$p"; done | sort -n | tail -1)"
    if [ $(( tree + biggest + 1048576 )) -gt $(( LIMIT_MIB * 1048576 )) ]; then
        echo "gpu.sh: WARNING: the working tree is now $((tree / 1048576)) MiB: with a $((biggest / 1048576)) MiB part a call exceeds $LIMIT_MIB MiB; run prepare again" >&2
    fi
    echo
    echo "Device calls, in order, while the machine stays warm (it goes back ~30 s after a call; each call's"
    echo "carry travels beside the working tree, 64 MiB in all). If it went back between calls, start again"
    echo "from call 1: the stage lives in the machine's /tmp."
    i=1
    for p in "${parts[@]}"; do
        if [ "$i" -lt "$n" ]; then
            echo "  $i. carry [\"$rel/manifest\", \"$rel/$p\"]  command: bash benchmarks/gpu.sh receive"
        else
            echo "  $i. carry [\"$rel/manifest\", \"$rel/$p\", \"$rel/small\"]  command: bash benchmarks/gpu.sh run  (timeout_s 600)"
        fi
        i=$((i + 1))
    done
    echo "The last call writes \$OUT/gpu_results.md (the RESULTS.md section), gpu_results.json and gpu_bench.log."
}

# ----------------------------------------------------------------------------- there

manifest_sum() { awk -v k="$1" -v n="$2" '$1 == k && $2 == n {print $3}' "$STAGE/manifest"; }

cmd_receive() {
    [ -f "$CARRY_DIR/manifest" ] || die "this call carried no $CARRY_DIR/manifest; carry it in every call"
    mkdir -p "$STAGE/parts" "$STAGE/small"
    if [ -f "$STAGE/manifest" ] && ! cmp -s "$STAGE/manifest" "$CARRY_DIR/manifest"; then
        echo "gpu.sh: a new manifest (another prepare): the parts staged before are dropped" >&2
        rm -rf "$STAGE/parts" "$STAGE/small" "$STAGE/wheels" "$STAGE/site"
        mkdir -p "$STAGE/parts" "$STAGE/small"
    fi
    cp "$CARRY_DIR/manifest" "$STAGE/manifest"
    local f name want got
    for f in "$CARRY_DIR"/ort.part* "$CARRY_DIR"/small/*.whl; do
        [ -f "$f" ] || continue
        name="$(basename "$f")"
        case "$f" in */small/*) want="$(manifest_sum small "$name")"; dest="$STAGE/small/$name" ;;
                     *) want="$(manifest_sum part "$name")"; dest="$STAGE/parts/$name" ;; esac
        [ -n "$want" ] || die "$name is not in the manifest"
        if [ -f "$dest" ] && [ "$(sha "$dest")" = "$want" ]; then continue; fi
        got="$(sha "$f")"
        [ "$got" = "$want" ] || die "$name arrived damaged (sha256 $got, manifest $want); carry it again"
        cp "$f" "$dest.tmp" && mv "$dest.tmp" "$dest"
        echo "received $name"
    done
    cmd_status || true  # parts still to come are no failure of this call
}

cmd_status() {
    [ -f "$STAGE/manifest" ] || { echo "stage $STAGE: empty"; return 0; }
    local have=0 total=0 missing="" p
    for p in $(awk '$1 == "part" {print $2}' "$STAGE/manifest"); do
        total=$((total + 1))
        if [ -f "$STAGE/parts/$p" ]; then have=$((have + 1)); else missing="$missing $p"; fi
    done
    echo "stage $STAGE: $have of $total parts${missing:+; missing:$missing}"
    [ -z "$missing" ]
}

join_wheel() {
    local name want size out
    read -r _ name want size < <(awk '$1 == "wheel"' "$STAGE/manifest")
    out="$STAGE/wheels/$name"
    mkdir -p "$STAGE/wheels"
    if [ ! -f "$out" ] || [ "$(sha "$out")" != "$want" ]; then
        cat $(awk '$1 == "part" {print $2}' "$STAGE/manifest" | sed "s|^|$STAGE/parts/|") > "$out.tmp"
        [ "$(stat -c %s "$out.tmp")" = "$size" ] || die "the joined wheel has $(stat -c %s "$out.tmp") bytes, not $size"
        [ "$(sha "$out.tmp")" = "$want" ] || die "the joined wheel's sha256 differs from the manifest's"
        mv "$out.tmp" "$out"
    fi
    py -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); bad = z.testzip(); sys.exit(f'corrupt member {bad}' if bad else 0)" "$out"
    echo "joined and verified $name"
    WHEEL="$out"
}

wheel_platform() { basename "$1" .whl | awk -F- '{print $NF}'; }

is_cp312() { py -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; }

install_wheels() {
    local site="$1"
    if [ -f "$site/.installed" ] && cmp -s "$site/.installed" "$STAGE/manifest"; then
        echo "already installed in $site"
    else
        rm -rf "$site"
        # The wheels are cp312 (the device's python); on another interpreter (the dry run
        # here) pip installs them for cp312 all the same, which --target allows.
        py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            --only-binary=:all: --python-version 3.12 --implementation cp --platform "$(wheel_platform "$WHEEL")" \
            "$WHEEL" "$STAGE"/small/*.whl
        cp "$STAGE/manifest" "$site/.installed"
        echo "installed $(basename "$WHEEL") and $(ls "$STAGE/small" | tr '\n' ' ')into $site"
    fi
}

cmd_run() {
    local dry=0 a
    for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
    cmd_receive >/dev/null || true
    cmd_status || die "parts are missing: make the earlier calls again (the machine may have gone back)"
    join_wheel
    install_wheels "$STAGE/site"
    if is_cp312; then
        export PYTHONPATH="$STAGE/site${PYTHONPATH:+:$PYTHONPATH}"
    elif [ "$dry" = 1 ]; then
        echo "dry run on python $(py -c 'import platform; print(platform.python_version())'): the cp312 packages are installed" \
             "but not imported; the benchmark uses this interpreter's own onnxruntime"
    else
        die "the device's python is not 3.12 ($(py -V 2>&1)): prepare the wheels for its version"
    fi
    py -c "import onnxruntime as o; print('onnxruntime', o.__version__, 'from', o.__file__, o.get_available_providers())"
    if [ "$dry" = 0 ]; then
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    local out="${OUT:-$ROOT/gpu_out}"
    mkdir -p "$out"
    cd "$ROOT"
    PYTHONUNBUFFERED=1 py benchmarks/gpu_bench.py --out "$out" "$@"
}

# ----------------------------------------------------------------------------- the check here

cmd_dry_run() {
    [ -f "$CARRY_DIR/manifest" ] || die "run 'bash benchmarks/gpu.sh prepare' first"
    local scratch parts p i n
    scratch="$(mktemp -d /tmp/gpu-dry.XXXXXX)"
    mapfile -t parts < <(awk '$1 == "part" {print $2}' "$CARRY_DIR/manifest")
    n=${#parts[@]}
    echo "dry run in $scratch: $n calls simulated, each with only its own carry"
    i=1
    for p in "${parts[@]}"; do
        # A fresh copy of the carry as the device would see it in call i.
        rm -rf "$scratch/carry"
        mkdir -p "$scratch/carry"
        cp "$CARRY_DIR/manifest" "$scratch/carry/"
        cp "$CARRY_DIR/$p" "$scratch/carry/"
        if [ "$i" -lt "$n" ]; then
            GPU_CARRY="$scratch/carry" GPU_STAGE="$scratch/stage" bash "${BASH_SOURCE[0]}" receive || true
        else
            cp -r "$CARRY_DIR/small" "$scratch/carry/"
            GPU_CARRY="$scratch/carry" GPU_STAGE="$scratch/stage" OUT="$scratch/out" \
                bash "${BASH_SOURCE[0]}" run --dry-run "$@"
        fi
        i=$((i + 1))
    done
    echo "dry run: results in $scratch/out"
}

case "${1:-}" in
    prepare) shift; cmd_prepare "$@" ;;
    plan) cmd_plan ;;
    receive) cmd_receive ;;
    status) cmd_status ;;
    run) shift; cmd_run "$@" ;;
    dry-run) shift; cmd_dry_run "$@" ;;
    -h|--help|help|"") usage ;;
    *) usage >&2; die "unknown command $1" ;;
esac
