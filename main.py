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

computes answer perplexity on --eval_split with real, random and no contexts
on the latest checkpoint and writes RUNS/NAME/ablation_{split}.json.

The flags are the fields of `training.TrainConfig`; from Python, call
`training.train(config)` / `training.evaluate(config)`.
"""

from absl import flags

import cli
import training
import utils

_FLAG_TASK = flags.DEFINE_enum("task", "train", ["train", "evaluate"],
                               "train, or evaluate the retrieval ablation.")
_TRAIN_FLAGS = cli.define_flags(training.TrainConfig)


def main(argv):
  config = _TRAIN_FLAGS.config()
  if _FLAG_TASK.value == "train":
    training.train(config)
  else:
    training.evaluate(config)


if __name__ == "__main__":
  utils.run(main)
