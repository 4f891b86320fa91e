"""Test set-up: four logical CPU devices, made before TensorFlow initialises."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_utils  # pylint: disable=g-import-not-at-top

NUM_LOGICAL_CPUS = 4
LOGICAL_CPUS = tf_utils.split_host_cpu(NUM_LOGICAL_CPUS)
