r"""Builds one dataset from its extracted release folder and prints a one-line JSON summary.

  python -m mcpf_jax.data.prepare NAME --manual_dir M --data_dir D [--skip_bad --report R] [--liqe_dir L] [--overwrite]
  python -m mcpf_jax.data.prepare csv --manual_dir IMAGES --data_dir D --csv_path scores.csv \
      --image_column path --mos_column mos [--config_name mydata ...]

NAME is one of mcpf_jax.data.NAMES. The csv dataset's flags are the fields of csv_layout.CsvSpec (--lower_is_better
for higher_is_better=False; --mos_range LO HI or --mos_range=LO,HI). Prints {"dataset", "config", "num_examples",
"data_dir", "skipped", "report"} on one line (tfds's progress bars go to stderr, on a terminal). Exit status 1 with
the error on stderr when the folder or a label row is bad, 2 for bad flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
import sys
import typing
from collections.abc import Sequence
from typing import Any

from absl import flags

from mcpf_jax.data import builders, csv_layout, problems, registry, sources

_PROG = "python -m mcpf_jax.data.prepare"
_SPEC_FIELDS = dataclasses.fields(csv_layout.CsvSpec)
_SPEC_TYPES = typing.get_type_hints(csv_layout.CsvSpec)


def _flag_name(f: dataclasses.Field) -> str:
  return f.metadata.get("flag", f.name)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("manual_dir", None, "the extracted release folder", flag_values=fv, required=True)
  flags.DEFINE_string("data_dir", None, "where the array_record files go", flag_values=fv, required=True)
  flags.DEFINE_bool("skip_bad", False, "skip bad rows and write a JSON report instead of failing", flag_values=fv)
  flags.DEFINE_string("report", None, "skip report path (default <data_dir>/<name>-skip-report.json)",
                      flag_values=fv)
  flags.DEFINE_string("liqe_dir", None, "folder of LIQE split folders, to join scene/distortion labels",
                      flag_values=fv)
  flags.DEFINE_enum("decode_check", "full", ["full", "verify", "none"], "decode every image, check its structure "
                    "only, or neither", flag_values=fv)
  flags.DEFINE_integer("num_threads", None, "decode-check threads", flag_values=fv)
  flags.DEFINE_integer("resize", None, "store the images pre-resized to this short side (lossless PNG), for a "
                       "training config with the same data.resize: no full-size decode per epoch (use its own "
                       "--data_dir)", flag_values=fv)
  flags.DEFINE_bool("allow_outside_paths", False, "accept label rows naming images outside --manual_dir (absolute "
                    "paths, '..', symlinks out); off: such a row is an error before any image is read",
                    flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "delete this dataset's already-built version folder first (tfds otherwise "
                    "reuses it)", flag_values=fv)
  flags.DEFINE_enum("dmos", "auto", ["auto", "realigned", "original"], "live only", flag_values=fv)
  # The csv dataset: its config name, then one flag per CsvSpec field.
  flags.DEFINE_string("config_name", "default", "csv dataset: the config name (its folder data_dir/csv/<name>)",
                      flag_values=fv)
  for f in _SPEC_FIELDS:
    doc = f"csv dataset: {f.metadata.get('flag_doc', f.metadata['doc'])}"
    name, kind = _flag_name(f), _SPEC_TYPES[f.name]
    if kind is bool:
      default = not f.default if f.metadata.get("inverted") else f.default
      flags.DEFINE_bool(name, default, doc, flag_values=fv)
    elif "tuple" in str(kind):
      flags.DEFINE_list(name, None, doc + " (two numbers)", flag_values=fv)
    else:
      flags.DEFINE_string(name, None if f.default is dataclasses.MISSING else f.default, doc, flag_values=fv)


def _spec_kwargs(fv: flags.FlagValues) -> dict[str, Any]:
  """The CsvSpec fields from their flags (--lower_is_better -> higher_is_better, --mos_range -> two floats)."""
  out = {}
  for f in _SPEC_FIELDS:
    value = fv[_flag_name(f)].value
    if f.metadata.get("inverted"):
      value = not value
    elif "tuple" in str(_SPEC_TYPES[f.name]) and value is not None:
      try:
        value = tuple(float(v) for v in value)
      except ValueError:
        raise flags.IllegalFlagValueError(f"--{_flag_name(f)}: expected two numbers, got {value}") from None
      if len(value) != 2:
        raise flags.IllegalFlagValueError(f"--{_flag_name(f)}: expected two numbers, got {list(value)}")
    out[f.name] = value
  return out


def _joined_pairs(argv: Sequence[str]) -> list[str]:
  """`--mos_range LO HI` (the documented form) -> `--mos_range=LO,HI` (absl flags take one value)."""
  pairs = {f"--{_flag_name(f)}" for f in _SPEC_FIELDS if "tuple" in str(_SPEC_TYPES[f.name])}
  out, i = [], 0
  while i < len(argv):
    if argv[i] in pairs and i + 2 < len(argv) and not argv[i + 1].startswith("--"):
      out.append(f"{argv[i]}={argv[i + 1]},{argv[i + 2]}")
      i += 3
    else:
      out.append(argv[i])
      i += 1
  return out


def _usage(fv: flags.FlagValues) -> str:
  return f"usage: {_PROG} {{{','.join(sorted(builders.BUILDERS))}}} [flags]\n\n{__doc__}\nflags:\n" + \
      fv.get_help(include_special_flags=False)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  _define_flags(fv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(_usage(fv))
    return 0
  try:
    rest = fv([_PROG] + _joined_pairs(argv))[1:]
    if len(rest) != 1 or rest[0] not in builders.BUILDERS:
      raise flags.Error(f"give one dataset name from {sorted(builders.BUILDERS)}, got {rest}")
    name = rest[0]
    spec = _spec_kwargs(fv) if name == registry.CSV else {}
  except flags.Error as e:
    print(f"{_PROG}: error: {e}\n(--help lists the flags)", file=sys.stderr)
    return 2
  kwargs = dict(skip_bad=fv.skip_bad, report_path=fv.report, liqe_dir=fv.liqe_dir, decode_check=fv.decode_check,
                num_threads=fv.num_threads, resize=fv.resize, allow_outside_paths=fv.allow_outside_paths)
  if name == "live":
    kwargs["dmos"] = fv.dmos
  if name == registry.CSV:
    if not spec["csv_path"]:
      print("prepare csv: --csv_path is required", file=sys.stderr)
      return 2
    kwargs["config"] = builders.CsvConfig(name=fv.config_name, **spec)
  try:
    # tfds prints progress on stdout; keep stdout for the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
      b = sources.builder(name, data_dir=fv.data_dir, **kwargs)
      if fv.overwrite and pathlib.Path(b.data_dir).is_dir():
        shutil.rmtree(b.data_dir)
      b.download_and_prepare(download_config=_download_config(fv.manual_dir))
  except problems.DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = {"dataset": name, "config": b.builder_config.name if b.builder_config else None,
             "num_examples": b.info.splits[builders.SPLIT].num_examples, "data_dir": str(b.data_dir),
             "skipped": int(b.info.metadata.get("skipped", 0)),
             "report": str(b.skip_report) if b.skip_report else b.info.metadata.get("skip_report")}
  print(json.dumps(summary))
  return 0


def _download_config(manual_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.download.DownloadConfig(manual_dir=manual_dir)


if __name__ == "__main__":
  sys.exit(main())
