r"""Trains REALM's query embedder contrastively (optionally its block embedder too).

  python train_retriever.py \
    --retriever_config_path=W/retriever_config.json \
    --train_path=W/kilt/eli5-train-kilt.jsonl --kilt_title_map=TITLE_MAP.json \
    --eval_path=W/kilt/eli5-dev-kilt.jsonl --output_dir=RUN \
    --batch_size=64 --grad_cache --query_chunk_size=16 --max_steps=300

pairs each question with its gold provenance block (KILT; else with its
answer) or reads DPR's JSON (`--train_format=dpr`, with
`--num_hard_negatives`), and trains with the in-batch softmax loss, by the
gradient cache with `--grad_cache`. It writes checkpoints (rerunning the same
command resumes), TensorBoard scalars, exports of the embedder(s) in the
format the query cacher, live retrieval and the index refresher load
(`RUN/exports/latest.json` names the newest), and `RUN/retriever_eval.json`:
KILT's retrieval metrics of `--eval_path` before and after training.

The flags are the fields of `retriever_training.RetrieverTrainConfig`; from
Python, call `retriever_training.train(config)`.
"""

import cli
import retriever_training

_FLAGS = cli.define_flags(retriever_training.RetrieverTrainConfig)


def main(argv):
  for line in retriever_training.summary_lines(
      retriever_training.train(_FLAGS.config())):
    print(line, flush=True)


if __name__ == "__main__":
  cli.run(main)
