r"""Generates answers to KILT ELI5 questions from a trained run, in KILT's format.

  python generation.py --run_dir=RUNS/NAME --split=validation \
      --output_path=OUT/generations.jsonl [--decoding=beam --num_beams=5 ...] \
      [--evaluate --gold_path=eli5-dev-kilt.jsonl]

reads the run's latest checkpoint and its config.json (layout, cache,
retrieval settings: any of them can be overridden by its flag), lays each
question of the cached split out exactly as training does, up to and including
`Answer:`, and decodes. Or `--model_key=HF_DIR_OR_KEY` (a Hugging Face GPT-2,
e.g. from util_scripts/export_hf.py) with --cache_dir and the layout flags.

Writes OUT/generations.jsonl, one line per question in the cache's order:
{"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id",
"title", "block_id", "score"}]}]} (provenance: the blocks whose text is in the
prompt, in the order drawn, with their cached retrieval scores; `title` from
the block store's titles file, `wikipedia_id` through --kilt_title_map, which
KILT's R-precision, recall@5 and KILT-* scores need), and
OUT/generation_config.json (everything that decides the output). Batches are
appended to OUT/generations.jsonl.partial as they finish; rerunning the same
command after a kill continues from the last whole batch, and the finished
file (renamed into place) equals an uninterrupted run's. With --evaluate, the
generations are scored with KILT's metrics (kilt_metrics.py) and the metrics
written to OUT/kilt_metrics.json.
"""

import json
import os
import sys

from absl import flags
from absl import logging
import tensorflow as tf
import tqdm

import generation_lib
import kilt_metrics
import modeling_tf_gpt2_model_par as modeling
import neighbour_cache
import retrievers
import task_specific
import tf_utils
import utils

_FLAG_RUN_DIR = flags.DEFINE_string(
    "run_dir", None,
    "A run directory of main.py: its latest checkpoint is used, and its "
    "config.json gives the defaults of the flags below. This or --model_key "
    "is required.")
_FLAG_MODEL_KEY = flags.DEFINE_string(
    "model_key", None,
    "Instead of --run_dir: a Hugging Face GPT-2 (hub key or directory with "
    "config.json and weights).")
_FLAG_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None,
    "GPT2TokenizerFast key or directory. Default: the run's, else "
    "--model_key.")
_FLAG_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None,
    "Neighbour cache holding the split's questions. Default: the run's; "
    "required with --model_key.")
_FLAG_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"],
                                "Split of the cache to answer.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None,
    "Required. The generations (.jsonl, local or gs://); "
    "generation_config.json is written beside it, so give each generation "
    "its own directory.")
_FLAG_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", 0, "Answer only the first this many questions; 0: all.")
_FLAG_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8,
    "Global batch: questions decoded at once over all replicas (a multiple "
    "of the number of replicas).")
_FLAG_BLOCKS_PATH = flags.DEFINE_string(
    "blocks_path", None,
    "blocks.tfr of the cache's blocks (the block store the provenance titles "
    "are read through). Default: the cache manifest's.")
_FLAG_TITLES_PATH = flags.DEFINE_string(
    "titles_path", None,
    "titles.tfr (record i: the page title of block i) for the provenance "
    "titles. Default: the cache manifest's titles_path; without one, "
    "provenance has no titles.")
_FLAG_KILT_TITLE_MAP = flags.DEFINE_string(
    "kilt_title_map", None,
    "Title -> wikipedia_id JSON map (util_scripts/kilt_title_map.py): gives "
    "each provenance entry KILT's wikipedia_id, which KILT's R-precision, "
    "recall@5 and KILT-* scores need. Needs block titles (--titles_path or "
    "the manifest's).")

_FLAG_APPROACH_TYPE = flags.DEFINE_enum(
    "approach_type", None, list(generation_lib.APPROACHES),
    "naked_lm: no contexts; cached_pretok: contexts from the cached "
    "neighbours. Default: the run's (cached_pretok for a random_context "
    "run), else cached_pretok.")
_FLAG_NUM_RETRIEVALS = flags.DEFINE_integer(
    "num_retrievals", None, "Contexts per prompt. Default: the run's, else 5.")
_FLAG_RETRIEVAL_TEMPERATURE = flags.DEFINE_float(
    "retrieval_temperature", 0.0,
    "Contexts are drawn without replacement from softmax(scores / this), "
    "seeded as in training; 0 takes the top --num_retrievals by score.")
_FLAG_RETRIEVAL_BANK_SIZE = flags.DEFINE_integer(
    "retrieval_bank_size", None,
    "Draw only among the best this many neighbours; 0: all cached. Default: "
    "the run's, else 0.")
