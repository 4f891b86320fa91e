r"""Serves REALM retrieval over HTTP to many jobs: the index loaded once.

  python retrieval_server.py \
    --retriever_config_path=configs/retriever_configs/realm_cc_news_pretrained.json \
    --tokenizer=gpt2 [--search=scann --scann_config_path=...] [--port=8765]

prints `retrieval server ready: http://HOST:PORT (index version V, ...)`
once it listens; jobs then retrieve from it with
`--retrieval_server=http://HOST:PORT`. `POST /search` and `GET /health` are
described in `retrieval_service.py`. The flags are the fields of
`retrieval_service.ServerConfig`; from Python, call
`retrieval_service.serve(config)`.
"""

import cli
import retrieval_service

_FLAGS = cli.define_flags(retrieval_service.ServerConfig,
                          exclude=retrieval_service.CLIENT_ONLY_FLAGS)


def main(argv):
  retrieval_service.serve(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
