"""The benches' shared helpers (bench/bench_common.py); each bench's smoke run.

The helpers decide whether a ratio may be printed bare: the load verdict, the
interleaving and the matmul peak are tested directly. Each bench then runs
once end to end on tiny shapes in its own process (slow), and must print the
load before and after, the float32 and bfloat16 peaks, and its ratios.
No timing is asserted.
"""

import json
import os
import subprocess
import sys

import pytest

import cache_fixtures
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _load(before, others_cores, cores=2):
  return bench_common.Load(before=before, after=before + 2.0,
                           others_cores=others_cores, cores=cores)


def test_a_quiet_machine_is_comparable_and_its_ratio_bare():
  load = _load(0.3, 0.05)
  assert load.comparable
  assert bench_common.ratio_text(1.234, load) == "1.23x"


def test_a_high_load_flags_the_ratio():
  load = _load(0.2, 1.09)
  assert not load.comparable
  assert bench_common.ratio_text(1.234, load) == (
      "1.23x (load 2.4: not comparable)")


def test_the_load_average_before_counts_the_bench_itself():
  # An earlier part of the same bench raised the minute's average: no one
  # else took CPU meanwhile, so the part is comparable.
  assert _load(1.7, 0.01).comparable


def test_cpu_taken_by_others_meanwhile_counts_as_load():
  # Others got 1 of 2 cores from a bench using both: they wanted 2.
  load = _load(0.1, 1.0)
  assert load.competing == pytest.approx(2.0)
  assert not load.comparable
  # The load average after the run counts the bench itself: not a verdict.
  assert _load(0.1, 0.05).after > 2.0 and _load(0.1, 0.05).comparable
  # Without /proc/stat only the load before is known.
  assert _load(0.4, None).competing == 0.4


def test_load_since_measures_this_process_and_the_machine():
  start = bench_common.snapshot()
  sum(i * i for i in range(200_000))
  load = bench_common.load_since(start)
  assert load.cores == os.cpu_count()
  assert load.before == start.load_1min
  assert "load (1-min)" in load.describe()
  assert set(load.as_dict()) >= {"before", "after", "others_cores",
                                 "competing", "comparable"}


def test_interleaved_alternates_the_order_and_keeps_the_last_output():
  calls = []

  def fn(name):
    def call():
      calls.append(name)
      return len(calls)
    return call

  timings = bench_common.interleaved({"a": fn("a"), "b": fn("b")}, 3)
  # One warm-up each, then rounds forwards, backwards, forwards.
  assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
  assert [len(t.seconds) for t in timings.values()] == [3, 3]
  assert timings["b"].output == 8 and timings["a"].output == 7
  assert timings["a"].min <= timings["a"].median


def test_fewer_than_three_repeats_is_refused():
  with pytest.raises(utils.UserError, match=r"--runs=2: expected >= 3"):
    bench_common.check_repeats(2, "runs")


def test_matmul_peaks_cover_both_precisions_and_every_mode():
  peaks = bench_common.matmul_peaks(64, repeats=3)
  assert set(peaks) == {"float32", "bfloat16"}
  for by_mode in peaks.values():
    assert set(by_mode) == set(bench_common.PEAK_MODES)
    assert all(flops > 0 for flops in by_mode.values())
  assert bench_common.best_peak(peaks, "float32") == max(
      peaks["float32"].values())
  assert "matmul peak 64^3 bfloat16" in bench_common.peaks_text(peaks, 64)


# ---------------------------------------------------------------------------
# Smoke runs of the benches
# ---------------------------------------------------------------------------


def _run_bench(name, *args):
  process = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", name), *args],
      capture_output=True, text=True, cwd=REPO, timeout=900,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  assert process.returncode == 0, process.stderr[-3000:]
  assert "load (1-min)" in process.stdout
  assert "matmul peak" in process.stdout and "bfloat16" in process.stdout
  return process.stdout


def _assert_flagged_if_loaded(stdout, load, ratio_line_start):
  lines = [l for l in stdout.splitlines() if l.startswith(ratio_line_start)]
  assert lines, stdout
  if not load["comparable"]:
    assert all("not comparable" in l for l in lines), lines


