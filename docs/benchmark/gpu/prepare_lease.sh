#!/bin/bash
# Here, before a GPU call: fill .gpu/ with what docs/benchmark/gpu/lease.sh carries to the device machine,
# which has no network and whose image lacks DeepSpeed, datasets, megatron-core and a few of their needs
# (its torch, transformers, pyarrow and huggingface_hub are used as they are, so those versions may differ
# from the CPU tests'). The carried ones are this .venv's versions. Then: the device tool's run with
# carry [".gpu"] and the command `bash docs/benchmark/gpu/lease.sh` (about 3 minutes for the default
# parts on an H200).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
rm -rf .gpu && mkdir -p .gpu/whl .gpu/cache
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
wheels=()
for name in datasets hjson pydantic pydantic_core annotated-types typing-inspection dill multiprocess megatron-core; do
  wheels+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "${wheels[@]}"
# DeepSpeed ships as a source archive: a pure-Python wheel of it (its ops are built at first use, if ever)
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$(version deepspeed)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl "$tmp"/deepspeed-*.tar.gz
rm -rf "$tmp"
cache=${DS_ACCEL_CACHE:-$HOME/.cache/ds_accel}
[ -f "$cache/kjv.txt" ] || { echo "no corpus in $cache: run 'make train' once first (it writes the cache)" >&2; exit 1; }
cp -r "$cache"/kjv.txt "$cache"/tokenizers .gpu/cache/
[ -d "$cache/packed" ] && cp -r "$cache/packed" .gpu/cache/
du -sh .gpu; ls .gpu/whl
