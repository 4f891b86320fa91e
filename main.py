"""Trains GPT-2 on KILT ELI5 with cached retrievals, or evaluates the retrieval ablation.

  python main.py --task=train --approach_type=cached_pretok \
      --model_key=gpt2 --cache_dir=CACHE --output_dir=RUNS --run_name=NAME \
      --max_steps=1000

writes RUNS/NAME/: `config.json` (every setting, the model's whole config),
`tokenizer/`, `checkpoints/` (model, optimizer, step and the tf.data
iterator), TensorBoard events in `train/` and `eval/`, `metrics.jsonl`, and
at the end `final_model/` (Hugging Face format) and `done.json`. Rerunning
the same command resumes from the latest checkpoint; a run that has reached
--max_steps only re-exports the model. A resumed run refuses settings that
change its training unless --allow_changed_settings is given (config.json
then records the change). One job at a time writes a run directory (a lock
file, `lock`, names its holder).

  python main.py --task=evaluate ...same flags...

scores the latest checkpoint on --eval_split under every context condition
of --conditions (real, top_k, random, none, shuffled by default; also
distractor, gold, counterfactual) and writes RUNS/NAME/ablation_{split}.json
(answer perplexity per token and per word, bits per byte, paired differences
with 95 % intervals), ablation_{split}_examples.jsonl (one row per example
and condition), ablation_{split}.md and ablation_{split}.png.

The flags are the fields of `training.TrainConfig`; from Python, call
`training.train(config)` / `evaluation.evaluate(config)`.
"""

from absl import flags

import cli
import evaluation
import training

_FLAG_TASK = flags.DEFINE_enum("task", "train", ["train", "evaluate"],
                               "train, or evaluate the context-condition grid.")
_TRAIN_FLAGS = cli.define_flags(training.TrainConfig)


def main(argv):
  config = _TRAIN_FLAGS.config()
  if _FLAG_TASK.value == "train":
    training.train(config)
  else:
    evaluation.evaluate(config)


if __name__ == "__main__":
  cli.run(main)
