"""Start every service of a run from one YAML: the script form of ``atropos-verl-launch``.

    python recipe/atropos/launch_atropos_verl_services.py --config recipe/atropos/config/atropos_grpo_cpu.yaml
    python recipe/atropos/launch_atropos_verl_services.py --config FILE.yaml trainer.total_training_steps=20
    python recipe/atropos/launch_atropos_verl_services.py --config FILE.yaml --dry-run

The launcher itself is :mod:`recipe.atropos.launcher.launch`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipe.atropos.launcher.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
