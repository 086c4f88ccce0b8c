"""Entry script for the deepspeed launcher (and plain ``python`` for one process).

    deepspeed --num_gpus 8 launch/train.py --config ds_accel/configs/default.yaml --set deepspeed.config=ds_configs/zero3.json
    python launch/train.py --config default
"""

import os
import sys

from ds_accel.cli import main

if __name__ == "__main__":
    code = main(["train", *sys.argv[1:]])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo may abort in it (see runtime.shutdown)
