"""Devices and strategies, optimizers and schedules, checkpoints and TFRecord helpers.

Knows about tf.distribute and Keras optimizers; knows nothing about ELI5.
"""

import tensorflow as tf


# ---------------------------------------------------------------------------
# Devices and strategies
# ---------------------------------------------------------------------------


def split_host_cpu(num_devices):
  """Splits the host CPU into `num_devices` logical devices.

  Must run before TensorFlow initialises its devices (before the first op).
  Used by the tests, and by CPU runs that want several replicas or a model
  split over several devices.
  """
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
  return [device.name for device in tf.config.list_logical_devices("CPU")]