@pytest.mark.slow
def test_bench_gpt2_quick_compares_every_setting(tmp_path):
  output = tmp_path / "gpt2.json"
  stdout = _run_bench("bench_gpt2.py", "--quick",
                      f"--output_path={output}")
  results = json.loads(output.read_text())
  for part in ("train", "decode"):
    assert all(len(s) == 3 for s in results[part]["timings"].values())
    assert results[part]["ratio"] > 0
    _assert_flagged_if_loaded(stdout, results[part]["load"], part.upper())
  assert len(results["train"]["timings"]) == 8  # 2 sides x 2 precisions x XLA
  assert len(results["decode"]["timings"]) == 6  # ours: XLA only
  assert 0 < results["train"]["ours"]["mfu"] < 1
  assert set(results["matmul_peaks"]) == {"float32", "bfloat16"}


@pytest.mark.slow
def test_bench_retrieval_times_the_scann_wrapper_against_raw_scann(tmp_path):
  scann_config = tmp_path / "scann.json"
  utils.atomic_write_json(str(scann_config), {
      "num_neighbors": 10, "num_leaves": 20, "num_leaves_to_search": 5,
      "training_sample_size": 2000, "reordering_num_neighbors": 50,
      "dims_per_block": 2, "anisotropic_quantization_threshold": 0.2})
  output = tmp_path / "retrieval.json"
  stdout = _run_bench(
      "bench_retrieval.py", "--parts=a,b", "--num_blocks=5000",
      "--num_queries=40", "--peak_size=128",
      f"--scann_config_path={scann_config}", f"--output_path={output}")
  results = json.loads(output.read_text())
  approximate = results["approximate"]
  # The same index, queries, k and batches: the same neighbours. ScaNN's
  # default batching may choose other kernels, so only nearly the same.
  assert (approximate["scann"]["recall"] ==
          approximate["scann_raw_even_batches"]["recall"])
  assert approximate["scann"]["recall"] == pytest.approx(
      approximate["scann_raw"]["recall"], abs=0.02)
  assert approximate["scann_wrapper_over_raw"] > 0
  assert "ScaNN wrapper / raw ScaNN" in stdout
  _assert_flagged_if_loaded(stdout, approximate["load"], "ScaNN wrapper")


@pytest.mark.slow
def test_bench_input_pipeline_quick_on_a_tiny_world(tmp_path):
  world = cache_fixtures.write_training_world(tmp_path / "world")
  train_config = tmp_path / "train.json"
  values = cache_fixtures.training_values(world, tmp_path, "unused")
  utils.atomic_write_json(str(train_config), {
      name: value for name, value in values.items()
      if name not in ("model_key", "cache_dir", "output_dir", "run_name")})
  output = tmp_path / "pipeline.json"
  stdout = _run_bench(
      "bench_input_pipeline.py", "--quick", f"--cache_dir={world['cache']}",
      f"--model_key={world['model']}", f"--train_config={train_config}",
      f"--output_path={output}")
  results = json.loads(output.read_text())
  assert results["ratio"] > 0 and results["precision"] == "float32"
  _assert_flagged_if_loaded(stdout, results["load"], "input pipeline")


@pytest.mark.slow
def test_bench_grad_cache_quick_prints_memory_and_throughput(tmp_path):
  output = tmp_path / "grad_cache.json"
  stdout = _run_bench("bench_grad_cache.py", "--quick",
                      f"--output_path={output}")
  results = json.loads(output.read_text())
  assert [row["batch_size"] for row in results["rows"]] == [8, 16]
  for row in results["rows"]:
    for side in ("plain", "cached"):
      assert row[side]["peak_bytes"] > 0
      assert row[side]["examples_per_second"] > 0
    assert row["memory_ratio"] > 0 and row["time_ratio"] > 0
    _assert_flagged_if_loaded(stdout, row["load"],
                              f"batch {row['batch_size']:>5}:")
  assert "peak memory plain" in stdout
  assert set(results["matmul_peaks"]) == {"float32", "bfloat16"}
