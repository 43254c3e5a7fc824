#!/usr/bin/env bash
# Set-up and main job: installs the packages, builds vqkit (Release) and
# trains the CoPilot4D LiDAR tokenizer (examples/train_tokenizer, small
# config, 300 steps: about 4 minutes on 2 cores) on its built-in default data
# (../shared/data/kitti/seq00 when it exists, else a synthetic LiDAR street),
# then evaluates the final checkpoint (examples/eval_tokenizer). Results go to
# runs/demo. Arguments are passed to train_tokenizer (--help lists them).
# The quantizer-only demo is examples/vq_train (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j"$(nproc)" --target train_tokenizer eval_tokenizer
rm -rf runs/demo/checkpoints
./build/examples/train_tokenizer --out runs/demo "$@"
last=$(ls -t runs/demo/checkpoints/*.safetensors | head -n 1)
exec ./build/examples/eval_tokenizer --checkpoint "$last" --out runs/demo/eval
