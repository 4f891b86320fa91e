"""Measuring retrieval: recall@k of approximate against exact search, queries/s.

Flag-free, so that `util_scripts/scann_test_recall.py`, the benchmarks in
`bench/` and the tests share one definition of recall and one synthetic
database.
"""

import time

import numpy as np
import tensorflow as tf

import retrievers


def recall_at_k(exact_ids, approx_ids, k, *, exact_scores=None,
                approx_true_scores=None, tolerance=1e-6):
  """Mean over queries of the share of the exact top k found by the approximate.

  An approximate neighbour counts when its id is in the exact top k. When
  scores are given, it also counts when its true score ties the exact k-th
  score (within `tolerance`, relative): with duplicate blocks the exact top k
  is one of several equally right answers. Ids < 0 (no neighbour) never count.

  Args:
    exact_ids: int [Q, >=k], exact neighbours, best first.
    approx_ids: int [Q, >=k], approximate neighbours, best first.
    k: neighbours compared.
    exact_scores: optional float [Q, >=k], the exact neighbours' scores.
    approx_true_scores: optional float [Q, >=k], the exact inner products of
      the approximate neighbours (`true_scores`), not the searcher's estimates.
    tolerance: relative slack of the tie rule.

  Returns:
    A float in [0, 1].
  """
  exact_ids = np.asarray(exact_ids)[:, :k]
  approx_ids = np.asarray(approx_ids)[:, :k]
  if exact_ids.shape[1] < k or approx_ids.shape != exact_ids.shape:
    raise ValueError(f"need [Q, >={k}] ids of both, got exact "
                     f"{exact_ids.shape}, approximate {approx_ids.shape}")
  hits = (approx_ids[:, :, None] == exact_ids[:, None, :]).any(axis=2)
  if exact_scores is not None and approx_true_scores is not None:
    kth_score = np.asarray(exact_scores, np.float64)[:, k - 1:k]
    slack = tolerance * np.maximum(1.0, np.abs(kth_score))
    approx_true_scores = np.asarray(approx_true_scores, np.float64)[:, :k]
    hits |= approx_true_scores >= kth_score - slack
  hits &= approx_ids >= 0
  return float(np.mean(hits.sum(axis=1) / k))


def true_scores(queries, database, ids):
  """float [Q, K]: exact inner products of queries and found ids (-1: -inf)."""
  ids = np.asarray(ids)
  found = np.asarray(database[np.maximum(ids, 0)], np.float64)
  scores = np.einsum("qd,qkd->qk", np.asarray(queries, np.float64), found)
  return np.where(ids >= 0, scores, -np.inf)


def clustered_gaussian_vectors(num_vectors, dim, *, seed,
                               vectors_per_cluster=100, noise=0.7):
  """float32 [num_vectors, dim] drawn from a mixture of Gaussians.

  A stand-in for learned text embeddings: many small clusters (a topic and
  its paraphrases, `vectors_per_cluster` each on average), cluster centres
  and within-cluster noise both shrinking along the dimensions with a
  power-law spectrum (scale i^-1/2 on dimension i), so that a few directions
  carry most of the variance, as in trained embeddings. The noise is of the
  order of the spread of the centres (`noise` times it), so clusters overlap
  and a partition of the space cannot isolate a query's neighbours.
  Deterministic from `seed`.
  """
  rng = np.random.default_rng(seed)
  spectrum = (np.arange(1, dim + 1, dtype=np.float32)) ** -0.5
  num_clusters = max(1, num_vectors // vectors_per_cluster)
  centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
  centres *= spectrum
  vectors = rng.standard_normal((num_vectors, dim), dtype=np.float32)
  vectors *= noise * spectrum
  vectors += centres[rng.integers(0, num_clusters, num_vectors)]
  return vectors


def synthetic_database_and_queries(num_blocks, num_queries, dim, seed):
  """(database [num_blocks, dim], queries [num_queries, dim]), one mixture."""
  vectors = clustered_gaussian_vectors(num_blocks + num_queries, dim, seed=seed)
  return vectors[:num_blocks], vectors[num_blocks:]


def timed(search, queries, warmup_queries=8):
  """(search(queries), queries per second); a short warm-up call goes first.

  The warm-up traces TF functions and touches the index, so the timing is of
  steady-state search.
  """
  search(queries[:warmup_queries])
  start = time.perf_counter()
  result = search(queries)
  seconds = time.perf_counter() - start
  return result, len(queries) / seconds


def compare(database, queries, scann_config, k, *, leaves_to_search=(None,),
            scann_index_dir=None):
  """Exact search vs ScaNN on `queries` over `database`: a result dict.

  Args:
    database: float32 [N, D].
    queries: float32 [Q, D].
    scann_config: a dict from `retrievers.load_scann_config`.
    k: recall@k.
    leaves_to_search: values to sweep; None means the config's own.
    scann_index_dir: optional; an existing directory is loaded as a saved
      index, a new one receives the index built.

  Returns:
    {"num_blocks", "num_queries", "k", "exact_queries_per_second",
     "scann_build_seconds" (None when loaded), "rows": [{"leaves_to_search",
     "recall", "queries_per_second", "speedup"}]}.
  """
  (exact_scores, exact_ids), exact_qps = timed(
      lambda q: retrievers.exact_search(q, database, k), queries)
  build_seconds = None
  if scann_index_dir and tf.io.gfile.exists(scann_index_dir):
    searcher = retrievers.ScannSearcher.load(scann_index_dir, scann_config)
  else:
    start = time.perf_counter()
    searcher = retrievers.ScannSearcher.build(database, scann_config)
    build_seconds = time.perf_counter() - start
    if scann_index_dir:
      searcher.save(scann_index_dir)
  rows = []
  for leaves in leaves_to_search:
    (_, approx_ids), scann_qps = timed(
        lambda q, leaves=leaves: searcher.search(q, k, leaves_to_search=leaves),
        queries)
    recall = recall_at_k(
        exact_ids, approx_ids, k, exact_scores=exact_scores,
        approx_true_scores=true_scores(queries, database, approx_ids))
    rows.append({
        "leaves_to_search": leaves or scann_config["num_leaves_to_search"],
        "recall": recall, "queries_per_second": scann_qps,
        "speedup": scann_qps / exact_qps})
  return {"num_blocks": int(database.shape[0]),
          "num_queries": int(queries.shape[0]), "k": k,
          "exact_queries_per_second": exact_qps,
          "scann_build_seconds": build_seconds, "rows": rows}


def format_table(result):
  """The result of `compare` as a text table, exact search first."""
  k = result["k"]
  lines = [f"{'search':<24} {f'recall@{k}':>10} {'queries/s':>11} "
           f"{'vs exact':>9}",
           f"{'exact':<24} {1.0:>10.4f} "
           f"{result['exact_queries_per_second']:>11,.1f} {1.0:>8.1f}x"]
  for row in result["rows"]:
    name = f"scann leaves={row['leaves_to_search']}"
    lines.append(f"{name:<24} {row['recall']:>10.4f} "
                 f"{row['queries_per_second']:>11,.1f} {row['speedup']:>8.1f}x")
  return "\n".join(lines)
