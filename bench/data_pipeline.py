"""Start-up time and throughput of the data pipeline on the embedded stdlib corpus.

    PYTHONPATH=. python bench/data_pipeline.py                      # byte tokenizer
    PYTHONPATH=. python bench/data_pipeline.py --hf --cache_dir=/tmp/dsj_cache   # run twice

--hf trains a 4096-token byte-level BPE on 2 MB of the stdlib first (not timed) to stand in for a
real tokenizer.json; the cache makes the second run's start-up a file load.
"""

import argparse
import os
import tempfile
import time

T0 = time.perf_counter()
from deepseek_jax import data  # noqa: E402  (import time is part of start-up)

T_IMPORT = time.perf_counter() - T0


def _train_bpe(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from deepseek_jax.data import sources

    texts, size = [], 0
    for f in sources.list_files(data.DataConfig()):
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
        size += len(texts[-1])
        if size > 2_000_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=4096,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", action="store_true")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    kw = {}
    vocab = 258
    if args.hf:
        path = os.path.join(tempfile.gettempdir(), "dsj_bench_tokenizer.json")
        if not os.path.exists(path):
            _train_bpe(path)
        kw = dict(tokenizer=data.TokenizerKind.HF, tokenizer_path=path)
        vocab = 4096
    cfg = data.DataConfig(cache_dir=args.cache_dir, num_threads=args.threads, **kw)
    t = time.perf_counter()
    it = data.make_train_iterator(
        cfg, seq_len=args.seq_len, global_batch_size=args.batch, model_vocab_size=vocab, seed=0
    )
    next(it)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t
    print(f"import {T_IMPORT:.2f}s, index+first batch {t_build:.2f}s; {it.info}")
    print(
        f"{args.batches / dt:.0f} batches/s, "
        f"{args.batches * args.batch * args.seq_len / dt / 1e6:.2f}M tokens/s "
        f"(B={args.batch}, S={args.seq_len}, threads={args.threads})"
    )


if __name__ == "__main__":
    main()
