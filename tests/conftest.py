"""Test set-up: four logical CPU devices, made before TensorFlow initialises;
the order of the tests and how pytest-xdist shares them out (`make test`)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# transformers decides at import whether PyTorch is there: here, before a
# test module's `import cli` turns it off for the process (cli.py's start-up
# environment); the export test loads PyTorch GPT-2 in this process.
import transformers.utils.import_utils  # pylint: disable=g-import-not-at-top,unused-import
from xdist import scheduler  # pylint: disable=g-import-not-at-top

import tf_utils  # pylint: disable=g-import-not-at-top

NUM_LOGICAL_CPUS = 4
LOGICAL_CPUS = tf_utils.split_host_cpu(NUM_LOGICAL_CPUS)

# The Makefile runs `pytest -n 2 --dist loadscope --no-loadscope-reorder`:
# xdist hands out scopes (below: modules) in collection order, one scope to
# one process at a time, and the suite ends when the last scope does. So the
# modules that take longest come first (measured; the others keep pytest's
# order), and a module is one scope, so that its module fixtures are built
# once, except the modules below, whose tests share no costly fixture and
# are each long: each of their tests is a scope, spread over both processes.
LONGEST_MODULES_FIRST = (
    "test_live_retrieval.py", "test_main.py", "test_xla_strategies.py",
    "test_benches.py", "test_memory_plan.py", "test_training.py",
    "test_distributed_input.py", "test_retrieval_service.py",
    "test_evaluation_grid.py", "test_generation.py", "test_placement.py",
    "test_index_refresh.py", "test_train_retriever.py",
    "test_retrieval_utils.py", "test_kilt_metrics.py", "test_query_cacher.py",
    "test_export_hf.py", "test_notebooks.py", "test_make_demo_data.py",
    "test_demo.py", "test_real_eli5.py", "test_tf_utils.py",
    "test_readme.py")
MODULES_SPREAD_TEST_BY_TEST = ("test_main.py", "test_xla_strategies.py",
                               "test_live_retrieval.py", "test_benches.py",
                               "test_memory_plan.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


class ModuleScheduling(scheduler.LoadScopeScheduling):
  """xdist's scope scheduling with a module as the scope, but for the tests
  of MODULES_SPREAD_TEST_BY_TEST, each its own scope. (xdist's own
  `--dist loadgroup` marks cannot do it: they do not work under pytest 9.)"""

  def _split_scope(self, nodeid):
    module = nodeid.split("::", 1)[0]
    if os.path.basename(module) in MODULES_SPREAD_TEST_BY_TEST:
      return nodeid
    return module


def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") == "loadscope":
    return ModuleScheduling(config, log)
  return None  # xdist's own
