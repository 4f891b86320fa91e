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
    budget, its nprobe swept to the smallest value matching ScaNN's recall.
(c) The cacher's peak memory (`query_cacher_tfrecord.py` in a subprocess,
    its peak RSS polled from /proc, Linux) on a generated corpus whose block
    text is several GB, against the budget block-embedding bytes + 1.5 GB.

The database for (a) and (b) is synthetic: clustered Gaussian vectors with a
power-law spectrum (`retrieval_eval.clustered_gaussian_vectors`), queries
drawn from the same mixture. Default sizes (1M x 128, 3.5 GB of text) take
about 10 minutes on 2 cores; `--quick` is a small run for development:

  python bench/bench_retrieval.py [--quick] [--output_path=bench_retrieval.json]
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags
import faiss
import numpy as np
import tensorflow as tf
import tqdm

# Run as a script from the repository root or anywhere: the modules live one up.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrieval_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrievers  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

FULL_NUM_QUESTIONS = 272_634 + 1_507 + 600  # KILT ELI5 train + dev + test
FULL_NUM_BLOCKS = 13_353_718  # REALM's enwiki-20181220 blocks
MEMORY_SLACK_BYTES = int(1.5 * 2**30)

_FLAG_QUICK = flags.DEFINE_boolean(
    "quick", False, "A small run (100k vectors, 0.2 GB of text) for "
    "development; overrides the size flags.")
_FLAG_NUM_BLOCKS = flags.DEFINE_integer(
    "num_blocks", 1_000_000, "Database vectors for (a) and (b).")
_FLAG_NUM_QUERIES = flags.DEFINE_integer(
    "num_queries", 300, "Queries for (a) and (b).")
_FLAG_K = flags.DEFINE_integer("k", 10, "Neighbours per query (recall@k).")
_FLAG_RUNS = flags.DEFINE_integer(
    "runs", 2, "Timed runs of each search (interleaved); the best is kept, "
    "the one least disturbed by other work on a shared machine.")
_FLAG_SCANN_CONFIG_PATH = flags.DEFINE_string(
    "scann_config_path", os.path.join(REPO, "configs", "scann_configs",
                                      "default.json"),
    "ScaNN config for (b).")
_FLAG_TEXT_GB = flags.DEFINE_float(
    "text_gb", 3.5, "(c): gigabytes of block text in the generated blocks.tfr.")
_FLAG_BLOCK_BYTES = flags.DEFINE_integer(
    "block_bytes", 1500, "(c): bytes of text per block (REALM's blocks are "
    "288 wordpieces, about 1.5 kB).")
_FLAG_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "(c): where to generate the corpus (default: a "
    "temporary directory, deleted at the end).")
_FLAG_PARTS = flags.DEFINE_list(
    "parts", ["a", "b", "c"], "Parts to run, among a, b, c.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Optional: write the results here as JSON.")
_FLAG_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")


def best_of(runs, search, queries):
  """(result, queries/s of the fastest of `runs` calls), after a warm-up."""
  best_qps = 0.0
  for _ in range(runs):
    result, qps = retrieval_eval.timed(search, queries)
    best_qps = max(best_qps, qps)
  return result, best_qps


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


def bench_exact(database, queries, k, runs):
  """(a): (result dict, our exact (scores, ids), the ground truth for (b))."""
  flat = faiss.IndexFlatIP(database.shape[1])
  flat.add(database)
  searches = {
      "ours": lambda q: retrievers.exact_search(q, database, k),
      "faiss_flat_ip": lambda q: flat.search(q, k),
      "numpy": lambda q: numpy_exact_search(q, database, k),
  }
  best = {name: 0.0 for name in searches}
  results = {}
  for _ in range(runs):
    for name, search in searches.items():
      results[name], qps = retrieval_eval.timed(search, queries)
      best[name] = max(best[name], qps)
  exact_scores, exact_ids = results["ours"]
  agreement = {name: retrieval_eval.recall_at_k(
      exact_ids, results[name][1], k, exact_scores=exact_scores,
      approx_true_scores=retrieval_eval.true_scores(queries, database,
                                                    results[name][1]))
               for name in ("faiss_flat_ip", "numpy")}
  result = {
      "queries_per_second": best,
      "ours_over_faiss": best["ours"] / best["faiss_flat_ip"],
      "ours_over_numpy": best["ours"] / best["numpy"],
      "agreement_with_ours": agreement,
      "full_scale_hours": {name: hours_at_full_scale(qps, len(database))
                           for name, qps in best.items()},
  }
  print(f"\n(a) exact search, {len(queries):,} queries x {len(database):,} "
        f"blocks, k={k} (best of {runs})")
  print(f"{'':<16}{'queries/s':>12}{'ours/x':>9}{'agree':>8}"
        f"{'full scale (h)':>16}")
  for name, qps in best.items():
    ratio = best["ours"] / qps
    agree = agreement.get(name, 1.0)
    print(f"{name:<16}{qps:>12,.1f}{ratio:>8.2f}x{agree:>8.4f}"
          f"{result['full_scale_hours'][name]:>16,.1f}")
  print(f"full scale = {FULL_NUM_QUESTIONS:,} questions x "
        f"{FULL_NUM_BLOCKS:,} blocks on this machine, time linear in blocks")
  return result, (exact_scores, exact_ids)


