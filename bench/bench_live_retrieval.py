r"""Live retrieval's questions/s: in this process, and through retrieval_server.py.

  python bench/bench_live_retrieval.py [--quick] [--train_step_questions_per_second=N]

(a) The demo world (`util_scripts/demo_world.py`, its default sizes): REALM
    query embedding of question texts, exact search and the blocks' GPT-2
    ids, `--k` neighbours for `--batch_size` questions a call, as a
    `live_retrieval` run asks for them.
(b) `--num_blocks` synthetic blocks (dim 128, Gaussian), exact search of
    query vectors only (no embedding, no GPT-2 ids): the search and the
    transport.

Each is timed in-process (`live_retrieval.LocalRetrieval`) and through a
server in a subprocess on 127.0.0.1 with 1 and 4 concurrent clients
(`retrieval_client.RemoteRetrieval`, one thread each, every client sending
the same batches), interleaved (`bench_common.interleaved`, best of
`--repeats`, after a warm-up that also fills the blocks' token cache). The
ratios (server / in-process, and against the questions/s a GPT-2 train step
consumes, `--train_step_questions_per_second`, e.g. bench_input_pipeline.py's
"train step: N examples/s") are printed only when the machine's load, less
the server's own CPU, stayed within `bench_common`'s limit; otherwise "load
too high: figures not comparable". `--quick` is a smoke run of small sizes.
"""

import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import typing

from absl import logging

# Run as a script from the repository root or anywhere: the modules live one
# up; the server's start-and-wait helper is the tests' (tests/server_fixtures).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__)),
                 os.path.join(REPO, "tests")]

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import kilt_files  # pylint: disable=g-import-not-at-top,wrong-import-position
import live_retrieval  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrieval_client  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrievers  # pylint: disable=g-import-not-at-top,wrong-import-position
import server_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position
import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
import task_specific  # pylint: disable=g-import-not-at-top,wrong-import-position
from util_scripts import demo_world  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

setting = settings.setting

PARTS = ("a", "b")
CLIENT_COUNTS = (1, 4)
QUICK_WORLD = dict(num_train=600, num_validation=20, num_test=10,
                   num_distractor_blocks=1000, gpt2_vocab_size=500)
QUICK_NUM_BLOCKS = 50_000
QUICK_NUM_BATCHES = 3


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The bench's settings (its flags)."""
  quick: bool = setting(
      False, "A smoke run: a small demo world, "
      f"{QUICK_NUM_BLOCKS} synthetic blocks, {QUICK_NUM_BATCHES} batches; "
      "overrides --num_blocks and --num_batches.")
  parts: tuple = setting(PARTS, "Parts to run: a (demo world), b "
                         "(synthetic blocks, query vectors).")
  num_blocks: int = setting(1_000_000, "(b): synthetic blocks.")
  k: int = setting(
      100, "Neighbours per question (main.py's live_num_neighbours).")
  batch_size: int = setting(
      32, "Questions per call (main.py's retrieval_batch_size).")
  num_batches: int = setting(20, "Calls per timed run of each client.")
  repeats: int = setting(
      bench_common.MIN_REPEATS, "Timed runs of each way (interleaved); the "
      "fastest is kept.")
  train_step_questions_per_second: float = setting(
      0.0, "Questions/s one GPT-2 train step consumes (bench_input_pipeline."
      "py's 'train step: N examples/s'), to print the ratio against; 0: no "
      "such ratio.")
  work_dir: typing.Optional[str] = setting(
      None, "Where the worlds are written (default: a temporary directory, "
      "deleted at the end).")
  output_path: typing.Optional[str] = setting(
      None, "Also write the figures here as JSON.")
  seed: int = setting(0, "Seed of the worlds and the queries.")


def uptime():
  return subprocess.run(["uptime"], capture_output=True, text=True,
                        check=False).stdout.strip()


def process_cpu_seconds(pid):
  """User + system CPU seconds of a running process (Linux /proc)."""
  with open(f"/proc/{pid}/stat", encoding="ascii") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_without(start, server, server_cpu_at_start):
  """`bench_common.load_since(start)`, the server's CPU not counted as
  other work (it is this bench's)."""
  load = bench_common.load_since(start)
  if load.others_cores is None:
    return load
  wall = bench_common.snapshot().wall_seconds - start.wall_seconds
  server_cores = (process_cpu_seconds(server.process.pid) -
                  server_cpu_at_start) / wall
  return dataclasses.replace(load,
                             others_cores=load.others_cores - server_cores)


