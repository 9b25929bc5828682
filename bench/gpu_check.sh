#!/usr/bin/env bash
# GPU check for a lent H200 (see README "Benchmarks"): the kernel tests compiled (TRITON_INTERPRET=0), the
# engine's CUDA paths against transformers, and the benchmarks, in well under 8 minutes. Results go to $OUT.
#
# The device machine has torch, triton, transformers, tokenizers, safetensors, click, jinja2, tqdm, sympy,
# matplotlib and pytest but no network: the few missing pure-Python wheels travel in .whl/ (carry it), made
# here with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl gguf datasketch champ-dataset math-verify \
#       latex2sympy2_extended antlr4-python3-runtime==4.13.2 pytest-benchmark py-cpuinfo
# The packaged SmolLM2 GGUF (94 MB) does not fit the 64 MiB that travels, so the benchmarks use a model of
# SmolLM2-135M's shape with random weights (throughput and bandwidth do not depend on the values) and, when
# .smollm2_tokenizer/ travels too, SmolLM2's own tokenizer (3.5 MB; the E-step benchmark then decodes real
# text), made here with:
#   python -c "from promptcot_engine.models.loader import open_checkpoint as o; \
#       o('smollm2-135m-instruct').tokenizer.save('.smollm2_tokenizer')"
# Run: run(command="bash bench/gpu_check.sh", carry=[".whl", ".smollm2_tokenizer"]).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# the package straight from this tree, no build step (the image's setuptools may predate pyproject's metadata):
# kernels/ becomes promptcot_engine.kernels, as pyproject's package-dir maps it, through a link in this copy of
# the tree (git ignores it). It must live here, not in a tree elsewhere on PYTHONPATH: `python -m` and pytest put
# this directory first on sys.path, so ./promptcot_engine is the package every process imports
ln -sfn ../kernels promptcot_engine/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, triton, promptcot_engine.kernels; print('torch', torch.__version__, 'triton', triton.__version__)" \
  2>&1 | tee "$OUT/install.txt" || exit 1
promptcot() { python3 -m promptcot_engine.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. kernels compiled on the GPU against their references, and the engine on CUDA (Triton decode and prefill in
# the model, CUDA graphs, profiled KV budget, two engines in one process) against transformers on the same GPU;
# no -x: a first run reports every failure. The engine first: should the timeout cut the run short, the kernel
# tests it cuts are the ones the interpreter has already run on CPU; -rfEs and --durations say what ran and how long
# (test_gpu_launch.py is left out: it compiles for a stand-in device, what CPU runs do; here the kernels run)
timeout 180 python3 -m pytest -q -rfEs --durations=15 --maxfail=25 tests/test_engine_cuda.py tests/kernels \
  tests/test_shared_prefix_attention.py --deselect tests/kernels/test_gpu_launch.py 2>&1 | tee "$OUT/tests.txt" | tail -40

# 2. benchmarks on a random model of SmolLM2-135M's shape
python3 - <<'EOF'
import os
from transformers import LlamaConfig, LlamaForCausalLM
from promptcot_engine.models.tokenizer import Tokenizer
import tests.tiny_checkpoints as t
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
LlamaForCausalLM(config).save_pretrained("/tmp/smollm2_shape")
tokenizer = ".smollm2_tokenizer" if os.path.isdir(".smollm2_tokenizer") else t.tiny_tokenizer_dir()
print("tokenizer:", tokenizer)
Tokenizer.from_dir(tokenizer).save("/tmp/smollm2_shape")
EOF
for bench in "generate --num-prompts 64 --n 8 --max-tokens 256 --seeded" "score --num-pairs 256" "estep --num-pairs 64 --compare hf"; do
  timeout 80 promptcot bench $bench --model /tmp/smollm2_shape --output "$OUT/bench.jsonl" 2>&1 | tail -25
done
# 3. the fused log-prob kernel's TFLOP/s against the card's bf16 peak, at SmolLM2's and a 7B model's LM head
timeout 60 python3 -m pytest -q -s bench/test_bench_kernels.py -k gpu --benchmark-only 2>&1 | tail -40 \
  | tee "$OUT/logprob_kernel.txt"
