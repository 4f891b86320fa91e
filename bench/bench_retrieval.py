r"""Benchmarks retrieval against the peers a user would otherwise pick.

(a) Exact inner-product search, queries/s: ours (`retrievers.exact_search`)
    vs faiss `IndexFlatIP` vs NumPy (matmul + argpartition), on the same
    database and queries, runs interleaved; the ratios, and the projection to
    the full job (274,741 KILT ELI5 questions x 13,353,718 REALM blocks;
    exact search time grows linearly with the number of blocks).
(b) ScaNN with the shipped default config (configs/scann_configs/default.json):
    recall@10 against exact search and queries/s, against faiss IVF-PQ with the
    same number of partitions, the same code size (32 bytes a vector: ScaNN's
    2-dimension blocks of 4 bits, faiss' PQ32x8) and the same exact re-ranking
    budget, its nprobe swept to the smallest value matching ScaNN's recall;
    and `retrievers.ScannSearcher.search` against the raw ScaNN searcher it
    wraps (`search_batched_parallel`, same index, queries and k): the
    wrapper should keep >= 0.95x of its speed.
(c) The cacher's peak memory (`query_cacher_tfrecord.py` in a subprocess,
    its peak RSS polled from /proc, Linux) on a generated corpus whose block
    text is several GB, against the budget block-embedding bytes + 1.5 GB.

The database for (a) and (b) is synthetic: clustered Gaussian vectors with a
power-law spectrum (`retrieval_eval.clustered_gaussian_vectors`), queries
drawn from the same mixture. Searches are timed --runs times, interleaved
(min and median); the machine's load is printed before and after each part
and a ratio measured under load is flagged "not comparable", beside the
float32 and bfloat16 matmul peaks measured in the same process
(`bench_common`). Default sizes (1M x 128, 3.5 GB of text) take about 10
minutes on 2 cores; `--quick` is a small run for development:

  python bench/bench_retrieval.py [--quick] [--output_path=bench_retrieval.json]
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing

# Run as a script from the repository root or anywhere, or imported as a
# module (the tests do): the library lives one up, bench_common here.
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path[:0] = [REPO, BENCH_DIR]

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import faiss  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tqdm  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrieval_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrievers  # pylint: disable=g-import-not-at-top,wrong-import-position
import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

FULL_NUM_QUESTIONS = 272_634 + 1_507 + 600  # KILT ELI5 train + dev + test
FULL_NUM_BLOCKS = 13_353_718  # REALM's enwiki-20181220 blocks
MEMORY_SLACK_BYTES = int(1.5 * 2**30)

setting = settings.setting
QUICK_SIZES = dict(num_blocks=100_000, num_queries=200, text_gb=0.2,
                   peak_size=1024)


@dataclasses.dataclass(frozen=True)
class Config:
  """The bench's settings (its flags)."""
  parts: tuple = setting(("a", "b", "c"), "Parts to run, among a, b, c.")
  quick: bool = setting(
      False, "A small run (100k vectors, 0.2 GB of text, 1024^3 peak) for "
      "development; overrides the size flags.")
  num_blocks: int = setting(1_000_000, "Database vectors for (a) and (b).")
  num_queries: int = setting(300, "Queries for (a) and (b).")
  k: int = setting(10, "Neighbours per query (recall@k).")
  runs: int = setting(
      3, "Timed runs of each search, interleaved (>= 3: min and median).")
  scann_config_path: str = setting(
      os.path.join(REPO, "configs", "scann_configs", "default.json"),
      "ScaNN config for (b).")
  text_gb: float = setting(
      3.5, "(c): gigabytes of block text in the generated blocks.tfr.")
  block_bytes: int = setting(
      1500, "(c): bytes of text per block (REALM's blocks are 288 "
      "wordpieces, about 1.5 kB).")
  work_dir: typing.Optional[str] = setting(
      None, "(c): where to generate the corpus (default: a temporary "
      "directory, deleted at the end).")
  peak_size: int = setting(
      2048, "Side of the square matmuls that measure the peak FLOP/s.")
  output_path: typing.Optional[str] = setting(
      None, "Optional: write the results here as JSON.")
  seed: int = setting(0, "Seed of the synthetic data.")


