"""Training-step tokens/s, MFU and peak memory: fat5 vs transformers T5 (eager and compiled), same GPU.

Run on a CUDA machine from the repository root: `PYTHONPATH=src python3 benchmarks/bench_model.py`.
The logic lives in fat5.bench (also `fat5 bench`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fat5.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
