"""One worker of the multi-worker test: `python multiworker_train_step.py OUT.npz`.

TF_CONFIG (set by the test) describes the cluster; the chief writes the
weights after one train step to OUT.npz.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

import distributed_fixtures


def main():
  output_path = sys.argv[1]
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  weights, loss = distributed_fixtures.train_one_step(strategy)
  task = json.loads(os.environ["TF_CONFIG"])["task"]
  if task["index"] == 0:
    np.savez(output_path, loss=loss, *weights)


if __name__ == "__main__":
  main()
