"""The command-line layer: absl flags made from the library's config dataclasses.

Only entry scripts import this module; the library takes typed configs and
never reads a flag (`check_flags.py` enforces both). A script defines its
flags with `define_flags(SomeConfig)` at import and turns them into the
config with `.config()` in `main`: the flags' names, defaults, help and
choices are the dataclass fields' (`settings.setting`). The flags count as
the calling script's own, as if it had defined them: they are listed by
`--help`, `--helpxml` and `json_to_args.py` under that script.
"""

import dataclasses
import logging
import os
import sys

# Before TensorFlow and transformers are imported (utils imports TensorFlow;
# entry scripts import this module first): the entry scripts use
# TensorFlow's GPT-2 and tf_keras only, so transformers need not import
# PyTorch nor TensorFlow Keras 3, seconds of every start where they are
# installed. A user's own setting wins.
os.environ.setdefault("USE_TF", "1")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

import settings  # pylint: disable=g-import-not-at-top
import utils  # pylint: disable=g-import-not-at-top


def _defining_module_name():
  """The module that called `define_flags`, named as absl names modules."""
  frame = sys._getframe(2)  # pylint: disable=protected-access
  name = frame.f_globals["__name__"]
  return sys.argv[0] if name == "__main__" else name


def _define(kind, name, default, help_text, choices, module_name):
  if choices:
    return flags.DEFINE_enum(name, default, list(choices), help_text,
                             module_name=module_name)
  kind = getattr(kind, "__origin__", None) or kind
  if kind in (list, tuple):
    # absl's list flags take a list default; a frozen config holds a tuple.
    return flags.DEFINE_list(
        name, None if default is None else list(default), help_text,
        module_name=module_name)
  define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
            float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
  return define(name, default, help_text, module_name=module_name)


class FlagGroup:
  """The flags of one config dataclass (nested ones included)."""

  def __init__(self, config_type, overriding, exclude, module_name):
    self.config_type = config_type
    self.overriding = overriding
    self._holders = {}
    self._define_fields(config_type, exclude, module_name)

  def _define_fields(self, config_type, exclude, module_name):
    types = settings.field_types(config_type)
    for field in dataclasses.fields(config_type):
      kind = types[field.name]
      if dataclasses.is_dataclass(kind):
        self._define_fields(kind, exclude, module_name)
        continue
      name = settings.flag_name(field)
      if name in exclude:
        continue
      help_text = field.metadata["help"]
      default = field.default
      if self.overriding:
        help_text = f"{help_text} Default: {self.overriding}, else {default}."
        default = None
      self._holders[name] = _define(kind, name, default, help_text,
                                    field.metadata.get("choices"),
                                    module_name)

  def values(self):
    """{flag name: value}; an overriding group leaves out flags not given."""
    values = {name: holder.value for name, holder in self._holders.items()}
    if self.overriding:
      values = {name: value for name, value in values.items()
                if value is not None}
    return values

  def config(self, **fixed):
    """The config of the flags (`fixed`: values of flags left out)."""
    return settings.from_flat(self.config_type, {**self.values(), **fixed},
                              "command line")


def define_flags(config_type, *, overriding=None, exclude=()):
  """Defines a flag per field of `config_type` (nested dataclasses too).

  Args:
    config_type: a dataclass whose fields are made with `settings.setting`.
    overriding: the flags default to None, meaning "not given", and their
      help ends with "Default: {overriding}, else {the field's default}."
      (e.g. "the run's"): for a script that takes the settings from
      elsewhere unless told otherwise.
    exclude: flag names not to define (the script fixes them).
  """
  return FlagGroup(config_type, overriding, exclude, _defining_module_name())


def parse_flags(argv):
  """absl's flag parsing, with a bad flag (unknown, mistyped, not a choice)
  reported as one line on stderr and exit 2, as every other bad input."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    message = " ".join(str(error).split())
    sys.stderr.write(f"error: {message} (--helpfull lists the flags)\n")
    sys.exit(utils.USER_ERROR_EXIT_CODE)


def run(main, takes_arguments=False):
  """`absl.app.run(main)` for an entry script: bad input, a bad flag
  included, is one line on stderr and exit 2 (`utils.guarded`).

  A job that failed so ends at once, without the interpreter's teardown:
  freeing an input pipeline whose `py_function` producer is still at work
  (live retrieval retrying a dead server) deadlocks there, the destructor of
  tf.distribute's device-prefetch iterator waiting, with the GIL held, for a
  thread that needs the GIL (seen: `MultiDeviceIterator::~MultiDeviceIterator`
  in a py-spy dump of a trainer hung after its one-line error). Whatever the
  job wrote is already whole (temporary names, renamed when complete).
  """
  try:
    app.run(utils.guarded(main, takes_arguments), flags_parser=parse_flags)
  except SystemExit as exit_:
    if exit_.code != utils.USER_ERROR_EXIT_CODE:
      raise
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_.code)  # pylint: disable=protected-access