_FLAG_RANDOM_SEED = flags.DEFINE_integer(
    "random_seed", None,
    "Seed of the context draw (as in training). Default: the run's, else 0.")

_FLAG_SEQUENCE_LENGTH = flags.DEFINE_integer(
    "sequence_length", None,
    "Layout: tokens of prompt + answer reserve; 0: the model's n_positions. "
    "Default: the run's, else 0.")
_FLAG_MAX_QUESTION_TOKENS = flags.DEFINE_integer(
    "max_question_tokens", None,
    "Layout: the question is cut to this many tokens. Default: the run's, "
    "else 64.")
_FLAG_MAX_ANSWER_TOKENS = flags.DEFINE_integer(
    "max_answer_tokens", None,
    "Layout: tokens reserved for the answer. Default: the run's, else 350.")
_FLAG_MAX_CONTEXT_TOKENS = flags.DEFINE_integer(
    "max_context_tokens", None,
    "Layout: each context is cut to this many tokens. Default: the run's, "
    "else 288.")
_FLAG_USE_HELPER_WORDS = flags.DEFINE_boolean(
    "use_helper_words", None,
    "Layout: 'Question:', 'Context:', 'Answer:'. Default: the run's, else "
    "true.")
_FLAG_CONTEXT_HELPER_MODE = flags.DEFINE_enum(
    "context_helper_mode", None, list(task_specific.CONTEXT_HELPER_MODES),
    "Layout: 'Context:' before each context or once. Default: the run's, "
    "else each.")

_FLAG_DECODING = flags.DEFINE_enum(
    "decoding", "greedy", list(generation_lib.DECODINGS),
    "greedy; sampling (--temperature, --top_k, --top_p, --sampling_seed); "
    "beam (--num_beams, --length_penalty).")
_FLAG_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 0,
    "Tokens generated per answer; 0: the layout's answer reserve "
    "(--max_answer_tokens + EOS).")
_FLAG_TEMPERATURE = flags.DEFINE_float(
    "temperature", 1.0, "Sampling: softmax temperature (> 0).")
_FLAG_TOP_K = flags.DEFINE_integer(
    "top_k", 0, "Sampling: keep the k most likely tokens; 0: off.")
_FLAG_TOP_P = flags.DEFINE_float(
    "top_p", 1.0, "Sampling: nucleus mass in (0, 1]; 1: off.")
_FLAG_SAMPLING_SEED = flags.DEFINE_integer(
    "sampling_seed", 0, "Sampling: seed (with the batch index).")
_FLAG_NUM_BEAMS = flags.DEFINE_integer(
    "num_beams", 1, "Beam search: beams (>= 2 with --decoding=beam).")
_FLAG_REPETITION_PENALTY = flags.DEFINE_float(
    "repetition_penalty", 1.0,
    "Divides positive (multiplies negative) logits of tokens already in the "
    "prompt or answer, as transformers does; 1: off.")
_FLAG_LENGTH_PENALTY = flags.DEFINE_float(
    "length_penalty", 1.0,
    "Beam search: a finished beam scores log-prob / length**this.")

_FLAG_EVALUATE = flags.DEFINE_boolean(
    "evaluate", False,
    "Score the generations with KILT's metrics against --gold_path.")
_FLAG_GOLD_PATH = flags.DEFINE_string(
    "gold_path", None,
    "KILT gold jsonl with answers (e.g. eli5-dev-kilt.jsonl); required with "
    "--evaluate.")


def _setting(flag_value, run_flags, name, default):
  """The flag's value if given, else the run's value, else `default`."""
  if flag_value is not None:
    return flag_value
  value = run_flags.get(name)
  return default if value is None else value


def _decoding():
  decoding = generation_lib.Decoding(
      method=_FLAG_DECODING.value, max_new_tokens=_FLAG_MAX_NEW_TOKENS.value,
      temperature=_FLAG_TEMPERATURE.value, top_k=_FLAG_TOP_K.value,
      top_p=_FLAG_TOP_P.value, num_beams=_FLAG_NUM_BEAMS.value,
      repetition_penalty=_FLAG_REPETITION_PENALTY.value,
      length_penalty=_FLAG_LENGTH_PENALTY.value,
      seed=_FLAG_SAMPLING_SEED.value)
  generation_lib.check_decoding(decoding)
  return decoding


