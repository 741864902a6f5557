#!/usr/bin/env bash
# llama.cpp for `rcpu-lite export --type q4_k_m|q5_k_m|q6_k` and for the export tests, from PyPI only:
#   - llama-cpp-python (pinned), built from its source package: cmake compiles llama.cpp (about 4 minutes on
#     2 cores with the multimodal library left out; the wheel is then cached by this script under .llama.cpp/);
#   - llama.cpp's own converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from the same source package,
#     unpacked into .llama.cpp/, which the tests compare the exporter against.
# Usage: tools/setup_llama_cpp.sh   (in the activated virtual environment; run again: nothing to do)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
dir=.llama.cpp
mkdir -p "$dir"
sdist="$dir/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$dir"
fi
if [ ! -f "$dir/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    tar -xzf "$sdist" -C "$dir" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
fi
if ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$wheel" ]; then
        start=$SECONDS
        CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip wheel --quiet --no-deps "$sdist" -w "$dir"
        echo "built llama-cpp-python $VERSION in $((SECONDS - start)) s"
        wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl | head -1)
    fi
    pip install --quiet "$wheel"
fi