def concurrently(call, batches, clients):
  """Runs `call` on every batch in each of `clients` threads."""
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for future in [pool.submit(lambda: [call(b) for b in batches])
                   for _ in range(clients)]:
      future.result()


def measure(name, local, remote, call, batches, config, server):
  """Questions/s of `call(retrieval, batch)` in-process and through the
  server; prints them and returns them with the load."""
  questions = sum(len(batch) for batch in batches)
  ways = {"in-process": lambda: [call(local, b) for b in batches]}
  clients_of = {"in-process": 1}
  for clients in CLIENT_COUNTS:
    way = f"server, {clients} client(s)"
    clients_of[way] = clients
    ways[way] = lambda clients=clients: concurrently(
        lambda batch: call(remote, batch), batches, clients)
  print(f"uptime before ({name}): {uptime()}")
  start, server_cpu = bench_common.snapshot(), process_cpu_seconds(
      server.process.pid)
  timings = bench_common.interleaved(ways, config.repeats)
  load = load_without(start, server, server_cpu)
  print(f"uptime after ({name}): {uptime()}")
  rates = {way: questions * clients_of[way] / timing.min
           for way, timing in timings.items()}
  result = {"questions_per_second": rates, "load": load.as_dict()}
  for way, rate in rates.items():
    print(f"  {way:22s} {rate:10,.0f} questions/s")
  print(f"  {load.describe()}")
  if not load.comparable:
    print("  load too high: figures not comparable")
    return result
  result["ratios"] = {f"{way} / in-process": rate / rates["in-process"]
                      for way, rate in rates.items() if way != "in-process"}
  if config.train_step_questions_per_second:
    result["ratios"].update({
        f"{way} / train step": rate / config.train_step_questions_per_second
        for way, rate in rates.items()})
  for ratio_name, ratio in result["ratios"].items():
    print(f"  {ratio_name:36s} {ratio:8.2f}x")
  return result


def server_flags(retriever_config_path, tokenizer_dir, config):
  return {"retriever_config_path": retriever_config_path,
          "tokenizer": tokenizer_dir,
          "max_request_questions": max(1024, config.batch_size),
          "max_batch_questions": max(CLIENT_COUNTS) * config.batch_size}


def bench_world(name, world, call, batches, config, retrieval_settings):
  """`measure` over a world ({retriever_config, tokenizer}) served by a
  server started for it."""
  tokenizer = task_specific.load_tokenizer(world["tokenizer"])
  local = live_retrieval.LocalRetrieval(live_retrieval.RetrievalConfig(
      retriever_config_path=world["retriever_config"], **retrieval_settings),
                                        tokenizer)
  flags = dict(server_flags(world["retriever_config"], world["tokenizer"],
                            config), **retrieval_settings)
  with server_fixtures.running_server(
      flags, os.path.join(world["root"], "server_logs"),
      deadline_seconds=1800) as server:
    remote = retrieval_client.RemoteRetrieval(server.url, tokenizer,
                                              timeout_seconds=600)
    print(f"{name}: {local.num_blocks:,} blocks, k={config.k}, "
          f"{config.batch_size} questions a call, {len(batches)} calls a "
          f"client, index {local.index_version}")
    return measure(name, local, remote, call, batches, config, server)


def demo_part(config, work_dir, num_batches):
  """(a): question texts of the demo world, with the blocks' GPT-2 ids."""
  directory = os.path.join(work_dir, "demo_world")
  sizes = QUICK_WORLD if config.quick else {}
  world = demo_world.build_world(directory, seed=config.seed, **sizes)
  train_file = os.path.join(world["paths"]["kilt_dir"],
                            kilt_files.ELI5_SPLIT_FILES["train"])
  questions = [question for _, question, _ in
               kilt_files.eli5_questions(train_file)]
  needed = num_batches * config.batch_size
  if len(questions) < needed:
    raise utils.UserError(f"the demo world has {len(questions)} questions, "
                          f"expected at least {needed} for the batches")
  batches = [questions[i:i + config.batch_size]
             for i in range(0, needed, config.batch_size)]
  return bench_world(
      "(a) demo world, question texts", dict(
          retriever_config=world["paths"]["retriever_config"],
          tokenizer=world["paths"]["tokenizer"], root=directory),
      lambda retrieval, batch: retrieval.retrieve(batch, config.k), batches,
      config, {})


