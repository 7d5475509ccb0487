"""``avi-train`` as a script path, for launchers that start a file rather than a module
(DeepSpeed's slurm runner runs ``srun ... python -u <script> <args>``)."""

import sys

from avi_scale.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
