r"""Writes the GPT-2 ids of every REALM block once, read later by block id.

  python util_scripts/pretokenize_blocks.py \
    --retriever_config_path=configs/retriever_configs/realm_cc_news_pretrained.json \
    --output_dir=BLOCK_TOKENS --tokenizer=gpt2 [--max_block_tokens=0] \
    [--context_with_title]

reads every block of the config's text_records (and, with
`--context_with_title`, its title_records), tokenizes it as the layout reads
it (`task_specific.text_token_ids` of the text or `title: text`, cut at
`--max_block_tokens`, 0: whole blocks) and writes `offsets.int64`, the ids
file and `token_store.json` (written last) into `--output_dir`. The cacher
(`query_cacher_tfrecord.py --block_token_store=BLOCK_TOKENS`) and live
retrieval (`--block_token_store`) then read a neighbour's ids instead of
tokenizing it; their outputs are the same either way. Rerunning the same
command after a kill continues where the last recorded batch ended and gives
the uninterrupted run's files byte for byte.

The flags are the fields of `token_store.PretokenizeConfig`; from Python,
call `token_store.pretokenize(config)`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import token_store  # pylint: disable=g-import-not-at-top

_FLAGS = cli.define_flags(token_store.PretokenizeConfig)


def main(argv):
  token_store.pretokenize(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
