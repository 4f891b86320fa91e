r"""Re-embeds every block with a (newly trained) block embedder and swaps the
result in as the index root's current version.

  python refresh_index.py --index_root=INDEX [--block_embedder=EXPORT] \
      [--query_embedder=EXPORT] \
      [--retriever_config_path=configs/retriever_configs/x.json]  # 1st time
      [--scann_config_path=configs/scann_configs/default.json]

writes INDEX/versions/NAME/ (the query embedder with the new block
embeddings in encoded/encoded.ckpt, optionally a ScaNN index), then points
INDEX/CURRENT at it. Jobs and retrieval_server.py read the root through
`--retriever_config_path=INDEX/retriever_config.json`; a running server
serves the new version once it has loaded it, without dropping requests.
Killed at any point, the same command resumes from the shards embedded so
far and gives the same version. Without --block_embedder (after the first
refresh) the current block embeddings are kept, with a new
--query_embedder. `--watch_exports=RUN/exports/latest.json` refreshes with
each export a train_retriever.py run writes, while it trains (REALM's
asynchronous refresh). The flags are the fields of
`index_refresh.RefreshConfig`; from Python, call `index_refresh.refresh`.
"""

import cli
import index_refresh

_FLAGS = cli.define_flags(index_refresh.RefreshConfig)


def main(argv):
  index_refresh.refresh(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
