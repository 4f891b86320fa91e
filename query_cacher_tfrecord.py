r"""Caches the REALM neighbours of every KILT ELI5 question as sharded TFRecords.

  python query_cacher_tfrecord.py \
    --retriever_config_path=configs/retriever_configs/realm_cc_news_pretrained.json \
    --dataset_root=KILT_DIR --output_dir=CACHE --num_neighbours=100 \
    --search=exact --tokenizer=gpt2

embeds every question with REALM's query embedder, searches the block
embeddings (exact, or ScaNN), and writes the top `--num_neighbours` block ids
and scores with the GPT-2 ids of the question, its answers and the blocks as
`{split}-{i:05d}-of-{n:05d}.tfrecord` shards and `manifest.json` (written
last). Rerunning the same command after a kill keeps the shards already
written and gives the uninterrupted run's cache; another request into the
same directory is refused; one cacher at a time writes a directory.

`--block_token_store=BLOCK_TOKENS` reads the neighbours' GPT-2 ids from a
pre-tokenised store (util_scripts/pretokenize_blocks.py) instead of
tokenizing them: the same cache, byte for byte, faster. `--num_neighbours=0`
caches questions and answers only, without loading a retriever (no
`--retriever_config_path` needed), for `--approach_type=live_retrieval`
(which retrieves the neighbours itself) or `naked_lm`.

The flags are the fields of `caching.CacheConfig`; from Python, call
`caching.cache(config)`.
"""

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli

import caching

_CACHE_FLAGS = cli.define_flags(caching.CacheConfig)


def main(argv):
  caching.cache(_CACHE_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
