"""Typed settings: the config dataclasses of the library, and their flat form.

Every library entry point takes one frozen dataclass (`training.TrainConfig`,
`task_specific.LayoutConfig`, `decoding.DecodeSettings`, ...). A field made
with `setting()` carries its help text, its command-line name and its
choices, so `cli.define_flags` makes the entry script's flags from it and a
new knob is added in one place. The flat form {flag name: value} (nested
dataclasses flattened) is what the command line, the JSON configs of
`configs/` and a run's config.json hold.
"""

import dataclasses
import json
import typing

import utils


def setting(default, help_text, *, flag=None, choices=None):
  """A dataclass field with its flag's help, name (default: the field's)
  and choices (an enum flag)."""
  return dataclasses.field(default=default, metadata={
      "help": help_text, "flag": flag, "choices": choices})


def flag_name(field):
  return field.metadata.get("flag") or field.name


def field_types(config_type):
  """{field name: its type}, with Optional[X] given as X."""
  types = {}
  for name, kind in typing.get_type_hints(config_type).items():
    arguments = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(arguments) == 1:
      kind = arguments[0]
    types[name] = kind
  return types


def flatten(config):
  """{flag name: value} of a config, nested configs flattened, as JSON has
  the values (lists, not tuples)."""
  flat = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      flat.update(flatten(value))
    else:
      flat[flag_name(field)] = value
  return json.loads(json.dumps(flat))


def flat_defaults(config_type):
  """{flag name: default} of a config type, nested types flattened."""
  flat = {}
  types = field_types(config_type)
  for field in dataclasses.fields(config_type):
    if dataclasses.is_dataclass(types[field.name]):
      flat.update(flat_defaults(types[field.name]))
    elif field.default is dataclasses.MISSING:
      flat[flag_name(field)] = field.default_factory()
    else:
      flat[flag_name(field)] = field.default
  return json.loads(json.dumps(flat))


def from_flat(config_type, values, where):
  """The config of a flat {flag name: value}; a missing name takes its
  default, an unknown one is a UserError naming `where`."""
  unknown = set(values) - set(flat_defaults(config_type))
  if unknown:
    raise utils.UserError(
        f"{where}: unknown setting(s) {', '.join(sorted(unknown))}, expected "
        f"the settings of {config_type.__name__}")
  return _build(config_type, values)


def read_flat_config(path):
  """A JSON config file's flat object {flag name: value} (local or gs://),
  as `configs/` holds them."""
  config = utils.read_json(path, "config file")
  if not isinstance(config, dict):
    raise utils.UserError(f"{path}: expected a JSON object of flag values")
  return config


def _build(config_type, values):
  types = field_types(config_type)
  arguments = {}
  for field in dataclasses.fields(config_type):
    if dataclasses.is_dataclass(types[field.name]):
      arguments[field.name] = _build(types[field.name], values)
    elif flag_name(field) in values:
      arguments[field.name] = values[flag_name(field)]
  return config_type(**arguments)