# ---------------------------------------------------------------------------
# (b) ScaNN vs faiss IVF-PQ at matched recall
# ---------------------------------------------------------------------------


def bench_scann_vs_ivfpq(database, queries, k, runs, exact, exact_qps,
                         scann_config):
  """(b): ScaNN with `scann_config`, then faiss IVF-PQ swept to its recall."""
  exact_scores, exact_ids = exact

  def recall(ids):
    return retrieval_eval.recall_at_k(
        exact_ids, ids, k, exact_scores=exact_scores,
        approx_true_scores=retrieval_eval.true_scores(queries, database, ids))

  start = time.perf_counter()
  searcher = retrievers.ScannSearcher.build(database, scann_config)
  scann_build = time.perf_counter() - start
  (_, scann_ids), scann_qps = best_of(
      runs, lambda q: searcher.search(q, k), queries)
  scann_recall = recall(scann_ids)
  del searcher

  # faiss with ScaNN's budget: as many partitions, 32-byte codes, and the
  # same number of candidates re-ranked by exact inner products.
  start = time.perf_counter()
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
  _, faiss_qps = best_of(runs, lambda q: refined.search(q, k), queries)
  matched["queries_per_second"] = faiss_qps
  result = {
      "scann": {"recall": scann_recall, "queries_per_second": scann_qps,
                "build_seconds": scann_build,
                "speedup_over_exact": scann_qps / exact_qps},
      "faiss_ivfpq": {"matched": matched, "sweep": sweep,
                      "build_seconds": faiss_build},
      "scann_over_faiss": scann_qps / faiss_qps,
      "config": scann_config,
  }
  print(f"\n(b) approximate search, recall@{k} against exact, "
        f"{len(queries):,} queries x {len(database):,} blocks; ScaNN config "
        f"{scann_config}")
  print(f"{'':<28}{f'recall@{k}':>10}{'queries/s':>12}{'vs exact':>10}"
        f"{'build (s)':>11}")
  print(f"{'exact (ours)':<28}{1.0:>10.4f}{exact_qps:>12,.1f}{1.0:>9.1f}x"
        f"{'':>11}")
  print(f"{'scann':<28}{scann_recall:>10.4f}{scann_qps:>12,.1f}"
        f"{scann_qps / exact_qps:>9.1f}x{scann_build:>11.1f}")
  name = f"faiss IVF-PQ nprobe={matched['nprobe']}"
  print(f"{name:<28}{matched['recall']:>10.4f}{faiss_qps:>12,.1f}"
        f"{faiss_qps / exact_qps:>9.1f}x{faiss_build:>11.1f}")
  if matched["reached_scann_recall"]:
    print(f"ScaNN / faiss IVF-PQ at matched recall: "
          f"{result['scann_over_faiss']:.2f}x")
  else:
    print("faiss IVF-PQ did not reach ScaNN's recall at any nprobe")
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


def main(argv):
  parts = _FLAG_PARTS.value
  if not parts or set(parts) - {"a", "b", "c"}:
    raise utils.UserError(f"--parts={','.join(parts)}: expected some of a,b,c")
  if _FLAG_QUICK.value:
    num_blocks, num_queries, text_gb = 100_000, 200, 0.2
  else:
    num_blocks, num_queries, text_gb = (_FLAG_NUM_BLOCKS.value,
                                        _FLAG_NUM_QUERIES.value,
                                        _FLAG_TEXT_GB.value)
  k, runs = _FLAG_K.value, _FLAG_RUNS.value
  scann_config = retrievers.load_scann_config(_FLAG_SCANN_CONFIG_PATH.value)
  if _FLAG_OUTPUT_PATH.value:
    utils.makedirs(os.path.dirname(_FLAG_OUTPUT_PATH.value) or ".")
  print(f"{os.cpu_count()} CPU cores; database: clustered Gaussian vectors "
        f"{num_blocks:,} x 128, {num_queries:,} queries", flush=True)
  results = {"num_blocks": num_blocks, "num_queries": num_queries, "k": k}
  started = time.perf_counter()
  if "a" in parts or "b" in parts:
    database, queries = retrieval_eval.synthetic_database_and_queries(
        num_blocks, num_queries, 128, _FLAG_SEED.value)
    results["exact"], exact = bench_exact(database, queries, k, runs)
    if "b" in parts:
      results["approximate"] = bench_scann_vs_ivfpq(
          database, queries, k, runs, exact,
          results["exact"]["queries_per_second"]["ours"], scann_config)
    del database, queries
  if "c" in parts:
    work_dir = (_FLAG_WORK_DIR.value or
                tempfile.mkdtemp(prefix="bench_retrieval_"))
    try:
      results["cacher_memory"] = bench_cacher_memory(
          work_dir, text_gb, _FLAG_BLOCK_BYTES.value, _FLAG_SEED.value)
    finally:
      if not _FLAG_WORK_DIR.value:
        shutil.rmtree(work_dir, ignore_errors=True)
  results["seconds"] = time.perf_counter() - started
  print(f"\nbench took {results['seconds']:.0f} s")
  if _FLAG_OUTPUT_PATH.value:
    utils.atomic_write_json(_FLAG_OUTPUT_PATH.value, results)


if __name__ == "__main__":
  cli.run(main)
