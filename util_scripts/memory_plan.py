r"""Prints the memory a training step needs per device (memory_plan.plan).

  python util_scripts/memory_plan.py --config=gpt2-xl --seq=1024 \
      --micro_batch=1 --optimizer=adafactor --precision=bf16 --recompute \
      --batch_split=8 --answer_window=351 --stages=2 --device_gb=16

`--config` is gpt2, gpt2-medium, gpt2-large or gpt2-xl (shapes built in: no
hub), a directory holding config.json, or a config.json path. Prints a
markdown table of GiB per stage (weights, gradients, accumulator, optimizer
state, activations, total) and, with `--device_gb`, the fewest stages (devices
per replica) that fit devices of that size, TPU v3 cores (16 GiB) and TPU v4
cores (32 GiB).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import memory_plan  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAGS = cli.define_flags(memory_plan.PlanConfig)


def main(argv):
  print(memory_plan.report(_FLAGS.config()))


if __name__ == "__main__":
  cli.run(main)