def write_synthetic_index(directory, embedder_dir, num_blocks, seed):
  """A retriever config of `num_blocks` Gaussian blocks (the demo embedder's
  width) with one-word block texts; returns its path."""
  embedder = os.path.join(directory, "embedder")
  if not os.path.isdir(embedder):
    shutil.copytree(embedder_dir, embedder,
                    ignore=shutil.ignore_patterns("encoded"))
  width = demo_world.EMBEDDING_SIZE
  rng = np.random.default_rng(seed)
  block_emb = np.concatenate([
      rng.standard_normal([min(100_000, num_blocks - start), width],
                          dtype=np.float32)
      for start in range(0, num_blocks, 100_000)])
  retrievers.write_block_embeddings(embedder, block_emb)
  with tf.io.TFRecordWriter(os.path.join(directory, "blocks.tfr")) as writer:
    for index in range(num_blocks):
      writer.write(f"block {index}".encode("utf-8"))
  config_path = os.path.join(directory, "retriever_config.json")
  utils.atomic_write_json(config_path, {
      "query_embedder_path": "embedder", "text_records": "blocks.tfr",
      "num_block_records": num_blocks})
  return config_path


def synthetic_part(config, work_dir, num_blocks, num_batches):
  """(b): query vectors over synthetic blocks, search only."""
  demo_dir = os.path.join(work_dir, "demo_world")
  if not os.path.exists(os.path.join(demo_dir, "world.json")):
    demo_world.build_world(demo_dir, seed=config.seed, **QUICK_WORLD)
  paths = demo_world.world_paths(demo_dir)
  directory = utils.makedirs(os.path.join(work_dir, "synthetic"))
  config_path = write_synthetic_index(directory, paths["embedder"],
                                      num_blocks, config.seed)
  rng = np.random.default_rng(config.seed + 1)
  batches = [rng.standard_normal([config.batch_size, demo_world.EMBEDDING_SIZE],
                                 dtype=np.float32)
             for _ in range(num_batches)]
  return bench_world(
      "(b) synthetic blocks, query vectors", dict(
          retriever_config=config_path, tokenizer=paths["tokenizer"],
          root=directory),
      lambda retrieval, batch: retrieval.search_vectors(
          batch, config.k, with_token_ids=False), batches, config, {})


def check_config(config):
  unknown = sorted(set(config.parts) - set(PARTS))
  if unknown or not config.parts:
    raise utils.UserError(f"--parts={','.join(config.parts)}: expected some "
                          f"of {', '.join(PARTS)}")
  for name in ("num_blocks", "k", "batch_size", "num_batches"):
    if getattr(config, name) < 1:
      raise utils.UserError(f"--{name}={getattr(config, name)}: must be at "
                            "least 1")
  bench_common.check_repeats(config.repeats, "repeats")
  if config.output_path:
    utils.check_output_path(config.output_path, "--output_path")


def run(config):
  """Runs the parts of `config` (a `BenchConfig`); returns their figures."""
  check_config(config)
  num_blocks = QUICK_NUM_BLOCKS if config.quick else config.num_blocks
  num_batches = QUICK_NUM_BATCHES if config.quick else config.num_batches
  work_dir = config.work_dir or tempfile.mkdtemp(prefix="bench_live_")
  results = {"config": settings.flatten(config)}
  try:
    if "a" in config.parts:
      results["a"] = demo_part(config, work_dir, num_batches)
    if "b" in config.parts:
      results["b"] = synthetic_part(config, work_dir, num_blocks, num_batches)
  finally:
    if not config.work_dir:
      shutil.rmtree(work_dir, ignore_errors=True)
  if config.output_path:
    bench_common.write_results(config.output_path, results)
  return results


_FLAGS = cli.define_flags(BenchConfig)


def main(argv):
  # Building the worlds logs every file TensorFlow writes: keep the figures
  # readable.
  logging.set_verbosity(logging.WARNING)
  run(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
