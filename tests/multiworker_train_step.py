"""One worker of the multi-worker tests:
`python multiworker_train_step.py OUT.npz [--jit_compile]`.

TF_CONFIG (set by the test) describes the cluster; the chief writes the
weights after one train step (compiled with XLA under --jit_compile) to
OUT.npz.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

import distributed_fixtures


def main():
  output_path = sys.argv[1]
  jit_compile = sys.argv[2:] == ["--jit_compile"]
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  weights, loss = distributed_fixtures.train_one_step(
      strategy, jit_compile=jit_compile)
  task = json.loads(os.environ["TF_CONFIG"])["task"]
  if task["index"] == 0:
    np.savez(output_path, loss=loss, *weights)


if __name__ == "__main__":
  main()
