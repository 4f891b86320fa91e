"""Runs main.py's `main` for several argument lists in one process (tests only).

  python tests/main_driver.py CASES.json RESULTS.json

CASES.json holds a list of argument lists; RESULTS.json gets one entry per
case: {"ok": true} or {"error": "<the UserError's message>"}. The host CPU is
split into four logical devices first, so strategies over several devices and
a model split over devices can be tried. Running main in its own process keeps
its flags out of the pytest process, where other entry scripts' flags live.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

tf_utils.split_host_cpu(4)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

import main  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_case(argv):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["main.py"] + argv)
  try:
    main.main(["main.py"])
  except utils.UserError as error:
    return {"error": str(error)}
  return {"ok": True}


def run():
  with open(sys.argv[1]) as f:
    cases = json.load(f)
  results = [run_case(argv) for argv in cases]
  with open(sys.argv[2], "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  run()