def _load_model(strategy):
  """(model, tokenizer, its key, the run's flags or {}, the weights' source)."""
  if bool(_FLAG_RUN_DIR.value) == bool(_FLAG_MODEL_KEY.value):
    raise utils.UserError(
        "give exactly one of --run_dir (a main.py run) and --model_key (a "
        "Hugging Face GPT-2)")
  if _FLAG_RUN_DIR.value:
    run_config = generation_lib.read_run_config(_FLAG_RUN_DIR.value)
    tokenizer_key = (_FLAG_TOKENIZER.value or
                     generation_lib.run_tokenizer_key(run_config))
    tokenizer = task_specific.load_tokenizer(tokenizer_key)
    model, checkpoint, step = generation_lib.restore_run_model(
        _FLAG_RUN_DIR.value, run_config, tokenizer, strategy)
    source = {"run_dir": _FLAG_RUN_DIR.value, "checkpoint": checkpoint,
              "step": step}
    return model, tokenizer, tokenizer_key, run_config["flags"], source
  tokenizer_key = _FLAG_TOKENIZER.value or _FLAG_MODEL_KEY.value
  tokenizer = task_specific.load_tokenizer(tokenizer_key)
  with strategy.scope():
    model = modeling.GPT2LMHeadModel.from_pretrained(_FLAG_MODEL_KEY.value)
  return model, tokenizer, tokenizer_key, {}, {
      "model_key": _FLAG_MODEL_KEY.value}


def _data_config(run_flags):
  approach = _FLAG_APPROACH_TYPE.value or run_flags.get("approach_type")
  if approach not in generation_lib.APPROACHES:
    approach = "cached_pretok"
  return task_specific.DataConfig(
      approach=approach,
      num_retrievals=_setting(_FLAG_NUM_RETRIEVALS.value, run_flags,
                              "num_retrievals", 5),
      retrieval_temperature=_FLAG_RETRIEVAL_TEMPERATURE.value,
      retrieval_bank_size=_setting(_FLAG_RETRIEVAL_BANK_SIZE.value, run_flags,
                                   "retrieval_bank_size", 0),
      seed=_setting(_FLAG_RANDOM_SEED.value, run_flags, "random_seed", 0))


def _layout_values(run_flags):
  given = {
      "sequence_length": _FLAG_SEQUENCE_LENGTH.value,
      "max_question_tokens": _FLAG_MAX_QUESTION_TOKENS.value,
      "max_answer_tokens": _FLAG_MAX_ANSWER_TOKENS.value,
      "max_context_tokens": _FLAG_MAX_CONTEXT_TOKENS.value,
      "use_helper_words": _FLAG_USE_HELPER_WORDS.value,
      "context_helper_mode": _FLAG_CONTEXT_HELPER_MODE.value,
  }
  return {name: _setting(value, run_flags, name,
                         generation_lib.LAYOUT_DEFAULTS[name])
          for name, value in given.items()}


def _block_titles(data_config, manifest, titles_path, title_map):
  """fn(block id) -> title or None; None for prompts without contexts."""
  if title_map is not None and not titles_path:
    raise utils.UserError(
        "--kilt_title_map: the provenance needs block titles to map, but the "
        "cache's manifest has no titles_path; give --titles_path (REALM's "
        "titles.tfr)")
  if data_config.approach == "naked_lm":
    return None
  blocks = retrievers.BlockStore(
      _FLAG_BLOCKS_PATH.value or manifest["blocks_path"],
      manifest["num_blocks"], titles_path=titles_path)
  return blocks.title


