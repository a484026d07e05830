"""``doe-ext lda fit | label | show``: Stage-1 topic model on token corpus shards."""
from __future__ import annotations

import argparse
from pathlib import Path

from doe_ext.cli import CommandError, count, input_file, input_folder, number, output_folder, positive_float, positive_int

MAX_TOPICS = 32767  # doe_ext.lda.model.MAX_TOPICS (topic ids are int16), here so that parsing needs no numpy


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("lda", help="Stage-1 LDA: fit, label, show topics")
    cmds = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = cmds.add_parser("fit", help="fit an LDA model on a corpus shard")
    f.add_argument("corpus", type=input_folder, help="corpus shard folder (doe-ext corpus build)")
    f.add_argument("--out", required=True, type=output_folder, help="model folder to write")
    f.add_argument("-k", "--num-topics", type=number(int, 1, high=MAX_TOPICS), default=128)
    f.add_argument("--iterations", type=count, default=200, help="Gibbs sweeps")
    f.add_argument("--alpha", type=positive_float, default=None, help="document-topic prior (default 50/K)")
    f.add_argument("--beta", type=positive_float, default=0.01, help="topic-word prior")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=positive_int, default=None)
    f.add_argument("--sampler", choices=("alias", "dense"), default="alias")
    f.add_argument("--max-doc-freq", type=number(float, 0.0, strict=True, high=1.0), default=0.5,
                   help="drop words in more than this fraction of documents (stop-like tokens)")
    f.add_argument("--min-count", type=count, default=1, help="drop words seen fewer times")
    f.add_argument("--exclude", type=_ids, default=[],
                   help="comma-separated token ids to drop (the tokenizer's special tokens are "
                        "always dropped)")
    f.add_argument("--heldout", type=input_folder, help="a corpus shard to report held-out perplexity on")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=fit)

    lab = cmds.add_parser("label", help="write per-token topic ids and theta for corpus shards")
    lab.add_argument("model", type=input_folder, help="model folder (doe-ext lda fit)")
    lab.add_argument("shards", nargs="+", type=input_folder, help="corpus shard folders")
    lab.add_argument("--out", type=output_folder, help="output folder (default: each shard's own folder; with several "
                                    "shards, one subfolder per shard)")
    lab.add_argument("--unlabeled", choices=("dominant", "ignore"), default="dominant",
                     help="label of tokens outside the LDA vocabulary: the document's dominant "
                          "topic, or -1")
    lab.add_argument("--chunk-tokens", type=positive_int, default=1 << 22)
    lab.add_argument("--threads", type=positive_int, default=None)
    lab.add_argument("--ray", action="store_true", help="run one Ray task per shard")
    lab.add_argument("--ray-address", default=None, help="Ray cluster address (e.g. auto)")
    lab.add_argument("--no-progress", action="store_true")
    lab.set_defaults(func=label)

    s = cmds.add_parser("show", help="print each topic's top tokens")
    s.add_argument("model", type=input_folder, help="model folder")
    s.add_argument("-n", type=positive_int, default=10, help="tokens per topic")
    s.add_argument("--tokenizer", type=input_file, help="tokenizer.json to print strings (default: the one the "
                                       "model's corpus was built with, when it is a file)")
    s.set_defaults(func=show)


def fit(args) -> None:
    from doe_ext.lda import LDA, TokenCorpus

    corpus = TokenCorpus.open(args.corpus)
    model = LDA(num_topics=args.num_topics, alpha=args.alpha, beta=args.beta, seed=args.seed,
                threads=args.threads, sampler=args.sampler)
    exclude = sorted(set(args.exclude) | set(corpus.meta.get("special_token_ids") or []))
    model.fit(corpus, iterations=args.iterations, progress=not args.no_progress, exclude=exclude,
              max_doc_freq=args.max_doc_freq, min_count=args.min_count)
    model.fit_info["tokenizer"] = corpus.meta.get("tokenizer")
    model.fit_info["corpus"] = str(Path(args.corpus).resolve())
    info = model.fit_info
    msg = (f"fitted K={model.num_topics} on {info['kept_tokens']} tokens ({info['kept_vocab']} words "
           f"kept) in {info['seconds']:.1f}s, {info['token_samples_per_s'] or 0:.3g} token-samples/s")
    if args.heldout:
        ppl = model.perplexity(TokenCorpus.open(args.heldout))
        model.fit_info["heldout_perplexity"] = ppl
        msg += f"; held-out perplexity {ppl:.1f}"
    model.save(args.out)
    print(f"{msg}; saved to {args.out}")


def label(args) -> None:
    from doe_ext.lda import LDA, TokenCorpus

    model = LDA.load(args.model, threads=args.threads)
    if args.ray:
        from doe_ext.lda.distributed import label_shards
        outs = label_shards(args.shards, model, args.out, unlabeled=args.unlabeled,
                            chunk_tokens=args.chunk_tokens, address=args.ray_address,
                            progress=not args.no_progress)
    else:
        corpora = [TokenCorpus.open(s) for s in args.shards]  # check every shard before starting
        names = [Path(s).name for s in args.shards]
        if args.out and len(set(names)) != len(names):
            raise CommandError("--out: shard folder names must be distinct")
        outs = []
        for name, corpus in zip(names, corpora):
            target = Path(args.out) / name if args.out and len(corpora) > 1 else args.out
            outs.append(model.label_to(corpus, target, unlabeled=args.unlabeled,
                                       chunk_tokens=args.chunk_tokens, progress=not args.no_progress))
    for o in outs:
        print(f"labels: {o}")


def show(args) -> None:
    from doe_ext.lda import LDA

    model = LDA.load(args.model)
    tokenizer = args.tokenizer
    saved = model.fit_info.get("tokenizer")
    if tokenizer is None and saved and Path(saved).is_file():
        tokenizer = saved
    top = model.top_tokens(args.n, tokenizer=tokenizer)
    weight = model.topic_counts / max(model.topic_counts.sum(), 1)
    for k, words in enumerate(top):
        shown = " ".join(repr(w) if isinstance(w, str) else str(w) for w in words)
        print(f"topic {k:3d} ({weight[k]:6.2%}): {shown}")
