#!/usr/bin/env bash
# Installs the peer implementation of benchmarks/fmnist_knn.py --peer lightly (and throughput.py's baselines) into
# benchmarks/.peer, outside selfsight's environment and dependencies: lightly alone (--no-deps), plus
# lightning-utilities, which lightly.transforms imports. Its losses, heads and utilities import only
# torch, torchvision, numpy and tqdm, which selfsight's .venv has; its other dependencies (pytorch_lightning,
# hydra-core, ...) serve parts of lightly the benchmark does not use. benchmarks/peer_lightly.py puts the folder
# first on sys.path.
#
#   bash benchmarks/setup_peer.sh                          # lightly 1.6.0 with .venv/bin/python
#   LIGHTLY_VERSION=1.5.22 PYTHON=python3 bash benchmarks/setup_peer.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
version="${LIGHTLY_VERSION:-1.6.0}"
target="$here/.peer"

if [ ! -x "$python" ] && ! command -v "$python" >/dev/null; then
    echo "setup_peer.sh: $python not found: run 'make setup' first, or set PYTHON" >&2
    exit 1
fi
"$python" -m pip install --quiet --no-deps --upgrade --target "$target" "lightly==$version"
# lightly.transforms (benchmarks/throughput.py's lightly baselines) imports lightning_utilities
"$python" -m pip install --quiet --no-deps --upgrade --target "$target" lightning-utilities
# git (and so ruff) ignores the folder's content without a line in the repository's .gitignore
echo "*" > "$target/.gitignore"
PYTHONPATH="$target" "$python" - <<'PY'
import lightly
from lightly.loss import NegativeCosineSimilarity, NTXentLoss  # noqa: F401
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead  # noqa: F401
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum  # noqa: F401
from lightly.utils.scheduler import cosine_schedule  # noqa: F401
from lightly.transforms import BYOLTransform, MAETransform, SimCLRTransform  # noqa: F401

print(f"lightly {lightly.__version__} ready in {lightly.__path__[0].rsplit('/', 1)[0]}")
PY