def numpy_exact_search(queries, database, k, query_chunk=128):
  """(scores, ids) of the k best inner products: matmul, argpartition, sort."""
  all_scores, all_ids = [], []
  for start in range(0, len(queries), query_chunk):
    scores = queries[start:start + query_chunk] @ database.T
    ids = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(scores, ids, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    all_scores.append(np.take_along_axis(top, order, axis=1))
    all_ids.append(np.take_along_axis(ids, order, axis=1))
  return np.concatenate(all_scores), np.concatenate(all_ids)


def hours_at_full_scale(queries_per_second, num_blocks):
  """Hours for every ELI5 question over every REALM block, at this rate."""
  full_rate = queries_per_second * num_blocks / FULL_NUM_BLOCKS
  return FULL_NUM_QUESTIONS / full_rate / 3600


# ---------------------------------------------------------------------------
# (a) exact search
# ---------------------------------------------------------------------------


def queries_per_second(timing, num_queries):
  """(best, median) queries/s of a timed search over `num_queries`."""
  return num_queries / timing.min, num_queries / timing.median


def bench_exact(database, queries, k, runs, float32_peak):
  """(a): (result dict, our exact (scores, ids), the ground truth for (b))."""
  flat = faiss.IndexFlatIP(database.shape[1])
  flat.add(database)
  searches = {
      "ours": lambda: retrievers.exact_search(queries, database, k),
      "faiss_flat_ip": lambda: flat.search(queries, k),
      "numpy": lambda: numpy_exact_search(queries, database, k),
  }
  start = bench_common.snapshot()
  timings = bench_common.interleaved(searches, runs)
  load = bench_common.load_since(start)
  best = {name: queries_per_second(t, len(queries))[0]
          for name, t in timings.items()}
  median = {name: queries_per_second(t, len(queries))[1]
            for name, t in timings.items()}
  exact_scores, exact_ids = timings["ours"].output
  agreement = {name: retrieval_eval.recall_at_k(
      exact_ids, timings[name].output[1], k, exact_scores=exact_scores,
      approx_true_scores=retrieval_eval.true_scores(
          queries, database, timings[name].output[1]))
               for name in ("faiss_flat_ip", "numpy")}
  flops_per_query = 2 * database.shape[0] * database.shape[1]
  result = {
      "queries_per_second": best,
      "median_queries_per_second": median,
      "ours_over_faiss": best["ours"] / best["faiss_flat_ip"],
      "ours_over_numpy": best["ours"] / best["numpy"],
      "agreement_with_ours": agreement,
      "fraction_of_float32_peak": {
          name: qps * flops_per_query / float32_peak
          for name, qps in best.items()},
      "full_scale_hours": {name: hours_at_full_scale(qps, len(database))
                           for name, qps in best.items()},
      "load": load.as_dict(),
  }
  print(f"\n(a) exact search, {len(queries):,} queries x {len(database):,} "
        f"blocks, k={k} ({runs} interleaved runs; queries/s of the fastest "
        "and the median run)")
  print(f"{'':<16}{'queries/s':>12}{'median':>10}{'agree':>8}"
        f"{'f32 peak':>10}{'full scale (h)':>16}   ours/x")
  for name, qps in best.items():
    ratio = bench_common.ratio_text(best["ours"] / qps, load)
    agree = agreement.get(name, 1.0)
    print(f"{name:<16}{qps:>12,.1f}{median[name]:>10,.1f}{agree:>8.4f}"
          f"{result['fraction_of_float32_peak'][name]:>10.0%}"
          f"{result['full_scale_hours'][name]:>16,.1f}   {ratio}")
  print(f"full scale = {FULL_NUM_QUESTIONS:,} questions x "
        f"{FULL_NUM_BLOCKS:,} blocks on this machine, time linear in blocks")
  print(f"(a) {load.describe()}")
  return result, (exact_scores, exact_ids)


# ---------------------------------------------------------------------------
# (b) ScaNN vs faiss IVF-PQ at matched recall
# ---------------------------------------------------------------------------


def build_ivfpq(database, scann_config, k):
  """faiss with ScaNN's budget: as many partitions, 32-byte codes (PQ with
  4 dimensions a byte, as ScaNN's 2-dimension blocks of 4 bits), and the same
  number of candidates re-ranked by exact inner products."""
  dim = database.shape[1]
  quantizer = faiss.IndexFlatIP(dim)
  ivfpq = faiss.IndexIVFPQ(quantizer, dim, scann_config["num_leaves"],
                           dim // 4, 8, faiss.METRIC_INNER_PRODUCT)
  sample = np.random.default_rng(0).choice(
      len(database), min(len(database), scann_config["training_sample_size"]),
      replace=False)
  ivfpq.train(database[np.sort(sample)])
  refined = faiss.IndexRefineFlat(ivfpq)
  refined.add(database)
  refined.k_factor = max(1, scann_config["reordering_num_neighbors"] // k)
  return ivfpq, refined


def bench_scann_vs_ivfpq(database, queries, k, runs, exact, exact_qps,
                         scann_config):
  """(b): ScaNN through `retrievers.ScannSearcher` and raw, on one index;
  faiss IVF-PQ, its nprobe swept to ScaNN's recall; the three interleaved."""
  exact_scores, exact_ids = exact

  def recall(ids):
    return retrieval_eval.recall_at_k(
        exact_ids, ids, k, exact_scores=exact_scores,
        approx_true_scores=retrieval_eval.true_scores(queries, database, ids))

  start = time.perf_counter()
  searcher = retrievers.ScannSearcher.build(database, scann_config)
  scann_build = time.perf_counter() - start
  # The raw pybind searcher the wrapper holds: the same index, called as
  # ScaNN documents batched search.
  raw = searcher._searcher  # pylint: disable=protected-access
  scann_recall = recall(searcher.search(queries, k)[1])

  start = time.perf_counter()
  ivfpq, refined = build_ivfpq(database, scann_config, k)
  faiss_build = time.perf_counter() - start
  sweep = []
  nprobe = 1
  while nprobe <= scann_config["num_leaves"]:
    ivfpq.nprobe = nprobe
    (_, ids), qps = retrieval_eval.timed(lambda q: refined.search(q, k),
                                         queries)
    sweep.append({"nprobe": nprobe, "recall": recall(ids),
                  "queries_per_second": qps})
    if sweep[-1]["recall"] >= scann_recall:
      break
    nprobe *= 2
  matched = dict(sweep[-1], reached_scann_recall=sweep[-1]["recall"] >=
                 scann_recall)
  ivfpq.nprobe = matched["nprobe"]

  # ScaNN's parallel search hands its threads batches of 256 queries (its
  # default): 300 queries on 2 cores run as 256 + 44. The wrapper's even
  # batches, called raw, show what splitting the queries evenly gains; their
  # neighbours are the wrapper's (ScaNN's kernels may differ by batch size).
  even_batch = retrievers.scann_batch_size(len(queries))
  searches = {
      "scann": lambda: searcher.search(queries, k),
      "scann_raw": lambda: raw.search_batched_parallel(
          queries, final_num_neighbors=k),
      "scann_raw_even": lambda: raw.search_batched_parallel(
          queries, final_num_neighbors=k, batch_size=even_batch),
      "faiss_ivfpq": lambda: refined.search(queries, k),
  }
  start_load = bench_common.snapshot()
  timings = bench_common.interleaved(searches, runs)
  load = bench_common.load_since(start_load)
  qps = {name: queries_per_second(t, len(queries)) for name, t in
         timings.items()}
  # The raw searcher returns (ids, distances); the others (scores, ids).
  recalls = {"scann": recall(timings["scann"].output[1]),
             "scann_raw": recall(np.asarray(timings["scann_raw"].output[0],
                                            np.int64)),
             "scann_raw_even": recall(np.asarray(
                 timings["scann_raw_even"].output[0], np.int64)),
             "faiss_ivfpq": recall(timings["faiss_ivfpq"].output[1])}
  matched["queries_per_second"] = qps["faiss_ivfpq"][0]
  wrapper_over_raw = qps["scann"][0] / qps["scann_raw"][0]
  result = {
      "scann": {"recall": recalls["scann"],
                "queries_per_second": qps["scann"][0],
                "median_queries_per_second": qps["scann"][1],
                "build_seconds": scann_build,
                "speedup_over_exact": qps["scann"][0] / exact_qps},
      "scann_raw": {"recall": recalls["scann_raw"],
                    "queries_per_second": qps["scann_raw"][0],
                    "median_queries_per_second": qps["scann_raw"][1]},
      "scann_raw_even_batches": {
          "batch_size": even_batch, "recall": recalls["scann_raw_even"],
          "queries_per_second": qps["scann_raw_even"][0],
          "median_queries_per_second": qps["scann_raw_even"][1]},
      "scann_wrapper_over_raw": wrapper_over_raw,
      "scann_wrapper_over_raw_median": qps["scann"][1] / qps["scann_raw"][1],
      "faiss_ivfpq": {"matched": matched, "sweep": sweep,
                      "median_queries_per_second": qps["faiss_ivfpq"][1],
                      "build_seconds": faiss_build},
      "scann_over_faiss": qps["scann"][0] / qps["faiss_ivfpq"][0],
      "config": scann_config,
      "load": load.as_dict(),
  }
  print(f"\n(b) approximate search, recall@{k} against exact, "
        f"{len(queries):,} queries x {len(database):,} blocks; ScaNN config "
        f"{scann_config}; {runs} interleaved runs")
  print(f"{'':<36}{f'recall@{k}':>10}{'queries/s':>12}{'median':>10}"
        f"{'vs exact':>10}{'build (s)':>11}")
  print(f"{'exact (ours)':<36}{1.0:>10.4f}{exact_qps:>12,.1f}{'':>10}"
        f"{1.0:>9.1f}x{'':>11}")
  rows = (("scann (retrievers.ScannSearcher)", "scann", f"{scann_build:.1f}"),
          ("scann raw search_batched_parallel", "scann_raw", "same index"),
          (f"  same, batch_size={even_batch} (1/core)", "scann_raw_even",
           "same index"),
          (f"faiss IVF-PQ nprobe={matched['nprobe']}", "faiss_ivfpq",
           f"{faiss_build:.1f}"))
  for label, name, build in rows:
    print(f"{label:<36}{recalls[name]:>10.4f}{qps[name][0]:>12,.1f}"
          f"{qps[name][1]:>10,.1f}{qps[name][0] / exact_qps:>9.1f}x"
          f"{build:>11}")
  median_ratio = result["scann_wrapper_over_raw_median"]
  print(f"ScaNN wrapper / raw ScaNN, same index, queries and k: "
        f"{bench_common.ratio_text(wrapper_over_raw, load)} (fastest runs), "
        f"{bench_common.ratio_text(median_ratio, load)} (median); target "
        ">= 0.95x")
  if matched["reached_scann_recall"]:
    print(f"ScaNN / faiss IVF-PQ at matched recall: "
          f"{bench_common.ratio_text(result['scann_over_faiss'], load)}")
  else:
    print("faiss IVF-PQ did not reach ScaNN's recall at any nprobe")
  print(f"(b) {load.describe()}")
  return result


# ---------------------------------------------------------------------------
# (c) the cacher's peak memory
# ---------------------------------------------------------------------------


def peak_rss_bytes(pid):
  """The process's peak resident set so far (Linux /proc VmHWM), or 0 once gone.

  VmHWM belongs to the process's current address space, so it counts only
  the program exec'd, unlike getrusage's ru_maxrss, which a child inherits
  from the parent that forked it.
  """
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    pass
  return 0


def run_script(argv, what, poll_seconds=0.1):
  """Runs a Python script to its end; returns its peak RSS in bytes."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  with tempfile.TemporaryFile() as log:
    process = subprocess.Popen([sys.executable] + argv, cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    peak = 0
    while process.poll() is None:
      peak = max(peak, peak_rss_bytes(process.pid))
      time.sleep(poll_seconds)
    if process.returncode != 0:
      log.seek(0)
      tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
      raise RuntimeError(f"{what} failed ({process.returncode}): "
                         + " | ".join(tail))
  return peak


def write_large_blocks(path, num_blocks, block_bytes, seed):
  """A blocks.tfr of `num_blocks` records of about `block_bytes` bytes each.

  Each record is REALM-shaped (title, blank line, text); the texts are
  windows into a long random word sequence, so no two are alike.
  """
  rng = np.random.default_rng(seed)
  syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an",
               "el", "is", "or", "um"]
  words = ["".join(rng.choice(syllables, size=rng.integers(1, 4)))
           for _ in range(5000)]
  text = " ".join(rng.choice(words, size=(4 << 20) // 6)).encode("ascii")
  starts = rng.integers(0, len(text) - block_bytes, size=num_blocks)
  tmp = utils.temporary_path(path)
  with tf.io.TFRecordWriter(tmp) as writer:
    for block_id, start in enumerate(tqdm.tqdm(starts, desc="blocks.tfr",
                                               unit="block", mininterval=5)):
      writer.write(b"Block %d\n\n" % block_id +
                   text[start:start + block_bytes])
  os.rename(tmp, path)


def bench_cacher_memory(work_dir, text_gb, block_bytes, seed):
  """(c): a corpus with `text_gb` of text in `work_dir`; the cacher over it."""
  demo_dir = os.path.join(work_dir, "demo")
  print("\n(c) making a small demo world (embedder, tokenizer, KILT files)",
        flush=True)
  run_script([os.path.join(REPO, "util_scripts", "make_demo_data.py"),
              f"--output_dir={demo_dir}", "--num_train=200",
              "--num_validation=50", "--num_test=20",
              "--num_distractor_blocks=0", "--gpt2_vocab_size=500"],
             "make_demo_data.py")
  num_blocks = int(text_gb * 2**30 // block_bytes)
  corpus_dir = os.path.join(work_dir, "large")
  embedder_dir = os.path.join(corpus_dir, "embedder")
  shutil.copytree(os.path.join(demo_dir, "realm", "embedder"), embedder_dir,
                  ignore=shutil.ignore_patterns("encoded"))
  block_emb = np.random.default_rng(seed).standard_normal(
      (num_blocks, 128), dtype=np.float32)
  embedding_bytes = block_emb.nbytes
  retrievers.write_block_embeddings(embedder_dir, block_emb)
  del block_emb
  blocks_path = os.path.join(corpus_dir, "blocks.tfr")
  write_large_blocks(blocks_path, num_blocks, block_bytes, seed)
  text_bytes = os.path.getsize(blocks_path)
  config_path = os.path.join(corpus_dir, "retriever_config.json")
  utils.atomic_write_json(config_path, {
      "query_embedder_path": embedder_dir, "text_records": blocks_path,
      "num_block_records": num_blocks})
  print(f"(c) caching over {num_blocks:,} blocks, "
        f"{text_bytes / 2**30:.2f} GB of text", flush=True)
  start = time.perf_counter()
  peak = run_script([
      os.path.join(REPO, "query_cacher_tfrecord.py"),
      f"--retriever_config_path={config_path}",
      f"--dataset_root={os.path.join(demo_dir, 'kilt')}",
      f"--output_dir={os.path.join(work_dir, 'cache')}",
      f"--tokenizer={os.path.join(demo_dir, 'tokenizer')}",
      "--num_neighbours=10", "--search=exact", "--num_shards=2"],
                    "query_cacher_tfrecord.py")
  seconds = time.perf_counter() - start
  budget = embedding_bytes + MEMORY_SLACK_BYTES
  result = {"num_blocks": num_blocks, "text_bytes": text_bytes,
            "embedding_bytes": embedding_bytes, "peak_rss_bytes": peak,
            "budget_bytes": budget, "within_budget": peak <= budget,
            "cacher_seconds": seconds}
  print(f"(c) cacher peak RSS {peak / 2**30:.2f} GB; budget = embeddings "
        f"{embedding_bytes / 2**30:.2f} GB + 1.5 GB = {budget / 2**30:.2f} GB "
        f"({'within' if peak <= budget else 'OVER'}); block text "
        f"{text_bytes / 2**30:.2f} GB; cacher took {seconds:.0f} s")
  return result


def run(config):
  """Runs the bench's parts; returns the results (also --output_path's)."""
  parts = config.parts
  if not parts or set(parts) - {"a", "b", "c"}:
    raise utils.UserError(f"--parts={','.join(parts)}: expected some of a,b,c")
  bench_common.check_repeats(config.runs, "runs")
  if config.quick:
    config = dataclasses.replace(config, **QUICK_SIZES)
  for name in ("num_blocks", "num_queries", "k", "block_bytes", "peak_size"):
    if getattr(config, name) < 1:
      raise utils.UserError(
          f"--{name}={getattr(config, name)}: expected >= 1")
  k = config.k
  scann_config = retrievers.load_scann_config(config.scann_config_path)
  if config.output_path:
    utils.check_output_path(config.output_path, "--output_path")
  started = bench_common.snapshot()
  print(f"{os.cpu_count()} CPU cores; load (1-min) before: "
        f"{started.load_1min:.2f}; database: clustered Gaussian vectors "
        f"{config.num_blocks:,} x 128, {config.num_queries:,} queries",
        flush=True)
  # Exact search computes in float32; the bfloat16 peak shows what a
  # bfloat16 scoring pass could reach.
  peaks = bench_common.matmul_peaks(config.peak_size)
  print(bench_common.peaks_text(peaks, config.peak_size), flush=True)
  results = {"num_blocks": config.num_blocks,
             "num_queries": config.num_queries, "k": k,
             "matmul_peaks": peaks}
  if "a" in parts or "b" in parts:
    database, queries = retrieval_eval.synthetic_database_and_queries(
        config.num_blocks, config.num_queries, 128, config.seed)
    results["exact"], exact = bench_exact(
        database, queries, k, config.runs,
        bench_common.best_peak(peaks, "float32"))
    if "b" in parts:
      results["approximate"] = bench_scann_vs_ivfpq(
          database, queries, k, config.runs, exact,
          results["exact"]["queries_per_second"]["ours"], scann_config)
    del database, queries
  if "c" in parts:
    work_dir = config.work_dir or tempfile.mkdtemp(prefix="bench_retrieval_")
    try:
      results["cacher_memory"] = bench_cacher_memory(
          work_dir, config.text_gb, config.block_bytes, config.seed)
    finally:
      if not config.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
  load = bench_common.load_since(started)
  results["load"] = load.as_dict()
  results["seconds"] = time.perf_counter() - started.wall_seconds
  print(f"\nwhole bench: {load.describe()}; took {results['seconds']:.0f} s")
  if config.output_path:
    bench_common.write_results(config.output_path, results)
  return results


_FLAGS = cli.define_flags(Config)


def main(argv):
  del argv
  run(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