def main(argv):
  output_path = _FLAG_OUTPUT_PATH.value
  if not output_path:
    raise utils.UserError("--output_path is required (the generations .jsonl)")
  decoding = _decoding()
  gold_records = None
  if _FLAG_EVALUATE.value:
    if _FLAG_SPLIT.value == "test":
      raise utils.UserError(
          "--evaluate: the test split has no gold answers (KILT scores it on "
          "its leaderboard); evaluate --split=validation")
    if not _FLAG_GOLD_PATH.value:
      raise utils.UserError("--evaluate needs --gold_path (a KILT jsonl with "
                            "answers, e.g. eli5-dev-kilt.jsonl)")
    gold_records = kilt_metrics.read_gold(_FLAG_GOLD_PATH.value)
  title_map = (kilt_metrics.read_title_map(_FLAG_KILT_TITLE_MAP.value)
               if _FLAG_KILT_TITLE_MAP.value else None)

  strategy = tf_utils.strategy_from_flags()
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    raise utils.UserError(
        "--distribute_mode=MultiWorkerMirroredStrategy: generation runs on one "
        "host (OneDeviceStrategy, MirroredStrategy or TPUStrategy); run one "
        "job per split or per --max_examples range instead")
  batch_size = _FLAG_BATCH_SIZE.value
  num_replicas = strategy.num_replicas_in_sync
  if batch_size < 1 or batch_size % num_replicas:
    raise utils.UserError(
        f"--batch_size={batch_size}: must be a positive multiple of the "
        f"{num_replicas} replicas")
  if _FLAG_MAX_EXAMPLES.value < 0:
    raise utils.UserError(
        f"--max_examples={_FLAG_MAX_EXAMPLES.value}: must be >= 0 (0: all)")

  model, tokenizer, tokenizer_key, run_flags, source = _load_model(strategy)
  cache_dir = _setting(_FLAG_CACHE_DIR.value, run_flags, "cache_dir", None)
  if not cache_dir:
    raise utils.UserError("--cache_dir is required with --model_key")
  manifest = neighbour_cache.read_manifest(cache_dir)
  neighbour_cache.check_manifest(
      manifest, cache_dir, split=_FLAG_SPLIT.value,
      vocab_size=model.config.vocab_size,
      tokenizer_fingerprint=neighbour_cache.tokenizer_fingerprint(tokenizer))
  data_config = _data_config(run_flags)
  task_specific.check_data_config(data_config, manifest, cache_dir)
  layout_values = _layout_values(run_flags)
  layout = generation_lib.make_layout(tokenizer, layout_values,
                                      model.config.n_positions)
  decoding = generation_lib.resolve_max_new_tokens(
      decoding, layout, model.config.n_positions)
  titles_path = _FLAG_TITLES_PATH.value or manifest.get("titles_path")
  titles = _block_titles(data_config, manifest, titles_path, title_map)

  prompts = generation_lib.read_prompts(
      neighbour_cache.split_files(cache_dir, manifest, _FLAG_SPLIT.value),
      data_config, layout, _FLAG_MAX_EXAMPLES.value)
  truncation = generation_lib.truncation_summary(prompts, layout)
  logging.info("prompt layout: %s", truncation)

  config = {
      "output_name": os.path.basename(output_path), "source": source,
      "tokenizer": tokenizer_key, "cache_dir": cache_dir,
      "split": _FLAG_SPLIT.value, "max_examples": _FLAG_MAX_EXAMPLES.value,
      "num_examples": len(prompts["id"]),
      "approach_type": data_config.approach,
      "num_retrievals": data_config.num_retrievals,
      "retrieval_temperature": data_config.retrieval_temperature,
      "retrieval_bank_size": data_config.retrieval_bank_size,
      "random_seed": data_config.seed,
      "layout": dict(layout_values, sequence_length=layout.sequence_length),
      "prompt_length": generation_lib.prompt_length(layout),
      "decoding": vars(decoding),
      "batch_size": batch_size, "num_replicas": num_replicas,
      "titles_path": titles_path,
      "kilt_title_map": _FLAG_KILT_TITLE_MAP.value,
  }
  # One job at a time writes an output: a second one fails at once.
  with utils.locked_directory(os.path.dirname(output_path) or ".",
                              f"{os.path.basename(output_path)}.lock",
                              f"generation output {output_path}"):
    if generation_lib.prepare_output(output_path, config):
      print(f"{output_path}: already complete", flush=True)
    else:
      generate_batch = generation_lib.make_batch_generator(
          strategy, model, decoding, tokenizer.eos_token_id)

      def format_batch(rows, tokens):
        lines = []
        for example_index, example_tokens in zip(range(rows.start, rows.stop),
                                                 tokens):
          record = generation_lib.kilt_record(
              prompts["id"][example_index], prompts["question"][example_index],
              generation_lib.answer_text(tokenizer, example_tokens,
                                         tokenizer.eos_token_id),
              generation_lib.prompt_provenance(prompts, example_index, titles,
                                               title_map))
          lines.append(json.dumps(record) + "\n")
        return "".join(lines)

      num_batches = -(-len(prompts["id"]) // batch_size)
      with tqdm.tqdm(total=num_batches, desc="generate", unit="batch") as bar:
        generation_lib.write_generations(output_path, prompts, batch_size,
                                         generate_batch, format_batch, bar)
      print(f"wrote {len(prompts['id'])} generations to {output_path}; "
            f"{truncation}", flush=True)
    if title_map is not None:
      # Counted over the whole file, batches of an earlier, resumed run too.
      warning = kilt_metrics.unmapped_title_warning(
          [output.get("provenance", []) for output in
           kilt_metrics.read_guess_outputs(output_path).values()],
          _FLAG_KILT_TITLE_MAP.value)
      if warning:
        print(warning, file=sys.stderr, flush=True)

    if gold_records is not None:
      metrics = generation_lib.evaluate_output(
          gold_records, _FLAG_GOLD_PATH.value, output_path)
      utils.atomic_write_json(
          os.path.join(os.path.dirname(output_path) or ".",
                       generation_lib.METRICS_NAME), metrics)
      sys.stdout.write(kilt_metrics.markdown_table(
          {os.path.basename(output_path): metrics}))


if __name__ == "__main__":
  utils.run(main)
